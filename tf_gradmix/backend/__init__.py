"""What differs between Keras backends: one package per backend, one interface.

The core of tf_gradmix (noise, optimizer, model hook, mixing check) is
written once with ``keras.ops`` and asks :func:`current` for the rest. As in
Keras (``keras/src/backend/<name>/``), each supported backend is a package
``tf_gradmix.backend.<name>`` named in :data:`SUPPORTED`, imported only when
Keras runs on it. Its ``__init__`` provides:

Where a step's gradients come from
    ``GRADIENTS_PER_REPLICA``: True when the gradients reaching
    ``optimizer.apply`` are one replica's (TensorFlow's ``tf.distribute``),
    False when they are the global batch's (JAX's one program over
    ``keras.distribution`` shards). It decides who applies the device level
    (``GradientMix._weights_in_optimizer``).
    ``replica_id()``: the replica running this step (0 where gradients are
    global). ``num_devices(model=None)``: ``K``, the devices one step mixes
    (replicas in sync, or shards of the data axis; ``model`` gives the
    strategy outside a replica context).

Gradients and outputs
    ``dense_gradient(gradient)``: a dense tensor (TensorFlow's
    ``IndexedSlices`` densified); ``transform_output(y_pred, transform)``:
    ``transform`` applied to a model output, keeping the annotations that
    backend's losses read (mask, logits); ``read(variable)``: a variable's value in the step being traced;
    ``compile_pure(fn)``: a pure function compiled as one program;
    ``depends_on(function, inputs)``: which inputs a scalar function depends
    on differentiably (:mod:`tf_gradmix.mixing_check`).
    ``EAGER_STEPS`` (optional, default False): train steps run eagerly, so
    the model hook checks the loss at the first step of each train function
    instead of at each trace (PyTorch).

The optimizer (``<name>/optimizer.py``)
    ``build_optimizer(inner, var_list)``: builds the inner optimizer
    (:meth:`tf_gradmix.GradientMix.build` hands over in this one call);
    ``apply_gradients(inner, grads, trainable_variables, weight)``: weights
    the gradients by ``weight`` (the device level, where this wrapper applies
    it; else None) and runs the inner optimizer's step, with its
    ``gradient_accumulation_steps`` (:meth:`tf_gradmix.GradientMix.apply`
    hands over in this one call).

The trainer (``<name>/trainer.py``)
    ``install_fit(model)``: what one model needs for Keras ``fit`` on this
    backend, installed on the instance (called by the one hook installer of
    :mod:`tf_gradmix.model`); ``metric_scope(model)``: the context a model's
    metric is created in; ``restore_after_failed_step(model, args)``.

Every access to Keras's private internals is in :mod:`tf_gradmix.backend._keras`,
with its version guard and upstream issue. Adding a backend is one package
and one entry in :data:`SUPPORTED`; other backends are refused by
:func:`require` and :func:`current` with an error naming the backend.
"""

import importlib

import keras

__all__ = ["SUPPORTED", "name", "current", "require"]

#: Keras backends tf_gradmix runs on; each has a package ``tf_gradmix.backend.<name>``.
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
    """The package of this process's backend, ``tf_gradmix.backend.<name>``."""
    return importlib.import_module(f"{__name__}.{require('tf_gradmix')}")
