"""Step time of the gradient-norm penalty against plain GD and GD + GradientMix.

The configurations of the equal-rate, equal-steps study
(``examples/gd_vs_sgd.py``), on its training subset (the full batch of
``--train-size`` CIFAR-10 images every step), same initial weights, same
optimizer:

* ``plain``: ``keras.Sequential``, plain full-batch descent;
* ``control``: a second, identical plain model (an A/A test of the machine);
* ``mix``: ``tf_gradmix.Sequential`` + ``GradientMix(noise="gaussian",
  stddev=sqrt(N/b - 1))``, the temperature rule's arm;
* ``penalty``: GD + ``λ (1/m) Σ_k ||∇L_k||²`` over blocks of ``b`` examples
  (``λ = lr/4``; double backprop, one block at a time).

One process: each configuration is traced and warmed up, then every round
runs one ``fit`` block of ``--steps`` steps of each, in an order that rotates
from round to round (``benchmarks.overhead.run_block``). Reported: the median
step time per configuration, the ratio of medians against ``plain`` and
against ``mix``, the interquartile range of the per-round ratios, and the
load average before and after. Timings are never asserted anywhere.

    python -m benchmarks.gradient_penalty --threads 1
    python -m benchmarks.gradient_penalty --rounds 3 --steps 2 --train-size 256   # smoke run
"""

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

CONFIGS = ("plain", "control", "mix", "penalty")
DEFAULT_OUT = Path("runs") / "benchmarks" / "gradient_penalty.json"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--train-size", type=int, default=1024, help="N: the full batch")
    p.add_argument("--block-size", type=int, default=32, help="b: the penalty's blocks and the mixing rule's batch")
    p.add_argument("--optimizer", choices=("sgd", "adam"), default="sgd")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=5, help="steps per timed block")
    p.add_argument("--warmup-steps", type=int, default=2, help="trace plus these steps, untimed")
    p.add_argument("--threads", type=int, default=None, help="cap TensorFlow's thread pools")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = p.parse_args(argv)
    for name in ("train_size", "block_size", "rounds", "steps", "warmup_steps"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def build(args, config):
    import keras

    import tf_gradmix as gm
    from examples import gd_vs_sgd

    n = args.train_size
    trainer_args = gd_vs_sgd.parse_args([
        "--train-size", str(n), "--optimizer", args.optimizer, "--lr", f"{args.lr:g}",
        "--reference-batch-size", str(args.block_size),
        *(["--noise", "gaussian"] if config == "mix" else []),
        *(["--penalty-factor", "1"] if config == "penalty" else []),
    ])
    optimizer = gd_vs_sgd.make_optimizer(trainer_args)
    if config == "mix":
        model = gd_vs_sgd.build_model(trainer_args, gm.Sequential)
        stddev = gd_vs_sgd.stddev_of(trainer_args, n)
        optimizer = gm.GradientMix(optimizer, noise="gaussian", stddev=stddev, seed=0)
    elif config == "penalty":
        model = gd_vs_sgd.build_model(trainer_args, gd_vs_sgd.gradient_penalty_model_class())
        model.configure_penalty(gd_vs_sgd.penalty_weight_of(trainer_args), args.block_size)
    else:
        model = gd_vs_sgd.build_model(trainer_args, keras.Sequential)
    model.compile(optimizer=optimizer, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return model, trainer_args


def main(argv=None):
    args = parse_args(argv)
    from examples import gd_vs_sgd, threads

    threads.limit_threads(args.threads)
    from benchmarks.overhead import _quantile, run_block

    models = {}
    for config in CONFIGS:
        models[config], trainer_args = build(args, config)
    (x, y), _, _ = gd_vs_sgd.load_data(trainer_args)
    dataset = gd_vs_sgd.training_dataset(trainer_args, x, y, len(y))
    load_before = os.getloadavg()
    for config, model in models.items():
        started = time.perf_counter()
        run_block(model, dataset, args.warmup_steps)
        print(f"warm-up {config}: {time.perf_counter() - started:.1f} s", file=sys.stderr, flush=True)
    blocks = {c: [] for c in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]
        for config in order:
            blocks[config].append(run_block(models[config], dataset, args.steps)[0] / args.steps)
        print(f"round {r + 1}/{args.rounds}: " + ", ".join(f"{c} {1000 * blocks[c][-1]:.0f}" for c in CONFIGS)
              + " ms/step", file=sys.stderr, flush=True)
    median = {c: statistics.median(blocks[c]) for c in CONFIGS}
    result = {
        "command": " ".join(["python", "-m", "benchmarks.gradient_penalty"] + sys.argv[1:]),
        "train_size": args.train_size, "block_size": args.block_size, "blocks": math.ceil(args.train_size /
                                                                                          args.block_size),
        "optimizer": args.optimizer, "lr": args.lr, "rounds": args.rounds, "steps": args.steps,
        "threads": args.threads, "cpu_count": os.cpu_count(),
        "loadavg_before": load_before, "loadavg_after": os.getloadavg(),
        "configs": {},
    }
    for config in CONFIGS:
        vs_plain = [a / p for a, p in zip(blocks[config], blocks["plain"])]
        vs_mix = [a / m for a, m in zip(blocks[config], blocks["mix"])]
        result["configs"][config] = {
            "step_ms": [1000 * t for t in blocks[config]],
            "median_step_ms": 1000 * median[config],
            "ratio_vs_plain": median[config] / median["plain"],
            "ratio_vs_plain_iqr": [_quantile(vs_plain, 0.25), _quantile(vs_plain, 0.75)],
            "ratio_vs_mix": median[config] / median["mix"],
            "ratio_vs_mix_iqr": [_quantile(vs_mix, 0.25), _quantile(vs_mix, 0.75)],
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("| config | median ms/step | ratio vs plain GD (IQR) | ratio vs GD + GradientMix (IQR) |")
    print("|---|---:|---:|---:|")
    for config, r in result["configs"].items():
        print(f"| {config} | {r['median_step_ms']:.0f} | {r['ratio_vs_plain']:.2f} "
              f"({r['ratio_vs_plain_iqr'][0]:.2f}–{r['ratio_vs_plain_iqr'][1]:.2f}) | {r['ratio_vs_mix']:.2f} "
              f"({r['ratio_vs_mix_iqr'][0]:.2f}–{r['ratio_vs_mix_iqr'][1]:.2f}) |")
    print(f"load average before {load_before}, after {result['loadavg_after']}; written to {args.out}")


if __name__ == "__main__":
    main()
