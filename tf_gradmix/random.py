r"""The counter-based random numbers of every mixing weight, in integer ``keras.ops``.

Threefry-2x32 with 20 rounds (Salmon, Moraes, Dror & Shaw, "Parallel random
numbers: as easy as 1, 2, 3", SC 2011; the generator JAX implements in
software) is a keyed bijection of a 64-bit counter: two 32-bit words
``(x0, x1)`` under a key of two words ``(k0, k1)``. With the parity word
``k2 = k0 ^ k1 ^ 0x1BD11BDA`` and the rotation constants
``R = (13, 15, 26, 6, 17, 29, 16, 24)``:

.. code-block:: text

    x0 += k0;  x1 += k1
    for i in 0..4:                         # 5 groups of 4 rounds
        for r in R[4 (i mod 2) : 4 (i mod 2) + 4]:
            x0 += x1;  x1 = rotl(x1, r);  x1 ^= x0
        x0 += k[(i + 1) mod 3];  x1 += k[(i + 2) mod 3] + i + 1

with every addition modulo ``2^32``. A draw is keyed by the run's ``seed``
and by its ``stream`` and ``replica`` (``k0 = seed``,
``k1 = stream * 2^24 + replica``) and counts over ``(unit, step)``
(``x0`` the index of the example or replica, ``x1`` the raw step), so each
``(seed, stream, replica, step, unit)`` gets its own two words, a pure
function of them.

Everything is 32-bit signed integer ``keras.ops`` (``int32``, which every
backend supports alike): additions wrap around modulo ``2^32`` in two's
complement, and the logical right shift of a rotation is an arithmetic shift
whose sign-extended bits are masked away. So TensorFlow eagerly and under
XLA, and JAX eagerly and under ``jax.jit``, compute the same bits; the test
suite checks them against a NumPy reference and Random123's known-answer
vectors. Floats come only at the end:

* :func:`uniform`: the top 24 bits of ``x0`` times ``2^-24``, exact in
  float32, in ``[0, 1)``;
* :func:`bits`: the top bit of ``x0`` (1 exactly where :func:`uniform` is at
  least 1/2);
* :func:`normal`: Box-Muller from two such uniforms, ``u1`` from ``x0`` and
  ``u2`` from ``x1``: ``sqrt(-2 log(1 - u1)) cos(2 pi u2)``; ``1 - u1`` is in
  ``(0, 1]``, so the logarithm is finite and ``|z| <= sqrt(48 log 2) ~ 5.77``.
  ``log`` and ``cos`` are each backend's float32 functions, so normal numbers
  agree across backends to a few float32 ulps, not bit for bit.
"""

import functools
import operator

from keras import ops

from tf_gradmix import backend

__all__ = ["threefry2x32", "draw_key", "words", "uniform", "bits", "normal"]

_ROTATIONS = ((13, 15, 26, 6), (17, 29, 16, 24))
_PARITY = 0x1BD11BDA
#: Largest replica id a key holds (the low 24 bits of ``k1``).
MAX_REPLICA = 2**24 - 1


def _int32(value):
    """The int32 with the bits of the Python int ``value`` modulo ``2^32``."""
    value &= 0xFFFFFFFF
    return value - 2**32 if value >= 2**31 else value


def _rotate_left(x, r):
    # The arithmetic right shift by 32 - r, masked to its low r bits, is the
    # logical one on every backend.
    low = ops.bitwise_and(ops.right_shift(x, 32 - r), (1 << r) - 1)
    return ops.bitwise_or(ops.left_shift(x, r), low)


