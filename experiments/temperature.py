"""Regime A sweep: equal rate, equal steps; GD vs small-batch SGD vs GD + GradientMix.

Runs ``examples/gd_vs_sgd.py`` once per configuration (a ``Config``), in
priority order, through ``experiments/runner.py``, which appends one JSON line
per finished run (with its config and exact command) to ``--results``. A
configuration already in that file is skipped, so the sweep resumes where it
stopped: stop it at any time (Ctrl-C) and start it again.

Phases, in the order they run (``--phase all`` runs them in turn):

1. ``rate``: seed 0, plain small batch and plain GD at each of ``--rates``.
   The rate is chosen on the validation split (never on test): among the
   rates at which *both* arms reach ``--fit-threshold`` training accuracy,
   the one where the small batch has the best validation accuracy
   (``--lazy-gd``: GD runs only at the rates that can still be chosen).
2. ``gap``: plain small batch and plain GD at the chosen rate, every seed:
   the gap must show here before the noise arms mean anything.
3. ``arms``: GD + GradientMix at the temperature rule
   ``stddev = sqrt(N / b - 1)`` with Gaussian, Bernoulli, Rademacher noise,
   the isotropic control of the same norm, and Gaussian at half, twice and
   a quarter of the stddev; arm by arm, each over every seed, in that order
   of priority.
4. ``matched`` (only when asked; LARS and LAMB): GD + Gaussian mixing at
   the stddev whose update *after the trust ratio* has the small batch's
   noise-to-signal ratio: ``experiments/trust_ratio_noise.py`` trains plain
   GD for ``--match-steps`` at the chosen rate (first seed), measures it per
   layer for the rule's stddev times each of ``--match-factors``, takes the
   factor nearest batch ``b`` over the kernels, and runs that arm
   (``gd+gaussian s=<stddev>``) on every seed.
5. ``penalty`` (only when asked): GD + the gradient-norm penalty
   ``λ (1/m) Σ_k ||∇L_k||²`` over blocks of ``b`` (SGD's implicit
   regularizer, Smith et al. 2021): each of ``--penalty-factors`` times
   ``lr/4`` on the first seed, then ``λ = lr/4`` and the larger factor with
   the best validation accuracy on every seed.

    python -m experiments.temperature --threads 1 --parallel 1
    python -m experiments.temperature --phase rate --rates 0.05 0.1 0.2
    python -m experiments.temperature --optimizer adam --rates 1e-4 3e-4 1e-3 3e-3 --lazy-gd \
        --noises gaussian bernoulli isotropic --seed-major
    python -m experiments.temperature --phase penalty --lr 0.1
    python -m experiments.temperature --optimizer lamb --rates 1e-4 3e-4 1e-3 3e-3 --lazy-gd \
        --noises gaussian bernoulli isotropic --seed-major
"""

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from examples import gd_vs_sgd
from examples.config import config_from_argv, flags_of
from experiments import runner

HERE = Path(__file__).resolve().parent
EXAMPLE = "examples.gd_vs_sgd"  # the trainer, run as `python -m` from the repository root
DEFAULT_RESULTS = HERE / "results" / "cifar10_gd_vs_sgd.jsonl"
ADAM_RESULTS = HERE / "results" / "cifar10_gd_vs_sgd_adam.jsonl"
LARS_RESULTS = HERE / "results" / "cifar10_gd_vs_sgd_lars.jsonl"
LAMB_RESULTS = HERE / "results" / "cifar10_gd_vs_sgd_lamb.jsonl"
#: The results file of each optimizer unless ``--results`` is given.
RESULTS_OF = {"sgd": DEFAULT_RESULTS, "adam": ADAM_RESULTS, "lars": LARS_RESULTS, "lamb": LAMB_RESULTS}
#: LARS's momentum unless ``--momentum`` is given: the ResNet-50 LARS recipe's (MLPerf's).
LARS_MOMENTUM = 0.9

