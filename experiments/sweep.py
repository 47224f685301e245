"""The CPU-scale reproduction: a resumable sweep of the paper's examples.

``--task cifar10`` (default) sweeps ``examples/cifar_train.py`` (a narrow
ResNet on a CIFAR-10 subset); ``--task multi30k`` sweeps
``examples/multi30k_transformer.py`` (a small Transformer, Adam or LAMB), where
"accuracy" is the token accuracy (teacher forcing, padding excluded; train =
the last epoch's running value, in training mode) and BLEU is recorded too.

The paper claims that GradientMix improves test accuracy at large batch
sizes. A regularizer can only help where there is a generalization gap, so
the sweep first establishes one, then measures mixing inside it:

0. ``lr`` (cifar10, not part of ``all``): plain runs at the large batch for
   each of ``--base-lrs``, on the selection seed; pick the rate with the best
   *validation* accuracy (printed) and pass it as ``--base-lr`` to the other
   phases.
1. ``gap``: plain training (``--optimizer``, default SGD + Nesterov) at a small and a large batch, same epochs,
   the paper's §5.1 schedule (linear LR scaling from batch 200, warmup for
   10% of the run, quadratic decay). Both must fit the training subset
   (train accuracy near 100%) and the large batch must test worse.
2. ``select``: at the large batch, Gaussian and Rademacher mixing for each
   ``stddev`` of ``--stddevs`` plus the noise-equivalent setting
   ``sqrt(B_large / B_small - 1)`` (the gradient noise of the small batch,
   ``tf_gradmix.noise.stddev_for_noise_batch_size``), on the selection seed. The stddev of each noise is chosen
   on the **validation split held out of the training set**, never on the
   test set.
3. ``seeds``: the small and large plain runs and the chosen stddev of each
   noise, on the other seeds.
4. ``curve`` (not part of ``all``): accuracy against the batch size, as in
   the paper's Figures 1-3: plain and each noise at the stddev chosen at
   ``--large-batch`` (unchanged, not re-selected), at every batch size of
   ``--curve-batches``, for each of ``--seeds``.

Every finished run appends one JSON line to ``--results`` (config, seed,
train/val/test accuracy and loss, steps, wall time, gamma-bar, and log Tr(G)
on training examples with ``--ggn-size``). Runs already in the file are
skipped, so an interrupted sweep continues where it stopped; a partial file
is still usable by ``experiments/plot.py``.

The plan is printed in run-minutes before anything starts (``--dry-run``
prints only the plan); ``--images-per-second`` is the training throughput
of the whole machine (its default, given in ``--help``, is what the 2-core
machine of ``experiments/README.md`` did with ``--jobs 2 --threads 1``).

Usage::

    python -m experiments.sweep --dry-run                   # the plan
    python -m experiments.sweep --phase gap                 # step 1
    python -m experiments.sweep --phase select              # step 2
    python -m experiments.sweep --phase seeds --seeds 0 1   # step 3
    python -m experiments.sweep --phase all                 # 1-3, stops if no gap
    python -m experiments.sweep --optimizer lamb --phase lr --base-lrs 0.01 0.03
    python -m experiments.sweep --phase curve --curve-batches 64 256 1024 --seeds 0
    python -m experiments.sweep --task multi30k --phase gap
    python -m experiments.plot                              # tables and figures
"""

import argparse
import dataclasses
import hashlib
import math
from pathlib import Path

from examples import cifar_train, multi30k_transformer
from examples.config import argv_of, config_from_argv
from experiments import runner

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "experiments" / "results"
PHASES = ("lr", "gap", "select", "seeds", "all", "curve")

#: The examples/cifar_train.py run shared by every run of the sweep.
#: Fixed, class-balanced 2048-image training subset, 1000 validation images
#: held out of the rest of the training set, the full 10,000-image test set;
#: no augmentation, so that both batch sizes can fit the subset in few epochs.
COMMON = cifar_train.Config(
    dataset="cifar10", model="resnet8", widths=(16, 32, 64), train_size=2048, val_size=1000, test_size=None,
    data_seed=0, augment=False, bn_momentum=0.9, weight_decay=5e-4, optimizer="nesterov", epochs=40,
)

