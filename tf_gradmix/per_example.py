r"""Per-example gradients (TensorFlow, ``tf.vectorized_map``).

Symbols: ``x_i, y_i`` example ``i`` of a batch of ``B``; ``l_i`` the value
``loss`` returns for a batch made of example ``i`` alone (averaged if it
returns per-element values); ``g_i = grad_theta l_i`` its gradient.

* :func:`per_example_gradients`: every ``g_i`` at once with
  ``tf.vectorized_map``. Each example runs through the model as a batch of
  one, so layers whose training-mode output for one example depends on the
  others (BatchNormalization) or that draw one random mask for the whole
  vectorised batch (Dropout and other random layers: every example would
  share one mask) would give wrong results; they are refused with a clear
  error (:func:`check_per_example_safe`). In inference mode every layer is
  per example. Memory grows as ``B x`` the number of parameters.

Built on them: the measurements of :mod:`tf_gradmix.diagnostics` (empirical
Fisher, gradient noise scale) and the opt-in exact mixing mode
(:mod:`tf_gradmix.exact`). Imported only on the TensorFlow backend.
"""

from tf_gradmix import backend, deprecation

backend.require("tf_gradmix.per_example", ("tensorflow",))

# ruff: noqa: E402
from tf_gradmix.backend.tensorflow.per_example import check_per_example_safe, per_example_gradients

__all__ = ["per_example_gradients", "check_per_example_safe"]

__getattr__ = deprecation.module_getattr(__name__, {
    "train_step": deprecation.Renamed("tf_gradmix.exact.train_step", "0.2.0"),
})
