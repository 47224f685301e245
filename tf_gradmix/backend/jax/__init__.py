"""The JAX backend: ``keras.distribution`` shards, optimizer state in the loss hook, ``jax.jit``.

Imported only when Keras runs on JAX (:func:`tf_gradmix.backend.current`).

On JAX, Keras compiles one global train step: under
``keras.distribution.DataParallel`` the batch is one array sharded over the
devices of the mesh's data axis, and the gradients that reach
``optimizer.stateless_apply`` are those of the whole global batch. So the
sample level draws one weight per example of the global batch (a pure
function of seed, step and the example's index in it, whatever the number of
devices or processes), and the device level cannot weight the gradients in
the optimizer: the model hook gives every example of shard ``k`` the weight
``w_k`` instead (:func:`num_data_shards` shards).

Keras's JAX train step passes the optimizer's variables to
``compute_loss_and_updates`` as values but reads the loss inside a
``StatelessScope`` that maps only the model's variables; the step counter and
seed the hook needs would be read as the stale values captured when the step
was compiled. :class:`FitMixin` records the optimizer's values for the
duration of the call, and :func:`read` looks a variable up there first.
"""

import contextlib

import jax
import keras
from keras.src.backend.common import masking

__all__ = [
    "compile_pure",
    "replica_id",
    "num_replicas",
    "num_data_shards",
    "scale_gradient",
    "dense_gradient",
    "transform_output",
    "read",
    "optimizer_state",
    "FitMixin",
    "restore_after_failed_step",
    "install_fit",
]

#: The gradients reaching the optimizer are those of the global batch.
GRADIENTS_PER_REPLICA = False


# -- compiling -------------------------------------------------------------------


def compile_pure(fn):
    """``fn``, a pure function of an integer size (its first argument) and arrays, under ``jax.jit``.

    Called eagerly it runs as one compiled program (one per size) instead of
    one dispatch per op; called inside a traced step it is inlined.
    """
    return jax.jit(fn, static_argnums=0)


# -- the global program ------------------------------------------------------------


def replica_id():
    """0: a JAX train step is one program over the global batch."""
    return 0


def num_replicas():
    """1: the gradients reaching the optimizer are already global."""
    return 1


def num_data_shards():
    """``K``, the size of the data axis of the current ``keras.distribution`` (1 without one)."""
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    axis = getattr(distribution, "batch_dim_name", None) or mesh.axis_names[0]
    return int(mesh.shape[list(mesh.axis_names).index(axis)])


def scale_gradient(gradient, scale):
    """``gradient * scale``."""
    if gradient is None:
        return None
    return gradient * keras.ops.cast(scale, gradient.dtype)


def dense_gradient(gradient):
    """JAX gradients are dense already."""
    return gradient


def transform_output(y_pred, transform):
    """``transform(y_pred)`` carrying ``y_pred``'s Keras mask (masked sequence losses)."""
    result = transform(y_pred)
    mask = masking.get_keras_mask(y_pred)
    if mask is not None:
        masking.set_keras_mask(result, mask)
    return result


# -- the optimizer's state inside the compiled step ----------------------------------

_STATE = []  # stack of {id(variable): value} while a train step is traced


@contextlib.contextmanager
def optimizer_state(optimizer, values):
    """Within this block :func:`read` returns ``values`` for ``optimizer.variables``."""
    if optimizer is None or values is None:
        yield
        return
    _STATE.append({id(v): value for v, value in zip(optimizer.variables, values)})
    try:
        yield
    finally:
        _STATE.pop()


def read(variable):
    """The value of a Keras variable in the step being traced (see module docstring)."""
    for mapping in reversed(_STATE):
        if id(variable) in mapping:
            return mapping[id(variable)]
    return variable.value


def _compute_loss_and_updates(model, base, args, kwargs):
    optimizer_variables = kwargs.get("optimizer_variables")
    with optimizer_state(getattr(model, "optimizer", None), optimizer_variables):
        return base(*args, **kwargs)


class FitMixin:
    """Mixin for ``keras.Model`` subclasses: the optimizer state reaches the loss hook (see module
    docstring); an accumulating ``GradientMix`` gets a compiled micro-step and update step
    (:func:`tf_gradmix.backend.jax.optimizer.train_function`)."""

    def compute_loss_and_updates(self, *args, **kwargs):
        return _compute_loss_and_updates(self, super().compute_loss_and_updates, args, kwargs)

    def make_train_function(self, force=False):
        from tf_gradmix.backend.jax import optimizer as jax_optimizer

        return jax_optimizer.make_train_function(self, super().make_train_function, force)


def install_fit(model):
    """The same as :class:`FitMixin`, for one existing model."""
    if isinstance(model, FitMixin) or getattr(model, "_gradmix_fit_installed", False):
        return model
    base = model.compute_loss_and_updates
    base_make_train_function = model.make_train_function

    def compute_loss_and_updates(*args, **kwargs):
        return _compute_loss_and_updates(model, base, args, kwargs)

    def make_train_function(force=False):
        from tf_gradmix.backend.jax import optimizer as jax_optimizer

        return jax_optimizer.make_train_function(model, base_make_train_function, force)

    model.compute_loss_and_updates = compute_loss_and_updates
    model.make_train_function = make_train_function
    model._gradmix_fit_installed = True
    return model


def restore_after_failed_step(model, args):
    """Puts the step's input state back into the model's variables after a step raised.

    Keras's JAX ``fit`` moves the state out of the variables before the first
    step (``purge_model_variables``) and puts it back only when ``fit`` ends
    normally; a step that raises (e.g. GradientMix refusing to train
    unmixed) would leave a model whose variables cannot be read. ``args`` are
    the train function's ``(state, data)``.
    """
    if not args or not isinstance(args[0], (tuple, list)) or len(args[0]) != 4:
        return
    trainable, non_trainable, optimizer_values, metrics = args[0]
    pairs = [
        (model.trainable_variables, trainable),
        (model.non_trainable_variables, non_trainable),
        (model.optimizer.variables if model.optimizer is not None else [], optimizer_values),
        (model.metrics_variables, metrics),
    ]
    for variables, values in pairs:
        if values is None:
            continue
        for variable, value in zip(variables, values):
            variable.assign(value)
