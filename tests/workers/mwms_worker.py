"""One training process for tests/library/test_distribute.py and
tests/upstream/test_keras_multi_worker.py (run in a process of its own,
forked by tests/workers/mwms_forkserver.py for tests/mwms_cluster.py).

Usage: ``python mwms_worker.py SPEC.json``. The spec says which cluster to
join (``ports``/``index``; none: a single process without a cluster), which
task to run, where the data is and where to write results (an ``.npz`` file
of arrays). Each process configures its own devices: one CPU, one replica.

Tasks:

* ``fit_cases``: (1) stock ``keras.Model`` fit fails under the strategy
  (keras-team/keras#20585) - the error messages are recorded, and written at
  once to ``stock_out``; (2) several
  tf_gradmix models are trained with ``fit`` from the same initial weights on
  explicit per-worker shards; the final weights of each case are written.
  With ``compat_off``, records the warning and the fit error when the
  workaround is off (a newer Keras simulated). With ``default_seed``, also records what ``GradientMix(seed=None)`` draws
  and uses on each worker, and the weights after a fit with it. With
  ``traced_steps`` (levels such as ``"sample-acc3"``), records the graph of
  one traced replica step (``strategy.run(model.train_step)``) per level.
* ``fault``: runs with ``keras.callbacks.BackupAndRestore`` in sequence,
  one per entry of ``runs`` (each entry overrides the spec's keys: ``level``,
  e.g. ``"sample-acc3"``, ``shards``, ``backup_dir``, ``out``). With
  ``pause_at`` (epoch, batch), the process ``pause_index`` stops after that
  batch, writes ``marker`` and waits to be killed. A restarted group resumes
  each case from its backup and trains its uninterrupted reference (a run
  with an empty backup folder, so nothing is restored) in one process.
"""

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SPEC = json.load(open(sys.argv[1]))
if SPEC.get("ports"):
    os.environ["TF_CONFIG"] = json.dumps(
        {
            "cluster": {"worker": [f"127.0.0.1:{p}" for p in SPEC["ports"]]},
            "task": {"type": "worker", "index": SPEC["index"]},
        }
    )
else:
    os.environ.pop("TF_CONFIG", None)

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

tf.config.threading.set_intra_op_parallelism_threads(1)
tf.config.experimental.enable_op_determinism()

import keras  # noqa: E402

import tf_gradmix as gm  # noqa: E402
from tf_gradmix import distribute  # noqa: E402

SEED = 1234  # GradientMix seed shared with the parent's oracle


def make_strategy():
    if SPEC.get("ports"):
        return distribute.multi_worker_strategy(
            collective_timeout=SPEC.get("collective_timeout")
        )
    return tf.distribute.get_strategy()


def layers():
    return [
        keras.Input((3,)),
        keras.layers.Dense(4, activation="tanh"),
        keras.layers.Dense(1),
    ]


def build(kind):
    """A model of the architecture shared with the parent's oracle."""
    if kind == "sequential":
        return gm.Sequential(layers())
    inputs = keras.Input((3,))
    x = keras.layers.Dense(4, activation="tanh")(inputs)
    outputs = keras.layers.Dense(1)(x)
    if kind == "model":
        return gm.Model(inputs, outputs)
    if kind == "enable":
        return gm.enable(keras.Model(inputs, outputs))
    if kind == "stock":
        return keras.Model(inputs, outputs)
    raise ValueError(kind)


def optimizer(level, momentum=0.0):
    # "sample-acc3": sample level with gradient_accumulation_steps=3.
    level, _, accumulate = level.partition("-acc")
    sgd = keras.optimizers.SGD(
        SPEC.get("learning_rate", 0.1),
        momentum=momentum,
        gradient_accumulation_steps=int(accumulate) if accumulate else None,
    )
    if level == "plain":
        return sgd
    return gm.GradientMix(sgd, level=level, noise="gaussian", stddev=1.0, seed=SEED)


def shards(strategy, shard_rows):
    """Per-worker input: worker ``i`` reads the batches ``shard_rows[i]``.

    ``shard_rows[i]`` is a list of row-index lists, one per step (possibly
    empty: that worker's replica then gets no example at that step).
    """
    data = np.load(SPEC["data"])
    x, y = data["x"], data["y"]

    def dataset_fn(context):
        rows = shard_rows[context.input_pipeline_id]
        pieces = [
            tf.data.Dataset.from_tensors(
                (x[list(r)].reshape(-1, 3), y[list(r)].reshape(-1, 1))
            )
            for r in rows
        ]
        ds = pieces[0]
        for piece in pieces[1:]:
            ds = ds.concatenate(piece)
        return ds

    return distribute.distribute_dataset(strategy, dataset_fn)


