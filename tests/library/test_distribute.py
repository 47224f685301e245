"""tf.distribute at scale: multi-worker fit, fault tolerance, uneven data,
large logical batches.

Multi-worker tests run real ``MultiWorkerMirroredStrategy`` clusters of
worker subprocesses on 127.0.0.1 (``tests/mwms_cluster.py`` starts
``tests/workers/mwms_worker.py``, the same interpreter, ports picked at run
time, every wait bounded); the parent
process recomputes each mixed update independently. MirroredStrategy tests
use the 4 logical CPUs of the pytest process (``conftest.py``).
"""

import os
import shutil
import signal
import subprocess
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradmix as gm
from tf_gradmix import distribute
from tf_gradmix.backend.tensorflow import optimizer as tf_optimizer
from tf_gradmix.backend.tensorflow import trainer as gm_trainer

import mwms_cluster
from mwms_cluster import CASES, EVEN, LR, PROCESS_TIMEOUT, UNEVEN, kill, main_cluster, start, tail, wait_all
from oracles import assert_float32_close

pytestmark = pytest.mark.backends("tensorflow")

SEED = 1234  # as in the worker script
COLLECTIVE_TIMEOUT = 20  # seconds: a survivor of a killed peer gives up


# -- the independent oracle ----------------------------------------------------


def oracle_model(weights):
    model = keras.Sequential(
        [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
    )
    model.set_weights(weights)
    return model


def per_example_gradients(model, x, y):
    """grad l_b for every example, by an explicit loop (no strategy, no fit)."""
    grads = []
    for b in range(len(x)):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(model(x[b : b + 1]) - y[b : b + 1]))
        grads.append([g.numpy() for g in tape.gradient(loss, model.trainable_weights)])
    return grads


def mixed_sgd(init, x, y, shards, level, seed=SEED):
    """SGD(LR) on the global-batch mix, with weights from GradientMix's API.

    ``shards[k][s]``: the rows replica ``k`` sees at step ``s``. Keras weighs
    an example of replica ``k`` by ``1 / (K * B_k)``; GradientMix multiplies
    that by ``w_b`` (sample) or ``w_k`` (device); a replica without examples
    adds nothing.
    """
    mixer = gm.GradientMix(keras.optimizers.SGD(LR), level="sample", seed=seed)
    level, _, accumulate = level.partition("-acc")
    accumulate = int(accumulate) if accumulate else 1  # micro-batches an update
    model = oracle_model(init)
    replicas = len(shards)
    steps = max(len(s) for s in shards)
    for step in range(steps):
        if step % accumulate == 0:
            total = [np.zeros_like(w) for w in model.get_weights()]
        device = mixer.device_weights(replicas, step=step).numpy()
        for k in range(replicas):
            rows = shards[k][step] if step < len(shards[k]) else []
            if not len(rows):
                continue
            grads = per_example_gradients(model, x[rows], y[rows])
            if level == "sample":
                w = mixer.example_weights(len(rows), step=step, replica_id=k).numpy()
            elif level == "device":
                w = np.full(len(rows), device[k])
            else:
                w = np.ones(len(rows))
            for b, g in enumerate(grads):
                for t, gb in zip(total, g):
                    t += w[b] * gb / (replicas * len(rows)) / accumulate
        if (step + 1) % accumulate == 0:
            model.set_weights([v - LR * g for v, g in zip(model.get_weights(), total)])
    return model.get_weights()


# -- 1, 2, 4: multi-worker fit ------------------------------------------------