#: The examples/multi30k_transformer.py run shared by every run of
#: ``--task multi30k``: a 2+2-layer, d_model 128 Transformer (the ``small``
#: size narrowed to fit a CPU sweep), the first 10,000 training pairs, 8
#: epochs, the official validation files for selection and the test files for
#: reporting, BLEU on the first 500 sentences of each. The learning rate and
#: warmup depend on the batch size (``multi30k_schedule``).
MULTI30K_COMMON = multi30k_transformer.Config(
    size="small", layers=2, d_model=128, heads=4, ff=512, dropout=0.1, train_size=10000, max_len=30,
    optimizer="adam", epochs=8, bleu_size=500,
)

#: The CPU sweep's Transformer schedule at batch 64: peak rate and warmup.
#: The paper's 4000 warmup steps at batch 64 are 3 of our 8 epochs at batch
#: 64 (1,250 steps), so the warmup is cut to 250 steps (20%), still scaled as
#: ``1/B`` like the paper's; the peak is set explicitly and scaled as
#: ``sqrt(B)``, as Vaswani's formula does when the warmup scales as ``1/B``.
MULTI30K_BASE = {"batch_size": 64, "lr": 1e-3, "warmup_steps": 250}


def multi30k_schedule(batch_size):
    """``(peak lr, warmup steps)`` at ``batch_size``: ``lr0 sqrt(B/64)``, ``W0 * 64/B``."""
    ratio = batch_size / MULTI30K_BASE["batch_size"]
    return round(MULTI30K_BASE["lr"] * math.sqrt(ratio), 8), max(1, round(MULTI30K_BASE["warmup_steps"] / ratio))


