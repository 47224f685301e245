r"""Mixing-weight distributions and their stateless sampling.

GradientMix replaces the fixed averaging weights ``1/N`` of ``N`` units
(examples or replicas) by random weights ``pi`` with ``E[pi] = 1/N`` and
``Cov[pi] = kappa^2 I`` (paper Eq. 12). We write every weight as

.. math::

    \pi_n = w_n / N, \qquad w_n = 1 + \sigma\,\xi_n,
    \qquad \mathbb{E}[\xi_n] = 0,\ \mathrm{Var}[\xi_n] = 1,

so ``kappa = sigma / N`` with ``sigma`` the ``stddev`` argument and ``xi``
drawn from a :class:`Noise` distribution. ``w`` does not depend on ``N``, so
ragged batches and any number of replicas need no special case.

The noise amount of the paper's Theorem 1 is

.. math::

    \gamma = N \sum_n \pi_n^2 = \operatorname{mean}(w^2)
    \approx 1 + \sigma^2 .

Every draw is a pure function of ``(seed, step, level, replica, unit)``:
the key of a draw is made of them by :func:`step_seed`, and the numbers
(:func:`normal`, :func:`uniform`, :func:`bits`) come from the counter-based
generator of :mod:`tf_gradmix.random` (Threefry-2x32 in integer
``keras.ops``), which computes the same bits on every backend, eagerly and
compiled (XLA, ``jax.jit``). So a resumed run continues the same stream, on
any backend and under any compilation, and replicas draw different weights
without communicating. A
:class:`NoiseStream` holds what the draws of a run share (the noise and its
``stddev``); the optimizer, the model hook, the per-example mode and
:class:`tf_gradmix.GammaLogger` all draw through one.
"""

import math

import keras
from keras import ops

from tf_gradmix import random, validation

__all__ = [
    "Noise",
    "Gaussian",
    "Rademacher",
    "Bernoulli",
    "get",
    "serialize",
    "NoiseStream",
    "mixing_weights",
    "gamma",
    "normal",
    "uniform",
    "bits",
    "stddev_for_noise_batch_size",
    "noise_batch_size",
    "stddev_for_temperature",
    "step_seed",
]

# Distinct streams for the two levels, so sample- and device-level weights of
# the same step are independent.
SAMPLE_STREAM = 0x5A
DEVICE_STREAM = 0xD3


class Noise:
    """A distribution of mixing weights ``w`` with mean 1 and standard deviation ``stddev``.

    Most distributions are a location-scale family, ``w = 1 + stddev * xi``
    with ``xi`` of mean 0 and variance 1: such subclasses implement only
    :meth:`sample` (``xi``), which must be a pure function of ``shape`` and
    ``seed`` (draw with :func:`normal`, :func:`uniform` or :func:`bits` and
    ``keras.ops``, so the noise runs on every backend). A distribution whose shape
    depends on ``stddev`` (:class:`Bernoulli`) overrides :meth:`weights`
    instead. Register subclasses with
    ``keras.saving.register_keras_serializable`` so a ``GradientMix`` using
    them survives ``model.save``.
    """

    name = None

    def weights(self, shape, seed, stddev):
        """Draws the weights ``w`` (float32, mean 1, standard deviation ``stddev``).

        The default is ``1 + stddev * self.sample(shape, seed)``.

        Args:
            shape: 1-D shape, e.g. ``[batch_size]``.
            seed: the stateless seed of this draw (:func:`step_seed`).
            stddev: float32 scalar tensor ``sigma >= 0``.
        """
        return 1.0 + stddev * self.sample(shape, seed)

    def sample(self, shape, seed):
        """Draws ``xi`` of ``shape`` (float32) from the stateless ``seed``.

        Args:
            shape: 1-D shape, e.g. ``[batch_size]``.
            seed: the stateless seed of this draw (:func:`step_seed`).
        """
        raise NotImplementedError

    def get_config(self):
        return {}

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __repr__(self):
        return f"{type(self).__name__}()"

    def __eq__(self, other):
        return type(self) is type(other) and self.get_config() == other.get_config()

    def __hash__(self):
        return hash(type(self))


@keras.saving.register_keras_serializable(package="tf_gradmix")
class Gaussian(Noise):
    """``xi ~ N(0, 1)``: weights ``w ~ N(1, stddev^2)``.

    With ``stddev`` above about 0.5 a noticeable share of the weights is
    negative (16% at ``stddev=1``): those examples are ascended, not descended.
    """

    name = "gaussian"

    def sample(self, shape, seed):
        return normal(shape, seed)


