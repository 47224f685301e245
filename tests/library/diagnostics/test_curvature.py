"""Tests of tf_gradmix.diagnostics against float64 dense references.

References are computed in float64 (a float64 copy of each float32 model,
full Jacobians from ``GradientTape.jacobian`` on the whole batch, output
Hessians written out analytically in numpy); the functions under test run in
float32. Tolerances: 1e-5 absolute for gradients and for the per-example
train step against the reweighting path, 1e-4 relative for exact traces and
GGN-vector products, 10% for Hutchinson with 1000 probes.
"""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradmix as gm
from tf_gradmix import diagnostics as diag

from oracles import NUM_CLASSES, build_model, cnn, data, flat, mlp, relative_error

pytestmark = pytest.mark.backends("tensorflow")

REPO = Path(__file__).resolve().parents[3]


# -- float64 references -----------------------------------------------------------


def float64_copy(builder, model, **kwargs):
    keras.config.set_dtype_policy("float64")
    try:
        copy = builder(**kwargs)
    finally:
        keras.config.set_dtype_policy("float32")
    copy.set_weights([w.astype(np.float64) for w in model.get_weights()])
    return copy


def dense_jacobians(model64, x):
    """``J`` of shape [n, D, P] (float64) and the outputs [n, D]."""
    variables = model64.trainable_variables
    with tf.GradientTape(persistent=True) as tape:
        z = model64(tf.constant(x, tf.float64), training=False)
    jac = tape.jacobian(z, variables, experimental_use_pfor=False)
    n, d = z.shape
    J = np.concatenate([j.numpy().reshape(n, d, -1) for j in jac], axis=2)
    return J, z.numpy()


def dense_ggn(J, H):
    """``G = (1/n) sum_i J_i^T H_i J_i`` (float64)."""
    return np.einsum("bdp,bde,beq->pq", J, H, J) / J.shape[0]


def softmax_np(z):
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def hessian_ce_logits(z):
    p = softmax_np(z)
    return np.stack([np.diag(pi) - np.outer(pi, pi) for pi in p])


# -- 2./3. GGN trace against dense math --------------------------------------------


