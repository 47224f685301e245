r"""The gradient noise scale (McCandlish et al., 2018).

``B_simple = tr(Sigma) / |G|^2``, with ``G`` the gradient of the mean loss
and ``Sigma`` the covariance of per-example gradients, estimates the critical
batch size: batches much smaller than it train almost perfectly
data-efficiently, much larger ones waste examples.

* :func:`gradient_noise_scale`: from per-example gradients, or from the
  gradients of disjoint small batches (any model, BatchNorm included).
* :func:`noise_scale_from_gradient_norms`: from mean squared gradient norms
  at two batch sizes (e.g. the per-replica and the all-reduced gradient).

References:
    McCandlish, Kaplan, Amodei et al. (2018). An Empirical Model of
    Large-Batch Training. arXiv:1812.06162.
"""

from typing import NamedTuple

import numpy as np
import tensorflow as tf

import tf_gradmix.backend.tensorflow.diagnostics.sample as sample
from tf_gradmix import validation
from tf_gradmix.backend.tensorflow import per_example
from tf_gradmix.backend.tensorflow.diagnostics.sample import DEFAULT_BATCH_SIZE

__all__ = ["NoiseScale", "gradient_noise_scale", "noise_scale_from_gradient_norms"]

#: The two estimators of :func:`gradient_noise_scale`.
METHODS = ("per_example", "two_batch")

_ZERO = tf.UnconnectedGradients.ZERO


class NoiseScale(NamedTuple):
    """The simple gradient noise scale of McCandlish et al. (2018).

    Attributes:
        b_simple: ``tr(Sigma) / |G|^2``, the critical-batch-size estimate (in
            examples). Negative or huge when ``|G|^2`` is not resolved.
        trace_sigma: unbiased ``tr(Sigma)``, the trace of the per-example
            gradient covariance.
        grad_sq_norm: unbiased ``|G|^2``, the squared norm of the true gradient.
    """

    b_simple: float
    trace_sigma: float
    grad_sq_norm: float


def noise_scale_from_gradient_norms(small_sq_norm, small_batch_size, big_sq_norm, big_batch_size):
    r"""``B_simple`` from squared gradient norms at two batch sizes.

    With ``E|G_B|^2 = |G|^2 + tr(Sigma) / B`` (McCandlish et al., 2018, App. A.1):

    .. math::

        |G|^2 \approx \frac{B_{big} |G_{B_{big}}|^2 - B_{small} |G_{B_{small}}|^2}{B_{big} - B_{small}},
        \qquad
        \operatorname{tr}\Sigma \approx \frac{|G_{B_{small}}|^2 - |G_{B_{big}}|^2}{1/B_{small} - 1/B_{big}} .

    Average the squared norms over many batches before calling (the ratio of
    averages, not the average of ratios). Works with any model (BatchNorm
    included) and needs no per-example gradients, e.g. the per-replica and
    the all-reduced gradient of data-parallel training.

    Args:
        small_sq_norm: mean ``|G_B|^2`` of gradients of batches of ``small_batch_size``.
        small_batch_size: ``B_small``.
        big_sq_norm: mean ``|G_B|^2`` at ``big_batch_size``.
        big_batch_size: ``B_big > B_small``.

    Returns:
        :class:`NoiseScale`.
    """
    b_small = validation.number("small_batch_size", small_batch_size, low=0.0, low_open=True)
    b_big = validation.number("big_batch_size", big_batch_size, low=b_small, low_open=True)
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    b_simple = trace_sigma / grad_sq if grad_sq != 0 else float("inf")
    return NoiseScale(float(b_simple), float(trace_sigma), float(grad_sq))


