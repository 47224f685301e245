"""The TensorFlow backend: ``tf.distribute`` replicas, tensor annotations, ``tf.function``.

Imported only when Keras runs on TensorFlow (:func:`tf_gradmix.backend.current`);
the interface it provides is documented in :mod:`tf_gradmix.backend`. The
optimizer side (per-replica weighting, accumulation across replicas) is in
:mod:`.optimizer`, the ``fit`` side (the MultiWorkerMirroredStrategy
workaround) in :mod:`.trainer`.

On TensorFlow a Keras train step runs once per replica of the current
``tf.distribute`` strategy, and the gradients that reach
``optimizer.apply`` are those of one replica (Keras divides each replica's
loss by the replica count and sums across replicas later, inside the inner
optimizer's update). So the sample level draws one stream per replica
(keyed by the replica id) and the device level weights each replica's
gradients before delegating.

Keras's TensorFlow losses read two annotations of ``y_pred``, its mask and
the logits Keras's softmax and sigmoid attach (:mod:`tf_gradmix.backend._keras`,
"Output annotations"), and they also recognise a raw ``Softmax``/``Sigmoid`` op by
its type (``keras/src/backend/tensorflow/nn.py::_get_logits``). A transformed
output must carry the same annotations, or the loss changes value:
:func:`transform_output` keeps them (checked by ``tests/upstream/test_keras_internals.py``).
"""

import tensorflow as tf

from tf_gradmix.backend import _keras
from tf_gradmix.backend.tensorflow.optimizer import apply_gradients, build_optimizer
from tf_gradmix.backend.tensorflow.trainer import install_fit, metric_scope, restore_after_failed_step

__all__ = [
    "GRADIENTS_PER_REPLICA",
    "compile_pure",
    "replica_id",
    "num_devices",
    "dense_gradient",
    "transform_output",
    "probability_logits",
    "read",
    "depends_on",
    "build_optimizer",
    "apply_gradients",
    "install_fit",
    "metric_scope",
    "restore_after_failed_step",
]

#: The gradients reaching ``optimizer.apply`` are one replica's.
GRADIENTS_PER_REPLICA = True

_PROBABILITY_OPS = {"Softmax": tf.nn.softmax, "Sigmoid": tf.math.sigmoid}


# -- compiling -------------------------------------------------------------------


def compile_pure(fn):
    """``fn``, a pure function of integer sizes and tensors, as one ``tf.function``.

    Called eagerly it runs as one graph (traced once per Python argument value)
    instead of one dispatch per op; called while a graph is traced (a train
    step, also under XLA) it is inlined into that graph.
    """
    return tf.function(fn, autograph=False, reduce_retracing=True)


# -- replicas ------------------------------------------------------------------


def _replica_context():
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "GradientMix weights must be computed in a replica context "
            "(inside `strategy.run` or a Keras train step), not in a "
            "cross-replica context."
        )
    return context


def replica_id():
    """The global id of the replica running this step (0 without a strategy)."""
    return _replica_context().replica_id_in_sync_group


def num_devices(model=None):
    """The replicas in sync: of ``model``'s strategy if given, else of the current one (1 without one)."""
    if model is not None:
        return model.distribute_strategy.num_replicas_in_sync
    context = tf.distribute.get_replica_context()
    if context is None:
        return tf.distribute.get_strategy().num_replicas_in_sync
    return context.num_replicas_in_sync


# -- gradients and outputs -------------------------------------------------------


def dense_gradient(gradient):
    """A dense tensor for a dense or ``tf.IndexedSlices`` gradient."""
    if isinstance(gradient, tf.IndexedSlices):
        return tf.convert_to_tensor(gradient)
    return gradient


def transform_output(y_pred, transform):
    """Applies ``transform`` to a model output, keeping Keras's annotations.

    ``transform`` must keep values unchanged (it may change gradients). The
    mask is copied; logits attached by Keras are transformed too; an output
    made by a raw ``Softmax``/``Sigmoid`` op is rebuilt with the same op on
    transformed logits, so Keras's losses take the same numerically stable
    path as for the original output.
    """
    logits = _keras.get_keras_logits(y_pred)
    op_type = None
    if logits is None and not tf.executing_eagerly() and hasattr(y_pred, "op"):
        op_type = y_pred.op.type if y_pred.op.type in _PROBABILITY_OPS else None
    if op_type is not None and len(y_pred.op.inputs) == 1:
        result = _PROBABILITY_OPS[op_type](transform(y_pred.op.inputs[0]))
    else:
        result = transform(y_pred)
    if logits is not None:
        _keras.set_keras_logits(result, transform(logits))
    mask = _keras.get_keras_mask(y_pred)
    if mask is not None:
        _keras.set_keras_mask(result, mask)
    return result


def probability_logits(y_pred):
    """``(logits, link)`` behind a softmax or sigmoid output, or ``None``.

    ``link`` is ``"softmax"`` or ``"sigmoid"``. The logits are the ones
    Keras's activations attach, else the input of the
    raw ``Softmax``/``Sigmoid`` op, the two ways Keras's losses recognise a
    probability output.
    """
    op = getattr(y_pred, "op", None)
    op_type = getattr(op, "type", None)
    if op_type not in _PROBABILITY_OPS:
        return None
    logits = _keras.get_keras_logits(y_pred)
    if logits is None:
        logits = op.inputs[0]
    return logits, op_type.lower()


def read(variable):
    """The value of a Keras variable in the step being traced."""
    return variable.value


def depends_on(function, inputs):
    """For each input, whether the scalar ``function(*inputs)`` depends on it differentiably.

    Traces ``function`` under a ``tf.GradientTape`` in a ``tf.function`` that
    is never executed and reads which gradients are ``None``; only the
    inputs' shapes and dtypes are used.
    """
    found = []

    def probe(*args):
        with tf.GradientTape(watch_accessed_variables=False) as tape:
            tape.watch(args)
            value = function(*args)
        grads = tape.gradient(value, list(args), unconnected_gradients=tf.UnconnectedGradients.NONE)
        found[:] = [g is not None for g in grads]
        return value

    specs = [tf.TensorSpec(t.shape, t.dtype) for t in inputs]
    # Traced only: nothing runs, so the check costs no step time.
    tf.function(probe, autograph=False).get_concrete_function(*specs)
    return found
