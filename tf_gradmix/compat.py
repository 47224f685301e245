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


# -- Gradient accumulation under a tf.distribute strategy (keras-team/keras#20582)
#
# Keras 3.15 runs the accumulated update, whose cross-replica sum is a
# `merge_call`, inside an `ops.cond` in replica context, which tf.distribute
# forbids: `gradient_accumulation_steps` fails under every strategy
# (https://github.com/keras-team/keras/issues/20582, open;
# `tests/test_distribute.py` notices an upstream fix). GradientMix.build calls
# `build_with_per_replica_accumulators` and GradientMix.apply calls
# `apply_accumulated_across_replicas` instead of `inner.apply` when the inner
# optimizer accumulates and there is more than one replica. Both use the inner
# optimizer's private accumulators (`_accumulated_gradients`), variable
# tracking (`_track_variable`), raw counter (`_iterations`) and variable index,
# as in the Keras versions of TESTED_KERAS (`tests/test_compat.py`). Not
# switched off by version: it does not depend on the bug being present, and
# it keeps each replica's partial sums apart and saves their sum.

ACCUMULATION_ISSUE = "https://github.com/keras-team/keras/issues/20582"


def is_per_replica(variable):
    """Whether a Keras variable has one independent copy per replica."""
    value = getattr(variable, "value", variable)
    return getattr(value, "synchronization", None) == tf.VariableSynchronization.ON_READ


def build_with_per_replica_accumulators(inner, var_list):
    """``inner.build(var_list)``, each replica with its own gradient accumulators.

    Keras builds the accumulators of ``gradient_accumulation_steps`` (in
    ``BaseOptimizer.build``, through ``add_variable_from_reference(v,
    name="gradient_accumulator")``) as mirrored variables, one value shared by
    the replicas. Under a strategy with more than one replica (the current
    one) they are created here instead with ``synchronization="on_read"`` and
    ``aggregation="sum"``, with the same names, shapes, dtypes and order in
    ``inner.variables``: a replica reads and writes its own copy without
    communicating, and a read in cross-replica context (saving a checkpoint or
    a weights file) returns the sum over all replicas, the same quantity the
    single-device accumulator holds. Restoring assigns each replica ``1/K`` of
    the saved sum (TensorFlow's rule for summed ``SyncOnRead`` variables), so
    the sum is kept whatever the number of replicas. Anything else is built as
    Keras builds it; an optimizer built already is left alone.
    """
    strategy = tf.distribute.get_strategy()
    if (
        inner.built
        or not inner.gradient_accumulation_steps
        or strategy.num_replicas_in_sync < 2
    ):
        inner.build(var_list)
        return
    keras_add_variable_from_reference = inner.add_variable_from_reference

    def add_variable_from_reference(reference_variable, name=None, initializer="zeros"):
        if name != "gradient_accumulator":
            return keras_add_variable_from_reference(
                reference_variable, name=name, initializer=initializer
            )
        # Keras's naming (BaseOptimizer.add_variable_from_reference).
        if hasattr(reference_variable, "path"):
            name = f"{reference_variable.path.replace('/', '_')}_{name}"
        else:
            name = f"{str(reference_variable.name).replace('/', '_').replace(':', '_')}_{name}"
        with keras.name_scope(inner.name, caller=inner):
            variable = keras.Variable(
                initializer=initializer,
                shape=reference_variable.shape,
                dtype=reference_variable.dtype,
                trainable=False,
                aggregation="sum",
                synchronization="on_read",
                name=name,
            )
        inner._track_variable(variable)
        return variable

    inner.add_variable_from_reference = add_variable_from_reference
    try:
        inner.build(var_list)
    finally:
        del inner.add_variable_from_reference


def apply_accumulated_across_replicas(inner, grads, trainable_variables):
    """``inner.apply`` with its ``gradient_accumulation_steps`` under replicas.

    Called in replica context, once per micro-batch, with this replica's
    (already weighted) gradients. Each replica adds them to its own
    accumulators (see :func:`build_with_per_replica_accumulators`): no
    communication. The conditional update runs in cross-replica context, as
    ``LossScaleOptimizer`` does, and calls the inner optimizer on every
    replica with its own accumulation off and the replica's
    ``accumulated / n``; the inner optimizer's cross-replica sum, the one
    all-reduce of the update, turns these into the mean of the ``n``
    micro-batch gradients of all replicas, as Keras computes on one device.
    The inner raw counter advances every micro-batch, so ``iterations`` and
    learning-rate schedules keep Keras's micro-step semantics. Clipping set
    on the inner optimizer acts once per update, per replica, on that
    replica's ``accumulated / n`` (before the sum), where Keras clips each
    replica's gradients without accumulation.
    """
    steps = inner.gradient_accumulation_steps
    context = tf.distribute.get_replica_context()
    if trainable_variables is None:
        variables = list(optimizer_trainable_variables(inner))
    else:
        variables = list(trainable_variables)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    accumulators = [
        inner._accumulated_gradients[inner._get_variable_index(v)] for _, v in pairs
    ]
    if not all(is_per_replica(a) for a in accumulators):
        raise RuntimeError(
            "GradientMix accumulates across replicas in per-replica variables, "
            f"but the inner optimizer {inner.name!r} was built without them. "
            "Build the GradientMix (not only its inner optimizer) under the "
            "strategy's scope, e.g. by compiling the model there "
            f"(Keras cannot accumulate under a strategy: {ACCUMULATION_ISSUE})."
        )
    # In replica context a SyncOnRead variable reads and writes this
    # replica's own copy.
    totals = [
        a.value + tf.cast(tf.convert_to_tensor(g), a.dtype)
        for a, (g, _) in zip(accumulators, pairs)
    ]
    for accumulator, total in zip(accumulators, totals):
        accumulator.assign(total)
    is_update = (inner._iterations + 1) % steps == 0
    update_variables = [v for _, v in pairs]
    scale = 1.0 / steps

    def update_on_each_replica(totals):
        inner.gradient_accumulation_steps = None  # read while tracing
        try:
            inner.apply([t * tf.cast(scale, t.dtype) for t in totals], update_variables)
        finally:
            inner.gradient_accumulation_steps = steps
        # In replica context: this replica's copy, no communication (in
        # cross-replica context assigning reads back the sum across replicas).
        for accumulator in accumulators:
            accumulator.assign(tf.zeros(accumulator.shape, accumulator.dtype))

    def cross_replica(strategy, totals):
        def update():
            strategy.extended.call_for_each_replica(
                update_on_each_replica, args=(totals,)
            )
            return tf.constant(True)

        return tf.cond(is_update, update, lambda: tf.constant(False))

    context.merge_call(cross_replica, args=(totals,))
    # inner.apply advanced the raw counter on update steps; do it on the others.
    inner._iterations.assign_add(1 - tf.cast(is_update, inner._iterations.dtype))