#: Per task: the example (a module, run with ``python -m`` from the
#: repository root), its shared config, the default results file, the
#: training-set size when ``train_size`` is None (for the plan), the
#: optimizers the example offers, and how the sweep runs it (logging only).
TASKS = {
    "cifar10": dict(
        example="examples.cifar_train",
        common=COMMON,
        results=RESULTS / "cifar10_resnet8_gap.jsonl",
        full_train_size=49000,
        optimizers=("nesterov", "lars", "adam", "lamb"),
        small_batch=64,
        large_batch=512,
        logging=dict(tensorboard=False, validation_freq=10, verbose=2),
    ),
    "multi30k": dict(
        example="examples.multi30k_transformer",
        common=MULTI30K_COMMON,
        results=RESULTS / "multi30k_transformer.jsonl",
        full_train_size=29000,
        optimizers=("adam", "lamb"),
        small_batch=64,
        large_batch=512,
        logging=dict(verbose=2),
    ),
}
#: Flags that only the CIFAR example has.
CIFAR_ONLY = ("val_size", "test_size", "augment", "widths", "ggn_size", "base_lr")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=tuple(TASKS), default="cifar10")
    p.add_argument("--phase", choices=PHASES, default="all")
    p.add_argument("--results", type=Path, default=None, help="JSONL file, appended to (default: the task's file in "
                                                              "experiments/results)")
    p.add_argument("--small-batch", type=int, default=None, help="default: 64")
    p.add_argument("--large-batch", type=int, default=None, help="default: 512")
    p.add_argument("--epochs", type=int, default=None, help="default: 40 (cifar10), 8 (multi30k)")
    p.add_argument("--train-size", type=int, default=None, help="default: 2048 (cifar10), 10,000 pairs (multi30k)")
    p.add_argument("--val-size", type=int, default=None, help="cifar10: validation images held out of training "
                                                              "(default 1000)")
    p.add_argument("--test-size", type=int, default=None, help="cifar10: test images (default all)")
    p.add_argument("--augment", action="store_true", default=None, help="cifar10: flip + crop (default off)")
    p.add_argument("--optimizer", default=None, choices=("nesterov", "lars", "adam", "lamb"), help="default: nesterov "
                                                                                                   "(cifar10), adam "
                                                                                                   "(multi30k)")
    p.add_argument("--base-lr", type=float, default=None, help="cifar10: learning rate at batch 200, scaled linearly "
                                                               "(default: the optimizer's recipe, e.g. 0.1 for "
                                                               "nesterov, 1e-3 for lamb)")
    p.add_argument("--base-lrs", type=float, nargs="+", default=None, help="phase lr: the candidate --base-lr values")
    p.add_argument("--widths", type=int, nargs=3, default=None, help="cifar10: ResNet-8 stage widths (default 16 32 "
                                                                     "64)")
    p.add_argument("--stddevs", type=float, nargs="+", default=[0.5, 1.0], help="candidates besides the "
                                                                                "noise-equivalent one")
    p.add_argument("--no-noise-equivalent", dest="noise_equivalent", action="store_false", help="select among "
                                                                                                "--stddevs only "
                                                                                                "(default: also "
                                                                                                "sqrt(B_large / "
                                                                                                "B_small - 1))")
    p.add_argument("--noises", nargs="+", default=["gaussian", "rademacher"], choices=("gaussian", "rademacher"))
    p.add_argument("--select-seed", type=int, default=0, help="seed of the stddev selection runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the gap and seeds phases")
    p.add_argument("--curve-batches", type=int, nargs="+", default=None, help="phase curve: the batch sizes")
    p.add_argument("--ggn-size", type=int, default=None, help="cifar10: training examples for log Tr(G) after each run "
                                                              "(default 128, 0: off)")
    p.add_argument("--gap-threshold", type=float, default=0.01, help="phase all: go on only if small-batch test acc "
                                                                     "exceeds large-batch by this much")
    p.add_argument("--fit-threshold", type=float, default=0.95, help="phase all: ... and the large batch reaches this "
                                                                     "train acc")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with --threads)")
    p.add_argument("--threads", type=int, default=None, help="TensorFlow threads per run")
    p.add_argument("--reuse-processes", action="store_true", help=runner.REUSE_HELP)
    p.add_argument("--images-per-second", type=float, default=None, help="training examples/s of the whole machine, "
                                                                         "for the plan (default: measured here with "
                                                                         "--jobs 2 --threads 1, 550 images/s for "
                                                                         "cifar10, 180 sentence pairs/s for multi30k)")
    p.add_argument("--overhead-seconds", type=float, default=20.0, help="per run, for the plan (start, evaluation, "
                                                                        "Tr(G) or BLEU)")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "sweep", help="logs and backups of each run (not "
                                                                                 "committed)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for the example (e.g. --extra "
                                                                         "--quick); they are part of each run's "
                                                                         "config")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    args = p.parse_args(argv)
    task = TASKS[args.task]
    if args.task != "cifar10":
        given = [f"--{name.replace('_', '-')}" for name in CIFAR_ONLY if getattr(args, name) is not None]
        if given:
            p.error(f"{', '.join(given)} only apply to --task cifar10, not --task {args.task}")
    if args.optimizer is not None and args.optimizer not in task["optimizers"]:
        p.error(f"--optimizer {args.optimizer} is not offered by --task {args.task} (choose from "
                f"{', '.join(task['optimizers'])})")
    common = task["common"]
    defaults = dict(
        results=task["results"], small_batch=task["small_batch"], large_batch=task["large_batch"],
        epochs=common.epochs, train_size=common.train_size, optimizer=common.optimizer,
        images_per_second=550.0 if args.task == "cifar10" else 180.0,
    )
    if args.task == "cifar10":
        defaults.update(val_size=COMMON.val_size, augment=COMMON.augment, widths=COMMON.widths, ggn_size=128)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return args


# --------------------------------------------------------------------------
# Configurations


