r"""The optimizer side of the TensorFlow backend: per-replica weighting, accumulation across replicas.

:meth:`tf_gradmix.GradientMix.build` hands over to :func:`build_optimizer`
and :meth:`tf_gradmix.GradientMix.apply` to :func:`apply_gradients`, which
weights this replica's gradients where the device level is applied here and
runs the inner optimizer's step.

Gradient accumulation across replicas. With ``gradient_accumulation_steps = n`` on the inner optimizer, one update
uses the mean gradient of ``n`` micro-batches of all ``K`` replicas:

.. math::

    g = \frac{1}{n} \sum_{s=1}^{n} \sum_{k=1}^{K} g_{k,s},
    \qquad
    a_k \leftarrow a_k + g_{k,s} \quad\text{(micro-step } s \text{ on replica } k\text{)},

with ``g_{k,s}`` the (already mixed) gradient replica ``k`` computes at
micro-step ``s`` (Keras scales each replica's loss by ``1/K``, so the sum over
replicas is the mean over the global micro-batch) and ``a_k`` replica
``k``'s own accumulator of one variable. A micro-step costs its forward and
backward pass and one local in-place add per variable; the gradients cross
the workers once per update, in the inner optimizer's own all-reduce of
``a_k / n``. ``tests/library/test_distribute.py`` checks on a real two-worker
cluster that the traced micro-step holds no collective op outside the
update's branch.

Why this module exists: Keras 3.15 runs the accumulated update, whose
cross-replica sum is a ``merge_call``, inside an ``ops.cond`` in replica
context, which ``tf.distribute`` forbids, so ``gradient_accumulation_steps``
fails under every strategy (https://github.com/keras-team/keras/issues/20582,
open; ``tests/upstream/test_keras_distribute.py`` notices an upstream fix).
:func:`build_optimizer` calls :func:`build_with_per_replica_accumulators` and
:func:`apply_gradients` calls :func:`apply_accumulated_across_replicas` instead
of ``inner.apply`` when the inner optimizer accumulates and there is more
than one replica. Not switched off by version: it does not depend on the bug
being present, and it keeps each replica's partial sums apart and saves their
sum. The Keras internals it needs (the accumulator list, the raw micro-step
counter, variable tracking) are read through :mod:`tf_gradmix.backend._keras`.
"""

import keras
import tensorflow as tf

from tf_gradmix.backend import _keras

__all__ = [
    "ACCUMULATION_ISSUE",
    "UPDATE_BRANCH_NAME",
    "build_optimizer",
    "apply_gradients",
    "scale_gradient",
    "is_per_replica",
    "build_with_per_replica_accumulators",
    "apply_accumulated_across_replicas",
]

ACCUMULATION_ISSUE = "https://github.com/keras-team/keras/issues/20582"

#: Name of the conditional that makes the update (the only part of a step
#: that communicates); a micro-step takes its other branch.
UPDATE_BRANCH_NAME = "accumulated_update"


def build_optimizer(inner, var_list):
    """Builds ``inner`` for ``var_list`` (see :func:`build_with_per_replica_accumulators`)."""
    build_with_per_replica_accumulators(inner, var_list)


def apply_gradients(inner, grads, trainable_variables=None, weight=None):
    """This replica's step: ``grads * weight`` (if given), then ``inner``'s update.

    Called in replica context with this replica's gradients. ``weight`` is
    this replica's device-level weight ``w_k`` (None at the sample level,
    whose weights the model hook applied); variables with
    ``overwrite_with_gradient`` are not weighted. With
    ``gradient_accumulation_steps`` and more than one replica the step is
    :func:`apply_accumulated_across_replicas`, else ``inner.apply``.
    """
    if weight is not None:
        if trainable_variables is None:
            variables = _keras.optimizer_trainable_variables(inner)
        else:
            variables = trainable_variables
        grads = [g if getattr(v, "overwrite_with_gradient", False) else scale_gradient(g, weight)
                 for g, v in zip(grads, variables)]
    context = tf.distribute.get_replica_context() or tf.distribute.get_strategy()
    if inner.gradient_accumulation_steps and context.num_replicas_in_sync > 1:
        apply_accumulated_across_replicas(inner, grads, trainable_variables)
    else:
        inner.apply(grads, trainable_variables)


