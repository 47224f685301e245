"""JAX only: ``keras.distribution.DataParallel`` on 4 CPU devices, no TensorFlow, resume, several processes.

The exactness tests shared with TensorFlow (every reduction, masked
sequences, several outputs, ``stddev=0``, the weights ``fit`` applies,
seeds, saving) are in test_model.py, test_optimizer.py and test_noise.py,
which run on both backends. Here: what only JAX has.
"""

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
from jax_steps import conditionals, traced_train_step

import tf_gradmix as gm

from oracles import (
    SCCE,
    assert_float32_close,
    data,
    flat,
    functional,
    mixer,
    numpy,
    per_example_gradients,
    plain_copy,
    regularization_gradient,
    weights_of,
)

pytestmark = pytest.mark.backends("jax")

WORKER = Path(__file__).resolve().parents[2] / "workers" / "jax_worker.py"
B, K = 16, 4


def data_parallel():
    import jax

    assert len(jax.devices()) == K, "conftest configures 4 CPU devices"
    return keras.distribution.DataParallel(devices=jax.devices())


def one_step(level, distribution=None, noise="gaussian", model_class=None):
    """One ``fit`` step (SGD(1.0): the update is the gradient) under ``distribution``."""
    x, y = data(B)
    scope = distribution.scope() if distribution is not None else _nothing()
    with scope:
        model = functional(model_class)
        ref = plain_copy(model)
        opt = mixer(noise, stddev=0.7, seed=5, level=level)
        model.compile(opt, SCCE)
        before = flat(weights_of(model))
        history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))
    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    return update, grads, regularization_gradient(ref, x), opt, history


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_data_parallel_sample_level_equals_the_oracle_and_the_one_device_run():
    """Weights are a function of the example's index in the global batch, so 1 and 4 devices agree."""
    update_4, grads, reg, opt, history = one_step("sample", data_parallel())
    w = numpy(opt.example_weights(B, step=0)).astype(np.float64)
    assert_float32_close(update_4, grads.T @ w / B + reg)
    assert history.history["gradmix_gamma"][0] == pytest.approx(np.mean(w**2), rel=1e-6)

    update_1, *_ = one_step("sample")
    assert_float32_close(update_1, update_4)


