"""Independent references for the tests, and the small models they check.

The references (per-example loops in float64, tolerances) use no
tf_gradmix code; the weights a test compares against come from
``GradientMix.example_weights`` / ``device_weights``, whose statistics are
tested on their own in ``library/test_noise.py``. The last section builds the small
models and data several test modules share.

Backend-agnostic: gradients come from a ``tf.GradientTape`` on TensorFlow
and from ``jax.grad`` of ``model.stateless_call`` on JAX (:func:`gradient`),
the backends' own autodiff of a plain Keras model, one example at a time.
"""

import keras
import numpy as np


def numpy(value):
    """A tensor, variable or array of any backend as a NumPy array."""
    if isinstance(value, keras.Variable):
        value = value.value
    return np.asarray(keras.ops.convert_to_numpy(value))


def flat(arrays):
    """Concatenates a list of arrays into one float64 vector."""
    return np.concatenate([numpy(a).astype(np.float64).ravel() for a in arrays])


def weights_of(model):
    return [numpy(v).astype(np.float64) for v in model.trainable_variables]


def gradient(model, objective, x, training=True):
    """Gradient of ``objective(outputs, layer_losses)`` for ``model.trainable_variables``, flattened.

    ``layer_losses`` is the list of losses the layers added in this call
    (regularizers, ``add_loss``).
    """
    variables = model.trainable_variables
    if keras.backend.backend() == "jax":
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def f(trainable):
            outputs, _, losses = model.stateless_call(
                trainable, non_trainable, x, training=training, return_losses=True
            )
            return objective(outputs, losses)

        grads = jax.grad(f)([v.value for v in variables])
    else:
        import tensorflow as tf

        with tf.GradientTape() as tape:
            outputs = model(x, training=training)
            value = objective(outputs, model.losses)
        grads = tape.gradient(value, variables)
    return flat([np.zeros(v.shape) if g is None else g for g, v in zip(grads, variables)])


def per_example_gradients(model, x, y, loss_fn, training=True):
    """``[B, P]`` matrix of per-example gradients of ``loss_fn`` (one at a time)."""
    if keras.backend.backend() == "jax":  # one compiled gradient, called per example
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def loss_of(trainable, x_b, y_b):
            outputs, _ = model.stateless_call(trainable, non_trainable, x_b, training=training)
            return loss_fn(y_b, outputs)

        grad = jax.jit(jax.grad(loss_of))
        trainable = [v.value for v in model.trainable_variables]
        return np.stack([flat(grad(trainable, x[b : b + 1], y[b : b + 1])) for b in range(len(x))])
    return np.stack([
        gradient(model, lambda out, _, b=b: loss_fn(y[b : b + 1], out), x[b : b + 1], training)
        for b in range(len(x))
    ])


def mean_gradient(model, x, y, loss_fn, training=True):
    """Gradient of the mean loss over ``x`` (no regularization losses)."""
    return gradient(model, lambda out, _: loss_fn(y, out), x, training)


def regularization_gradient(model, x):
    """Gradient of the layers' added losses (regularizers), unmixed."""
    return gradient(model, lambda _, losses: sum(losses), x, training=True)


def recover_weights(update, per_example):
    """Least-squares ``w`` with ``update = per_example.T @ w / B``."""
    batch = per_example.shape[0]
    w, *_ = np.linalg.lstsq(per_example.T / batch, update, rcond=None)
    return w


#: Unit roundoff of float32, the precision of every model under test.
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def assert_float32_close(actual, expected, ulps=32):
    """``actual`` (float32 training) equals the float64 ``expected`` to rounding.

    A float32 forward and backward pass rounds at every operation, so each
    element carries an absolute error of a few ulps of the largest values it
    was computed from, not of its own (possibly cancelled, tiny) value. The
    tolerance is therefore ``ulps * eps32`` relative to each element plus the
    same relative to the largest element of ``expected``: 3.8e-6 of the
    largest gradient entry at the default ``ulps``. A plausible bug (a wrong
    or missing weight on one example of a batch of 16) moves entries by about
    ``|w_b g_b| / B``, percents of the largest entry, far outside it.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    tolerance = ulps * FLOAT32_EPS
    np.testing.assert_allclose(
        actual, expected, rtol=tolerance, atol=tolerance * np.max(np.abs(expected))
    )


#: ``ulps`` for deep models: the backward pass rounds in every layer it
#: runs through (about 60 in ``keras.applications.MobileNetV3Small``, with
#: BatchNorm over the batch), and two computations of one gradient in a
#: different order differ by that many roundings; 2 ulps a layer. This is
#: 1.5e-5 of the largest entry, far below the percent-size effect of a wrong
#: weight. (Measured: 32 ulps for MobileNetV3Small.)
UNROLLED_ULPS = 128


def float32_error_ulps(actual, expected):
    """The smallest ``ulps`` for which :func:`assert_float32_close` passes.

    For stating how close a test runs to its tolerance.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    scale = FLOAT32_EPS * (np.abs(expected) + np.max(np.abs(expected)))
    return float(np.max(np.abs(actual - expected) / scale))


