"""Weight distributions, stateless seeding and the noise-equivalent batch."""

import math

import numpy as np
import pytest
import tensorflow as tf

from tf_gradmix import noise


@pytest.mark.parametrize("name", ["gaussian", "rademacher"])
def test_xi_has_mean_zero_and_unit_variance(name):
    dist = noise.get(name)
    xi = dist.sample([200_000], tf.constant([1, 2])).numpy().astype(np.float64)
    # Standard error of the mean is 1/sqrt(n) ~ 0.0022; 5 sigma bounds.
    assert abs(xi.mean()) < 0.012
    assert abs(xi.var() - 1.0) < 0.02
    if name == "rademacher":
        assert set(np.unique(xi)) == {-1.0, 1.0}


def test_weights_are_one_plus_stddev_xi_and_gamma_is_mean_square():
    seed = noise.step_seed(7, 3, noise.SAMPLE_STREAM, 1)
    w = noise.mixing_weights(noise.Rademacher(), 0.5, [64], seed).numpy()
    assert set(np.unique(w)) == {0.5, 1.5}
    assert noise.gamma(w).numpy() == pytest.approx(np.mean(w.astype(np.float64) ** 2))
    # E[gamma] = 1 + stddev^2 for any distribution of xi.
    g = noise.mixing_weights(noise.Gaussian(), 2.0, [100_000], seed)
    assert noise.gamma(g).numpy() == pytest.approx(5.0, rel=0.02)


def test_draws_are_pure_functions_of_seed_step_stream_replica():
    def draw(seed, step, stream, replica):
        key = noise.step_seed(seed, step, stream, replica)
        return noise.Gaussian().sample([8], key).numpy()

    np.testing.assert_array_equal(draw(1, 5, 0x5A, 2), draw(1, 5, 0x5A, 2))
    base = draw(1, 5, noise.SAMPLE_STREAM, 2)
    for other in (
        draw(2, 5, noise.SAMPLE_STREAM, 2),
        draw(1, 6, noise.SAMPLE_STREAM, 2),
        draw(1, 5, noise.DEVICE_STREAM, 2),
        draw(1, 5, noise.SAMPLE_STREAM, 3),
    ):
        assert not np.allclose(base, other)


def test_get_rejects_unknown_noise_with_the_value():
    with pytest.raises(ValueError, match=r"argument `noise`: 'uniform'"):
        noise.get("uniform")
    with pytest.raises(ValueError, match=r"argument `noise`: 3"):
        noise.get(3)


def test_serialize_round_trip_of_builtin_and_custom_noise():
    assert noise.get(noise.serialize(noise.Gaussian())) == noise.Gaussian()
    assert noise.get(noise.serialize(noise.Rademacher())) == noise.Rademacher()


def test_noise_equivalent_batch_size():
    # 32K with the covariance of 4K needs stddev sqrt(7).
    assert noise.stddev_for_noise_batch_size(32768, 4096) == pytest.approx(math.sqrt(7))
    assert noise.stddev_for_noise_batch_size(256, 256) == 0.0
    assert noise.noise_batch_size(32768, math.sqrt(7)) == pytest.approx(4096)
    with pytest.raises(ValueError, match="noise_batch_size.*8192"):
        noise.stddev_for_noise_batch_size(4096, 8192)
    with pytest.raises(ValueError, match="batch_size.*-1"):
        noise.stddev_for_noise_batch_size(-1, 2)


def test_mixed_gradient_covariance_matches_noise_equivalent_batch():
    """Monte Carlo check of DESIGN.md §1 on synthetic per-example gradients.

    The extra covariance of g_mix around the minibatch mean is
    (stddev^2 / B^2) sum_b g_b g_b^T; its trace is compared with the exact
    expectation, in float64.
    """
    rng = np.random.default_rng(0)
    batch, dim, stddev, trials = 32, 5, 1.5, 4000
    grads = rng.normal(size=(batch, dim)) + 0.3
    g_bar = grads.mean(0)
    deviations = []
    for t in range(trials):
        w = noise.mixing_weights(
            noise.Gaussian(), stddev, [batch], noise.step_seed(11, t, 0x5A)
        ).numpy().astype(np.float64)
        deviations.append((w[:, None] * grads).mean(0) - g_bar)
    deviations = np.array(deviations)
    measured = np.trace(deviations.T @ deviations) / trials
    expected = stddev**2 / batch**2 * np.sum(grads**2)
    assert measured == pytest.approx(expected, rel=0.06)
