"""The contract LARS and LAMB share (tf_gradmix.optimizers.layerwise), tested once for both.

Configs and ``.keras`` files keep every argument; both train under
GradientMix with a schedule (also with XLA); bad input fails at once naming
the argument; the legacy ``decay`` and tensor learning rates are refused
with advice; zero weights and zero gradients never give NaN.
"""

import os

import keras
import numpy as np
import pytest

import tf_gradmix as gm
from tf_gradmix import schedules
from tf_gradmix.optimizers import LAMB, LARS

from oracles import two_dense_layers_variables

FULL_CONFIGS = {
    LARS: dict(
        learning_rate=0.25, momentum=0.8, nesterov=True, weight_decay=1e-4,
        trust_coefficient=0.002, epsilon=1e-9, exclude_from_weight_decay=["bias", "bn"],
        exclude_from_layer_adaptation=["norm"], name="my_lars", exclude_1d_variables=True,
        clipnorm=1.0,
    ),
    LAMB: dict(
        learning_rate=0.003, beta_1=0.85, beta_2=0.99, epsilon=1e-8, weight_decay=0.01,
        exclude_from_weight_decay=["bias", "layer_norm"], exclude_from_layer_adaptation=[],
        name="my_lamb", exclude_1d_variables=True, global_clipnorm=1.0,
    ),
}

# Settings that train the toy problem in 40 steps.
TRAINING = {
    LARS: dict(peak=1.0, kwargs=dict(momentum=0.9, weight_decay=1e-4, trust_coefficient=0.02)),
    LAMB: dict(peak=0.02, kwargs=dict(weight_decay=1e-4)),
}

OPTIMIZERS = [LARS, LAMB]


def ids(optimizer_class):
    return optimizer_class.__name__


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=ids)
def test_config_round_trip_keeps_every_argument(optimizer_class):
    full = FULL_CONFIGS[optimizer_class]
    config = optimizer_class(**full).get_config()
    for key, value in full.items():
        assert config[key] == pytest.approx(value) if isinstance(value, float) else config[key] == value, key
    restored = optimizer_class.from_config(config)
    assert isinstance(restored, optimizer_class)
    assert restored.get_config() == config
    # `None` (= same as weight decay) and `[]` (= exclude nothing) stay apart.
    for adaptation in (None, []):
        config = optimizer_class(exclude_from_layer_adaptation=adaptation).get_config()
        assert optimizer_class.from_config(config).layer_adaptation_exclusions == adaptation
    # Through Keras's generic (de)serialization, with a schedule.
    schedule = schedules.PolynomialWarmupDecay(2.0, total_steps=10, warmup_steps=3)
    optimizer = optimizer_class(schedule, **{k: v for k, v in full.items() if k != "learning_rate"})
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(optimizer))
    assert isinstance(restored, optimizer_class)
    assert restored.get_config() == optimizer.get_config()


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=ids)
def test_keras_file_round_trip(optimizer_class, tmp_path):
    model = gm.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="head")])
    inner = optimizer_class(**FULL_CONFIGS[optimizer_class])
    model.compile(optimizer=gm.GradientMix(inner, seed=3), loss="mse")
    model.fit(np.ones((8, 3), "float32"), np.zeros((8, 2), "float32"), epochs=1, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    loaded_inner = keras.models.load_model(path).optimizer.inner_optimizer
    assert isinstance(loaded_inner, optimizer_class)
    assert loaded_inner.get_config() == inner.get_config()
    for a, b in zip(loaded_inner.variables, inner.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("jit_compile", [False, True])
@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=ids)
def test_trains_under_gradient_mix_with_schedule(optimizer_class, jit_compile):
    if jit_compile and keras.backend.backend() == "torch":
        pytest.skip("tf_gradmix refuses jit_compile=True (torch.compile) on PyTorch "
                    "(test_torch.py::test_jit_compile_is_refused_by_name)")
    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(256, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 3))).argmax(axis=1)
    model = gm.Sequential([keras.Input((8,)), keras.layers.Dense(16, activation="relu"),
                           keras.layers.Dense(3)])
    setting = TRAINING[optimizer_class]
    schedule = schedules.PolynomialWarmupDecay(setting["peak"], total_steps=40, warmup_steps=8)
    optimizer = optimizer_class(schedule, exclude_1d_variables=True, **setting["kwargs"])
    model.compile(optimizer=gm.GradientMix(optimizer, seed=0),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  jit_compile=jit_compile)
    losses = model.fit(x, y, batch_size=32, epochs=5, verbose=0, shuffle=False).history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    assert int(optimizer.iterations) == 40


