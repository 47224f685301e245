"""Regime B sweep: equal epochs, the large batch's rate capped below linear scaling.

The paper's situation in miniature: the rate can no longer grow with the
batch. ResNet-8 (BatchNorm momentum 0.9) on a fixed 2,048-image CIFAR-10
subset without augmentation, SGD + Nesterov, the paper's §5.1 schedule
(warmup, polynomial decay), the same number of epochs in every arm:

* batch ``--small-batch`` at the rate of ``tf_gradmix.recipes.CIFAR_SGD``
  (0.1 at batch 200, scaled linearly: 0.032 at 64), which fits the subset;
* batch ``--large-batch`` with its peak rate capped at the small batch's
  times ``sqrt(B / b)`` (square-root instead of linear scaling), plain;
* the same capped large batch + GradientMix (Gaussian) at
  ``noise.stddev_for_temperature(B, lr_B, b, lr_b)`` (``sqrt(3)`` for
  1024 vs 64), which restores the small batch's temperature.

Each run is one ``examples/cifar_train.py`` process (``python -m``); one JSON line per
finished run (with its command) goes to ``--results``; finished runs are
skipped, so the sweep resumes where it stopped.

    python -m experiments.capped_rate --parallel 2 --threads 1
"""

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from experiments.temperature import key_of, load_results
from tf_gradmix import noise, recipes

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
EXAMPLE = "examples.cifar_train"  # run as `python -m` from the repository root
DEFAULT_RESULTS = HERE / "results" / "cifar10_resnet8_capped_rate.jsonl"
# The paper's §5.1 rate for SGD + Nesterov: 0.1 at batch 200, scaled linearly.
RECIPE = recipes.CIFAR_SGD
RECIPE_RATE, RECIPE_BATCH = RECIPE["base_learning_rate"], RECIPE["base_batch_size"]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--small-batch", type=int, default=64)
    p.add_argument("--large-batch", type=int, default=1024)
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--seeds", type=int, nargs="+", default=(0, 1, 2))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--parallel", type=int, default=2)
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS)
    return p.parse_args(argv)


def common(args, seed):
    return [
        "--dataset", "cifar10", "--model", "resnet8", "--widths", "16", "32", "64",
        "--train-size", "2048", "--val-size", "1000", "--data-seed", "0", "--no-augment",
        "--bn-momentum", "0.9", "--weight-decay", "0.0005", "--optimizer", "nesterov",
        "--epochs", str(args.epochs), "--seed", str(seed), "--ggn-size", "128",
    ]


def arms(args, seed):
    """(label, arguments) of the three arms of one seed."""
    small_lr = RECIPE_RATE * args.small_batch / RECIPE_BATCH
    capped_lr = small_lr * math.sqrt(args.large_batch / args.small_batch)
    stddev = noise.stddev_for_temperature(args.large_batch, capped_lr, args.small_batch, small_lr)
    capped = ["--base-lr", f"{capped_lr:g}", "--base-batch-size", str(args.large_batch)]
    return [
        (f"b{args.small_batch}", common(args, seed) + ["--batch-size", str(args.small_batch)]),
        (f"b{args.large_batch} capped", common(args, seed) + ["--batch-size", str(args.large_batch)] + capped),
        (
            f"b{args.large_batch} capped + gaussian",
            common(args, seed) + ["--batch-size", str(args.large_batch)] + capped
            + ["--noise", "gaussian", "--stddev", f"{stddev:.6g}"],
        ),
    ]


def run_one(args, label, run_args):
    shown = " ".join(["python", "-m", EXAMPLE] + run_args)
    print(f"[{time.strftime('%H:%M:%S')}] {shown}", flush=True)
    started = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, "-m", EXAMPLE] + run_args + [
            "--threads", str(args.threads), "--out", tmp, "--json-out", str(out)
        ]
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if done.returncode != 0:
            print(done.stderr[-3000:], file=sys.stderr, flush=True)
            raise RuntimeError(f"run failed ({done.returncode}): {shown}")
        record = json.loads(out.read_text())
    record.update(
        key=key_of_args(run_args), arm=label, command=shown, elapsed_seconds=time.time() - started,
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine={"cpus": os.cpu_count(), "parallel_runs": args.parallel, "threads_per_run": args.threads},
    )
    with open(args.results, "a") as f:
        f.write(json.dumps(record) + "\n")
    print(f"    {label:<26} seed {record['seed']}: train {record['train_acc']:.3f} "
          f"test {record['test_acc']:.3f} ({record['elapsed_seconds']:.0f} s)", flush=True)


def key_of_args(run_args):
    # --widths takes three values: join them so the flag/value pairing holds.
    joined, it = [], iter(run_args)
    for flag in it:
        joined.append(flag)
        if flag == "--widths":
            joined.append(",".join([next(it), next(it), next(it)]))
        elif flag != "--no-augment":
            joined.append(next(it))
        else:
            joined.append("1")
    return key_of(joined)


def main(argv=None):
    args = parse_args(argv)
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = load_results(args.results)
    todo = [
        (label, run_args)
        for seed in args.seeds
        for label, run_args in arms(args, seed)
        if key_of_args(run_args) not in done
    ]
    print(f"{len(todo)} runs to do", flush=True)
    with ThreadPoolExecutor(max_workers=args.parallel) as pool:
        list(pool.map(lambda job: run_one(args, *job), todo))


if __name__ == "__main__":
    main()
