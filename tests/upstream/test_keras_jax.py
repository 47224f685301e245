"""Keras's JAX backend as ``tf_gradmix.backend.jax_accumulation`` finds it.

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
