"""The CPU-scale reproduction: a resumable sweep of examples/cifar_resnet18.py.

The paper claims that GradientMix improves test accuracy at large batch
sizes. A regularizer can only help where there is a generalization gap, so
the sweep first establishes one, then measures mixing inside it:

1. ``gap``: plain SGD + Nesterov at a small and a large batch, same epochs,
   the paper's §5.1 schedule (linear LR scaling from batch 200, warmup for
   10% of the run, quadratic decay). Both must fit the training subset
   (train accuracy near 100%) and the large batch must test worse.
2. ``select``: at the large batch, Gaussian and Rademacher mixing for each
   ``stddev`` of ``--stddevs`` plus the noise-equivalent setting
   ``sqrt(B_large / B_small - 1)`` (the gradient noise of the small batch,
   DESIGN.md §1), on the selection seed. The stddev of each noise is chosen
   on the **validation split held out of the training set**, never on the
   test set.
3. ``seeds``: the small and large plain runs and the chosen stddev of each
   noise, on the other seeds.

Every finished run appends one JSON line to ``--results`` (config, seed,
train/val/test accuracy and loss, steps, wall time, gamma-bar, and log Tr(G)
on training examples with ``--ggn-size``). Runs already in the file are
skipped, so an interrupted sweep continues where it stopped; a partial file
is still usable by ``experiments/plot.py``.

The plan is printed in run-minutes before anything starts (``--dry-run``
prints only the plan); ``--images-per-second`` is the training throughput
of the model (DESIGN.md §5: ~1,100 for the ResNet-8 on a free 2-core machine).

Usage::

    python experiments/sweep.py --dry-run                   # the plan
    python experiments/sweep.py --phase gap                 # step 1
    python experiments/sweep.py --phase select              # step 2
    python experiments/sweep.py --phase seeds --seeds 0 1   # step 3
    python experiments/sweep.py --phase all                 # 1-3, stops if no gap
    python experiments/plot.py                              # tables and figures
"""

import argparse
import concurrent.futures
import json
import math
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "examples" / "cifar_resnet18.py"
DEFAULT_RESULTS = REPO / "experiments" / "results" / "cifar10_resnet8_gap.jsonl"
PHASES = ("gap", "select", "seeds", "all")

#: Flags of examples/cifar_resnet18.py shared by every run of the sweep.
#: Fixed, class-balanced 2048-image training subset, 1000 validation images
#: held out of the rest of the training set, the full 10,000-image test set;
#: no augmentation, so that both batch sizes can fit the subset in few epochs.
COMMON = {
    "dataset": "cifar10",
    "model": "resnet8",
    "widths": [16, 32, 64],
    "train_size": 2048,
    "val_size": 1000,
    "test_size": None,
    "data_seed": 0,
    "augment": False,
    "bn_momentum": 0.9,
    "weight_decay": 5e-4,
    "optimizer": "nesterov",
    "epochs": 40,
}

_lock = threading.Lock()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--phase", choices=PHASES, default="all")
    p.add_argument("--results", type=Path, default=DEFAULT_RESULTS, help="JSONL file, appended to")
    p.add_argument("--small-batch", type=int, default=64)
    p.add_argument("--large-batch", type=int, default=512)
    p.add_argument("--epochs", type=int, default=COMMON["epochs"])
    p.add_argument("--train-size", type=int, default=COMMON["train_size"])
    p.add_argument("--val-size", type=int, default=COMMON["val_size"])
    p.add_argument("--test-size", type=int, default=None)
    p.add_argument("--augment", action="store_true", help="flip + crop (default off)")
    p.add_argument("--optimizer", default=COMMON["optimizer"], choices=("nesterov", "lars", "adam", "lamb"))
    p.add_argument("--widths", type=int, nargs=3, default=COMMON["widths"])
    p.add_argument("--stddevs", type=float, nargs="+", default=[0.5, 1.0], help="candidates besides the noise-equivalent one")
    p.add_argument("--noises", nargs="+", default=["gaussian", "rademacher"], choices=("gaussian", "rademacher"))
    p.add_argument("--select-seed", type=int, default=0, help="seed of the stddev selection runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="seeds of the gap and seeds phases")
    p.add_argument("--ggn-size", type=int, default=128, help="training examples for log Tr(G) after each run (0: off)")
    p.add_argument("--gap-threshold", type=float, default=0.01, help="phase all: go on only if small-batch test acc exceeds large-batch by this much")
    p.add_argument("--fit-threshold", type=float, default=0.95, help="phase all: ... and the large batch reaches this train acc")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (each with --threads)")
    p.add_argument("--threads", type=int, default=None, help="TensorFlow threads per run")
    p.add_argument("--images-per-second", type=float, default=1100.0, help="for the plan (whole machine)")
    p.add_argument("--overhead-seconds", type=float, default=20.0, help="per run, for the plan (start, evaluation, Tr(G))")
    p.add_argument("--run-dir", type=Path, default=REPO / "runs" / "sweep", help="logs and backups of each run (not committed)")
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[], help="more flags for cifar_resnet18.py (e.g. --extra --quick)")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    return p.parse_args(argv)


