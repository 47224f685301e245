"""GradientMix on a GPU or TPU: one command, a time budget, results as JSON and a figure.

Runs on the first accelerator of the current Keras backend (JAX, or
TensorFlow where it is installed), needs only ``keras``, NumPy, this package
and (for the figure and for decoding CIFAR-10 without TensorFlow) matplotlib
and Pillow, and stops cleanly when ``--budget-minutes`` runs out: every part
that finished is in ``accelerator.json``, and every part that did not is
named there with the reason. The parts, in this order:

1. ``overhead``: step time of sample-level GradientMix (``gm.Model``,
   ``GradientMix(SGD + Nesterov, stddev=1)``) against the same plain Keras
   step, on ``keras.applications.ResNet50(weights=None)`` at batch 256
   (224x224 images, 1,000 classes, uint8 inputs rescaled inside the model so
   that the host-to-device copy is small), in float32 and in the
   ``mixed_bfloat16`` policy, compiled with XLA (JAX always compiles; on
   TensorFlow ``jit_compile=True``). Configurations ``plain``, ``sample`` and
   ``control`` (a second plain model: the A/A test of how far apart two
   identical configurations time) are each compiled and warmed up
   separately, then timed in alternating rounds of ``fit`` blocks (the block
   time from ``on_epoch_begin`` to ``on_epoch_end``, after a device sync).
   Reported: median step time, ratio of medians against ``plain``, median
   and interquartile range of the per-round ratios, images/s. Peak device
   memory of ``plain`` and ``sample``: each in its own process (the
   allocator's peak cannot be reset within one), a few steps, the
   allocator's ``peak_bytes_in_use`` (host peak RSS on a CPU).
2. ``weights_and_accumulation``: the time to draw the mixing weights of a
   32,768-example batch (compiled, median of repeats), against the ResNet-50
   step; and an accumulating micro-step (``gradient_accumulation_steps=k``,
   LAMB) of GradientMix against stock Keras's, and against a whole
   GradientMix step without accumulation at the same micro-batch, on the
   CIFAR ResNet-18 of ``examples/resnet.py``.
3. ``cifar_large_batch``: the paper's CIFAR-10 setting at large batch: the
   CIFAR ResNet-18 (11.2M parameters, BatchNorm momentum 0.9) at batch 4,096
   on the 50,000 training images (random crop with 4-pixel padding and
   horizontal flip), LARS (momentum 0.9, trust coefficient 1e-3, weight
   decay 5e-4, 1-D variables excluded) with the recipe's linear warm-up over
   the first 10% of the steps and polynomial (power 2) decay from the peak
   rate ``0.1 * B / 200``. Arms: ``plain``, GradientMix Gaussian
   ``stddev=1``, and GradientMix Gaussian at the noise-batch rule
   ``stddev_for_noise_batch_size(B, 200)`` (the gradient noise of the batch
   the recipe's rate was set for), one seed. The arms train epoch by epoch in
   turn, so they always have the same number of epochs; the number of epochs
   is chosen from the measured epoch time to fill the budget left (at most
   60) and fixed before training, as the schedule needs it; if the budget
   still runs out, ``epochs_completed`` says where the arms stopped (their
   schedule then did not finish). Test accuracy after every epoch.

Data: ``--data-dir`` (the CIFAR-10 JPEG copy, see ``examples/cifar10.py``),
decoded with TensorFlow or, where TensorFlow is absent, Pillow. Without a
data directory part 3 is skipped (named in the JSON).

Timings are never asserted anywhere: this script only reports.

Usage::

    python -m benchmarks.accelerator --budget-minutes 8 --data-dir DATA --out DIR   # on a GPU or TPU
    python -m benchmarks.accelerator --quick --out DIR   # CPU smoke run: tiny sizes, seconds
"""

import argparse
import contextlib
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

PARTS = ("overhead", "weights_and_accumulation", "cifar_large_batch")
#: ``--quick`` on JAX: XLA skips its costly compiler optimisations (compiling dominates a smoke run).
QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def with_quick_xla_flags(env):
    """``env`` (a mapping) with :data:`QUICK_XLA_FLAGS` added to its ``XLA_FLAGS``, once."""
    flags = env.get("XLA_FLAGS", "")
    if QUICK_XLA_FLAGS not in flags:
        env["XLA_FLAGS"] = f"{flags} {QUICK_XLA_FLAGS}".strip()
    return env
