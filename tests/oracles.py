"""Independent references for the tests, and the small models they check.

The references (per-example loops in float64, tolerances, the noise stream
in NumPy) use no tf_gradmix code; the weights a test compares against come
from ``GradientMix.example_weights`` / ``device_weights``, which
``library/test_random.py`` checks against :func:`stream_weights` on every
backend and compiler, and whose statistics ``library/test_noise.py`` tests.
The last section builds the small models and data several test modules share.

Backend-agnostic: gradients come from a ``tf.GradientTape`` on TensorFlow,
from ``jax.grad`` of ``model.stateless_call`` on JAX and from
``torch.autograd.grad`` on PyTorch (:func:`gradient`),
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
    elif keras.backend.backend() == "torch":
        import torch

        with torch.enable_grad():
            outputs = model(x, training=training)
            value = objective(outputs, model.losses)
            grads = torch.autograd.grad(value, [v.value for v in variables], allow_unused=True)
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


def assert_float32_close(actual, expected, ulps=32, scale=None):
    """``actual`` (float32 training) equals the float64 ``expected`` to rounding.

    A float32 forward and backward pass rounds at every operation, so each
    element carries an absolute error of a few ulps of the largest values it
    was computed from, not of its own (possibly cancelled, tiny) value. The
    tolerance is therefore ``ulps * eps32`` relative to each element plus the
    same relative to the largest element of ``expected``: 3.8e-6 of the
    largest gradient entry at the default ``ulps``. A plausible bug (a wrong
    or missing weight on one example of a batch of 16) moves entries by about
    ``|w_b g_b| / B``, percents of the largest entry, far outside it.

    Where ``expected`` is a sum whose terms cancel (a one-element bias after
    a weighted sum of per-example gradients), its largest element
    understates what it was computed from: pass ``scale``, the largest
    magnitude of the terms (e.g. ``|v| + lr * sum_b |w_b g_b| / N``), and
    the absolute tolerance is ``ulps * eps32`` of that instead.
    """
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    tolerance = ulps * FLOAT32_EPS
    largest = np.max(np.abs(expected)) if scale is None else max(float(np.max(scale)), np.max(np.abs(expected)))
    np.testing.assert_allclose(actual, expected, rtol=tolerance, atol=tolerance * largest)


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


# -- the noise stream: Threefry-2x32 in NumPy ------------------------------------

#: Random123's known-answer vectors for threefry2x32 (its ``tests/kat_vectors``;
#: the 20-round ones are also in JAX's ``tests/random_test.py``):
#: ``(rounds, counter, key, output)``, words as uint32.
THREEFRY2X32_KNOWN_ANSWERS = (
    (13, (0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x9D1C5EC6, 0x8BD50731)),
    (13, (0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0xFD36D048, 0x2D17272C)),
    (13, (0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xBA3E4725, 0xF27D669E)),
    (20, (0x00000000, 0x00000000), (0x00000000, 0x00000000), (0x6B200159, 0x99BA4EFE)),
    (20, (0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x1CB996FC, 0xBB002BE7)),
    (20, (0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xC4923A9C, 0x483DF7A0)),
    (32, (0x00000000, 0x00000000), (0x00000000, 0x00000000), (0xCEE3D47E, 0xA23DFD5C)),
    (32, (0xFFFFFFFF, 0xFFFFFFFF), (0xFFFFFFFF, 0xFFFFFFFF), (0x6E2FE0D0, 0xB1B76F82)),
    (32, (0x243F6A88, 0x85A308D3), (0x13198A2E, 0x03707344), (0xE2827716, 0xC3C05CDF)),
)

#: The stream ids of the two levels (tf_gradmix.noise.SAMPLE_STREAM, DEVICE_STREAM).
SAMPLE_STREAM, DEVICE_STREAM = 0x5A, 0xD3


def threefry2x32(key, count, rounds=20):
    """Threefry-2x32 (Salmon et al. 2011) in uint32 NumPy, written from the paper's
    description: ``rounds`` rounds of add, rotate, xor, with the key schedule
    injected after every fourth round. Returns the two output words."""
    rotations = (13, 15, 26, 6, 17, 29, 16, 24)
    k0, k1 = (np.uint32(k) for k in key)
    schedule = (k0, k1, k0 ^ k1 ^ np.uint32(0x1BD11BDA))
    x0, x1 = (np.asarray(c, np.uint32) for c in count)
    with np.errstate(over="ignore"):
        x0, x1 = x0 + schedule[0], x1 + schedule[1]
        for n in range(rounds):
            r = np.uint32(rotations[n % 8])
            x0 = x0 + x1
            x1 = ((x1 << r) | (x1 >> (np.uint32(32) - r))) ^ x0
            if n % 4 == 3:
                i = n // 4 + 1
                x0 = x0 + schedule[i % 3]
                x1 = x1 + schedule[(i + 1) % 3] + np.uint32(i)
    return x0, x1


def stream_words(seed, stream, step, replica, size):
    """The two uint32 words of units ``0 .. size - 1``: key ``(seed, stream * 2^24 + replica)``,
    counter ``(unit, step)``, each taken modulo ``2^32``."""
    key = (seed % 2**32, (stream * 2**24 + replica) % 2**32)
    units = np.arange(size, dtype=np.uint32)
    return threefry2x32(key, (units, np.full(size, step % 2**32, np.uint32)))


def stream_uniform(word):
    """The top 24 bits of a word times 2^-24: float32, exact."""
    return ((np.asarray(word, np.uint32) >> np.uint32(8)).astype(np.float64) * 2.0**-24).astype(np.float32)


def stream_weights(noise, stddev, seed, stream, step, replica, size):
    """The mixing weights ``w`` the package must draw, and a float32 tolerance for them.

    Rademacher and Bernoulli weights are computed in float32 with the
    package's operations (``1 + stddev * xi``; ``1 + stddev^2`` kept where
    ``u * (1 + stddev^2) < 1``), so they must match bit for bit: tolerance 0.
    Gaussian ones are float64 Box-Muller of the same bits,
    ``sqrt(-2 log(1 - u1)) cos(2 pi u2)``; float32 ``log``, ``sqrt`` and
    ``cos`` and the float32 angle ``fl(fl(2 pi) u2)`` err by at most about
    ``(2 pi + 2) eps`` of the radius absolutely plus ``1.5 eps`` relatively
    (``eps`` the float32 machine epsilon), so ``z`` is within ``16 eps`` of
    the radius (a few ulps, with a factor of 1.5 to spare), and the float32
    ``1 + stddev * z`` adds at most ``eps |w|``.
    """
    y0, y1 = stream_words(seed, stream, step, replica, size)
    stddev32 = np.float32(stddev)
    u = stream_uniform(y0)
    if noise == "rademacher":
        xi = np.where(y0 >> np.uint32(31), np.float32(1), np.float32(-1))
        return (np.float32(1) + stddev32 * xi).astype(np.float32), np.zeros(size)
    if noise == "bernoulli":
        scale = np.float32(1) + stddev32 * stddev32
        return np.where(u * scale < np.float32(1), scale, np.float32(0)).astype(np.float32), np.zeros(size)
    if noise == "gaussian":
        radius = np.sqrt(-2.0 * np.log(1.0 - u.astype(np.float64)))
        z = radius * np.cos(2.0 * np.pi * stream_uniform(y1).astype(np.float64))
        w = 1.0 + float(stddev32) * z
        return w, float(stddev32) * 16 * FLOAT32_EPS * radius + FLOAT32_EPS * np.abs(w)
    raise ValueError(f"Invalid value for argument `noise`: {noise!r}.")


def assert_stream_weights(actual, noise, stddev, seed, stream, step, replica=0):
    """``actual`` (any backend's weights) equals :func:`stream_weights` within its tolerance."""
    actual = numpy(actual)
    expected, tolerance = stream_weights(noise, stddev, seed, stream, step, replica, actual.shape[0])
    if noise != "gaussian":
        np.testing.assert_array_equal(actual, expected)
        return
    error = np.abs(actual.astype(np.float64) - expected)
    worst = int(np.argmax(error / tolerance))
    assert np.all(error <= tolerance), (
        f"unit {worst}: {actual[worst]!r} vs {expected[worst]!r}, error {error[worst]:.3g} > {tolerance[worst]:.3g}"
    )


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
