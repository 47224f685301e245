r"""The optimizer side of the JAX backend: gradient accumulation, a micro-step that makes no update.

With ``gradient_accumulation_steps = n`` on the inner optimizer, an update
uses the mean of the gradients of ``n`` micro-batches:

.. math::

    a \leftarrow a + g_s \quad (s = 1, \dots, n - 1),
    \qquad
    \theta \leftarrow \mathrm{update}\big(\theta, (g_n + a) / n\big),
    \quad a \leftarrow 0,

with ``g_s`` the (already mixed) gradient of micro-batch ``s``, ``a`` the
accumulator of one variable and ``theta`` every variable the update changes
(weights and optimizer state). The arithmetic is Keras's own
(:func:`tf_gradmix.backend._keras.update_with_accumulated_gradients`).

Why this module exists: a JAX train step is one compiled function, and
Keras 3.15's JAX optimizer (``keras/src/backend/jax/optimizer.py``,
``_backend_apply_gradients``) computes the update on every micro-step and
keeps or drops it with four ``lax.cond`` over the trainable variables, every
optimizer variable and the accumulators, so each micro-step pays a whole
update and more (``tests/upstream/test_keras_jax.py`` notices when Keras
changes this). Here a micro-step computes its forward and backward pass and
one add per accumulator, nothing else:

* **In ``fit``** (:func:`train_function`) two steps are compiled, a
  micro-step and an update step, and the host chooses between them by the
  inner optimizer's raw step counter, which it counts itself (it reads the
  counter from the device only when the state did not come from its own
  previous step: at the start of ``fit``, or after a callback changed the
  state). Neither holds a conditional; the micro-step's optimizer state
  other than the accumulators and step counters passes through unchanged,
  unread.
* **Elsewhere** (a custom loop calling ``stateless_apply``, another
  wrapper such as ``LossScaleOptimizer`` around the ``GradientMix``, whose
  skipped steps the host could not count, ``run_eagerly``) one
  ``lax.cond`` holds the update (what a conditional over the whole state
  costs on each platform, https://github.com/jax-ml/jax/issues/24259 on XLA
  CPU: ``docs/performance.md``).

``GradientMix.apply`` hands over to :func:`apply_gradients`, which calls
:func:`apply_accumulated` when the inner optimizer accumulates (inside the
``StatelessScope`` of Keras's ``stateless_apply``). It hands the step to Keras's own path (see
:func:`handles`) when the inner optimizer keeps a moving average
(``use_ema``, which Keras advances on every micro-step), a variable is
overwritten with its gradient (``overwrite_with_gradient``, float8 scaling
factors) or no variable has a gradient.
"""

import contextlib

import jax
import keras

from tf_gradmix.backend import _keras

__all__ = ["PHASES", "handles", "phase", "apply_accumulated", "train_function", "build_optimizer", "apply_gradients"]

#: The two compiled steps of :func:`train_function`.
PHASES = ("micro_step", "update_step")

# The phase whose step is being traced, innermost last. A module global: Keras's train step calls
# GradientMix.apply with no argument to carry it in.
_PHASE = []


@contextlib.contextmanager
def phase(name):
    """While a step is traced in this block, :func:`apply_accumulated` makes only that phase.

    Args:
        name: ``"micro_step"`` (accumulate only) or ``"update_step"``
            (accumulate and update, unconditionally).
    """
    if name not in PHASES:
        raise ValueError(f"Invalid value for argument `name`: {name!r}; expected one of {PHASES}.")
    _PHASE.append(name)
    try:
        yield
    finally:
        _PHASE.pop()


def handles(inner, trainable_variables=None):
    """Whether :func:`apply_accumulated` runs ``inner``'s accumulation (else Keras's own path does)."""
    if trainable_variables is None:
        trainable_variables = _keras.optimizer_trainable_variables(inner)
    return bool(inner.gradient_accumulation_steps) and not inner.use_ema and not any(
        getattr(v, "overwrite_with_gradient", False) for v in trainable_variables
    )