OVERHEAD_CONFIGS = ("plain", "sample", "control")
PRECISIONS = ("float32", "mixed_bfloat16")
RESULTS_NAME = "accelerator.json"
FIGURE_NAME = "accelerator.png"


class BudgetExhausted(Exception):
    """The time budget ran out; what finished is kept."""


class Budget:
    """Wall-clock budget of the whole run; an alarm interrupts a part that overruns it."""

    def __init__(self, seconds):
        self.seconds = float(seconds)
        self.start = time.monotonic()

    def left(self):
        return self.seconds - (time.monotonic() - self.start)

    def check(self, what):
        if self.left() <= 0:
            raise BudgetExhausted(f"the budget ran out before {what}")

    @contextlib.contextmanager
    def alarm(self):
        def expired(signum, frame):
            raise BudgetExhausted("the budget ran out during this part")

        previous = signal.signal(signal.SIGALRM, expired)
        signal.setitimer(signal.ITIMER_REAL, max(self.left(), 0.01))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, previous)


# --------------------------------------------------------------------------
# Sizes


def sizes(quick):
    """Model and batch sizes: the real ones, or tiny ones for a CPU smoke run."""
    if quick:
        return dict(resnet50_stand_in=True, resnet50_image=32, resnet50_classes=10, overhead_batch=4,
                    overhead_steps=2, overhead_min_rounds=2, memory_steps=2, weights_batch=32768,
                    weights_repeats=5, micro_batch=8, accumulation_steps=2, micro_rounds=2, cifar_batch=64,
                    noise_batch=16, cifar_train=256, cifar_test=128, cifar_widths=(8,), max_epochs=2)
    return dict(resnet50_stand_in=False, resnet50_image=224, resnet50_classes=1000, overhead_batch=256,
                overhead_steps=10, overhead_min_rounds=5, memory_steps=3, weights_batch=32768,
                weights_repeats=50, micro_batch=256, accumulation_steps=8, micro_rounds=5, cifar_batch=4096,
                noise_batch=200, cifar_train=None, cifar_test=None, cifar_widths=None, max_epochs=60)


# --------------------------------------------------------------------------
# The device


def accelerator(quick):
    """``(platform, description)`` of the first GPU or TPU of the Keras backend; the CPU with ``quick``."""
    import keras

    name = keras.backend.backend()
    if name == "jax":
        import jax

        devices = [d for d in jax.devices() if d.platform in ("gpu", "tpu")]
        if devices:
            return devices[0].platform, str(getattr(devices[0], "device_kind", devices[0]))
    elif name == "tensorflow":
        import tensorflow as tf

        for kind in ("TPU", "GPU"):
            devices = tf.config.list_logical_devices(kind)
            if devices:
                details = tf.config.experimental.get_device_details(
                    tf.config.list_physical_devices(kind)[0]) if kind == "GPU" else {}
                return kind.lower(), details.get("device_name", devices[0].name)
    else:
        raise SystemExit(f"benchmarks.accelerator: the Keras backend {name!r} is not supported by tf_gradmix; "
                         "set KERAS_BACKEND=jax or tensorflow")
    if quick:
        return "cpu", platform.processor() or "cpu"
    raise SystemExit(f"benchmarks.accelerator: no GPU or TPU found on the Keras backend {name!r}; "
                     "use --quick for a CPU smoke run")


def sync(value):
    """Waits for the device to finish ``value`` (JAX dispatches asynchronously)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        jax.block_until_ready(value)
    return value


def peak_device_bytes():
    """The device allocator's peak since the process started, or the host's peak RSS on a CPU."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        stats = jax.devices()[0].memory_stats()
        if stats and "peak_bytes_in_use" in stats:
            return int(stats["peak_bytes_in_use"]), "device allocator peak"
    elif keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_logical_devices("GPU")
        if gpus:
            return int(tf.config.experimental.get_memory_info(gpus[0].name)["peak"]), "device allocator peak"
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024, "host peak RSS"
    return None, "unavailable"


# --------------------------------------------------------------------------
# Models


def jit_compile():
    import keras

    return True if keras.backend.backend() == "tensorflow" else "auto"


