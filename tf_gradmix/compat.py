"""Gradient accumulation under a ``tf.distribute`` strategy (TensorFlow only).

Imported only on the TensorFlow backend.
"""

import keras
import tensorflow as tf

from tf_gradmix.backend.keras_internals import optimizer_trainable_variables

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
