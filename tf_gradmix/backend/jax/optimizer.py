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
* **Under ``keras.distribution.DataParallel``** ``fit``'s two steps keep
  each device's share of the gradients on that device (:func:`_device_step`):
  a micro-step communicates no gradient, the update step all-reduces them
  once. Keras's global train step would all-reduce them on every micro-step.

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
# While a per-device step is traced (_device_step): its per-device gradients and window. A module global
# for the same reason.
_DEVICE = []


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
    device = _DEVICE[-1] if _DEVICE else None
    if device is not None:  # this device's share of every gradient, with a leading device axis
        local = [
            device["window"][id(v)] + (g if scale is None else g / scale).astype(a.dtype)
            for v, a, g in zip(variables, accumulators, (device["grads"][id(v)] for v in variables))
        ]

    def update():
        if device is not None:  # the update's one reduction across devices
            totals[:] = [total + jax.numpy.sum(part, axis=0) for total, part in zip(totals, local)]
            device["out"].update({id(v): jax.numpy.zeros_like(part) for v, part in zip(variables, local)})
        _keras.update_with_accumulated_gradients(inner, [total / steps for total in totals], variables)
        for accumulator in accumulators:
            accumulator.assign(jax.numpy.zeros(accumulator.shape, accumulator.dtype))

    def accumulate():
        for accumulator, total in zip(accumulators, totals):
            accumulator.assign(total)
        if device is not None:
            device["out"].update({id(v): part for v, part in zip(variables, local)})
        counter.assign(counter.value + 1)

    current = _PHASE[-1] if _PHASE else None
    if device is not None and current is None:
        raise RuntimeError("Per-device accumulation runs only inside a phase (tf_gradmix internal error).")
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


class NotPerExample(Exception):
    """The model's forward pass cannot run per device with the same result (see :func:`train_function`)."""


def _data_axis(model):
    """``(mesh, axis name, K)`` of a ``DataParallel`` over ``K > 1`` devices, else None."""
    distribution = keras.distribution.distribution()
    if not isinstance(distribution, keras.distribution.DataParallel):
        return None
    mesh = distribution.device_mesh
    axis = distribution.batch_dim_name or mesh.axis_names[0]
    count = int(mesh.shape[list(mesh.axis_names).index(axis)])
    if count < 2 or len(mesh.axis_names) != 1:
        return None
    return mesh.backend_mesh, axis, count


def _keras_train_step(model):
    """Whether ``model.train_step`` is Keras's own (tf_gradmix's wrappers aside)."""
    step = model.__dict__.get("train_step")
    if step is not None and not getattr(step, "_gradmix_wrapper", False):
        return False
    for cls in type(model).__mro__:
        if "train_step" in vars(cls) and not cls.__module__.startswith("tf_gradmix."):
            return _keras.is_keras_jax_trainer(cls)
    return False


