"""Weight distributions, stateless seeding and the noise-equivalent batch."""

import math
import re

import keras
import numpy as np
import pytest

import tf_gradmix as gm
from tf_gradmix import noise

from oracles import numpy


@pytest.mark.parametrize("name", ["gaussian", "rademacher"])
def test_xi_has_mean_zero_and_unit_variance(name):
    dist = noise.get(name)
    xi = numpy(dist.sample([200_000], noise.step_seed(1, 2, noise.SAMPLE_STREAM))).astype(np.float64)
    # Standard error of the mean is 1/sqrt(n) ~ 0.0022; 5 sigma bounds.
    assert abs(xi.mean()) < 0.012
    assert abs(xi.var() - 1.0) < 0.02
    if name == "rademacher":
        assert set(np.unique(xi)) == {-1.0, 1.0}


def test_weights_are_one_plus_stddev_xi_and_gamma_is_mean_square():
    seed = noise.step_seed(7, 3, noise.SAMPLE_STREAM, 1)
    w = numpy(noise.mixing_weights(noise.Rademacher(), 0.5, [64], seed))
    assert set(np.unique(w)) == {0.5, 1.5}
    assert numpy(noise.gamma(w)) == pytest.approx(np.mean(w.astype(np.float64) ** 2))
    # E[gamma] = 1 + stddev^2 for any distribution of xi.
    g = noise.mixing_weights(noise.Gaussian(), 2.0, [100_000], seed)
    assert numpy(noise.gamma(g)) == pytest.approx(5.0, rel=0.02)


def test_draws_are_pure_functions_of_seed_step_stream_replica():
    def draw(seed, step, stream, replica):
        key = noise.step_seed(seed, step, stream, replica)
        return numpy(noise.Gaussian().sample([8], key))

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


@keras.saving.register_keras_serializable(package="tf_gradmix_tests")
class TwoPoint(noise.Noise):
    """A user's noise with an argument: ``xi = a`` with probability ``p``,
    else ``-b``; ``a = sqrt((1-p)/p)``, ``b = sqrt(p/(1-p))`` (mean 0, variance 1)."""

    def __init__(self, p=0.5):
        self.p = p

    def sample(self, shape, seed):
        hit = noise.uniform(shape, seed) < self.p
        a, b = math.sqrt((1 - self.p) / self.p), math.sqrt(self.p / (1 - self.p))
        return keras.ops.where(hit, a, -b)

    def get_config(self):
        return {"p": self.p}


