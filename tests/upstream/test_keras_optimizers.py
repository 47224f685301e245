"""What upstream Keras optimizers still lack, which ``tf_gradmix.optimizers`` adds.

When a test fails, Keras caught up: revise README.md and docs/optimizers.md.
"""

import keras


def test_keras_still_lacks_what_these_optimizers_add():
    """Keras 3 has no LARS, and its Lamb cannot exclude variables from layer
    adaptation (no upstream issue: absent features). Guards the reason
    ``tf_gradmix/optimizers/`` (lars.py, lamb.py) exists, as README.md and
    docs/optimizers.md state it."""
    import inspect

    assert not hasattr(keras.optimizers, "LARS") and not hasattr(keras.optimizers, "Lars")
    lamb_args = inspect.signature(keras.optimizers.Lamb).parameters
    assert not any("adaptation" in name for name in lamb_args), list(lamb_args)