def stock_checks(strategy, results):
    """Records how stock Keras fails under the strategy (keras#20585)."""
    with strategy.scope():
        stock = build("stock")
        stock.compile(optimizer("plain"), "mse")
    try:
        stock.fit(shards(strategy, SPEC["shards"]), epochs=1, verbose=0)
        results["stock_fit_error"] = np.array("")
    except Exception as error:  # noqa: BLE001 - recorded for the parent
        results["stock_fit_error"] = np.array(f"{type(error).__name__}: {error}")
    from keras.src.backend.tensorflow import trainer as tf_trainer

    try:
        scalar = strategy.run(lambda: tf.constant(1.0))
        tf_trainer.reduce_per_replica({"loss": scalar}, strategy, reduction="auto")
        results["stock_reduce_error"] = np.array("")
    except Exception as error:  # noqa: BLE001
        results["stock_reduce_error"] = np.array(f"{type(error).__name__}: {error}")


def keras_split(strategy):
    """A plain dataset with a final partial batch, split by Keras/tf.distribute."""
    data = np.load(SPEC["data"])
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = (
        tf.data.experimental.AutoShardPolicy.DATA
    )
    ds = tf.data.Dataset.from_tensor_slices((data["x"][:21], data["y"][:21]))
    return ds.batch(8, drop_remainder=False).with_options(options)


def default_seed(strategy, results):
    """``GradientMix(seed=None)`` on every worker: all use the chief's seed.

    Each process draws its own seed at construction (recorded here); the
    seed variable's initial value is the chief's, broadcast as for every
    mirrored variable. A sample-level fit with that optimizer is recorded
    too, for the parent's oracle.
    """
    from tf_gradmix import optimizer as optimizer_lib

    draws = []
    secrets_module = optimizer_lib.secrets

    class RecordingSecrets:
        @staticmethod
        def randbelow(n):
            draws.append(secrets_module.randbelow(n))
            return draws[-1]

    optimizer_lib.secrets = RecordingSecrets
    try:
        with strategy.scope():
            model = build("model")
            keras.utils.set_random_seed(0)
            init = [v.numpy() for v in build("stock").weights]
            model.set_weights(init)
            mixer = gm.GradientMix(
                keras.optimizers.SGD(SPEC.get("learning_rate", 0.1)), stddev=1.0, seed=None
            )
            model.compile(mixer, "mse")
    finally:
        optimizer_lib.secrets = secrets_module
    results["seed_none/local_draw"] = np.array(draws)
    results["seed_none/seed"] = np.array(mixer.seed)
    results["seed_none/example_weights"] = mixer.example_weights(8, step=3, replica_id=0).numpy()
    results["seed_none/device_weights"] = mixer.device_weights(2, step=3).numpy()
    model.fit(shards(strategy, SPEC["shards"]), epochs=1, verbose=0)
    for i, (w0, w) in enumerate(zip(init, model.get_weights())):
        results[f"seed_none/init{i}"] = w0
        results[f"seed_none/w{i}"] = w


def compat_off(strategy, results):
    """On a Keras newer than the guard covers, the multi-worker workaround
    switches itself off with a warning, and fit fails as stock Keras does.

    A newer Keras is simulated by the version the workaround reads.
    """
    import warnings

    from tf_gradmix.backend.tensorflow import trainer as gm_trainer

    real_version = gm_trainer.keras_version
    gm_trainer.keras_version = lambda: (3, gm_trainer.MULTI_WORKER_FIT_BROKEN[1][1] + 1)
    gm_trainer._warned_unguarded_version = False
    try:
        with strategy.scope():
            model = build("model")
            model.compile(optimizer("sample"), "mse")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                model.fit(shards(strategy, SPEC["shards"]), epochs=1, verbose=0)
                error = ""
            except Exception as e:  # noqa: BLE001 - recorded for the parent
                error = f"{type(e).__name__}: {e}"
    finally:
        gm_trainer.keras_version = real_version
    results["compat_off/warnings"] = np.array(
        [str(w.message) for w in caught if "workaround" in str(w.message)]
    )
    results["compat_off/fit_error"] = np.array(error)


