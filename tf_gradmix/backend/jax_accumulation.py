r"""Gradient accumulation on JAX without conditionals over the state.

With ``gradient_accumulation_steps = n`` on the inner optimizer, an update
uses the mean of the gradients of ``n`` micro-batches:

.. math::

    a \leftarrow a + g_s \quad (s = 1, \dots, n - 1),
    \qquad
    \theta \leftarrow \mathrm{update}\big(\theta, (g_n + a) / n\big),
    \quad a \leftarrow 0,

with ``g_s`` the (already mixed) gradient of micro-batch ``s``, ``a`` the
accumulator of one variable and ``theta`` every variable the update changes
(weights and optimizer state). The arithmetic is Keras's own.

Why this module exists: a JAX step is one compiled function, so both cases
are computed and one is chosen. Keras 3.15's JAX optimizer
(``keras/src/backend/jax/optimizer.py``, ``_backend_apply_gradients``)
chooses with four ``lax.cond`` over the trainable variables, every
optimizer variable and the accumulators. On XLA CPU an accumulating step
of a 4.7M-parameter MLP then costs about 3.4 times a plain step
(``benchmarks/micro_step_cost.py``; that a conditional can cost far more
than its branch is known upstream,
https://github.com/jax-ml/jax/issues/24259;
``tests/upstream/test_keras_jax.py`` notices when Keras changes this).
Here each variable's new value is chosen elementwise (``jnp.where`` on the
update condition), which XLA fuses into the computation of that value, so a
micro-step costs its forward and backward pass, one add per variable and
the elementwise part of an update.

``GradientMix.apply`` calls :func:`apply_accumulated` on JAX when the inner
optimizer accumulates (inside the ``StatelessScope`` of Keras's
``stateless_apply``). It hands the step to Keras's own path (see
:func:`handles`) when the inner optimizer keeps a moving average
(``use_ema``, which Keras advances on every micro-step), a variable is
overwritten with its gradient (``overwrite_with_gradient``, float8 scaling
factors) or no variable has a gradient.
"""

import jax
import keras

from tf_gradmix import compat

__all__ = ["handles", "apply_accumulated"]


def handles(inner, trainable_variables=None):
    """Whether :func:`apply_accumulated` runs ``inner``'s accumulation (else Keras's own path does)."""
    if trainable_variables is None:
        trainable_variables = compat.optimizer_trainable_variables(inner)
    return bool(inner.gradient_accumulation_steps) and not inner.use_ema and not any(
        getattr(v, "overwrite_with_gradient", False) for v in trainable_variables
    )


def apply_accumulated(inner, grads, trainable_variables=None):
    """One micro-step of ``inner``'s gradient accumulation; every ``n``-th also updates.

    The update (:func:`tf_gradmix.compat.update_with_accumulated_gradients`,
    with ``iterations`` counting updates) is computed in a ``StatelessScope``
    on every micro-step and kept only on update steps.

    Args:
        inner: the accumulating inner optimizer (built;
            ``gradient_accumulation_steps = n``).
        grads: this micro-batch's gradients, one per variable (``None`` for
            a variable without gradient).
        trainable_variables: the variables of ``grads``, or ``None`` for the
            inner optimizer's own list.
    """
    steps = inner.gradient_accumulation_steps
    if trainable_variables is None:
        trainable_variables = compat.optimizer_trainable_variables(inner)
    pairs = [(g, v) for g, v in zip(grads, trainable_variables) if g is not None]
    if not pairs or not handles(inner, trainable_variables):
        inner.apply(grads, trainable_variables)
        return
    variables = [v for _, v in pairs]
    scale = inner.loss_scale_factor
    grads = [g if scale is None else g / scale for g, _ in pairs]  # as Keras's apply
    accumulators = compat.gradient_accumulators(inner, variables)
    counter = compat.raw_iterations(inner)
    # Everything the step may change.
    state = variables + [v for v in inner.variables if all(v is not t for t in variables)]
    before = [v.value for v in state]
    is_update = (counter.value + 1) % steps == 0

    totals = [gradient.astype(a.dtype) + a.value for gradient, a in zip(grads, accumulators)]
    with keras.StatelessScope(state_mapping=list(zip(state, before))) as scope:
        compat.update_with_accumulated_gradients(inner, [total / steps for total in totals], variables)
    updated = [scope.get_current_value(v) for v in state]

    total_of = {id(a): total for a, total in zip(accumulators, totals)}
    for variable, old, new in zip(state, before, updated):
        if variable is counter:
            value = old + 1
        elif id(variable) in total_of:
            value = jax.numpy.where(is_update, 0, total_of[id(variable)]).astype(variable.dtype)
        else:
            value = jax.numpy.where(is_update, new, old)
        variable.assign(value)