def test_data_parallel_device_level_weights_each_shard():
    """Eq. 3 with K = 4 shards of 4 examples: ``sum_k (w_k / K) g_k``."""
    distribution = data_parallel()
    with distribution.scope():
        assert gm.GradientMix(keras.optimizers.SGD()).num_devices() == K
    update, grads, reg, opt, history = one_step("device", distribution)
    w = numpy(opt.device_weights(K, step=0)).astype(np.float64)
    per_example = np.repeat(w, B // K)  # shard k = examples [4k, 4k + 4)
    assert_float32_close(update, grads.T @ per_example / B + reg)
    assert history.history["gradmix_gamma"][0] == pytest.approx(np.mean(w**2), rel=1e-6)
    # Not the sample level's weights, and not plain averaging.
    assert not np.allclose(update, grads.T @ np.ones(B) / B + reg, rtol=1e-3)


def test_device_level_on_a_stock_model_is_refused_on_jax():
    """The gradients reaching the optimizer are global: only the model hook can weight shards."""
    with data_parallel().scope():
        model = functional(keras.Model)
        model.compile(mixer(level="device"), SCCE)
        # Raised while the step is traced, before any update. (A stock model
        # has no tf_gradmix train function to put its state back, and
        # Keras's JAX fit leaves the variables unreadable after an error.)
        with pytest.raises(ValueError, match=r"level='device'.*each shard of the global batch.*tf_gradmix\.enable"):
            model.fit(*data(B), batch_size=B, verbose=0)


def test_device_level_on_one_device_warns():
    with pytest.warns(UserWarning, match="single replica"):
        one_step("device")


# -- processes -----------------------------------------------------------------


def worker(spec, check=True, timeout=600):
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    result = subprocess.run(
        [sys.executable, str(WORKER), json.dumps(spec)], capture_output=True, text=True, timeout=timeout, env=env
    )
    if check:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


NO_TENSORFLOW = r"""
import sys

class NoTensorFlow:
    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            raise ImportError(f"TensorFlow is not installed here ({name})")

sys.meta_path.insert(0, NoTensorFlow())

import keras, numpy as np
import tf_gradmix as gm

assert keras.backend.backend() == "jax"
model = gm.Sequential([keras.Input((4,)), keras.layers.Dense(3)])
model.compile(optimizer=gm.GradientMix(gm.optimizers.LAMB(1e-2), noise="rademacher", seed=1),
              loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
history = model.fit(np.ones((8, 4), "float32"), np.arange(8) % 3, batch_size=4, epochs=2, verbose=0,
                    callbacks=[gm.GammaLogger()])
assert "tensorflow" not in sys.modules
for name in ("diagnostics", "per_example"):
    try:
        getattr(gm, name)
    except (RuntimeError, ImportError) as error:
        print(name, "refused:", error)
print("trained", history.history["gradmix_gamma"])
"""


def test_import_and_train_without_tensorflow():
    """TensorFlow's import is blocked (as if it were not installed): tf_gradmix imports and trains on JAX."""
    env = dict(os.environ, KERAS_BACKEND="jax")
    result = subprocess.run([sys.executable, "-c", NO_TENSORFLOW], capture_output=True, text=True,
                            timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained [" in result.stdout
    assert "diagnostics refused: tf_gradmix.diagnostics supports the Keras backends 'tensorflow'" in result.stdout
    assert "per_example refused: tf_gradmix.per_example supports the Keras backends 'tensorflow'" in result.stdout


SEEDS = (11, None)


@pytest.fixture(scope="module")
def resumed_runs(tmp_path_factory):
    """Per seed: a process SIGKILLed mid-epoch, then (one process for both seeds) its restart and the straight run."""
    killed, runs = {}, []
    for seed in SEEDS:
        folder = tmp_path_factory.mktemp(f"resume_{seed}")
        backup = str(folder / "backup")
        killed[seed] = (worker({"mode": "resume", "seed": seed, "backup": backup, "kill_at": [1, 2],
                                "out": str(folder / "killed.npz")}, check=False), folder)
        # The restart resumes, then trains the uninterrupted run with the seed the
        # resumed run ended with (a fresh model and optimizer, an empty backup folder).
        runs.append({"seed": seed, "backup": backup, "out": str(folder / "resumed.npz"),
                     "straight_backup": str(folder / "other"), "straight_out": str(folder / "straight.npz")})
    worker({"mode": "resume", "runs": runs})
    return killed


@pytest.mark.parametrize("seed", SEEDS)
def test_sigkill_mid_epoch_then_restart_ends_like_an_uninterrupted_run(resumed_runs, seed):
    """``BackupAndRestore`` (epoch backups) continues the noise stream, also with ``seed=None``."""
    killed, folder = resumed_runs[seed]
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (folder / "killed.npz").exists()
    resumed = np.load(folder / "resumed.npz")
    straight = np.load(folder / "straight.npz")
    assert int(straight["seed"]) == int(resumed["seed"])
    assert int(resumed["raw_step"]) == int(straight["raw_step"]) == 12
    names = [n for n in straight.files if n.startswith("arr_")]
    for name in names:
        np.testing.assert_array_equal(resumed[name], straight[name])


def test_two_processes_on_loopback_end_identical_and_equal_to_the_oracle(tmp_path):
    """``keras.distribution.initialize`` over 2 processes of 2 CPU devices each: one mesh of K = 4; also
    two micro-batches accumulated into one update, each device its own share."""
    port = gm.distribute.free_local_ports(1)[0]
    batch, steps = 16, 2
    specs = [{"mode": "multi_process", "port": port, "num_processes": 2, "process_id": p, "local_devices": 2,
              "batch": batch, "steps": steps, "out": str(tmp_path / f"p{p}.npz")} for p in range(2)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    processes = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for spec in specs]
    outputs = [p.communicate(timeout=600)[0] for p in processes]
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    results = [np.load(tmp_path / f"p{p}.npz") for p in range(2)]
    assert int(results[0]["devices"]) == K
    for name in results[0].files:
        np.testing.assert_array_equal(results[0][name], results[1][name])

    # The oracle: the same steps of SGD(1.0) on the global batches, one example at a time.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 5)).astype("float32")
    y = rng.integers(0, 3, batch * steps)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    ref = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    shapes = [w.shape for w in ref.get_weights()]
    for level in ("sample", "device"):
        flat_weights = results[0][f"{level}/initial"].astype(np.float64)
        for step in range(steps):
            split = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
            ref.set_weights([w.reshape(s).astype("float32") for w, s in zip(np.split(flat_weights, split), shapes)])
            part = slice(step * batch, (step + 1) * batch)
            grads = per_example_gradients(ref, x[part], y[part], loss_fn)
            w = results[0][f"{level}/weights"][step].astype(np.float64)
            if level == "device":
                w = np.repeat(w, batch // K)  # process p feeds shards 2p, 2p + 1
            flat_weights = flat_weights - grads.T @ w / batch
        assert_float32_close(results[0][f"{level}/final"], flat_weights)

    # Accumulated: one update, the mean of the micro-batches' mixed gradients, each device its own share.
    assert bool(results[0]["accumulated/per_device"]) and int(results[0]["accumulated/update_steps"]) == 1
    flat_weights = results[0]["sample/initial"].astype(np.float64)
    ref.set_weights([w.reshape(s).astype("float32") for w, s in zip(np.split(flat_weights, split), shapes)])
    mean = 0
    for step in range(steps):
        part = slice(step * batch, (step + 1) * batch)
        grads = per_example_gradients(ref, x[part], y[part], loss_fn)
        mean = mean + grads.T @ results[0]["sample/weights"][step].astype(np.float64) / batch / steps
    assert_float32_close(results[0]["accumulated/final"], flat_weights - mean)


def _state_positions(model, jaxpr_out_leaves):
    """``(input, output)`` positions in a traced train step of each optimizer variable's value."""
    offset = len(model.trainable_variables) + len(model.non_trainable_variables)
    logs = jaxpr_out_leaves - offset - len(model.optimizer.variables) - len(model.metrics_variables)
    return [(offset + i, logs + offset + i) for i in range(len(model.optimizer.variables))]


@pytest.mark.parametrize("level", ["sample", "device"])
def test_fit_runs_a_micro_step_that_makes_no_update(level):
    """``fit`` with ``gradient_accumulation_steps=2`` runs a compiled micro-step
    and a compiled update step, in turn. Neither holds a conditional; in the
    micro-step every optimizer variable but the accumulators and the two step
    counters is its input, untouched (Adam's moments are not even read), so a
    micro-step computes no update. Traced without a phase (a custom loop), the
    step holds one conditional, Keras's path four or more
    (tests/upstream/test_keras_jax.py)."""
    from tf_gradmix.backend.jax import optimizer as jax_optimizer

    x, y = data(B)
    with data_parallel().scope():
        model = functional()
        model.compile(mixer(level=level, inner=keras.optimizers.Adam(gradient_accumulation_steps=2)), SCCE)
        model.fit(*data(4 * B), batch_size=B, epochs=1, verbose=0)
        assert model.train_function.__wrapped__.steps_run == {"micro_step": 2, "update_step": 2}
        optimizer, inner = model.optimizer, model.optimizer.inner_optimizer
        changing = {id(v) for v in inner._accumulated_gradients} | {id(optimizer.raw_step), id(inner._iterations)}
        moments = [v for v in inner.variables if "momentum" in v.path or "velocity" in v.path]
        assert len(moments) == 2 * len(model.trainable_variables)
        for name in jax_optimizer.PHASES:
            with jax_optimizer.phase(name):
                jaxpr = traced_train_step(model, x, y)
            assert conditionals(jaxpr) == 0
            passed_through = [
                v for v, (i, o) in zip(optimizer.variables, _state_positions(model, len(jaxpr.outvars)))
                if jaxpr.outvars[o] is jaxpr.invars[i]
            ]
            if name == "micro_step":
                assert {id(v) for v in passed_through} == {id(v) for v in optimizer.variables} - changing
            else:
                assert not any(any(v is m for m in moments) for v in passed_through)
        assert conditionals(traced_train_step(model, x, y)) == 1


def test_an_enabled_model_runs_the_two_compiled_steps_with_the_same_updates():
    """``gm.enable`` installs the same micro-step and update step as ``gm.Model``:
    equal weights after two updates of LAMB, the same steps run."""
    x, y = data(4 * B)
    runs = []
    for enabled in (True, False):
        model = gm.enable(functional(keras.Model)) if enabled else functional()
        inner = gm.optimizers.LAMB(0.05, epsilon=0.01, gradient_accumulation_steps=2)
        model.compile(mixer(stddev=0.7, inner=inner), SCCE)
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        assert model.train_function.__wrapped__.steps_run == {"micro_step": 2, "update_step": 2}
        runs.append(flat(weights_of(model)))
    np.testing.assert_array_equal(runs[0], runs[1])


def _adam_model(steps_per_execution):
    model = functional()
    model.compile(mixer(stddev=0.7, inner=keras.optimizers.Adam(0.05, epsilon=0.01, gradient_accumulation_steps=2)),
                  SCCE, steps_per_execution=steps_per_execution)
    return model


@functools.cache
def _one_device_adam_in_two_fits(steps_per_execution):
    """Adam, windows of 2, on one device: two ``fit`` calls of 3 micro-batches of ``data(6 * B)``
    (the second starts mid-window). Trained once for the tests below that compare with it:
    ``(accumulators after the first fit, iterations, final weights)``, flat."""
    x, y = data(6 * B)
    model = _adam_model(steps_per_execution)
    model.fit(x[: 3 * B], y[: 3 * B], batch_size=B, epochs=1, shuffle=False, verbose=0)
    accumulated = flat([a.value for a in model.optimizer.inner_optimizer._accumulated_gradients])
    model.fit(x[3 * B:], y[3 * B:], batch_size=B, epochs=1, shuffle=False, verbose=0)
    return accumulated, int(numpy(model.optimizer.iterations)), flat(weights_of(model))


def test_the_host_counts_micro_steps_across_steps_per_execution_and_fits():
    """The host chooses each step's phase by its own count of the raw step
    counter: with ``steps_per_execution=3`` (windows of 2 straddle the calls)
    and over two ``fit`` calls of 3 micro-batches each (the second starts
    mid-window), Adam ends where one ``fit`` of the same 6 micro-batches ends."""
    x, y = data(6 * B)
    model = _adam_model(1)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    assert int(numpy(model.optimizer.iterations)) == 3
    one_fit = flat(weights_of(model))
    _, iterations, two_fits = _one_device_adam_in_two_fits(3)
    assert iterations == 3
    np.testing.assert_allclose(two_fits, one_fit, rtol=0, atol=1e-6 * np.max(np.abs(one_fit)))


def test_accumulation_under_data_parallel_equals_the_one_device_run():
    """Two micro-batches of 16 on 4 devices, Adam: the same weights as on one device."""
    x, y = data(4 * B)
    runs = []
    for distribution in (data_parallel(), None):
        with distribution.scope() if distribution is not None else _nothing():
            model = functional()
            inner = keras.optimizers.Adam(0.05, epsilon=0.01, gradient_accumulation_steps=2)
            model.compile(mixer(stddev=0.7, inner=inner), SCCE)
            before = flat(weights_of(model))
            model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        runs.append(flat(weights_of(model)) - before)
        assert int(numpy(model.optimizer.iterations)) == 2
    np.testing.assert_allclose(runs[0], runs[1], rtol=0, atol=1e-5 * np.max(np.abs(runs[1])))


def _gradient_collectives(model, x, y):
    """``{phase: collectives}`` of the compiled per-device micro-step and update step, and of the global ones."""
    import jax
    from jax.sharding import NamedSharding, PartitionSpec
    from jax_steps import collectives

    function = model.train_function.__wrapped__
    window = function.device_window
    distribution = keras.distribution.distribution()
    sharded = NamedSharding(distribution.device_mesh.backend_mesh, PartitionSpec(distribution.batch_dim_name))
    batch = (jax.device_put(x, sharded), jax.device_put(y, sharded))
    state = model._get_jax_state(trainable_variables=True, non_trainable_variables=True,
                                 optimizer_variables=True, metrics_variables=True)
    found = {}
    for name, step in window.compiled.items():
        found[name] = collectives(step.lower(state, window.zeros(), batch).compile().as_text())
        found["global " + name] = collectives(function.compiled_steps[name].lower(state, batch).compile().as_text())
    return found


@pytest.mark.parametrize("level", ["sample", "device"])
def test_data_parallel_micro_step_communicates_no_gradient(level):
    """Under DataParallel each device accumulates its own share: the compiled
    micro-step holds no collective over a gradient (only the scalar loss that
    ``fit`` logs is reduced), and the update step all-reduces every gradient
    once. The global steps (a forward pass that cannot run per device) reduce
    the gradients on every micro-step."""
    x, y = data(4 * B)
    with data_parallel().scope():
        model = functional()
        model.compile(mixer(level=level, inner=keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2)),
                      SCCE)
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        assert model.train_function.__wrapped__.device_window.active
        found = _gradient_collectives(model, x[:B], y[:B])
    shapes = sorted(tuple(v.shape) for v in model.trainable_variables)

    def gradient_shapes(ops):
        return sorted(shape for _, operands in ops for shape in operands if shape)

    assert all(op == "all-reduce" for ops in found.values() for op, _ in ops), found
    assert gradient_shapes(found["micro_step"]) == [], found["micro_step"]
    assert len(found["micro_step"]) <= 1  # the logged loss
    assert gradient_shapes(found["update_step"]) == shapes, found["update_step"]
    # What the per-device window saves: the global micro-step reduces every gradient.
    assert len(gradient_shapes(found["global micro_step"])) == len(shapes)


def _stock_one_device_changes(make_inner, x, y, weights, updates):
    """Weight changes of stock Keras on one device, each example weighted by ``weights`` (its ``sample_weight``)."""
    model = functional(keras.Model)
    model.compile(make_inner(), SCCE)
    before = flat(weights_of(model))
    model.fit(x, y, sample_weight=weights, batch_size=B, epochs=1, shuffle=False, verbose=0)
    assert int(numpy(model.optimizer.iterations)) == updates
    return flat(weights_of(model)) - before


PER_DEVICE_INNER = {
    "sgd_momentum": lambda: keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=3),
    "lamb": lambda: gm.optimizers.LAMB(0.1, epsilon=0.01, gradient_accumulation_steps=3),
}


@pytest.mark.parametrize("name", sorted(PER_DEVICE_INNER))
@pytest.mark.parametrize("level", ["sample", "device"])
def test_per_device_accumulation_equals_the_one_device_run(level, name):
    """Two updates of three micro-batches of 16 on 4 devices, each device
    accumulating its own share, against stock Keras accumulating on one
    device with every example weighted by the weight GradientMix draws for
    it (sample level: ``w_b`` by its index in the global micro-batch; device
    level: ``w_k`` of its shard). The mixed weights are unchanged, so only
    the order of the sums differs: each device sums its own shares, then
    the update sums the devices. That changes the accumulated gradient by
    float32 rounding of the magnitudes summed (``sum |w_b g_b| / B`` over
    the window, more than the element itself where shares cancel), and the
    weights, which add the updates to themselves, by rounding of their own
    magnitude: the tolerance is 32 float32 ulps of the larger."""
    steps, updates = 3, 2
    x, y = data(steps * updates * B)
    with data_parallel().scope():
        model = functional()
        opt = mixer(level=level, inner=PER_DEVICE_INNER[name]())
        model.compile(opt, SCCE)
        before = flat(weights_of(model))
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        function = model.train_function.__wrapped__
        assert function.device_window.active and not function.device_window.pending
        assert function.steps_run == {"micro_step": 4, "update_step": 2}
        changes = flat(weights_of(model)) - before
    draws = range(steps * updates)
    if level == "sample":
        weights = np.concatenate([numpy(opt.example_weights(B, step=s)) for s in draws])
    else:
        weights = np.concatenate([np.repeat(numpy(opt.device_weights(K, step=s)), B // K) for s in draws])
    expected = _stock_one_device_changes(PER_DEVICE_INNER[name], x, y, weights, updates)
    ref = plain_copy(functional())
    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    summed = np.abs(grads).T @ np.abs(weights.astype(np.float64)) / B  # every share of every window, in magnitude
    assert_float32_close(changes, expected, scale=max(np.max(summed), np.max(np.abs(before))))


class _ReadsTheModel(keras.callbacks.Callback):
    """Reads ``self.model`` after every batch: ``fit`` writes its state back to the variables each time."""

    def on_train_batch_end(self, batch, logs=None):
        self.model  # noqa: B018 (the read is the point)


@pytest.mark.parametrize("sync_every_step, steps_per_execution", [(False, 3), (True, 1)])
def test_per_device_windows_across_fits_and_state_syncs_end_like_one_fit(sync_every_step, steps_per_execution):
    """Adam, windows of 2 under DataParallel, two ``fit`` calls of 3
    micro-batches (the second starts mid-window), with ``steps_per_execution=3``
    (windows straddle the calls) or with a callback
    that makes ``fit`` write its state back after every step: the unfinished
    window's shares reach Keras's accumulators whenever the state is written
    back, so after the first ``fit`` they hold the third micro-batch's
    gradient (as on one device) and both runs end where one ``fit`` of the
    6 micro-batches on one device ends."""
    x, y = data(6 * B)
    callbacks = [_ReadsTheModel()] if sync_every_step else []
    with data_parallel().scope():
        model = _adam_model(steps_per_execution)
        model.fit(x[: 3 * B], y[: 3 * B], batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        window = model.train_function.__wrapped__.device_window
        assert window.active and not window.pending
        accumulated = flat([a.value for a in model.optimizer.inner_optimizer._accumulated_gradients])
        model.fit(x[3 * B:], y[3 * B:], batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=callbacks)
        assert int(numpy(model.optimizer.iterations)) == 3
        assert model.train_function.__wrapped__.steps_run == {"micro_step": 3, "update_step": 3}
        distributed = flat(weights_of(model))

    one_accumulated, _, one = _one_device_adam_in_two_fits(steps_per_execution)
    assert_float32_close(accumulated, one_accumulated)
    np.testing.assert_allclose(distributed, one, rtol=0, atol=1e-6 * np.max(np.abs(distributed)))


def test_a_forward_pass_that_is_not_per_example_keeps_the_global_steps():
    """BatchNormalization normalises over the global batch and updates its
    statistics: one device's shard alone would give another forward pass, so
    the accumulation stays global (gradients all-reduced on every micro-step),
    says so, and updates as on one device."""
    x, y = data(4 * B)

    def make_model():
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        h = keras.layers.BatchNormalization()(keras.layers.Dense(8, activation="tanh")(inputs))
        model = gm.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
        model.compile(mixer(stddev=0.7, inner=keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=2)),
                      SCCE)
        return model

    with data_parallel().scope():
        model = make_model()
        with pytest.warns(UserWarning, match=r"one all-reduce of the gradients per micro-step.*non-trainable state"):
            model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        function = model.train_function.__wrapped__
        assert not function.device_window.active
        assert function.steps_run == {"micro_step": 2, "update_step": 2}
        distributed = flat(weights_of(model))
    one = make_model()
    one.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    np.testing.assert_allclose(distributed, flat(weights_of(one)), rtol=0, atol=1e-6 * np.max(np.abs(distributed)))


def _masked_sequences(n):
    rng = np.random.default_rng(3)
    tokens = np.zeros((n, 6), "int32")
    for b, length in enumerate(rng.integers(2, 7, n)):
        tokens[b, :length] = rng.integers(1, 20, length)
    return tokens, rng.integers(0, 4, (n, 6))


@pytest.mark.parametrize("case", ["masked_sequences", "mean_with_sample_weight"])
def test_per_device_accumulation_keeps_losses_normalised_over_the_global_batch(case):
    """Losses whose denominator spans the global batch (the valid tokens of a
    masked sequence loss, the sum of the sample weights) are not the mean of
    per-shard losses; the per-device window keeps the global loss, so two
    updates of two micro-batches on 4 devices equal the same GradientMix
    run on one device."""
    steps = 2
    if case == "masked_sequences":
        x, y = _masked_sequences(2 * steps * B)
        sample_weight, loss = None, keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    else:
        x, y = data(2 * steps * B)
        sample_weight = np.random.default_rng(4).uniform(0.2, 2.0, len(x)).astype("float32")
        loss = keras.losses.SparseCategoricalCrossentropy(reduction="mean_with_sample_weight")

    def run():
        if case == "masked_sequences":
            keras.utils.set_random_seed(1)
            inputs = keras.Input((6,), dtype="int32")
            h = keras.layers.Dense(8, activation="tanh")(keras.layers.Embedding(20, 8, mask_zero=True)(inputs))
            model = gm.Model(inputs, keras.layers.Dense(4)(h))
        else:
            model = functional(regularizer=False)
        inner = keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=steps)
        model.compile(mixer(stddev=0.8, inner=inner), loss)
        before = flat(weights_of(model))
        model.fit(x, y, sample_weight=sample_weight, batch_size=B, epochs=1, shuffle=False, verbose=0)
        return model, before, flat(weights_of(model)) - before

    with data_parallel().scope():
        model, before, changes = run()
        assert model.train_function.__wrapped__.device_window.active
    _, _, expected = run()
    assert_float32_close(changes, expected, scale=np.max(np.abs(before)))
