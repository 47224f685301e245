"""The PyTorch backend: one device inside ``fit``, ``DistributedDataParallel`` in custom loops.

Imported only when Keras runs on PyTorch (:func:`tf_gradmix.backend.current`).

Keras 3.15 trains on PyTorch one device at a time and eagerly: its train step
computes the loss, calls ``loss.backward()`` and hands the model's
``.grad`` tensors to ``optimizer.apply``. The gradients reaching the
optimizer are those of the whole batch, as on JAX, so the sample level draws
one weight per example of the batch in the model hook and the device level
inside ``fit`` (one device) weights every example by ``w_0`` (and warns).

Multi-device PyTorch training is a custom loop under
``torch.nn.parallel.DistributedDataParallel``, which averages the processes'
gradients inside ``backward()``. Outside ``fit``, :func:`replica_id` and
:func:`num_data_shards` are the rank and world size of the initialised
``torch.distributed`` process group, so ``GradientMix.example_weights``
draws a distinct stream per process and ``GradientMix.device_weights()``
has one weight per process: each process multiplies its loss by
``device_weights()[rank]`` (device level) or its examples' losses by
``example_weights(local_batch)`` (sample level) before ``backward()``.
Inside ``fit`` they are 0 and 1: Keras 3.15's PyTorch trainer does not
wrap the model in ``DistributedDataParallel`` (a sentinel test notices
when it starts to).

``jit_compile=True`` (``torch.compile`` of the train step) is refused by
:class:`FitMixin`: the model hook has not been tested under ``torch.compile``.
"""

import contextlib

import keras
import torch
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
    "FitMixin",
    "restore_after_failed_step",
    "install_fit",
]

#: The gradients reaching the optimizer are those of the whole batch.
GRADIENTS_PER_REPLICA = False

_IN_FIT = []  # non-empty while Keras's fit runs a train step


# -- compiling -------------------------------------------------------------------


#: Counters drawn at once by :func:`compile_pure` (consecutive steps of the noise stream).
BLOCK = 64
#: Largest ``size * BLOCK`` drawn as one block; larger draws run one at a time.
MAX_BLOCK_ELEMENTS = 2**20
_CACHED_BLOCKS = 8


def _int32(value):
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def compile_pure(fn):
    """``fn(size, key)``, pure, returning a tuple of tensors, with ``key`` int32 ``[3]`` whose last
    element is a counter, run in blocks.

    PyTorch has no cheap compiler for a small integer program (each op is one
    dispatch), and the noise stream (:func:`tf_gradmix.random.words`) asks for
    consecutive counters (its last key element is the optimizer's raw step).
    So the counters ``c - c % BLOCK`` to ``c - c % BLOCK + BLOCK - 1`` are
    drawn in one ``torch.func.vmap`` call and the following calls are served
    from a small cache: the same ops on the same values, bit for bit the
    eager result. No autograd graph is recorded.
    """
    cache = {}

    def run(size, key):
        with torch.no_grad():
            if size * BLOCK > MAX_BLOCK_ELEMENTS:
                return fn(size, key)
            k0, k1, counter = key.tolist()
            start = counter - counter % BLOCK
            index = (size, k0, k1, start)
            block = cache.get(index)
            if block is None:
                keys = torch.tensor(
                    [[k0, k1, _int32(start + i)] for i in range(BLOCK)], dtype=torch.int32, device=key.device
                )
                block = torch.func.vmap(lambda k: fn(size, k))(keys)
                if len(cache) >= _CACHED_BLOCKS:
                    cache.pop(next(iter(cache)))
                cache[index] = block
            return tuple(words[counter - start] for words in block)

    return run


# -- processes -------------------------------------------------------------------


def _process_group():
    """``(rank, world_size)`` of the initialised process group outside ``fit``, else ``(0, 1)``."""
    if _IN_FIT or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def replica_id():
    """This process's rank in a custom ``DistributedDataParallel`` loop; 0 inside ``fit`` or without one."""
    return _process_group()[0]


def num_replicas():
    """1: the gradients reaching the optimizer are the whole batch's (DDP has averaged them)."""
    return 1


def num_data_shards():
    """``K``, the world size of the process group in a custom loop; 1 inside ``fit`` or without one."""
    return _process_group()[1]


def scale_gradient(gradient, scale):
    """``gradient * scale``."""
    if gradient is None:
        return None
    return gradient * keras.ops.cast(scale, gradient.dtype)


def dense_gradient(gradient):
    """PyTorch gradients reaching Keras optimizers are dense."""
    return gradient


def transform_output(y_pred, transform):
    """``transform(y_pred)`` carrying ``y_pred``'s Keras mask (masked sequence losses).

    Keras's PyTorch losses read no other annotation (no logits behind a softmax).
    """
    result = transform(y_pred)
    mask = masking.get_keras_mask(y_pred)
    if mask is not None:
        masking.set_keras_mask(result, mask)
    return result


def read(variable):
    """The value of a Keras variable (PyTorch runs eagerly)."""
    return variable.value


# -- fit -------------------------------------------------------------------------


def _check_jit_compile(model):
    if getattr(model, "jit_compile", False):
        raise ValueError(
            "tf_gradmix on the PyTorch backend does not support `jit_compile=True` (torch.compile of "
            "Keras's train step): the GradientMix hook is tested eagerly only. Compile the model with "
            "`jit_compile=False` (the PyTorch default)."
        )


@contextlib.contextmanager
def _in_fit():
    _IN_FIT.append(True)
    try:
        yield
    finally:
        _IN_FIT.pop()


def _make_train_function(model, base, force):
    _check_jit_compile(model)
    if model.train_function is not None and not force:
        return model.train_function  # built already (and wrapped, also by the model hook): as Keras does
    base(force)
    function = model.train_function
    if function is None:
        return function

    def train_function(*data):
        with _in_fit():
            return function(*data)

    train_function._gradmix_in_fit = True
    model.train_function = train_function
    return train_function


class FitMixin:
    """Mixin for ``keras.Model`` subclasses: refuses ``jit_compile=True`` and marks ``fit``'s
    steps as one-device (see module docstring)."""

    def make_train_function(self, force=False):
        return _make_train_function(self, super().make_train_function, force)


def install_fit(model):
    """The same as :class:`FitMixin`, for one existing model."""
    if isinstance(model, FitMixin) or getattr(model, "_gradmix_fit_installed", False):
        return model
    base = model.make_train_function

    def make_train_function(force=False):
        return _make_train_function(model, base, force)

    model.make_train_function = make_train_function
    model._gradmix_fit_installed = True
    return model


def restore_after_failed_step(model, args):
    """Nothing to do: PyTorch's variables hold the state throughout ``fit``."""
    del model, args
