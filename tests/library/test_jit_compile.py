"""``fit`` with ``jit_compile=True`` (XLA) on one device, against the oracles.

A TPU compiles every training step with XLA, and Keras compiles with XLA by
default wherever an accelerator is present (``jit_compile="auto"``), while on
a CPU-only machine it does not: these tests make XLA explicit. Each checks the
updates of real ``fit`` steps with ``SGD(1.0)`` (the update is the gradient)
against the float64 per-example loop of ``oracles.py``, using the weights
``example_weights`` / ``device_weights`` return eagerly for each step (the
noise stream computes the same bits under XLA, ``test_random.py``), so a step
whose noise XLA froze, repeated or dropped, or a weight applied to the wrong
example, fails.

Under ``MirroredStrategy`` on logical CPU devices, stock Keras fails with
``jit_compile=True`` before any GradientMix code runs ("Trying to access
resource ... located in device CPU:1 from device CPU:0"), so only one device
is tested here.
"""

import warnings

import keras
import numpy as np
import pytest

import tf_gradmix as gm

from oracles import (
    SCCE,
    assert_float32_close,
    data,
    flat,
    functional,
    mean_gradient,
    mixer,
    per_example_gradients,
    plain_copy,
    regularization_gradient,
    weights_of,
)

# XLA through tf.function(jit_compile=True) is TensorFlow's.
pytestmark = pytest.mark.backends("tensorflow")

B = 16
STEPS = 3
LOSS = keras.losses.SparseCategoricalCrossentropy()


SINGLE_REPLICA = "GradientMix\\(level='device'\\) on a single replica"


def eager_example_weights(opt, step):
    """``w`` of the sample level at ``step``, drawn eagerly."""
    return opt.example_weights(B, step=step, replica_id=0).numpy().astype(np.float64)


def eager_device_weight(opt, step):
    """``w_0`` of the device level (one replica) at ``step``, drawn eagerly."""
    return float(opt.device_weights(1, step=step).numpy()[0])


def compiled(model_class, optimizer, regularizer=True):
    model = functional(model_class, regularizer=regularizer)
    model.compile(optimizer=optimizer, loss=SCCE, jit_compile=True)
    return model


def test_sample_level_steps_equal_the_per_example_mix():
    x, y = data(B * STEPS)
    opt = mixer("gaussian", stddev=0.9)
    model = compiled(gm.Model, opt)
    assert model.jit_compile is True
    ref = plain_copy(model)
    for step in range(STEPS):  # one fit call a step: the oracle needs the weights before each
        part = slice(step * B, (step + 1) * B)
        ref.set_weights(model.get_weights())
        before = flat(weights_of(model))
        model.fit(x[part], y[part], batch_size=B, epochs=1, shuffle=False, verbose=0)
        update = before - flat(weights_of(model))

        grads = per_example_gradients(ref, x[part], y[part], LOSS)
        w = eager_example_weights(opt, step)
        assert_float32_close(update, grads.T @ (w / B) + regularization_gradient(ref, x[part]))
    assert int(opt.raw_step.numpy()) == STEPS


def test_device_level_steps_are_the_weighted_mean_gradient():
    # One replica: g = w_0 * g_0, the whole mean gradient scaled by the step's weight.
    x, y = data(B * STEPS)
    opt = mixer("gaussian", stddev=0.9, level="device")
    model = compiled(keras.Model, opt, regularizer=False)
    ref = functional(keras.Model, regularizer=False)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", SINGLE_REPLICA, UserWarning)
        for step in range(STEPS):
            part = slice(step * B, (step + 1) * B)
            ref.set_weights(model.get_weights())
            before = flat(weights_of(model))
            model.fit(x[part], y[part], batch_size=B, epochs=1, shuffle=False, verbose=0)
            update = before - flat(weights_of(model))

            w = eager_device_weight(opt, step)
            assert abs(w - 1.0) > 1e-2  # the weight acts
            assert_float32_close(update, w * mean_gradient(ref, x[part], y[part], LOSS))


@pytest.mark.parametrize("level", ["sample", "device"])
def test_gradient_accumulation_draws_fresh_weights_per_micro_batch(level):
    micro_batches = 2
    x, y = data(B * micro_batches)
    inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=micro_batches)
    opt = mixer("gaussian", stddev=0.9, level=level, inner=inner)
    model = compiled(gm.Model if level == "sample" else keras.Model, opt, regularizer=level == "sample")
    ref = plain_copy(model) if level == "sample" else functional(keras.Model, regularizer=False)
    ref.set_weights(model.get_weights())
    before = flat(weights_of(model))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", SINGLE_REPLICA, UserWarning)
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    expected = 0.0
    for step in range(micro_batches):
        part = slice(step * B, (step + 1) * B)
        if level == "sample":
            w = eager_example_weights(opt, step)
            grad = per_example_gradients(ref, x[part], y[part], LOSS).T @ (w / B)
            grad = grad + regularization_gradient(ref, x[part])
        else:
            grad = eager_device_weight(opt, step) * mean_gradient(ref, x[part], y[part], LOSS)
        expected = expected + grad / micro_batches
    assert_float32_close(update, expected)
    assert int(opt.raw_step.numpy()) == micro_batches and int(opt.iterations.numpy()) == 1
