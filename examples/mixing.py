"""The GradientMix settings the example trainers share: ``--noise``, ``--stddev``, ``--noise-batch-size``.

A trainer's Config has the fields ``noise`` (``"none"``: plain averaging),
``stddev`` (of the weights ``w = 1 + stddev * xi``) and ``noise_batch_size``
(instead of ``stddev``: the smaller batch whose gradient noise mixing should
match, ``stddev = sqrt(B / B_noise - 1)``), beside ``batch_size`` (``B``).
"""

__all__ = ["check_mixing", "mixing_stddev"]


def check_mixing(config):
    """Raises ValueError naming the flag when ``--noise-batch-size`` cannot be used with the other settings."""
    if config.noise_batch_size is None:
        return
    if config.noise == "none":
        raise ValueError(f"--noise-batch-size needs a --noise other than none, got --noise-batch-size "
                         f"{config.noise_batch_size} with --noise none")
    if not 0 < config.noise_batch_size <= config.batch_size:
        raise ValueError(f"--noise-batch-size must be in [1, --batch-size={config.batch_size}], got "
                         f"{config.noise_batch_size}")


def mixing_stddev(config):
    """The stddev of the mixing weights: 0 with ``--noise none``, else ``--stddev`` or ``--noise-batch-size``'s."""
    from tf_gradmix import noise

    if config.noise == "none":
        return 0.0
    if config.noise_batch_size is not None:
        return noise.stddev_for_noise_batch_size(config.batch_size, config.noise_batch_size)
    return config.stddev