def traced_steps(strategy, results, fitted):
    """The traced replica step of a fitted model, per level, as a GraphDef.

    What ``fit`` runs on each replica every step: forward and backward pass,
    metrics and ``optimizer.apply`` (Keras reduces the step's logs across
    workers outside it). Serialised as uint8, for the parent to inspect. The
    model of case ``model/<level>/shards`` when there is one (``fitted``: case
    name to model and dataset), else a new one, fitted first.
    """
    for level in SPEC["traced_steps"]:
        model, dataset = fitted.get(f"model/{level}/shards", (None, None))
        if model is None:
            with strategy.scope():
                model = build("model")
                model.compile(optimizer(level), "mse", metrics=["mae"])
            dataset = shards(strategy, SPEC["shards"])
            model.fit(dataset, epochs=1, verbose=0)  # builds optimizer and metrics

        @tf.function
        def step(data, model=model):
            return strategy.run(model.train_step, args=(data,))

        batch = next(iter(dataset))
        graph = step.get_concrete_function(batch).graph.as_graph_def()
        results[f"graph/{level}"] = np.frombuffer(graph.SerializeToString(), np.uint8)


def fit_cases(strategy, out):
    results = {}
    if not SPEC.get("skip_stock"):
        stock_checks(strategy, results)
        # Written now: stock Keras's results do not depend on the cases below.
        np.savez(SPEC["stock_out"], **results)
    if SPEC.get("compat_off"):
        compat_off(strategy, results)
    if SPEC.get("default_seed"):
        default_seed(strategy, results)

    # 2. tf_gradmix models, same initial weights, same data.
    init = None
    fitted = {}
    for name in SPEC["cases"]:
        kind, level, data_key = name.split("/")
        print("case", name, flush=True)
        with strategy.scope():
            model = build(kind)
            if init is None:
                keras.utils.set_random_seed(0)
                init = [v.numpy() for v in build("stock").weights]
            model.set_weights(init)
            callbacks = [gm.GammaLogger()] if level.startswith("device") else []
            model.compile(optimizer(level), "mse", metrics=["mae"])
        if data_key == "keras_split":
            dataset = keras_split(strategy)
        else:
            dataset = shards(strategy, SPEC[data_key])
        history = model.fit(
            dataset, epochs=1, verbose=0, callbacks=callbacks
        )
        fitted[name] = (model, dataset)
        for key, values in history.history.items():
            results[f"{name}/log/{key}"] = np.array(values)
        for i, w in enumerate(model.get_weights()):
            results[f"{name}/w{i}"] = w
        if level != "plain":
            mixer = gm.optimizer.find_gradient_mix(model.optimizer)
            results[f"{name}/raw_step"] = np.array(int(mixer.raw_step.numpy()))
    for i, w in enumerate(init or []):  # no case: only the stock checks ran
        results[f"init/w{i}"] = w
    if SPEC.get("traced_steps"):
        traced_steps(strategy, results, fitted)
    results["num_replicas"] = np.array(strategy.num_replicas_in_sync)
    results["replica_ids"] = np.array(
        strategy.experimental_local_results(
            strategy.run(lambda: tf.distribute.get_replica_context().replica_id_in_sync_group)
        )
    )
    np.savez(out, **results)


class PauseAt(keras.callbacks.Callback):
    """Stops this process inside an epoch until the parent kills it."""

    def __init__(self, epoch, batch, marker):
        super().__init__()
        self.pause = (epoch, batch)
        self.marker = marker
        self.epoch = None

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if (self.epoch, batch) == tuple(self.pause):
            with open(self.marker, "w") as f:
                f.write("paused")
            time.sleep(600)  # the parent sends SIGKILL


def fault(strategy, out):
    for run in SPEC["runs"]:
        fault_run(strategy, dict(SPEC, **run))


def fault_run(strategy, run):
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = build("model")
        model.compile(optimizer(run.get("level", "sample"), momentum=0.9), "mse")
    callbacks = [
        keras.callbacks.BackupAndRestore(run["backup_dir"], save_freq="epoch"),
    ]
    if run.get("pause_at") and run.get("pause_index", 0) == run.get("index", 0):
        callbacks.append(PauseAt(*run["pause_at"], run["marker"]))
    epochs_seen = []
    callbacks.append(
        keras.callbacks.LambdaCallback(on_epoch_begin=lambda e, logs: epochs_seen.append(e))
    )
    model.fit(shards(strategy, run["shards"]), epochs=run["epochs"], verbose=0, callbacks=callbacks)
    results = {f"w{i}": w for i, w in enumerate(model.get_weights())}
    mixer = gm.optimizer.find_gradient_mix(model.optimizer)
    results["raw_step"] = np.array(int(mixer.raw_step.numpy()))
    results["epochs_run"] = np.array(epochs_seen)
    np.savez(run["out"], **results)


def main():
    strategy = make_strategy()
    {"fit_cases": fit_cases, "fault": fault}[SPEC["task"]](strategy, SPEC.get("out"))
    print("done", flush=True)


if __name__ == "__main__":
    main()
