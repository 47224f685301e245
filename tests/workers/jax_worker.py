"""A JAX training process for tests/library/backend/test_jax.py, configured by a JSON spec in argv[1].

Modes:

* ``"resume"``: ``fit`` with ``BackupAndRestore`` (epoch backups); with
  ``kill_at`` ``[epoch, batch]`` the process sends itself SIGKILL at the start
  of that batch. Writes the final weights to ``out`` (npz). With
  ``straight_out``, the same process then trains the uninterrupted run with
  the seed it ended with (a new model and optimizer, an empty backup folder
  ``straight_backup``) and writes it there: one process start fewer. With
  ``runs``, a list of such specs, one process trains them in turn.
* ``"multi_process"``: one of ``num_processes`` JAX processes joined through
  ``keras.distribution.initialize`` on 127.0.0.1; ``DataParallel`` over every
  device of every process; each process feeds its half of each global batch.
  Trains at the sample and at the device level, then accumulates the same
  micro-batches into one update (sample level); writes the initial and final
  weights and the mixing weights of each step to ``out``.
"""

import json
import os
import signal
import sys

SPEC = json.loads(sys.argv[1])
os.environ["KERAS_BACKEND"] = "jax"
# This process's device count; XLA's other flags as inherited (conftest turns its
# costly CPU optimisations off: the tests compare results, not speed).
os.environ["XLA_FLAGS"] = " ".join(
    [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith("--xla_force_host_platform_device_count")]
    + [f"--xla_force_host_platform_device_count={SPEC.get('local_devices', 1)}"]
)

from no_tensorflow import block_tensorflow  # noqa: E402 (this folder is the script's sys.path[0])

block_tensorflow("a JAX worker")

import keras  # noqa: E402
import numpy as np  # noqa: E402

import tf_gradmix as gm  # noqa: E402


def model_and_data(n):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, 5)).astype("float32")
    y = rng.integers(0, 3, n)
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    model = gm.Model(inputs, keras.layers.Dense(3, activation="softmax")(h))
    return model, x, y


def resume():
    for run in SPEC.get("runs", [SPEC]):
        seed = resume_run(run["seed"], run["backup"], run.get("kill_at"), run["out"])
        if run.get("straight_out"):
            resume_run(seed, run["straight_backup"], None, run["straight_out"])


def resume_run(seed, backup, kill_at, out):
    model, x, y = model_and_data(64)
    opt = gm.GradientMix(keras.optimizers.SGD(0.1, momentum=0.9), stddev=1.0, seed=seed)
    model.compile(opt, "sparse_categorical_crossentropy")

    class Kill(keras.callbacks.Callback):
        epoch = 0

        def on_epoch_begin(self, epoch, logs=None):
            self.epoch = epoch

        def on_train_batch_begin(self, batch, logs=None):
            if kill_at and [self.epoch, batch] == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)

    callbacks = [keras.callbacks.BackupAndRestore(backup), Kill()]
    model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=callbacks)
    np.savez(out, *model.get_weights(), seed=opt.seed, raw_step=int(opt.raw_step.numpy()))
    return opt.seed


def multi_process():
    import jax

    keras.distribution.initialize(
        job_addresses=f"127.0.0.1:{SPEC['port']}",
        num_processes=SPEC["num_processes"],
        process_id=SPEC["process_id"],
    )
    assert jax.process_count() == SPEC["num_processes"]
    # Each process feeds its own share of every global batch (already sharded).
    keras.distribution.set_distribution(
        keras.distribution.DataParallel(devices=jax.devices(), auto_shard_dataset=False)
    )
    batch, steps = SPEC["batch"], SPEC["steps"]
    results = {"devices": len(jax.devices())}
    for level in ("sample", "device"):
        model, x, y = model_and_data(batch * steps)
        results[f"{level}/initial"] = np.concatenate([w.ravel() for w in model.get_weights()])
        opt = gm.GradientMix(keras.optimizers.SGD(1.0), level=level, stddev=0.7, seed=5)
        model.compile(opt, "sparse_categorical_crossentropy")
        # This process's share of every global batch: rows [p*b/P, (p+1)*b/P) of each batch.
        share = batch // SPEC["num_processes"]
        first = SPEC["process_id"] * share
        rows = np.concatenate([np.arange(s * batch + first, s * batch + first + share) for s in range(steps)])
        model.fit(x[rows], y[rows], batch_size=share, epochs=1, shuffle=False, verbose=0)
        results[f"{level}/final"] = np.concatenate([w.ravel() for w in model.get_weights()])
        if level == "sample":
            draws = [opt.example_weights(batch, step=s) for s in range(steps)]
        else:
            draws = [opt.device_weights(len(jax.devices()), step=s) for s in range(steps)]
        results[f"{level}/weights"] = np.stack([np.asarray(w) for w in draws])
    # The same micro-batches accumulated into one update, each device its own share.
    model, x, y = model_and_data(batch * steps)
    opt = gm.GradientMix(keras.optimizers.SGD(1.0, gradient_accumulation_steps=steps), stddev=0.7, seed=5)
    model.compile(opt, "sparse_categorical_crossentropy")
    model.fit(x[rows], y[rows], batch_size=share, epochs=1, shuffle=False, verbose=0)
    function = model.train_function.__wrapped__
    results["accumulated/final"] = np.concatenate([w.ravel() for w in model.get_weights()])
    results["accumulated/per_device"] = function.device_window is not None and function.device_window.active
    results["accumulated/update_steps"] = function.steps_run["update_step"]
    np.savez(SPEC["out"], **results)


{"resume": resume, "multi_process": multi_process}[SPEC["mode"]]()
