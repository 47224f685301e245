"""Step time of sample-level GradientMix against the same plain Keras step, on PyTorch.

Configurations (same model, same initial weights, same SGD with Nesterov
momentum, no metrics besides what the configuration adds), all in one
process on Keras's PyTorch backend (eager steps, one device):

* ``plain``: ``keras.Model`` + ``SGD``;
* ``sample``: ``tf_gradmix.Model`` + ``GradientMix(SGD, level="sample", stddev=1)``;
* ``control``: a second, identical plain model: an A/A test of how far apart
  two identical configurations time on this machine.

Model: a small BatchNorm CNN on 32x32x3 images (batch 256 by default).
Every configuration is warmed up first; then ``--rounds``
rounds each run one block of ``--steps`` steps of every configuration, in an
order that rotates from round to round. A block is one real ``fit(...,
steps_per_epoch=steps, verbose=0)`` on a repeated in-memory batch, timed from
``on_epoch_begin`` to ``on_epoch_end``. Reported: the median step time of
each configuration, the ratio of medians against ``plain``, the median and
interquartile range of the per-round ratios (each block over the same round's
``plain`` block), and ``os.getloadavg()`` before and after.

``--pause-experiment`` sends SIGSTOP to the PIDs listed in a file (a
background experiment sharing the machine) for the duration of the run and
SIGCONT afterwards, also on errors and on SIGINT/SIGTERM.

Timings are never asserted anywhere: this script only reports.

Usage::

    python -m benchmarks.overhead_torch                  # minutes on 2 cores
    python -m benchmarks.overhead_torch --rounds 3 --steps 5   # smoke run
"""

import argparse
import json
import os
import signal
import statistics
import sys
import time

os.environ["KERAS_BACKEND"] = "torch"

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_gradmix as gm  # noqa: E402

CONFIGS = ("plain", "sample", "control")


def cnn(model_class, seed=0):
    keras.utils.set_random_seed(seed)
    inputs = keras.Input((32, 32, 3))
    h = inputs
    for filters in (16, 32):
        h = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(h)
        h = keras.layers.BatchNormalization()(h)
        h = keras.layers.Activation("relu")(h)
        h = keras.layers.MaxPooling2D()(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    return model_class(inputs, keras.layers.Dense(10)(h))


def build(config):
    sgd = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config == "sample":
        model = cnn(gm.Model)
        model.compile(gm.GradientMix(sgd, level="sample", stddev=1.0, seed=0), loss)
    else:
        model = cnn(keras.Model)
        model.compile(sgd, loss)
    return model


class EpochTimer(keras.callbacks.Callback):
    def on_epoch_begin(self, epoch, logs=None):
        self.start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds = time.perf_counter() - self.start


def block(model, x, y, batch, steps):
    timer = EpochTimer()
    model.fit(x, y, batch_size=batch, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[timer])
    return timer.seconds / steps


def run(args):
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(args.batch * args.steps, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, len(x))
    models = {config: build(config) for config in CONFIGS}
    for model in models.values():  # the first steps (the mixing check runs at the first)
        block(model, x, y, args.batch, min(3, args.steps))
    times = {config: [] for config in CONFIGS}
    for r in range(args.rounds):
        order = CONFIGS[r % len(CONFIGS):] + CONFIGS[: r % len(CONFIGS)]
        for config in order:
            times[config].append(block(models[config], x, y, args.batch, args.steps))
    plain = statistics.median(times["plain"])
    import torch

    result = {"backend": keras.backend.backend(), "torch": torch.__version__,
              "torch_threads": torch.get_num_threads(), "batch": args.batch, "steps": args.steps,
              "rounds": args.rounds, "step_seconds": times, "configs": {}}
    for config in CONFIGS:
        ratios = [t / p for t, p in zip(times[config], times["plain"])]
        q = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        result["configs"][config] = {
            "median_step_seconds": statistics.median(times[config]),
            "ratio_of_medians": statistics.median(times[config]) / plain,
            "median_paired_ratio": statistics.median(ratios),
            "paired_ratio_iqr": [q[0], q[2]],
        }
    return result


def paused(pid_file):
    """SIGSTOP the PIDs in ``pid_file``; returns a function that sends SIGCONT (idempotent)."""
    pids = []
    if pid_file and os.path.exists(pid_file):
        pids = [int(p) for p in open(pid_file).read().split() if p.strip().isdigit()]
    stopped = []
    for pid in pids:
        try:
            os.kill(pid, signal.SIGSTOP)
            stopped.append(pid)
        except ProcessLookupError:
            pass

    def resume(*_):
        while stopped:
            try:
                os.kill(stopped.pop(), signal.SIGCONT)
            except ProcessLookupError:
                pass

    return resume, list(stopped)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--pause-experiment", metavar="PID_FILE", default=None)
    parser.add_argument("--output", default=None, help="JSON file (default: print only)")
    args = parser.parse_args(argv)
    load_before = os.getloadavg()
    resume, stopped = paused(args.pause_experiment)
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *a: (resume(), sys.exit(1)))
    try:
        result = run(args)
    finally:
        resume()
    result.update(load_before=load_before, load_after=os.getloadavg(), paused_pids=stopped)
    text = json.dumps(result, indent=1)
    if args.output:
        with open(args.output, "w") as f:
            f.write(text + "\n")
    for config, stats in result["configs"].items():
        print(f"{config:8s} {stats['median_step_seconds'] * 1e3:8.2f} ms/step  "
              f"ratio {stats['ratio_of_medians']:.3f}  paired {stats['median_paired_ratio']:.3f} "
              f"IQR [{stats['paired_ratio_iqr'][0]:.3f}, {stats['paired_ratio_iqr'][1]:.3f}]")
    print("load before", load_before, "after", result["load_after"], "paused", stopped)


if __name__ == "__main__":
    main()
