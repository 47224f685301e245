"""``tf_gradmix.diagnostics``' curvature (GGN trace, GGN-vector products) against float64 dense references.

References are computed in float64 (a float64 copy of each float32 model,
full Jacobians from ``GradientTape.jacobian`` on the whole batch, output
Hessians written out analytically in numpy); the functions under test run in
float32. Tolerances: 1e-4 relative for exact traces and GGN-vector
products, 10% for Hutchinson with 1000 probes.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_gradmix import diagnostics as diag

from oracles import NUM_CLASSES, build_model, cnn, data, flat, float64_copy, mlp, relative_error

pytestmark = pytest.mark.backends("tensorflow")


# -- float64 references -----------------------------------------------------------


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


# -- standard errors -------------------------------------------------------------------


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
