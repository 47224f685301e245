"""tf_gradmix: GradientMix for Keras 3 on TensorFlow.

Mixes per-example (or per-replica) gradients with random weights of mean
1/B, redrawn every step, instead of averaging them; plus LARS, LAMB, the
paper's schedules and recipes for large-batch training.
"""

__version__ = "0.1.0"

from tf_gradmix import (
    callbacks,
    diagnostics,
    distribute,
    noise,
    optimizers,
    per_example,
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
    "schedules",
    "recipes",
    "residual",
    "diagnostics",
    "distribute",
    "__version__",
]
