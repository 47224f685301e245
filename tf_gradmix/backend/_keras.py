"""Every access of tf_gradmix to private Keras internals, on every backend.

Everything here is tied to the Keras versions we test (:data:`TESTED_KERAS`)
and is checked by ``tests/upstream/test_keras_internals.py`` (and, for the
JAX trainer, ``tests/upstream/test_keras_jax.py``), which fail when upstream
behaviour changes. Importing this module warns once on an untested Keras.
"""

import warnings

import keras

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

    A replacement train step (the per-example mixing mode of
    :mod:`tf_gradmix.diagnostics`) must update it the same way.
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
