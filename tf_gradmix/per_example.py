r"""Per-example gradients and the opt-in exact per-example mixing mode.

Symbols: ``x_i, y_i`` example ``i`` of a batch of ``B``; ``l_i`` the value
``loss`` returns for a batch made of example ``i`` alone (averaged if it
returns per-element values); ``g_i = grad_theta l_i`` its gradient.

* :func:`per_example_gradients`: every ``g_i`` at once with
  ``tf.vectorized_map``. Each example runs through the model as a batch of
  one, so layers whose training-mode output for one example depends on the
  others (BatchNormalization) or that draw one random mask for the whole
  vectorised batch (Dropout and other random layers: every example would
  share one mask) would give wrong results; they are refused with a clear
  error (:func:`check_per_example_safe`). In inference mode every layer is
  per example. Memory grows as ``B x`` the number of parameters.
* :func:`train_step`: one Keras train step that mixes
  ``g = sum_b w_b g_b / B`` from materialised per-example gradients instead
  of reweighting the loss (what :func:`tf_gradmix.enable` installs with
  ``per_example_gradients=True``). The same update as the reweighting path
  up to float rounding, at 2-12x the step time on CPU.

The measurements built on per-example gradients (empirical Fisher, gradient
noise scale) are in :mod:`tf_gradmix.diagnostics`.
"""

import keras
import tensorflow as tf

from tf_gradmix import compat
from tf_gradmix import noise as noise_lib
from tf_gradmix.optimizer import find_gradient_mix

__all__ = [
    "per_example_gradients",
    "check_per_example_safe",
    "train_step",
    "has_sample_hook",
]

_ZERO = tf.UnconnectedGradients.ZERO

#: Attribute set on models whose ``compute_loss`` already weights each
#: example (tf_gradmix.Model, tf_gradmix.enable).
SAMPLE_HOOK_FLAG = "_gradmix_enabled"


def has_sample_hook(model):
    """Whether ``model`` applies GradientMix's sample-level weights in ``compute_loss``."""
    return bool(getattr(model, SAMPLE_HOOK_FLAG, False))


# -- when per-example gradients are right -------------------------------------


def _walk_layers(layer, seen=None):
    """``layer`` and every layer nested in it (models, wrappers, attributes)."""
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    children = list(getattr(layer, "layers", None) or [])
    for value in vars(layer).values():
        if isinstance(value, keras.layers.Layer):
            children.append(value)
        elif isinstance(value, (list, tuple)):
            children.extend(v for v in value if isinstance(v, keras.layers.Layer))
    for child in children:
        yield from _walk_layers(child, seen)


def _couples_examples(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def _is_random(layer):
    if getattr(layer, "rate", None) == 0:
        return False
    return any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())


def check_per_example_safe(model, training=True):
    """Raises if per-example gradients of ``model`` would be wrong.

    ``tf.vectorized_map`` runs each example as a batch of one. In training mode
    (``training=True``) that is wrong for

    * trainable ``BatchNormalization`` layers (also inside nested models):
      each example would be normalised by its own statistics, and the moving
      statistics would be updated from one example;
    * random layers (``Dropout``, ``GaussianNoise``, random augmentation, any
      layer holding a ``keras.random.SeedGenerator``): every example would
      share one random mask.

    In inference mode (``training=False``) every layer is per example.
    Custom layers that mix examples (e.g. batch statistics computed by hand)
    cannot be detected.

    Args:
        model: a ``keras.Model`` (or layer).
        training: the mode the model will run in.

    Raises:
        ValueError: naming the offending layers.
    """
    if not training:
        return
    coupling = [layer.name for layer in _walk_layers(model) if _couples_examples(layer)]
    if coupling:
        raise ValueError(
            "Per-example gradients (tf.vectorized_map) are wrong for models "
            "whose training-mode output for one example depends on the other "
            "examples of the batch, and this model has trainable "
            f"BatchNormalization layers: {coupling[:5]}"
            f"{' ...' if len(coupling) > 5 else ''}. Use the loss-reweighting "
            "path (tf_gradmix.Model / enable without per-example gradients), "
            "compute diagnostics with training=False, or replace BatchNorm "
            "(e.g. GroupNormalization / LayerNormalization)."
        )
    random = [layer.name for layer in _walk_layers(model) if _is_random(layer)]
    if random:
        raise ValueError(
            "Per-example gradients (tf.vectorized_map) in training mode would "
            "give every example the same random mask, and this model has "
            f"random layers: {random[:5]}{' ...' if len(random) > 5 else ''}. "
            "Use the loss-reweighting path, or training=False."
        )


def single_output(output):
    flat = tf.nest.flatten(output)
    if len(flat) != 1:
        raise NotImplementedError(
            "tf_gradmix.diagnostics supports models with a single output "
            f"tensor; this model returns {len(flat)}."
        )
    return flat[0]


