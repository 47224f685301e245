"""Running a measurement over a fixed sample of examples, in batches.

Shared by :mod:`.curvature` and
:mod:`.noise_scale`: the batches of arrays or a
``tf.data.Dataset``, one ``tf.function`` traced once for every batch size,
standard errors over examples, and the per-example gradient statistics
``(sum_i g_i, |g_i|^2)`` both the empirical Fisher and the noise scale need.
"""

import math

import numpy as np
import tensorflow as tf

from tf_gradmix.backend.tensorflow import per_example

__all__ = ["DEFAULT_BATCH_SIZE", "iterate_batches", "traced_over_batches", "stderr", "gradient_stats"]

#: Examples per vectorised computation unless the caller says otherwise.
DEFAULT_BATCH_SIZE = 64


def iterate_batches(x, y, batch_size):
    """Yields ``(x, y)`` batches of arrays/tensors, or a dataset's elements."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("With a tf.data.Dataset `x`, `y` must be None.")
        for element in x:
            if not isinstance(element, (tuple, list)) or len(element) < 2:
                raise ValueError("The dataset must yield (x, y) batches.")
            yield element[0], element[1]
        return
    n = len(tf.nest.flatten(x)[0])
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        yield (
            tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[sl]), x),
            tf.convert_to_tensor(y[sl]),
        )


def traced_over_batches(fn, batches):
    """``fn`` as one ``tf.function`` for every batch size (traced once).

    Returns the function and the batches (an iterator whose first element was
    read to find the signature).
    """
    batches = iter(batches)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("No examples given.") from None

    def spec(t):
        return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

    signature = tf.nest.map_structure(spec, first)
    function = tf.function(fn, input_signature=list(signature))

    def all_batches():
        yield first
        yield from batches

    return function, all_batches()


def stderr(values):
    """Standard error of the mean of ``values`` (``nan`` for fewer than 2)."""
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.size))


def gradient_stats(model, x, y, loss, batch_size, training):
    """Yields ``(sum_i g_i, |g_i|^2 for each i)`` per batch."""
    per_example.check_per_example_safe(model, training=training)
    variables = per_example.trainable_tensors(model)

    def stats(x, y):
        grads = per_example.vectorized_example_gradients(
            model,
            x,
            y,
            lambda z, y_i: per_example.example_loss(loss, y_i, z[0]),
            variables,
            training,
        )
        sq = tf.add_n(
            [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1) for g in grads]
        )
        return [tf.reduce_sum(g, axis=0) for g in grads], sq

    stats, parts = traced_over_batches(stats, iterate_batches(x, y, batch_size))
    for xb, yb in parts:
        sums, sq = stats(xb, yb)
        yield [s.numpy().astype(np.float64) for s in sums], sq.numpy().astype(np.float64)
