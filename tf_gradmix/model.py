r"""Sample-level GradientMix inside Keras ``fit``: the model hook.

The sample level (paper Eq. 4) mixes per-example gradients,
``g = sum_b pi_b grad l_b`` with ``pi_b = w_b / B``. By linearity this is
the gradient of the loss with every example's contribution multiplied by
``w_b``, so one backward pass suffices and no per-example gradient exists.

We apply ``w_b`` to the *gradient* of example ``b``'s prediction: in
``compute_loss`` each output ``y_pred`` is replaced by an identity whose
backward pass multiplies row ``b`` by ``w_b``. The loss *value* is the
plain loss, as the forward pass is unchanged (up to float32 rounding where
the backend compiles the mixed step differently), so ``loss`` in the logs
compares with unmixed runs and every loss metric stays plain; the gradient is

.. math::

    \nabla_\theta L = \frac{1}{D} \sum_b s_b\, w_b\, \nabla_\theta \ell_b ,

exactly what multiplying the user's sample weights ``s_b`` by ``w_b`` would
give for Keras's default ``sum_over_batch_size`` reduction (``D = B``
elements), and for every other reduction the same rule applied to its own
denominator ``D`` (``sum``, ``mean_with_sample_weight`` with
``D = sum_b s_b``, masked sequence losses with ``D`` = valid tokens): nothing
self-normalises by the random weights. The unit is the example: all tokens or
pixels of example ``b`` share ``w_b``.

The same hook applies the device level where the gradients reaching the
optimizer are already global (JAX): every example of shard ``k`` of the
global batch gets that shard's weight ``w_k``
(:meth:`tf_gradmix.noise.NoiseStream.shard_weights`).

What is not mixed: losses added by layers (regularisers, ``add_loss``), which
are not per example; and losses that couple examples (a loss of one example
that reads another example's prediction) get each prediction's path weighted,
which is not Eq. 4. Keras's own losses are all per example. At the first
training step :mod:`tf_gradmix.mixing_check` refuses a loss that reads no
prediction (nothing would be mixed) and names the trainable variables that a
``compute_loss`` reaches around the predictions.
"""

import inspect
import types

import keras
from keras import ops

from tf_gradmix import backend, mixing_check
from tf_gradmix.backend._keras import set_compute_loss, track_metric
from tf_gradmix.optimizer import (
    GAMMA_ATTRIBUTE,
    SAMPLE_HOOK_ATTRIBUTE,
    SampleHook,
    find_gradient_mix,
    is_enabled,
    sample_hook,
)

__all__ = ["Model", "Sequential", "enable", "is_enabled", "GAMMA_METRIC"]

GAMMA_METRIC = "gradmix_gamma"


@ops.custom_gradient
def _scale_gradient(x, scale):
    """Identity in the forward pass; multiplies the incoming gradient by scale."""

    def grad(*args, upstream=None):
        upstream = args[0] if upstream is None else upstream
        return upstream * ops.cast(scale, upstream.dtype), ops.zeros_like(scale)

    return x, grad


def mix_predictions(y_pred, weights):
    """Weights the gradient of each example's predictions by ``weights``.

    Args:
        y_pred: a model output or a nested structure of outputs, each with the
            examples on axis 0.
        weights: ``[B]`` tensor, ``w_b`` for each example.

    Returns:
        The same structure, equal in value, whose gradient for example ``b``
        is multiplied by ``w_b``. Non-float outputs pass through.
    """
    transform_output = backend.current().transform_output

    def mix_one(output):
        if output is None or not keras.backend.is_float_dtype(output.dtype):
            return output
        scale = ops.reshape(weights, (-1,) + (1,) * (len(output.shape) - 1))
        return transform_output(output, lambda t: _scale_gradient(t, scale))

    return keras.tree.map_structure(mix_one, y_pred)


def _batch_size(y_pred):
    first = next(t for t in keras.tree.flatten(y_pred) if t is not None)
    return ops.shape(first)[0]


