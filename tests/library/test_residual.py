"""Tests of tf_gradmix.residual: the final BatchNorm of residual blocks and gamma_0."""

import re

import keras
import numpy as np
import pytest

from tf_gradmix import residual


def small_resnet():
    """A CIFAR-style functional ResNet named like keras.applications."""

    def conv_bn(x, filters, stride, prefix, relu=True):
        x = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False,
                                name=f"{prefix}_conv")(x)
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{prefix}_bn")(x)
        return keras.layers.Activation("relu", name=f"{prefix}_relu")(x) if relu else x

    inputs = keras.Input((16, 16, 3))
    x = conv_bn(inputs, 8, 1, "conv1")
    for stage, filters in ((2, 8), (3, 16), (4, 32)):
        for block in (1, 2):
            name = f"conv{stage}_block{block}"
            stride = 2 if block == 1 and stage > 2 else 1
            shortcut = x
            if stride != 1:
                shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False,
                                               name=f"{name}_0_conv")(x)
                shortcut = keras.layers.BatchNormalization(name=f"{name}_0_bn")(shortcut)
            y = conv_bn(x, filters, stride, f"{name}_1")
            y = conv_bn(y, filters, 1, f"{name}_2", relu=False)
            x = keras.layers.Add(name=f"{name}_add")([shortcut, y])
            x = keras.layers.Activation("relu", name=f"{name}_out")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(10)(x), name="small_resnet")


def test_gamma_0_on_a_small_functional_resnet():
    model = small_resnet()
    layers = residual.set_residual_gamma(model, 0.25)
    expected = [f"conv{s}_block{b}_2_bn" for s in (2, 3, 4) for b in (1, 2)]
    assert [layer.name for layer in layers] == expected
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            value = 0.25 if layer.name in expected else 1.0
            np.testing.assert_array_equal(layer.gamma.numpy(), value)
    # Found inside a nested model too.
    outer = keras.Sequential([keras.Input((16, 16, 3)), small_resnet()])
    assert len(residual.residual_batch_norms(outer)) == 6


def test_gamma_0_on_keras_applications_resnet50():
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    layers = residual.set_residual_gamma(model, 0.0)
    names = [layer.name for layer in layers]
    assert len(names) == 16  # 3 + 4 + 6 + 3 bottleneck blocks
    assert all(re.fullmatch(r"conv[2-5]_block\d+_3_bn", n) for n in names), names
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            expected = 0.0 if layer.name in names else 1.0
            assert np.all(layer.gamma.numpy() == expected), layer.name
    # Shortcut projections keep gamma = 1.
    assert np.all(model.get_layer("conv2_block1_0_bn").gamma.numpy() == 1.0)


def test_gamma_0_bad_input():
    plain = keras.Sequential([keras.Input((4,)), keras.layers.BatchNormalization(),
                              keras.layers.Dense(2)])
    with pytest.raises(ValueError, match="no residual block"):
        residual.set_residual_gamma(plain, 0.0)
    with pytest.raises(ValueError, match="`gamma_0`"):
        residual.set_residual_gamma(small_resnet(), float("nan"))