# --------------------------------------------------------------------------
# Configurations


def common(args):
    config = dict(COMMON)
    config.update(
        epochs=args.epochs,
        train_size=args.train_size,
        val_size=args.val_size,
        test_size=args.test_size,
        augment=bool(args.augment),
        optimizer=args.optimizer,
        widths=list(args.widths),
    )
    return config


def noise_equivalent_stddev(large, small):
    """``sqrt(B_large / B_small - 1)``: the gradient noise of the small batch."""
    return math.sqrt(large / small - 1.0)


def make_config(args, batch_size, noise="none", stddev=0.0, seed=0, role=""):
    config = common(args)
    config.update(batch_size=batch_size, noise=noise, stddev=round(float(stddev), 6) if noise != "none" else 0.0, seed=seed)
    config["ggn_size"] = args.ggn_size
    config["role"] = role
    return config


def key_of(config):
    """What identifies a run in the JSONL (``role`` is only a label)."""
    return json.dumps({k: v for k, v in config.items() if k != "role"}, sort_keys=True)


def candidate_stddevs(args):
    values = [float(s) for s in args.stddevs]
    values.append(noise_equivalent_stddev(args.large_batch, args.small_batch))
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
        for config in select_configs(args):
            if config["noise"] != noise:
                continue
            found = results.get(key_of(config))
            if found is not None and found.get("val_acc") is not None:
                scores[config["stddev"]] = found["val_acc"]
        if scores:
            # Ties go to the smaller stddev (less noise).
            chosen[noise] = max(sorted(scores), key=lambda sd: scores[sd])
    return chosen


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
    """``{key: result}`` of the runs already in the JSONL file."""
    results = {}
    if Path(path).exists():
        for line in Path(path).read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                results[record["key"]] = record
    return results


def append_result(path, record):
    with _lock:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


def flags_of(config):
    """The command-line flags of examples/cifar_resnet18.py for ``config``."""
    flags = []
    for key, value in config.items():
        if key in ("role",) or value is None:
            continue
        if key == "augment":
            if not value:
                flags.append("--no-augment")
            continue
        flag = "--" + key.replace("_", "-")
        if isinstance(value, list):
            flags += [flag, *map(str, value)]
        else:
            flags += [flag, str(value)]
    return flags


def run_minutes(args, config):
    steps = config["train_size"] // config["batch_size"] * config["epochs"]
    seconds = steps * config["batch_size"] / args.images_per_second + args.overhead_seconds
    return seconds / 60


def run_one(args, config):
    name = (
        f"b{config['batch_size']}_{config['noise']}{config['stddev']:g}_s{config['seed']}"
        f"_{config['optimizer']}_n{config['train_size']}_e{config['epochs']}"
    )
    run_dir = args.run_dir / name
    run_dir.mkdir(parents=True, exist_ok=True)
    fd, json_out = tempfile.mkstemp(suffix=".json", dir=run_dir)
    os.close(fd)
    command = [
        sys.executable, str(EXAMPLE), *flags_of(config), "--out", str(run_dir),
        "--json-out", json_out, "--no-tensorboard", "--verbose", "2",
        "--validation-freq", "10",
    ]
    if args.threads:
        command += ["--threads", str(args.threads)]
    command += list(args.extra)
    start = time.time()
    print(f"[{time.strftime('%H:%M:%S')}] start {name}", flush=True)
    with open(run_dir / "stdout.log", "a") as log:
        code = subprocess.call(command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO)
    if code != 0:
        print(f"[{time.strftime('%H:%M:%S')}] FAILED {name} (exit {code}); see {run_dir / 'stdout.log'}", flush=True)
        return None
    result = json.loads(Path(json_out).read_text())
    os.remove(json_out)
    record = {
        "key": key_of(config),
        "config": config,
        "role": config["role"],
        "seed": config["seed"],
        **{k: result.get(k) for k in (
            "train_acc", "train_loss", "val_acc", "val_loss", "test_acc", "test_loss",
            "steps", "peak_learning_rate", "warmup_steps", "gamma_bar", "fit_seconds",
            "wall_seconds", "last_epoch_train_loss", "log_ggn_trace", "log_ggn_stderr",
            "ggn_trace", "ggn_examples", "ggn_error", "train_examples", "val_examples",
            "test_examples",
        )},
        "val_acc_history": result["history"].get("val_acc"),
        "train_loss_history": result["history"].get("loss"),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpus": os.cpu_count(), "parallel_runs": args.jobs, "threads_per_run": args.threads},
        "elapsed_seconds": time.time() - start,
        "command": " ".join(["python", "examples/cifar_resnet18.py", *flags_of(config)]),
    }
    append_result(args.results, record)
    print(
        f"[{time.strftime('%H:%M:%S')}] done {name}: train {100 * record['train_acc']:.1f}% "
        f"val {100 * record['val_acc']:.1f}% test {100 * record['test_acc']:.1f}% "
        f"gamma-bar {record['gamma_bar']} ({record['elapsed_seconds']:.0f} s)",
        flush=True,
    )
    return record


