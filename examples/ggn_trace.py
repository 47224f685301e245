"""The paper's Table 1, measured: log Tr(G) after large-batch training.

Trains a small CIFAR ResNet (examples/resnet.py, BatchNorm, logits output) at
a large batch three times from the same initialisation and data order:
plain SGD + Nesterov, and with sample-level GradientMix (Gaussian and
Rademacher weights, same ``stddev``). Then measures on a fixed subset of the
*training* data (inference mode, so BatchNorm uses its moving statistics):

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

    python examples/ggn_trace.py              # ~10 CPU-minutes
    python examples/ggn_trace.py --quick      # smoke test, seconds
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import cifar10  # noqa: E402
import keras  # noqa: E402
import numpy as np  # noqa: E402
import resnet  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_gradmix as gm  # noqa: E402
from tf_gradmix import diagnostics  # noqa: E402

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
    args = p.parse_args(argv)
    if args.quick:
        args.train_size, args.test_size, args.measure_size = 100, 100, 16
        args.batch_size, args.epochs, args.widths = 100, 1, (4, 8, 8)
        args.num_probes = args.num_probes or 8
    return args


def lr_schedule(args):
    steps = args.epochs * (args.train_size // args.batch_size)
    warmup = max(1, steps // 10)
    decay = keras.optimizers.schedules.CosineDecay(
        0.0, max(1, steps - warmup), warmup_target=args.lr, warmup_steps=warmup
    )
    return decay


def train(name, args, data):
    (x_train, y_train), (x_test, y_test) = data
    keras.utils.set_random_seed(args.seed)  # same initial weights for every run
    model = resnet.cifar_resnet(stage_widths=tuple(args.widths), model_class=gm.Model)
    optimizer = keras.optimizers.SGD(lr_schedule(args), momentum=0.9, nesterov=True)
    if name != "SGD":
        optimizer = gm.GradientMix(
            optimizer, level="sample", noise=name.lower(), stddev=args.stddev, seed=args.seed
        )
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    train_ds = cifar10.make_dataset(x_train, y_train, args.batch_size, training=True, seed=args.seed)
    start = time.time()
    model.fit(train_ds, epochs=args.epochs, verbose=0)
    seconds = time.time() - start
    test_ds = cifar10.make_dataset(x_test, y_test, 500, training=False)
    train_eval = cifar10.make_dataset(x_train, y_train, 500, training=False)
    return model, {
        "train_acc": model.evaluate(train_eval, verbose=0, return_dict=True)["accuracy"],
        "test_acc": model.evaluate(test_ds, verbose=0, return_dict=True)["accuracy"],
        "train_seconds": seconds,
    }


def measure(model, args, x_measure, y_measure):
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    x = np.asarray(cifar10.normalize(x_measure))
    start = time.time()
    est = diagnostics.ggn_trace(
        model, x, y_measure, loss, num_probes=args.num_probes, seed=args.seed, batch_size=64
    )
    return est, time.time() - start


def main(argv=None):
    args = parse_args(argv)
    tf.get_logger().setLevel("ERROR")  # pfor's "uses a while_loop" notes
    wall = time.time()
    (x_all, y_all), (x_test_all, y_test_all) = cifar10.load_cifar10(
        args.data_dir, args.cache_dir, verbose=False
    )
    x_train, y_train = cifar10.subset(x_all, y_all, args.train_size, seed=args.seed)
    x_test, y_test = cifar10.subset(x_test_all, y_test_all, args.test_size, seed=args.seed)
    # The fixed measurement subset: the first examples of the (shuffled,
    # class-balanced) training subset, i.e. data the model trained on.
    x_measure, y_measure = x_train[: args.measure_size], y_train[: args.measure_size]
    data = ((x_train, y_train), (x_test, y_test))

    rows = []
    for name in ("SGD", "Gaussian", "Rademacher"):
        model, stats = train(name, args, data)
        est, seconds = measure(model, args, x_measure, y_measure)
        rows.append((name, est, stats, seconds))
        print(
            f"# {name}: trained {stats['train_seconds']:.0f} s, Tr G measured in "
            f"{seconds:.0f} s: {est.trace:.4g}",
            flush=True,
        )

    steps = args.epochs * (args.train_size // args.batch_size)
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
    base = rows[0][1].log_trace
    paper_base = PAPER_LOG_TRACE["SGD"]
    for name, est, stats, _ in rows:
        paper = PAPER_LOG_TRACE[name]
        print(
            f"| {name} | {est.log_trace:.3f} | {est.log_stderr:.3f} | "
            f"{est.log_trace - base:+.3f} | {paper:.2f} | {paper - paper_base:+.2f} | "
            f"{stats['train_acc']:.3f} | {stats['test_acc']:.3f} |"
        )
    print()
    print(
        "SE: standard error of log Tr G over the measured examples (delta method); "
        "differences between runs share the examples, so they are not independent."
    )
    print(f"wall time {time.time() - wall:.0f} s")


if __name__ == "__main__":
    main()
