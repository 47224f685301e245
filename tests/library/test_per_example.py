"""Tests of tf_gradmix.per_example: per-example gradients, checked against a
``GradientTape`` loop over the examples (1e-5 absolute). The exact mixing
mode built on them is tested in test_exact.py.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_gradmix import per_example

from oracles import build_model, cnn, data, mlp

pytestmark = pytest.mark.backends("tensorflow")

# -- per-example gradients ----------------------------------------------------------


@pytest.mark.parametrize("builder,shape", [(mlp, (5,)), (cnn, (6, 6, 2))])
def test_per_example_gradients_match_gradient_tape_loop(builder, shape):
    model = build_model(builder)
    x, y = data(8, shape)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    grads = per_example.per_example_gradients(model, x, y, loss)
    assert [tuple(g.shape) for g in grads] == [(8,) + tuple(v.shape) for v in model.trainable_variables]
    worst = 0.0
    for i in range(8):
        with tf.GradientTape() as tape:
            value = loss(y[i : i + 1], model(x[i : i + 1], training=True))
        expected = tape.gradient(value, model.trainable_variables)
        for g, e in zip(grads, expected):
            worst = max(worst, float(np.max(np.abs(g[i].numpy() - e.numpy()))))
    assert worst <= 1e-5, worst


def test_per_example_gradients_refuse_batchnorm_and_random_layers():
    x, y = data(4, (6, 6, 2))
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    bn = build_model(cnn, batchnorm=True)
    with pytest.raises(ValueError, match="BatchNormalization"):
        per_example.per_example_gradients(bn, x, y, loss)
    nested = keras.Sequential([keras.Input((6, 6, 2)), bn])
    with pytest.raises(ValueError, match="BatchNormalization"):
        per_example.per_example_gradients(nested, x, y, loss)
    # In inference mode BatchNorm does not couple examples.
    assert len(per_example.per_example_gradients(bn, x, y, loss, training=False)) == 6
    dropout = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), keras.layers.Dropout(0.5), keras.layers.Dense(3)]
    )
    with pytest.raises(ValueError, match="random mask"):
        per_example.per_example_gradients(dropout, *data(4), loss)
