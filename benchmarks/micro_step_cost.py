"""What one accumulation micro-step costs, in one process, piece by piece.

The model of ``benchmarks/accumulation_comm.py`` (the 784-2048-1536-10 MLP,
4.7M parameters), one process, no ``tf.distribute`` strategy, one intra-op
thread (as each worker there). Two parts:

**Steps** (real ``fit`` blocks on a repeated in-memory batch, timed from
``on_epoch_begin`` to ``on_epoch_end``, rounds in a rotating order, medians
over rounds). Configurations, all from the same initial weights, plain
``SGD(0.01)``:

* ``plain b=8``: stock ``keras.Sequential``, micro-batch ``--micro-batch``
  (8), no accumulation; ``control``: a second identical model (A/A test);
* ``plain b=64``: the same at the logical batch of ``k=8`` (``k`` times the
  micro-batch) at once, and at the other batch sizes of ``--batches``
  (8 to 256): time per example against the batch;
* ``keras k=8``: stock Keras with ``gradient_accumulation_steps=8`` on the
  ``SGD``, micro-batch 8;
* ``gradmix b=8``, ``gradmix k=8``: ``tf_gradmix.Sequential`` with
  sample-level ``GradientMix(SGD, stddev=1)``, without and with
  ``gradient_accumulation_steps=8`` on the inner ``SGD`` (one device: on
  TensorFlow Keras's own accumulation inside the inner optimizer, on JAX
  ``tf_gradmix.backend.jax.optimizer``).

For each, ``ms / step`` (block time over its ``fit`` steps) and, for the
accumulating ones, ``ms per extra micro-step`` =
``(t_update - t_1) / (k - 1)``, with ``t_update`` the time of ``k`` steps and
``t_1`` the time of one step of the configuration without accumulation
(``plain b=8`` for ``keras k=8``, ``gradmix b=8`` for ``gradmix k=8``): the
formula ``accumulation_comm`` uses.

**Ops** (each a ``tf.function``, medians over ``--op-repeats`` calls): the
three products of one ``Dense(1536)`` layer on 2048 inputs, at batch 8 and 64:
the forward ``x @ W``, the input gradient ``dy @ Wᵀ`` (what TensorFlow's
``MatMul`` gradient runs: ``matmul(dy, W, transpose_b=True)``) and the
weight gradient ``xᵀ @ dy``; the same input gradient computed as
``(W @ dyᵀ)ᵀ`` (the same numbers, another kernel path); and one in-place
``assign_add`` into an accumulator of every parameter (what a micro-step adds
to a plain step).

**Optimizers** (``--optimizers sgd,adam,lamb``, instead of the two parts
above): a micro-step of ``gradmix k=8`` against a whole step of ``gradmix
b=8`` (sample-level ``GradientMix``, ``stddev=1``, micro-batch 8), for each
inner optimizer (``SGD(0.01, momentum=0.9)``, ``Adam(1e-3)``,
``Lamb(1e-3)``), each configuration in its own process (in one process the
order in which models are built moved step times by up to 1.7x), with an A/A
``control`` (a second process of ``gradmix b=8``) and, with ``--stock``,
stock Keras's own accumulation (``keras k=8``, ``keras.Sequential``) and,
with ``--one-step`` (JAX), GradientMix's accumulation in one compiled step
with the update in a ``lax.cond`` (what a custom loop gets). The
processes of one optimizer start together, build, compile and warm up; then
in every round each in a rotating order, one at a time, times a ``fit``
block of ``k - 1`` steps (for ``k=8`` the ``k - 1`` micro-steps of one
window) and runs one untimed step (the window's update, and a plain step for
the others, so every configuration runs the same blocks). Reported: the
median ms per step of the timed blocks and the median over rounds of each
round's ratio to ``gradmix b=8``, with its IQR. One thread (``--threads``).

Set ``TF_ENABLE_ONEDNN_OPTS=1`` in the environment to time the oneDNN kernels
(recorded in the JSON). With ``KERAS_BACKEND=jax`` the steps run on Keras's
JAX backend (one device; ``XLA_FLAGS`` limits XLA CPU to one thread unless set)
and the ops are ``jax.jit`` products. The load average (``os.getloadavg()``) is recorded
before, at every round and after. Timings are never asserted anywhere: this
script only reports.

Usage::

    python -m benchmarks.micro_step_cost                      # a minute or two on 2 cores
    TF_ENABLE_ONEDNN_OPTS=1 python -m benchmarks.micro_step_cost --out runs/benchmarks/micro_step_cost_onednn.json
    KERAS_BACKEND=jax python -m benchmarks.micro_step_cost --out runs/benchmarks/micro_step_cost_jax.json
    python -m benchmarks.micro_step_cost --table-from runs/benchmarks/micro_step_cost.json
    KERAS_BACKEND=jax python -m benchmarks.micro_step_cost --optimizers sgd,adam,lamb \
        --out runs/benchmarks/micro_step_optimizers_jax.json
"""

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "runs" / "benchmarks" / "micro_step_cost.json"
LAYERS = (784, 2048, 1536, 10)
#: The layer whose products the op part times: ``Dense(1536)`` on 2048 inputs.
OP_LAYER = (2048, 1536)