def resnet50(model_class, size, seed=0):
    """``keras.applications.ResNet50(weights=None)`` behind a uint8 input rescaled in the model.

    With ``--quick`` a two-layer BatchNorm CNN stands in for it (compiling ResNet-50 takes minutes on a
    CPU); the code path around the model is the same.
    """
    import keras

    keras.utils.set_random_seed(seed)
    inputs = keras.Input((size["resnet50_image"],) * 2 + (3,), dtype="uint8")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0)(inputs)
    if size["resnet50_stand_in"]:
        for filters in (8, 16):
            x = keras.layers.Conv2D(filters, 3, padding="same", use_bias=False)(x)
            x = keras.layers.BatchNormalization()(x)
            x = keras.layers.Activation("relu")(x)
            x = keras.layers.MaxPooling2D()(x)
        x = keras.layers.GlobalAveragePooling2D()(x)
        return model_class(inputs, keras.layers.Dense(size["resnet50_classes"])(x))
    backbone = keras.applications.ResNet50(weights=None, input_shape=x.shape[1:],
                                           classes=size["resnet50_classes"], classifier_activation=None)
    return model_class(inputs, backbone(x))


def overhead_model(config, size):
    import keras

    import tf_gradmix as gm

    sgd = keras.optimizers.SGD(0.01, momentum=0.9, nesterov=True)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    if config == "sample":
        model = resnet50(gm.Model, size)
        model.compile(gm.GradientMix(sgd, level="sample", stddev=1.0, seed=0), loss, jit_compile=jit_compile())
    else:
        model = resnet50(keras.Model, size)
        model.compile(sgd, loss, jit_compile=jit_compile())
    return model


def cifar_resnet18(model_class, size, seed=0):
    """The CIFAR ResNet-18 of ``examples/resnet.py`` (smaller with ``--quick``) behind uint8 normalisation."""
    import keras

    from examples import cifar10, resnet

    keras.utils.set_random_seed(seed)
    if size["cifar_widths"]:
        widths = size["cifar_widths"]
        core = resnet.cifar_resnet(stage_widths=widths, blocks_per_stage=(1,) * len(widths), weight_decay=0.0)
    else:
        core = resnet.resnet18_cifar(weight_decay=0.0)
    inputs = keras.Input((32, 32, 3), dtype="uint8")
    x = keras.layers.Rescaling(1 / 255.0)(inputs)
    x = keras.layers.Normalization(mean=cifar10.MEAN, variance=np.square(cifar10.STD))(x)
    return model_class(inputs, core(x))


# --------------------------------------------------------------------------
# Timing


def timed_fit(model, x, y, batch, steps):
    """Seconds a step of one ``fit`` block of ``steps`` steps (device synced at both ends)."""
    import keras

    class Timer(keras.callbacks.Callback):
        def on_epoch_begin(self, epoch, logs=None):
            sync(self.model.trainable_variables[0].value)
            self.start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            sync(self.model.trainable_variables[0].value)
            self.seconds = time.perf_counter() - self.start

    timer = Timer()
    model.fit(x, y, batch_size=batch, steps_per_epoch=steps, epochs=1, verbose=0, shuffle=False,
              callbacks=[timer])
    return timer.seconds / steps


def summarize(times, reference):
    """Median, ratio of medians and paired ratios of each configuration's per-round step times."""
    ref = statistics.median(times[reference])
    out = {}
    for config, seconds in times.items():
        ratios = [t / r for t, r in zip(seconds, times[reference])]
        quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
        out[config] = {"median_step_ms": 1e3 * statistics.median(seconds),
                       "ratio_of_medians": statistics.median(seconds) / ref,
                       "median_paired_ratio": statistics.median(ratios),
                       "paired_ratio_iqr": [quartiles[0], quartiles[2]],
                       "rounds": len(seconds)}
    return out


def alternate(models, run_block, min_rounds, seconds):
    """Rounds of one block per model in rotating order, at least ``min_rounds``, until ``seconds`` pass."""
    names = list(models)
    times = {name: [] for name in names}
    start = time.monotonic()
    r = 0
    while r < min_rounds or time.monotonic() - start < seconds:
        order = names[r % len(names):] + names[: r % len(names)]
        for name in order:
            times[name].append(run_block(models[name]))
        r += 1
    return times


