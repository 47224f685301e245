"""The one place that relies on Keras internals not covered by its public API.

Everything here is tied to the Keras versions we test (3.15) and is checked by
``tests/test_compat.py``, which fails when upstream behaviour changes.

* Tensor annotations of model outputs. Keras's TensorFlow losses read two
  attributes of ``y_pred``: ``_keras_mask`` (set by masking layers; masked
  sequence losses) and ``_keras_logits`` (set by Keras's softmax and sigmoid,
  so cross-entropies on probabilities are computed from the logits), and they
  also recognise a raw ``Softmax``/``Sigmoid`` op by its type
  (``keras/src/backend/tensorflow/nn.py::_get_logits``). A transformed output
  must carry the same annotations, or the loss changes value.
"""

import types
import warnings

import keras
import tensorflow as tf

#: Keras versions whose internals this module was written against.
TESTED_KERAS = ((3, 15),)

_PROBABILITY_OPS = {"Softmax": tf.nn.softmax, "Sigmoid": tf.math.sigmoid}


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
        f"not {keras.__version__}: the Keras internals it relies on (tf_gradmix/compat.py) may "
        "have changed. Its version-guarded workarounds are off.",
        stacklevel=2,
    )
    return True


warn_if_untested()


def transform_output(y_pred, transform):
    """Applies ``transform`` to a model output, keeping Keras's annotations.

    ``transform`` must keep values unchanged (it may change gradients). The
    mask is copied; logits attached by Keras are transformed too; an output
    made by a raw ``Softmax``/``Sigmoid`` op is rebuilt with the same op on
    transformed logits, so Keras's losses take the same numerically stable
    path as for the original output.
    """
    logits = getattr(y_pred, "_keras_logits", None)
    op_type = None
    if logits is None and not tf.executing_eagerly() and hasattr(y_pred, "op"):
        op_type = y_pred.op.type if y_pred.op.type in _PROBABILITY_OPS else None
    if op_type is not None and len(y_pred.op.inputs) == 1:
        result = _PROBABILITY_OPS[op_type](transform(y_pred.op.inputs[0]))
    else:
        result = transform(y_pred)
    if logits is not None:
        result._keras_logits = transform(logits)
    mask = getattr(y_pred, "_keras_mask", None)
    if mask is not None:
        result._keras_mask = mask
    return result


def probability_logits(y_pred):
    """``(logits, link)`` behind a softmax or sigmoid output, or ``None``.

    ``link`` is ``"softmax"`` or ``"sigmoid"``. The logits are the ones
    Keras's activations attach (``_keras_logits``), else the input of the
    raw ``Softmax``/``Sigmoid`` op, the two ways Keras's losses recognise a
    probability output.
    """
    op = getattr(y_pred, "op", None)
    op_type = getattr(op, "type", None)
    if op_type not in _PROBABILITY_OPS:
        return None
    logits = getattr(y_pred, "_keras_logits", None)
    if logits is None:
        logits = op.inputs[0]
    return logits, op_type.lower()


def set_compute_loss(model, compute_loss):
    """Installs ``compute_loss`` (which takes ``training``) on one model.

    Keras decides once, in ``Trainer.__init__``, whether ``compute_loss``
    accepts ``training`` (``_compute_loss_has_training_arg``, Keras >= 3.3)
    and otherwise calls it without; a replacement installed later must update
    that flag or evaluation would be treated as training.
    """
    model.compute_loss = compute_loss
    model._compute_loss_has_training_arg = True


# ---------------------------------------------------------------------------
# Multi-worker `fit` under MultiWorkerMirroredStrategy (keras-team/keras#20585)
# ---------------------------------------------------------------------------
#
# Stock Keras 3 (tested: 3.15.1) cannot `fit` or `evaluate` under
# `tf.distribute.MultiWorkerMirroredStrategy` with more than one worker
# (upstream: https://github.com/keras-team/keras/issues/20585, open):
#
# 1. `TensorFlowTrainer._maybe_symbolic_build` takes the first distributed
#    batch and calls `strategy.reduce("MEAN", batch, axis=None)` on it, which
#    fails for a multi-worker strategy with "Attempt to convert a value
#    (PerReplica:{...}) with an unsupported type". The batch is only used for
#    its shapes and dtypes, so we hand Keras the first local replica's batch.
# 2. `reduce_per_replica(..., reduction="auto")` reduces every log of the step
#    with `strategy.reduce("MEAN", v, axis=0)` in multi-worker mode, which fails
#    for scalar logs ("Invalid reduction dimension 0 for input with 0
#    dimensions"). We give every log a leading axis of length 1 inside the
#    replica function; the same reduction then returns the mean over all
#    replicas of all workers, in the log's original shape - what Keras
#    computes for MirroredStrategy.
#
# Both changes act only when the model's strategy is a MultiWorkerMirroredStrategy
# with more than one worker; every other strategy runs stock Keras code.
# `tests/test_distribute.py` checks that stock fit still fails on the
# installed Keras (so we notice an upstream fix) and that the guard below
# covers the installed version.

