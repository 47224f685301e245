r"""Per-example gradients on TensorFlow (``tf.vectorized_map``), re-exported by :mod:`tf_gradmix.per_example`.

Symbols: ``x_i, y_i`` example ``i`` of a batch of ``B``; ``l_i`` the value
``loss`` returns for a batch made of example ``i`` alone (averaged if it
returns per-element values); ``g_i = grad_theta l_i`` its gradient. The helpers
beside the two public functions serve the exact mode and the diagnostics.
"""

import keras
import tensorflow as tf

__all__ = ["per_example_gradients", "check_per_example_safe"]

_ZERO = tf.UnconnectedGradients.ZERO


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