def relative_error(actual, expected):
    """``max |actual - expected| / max |expected|`` in float64."""
    return np.max(np.abs(np.asarray(actual, np.float64) - expected)) / np.max(np.abs(expected))


def two_dense_layers_variables():
    """Variables with paths a/kernel, a/bias, b/kernel, b/bias (deterministic).

    For the layer-wise optimizers: b/bias starts at zero, so ``||w|| = 0``
    must give a trust ratio of 1.
    """
    import keras

    rng = np.random.default_rng(0)
    a = keras.layers.Dense(4, name="a")
    b = keras.layers.Dense(3, name="b")
    a.build((None, 5))
    b.build((None, 4))
    for layer in (a, b):
        for variable in layer.weights:
            variable.assign(rng.normal(size=variable.shape).astype("float32"))
    b.bias.assign(np.zeros(3, "float32"))
    return [a.kernel, a.bias, b.kernel, b.bias]


# -- small models and data shared by the test modules ---------------------------

NUM_CLASSES = 3
SCCE = "sparse_categorical_crossentropy"


def data(n=16, shape=(5,), seed=0):
    """``n`` float32 inputs of ``shape`` and integer labels in ``[0, NUM_CLASSES)``."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n,) + tuple(shape)).astype(np.float32)
    return x, rng.integers(0, NUM_CLASSES, size=n)


def mlp_layers(regularizer=True):
    """Dense(8, tanh, L2) and Dense(3, softmax): the layers of :func:`functional`."""
    import keras

    reg = keras.regularizers.L2(0.01) if regularizer else None
    return [
        keras.layers.Dense(8, activation="tanh", kernel_regularizer=reg),
        keras.layers.Dense(NUM_CLASSES, activation="softmax"),
    ]


def functional(model_class=None, regularizer=True):
    """A seeded functional MLP of ``model_class`` (default ``tf_gradmix.Model``)."""
    import keras

    import tf_gradmix as gm

    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = inputs
    for layer in mlp_layers(regularizer):
        h = layer(h)
    return (model_class or gm.Model)(inputs, h)


def plain_copy(model):
    """A plain keras.Model with the architecture of :func:`functional` and ``model``'s weights."""
    import keras

    ref = functional(keras.Model)
    ref.set_weights(model.get_weights())
    return ref


def float64_copy(builder, model, **kwargs):
    """``builder(**kwargs)`` built in float64, with ``model``'s weights: a float64 reference model."""
    keras.config.set_dtype_policy("float64")
    try:
        copy = builder(**kwargs)
    finally:
        keras.config.set_dtype_policy("float32")
    copy.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return copy


def mixer(noise="gaussian", stddev=0.7, seed=5, inner=None, **kwargs):
    """A seeded ``GradientMix`` around ``SGD(1.0)`` (the update is the gradient)."""
    import keras

    import tf_gradmix as gm

    inner = inner or keras.optimizers.SGD(1.0)
    return gm.GradientMix(inner, noise=noise, stddev=stddev, seed=seed, **kwargs)


def mlp(activation=None, outputs=NUM_CLASSES, regularizer=None, model_class=None):
    """Dense(8, tanh) then Dense(outputs, activation) on 5 inputs."""
    import keras

    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=regularizer)(inputs)
    out = keras.layers.Dense(outputs, activation=activation)(h)
    return (model_class or keras.Model)(inputs, out)


def cnn(activation=None, batchnorm=False):
    """Conv2D(4, 3) (+ BatchNorm) then Dense(3) on 6x6x2 inputs."""
    import keras

    inputs = keras.Input((6, 6, 2))
    h = keras.layers.Conv2D(4, 3, activation="relu")(inputs)
    if batchnorm:
        h = keras.layers.BatchNormalization()(h)
    h = keras.layers.Flatten()(h)
    out = keras.layers.Dense(NUM_CLASSES, activation=activation)(h)
    return keras.Model(inputs, out)


def build_model(builder, seed=0, **kwargs):
    """``builder(**kwargs)`` seeded, with non-trivial BatchNorm statistics."""
    import keras

    keras.utils.set_random_seed(seed)
    model = builder(**kwargs)
    # Non-trivial BatchNorm statistics, so inference mode matters.
    for v in model.non_trainable_variables:
        v.assign(np.random.default_rng(1).uniform(0.5, 1.5, v.shape).astype(np.float32))
    return model
