"""`make demo`: full-batch descent loses SGD's noise; GradientMix gives it back.

Three runs on real CIFAR-10, at the same learning rate, for the same number
of steps, from the same initial weights (``examples/gd_vs_sgd.py``, one seed):

* **small batch**: plain SGD, batch ``b = 32``, reshuffled every epoch;
* **full batch (GD)**: plain gradient descent on all ``N = 1024`` images;
* **GD + GradientMix**: the full batch with Gaussian mixing weights at
  ``stddev = gm.noise.stddev_for_temperature(N, lr, b, lr) = sqrt(N/b - 1)``,
  which restores the small batch's SGD temperature ``lr / b``.

All three fit the training subset (100% training accuracy); the question is
which solution generalizes. At the same rate GD runs at ``32x`` lower
temperature than the small batch and tests worse; mixing the full batch's
per-example gradients with random weights brings the noise back. It prints a
table and saves ``results.md``, ``results.json`` and ``demo.png`` under
``--out`` (default ``runs/demo/``). Its table and run time on 2 CPU cores are
in ``experiments/README.md``.

The full study (3 seeds, Bernoulli and Rademacher weights, an isotropic
control of the same size, other stddevs) is ``experiments/temperature.py``
(``python -m experiments.temperature``); its results are in
``experiments/README.md``.

    python -m examples.demo
    python -m examples.demo --seed 1 --out runs/demo-seed1
    python -m examples.demo --quick        # a few steps (smoke test)
"""

import argparse
import json
import os
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from examples import cifar10, gd_vs_sgd  # noqa: E402

CAVEAT = (
    "One seed at CPU scale: the study behind this demo (3 seeds, controls) is in the "
    "experiments/README.md; differences of a point are within one seed's noise."
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    cifar10.add_data_arguments(p)
    p.add_argument("--out", default="runs/demo", help="output directory for the table and the plot")
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="the small batch b")
    p.add_argument("--lr", type=float, default=0.1, help="the one learning rate of all three runs")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--noise", default="gaussian", choices=("gaussian", "rademacher", "bernoulli"))
    p.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, meaningless numbers)")
    return p.parse_args(argv)


def arm_args(args, batch_size, noise):
    common = [
        "--train-size", str(args.train_size), "--lr", f"{args.lr:g}", "--steps", str(args.steps),
        "--seed", str(args.seed), "--reference-batch-size", str(args.batch_size),
        "--batch-size", str(batch_size), "--noise", noise, "--ggn-size", "0",
    ]
    if args.data_dir:
        common += ["--data-dir", args.data_dir]
    if args.cache_dir:
        common += ["--cache-dir", args.cache_dir]
    if args.quick:
        common += ["--val-size", "100", "--test-size", "200", "--eval-every", "2"]
    else:
        common += ["--eval-every", str(max(1, args.steps // 10))]
    return gd_vs_sgd.parse_args(common)


def runs_of(args):
    return [
        ("small batch", args.batch_size, "none"),
        ("full batch (GD)", 0, "none"),
        (f"GD + GradientMix ({args.noise})", 0, args.noise),
    ]


def format_table(results):
    lines = [
        "| run | batch | stddev | temperature lr(1+s²)/B | train acc | test acc | test CE | fit time |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        temperature = r["lr"] * (1 + r["stddev"] ** 2) / r["batch_size"]
        lines.append(
            f"| {r['run']} | {r['batch_size']} | {r['stddev']:.2f} | {temperature:.2e} | "
            f"{100 * r['train_acc']:.1f}% | {100 * r['test_acc']:.1f}% | {r['test_loss']:.3f} | "
            f"{r['fit_seconds']:.0f} s |"
        )
    return "\n".join(lines)


def save_plot(results, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for r in results:
        h = r["history"]
        axes[0].plot(h["step"], [100 * v for v in h["val_acc"]], marker="o", label=r["run"])
        axes[1].plot(h["step"], h["train_loss"], marker="o", label=r["run"])
    axes[0].set(title="validation accuracy (held-out training images)", xlabel="step", ylabel="%")
    axes[1].set(title="training loss (unmixed)", xlabel="step", ylabel="cross-entropy", yscale="log")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    tests = ", ".join(f"{r['run']} {100 * r['test_acc']:.1f}%" for r in results)
    fig.suptitle(f"CIFAR-10, equal rate and steps — test accuracy: {tests}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    if args.quick:
        args.train_size, args.steps = 100, 4
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        f"Plan: CIFAR-10, {args.train_size} training images, SGD at rate {args.lr:g} for {args.steps} "
        f"steps in every run: batch {args.batch_size}; the full batch; the full batch + GradientMix "
        f"({args.noise}) at the small batch's temperature. Same initial weights (seed {args.seed}).",
        flush=True,
    )
    results = []
    for label, batch_size, noise in runs_of(args):
        print(f"\n=== {label} ===", flush=True)
        result = gd_vs_sgd.run(arm_args(args, batch_size, noise))
        result["run"] = label
        results.append(result)
        print(
            f"train acc {100 * result['train_acc']:.1f}%, test acc {100 * result['test_acc']:.1f}%, "
            f"test CE {result['test_loss']:.3f} ({result['fit_seconds']:.0f} s)",
            flush=True,
        )
    table = format_table(results)
    wall = time.perf_counter() - started
    print("\n" + table + f"\n\nWall time {wall:.0f} s. {CAVEAT}")
    (out / "results.md").write_text(f"{table}\n\nSettings: {json.dumps(vars(args))}\nWall time {wall:.0f} "
                                    f"s.\n\n{CAVEAT}\n")
    summary = {"settings": vars(args), "wall_seconds": wall, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    save_plot(results, out / "demo.png")
    print(f"Saved {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'}.")
    return results


if __name__ == "__main__":
    main()
