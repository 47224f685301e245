"""Measurements of any Keras model: curvature and gradient noise.

They only measure: nothing here trains, mixes or depends on the GradientMix
optimizer or model classes, so they work on any ``keras.Model``.

* Curvature: :func:`ggn_trace` (trace of the
  generalised Gauss-Newton matrix of the mean loss, exact or Hutchinson),
  :func:`ggn_vector_product`, :func:`empirical_fisher_trace`.
* Gradient noise: :func:`gradient_noise_scale`
  (``B_simple``, McCandlish et al. 2018) and
  :func:`noise_scale_from_gradient_norms`.
* Per-example gradients are in :mod:`tf_gradmix.per_example` (their old
  names here are deprecated, removed in 0.2.0); the callback that logs these
  measurements during ``fit`` is :class:`tf_gradmix.callbacks.DiagnosticsLogger`.

TensorFlow only (``tf.vectorized_map``, ``tf.autodiff.ForwardAccumulator``; the
implementation is in :mod:`tf_gradmix.backend.tensorflow.diagnostics`):
importing this package on another backend raises an error that says so.
"""

from tf_gradmix import backend

backend.require("tf_gradmix.diagnostics", ("tensorflow",))

# ruff: noqa: E402
from tf_gradmix import deprecation
from tf_gradmix.backend.tensorflow.diagnostics.curvature import (
    SPLITS,
    TraceEstimate,
    empirical_fisher_trace,
    ggn_trace,
    ggn_vector_product,
)
from tf_gradmix.backend.tensorflow.diagnostics.noise_scale import (
    NoiseScale,
    gradient_noise_scale,
    noise_scale_from_gradient_norms,
)
from tf_gradmix.backend.tensorflow.diagnostics.sample import DEFAULT_BATCH_SIZE

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
]

__getattr__ = deprecation.module_getattr(__name__, {
    "per_example_gradients": deprecation.Renamed("tf_gradmix.per_example.per_example_gradients", "0.2.0"),
    "check_per_example_safe": deprecation.Renamed("tf_gradmix.per_example.check_per_example_safe", "0.2.0"),
    "per_example_train_step": deprecation.Renamed("tf_gradmix.exact.train_step", "0.2.0"),
    # The callback imports this package, so an alias here would be an import cycle.
    "DiagnosticsLogger": deprecation.Moved(
        "tf_gradmix.callbacks.DiagnosticsLogger",
        "also tf_gradmix.DiagnosticsLogger; the diagnostics only measure, the callback that logs them is a callback",
    ),
})
