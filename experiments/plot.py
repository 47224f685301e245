"""Tables and figures of the sweep (experiments/sweep.py) from its JSONL file.

Runs are grouped by *setup* (everything but the optimizer, batch size, noise,
stddev and seed: training-set size, epochs, augmentation, model) and, within
a setup, by configuration. Per setup it prints a markdown table (mean ± std
over seeds of train, validation and test accuracy, BLEU for Multi30k,
gamma-bar, log Tr(G), wall time; one row per configuration; for each noise
the test-accuracy difference to the plain run of the same batch size and
seed, which shares its initial weights and batch order) and saves two
figures next to the JSONL (or under ``--out``), ``<label>`` naming the setup
(e.g. ``n2048_e40``):

* ``<stem>_<label>_accuracy_vs_batch.png``: test (solid) and train (dashed) accuracy
  against the batch size, one panel per optimizer, one line per noise, as in
  the paper's Figures 1-3; stddev chosen on validation where several were run;
* ``<stem>_<label>_large_batch.png``: train / validation / test accuracy of every
  large-batch configuration (plain and each noise and stddev).

Rows marked ``select`` are the stddev-selection runs (one seed), chosen on the
validation split; the test column of a chosen stddev is reported, never used.

Usage::

    python -m experiments.plot [experiments/results/cifar10_resnet8_gap.jsonl]
"""

import argparse
import collections
import json
from pathlib import Path

import numpy as np

from experiments import runner, stats
from experiments.stats import format_mean_std, mean_std

DEFAULT = Path(__file__).resolve().parent / "results" / "cifar10_resnet8_gap.jsonl"


#: Config entries that vary within a setup (and the label-only ``role``).
#: (``lr`` and ``warmup_steps`` of the Multi30k sweep follow the batch size; ``noise_batch_size`` sets the stddev.)
PER_RUN = ("optimizer", "base_lr", "batch_size", "noise", "stddev", "noise_batch_size", "seed", "role", "ggn_size",
           "lr", "warmup_steps")


def load(path):
    """The runs of a results file, each row's ``config`` replaced by its run's whole result-changing config.

    Rows of every format the sweeps have written (``sweep.py``'s own config
    dict, the runner's rows) go through ``runner.config_of_row`` (a row
    without the runner's ``trainer`` and ``config`` parses from its
    ``command``), so an old and a new row of the same setup have the same
    config fields and land in the same table, and a later row of the same run
    (by ``runner.key_of``) replaces an earlier one.
    """
    runs = {}
    for row in stats.load(path, key=None):
        trainer, config = runner.config_of_row(row)
        runs[runner.key_of(trainer, config)] = dict(row, config=runner.result_values(config))
    return list(runs.values())


def setup_of(record):
    """What the runs of one table share: the config without the per-run entries."""
    c = record["config"]
    return json.dumps({k: v for k, v in c.items() if k not in PER_RUN}, sort_keys=True)


def setup_label(setup):
    """A short file-name label of a setup, e.g. ``n2048_e40`` or ``nall_e10``."""
    c = json.loads(setup)
    label = f"n{c.get('train_size') or 'all'}_e{c['epochs']}"
    if c.get("augment"):
        label += "_aug"
    if c.get("widths") not in (None, [16, 32, 64]):
        label += "_w" + "-".join(map(str, c["widths"]))
    if c.get("d_model"):
        label += f"_d{c['d_model']}"
    return label


def setup_text(setup):
    """The setup in words, for the heading of its table."""
    c = json.loads(setup)
    return ", ".join(f"{k} {v}" for k, v in c.items() if v is not None)


def by_setup(records):
    found = collections.OrderedDict()
    for r in records:
        found.setdefault(setup_of(r), []).append(r)
    return found


def group_key(record):
    """``(optimizer, batch, noise, stddev)``; a non-recipe rate shows in the optimizer, e.g. ``lamb@0.01``."""
    c = record["config"]
    optimizer = c["optimizer"] if c.get("base_lr") is None else f"{c['optimizer']}@{c['base_lr']:g}"
    return (optimizer, c["batch_size"], c["noise"], c["stddev"])


NOISE_ORDER = {"none": 0, "gaussian": 1, "rademacher": 2}


def groups(records):
    """``{(optimizer, batch, noise, stddev): runs}``, plain before the noises."""
    def order(record):
        opt, batch, noise, stddev = group_key(record)
        return (opt, batch, NOISE_ORDER.get(noise, 3), noise, stddev, record["seed"])

    found = collections.OrderedDict()
    for r in sorted(records, key=order):
        found.setdefault(group_key(r), []).append(r)
    return found


