"""Tables and the figure of the Regime A sweep (``experiments/temperature.py``).

Reads the JSONL results and writes, for the runs at one rate:

* a Markdown table per arm: test accuracy and cross-entropy (mean ± std over
  seeds), the paired differences to plain GD and to the small batch of the
  same seed, the share of the GD-to-small-batch gap recovered (per seed,
  then mean ± std), training accuracy and log Tr(G);
* ``--figure``: test accuracy per arm with every seed's point.

    python -m experiments.temperature_report --lr 0.1 --figure experiments/figures/gd_vs_sgd.png
    python -m experiments.temperature_report --results experiments/results/cifar10_gd_vs_sgd_adam.jsonl --lr 1e-3
"""

import argparse
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results" / "cifar10_gd_vs_sgd.jsonl"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--lr", type=float, required=True)
    p.add_argument("--figure", type=Path, default=None)
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    return p.parse_args(argv)


def load(path, lr):
    runs = {}
    for line in path.read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            if math.isclose(record["lr"], lr):
                runs[(record["arm"], record["seed"])] = record
    return runs


def mean_std(values):
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return float("nan"), float("nan"), 0
    mean = sum(values) / len(values)
    var = sum((v - mean) ** 2 for v in values) / (len(values) - 1) if len(values) > 1 else 0.0
    return mean, math.sqrt(var), len(values)


def fmt(values, scale=1.0, digits=1, signed=False):
    mean, std, n = mean_std([None if v is None else v * scale for v in values])
    if n == 0:
        return "–"
    sign = "+" if signed else ""
    return f"{mean:{sign}.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:{sign}.{digits}f}"


def arm_order(arm):
    order = ["sgd", "gd", "gd+gaussian", "gd+bernoulli", "gd+rademacher", "gd+gaussian x0.25", "gd+gaussian x0.5",
             "gd+gaussian x2", "gd+isotropic", "gd+penalty"]
    for i, prefix in enumerate(order):
        if arm == prefix or (prefix in ("sgd", "gd+penalty") and arm.startswith(prefix)):
            return i
    return len(order)


def table(runs):
    arms = sorted({arm for arm, _ in runs}, key=arm_order)
    small = next((a for a in arms if a.startswith("sgd")), None)
    header = (
        "| arm | stddev (λ) | seeds | test acc % | Δ vs GD | Δ vs small batch | gap recovered | "
        "test CE | train acc % | log Tr(G) |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [header]
    for arm in arms:
        seeds = sorted(s for a, s in runs if a == arm)
        mine = [runs[(arm, s)] for s in seeds]
        paired_gd, paired_small, recovered = [], [], []
        for s in seeds:
            acc = runs[(arm, s)]["test_acc"]
            gd = runs.get(("gd", s))
            sm = runs.get((small, s)) if small else None
            if gd:
                paired_gd.append(acc - gd["test_acc"])
            if sm:
                paired_small.append(acc - sm["test_acc"])
            if gd and sm and sm["test_acc"] != gd["test_acc"]:
                recovered.append((acc - gd["test_acc"]) / (sm["test_acc"] - gd["test_acc"]))
        strength = f"{mine[0]['stddev']:.2f}"
        if mine[0].get("penalty_weight"):
            strength = f"(λ={mine[0]['penalty_weight']:g})"
        rows.append(
            f"| {arm} | {strength} | {len(seeds)} | {fmt([r['test_acc'] for r in mine], 100)} | "
            f"{fmt(paired_gd, 100, signed=True) if arm != 'gd' else '–'} | "
            f"{fmt(paired_small, 100, signed=True) if arm != small else '–'} | "
            f"{fmt(recovered, 100, 0) + ' %' if recovered and arm not in ('gd', small) else '–'} | "
            f"{fmt([r['test_loss'] for r in mine], 1, 3)} | {fmt([r['train_acc'] for r in mine], 100)} | "
            f"{fmt([r.get('log_ggn_trace') for r in mine], 1, 2)} |"
        )
    return "\n".join(rows)


def per_seed(runs):
    arms = sorted({arm for arm, _ in runs}, key=arm_order)
    seeds = sorted({s for _, s in runs})
    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for arm in arms:
        cells = [f"{100 * runs[(arm, s)]['test_acc']:.1f}" if (arm, s) in runs else "–" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def figure(runs, path, lr):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    arms = sorted({arm for arm, _ in runs}, key=arm_order)
    seeds = sorted({s for _, s in runs})
    fig, ax = plt.subplots(figsize=(8, 4))
    markers = "osD^v<>"
    for i, arm in enumerate(arms):
        values = [100 * runs[(arm, s)]["test_acc"] for s in seeds if (arm, s) in runs]
        for j, s in enumerate(s for s in seeds if (arm, s) in runs):
            ax.scatter(i + 0.08 * (j - 1), values[j], marker=markers[s % len(markers)], color=f"C{s}",
                       label=f"seed {s}" if i == 0 else None, zorder=3)
        mean = sum(values) / len(values)
        ax.hlines(mean, i - 0.25, i + 0.25, color="k", lw=1.5, zorder=2)
    ax.set_xticks(range(len(arms)))
    ax.set_xticklabels(arms, rotation=20, ha="right")
    ax.set_ylabel("test accuracy (%)")
    first = next(iter(runs.values()))
    ax.set_title(f"CIFAR-10, N={first['train_size']}, {first.get('optimizer', 'sgd')}, equal rate ({lr:g}) and "
                 "steps: every seed, bar = mean")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main(argv=None):
    args = parse_args(argv)
    runs = load(args.results, args.lr)
    text = table(runs) + "\n\nTest accuracy (%) per seed:\n\n" + per_seed(runs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.figure:
        figure(runs, args.figure, args.lr)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