def test_ggn_trace_exact_softmax_cross_entropy_on_logits():
    model = build_model(mlp)
    x, y = data(12)
    J, z = dense_jacobians(float64_copy(mlp, model), x)
    expected = np.trace(dense_ggn(J, hessian_ce_logits(z)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    est = diag.ggn_trace(model, x, y, loss, batch_size=5)  # ragged batches 5, 5, 2
    assert est.num_examples == 12 and est.stderr == 0.0 and est.num_probes is None
    assert relative_error(est.trace, expected) <= 1e-4, (est.trace, expected)
    # Per-example traces give the data standard error.
    per_example = np.einsum("bdp,bde,bep->b", J, hessian_ce_logits(z), J)
    assert relative_error(est.data_stderr, per_example.std(ddof=1) / np.sqrt(12)) <= 1e-3


def test_ggn_trace_exact_conv_batchnorm_inference_mode():
    model = build_model(cnn, batchnorm=True)
    x, y = data(10, (6, 6, 2))
    J, z = dense_jacobians(float64_copy(cnn, model, batchnorm=True), x)
    expected = np.trace(dense_ggn(J, hessian_ce_logits(z)))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    est = diag.ggn_trace(model, x, y, loss, batch_size=4)
    assert relative_error(est.trace, expected) <= 1e-4, (est.trace, expected)


def test_ggn_trace_exact_mean_squared_error():
    model = build_model(mlp, outputs=4)
    x = data(12)[0]
    y = np.random.default_rng(3).normal(size=(12, 4)).astype(np.float32)
    J, _ = dense_jacobians(float64_copy(mlp, model, outputs=4), x)
    H = np.broadcast_to(2.0 / 4 * np.eye(4), (12, 4, 4))  # Keras MSE: mean over 4 outputs
    expected = np.trace(dense_ggn(J, H))
    est = diag.ggn_trace(model, x, y, keras.losses.MeanSquaredError())
    assert relative_error(est.trace, expected) <= 1e-4, (est.trace, expected)


def test_ggn_trace_probability_cross_entropy_output_and_logit_splits():
    model = build_model(mlp, activation="softmax")
    x, y = data(12)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=False)
    # Output split: H_i is the Hessian of -log(p_y / sum p) in p.
    J, p = dense_jacobians(float64_copy(mlp, model, activation="softmax"), x)
    H = np.stack(
        [np.diag(np.eye(NUM_CLASSES)[yi] / pi[yi] ** 2) - np.ones((3, 3)) / pi.sum() ** 2
         for pi, yi in zip(p, y)]
    )
    expected_output = np.trace(dense_ggn(J, H))
    est_output = diag.ggn_trace(model, x, y, loss, split="output")
    assert relative_error(est_output.trace, expected_output) <= 1e-4
    # With hard labels the output-split GGN is the empirical Fisher.
    fisher = diag.empirical_fisher_trace(model, x, y, loss)
    assert relative_error(fisher.trace, expected_output) <= 1e-4
    # Logit split: the GGN of softmax cross-entropy on the logits.
    logits_model = float64_copy(mlp, model)  # same weights, no softmax
    J, z = dense_jacobians(logits_model, x)
    expected_logits = np.trace(dense_ggn(J, hessian_ce_logits(z)))
    est_logits = diag.ggn_trace(model, x, y, loss, split="logits")
    assert relative_error(est_logits.trace, expected_logits) <= 1e-4
    assert abs(expected_output - expected_logits) > 0.05 * expected_logits  # the splits differ
    with pytest.raises(ValueError, match="softmax or sigmoid"):
        diag.ggn_trace(build_model(mlp), x, y, loss, split="logits")


def test_hutchinson_within_ten_percent_and_ggn_vector_product():
    model = build_model(mlp)
    x, y = data(16)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    J, z = dense_jacobians(float64_copy(mlp, model), x)
    G = dense_ggn(J, hessian_ce_logits(z))
    est = diag.ggn_trace(model, x, y, loss, num_probes=1000, seed=1, batch_size=8)
    assert est.num_probes == 1000 and est.stderr > 0
    assert relative_error(est.trace, np.trace(G)) <= 0.10, (est.trace, np.trace(G))
    assert abs(est.trace - np.trace(G)) <= 5 * est.stderr  # the stated error is honest
    # G v against dense G @ v.
    rng = np.random.default_rng(5)
    v = [rng.normal(size=w.shape).astype(np.float32) for w in model.trainable_variables]
    gv = flat([t.numpy() for t in diag.ggn_vector_product(model, x, y, loss, v)])
    expected = G @ flat(v).astype(np.float64)
    assert np.max(np.abs(gv - expected)) <= 1e-4 * np.max(np.abs(expected))


# -- empirical Fisher and noise scale ------------------------------------------------


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
    """README: ``method="two_batch"`` works with BatchNorm (training mode).

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


def test_log_stderr_is_the_delta_method():
    """``log_stderr = total_stderr / trace`` (delta method for log), checked
    against the dense per-example traces and against a bootstrap."""
    model = build_model(mlp)
    x, y = data(64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    J, z = dense_jacobians(float64_copy(mlp, model), x)
    traces = np.einsum("bdp,bde,bep->b", J, hessian_ce_logits(z), J)  # Tr(J_i^T H_i J_i)
    est = diag.ggn_trace(model, x, y, loss, batch_size=16)
    data_stderr = traces.std(ddof=1) / np.sqrt(64)
    assert relative_error(est.data_stderr, data_stderr) <= 1e-4
    assert relative_error(est.log_stderr, data_stderr / traces.mean()) <= 1e-4
    # The spread of log(trace) over bootstrap resamples of the examples.
    rng = np.random.default_rng(0)
    boot = [np.log(traces[rng.integers(0, 64, 64)].mean()) for _ in range(4000)]
    assert relative_error(np.std(boot), est.log_stderr) <= 0.1
    # With probes, both errors count.
    probed = diag.ggn_trace(model, x, y, loss, num_probes=16, seed=1, batch_size=16)
    assert probed.stderr > 0 and probed.data_stderr > 0
    assert probed.log_stderr == pytest.approx(np.hypot(probed.stderr, probed.data_stderr) / probed.trace, rel=1e-12)


# -- callback ----------------------------------------------------------------------------


def test_diagnostics_logger_every_n_epochs():
    model = build_model(mlp)
    x, y = data(16)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logger = gm.DiagnosticsLogger(x[:8], y[:8], every_n_epochs=2, batch_size=4)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[logger])
    assert [h["epoch"] for h in logger.history] == [1]
    assert history.history["ggn_trace"] == [logger.history[0]["ggn_trace"]]
    expected = diag.ggn_trace(model, x[:8], y[:8], model.loss).trace
    assert relative_error(logger.history[-1]["ggn_trace"], expected) <= 1e-6
    assert set(logger.history[0]) == {
        "epoch", "ggn_trace", "log_ggn_trace", "log_ggn_trace_stderr",
        "empirical_fisher_trace", "gradient_noise_scale",
    }


# -- the example ---------------------------------------------------------------------------


@pytest.mark.slow
def test_ggn_trace_example_quick(tmp_path):
    # About 40 s of CPU (mostly tracing three ResNets); the timeout leaves room
    # for a loaded machine.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "examples.ggn_trace", "--quick", "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "log Tr G" in result.stdout and "Rademacher" in result.stdout


def test_the_moved_callback_name_says_where_it_went():
    import tf_gradmix as gm

    with pytest.raises(AttributeError, match=r"moved to tf_gradmix\.callbacks\.DiagnosticsLogger"):
        gm.diagnostics.DiagnosticsLogger  # noqa: B018
    assert gm.DiagnosticsLogger.__module__ == "tf_gradmix.callbacks"
