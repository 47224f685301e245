"""tf_gradmix: GradientMix for Keras 3 on TensorFlow and JAX.

Mixes per-example (or per-device) gradients with random weights of mean
1/B, redrawn every step, instead of averaging them; plus LARS, LAMB, the
paper's schedules and recipes for large-batch training.

The TensorFlow-only modules (``diagnostics``, ``per_example``, ``exact``)
are imported when first used.
"""

__version__ = "0.2.0"

from tf_gradmix import (
    callbacks,
    distribute,
    noise,
    optimizers,
    recipes,
    residual,
    schedules,
)
from tf_gradmix.callbacks import DiagnosticsLogger, GammaLogger
from tf_gradmix.model import Model, Sequential, enable
from tf_gradmix.optimizer import GradientMix

__all__ = [
    "GradientMix",
    "Model",
    "Sequential",
    "enable",
    "GammaLogger",
    "DiagnosticsLogger",
    "callbacks",
    "noise",
    "optimizers",
    "per_example",
    "exact",
    "schedules",
    "recipes",
    "residual",
    "diagnostics",
    "distribute",
    "__version__",
]

_TENSORFLOW_ONLY = ("diagnostics", "per_example", "exact")


def __getattr__(name):
    if name in _TENSORFLOW_ONLY:
        import importlib

        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