#: Keras versions (inclusive ``(major, minor)`` bounds) known to need the
#: multi-worker fit workaround; the upper bound is the newest version tested.
MULTI_WORKER_FIT_BROKEN = ((3, 0), (3, 15))

MULTI_WORKER_FIT_ISSUE = "https://github.com/keras-team/keras/issues/20585"

_warned_unguarded_version = False


def multi_worker_fit_workaround_applies(version=None):
    """Whether this Keras version gets the multi-worker ``fit`` workaround."""
    version = keras_version() if version is None else tuple(version[:2])
    low, high = MULTI_WORKER_FIT_BROKEN
    return low <= version <= high


def is_multi_worker(strategy):
    """Keras's own test for "collective all-reduce in multi-worker mode"."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and bool(
        strategy.extended._in_multi_worker_mode()
    )


def _needs_workaround(model):
    global _warned_unguarded_version
    if not is_multi_worker(model.distribute_strategy):
        return False
    if multi_worker_fit_workaround_applies():
        return True
    if not _warned_unguarded_version:
        _warned_unguarded_version = True
        warnings.warn(
            f"tf_gradmix's MultiWorkerMirroredStrategy fit workaround is "
            f"tested on Keras {MULTI_WORKER_FIT_BROKEN[1]} and is off for Keras "
            f"{keras.__version__}; see {MULTI_WORKER_FIT_ISSUE}.",
            stacklevel=3,
        )
    return False


def _first_local_batch(strategy, batch):
    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


def _with_leading_axis(step_function):
    def step(data):
        logs = step_function(data)
        return tf.nest.map_structure(
            lambda v: tf.expand_dims(v, 0) if isinstance(v, tf.Tensor) else v, logs
        )

    return step


def _multi_worker_symbolic_build(model, base, iterator=None, data_batch=None):
    if iterator is None or not _needs_workaround(model):
        return base(iterator=iterator, data_batch=data_batch)
    for _, _, batches in iterator:
        data_batch = _first_local_batch(model.distribute_strategy, next(batches))
        break
    return base(iterator=None, data_batch=data_batch)


def _multi_worker_make_function(model, base, step_function):
    if _needs_workaround(model):
        step_function = _with_leading_axis(step_function)
    return base(step_function)


class MultiWorkerFitMixin:
    """Mixin for ``keras.Model`` subclasses: ``fit``/``evaluate`` under MWMS.

    See the section comment above (keras-team/keras#20585).
    """

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        return _multi_worker_symbolic_build(
            self, super()._maybe_symbolic_build, iterator, data_batch
        )

    def _make_function(self, step_function):
        return _multi_worker_make_function(self, super()._make_function, step_function)


def install_multi_worker_fit(model):
    """The same as :class:`MultiWorkerFitMixin`, for one existing model."""

    if isinstance(model, MultiWorkerFitMixin) or getattr(
        model, "_gradmix_multi_worker_fit", False
    ):
        return model
    base_build = model._maybe_symbolic_build
    base_make = model._make_function

    def maybe_symbolic_build(self, iterator=None, data_batch=None):
        return _multi_worker_symbolic_build(self, base_build, iterator, data_batch)

    def make_function(self, step_function):
        return _multi_worker_make_function(self, base_make, step_function)

    model._maybe_symbolic_build = types.MethodType(maybe_symbolic_build, model)
    model._make_function = types.MethodType(make_function, model)
    model._gradmix_multi_worker_fit = True
    return model


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
# tf_gradmix.accumulation (keras-team/keras#20582) builds the inner optimizer's
# accumulators itself and runs its micro-steps; it reads these private parts of
# keras.optimizers.Optimizer (Keras 3.15, `BaseOptimizer`), checked by
# tests/test_compat.py.


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
