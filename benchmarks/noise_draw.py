"""What drawing one step's mixing weights costs, on the backend of this process.

The weights come from ``tf_gradmix.random`` (Threefry-2x32, 20 rounds, in
integer ``keras.ops``). For each batch size of ``--batches`` and each noise,
one process times ``GradientMix.example_weights(B)``:

* **compiled**, as a train step runs it: on TensorFlow inside a
  ``tf.function`` (``graph``) and with ``jit_compile=True`` (``xla``); on
  JAX under ``jax.jit`` (``jit``); on PyTorch, whose Keras train step runs
  eagerly, only eagerly (drawn for 64 steps at once and cached: see the
  mean over at least 64 rounds, ``--eager-rounds 128``);
* **eager**, as a custom loop or a callback calls it;

next to the backend's own stateless generator drawing normal numbers of the
same shape the same way (``tf.random.stateless_normal`` after two
``stateless_fold_in``; ``jax.random.normal`` after two ``fold_in``: what
tf_gradmix 0.1 drew with), and, for scale, one plain Keras step
(``train_on_batch``) of a 784-128-10 MLP at the largest batch. Every round
calls every configuration once in a rotating order; reported: medians over
rounds in microseconds, and ratios of medians. The load average is recorded
before and after. Timings are never asserted anywhere: this script only
reports.

Usage::

    python -m benchmarks.noise_draw
    KERAS_BACKEND=jax python -m benchmarks.noise_draw
    KERAS_BACKEND=torch python -m benchmarks.noise_draw --eager-rounds 128
    python -m benchmarks.noise_draw --batches 256 32768 --rounds 31 --out runs/benchmarks/noise_draw.json
"""

import argparse
import json
import os
import platform
import statistics
import time

import keras
import numpy as np

import tf_gradmix as gm

BACKEND = keras.backend.backend()


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", type=int, nargs="+", default=[256, 32768], help="batch sizes B")
    p.add_argument("--noises", nargs="+", default=["gaussian", "rademacher", "bernoulli"])
    p.add_argument("--rounds", type=int, default=21, help="timed rounds (each calls every configuration once)")
    p.add_argument("--eager-rounds", type=int, default=7, help="rounds of the eager calls (slower)")
    p.add_argument("--no-step", action="store_true", help="skip the plain Keras step used for scale")
    p.add_argument("--out", default=f"runs/benchmarks/noise_draw_{BACKEND}.json")
    return p.parse_args(argv)


def _block(value):
    keras.tree.map_structure(keras.ops.convert_to_numpy, value)


def compiled_draws(optimizer, batch):
    """``{mode: callable(step)}`` drawing ``example_weights(batch)`` compiled as a train step would."""
    draw = lambda step: optimizer.example_weights(batch, step=step, replica_id=0)  # noqa: E731
    if BACKEND == "tensorflow":
        import tensorflow as tf

        return {"graph": tf.function(draw), "xla": tf.function(draw, jit_compile=True)}
    if BACKEND == "torch":
        return {}  # Keras's torch trainer runs the step eagerly (jit_compile=True is refused): see "eager"
    import jax

    return {"jit": jax.jit(draw)}


