"""Time per update of gradient accumulation across two workers.

Two ``MultiWorkerMirroredStrategy`` worker processes on 127.0.0.1 (one CPU
replica each) train the same 4.7M-parameter MLP (784-2048-1536-10) with
sample-level ``GradientMix`` over ``SGD``. Configurations, all from the same
initial weights:

* ``k=1``: micro-batch ``--micro-batch`` (8) per worker, no accumulation: one
  update per micro-batch;
* ``k=8``, ``k=32``: the same micro-batch with ``gradient_accumulation_steps=k``
  on the inner ``SGD``: one update per ``k`` micro-batches;
* ``whole k``: the logical batch of ``k=8`` / ``k=32`` (``k`` micro-batches per
  worker) fed at once, no accumulation: the anchor, one all-reduce of the
  gradients per update, the least communication an update can have (the same
  sample-level GradientMix, so only the accumulation differs);
* ``local b=8``, ``local k=8`` (the reference): stock ``keras.Sequential`` +
  ``SGD`` built outside the strategy's scope, so without any strategy, in each
  worker process, at the micro-batch, without and with Keras's own
  ``gradient_accumulation_steps`` (the smallest ``k > 1`` of ``--ks``); timed
  in the same rounds as the rest, so both workers run it at the same time and
  it shares their machine load. Its ``ms per extra micro-step`` is what a
  micro-step costs stock Keras on one device under the same conditions.

What is measured is the time per *update*: ``k`` micro-steps and their one
update for ``k > 1``. With accumulation every worker adds its micro-batch
gradients to its own accumulators and the gradients cross the network once
per update (an earlier implementation all-reduced every micro-batch, ``k + 1``
all-reduces an update; ``docs/performance.md`` compares the two).
``ms_per_extra_micro_step`` is ``(t_k - t_1) / (k - 1)``: what one
micro-step without update costs (its forward and backward pass, the local
add, and ``fit``'s per-step work, which includes reducing the step's logs
across the workers).

**Time**: both workers build every configuration, warm each up (trace plus
``--warmup-updates`` updates), then run ``--rounds`` rounds; a round runs one
block of ``--updates`` updates of every configuration, in an order that rotates
from round to round (the same order on both workers: their collectives must
match). A block is one real ``fit(..., steps_per_epoch=updates * k,
verbose=0)`` on a repeated in-memory batch, timed with ``time.perf_counter``
from ``on_epoch_begin`` to ``on_epoch_end``. Reported (worker 0; worker 1 is
in the JSON): the median time per update over the rounds, the ratios of
medians to ``k=1`` and to the anchor of the same logical batch, and the
interquartile range of the per-round ratios (each block over the same
round's ``k=1`` block: pairs configurations under the same machine load).
One run of this script gives every number of the table.

The load average (``os.getloadavg()``) is recorded before the run, at every
round and after it (``machine`` and ``workers[i].load_per_round`` in the
JSON). Ratios measured on a loaded machine are not comparable with ratios
from an idle one: the two workers synchronise at every step (the logs), so
whichever is slowed down holds the other back, and per-step costs grow with
the load.

``--layers`` sets the MLP's widths (e.g. ``784,8,8,10``, the tiny model whose
micro-step is almost only ``fit``'s per-step work).

``--onednn on|off`` sets ``TF_ENABLE_ONEDNN_OPTS`` for the workers (default:
TensorFlow's own choice, which is off on CPUs without AVX-512). On such CPUs
TensorFlow's default (Eigen) kernel for the backward pass's ``dy @ W^T``
costs about as much for a micro-batch of 8 as for 64: the micro-steps, not
the accumulation, pay for it.

``--profile DIR``: after the rounds, each worker runs one more window of the
smallest ``k > 1`` under the TensorFlow profiler (``tf.profiler.experimental``,
traces in ``DIR/worker{i}``), timing only its ``k - 1`` micro-steps (the
window's update runs untimed and unprofiled after them), and reports per
micro-step: the wall time, the profiler's self time of every TensorFlow op
type (``framework_op_stats``, summed over all threads, so the input
pipeline's ops, which run beside the step, overlap the step's own) and the
part of them that are collectives (the cross-worker reduction of ``fit``'s
logs; a micro-step holds no other). Reported under ``profile`` in the JSON
and printed.

Timings are never asserted anywhere: this script only reports.

Usage::

    python -m benchmarks.accumulation_comm --ks 1,8,32      # a few minutes on 2 cores
    python -m benchmarks.accumulation_comm --rounds 3 --updates 2
    python -m benchmarks.accumulation_comm --ks 1,8,32 --onednn on
    python -m benchmarks.accumulation_comm --ks 1,8 --layers 784,8,8,10
    python -m benchmarks.accumulation_comm --table-from runs/benchmarks/accumulation_comm.json
    python -m benchmarks.accumulation_comm --ks 1,8 --rounds 2 --updates 1 --profile runs/profile
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "accumulation_comm.json"
LAYERS = (784, 2048, 1536, 10)
WORKERS = 2


# -- parent ----------------------------------------------------------------


def run_workers(args):
    from tf_gradmix import distribute

    ports = distribute.free_local_ports(WORKERS)
    tmp = Path(tempfile.mkdtemp(prefix="accumulation_comm_"))
    processes = []
    for index in range(WORKERS):
        spec = dict(vars(args), ports=ports, index=index, result=str(tmp / f"worker{index}.json"))
        spec.pop("table_from", None)
        spec["out"] = str(spec["out"])
        spec["profile"] = str(Path(args.profile).resolve()) if args.profile else None
        spec_path = tmp / f"worker{index}.spec.json"
        spec_path.write_text(json.dumps(spec))
        log = open(tmp / f"worker{index}.log", "w")
        env = dict(os.environ, PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="2")
        env.pop("TF_CONFIG", None)
        if args.onednn != "default":
            env["TF_ENABLE_ONEDNN_OPTS"] = "1" if args.onednn == "on" else "0"
        processes.append(
            subprocess.Popen(
                [sys.executable, __file__, "--worker", str(spec_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env,
            )
        )
    deadline = time.monotonic() + args.timeout
    try:
        for p in processes:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
                p.wait()
    for index, p in enumerate(processes):
        if p.returncode != 0:
            log = (tmp / f"worker{index}.log").read_text()[-4000:]
            raise SystemExit(f"worker {index} failed (exit {p.returncode}):\n{log}")
    return [json.loads((tmp / f"worker{i}.json").read_text()) for i in range(WORKERS)]


def configurations(ks, micro_batch):
    """``(name, per-worker batch per micro-step, micro-steps per update)``."""
    configs = []
    for k in ks:
        configs.append((f"k={k}", micro_batch, k))
    for k in ks:
        if k > 1:
            configs.append((f"whole k={k}", micro_batch * k, 1))
    return configs


def local_configurations(ks, micro_batch):
    """The stock-Keras references each worker runs on its own, no strategy.

    ``(name, batch per step, gradient_accumulation_steps or 1)``: plain
    ``SGD`` at the micro-batch, and Keras's own accumulation over the
    smallest ``k > 1`` of ``ks``.
    """
    configs = [(f"local b={micro_batch}", micro_batch, 1)]
    accumulating = [k for k in ks if k > 1]
    if accumulating:
        configs.append((f"local k={accumulating[0]}", micro_batch, accumulating[0]))
    return configs


def summarize_local(worker_result, ks, micro_batch):
    """Rows of the stock-Keras references (see :func:`local_configurations`)."""
    per_update = worker_result["per_update_seconds"]
    configs = local_configurations(ks, micro_batch)
    base = statistics.median(per_update[configs[0][0]])
    rows = []
    for name, batch, steps in configs:
        median = statistics.median(per_update[name])
        rows.append(
            {
                "config": name,
                "batch": batch,
                "micro_steps_per_update": steps,
                "median_ms_per_update": 1000 * median,
                "ms_per_extra_micro_step": (
                    1000 * (median - base) / (steps - 1) if steps > 1 else None
                ),
            }
        )
    return rows


def summarize(worker_result, ks, micro_batch):
    per_update = worker_result["per_update_seconds"]  # name -> list over rounds
    median = {name: statistics.median(times) for name, times in per_update.items()}
    rows = []
    for name, batch, steps in configurations(ks, micro_batch):
        k = steps if not name.startswith("whole") else int(name.split("=")[1])
        base = "k=1" if "k=1" in per_update else None
        anchor = f"whole k={k}" if k > 1 else "k=1"
        paired = [t / b for t, b in zip(per_update[name], per_update[base])] if base else []
        q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [float("nan")] * 3
        rows.append(
            {
                "config": name,
                "per_worker_batch": batch,
                "micro_steps_per_update": steps,
                "logical_batch": batch * steps * WORKERS,
                "median_ms_per_update": 1000 * median[name],
                "ratio_to_k1": median[name] / median[base] if base else None,
                "ratio_to_k1_iqr": [q[0], q[2]],
                "ratio_to_whole_batch": median[name] / median[anchor],
                "ms_per_extra_micro_step": (
                    1000 * (median[name] - median[base]) / (steps - 1)
                    if base and steps > 1
                    else None
                ),
            }
        )
    return rows


def print_table(result):
    print(
        "| configuration | per-worker batch × micro-steps | logical batch (2 workers) "
        "| median ms / update | ratio to k=1 (IQR of per-round ratios) "
        "| ratio to the whole batch at once | ms per extra micro-step |"
    )
    print("|---|---:|---:|---:|---|---:|---:|")
    for row in result["rows"]:
        iqr = row["ratio_to_k1_iqr"]
        print(
            f"| {row['config']} | {row['per_worker_batch']} × {row['micro_steps_per_update']} "
            f"| {row['logical_batch']} | {row['median_ms_per_update']:.0f} "
            f"| {row['ratio_to_k1']:.2f} ({iqr[0]:.2f}–{iqr[1]:.2f}) "
            f"| {row['ratio_to_whole_batch']:.2f} "
            f"| {_format(row.get('ms_per_extra_micro_step'), '.1f')} |"
        )
    local = result.get("rows_local")
    if local:
        print(
            "\nReference: stock `keras.Sequential` + `SGD` in each worker process, no "
            "strategy, timed in the same rounds (worker 0):\n"
        )
        print("| configuration | batch × micro-steps | median ms / update | ms per extra micro-step |")
        print("|---|---:|---:|---:|")
        for row in local:
            print(
                f"| {row['config']} | {row['batch']} × {row['micro_steps_per_update']} "
                f"| {row['median_ms_per_update']:.0f} "
                f"| {_format(row.get('ms_per_extra_micro_step'), '.1f')} |"
            )
    machine = result.get("machine", {})
    workers = result.get("workers")
    if workers:
        layers = result["args"].get("layers", ",".join(map(str, LAYERS)))
        print(f"\nMLP {layers.replace(',', '-')}, {workers[0]['parameters']:,} parameters")
    if machine:
        print(
            f"\nload average (1, 5, 15 min): before {_format_load(machine.get('load_before'))}, "
            f"after {_format_load(machine.get('load_after'))}; "
            f"TF_ENABLE_ONEDNN_OPTS={machine.get('onednn', 'default')}"
        )


def _format(value, spec):
    return "—" if value is None else format(value, spec)


def _format_load(load):
    return "?" if not load else ", ".join(f"{x:.2f}" for x in load)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ks", default="1,8,32", help="accumulation steps (1 first)")
    parser.add_argument(
        "--micro-batch", type=int, default=8, help="examples per worker and micro-step"
    )
    parser.add_argument(
        "--layers", default=",".join(map(str, LAYERS)),
        help="MLP widths, input to classes (default: the 4.7M-parameter MLP)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=3, help="updates per timed block")
    parser.add_argument("--warmup-updates", type=int, default=1)
    parser.add_argument("--threads", type=int, default=1, help="TF intra-op threads per worker")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds for the whole run")
    parser.add_argument(
        "--onednn", choices=("default", "on", "off"), default="default",
        help="TF_ENABLE_ONEDNN_OPTS for the workers (default: TensorFlow's choice)",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table-from", type=Path, help="re-print the table of a saved run")
    parser.add_argument("--profile", type=Path,
                        help="profile one window of micro-steps of the smallest k > 1 on each worker into this folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(json.loads(Path(args.worker).read_text()))
    if args.table_from:
        print_table(json.loads(args.table_from.read_text()))
        return None
    ks = [int(k) for k in args.ks.split(",")]
    if ks[0] != 1 or any(k < 1 for k in ks):
        parser.error(f"Invalid value for --ks: {args.ks!r}; expected 1 first, then integers >= 2.")
    try:
        widths = [int(n) for n in args.layers.split(",")]
    except ValueError:
        widths = []
    if len(widths) < 2 or any(n < 1 for n in widths):
        parser.error(
            f"Invalid value for --layers: {args.layers!r}; expected at least two "
            "positive integers separated by commas."
        )
    started = time.time()
    workers = run_workers(args)
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_before": workers[0]["load_before"], "load_after": os.getloadavg(),
                    "load_per_round": workers[0]["load_per_round"],
                    "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default")
                    if args.onednn == "default" else args.onednn},
        "versions": workers[0]["versions"],
        "wall_seconds": time.time() - started,
        "rows": summarize(workers[0], ks, args.micro_batch),
        "rows_worker1": summarize(workers[1], ks, args.micro_batch),
        "rows_local": summarize_local(workers[0], ks, args.micro_batch),
        "rows_local_worker1": summarize_local(workers[1], ks, args.micro_batch),
        "workers": workers,
    }
    if args.profile:
        result["profile"] = [w.get("profile") for w in workers]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_table(result)
    if args.profile:
        print_profile(result["profile"])
    print(f"\nwall {result['wall_seconds']:.0f} s; written to {args.out}")
    return result


# -- worker ----------------------------------------------------------------


def worker(spec):
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in spec["ports"]]},
            "task": {"type": "worker", "index": spec["index"]},
        }
    )
    os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    load_before = os.getloadavg()
    import numpy as np
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(spec["threads"])
    tf.config.threading.set_inter_op_parallelism_threads(spec["threads"])
    import keras

    import tf_gradmix as gm

    strategy = gm.distribute.multi_worker_strategy()
    ks = [int(k) for k in spec["ks"].split(",")]
    configs = configurations(ks, spec["micro_batch"])
    rng = np.random.default_rng(0)
    largest = max(batch for _, batch, _ in configs)
    sizes = [int(n) for n in spec["layers"].split(",")]
    x = rng.normal(size=(largest, sizes[0])).astype("float32")
    y = rng.integers(0, sizes[-1], size=largest)

    def mlp(model_class=gm.Sequential):
        layers = [keras.Input((sizes[0],))]
        layers += [keras.layers.Dense(n, activation="relu") for n in sizes[1:-1]]
        layers += [keras.layers.Dense(sizes[-1])]
        return model_class(layers)

    models, datasets, init = {}, {}, None
    for name, batch, steps in configs:
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = mlp()
            if init is None:
                init = model.get_weights()
            model.set_weights(init)
            inner = keras.optimizers.SGD(
                0.01, gradient_accumulation_steps=steps if steps > 1 else None
            )
            model.compile(
                gm.GradientMix(inner, level="sample", stddev=1.0, seed=0),
                keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            )
        models[name] = model

        def dataset_fn(context, batch=batch):
            return tf.data.Dataset.from_tensors((x[:batch], y[:batch])).repeat()

        datasets[name] = gm.distribute.distribute_dataset(strategy, dataset_fn)
    local_configs = local_configurations(ks, spec["micro_batch"])
    for name, batch, steps in local_configs:  # outside the strategy's scope: no strategy
        model = mlp(keras.Sequential)
        model.set_weights(init)
        model.compile(
            keras.optimizers.SGD(0.01, gradient_accumulation_steps=steps if steps > 1 else None),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        models[name] = model
        datasets[name] = tf.data.Dataset.from_tensors((x[:batch], y[:batch])).repeat()
    parameters = int(sum(np.prod(w.shape) for w in init))

    class BlockTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    def block(name, updates):
        _, _, steps = next(c for c in configs + local_configs if c[0] == name)
        timer = BlockTimer()
        models[name].fit(
            datasets[name], epochs=1, steps_per_epoch=updates * steps, verbose=0,
            callbacks=[timer],
        )
        return timer.seconds / updates

    names = [c[0] for c in configs + local_configs]
    for name in names:
        print("warm-up", name, flush=True)
        block(name, spec["warmup_updates"])
    per_update = {name: [] for name in names}
    load_per_round = []
    for r in range(spec["rounds"]):
        load_per_round.append(os.getloadavg())
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            per_update[name].append(block(name, spec["updates"]))
        print("round", r, {n: round(1000 * per_update[n][-1]) for n in names}, flush=True)
    for name in (c[0] for c in configs):  # every configuration trained the same updates
        mixer = gm.optimizer.find_gradient_mix(models[name].optimizer)
        updates = spec["warmup_updates"] + spec["rounds"] * spec["updates"]
        assert int(mixer.iterations.numpy()) == updates, (name, int(mixer.iterations.numpy()))
    profile = None
    if spec.get("profile"):
        k = min(k for k in ks if k > 1)
        profile = profile_micro_steps(models[f"k={k}"], datasets[f"k={k}"], k,
                                      Path(spec["profile"]) / f"worker{spec['index']}", BlockTimer)
    result = {
        "profile": profile,
        "per_update_seconds": per_update,
        "parameters": parameters,
        "load_before": load_before,
        "load_per_round": load_per_round,
        "tf_gradmix_file": gm.__file__,
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
    }
    Path(spec["result"]).write_text(json.dumps(result))
    return None


def profile_micro_steps(model, dataset, k, logdir, timer_class):
    """The ``k - 1`` micro-steps of one window under the profiler: wall time and op self times, per micro-step."""
    import glob

    import tensorflow as tf
    from tensorflow.python.profiler.internal import _pywrap_profiler_plugin

    timer = timer_class()
    tf.profiler.experimental.start(str(logdir))
    try:
        model.fit(dataset, epochs=1, steps_per_epoch=k - 1, verbose=0, callbacks=[timer])
    finally:
        tf.profiler.experimental.stop()
    model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0)  # the window's update
    paths = sorted(glob.glob(str(logdir / "**" / "*.xplane.pb"), recursive=True))
    data, ok = _pywrap_profiler_plugin.xspace_to_tools_data(paths[-1:], "framework_op_stats", {})
    if not ok:
        raise RuntimeError(f"the profiler's op statistics of {paths[-1:]} could not be read: {data[:200]!r}")
    table = json.loads(data)[0]
    columns = [c["id"] for c in table["cols"]]
    by_type = {}
    for row in table["rows"]:
        values = dict(zip(columns, (cell.get("v") if cell else None for cell in row["c"])))
        op_type = values.get("type") or "?"
        by_type[op_type] = by_type.get(op_type, 0.0) + float(values.get("total_self_time") or 0.0)
    steps = k - 1
    idle_ms = by_type.pop("IDLE", 0.0) / 1000 / steps  # the profiler's time with no op running
    per_step_ms = {t: us / 1000 / steps for t, us in sorted(by_type.items(), key=lambda item: -item[1])}
    ops_ms = sum(per_step_ms.values())
    wall_ms = 1000 * timer.seconds / steps
    return {
        "micro_steps": steps,
        "wall_ms_per_micro_step": wall_ms,
        "op_self_ms_per_micro_step": ops_ms,
        "collective_ms_per_micro_step": sum(v for t, v in per_step_ms.items() if "Collective" in t),
        "profiler_idle_ms_per_micro_step": idle_ms,
        "op_types_ms_per_micro_step": per_step_ms,
        "trace": paths[-1] if paths else None,
    }


def print_profile(profiles):
    for index, profile in enumerate(profiles):
        if not profile:
            continue
        print(f"\nworker {index}: {profile['micro_steps']} profiled micro-steps, per micro-step: wall "
              f"{profile['wall_ms_per_micro_step']:.1f} ms; self time of TensorFlow ops, all threads "
              f"(overlapping): {profile['op_self_ms_per_micro_step']:.1f} ms, of which collectives "
              f"{profile['collective_ms_per_micro_step']:.1f} ms")
        for op_type, ms in list(profile["op_types_ms_per_micro_step"].items())[:12]:
            print(f"  {op_type:40s} {ms:8.2f} ms")


if __name__ == "__main__":
    main()