def gradient_noise_scale(
    model,
    x,
    y,
    loss,
    method="per_example",
    small_batch_size=None,
    batch_size=DEFAULT_BATCH_SIZE,
    training=False,
):
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2``.

    ``G`` is the gradient of the mean loss and ``Sigma`` the covariance of
    per-example gradients; ``B_simple`` estimates the critical batch size
    (McCandlish et al., 2018): batches much smaller than it train almost
    perfectly data-efficiently, much larger ones waste examples.

    * ``method="per_example"``: from the ``n`` per-example gradients,
      ``tr(Sigma) = (sum_i |g_i|^2 - n |gbar|^2) / (n - 1)`` and the unbiased
      ``|G|^2 = |gbar|^2 - tr(Sigma) / n``. Refuses BatchNorm/random layers
      when ``training=True``.
    * ``method="two_batch"``: from the mean squared norm of the gradients of
      the ``n // small_batch_size`` disjoint batches of ``small_batch_size``
      examples (one ordinary backward pass each, any model, BatchNorm in
      training mode included) and of their average, the gradient of all
      ``n' = (n // small_batch_size) * small_batch_size`` examples, through
      :func:`noise_scale_from_gradient_norms`. With ``small_batch_size=1``
      it equals ``"per_example"``.

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs, or a ``tf.data.Dataset`` of ``(x, y)`` batches (``"per_example"``).
        y: targets, or ``None`` with a dataset.
        loss: a Keras loss called as ``loss(y_true, y_pred)``; for
            ``"two_batch"`` its reduction must average over the batch
            (Keras's default).
        method: ``"per_example"`` or ``"two_batch"``.
        small_batch_size: ``B_small`` for ``"two_batch"``.
        batch_size: examples per vectorised computation (``"per_example"``).
        training: forward mode (default ``False``).

    Returns:
        :class:`NoiseScale`.
    """
    loss = per_example.get_loss(loss)
    validation.one_of("method", method, METHODS)
    if method == "per_example":
        total, sq_sum, n = None, 0.0, 0
        for sums, sq in sample.gradient_stats(model, x, y, loss, batch_size, training):
            total = sums if total is None else [a + b for a, b in zip(total, sums)]
            sq_sum += float(sq.sum())
            n += sq.size
        if n < 2:
            raise ValueError("Need at least 2 examples.")
        mean_sq = sum(float(np.sum(np.square(t / n))) for t in total)
        return noise_scale_from_gradient_norms(sq_sum / n, 1, mean_sq, n)
    if isinstance(x, tf.data.Dataset):
        raise ValueError("method='two_batch' takes arrays, not a dataset.")
    small_batch_size = validation.integer("small_batch_size", small_batch_size, low=1)
    variables = per_example.trainable_tensors(model)

    @tf.function(reduce_retracing=True)
    def batch_gradient(x, y):
        with tf.GradientTape() as tape:
            output = per_example.single_output(model(x, training=training))
            value = tf.cast(loss(y, output), output.dtype)
            value = tf.reduce_mean(value)
        return tape.gradient(value, variables, unconnected_gradients=_ZERO)

    total, sq_sum, count = None, 0.0, 0
    n = len(tf.nest.flatten(x)[0])
    # In training mode BatchNorm updates its moving statistics on every
    # call; a measurement must leave the model as it found it.
    state = [(v, v.numpy()) for v in model.non_trainable_variables]
    try:
        for start in range(0, n - small_batch_size + 1, small_batch_size):
            sl = slice(start, start + small_batch_size)
            grads = batch_gradient(
                tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[sl]), x),
                tf.convert_to_tensor(y[sl]),
            )
            grads = [g.numpy().astype(np.float64) for g in grads]
            sq_sum += sum(float(np.sum(np.square(g))) for g in grads)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            count += 1
    finally:
        for variable, value in state:
            variable.assign(value)
    if count < 2:
        raise ValueError("method='two_batch' needs at least 2 small batches.")
    big_sq = sum(float(np.sum(np.square(t / count))) for t in total)
    return noise_scale_from_gradient_norms(
        sq_sum / count, small_batch_size, big_sq, count * small_batch_size
    )
