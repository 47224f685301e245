"""Keras's JAX backend as ``tf_gradmix.backend.jax.optimizer`` finds it.

Keras 3.15's JAX optimizer (``keras/src/backend/jax/optimizer.py``) runs
``gradient_accumulation_steps`` by computing the update on every micro-step
and keeping or dropping it with ``lax.cond`` over the trainable variables,
all optimizer variables and the accumulators, so each micro-step pays an
update (``benchmarks/micro_step_cost.py --optimizers sgd,adam,lamb --stock``).
When this test fails, Keras changed that path: re-measure, and drop the
module if Keras's own accumulating micro-step costs no more than a step
without accumulation.
"""

import keras
import pytest
from jax_steps import conditionals, traced_train_step

from oracles import SCCE, data, functional

pytestmark = pytest.mark.backends("jax")


def test_stock_keras_jax_accumulation_still_selects_with_conditionals():
    x, y = data(16)
    model = functional(keras.Model)
    model.compile(keras.optimizers.Adam(gradient_accumulation_steps=2), SCCE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert conditionals(traced_train_step(model, x, y)) >= 4


def test_keras_jax_train_function_is_still_built_as_tf_gradmix_rebuilds_it():
    """``jax_optimizer.train_function`` builds ``fit``'s train function the
    way Keras 3.15's ``JAXTrainer.make_train_function`` does: ``jax.jit`` of
    ``train_step`` with the state donated and, under a distribution, the
    state's shardings as ``out_shardings`` (``_keras.jax_state_shardings``),
    inside ``_make_function`` (``_keras.jax_step_function``). When this
    fails, compare with Keras's new ``make_train_function``."""
    import inspect

    from keras.src.backend.jax.trainer import JAXTrainer

    source = inspect.getsource(JAXTrainer.make_train_function)
    for fragment in ("donate_argnums=0", "out_shardings = (None, state_shardings)",
                     "self._get_state_sharding_spec()", "self._make_function(train_step)"):
        assert fragment in source, fragment
    assert list(inspect.signature(JAXTrainer._make_function).parameters)[:2] == ["self", "step_function"]
    x, y = data(16)
    model = functional(keras.Model)
    model.compile(keras.optimizers.SGD(), SCCE)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    assert len(model._get_state_sharding_spec()) == 4