def pending(args, configs):
    """The configurations of ``configs`` not yet in the results file."""
    results = load_results(args.results)
    return [c for c in configs if key_of(c) not in results]


def run_configs(args, configs, label):
    todo = pending(args, configs)
    minutes = sum(run_minutes(args, c) for c in todo)
    print(
        f"Phase {label}: {len(configs)} runs, {len(configs) - len(todo)} already in "
        f"{args.results}, {len(todo)} to run: about {minutes:.1f} run-minutes at "
        f"{args.images_per_second:g} images/s for the whole machine (parallel jobs "
        "share it, so this is also the wall time).",
        flush=True,
    )
    for c in todo:
        print(f"  b{c['batch_size']:<5} {c['noise']:<10} stddev {c['stddev']:<8g} seed {c['seed']}  ~{run_minutes(args, c):.1f} min", flush=True)
    if args.dry_run or not todo:
        return
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        list(pool.map(lambda c: run_one(args, c), todo))


def gap_found(args):
    """Whether the gap runs show a generalization gap (printed either way)."""
    results = load_results(args.results)
    small = [results.get(key_of(c)) for c in gap_configs(args, [args.select_seed])[:1]]
    large = [results.get(key_of(c)) for c in gap_configs(args, [args.select_seed])[1:]]
    if None in small + large:
        return False
    s, l = small[0], large[0]
    print(
        f"Gap check (seed {args.select_seed}): small batch train {100 * s['train_acc']:.1f}% "
        f"test {100 * s['test_acc']:.1f}%; large batch train {100 * l['train_acc']:.1f}% "
        f"test {100 * l['test_acc']:.1f}%.",
        flush=True,
    )
    ok = l["train_acc"] >= args.fit_threshold and s["test_acc"] - l["test_acc"] >= args.gap_threshold
    print("Generalization gap: " + ("yes" if ok else "NO (mixing runs skipped)"), flush=True)
    return ok


def main(argv=None):
    args = parse_args(argv)
    print(
        f"Sweep: {args.optimizer}, batch {args.small_batch} vs {args.large_batch}, "
        f"{args.epochs} epochs on {args.train_size} images; stddev candidates "
        f"{candidate_stddevs(args)} (noise-equivalent "
        f"{noise_equivalent_stddev(args.large_batch, args.small_batch):.3f}); results {args.results}",
        flush=True,
    )
    if args.phase in ("gap", "all"):
        run_configs(args, gap_configs(args, [args.select_seed]), "gap")
    if args.phase == "all" and not args.dry_run and not gap_found(args):
        return
    if args.phase in ("select", "all"):
        run_configs(args, select_configs(args), "select")
    if args.phase in ("seeds", "all"):
        results = load_results(args.results)
        if args.dry_run and not chosen_stddevs(args, results):
            print("Phase seeds (after select): per other seed, small + large plain + the chosen stddev of each noise.")
            configs = gap_configs(args, [s for s in args.seeds if s != args.select_seed])
            configs += [make_config(args, args.large_batch, n, 1.0, s, "chosen") for n in args.noises for s in args.seeds if s != args.select_seed]
            run_configs(args, configs, "seeds (stddev placeholder)")
        else:
            run_configs(args, seed_configs(args, results), "seeds")


if __name__ == "__main__":
    main()