# (noise, stddev factor) of the noise arms, in priority order.
NOISE_ARMS = (
    ("gaussian", 1.0),
    ("isotropic", 1.0),
    ("bernoulli", 1.0),
    ("rademacher", 1.0),
    ("gaussian", 0.5),
    # Beyond the rule: does more noise than the small batch's help further?
    ("gaussian", 2.0),
    ("gaussian", 0.25),
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--phase", choices=("rate", "gap", "arms", "matched", "penalty", "all"), default="all",
                   help="all = rate, gap, arms; matched and penalty run only when asked")
    p.add_argument("--rates", type=float, nargs="+", default=(0.05, 0.1, 0.2))
    p.add_argument("--lr", type=float, default=None, help="skip the rate phase and use this rate")
    p.add_argument("--lazy-gd", action="store_true",
                   help="rate phase: run GD only where it can change the choice (see search_rate)")
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    p.add_argument("--batch-size", type=int, default=32, help="b, the small batch")
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--optimizer", choices=tuple(RESULTS_OF), default="sgd",
                   help="lars and lamb: tf_gradmix.optimizers' LARS and LAMB (see examples/gd_vs_sgd.py)")
    p.add_argument("--momentum", type=float, default=None,
                   help=f"SGD and LARS only (default: 0 for SGD, the recipe's {LARS_MOMENTUM} for LARS)")
    p.add_argument("--fit-threshold", type=float, default=0.99)
    p.add_argument("--threads", type=int, default=1, help="TensorFlow threads per run")
    p.add_argument("--parallel", type=int, default=1, help="runs at a time")
    p.add_argument("--reuse-processes", action="store_true", help=runner.REUSE_HELP)
    p.add_argument("--results", type=Path, default=None,
                   help="default: " + ", ".join(f"{path.name} with --optimizer {name}"
                                                for name, path in RESULTS_OF.items()))
    p.add_argument("--noises", nargs="+", default=None, choices=sorted({n for n, _ in NOISE_ARMS}),
                   help="the noise arms to run, at the rule's stddev, in this order (default: all of NOISE_ARMS)")
    p.add_argument("--penalty-factors", type=float, nargs="+", default=(1.0, 4.0, 16.0),
                   help="penalty phase: λ = factor · lr/4 tried on seed 0; 1 and the best larger one on validation "
                        "then run every seed")
    p.add_argument("--match-steps", type=int, default=1000, help="matched phase: plain GD steps before measuring")
    p.add_argument("--match-factors", type=float, nargs="+", default=(0.125, 0.18, 0.25, 0.35, 0.5, 0.71, 1.0, 1.41),
                   help="matched phase: the multiples of the rule's stddev measured")
    p.add_argument("--seed-major", action="store_true",
                   help="run the noise arms seed by seed (every arm of seed 0 first) instead of arm by arm")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more arguments for every run")
    args = p.parse_args(argv)
    if args.momentum is None:
        args.momentum = LARS_MOMENTUM if args.optimizer == "lars" else 0.0
    elif args.momentum and args.optimizer not in gd_vs_sgd.MOMENTUM_OPTIMIZERS:
        p.error(f"--momentum is for --optimizer sgd or lars, got --momentum {args.momentum} with --optimizer "
                f"{args.optimizer}")
    if args.phase == "matched" and args.optimizer not in ("lars", "lamb"):
        p.error(f"--phase matched is for a trust ratio (--optimizer lars or lamb), got --optimizer {args.optimizer}")
    if args.results is None:
        args.results = RESULTS_OF[args.optimizer]
    return args


def base_config(args, lr, seed):
    """The settings every arm of one rate and seed shares; ``--extra`` flags come last and win."""
    shared = dict(train_size=args.train_size, steps=args.steps, optimizer=args.optimizer, momentum=args.momentum,
                  lr=lr, seed=seed, reference_batch_size=args.batch_size)
    return config_from_argv(gd_vs_sgd.Config, flags_of(gd_vs_sgd.Config, shared) + list(args.extra))


def noise_arms(args):
    """(noise, stddev factor) pairs to run, in priority order."""
    if args.noises is None:
        return list(NOISE_ARMS)
    return [(noise, 1.0) for noise in args.noises]


def small_batch(args, lr, seed):
    return dataclasses.replace(base_config(args, lr, seed), batch_size=args.batch_size)


def full_batch(args, lr, seed, noise="none", factor=1.0):
    return dataclasses.replace(base_config(args, lr, seed), batch_size=0, noise=noise, stddev_factor=factor)


def penalized(args, lr, seed, factor):
    return dataclasses.replace(base_config(args, lr, seed), batch_size=0, penalty_factor=factor)


def summary(row):
    return (f"{row['arm']:<22} lr={row['lr']:g} seed={row['seed']} train {row['train_acc']:.3f} "
            f"val {row['val_acc']:.3f} test {row['test_acc']:.3f}")


def run_all(args, configs, phase):
    """The rows of ``configs`` (gd_vs_sgd Configs), running those not yet in ``--results``."""
    print(f"phase {phase}:", flush=True)
    runs = [runner.Run(EXAMPLE, config, {"phase": phase}) for config in configs]
    return runner.run_all(runs, args.results, parallel=args.parallel, threads=args.threads, summary=summary,
                          echo=lambda line: print(line, flush=True), reuse_processes=args.reuse_processes)


def choose_rate(args, records):
    """The rate with the best small-batch validation accuracy where both arms fit."""
    by_rate = {}
    for record in records:
        by_rate.setdefault(record["lr"], {})[record["arm"]] = record
    fitting = []
    for lr, arms in sorted(by_rate.items()):
        small, gd = arms[f"sgd{args.batch_size}"], arms.get("gd")
        if gd is None:  # --lazy-gd: a rate with better small-batch validation accuracy fits
            print(f"  lr {lr:g}: sgd{args.batch_size} train {small['train_acc']:.3f} val {small['val_acc']:.3f}; "
                  "gd not run")
            continue
        fits = min(small["train_acc"], gd["train_acc"]) >= args.fit_threshold
        print(
            f"  lr {lr:g}: sgd{args.batch_size} train {small['train_acc']:.3f} val {small['val_acc']:.3f}; "
            f"gd train {gd['train_acc']:.3f} val {gd['val_acc']:.3f}{'' if fits else '  (does not fit)'}"
        )
        if fits:
            fitting.append((small["val_acc"], lr))
    if not fitting:
        raise SystemExit(
            f"No rate in {list(args.rates)} lets both arms reach {args.fit_threshold:.0%} training "
            "accuracy: raise --steps or try other --rates."
        )
    lr = max(fitting)[1]
    print(f"chosen rate (validation): {lr:g}", flush=True)
    return lr