def step_configurations(micro_batch, k, batches=()):
    """``(name, batch, accumulation steps or None, gradmix, baseline name)``."""
    plain = sorted({micro_batch * k, *batches} - {micro_batch})
    return [
        (f"plain b={micro_batch}", micro_batch, None, False, None),
        ("control", micro_batch, None, False, None),
        *[(f"plain b={b}", b, None, False, None) for b in plain],
        (f"keras k={k}", micro_batch, k, False, f"plain b={micro_batch}"),
        (f"gradmix b={micro_batch}", micro_batch, None, True, None),
        (f"gradmix k={k}", micro_batch, k, True, f"gradmix b={micro_batch}"),
    ]


def time_steps(args, log):
    import keras
    import numpy as np
    import tensorflow as tf

    import tf_gradmix as gm

    k = args.k
    configs = step_configurations(args.micro_batch, k, args.batches)
    rng = np.random.default_rng(0)
    largest = max(c[1] for c in configs)
    x = rng.normal(size=(largest, LAYERS[0])).astype("float32")
    y = rng.integers(0, LAYERS[-1], size=largest)

    def mlp(model_class):
        layers = [keras.Input((LAYERS[0],))]
        layers += [keras.layers.Dense(n, activation="relu") for n in LAYERS[1:-1]]
        layers += [keras.layers.Dense(LAYERS[-1])]
        return model_class(layers)

    models, datasets, init = {}, {}, None
    for name, batch, steps, gradmix, _ in configs:
        keras.utils.set_random_seed(0)
        model = mlp(gm.Sequential if gradmix else keras.Sequential)
        if init is None:
            init = model.get_weights()
        model.set_weights(init)
        sgd = keras.optimizers.SGD(0.01, gradient_accumulation_steps=steps)
        optimizer = gm.GradientMix(sgd, level="sample", stddev=1.0, seed=0) if gradmix else sgd
        model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        models[name] = model
        datasets[name] = tf.data.Dataset.from_tensors((x[:batch], y[:batch])).repeat()

    class BlockTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    def block(name, updates):
        steps = next(c[2] for c in configs if c[0] == name) or 1
        timer = BlockTimer()
        models[name].fit(
            datasets[name], epochs=1, steps_per_epoch=updates * steps, verbose=0,
            callbacks=[timer],
        )
        return timer.seconds / (updates * steps)

    names = [c[0] for c in configs]
    for name in names:
        block(name, 1)
    per_step = {name: [] for name in names}
    load_per_round = []
    for r in range(args.rounds):
        load_per_round.append(os.getloadavg())
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            per_step[name].append(block(name, args.updates))
        log(f"round {r} " + str({n: round(1000 * per_step[n][-1], 1) for n in names}))
    rows = []
    base = names[0]
    for name, batch, steps, gradmix, baseline in configs:
        median = statistics.median(per_step[name])
        paired = [t / b for t, b in zip(per_step[name], per_step[base])]
        q = statistics.quantiles(paired, n=4) if len(paired) >= 2 else [float("nan")] * 3
        row = {
            "config": name, "batch": batch, "accumulation_steps": steps,
            "gradmix": gradmix, "median_ms_per_step": 1000 * median,
            "ratio_to_plain": median / statistics.median(per_step[base]),
            "ratio_to_plain_iqr": [q[0], q[2]],
            "ms_per_extra_micro_step": None,
            "ms_per_example": 1000 * median / batch,
        }
        if steps:
            t_update = steps * median
            t_1 = statistics.median(per_step[baseline])
            row["ms_per_update"] = 1000 * t_update
            row["ms_per_extra_micro_step"] = 1000 * (t_update - t_1) / (steps - 1)
        rows.append(row)
    return {"rows": rows, "per_step_seconds": per_step, "load_per_round": load_per_round,
            "parameters": int(sum(np.prod(w.shape) for w in init))}


