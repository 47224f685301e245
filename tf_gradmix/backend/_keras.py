"""Every access of tf_gradmix to private Keras internals, on every backend.

Everything here is tied to the Keras versions we test (:data:`TESTED_KERAS`;
importing this module warns once on another) and each access has a
sentinel test that fails when upstream changes it:
``tests/upstream/test_keras_internals.py`` (on TensorFlow),
``tests/upstream/test_keras_internals_jax.py`` and
``tests/upstream/test_keras_jax.py`` (on JAX). Each
section names the upstream issue behind it, or says that there is none (a
private attribute without a public equivalent, read as Keras itself reads it).
Workarounds of upstream bugs that must switch off when fixed carry their own
version guard (:data:`tf_gradmix.backend.tensorflow.trainer.MULTI_WORKER_FIT_BROKEN`).
"""

import warnings

import keras
from keras.src.backend.common import tensor_attributes

#: Keras versions whose internals this module was written against.
TESTED_KERAS = ((3, 15),)


def keras_version():
    """``(major, minor)`` of the installed Keras."""
    return tuple(int(p) for p in keras.__version__.split(".")[:2])


def warn_if_untested(version=None):
    """Warns (and returns True) when Keras is not a version this module was tested with."""
    version = keras_version() if version is None else tuple(version[:2])
    if version in TESTED_KERAS:
        return False
    warnings.warn(
        f"tf_gradmix was tested with Keras {', '.join('.'.join(map(str, v)) for v in TESTED_KERAS)}, "
        f"not {keras.__version__}: the Keras internals it relies on (tf_gradmix/backend/) may "
        "have changed. Its version-guarded workarounds are off.",
        stacklevel=2,
    )
    return True


warn_if_untested()


# -- Model and trainer attributes (every backend; upstream: none, no public equivalent)


def set_compute_loss(model, compute_loss):
    """Installs ``compute_loss`` (which takes ``training``) on one model.

    Keras decides once, in ``Trainer.__init__``, whether ``compute_loss``
    accepts ``training`` (``_compute_loss_has_training_arg``, Keras >= 3.3)
    and otherwise calls it without; a replacement installed later must update
    that flag or evaluation would be treated as training.
    """
    model.compute_loss = compute_loss
    model._compute_loss_has_training_arg = True


def optimizer_trainable_variables(optimizer):
    """The variables a built optimizer updates, in its own order.

    Keras keeps them in ``Optimizer._trainable_variables`` (set by
    ``build``); ``apply`` without ``trainable_variables`` uses that list.
    """
    return optimizer._trainable_variables


def track_metric(model, attribute, metric):
    """Attaches ``metric`` to an already built model so ``fit`` logs it.

    Keras collects metrics from tracked attributes (``Model.metrics``) and
    locks a layer's tracker once it is built; ``Layer._untrack_variable``
    unlocks it the same way to change state after ``build``.
    """
    tracker = model._tracker
    was_locked = tracker.locked
    tracker.unlock()
    try:
        setattr(model, attribute, metric)
    finally:
        if was_locked:
            tracker.lock()  # keeps its previous message


def loss_tracker(model):
    """The metric behind the ``loss`` log, which Keras's ``train_step`` updates.

    A replacement train step (the per-example mixing mode,
    :mod:`tf_gradmix.exact`) must update it the same way.
    """
    return getattr(model, "_loss_tracker", None)


# -- Optimizer internals used by gradient accumulation across replicas
#
# tf_gradmix.backend.tensorflow.optimizer (keras-team/keras#20582) and, on JAX,
# tf_gradmix.backend.jax.optimizer run the inner optimizer's micro-steps
# themselves; they read these private parts of keras.optimizers.Optimizer
# (Keras 3.15, `BaseOptimizer`), checked by tests/upstream/test_keras_internals.py.


def gradient_accumulators(optimizer, variables):
    """The ``gradient_accumulation_steps`` accumulators of ``variables``, in order.

    Keras keeps them in ``_accumulated_gradients``, indexed like its
    trainable variables (``_get_variable_index``).
    """
    return [
        optimizer._accumulated_gradients[optimizer._get_variable_index(v)]
        for v in variables
    ]


def raw_iterations(optimizer):
    """The optimizer's raw step counter, which counts micro-steps.

    ``Optimizer.iterations`` is this counter divided by
    ``gradient_accumulation_steps``.
    """
    return optimizer._iterations


def track_optimizer_variable(optimizer, variable):
    """Adds a variable created outside ``add_variable`` to ``optimizer.variables``."""
    optimizer._track_variable(variable)


