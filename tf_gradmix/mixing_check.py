r"""Sample-level mixing that would be empty is refused; partial mixing is named.

Sample-level GradientMix (paper Eq. 4, ``g = sum_b pi_b grad l_b``) weights
the gradient where it flows into the model's predictions ``yhat`` (see
:mod:`tf_gradmix.model`). Write the training loss as a function of the
predictions and of the trainable variables ``theta`` reached by any other
path, ``L(yhat(theta), theta)``. Only the first argument's gradient is mixed:

.. math::

    \nabla_\theta L = \sum_b w_b\, J_b^\top \frac{\partial L}{\partial \hat y_b}
                      + \frac{\partial L}{\partial \theta}\Big|_{\hat y} .

At the first trace of a training step (before any update),
:func:`check_sample_mixing` evaluates the model's ``compute_loss`` once more
as a pure function of ``(yhat, theta)`` and asks the backend which of them
the scalar loss depends on *differentiably* (a structural question: the
computation is traced, never run). Then:

* the loss depends on no prediction: nothing would be mixed, a
  ``ValueError`` is raised (e.g. a loss added with ``add_loss`` and no
  compiled loss, or a ``compute_loss`` that calls the model again);
* ``dL/dtheta`` at fixed ``yhat`` is connected for some variables: their
  gradient is partly plain; a :class:`PartialMixingWarning` names them, once
  per model (e.g. a ``compute_loss`` that evaluates a second trainable model).

Weight regularizers (``kernel_regularizer``, ...) are not per example and
stay unmixed by design; during the check each is replaced by one of the same
value and no gradient, so they raise nothing. Losses added by layers in the
model's forward pass (``add_loss``, ``activity_regularizer``) are fixed
values in this re-evaluation; they are documented as unmixed and only count
when nothing else remains (the error above).

The backend answers one question, "which inputs does this scalar function
depend on differentiably": TensorFlow traces the function with a
``tf.GradientTape`` in a ``tf.function`` that is never executed and reads
which gradients are ``None``; JAX linearizes the function and reads which
inputs remain in the jaxpr of the linear map (``depends_on`` of each
:mod:`tf_gradmix.backend` package).
"""

import contextlib
import warnings

import keras

from tf_gradmix import backend

__all__ = [
    "PartialMixingWarning",
    "check_sample_mixing",
    "hooked_train_function",
    "sample_weights_not_requested_message",
]

#: How many names of bypassing variables a warning lists.
MAX_NAMES = 5


class PartialMixingWarning(UserWarning):
    """Some trainable variables get part of their gradient unmixed."""


# -- which inputs a scalar function depends on ---------------------------------


def depends_on(function, inputs):
    """For each input: does the scalar ``function(*inputs)`` depend on it?

    "Depends" means differentiably: a gradient path exists (a path through
    ``stop_gradient`` or an integer op does not count). ``inputs`` are
    tensors or variables; only their shapes and dtypes are used. Each
    backend answers (``depends_on`` of :func:`tf_gradmix.backend.current`).
    """
    return backend.current().depends_on(function, list(inputs))


# -- the check ----------------------------------------------------------------


class _WithoutGradient:
    """A regularizer of the same value whose gradient is cut (0 if none)."""

    def __init__(self, regularizer):
        self.regularizer = regularizer

    def __call__(self, x):
        if self.regularizer is None:
            return keras.ops.zeros((), dtype=x.dtype)
        return keras.ops.stop_gradient(self.regularizer(x))


@contextlib.contextmanager
def _regularizers_without_gradient(variables):
    """Weight regularizers keep their value and lose their gradient.

    Without any, the first variable gets a constant zero one, so the loss
    is never empty (Keras's default ``compute_loss`` refuses an empty one).
    """
    changed = [v for v in variables if v.regularizer is not None] or variables[:1]
    originals = [v.regularizer for v in changed]
    try:
        for v, regularizer in zip(changed, originals):
            v.regularizer = _WithoutGradient(regularizer)
        yield
    finally:
        for v, regularizer in zip(changed, originals):
            v.regularizer = regularizer


def _is_float(tensor):
    return tensor is not None and keras.backend.is_float_dtype(
        keras.backend.standardize_dtype(tensor.dtype)
    )


def loss_dependence(model, compute_loss, x, y, y_pred, sample_weight):
    """``(reads_predictions, bypassing_variables)`` of ``compute_loss``.

    Args:
        model: the ``keras.Model`` being trained.
        compute_loss: the model's loss function without the mixing hook,
            ``compute_loss(x, y, y_pred, sample_weight, training=True)``.
        x, y, y_pred, sample_weight: this step's tensors (``y_pred`` unmixed).

    Returns:
        ``reads_predictions``: whether the loss depends on any float
        prediction; ``bypassing_variables``: the trainable variables whose
        loss gradient at fixed predictions is connected, regularizers aside.
    """
    leaves = keras.tree.flatten(y_pred)
    float_index = [i for i, t in enumerate(leaves) if _is_float(t)]
    variables = list(model.trainable_variables)
    num_predictions = len(float_index)
    # The loss may update metrics (per-output loss trackers); inside the probe
    # they keep the values the step sees (on JAX the step's state lives in a
    # StatelessScope that the probe's own scope would otherwise hide).
    others = [(v, v.value) for v in list(model.non_trainable_variables) + list(model.metrics_variables)]

    def loss_of(*args):
        predictions, values = args[:num_predictions], args[num_predictions:]
        probe_leaves = list(leaves)
        for i, tensor in zip(float_index, predictions):
            probe_leaves[i] = tensor
        probe_pred = keras.tree.pack_sequence_as(y_pred, probe_leaves)
        with keras.StatelessScope(state_mapping=others + list(zip(variables, values))):
            with _regularizers_without_gradient(variables):
                return compute_loss(x, y, probe_pred, sample_weight, training=True)

    inputs = [leaves[i] for i in float_index] + variables
    connected = depends_on(loss_of, inputs)
    reads_predictions = any(connected[:num_predictions])
    bypassing = [v for v, c in zip(variables, connected[num_predictions:]) if c]
    return reads_predictions, bypassing


