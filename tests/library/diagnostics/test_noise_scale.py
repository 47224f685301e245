"""``tf_gradmix.diagnostics``' gradient noise scale (and the empirical Fisher trace it
shares per-example gradient sums with) against float64 per-example gradients
and McCandlish et al.'s formulas (App. A.1). Tolerances: 1e-4 relative for
traces, 1e-3 for B_simple, a ratio of differences of squared norms (float32
cancellation).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_gradmix import diagnostics as diag

from oracles import build_model, cnn, data, flat, float64_copy, mlp, relative_error

pytestmark = pytest.mark.backends("tensorflow")


def test_empirical_fisher_and_gradient_noise_scale():
    model = build_model(mlp)
    x, y = data(12)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model64 = float64_copy(mlp, model)
    g = []
    for i in range(12):
        with tf.GradientTape() as tape:
            value = loss(y[i : i + 1], model64(tf.constant(x[i : i + 1], tf.float64)))
        g.append(flat([t.numpy() for t in tape.gradient(value, model64.trainable_variables)]))
    g = np.stack(g)
    sq = np.sum(g**2, axis=1)
    fisher = diag.empirical_fisher_trace(model, x, y, loss, batch_size=5)
    assert relative_error(fisher.trace, sq.mean()) <= 1e-4
    # B_simple = tr(Sigma) / |G|^2 with unbiased estimates.
    gbar = g.mean(axis=0)
    trace_sigma = np.sum((g - gbar) ** 2) / 11
    grad_sq = gbar @ gbar - trace_sigma / 12
    noise = diag.gradient_noise_scale(model, x, y, loss, batch_size=5)
    assert relative_error(noise.trace_sigma, trace_sigma) <= 1e-4
    assert relative_error(noise.grad_sq_norm, grad_sq) <= 1e-3
    assert relative_error(noise.b_simple, trace_sigma / grad_sq) <= 1e-3
    # Two batch sizes: with B_small = 1 it is the per-example estimate ...
    one = diag.gradient_noise_scale(model, x, y, loss, method="two_batch", small_batch_size=1)
    assert relative_error(one.b_simple, noise.b_simple) <= 1e-3
    # ... and with B_small = 4 the formula of McCandlish et al. (App. A.1).
    small = g.reshape(3, 4, -1).mean(axis=1)
    s_small, s_big = np.mean(np.sum(small**2, axis=1)), gbar @ gbar
    four = diag.gradient_noise_scale(model, x, y, loss, method="two_batch", small_batch_size=4)
    expected = (s_small - s_big) / (1 / 4 - 1 / 12) / ((12 * s_big - 4 * s_small) / 8)
    assert relative_error(four.b_simple, expected) <= 1e-3


def test_two_batch_noise_scale_with_batchnorm_in_training_mode():
    """``method="two_batch"`` works with BatchNorm in training mode.

    Oracle in float64: each small batch's gradient through its own batch
    statistics, their mean as the large-batch gradient (data-parallel
    replicas with per-replica BatchNorm), and McCandlish et al.'s formulas.
    """
    model = build_model(cnn, batchnorm=True)
    x, y = data(12, shape=(6, 6, 2))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model64 = float64_copy(cnn, model, batchnorm=True)
    statistics = [v.numpy().copy() for v in model.non_trainable_variables]

    def b_simple(training):
        grads = []
        for start in (0, 4, 8):
            with tf.GradientTape() as tape:
                out = model64(tf.constant(x[start : start + 4], tf.float64), training=training)
                value = loss(y[start : start + 4], out)
            grads.append(flat([t.numpy() for t in tape.gradient(value, model64.trainable_variables)]))
        grads = np.stack(grads)
        s_small, big = np.mean(np.sum(grads**2, axis=1)), grads.mean(axis=0)
        s_big = big @ big
        return (s_small - s_big) / (1 / 4 - 1 / 12) / ((12 * s_big - 4 * s_small) / 8)

    expected = b_simple(training=True)
    est = diag.gradient_noise_scale(model, x, y, loss, method="two_batch", small_batch_size=4, training=True)
    # B_simple is a ratio of differences of squared norms: float32 cancellation.
    assert relative_error(est.b_simple, expected) <= 1e-3, (est.b_simple, expected)
    assert relative_error(b_simple(training=False), expected) > 0.05  # the mode matters
    for before, v in zip(statistics, model.non_trainable_variables):
        np.testing.assert_array_equal(v.numpy(), before)  # measuring leaves the model alone
