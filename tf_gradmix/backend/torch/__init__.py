"""The PyTorch backend: one device inside ``fit``, ``DistributedDataParallel`` in custom loops.

Imported only when Keras runs on PyTorch (:func:`tf_gradmix.backend.current`);
the interface it provides is documented in :mod:`tf_gradmix.backend`. The
optimizer side is in :mod:`.optimizer`, the ``fit`` side in :mod:`.trainer`.

Keras 3.15 trains on PyTorch one device at a time and eagerly: its train step
computes the loss, calls ``loss.backward()`` and hands the model's
``.grad`` tensors to ``optimizer.apply``. The gradients reaching the
optimizer are those of the whole batch, as on JAX, so the sample level draws
one weight per example of the batch in the model hook and the device level
inside ``fit`` (one device) weights every example by ``w_0`` (and warns).

Multi-device PyTorch training is a custom loop under
``torch.nn.parallel.DistributedDataParallel``, which averages the processes'
gradients inside ``backward()``. Outside ``fit``, :func:`replica_id` and
:func:`num_devices` are the rank and world size of the initialised
``torch.distributed`` process group, so ``GradientMix.example_weights``
draws a distinct stream per process and ``GradientMix.device_weights()``
has one weight per process: each process multiplies its loss by
``device_weights()[rank]`` (device level) or its examples' losses by
``example_weights(local_batch)`` (sample level) before ``backward()``.
Inside ``fit`` they are 0 and 1: Keras 3.15's PyTorch trainer does not
wrap the model in ``DistributedDataParallel`` (a sentinel test notices
when it starts to).

``jit_compile=True`` (``torch.compile`` of the train step) is refused by
:func:`.trainer.install_fit`: the model hook has not been tested under
``torch.compile``. Steps run eagerly (:data:`EAGER_STEPS`), so the model
hook runs the silent-mixing check at the first step of each train function.
"""

import keras
import torch

from tf_gradmix.backend import _keras
from tf_gradmix.backend.torch import trainer
from tf_gradmix.backend.torch.optimizer import apply_gradients, build_optimizer
from tf_gradmix.backend.torch.trainer import install_fit, metric_scope, restore_after_failed_step

__all__ = [
    "GRADIENTS_PER_REPLICA",
    "EAGER_STEPS",
    "compile_pure",
    "replica_id",
    "num_devices",
    "dense_gradient",
    "transform_output",
    "read",
    "depends_on",
    "build_optimizer",
    "apply_gradients",
    "install_fit",
    "metric_scope",
    "restore_after_failed_step",
]

#: The gradients reaching the optimizer are those of the whole batch.
GRADIENTS_PER_REPLICA = False

#: Train steps run eagerly: the model hook checks the loss at the first step of a train function only.
EAGER_STEPS = True


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
    if trainer.in_fit() or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return 0, 1
    return torch.distributed.get_rank(), torch.distributed.get_world_size()


def replica_id():
    """This process's rank in a custom ``DistributedDataParallel`` loop; 0 inside ``fit`` or without one."""
    return _process_group()[0]


def num_devices(model=None):
    """``K``, the world size of the process group in a custom loop; 1 inside ``fit`` or without one."""
    del model
    return _process_group()[1]


def dense_gradient(gradient):
    """PyTorch gradients reaching Keras optimizers are dense."""
    return gradient


def transform_output(y_pred, transform):
    """``transform(y_pred)`` carrying ``y_pred``'s Keras mask (masked sequence losses).

    Keras's PyTorch losses read no other annotation (no logits behind a softmax).
    """
    result = transform(y_pred)
    mask = _keras.get_keras_mask(y_pred)
    if mask is not None:
        _keras.set_keras_mask(result, mask)
    return result


def read(variable):
    """The value of a Keras variable (PyTorch runs eagerly)."""
    return variable.value


def depends_on(function, inputs):
    """For each input, whether the scalar ``function(*inputs)`` depends on it differentiably.

    PyTorch runs eagerly: the function is evaluated once on detached copies
    of the inputs, and autograd reports the ones its graph does not reach as
    None (at the first step of a train function, :data:`EAGER_STEPS`).
    """
    leaves = [
        keras.ops.convert_to_tensor(v.value if isinstance(v, keras.Variable) else v).detach().requires_grad_(True)
        for v in inputs
    ]
    with torch.enable_grad():
        value = function(*leaves)
        if not value.requires_grad:
            return [False] * len(leaves)
        grads = torch.autograd.grad(value, leaves, allow_unused=True)
    return [g is not None for g in grads]