def search_rate(args):
    """The rate phase: runs seed 0 and returns :func:`choose_rate`'s choice.

    With ``--lazy-gd`` the small batch runs at every rate first, then GD only
    at the rates that could still be chosen, best small-batch validation
    accuracy first, until both arms fit: the same choice, fewer GD runs.
    """
    if not args.lazy_gd:
        runs = [run for rate in args.rates for run in (small_batch(args, rate, 0), full_batch(args, rate, 0))]
        return choose_rate(args, run_all(args, runs, "rate"))
    records = run_all(args, [small_batch(args, rate, 0) for rate in args.rates], "rate")
    fitting = [r for r in records if r["train_acc"] >= args.fit_threshold]
    for small in sorted(fitting, key=lambda r: (r["val_acc"], r["lr"]), reverse=True):
        gd = run_all(args, [full_batch(args, small["lr"], 0)], "rate")[0]
        records.append(gd)
        if gd["train_acc"] >= args.fit_threshold:
            break
    return choose_rate(args, records)


def matched_stddev(args, lr):
    """The matched phase's stddev (3 significant digits, so a rerun finds its runs): see the module docstring."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "nsr.json"
        command = ["-m", "experiments.trust_ratio_noise", "--optimizer", args.optimizer,
                   "--lr", str(lr), "--momentum", str(args.momentum), "--train-steps", str(args.match_steps),
                   "--train-size", str(args.train_size), "--batch-size", str(args.batch_size), "--noises", "gaussian",
                   "--stddev-factors", *map(str, args.match_factors), "--seed", str(args.seeds[0]),
                   "--threads", str(args.threads), "--out", str(out)]
        print(f"matched: {' '.join(command)}", flush=True)
        if args.reuse_processes:  # in a worker, which the arm's runs then reuse
            done = runner.run_argv(command, reuse_processes=True)
            print(done.stdout, end="", flush=True)
            if done.returncode != 0:
                raise RuntimeError(f"the measurement failed (exit status {done.returncode}):\n{done.stderr[-3000:]}")
        else:
            subprocess.run([sys.executable, *command], check=True, cwd=runner.ROOT)
        measured = json.loads(out.read_text())
    return float(f"{measured['matched_factor'] * measured['stddev']:.3g}")


def choose_penalty_factor(records):
    """The factor above 1 (``λ / (lr/4)``) with the best validation accuracy, or None."""
    factors = [(r["val_acc"], -r["penalty_weight"] / (r["lr"] / 4)) for r in records
               if r["penalty_weight"] / (r["lr"] / 4) > 1 + 1e-9]
    if not factors:
        return None
    factor = -max(factors)[1]  # ties: the smaller factor
    print(f"chosen larger penalty (validation): {factor:g} x lr/4", flush=True)
    return factor


def run_penalty(args, lr):
    """GD + the gradient-norm penalty: every factor on seed 0, then λ = lr/4 and the chosen one on every seed."""
    factors = sorted(set(args.penalty_factors) | {1.0})
    records = run_all(args, [penalized(args, lr, args.seeds[0], f) for f in factors], "penalty")
    chosen = [1.0] + [f for f in [choose_penalty_factor(records)] if f is not None]
    run_all(args, [penalized(args, lr, seed, f) for seed in args.seeds for f in chosen], "penalty")


def main(argv=None):
    args = parse_args(argv)
    lr = args.lr
    if lr is None:
        if args.phase not in ("rate", "all", "matched"):
            raise SystemExit("--phase gap/arms/penalty need --lr (or run --phase rate first)")
        lr = search_rate(args)
        if args.phase == "rate":
            return
    if args.phase in ("gap", "all"):
        runs = [run for seed in args.seeds for run in (small_batch(args, lr, seed), full_batch(args, lr, seed))]
        run_all(args, runs, "gap")
    if args.phase in ("arms", "all"):
        pairs = [(arm, seed) for arm in noise_arms(args) for seed in args.seeds]
        if args.seed_major:
            pairs = [(arm, seed) for seed in args.seeds for arm in noise_arms(args)]
        runs = [full_batch(args, lr, seed, noise, factor) for (noise, factor), seed in pairs]
        run_all(args, runs, "arms")
    if args.phase == "matched":
        stddev = matched_stddev(args, lr)
        print(f"matched stddev: {stddev:g}", flush=True)
        run_all(args, [dataclasses.replace(full_batch(args, lr, seed, "gaussian"), stddev=stddev)
                       for seed in args.seeds], "matched")
    if args.phase == "penalty":
        run_penalty(args, lr)


if __name__ == "__main__":
    main()
