"""The JAX backend: ``keras.distribution`` shards, optimizer state in the loss hook, ``jax.jit``.

Imported only when Keras runs on JAX (:func:`tf_gradmix.backend.current`);
the interface it provides is documented in :mod:`tf_gradmix.backend`. The
optimizer side (accumulation without Keras's conditionals) is in
:mod:`.optimizer`, the ``fit`` side in :mod:`.trainer`.

On JAX, Keras compiles one global train step: under
``keras.distribution.DataParallel`` the batch is one array sharded over the
devices of the mesh's data axis, and the gradients that reach
``optimizer.stateless_apply`` are those of the whole global batch. So the
sample level draws one weight per example of the global batch (a pure
function of seed, step and the example's index in it, whatever the number of
devices or processes), and the device level cannot weight the gradients in
the optimizer: the model hook gives every example of shard ``k`` the weight
``w_k`` instead (:func:`num_devices` shards).
"""

import jax
import keras

from tf_gradmix.backend import _keras
from tf_gradmix.backend.jax.optimizer import apply_gradients, build_optimizer
from tf_gradmix.backend.jax.trainer import install_fit, metric_scope, read, restore_after_failed_step

__all__ = [
    "GRADIENTS_PER_REPLICA",
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


def num_devices(model=None):
    """``K``, the size of the data axis of the current ``keras.distribution`` (1 without one)."""
    del model  # the distribution is global
    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    axis = getattr(distribution, "batch_dim_name", None) or mesh.axis_names[0]
    return int(mesh.shape[list(mesh.axis_names).index(axis)])


def dense_gradient(gradient):
    """JAX gradients are dense already."""
    return gradient


def transform_output(y_pred, transform):
    """``transform(y_pred)`` carrying ``y_pred``'s Keras mask (masked sequence losses)."""
    result = transform(y_pred)
    mask = _keras.get_keras_mask(y_pred)
    if mask is not None:
        _keras.set_keras_mask(result, mask)
    return result


def depends_on(function, inputs):
    """For each input, whether the scalar ``function(*inputs)`` depends on it differentiably.

    The linearized function keeps only the inputs the value depends on
    differentiably (the others are symbolic zeros): its jaxpr is read.
    Traced inside the step being compiled, so nothing extra runs.
    """
    values = [v.value if isinstance(v, keras.Variable) else v for v in inputs]
    _, linear = jax.linearize(function, *values)
    jaxpr = jax.make_jaxpr(linear)(*values).jaxpr
    used = {id(v) for eqn in jaxpr.eqns for v in eqn.invars} | {id(v) for v in jaxpr.outvars}
    return [id(v) in used for v in jaxpr.invars]