def threefry2x32(key, count):
    """Threefry-2x32, 20 rounds: ``(y0, y1)`` of the counter ``count`` under ``key``.

    Args:
        key: two int32 scalars ``(k0, k1)`` (tensors or Python ints).
        count: two int32 tensors ``(x0, x1)`` that broadcast together.

    Returns:
        Two int32 tensors, the bits of the uint32 outputs.
    """
    k0, k1 = (ops.cast(k, "int32") for k in key)
    k2 = ops.bitwise_xor(ops.bitwise_xor(k0, k1), _PARITY)
    ks = (k0, k1, k2)
    x0 = ops.add(ops.cast(count[0], "int32"), k0)
    x1 = ops.add(ops.cast(count[1], "int32"), k1)
    for i in range(5):
        for r in _ROTATIONS[i % 2]:
            x0 = ops.add(x0, x1)
            x1 = ops.bitwise_xor(_rotate_left(x1, r), x0)
        x0 = ops.add(x0, ks[(i + 1) % 3])
        x1 = ops.add(x1, ops.add(ks[(i + 2) % 3], i + 1))
    return x0, x1


def draw_key(seed, stream, step, replica_id=0):
    """The int32 ``[3]`` key of one draw: ``(k0, k1, x1)`` of :func:`threefry2x32`.

    Args:
        seed: integer scalar, the run's seed (its low 32 bits are used).
        stream: Python int in ``[0, 255]``, the draw's stream (the level).
        step: integer scalar, the raw optimizer step (its low 32 bits).
        replica_id: integer scalar in ``[0, 2^24)``, the replica drawing.
    """
    if not 0 <= stream <= 255:
        raise ValueError(f"Invalid value for argument `stream`: {stream!r}. Expected an int in [0, 255].")
    if isinstance(replica_id, int) and not 0 <= replica_id <= MAX_REPLICA:
        raise ValueError(
            f"Invalid value for argument `replica_id`: {replica_id!r}. Expected an int in [0, {MAX_REPLICA}]."
        )
    k1 = ops.add(ops.cast(replica_id, "int32"), _int32(stream << 24))
    return ops.stack([_low_word(seed), k1, _low_word(step)])


def _low_word(value):
    """int32 with the low 32 bits of an integer scalar (int64 casts wrap on every backend)."""
    if isinstance(value, int):
        return ops.convert_to_tensor(_int32(value), "int32")
    return ops.cast(value, "int32")


def _words(size, key):
    count = ops.arange(size, dtype="int32")
    return threefry2x32((key[0], key[1]), (count, key[2]))


@functools.cache
def _compiled_words():
    return backend.current().compile_pure(_words)


def words(size, key):
    """The two int32 words of units ``0 .. size - 1`` under the draw ``key`` (:func:`draw_key`).

    Compiled by the backend (:func:`tf_gradmix.backend.current`'s
    ``compile_pure``), so an eager call is one program, not one dispatch per integer op.
    """
    try:
        size = operator.index(size)
    except TypeError:  # a symbolic size inside a TensorFlow graph
        pass
    return _compiled_words()(size, ops.convert_to_tensor(key, "int32"))


def _unit_interval(word):
    """The top 24 bits of ``word`` as a float32 in ``[0, 1)``, exactly."""
    top = ops.bitwise_and(ops.right_shift(word, 8), 0xFFFFFF)
    return ops.multiply(ops.cast(top, "float32"), 2.0**-24)


def _shaped(values, shape):
    return values if len(shape) == 1 else ops.reshape(values, shape)


def _size(shape):
    if len(shape) == 1:
        return shape[0]
    size = 1
    for dim in shape:
        size = size * dim
    return size


def uniform(shape, key):
    """float32 numbers uniform on the multiples of ``2^-24`` in ``[0, 1)``."""
    y0, _ = words(_size(shape), key)
    return _shaped(_unit_interval(y0), shape)


def bits(shape, key):
    """int32 numbers, 0 or 1 with probability 1/2 each: the top bit of the first word."""
    y0, _ = words(_size(shape), key)
    return _shaped(ops.bitwise_and(ops.right_shift(y0, 31), 1), shape)


def normal(shape, key):
    """float32 standard normal numbers (Box-Muller), ``|z| <= 5.77``."""
    y0, y1 = words(_size(shape), key)
    radius = ops.sqrt(-2.0 * ops.log(1.0 - _unit_interval(y0)))
    angle = (2.0 * 3.141592653589793) * _unit_interval(y1)
    return _shaped(radius * ops.cos(angle), shape)