def apply_accumulated(inner, grads, trainable_variables=None):
    """One micro-step of ``inner``'s gradient accumulation; every ``n``-th also updates.

    Inside :func:`phase` the step makes that phase only; otherwise one
    ``lax.cond`` on the raw step counter chooses (see module docstring).
    The update (:func:`tf_gradmix.backend._keras.update_with_accumulated_gradients`,
    with ``iterations`` counting updates) gets the mean of the accumulated
    gradients and resets the accumulators.

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
        trainable_variables = _keras.optimizer_trainable_variables(inner)
    pairs = [(g, v) for g, v in zip(grads, trainable_variables) if g is not None]
    if not pairs or not handles(inner, trainable_variables):
        inner.apply(grads, trainable_variables)
        return
    variables = [v for _, v in pairs]
    scale = inner.loss_scale_factor
    grads = [g if scale is None else g / scale for g, _ in pairs]  # as Keras's apply
    accumulators = _keras.gradient_accumulators(inner, variables)
    counter = _keras.raw_iterations(inner)
    totals = [gradient.astype(a.dtype) + a.value for gradient, a in zip(grads, accumulators)]

    def update():
        _keras.update_with_accumulated_gradients(inner, [total / steps for total in totals], variables)
        for accumulator in accumulators:
            accumulator.assign(jax.numpy.zeros(accumulator.shape, accumulator.dtype))

    def accumulate():
        for accumulator, total in zip(accumulators, totals):
            accumulator.assign(total)
        counter.assign(counter.value + 1)

    current = _PHASE[-1] if _PHASE else None
    if current == "update_step":
        update()
        return
    if current == "micro_step":
        accumulate()
        return

    # Everything the step may change.
    state = variables + [v for v in inner.variables if all(v is not t for t in variables)]

    def branch(make):
        def run(values):
            with keras.StatelessScope(state_mapping=list(zip(state, values))) as scope:
                make()
            return [jax.numpy.asarray(scope.get_current_value(v), v.dtype) for v in state]

        return run

    is_update = (counter.value + 1) % steps == 0
    values = jax.lax.cond(
        is_update, branch(update), branch(accumulate), [jax.numpy.asarray(v.value, v.dtype) for v in state]
    )
    for variable, value in zip(state, values):
        variable.assign(value)


def _accumulating_mixer(model):
    """The model's ``GradientMix`` if :func:`train_function` can run its accumulation, else None."""
    optimizer = getattr(model, "optimizer", None)
    # GradientMix says so itself: this module sits below tf_gradmix.optimizer and must not import it.
    if not getattr(optimizer, "is_gradient_mix", False) or not optimizer.built:
        return None
    inner = optimizer.inner_optimizer
    if not inner.gradient_accumulation_steps or not handles(inner):
        return None
    if model.run_eagerly or not model.jit_compile or keras.config.is_nnx_enabled():
        return None
    return optimizer


def train_function(model):
    """Keras's ``fit`` train function with a compiled micro-step and update step, or None.

    Built as Keras 3.15's ``JAXTrainer.make_train_function`` builds its one
    compiled step (``jax.jit`` of ``model.train_step``, the state donated,
    its shardings kept under a distribution), once per phase (:func:`phase`).
    The host runs the update step when the inner optimizer's raw step
    counter ``c`` has ``(c + 1) % n == 0`` and the micro-step otherwise,
    counting ``c`` itself from the value it read last (see module
    docstring). None (Keras's own train function stays) unless the model's
    optimizer is a built :class:`tf_gradmix.GradientMix` whose inner
    optimizer accumulates in :func:`apply_accumulated` and the step is
    compiled (no ``run_eagerly``, ``jit_compile``, no Flax NNX).

    Args:
        model: a compiled Keras model on the JAX backend.
    """
    optimizer = _accumulating_mixer(model)
    if optimizer is None:
        return None
    inner = optimizer.inner_optimizer
    steps = inner.gradient_accumulation_steps
    counter = _keras.raw_iterations(inner)
    index = next(i for i, v in enumerate(optimizer.variables) if v is counter)
    out_shardings = None
    if keras.distribution.distribution() is not None:
        out_shardings = (None, _keras.jax_state_shardings(model))

    def traced_in(name):
        def step(state, data):
            with phase(name):
                return model.train_step(state, data)

        return jax.jit(step, donate_argnums=0, out_shardings=out_shardings)

    compiled = {name: traced_in(name) for name in PHASES}
    host = {"array": None, "count": 0}  # the counter array last returned, and its value
    runs = dict.fromkeys(PHASES, 0)

    def step(state, data):
        array = state[2][index]
        if array is not host["array"]:
            host["count"] = int(array)  # a state this function did not return: read it once
        name = "update_step" if (host["count"] + 1) % steps == 0 else "micro_step"
        logs, state = compiled[name](state, data)
        host["array"], host["count"] = state[2][index], host["count"] + 1
        runs[name] += 1
        return logs, state

    function = _keras.jax_step_function(model, step)
    function.compiled_steps = compiled
    function.steps_run = runs  # how many steps of each phase ran
    return function


def make_train_function(model, base_make_train_function, force=False):
    """``base_make_train_function(force)``, then :func:`train_function` in place of a new Keras one."""
    before = model.train_function
    base_make_train_function(force)
    if model.train_function is not before or force:
        replacement = train_function(model)
        if replacement is not None:
            model.train_function = replacement
    return model.train_function


def build_optimizer(inner, var_list):
    """Builds ``inner`` for ``var_list``, as Keras does."""
    inner.build(var_list)


def apply_gradients(inner, grads, trainable_variables=None, weight=None):
    """The global batch's step: :func:`apply_accumulated` if ``inner`` accumulates, else ``inner.apply``.

    ``weight`` must be None: on JAX the model hook applies every weight.
    """
    if weight is not None:
        raise ValueError("On JAX the gradients reaching the optimizer are global; the model hook weights them.")
    if inner.gradient_accumulation_steps:
        apply_accumulated(inner, grads, trainable_variables)
    else:
        inner.apply(grads, trainable_variables)
