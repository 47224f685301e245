"""Tests of tf_gradmix.recipes: recipe data and the gamma_0 helper."""


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
    warmup = schedules.inverse_sqrt_warmup_steps(32768)
    assert warmup == 8 and schedules.inverse_sqrt_warmup_steps(64) == 4000
    LAMB(schedules.InverseSqrtWarmup(lamb["peak_learning_rate"], warmup))
    with pytest.raises(ValueError, match="no setting"):
        recipe.replace(learning_rat=1.0)
    with pytest.raises(ValueError, match="`batch_size`"):
        schedules.inverse_sqrt_warmup_steps(0)
    # A noise-equivalent batch instead of the default stddev.
    assert noise.stddev_for_noise_batch_size(32768, 4096) == pytest.approx(np.sqrt(7))