def get_loss(loss, model=None):
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "No `loss` given and the model is not compiled with one."
            )
    if isinstance(loss, (list, tuple, dict)):
        raise NotImplementedError("Pass a single loss (one model output).")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise TypeError(f"Invalid value for argument `loss`: {loss!r}.")
    return loss


def example_loss(loss, y_i, z_i):
    """``l_i``: ``loss`` on a batch of one, averaged to a scalar."""
    value = loss(y_i[None], z_i[None])
    return tf.reduce_mean(tf.cast(value, z_i.dtype))


def trainable_tensors(model):
    """The ``tf.Variable`` behind each trainable Keras variable.

    What tapes and ``tf.autodiff.ForwardAccumulator`` understand.
    """
    return [v.value for v in model.trainable_variables]


def vectorized_example_gradients(model, x, y, example_scalar, variables, training):
    """``[B, *v.shape]`` gradients of ``example_scalar(output_i, y_i)`` for each example."""

    def one(args):
        x_i, y_i = args
        x_i = tf.nest.map_structure(lambda t: t[None], x_i)
        with tf.GradientTape() as tape:
            output = single_output(model(x_i, training=training))
            value = example_scalar(output, y_i)
        return tape.gradient(value, variables, unconnected_gradients=_ZERO)

    return tf.vectorized_map(one, (x, y), fallback_to_while_loop=True)


def maybe_function(fn, *args):
    """``fn(*args)``, traced as a ``tf.function`` when called eagerly."""
    if tf.executing_eagerly():
        return tf.function(fn)(*args)
    return fn(*args)


# -- per-example gradients ----------------------------------------------------


def per_example_gradients(model, x, y, loss, training=True):
    """Per-example gradients ``g_i = grad_theta l_i`` with ``tf.vectorized_map``.

    ``l_i = mean(loss(y[i:i+1], model(x[i:i+1])))``: the loss of a batch made
    of example ``i`` alone. Layer losses (regularisers, ``add_loss``) are not
    included. Memory grows as ``B x`` the number of parameters.

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs, a tensor/array (or nested structure) with ``B`` examples
            on axis 0.
        y: targets with ``B`` examples on axis 0.
        loss: a Keras loss (instance, function or name) called as
            ``loss(y_true, y_pred)``.
        training: mode of the forward pass (default ``True``). In training
            mode models with trainable BatchNormalization or random layers
            are refused (:func:`check_per_example_safe`).

    Returns:
        A list with one tensor per ``model.trainable_variables``, of shape
        ``[B, *variable.shape]``.

    Raises:
        ValueError: for models whose training-mode output for one example
            depends on the other examples (BatchNorm) or that share random
            masks across examples.
    """
    check_per_example_safe(model, training=training)
    loss = get_loss(loss)
    variables = trainable_tensors(model)

    def compute(x, y):
        return vectorized_example_gradients(
            model, x, y, lambda z, y_i: example_loss(loss, y_i, z[0]), variables, training
        )

    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    return maybe_function(compute, x, tf.convert_to_tensor(y))


# -- the exact per-example mixing mode -----------------------------------------


def _unscale_for_distribution(loss):
    # Keras divides each replica's loss by the replica count; the tracker
    # records the unscaled value (as Keras's own train_step does).
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * tf.cast(replicas, loss.dtype) if replicas > 1 else loss


def _detached_outputs(y_pred, tape):
    """Copies of the tensors a Keras loss reads from ``y_pred``, as watched leaves.

    A Keras loss reads the output, or the logits Keras attached to a softmax
    or sigmoid output (``compat.transform_output`` keeps that structure).
    Returns the transformed output and the list of ``(original, leaf)`` pairs.
    """
    pairs = []

    def leaf(tensor):
        copy = tf.stop_gradient(tensor)
        tape.watch(copy)
        pairs.append((tensor, copy))
        return copy

    return compat.transform_output(y_pred, leaf), pairs


def _loss_facing(output):
    """The originals ``_detached_outputs`` would detach, in the same order."""
    found = []

    def record(tensor):
        found.append(tensor)
        return tensor

    compat.transform_output(output, record)
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
                return tf_gradmix.per_example.train_step(self, data)
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
        tracker = compat.loss_tracker(model)
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
    if mixer is not None and mixer.level == "sample" and not has_sample_hook(model):
        weights = mixer.example_weights(batch_size)
        gamma = getattr(model, "_gradmix_gamma", None)
        if gamma is not None:
            gamma.update_state(noise_lib.gamma(weights))
    grads = [
        tf.tensordot(tf.cast(weights, g.dtype), g, axes=1) + extra
        for g, extra in zip(per_example, layer_grads)
    ]
    if variables:
        optimizer.apply(grads, model.trainable_variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
