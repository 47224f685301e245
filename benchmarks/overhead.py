"""Step time and peak memory of GradientMix against the same plain Keras step.

Configurations (same model, same initial weights, same
SGD with Nesterov momentum, no metrics besides what the configuration adds):

* ``plain``:  ``keras.Model`` + ``SGD``;
* ``sample``: ``tf_gradmix.Model`` + ``GradientMix(SGD, level="sample", stddev=1)``;
* ``enable``: ``tf_gradmix.enable(keras.Model)`` + the same sample-level mixer;
* ``device``: ``keras.Model`` + ``GradientMix(SGD, level="device", stddev=1)``
  (one replica here: only a random step length, but its cost is what we
  measure; its single-replica warning is silenced);
* ``control`` (opt-in): a second, identical plain model: an A/A test of how
  far apart two identical configurations time on this machine.

Models: ``cnn``, a small BatchNorm CNN on 32x32x3 images (batch 256 by
default), and ``resnet18``, the CIFAR ResNet-18 of ``examples/resnet.py``
(11.2M parameters, batch 32 by default so that it fits a few minutes on
2 CPU cores).

**Time**: one process builds every configuration, warms each up (trace plus
a few steps), then runs ``--rounds`` rounds; a round runs one block of
``--steps`` steps of every configuration, in an order that rotates from round
to round. A block is one real ``fit(..., steps_per_epoch=steps, verbose=0)``
on a repeated in-memory batch, timed with ``time.perf_counter`` from
``on_epoch_begin`` to ``on_epoch_end`` (so iterator set-up is excluded; the
whole ``fit`` call is recorded too). Reported: the median step time of each
configuration over the rounds, the ratio of medians against ``plain``, and the
interquartile range of the per-round ratios (each round's block time over the
same round's ``plain`` block: this pairs configurations under the same
machine load).

**Memory**: every (model, configuration) runs in its own subprocess
(``--memory-child``): import, make the data, reset the peak marks, then build,
compile, warm up and train; reported is the median over ``--memory-repeats``
subprocesses of

* the peak resident set size of the process (``VmHWM`` after resetting it
  through ``/proc/self/clear_refs``, so an import-time peak cannot hide the
  training peak; where that is not allowed, ``getrusage(RUSAGE_SELF).ru_maxrss``).
  It includes the ~0.5 GiB of the imported TensorFlow runtime, which is the
  same for every configuration; the JSON also has the part added after the
  reset (peak minus the RSS at reset) and its ratio, a stricter view;
* TensorFlow's CPU allocator peak (``tf.config.experimental.get_memory_info
  ("CPU:0")["peak"]``, after ``reset_memory_stats``): tensors only.

Children only measure their own memory, so ``--memory-jobs`` of them may run
at once.

Timings are never asserted anywhere: this script only reports.

Usage::

    python -m benchmarks.overhead                 # the full run (minutes; docs/performance.md)
    python -m benchmarks.overhead --quick         # smoke run, < 1 min
    python -m benchmarks.overhead --models cnn --rounds 9 --steps 10
"""

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "overhead.json"
CONFIGS = ("plain", "sample", "enable", "device", "control")
MODELS = ("cnn", "resnet18")
# Defaults sized for a few minutes per model on 2 (shared) CPU cores.
DEFAULT_BATCH = {"cnn": 256, "resnet18": 32}
DEFAULT_STEPS = {"cnn": 5, "resnet18": 2}
DEFAULT_ROUNDS = {"cnn": 9, "resnet18": 7}
DEFAULT_REPEATS = {"cnn": 2, "resnet18": 1}
# `enable` runs the same hook as `sample`; measured on the CNN only by default.
DEFAULT_CONFIGS = {"cnn": ("plain", "sample", "enable", "device"),
                   "resnet18": ("plain", "sample", "device")}
QUICK_BATCH = {"cnn": 32, "resnet18": 8}
QUICK_CONFIGS = ("plain", "sample", "device")
STDDEV = 1.0
SEED = 1234
DEVICE_WARNING = r"GradientMix\(level='device'\) with a single replica"

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")


def _imports():
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_gradmix as gm

    return keras, np, tf, gm


# ---------------------------------------------------------------------------
# Models and configurations
# ---------------------------------------------------------------------------