def time_ops(args):
    import numpy as np
    import tensorflow as tf

    n_in, n_out = OP_LAYER
    rng = np.random.default_rng(0)
    w = tf.Variable(rng.normal(size=(n_in, n_out)).astype("float32"))

    def median_ms(fn):
        fn()
        times = []
        for _ in range(args.op_repeats):
            start = time.perf_counter()
            fn().numpy()
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    rows = []
    for batch in (args.micro_batch, args.micro_batch * args.k):
        x = tf.constant(rng.normal(size=(batch, n_in)).astype("float32"))
        dy = tf.constant(rng.normal(size=(batch, n_out)).astype("float32"))
        ops = {
            "forward x @ W": lambda: tf.matmul(x, w),
            "input gradient dy @ Wᵀ (TensorFlow's MatMul gradient)": (
                lambda: tf.matmul(dy, w, transpose_b=True)
            ),
            "the same as (W @ dyᵀ)ᵀ": (
                lambda: tf.transpose(tf.matmul(w, dy, transpose_b=True))
            ),
            "weight gradient xᵀ @ dy": lambda: tf.matmul(x, dy, transpose_a=True),
        }
        for name, op in ops.items():
            rows.append({"op": name, "batch": batch, "median_ms": median_ms(tf.function(op))})
    shapes = [(a, b) for a, b in zip(LAYERS[:-1], LAYERS[1:])]
    shapes = [s for pair in shapes for s in (pair, (pair[1],))]
    accumulators = [tf.Variable(tf.zeros(s)) for s in shapes]
    grads = [tf.constant(rng.normal(size=s).astype("float32")) for s in shapes]

    @tf.function
    def accumulate():
        for a, g in zip(accumulators, grads):
            a.assign_add(g, read_value=False)
        return tf.constant(0)

    parameters = int(sum(np.prod(s) for s in shapes))
    rows.append({"op": f"assign_add into accumulators of all {parameters:,} parameters",
                 "batch": None, "median_ms": median_ms(accumulate)})
    return rows


