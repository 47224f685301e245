"""JAX only: ``keras.distribution.DataParallel`` on 4 CPU devices, no TensorFlow, resume, several processes.

The exactness tests shared with TensorFlow (every reduction, masked
sequences, several outputs, ``stddev=0``, the weights ``fit`` applies,
seeds, saving) are in test_model.py, test_optimizer.py and test_noise.py,
which run on both backends. Here: what only JAX has.
"""

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
    env.pop("XLA_FLAGS", None)
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


@pytest.mark.parametrize("seed", [11, None])
def test_sigkill_mid_epoch_then_restart_ends_like_an_uninterrupted_run(tmp_path, seed):
    """``BackupAndRestore`` (epoch backups) continues the noise stream, also with ``seed=None``."""
    backup = str(tmp_path / "backup")
    killed = worker({"mode": "resume", "seed": seed, "backup": backup, "kill_at": [1, 2],
                     "out": str(tmp_path / "killed.npz")}, check=False)
    assert killed.returncode == -9, killed.stderr[-3000:]
    assert not (tmp_path / "killed.npz").exists()
    # The restarted process resumes, then trains the uninterrupted run with the
    # seed the resumed run ended with (a fresh model and optimizer, an empty backup folder).
    worker({"mode": "resume", "seed": seed, "backup": backup, "out": str(tmp_path / "resumed.npz"),
            "straight_backup": str(tmp_path / "other"), "straight_out": str(tmp_path / "straight.npz")})
    resumed = np.load(tmp_path / "resumed.npz")
    straight = np.load(tmp_path / "straight.npz")
    assert int(straight["seed"]) == int(resumed["seed"])
    assert int(resumed["raw_step"]) == int(straight["raw_step"]) == 12
    names = [n for n in straight.files if n.startswith("arr_")]
    for name in names:
        np.testing.assert_array_equal(resumed[name], straight[name])


def test_two_processes_on_loopback_end_identical_and_equal_to_the_oracle(tmp_path):
    """``keras.distribution.initialize`` over 2 processes of 2 CPU devices each: one mesh of K = 4."""
    port = gm.distribute.free_local_ports(1)[0]
    batch, steps = 16, 2
    specs = [{"mode": "multi_process", "port": port, "num_processes": 2, "process_id": p, "local_devices": 2,
              "batch": batch, "steps": steps, "out": str(tmp_path / f"p{p}.npz")} for p in range(2)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    env.pop("XLA_FLAGS", None)
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


def test_the_host_counts_micro_steps_across_steps_per_execution_and_fits():
    """The host chooses each step's phase by its own count of the raw step
    counter: with ``steps_per_execution=3`` (windows of 2 straddle the calls)
    and over two ``fit`` calls of 3 micro-batches each (the second starts
    mid-window), Adam ends where one ``fit`` of the same 6 micro-batches ends."""
    x, y = data(6 * B)
    runs = []
    for steps_per_execution, parts in ((1, [slice(0, 6 * B)]), (3, [slice(0, 3 * B), slice(3 * B, 6 * B)])):
        model = functional()
        inner = keras.optimizers.Adam(0.05, epsilon=0.01, gradient_accumulation_steps=2)
        model.compile(mixer(stddev=0.7, inner=inner), SCCE, steps_per_execution=steps_per_execution)
        for part in parts:
            model.fit(x[part], y[part], batch_size=B, epochs=1, shuffle=False, verbose=0)
        assert int(numpy(model.optimizer.iterations)) == 3
        runs.append(flat(weights_of(model)))
    np.testing.assert_allclose(runs[1], runs[0], rtol=0, atol=1e-6 * np.max(np.abs(runs[0])))


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
