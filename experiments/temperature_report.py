"""Tables and the figure of the equal-rate, equal-steps study (``experiments/temperature.py``).

For the runs of one results file at one rate, a Markdown table per arm:
test accuracy (mean ± std over seeds), the paired differences to plain GD and
to the small batch of the same seed, the share of the GD-to-small-batch gap
recovered (mean ± std, then seed by seed), test cross-entropy, training
accuracy and loss, log Tr(G), and for the arms timed by
``benchmarks/gradient_penalty.py`` their step time as a ratio to plain GD and
to GD + GradientMix (median and interquartile range of the per-round ratios).

``--write`` regenerates everything the READMEs show from the results files:
the marked blocks of ``experiments/README.md`` and ``README.md`` (between
``<!-- BEGIN temperature_report:NAME -->`` and ``<!-- END ... -->``) and the
figure of every seed's test accuracy per arm, SGD and Adam side by side (and
a second one for LARS and LAMB once their results files hold runs at a
chosen rate)::

    python -m experiments.temperature_report --write
    python -m experiments.temperature_report --lr 0.1                  # one table, printed
    python -m experiments.temperature_report --results experiments/results/cifar10_gd_vs_sgd_adam.jsonl --lr 3e-3

LARS's and LAMB's rates are read from their rate phase's rows (the choice of
``experiments/temperature.py``) unless ``--lars-lr`` / ``--lamb-lr`` give them.
"""

import argparse
import contextlib
import io
import json
import math
import re
import textwrap
from pathlib import Path

from experiments import stats

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RESULTS = HERE / "results"
DEFAULT_RESULTS = RESULTS / "cifar10_gd_vs_sgd.jsonl"
ADAM_RESULTS = RESULTS / "cifar10_gd_vs_sgd_adam.jsonl"
LARS_RESULTS = RESULTS / "cifar10_gd_vs_sgd_lars.jsonl"
LAMB_RESULTS = RESULTS / "cifar10_gd_vs_sgd_lamb.jsonl"
STEP_TIME = RESULTS / "cifar10_gd_vs_sgd_penalty_step_time.json"
FIGURE = RESULTS / "cifar10_gd_vs_sgd_sgd_and_adam.png"
LAYERWISE_FIGURE = RESULTS / "cifar10_gd_vs_sgd_lars_and_lamb.png"
#: The layer-wise optimizers: their name in the READMEs' block names and prose.
LAYERWISE = {"lars": "LARS", "lamb": "LAMB"}
SGD_LR = 0.1  # the rates chosen on validation (rate phase of experiments/temperature.py)
ADAM_LR = 3e-3

ORDER = ("sgd", "gd", "gd+gaussian", "gd+bernoulli", "gd+rademacher", "gd+gaussian x0.25", "gd+gaussian x0.5",
         "gd+gaussian x2", "gd+isotropic", "gd+penalty")