def time_ops_jax(args):
    """:func:`time_ops` on Keras's JAX backend: ``jax.jit`` products, XLA CPU."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    n_in, n_out = OP_LAYER
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(n_in, n_out)).astype("float32"))

    def median_ms(fn, *operands):
        fn = jax.jit(fn)
        jax.block_until_ready(fn(*operands))
        times = []
        for _ in range(args.op_repeats):
            start = time.perf_counter()
            jax.block_until_ready(fn(*operands))
            times.append(time.perf_counter() - start)
        return 1000 * statistics.median(times)

    rows = []
    for batch in (args.micro_batch, args.micro_batch * args.k):
        x = jnp.asarray(rng.normal(size=(batch, n_in)).astype("float32"))
        dy = jnp.asarray(rng.normal(size=(batch, n_out)).astype("float32"))
        ops = {
            "forward x @ W": (lambda x, w: x @ w, x),
            "input gradient dy @ Wᵀ": (lambda dy, w: dy @ w.T, dy),
            "the same as (W @ dyᵀ)ᵀ": (lambda dy, w: (w @ dy.T).T, dy),
            "weight gradient xᵀ @ dy": (lambda x, dy: x.T @ dy, x),
        }
        for name, (op, first) in ops.items():
            second = dy if name.startswith("weight") else w
            rows.append({"op": name, "batch": batch, "median_ms": median_ms(op, first, second)})
    shapes = [(a, b) for a, b in zip(LAYERS[:-1], LAYERS[1:])]
    shapes = [s for pair in shapes for s in (pair, (pair[1],))]
    accumulators = [jnp.zeros(s) for s in shapes]
    grads = [jnp.asarray(rng.normal(size=s).astype("float32")) for s in shapes]
    parameters = int(sum(np.prod(s) for s in shapes))
    rows.append({"op": f"add into accumulators of all {parameters:,} parameters",
                 "batch": None,
                 "median_ms": median_ms(lambda a, g: [x + y for x, y in zip(a, g)],
                                        accumulators, grads)})
    return rows


OPTIMIZERS = {
    "sgd": lambda keras, steps: keras.optimizers.SGD(0.01, momentum=0.9, gradient_accumulation_steps=steps),
    "adam": lambda keras, steps: keras.optimizers.Adam(1e-3, gradient_accumulation_steps=steps),
    "lamb": lambda keras, steps: keras.optimizers.Lamb(1e-3, gradient_accumulation_steps=steps),
}


def optimizer_configurations(k, stock, one_step=False):
    """``(name, accumulation steps or None, gradmix)`` of each process of one optimizer."""
    configs = [("gradmix b=8", None, True), ("control", None, True), (f"gradmix k={k}", k, True)]
    if one_step:
        configs.append((f"gradmix k={k}, one step", k, True))
    if stock:
        configs.append((f"keras k={k}", k, False))
    return configs


def child(spec):
    """One configuration's process: builds, warms up, then times a block per ``run`` line on stdin."""
    threads = spec["threads"]
    if os.environ.get("KERAS_BACKEND") == "tensorflow":
        import tensorflow as tf

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras
    import numpy as np

    import tf_gradmix as gm

    if spec.get("one_step"):
        # What a custom loop gets on JAX: one compiled step, the update in a lax.cond.
        from tf_gradmix.backend.jax import optimizer as jax_optimizer

        jax_optimizer.train_function = lambda model: None
    k, batch = spec["k"], spec["micro_batch"]
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, LAYERS[0])).astype("float32")
    y = rng.integers(0, LAYERS[-1], size=batch)
    keras.utils.set_random_seed(0)
    model_class = gm.Sequential if spec["gradmix"] else keras.Sequential
    layers = [keras.Input((LAYERS[0],))]
    layers += [keras.layers.Dense(n, activation="relu") for n in LAYERS[1:-1]]
    model = model_class(layers + [keras.layers.Dense(LAYERS[-1])])
    inner = OPTIMIZERS[spec["optimizer"]](keras, spec["steps"])
    optimizer = gm.GradientMix(inner, level="sample", stddev=1.0, seed=0) if spec["gradmix"] else inner
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    timed = (np.tile(x, (k - 1, 1)), np.tile(y, k - 1))

    class BlockTimer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.seconds = time.perf_counter() - self.start

    def window():
        timer = BlockTimer()
        model.fit(*timed, batch_size=batch, epochs=1, shuffle=False, verbose=0, callbacks=[timer])
        model.fit(x, y, batch_size=batch, epochs=1, verbose=0)  # the update of a window
        return timer.seconds / (k - 1)

    for _ in range(2):
        window()
    print("ready", flush=True)
    for line in sys.stdin:
        if not line.strip():
            break
        times = [window() for _ in range(int(line))]
        print(json.dumps({"ms_per_step": [1000 * t for t in times]}), flush=True)


