r"""The opt-in exact mixing mode: mix materialised per-example gradients (TensorFlow).

What :func:`tf_gradmix.enable` installs with ``per_example_gradients=True``:
instead of reweighting the loss in one backward pass, each train step
computes every example's gradient (:mod:`tf_gradmix.per_example`) and mixes
them, ``g = sum_b w_b g_b``. The same update as the reweighting path up to
float rounding, at several times its step time and ``B x parameters`` of
memory (measured in docs/performance.md): for users who process
per-example gradients (e.g. per-example clipping). TensorFlow only.
"""

from tf_gradmix import backend
from tf_gradmix.optimizer import find_gradient_mix, is_enabled

__all__ = ["train_step"]


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
    backend.require("tf_gradmix.exact.train_step", ("tensorflow",))
    from tf_gradmix.backend.tensorflow import exact

    mixer = find_gradient_mix(model.optimizer)
    example_weights = None
    if mixer is not None and mixer.level == "sample" and not is_enabled(model):
        # Without the hook (whose compute_loss weighted the cotangents and logs gamma).
        example_weights = mixer.example_weights
    return exact.train_step(model, data, per_example_fn, example_weights)
