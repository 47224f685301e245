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

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from examples import cifar_train  # noqa: E402

#: Table 1 of the paper (ResNet-18, CIFAR-10, batch 8K).
PAPER_LOG_TRACE = {"SGD": 5.87, "Gaussian": 4.21, "Rademacher": 4.58}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test")
    p.add_argument("--train-size", type=int, default=3000, help="training subset (class-balanced)")
    p.add_argument("--test-size", type=int, default=2000)
    p.add_argument("--measure-size", type=int, default=256, help="fixed training examples for Tr G")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--lr", type=float, default=0.4, help="peak learning rate (SGD + Nesterov 0.9)")
    p.add_argument("--stddev", type=float, default=1.0, help="GradientMix stddev of w")
    p.add_argument("--widths", type=int, nargs=3, default=(16, 32, 64))
    p.add_argument("--num-probes", type=int, default=None, help="Hutchinson probes (default exact)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--out", default="runs/ggn_trace", help="each run's logs and result.json, in a folder of its own")
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.measure_size = 100, 100, 16
        args.batch_size, args.epochs, args.widths = 100, 1, (4, 8, 8)
        args.num_probes = args.num_probes or 8
    return args


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