@keras.saving.register_keras_serializable(package="tf_gradmix")
class Rademacher(Noise):
    """``xi = +1`` or ``-1`` with probability 1/2 each: ``w = 1 +- stddev``.

    ``stddev=1`` keeps each unit at weight 2 or drops it, with probability
    1/2 each: a random subset of binomial size (half the units on average),
    at double weight.
    """

    name = "rademacher"

    def sample(self, shape, seed):
        return ops.cast(2 * bits(shape, seed) - 1, "float32")


@keras.saving.register_keras_serializable(package="tf_gradmix")
class Bernoulli(Noise):
    r"""Poisson sampling: ``w = b / p`` with ``b ~ Bernoulli(p)``, ``p = 1 / (1 + stddev^2)``.

    .. math::

        w_n = b_n / p \in \{0,\ 1 + \sigma^2\}, \qquad
        b_n \sim \mathrm{Bernoulli}(p), \qquad p = \frac{1}{1 + \sigma^2},

    so ``E[w] = 1`` and ``Var[w] = (1 - p) / p = sigma^2``. The mixed gradient
    ``(1/N) sum_n w_n g_n`` is the gradient of a random subset of expected
    size ``p N`` (each unit kept independently), reweighted to stay
    unbiased: exactly mini-batch sampling noise, at the cost of the full
    batch. ``stddev = sqrt(N / b - 1)`` gives the sampling noise of a
    mini-batch of expected size ``b``. ``stddev = 0`` keeps every unit
    (``w = 1``): plain training. No weight is negative.
    """

    name = "bernoulli"

    def sample(self, shape, seed):
        raise NotImplementedError(
            "Bernoulli weights are not 1 + stddev * xi with a fixed xi; "
            "use Bernoulli().weights(shape, seed, stddev)."
        )

    def weights(self, shape, seed, stddev):
        stddev = ops.cast(stddev, "float32")
        scale = 1.0 + ops.square(stddev)  # 1 / p
        u = uniform(shape, seed)
        return ops.where(u * scale < 1.0, scale, ops.zeros_like(u))


_BY_NAME = {"gaussian": Gaussian, "rademacher": Rademacher, "bernoulli": Bernoulli}


def get(identifier):
    """Returns a :class:`Noise` from a name, a config dict or an instance.

    Raises:
        ValueError: ``identifier`` is not ``"gaussian"``, ``"rademacher"``,
            ``"bernoulli"``, a :class:`Noise` instance or its serialized config.
    """
    if isinstance(identifier, Noise):
        return identifier
    if isinstance(identifier, str):
        key = identifier.lower()
        if key in _BY_NAME:
            return _BY_NAME[key]()
    elif isinstance(identifier, dict):
        noise = keras.saving.deserialize_keras_object(identifier)
        if isinstance(noise, Noise):
            return noise
    raise ValueError(
        f"Invalid value for argument `noise`: {identifier!r}. Expected "
        f"one of {sorted(_BY_NAME)} or an instance of tf_gradmix.noise.Noise."
    )


def serialize(noise):
    """Config of a noise for ``get_config``: its name if built in."""
    if type(noise) in _BY_NAME.values():
        return noise.name
    return keras.saving.serialize_keras_object(noise)


def normal(shape, seed):
    """float32 standard normal numbers, a pure function of ``shape`` and ``seed`` (Box-Muller, ``|z| <= 5.77``)."""
    return random.normal(shape, seed)


def uniform(shape, seed):
    """float32 numbers uniform in ``[0, 1)`` (multiples of ``2^-24``), a pure function of ``shape`` and ``seed``."""
    return random.uniform(shape, seed)


def bits(shape, seed):
    """int32 numbers, 0 or 1 with probability 1/2 each, a pure function of ``shape`` and ``seed``."""
    return random.bits(shape, seed)


def step_seed(seed, step, stream, replica_id=0):
    """The key of one draw: a pure function of its arguments.

    Args:
        seed: the ``GradientMix`` seed: a Python int or an integer scalar
            tensor (the optimizer's saved seed).
        step: scalar integer, the raw optimizer step (modulo ``2^32``).
        stream: :data:`SAMPLE_STREAM` or :data:`DEVICE_STREAM`.
        replica_id: scalar integer in ``[0, 2^24)``, the global replica id
            (sample level on TensorFlow; 0 on JAX, whose step covers the
            global batch).

    Returns:
        int32 ``[3]``, the Threefry key and step word of
        :func:`tf_gradmix.random.draw_key`; the draw counts over the units.
    """
    return random.draw_key(seed, stream, step, replica_id)


