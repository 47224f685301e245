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

import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from examples import data, gd_vs_sgd  # noqa: E402
from examples.config import check_choices, config_from_argv, option, values_of  # noqa: E402

CAVEAT = (
    "One seed at CPU scale: the study behind this demo (3 seeds, controls) is in the "
    "experiments/README.md; differences of a point are within one seed's noise."
)


@dataclasses.dataclass(frozen=True)
class Config:
    """The demo's settings; each field is the flag ``--field-name``."""

    data_dir: Optional[str] = data.data_dir_field("CIFAR-10 JPEG copy", "keras.datasets")
    cache_dir: Optional[str] = data.cache_dir_field()
    out: str = option("runs/demo", help="output directory for the table and the plot", affects_result=False)
    train_size: int = option(1024)
    batch_size: int = option(32, help="the small batch b")
    lr: float = option(0.1, help="the one learning rate of all three runs")
    steps: int = option(2000)
    seed: int = option(0)
    noise: str = option("gaussian", choices=("gaussian", "rademacher", "bernoulli"))
    quick: bool = option(False, help="tiny settings for a smoke test (seconds, meaningless numbers)")

    def __post_init__(self):
        check_choices(self)
        if self.quick:
            object.__setattr__(self, "train_size", 100)
            object.__setattr__(self, "steps", 4)


def parse_args(argv=None):
    """The demo's :class:`Config` of a command line (``sys.argv[1:]`` by default)."""
    return config_from_argv(Config, sys.argv[1:] if argv is None else argv, description=__doc__.split("\n")[0])


def arm_config(config, batch_size, noise):
    """The ``examples/gd_vs_sgd.py`` run of one arm (``batch_size`` 0: the full batch)."""
    evaluation = dict(val_size=100, test_size=200, eval_every=2) if config.quick else dict(
        eval_every=max(1, config.steps // 10)
    )
    return gd_vs_sgd.Config(
        train_size=config.train_size, lr=config.lr, steps=config.steps, seed=config.seed,
        reference_batch_size=config.batch_size, batch_size=batch_size, noise=noise, ggn_size=0,
        data_dir=config.data_dir, cache_dir=config.cache_dir, **evaluation,
    )


def runs_of(config):
    return [
        ("small batch", config.batch_size, "none"),
        ("full batch (GD)", 0, "none"),
        (f"GD + GradientMix ({config.noise})", 0, config.noise),
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
    config = parse_args(argv)
    out = Path(config.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(
        f"Plan: CIFAR-10, {config.train_size} training images, SGD at rate {config.lr:g} for {config.steps} "
        f"steps in every run: batch {config.batch_size}; the full batch; the full batch + GradientMix "
        f"({config.noise}) at the small batch's temperature. Same initial weights (seed {config.seed}).",
        flush=True,
    )
    results = []
    for label, batch_size, noise in runs_of(config):
        print(f"\n=== {label} ===", flush=True)
        result = gd_vs_sgd.run(arm_config(config, batch_size, noise))
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
    (out / "results.md").write_text(f"{table}\n\nSettings: {json.dumps(values_of(config))}\nWall time {wall:.0f} "
                                    f"s.\n\n{CAVEAT}\n")
    summary = {"settings": values_of(config), "wall_seconds": wall, "results": results}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    save_plot(results, out / "demo.png")
    print(f"Saved {out / 'results.md'}, {out / 'results.json'} and {out / 'demo.png'}.")
    return results


if __name__ == "__main__":
    main()
