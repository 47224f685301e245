"""Cost of per-example gradients against loss reweighting (not a test).

Three ways to run one sample-level GradientMix step, each compiled as one
``tf.function`` on the same model and batch:

* ``reweight``: ``tf_gradmix.Model`` + ``GradientMix`` (the default path: one
  backward pass, each example's gradient weighted through the loss);
* ``pe_step``: the exact per-example mixing mode,
  ``tf_gradmix.exact.train_step`` (batched forward for the
  loss and metrics + vectorised per-example forward/backward + mixing);
* ``pe_grads``: ``tf_gradmix.per_example.per_example_gradients`` alone (no
  update; reduced to the sum of squared norms inside the graph), what the
  diagnostics pay per batch.

Models: a small CNN without BatchNorm (32x32x3, conv 16 - conv 32 stride 2 -
conv 64 stride 2 - global average pool - dense 10, 24k parameters) and a
small MLP (256 - 512 - 512 - 10, 400k parameters), at batch 64 and 256.

Time: one process per (model, batch); rounds alternate the three modes, each
timing the median of a few steps; reported as the ratio of the medians over
rounds to ``reweight``. Memory: every (model, batch, mode) runs in its own
process, which reports its peak RSS (``resource.getrusage``) and the peak's
growth over the RSS after building the model (the step's own memory).

    python -m benchmarks.per_example            # a few minutes; prints a table
    python -m benchmarks.per_example --rounds 3 --steps 3
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

MODES = ("reweight", "pe_step", "pe_grads")
MODELS = ("cnn", "mlp")
BATCHES = (64, 256)


def _rss_mb():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _setup(model_name, batch):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np
    import tensorflow as tf

    tf.get_logger().setLevel("ERROR")
    import tf_gradmix as gm
    from tf_gradmix import exact, per_example

    class PerExampleModel(keras.Model):
        def train_step(self, data):
            return exact.train_step(self, data)

    def build(model_class):
        keras.utils.set_random_seed(0)
        if model_name == "cnn":
            inputs = keras.Input((32, 32, 3))
            h = keras.layers.Conv2D(16, 3, padding="same", activation="relu")(inputs)
            h = keras.layers.Conv2D(32, 3, strides=2, padding="same", activation="relu")(h)
            h = keras.layers.Conv2D(64, 3, strides=2, padding="same", activation="relu")(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
        else:
            inputs = keras.Input((256,))
            h = keras.layers.Dense(512, activation="relu")(inputs)
            h = keras.layers.Dense(512, activation="relu")(h)
        model = model_class(inputs, keras.layers.Dense(10)(h))
        model.compile(
            optimizer=gm.GradientMix(keras.optimizers.SGD(0.01), stddev=1.0, seed=0),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        )
        return model

    rng = np.random.default_rng(0)
    shape = (32, 32, 3) if model_name == "cnn" else (256,)
    x = tf.constant(rng.normal(size=(batch,) + shape).astype("float32"))
    y = tf.constant(rng.integers(0, 10, size=batch))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def make(mode):
        model = build(PerExampleModel if mode == "pe_step" else gm.Model)
        if mode == "pe_grads":
            # Reduced in the graph (sum of squared norms, as for the empirical
            # Fisher) so the timing does not include copying B x P floats out.
            fn = tf.function(lambda x, y: tf.add_n([
                tf.reduce_sum(tf.square(g)) for g in per_example.per_example_gradients(model, x, y, loss)
            ]))
        else:
            fn = tf.function(lambda x, y: model.train_step((x, y)))

        def step():
            out = fn(x, y)
            tf.nest.map_structure(lambda t: t.numpy(), out)  # wait for the result

        return model, step

    return make


def worker_time(model_name, batch, rounds, steps):
    make = _setup(model_name, batch)
    runners = {mode: make(mode)[1] for mode in MODES}
    for run in runners.values():  # trace and warm up
        run()
        run()
    medians = {mode: [] for mode in MODES}
    for r in range(rounds):
        order = MODES if r % 2 == 0 else MODES[::-1]
        for mode in order:
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                runners[mode]()
                times.append(time.perf_counter() - start)
            medians[mode].append(statistics.median(times))
    return {mode: statistics.median(v) for mode, v in medians.items()}


def worker_memory(model_name, batch, mode, steps):
    make = _setup(model_name, batch)
    model, run = make(mode)
    before = _rss_mb()
    for _ in range(steps):
        run()
    peak = _peak_rss_mb()
    params = sum(int(v.numpy().size) for v in model.trainable_variables)
    return {"peak_mb": peak, "growth_mb": peak - before, "params": params}


def _spawn(args):
    cmd = [sys.executable, os.path.abspath(__file__), *map(str, args)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", choices=("time", "memory"))
    p.add_argument("--model", choices=MODELS)
    p.add_argument("--batch", type=int)
    p.add_argument("--mode", choices=MODES)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=5)
    args = p.parse_args()
    if args.worker == "time":
        print(json.dumps(worker_time(args.model, args.batch, args.rounds, args.steps)))
        return
    if args.worker == "memory":
        print(json.dumps(worker_memory(args.model, args.batch, args.mode, args.steps)))
        return

    start = time.time()
    rows = []
    for model_name in MODELS:
        for batch in BATCHES:
            times = _spawn(
                ["--worker", "time", "--model", model_name, "--batch", batch,
                 "--rounds", args.rounds, "--steps", args.steps]
            )
            memory = {
                mode: _spawn(["--worker", "memory", "--model", model_name, "--batch", batch,
                              "--mode", mode, "--steps", 3])
                for mode in MODES
            }
            rows.append((model_name, batch, times, memory))
            print(f"# done {model_name} {batch} ({time.time() - start:.0f} s)", file=sys.stderr)

    print(f"Per-example gradients vs loss reweighting (CPU, {os.cpu_count()} cores; "
          f"time = ratio of medians over {args.rounds} alternating rounds of {args.steps} "
          "steps; memory = peak RSS of a separate process, and its growth over the RSS "
          "after building the model).")
    print()
    print("| model (params) | batch | reweight step | pe_step / reweight | pe_grads / reweight "
          "| peak RSS MB (reweight / pe_step / pe_grads) | RSS growth MB (reweight / pe_step / pe_grads) |")
    print("|---|---|---|---|---|---|---|")
    for model_name, batch, times, memory in rows:
        base = times["reweight"]
        peak = " / ".join(f"{memory[m]['peak_mb']:.0f}" for m in MODES)
        growth = " / ".join(f"{memory[m]['growth_mb']:.0f}" for m in MODES)
        print(
            f"| {model_name} ({memory['reweight']['params']:,}) | {batch} | {base * 1e3:.1f} ms | "
            f"{times['pe_step'] / base:.2f}x | {times['pe_grads'] / base:.2f}x | {peak} | {growth} |"
        )
    print(f"\n(total {time.time() - start:.0f} s)")


if __name__ == "__main__":
    main()