def test_serialize_round_trip_of_builtin_and_custom_noise(tmp_path):
    assert noise.get(noise.serialize(noise.Gaussian())) == noise.Gaussian()
    assert noise.get(noise.serialize(noise.Rademacher())) == noise.Rademacher()
    custom = TwoPoint(0.2)
    assert noise.get(noise.serialize(custom)) == custom != TwoPoint(0.5)

    # A custom noise inside a GradientMix survives a .keras file.
    x = np.random.default_rng(0).normal(size=(16, 3)).astype("float32")
    model = gm.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(gm.GradientMix(keras.optimizers.SGD(0.1), noise=custom, stddev=0.7, seed=3), "mse")
    model.fit(x, x[:, :1], batch_size=8, verbose=0)
    path = str(tmp_path / "custom_noise.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.optimizer.noise == custom
    w = numpy(loaded.optimizer.example_weights(64, step=2, replica_id=0))
    np.testing.assert_array_equal(w, numpy(model.optimizer.example_weights(64, step=2, replica_id=0)))
    a, b = math.sqrt(0.8 / 0.2), math.sqrt(0.2 / 0.8)
    np.testing.assert_allclose(np.unique(w), [1 - 0.7 * b, 1 + 0.7 * a], rtol=1e-6)


def test_noise_equivalent_batch_size():
    # 32K with the covariance of 4K needs stddev sqrt(7).
    assert noise.stddev_for_noise_batch_size(32768, 4096) == pytest.approx(math.sqrt(7))
    assert noise.stddev_for_noise_batch_size(256, 256) == 0.0
    assert noise.noise_batch_size(32768, math.sqrt(7)) == pytest.approx(4096)
    with pytest.raises(ValueError, match="noise_batch_size.*8192"):
        noise.stddev_for_noise_batch_size(4096, 8192)
    with pytest.raises(ValueError, match="batch_size.*-1"):
        noise.stddev_for_noise_batch_size(-1, 2)


@pytest.mark.slow
@pytest.mark.backend_independent  # all backends draw the NumPy oracle's weights (Gaussian to ulps): test_random.py
def test_mixed_gradient_covariance_matches_noise_equivalent_batch():
    """Monte Carlo check of the noise-equivalent batch on synthetic per-example gradients.

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
        w = numpy(noise.mixing_weights(
            noise.Gaussian(), stddev, [batch], noise.step_seed(11, t, 0x5A)
        )).astype(np.float64)
        deviations.append((w[:, None] * grads).mean(0) - g_bar)
    deviations = np.array(deviations)
    measured = np.trace(deviations.T @ deviations) / trials
    expected = stddev**2 / batch**2 * np.sum(grads**2)
    assert measured == pytest.approx(expected, rel=0.06)


# -- Bernoulli (Poisson sampling) weights ------------------------------------


@pytest.mark.parametrize("stddev", [0.5, 1.0, 3.0])
def test_bernoulli_weights_levels_mean_and_variance(stddev):
    n = 200_000
    seed = noise.step_seed(3, 4, noise.SAMPLE_STREAM)
    w = numpy(noise.mixing_weights(noise.get("bernoulli"), stddev, [n], seed)).astype(np.float64)
    scale = 1.0 + stddev**2  # 1 / p
    p = 1.0 / scale
    assert set(np.unique(w)) == {0.0, np.float64(np.float32(scale))}
    # 5 standard errors of the sample mean, of the kept share and of the
    # mean square deviation from the true mean 1 (its variance uses the
    # fourth central moment of the two-point distribution; 0 at stddev 1).
    assert abs(w.mean() - 1.0) < 5 * stddev / math.sqrt(n)
    assert abs(np.mean(w > 0) - p) < 5 * math.sqrt(p * (1 - p) / n)
    fourth = p * (scale - 1.0) ** 4 + (1 - p)
    assert abs(np.mean((w - 1.0) ** 2) - stddev**2) <= 5 * math.sqrt((fourth - stddev**4) / n) + 1e-12


def test_bernoulli_stddev_zero_keeps_every_unit_and_draws_are_pure():
    seed = noise.step_seed(7, 3, noise.SAMPLE_STREAM, 1)
    bernoulli = noise.Bernoulli()
    np.testing.assert_array_equal(numpy(noise.mixing_weights(bernoulli, 0.0, [1000], seed)), np.ones(1000))
    a = numpy(noise.mixing_weights(bernoulli, 2.0, [64], seed))
    np.testing.assert_array_equal(a, numpy(noise.mixing_weights(bernoulli, 2.0, [64], seed)))
    other = noise.step_seed(7, 4, noise.SAMPLE_STREAM, 1)
    assert not np.array_equal(a, numpy(noise.mixing_weights(bernoulli, 2.0, [64], other)))
    # A tensor stddev (a schedule's value) gives the same draw as a float.
    tensor_stddev = keras.ops.convert_to_tensor(2.0)
    np.testing.assert_array_equal(a, numpy(noise.mixing_weights(bernoulli, tensor_stddev, [64], seed)))
    with pytest.raises(NotImplementedError, match="weights"):
        bernoulli.sample([4], seed)


def test_bernoulli_serializes_by_name_and_config():
    assert noise.get("bernoulli") == noise.Bernoulli()
    assert noise.serialize(noise.Bernoulli()) == "bernoulli"
    config = __import__("keras").saving.serialize_keras_object(noise.Bernoulli())
    assert noise.get(config) == noise.Bernoulli()


def test_custom_location_scale_noise_only_implements_sample():
    class Uniform(noise.Noise):  # xi uniform on [-sqrt(3), sqrt(3)]: variance 1
        def sample(self, shape, seed):
            return math.sqrt(3) * (2 * noise.uniform(shape, seed) - 1)

    seed = noise.step_seed(5, 6, noise.SAMPLE_STREAM)
    w = numpy(noise.mixing_weights(Uniform(), 0.5, [16], seed))
    np.testing.assert_allclose(w, 1.0 + 0.5 * numpy(Uniform().sample([16], seed)), rtol=1e-7)


# -- the temperature rule -------------------------------------------------------


def test_stddev_for_temperature_values():
    # Full batch N = 1024 at the rate of a batch-32 run: sqrt(N / b - 1).
    assert noise.stddev_for_temperature(1024, 0.05, 32, 0.05) == pytest.approx(math.sqrt(31))
    # Linear scaling keeps lr / B: no noise lost, exactly 0 despite rounding.
    assert noise.stddev_for_temperature(4096, 1.6, 256, 0.1) == 0.0
    assert noise.stddev_for_temperature(3000, 0.3, 1000, 0.1) == 0.0
    # Square-root scaling (4x batch, 2x rate) halves lr / B: sigma = 1.
    assert noise.stddev_for_temperature(1024, 0.2, 256, 0.1) == pytest.approx(1.0)
    # The mixed temperature lr (1 + sigma^2) / B equals the reference's.
    sigma = noise.stddev_for_temperature(8192, 0.8, 256, 0.1)
    assert 0.8 * (1 + sigma**2) / 8192 == pytest.approx(0.1 / 256)


@pytest.mark.parametrize(
    "index, arg",
    [(0, "batch_size"), (1, "learning_rate"), (2, "reference_batch_size"), (3, "reference_learning_rate")],
)
@pytest.mark.parametrize("bad", [0, -1.5, float("nan"), float("inf"), True, "0.1"])
def test_stddev_for_temperature_rejects_bad_input_by_name(index, arg, bad):
    args = [1024, 0.05, 32, 0.05]
    args[index] = bad
    with pytest.raises(ValueError, match=rf"argument `{arg}`: {re.escape(repr(bad))}"):
        noise.stddev_for_temperature(*args)


def test_stddev_for_temperature_refuses_a_run_hotter_than_the_reference():
    # Batch 32 at rate 0.1 is hotter than batch 1024 at 0.05: mixing cannot cool it.
    with pytest.raises(ValueError, match=r"`batch_size`=32 and `learning_rate`=0.1.*already above"):
        noise.stddev_for_temperature(32, 0.1, 1024, 0.05)
