"""The ``tf.distribute`` side of :mod:`tf_gradmix.distribute` (documented there)."""

import tensorflow as tf


def worker_index(strategy=None):
    """The cluster task id of this worker under ``strategy`` (default: the current one); 0 without a cluster."""
    strategy = strategy or tf.distribute.get_strategy()
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.cluster_spec().as_dict():
        return 0
    return int(resolver.task_id or 0)


def multi_worker_strategy(collective_timeout=None, cluster_resolver=None):
    """``MultiWorkerMirroredStrategy`` with ``CommunicationOptions(timeout_seconds=collective_timeout)``."""
    options = tf.distribute.experimental.CommunicationOptions(timeout_seconds=collective_timeout)
    return tf.distribute.MultiWorkerMirroredStrategy(cluster_resolver=cluster_resolver, communication_options=options)
