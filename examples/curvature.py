"""The examples' curvature summary: log Tr(G) of a trained CIFAR classifier (the paper's Table 1).

``G`` is the generalised Gauss-Newton matrix of the mean cross-entropy over
the given examples, split at the model's output (the logits, so ``G`` is the
Fisher), measured in inference mode by :func:`tf_gradmix.diagnostics.ggn_trace`.
"""

__all__ = ["log_ggn_trace"]


def log_ggn_trace(model, images, labels, num_probes=None, seed=0, batch_size=32):
    """``Tr(G)``, its natural log and that log's standard error on ``images``.

    Args:
        model: a trained model whose output is logits.
        images: uint8 CIFAR images ``[N, 32, 32, 3]`` (normalised here as the
            input pipeline does).
        labels: their integer labels ``[N]``.
        num_probes: Hutchinson probes (None: exact).
        seed: seed of the probes.
        batch_size: examples per Jacobian evaluation (memory, not the value).

    Returns:
        ``{"ggn_examples", "ggn_trace", "log_ggn_trace", "log_ggn_stderr"}``,
        the key names of the examples' result dicts.
    """
    import keras
    import tensorflow as tf

    from examples import cifar10
    from tf_gradmix import diagnostics

    estimate = diagnostics.ggn_trace(
        model, cifar10.normalize(tf.constant(images)).numpy(), labels,
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        num_probes=num_probes, seed=seed, batch_size=batch_size,
        split="output",  # the model outputs logits: the usual GGN (= Fisher)
    )
    return {
        "ggn_examples": int(len(labels)),
        "ggn_trace": float(estimate.trace),
        "log_ggn_trace": float(estimate.log_trace),
        "log_ggn_stderr": float(estimate.log_stderr),
    }