#: The arms of the benchmark's configurations.
TIMED = {"gd": "plain", "gd+gaussian": "mix", "gd+penalty": "penalty"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--lr", type=float, default=None, help="the rate whose runs to tabulate (required without --write)")
    p.add_argument("--figure", type=Path, default=None, help="also draw that file's per-seed figure here")
    p.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    p.add_argument("--write", action="store_true",
                   help="rewrite the marked blocks of experiments/README.md and README.md and the figure")
    p.add_argument("--sgd-lr", type=float, default=SGD_LR, help="--write: the SGD runs' rate")
    p.add_argument("--adam-lr", type=float, default=ADAM_LR, help="--write: the Adam runs' rate")
    p.add_argument("--adam-results", type=Path, default=ADAM_RESULTS, help="--write: the Adam runs (--results: SGD)")
    p.add_argument("--lars-results", type=Path, default=LARS_RESULTS, help="--write: the LARS runs")
    p.add_argument("--lamb-results", type=Path, default=LAMB_RESULTS, help="--write: the LAMB runs")
    p.add_argument("--lars-lr", type=float, default=None, help="--write: the LARS runs' rate (default: chosen)")
    p.add_argument("--lamb-lr", type=float, default=None, help="--write: the LAMB runs' rate (default: chosen)")
    p.add_argument("--step-time", type=Path, default=STEP_TIME, help="--write: the penalty's step-time JSON")
    p.add_argument("--into", type=Path, default=None,
                   help="--write: write copies of the two READMEs (README.md, experiments_README.md) and the figure "
                        "into this folder instead of in place")
    args = p.parse_args(argv)
    if args.lr is None and not args.write:
        p.error("give --lr (one table) or --write (every block and the figure)")
    return args


def arm_order(arm):
    for i, prefix in enumerate(ORDER):
        if arm == prefix or (prefix in ("sgd", "gd+penalty") and arm.startswith(prefix)):
            return i
    return len(ORDER)


def sorted_arms(runs):
    return sorted(stats.arms(runs), key=lambda arm: (arm_order(arm), penalty_factor_of(runs, arm) or 0.0, arm))


def small_arm(runs):
    """The small-batch arm (``sgd<b>``, whatever the optimizer), or None."""
    return next((a for a in sorted_arms(runs) if a.startswith("sgd")), None)


def matched_arm(runs):
    """The Gaussian arm at the matched stddev (``gd+gaussian s=<stddev>``), or None."""
    return next((a for a in sorted_arms(runs) if a.startswith("gd+gaussian s=")), None)


def penalty_factor_of(runs, arm):
    """``λ / (lr/4)`` of a penalty arm, else None."""
    run = next(r for (a, _), r in runs.items() if a == arm)
    return run["penalty_weight"] / (run["lr"] / 4) if run.get("penalty_weight") else None


def step_time_ratios(path=STEP_TIME):
    """``{arm: (vs GD, vs GD + GradientMix)}``, each ``(median, q25, q75)`` of the per-round ratios."""
    configs = json.loads(Path(path).read_text())["configs"]
    ratios = {}
    for arm, config in TIMED.items():
        times = configs[config]["step_ms"]
        pair = []
        for reference in ("plain", "mix"):
            r = stats.paired_ratios(times, configs[reference]["step_ms"])
            pair.append((stats.quantile(r, 0.5), stats.quantile(r, 0.25), stats.quantile(r, 0.75)))
        ratios[arm] = tuple(pair)
    return ratios


def _ratio(cell):
    median, lo, hi = cell
    return f"{median:.2f}" if lo == hi else f"{median:.2f} ({lo:.2f}–{hi:.2f})"


def percent_list(shares, digits=0):
    return ", ".join(f"{100 * v:.{digits}f}" for v in shares.values()) + " %"


def table(runs, arms=None, cost=None, ce_gap=False):
    """Regime A's table of ``{(arm, seed): run}``; ``cost``: :func:`step_time_ratios` adds two columns.

    ``ce_gap`` adds the share of the GD-to-small-batch gap in test
    cross-entropy recovered (mean ± std, then seed by seed) after test CE.
    A penalty arm of any λ costs the same computation as the timed one (λ = lr/4).
    """
    arms = arms or sorted_arms(runs)
    small = small_arm(runs)
    header = ("| arm | stddev (λ) | seeds | test acc % | Δ vs GD | Δ vs small batch | gap recovered | per seed | "
              "test CE | " + ("CE gap recovered | per seed | " if ce_gap else "") +
              "train acc % | train loss | log Tr(G) |")
    rule = "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|" if ce_gap else "") + "---:|---:|---:|"
    if cost:
        header += " step time vs GD | vs GD + GradientMix |"
        rule += "---:|---:|"
    rows = [header, rule]
    every, runs = runs, stats.converged(runs)
    for arm in arms:
        first = every[(arm, stats.seeds(every, arm)[0])]
        mine = [runs[(arm, s)] for s in stats.seeds(runs, arm)]
        vs_gd = stats.paired_differences(runs, arm, "gd")
        vs_small = stats.paired_differences(runs, arm, small) if small else {}
        recovered = stats.gap_recovered(runs, arm, "gd", small) if small and arm not in ("gd", small) else {}
        ce = stats.gap_recovered(runs, arm, "gd", small, "test_loss") if small and arm not in ("gd", small) else {}
        ce_cells = (f"{stats.format_mean_std(ce.values(), 100, 1) + ' %' if ce else '–'} | "
                    f"{percent_list(ce, 1) if ce else '–'} | ") if ce_gap else ""
        factor = penalty_factor_of(every, arm)
        strength = f"λ={first['penalty_weight']:g}" if factor else f"{first['stddev']:.2f}"
        lost = stats.diverged_seeds(every, arm)
        count = f"{len(mine)} (+{len(lost)} diverged)" if lost else f"{len(mine)}"
        row = (
            f"| {arm} | {strength} | {count} | {stats.format_mean_std([r['test_acc'] for r in mine], 100)} | "
            f"{stats.format_mean_std(vs_gd.values(), 100, signed=True) if arm != 'gd' else '–'} | "
            f"{stats.format_mean_std(vs_small.values(), 100, signed=True) if arm != small else '–'} | "
            f"{stats.format_mean_std(recovered.values(), 100, 0) + ' %' if recovered else '–'} | "
            f"{percent_list(recovered) if recovered else '–'} | "
            f"{stats.format_mean_std([r['test_loss'] for r in mine], 1, 3)} | {ce_cells}"
            f"{stats.format_mean_std([r['train_acc'] for r in mine], 100)} | "
            f"{_format_loss([r.get('train_loss') for r in mine])} | "
            f"{stats.format_mean_std([r.get('log_ggn_trace') for r in mine], 1, 2)} |"
        )
        if cost:
            timed = cost.get("gd+penalty" if factor else arm)
            row += f" {_ratio(timed[0])} | {_ratio(timed[1])} |" if timed else " – | – |"
        rows.append(row)
    return "\n".join(rows)


def _format_loss(values):
    """Training losses span decades (1e-5 to 1): mean in two significant digits and the seeds' range."""
    mean, _, n = stats.mean_std(values)
    if n == 0:
        return "–"
    found = stats.finite(values)
    return f"{mean:.1e}" if n == 1 else f"{mean:.1e} ({min(found):.1e}–{max(found):.1e})"


