"""tf_gradmix: GradientMix for Keras 3 on TensorFlow.

Mixes per-example (or per-replica) gradients with random weights of mean
1/B, redrawn every step, instead of averaging them; plus LARS, LAMB, the
paper's schedules and recipes for large-batch training.
"""

from tf_gradmix import noise, optimizers, recipes, schedules
from tf_gradmix.callbacks import GammaLogger
from tf_gradmix.model import Model, Sequential, enable
from tf_gradmix.optimizer import GradientMix
from tf_gradmix import diagnostics, distribute  # noqa: E402  (they use the model hook)

__version__ = "0.1.0"

__all__ = [
    "GradientMix",
    "Model",
    "Sequential",
    "enable",
    "GammaLogger",
    "noise",
    "optimizers",
    "schedules",
    "recipes",
    "diagnostics",
    "distribute",
    "__version__",
]
