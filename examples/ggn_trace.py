"""The paper's Table 1, measured: log Tr(G) after large-batch training.

A preset of the CIFAR trainer (``examples/cifar_train.py``): a small CIFAR
ResNet (BatchNorm, logits output) trained at a large batch three times from
the same initialisation and data order, plain SGD + Nesterov and with
sample-level GradientMix (Gaussian and Rademacher weights, same
``stddev``). After training the trainer measures, on a fixed class-balanced
subset of the *training* data (inference mode, so BatchNorm uses its moving
statistics):

* ``Tr G``, the trace of the generalised Gauss-Newton matrix of the mean
  cross-entropy, split at the logits (``tf_gradmix.diagnostics.ggn_trace``,
  exact unless ``--num-probes``), its natural log and that log's standard
  error (over the examples of the subset, and the probes if any);
* train-subset and test accuracy.

The paper (ResNet-18, CIFAR-10, batch 8K) reports log Tr(G) = 5.87 (SGD),
4.21 (Gaussian), 4.58 (Rademacher). Its G sums over the data set, so
absolute values are not comparable (its log base and data are not stated
either); compare the differences from the baseline: -1.66 and -1.29.

Usage::

    python -m examples.ggn_trace              # minutes on a CPU (experiments/README.md)
    python -m examples.ggn_trace --quick      # smoke test, seconds
"""

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from examples import cifar_train, data  # noqa: E402
from examples.config import config_from_argv, option  # noqa: E402

#: Table 1 of the paper (ResNet-18, CIFAR-10, batch 8K).
PAPER_LOG_TRACE = {"SGD": 5.87, "Gaussian": 4.21, "Rademacher": 4.58}


@dataclasses.dataclass(frozen=True)
class Config:
    """The preset's settings; each field is the flag ``--field-name``."""

    quick: bool = option(False, help="tiny settings for a smoke test")
    train_size: int = option(3000, help="training subset (class-balanced)")
    test_size: int = option(2000)
    measure_size: int = option(256, help="fixed training examples for Tr G")
    batch_size: int = option(500)
    epochs: int = option(12)
    lr: float = option(0.4, help="peak learning rate (SGD + Nesterov 0.9)")
    stddev: float = option(1.0, help="GradientMix stddev of w")
    widths: Tuple[int, int, int] = option((16, 32, 64))
    num_probes: Optional[int] = option(None, help="Hutchinson probes (default exact)")
    seed: int = option(0)
    data_dir: Optional[str] = data.data_dir_field("CIFAR-10 JPEG copy", "TFDS")
    cache_dir: Optional[str] = data.cache_dir_field()
    out: str = option("runs/ggn_trace", help="each run's logs and result.json, in a folder of its own",
                      affects_result=False)

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.quick:
            quick = dict(train_size=100, test_size=100, measure_size=16, batch_size=100, epochs=1, widths=(4, 8, 8),
                         num_probes=self.num_probes or 8)
            for name, value in quick.items():
                object.__setattr__(self, name, value)


def parse_args(argv=None):
    """The preset's :class:`Config` of a command line (``sys.argv[1:]`` by default)."""
    return config_from_argv(Config, sys.argv[1:] if argv is None else argv, description=__doc__.split("\n")[0])


def trainer_config(args, noise, out):
    """The preset: the ``examples/cifar_train.py`` run of one arm (10% warmup, cosine decay)."""
    return cifar_train.Config(
        model="resnet8", widths=tuple(args.widths), optimizer="nesterov", schedule="cosine",
        base_lr=args.lr, base_batch_size=args.batch_size, warmup_epochs=0.1 * args.epochs,
        batch_size=args.batch_size, epochs=args.epochs,
        train_size=args.train_size, test_size=args.test_size, data_seed=args.seed, seed=args.seed,
        noise=noise, stddev=args.stddev, ggn_size=args.measure_size, ggn_probes=args.num_probes,
        data_dir=args.data_dir, cache_dir=args.cache_dir,
        out=str(out), tensorboard=False, verbose=0,
    )


def main(argv=None):
    args = parse_args(argv)
    wall = time.time()
    rows = []
    for name in ("SGD", "Gaussian", "Rademacher"):
        noise = "none" if name == "SGD" else name.lower()
        result = cifar_train.run(trainer_config(args, noise, Path(args.out) / noise))
        if "ggn_error" in result:
            raise SystemExit(f"Tr G of the {name} run failed: {result['ggn_error']}")
        rows.append((name, result))
        print(f"# {name}: trained {result['fit_seconds']:.0f} s, Tr G {result['ggn_trace']:.4g}", flush=True)

    steps = rows[0][1]["steps"]
    mode = "exact" if args.num_probes is None else f"Hutchinson, {args.num_probes} probes"
    print()
    print(
        f"ResNet {tuple(args.widths)} (BN), CIFAR-10 subset of {args.train_size}, batch "
        f"{args.batch_size}, {args.epochs} epochs ({steps} steps), GradientMix stddev "
        f"{args.stddev}; Tr G ({mode}) on {args.measure_size} fixed training examples, "
        "logit split, inference mode, natural log."
    )
    print()
    print("| run | log Tr G | SE | Δ vs SGD | paper log Tr G | paper Δ | train acc | test acc |")
    print("|---|---|---|---|---|---|---|---|")
    base = rows[0][1]["log_ggn_trace"]
    paper_base = PAPER_LOG_TRACE["SGD"]
    for name, result in rows:
        paper = PAPER_LOG_TRACE[name]
        print(
            f"| {name} | {result['log_ggn_trace']:.3f} | {result['log_ggn_stderr']:.3f} | "
            f"{result['log_ggn_trace'] - base:+.3f} | {paper:.2f} | {paper - paper_base:+.2f} | "
            f"{result['train_acc']:.3f} | {result['test_acc']:.3f} |"
        )
    print()
    print(
        "SE: standard error of log Tr G over the measured examples (delta method); "
        "differences between runs share the examples, so they are not independent."
    )
    print(f"wall time {time.time() - wall:.0f} s")


if __name__ == "__main__":
    main()