def per_seed(runs, arms=None, metric="test_acc"):
    """One row per arm, one column per seed: test accuracy in %, or ``metric="test_loss"`` (cross-entropy)."""
    arms = arms or sorted_arms(runs)
    seeds = stats.seeds(runs)

    def cell(run):
        return f"{100 * run[metric]:.1f}" if metric == "test_acc" else f"{run[metric]:.2f}"

    lines = ["| arm | " + " | ".join(f"seed {s}" for s in seeds) + " |", "|---|" + "---:|" * len(seeds)]
    for arm in arms:
        cells = [("diverged" if stats.diverged(runs[(arm, s)]) else cell(runs[(arm, s)]))
                 if (arm, s) in runs else "–" for s in seeds]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(runs, arms=None, cost=None, ce_gap=False):
    """The table and the per-seed test accuracies (``ce_gap``: also the CE gap columns and per-seed test CE).

    A run that diverged (its training loss became NaN) is counted in the
    ``seeds`` column and marked in the per-seed table, and left out of every
    statistic: its 10% chance accuracy is not a generalization result.
    """
    text = table(runs, arms, cost, ce_gap) + "\n\nTest accuracy (%) per seed:\n\n" + per_seed(runs, arms)
    if ce_gap:
        text += "\n\nTest cross-entropy per seed:\n\n" + per_seed(runs, arms, "test_loss")
    return text


def chosen_rate(records, fit_threshold=0.99):
    """The rate the rate phase chooses from these rows, or None while no rate has both arms fitting.

    ``experiments/temperature.py``'s rule: among the rates where the small
    batch and GD (seed 0) both reach ``fit_threshold`` training accuracy, the
    one with the best small-batch validation accuracy.
    """
    rate_runs = [r for r in records if r.get("phase") == "rate"]
    fitting = []
    for lr in sorted({r["lr"] for r in rate_runs}):
        at = stats.by_arm_seed(rate_runs, lr)
        small, gd = at.get((small_arm(at), 0)), at.get(("gd", 0))
        if small and gd and min(small["train_acc"], gd["train_acc"]) >= fit_threshold:
            fitting.append((small["val_acc"], lr))
    return max(fitting)[1] if fitting else None


def rate_table(records, lr_chosen):
    """The rate phase (seed 0): both arms' accuracies at each rate (``not run`` where ``--lazy-gd`` skipped GD).

    ``lr_chosen`` None: no rate is marked (the phase has not chosen yet).
    """
    rate_runs = [r for r in records if r.get("phase") == "rate"]
    if not rate_runs:
        return "Not run yet."
    lines = ["| rate | small batch: train acc % | val acc % | test acc % | GD: train acc % | val acc % |",
             "|---:|---:|---:|---:|---:|---:|"]
    for lr in sorted({r["lr"] for r in rate_runs}):
        at = stats.by_arm_seed(rate_runs, lr)
        small = at.get((small_arm(at), 0))
        gd = at.get(("gd", 0))
        chosen = " (chosen)" if lr_chosen is not None and abs(lr - lr_chosen) <= 1e-9 * lr_chosen else ""
        cells = [f"{lr:g}{chosen}"]
        if small:
            fits = "" if small["train_acc"] >= 0.99 else " (does not fit)"
            cells += [f"{100 * small['train_acc']:.1f}{fits}", f"{100 * small['val_acc']:.1f}",
                      f"{100 * small['test_acc']:.1f}"]
        else:
            cells += ["not run", "", ""]
        cells += [f"{100 * gd['train_acc']:.1f}", f"{100 * gd['val_acc']:.1f}"] if gd else ["not run", ""]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def penalty_selection(runs):
    """The penalty factors of the first seed, their validation accuracy, and the larger one chosen on it."""
    from experiments.temperature import choose_penalty_factor

    arms = [a for a in sorted_arms(runs) if a.startswith("gd+penalty")]
    if not arms:
        return "Not run yet."
    first = min(s for a in arms for s in stats.seeds(runs, a))
    records = [runs[(a, first)] for a in arms if (a, first) in runs]
    with contextlib.redirect_stdout(io.StringIO()):
        chosen = choose_penalty_factor(records)
    lines = [f"| λ / (lr/4) | λ | seed {first}: val acc % | train acc % | chosen |", "|---:|---:|---:|---:|:---:|"]
    for r in records:
        factor = r["penalty_weight"] / (r["lr"] / 4)
        mark = "yes" if chosen is not None and abs(factor - chosen) < 1e-9 else ("always run" if factor == 1 else "")
        val = f"{100 * r['val_acc']:.1f}" + (f" (diverged at step {r['steps']})" if stats.diverged(r) else "")
        lines.append(f"| {factor:g} | {r['penalty_weight']:g} | {val} | {100 * r['train_acc']:.1f} | {mark} |")
    return "\n".join(lines)