def _compute_loss(model, base_compute_loss, x, y, y_pred, sample_weight, training):
    """The hook's ``compute_loss``: ``base_compute_loss`` with each example's prediction weighted."""
    mixer = find_gradient_mix(getattr(model, "optimizer", None))
    if not training or mixer is None:
        return base_compute_loss(x, y, y_pred, sample_weight, training=training)
    weights = mixer.batch_weights(_batch_size(y_pred))
    if weights is None or mixer.stream.is_plain:
        # GradientMix.apply weights the gradients (device level on TensorFlow), or
        # stddev=0: every weight is 1; the predictions stay untouched, so the
        # step is plain Keras's, bit for bit.
        loss = base_compute_loss(x, y, y_pred, sample_weight, training=training)
    else:
        loss = base_compute_loss(x, y, mix_predictions(y_pred, weights), sample_weight, training=training)
    hook = sample_hook(model)
    # Eager steps (PyTorch) check at the first step of each train function; traced ones at each trace.
    checked = getattr(backend.current(), "EAGER_STEPS", False) and hook.checked_function is hook.train_function
    if mixer.level == "sample" and not checked:
        # Refuses a loss that reads no prediction (nothing would be mixed).
        warned = mixing_check.check_sample_mixing(
            model, base_compute_loss, x, y, y_pred, sample_weight, warn_partial=not hook.warned_partial
        )
        hook.warned_partial = hook.warned_partial or warned
        hook.checked_function = hook.train_function
    hook.log_gamma(mixer.device_weights() if mixer.level == "device" else weights)
    return loss


def _drop_gamma(logs):
    """Removes ``gradmix_gamma`` from logs of steps that do not mix.

    Evaluation never mixes, and a model trained with a plain optimizer
    does not either: they report no gamma rather than a zero. ``logs`` is
    what a step returns: a dict, or ``(logs, state)`` on JAX.
    """
    if isinstance(logs, tuple):
        return (_drop_gamma(logs[0]),) + logs[1:]
    if isinstance(logs, dict):
        logs.pop(GAMMA_METRIC, None)
    return logs


def _train_logs(model, logs):
    if find_gradient_mix(getattr(model, "optimizer", None)) is None:
        return _drop_gamma(logs)
    return logs


def _wrap_train_function(model):
    """Wraps ``fit``'s train function: gamma only where weights were applied.

    Logs ``gradmix_gamma`` only if the traced step drew its weights in
    ``compute_loss`` (a custom ``train_step`` that bypasses it logs none,
    rather than the empty metric's 0), and marks the call so that a
    sample-level ``apply`` without weights explains the custom step.
    """
    hook = sample_hook(model)
    function = model.train_function  # set by Keras's make_train_function
    if function is None or function is hook.train_function:
        return function
    hook.gamma_logged = False

    def train_function(*data):  # (data) on TensorFlow, (state, data) on JAX
        try:
            with mixing_check.hooked_train_function():
                logs = function(*data)
        except Exception:
            backend.current().restore_after_failed_step(model, data)
            raise
        if not hook.gamma_logged:
            logs = _drop_gamma(logs)
        return logs

    train_function.__wrapped__ = function
    model.train_function = hook.train_function = train_function
    return train_function


def _install_hook(model):
    """Makes ``model`` apply the sample-level weights: the one installer of the hook.

    Used by :class:`Model`, :class:`Sequential` (at construction) and
    :func:`enable`: wraps the instance's ``compute_loss``, ``train_step``,
    ``test_step`` and ``make_train_function``, after what the backend needs
    for ``fit`` (:func:`tf_gradmix.backend` ``install_fit``), and attaches
    the :class:`tf_gradmix.optimizer.SampleHook` and the gamma metric.
    """
    module = backend.current()
    module.install_fit(model)  # first: it may wrap make_train_function
    base_compute_loss = _with_training_arg(model.compute_loss)
    base_train_step = model.train_step
    base_test_step = model.test_step
    base_make_train_function = model.make_train_function

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        return _compute_loss(self, base_compute_loss, x, y, y_pred, sample_weight, training)

    def train_step(self, *data):  # (data) on TensorFlow, (state, data) on JAX
        return _train_logs(self, base_train_step(*data))

    def test_step(self, *data):
        return _drop_gamma(base_test_step(*data))

    def make_train_function(self, force=False):
        base_make_train_function(force)
        return _wrap_train_function(self)

    train_step._gradmix_wrapper = True  # Keras's own step underneath (backend.jax.optimizer)
    with module.metric_scope(model):
        gamma = keras.metrics.Mean(name=GAMMA_METRIC)
    track_metric(model, GAMMA_ATTRIBUTE, gamma)
    set_compute_loss(model, types.MethodType(compute_loss, model))
    model.train_step = types.MethodType(train_step, model)
    model.test_step = types.MethodType(test_step, model)
    model.make_train_function = types.MethodType(make_train_function, model)
    setattr(model, SAMPLE_HOOK_ATTRIBUTE, SampleHook(gamma))