def mixing_weights(noise, stddev, shape, seed):
    """Weights ``w`` of mean 1 and standard deviation ``stddev`` (``1 + stddev * xi`` for most noises).

    Args:
        noise: a :class:`Noise`.
        stddev: scalar, the standard deviation ``sigma`` of ``w``.
        shape: 1-D shape, ``[N]`` units.
        seed: stateless seed from :func:`step_seed`.

    Returns:
        float32 tensor of ``shape``. Divide by ``N`` to get the paper's ``pi``.
    """
    return noise.weights(shape, seed, ops.cast(stddev, "float32"))


def gamma(weights):
    """The paper's noise amount ``gamma = N sum_n pi_n^2 = mean(w^2)``."""
    weights = ops.cast(weights, "float32")
    return ops.mean(ops.square(weights))


class NoiseStream:
    r"""The weights of one run: a pure function of ``(seed, step, unit)``.

    Holds the noise and its ``stddev`` (a float or a schedule of the raw
    step); the seed and step are passed in, so the same stream serves a
    compiled train step (which reads them from the optimizer's state), a
    custom loop and a callback recomputing past steps.

    * :meth:`example_weights`: ``w_b`` of the ``B`` examples of a batch
      (paper Eq. 4), for one replica's stream;
    * :meth:`device_weights`: ``w_k`` of ``K`` devices (paper Eq. 3);
    * :meth:`shard_weights`: ``w_k`` repeated over the examples of each of
      ``K`` equal shards of a global batch, the device level written as
      example weights: ``(1/B) sum_b w_{k(b)} grad l_b = (1/K) sum_k w_k g_k``
      for shards of ``B/K`` examples with mean gradients ``g_k``.

    Args:
        noise: a :class:`Noise` (or a name, see :func:`get`).
        stddev: ``sigma >= 0``, a float or a
            ``keras.optimizers.schedules.LearningRateSchedule`` of the raw step.
    """

    def __init__(self, noise, stddev):
        self.noise = get(noise)
        self.stddev = stddev

    @property
    def is_plain(self):
        """True where every weight is exactly 1 at every step: ``stddev`` is the number 0, not a schedule.

        The model hook then leaves the predictions untouched, so training is
        plain training bit for bit on every backend (an identity with a
        custom gradient, even one multiplying by 1, changes how XLA fuses the
        backward pass on JAX, and with it the float32 rounding).
        """
        if isinstance(self.stddev, keras.optimizers.schedules.LearningRateSchedule):
            return False
        return float(self.stddev) == 0.0

    def stddev_at(self, step):
        """``stddev`` at the raw ``step``, float32."""
        if isinstance(self.stddev, keras.optimizers.schedules.LearningRateSchedule):
            return ops.cast(self.stddev(step), "float32")
        return ops.convert_to_tensor(self.stddev, "float32")

    def _weights(self, seed, step, stream, shape, replica_id=0):
        key = step_seed(seed, step, stream, replica_id)
        return mixing_weights(self.noise, self.stddev_at(step), shape, key)

    def example_weights(self, seed, step, batch_size, replica_id=0):
        """``[batch_size]`` sample-level weights of ``step`` on replica ``replica_id``."""
        return self._weights(seed, step, SAMPLE_STREAM, [batch_size], replica_id)

    def device_weights(self, seed, step, num_devices):
        """``[num_devices]`` device-level weights of ``step``."""
        return self._weights(seed, step, DEVICE_STREAM, [num_devices])

    def shard_weights(self, seed, step, batch_size, num_shards):
        """``[batch_size]``: example ``b`` gets ``w_k`` of its shard ``k = floor(b K / B)``."""
        shard = (ops.arange(batch_size, dtype="int32") * num_shards) // batch_size
        return ops.take(self.device_weights(seed, step, num_shards), shard)


