"""Keras optimizer internals read by :mod:`tf_gradmix.accumulation` (TensorFlow only).

The other Keras internals tf_gradmix relies on are in
:mod:`tf_gradmix.backend.keras_internals`; both are checked by
``tests/upstream/test_keras_internals.py``.
"""

from tf_gradmix.backend.keras_internals import optimizer_trainable_variables

__all__ = ["optimizer_trainable_variables", "gradient_accumulators", "raw_iterations", "track_optimizer_variable"]

# -- Optimizer internals used by gradient accumulation across replicas
#
# tf_gradmix.accumulation (keras-team/keras#20582) builds the inner optimizer's
# accumulators itself and runs its micro-steps; it reads these private parts of
# keras.optimizers.Optimizer (Keras 3.15, `BaseOptimizer`), checked by
# tests/upstream/test_keras_internals.py.


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
