"""Regime B sweep: equal epochs, the large batch's rate capped below linear scaling.

The paper's situation in miniature: the rate can no longer grow with the
batch. ResNet-8 (BatchNorm momentum 0.9) on a fixed 2,048-image CIFAR-10
subset without augmentation, SGD + Nesterov, the paper's §5.1 schedule
(warmup, polynomial decay), the same number of epochs in every arm:

* batch ``--small-batch`` at the rate of ``tf_gradmix.recipes.CIFAR_SGD``
  (its base rate at its base batch, scaled linearly), which fits the subset;
* batch ``--large-batch`` with its peak rate capped at the small batch's
  times ``sqrt(B / b)`` (square-root instead of linear scaling), plain;
* the same capped large batch + GradientMix (Gaussian) at
  ``noise.stddev_for_temperature(B, lr_B, b, lr_b)`` (``sqrt(3)`` for
  1024 vs 64), which restores the small batch's temperature.

Each run is one ``examples/cifar_train.py`` process, started by
``experiments/runner.py``: one JSON line per finished run (with its config
and command) goes to ``--results``; finished runs are skipped, so the sweep
resumes where it stopped.

    python -m experiments.capped_rate --parallel 2 --threads 1
"""

import argparse
import dataclasses
import math
from pathlib import Path

from experiments import runner, sweep
from tf_gradmix import noise, recipes, schedules

HERE = Path(__file__).resolve().parent
TRAINER = "examples.cifar_train"
DEFAULT_RESULTS = HERE / "results" / "cifar10_resnet8_capped_rate.jsonl"
#: The paper's §5.1 rate for SGD + Nesterov, scaled linearly from its base batch.
RECIPE = recipes.CIFAR_SGD
#: Every arm's run: the CIFAR sweep's (ResNet-8 with BatchNorm momentum 0.9 on a fixed, class-balanced
#: 2,048-image subset, 1,000 validation images held out, no augmentation, SGD + Nesterov), log Tr(G) on 128
#: training examples.
BASE = dataclasses.replace(sweep.COMMON, ggn_size=128)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small-batch", type=int, default=64)
    p.add_argument("--large-batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--reuse-processes", action="store_true", help=runner.REUSE_HELP)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more examples/cifar_train.py flags for "
                                                                         "every run (e.g. --extra --quick); they "
                                                                         "are part of each run's config")
    return p.parse_args(argv)


def arms(args, seed):
    """``(label, cifar_train.Config)`` of the three arms of one seed."""
    small_lr = schedules.scaled_learning_rate(RECIPE["base_learning_rate"], RECIPE["base_batch_size"],
                                              args.small_batch)
    capped_lr = small_lr * math.sqrt(args.large_batch / args.small_batch)
    stddev = noise.stddev_for_temperature(args.large_batch, capped_lr, args.small_batch, small_lr)
    base = dataclasses.replace(BASE, epochs=args.epochs, seed=seed)
    # The rates and stddev as the recorded commands wrote them (%g and 6 digits), so recorded runs are recognised.
    capped = dataclasses.replace(base, batch_size=args.large_batch, base_lr=float(f"{capped_lr:g}"),
                                 base_batch_size=args.large_batch)
    return [
        (label, sweep.with_extra(config, args.extra))
        for label, config in (
            (f"b{args.small_batch}", dataclasses.replace(base, batch_size=args.small_batch)),
            (f"b{args.large_batch} capped", capped),
            (f"b{args.large_batch} capped + gaussian",
             dataclasses.replace(capped, noise="gaussian", stddev=float(f"{stddev:.6g}"))),
        )
    ]


def summary(row):
    return f"{row['arm']:<26} seed {row['seed']}: train {row['train_acc']:.3f} test {row['test_acc']:.3f}"


def main(argv=None):
    args = parse_args(argv)
    runs = [
        runner.Run(TRAINER, config, {"arm": label})
        for seed in args.seeds
        for label, config in arms(args, seed)
    ]
    return runner.run_all(runs, args.results, parallel=args.parallel, threads=args.threads, summary=summary,
                          reuse_processes=args.reuse_processes)


if __name__ == "__main__":
    main()
