"""PyTorch only: one device inside ``fit``, ``DistributedDataParallel`` in a custom loop, refusals.

The exactness tests shared with TensorFlow and JAX (every reduction, masked
sequences, several outputs, ``stddev=0``, the weights ``fit`` applies,
seeds, saving, accumulation, LAMB/LARS) are in the shared modules of
tests/library, which run on every backend. Here: what only PyTorch has.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest

import tf_gradmix as gm
from tf_gradmix.optimizer import sample_hook

from oracles import (
    SCCE,
    assert_float32_close,
    data,
    flat,
    functional,
    mixer,
    per_example_gradients,
    plain_copy,
    regularization_gradient,
    weights_of,
)

pytestmark = pytest.mark.backends("torch")

WORKER = Path(__file__).resolve().parents[2] / "workers" / "torch_worker.py"
B = 16


def test_jit_compile_is_refused_by_name():
    model = functional(gm.Model)
    model.compile(mixer(), SCCE, jit_compile=True)
    with pytest.raises(ValueError, match=r"PyTorch backend does not support `jit_compile=True`.*jit_compile=False"):
        model.fit(*data(B), batch_size=B, verbose=0)


def test_fit_again_keeps_the_train_function_and_checks_the_loss_once():
    """Each ``fit`` reuses the wrapped train function: no wrapper piles up, the mixing check runs once."""
    x, y = data(B)
    model = functional(gm.Model)
    model.compile(mixer(), SCCE)
    model.fit(x, y, batch_size=B, verbose=0)
    function = model.train_function
    model.fit(x, y, batch_size=B, verbose=0)
    assert model.train_function is function
    assert sample_hook(model).checked_function is function


@pytest.mark.parametrize("level", ["sample", "device"])
def test_a_stock_model_is_refused_before_any_update(level):
    model = functional(keras.Model)
    before = flat(weights_of(model))
    model.compile(mixer(level=level), SCCE)
    with pytest.raises(ValueError, match=r"tf_gradmix\.enable"):
        model.fit(*data(B), batch_size=B, verbose=0)
    np.testing.assert_array_equal(flat(weights_of(model)), before)


def test_device_level_in_fit_is_one_device_weight_and_warns():
    """Keras's PyTorch ``fit`` trains one device: every example gets ``w_0`` (a random step length)."""
    x, y = data(B)
    model = functional(gm.Model)
    ref = plain_copy(model)
    opt = mixer(stddev=0.7, level="device")
    model.compile(opt, SCCE)
    before = flat(weights_of(model))
    with pytest.warns(UserWarning, match="single replica"):
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))
    w0 = float(keras.ops.convert_to_numpy(opt.device_weights(step=0))[0])
    assert opt.num_devices() == 1
    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    expected = w0 * grads.mean(axis=0) + regularization_gradient(ref, x)  # SGD(1.0): the update is the gradient
    assert_float32_close(update, expected)