class _SampleMixing:
    """Mixin: the model installs the hook when constructed (see :func:`_install_hook`)."""

    def __init__(self, *args, **kwargs):
        backend.require(f"tf_gradmix.{type(self).__name__}")
        super().__init__(*args, **kwargs)
        _install_hook(self)


@keras.saving.register_keras_serializable(package="tf_gradmix")
class Model(_SampleMixing, keras.Model):
    """A ``keras.Model`` that trains with sample-level GradientMix.

    Use it exactly like ``keras.Model`` (functional ``Model(inputs, outputs)``
    or subclassed). When compiled with a :class:`tf_gradmix.GradientMix`
    optimizer (also inside a ``LossScaleOptimizer``), each training step
    weights example ``b``'s gradient by ``w_b`` (see module docstring);
    with any other optimizer it trains exactly like ``keras.Model``.

    Logs ``gradmix_gamma``, the mean of ``w^2`` over the epoch's steps (the
    paper's gamma-bar), while training with GradientMix. ``evaluate``,
    ``predict`` and validation never mix. A saved model reloads as this
    class and goes on mixing with the same noise stream.
    """


@keras.saving.register_keras_serializable(package="tf_gradmix")
class Sequential(_SampleMixing, keras.Sequential):
    """A ``keras.Sequential`` that trains with sample-level GradientMix.

    Same behaviour as :class:`tf_gradmix.Model`.
    """


def enable(model, per_example_gradients=False):
    """Makes an existing Keras model apply sample-level GradientMix.

    Works for functional, ``Sequential``, subclassed and
    ``keras.applications`` models, compiled or not: the model's own
    ``compute_loss`` (including a custom override that uses ``y_pred``) is
    wrapped so that, while training with a :class:`tf_gradmix.GradientMix`
    optimizer, each example's gradient is weighted by ``w_b``. Returns the
    same model object.

    Saving: the wrapper is not part of the model's class, so
    ``keras.models.load_model`` returns the original class without it. Its
    ``GradientMix`` optimizer is restored and refuses to train at the first
    step, with a message to call ``enable`` again (it never trains unmixed in
    silence). Build with :class:`tf_gradmix.Model` or
    :class:`tf_gradmix.Sequential` to reload a model that mixes by itself.

    Args:
        model: a ``keras.Model`` (also a :class:`tf_gradmix.Model`, to turn on
            ``per_example_gradients``).
        per_example_gradients: if True (TensorFlow only), each training step
            materialises the per-example gradients with ``tf.vectorized_map``
            and mixes them (:func:`tf_gradmix.exact.train_step`) instead of
            reweighting in one backward pass. Same update (to float32
            rounding, tested), several times the step time (see
            docs/performance.md) and ``B x parameters`` of memory: only for
            users who process per-example gradients. Models whose examples
            interact in training (BatchNorm, also nested) or that draw random
            numbers per batch (Dropout) are refused at once.

    Returns:
        ``model``.
    """
    backend.require("tf_gradmix.enable")
    if not isinstance(model, keras.Model):
        raise TypeError(
            "Invalid value for argument `model`: expected a keras.Model, got "
            f"{model!r} of type {type(model).__name__}."
        )
    if per_example_gradients:
        backend.require("tf_gradmix.enable(per_example_gradients=True)", ("tensorflow",))
        from tf_gradmix import per_example

        per_example.check_per_example_safe(model)
    if not is_enabled(model):
        _install_hook(model)
    if per_example_gradients and not sample_hook(model).per_example:
        _install_per_example_step(model)
    # Keras caches compiled step functions; rebuild them with the hook.
    model.train_function = None
    model.test_function = None
    return model


def _install_per_example_step(model):
    from tf_gradmix import exact

    def train_step(self, data):
        return _train_logs(self, exact.train_step(self, data))

    model.train_step = types.MethodType(train_step, model)
    sample_hook(model).per_example = True


def _with_training_arg(compute_loss):
    """Calls a user ``compute_loss`` that may predate the ``training`` arg."""
    if "training" in inspect.signature(compute_loss).parameters:
        return compute_loss

    def call(x, y, y_pred, sample_weight, training=True):
        del training
        return compute_loss(x, y, y_pred, sample_weight)

    return call
