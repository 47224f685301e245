"""The PyTorch backend's ``fit`` side: one device, eager steps, ``jit_compile`` refused.

Keras 3.15's PyTorch ``fit`` runs each step eagerly on one device. While it
runs a step, :func:`in_fit` is true, so the backend reports replica 0 of one
device even in a process that joined a ``torch.distributed`` group for a
``DistributedDataParallel`` loop (:mod:`tf_gradmix.backend.torch`).
"""

import contextlib

__all__ = ["install_fit", "metric_scope", "restore_after_failed_step", "in_fit"]

_IN_FIT = []  # non-empty while Keras's fit runs a train step of a model with the hook


def in_fit():
    """Whether Keras's ``fit`` is running a train step of a model with the hook."""
    return bool(_IN_FIT)


@contextlib.contextmanager
def _fit_step():
    _IN_FIT.append(True)
    try:
        yield
    finally:
        _IN_FIT.pop()


def _check_jit_compile(model):
    if getattr(model, "jit_compile", False):
        raise ValueError(
            "tf_gradmix on the PyTorch backend does not support `jit_compile=True` (torch.compile of "
            "Keras's train step): the GradientMix hook is tested eagerly only. Compile the model with "
            "`jit_compile=False` (the PyTorch default)."
        )


def install_fit(model):
    """Wraps ``model``'s ``make_train_function``: refuses ``jit_compile=True``, marks ``fit``'s steps."""
    base_make_train_function = model.make_train_function

    def make_train_function(force=False):
        _check_jit_compile(model)
        if model.train_function is not None and not force:
            return model.train_function  # built (and wrapped) already, as Keras does
        base_make_train_function(force)
        function = model.train_function
        if function is None:
            return function

        def train_function(*data):
            with _fit_step():
                return function(*data)

        train_function.__wrapped__ = function
        model.train_function = train_function
        return train_function

    model.make_train_function = make_train_function
    return model


def metric_scope(model):
    """No scope: PyTorch metrics need none."""
    del model
    return contextlib.nullcontext()


def restore_after_failed_step(model, args):
    """Nothing to do: PyTorch's variables hold the state throughout ``fit``."""
    del model, args
