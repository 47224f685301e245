"""`make demo`: a small ResNet on real CIFAR-10, large batch, plain vs GradientMix.

Trains the same ResNet-8-size network (DESIGN.md §5; 79k parameters, BN
momentum 0.9) from the same initial weights, on the same fixed,
class-balanced training subset, in the same batch order and with the same
augmentations, three times:

* plain: stock ``keras.Model`` + SGD with Nesterov momentum (gradients averaged);
* GradientMix, Gaussian weights ``w_b = 1 + stddev * N(0, 1)``;
* GradientMix, Rademacher weights ``w_b = 1 +/- stddev``;

with linear learning-rate scaling (0.1 at batch 256), linear warmup over the
first 10% of the steps and cosine decay to zero. It prints a table (train and
test accuracy and cross-entropy, the paper's gamma-bar = mean of ``w^2`` over
all steps, fit time) and saves ``demo.png`` (curves), ``results.md`` and
``results.json`` under ``--out`` (default ``runs/demo/``).

The default plan (8,192 images x 10 epochs at batch 2048 = 40 steps a run,
three runs, at ~1,100 images/s on 2 idle CPU cores) takes about 5 minutes;
a loaded machine takes several times longer. It shows the
package running on real data and what the logs look like; a few minutes on a
CPU is no evidence for or against the paper.

    python examples/demo.py                      # the default plan
    python examples/demo.py --epochs 20 --stddev 2.6 --out runs/demo-long
    python examples/demo.py --quick              # a few steps (smoke test)
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cifar10  # noqa: E402
import resnet  # noqa: E402

CAVEAT = (
    "Caveat: a few-minute CPU run with one seed and few steps is not evidence "
    "for or against the paper; it shows the method running, not whether it helps."
)
IMAGES_PER_SECOND = 1100  # ResNet-8 training throughput on 2 cores (DESIGN.md §5)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--data-dir", default=None, help="CIFAR-10 JPEG copy (default: $TF_GRADMIX_DATA, then ../shared/data, then keras.datasets)")
    parser.add_argument("--cache-dir", default=None, help="decoded-array cache (default: $TF_GRADMIX_CACHE or ~/.cache/tf_gradmix)")
    parser.add_argument("--out", default="runs/demo", help="output directory for the table and the plot")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=2048)
    parser.add_argument("--train-size", type=int, default=8192, help="fixed class-balanced training subset")
    parser.add_argument("--val-size", type=int, default=2000, help="held out of the rest of the training set, evaluated every epoch")
    parser.add_argument("--test-size", type=int, default=10000, help="class-balanced subset of the 10,000 test images")
    parser.add_argument("--stddev", type=float, default=1.0, help="stddev of the mixing weights w = 1 + stddev * xi")
    parser.add_argument("--base-lr", type=float, default=0.1, help="learning rate at batch 256 (scaled linearly)")
    parser.add_argument("--warmup", type=float, default=0.1, help="fraction of the steps with linear warmup")
    parser.add_argument("--weight-decay", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=None, choices=(0, 1, 2), help="Keras fit verbosity (default: 1, progress bars, on a terminal; 2, a line an epoch, otherwise)")
    parser.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, meaningless numbers)")
    args = parser.parse_args(argv)
    if args.quick:
        args.epochs, args.batch_size, args.train_size = 2, 64, 128
        args.val_size, args.test_size = 100, 200
    if args.verbose is None:
        args.verbose = 1 if sys.stdout.isatty() else 2
    if args.train_size < args.batch_size:
        parser.error("--train-size must be at least --batch-size (training drops partial batches)")
    return args


def make_runs(stddev):
    """(label, noise or None, stddev) of each run."""
    return [
        ("plain SGD", None, 0.0),
        ("GradientMix gaussian", "gaussian", stddev),
        ("GradientMix rademacher", "rademacher", stddev),
    ]


def build_optimizer(args, total_steps, noise):
    import keras
    import tf_gradmix

    peak = args.base_lr * args.batch_size / 256
    warmup = max(1, round(args.warmup * total_steps))
    schedule = keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0,
        decay_steps=max(1, total_steps - warmup),
        warmup_target=peak,
        warmup_steps=warmup,
    )
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    if noise is None:
        return optimizer
    return tf_gradmix.GradientMix(
        optimizer, level="sample", noise=noise, stddev=args.stddev, seed=args.seed + 1
    )


def train_one(args, label, noise, data, total_steps):
    import keras
    import tf_gradmix

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = data
    # Same initial weights, batch order and augmentations in every run.
    keras.utils.set_random_seed(args.seed)
    model = resnet.cifar_resnet(
        bn_momentum=0.9,
        weight_decay=args.weight_decay,
        model_class=keras.Model if noise is None else tf_gradmix.Model,
    )
    model.compile(
        optimizer=build_optimizer(args, total_steps, noise),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="acc"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
        ],
    )
    train_ds = cifar10.make_dataset(x_train, y_train, args.batch_size, training=True, seed=args.seed)
    val_ds = cifar10.make_dataset(x_val, y_val, 1000, training=False)
    print(f"\n=== {label} ===", flush=True)
    start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=args.epochs, validation_data=val_ds, shuffle=False, verbose=args.verbose
    )
    fit_seconds = time.perf_counter() - start

    # Final numbers in inference mode: training subset without augmentation, test set.
    eval_train = model.evaluate(
        cifar10.make_dataset(x_train, y_train, 1000, training=False), verbose=0, return_dict=True
    )
    eval_test = model.evaluate(
        cifar10.make_dataset(x_test, y_test, 1000, training=False), verbose=0, return_dict=True
    )
    logs = history.history
    gammas = logs.get(tf_gradmix.model.GAMMA_METRIC)
    return {
        "run": label,
        "noise": noise or "none",
        "stddev": 0.0 if noise is None else args.stddev,
        # Plain averaging: every w_b = 1, so gamma = mean(w^2) = 1 exactly.
        "gamma_bar": float(np.mean(gammas)) if gammas else 1.0,
        "gamma_logged": bool(gammas),
        "train_acc": eval_train["acc"],
        "train_xent": eval_train["xent"],
        "test_acc": eval_test["acc"],
        "test_xent": eval_test["xent"],
        "last_epoch_loss": logs["loss"][-1],
        "fit_seconds": fit_seconds,
        "history": {k: [float(v) for v in vals] for k, vals in logs.items()},
    }


def format_table(results):
    header = (
        "| run | stddev | gamma-bar | train acc | test acc | train-test | "
        "train xent | test xent | last-epoch loss | fit time |"
    )
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        gamma = f"{r['gamma_bar']:.3f}" if r["gamma_logged"] else "1 (fixed)"
        lines.append(
            f"| {r['run']} | {r['stddev']:g} | {gamma} | {100 * r['train_acc']:.1f}% | "
            f"{100 * r['test_acc']:.1f}% | {100 * (r['train_acc'] - r['test_acc']):+.1f} | "
            f"{r['train_xent']:.3f} | {r['test_xent']:.3f} | {r['last_epoch_loss']:.3f} | "
            f"{r['fit_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def save_plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for r in results:
        h = r["history"]
        epochs = np.arange(1, len(h["loss"]) + 1)
        axes[0].plot(epochs, h["loss"], marker="o", label=r["run"])
        axes[1].plot(epochs, 100 * np.array(h["val_acc"]), marker="o", label=r["run"])
        gamma = h.get("gradmix_gamma", [1.0] * len(epochs))
        axes[2].plot(epochs, gamma, marker="o", label=r["run"])
    axes[0].set(title="training loss (plain, unmixed; with L2)", xlabel="epoch", ylabel="loss")
    axes[1].set(title="validation accuracy (held-out train images)", xlabel="epoch", ylabel="%")
    axes[2].set(title="gamma per epoch = mean(w^2)", xlabel="epoch", ylabel="gamma")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("tf_gradmix demo: ResNet-8 on CIFAR-10 (one seed, minutes on CPU)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    wall_start = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    (x_all, y_all), (x_test, y_test) = cifar10.load_cifar10(args.data_dir, args.cache_dir)
    train_idx = cifar10.balanced_indices(y_all, args.train_size, seed=args.seed)
    val_idx = cifar10.balanced_indices(y_all, args.val_size, seed=args.seed + 1, exclude=train_idx)
    if args.test_size < len(y_test):
        x_test, y_test = cifar10.subset(x_test, y_test, args.test_size, seed=args.seed)
    data = ((x_all[train_idx], y_all[train_idx]), (x_all[val_idx], y_all[val_idx]), (x_test, y_test))

    steps_per_epoch = args.train_size // args.batch_size
    total_steps = steps_per_epoch * args.epochs
    runs = make_runs(args.stddev)
    planned = len(runs) * total_steps * args.batch_size / IMAGES_PER_SECOND
    print(
        f"Plan: {len(runs)} runs x {args.epochs} epochs x {steps_per_epoch} steps of batch "
        f"{args.batch_size} on {args.train_size} training images ({total_steps} steps a run); "
        f"peak LR {args.base_lr * args.batch_size / 256:g} (0.1 x B/256), warmup "
        f"{max(1, round(args.warmup * total_steps))} steps, cosine decay; SGD Nesterov 0.9, "
        f"BN momentum 0.9, weight decay {args.weight_decay:g}; validation {args.val_size}, "
        f"test {len(y_test)} images; about {planned / 60:.1f} min of training at "
        f"~{IMAGES_PER_SECOND} img/s.",
        flush=True,
    )

    results = [train_one(args, label, noise, data, total_steps) for label, noise, _ in runs]

    table = format_table(results)
    wall = time.perf_counter() - wall_start
    print("\n" + table)
    print(f"\nWall time {wall:.0f} s. {CAVEAT}")
    (out / "results.md").write_text(
        f"{table}\n\nSettings: {json.dumps({k: v for k, v in vars(args).items()})}\n"
        f"Wall time {wall:.0f} s.\n\n{CAVEAT}\n"
    )
    (out / "results.json").write_text(
        json.dumps({"settings": vars(args), "wall_seconds": wall, "results": results}, indent=1)
    )
    save_plot(results, out / "demo.png")
    print(f"Saved {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'}.")
    return results


if __name__ == "__main__":
    main()