def update_with_accumulated_gradients(optimizer, means, variables):
    """The update step of an accumulating optimizer, given the mean gradients.

    What Keras 3.15 runs on an update step of ``gradient_accumulation_steps``
    (``BaseOptimizer._backend_apply_gradients``, its update branch, then the
    rest of ``apply``): clipping and weight decay, ``_backend_update_step``
    (on TensorFlow under a strategy, the cross-replica sum), the variables'
    constraints and one more raw step. Accumulation stays configured, so
    ``optimizer.iterations`` is the number of updates made, as Adam's and
    LAMB's bias corrections expect (the raw counter would count micro-steps).
    The caller resets the accumulators, and does not call this for an
    optimizer with ``use_ema`` (Keras advances the average on every
    micro-step) or for ``overwrite_with_gradient`` variables.

    Args:
        optimizer: the accumulating optimizer.
        means: the mean gradient of the accumulated micro-batches, one per
            variable, already divided by any ``loss_scale_factor``.
        variables: the trainable variables of ``means``.
    """
    means = optimizer._clip_gradients(means)
    optimizer._apply_weight_decay(variables)
    optimizer._backend_update_step(means, variables, optimizer.learning_rate)
    for variable in variables:
        if variable.constraint is not None:
            variable.assign(variable.constraint(variable))
    optimizer._iterations.assign_add(1)


# -- Trainer internals used by the two compiled steps of accumulation on JAX
#
# tf_gradmix.backend.jax.optimizer compiles a micro-step and an update step
# and builds Keras's train function around them the way Keras 3.15's
# JAXTrainer.make_train_function does (keras/src/backend/jax/trainer.py):
# the loop over ``steps_per_execution`` batches (``_make_function``) and the
# state's shardings under a distribution (``_get_state_sharding_spec``);
# checked by tests/upstream/test_keras_jax.py.


def jax_step_function(model, step):
    """Keras's train function around ``step(state, data)``: ``steps_per_execution`` steps a call."""
    return model._make_function(step)


def jax_state_shardings(model):
    """The shardings of Keras's train-step state (trainable, non-trainable, optimizer, metrics)."""
    return model._get_state_sharding_spec()


# -- Trainer methods wrapped on one model (TensorFlow multi-worker fit, keras-team/keras#20585)

#: The private methods of Keras 3.15's ``TensorFlowTrainer`` that
#: :mod:`tf_gradmix.backend.tensorflow.trainer` wraps on a model instance.
WRAPPED_TRAINER_METHODS = ("_maybe_symbolic_build", "_make_function")


def wrap_trainer_method(model, name, make_wrapper):
    """Replaces ``model.<name>``, one of :data:`WRAPPED_TRAINER_METHODS`, by ``make_wrapper(model.<name>)``.

    Only on this instance: Keras's trainer calls these methods through
    ``self``, so the instance attribute takes their place.
    """
    if name not in WRAPPED_TRAINER_METHODS:
        raise ValueError(f"Invalid value for argument `name`: {name!r}; expected one of {WRAPPED_TRAINER_METHODS}.")
    setattr(model, name, make_wrapper(getattr(model, name)))


def in_multi_worker_mode(strategy):
    """Keras's own test for "collective all-reduce in multi-worker mode" (``extended._in_multi_worker_mode``)."""
    return bool(strategy.extended._in_multi_worker_mode())


# -- Output annotations (every backend; upstream: none)
#
# Keras's losses read two annotations of a model output: its mask (set by
# masking layers; masked sequence losses) and, on TensorFlow, the logits
# behind a softmax or sigmoid output (so cross-entropies on probabilities are
# computed from the logits). Keras 3.15 keeps them as the tensor attributes
# ``_keras_mask`` and ``_keras_logits``, in a side table for a tensor that
# takes no attribute (a JAX array), through
# ``keras.src.backend.common.tensor_attributes``; it exports no public API
# for them.


def get_keras_mask(tensor):
    """The Keras mask of ``tensor``, or None."""
    return tensor_attributes.get_tensor_attr(tensor, "_keras_mask")


def set_keras_mask(tensor, mask):
    """Attaches ``mask`` to ``tensor`` as Keras's losses read it."""
    tensor_attributes.set_tensor_attr(tensor, "_keras_mask", mask)


def get_keras_logits(tensor):
    """The logits Keras's softmax or sigmoid attached to ``tensor``, or None."""
    return tensor_attributes.get_tensor_attr(tensor, "_keras_logits")


def set_keras_logits(tensor, logits):
    """Attaches ``logits`` to the probability output ``tensor`` as Keras's losses read them."""
    tensor_attributes.set_tensor_attr(tensor, "_keras_logits", logits)


# -- The JAX train step's state
#
# Keras 3.15's ``JAXTrainer.compute_loss_and_updates`` receives the
# optimizer's values (keyword ``optimizer_variables``) but reads the loss in a
# ``StatelessScope`` that maps only the model's variables, so a loss hook
# that reads an optimizer variable sees the stale value captured when the
# step was compiled (upstream: none filed; Keras itself maps them only around
# ``optimizer.scale_loss``). ``fit`` moves the state out of the variables
# before the first step (``purge_model_variables``) and puts back only the
# state of a step that returned (keras-team/keras#21019 restores it when
# ``fit`` is interrupted, not when a step raises).


def loss_step_optimizer_values(kwargs):
    """The optimizer's values among the keyword arguments of ``compute_loss_and_updates``, or None."""
    return kwargs.get("optimizer_variables")


def jax_train_state(args):
    """The ``(trainable, non_trainable, optimizer, metrics)`` values in a JAX train function's ``(state, data)``.

    None if ``args`` is not such a pair.
    """
    if not args or not isinstance(args[0], (tuple, list)) or len(args[0]) != 4:
        return None
    return tuple(args[0])