COMMON_BAD_INPUT = [
    (dict(learning_rate=-0.1), "learning_rate"),
    (dict(weight_decay=-1e-4), "weight_decay"),
    (dict(epsilon=-1.0), "epsilon"),
    (dict(epsilon=float("nan")), "epsilon"),
    (dict(exclude_from_weight_decay=["bias("]), "exclude_from_weight_decay"),
    (dict(exclude_from_layer_adaptation=["[bn"]), "exclude_from_layer_adaptation"),
    (dict(exclude_from_weight_decay="bias"), "exclude_from_weight_decay"),
    (dict(exclude_from_weight_decay=[3]), "exclude_from_weight_decay"),
    (dict(exclude_1d_variables=1), "exclude_1d_variables"),
]
BAD_INPUT = [(cls, kwargs, arg) for cls in OPTIMIZERS for kwargs, arg in COMMON_BAD_INPUT] + [
    (LARS, dict(momentum=1.0), "momentum"),
    (LARS, dict(momentum=-0.5), "momentum"),
    (LARS, dict(trust_coefficient=-0.001), "trust_coefficient"),
    (LARS, dict(nesterov="yes"), "nesterov"),
    (LAMB, dict(beta_1=1.0), "beta_1"),
    (LAMB, dict(beta_1=-0.1), "beta_1"),
    (LAMB, dict(beta_2=1.5), "beta_2"),
]


@pytest.mark.parametrize("optimizer_class, kwargs, argument", BAD_INPUT)
def test_bad_input_names_the_argument(optimizer_class, kwargs, argument):
    with pytest.raises(ValueError, match=f"`{argument}`") as error:
        optimizer_class(**kwargs)
    value = next(iter(kwargs.values()))
    shown = value[0] if isinstance(value, list) else value
    assert repr(shown) in str(error.value) or str(shown) in str(error.value)


@pytest.mark.parametrize("optimizer_class", OPTIMIZERS, ids=ids)
def test_legacy_decay_and_tensor_learning_rates_are_refused_with_advice(optimizer_class):
    with pytest.raises(ValueError, match=r"`decay`: 0.01.*InverseTimeDecay"):
        optimizer_class(decay=0.01)
    with pytest.raises(ValueError, match=r"`learning_rate`.*float\(lr\).*lambda: lr"):
        optimizer_class(keras.ops.convert_to_tensor(0.1))
    # The advice works: a callable follows a variable.
    rate = keras.Variable(0.0)
    optimizer = optimizer_class(lambda: rate)
    variable = keras.Variable(np.ones(3, "float32"))
    optimizer.apply([keras.ops.ones(3)], [variable])
    np.testing.assert_array_equal(variable.numpy(), np.ones(3))


@pytest.mark.parametrize(
    "optimizer_class, epsilon",
    [(LARS, 0.0), (LAMB, 1e-7)],  # the smallest epsilon each accepts at 0 / TFA's 1e-7
    ids=["LARS", "LAMB"],
)
def test_zero_weights_and_zero_gradients_never_give_nan(optimizer_class, epsilon):
    # b/bias starts at zero (||w|| = 0); the gradients of a/bias are zero.
    variables = two_dense_layers_variables()
    optimizer = optimizer_class(learning_rate=0.1, epsilon=epsilon, weight_decay=0.01)
    for _ in range(3):
        grads = [keras.ops.ones(v.shape) for v in variables]
        grads[1] = keras.ops.zeros(variables[1].shape)
        optimizer.apply(grads, variables)
    for variable in variables:
        assert np.all(np.isfinite(variable.numpy())), variable.path


def test_lamb_refuses_epsilon_zero_instead_of_nan():
    with pytest.raises(ValueError, match=r"`epsilon`: 0.0.*NaN.*epsilon=1e-7"):
        LAMB(epsilon=0.0)
