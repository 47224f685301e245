"""Measurements of any Keras model: curvature and gradient noise.

They only measure: nothing here trains, mixes or depends on the GradientMix
optimizer or model classes, so they work on any ``keras.Model``.

* :mod:`~tf_gradmix.diagnostics.curvature`: :func:`ggn_trace` (trace of the
  generalised Gauss-Newton matrix of the mean loss, exact or Hutchinson),
  :func:`ggn_vector_product`, :func:`empirical_fisher_trace`.
* :mod:`~tf_gradmix.diagnostics.noise_scale`: :func:`gradient_noise_scale`
  (``B_simple``, McCandlish et al. 2018) and
  :func:`noise_scale_from_gradient_norms`.
* Per-example gradients are in :mod:`tf_gradmix.per_example` (also
  reachable here under their old names); the callback that logs these
  measurements during ``fit`` is :class:`tf_gradmix.callbacks.DiagnosticsLogger`.

TensorFlow only (``tf.vectorized_map``, ``tf.autodiff.ForwardAccumulator``):
importing this package on another backend raises an error that says so.
"""

from tf_gradmix import backend

backend.require("tf_gradmix.diagnostics", ("tensorflow",))

# ruff: noqa: E402

from tf_gradmix.diagnostics.curvature import (
    SPLITS,
    TraceEstimate,
    empirical_fisher_trace,
    ggn_trace,
    ggn_vector_product,
)
from tf_gradmix.diagnostics.noise_scale import (
    NoiseScale,
    gradient_noise_scale,
    noise_scale_from_gradient_norms,
)
from tf_gradmix.diagnostics.sample import DEFAULT_BATCH_SIZE
from tf_gradmix.per_example import check_per_example_safe, per_example_gradients

__all__ = [
    "ggn_trace",
    "ggn_vector_product",
    "empirical_fisher_trace",
    "gradient_noise_scale",
    "noise_scale_from_gradient_norms",
    "TraceEstimate",
    "NoiseScale",
    "SPLITS",
    "DEFAULT_BATCH_SIZE",
    "per_example_gradients",
    "check_per_example_safe",
]


def __getattr__(name):
    # The callback moved to tf_gradmix.callbacks (which imports this package,
    # so no alias here: that would be an import cycle). Say where it went.
    if name == "per_example_train_step":
        raise AttributeError(
            "tf_gradmix.diagnostics.per_example_train_step moved to tf_gradmix.exact.train_step "
            "(it trains, and the diagnostics only measure)."
        )
    if name == "DiagnosticsLogger":
        raise AttributeError(
            "tf_gradmix.diagnostics.DiagnosticsLogger moved to "
            "tf_gradmix.callbacks.DiagnosticsLogger (also tf_gradmix.DiagnosticsLogger): "
            "the diagnostics only measure; the callback that logs them is a callback."
        )
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