def common(args):
    """The task's shared config with this sweep's flags and ``--extra``."""
    task = TASKS[args.task]
    config = dataclasses.replace(task["common"], epochs=args.epochs, train_size=args.train_size,
                                 optimizer=args.optimizer)
    if args.task == "cifar10":
        config = dataclasses.replace(config, val_size=args.val_size, test_size=args.test_size,
                                     augment=bool(args.augment), widths=tuple(args.widths), base_lr=args.base_lr)
    return with_extra(config, args.extra)


def with_extra(config, extra):
    """``config`` with the trainer flags ``extra`` (from ``--extra``) applied on top: the last of a flag wins."""
    return config_from_argv(type(config), argv_of(config) + list(extra)) if extra else config


def make_config(args, batch_size, noise="none", stddev=0.0, seed=0, role=""):
    """One run of the sweep: a :class:`experiments.runner.Run` of the task's example, labelled with ``role``."""
    stddev = round(float(stddev), 6) if noise != "none" else 0.0
    changes = dict(batch_size=batch_size, noise=noise, stddev=stddev, seed=seed)
    if args.task == "cifar10":
        changes["ggn_size"] = args.ggn_size
    else:
        changes["lr"], changes["warmup_steps"] = multi30k_schedule(batch_size)
    return with_changes(args, runner.Run(TASKS[args.task]["example"], common(args), {"role": role}), **changes)


def with_changes(args, run, **changes):
    """``run`` with ``changes`` to its config; its logs and backup go to a folder of its own under ``--run-dir``."""
    config = dataclasses.replace(run.config, **changes)
    config = dataclasses.replace(config, out=str(args.run_dir / run_name(args, config)),
                                 **TASKS[args.task]["logging"])
    return runner.Run(run.trainer, config, run.labels)


def key_of(run):
    """What identifies a run in the JSONL (``role`` is only a label; logging and paths are left out)."""
    return runner.key_of(run.trainer, run.config)


def noise_equivalent_stddev(args):
    """``tf_gradmix.noise.stddev_for_noise_batch_size(--large-batch, --small-batch)``: ``sqrt(B / b - 1)``.

    Computed here, the library imported only to refuse bad batch sizes with its
    error: importing ``tf_gradmix`` loads Keras and its backend, seconds of CPU
    that a sweep which finds its runs done (or only plans) does not need.
    """
    large, small = args.large_batch, args.small_batch
    if not 0 < small <= large:
        from tf_gradmix.noise import stddev_for_noise_batch_size

        return stddev_for_noise_batch_size(large, small)
    return math.sqrt(large / small - 1.0)


def candidate_stddevs(args):
    values = [float(s) for s in args.stddevs]
    if args.noise_equivalent:
        values.append(noise_equivalent_stddev(args))
    return sorted({round(v, 6) for v in values})


def gap_configs(args, seeds):
    return [
        make_config(args, b, seed=s, role=role)
        for s in seeds
        for b, role in ((args.small_batch, "small"), (args.large_batch, "large"))
    ]


def select_configs(args):
    return [
        make_config(args, args.large_batch, noise, sd, args.select_seed, role="select")
        for noise in args.noises
        for sd in candidate_stddevs(args)
    ]


def chosen_stddevs(args, results):
    """``{noise: stddev}`` with the best mean *validation* accuracy of the selection runs."""
    chosen = {}
    for noise in args.noises:
        scores = {}
        for run in select_configs(args):
            if run.config.noise != noise:
                continue
            found = results.get(key_of(run))
            if found is not None and found.get("val_acc") is not None:
                scores[run.config.stddev] = found["val_acc"]
        if scores:
            # Ties go to the smaller stddev (less noise).
            chosen[noise] = max(sorted(scores), key=lambda sd: scores[sd])
    return chosen


def lr_configs(args):
    """Plain large-batch runs, one per ``--base-lrs`` value, on the selection seed."""
    run = make_config(args, args.large_batch, seed=args.select_seed, role="lr")
    return [with_changes(args, run, base_lr=rate) for rate in args.base_lrs]


def best_base_lr(args, results):
    """The ``--base-lrs`` value with the best validation accuracy (None before any run)."""
    scores = {r.config.base_lr: results[key_of(r)]["val_acc"] for r in lr_configs(args) if key_of(r) in results}
    return max(sorted(scores), key=lambda rate: scores[rate]) if scores else None