def time_optimizers(args, log):
    """Each configuration of each optimizer in its own process, alternating (see module docstring)."""
    results = {}
    for optimizer in args.optimizers:
        configs = optimizer_configurations(args.k, args.stock, args.one_step)
        processes = {}
        for name, steps, gradmix in configs:
            spec = {"optimizer": optimizer, "steps": steps, "gradmix": gradmix, "k": args.k,
                    "micro_batch": args.micro_batch, "threads": args.threads,
                    "one_step": name.endswith("one step")}
            processes[name] = subprocess.Popen(
                [sys.executable, "-m", "benchmarks.micro_step_cost", "--child", json.dumps(spec)],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
            )
        try:
            for name, process in processes.items():
                line = process.stdout.readline()
                if line.strip() != "ready":
                    raise RuntimeError(f"{optimizer} {name}: the process did not start ({line!r})")
            names = [c[0] for c in configs]
            per_round = {name: [] for name in names}
            loads = []
            for r in range(args.rounds):
                loads.append(os.getloadavg())
                for name in names[r % len(names):] + names[: r % len(names)]:
                    processes[name].stdin.write(f"{args.updates}\n")
                    processes[name].stdin.flush()
                    times = json.loads(processes[name].stdout.readline())["ms_per_step"]
                    per_round[name].append(statistics.median(times))
                log(f"{optimizer} round {r} " + str({n: round(per_round[n][-1], 1) for n in names}))
        finally:
            for process in processes.values():
                if process.poll() is None:
                    process.stdin.close()
            for process in processes.values():
                process.wait(timeout=120)
        base = per_round[names[0]]
        rows = []
        for name, steps, gradmix in configs:
            ratios = [t / b for t, b in zip(per_round[name], base)]
            q = statistics.quantiles(ratios, n=4) if len(ratios) >= 2 else [ratios[0]] * 3
            rows.append({"config": name, "accumulation_steps": steps, "gradmix": gradmix,
                         "median_ms_per_step": statistics.median(per_round[name]),
                         "median_ratio": statistics.median(ratios), "ratio_iqr": [q[0], q[2]]})
        results[optimizer] = {"rows": rows, "per_round_ms": per_round, "load_per_round": loads}
    return results


def print_optimizer_tables(result):
    backend = result["machine"].get("keras_backend")
    print(f"| optimizer ({backend}) | configuration | ms / step | ratio to gradmix b=8 (IQR) |")
    print("|---|---|---:|---|")
    for optimizer, part in result["optimizers"].items():
        for row in part["rows"]:
            lo, hi = row["ratio_iqr"]
            print(f"| {optimizer} | {row['config']} | {row['median_ms_per_step']:.1f} "
                  f"| {row['median_ratio']:.2f} ({lo:.2f}–{hi:.2f}) |")
    m = result["machine"]
    loads = [load[0] for part in result["optimizers"].values() for load in part["load_per_round"]]
    print(f"\nload average (1 min): before {m['load_before'][0]:.2f}, rounds {min(loads):.2f}–{max(loads):.2f}, "
          f"after {m['load_after'][0]:.2f}; Keras backend {backend}")


