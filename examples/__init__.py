"""Runnable examples of tf_gradmix, and the code they share.

A package, so the examples import their shared code (``examples.cifar10``,
``examples.resnet``, ``examples.threads``, ...) without editing ``sys.path``.
Run them from the repository root as modules: ``python -m examples.demo``,
``python -m examples.cifar_train --quick``.
"""
