"""tf_gradmix: GradientMix for Keras 3 on TensorFlow.

Mixes per-example (or per-replica) gradients with random weights of mean
1/B, redrawn every step, instead of averaging them.
"""

from tf_gradmix import noise
from tf_gradmix.callbacks import GammaLogger
from tf_gradmix.model import Model, Sequential, enable
from tf_gradmix.optimizer import GradientMix

__version__ = "0.1.0"

__all__ = ["GradientMix", "Model", "Sequential", "enable", "GammaLogger", "noise", "__version__"]