def recovered_phrase(runs, arm, per_seed=True, metric="test_acc", digits=0):
    """``"105 ± 14 % (seeds 0, 1, 2: 121, 95, 98 %)"``, ``"111 % (seed 0 only)"`` or ``"not run yet"``.

    ``per_seed=False`` leaves the seeds' values out: ``"105 ± 14 % (3 seeds)"``.
    ``metric``: the gap in test accuracy, or ``"test_loss"`` (cross-entropy);
    ``digits``: the shares' decimals.
    """
    small = small_arm(runs)
    lost = stats.diverged_seeds(runs, arm)
    note = ""
    if lost:
        note = f"; {'seeds' if len(lost) > 1 else 'seed'} {', '.join(map(str, lost))} diverged"
    runs = stats.converged(runs)
    shares = stats.gap_recovered(runs, arm, "gd", small, metric) if small else {}
    if not shares:
        return f"diverged (seed{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))})" if lost else "not run yet"
    if len(shares) == 1:
        (seed, share), = shares.items()
        return f"{100 * share:.{digits}f} % (seed {seed} only{note})"
    mean = stats.format_mean_std(shares.values(), 100, digits)
    if not per_seed:
        return f"{mean} % ({len(shares)} seeds{note})"
    seeds = ", ".join(str(s) for s in shares)
    return f"{mean} % (seeds {seeds}: {percent_list(shares, digits)}{note})"


def gap_in_every_seed(runs, metric="test_acc"):
    """Whether GD is worse than the small batch in every seed both ran (lower accuracy, or higher cross-entropy)."""
    gap = stats.paired_differences(runs, small_arm(runs), "gd", metric)
    sign = 1 if metric == "test_acc" else -1
    return bool(gap) and all(sign * v > 0 for v in gap.values())


def gap_phrase(runs, per_seed=True):
    """``"2.9 ± 0.4 points below batch 32 (3 seeds: 2.6, 2.8, 3.4; in every seed)"``."""
    small = small_arm(runs)
    gap = stats.paired_differences(runs, small, "gd")
    every = "in every seed" if gap_in_every_seed(runs) else "not in every seed"
    per = ": " + ", ".join(f"{100 * v:.1f}" for v in gap.values()) if per_seed else ""
    return f"{stats.format_mean_std(gap.values(), 100)} points below batch {small[3:]} ({len(gap)} seeds{per}; {every})"


def ce_gap_phrase(runs, per_seed=True):
    """``"GD had 57.4 ± 10.1 against batch 32's 7.4 ± 0.6 (3 seeds: 48.6, ...; higher in every seed)"``.

    The per-seed values are GD's excess over the small batch of the same seed.
    """
    small = small_arm(runs)
    converged = stats.converged(runs)
    gap = stats.paired_differences(converged, "gd", small, "test_loss")
    every = "higher in every seed" if gap_in_every_seed(converged, "test_loss") else "not higher in every seed"
    per = ": " + ", ".join(f"{v:.1f}" for v in gap.values()) if per_seed else ""
    mean = {a: stats.format_mean_std(stats.values(converged, a, "test_loss").values()) for a in ("gd", small)}
    return (f"GD had {mean['gd']} against batch {small[3:]}'s {mean[small]} "
            f"({len(gap)} seeds{per}; {every})")


