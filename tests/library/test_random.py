"""The counter-based generator: Random123's known answers, the NumPy reference, every compiler.

Each backend's bits are compared with the NumPy Threefry of ``oracles.py``
(itself checked against Random123's known-answer vectors): eagerly, and
compiled as a train step compiles them (TensorFlow: a ``tf.function`` graph
and XLA with ``jit_compile=True``; JAX: ``jax.jit``; PyTorch runs eagerly,
drawing blocks of consecutive steps at once). Equal to one reference
everywhere, the streams of TensorFlow, JAX and PyTorch, eager and compiled,
are the same bits; each backend's suite runs this file.
"""

import keras
import numpy as np
import pytest

from tf_gradmix import noise, random

from oracles import (
    DEVICE_STREAM,
    SAMPLE_STREAM,
    THREEFRY2X32_KNOWN_ANSWERS,
    assert_stream_weights,
    mixer,
    numpy,
    stream_words,
    threefry2x32,
)

BACKEND = keras.backend.backend()
MODES = {"tensorflow": ("eager", "graph", "xla"), "jax": ("eager", "jit"), "torch": ("eager",)}[BACKEND]


def run(mode, fn, *args):
    """``fn(*args)`` eagerly or compiled as ``mode`` says; the results as NumPy arrays."""
    if mode == "eager":
        out = fn(*args)
    elif BACKEND == "tensorflow":
        import tensorflow as tf

        out = tf.function(fn, jit_compile=mode == "xla")(*args)
    else:
        import jax

        out = jax.jit(fn)(*args)
    return keras.tree.map_structure(numpy, out)


def step_tensor(step):
    """The raw step as the optimizer holds it (int64 on TensorFlow and PyTorch, int32 on JAX without x64)."""
    return keras.ops.convert_to_tensor(step, "int32" if BACKEND == "jax" else "int64")


def uint32(words):
    return tuple(np.asarray(w).astype(np.int64) % 2**32 for w in words)


@pytest.mark.parametrize("rounds, count, key, expected", THREEFRY2X32_KNOWN_ANSWERS)
def test_numpy_reference_gives_random123_known_answers(rounds, count, key, expected):
    assert tuple(int(y) for y in threefry2x32(key, count, rounds)) == expected


@pytest.mark.parametrize("mode", MODES)
def test_keras_ops_threefry_gives_the_known_answers(mode):
    answers = [a for a in THREEFRY2X32_KNOWN_ANSWERS if a[0] == 20]
    for _, count, key, expected in answers:
        signed = [random._int32(k) for k in key]
        counts = [keras.ops.convert_to_tensor([random._int32(c)], "int32") for c in count]
        y0, y1 = run(mode, lambda c0, c1, k=signed: random.threefry2x32(k, (c0, c1)), *counts)
        assert (int(uint32(y0)[0]), int(uint32(y1)[0])) == expected


