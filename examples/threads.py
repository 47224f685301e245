"""TensorFlow thread limits shared by the examples' ``--threads`` flag."""

from examples.config import option

__all__ = ["limit_threads", "threads_field"]


def limit_threads(threads):
    """Caps TensorFlow's intra- and inter-op thread pools at ``threads`` (None: leave the default).

    Must run before TensorFlow executes anything; the sweep uses it to run
    several one-thread runs side by side on a small machine.
    """
    if not threads:
        return
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)


def threads_field(group="run"):
    """A Config field ``threads`` (flag ``--threads``), the argument of :func:`limit_threads`."""
    return option(None, help="cap TensorFlow's thread pools (default: all cores)", affects_result=False, group=group)
