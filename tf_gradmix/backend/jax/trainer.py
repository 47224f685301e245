"""The ``fit`` side of the JAX backend: the optimizer's state in the loss hook, accumulation's two steps.

:func:`install_fit`, called by the one hook installer of :mod:`tf_gradmix.model`
(for :class:`tf_gradmix.Model`, :class:`tf_gradmix.Sequential` and
:func:`tf_gradmix.enable` alike), wraps two methods of one model:

* ``compute_loss_and_updates``: Keras's JAX train step passes it the
  optimizer's values but reads the loss where only the model's variables are
  mapped (:mod:`tf_gradmix.backend._keras`, "The JAX train step's state"),
  so the step counter and seed the hook needs would be stale. The wrapper
  records the optimizer's values for the duration of the call, and
  :func:`read` looks a variable up there first.
* ``make_train_function``: an accumulating ``GradientMix`` gets a compiled
  micro-step and update step (:func:`tf_gradmix.backend.jax.optimizer.train_function`).
"""

import contextlib

from tf_gradmix.backend import _keras

__all__ = ["optimizer_state", "read", "install_fit", "metric_scope", "restore_after_failed_step"]

# {id(variable): value} of the optimizer while a train step is traced, innermost last. A module global:
# Keras calls the loss hook inside its own step with no argument to carry the values in.
_STATE = []


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


def install_fit(model):
    """Wraps ``model``'s ``compute_loss_and_updates`` and ``make_train_function`` (see module docstring)."""
    base_compute_loss_and_updates = model.compute_loss_and_updates
    base_make_train_function = model.make_train_function

    def compute_loss_and_updates(*args, **kwargs):
        values = _keras.loss_step_optimizer_values(kwargs)
        with optimizer_state(getattr(model, "optimizer", None), values):
            return base_compute_loss_and_updates(*args, **kwargs)

    def make_train_function(force=False):
        from tf_gradmix.backend.jax import optimizer

        return optimizer.make_train_function(model, base_make_train_function, force)

    model.compute_loss_and_updates = compute_loss_and_updates
    model.make_train_function = make_train_function
    return model


def metric_scope(model):
    """No scope: JAX metrics need none."""
    del model
    return contextlib.nullcontext()


def restore_after_failed_step(model, args):
    """Puts the step's input state back into the model's variables after a step raised.

    Keras's JAX ``fit`` moves the state out of the variables before the first
    step and puts back only the state of a step that returned
    (:mod:`tf_gradmix.backend._keras`); a step that raises (e.g. GradientMix
    refusing to train unmixed) would leave a model whose variables cannot be
    read. ``args`` are the train function's ``(state, data)``.
    """
    state = _keras.jax_train_state(args)
    if state is None:
        return
    trainable, non_trainable, optimizer_values, metrics = state
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