def print_tables(result):
    k = result["args"]["k"]
    print("| configuration | batch | ms / step | ms / example | ratio to the plain step (IQR) "
          f"| ms / update (k={k}) | ms per extra micro-step |")
    print("|---|---:|---:|---:|---|---:|---:|")
    for row in result["steps"]["rows"]:
        iqr = row["ratio_to_plain_iqr"]
        extra = row["ms_per_extra_micro_step"]
        update = row.get("ms_per_update")
        per_example = row["median_ms_per_step"] / row["batch"]
        print(f"| {row['config']} | {row['batch']} | {row['median_ms_per_step']:.1f} "
              f"| {per_example:.2f} | {row['ratio_to_plain']:.2f} ({iqr[0]:.2f}–{iqr[1]:.2f}) "
              f"| {'—' if update is None else f'{update:.0f}'} "
              f"| {'—' if extra is None else f'{extra:.1f}'} |")
    backend = result["machine"].get("keras_backend", "tensorflow")
    print(f"\n| op ({backend}, one thread; Dense {OP_LAYER[0]}→{OP_LAYER[1]}) | batch | median ms |")
    print("|---|---:|---:|")
    for row in result["ops"]:
        print(f"| {row['op']} | {row['batch'] or '—'} | {row['median_ms']:.2f} |")
    m = result["machine"]
    load = ", ".join(f"{x:.2f}" for x in m["load_before"])
    after = ", ".join(f"{x:.2f}" for x in m["load_after"])
    print(f"\nload average (1, 5, 15 min): before {load}, after {after}; "
          f"Keras backend {m.get('keras_backend', 'tensorflow')}; "
          f"TF_ENABLE_ONEDNN_OPTS={m['onednn']}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--micro-batch", type=int, default=8)
    parser.add_argument("--k", type=int, default=8, help="accumulation steps")
    parser.add_argument(
        "--batches", default="8,16,32,64,128,256",
        help="batch sizes of the plain steps (time per example against the batch)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--updates", type=int, default=2, help="updates per timed block")
    parser.add_argument("--op-repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=1, help="TF intra-op threads")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--table-from", type=Path, help="re-print the tables of a saved run")
    parser.add_argument("--optimizers", help="comma-separated of sgd, adam, lamb: the per-optimizer comparison")
    parser.add_argument("--stock", action="store_true", help="with --optimizers: also stock Keras k=8")
    parser.add_argument("--one-step", action="store_true",
                        help="with --optimizers on JAX: also GradientMix k=8 in one compiled step (lax.cond)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        _set_threads(args.threads)
        child(json.loads(args.child))
        return None
    if args.table_from:
        result = json.loads(args.table_from.read_text())
        (print_optimizer_tables if "optimizers" in result else print_tables)(result)
        return None
    if args.optimizers is not None:
        args.optimizers = args.optimizers.split(",")
        unknown = [o for o in args.optimizers if o not in OPTIMIZERS]
        if unknown:
            parser.error(f"Invalid value for --optimizers: {unknown}; expected some of {sorted(OPTIMIZERS)}.")
    try:
        batches = tuple(int(b) for b in args.batches.split(","))
    except ValueError:
        batches = (0,)
    if any(b < 1 for b in batches):
        parser.error(
            f"Invalid value for --batches: {args.batches!r}; expected positive "
            "integers separated by commas."
        )
    args.batches = batches
    for name in ("micro_batch", "k", "rounds", "updates", "op_repeats", "threads"):
        if getattr(args, name) < (2 if name == "k" else 1):
            parser.error(f"Invalid value for --{name.replace('_', '-')}: {getattr(args, name)}")
    backend = _set_threads(args.threads)
    load_before = os.getloadavg()
    started = time.time()
    if args.optimizers is not None:
        import keras

        result = {
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "load_before": load_before,
                        "keras_backend": backend, "xla_flags": os.environ.get("XLA_FLAGS")},
            "versions": {"keras": keras.__version__, "python": platform.python_version()},
            "optimizers": time_optimizers(args, lambda line: print(line, flush=True)),
        }
        result["machine"]["load_after"] = os.getloadavg()
        result["wall_seconds"] = time.time() - started
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(result, indent=1))
        print_optimizer_tables(result)
        print(f"\nwall {result['wall_seconds']:.0f} s; written to {args.out}")
        return result
    import keras
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(args.threads)
    ops = time_ops_jax(args) if backend == "jax" else time_ops(args)
    steps = time_steps(args, lambda line: print(line, flush=True))
    result = {
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                    "load_before": load_before, "load_after": os.getloadavg(),
                    "onednn": os.environ.get("TF_ENABLE_ONEDNN_OPTS", "default"),
                    "keras_backend": backend, "xla_flags": os.environ.get("XLA_FLAGS")},
        "versions": {"tensorflow": tf.__version__, "keras": keras.__version__,
                     "python": platform.python_version()},
        "wall_seconds": time.time() - started,
        "steps": steps,
        "ops": ops,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1))
    print_tables(result)
    print(f"\nwall {result['wall_seconds']:.0f} s; written to {args.out}")
    return result


def _set_threads(threads):
    """The Keras backend; XLA CPU limited to ``threads`` unless ``XLA_FLAGS`` is set (before jax loads)."""
    backend = os.environ.setdefault("KERAS_BACKEND", "tensorflow")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if backend == "jax" and "XLA_FLAGS" not in os.environ:
        os.environ["XLA_FLAGS"] = (
            "--xla_cpu_multi_thread_eigen=false "
            f"intra_op_parallelism_threads={threads}"
        )
    return backend


if __name__ == "__main__":
    main()
