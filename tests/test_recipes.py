"""Tests of tf_gradmix.recipes: recipe data and the gamma_0 helper."""

import re

import keras
import numpy as np
import pytest

from tf_gradmix import noise, recipes, schedules
from tf_gradmix.optimizer import DEFAULT_STDDEV
from tf_gradmix.optimizers import LAMB, LARS

ALL_RECIPES = [
    recipes.RESNET50_IMAGENET_32K_NESTEROV,
    recipes.RESNET50_IMAGENET_32K_LARS,
    recipes.ADAM_LAMB_INVERSE_SQRT,
    recipes.CIFAR_SGD,
    recipes.CIFAR_LARS,
    recipes.CIFAR_ADAM,
    recipes.CIFAR_LAMB,
]
SOURCE_KINDS = ("GradientMix paper", "not the paper", "ours", "derived")


@pytest.mark.parametrize("recipe", ALL_RECIPES, ids=lambda r: r.name)
def test_every_value_says_where_it_comes_from(recipe):
    for key in recipe.keys():
        source = recipe.source(key)
        assert source.startswith(SOURCE_KINDS), (key, source)
        if recipe[key] is None:
            assert "not available" in source, (key, source)
    # The paper gives no mixing stddev: ours, said so.
    assert recipe["mixing_stddev"] == DEFAULT_STDDEV == 1.0
    assert recipe.source("mixing_stddev").startswith("ours")
    assert "stddev_for_noise_batch_size" in recipe.source("mixing_stddev")
    assert recipe.missing() == [k for k in recipe.keys() if recipe[k] is None]


def test_cifar_recipes_hold_section_5_1():
    for recipe in (recipes.CIFAR_SGD, recipes.CIFAR_LARS):
        assert recipe["base_learning_rate"] == 0.1 and recipe["base_batch_size"] == 200
    for recipe in (recipes.CIFAR_ADAM, recipes.CIFAR_LAMB):
        assert recipe["base_learning_rate"] == 1e-3 and recipe["base_batch_size"] == 200
    for recipe in (recipes.CIFAR_SGD, recipes.CIFAR_LARS, recipes.CIFAR_ADAM, recipes.CIFAR_LAMB):
        assert (recipe["epochs"], recipe["warmup_epochs"]) == (200, 20)
        assert recipe.source("epochs").startswith("GradientMix paper §5.1")
    assert recipes.CIFAR_LARS["trust_coefficient"] == 1e-3


def test_imagenet_recipes_are_consistent():
    lars = recipes.RESNET50_IMAGENET_32K_LARS
    assert lars["batch_size"] == 32768
    assert lars["total_steps"] == int(np.ceil(lars["epochs"] * 1281167 / 32768))
    assert lars["warmup_steps"] == int(np.ceil(lars["warmup_epochs"] * 1281167 / 32768))
    assert lars["bn_momentum"] == 0.9
    assert "gamma_0" in lars.missing()
    nesterov = recipes.RESNET50_IMAGENET_32K_NESTEROV
    assert nesterov["nesterov"] is True
    assert nesterov["peak_learning_rate"] == pytest.approx(schedules.scaled_learning_rate(0.1, 256, 32768))


def test_a_recipe_builds_the_optimizer_and_schedule():
    recipe = recipes.RESNET50_IMAGENET_32K_LARS
    schedule = schedules.PolynomialWarmupDecay(
        **{k: recipe[k] for k in ("total_steps", "warmup_steps", "initial_learning_rate",
                                   "end_learning_rate", "warmup_power", "decay_power")},
        peak_learning_rate=recipe["peak_learning_rate"],
    )
    optimizer = LARS(schedule, **{k: recipe[k] for k in (
        "momentum", "nesterov", "weight_decay", "trust_coefficient", "epsilon",
        "exclude_1d_variables")})
    assert optimizer.get_config()["exclude_1d_variables"] is True
    lamb = recipes.ADAM_LAMB_INVERSE_SQRT.replace(peak_learning_rate=1e-3)
    assert lamb.source("peak_learning_rate") == "user override"
    warmup = recipes.inverse_sqrt_warmup_steps(32768)
    assert warmup == 8 and recipes.inverse_sqrt_warmup_steps(64) == 4000
    LAMB(schedules.InverseSqrtWarmup(lamb["peak_learning_rate"], warmup))
    with pytest.raises(ValueError, match="no setting"):
        recipe.replace(learning_rat=1.0)
    with pytest.raises(ValueError, match="`batch_size`"):
        recipes.inverse_sqrt_warmup_steps(0)
    # A noise-equivalent batch instead of the default stddev.
    assert noise.stddev_for_noise_batch_size(32768, 4096) == pytest.approx(np.sqrt(7))


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
    layers = recipes.set_residual_gamma(model, 0.25)
    expected = [f"conv{s}_block{b}_2_bn" for s in (2, 3, 4) for b in (1, 2)]
    assert [layer.name for layer in layers] == expected
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            value = 0.25 if layer.name in expected else 1.0
            np.testing.assert_array_equal(layer.gamma.numpy(), value)
    # Found inside a nested model too.
    outer = keras.Sequential([keras.Input((16, 16, 3)), small_resnet()])
    assert len(recipes.residual_batch_norms(outer)) == 6


def test_gamma_0_on_keras_applications_resnet50():
    model = keras.applications.ResNet50(weights=None, input_shape=(32, 32, 3), classes=10)
    layers = recipes.set_residual_gamma(model, 0.0)
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
        recipes.set_residual_gamma(plain, 0.0)
    with pytest.raises(ValueError, match="`gamma_0`"):
        recipes.set_residual_gamma(small_resnet(), float("nan"))
