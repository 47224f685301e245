r"""The exact mixing mode's TensorFlow step: mix materialised per-example gradients.

:func:`train_step` is the TensorFlow half of :func:`tf_gradmix.exact.train_step`
(which documents the mode and decides the weights ``w_b``): one batched forward
pass, every example's gradient with ``tf.vectorized_map``
(:mod:`tf_gradmix.backend.tensorflow.per_example`), then ``g = sum_b w_b g_b``.
"""

import keras
import tensorflow as tf

from tf_gradmix.backend._keras import loss_tracker
from tf_gradmix.backend.tensorflow import transform_output
from tf_gradmix.backend.tensorflow.per_example import (
    check_per_example_safe,
    trainable_tensors,
    vectorized_example_gradients,
)

__all__ = ["train_step"]

_ZERO = tf.UnconnectedGradients.ZERO


def _unscale_for_distribution(loss):
    # Keras divides each replica's loss by the replica count; the tracker
    # records the unscaled value (as Keras's own train_step does).
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * tf.cast(replicas, loss.dtype) if replicas > 1 else loss


def _detached_outputs(y_pred, tape):
    """Copies of the tensors a Keras loss reads from ``y_pred``, as watched leaves.

    A Keras loss reads the output, or the logits Keras attached to a softmax
    or sigmoid output (``transform_output`` keeps that structure).
    Returns the transformed output and the list of ``(original, leaf)`` pairs.
    """
    pairs = []

    def leaf(tensor):
        copy = tf.stop_gradient(tensor)
        tape.watch(copy)
        pairs.append((tensor, copy))
        return copy

    return transform_output(y_pred, leaf), pairs


def _loss_facing(output):
    """The originals ``_detached_outputs`` would detach, in the same order."""
    found = []

    def record(tensor):
        found.append(tensor)
        return tensor

    transform_output(output, record)
    return found


def train_step(model, data, per_example_fn=None, example_weights=None):
    r"""One Keras train step: ``g = sum_b w_b g_b + grad L_layers``, then ``optimizer.apply``.

    Args:
        model, data, per_example_fn: as :func:`tf_gradmix.exact.train_step`.
        example_weights: ``fn(B) -> w``, the ``B`` mixing weights ``w_b``;
            ``None`` for ``w_b = 1`` (plain averaging, or cotangents the
            sample-level hook already weighted).

    Returns:
        The logs dict, like ``keras.Model.train_step``.
    """
    check_per_example_safe(model, training=True)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = trainable_tensors(model)
    optimizer = model.optimizer

    # 1. Batched forward pass: loss value, dL/dyhat and the layer losses' gradient.
    with tf.GradientTape(persistent=True) as tape:
        y_pred = model(x, training=True)
        loss_input, pairs = _detached_outputs(y_pred, tape)
        loss = model.compute_loss(x, y, loss_input, sample_weight, training=True)
        tracker = loss_tracker(model)
        if tracker is not None:
            tracker.update_state(
                _unscale_for_distribution(loss),
                sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
            )
        scaled = optimizer.scale_loss(loss) if optimizer is not None else loss
    cotangents = tape.gradient(
        scaled, [leaf for _, leaf in pairs], unconnected_gradients=_ZERO
    )
    layer_grads = tape.gradient(scaled, variables, unconnected_gradients=_ZERO)
    del tape

    # 2. Per-example gradients g_b = J_b^T dL/dyhat_b (vectorised).
    def contribution(output, cotangent_b):
        facing = _loss_facing(output)
        if len(facing) != len(cotangent_b):
            raise RuntimeError("Per-example outputs differ from the batched ones.")
        return tf.add_n(
            [tf.reduce_sum(t[0] * tf.cast(c, t.dtype)) for t, c in zip(facing, cotangent_b)]
        )

    per_example = vectorized_example_gradients(
        model, x, cotangents, contribution, variables, training=True
    )
    if per_example_fn is not None:
        per_example = per_example_fn(per_example)

    # 3. Mix: g = sum_b w_b g_b (+ layer losses, unmixed).
    batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
    weights = tf.ones([batch_size]) if example_weights is None else example_weights(batch_size)
    grads = [
        tf.tensordot(tf.cast(weights, g.dtype), g, axes=1) + extra
        for g, extra in zip(per_example, layer_grads)
    ]
    if variables:
        optimizer.apply(grads, model.trainable_variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
