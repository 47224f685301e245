"""The exact mixing mode (``tf_gradmix.exact.train_step``): mix materialised
per-example gradients, checked against the reweighting path of
:class:`tf_gradmix.Model` (1e-5 absolute on the weights after 3 steps).
"""

import keras
import numpy as np
import pytest

import tf_gradmix as gm
from tf_gradmix import exact

from oracles import data, mlp

pytestmark = pytest.mark.backends("tensorflow")


class PerExampleModel(keras.Model):
    def train_step(self, data):
        return exact.train_step(self, data)


class PerExampleGMModel(gm.Model):
    def train_step(self, data):
        return exact.train_step(self, data)


def _fit(model, optimizer, loss, x, y, sample_weight=None, epochs=1, batch_size=8):
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])
    history = model.fit(
        x, y, sample_weight=sample_weight, batch_size=batch_size, epochs=epochs,
        shuffle=False, verbose=0,
    )
    return history.history, model.get_weights()


def _max_diff(a, b):
    return max(float(np.max(np.abs(u - v))) for u, v in zip(a, b))


@pytest.mark.parametrize("activation", [None, "softmax"])
def test_per_example_train_step_equals_reweighting(activation):
    """3 steps with sample weights and an L2 regulariser; logits and softmax outputs."""
    x, y = data(24)
    sw = np.random.default_rng(2).uniform(0.2, 2.0, 24).astype(np.float32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=activation is None)

    def mixer():
        return gm.GradientMix(keras.optimizers.SGD(0.5), stddev=1.0, seed=7)

    def run(model_class, optimizer):
        keras.utils.set_random_seed(0)
        model = mlp(activation, regularizer=keras.regularizers.L2(0.01), model_class=model_class)
        return _fit(model, optimizer, loss, x, y, sample_weight=sw)

    logs_ref, w_ref = run(gm.Model, mixer())  # the reweighting path
    logs_pe, w_pe = run(PerExampleModel, mixer())
    assert _max_diff(w_pe, w_ref) <= 1e-5
    np.testing.assert_allclose(logs_pe["loss"], logs_ref["loss"], rtol=1e-5)
    if activation is not None:
        return
    # A model with the sample-level hook is mixed once, not twice.
    logs_gm, w_gm = run(PerExampleGMModel, mixer())
    assert _max_diff(w_gm, w_ref) <= 1e-5
    np.testing.assert_allclose(logs_gm["gradmix_gamma"], logs_ref["gradmix_gamma"], rtol=1e-6)
    # With a plain optimizer it is plain averaging.
    _, w_plain = run(keras.Model, keras.optimizers.SGD(0.5))
    _, w_pe_plain = run(PerExampleModel, keras.optimizers.SGD(0.5))
    assert _max_diff(w_pe_plain, w_plain) <= 1e-5
    assert _max_diff(w_pe, w_plain) > 1e-3  # the mixing did something


@pytest.mark.slow
def test_per_example_train_step_mirrored(mirrored_strategy):
    x, y = data(32)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)

    def run(model_class):
        with mirrored_strategy.scope():
            keras.utils.set_random_seed(0)
            model = mlp(model_class=model_class)
            optimizer = gm.GradientMix(keras.optimizers.SGD(0.5), stddev=1.0, seed=3)
        return _fit(model, optimizer, loss, x, y, batch_size=16)

    logs_ref, w_ref = run(gm.Model)
    logs_pe, w_pe = run(PerExampleModel)
    assert _max_diff(w_pe, w_ref) <= 1e-5
    np.testing.assert_allclose(logs_pe["loss"], logs_ref["loss"], rtol=1e-5)


def test_per_example_train_step_refuses_batchnorm():
    inputs = keras.Input((5,))
    h = keras.layers.BatchNormalization()(keras.layers.Dense(4)(inputs))
    model = PerExampleModel(inputs, keras.layers.Dense(3)(h))
    model.compile(optimizer="sgd", loss="mse")
    with pytest.raises(ValueError, match="BatchNormalization"):
        model.fit(np.zeros((4, 5)), np.zeros((4, 3)), verbose=0)