def build_model(name, model_class, quick=False):
    """A fresh, uncompiled model of class ``model_class``."""
    keras, _, _, _ = _imports()
    if name == "cnn":
        widths = (4, 8) if quick else (16, 32)
        inputs = keras.Input((32, 32, 3), name="image")
        x = inputs
        for stage, width in enumerate(widths):
            for i in range(2):
                x = keras.layers.Conv2D(
                    width, 3, padding="same", use_bias=False, name=f"conv{stage}_{i}"
                )(x)
                x = keras.layers.BatchNormalization(momentum=0.9, name=f"bn{stage}_{i}")(x)
                x = keras.layers.ReLU()(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        outputs = keras.layers.Dense(10, name="logits")(x)
        return model_class(inputs, outputs, name="bn_cnn")
    if name == "resnet18":
        from examples import resnet

        if quick:  # the same code path, a tiny net
            return resnet.cifar_resnet(
                stage_widths=(8, 16), blocks_per_stage=(1, 1), model_class=model_class
            )
        return resnet.resnet18_cifar(num_classes=10, bn_momentum=0.9, model_class=model_class)
    raise ValueError(f"unknown model {name!r}; expected one of {MODELS}")


def make_config(config, model_name, quick=False, weights=None):
    """A compiled model for one configuration (weights copied if given)."""
    keras, _, _, gm = _imports()

    def sgd():
        return keras.optimizers.SGD(learning_rate=0.01, momentum=0.9, nesterov=True)

    if config in ("plain", "control"):  # control: a second plain model (A/A test)
        model, optimizer = build_model(model_name, keras.Model, quick), sgd()
    elif config == "sample":
        model = build_model(model_name, gm.Model, quick)
        optimizer = gm.GradientMix(sgd(), level="sample", stddev=STDDEV, seed=SEED)
    elif config == "enable":
        model = gm.enable(build_model(model_name, keras.Model, quick))
        optimizer = gm.GradientMix(sgd(), level="sample", stddev=STDDEV, seed=SEED)
    elif config == "device":
        model = build_model(model_name, keras.Model, quick)
        optimizer = gm.GradientMix(sgd(), level="device", stddev=STDDEV, seed=SEED)
    else:
        raise ValueError(f"unknown configuration {config!r}; expected one of {CONFIGS}")
    if weights is not None:
        model.set_weights(weights)
    model.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    return model


def make_dataset(batch, seed=0):
    """One fixed in-memory batch, repeated forever."""
    _, np, tf, _ = _imports()
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, 32, 32, 3), dtype=np.float32)
    y = rng.integers(0, 10, size=(batch,)).astype(np.int32)
    return tf.data.Dataset.from_tensors((x, y)).repeat()


def _epoch_timer():
    keras, _, _, _ = _imports()

    class EpochTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.cpu_start = time.process_time()
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.elapsed = time.perf_counter() - self.start
            self.cpu = time.process_time() - self.cpu_start

    return EpochTimer()


def run_block(model, dataset, steps):
    """Seconds of ``steps`` training steps: (epoch time, whole fit call, CPU time).

    The CPU time is this process's (all threads) over the epoch: less
    sensitive to other processes than wall time, but it counts TF's
    thread-pool spinning too."""
    timer = _epoch_timer()
    start = time.perf_counter()
    model.fit(dataset, epochs=1, steps_per_epoch=steps, shuffle=False, verbose=0,
              callbacks=[timer])
    return timer.elapsed, time.perf_counter() - start, timer.cpu


def graph_op_count(model, dataset):
    """Ops in one traced ``train_step`` (forward + backward + update)."""
    _, _, tf, _ = _imports()
    x, y = next(iter(dataset))
    specs = (tf.TensorSpec(x.shape, x.dtype), tf.TensorSpec(y.shape, y.dtype))
    concrete = tf.function(model.train_step).get_concrete_function(specs)
    graph = concrete.graph
    ops = graph.get_operations()
    count = len(ops)
    # Ops inside function bodies (custom gradients, stateless RNG helpers).
    for fdef in graph.as_graph_def().library.function:
        count += len(fdef.node_def)
    types = {}
    for op in ops:
        types[op.type] = types.get(op.type, 0) + 1
    return count, types


# ---------------------------------------------------------------------------
# Time: one process, alternating rounds
# ---------------------------------------------------------------------------