def _mean(values):
    """The mean of :func:`experiments.stats.mean_std`."""
    return mean_std(values)[0]


def _std(values):
    """The sample standard deviation of :func:`experiments.stats.mean_std` (0 for one value)."""
    return mean_std(values)[1]


def table(records):
    """One markdown table (the runs of one setup)."""
    bleu = any("val_bleu" in r for r in records)
    ggn = any(r.get("log_ggn_trace") is not None for r in records)
    head = (
        "| optimizer | batch | steps | noise | stddev | chosen on val | seeds | train acc % | val acc % | test acc % "
        "| Δ test vs plain, paired | train − test |"
    )
    rule = "|---|---:|---:|---|---:|:---:|---:|---:|---:|---:|---:|---:|"
    if bleu:
        head, rule = head + " val BLEU | test BLEU |", rule + "---:|---:|"
    head, rule = head + " gamma-bar |", rule + "---:|"
    if ggn:
        head, rule = head + " log Tr(G) |", rule + "---:|"
    lines = [head + " wall min/run |", rule + "---:|"]
    best = chosen(records)
    grouped = groups(records)
    for (opt, batch, noise, stddev), runs in grouped.items():
        gap = [r["train_acc"] - r["test_acc"] for r in runs]
        plain = {r["seed"]: r for r in grouped.get((opt, batch, "none", 0.0), [])}
        paired = [r["test_acc"] - plain[r["seed"]]["test_acc"] for r in runs if r["seed"] in plain]
        delta = "" if noise == "none" else format_mean_std(paired, 100) + (f" (n={len(paired)})" if paired else "")
        mark = "" if noise == "none" else ("yes" if best[(opt, batch, noise)] == stddev else "no")
        line = (
            f"| {opt} | {batch} | {runs[0].get('steps', '–')} | {noise} | {stddev:g} | {mark} | "
            f"{','.join(str(r['seed']) for r in runs)} | "
            f"{format_mean_std([r['train_acc'] for r in runs], 100)} | "
            f"{format_mean_std([r['val_acc'] for r in runs], 100)} | "
            f"{format_mean_std([r['test_acc'] for r in runs], 100)} | {delta} | {format_mean_std(gap, 100)} |"
        )
        if bleu:
            line += (
                f" {format_mean_std([r.get('val_bleu') for r in runs], 1, 2)} |"
                f" {format_mean_std([r.get('test_bleu') for r in runs], 1, 2)} |"
            )
        line += f" {format_mean_std([r['gamma_bar'] for r in runs], 1, 3)} |"
        if ggn:
            line += f" {format_mean_std([r.get('log_ggn_trace') for r in runs], 1, 2)} |"
        lines.append(line + f" {format_mean_std([r['wall_seconds'] for r in runs], 1 / 60, 1)} |")
    return "\n".join(lines)


def tables(records):
    """Every setup's table under a heading naming the setup."""
    return "\n\n".join(
        f"**{setup_label(setup)}**: {setup_text(setup)}\n\n{table(runs)}" for setup, runs in by_setup(records).items()
    )


def chosen(records):
    """Per (optimizer, batch, noise): the stddev with the best validation accuracy.

    Judged on the stddev-selection runs (``role == "select"``, one seed) as
    the sweep did, so that later seeds do not change the choice; groups
    without selection runs use the mean over their runs. Ties go to the
    smaller stddev. Only validation accuracy is used, never test.
    """
    best = {}
    for (opt, batch, noise, stddev), runs in groups(records).items():
        select = [r for r in runs if r.get("role") == "select"] or runs
        val = _mean([r["val_acc"] for r in select])
        key = (opt, batch, noise)
        if key not in best or val > best[key][1]:
            best[key] = (stddev, val)
    return {k: v[0] for k, v in best.items()}


