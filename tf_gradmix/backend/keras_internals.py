"""Keras internals that tf_gradmix relies on, the same on every backend.

Everything here is tied to the Keras versions we test (:data:`TESTED_KERAS`)
and is checked by ``tests/upstream/test_keras_internals.py``, which fails when upstream
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