def _quantile(values, q):
    values = sorted(values)
    if len(values) == 1:
        return values[0]
    pos = q * (len(values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (pos - lo)


def time_model(model_name, configs, batch, rounds, steps, warmup_steps, quick, log):
    keras, _, _, _ = _imports()
    keras.utils.set_random_seed(SEED)
    dataset = make_dataset(batch)
    reference = build_model(model_name, keras.Model, quick)
    weights = reference.get_weights()
    n_params = reference.count_params()
    del reference
    models = {c: make_config(c, model_name, quick, weights) for c in configs}
    for config, model in models.items():
        start = time.perf_counter()
        run_block(model, dataset, warmup_steps)  # traces + warm-up steps
        log(f"  warm-up {model_name}/{config}: {time.perf_counter() - start:.1f}s")
    blocks = {c: [] for c in configs}
    fit_calls = {c: [] for c in configs}
    cpu = {c: [] for c in configs}
    for r in range(rounds):
        order = configs[r % len(configs):] + configs[: r % len(configs)]
        for config in order:
            elapsed, whole, cpu_time = run_block(models[config], dataset, steps)
            blocks[config].append(elapsed)
            fit_calls[config].append(whole)
            cpu[config].append(cpu_time)
        log(
            f"  round {r + 1}/{rounds}: "
            + ", ".join(f"{c} {1000 * blocks[c][-1] / steps:.1f}" for c in configs)
            + " ms/step"
        )
    result = {"batch": batch, "params": n_params, "rounds": rounds, "steps": steps,
              "jit_compile": bool(models[configs[0]].jit_compile), "configs": {}}
    plain_median = statistics.median(blocks["plain"]) / steps
    for config in configs:
        step_times = [b / steps for b in blocks[config]]
        ratios = [b / p for b, p in zip(blocks[config], blocks["plain"])]
        median = statistics.median(step_times)
        ops, op_types = graph_op_count(models[config], dataset)
        result["configs"][config] = {
            "step_ms": [1000 * t for t in step_times],
            "fit_call_ms": [1000 * t for t in fit_calls[config]],
            "cpu_ms_per_step": [1000 * t / steps for t in cpu[config]],
            "cpu_ratio": statistics.median(cpu[config]) / statistics.median(cpu["plain"]),
            "median_step_ms": 1000 * median,
            "time_ratio": median / plain_median,
            "round_ratio_q25": _quantile(ratios, 0.25),
            "round_ratio_median": statistics.median(ratios),
            "round_ratio_q75": _quantile(ratios, 0.75),
            "graph_ops": ops,
            "graph_op_types": op_types,
        }
    plain_types = result["configs"]["plain"]["graph_op_types"]
    for config in configs:
        types = result["configs"][config]["graph_op_types"]
        result["configs"][config]["extra_op_types"] = {
            k: types.get(k, 0) - plain_types.get(k, 0)
            for k in sorted(set(types) | set(plain_types))
            if types.get(k, 0) != plain_types.get(k, 0)
        }
    return result


# ---------------------------------------------------------------------------
# Memory: one subprocess per configuration
# ---------------------------------------------------------------------------


def _status_kib(field):
    """A ``/proc/self/status`` field in KiB (Linux), or None."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss():
    """Resets the kernel's peak-RSS mark (VmHWM); False where not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_child(config, model_name, batch, steps, quick):
    """Runs in its own process: peak memory of building and training."""
    keras, _, tf, _ = _imports()
    keras.utils.set_random_seed(SEED)
    dataset = make_dataset(batch)
    next(iter(dataset))
    # The runtime is imported and the data exists: start the peak marks here.
    rss_start = _status_kib("VmRSS")
    reset = _reset_peak_rss()
    try:
        tf.config.experimental.reset_memory_stats("CPU:0")
    except (ValueError, RuntimeError):
        pass
    model = make_config(config, model_name, quick)
    run_block(model, dataset, 1)  # trace + first step
    run_block(model, dataset, steps)
    hwm = _status_kib("VmHWM") if reset else None
    info = {
        "config": config,
        "model": model_name,
        "batch": batch,
        "rss_start_kib": rss_start,
        # Peak RSS since the reset (the whole process's RSS, runtime included);
        # where the mark cannot be reset, the lifetime peak from getrusage.
        "peak_rss_kib": hwm or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        "peak_rss_source": "VmHWM after clear_refs" if hwm else "ru_maxrss",
        "lifetime_peak_rss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }
    try:
        peak = tf.config.experimental.get_memory_info("CPU:0")["peak"]
        info["allocator_peak_bytes"] = int(peak) or None
    except (ValueError, RuntimeError):
        info["allocator_peak_bytes"] = None  # no allocator statistics here
    print("MEMORY-RESULT " + json.dumps(info), flush=True)


def run_memory_child(config, model_name, batch, steps, quick):
    cmd = [sys.executable, "-m", "benchmarks.overhead", "--memory-child", config,
           model_name, "--batch", str(batch), "--steps", str(steps)]
    if quick:
        cmd.append("--quick")
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=ROOT)


def _child_result(proc, what):
    stdout, stderr = proc.communicate()
    for line in stdout.splitlines():
        if line.startswith("MEMORY-RESULT "):
            return json.loads(line[len("MEMORY-RESULT "):])
    raise RuntimeError(f"memory child {what} failed (exit {proc.returncode}):\n"
                       + stderr[-3000:])


def memory_model(model_name, configs, batch, steps, repeats, jobs, quick, log):
    """Median over ``repeats`` subprocesses of each configuration.

    Up to ``jobs`` subprocesses run at once: each measures only its own
    memory, so concurrency costs wall time per child but not accuracy.
    """
    runs = {c: [] for c in configs}
    queue = [c for _ in range(repeats) for c in configs]  # alternating order
    while queue:
        batch_of = queue[:jobs]
        queue = queue[jobs:]
        procs = [(c, run_memory_child(c, model_name, batch, steps, quick)) for c in batch_of]
        for config, proc in procs:
            info = _child_result(proc, f"{config}/{model_name}")
            runs[config].append(info)
            alloc = info["allocator_peak_bytes"]
            log(f"  memory {model_name}/{config}: peak RSS "
                f"{info['peak_rss_kib'] / 1024:.0f} MiB (start "
                f"{info['rss_start_kib'] / 1024:.0f}), TF allocator peak "
                + (f"{alloc / 2**20:.0f} MiB" if alloc else "n/a"))

    def median(config, key):
        values = [r[key] for r in runs[config] if r.get(key)]
        return statistics.median(values) if values else None

    result = {}
    for config in configs:
        alloc = median(config, "allocator_peak_bytes")
        result[config] = {
            "runs": runs[config],
            "median_peak_rss_mib": median(config, "peak_rss_kib") / 1024,
            "median_rss_start_mib": median(config, "rss_start_kib") / 1024,
            "allocator_peak_mib": alloc / 2**20 if alloc else None,
        }
    plain = result["plain"]
    for config in configs:
        r = result[config]
        r["memory_ratio"] = r["median_peak_rss_mib"] / plain["median_peak_rss_mib"]
        # What building and training add on top of the runtime: a stricter view.
        r["added_rss_mib"] = r["median_peak_rss_mib"] - r["median_rss_start_mib"]
        plain_added = plain["median_peak_rss_mib"] - plain["median_rss_start_mib"]
        r["added_rss_ratio"] = r["added_rss_mib"] / plain_added if plain_added > 0 else None
        if r["allocator_peak_mib"] and plain["allocator_peak_mib"]:
            r["allocator_ratio"] = r["allocator_peak_mib"] / plain["allocator_peak_mib"]
    return result


# ---------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------


def markdown_table(results):
    lines = [
        "| model | batch | config | median step ms | time ratio (IQR) | CPU-time ratio "
        "| peak RSS MiB | memory ratio | TF allocator peak MiB (ratio) |",
        "|---|---:|---|---:|---|---:|---:|---:|---|",
    ]
    for model_name, res in results["models"].items():
        timing = res.get("time", {}).get("configs", {})
        memory = res.get("memory", {})
        for config in res["configs"]:
            t, m = timing.get(config), memory.get(config)
            cells = ["—"] * 6
            if t:
                cells[0] = f"{t['median_step_ms']:.1f}"
                cells[1] = (f"{t['time_ratio']:.3f} ({t['round_ratio_q25']:.3f}–"
                            f"{t['round_ratio_q75']:.3f})")
                if "cpu_ratio" in t:
                    cells[2] = f"{t['cpu_ratio']:.3f}"
            if m:
                cells[3] = f"{m['median_peak_rss_mib']:.0f}"
                cells[4] = f"{m['memory_ratio']:.3f}"
                if m.get("allocator_peak_mib"):
                    cells[5] = f"{m['allocator_peak_mib']:.1f}"
                    if m.get("allocator_ratio"):
                        cells[5] += f" ({m['allocator_ratio']:.3f})"
            lines.append(f"| {model_name} | {res['batch']} | {config} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _uptime():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="smoke run: tiny models and batches, 3 rounds of 2 steps")
    p.add_argument("--models", default=None,
                   help=f"comma-separated, from {MODELS} (default: all; --quick: cnn)")
    p.add_argument("--configs", default=None,
                   help=f"comma-separated, from {CONFIGS}; 'plain' is always added "
                   f"(default: cnn all, resnet18 plain,sample,device; --quick: "
                   f"{','.join(QUICK_CONFIGS)})")
    p.add_argument("--batch", type=int, default=None,
                   help=f"batch size for every model (default {DEFAULT_BATCH})")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"timing rounds (default {DEFAULT_ROUNDS}; --quick 3)")
    p.add_argument("--steps", type=int, default=None,
                   help=f"steps per timed block (default {DEFAULT_STEPS}; --quick 2)")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="warm-up steps (trace included), default 2; --quick 1")
    p.add_argument("--memory-steps", type=int, default=None,
                   help="steps after the first in a memory subprocess (default 2)")
    p.add_argument("--memory-repeats", type=int, default=None,
                   help=f"subprocesses per configuration, median taken "
                   f"(default {DEFAULT_REPEATS}; --quick 1)")
    p.add_argument("--memory-jobs", type=int, default=None,
                   help="memory subprocesses run at once (default 2; --quick: all)")
    p.add_argument("--no-time", action="store_true", help="memory only")
    p.add_argument("--no-memory", action="store_true", help="time only")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results path")
    p.add_argument("--table-from", nargs="+", metavar="JSON",
                   help="print one table from earlier results files and exit")
    p.add_argument("--memory-child", nargs=2, metavar=("CONFIG", "MODEL"),
                   help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    warnings.filterwarnings("ignore", message=DEVICE_WARNING)
    if args.table_from:
        merged = {"models": {}}
        for path in args.table_from:
            merged["models"].update(json.loads(Path(path).read_text())["models"])
        print(markdown_table(merged))
        return 0
    keras, _, tf, gm = _imports()
    if args.memory_child:
        config, model_name = args.memory_child
        memory_child(config, model_name, args.batch, args.steps or 2, args.quick)
        return 0

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    q = args.quick
    models = args.models.split(",") if args.models else (["cnn"] if q else list(MODELS))
    models = [m for m in models if m]
    for m in models:
        if m not in MODELS:
            raise SystemExit(f"unknown model {m!r}; expected from {MODELS}")
    chosen = [c for c in args.configs.split(",") if c] if args.configs else None
    for c in chosen or ():
        if c not in CONFIGS:
            raise SystemExit(f"unknown configuration {c!r}; expected from {CONFIGS}")
    warmup = args.warmup_steps or (1 if q else 2)
    mem_steps = args.memory_steps or 2
    tf.get_logger().setLevel("ERROR")  # retracing notes: one trace per model

    results = {
        "command": " ".join([Path(sys.executable).name] + sys.argv),
        "quick": q,
        "python": platform.python_version(),
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "tf_gradmix": gm.__version__,
        "cpu_count": os.cpu_count(),
        "uptime_before": _uptime(),
        "stddev": STDDEV,
        "models": {},
    }
    log(f"load before: {results['uptime_before']}")
    started = time.perf_counter()
    for model_name in models:
        batch = args.batch or (QUICK_BATCH if q else DEFAULT_BATCH)[model_name]
        steps = args.steps or (2 if q else DEFAULT_STEPS[model_name])
        rounds = args.rounds or (3 if q else DEFAULT_ROUNDS[model_name])
        repeats = args.memory_repeats or (1 if q else DEFAULT_REPEATS[model_name])
        configs = chosen or list(QUICK_CONFIGS if q else DEFAULT_CONFIGS[model_name])
        configs = ["plain"] + [c for c in configs if c != "plain"]
        jobs = args.memory_jobs or (len(configs) if q else 2)
        res = {"batch": batch, "configs": configs}
        if not args.no_time:
            log(f"time {model_name} (batch {batch}, {rounds} rounds x {steps} steps)")
            res["time"] = time_model(model_name, configs, batch, rounds, steps, warmup, q, log)
        if not args.no_memory:
            log(f"memory {model_name} (batch {batch}, {repeats} repeat(s))")
            res["memory"] = memory_model(model_name, configs, batch, mem_steps, repeats,
                                         jobs, q, log)
        results["models"][model_name] = res
    results["uptime_after"] = _uptime()
    results["wall_seconds"] = time.perf_counter() - started
    results["table"] = markdown_table(results)
    log(f"load after: {results['uptime_after']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(results["table"])
    print(f"\n{results['wall_seconds']:.0f}s; load before: {results['uptime_before']}; "
          f"after: {results['uptime_after']}; JSON: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