@pytest.mark.slow  # two worker processes
def test_two_ddp_processes_on_loopback_end_identical_and_equal_to_the_oracle(tmp_path):
    """Two gloo processes under ``DistributedDataParallel``: device and sample level against the oracle."""
    port = gm.distribute.free_local_ports(1)[0]
    batch, steps, world = 8, 2, 2
    specs = [{"mode": "ddp", "port": port, "rank": r, "world_size": world, "batch": batch, "steps": steps,
              "out": str(tmp_path / f"r{r}.npz")} for r in range(world)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[3]))
    processes = [subprocess.Popen([sys.executable, str(WORKER), json.dumps(spec)], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for spec in specs]
    try:
        outputs = [p.communicate(timeout=300)[0] for p in processes]  # a hang guard, not a timing check
    finally:
        for p in processes:
            if p.poll() is None:
                p.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0, output[-3000:]
    results = [np.load(tmp_path / f"r{r}.npz") for r in range(world)]
    assert int(results[0]["world_size"]) == world
    for level in ("device", "sample"):
        np.testing.assert_array_equal(results[0][f"{level}/final"], results[1][f"{level}/final"])
    np.testing.assert_array_equal(results[0]["device/weights"], results[1]["device/weights"])
    assert not np.array_equal(results[0]["sample/weights"], results[1]["sample/weights"])  # one stream each

    # The oracle: the same steps of SGD(1.0) on the global batches, one example at a time.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(batch * steps, 5)).astype("float32")
    y = rng.integers(0, 3, batch * steps)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    ref = keras.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    shapes = [w.shape for w in ref.get_weights()]
    split = np.cumsum([int(np.prod(s)) for s in shapes])[:-1]
    for level in ("device", "sample"):
        flat_weights = results[0][f"{level}/initial"].astype(np.float64)
        for step in range(steps):
            ref.set_weights([w.reshape(s).astype("float32") for w, s in zip(np.split(flat_weights, split), shapes)])
            part = slice(step * batch, (step + 1) * batch)
            grads = per_example_gradients(ref, x[part], y[part], loss_fn)
            if level == "device":
                w = np.repeat(results[0]["device/weights"][step].astype(np.float64), batch // world)
            else:
                w = np.concatenate([r["sample/weights"][step] for r in results]).astype(np.float64)
            flat_weights = flat_weights - grads.T @ w / batch
        assert_float32_close(results[0][f"{level}/final"], flat_weights)


@pytest.mark.parametrize("seed", [11, None])
def test_backup_and_restore_after_an_interruption_continues_the_same_noise_stream(tmp_path, seed):
    """``BackupAndRestore`` (epoch backups): an interrupted run restarted with a new model and
    optimizer (also ``seed=None``: the backup holds the seed) ends like an uninterrupted one."""
    x, y = data(32)

    def run(backup, seed, interrupt_at=None):
        model = functional(gm.Model)
        opt = gm.GradientMix(keras.optimizers.SGD(0.1, momentum=0.9), stddev=1.0, seed=seed)
        model.compile(opt, SCCE)
        callbacks = [keras.callbacks.BackupAndRestore(str(backup))]
        if interrupt_at is not None:
            callbacks.append(Interrupt(*interrupt_at))
        model.fit(x, y, batch_size=8, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
        return model, opt

    with pytest.raises(KeyboardInterrupt):
        run(tmp_path / "backup", seed, interrupt_at=(1, 2))
    resumed, opt = run(tmp_path / "backup", None if seed is None else 99)  # the backup's seed wins
    straight, _ = run(tmp_path / "straight", opt.seed)
    assert seed is None or opt.seed == seed
    for a, b in zip(resumed.get_weights(), straight.get_weights()):
        np.testing.assert_array_equal(a, b)


class Interrupt(keras.callbacks.Callback):
    def __init__(self, epoch, batch):
        super().__init__()
        self.at, self.epoch = (epoch, batch), 0

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_begin(self, batch, logs=None):
        if (self.epoch, batch) == self.at:
            raise KeyboardInterrupt


def test_gamma_logger_keeps_the_gamma_a_hooked_model_logs():
    x, y = data(B)
    model = functional(gm.Model)
    opt = mixer(level="device")
    model.compile(opt, SCCE)
    with pytest.warns(UserWarning, match="single replica"):
        history = model.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0, callbacks=[gm.GammaLogger()])
    w = [float(keras.ops.convert_to_numpy(opt.device_weights(step=s))[0]) for s in range(2)]
    assert history.history["gradmix_gamma"][0] == pytest.approx(np.mean(np.square(w)), rel=1e-6)


@pytest.mark.parametrize("module", ["tf_gradmix.diagnostics", "tf_gradmix.per_example"])
def test_tensorflow_only_modules_are_refused_by_name(module):
    import importlib

    with pytest.raises(RuntimeError, match=rf"{module} supports the Keras backends 'tensorflow'.*'torch'"):
        importlib.import_module(module)