def curve_configs(args, results):
    """Plain and each noise's chosen stddev (chosen at ``--large-batch``) at every ``--curve-batches``."""
    chosen = chosen_stddevs(args, results)
    missing = [n for n in args.noises if n not in chosen]
    if missing:
        raise SystemExit(
            f"Phase curve needs the stddev chosen at --large-batch {args.large_batch} for "
            f"{', '.join(missing)}: run --phase select first."
        )
    return [
        make_config(args, b, noise, chosen.get(noise, 0.0), s, role="curve" if noise != "none" else "plain")
        for s in args.seeds
        for b in args.curve_batches
        for noise in ("none", *args.noises)
    ]


def seed_configs(args, results):
    seeds = [s for s in args.seeds if s != args.select_seed]
    configs = gap_configs(args, seeds)
    chosen = chosen_stddevs(args, results)
    for noise in args.noises:
        if noise not in chosen:
            print(f"No selection result for {noise} yet: run --phase select first.", flush=True)
            continue
        configs += [
            make_config(args, args.large_batch, noise, chosen[noise], s, role="chosen")
            for s in seeds
        ]
    return configs


# --------------------------------------------------------------------------
# Results file


def load_results(path):
    """``{key: row}`` of the runs already in the JSONL file (rows of every format the sweep has written)."""
    return runner.rows_by_key(path)


def run_minutes(args, run):
    config = run.config
    train_size = config.train_size or TASKS[args.task]["full_train_size"]
    steps = train_size // config.batch_size * config.epochs
    seconds = steps * config.batch_size / args.images_per_second + args.overhead_seconds
    return seconds / 60


def run_name(args, config):
    """The run's folder name: unique per configuration (a folder holds its backup, which a rerun resumes)."""
    size = f"n{config.train_size}" if config.train_size else "nall"
    prefix = "" if args.task == "cifar10" else f"{args.task}_"
    rate = "" if getattr(config, "base_lr", None) is None else f"_lr{config.base_lr:g}"
    name = (
        f"{prefix}b{config.batch_size}_{config.noise}{config.stddev:g}_s{config.seed}"
        f"_{config.optimizer}{rate}_{size}_e{config.epochs}"
    )
    defaults = TASKS[args.task]["common"]
    # Any other departure from the task's shared config (widths, augmentation, ...).
    fields = [f.name for f in dataclasses.fields(defaults) if f.metadata.get("affects_result", True)]
    others = sorted(
        k for k in fields
        if k not in ("epochs", "train_size", "optimizer", "batch_size", "noise", "stddev", "seed", "base_lr",
                     "ggn_size", "lr", "warmup_steps")
        and getattr(config, k) != getattr(defaults, k)
    )
    suffix = "".join(f"_{k}{getattr(config, k)}" for k in others)
    name += suffix.replace(" ", "").replace(",", "-").replace("(", "").replace(")", "")
    if "quick" in others:  # --quick overrides the batch size and more: tell its runs apart by their key
        name += "_" + hashlib.sha256(runner.key_of(TASKS[args.task]["example"], config).encode()).hexdigest()[:8]
    return name


def summary(row):
    """The progress line of a finished run."""
    bleu = f" BLEU val {row['val_bleu']:.2f} test {row['test_bleu']:.2f}" if "val_bleu" in row else ""
    return (
        f"{row['role']}: train {100 * row['train_acc']:.1f}% val {100 * row['val_acc']:.1f}% "
        f"test {100 * row['test_acc']:.1f}%{bleu} gamma-bar {row['gamma_bar']}"
    )


def pending(args, configs):
    """The runs of ``configs`` not yet in the results file."""
    results = load_results(args.results)
    return [c for c in configs if key_of(c) not in results]