# The cases (model kind / level / data), the shards EVEN and UNEVEN and the
# traced levels: tests/mwms_cluster.py, whose main cluster also records stock
# Keras's failure for tests/upstream/test_keras_multi_worker.py.


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return mwms_cluster.data(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster_results(tmp_path_factory):
    return main_cluster(tmp_path_factory)


@pytest.mark.slow
def test_workaround_switches_itself_off_with_a_warning_on_newer_keras(cluster_results):
    """The workaround is off, with a warning, on a Keras newer than its guard
    (docs/distributed.md). Each worker simulates
    a Keras one minor version past the guard: one warning naming the issue,
    then fit fails exactly as stock Keras does (nothing silently patched)."""
    for result in cluster_results:
        messages = result["compat_off/warnings"].tolist()
        assert len(messages) == 1, messages
        assert "is off for Keras" in messages[0] and gm_trainer.MULTI_WORKER_FIT_ISSUE in messages[0]
        assert "Attempt to convert a value (PerReplica" in str(result["compat_off/fit_error"])


@pytest.mark.slow
def test_cluster_has_one_replica_per_worker(cluster_results):
    # K counts the replicas of all workers; ids are global.
    assert [int(r["num_replicas"]) for r in cluster_results] == [2, 2]
    assert [r["replica_ids"].tolist() for r in cluster_results] == [[0], [1]]


@pytest.mark.slow
@pytest.mark.parametrize("case", CASES)
def test_multi_worker_fit_equals_global_batch_mix(case, cluster_results, data):
    _, x, y = data
    first, second = cluster_results
    n = len([k for k in first if k.startswith(f"{case}/w")])
    # Both workers end with identical weights.
    for i in range(n):
        np.testing.assert_array_equal(first[f"{case}/w{i}"], second[f"{case}/w{i}"])
    for i in range(n):
        assert np.all(np.isfinite(first[f"{case}/w{i}"]))
    init = [first[f"init/w{i}"] for i in range(n)]
    _, level, data_key = case.split("/")
    if data_key == "keras_split":
        # A plain dataset with a final partial batch (21 = 8 + 8 + 5,
        # drop_remainder=False) split by tf.distribute: trains, no NaN,
        # workers agree. Its per-worker split is tf.data's business, so no
        # oracle here; the explicit shards above cover the arithmetic.
        assert int(first[f"{case}/raw_step"]) >= 2
        assert np.all(np.isfinite(first[f"{case}/log/loss"]))
        return
    shards = EVEN if data_key == "shards" else UNEVEN
    expected = mixed_sgd(init, x, y, shards, level)
    for i in range(n):
        assert_float32_close(first[f"{case}/w{i}"], expected[i])
    # Logs are reduced over both workers; mixing logs gamma.
    assert np.all(np.isfinite(first[f"{case}/log/loss"]))
    if level != "plain":
        assert int(first[f"{case}/raw_step"]) == 3
        assert "gradmix_gamma" in {k.split("/log/")[1] for k in first if "/log/" in k and k.startswith(case)}
        # The mix is not plain training: it moved the weights differently.
        plain = mixed_sgd(init, x, y, shards, "plain")
        assert not np.allclose(first[f"{case}/w0"], plain[0], rtol=1e-4, atol=1e-5)


# -- a micro-step of accumulation does not communicate ---------------------------

def is_collective(op_type):
    """Op types that exchange data between replicas (tf.distribute, NCCL, XLA)."""
    return op_type.startswith(("Collective", "Nccl")) or "AllReduce" in op_type or op_type in (
        "AllToAll",
        "AllGather",
        "ReduceScatter",
    )


def collectives(graph_def, skip_update_branch=False, only_update_branch=False):
    """The collective ops a traced step can run, with every function it calls.

    Follows function-valued attributes (calls, both branches of a cond, loop
    bodies) and direct calls of library functions. With
    ``skip_update_branch`` the true branch of the accumulation's update
    conditional is left out: what a micro-step runs. With
    ``only_update_branch``, only that branch: what the update adds. Returns
    ``(op types found, number of update conditionals seen)``.
    """
    library = {f.signature.name: f for f in graph_def.library.function}
    updates = []

    def is_update(node):
        return node.op in ("If", "StatelessIf") and node.name.rsplit("/", 1)[-1].startswith(
            tf_optimizer.UPDATE_BRANCH_NAME
        )

    def walk(nodes, counting):
        found = []
        for node in nodes:
            if counting and is_collective(node.op):
                found.append(node.op)
            if node.op in library:
                found += walk(library[node.op].node_def, counting)
            update = is_update(node)
            if update:
                updates.append(node.name)
            for key, attr in node.attr.items():
                names = [attr.func.name] if attr.HasField("func") else [f.name for f in attr.list.func]
                inside = counting
                if update and key == "then_branch":
                    if skip_update_branch:
                        continue
                    inside = True
                elif update and only_update_branch:
                    continue
                for name in names:
                    found += walk(library[name].node_def, inside)
        return found

    found = walk(graph_def.node, counting=not only_update_branch)
    return sorted(found), len(updates)


def traced_step(result, level):
    graph = tf.compat.v1.GraphDef()
    graph.ParseFromString(result[f"graph/{level}"].tobytes())
    return graph


@pytest.mark.slow
@pytest.mark.parametrize("level", ["sample-acc3", "device-acc3"])
def test_accumulation_micro_step_does_not_communicate_across_workers(level, cluster_results):
    """The traced replica step of a two-worker fit (forward, backward,
    metrics, ``optimizer.apply``): outside the update's branch, which only
    every third micro-step takes, no collective op at all; inside it, exactly
    the all-reduce of a step without accumulation."""
    for result in cluster_results:
        plain, plain_updates = collectives(traced_step(result, "sample"))
        assert plain and plain_updates == 0, plain  # a step without accumulation communicates
        graph = traced_step(result, level)
        micro_step, updates = collectives(graph, skip_update_branch=True)
        assert updates == 1
        assert micro_step == [], f"a micro-step runs collectives: {micro_step}"
        update, _ = collectives(graph, only_update_branch=True)
        assert update == plain


@pytest.mark.slow
def test_default_seed_is_the_chiefs_on_every_worker(cluster_results, data):
    """``seed=None``: each worker draws its own seed, and all use the chief's."""
    _, x, y = data
    chief, other = cluster_results
    assert len(chief["seed_none/local_draw"]) == len(other["seed_none/local_draw"]) == 1
    # Two independent draws from [0, 2**31 - 1) collide with chance 5e-10.
    assert chief["seed_none/local_draw"][0] != other["seed_none/local_draw"][0]
    assert int(chief["seed_none/seed"]) == int(other["seed_none/seed"]) == chief["seed_none/local_draw"][0]
    for key in ("example_weights", "device_weights"):
        np.testing.assert_array_equal(chief[f"seed_none/{key}"], other[f"seed_none/{key}"])
    # The fit used that seed on both workers' replicas: the global-batch mix
    # with the chief's seed (a worker on its own seed would draw other weights).
    init = [chief[f"seed_none/init{i}"] for i in range(4)]
    expected = mixed_sgd(init, x, y, EVEN, "sample", seed=int(chief["seed_none/seed"]))
    for i in range(4):
        np.testing.assert_array_equal(chief[f"seed_none/w{i}"], other[f"seed_none/w{i}"])
        assert_float32_close(chief[f"seed_none/w{i}"], expected[i])


def test_sample_noise_differs_per_replica_and_device_weights_span_workers():
    mixer = gm.GradientMix(keras.optimizers.SGD(LR), seed=SEED)
    w0 = mixer.example_weights(4, step=0, replica_id=0).numpy()
    w1 = mixer.example_weights(4, step=0, replica_id=1).numpy()
    assert not np.allclose(w0, w1)
    device = mixer.device_weights(2, step=0).numpy()
    assert device.shape == (2,) and device[0] != device[1]


# -- 3: fault tolerance -------------------------------------------------------

FAULT_EPOCHS = 4
PAUSE_AT = (2, 1)  # killed after batch 1 of epoch 2: mid-epoch


def wait_for(path, processes, timeout=PROCESS_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not path.exists():
        for p in processes:
            if p.poll() is not None:
                pytest.fail(f"a worker exited before pausing:\n{tail(p)}")
        if time.monotonic() > deadline:
            for p in processes:
                kill(p)
            pytest.fail("no worker reached the pause point in time")
        time.sleep(0.2)


# id: (workers, level, pause_at). Each case crashes its own group of workers
# (a kill ends a group); one restarted group per worker count then resumes
# every case from its backup and trains its uninterrupted reference.
FAULT_CASES = {
    "single_process": (1, "sample", PAUSE_AT),
    "two_workers": (2, "sample", PAUSE_AT),
    "two_workers_mid_accumulation_window": (2, "sample-acc3", PAUSE_AT),
    "two_workers_backup_mid_accumulation_window": (2, "sample-acc2", (3, 1)),
}


def start_group(tmp_path, name, workers, runs):
    """Starts ``workers`` processes that run ``runs(i)`` (worker i's runs) in sequence."""
    ports = distribute.free_local_ports(workers) if workers > 1 else None
    spec = {
        "task": "fault",
        "data": str(tmp_path / "data.npz"),
        "epochs": FAULT_EPOCHS,
        "learning_rate": LR,
        "collective_timeout": COLLECTIVE_TIMEOUT if workers > 1 else None,
        "ports": ports,
    }
    return [start(dict(spec, index=i, runs=runs(i)), tmp_path, f"{name}{i}") for i in range(workers)]


def fault_run(tmp_path, case, kind, i, **extra):
    """Worker ``i``'s run of ``case``; ``kind``: "crash", "restart" or "reference".

    One backup directory per worker: Keras 3's BackupAndRestore writes from
    every worker (all hold the same weights). The reference's is its own and
    empty, so nothing is restored.
    """
    workers, level, _ = FAULT_CASES[case]
    shards = EVEN if workers == 2 else [[EVEN[0][s] + EVEN[1][s] for s in range(3)]]
    backup = "reference_backup" if kind == "reference" else "backup"
    return dict(
        level=level,
        shards=shards,
        backup_dir=str(tmp_path / case / backup / f"worker{i}"),
        out=str(tmp_path / case / f"{kind}{i}.npz"),
        **extra,
    )


def crash(tmp_path, case):
    """Starts ``case``'s crashing group; SIGKILLs its last worker mid-epoch.

    Returns the survivors (blocked in an all-reduce with a dead peer, they
    must fail on their own) and the time of the kill.
    """
    workers, _, pause_at = FAULT_CASES[case]
    marker = tmp_path / case / "paused"
    marker.parent.mkdir()
    crashing = start_group(
        tmp_path,
        f"{case}_crash",
        workers,
        lambda i: [
            fault_run(tmp_path, case, "crash", i, pause_at=pause_at, pause_index=workers - 1, marker=str(marker))
        ],
    )
    try:
        wait_for(marker, crashing)
        victim = crashing[-1]
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(timeout=30)
    except BaseException:
        for p in crashing:
            kill(p)
        raise
    return crashing[:-1], time.monotonic()


def survivors_fail(survivors, killed_at):
    """The survivors' exit codes, or pytest.fail if one hangs."""
    try:
        for survivor in survivors:
            try:
                survivor.wait(timeout=max(1, killed_at + COLLECTIVE_TIMEOUT + 90 - time.monotonic()))
            except subprocess.TimeoutExpired:
                pytest.fail(f"survivor hung after its peer was killed:\n{tail(survivor)}")
    finally:
        for p in survivors:
            if p.poll() is None:
                kill(p)
    return [p.returncode for p in survivors]


def restart(tmp_path, cases, workers):
    """One group resumes every case from its backup, then trains its reference."""
    restarted = start_group(
        tmp_path,
        f"restart{workers}_",
        workers,
        lambda i: [fault_run(tmp_path, case, kind, i) for case in cases for kind in ("restart", "reference")],
    )
    wait_all(restarted, timeout=2 * len(cases) * PROCESS_TIMEOUT)


@pytest.fixture(scope="module")
def fault_results(data, tmp_path_factory):
    """Per case: the survivors' exit codes, whether the backup exists, and
    the restarted and reference runs' results of each worker.

    The crashing groups run one after another, each started as soon as the
    previous one's worker is killed (its survivor then only waits for the
    collective timeout); the single process crashes and restarts meanwhile.
    """
    tmp_path = tmp_path_factory.mktemp("fault")
    shutil.copy(data[0], tmp_path / "data.npz")
    two_workers = [c for c, (workers, _, _) in FAULT_CASES.items() if workers == 2]
    pending = {}
    try:
        for case in two_workers:
            pending[case] = crash(tmp_path, case)
        survivors, killed_at = crash(tmp_path, "single_process")
        assert survivors == []
        results = {"single_process": {"survivor_codes": []}}
        results["single_process"]["backup_exists"] = (tmp_path / "single_process" / "backup" / "worker0").exists()
        restart(tmp_path, ["single_process"], 1)
        for case in two_workers:
            codes = survivors_fail(*pending.pop(case))
            backup = (tmp_path / case / "backup" / "worker0").exists()
            results[case] = {"survivor_codes": codes, "backup_exists": backup}
    finally:
        for survivors, _ in pending.values():
            for p in survivors:
                kill(p)
    restart(tmp_path, [c for c in two_workers if results[c]["backup_exists"]], 2)
    for case, (workers, _, _) in FAULT_CASES.items():
        if results[case]["backup_exists"]:
            for kind in ("restart", "reference"):
                results[case][kind] = [dict(np.load(tmp_path / case / f"{kind}{i}.npz")) for i in range(workers)]
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", list(FAULT_CASES))
def test_sigkill_mid_epoch_then_restart_equals_uninterrupted(case, fault_results):
    """Accumulation (``-accN``, 3 steps an epoch): with ``acc3`` an epoch is
    one window and the kill lands after its second micro-batch; the workers'
    per-replica partial sums are lost with the rest of the epoch, which the
    restart recomputes: bit-identical. With ``acc2`` windows straddle epochs:
    the backup after epoch 2 (9 micro-batches) holds half a window, saved as
    the sum over the workers' accumulators and restored as a half share to
    each, so the resumed run equals the reference to float32 rounding only
    (the sum of the two shares is rounded differently)."""
    workers, level, pause_at = FAULT_CASES[case]
    result = fault_results[case]
    # A survivor blocked in an all-reduce with its killed peer failed on its
    # own (collective timeout / peer health check), not hung.
    assert len(result["survivor_codes"]) == workers - 1
    assert all(code != 0 for code in result["survivor_codes"]), result["survivor_codes"]
    assert result["backup_exists"]

    # The restarted processes resumed from the backup; the reference trained
    # from scratch (a fresh model and an empty backup folder).
    expected, got = result["reference"], result["restart"]
    # Keras 3 restores the epoch, not the step: the epoch is rerun from its start.
    assert got[0]["epochs_run"].tolist() == list(range(pause_at[0], FAULT_EPOCHS))
    assert expected[0]["epochs_run"].tolist() == list(range(FAULT_EPOCHS))
    backup_mid_window = level == "sample-acc2"
    for e, g in zip(expected, got):
        assert int(g["raw_step"]) == int(e["raw_step"]) == FAULT_EPOCHS * 3
        for key in [k for k in e if k.startswith("w")]:
            if backup_mid_window:
                # Rounding of one accumulated sum; losing or doubling the
                # saved half window would move weights by ~LR * gradient.
                assert_float32_close(g[key], e[key])
            else:
                np.testing.assert_array_equal(g[key], e[key])
    if backup_mid_window:
        # Both workers still agree exactly.
        for key in [k for k in got[0] if k.startswith("w")]:
            np.testing.assert_array_equal(got[0][key], got[1][key])


# -- 4, 5 under MirroredStrategy (4 logical CPUs of this process) --------------


def replica_shards(strategy, dataset_of_rows):
    """The rows each replica receives at each step, read from tf.distribute."""
    replicas = strategy.num_replicas_in_sync
    shards = [[] for _ in range(replicas)]
    for batch in strategy.experimental_distribute_dataset(dataset_of_rows):
        for k, local in enumerate(strategy.experimental_local_results(batch)):
            shards[k].append(local.numpy().tolist())
    return shards


def small_model(strategy, init=None):
    with strategy.scope():
        model = gm.Sequential(
            [keras.Input((3,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(1)]
        )
        if init is not None:
            model.set_weights(init)
    return model


@pytest.mark.parametrize("level", ["sample", "device"])
def test_uneven_batches_and_empty_replicas_mirrored(level, mirrored_strategy, data):
    """10 examples, global batch 8, drop_remainder=False: the last step gives
    2 examples to 4 replicas, so two replicas get none."""
    _, x, y = data
    rows = tf.data.Dataset.range(10).batch(8, drop_remainder=False)
    shards = replica_shards(mirrored_strategy, rows)
    assert sorted(len(s[1]) for s in shards) == [0, 0, 1, 1]
    keras.utils.set_random_seed(0)
    model = small_model(mirrored_strategy)
    init = model.get_weights()
    with mirrored_strategy.scope():
        model.compile(
            gm.GradientMix(keras.optimizers.SGD(LR), level=level, seed=SEED), "mse"
        )
    ds = tf.data.Dataset.from_tensor_slices((x[:10], y[:10])).batch(8, drop_remainder=False)
    history = model.fit(ds, epochs=1, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    expected = mixed_sgd(init, x, y, shards, level)
    for got, want in zip(model.get_weights(), expected):
        assert np.all(np.isfinite(got))
        assert_float32_close(got, want)


def accumulated_sgd(init, x, y, shards, level, steps_per_update):
    """One SGD update on the mix over a logical batch of micro-batches.

    Returns the updated weights and, per variable, the magnitude they were
    computed from (``|v| + lr * sum_b |w_b g_b| / N``, the scale of float32 rounding).
    """
    mixer = gm.GradientMix(keras.optimizers.SGD(LR), level="sample", seed=SEED)
    model = oracle_model(init)
    replicas = len(shards)
    total = [np.zeros_like(w) for w in model.get_weights()]
    magnitude = [np.zeros_like(w) for w in model.get_weights()]
    for step in range(steps_per_update):
        device = mixer.device_weights(replicas, step=step).numpy()
        for k in range(replicas):
            rows = shards[k][step]
            grads = per_example_gradients(model, x[rows], y[rows])
            if level == "sample":
                w = mixer.example_weights(len(rows), step=step, replica_id=k).numpy()
            else:
                w = np.full(len(rows), device[k])
            for b, g in enumerate(grads):
                for t, m, gb in zip(total, magnitude, g):
                    # pi = w / N over the logical batch: N = steps * K * B_k.
                    t += w[b] * gb / (steps_per_update * replicas * len(rows))
                    m += np.abs(w[b] * gb) / (steps_per_update * replicas * len(rows))
    weights = model.get_weights()
    return ([v - LR * g for v, g in zip(weights, total)],
            [np.abs(v) + LR * m for v, m in zip(weights, magnitude)])


def test_gradient_accumulation_mixes_the_whole_logical_batch(data):
    """Logical batch 24 = 3 micro-batches of 8, on one device.

    (Under a tf.distribute strategy Keras 3.15's own gradient accumulation
    fails: tests/upstream/test_keras_distribute.py.)
    """
    _, x, y = data
    k = 3
    shards = [[list(range(s * 8, s * 8 + 8)) for s in range(k)]]
    keras.utils.set_random_seed(0)
    model = small_model(tf.distribute.get_strategy())
    init = model.get_weights()
    inner = keras.optimizers.SGD(LR, gradient_accumulation_steps=k)
    mixer = gm.GradientMix(inner, level="sample", seed=SEED)
    model.compile(mixer, "mse")
    ds = tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(8)
    model.fit(ds, epochs=1, verbose=0)
    # Keras counts micro-steps; GradientMix draws fresh weights per micro-step.
    assert int(mixer.raw_step.numpy()) == k and int(mixer.iterations.numpy()) == 1
    draws = [mixer.example_weights(8, step=s, replica_id=0).numpy() for s in range(k)]
    assert not np.allclose(draws[0], draws[1]) and not np.allclose(draws[1], draws[2])
    expected, magnitude = accumulated_sgd(init, x, y, shards, "sample", k)
    for got, want, scale in zip(model.get_weights(), expected, magnitude):
        assert_float32_close(got, want, scale=scale)
    # Schedules see the raw micro-step: build them with micro_steps().
    schedule = keras.optimizers.schedules.PolynomialDecay(
        LR, decay_steps=distribute.micro_steps(10, k), end_learning_rate=0.0
    )
    inner.learning_rate = schedule
    assert float(inner.learning_rate) == pytest.approx(float(schedule(k)))
    assert distribute.accumulation_steps(32768, 1024) == 32
    with pytest.raises(ValueError, match="logical_batch_size"):
        distribute.accumulation_steps(32768, 1000)


def test_free_local_ports_are_distinct_and_bindable():
    import socket

    ports = distribute.free_local_ports(3)
    assert len(set(ports)) == 3
    for port in ports:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # released again: a worker can take it
    with pytest.raises(ValueError, match=r"argument `n`: 0"):
        distribute.free_local_ports(0)
