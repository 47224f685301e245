r"""The opt-in exact mixing mode: mix materialised per-example gradients (TensorFlow).

What :func:`tf_gradmix.enable` installs with ``per_example_gradients=True``:
instead of reweighting the loss in one backward pass, each train step
computes every example's gradient (:mod:`tf_gradmix.per_example`) and mixes
them, ``g = sum_b w_b g_b``. The same update as the reweighting path up to
float rounding, at several times its step time and ``B x parameters`` of
memory (measured in docs/performance.md): for users who process
per-example gradients (e.g. per-example clipping). TensorFlow only.
"""

import keras
import tensorflow as tf

from tf_gradmix.backend._keras import loss_tracker
from tf_gradmix.backend.tensorflow import transform_output
from tf_gradmix.optimizer import find_gradient_mix, is_enabled
from tf_gradmix.per_example import check_per_example_safe, trainable_tensors, vectorized_example_gradients

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


def train_step(model, data, per_example_fn=None):
    r"""One Keras train step that mixes materialised per-example gradients.

    The opt-in exact alternative to loss reweighting. For a batch of ``B``
    examples with predictions ``yhat_b``, Keras's loss ``L`` (the model's own
    ``compute_loss``, with sample weights and its reduction) and mixing weights
    ``w_b`` (``GradientMix.example_weights(B)``, mean 1):

    .. math::

        g_b = J_b^\top \frac{\partial L}{\partial \hat y_b},\qquad
        g = \sum_b w_b\, g_b + \nabla_\theta L_{\text{layers}},

    where ``g_b`` (computed for all ``b`` with ``tf.vectorized_map``) is example
    ``b``'s gradient of the batch loss: ``s_b grad l_b / B`` for the default
    ``sum_over_batch_size`` reduction (``s_b`` the user's sample weight), and
    the same rule with the loss's own denominator for other reductions. Layer
    losses ``L_layers`` (regularisers, ``add_loss``) are added unmixed. This
    equals the reweighting path (:class:`tf_gradmix.Model`) up to float
    rounding. With a plain optimizer, or ``GradientMix(level="device")``,
    ``w_b = 1`` (plain averaging; the device weights are applied by the
    optimizer). On a model with the sample-level hook
    (:func:`tf_gradmix.enable`), the hook's ``compute_loss`` already weights
    ``dL/dyhat_b`` by ``w_b`` (and logs gamma), so no weight is applied twice.

    The step runs one batched forward pass (loss, metrics, layer losses) and
    one vectorised per-example forward and backward pass; memory grows as
    ``B x`` parameters. Follows Keras's TensorFlow ``train_step``: loss
    tracker, ``optimizer.scale_loss``, ``optimizer.apply``, ``compute_metrics``.

    Args:
        model: a compiled ``keras.Model`` with one output and no trainable
            BatchNormalization or random layers.
        data: the step's data, ``x``, ``(x, y)`` or ``(x, y, sample_weight)``.
        per_example_fn: optional ``fn(per_example_grads) -> per_example_grads``
            applied to the list of ``[B, *v.shape]`` gradients ``g_b`` before
            mixing (e.g. per-example clipping). Default: none.

    Returns:
        The logs dict, like ``keras.Model.train_step``.

    Raises:
        ValueError: for BatchNorm or random-layer models (see
            :func:`check_per_example_safe`).

    Example (what ``train_step`` of a per-example model does)::

        class PerExampleModel(keras.Model):
            def train_step(self, data):
                return tf_gradmix.exact.train_step(self, data)
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
    weights = tf.ones([batch_size])
    mixer = find_gradient_mix(optimizer)
    if mixer is not None and mixer.level == "sample" and not is_enabled(model):
        # Without the hook (whose compute_loss weighted the cotangents and logs gamma).
        weights = mixer.example_weights(batch_size)
    grads = [
        tf.tensordot(tf.cast(weights, g.dtype), g, axes=1) + extra
        for g, extra in zip(per_example, layer_grads)
    ]
    if variables:
        optimizer.apply(grads, model.trainable_variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