def plot(records, out_dir, stem):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grouped = groups(records)
    best = chosen(records)
    optimizers = sorted({k[0] for k in grouped})
    has_ggn = any(r.get("log_ggn_trace") is not None for r in records)
    fig, axes = plt.subplots(
        1 + has_ggn, len(optimizers), figsize=(6.5 * len(optimizers), 4.5 * (1 + has_ggn)), squeeze=False
    )
    colors = {"none": "k", "gaussian": "tab:blue", "rademacher": "tab:red"}
    if has_ggn:
        for ax, opt in zip(axes[1], optimizers):
            for noise in ("none", "gaussian", "rademacher"):
                pts = sorted(
                    (batch, [r["log_ggn_trace"] for r in runs if r.get("log_ggn_trace") is not None])
                    for (o, batch, n, stddev), runs in grouped.items()
                    if o == opt and n == noise and best.get((o, batch, n)) == stddev
                )
                pts = [(b, v) for b, v in pts if v]
                if pts:
                    ax.errorbar(
                        [b for b, _ in pts], [_mean(v) for _, v in pts],
                        yerr=[_std(v) for _, v in pts],
                        fmt="-o", color=colors[noise], capsize=3, label=noise,
                    )
            ax.set_xscale("log", base=2)
            ax.set(title=f"{opt}: log Tr(G) after training (training "
                         f"examples)", xlabel="batch size", ylabel="log Tr(G)")
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
    for ax, opt in zip(axes[0], optimizers):
        for noise in ("none", "gaussian", "rademacher"):
            points = []
            for (o, batch, n, stddev), runs in grouped.items():
                if o != opt or n != noise or best.get((o, batch, n)) != stddev:
                    continue
                points.append((batch, runs, stddev))
            if not points:
                continue
            points.sort()
            for metric, style in (("test_acc", "-o"), ("train_acc", "--^")):
                xs = [b for b, _, _ in points]
                ys = [100 * _mean([r[metric] for r in runs]) for _, runs, _ in points]
                es = [100 * _std([r[metric] for r in runs]) for _, runs, _ in points]
                label = f"{noise}" + ("" if noise == "none" else f" (stddev {points[-1][2]:.3g})")
                ax.errorbar(xs, ys, yerr=es, fmt=style, color=colors[noise], capsize=3,
                            label=f"{label} {'test' if metric == 'test_acc' else 'train'}")
        ax.set_xscale("log", base=2)
        ax.set(title=f"{opt}: accuracy vs batch size", xlabel="batch size", ylabel="accuracy %")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    first = out_dir / f"{stem}_accuracy_vs_batch.png"
    fig.savefig(first, dpi=90)
    plt.close(fig)

    mixed = [k[1] for k in grouped if k[2] != "none"]
    if not mixed:
        return (first,)  # no GradientMix runs: nothing to compare at the large batch
    large = max(mixed)
    rows = [(k, runs) for k, runs in grouped.items() if k[1] == large]
    fig, ax = plt.subplots(figsize=(max(6, 1.3 * len(rows)), 4.5))
    width = 0.27
    for i, (metric, color) in enumerate((("train_acc", "0.7"), ("val_acc", "tab:green"), ("test_acc", "tab:purple"))):
        xs = np.arange(len(rows)) + (i - 1) * width
        ys = [100 * _mean([r[metric] for r in runs]) for _, runs in rows]
        es = [100 * _std([r[metric] for r in runs]) for _, runs in rows]
        ax.bar(xs, ys, width, yerr=es, color=color, label=metric.replace("_acc", ""), capsize=2)
    ax.set_xticks(np.arange(len(rows)))
    ax.set_xticklabels(
        [f"{k[0]}\n{k[2]}" + ("" if k[2] == "none" else f" {k[3]:.3g}") + f"\nn={len(runs)}" for k, runs in rows],
        fontsize=7,
    )
    lo = min(100 * min(r["test_acc"] for _, runs in rows for r in runs) - 5, 100)
    ax.set_ylim(max(0, lo), 101)
    ax.set(title=f"batch {large}: plain vs GradientMix (mean, std over seeds)", ylabel="accuracy %")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    second = out_dir / f"{stem}_large_batch.png"
    fig.savefig(second, dpi=90)
    plt.close(fig)
    return first, second


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="?", type=Path, default=DEFAULT)
    p.add_argument("--out", type=Path, default=None, help="figure directory (default: next to the JSONL)")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    records = load(args.results)
    print(tables(records))
    wall = sum(r["wall_seconds"] for r in records)
    print(f"\n{len(records)} runs, {wall / 60:.1f} run-minutes in total.")
    if not args.no_plots and records:
        out = args.out or args.results.parent
        out.mkdir(parents=True, exist_ok=True)
        for setup, runs in by_setup(records).items():
            for path in plot(runs, out, f"{args.results.stem}_{setup_label(setup)}"):
                print(f"Saved {path}")


if __name__ == "__main__":
    main()