def check_sample_mixing(model, compute_loss, x, y, y_pred, sample_weight, warn_partial=True):
    """Raises if sample-level mixing would be empty; warns if partial and ``warn_partial``.

    Called by the sample-level hook while a training step is traced, before
    the step's gradients exist; see the module docstring. Arguments as in
    :func:`loss_dependence`. Returns whether it warned (the hook warns once
    per model).

    Raises:
        ValueError: the training loss does not depend on the predictions.
    """
    reads_predictions, bypassing = loss_dependence(
        model, compute_loss, x, y, y_pred, sample_weight
    )
    if not reads_predictions:
        raise ValueError(_no_prediction_message(model))
    if bypassing and warn_partial:
        warnings.warn(_partial_message(bypassing), PartialMixingWarning, stacklevel=2)
        return True
    return False


_FIXES = (
    "To mix, (a) return the per-example losses as a model output and compile "
    "a loss on it (e.g. `loss=lambda y_true, y_pred: y_pred`, with any "
    "targets), or give `compile` a loss that reads the predictions. Keras "
    "reduces a compiled loss to its mean over the batch, while `add_loss` sums "
    "the tensor it is given: where it was given the per-example losses, "
    "`loss=lambda y_true, y_pred: y_pred` divides the loss and its gradient by "
    "the batch size (harmless with Adam, not with SGD). To keep the sum, "
    "compile a loss with `reduction='sum'`: a `keras.losses.Loss` subclass "
    "whose `call(y_true, y_pred)` returns `y_pred`, built as "
    "`PerExample(reduction='sum')`; (b) on a "
    "model without the hook (a plain keras.Model), multiply the per-example "
    "losses by `optimizer.example_weights(batch_size)` in the layer that adds "
    "them, while training; or (c) use "
    "`GradientMix(level='device')`, which weights whole replicas and works "
    "with any loss."
)


def _no_prediction_message(model):
    layer_losses = len(model.losses)
    found = (
        f"The model has {layer_losses} loss(es) added by layers (`add_loss`, "
        "regularizers); they are not per example and are never mixed. "
        if layer_losses
        else ""
    )
    return (
        "GradientMix(level='sample') weights each example's gradient where it "
        "flows into the model's predictions (`y_pred`), but this model's "
        "training loss does not depend on its predictions, so no gradient "
        "would be mixed. This happens when `compile` has no `loss` and the "
        "loss comes from `add_loss`, or when `compute_loss` ignores `y_pred`. "
        f"{found}Training was stopped before any update. {_FIXES}"
    )


def _partial_message(bypassing):
    names = [getattr(v, "path", v.name) for v in bypassing]
    listed = ", ".join(names[:MAX_NAMES])
    if len(names) > MAX_NAMES:
        listed += f", ... ({len(names) - MAX_NAMES} more)"
    return (
        f"GradientMix(level='sample'): the training loss reaches {len(names)} "
        "trainable variable(s) by a path that bypasses the model's predictions "
        f"(`y_pred`): {listed}. That part of their gradient is averaged, not "
        "mixed. This happens when `compute_loss` evaluates another model or "
        "calls the model again. If that other model should not train (a "
        "distillation teacher, a frozen encoder), freeze it before `compile`: "
        "`teacher.trainable = False` removes this warning and its updates. "
        "Otherwise compute every per-example loss from `y_pred`, multiply the "
        "others by `optimizer.example_weights(batch_size)`, or use "
        "GradientMix(level='device')."
    )


# -- a train step that applies gradients without the hook ---------------------

# A module global: the error is raised in GradientMix.apply, which is not given the model, and
# tf.distribute traces each replica's step in its own thread inside the call.
_hooked_train_functions = 0


@contextlib.contextmanager
def hooked_train_function():
    """Marks a call of the train function of a model with the sample-level hook.

    The mark is global, not per thread: tf.distribute traces each replica's
    step in its own thread inside this call.
    """
    global _hooked_train_functions
    _hooked_train_functions += 1
    try:
        yield
    finally:
        _hooked_train_functions -= 1


def sample_weights_not_requested_message():
    """The error of a sample-level ``apply`` for which no weights were drawn."""
    if _hooked_train_functions:
        return (
            "GradientMix(level='sample') received gradients that no example "
            "weight touched: the model has the GradientMix hook, but its "
            "`train_step` computes the loss itself and calls "
            "`apply_gradients`, so `fit`'s `compute_loss` (where the hook "
            "weights each example) is bypassed. Weight the per-example losses "
            "in that `train_step` with the optimizer's weights of the step:\n"
            "    w = optimizer.example_weights(keras.ops.shape(per_example_loss)[0])\n"
            "    loss = keras.ops.mean(per_example_loss * w)\n"
            "or use GradientMix(level='device')."
        )
    return (
        "GradientMix(level='sample') needs the model to weight each "
        "example, but this model has no GradientMix hook, so it would "
        "train unmixed. Use `model = tf_gradmix.enable(model)` (or "
        "build it with tf_gradmix.Model / tf_gradmix.Sequential); in a "
        "custom training loop multiply the per-example losses by "
        "`optimizer.example_weights(batch_size)`; or use level='device'."
    )