def run_configs(args, configs, label):
    todo = pending(args, configs)
    minutes = sum(run_minutes(args, c) for c in todo)
    print(
        f"Phase {label}: {len(configs)} runs, {len(configs) - len(todo)} already in "
        f"{args.results}, {len(todo)} to run: about {minutes:.1f} run-minutes at "
        f"{args.images_per_second:g} examples/s for the whole machine (parallel jobs "
        "share it, so this is also the wall time).",
        flush=True,
    )
    for c in todo:
        print(f"  b{c.config.batch_size:<5} {c.config.noise:<10} stddev {c.config.stddev:<8g} seed "
              f"{c.config.seed}  ~{run_minutes(args, c):.1f} min", flush=True)
    if args.dry_run or not todo:
        return
    runner.run_all(todo, args.results, parallel=args.jobs, threads=args.threads, summary=summary,
                   reuse_processes=args.reuse_processes)


def gap_found(args):
    """Whether the gap runs show a generalization gap (printed either way)."""
    results = load_results(args.results)
    small = [results.get(key_of(c)) for c in gap_configs(args, [args.select_seed])[:1]]
    large = [results.get(key_of(c)) for c in gap_configs(args, [args.select_seed])[1:]]
    if None in small + large:
        return False
    s, big = small[0], large[0]
    print(
        f"Gap check (seed {args.select_seed}): small batch train {100 * s['train_acc']:.1f}% "
        f"test {100 * s['test_acc']:.1f}%; large batch train {100 * big['train_acc']:.1f}% "
        f"test {100 * big['test_acc']:.1f}%.",
        flush=True,
    )
    ok = big["train_acc"] >= args.fit_threshold and s["test_acc"] - big["test_acc"] >= args.gap_threshold
    print("Generalization gap: " + ("yes" if ok else "NO (mixing runs skipped)"), flush=True)
    return ok


def main(argv=None):
    args = parse_args(argv)
    print(
        f"Sweep {args.task}: {args.optimizer}, batch {args.small_batch} vs {args.large_batch}, "
        f"{args.epochs} epochs on {args.train_size or 'all'} training examples; stddev candidates "
        f"{candidate_stddevs(args)} (noise-equivalent "
        f"{noise_equivalent_stddev(args):.3f}); results {args.results}",
        flush=True,
    )
    if args.phase in ("gap", "all"):
        run_configs(args, gap_configs(args, [args.select_seed]), "gap")
    if args.phase == "all" and not args.dry_run and not gap_found(args):
        return
    if args.phase in ("select", "all"):
        run_configs(args, select_configs(args), "select")
    if args.phase == "lr":
        if args.task != "cifar10" or not args.base_lrs:
            raise SystemExit("--phase lr needs --task cifar10 and --base-lrs (e.g. --base-lrs 0.01 0.03)")
        run_configs(args, lr_configs(args), "lr")
        results = load_results(args.results)
        for run in lr_configs(args):
            found = results.get(key_of(run))
            if found:
                print(f"  base lr {run.config.base_lr:g}: train {100 * found['train_acc']:.1f}% val "
                      f"{100 * found['val_acc']:.1f}%", flush=True)
        print(f"Best on validation: --base-lr {best_base_lr(args, results)}", flush=True)
    if args.phase == "curve":
        if not args.curve_batches:
            raise SystemExit("--phase curve needs --curve-batches (e.g. --curve-batches 64 256 1024)")
        run_configs(args, curve_configs(args, load_results(args.results)), "curve")
    if args.phase in ("seeds", "all"):
        results = load_results(args.results)
        if args.dry_run and not chosen_stddevs(args, results):
            print("Phase seeds (after select): per other seed, small + large plain + the chosen stddev of each noise.")
            configs = gap_configs(args, [s for s in args.seeds if s != args.select_seed])
            configs += [
                make_config(args, args.large_batch, n, 1.0, s, "chosen")
                for n in args.noises
                for s in args.seeds
                if s != args.select_seed
            ]
            run_configs(args, configs, "seeds (stddev placeholder)")
        else:
            run_configs(args, seed_configs(args, results), "seeds")


if __name__ == "__main__":
    main()
