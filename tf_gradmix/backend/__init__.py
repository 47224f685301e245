"""What differs between Keras backends, behind one small interface.

The core of tf_gradmix (noise, optimizer, model hook) is written once with
``keras.ops``; it asks :func:`current` for the few things a backend does its
own way:

* ``compile_pure``: a pure function compiled as one program, so eager callers
  of the noise generator (:mod:`tf_gradmix.random`, written in ``keras.ops``)
  do not pay one dispatch per integer op;
* where a train step runs: ``replica_id()`` and ``num_replicas()`` (TensorFlow:
  ``tf.distribute`` replicas, whose gradients reach the optimizer one replica
  at a time; JAX: one global program over ``keras.distribution`` shards, whose
  gradients are already global, so ``num_data_shards()`` counts the shards);
* ``FitMixin`` / ``install_fit``: what a model needs for Keras ``fit`` on that
  backend (TensorFlow: the MultiWorkerMirroredStrategy workaround; JAX: the
  optimizer state handed to the loss hook);
* ``mix_output``: an identity whose backward pass multiplies by a weight,
  keeping the tensor annotations that backend's losses read.

:mod:`tf_gradmix.backend.tensorflow` is imported only on TensorFlow,
:mod:`tf_gradmix.backend.jax` only on JAX and :mod:`tf_gradmix.backend.torch`
only on PyTorch. Other backends are refused by :func:`current` with an error
naming the backend.
"""

import keras

__all__ = ["SUPPORTED", "name", "current", "require"]

#: Keras backends tf_gradmix runs on.
SUPPORTED = ("tensorflow", "jax", "torch")


def name():
    """The Keras backend of this process (``keras.backend.backend()``)."""
    return keras.backend.backend()


def require(what, backends=SUPPORTED):
    """Raises ``RuntimeError`` naming ``what`` and the backend if it is not one of ``backends``."""
    backend = name()
    if backend in backends:
        return backend
    raise RuntimeError(
        f"{what} supports the Keras backends {', '.join(map(repr, backends))}, "
        f"but KERAS_BACKEND is {backend!r}. Set KERAS_BACKEND to one of "
        "them before importing keras."
    )


def current():
    """The module of this process's backend: :mod:`.tensorflow`, :mod:`.jax` or :mod:`.torch`."""
    backend = require("tf_gradmix")
    if backend == "tensorflow":
        from tf_gradmix.backend import tensorflow as module
    elif backend == "jax":
        from tf_gradmix.backend import jax as module
    else:
        from tf_gradmix.backend import torch as module
    return module
