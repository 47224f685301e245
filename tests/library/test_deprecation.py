"""Tests of tf_gradmix.deprecation: old names warn, name the replacement and the removal version."""

import re
import warnings

import pytest

import tf_gradmix as gm
from tf_gradmix import deprecation, exact, per_example, residual, schedules

pytestmark = pytest.mark.backends("tensorflow")  # the old names live in TensorFlow-only modules

OLD_NAMES = [
    (gm.recipes, "inverse_sqrt_warmup_steps", schedules.inverse_sqrt_warmup_steps,
     "tf_gradmix.schedules.inverse_sqrt_warmup_steps"),
    (gm.recipes, "residual_batch_norms", residual.residual_batch_norms, "tf_gradmix.residual.residual_batch_norms"),
    (gm.recipes, "set_residual_gamma", residual.set_residual_gamma, "tf_gradmix.residual.set_residual_gamma"),
    (gm.diagnostics, "per_example_gradients", per_example.per_example_gradients,
     "tf_gradmix.per_example.per_example_gradients"),
    (gm.diagnostics, "check_per_example_safe", per_example.check_per_example_safe,
     "tf_gradmix.per_example.check_per_example_safe"),
    (gm.diagnostics, "per_example_train_step", exact.train_step, "tf_gradmix.exact.train_step"),
    (per_example, "train_step", exact.train_step, "tf_gradmix.exact.train_step"),
]


@pytest.mark.parametrize("module, old, new, path", OLD_NAMES, ids=[f"{m.__name__}.{o}" for m, o, _, _ in OLD_NAMES])
def test_an_old_name_warns_and_returns_the_new_object(module, old, new, path):
    with pytest.warns(DeprecationWarning) as record:
        found = getattr(module, old)
    assert found is new
    message = str(record[0].message)
    assert f"{module.__name__}.{old} is deprecated" in message
    assert "removed in tf_gradmix 0.2.0" in message and path in message
    # The warning points at the caller, not at the helper.
    assert record[0].filename == __file__
    # Old names are not advertised.
    assert old not in module.__all__


def test_new_names_do_not_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert gm.recipes.CIFAR_SGD["base_batch_size"] == 200
        assert gm.diagnostics.ggn_trace is not None
        assert gm.schedules.inverse_sqrt_warmup_steps(64) == 4000


def test_a_moved_name_raises_and_says_where_it_went():
    with pytest.raises(AttributeError, match=r"moved to tf_gradmix\.callbacks\.DiagnosticsLogger"):
        gm.diagnostics.DiagnosticsLogger  # noqa: B018


def test_an_unknown_name_is_an_ordinary_attribute_error():
    message = "module 'tf_gradmix.recipes' has no attribute 'CIFAR_NESTEROV'"
    with pytest.raises(AttributeError, match=re.escape(message)):
        gm.recipes.CIFAR_NESTEROV  # noqa: B018
    assert not hasattr(gm.diagnostics, "no_such_name")


def test_the_helper_refuses_an_entry_it_cannot_serve():
    with pytest.raises(TypeError, match=r"names\['old'\] must be a Renamed or Moved entry"):
        deprecation.module_getattr("m", {"old": "tf_gradmix.residual.set_residual_gamma"})


def test_the_moved_callback_name_says_where_it_went():
    import tf_gradmix as gm

    with pytest.raises(AttributeError, match=r"moved to tf_gradmix\.callbacks\.DiagnosticsLogger"):
        gm.diagnostics.DiagnosticsLogger  # noqa: B018
    assert gm.DiagnosticsLogger.__module__ == "tf_gradmix.callbacks"
