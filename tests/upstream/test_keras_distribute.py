"""Upstream Keras fails under a tf.distribute strategy: plain Keras, no tf_gradmix.

Each test asserts that a known upstream bug still happens. When one fails,
upstream fixed the bug: drop or narrow the compatibility code it names.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

pytestmark = pytest.mark.backends("tensorflow")

LR = 0.1


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = (np.sin(x).sum(1, keepdims=True) + 0.1 * rng.normal(size=(24, 1))).astype("float32")
    return x, y


def test_stock_gradient_accumulation_still_fails_under_a_strategy(mirrored_strategy, data):
    """keras-team/keras#20582: `BaseOptimizer.apply` wraps the cross-replica
    update in `ops.cond`, and tf.distribute forbids a `merge_call` inside a
    cond. Guards ``tf_gradmix/backend/tensorflow/optimizer.py`` (GradientMix accumulates
    across replicas itself). When this fails, upstream fixed it: revisit that
    module and test stock accumulation under a strategy."""
    x, y = data
    with mirrored_strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(LR, gradient_accumulation_steps=3), "mse")
    ds = tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(8)
    with pytest.raises(RuntimeError, match="merge_call"):
        model.fit(ds, epochs=1, verbose=0)


def test_stock_steps_per_execution_still_fails_under_a_strategy(mirrored_strategy, data):
    """keras-team/keras#19246: ``steps_per_execution > 1`` under
    MirroredStrategy fails in graph construction. No compatibility code: the
    limitation is documented in docs/distributed.md ("Limitation"). When this
    fails, upstream fixed it: drop the limitation and test GradientMix with it."""
    x, y = data
    with mirrored_strategy.scope():
        model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(LR), "mse", steps_per_execution=2)
    ds = tf.data.Dataset.from_tensor_slices((x[:24], y[:24])).batch(8)
    with pytest.raises(Exception, match="You must feed a value for placeholder tensor"):
        model.fit(ds, epochs=1, verbose=0)