def trajectory(runs, seed, steps=(200, 400, 1000, 2000)):
    """Training loss of each arm of one seed at some steps (fit's running mean over the steps since the last).

    For a mixed arm this is the mixed loss ``mean(w · loss)``, whose expectation is the plain loss.
    """
    lines = ["| arm | " + " | ".join(f"step {s}" for s in steps) + " | after training (evaluated) |",
             "|---|" + "---:|" * (len(steps) + 1)]
    for arm in sorted_arms(runs):
        run = runs.get((arm, seed))
        if run is None:
            continue
        at = dict(zip(run["history"]["step"], run["history"]["train_loss"]))
        cells = [f"{at[s]:.1e}" if s in at else "–" for s in steps] + [f"{run['train_loss']:.1e}"]
        lines.append(f"| {arm} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def curvature_per_loss(runs, arm, reference):
    """Per seed, ``(Tr(G) / L)_arm / (Tr(G) / L)_reference``, ``L`` the evaluated training loss.

    With the softmax saturated, an example's output Hessian ``diag(p) − p pᵀ``
    has trace about ``2 (1 − p_y) ≈ 2 ℓ``: Tr(G) falls with the loss. This
    ratio compares the curvature of two arms that fitted to different losses.
    """
    def per_loss(run):
        return math.exp(run["log_ggn_trace"]) / run["train_loss"]

    return {s: per_loss(runs[(arm, s)]) / per_loss(runs[(reference, s)]) for s in stats.seeds(runs, arm)
            if (reference, s) in runs and runs[(arm, s)].get("log_ggn_trace") is not None
            and runs[(reference, s)].get("log_ggn_trace") is not None}


def mixing_sentence(runs, arms, per_seed=True, metric="test_acc", digits=0):
    """The recovered shares of ``{arm: name}`` as one clause."""
    return "; ".join(f"{name} {recovered_phrase(runs, arm, per_seed, metric, digits)}" for arm, name in arms.items())


def penalty_arms(runs):
    return [a for a in sorted_arms(runs) if a.startswith("gd+penalty")]


ADAM_NAMES = {"gd+gaussian": "Gaussian", "gd+bernoulli": "Bernoulli", "gd+isotropic": "the isotropic control"}
SGD_NAMES = {"gd+gaussian": "Gaussian", "gd+bernoulli": "Bernoulli", "gd+rademacher": "Rademacher",
             "gd+isotropic": "the isotropic control"}


def adam_summary(adam, per_seed=True):
    small = small_arm(adam)
    text = (f"With Adam at equal rate and steps, full-batch descent tested {gap_phrase(adam, per_seed)}; at the "
            f"rule's stddev the share of that gap recovered was: {mixing_sentence(adam, ADAM_NAMES, per_seed)}.")
    if per_seed:
        loss = {a: stats.mean_std(stats.values(adam, a, "train_loss").values())[0] for a in (small, "gd")}
        ratio = curvature_per_loss(adam, "gd", small)
        text += (f" GD's training loss after training was {loss['gd']:.1e} against the small batch's "
                 f"{loss[small]:.1e} (means over seeds); per unit training loss, GD's Tr(G) was "
                 f"{stats.format_mean_std(ratio.values(), 1, 1)} times the small batch's (Tr(G) / loss, paired by "
                 f"seed, {len(ratio)} seeds).")
    return text


def layerwise_summary(runs, name, lr, per_seed=True):
    """The gap and the shares recovered with ``name`` (LARS or LAMB) at rate ``lr``, as far as they are run.

    The shares of the test-accuracy gap are given when GD tested below the
    small batch in every seed; otherwise the accuracy gap is stated as absent,
    with each arm's accuracy difference to the small batch. Then the test
    cross-entropy gap and, when GD's is higher in every seed, its shares.
    """
    small = small_arm(runs)
    if lr is None or small is None or "gd" not in stats.arms(runs):
        return f"With {name}: the rate phase has not chosen a rate yet."
    converged = stats.converged(runs)
    matched = {a: f"at {a.split('s=')[1]}" for a in sorted_arms(runs) if a.startswith("gd+gaussian s=")}
    if gap_in_every_seed(converged):
        text = (f"With {name} at equal rate ({lr:g}) and steps, full-batch descent tested "
                f"{gap_phrase(runs, per_seed)}; at the rule's stddev the share of that gap recovered was: "
                f"{mixing_sentence(runs, ADAM_NAMES, per_seed)}.")
        if matched:
            text += (" Gaussian mixing at the stddev matched to the small batch's noise-to-signal ratio after the "
                     f"trust ratio recovered: {mixing_sentence(runs, matched, per_seed)}.")
    else:
        names = {**ADAM_NAMES, **{a: f"Gaussian {n} (matched)" for a, n in matched.items()}}
        deltas = "; ".join(f"{arm_name} {stats.format_mean_std(differences.values(), 100, signed=True)}"
                           for arm, arm_name in names.items()
                           if (differences := stats.paired_differences(converged, arm, small)))
        text = (f"With {name} at equal rate ({lr:g}) and steps there is no test-accuracy gap at this scale: "
                f"full-batch descent tested {gap_phrase(runs, per_seed)}; against batch {small[3:]} (points, mean "
                f"± std over seeds): {deltas}.")
    text += f" In test cross-entropy {ce_gap_phrase(runs, per_seed)}"
    if not gap_in_every_seed(converged, "test_loss"):
        return text + "."
    text += (f"; at the rule's stddev the share of that gap recovered was: "
             f"{mixing_sentence(runs, ADAM_NAMES, per_seed, 'test_loss', 1)}.")
    if matched:
        text += (" At the stddev matched to the small batch's noise-to-signal ratio after the trust ratio: "
                 f"{mixing_sentence(runs, matched, per_seed, 'test_loss', 1)}.")
    return text


def layerwise_table(layerwise):
    """The top-level README's table of LARS and LAMB: ``{name: (records, rate or None)}``, one row each.

    Per optimizer: GD's test accuracy against the small batch (points, paired
    by seed), both arms' test cross-entropy, and per mixing arm the share of
    the cross-entropy gap recovered and its test accuracy against the small
    batch (mean ± std over seeds; an arm's diverged seeds are named).
    """
    lines = ["| optimizer (rate), seeds | test acc: GD − batch 32 | test CE: batch 32, GD | GD + Gaussian | "
             "GD + Bernoulli | GD + isotropic | GD + Gaussian, matched stddev |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name, (records, lr) in layerwise.items():
        every = stats.by_arm_seed(records, lr) if lr is not None else {}
        runs = stats.converged(every)
        small = small_arm(runs)
        if small is None or "gd" not in stats.arms(runs):
            lines.append(f"| {LAYERWISE[name]} | rate not chosen yet | | | | | |")
            continue
        gap = stats.paired_differences(runs, "gd", small)
        ce = {a: stats.format_mean_std(stats.values(runs, a, "test_loss").values()) for a in (small, "gd")}
        matched = matched_arm(every)

        def cell(arm):
            if arm is None or arm not in stats.arms(every):
                return "not run"
            lost = stats.diverged_seeds(every, arm)
            lost_text = f"seed{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} diverged" if lost else ""
            if arm not in stats.arms(runs):
                return lost_text
            share = stats.format_mean_std(stats.gap_recovered(runs, arm, "gd", small, "test_loss").values(), 100)
            accuracy = stats.format_mean_std(stats.paired_differences(runs, arm, small).values(), 100, signed=True)
            return f"{share}%, {accuracy}" + (f" ({lost_text})" if lost else "")

        seeds = len(stats.seeds(runs, "gd"))
        cells = [f"{LAYERWISE[name]} ({lr:g}), {seeds}",
                 stats.format_mean_std(gap.values(), 100, signed=True)
                 + ("" if gap_in_every_seed(runs) else " (not in every seed)"),
                 f"{ce[small]}, {ce['gd']}", cell("gd+gaussian"), cell("gd+bernoulli"), cell("gd+isotropic"),
                 (f"{cell(matched)} at {matched.split('s=')[1]}" if matched else "not run")]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def sgd_summary(sgd, cost, per_seed=True):
    penalty = penalty_arms(sgd)
    text = (f"With SGD at equal rate and steps, full-batch descent tested {gap_phrase(sgd, per_seed)}; at the rule's "
            f"stddev the share of that gap recovered was: {mixing_sentence(sgd, SGD_NAMES, per_seed)}. ")
    if penalty:
        names = {a: "at λ = lr/4" if penalty_factor_of(sgd, a) == 1 else f"at λ = {penalty_factor_of(sgd, a):g}·lr/4"
                 for a in penalty}
        text += (f"The noise-free penalty (the mean squared block-gradient norm) recovered: "
                 f"{mixing_sentence(sgd, names, per_seed)}; it costs {cost['gd+penalty'][0][0]:.1f}× the step time "
                 f"of plain GD (GD + GradientMix: {cost['gd+gaussian'][0][0]:.2f}×).")
    else:
        text += (f"The noise-free penalty costs {cost['gd+penalty'][0][0]:.1f}× the step time of plain GD "
                 f"(GD + GradientMix: {cost['gd+gaussian'][0][0]:.2f}×); its accuracy runs are not done yet.")
    return text


def slot_label(slot):
    """The x tick of a figure slot: ``small batch``, ``GD+Gaussian``, ``GD+penalty λ=4·lr/4``, ..."""
    names = {"small": "small batch", "gd": "GD", "gd+isotropic": "GD+isotropic",
             "matched": "GD+Gaussian, matched stddev"}
    if slot in names:
        return names[slot]
    if slot.startswith("gd+penalty"):
        factor = slot.split(" x")[1] if " x" in slot else None
        return "GD+penalty λ=" + (f"{factor}·lr/4" if factor else "lr/4")
    arm, _, factor = slot.partition(" x")
    return "GD+" + arm[3:].capitalize() + (f" ×{factor}" if factor else "")


#: The figures' metrics: (row's y label, scale of the values, y axis scale).
METRICS = {"test_acc": ("test accuracy (%)", 100, "linear"), "test_loss": ("test cross-entropy (log axis)", 1, "log")}


def figure(panels, path, slots=None, metrics=("test_acc",)):
    """Per arm, every seed's point (same seed joined by a thin line), mean as a bar; one panel each.

    ``panels``: ``[(title, {(arm, seed): run})]``. Every panel has the same
    ``slots`` (arms; ``"small"`` for the small batch, ``"matched"`` for the
    panel's matched-stddev Gaussian arm, whatever its stddev; default: small batch,
    GD, Gaussian, Bernoulli, isotropic, the penalties); an arm not run shows
    as such, and a seed that diverged is named instead of drawn at chance.
    ``metrics``: one row of panels each, of :data:`METRICS` (test cross-entropy on a log axis).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    penalties = sorted({a for _, runs in panels for a in penalty_arms(runs)},
                       key=lambda a: float(a.split(" x")[1]) if " x" in a else 1.0)
    if slots is None:
        slots = ["small", "gd", "gd+gaussian", "gd+bernoulli", "gd+isotropic"] + (penalties or ["gd+penalty"])
    all_seeds = sorted({s for _, runs in panels for s in stats.seeds(runs)})
    fig, axes = plt.subplots(len(metrics), len(panels), figsize=(5.5 * len(panels) + 1, 4.4 * len(metrics)),
                             squeeze=False)
    for row, metric in enumerate(metrics):
        label, scale, yscale = METRICS[metric]
        for ax, (title, every) in zip(axes[row], panels):
            runs = stats.converged(every)
            arms = [{"small": small_arm(runs), "matched": matched_arm(runs)}.get(slot, slot) for slot in slots]
            for j, seed in enumerate(all_seeds):
                xs = [i for i, a in enumerate(arms) if (a, seed) in runs]
                ys = [scale * runs[(arms[i], seed)][metric] for i in xs]
                offset = 0.08 * (j - (len(all_seeds) - 1) / 2)
                ax.plot([x + offset for x in xs], ys, "-", color=f"C{j}", lw=0.6, alpha=0.5, zorder=1)
                ax.scatter([x + offset for x in xs], ys, color=f"C{j}", s=22, label=f"seed {seed}", zorder=3)
            values = [scale * r[metric] for r in runs.values()]
            middle = (math.sqrt(min(values) * max(values)) if yscale == "log" else (min(values) + max(values)) / 2)
            for i, arm in enumerate(arms):
                mine = list(stats.values(runs, arm, metric).values())
                lost = stats.diverged_seeds(every, arm)
                if mine:
                    ax.hlines(scale * stats.mean_std(mine)[0], i - 0.25, i + 0.25, color="k", lw=1.5, zorder=2)
                if lost:
                    text = f"seed{'s' if len(lost) > 1 else ''} {', '.join(map(str, lost))} diverged"
                    ax.text(i, middle, text, rotation=90, ha="center", va="center", fontsize=7, color="C3")
                elif not mine:
                    ax.text(i, middle, "not run", rotation=90, ha="center", va="center", fontsize=8, color="0.4")
            ax.set_yscale(yscale)
            if yscale == "log":  # plain numbers (5, 10, 50), not powers of ten
                plain = matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}")
                ax.yaxis.set_major_formatter(plain)
                ax.yaxis.set_minor_formatter(plain)
            ax.set_xticks(range(len(slots)))
            ax.set_xticklabels([slot_label(s) for s in slots], rotation=30, ha="right", fontsize=8)
            ax.set_xlim(-0.5, len(slots) - 0.5)
            ax.set_title(title, fontsize=9)
            ax.set_ylabel(label)
            ax.grid(axis="y", alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="center right", fontsize=8)
    fig.suptitle("CIFAR-10, 1,024 training images, equal rate and 2,000 steps: every seed; bar = mean", fontsize=10)
    fig.tight_layout(rect=(0, 0, 1 - 0.8 / fig.get_figwidth(), 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def single_figure(runs, path, lr):
    first = next(iter(runs.values()))
    slots = ["small" if arm == small_arm(runs) else arm for arm in sorted_arms(runs)]
    figure([(f"{first.get('optimizer', 'sgd')}, rate {lr:g}", runs)], path, slots)


def write_block(path, name, text):
    """Replace the lines between ``<!-- BEGIN temperature_report:name -->`` and its ``END`` marker in ``path``.

    The markers may be indented (a block inside a list item): the text gets
    the BEGIN marker's indentation.
    """
    path = Path(path)
    begin, end = f"<!-- BEGIN temperature_report:{name} -->", f"<!-- END temperature_report:{name} -->"
    content = path.read_text()
    pattern = re.compile(r"^([ \t]*)" + re.escape(begin) + r"\n.*?^[ \t]*" + re.escape(end) + "$", re.S | re.M)
    if len(pattern.findall(content)) != 1:
        raise ValueError(f"{path} must hold the block {name!r} exactly once, from a line {begin!r} to a line {end!r}")

    def replace(match):
        indent = match.group(1)
        lines = [indent + line if line else line for line in text.rstrip().splitlines()]
        return "\n".join([indent + begin, *lines, indent + end])

    path.write_text(pattern.sub(replace, content))


def prose(text, width=78):
    """A generated sentence wrapped as the hand-written Markdown around it is (``%`` kept on its number)."""
    return textwrap.fill(text.replace(" %", "%"), width, break_long_words=False, break_on_hyphens=False)


def layerwise_blocks(name, records, lr):
    """The blocks of ``name`` (``"lars"`` or ``"lamb"``): rate phase, table, summary (``lr`` None: the chosen one)."""
    lr = chosen_rate(records) if lr is None else lr
    runs = stats.by_arm_seed(records, lr) if lr is not None else {}
    table_text = report(runs, ce_gap=True) if runs else "Not run yet."
    return {
        ("experiments", f"{name}-rate"): rate_table(records, lr),
        ("experiments", name): table_text,
        ("experiments", f"{name}-summary"): prose(layerwise_summary(runs, LAYERWISE[name], lr)),
    }


def blocks(sgd_records, adam_records, cost, sgd_lr, adam_lr, layerwise=None):
    """``{(README, block name): text}`` of every generated block; README is ``"experiments"`` or ``"root"``.

    ``layerwise``: ``{"lars": (records, lr or None), "lamb": ...}`` (missing: not run yet).
    """
    layerwise = layerwise or {}
    sgd = stats.by_arm_seed(sgd_records, sgd_lr)
    adam = stats.by_arm_seed(adam_records, adam_lr)
    mixing = [a for a in sorted_arms(sgd) if not a.startswith("gd+penalty")]
    penalty_rows = [a for a in (small_arm(sgd), "gd", "gd+gaussian", "gd+bernoulli", "gd+isotropic")
                    if a in stats.arms(sgd)] + penalty_arms(sgd)
    return {
        ("experiments", "sgd"): report(sgd, mixing),
        ("experiments", "adam-rate"): rate_table(adam_records, adam_lr),
        ("experiments", "adam"): report(adam),
        ("experiments", "adam-summary"): prose(adam_summary(adam)),
        ("experiments", "adam-trajectory"): trajectory(adam, 0),
        ("experiments", "sgd-trajectory"): trajectory({k: v for k, v in sgd.items() if k[0] in
                                                      (small_arm(sgd), "gd", "gd+gaussian", "gd+isotropic")}, 0),
        ("experiments", "penalty-selection"): penalty_selection(sgd),
        ("experiments", "penalty"): report(sgd, penalty_rows, cost),
        ("experiments", "sgd-summary"): prose(sgd_summary(sgd, cost)),
        ("root", "adam-summary"): prose(adam_summary(adam, per_seed=False), width=76),
        ("root", "sgd-summary"): prose(sgd_summary(sgd, cost, per_seed=False)),
        ("root", "lars-lamb"): layerwise_table({name: layerwise.get(name, ([], None)) for name in LAYERWISE}),
        **{key: text for name in LAYERWISE
           for key, text in layerwise_blocks(name, *layerwise.get(name, ([], None))).items()},
    }


def load_if_present(path):
    """The rows of a results file, none if it does not exist yet."""
    return stats.load(path, key=None) if Path(path).exists() else []


def write_all(sgd_lr=SGD_LR, adam_lr=ADAM_LR, sgd_results=DEFAULT_RESULTS, adam_results=ADAM_RESULTS,
              step_time=STEP_TIME, into=None, lars=(LARS_RESULTS, None), lamb=(LAMB_RESULTS, None)):
    """Rewrite every block of both READMEs and the figures; with ``into``, copies of them in that folder.

    ``lars``, ``lamb``: ``(results file, rate or None for the chosen one)``;
    their figure is drawn once either has runs at its rate.
    """
    readmes = {"experiments": HERE / "README.md", "root": ROOT / "README.md"}
    figure_path, layerwise_path = FIGURE, LAYERWISE_FIGURE
    if into is not None:
        into.mkdir(parents=True, exist_ok=True)
        copies = {"experiments": into / "experiments_README.md", "root": into / "README.md"}
        for readme, path in copies.items():
            path.write_text(readmes[readme].read_text())
        readmes, figure_path, layerwise_path = copies, into / FIGURE.name, into / LAYERWISE_FIGURE.name
    sgd_records, adam_records = stats.load(sgd_results, key=None), stats.load(adam_results, key=None)
    layerwise = {}
    for name, (path, lr) in (("lars", lars), ("lamb", lamb)):
        records = load_if_present(path)
        layerwise[name] = (records, chosen_rate(records) if lr is None else lr)
    cost = step_time_ratios(step_time)
    for (readme, name), text in blocks(sgd_records, adam_records, cost, sgd_lr, adam_lr, layerwise).items():
        write_block(readmes[readme], name, text)
        print(f"{readmes[readme]}: {name}")
    figure([(f"SGD, rate {sgd_lr:g}", stats.by_arm_seed(sgd_records, sgd_lr)),
            (f"Adam, rate {adam_lr:g}", stats.by_arm_seed(adam_records, adam_lr))], figure_path)
    print(f"figure: {figure_path}")
    panels = [(f"{LAYERWISE[name]}, rate {lr:g}", stats.by_arm_seed(records, lr))
              for name, (records, lr) in layerwise.items() if lr is not None]
    panels = [(title + (f", matched stddev {matched_arm(runs).split('s=')[1]}" if matched_arm(runs) else ""), runs)
              for title, runs in panels]
    panels = [(title, runs) for title, runs in panels if runs]
    if panels:
        slots = ["small", "gd", "gd+gaussian", "gd+bernoulli", "gd+isotropic"]
        slots += ["matched"] if any(matched_arm(runs) for _, runs in panels) else []
        slots += sorted({a for _, runs in panels for a in stats.arms(runs)} - {small_arm(runs) for _, runs in panels}
                        - {matched_arm(runs) for _, runs in panels} - set(slots), key=arm_order)
        figure(panels, layerwise_path, slots, metrics=("test_acc", "test_loss"))
        print(f"figure: {layerwise_path}")


def main(argv=None):
    args = parse_args(argv)
    if args.write:
        write_all(args.sgd_lr, args.adam_lr, args.results, args.adam_results, args.step_time, args.into,
                  (args.lars_results, args.lars_lr), (args.lamb_results, args.lamb_lr))
    if args.lr is None:
        return
    runs = stats.by_arm_seed(stats.load(args.results, key=None), args.lr)
    text = report(runs)
    print(text)
    if args.markdown:
        args.markdown.write_text(text + "\n")
    if args.figure:
        single_figure(runs, args.figure, args.lr)
        print(f"figure: {args.figure}")


if __name__ == "__main__":
    main()