def _per_device_forward(model, mesh, axis, copies):
    """``Layer.stateless_call`` running each device's shard of the batch on that device's copy of the weights.

    ``copies`` holds each trainable variable's value repeated along a leading
    device axis, sharded along ``axis``: the gradient with respect to a copy
    is that device's share of the global gradient, with no reduction. The
    loss stays the global batch's (Keras's ``compute_loss`` on the
    concatenated predictions, the mixing weights included), and the
    regularisers of the weights are computed once, on the weights themselves.
    Raises :class:`NotPerExample` where one device's shard alone would give
    another forward pass: the pass updates non-trainable state (BatchNorm's
    statistics, random seeds) or adds losses of its own (``add_loss``,
    activity regularisers). Keras masks on the outputs are carried over.
    """
    from jax.sharding import PartitionSpec

    base = type(model).stateless_call.__get__(model)
    regularized = [i for i, v in enumerate(model.trainable_variables) if v.regularizer is not None]

    def call(trainable_variables, non_trainable_variables, x, return_losses=False, **kwargs):
        non_trainable_variables = list(non_trainable_variables)

        def body(copies, non_trainable, x):
            outputs, updated, losses = base([c[0] for c in copies], non_trainable, x, return_losses=True, **kwargs)
            if any(new is not old for new, old in zip(updated, non_trainable)):
                raise NotPerExample("its forward pass updates non-trainable state (e.g. BatchNorm, Dropout)")
            if len(losses) != len(regularized):
                raise NotPerExample("its forward pass adds losses (add_loss, activity regularizers)")
            masks = [_keras.get_keras_mask(o) for o in keras.tree.flatten(outputs)]
            return outputs, masks

        for leaf in keras.tree.flatten(x):
            if leaf is not None and leaf.shape[0] % mesh.shape[axis]:
                raise NotPerExample(f"a batch of {leaf.shape[0]} does not split over {mesh.shape[axis]} devices")
        spec = PartitionSpec(axis)
        outputs, masks = jax.shard_map(body, mesh=mesh, in_specs=(spec, PartitionSpec(), spec), out_specs=spec)(
            copies, non_trainable_variables, x)
        for output, mask in zip(keras.tree.flatten(outputs), masks):
            if mask is not None:  # masked sequence losses read it from the predictions
                _keras.set_keras_mask(output, mask)
        variables = model.trainable_variables
        losses = [variables[i].regularizer(trainable_variables[i]) for i in regularized]
        return (outputs, non_trainable_variables, losses) if return_losses else (outputs, non_trainable_variables)

    return call


