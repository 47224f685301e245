"""Large-batch optimizers for Keras 3: LARS and LAMB with exclusion lists.

tensorflow-addons (which had LAMB, never LARS) cannot be imported with
Keras 3; Keras has no LARS, and ``keras.optimizers.Lamb`` cannot exclude
variables from weight decay inside the trust ratio or from layer adaptation.
"""

from tf_gradmix.optimizers.lamb import LAMB
from tf_gradmix.optimizers.lars import LARS

__all__ = ["LARS", "LAMB"]
