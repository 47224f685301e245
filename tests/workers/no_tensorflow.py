"""Makes ``import tensorflow`` fail in this process, as where it is not installed.

The JAX and PyTorch test processes need no TensorFlow, yet
``keras.utils.set_random_seed`` imports it when it can (seconds of CPU a
process). Used by tests/conftest.py (the JAX and PyTorch suites) and the JAX
worker. A finder, not a ``None`` in ``sys.modules``: code that asks
``"tensorflow" in sys.modules`` (Keras does) must still see it absent.
"""

import importlib.abc
import importlib.machinery
import sys


class _NoTensorFlow(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def __init__(self, where):
        self.where = where

    def find_spec(self, name, path=None, target=None):
        if name == "tensorflow" or name.startswith("tensorflow."):
            return importlib.machinery.ModuleSpec(name, self)  # no origin: no file to point at
        return None

    def create_module(self, spec):
        raise ModuleNotFoundError(f"No module named {spec.name!r}: TensorFlow is not imported in {self.where}",
                                  name=spec.name)

    def exec_module(self, module):  # never reached: create_module raises
        raise ModuleNotFoundError(module.__name__)


def block_tensorflow(where):
    """From now on ``import tensorflow`` raises ``ModuleNotFoundError`` naming ``where``."""
    if "tensorflow" in sys.modules:
        raise RuntimeError(f"TensorFlow is already imported in {where}")
    sys.meta_path.insert(0, _NoTensorFlow(where))
