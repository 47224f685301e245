"""The statistics of the experiment reports: loading runs, grouping, mean ± std, paired differences.

Every report (``experiments/plot.py``, ``experiments/temperature_report.py``)
reads its runs and summarises them here, so a number means the same in every
table:

* :func:`load`: the JSON lines of a results file; a run recorded again under
  the same key replaces the earlier line.
* :func:`mean_std`: mean and sample standard deviation (``ddof = 1``) of the
  finite values, and their count; :func:`format_mean_std` writes it as
  ``mean ± std`` (the mean alone for one value, ``–`` for none).
* :func:`by_arm_seed`: ``{(arm, seed): run}`` at one learning rate;
  :func:`diverged` tells a run whose training loss became NaN or infinite
  (the trainer then stops) or ended above the uniform prediction's, and
  :func:`converged` keeps the others, which the statistics are taken over.
* :func:`paired_differences`: per seed, ``x_arm − x_ref`` of two arms run
  from the same initial weights and data order.
* :func:`gap_recovered`: per seed, the share of the gap between a worse arm
  (``low``, e.g. full-batch GD) and a better one (``high``, e.g. the small
  batch) that an arm recovers, ``(x_arm − x_low) / (x_high − x_low)``.
* :func:`quantile` and :func:`paired_ratios`: for timings taken in
  alternating rounds, the ratio of two configurations round by round, and
  its median and quartiles.
"""

import json
import math
from pathlib import Path


def load(path, key="key"):
    """The runs of a JSONL file, in file order; a later line with the same ``key`` replaces an earlier one.

    Args:
        path: the results file (one JSON object a line; blank lines skipped).
        key: the field that identifies a run, or None to keep every line.
    """
    records = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    if key is None:
        return records
    return list({r[key]: r for r in records}.values())


def finite(values):
    """The values that are numbers and finite (``None`` and NaN dropped)."""
    return [float(v) for v in values if v is not None and math.isfinite(v)]


def mean_std(values):
    """``(mean, std, n)`` of the finite values: sample std (``ddof = 1``), 0 for one value, NaNs for none."""
    values = finite(values)
    n = len(values)
    if n == 0:
        return float("nan"), float("nan"), 0
    mean = math.fsum(values) / n
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var), n


def format_mean_std(values, scale=1.0, digits=1, signed=False):
    """``"mean ± std"`` of ``scale · values``; the mean alone for one value; ``"–"`` for none.

    ``signed`` writes a ``+`` before a positive mean (for differences).
    """
    mean, std, n = mean_std([None if v is None else v * scale for v in values])
    if n == 0:
        return "–"
    sign = "+" if signed else ""
    text = f"{mean:{sign}.{digits}f}"
    return f"{text} ± {std:.{digits}f}" if n > 1 else text


def by_arm_seed(records, lr=None):
    """``{(arm, seed): run}`` of the runs at learning rate ``lr`` (all runs if None); a later run wins."""
    return {
        (r["arm"], r["seed"]): r
        for r in records
        if lr is None or math.isclose(r["lr"], lr, rel_tol=1e-9)
    }


#: The training loss of the uniform prediction over CIFAR-10's 10 classes, ``log 10``: a run that ends above
#: it has learned nothing (Regime A's runs, the only ones :func:`diverged` is asked about, are CIFAR-10's).
CHANCE_LOSS = math.log(10)


def diverged(run, chance_loss=CHANCE_LOSS):
    """Whether a run's training loss became NaN or infinite, or ended above ``chance_loss``.

    The second case is a blow-up the trainer did not stop: the loss grew by
    decades but stayed finite (LARS with isotropic noise: 2.5 at step 200,
    5e12 at step 2,000), and accuracy fell to chance. A run without the
    field did not diverge.
    """
    loss = run.get("train_loss")
    return loss is not None and not (math.isfinite(loss) and loss <= chance_loss)


def converged(runs):
    """The runs of ``{(arm, seed): run}`` that did not diverge."""
    return {k: r for k, r in runs.items() if not diverged(r)}


def diverged_seeds(runs, arm):
    """The sorted seeds of ``arm`` whose run diverged."""
    return sorted(s for (a, s), r in runs.items() if a == arm and diverged(r))


def arms(runs):
    """The arms of ``{(arm, seed): run}``, in first-seen order."""
    return list(dict.fromkeys(arm for arm, _ in runs))


def seeds(runs, arm=None):
    """The sorted seeds of ``{(arm, seed): run}`` (of one arm if given)."""
    return sorted({s for a, s in runs if arm is None or a == arm})


def values(runs, arm, metric):
    """``{seed: run[metric]}`` of one arm (runs without the metric, or with None, left out)."""
    return {s: r[metric] for (a, s), r in runs.items() if a == arm and r.get(metric) is not None}


def paired_differences(runs, arm, reference, metric="test_acc"):
    """``{seed: x_arm − x_reference}`` over the seeds both arms ran."""
    mine, theirs = values(runs, arm, metric), values(runs, reference, metric)
    return {s: mine[s] - theirs[s] for s in sorted(mine) if s in theirs}


def gap_recovered(runs, arm, low, high, metric="test_acc"):
    """``{seed: (x_arm − x_low) / (x_high − x_low)}`` over the seeds all three arms ran.

    1 means the arm reached ``high`` (e.g. the small batch), 0 that it stayed
    at ``low`` (e.g. full-batch GD). A seed where ``x_high == x_low`` has no
    gap to recover and is left out.
    """
    mine, lows, highs = values(runs, arm, metric), values(runs, low, metric), values(runs, high, metric)
    return {
        s: (mine[s] - lows[s]) / (highs[s] - lows[s])
        for s in sorted(mine)
        if s in lows and s in highs and highs[s] != lows[s]
    }


def quantile(values, q):
    """The ``q``-quantile (0 ≤ q ≤ 1) of the finite values, interpolated linearly between order statistics."""
    values = sorted(finite(values))
    if not values:
        return float("nan")
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"q must be in [0, 1], got {q!r}")
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def paired_ratios(times, reference_times):
    """``[t_i / r_i]``: the ratio round by round of two timings taken in the same rounds."""
    if len(times) != len(reference_times):
        raise ValueError(f"times and reference_times must pair up, got {len(times)} and {len(reference_times)} rounds")
    return [t / r for t, r in zip(times, reference_times)]