def scale_gradient(gradient, scale):
    """``gradient * scale`` for dense gradients and ``tf.IndexedSlices``."""
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * tf.cast(scale, gradient.values.dtype),
            gradient.indices,
            gradient.dense_shape,
        )
    return gradient * tf.cast(scale, gradient.dtype)


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

    Args:
        inner: the inner ``keras.optimizers.Optimizer`` (not yet built).
        var_list: the trainable variables it will update.
    """
    strategy = tf.distribute.get_strategy()
    if (
        inner.built
        or not inner.gradient_accumulation_steps
        or strategy.num_replicas_in_sync < 2
    ):
        inner.build(var_list)
        return
    _refuse_what_is_not_supported(inner, var_list)
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
        _keras.track_optimizer_variable(inner, variable)
        return variable

    inner.add_variable_from_reference = add_variable_from_reference
    try:
        inner.build(var_list)
    finally:
        del inner.add_variable_from_reference


def _refuse_what_is_not_supported(inner, var_list):
    """Raises ``ValueError`` for inner-optimizer settings accumulation across replicas does not run.

    ``use_ema``: Keras advances the moving average on every micro-step, and
    its ``ema_overwrite_frequency`` conditional cannot run in replica
    context. ``overwrite_with_gradient`` variables (float8 scaling factors):
    Keras accumulates their maximum, not their mean.
    """
    if inner.use_ema:
        raise ValueError(
            f"GradientMix cannot accumulate across replicas with `use_ema=True` on the inner optimizer "
            f"{inner.name!r} (gradient_accumulation_steps={inner.gradient_accumulation_steps}, "
            f"{tf.distribute.get_strategy().num_replicas_in_sync} replicas): Keras advances the moving "
            "average on every micro-step, which this update, made once per window, does not reproduce. "
            "Use `use_ema=False`, or accumulate on one device."
        )
    overwritten = [v.path for v in var_list if getattr(v, "overwrite_with_gradient", False)]
    if overwritten:
        raise ValueError(
            "GradientMix cannot accumulate across replicas for variables with `overwrite_with_gradient` "
            f"(float8 scaling factors): {overwritten}. Keras accumulates their maximum, which this "
            "update does not do; train them without gradient_accumulation_steps or on one device."
        )


def _local_copy(accumulator):
    """This replica's ``tf.Variable`` behind a per-replica Keras accumulator.

    In replica context a ``SyncOnRead`` variable reads and writes this copy
    only; it is updated in place (``assign_add``), where Keras's own
    ``Variable.assign_add`` reads, adds and assigns a new tensor.
    """
    return accumulator.value


def apply_accumulated_across_replicas(inner, grads, trainable_variables):
    """``inner.apply`` with its ``gradient_accumulation_steps`` under replicas.

    Called in replica context, once per micro-batch, with this replica's
    (already weighted) gradients. Each replica adds them in place to its own
    accumulators (see :func:`build_with_per_replica_accumulators`): no
    communication. The conditional update (named :data:`UPDATE_BRANCH_NAME`)
    runs in cross-replica context, as ``LossScaleOptimizer`` does, and calls
    the inner optimizer's update step on every replica
    (:func:`tf_gradmix.backend._keras.update_with_accumulated_gradients`, with
    ``iterations`` counting updates as Adam's bias correction expects) on the
    replica's ``accumulated / n``, read from its own copy inside the branch;
    the inner optimizer's cross-replica sum, the one all-reduce of the update,
    turns these into the mean of the ``n`` micro-batch gradients of all
    replicas, as Keras computes on one device. Nothing but the scalar
    condition enters the conditional, so a micro-step, which takes the other
    branch, touches each accumulator once. The inner raw counter advances
    every micro-batch, so ``iterations`` and learning-rate schedules keep
    Keras's micro-step semantics. Clipping set on the inner optimizer acts
    once per update, per replica, on that replica's ``accumulated / n``
    (before the sum), where Keras clips each replica's gradients without
    accumulation.

    Args:
        inner: the inner optimizer, built by
            :func:`build_with_per_replica_accumulators`.
        grads: this replica's gradients of the micro-batch (``None`` for a
            variable without gradient).
        trainable_variables: the variables of ``grads``, or ``None`` for the
            inner optimizer's own list.
    """
    steps = inner.gradient_accumulation_steps
    context = tf.distribute.get_replica_context()
    if trainable_variables is None:
        variables = list(_keras.optimizer_trainable_variables(inner))
    else:
        variables = list(trainable_variables)
    pairs = [(g, v) for g, v in zip(grads, variables) if g is not None]
    accumulators = _keras.gradient_accumulators(inner, [v for _, v in pairs])
    if not all(is_per_replica(a) for a in accumulators):
        raise RuntimeError(
            "GradientMix accumulates across replicas in per-replica variables, "
            f"but the inner optimizer {inner.name!r} was built without them. "
            "Build the GradientMix (not only its inner optimizer) under the "
            "strategy's scope, e.g. by compiling the model there "
            f"(Keras cannot accumulate under a strategy: {ACCUMULATION_ISSUE})."
        )
    for accumulator, (gradient, _) in zip(accumulators, pairs):
        _local_copy(accumulator).assign_add(
            tf.cast(tf.convert_to_tensor(gradient), accumulator.dtype), read_value=False
        )
    counter = _keras.raw_iterations(inner)
    is_update = (counter + 1) % steps == 0
    update_variables = [v for _, v in pairs]
    scale = 1.0 / steps / (inner.loss_scale_factor or 1.0)

    def update_on_each_replica():
        # In replica context: this replica's copy, no communication (in
        # cross-replica context a read would sum across replicas).
        means = [
            tf.convert_to_tensor(_local_copy(a)) * tf.cast(scale, a.dtype)
            for a in accumulators
        ]
        _keras.update_with_accumulated_gradients(inner, means, update_variables)
        for accumulator in accumulators:
            _local_copy(accumulator).assign(
                tf.zeros(accumulator.shape, accumulator.dtype), read_value=False
            )

    def cross_replica(strategy):
        def update():
            strategy.extended.call_for_each_replica(update_on_each_replica)
            return tf.constant(True)

        return tf.cond(
            is_update, update, lambda: tf.constant(False), name=UPDATE_BRANCH_NAME
        )

    context.merge_call(cross_replica)
    # The update advanced the raw counter on update steps; do it on the others.
    counter.assign_add(1 - tf.cast(is_update, counter.dtype))