KEYS = [
    # seed, stream, step, replica
    (0, SAMPLE_STREAM, 0, 0),
    (5, SAMPLE_STREAM, 3, 1),
    (5, DEVICE_STREAM, 3, 1),
    (2**31 - 1, DEVICE_STREAM, 2**31 - 1, random.MAX_REPLICA),
    (123456789, SAMPLE_STREAM, 987654, 7),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("seed, stream, step, replica", KEYS)
def test_words_equal_the_numpy_reference(mode, seed, stream, step, replica):
    size = 1001  # odd, and more than one vector register

    def draw(seed_, step_, replica_):
        return random.words(size, random.draw_key(seed_, stream, step_, replica_))

    int32 = keras.ops.convert_to_tensor
    args = [int32(seed, "int32"), step_tensor(step), int32(replica, "int32")]
    expected = stream_words(seed, stream, step, replica, size)
    for got, want in zip(uint32(run(mode, draw, *args)), expected):
        np.testing.assert_array_equal(got, want)


@pytest.mark.backends("tensorflow", "torch")
@pytest.mark.parametrize("mode", ["eager", "xla"])
def test_a_step_beyond_int32_wraps_modulo_two_to_the_32(mode):
    if mode not in MODES:
        pytest.skip(f"no {mode} mode on {BACKEND}: XLA here is TensorFlow's jit_compile, which tf_gradmix "
                    "refuses on PyTorch (test_torch.py::test_jit_compile_is_refused_by_name)")
    step = 2**32 + 2**31 + 5  # an int64 raw step: its low 32 bits key the draw
    y0, y1 = run(mode, lambda s: random.words(64, random.draw_key(9, SAMPLE_STREAM, s, 2)), step_tensor(step))
    expected = stream_words(9, SAMPLE_STREAM, step, 2, 64)
    np.testing.assert_array_equal(uint32((y0, y1)), expected)


@pytest.mark.backends("jax")
def test_words_equal_jax_threefry():
    """A second oracle: JAX's own Threefry-2x32 on the same key and counters."""
    import jax.numpy as jnp
    from jax.extend.random import threefry_2x32

    seed, stream, step, replica, size = 77, DEVICE_STREAM, 41, 3, 512
    key = (jnp.uint32(seed), jnp.uint32(stream * 2**24 + replica))
    count = jnp.concatenate([jnp.arange(size, dtype=jnp.uint32), jnp.full(size, step, jnp.uint32)])
    expected = np.asarray(threefry_2x32(key, count))
    for mode in MODES:
        y0, y1 = run(mode, lambda: random.words(size, random.draw_key(seed, stream, step, replica)))
        np.testing.assert_array_equal(np.concatenate(uint32((y0, y1))), expected)


@pytest.mark.parametrize("mode", MODES)
def test_uniform_bits_and_normal_come_from_the_words(mode):
    size = 4096
    key = noise.step_seed(3, 11, noise.SAMPLE_STREAM, 2)
    u, b, z = run(mode, lambda k: (noise.uniform([size], k), noise.bits([size], k), noise.normal([size], k)), key)
    y0, y1 = stream_words(3, SAMPLE_STREAM, 11, 2, size)
    top = (y0 >> np.uint32(8)).astype(np.float64)
    assert u.dtype == np.float32 and z.dtype == np.float32
    np.testing.assert_array_equal(u.astype(np.float64), top * 2.0**-24)  # exact in float32
    np.testing.assert_array_equal(b, (y0 >> np.uint32(31)).astype(np.int32))
    np.testing.assert_array_equal(b, (u >= 0.5).astype(np.int32))
    assert np.max(np.abs(z)) <= np.sqrt(-2.0 * np.log(2.0**-24))
    # The weights' oracle at stddev 1 checks z to a few ulps.
    assert_stream_weights(1.0 + z, "gaussian", 1.0, 3, SAMPLE_STREAM, 11, 2)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("name", ["rademacher", "bernoulli", "gaussian"])
def test_gradient_mix_weights_equal_the_oracle(mode, name):
    """Rademacher and Bernoulli bit for bit, Gaussian to a few ulps, eager and compiled."""
    opt = mixer(name, stddev=0.9, seed=5)
    batch, devices = 48, 4
    for step in (0, 1, 1000):
        sample = run(mode, lambda s: opt.example_weights(batch, step=s, replica_id=1), step_tensor(step))
        assert_stream_weights(sample, name, 0.9, 5, SAMPLE_STREAM, step, replica=1)
        device = run(mode, lambda s: opt.device_weights(devices, step=s), step_tensor(step))
        assert_stream_weights(device, name, 0.9, 5, DEVICE_STREAM, step)


@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("name", ["rademacher", "bernoulli", "gaussian"])
def test_xla_draws_the_weights_example_weights_reports(name):
    """An XLA step applies the weights ``example_weights`` returns eagerly."""
    opt = mixer(name, stddev=0.9)
    for step in range(3):
        eager = numpy(opt.example_weights(16, step=step, replica_id=0))
        xla = run("xla", lambda s: opt.example_weights(16, step=s, replica_id=0), step_tensor(step))
        if name == "gaussian":
            # Two float32 evaluations of log and cos: each within a few ulps of the oracle.
            for weights in (eager, xla):
                assert_stream_weights(weights, name, 0.9, 5, SAMPLE_STREAM, step)
        else:
            np.testing.assert_array_equal(xla, eager)


def test_draw_key_rejects_a_stream_or_replica_out_of_range():
    with pytest.raises(ValueError, match=r"argument `stream`: 256"):
        random.draw_key(1, 256, 0)
    with pytest.raises(ValueError, match=r"argument `replica_id`: 16777216"):
        random.draw_key(1, noise.SAMPLE_STREAM, 0, 2**24)


@pytest.mark.backends("torch")
@pytest.mark.parametrize("step", [0, 63, 64, 2**31 - 1, 2**31, 2**32 - 1])
def test_torch_blocks_of_steps_equal_one_draw_each(step):
    """PyTorch draws 64 consecutive steps at once (its ``compile_pure``): each equals its own draw,
    also where the block crosses the int32 wrap of the step."""
    key = random.draw_key(11, SAMPLE_STREAM, step, 3)
    blocked = random.words(33, key)
    direct = random._words(33, key)
    for got, want in zip(blocked, direct):
        np.testing.assert_array_equal(numpy(got), numpy(want))
    np.testing.assert_array_equal(uint32(blocked), stream_words(11, SAMPLE_STREAM, step, 3, 33))
