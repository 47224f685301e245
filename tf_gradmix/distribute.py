"""Replica helpers for ``tf.distribute`` and large logical batches.

GradientMix needs nothing per replica beyond what ``tf.distribute`` already
provides: every weight is a pure function of ``(seed, raw step, replica id)``
(stateless RNG), the replica id is ``replica_id_in_sync_group`` of the
replica context, and the only state is the optimizer's step counter, a
mirrored variable. So the same code runs under ``MirroredStrategy``,
``MultiWorkerMirroredStrategy`` and ``TPUStrategy``; nothing here is specific
to a strategy.

* **Replicas across workers.** ``replica_id_in_sync_group`` is global: under
  ``MultiWorkerMirroredStrategy`` with ``W`` workers of ``R`` local devices,
  replica ids run over ``0 .. W*R - 1`` and ``K = num_replicas_in_sync``.
  Device-level GradientMix draws one weight per global replica (all workers
  compute the same ``K``-vector from the same seed and step, and each uses
  its own entry); sample-level GradientMix draws each replica's weights from
  a stream keyed on its global id, so every replica of every worker has
  independent noise.
* **Multi-worker ``fit``.** Stock Keras 3.15 ``fit`` fails under
  ``MultiWorkerMirroredStrategy`` (keras-team/keras#20585).
  :class:`tf_gradmix.Model`, :class:`tf_gradmix.Sequential` and models passed
  to :func:`tf_gradmix.enable` carry a version-guarded workaround (kept in
  :mod:`tf_gradmix.backend.tensorflow.trainer`); :func:`multi_worker_fit_supported` says whether
  it is active for the installed Keras.
* **Uneven data.** With ``drop_remainder=False`` the last global batch is
  split unevenly and some replicas may get no example. Keras averages each
  replica's loss over its *own* examples and divides by ``K``, so a replica's
  examples weigh ``1 / (K * B_k)`` each. GradientMix multiplies these by
  ``w`` (mean 1) and never renormalises: sample level gives example ``b`` of
  replica ``k`` the weight ``w_b / (K * B_k)``; device level gives replica
  ``k`` the weight ``w_k / K``. A replica with ``B_k = 0`` contributes a zero
  gradient (Keras's ``divide_no_nan``), so no NaN appears; the update is then
  smaller, exactly as in plain Keras.
* **Logical batches larger than memory.** Set
  ``gradient_accumulation_steps=k`` on the *inner* optimizer: a logical batch
  of ``k * K * b`` examples (``b`` per replica and micro-batch) gives one
  update. GradientMix's noise is keyed on its raw step, which advances every
  micro-batch, so each micro-batch draws fresh weights and the mix spans the
  whole logical batch: the update direction is
  ``(1 / k) * sum_m (1 / K) * sum_k (1 / b) * sum_b w_{m,k,b} grad l`` =
  ``sum over the logical batch of (w / N) grad l`` with ``N = k * K * b``.
  Keras calls learning-rate schedules (and a ``stddev`` schedule) with the
  raw micro-step count: express them in micro-steps (:func:`micro_steps`).
  Across replicas each replica accumulates on its own and the gradients are
  all-reduced once per update, not once per micro-batch.


The ``tf.distribute`` helpers need the TensorFlow backend; the others
(:func:`accumulation_steps`, :func:`micro_steps`, :func:`free_local_ports`)
work on every backend.
"""

import socket

from tf_gradmix import backend, validation

__all__ = [
    "worker_index",
    "distribute_dataset",
    "multi_worker_strategy",
    "multi_worker_fit_supported",
    "accumulation_steps",
    "micro_steps",
]


def _tensorflow(what):
    """:mod:`tf_gradmix.backend.tensorflow.distribute`, for a helper of ``tf.distribute`` (TensorFlow backend only)."""
    backend.require(f"tf_gradmix.distribute.{what}", ("tensorflow",))
    from tf_gradmix.backend.tensorflow import distribute

    return distribute


def worker_index(strategy=None):
    """This worker's index in the cluster (0 without a cluster)."""
    return _tensorflow("worker_index").worker_index(strategy)


def distribute_dataset(strategy, dataset_fn):
    """Per-worker input pipelines, the way TFDS and tf.distribute recommend.

    ``dataset_fn(input_context)`` builds the pipeline of one worker: shard
    with ``input_context.num_input_pipelines`` / ``input_pipeline_id`` and
    batch with ``input_context.get_per_replica_batch_size(global_batch)``.
    The result can be passed to ``model.fit`` directly (no auto-sharding
    happens; each worker reads only its shard).
    """
    _tensorflow("distribute_dataset")
    return strategy.distribute_datasets_from_function(dataset_fn)


def free_local_ports(n):
    """``n`` TCP ports free on 127.0.0.1, for a multi-worker cluster on one machine.

    Each port is bound once (so the ``n`` differ) and released before
    returning; put them in each worker's ``TF_CONFIG`` ``cluster.worker`` as
    ``"127.0.0.1:PORT"`` to try ``MultiWorkerMirroredStrategy`` with ``n``
    local processes.
    """
    validation.integer("n", n, low=1)
    sockets = [socket.socket() for _ in range(n)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def multi_worker_strategy(collective_timeout=None, cluster_resolver=None):
    """A ``MultiWorkerMirroredStrategy`` whose collectives time out.

    Args:
        collective_timeout: seconds after which a collective op (all-reduce,
            broadcast) fails instead of waiting forever for a dead peer;
            ``None`` waits forever (TensorFlow's default). Use it with
            ``keras.callbacks.BackupAndRestore`` so survivors of a crashed
            worker exit and can be restarted together.
        cluster_resolver: default reads ``TF_CONFIG``.
    """
    return _tensorflow("multi_worker_strategy").multi_worker_strategy(collective_timeout, cluster_resolver)


def multi_worker_fit_supported():
    """Whether our models' ``fit`` works under ``MultiWorkerMirroredStrategy``.

    True when the installed Keras is in the range the workaround for
    keras-team/keras#20585 is written for
    (:data:`tf_gradmix.backend.tensorflow.trainer.MULTI_WORKER_FIT_BROKEN`;
    ``tests/upstream/test_keras_internals.py``).
    """
    from tf_gradmix.backend.tensorflow import trainer

    return trainer.multi_worker_fit_workaround_applies()


def accumulation_steps(logical_batch_size, micro_batch_size):
    """``k`` such that ``k`` global micro-batches make one logical batch.

    Args:
        logical_batch_size: examples per update, e.g. 32768.
        micro_batch_size: examples per ``fit`` step across all replicas
            (the global batch of the dataset).
    """
    micro_batch_size = validation.integer("micro_batch_size", micro_batch_size, low=1)
    logical_batch_size = validation.multiple(
        "logical_batch_size", logical_batch_size, micro_batch_size, f"micro_batch_size={micro_batch_size}"
    )
    return logical_batch_size // micro_batch_size


def micro_steps(update_steps, accumulation_steps):
    """The step count a schedule sees for ``update_steps`` updates.

    Keras calls ``LearningRateSchedule`` objects with the raw micro-step
    count under ``gradient_accumulation_steps``; a schedule meant in updates
    (warmup of 5 epochs, decay over 90) must be built with
    ``micro_steps(updates, k)``.
    """
    return int(update_steps) * max(1, int(accumulation_steps or 1))