def backend_rng_draw(batch):
    """The backend's stateless normal numbers of ``[batch]``, keyed by (seed, stream, step, replica)."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        fold = tf.random.experimental.stateless_fold_in

        @tf.function
        def draw(step):
            seed = fold(fold(tf.constant([5, 0x5A], tf.int32), step), 0)
            return tf.random.stateless_normal([batch], seed=seed)

        return draw
    if BACKEND == "torch":
        import torch

        def draw(step):
            generator = torch.Generator().manual_seed((5 << 32) + int(step) * 2 + 0)
            return torch.randn(batch, generator=generator)

        return draw
    import jax

    @jax.jit
    def draw(step):
        key = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), step), 0)
        return jax.random.normal(key, (batch,))

    return draw


def step_tensor(step):
    if BACKEND == "torch":
        return step  # a Python int, as the torch backend's block cache is keyed
    return keras.ops.convert_to_tensor(step, "int64" if BACKEND == "tensorflow" else "int32")


def time_rounds(configs, rounds):
    """Median seconds per call of each ``configs[name](step)``, rounds in a rotating order."""
    names = list(configs)
    for name in names:  # trace and warm up
        _block(configs[name](step_tensor(0)))
        _block(configs[name](step_tensor(1)))
    times = {name: [] for name in names}
    for r in range(rounds):
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            step = step_tensor(r + 2)
            start = time.perf_counter()
            _block(configs[name](step))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}, times


def mean_us(times):
    """Mean microseconds per call: on PyTorch the weights are drawn for 64 steps at once and cached, so
    the median is a cache hit and the mean over at least 64 rounds is the amortised cost of a step."""
    return 1e6 * statistics.fmean(times)


def plain_step_seconds(batch, rounds):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch, 784)).astype("float32")
    y = rng.integers(0, 10, batch)
    model = keras.Sequential([keras.Input((784,)), keras.layers.Dense(128, activation="relu"), keras.layers.Dense(10)])
    model.compile(keras.optimizers.SGD(0.01), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.train_on_batch(x, y)
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main(argv=None):
    args = parse_args(argv)
    load_before = list(os.getloadavg())
    rows = []
    for batch in args.batches:
        configs = {"backend rng (0.1)": backend_rng_draw(batch)}
        for noise in args.noises:
            optimizer = gm.GradientMix(keras.optimizers.SGD(0.1), noise=noise, stddev=0.9, seed=5)
            for mode, draw in compiled_draws(optimizer, batch).items():
                configs[f"{noise} {mode}"] = draw
        medians, all_times = time_rounds(configs, args.rounds)
        eager = {}
        for noise in args.noises:
            optimizer = gm.GradientMix(keras.optimizers.SGD(0.1), noise=noise, stddev=0.9, seed=5)
            eager[f"{noise} eager"] = lambda step, opt=optimizer: opt.example_weights(batch, step=step, replica_id=0)
        eager_medians, eager_times = time_rounds(eager, args.eager_rounds)
        medians.update(eager_medians)
        all_times.update(eager_times)
        for name, seconds in medians.items():
            rows.append({"batch": batch, "config": name, "median_us": seconds * 1e6,
                         "mean_us": mean_us(all_times[name]),
                         "vs_backend_rng": seconds / medians["backend rng (0.1)"]})
    step = None
    if not args.no_step:
        step = plain_step_seconds(max(args.batches), max(5, args.rounds // 4))
        for row in rows:
            if row["batch"] == max(args.batches):
                row["vs_plain_step"] = row["median_us"] * 1e-6 / step
    result = {
        "backend": BACKEND,
        "versions": {"keras": keras.__version__, "tf_gradmix": gm.__version__, "python": platform.python_version()},
        "args": vars(args),
        "plain_step_seconds": step,
        "loadavg_before": load_before,
        "loadavg_after": list(os.getloadavg()),
        "rows": rows,
    }
    os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"backend {BACKEND}; load average {load_before} -> {result['loadavg_after']}")
    if step is not None:
        print(f"plain Keras step (784-128-10 MLP, batch {max(args.batches)}): {step * 1e3:.1f} ms")
    print("| batch | configuration | median µs | mean µs | × backend rng | × plain step |")
    print("|---:|---|---:|---:|---:|---:|")
    for row in rows:
        vs_step = f"{row['vs_plain_step']:.4f}" if "vs_plain_step" in row else ""
        cells = (row["batch"], row["config"], f"{row['median_us']:.0f}", f"{row['mean_us']:.0f}",
                 f"{row['vs_backend_rng']:.2f}", vs_step)
        print("| " + " | ".join(map(str, cells)) + " |")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