def stddev_for_noise_batch_size(batch_size, noise_batch_size):
    r"""The ``stddev`` whose gradient noise matches a smaller batch.

    Mixing gives ``g_mix = g_bar + (sigma / B) sum_b xi_b g_b``: the gradient
    covariance grows by about ``sigma^2 / B * E[g g^T]``, roughly the noise of
    a plain batch of ``B / (1 + sigma^2)`` (our derivation, not the paper's;
    a Monte Carlo check on synthetic gradients matches it). Solving for
    ``sigma``:

    .. math:: \sigma = \sqrt{B / B_{noise} - 1}.

    This is the covariance at a fixed learning rate, not a claim about the
    training dynamics. Example: ``stddev_for_noise_batch_size(32768, 4096)``
    is about 2.65.

    Args:
        batch_size: the (global) batch size ``B`` actually trained with.
        noise_batch_size: the batch size ``B_noise <= B`` whose gradient
            noise the mixed gradient should have.
    """
    batch_size = validation.number("batch_size", batch_size, low=0.0, low_open=True)
    noise_batch_size = validation.number(
        "noise_batch_size", noise_batch_size, low=0.0, low_open=True
    )
    if noise_batch_size > batch_size:
        raise validation.invalid(
            "noise_batch_size",
            noise_batch_size,
            f"at most `batch_size` ({batch_size!r}): mixing only adds noise",
        )
    return math.sqrt(batch_size / noise_batch_size - 1.0)


def noise_batch_size(batch_size, stddev):
    """The inverse of :func:`stddev_for_noise_batch_size`: ``B / (1 + sigma^2)``."""
    return batch_size / (1.0 + float(stddev) ** 2)


def stddev_for_temperature(
    batch_size, learning_rate, reference_batch_size, reference_learning_rate
):
    r"""The ``stddev`` that gives a run the SGD temperature of a reference run.

    SGD's gradient noise enters its dynamics through the temperature
    ``lr / B`` (Smith & Le 2018; Jastrzebski et al. 2017). Mixing multiplies
    the gradient covariance by about ``1 + stddev^2``, so a mixed run has
    temperature ``lr (1 + stddev^2) / B``. Equating it with the reference's
    ``lr_ref / B_ref``:

    .. math::

        \sigma = \sqrt{\frac{B\,\eta_{ref}}{B_{ref}\,\eta} - 1},

    with ``B`` = ``batch_size``, ``eta`` = ``learning_rate``, ``B_ref`` =
    ``reference_batch_size`` and ``eta_ref`` = ``reference_learning_rate``.
    Under linear learning-rate scaling (``eta / B = eta_ref / B_ref``) the
    large batch loses no noise and this is 0. It is positive where the rate
    could not keep up with the batch (beyond the largest stable rate, or at a
    fixed rate): e.g. full-batch descent on ``N`` examples at the rate of a
    batch-``b`` run gets ``sqrt(N / b - 1)``.

    The rule is derived for SGD with or without momentum (momentum changes
    both runs' temperature by the same factor). For Adam-type optimizers the
    SDE analysis of Malladi et al. (2022) gives square-root scaling
    (``eta ∝ sqrt(B)``) instead, under which this formula does not apply; we
    have not measured mixing under that rule.

    Args:
        batch_size: the (global) batch size ``B`` of the run to mix.
        learning_rate: its learning rate ``eta``.
        reference_batch_size: the batch size ``B_ref`` of the reference run.
        reference_learning_rate: its learning rate ``eta_ref``.

    Returns:
        float ``stddev >= 0``.

    Raises:
        ValueError: an argument is not a positive finite number, or the run is
            already hotter than the reference (``eta / B > eta_ref / B_ref``):
            mixing can only add noise.

    References:
        Smith & Le, "A Bayesian perspective on generalization and stochastic
        gradient descent", ICLR 2018. Jastrzebski et al., "Three factors
        influencing minima in SGD", 2017. Malladi et al., "On the SDEs and
        scaling rules for adaptive gradient algorithms", NeurIPS 2022.
    """
    arguments = (
        ("batch_size", batch_size),
        ("learning_rate", learning_rate),
        ("reference_batch_size", reference_batch_size),
        ("reference_learning_rate", reference_learning_rate),
    )
    for arg, value in arguments:
        validation.number(arg, value, low=0.0, low_open=True)
    ratio = (batch_size * reference_learning_rate) / (reference_batch_size * learning_rate)
    # Linear scaling gives ratio 1 up to rounding; within 1e-9 it is exactly 1.
    if ratio < 1.0 - 1e-9:
        raise ValueError(
            f"Invalid values for arguments `batch_size`={batch_size!r} and "
            f"`learning_rate`={learning_rate!r}: their temperature "
            f"learning_rate / batch_size = {learning_rate / batch_size:.4g} is "
            "already above the reference's reference_learning_rate / "
            f"reference_batch_size = {reference_learning_rate / reference_batch_size:.4g} "
            f"(`reference_batch_size`={reference_batch_size!r}, "
            f"`reference_learning_rate`={reference_learning_rate!r}). Mixing "
            "only adds noise, so no stddev lowers it; use a smaller rate or a "
            "larger batch instead."
        )
    return math.sqrt(max(ratio - 1.0, 0.0))