def _device_step(model, name, mesh, axis, count):
    """Keras 3.15's JAX ``train_step`` for phase ``name``, each device accumulating its own share.

    ``step(state, window, data) -> (logs, state, window)``: ``window`` holds
    one array per trainable variable, ``[K, *shape]``, sharded over the data
    axis: device ``k``'s sum of its shares since the last update. A
    micro-step adds this micro-batch's shares to it and communicates no
    gradient; the update step sums it over the devices once (with Keras's
    accumulators, which hold what an earlier :func:`fold` moved there) and
    updates.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    sharding = NamedSharding(mesh, PartitionSpec(axis))

    def step(state, window, data):
        trainable, non_trainable, optimizer_values, metrics = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        copies = [
            jax.lax.with_sharding_constraint(jax.numpy.broadcast_to(w, (count,) + w.shape), sharding)
            for w in trainable
        ]

        def loss(trainable, copies):
            with _keras.jax_forward_pass(model, _per_device_forward(model, mesh, axis, copies)):
                return model.compute_loss_and_updates(
                    trainable, non_trainable, metrics, x, y, sample_weight, training=True,
                    optimizer_variables=optimizer_values)

        (_, aux), (grads, shares) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(trainable, copies)
        unscaled_loss, y_pred, non_trainable, metrics = aux
        variables = model.trainable_variables
        context = {
            "grads": {id(v): g for v, g in zip(variables, shares)},
            "window": {id(v): w for v, w in zip(variables, window)},
            "out": {},
        }
        _DEVICE.append(context)
        try:
            with phase(name):
                trainable, optimizer_values = model.optimizer.stateless_apply(optimizer_values, grads, trainable)
        finally:
            _DEVICE.pop()
        logs, metrics = _keras.jax_update_metrics(model, metrics, unscaled_loss, x, y, y_pred, sample_weight)
        window = [context["out"].get(id(v), w) for v, w in zip(variables, window)]
        return logs, (trainable, non_trainable, optimizer_values, metrics), window

    return step


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

    Under ``keras.distribution.DataParallel`` over ``K > 1`` devices (one
    mesh axis) with Keras's own ``train_step``, each device accumulates its
    own share of the gradients (:func:`_device_step`): a micro-step
    communicates no gradient and the update step reduces them once. The
    loss, the mixing weights and the update are those of the global batch;
    only the forward pass runs per device, so a model whose forward pass is
    not per example (:func:`_per_device_forward`) keeps the global steps,
    which all-reduce the gradients on every micro-step, with a warning.
    Partial windows live in device-local arrays until ``fit`` writes its
    state back (``jax_state_sync``, by a callback or at the end), which
    moves them into Keras's accumulators (:func:`fold`).

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
    window = _Window(model, optimizer) if _data_axis(model) and _keras_train_step(model) else None

    def step(state, data):
        array = state[2][index]
        if array is not host["array"]:
            host["count"] = int(array)  # a state this function did not return: read it once
        name = "update_step" if (host["count"] + 1) % steps == 0 else "micro_step"
        logs = None
        if window is not None and window.active:
            try:
                logs, state = window.run(name, state, data)
            except NotPerExample as error:
                state = window.give_up(state, error)
        if logs is None:
            logs, state = compiled[name](state, data)
        host["array"], host["count"] = state[2][index], host["count"] + 1
        runs[name] += 1
        return logs, state

    function = _keras.jax_step_function(model, step)
    function.compiled_steps = compiled
    function.steps_run = runs  # how many steps of each phase ran
    function.device_window = window  # per-device accumulation under DataParallel, or None
    model._gradmix_device_window = window
    return function


class _Window:
    """The per-device steps of :func:`train_function` and the window of shares they carry between steps."""

    def __init__(self, model, optimizer):
        from jax.sharding import NamedSharding, PartitionSpec

        self.model = model
        mesh, axis, count = _data_axis(model)
        variables = model.trainable_variables
        accumulators = _keras.gradient_accumulators(optimizer.inner_optimizer, variables)
        self._positions = [next(i for i, o in enumerate(optimizer.variables) if o is a) for a in accumulators]
        self._shapes = [((count,) + tuple(v.shape), a.dtype) for v, a in zip(variables, accumulators)]
        sharding = NamedSharding(mesh, PartitionSpec(axis))
        state_shardings = _keras.jax_state_shardings(model)
        out = (None, state_shardings, [sharding] * len(variables))
        self.compiled = {
            name: jax.jit(_device_step(model, name, mesh, axis, count), donate_argnums=(0, 1), out_shardings=out)
            for name in PHASES
        }
        self.zeros = jax.jit(
            lambda: [jax.numpy.zeros(shape, dtype) for shape, dtype in self._shapes],
            out_shardings=[sharding] * len(variables))
        self._fold = jax.jit(self._add_window, out_shardings=state_shardings[2])
        self.active = True
        self.values = None  # the window's arrays (reused after an update, which zeroes them), or None
        self.pending = False  # whether they hold shares of an unfinished window

    def _add_window(self, optimizer_values, window):
        values = list(optimizer_values)
        for position, part in zip(self._positions, window):
            values[position] = values[position] + jax.numpy.sum(part, axis=0).astype(values[position].dtype)
        return values

    def run(self, name, state, data):
        window = self.values if self.values is not None else self.zeros()
        logs, state, self.values = self.compiled[name](state, window, data)
        self.pending = name == "micro_step"
        return logs, state

    def fold(self, optimizer_values):
        """``optimizer_values`` with the window's shares summed into Keras's accumulators; the window empties."""
        if not self.pending:
            return optimizer_values
        values, self.values, self.pending = self.values, None, False
        return self._fold(list(optimizer_values), values)

    def give_up(self, state, error):
        """Switches to the global steps (see :func:`train_function`); returns ``state`` with the window folded."""
        import warnings

        self.active = False
        warnings.warn(
            f"GradientMix accumulates the global gradients under DataParallel (one all-reduce of the gradients "
            f"per micro-step) because {error}: a forward pass on one device's shard alone would differ.",
            stacklevel=2,
        )
        return (state[0], state[1], self.fold(state[2]), state[3])


def fold(model):
    """Moves the shares of an unfinished window into Keras's accumulators in ``fit``'s unsynced state.

    Called before ``fit`` writes its state back to the variables, so that
    the variables (and every checkpoint) hold the whole accumulated sum.
    """
    window = getattr(model, "_gradmix_device_window", None)
    state = _keras.jax_unsynced_state(model)
    if window is None or not window.pending or state is None:
        return
    state["optimizer_variables"] = window.fold(state["optimizer_variables"])


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