@contextlib.contextmanager
def dtype_policy(name):
    import keras

    previous = keras.config.dtype_policy().name
    keras.config.set_dtype_policy(name)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


# --------------------------------------------------------------------------
# Part 1: step time and memory


def memory_probe(config, precision, quick):
    """Runs in its own process: build, a few steps, the allocator's peak."""
    size = sizes(quick)
    with dtype_policy(precision):
        model = overhead_model(config, size)
    rng = np.random.default_rng(0)
    n = size["overhead_batch"]
    x = rng.integers(0, 256, (n,) + (size["resnet50_image"],) * 2 + (3,), dtype=np.uint8)
    y = rng.integers(0, size["resnet50_classes"], n)
    timed_fit(model, x, y, n, size["memory_steps"])
    peak, what = peak_device_bytes()
    print(json.dumps({"peak_bytes": peak, "measure": what}))


def measure_memory(config, precision, quick, budget):
    env = dict(os.environ, KERAS_BACKEND=_backend())
    if _backend() == "jax":
        env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"  # the peak of what is used, not the preallocation
    command = [sys.executable, "-m", "benchmarks.accelerator", "--memory-probe", config, "--precision", precision]
    if quick:
        command.append("--quick")
        if _backend() == "jax":
            with_quick_xla_flags(env)
    result = subprocess.run(command, capture_output=True, text=True, env=env,
                            timeout=max(budget.left(), 1), cwd=Path(__file__).resolve().parents[1])
    if result.returncode != 0:
        raise RuntimeError(f"memory probe {config} {precision} failed: {result.stderr[-2000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _backend():
    import keras

    return keras.backend.backend()


def part_overhead(args, size, budget, results):
    rng = np.random.default_rng(0)
    n, steps = size["overhead_batch"], size["overhead_steps"]
    x = rng.integers(0, 256, (n * steps,) + (size["resnet50_image"],) * 2 + (3,), dtype=np.uint8)
    y = rng.integers(0, size["resnet50_classes"], n * steps)
    model_name = ("a two-layer BatchNorm CNN standing in for ResNet-50 (quick)" if size["resnet50_stand_in"]
                  else "keras.applications.ResNet50(weights=None)")
    part = results.setdefault("overhead", {"model": model_name,
                                           "image_size": size["resnet50_image"], "batch": n,
                                           "steps_per_block": steps, "optimizer": "SGD(0.01, momentum=0.9, "
                                           "nesterov=True); sample: GradientMix(level='sample', stddev=1.0)",
                                           "precisions": {}})
    # A share of the budget for each precision's timing rounds.
    timing_seconds = 0.0 if args.quick else min(45.0, 0.06 * budget.seconds)
    for precision in PRECISIONS:
        budget.check(f"the {precision} overhead run")
        entry = part["precisions"].setdefault(precision, {})
        with dtype_policy(precision):
            models = {}
            warmup = {}
            for config in OVERHEAD_CONFIGS:
                t0 = time.monotonic()
                models[config] = overhead_model(config, size)
                timed_fit(models[config], x, y, n, min(3, steps))  # trace, compile, a few steps
                warmup[config] = time.monotonic() - t0
            entry["build_and_compile_seconds"] = warmup
            times = alternate(models, lambda m: timed_fit(m, x, y, n, steps), size["overhead_min_rounds"],
                              timing_seconds)
        entry["configs"] = summarize(times, "plain")
        for config in OVERHEAD_CONFIGS:
            entry["configs"][config]["images_per_second"] = n / (entry["configs"][config]["median_step_ms"] / 1e3)
        entry["step_seconds"] = times
        del models
        write(args.out, results)
        say(f"overhead {precision}: " + ", ".join(
            f"{c} {s['median_step_ms']:.1f} ms ({s['ratio_of_medians']:.3f}x, IQR "
            f"{s['paired_ratio_iqr'][0]:.3f}-{s['paired_ratio_iqr'][1]:.3f})" for c, s in entry["configs"].items()))
    for precision in PRECISIONS:
        memory = {}
        for config in ("plain", "sample"):
            budget.check(f"the {precision} {config} memory probe")
            memory[config] = measure_memory(config, precision, args.quick, budget)
        memory["sample_over_plain"] = (memory["sample"]["peak_bytes"] / memory["plain"]["peak_bytes"]
                                       if memory["plain"]["peak_bytes"] else None)
        part["precisions"][precision]["peak_memory"] = memory
        write(args.out, results)
        say(f"memory {precision}: plain {memory['plain']['peak_bytes'] / 2**20:.0f} MiB, sample "
            f"{memory['sample']['peak_bytes'] / 2**20:.0f} MiB ({memory['plain']['measure']})")


# --------------------------------------------------------------------------
# Part 2: drawing the weights, and an accumulating micro-step


def compiled(function):
    """``function`` compiled for the backend (``jax.jit``, ``tf.function(jit_compile=True)``)."""
    import keras

    if keras.backend.backend() == "jax":
        import jax

        return jax.jit(function)
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        return tf.function(function, jit_compile=True)
    return function


def part_weights_and_accumulation(args, size, budget, results):
    import keras

    import tf_gradmix as gm

    part = results.setdefault("weights_and_accumulation", {})
    n = size["weights_batch"]
    draws = {}
    for noise in ("gaussian", "rademacher", "bernoulli"):
        stream = gm.noise.NoiseStream(noise, 1.0)
        draw = compiled(lambda step, stream=stream: stream.example_weights(7, step, n))
        sync(draw(np.int64(0)))
        seconds = []
        for step in range(1, size["weights_repeats"] + 1):
            t0 = time.perf_counter()
            sync(draw(np.int64(step)))
            seconds.append(time.perf_counter() - t0)
        draws[noise] = {"median_us": 1e6 * statistics.median(seconds), "repeats": len(seconds)}
    part["draw_weights"] = {"batch": n, "by_noise": draws,
                            "note": "one compiled call per draw, timed from the host including dispatch"}
    step_ms = (results.get("overhead", {}).get("precisions", {}).get("float32", {})
               .get("configs", {}).get("plain", {}).get("median_step_ms"))
    if step_ms:
        part["draw_weights"]["gaussian_over_resnet50_float32_step"] = draws["gaussian"]["median_us"] / 1e3 / step_ms
    write(args.out, results)
    say("draw 32K weights: " + ", ".join(f"{k} {v['median_us']:.0f} us" for k, v in draws.items()))

    budget.check("the accumulation micro-step")
    k, micro = size["accumulation_steps"], size["micro_batch"]
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (micro * k, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, micro * k)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def build(config):
        accumulate = k if config != "gradientmix_whole_step" else None
        lamb = gm.optimizers.LAMB(1e-3, gradient_accumulation_steps=accumulate)
        if config == "keras_accumulating":
            model = cifar_resnet18(keras.Model, size)
            model.compile(lamb, loss, jit_compile=jit_compile())
        else:
            model = cifar_resnet18(gm.Model, size)
            model.compile(gm.GradientMix(lamb, stddev=1.0, seed=0), loss, jit_compile=jit_compile())
        timed_fit(model, x, y, micro, k)
        return model

    models = {c: build(c) for c in ("keras_accumulating", "gradientmix_accumulating", "gradientmix_whole_step")}
    times = alternate(models, lambda m: timed_fit(m, x, y, micro, k), size["micro_rounds"],
                      0.0 if args.quick else min(30.0, 0.04 * budget.seconds))
    summary = summarize(times, "gradientmix_whole_step")
    part["accumulation"] = {"model": "CIFAR ResNet-18 (examples/resnet.py)", "optimizer": "LAMB(1e-3)",
                            "micro_batch": micro, "accumulation_steps": k,
                            "note": "time a micro-step: a block of k micro-steps (one update) over k",
                            "configs": summary, "step_seconds": times,
                            "gradientmix_over_keras_accumulating":
                                summary["gradientmix_accumulating"]["median_step_ms"]
                                / summary["keras_accumulating"]["median_step_ms"]}
    write(args.out, results)
    say("accumulation micro-step: " + ", ".join(f"{c} {s['median_step_ms']:.1f} ms" for c, s in summary.items()))


# --------------------------------------------------------------------------
# Part 3: CIFAR-10 at large batch with LARS


def augment(x, rng):
    """Random crop with 4-pixel zero padding and a horizontal flip of each image (uint8)."""
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    out = np.empty_like(x)
    offsets = rng.integers(0, 9, (len(x), 2))
    for dy in range(9):
        for dx in range(9):
            idx = np.nonzero((offsets[:, 0] == dy) & (offsets[:, 1] == dx))[0]
            out[idx] = padded[idx, dy:dy + 32, dx:dx + 32]
    flip = rng.random(len(x)) < 0.5
    out[flip] = out[flip, :, ::-1]
    return out


def part_cifar_large_batch(args, size, budget, results):
    import keras

    import tf_gradmix as gm
    from examples import cifar10

    if size["cifar_train"]:  # --quick: decodes only the subsets' images
        (x_train, y_train), (x_test, y_test) = cifar10.load_cifar10_subset(
            size["cifar_train"], size["cifar_test"], seed=0, data_dir=args.data_dir, cache_dir=args.cache_dir,
            verbose=False)
    else:
        (x_train, y_train), (x_test, y_test) = cifar10.load_cifar10(args.data_dir, cache_dir=args.cache_dir,
                                                                    verbose=False)
    batch = min(args.cifar_batch or size["cifar_batch"], len(x_train))
    steps_per_epoch = len(x_train) // batch
    recipe = gm.recipes.CIFAR_LARS
    peak = gm.schedules.scaled_learning_rate(recipe["base_learning_rate"], recipe["base_batch_size"], batch)
    noise_batch = min(size["noise_batch"], batch)  # the recipe's base batch (200); smaller with --quick
    rule = gm.noise.stddev_for_noise_batch_size(batch, noise_batch)
    arms = {"plain": 0.0, "gaussian_stddev_1": 1.0, "gaussian_rule": rule}
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    part = results.setdefault("cifar_large_batch", {
        "model": "CIFAR ResNet-18 (examples/resnet.py), BatchNorm momentum 0.9" if not size["cifar_widths"]
        else f"CIFAR ResNet {size['cifar_widths']}, a block a stage (quick)",
        "batch": batch, "train_images": len(x_train), "test_images": len(x_test),
        "optimizer": f"LARS(momentum=0.9, weight_decay=5e-4, trust_coefficient="
                     f"{recipe['trust_coefficient']}, exclude_1d_variables=True)",
        "peak_learning_rate": peak, "rule": f"stddev_for_noise_batch_size({batch}, {noise_batch}) = {rule:.3f}",
        "arms": arms, "seeds": 1, "epochs": None, "epochs_completed": 0, "history": {}})

    def build(stddev, epochs):
        total = steps_per_epoch * epochs
        schedule = gm.schedules.PolynomialWarmupDecay(
            peak_learning_rate=peak, total_steps=total,
            warmup_steps=max(1, round(total * recipe["warmup_epochs"] / recipe["epochs"])),
            warmup_power=recipe["warmup_power"], decay_power=recipe["decay_power"])
        lars = gm.optimizers.LARS(schedule, momentum=0.9, weight_decay=5e-4,
                                  trust_coefficient=recipe["trust_coefficient"],
                                  exclude_1d_variables=recipe["exclude_1d_variables"])
        if stddev == 0.0:
            model = cifar_resnet18(keras.Model, size)
            model.compile(lars, loss, metrics=["accuracy"], jit_compile=jit_compile())
        else:
            model = cifar_resnet18(gm.Model, size)
            model.compile(gm.GradientMix(lars, noise="gaussian", stddev=stddev, seed=1), loss,
                          metrics=["accuracy"], jit_compile=jit_compile())
        return model

    rng = np.random.default_rng(0)

    def epoch(model, e):
        t0 = time.monotonic()
        xa = augment(x_train, rng)
        history = model.fit(xa, y_train, batch_size=batch, epochs=e + 1, initial_epoch=e, verbose=0,
                            shuffle=True)
        train_seconds = time.monotonic() - t0  # augmentation on the host included
        test = model.evaluate(x_test, y_test, batch_size=min(batch, len(x_test)), verbose=0, return_dict=True)
        return {"epoch": e + 1, "train_loss": float(history.history["loss"][-1]),
                "train_accuracy": float(history.history["accuracy"][-1]),
                "test_loss": float(test["loss"]), "test_accuracy": float(test["accuracy"]),
                "train_seconds": train_seconds, "seconds": time.monotonic() - t0}

    # Calibrate: compile and time one epoch of one arm, with a schedule of max_epochs.
    budget.check("the CIFAR-10 calibration epoch")
    t0 = time.monotonic()
    probe = build(arms["plain"], size["max_epochs"])
    epoch(probe, 0)  # trace and compile
    compile_seconds = time.monotonic() - t0
    second = epoch(probe, 1)
    del probe
    epoch_seconds = second["seconds"]
    margin = 0.8  # each arm's programs compile anew; the epochs must end inside the budget
    available = budget.left() * margin - len(arms) * compile_seconds
    epochs = int(max(1, min(size["max_epochs"], available // (len(arms) * epoch_seconds))))
    part.update(epochs=epochs, calibration={"compile_and_first_epoch_seconds": compile_seconds,
                                            "epoch_seconds": epoch_seconds},
                steps=steps_per_epoch * epochs)
    say(f"cifar: {steps_per_epoch} steps an epoch, {epoch_seconds:.1f} s an epoch, {epochs} epochs per arm, "
        f"rule stddev {rule:.3f}")
    models = {name: build(stddev, epochs) for name, stddev in arms.items()}
    for e in range(epochs):
        for name, model in models.items():
            budget.check(f"epoch {e + 1} of {name}")
            part["history"].setdefault(name, []).append(epoch(model, e))
        part["epochs_completed"] = e + 1
        write(args.out, results)
        say(f"epoch {e + 1}/{epochs}: " + ", ".join(
            f"{n} {h[-1]['test_accuracy']:.4f}" for n, h in part["history"].items()))
    part["final_test_accuracy"] = {n: h[-1]["test_accuracy"] for n, h in part["history"].items()}


# --------------------------------------------------------------------------
# Output


def say(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", flush=True)


def write(out, results):
    path = Path(out) / RESULTS_NAME
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(results, indent=1, default=float) + "\n")
    os.replace(tmp, path)


def merge(runs):
    """One results dict from several runs of the same device: each part from the last run that has it."""
    merged = dict(runs[0])
    merged["runs"] = [{k: v for k, v in run.items() if k not in PARTS} for run in runs]
    for run in runs:
        for part in PARTS:
            if part in run and run[part]:
                merged[part] = run[part]
                merged["skipped"] = {k: v for k, v in merged.get("skipped", {}).items() if k != part}
    return merged


def figure(out, results):
    """Step-time ratios (part 1) and test accuracy per epoch (part 3), where they exist."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    overhead = results.get("overhead", {}).get("precisions", {})
    labels, ratios, lows, highs = [], [], [], []
    for precision, entry in overhead.items():
        for config in ("control", "sample"):
            stats = entry.get("configs", {}).get(config)
            if stats:
                labels.append(f"{config}\n{precision.replace('mixed_', '')}")
                ratios.append(stats["median_paired_ratio"])
                lows.append(stats["median_paired_ratio"] - stats["paired_ratio_iqr"][0])
                highs.append(stats["paired_ratio_iqr"][1] - stats["median_paired_ratio"])
    if labels:
        left.errorbar(range(len(labels)), ratios, yerr=[lows, highs], fmt="o", capsize=4)
        left.axhline(1.0, color="black", lw=0.8)
        spread = max([0.05] + [abs(r - 1) + h for r, h in zip(ratios, highs)] + [abs(r - 1) + lo for r, lo in
                                                                                  zip(ratios, lows)])
        left.set_ylim(1 - 1.2 * spread, 1 + 1.2 * spread)
        left.set_xticks(range(len(labels)), labels)
        left.set_ylabel("step time / plain Keras (median, IQR)")
    left.set_title(f"ResNet-50, batch {results.get('overhead', {}).get('batch', '?')}")
    history = results.get("cifar_large_batch", {}).get("history", {})
    for name, epochs in history.items():
        right.plot([h["epoch"] for h in epochs], [100 * h["test_accuracy"] for h in epochs], marker=".",
                   label=name)
    if history:
        right.legend()
    right.set_xlabel("epoch")
    right.set_ylabel("test accuracy %")
    right.set_title(f"CIFAR-10 ResNet-18, LARS, batch {results.get('cifar_large_batch', {}).get('batch', '?')}"
                    " (1 seed)")
    fig.suptitle(f"{results['device']} ({results['backend']})")
    fig.tight_layout()
    path = Path(out) / FIGURE_NAME
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--budget-minutes", type=float, default=8.0,
                        help="wall-clock budget of the whole run (default 8)")
    parser.add_argument("--out", default="runs/accelerator", help="folder for accelerator.json and the figure")
    parser.add_argument("--data-dir", default=None,
                        help="folder with the CIFAR-10 JPEG copy (default $TF_GRADMIX_DATA); part 3 needs it")
    parser.add_argument("--cache-dir", default=None, help="where decoded CIFAR-10 arrays are cached")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    parser.add_argument("--cifar-batch", type=int, default=None, help="batch of part 3 (default 4096)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes, allowed on a CPU: a smoke run (decodes only the CIFAR-10 images it uses; "
                             "XLA compiles without its costly optimisations)")
    parser.add_argument("--figure-from", nargs="+", metavar="JSON",
                        help="only draw the figure into --out from these results files (later files' parts win)")
    parser.add_argument("--memory-probe", choices=("plain", "sample"), help=argparse.SUPPRESS)
    parser.add_argument("--precision", choices=PRECISIONS, default="float32", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick and argv is None and os.environ.get("KERAS_BACKEND") == "jax" and "jax" not in sys.modules:
        with_quick_xla_flags(os.environ)  # a command line's own process only; read once, when JAX starts
    if args.memory_probe:
        return memory_probe(args.memory_probe, args.precision, args.quick)
    if args.figure_from:
        Path(args.out).mkdir(parents=True, exist_ok=True)
        merged = merge([json.loads(Path(p).read_text()) for p in args.figure_from])
        write(args.out, merged)
        return figure(args.out, merged)
    if not args.budget_minutes > 0:
        parser.error(f"--budget-minutes must be positive, got {args.budget_minutes}")
    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        parser.error(f"--parts: unknown part(s) {unknown}; choose from {list(PARTS)}")
    if args.cifar_batch is not None and args.cifar_batch < 1:
        parser.error(f"--cifar-batch must be at least 1, got {args.cifar_batch}")
    budget = Budget(60 * args.budget_minutes)
    Path(args.out).mkdir(parents=True, exist_ok=True)
    # JAX: compiled programs are cached on disk, so the memory probes' processes (and the A/A control,
    # whose program is the plain one's) need not compile again.
    os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(Path(tempfile.gettempdir()) / "tf_gradmix-jax-cache"))
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

    import keras

    import tf_gradmix as gm

    kind, device = accelerator(args.quick)
    results = {"backend": keras.backend.backend(), "platform": kind, "device": device,
               "keras": keras.__version__, "tf_gradmix": gm.__version__, "python": platform.python_version(),
               "budget_minutes": args.budget_minutes, "quick": args.quick,
               "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "skipped": {}}
    if keras.backend.backend() == "jax":
        import jax

        results["jax"] = jax.__version__
    say(f"{device} ({kind}), Keras {keras.__version__} on {keras.backend.backend()}, budget {args.budget_minutes} min")
    size = sizes(args.quick)
    run = {"overhead": part_overhead, "weights_and_accumulation": part_weights_and_accumulation,
           "cifar_large_batch": part_cifar_large_batch}
    for name in PARTS:
        if name not in parts:
            results["skipped"][name] = "not in --parts"
            continue
        if name == "cifar_large_batch":
            from examples import cifar10

            try:
                if cifar10.find_cifar10(args.data_dir) is None:
                    results["skipped"][name] = "no --data-dir (or $TF_GRADMIX_DATA) with the CIFAR-10 JPEG copy"
                    continue
            except FileNotFoundError as error:
                results["skipped"][name] = str(error)
                continue
        try:
            budget.check(f"part {name}")
            with budget.alarm():
                run[name](args, size, budget, results)
        except BudgetExhausted as stop:
            results["skipped"][name] = f"stopped: {stop}"
            say(f"{name}: {stop}")
        write(args.out, results)
    results["seconds"] = budget.seconds - budget.left()
    write(args.out, results)
    path = figure(args.out, results)
    say(f"results in {Path(args.out) / RESULTS_NAME}" + (f", figure {path}" if path else ""))
    return results


if __name__ == "__main__":
    main()
