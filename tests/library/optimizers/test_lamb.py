"""Tests of tf_gradmix.optimizers.LAMB: NumPy reference, keras.optimizers.Lamb,
Keras's own Lamb golden values, configs, training and bad input."""


import keras
import numpy as np
import pytest

from tf_gradmix.optimizers import LAMB

from oracles import assert_float32_close, relative_error, two_dense_layers_variables

# Against the float64 reference: float32 rounding only (oracles.assert_float32_close,
# 32 ulps = 3.8e-6 of the largest weight); measured: at most 1.2e-7 relative.


def numpy_lamb(weights, grads_per_step, lrs, *, beta_1, beta_2, epsilon, weight_decay,
               use_decay, use_adaptation):
    """LAMB (You et al. 2019, tensorflow-addons semantics) in float64."""
    w = [np.array(x, np.float64) for x in weights]
    m = [np.zeros_like(x) for x in w]
    v = [np.zeros_like(x) for x in w]
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for i, g in enumerate(grads):
            g = np.asarray(g, np.float64)
            m[i] = beta_1 * m[i] + (1 - beta_1) * g
            v[i] = beta_2 * v[i] + (1 - beta_2) * g * g
            m_hat = m[i] / (1 - beta_1**t)
            v_hat = v[i] / (1 - beta_2**t)
            decay = weight_decay if use_decay[i] else 0.0
            r = m_hat / (np.sqrt(v_hat) + epsilon) + decay * w[i]
            w_norm, r_norm = np.linalg.norm(w[i]), np.linalg.norm(r)
            trust = w_norm / r_norm if use_adaptation[i] and w_norm > 0 and r_norm > 0 else 1.0
            w[i] = w[i] - lr * trust * r
    return w


def make_grads(variables, steps, seed=1):
    rng = np.random.default_rng(seed)
    grads = [[rng.normal(size=v.shape) for v in variables] for _ in range(steps)]
    grads[0][2] = np.zeros(variables[2].shape)  # zero first gradient: ||r|| = decay*||w||
    grads[1][0] = np.zeros(variables[0].shape)
    return grads


CASES = {
    "bias_excluded": (
        dict(exclude_from_weight_decay=["bias"]),
        [True, False, True, False],
        [True, False, True, False],
    ),
    "separate_lists": (
        dict(exclude_from_weight_decay=["^a/"], exclude_from_layer_adaptation=["b/kernel"]),
        [False, False, True, True],
        [True, True, False, True],
    ),
    "exclude_1d_variables": (
        dict(exclude_1d_variables=True, exclude_from_layer_adaptation=[]),
        [True, False, True, False],
        [True, False, True, False],
    ),
}

HYPER = dict(learning_rate=0.05, beta_1=0.8, beta_2=0.95, epsilon=1e-4, weight_decay=0.05)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(case):
    kwargs, use_decay, use_adaptation = CASES[case]
    variables = two_dense_layers_variables()
    initial = [v.numpy() for v in variables]
    grads = make_grads(variables, steps=5)
    optimizer = LAMB(**HYPER, **kwargs)
    for step_grads in grads:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g, "float32") for g in step_grads], variables))
    assert [optimizer.uses_weight_decay(v) for v in variables] == use_decay
    assert [optimizer.uses_layer_adaptation(v) for v in variables] == use_adaptation
    expected = numpy_lamb(
        initial, grads, [HYPER["learning_rate"]] * len(grads), beta_1=HYPER["beta_1"],
        beta_2=HYPER["beta_2"], epsilon=HYPER["epsilon"], weight_decay=HYPER["weight_decay"],
        use_decay=use_decay, use_adaptation=use_adaptation,
    )
    for variable, reference in zip(variables, expected):
        error = relative_error(variable.numpy(), reference)
        print(f"LAMB {case} {variable.path}: relative error {error:.2e}")
        assert_float32_close(variable.numpy(), reference)


@pytest.mark.backends("tensorflow")
def test_mirrored_strategy_matches_reference(mirrored_strategy):
    import tensorflow as tf

    strategy = mirrored_strategy
    assert strategy.num_replicas_in_sync == 4
    kwargs, use_decay, use_adaptation = CASES["separate_lists"]
    with strategy.scope():
        variables = two_dense_layers_variables()
        optimizer = LAMB(**HYPER, **kwargs)
        optimizer.build(variables)
    initial = [v.numpy() for v in variables]
    grads = make_grads(variables, steps=4)
    share = np.array([0.4, 0.3, 0.2, 0.1])  # Keras sums the replicas' gradients

    @tf.function
    def step(per_replica_grads):
        strategy.run(lambda g: optimizer.apply_gradients(zip(g, variables)),
                     args=(per_replica_grads,))

    for step_grads in grads:
        step(strategy.experimental_distribute_values_from_function(
            lambda ctx, g=step_grads: [
                tf.constant(x * share[ctx.replica_id_in_sync_group], tf.float32) for x in g
            ]
        ))
    expected = numpy_lamb(
        initial, grads, [HYPER["learning_rate"]] * len(grads), beta_1=HYPER["beta_1"],
        beta_2=HYPER["beta_2"], epsilon=HYPER["epsilon"], weight_decay=HYPER["weight_decay"],
        use_decay=use_decay, use_adaptation=use_adaptation,
    )
    for variable, reference in zip(variables, expected):
        for replica_value in strategy.experimental_local_results(variable.value):
            error = relative_error(replica_value.numpy(), reference)
            print(f"LAMB mirrored {variable.path}: relative error {error:.2e}")
            assert_float32_close(variable.numpy(), reference)


# Keras's Lamb forms the bias correction 1 - beta_2^t in float32: rounding
# beta_2^t (half an ulp) changes it by up to (eps/2) / (1 - beta_2) relative
# at t = 1, and the update (through a square root) by a quarter of that:
# 1 / (4 (1 - beta_2)) = 250 ulps of the update at beta_2 = 0.999. Ours
# matches the float64 reference to 0.5 ulps; against Keras 28.5 ulps are
# measured (on b/bias, whose value is its first update).
KERAS_LAMB_ULPS = 256


def test_matches_keras_lamb_step_for_step():
    ours_vars, theirs_vars = two_dense_layers_variables(), two_dense_layers_variables()
    grads = make_grads(ours_vars, steps=6)
    ours = LAMB(learning_rate=0.01, epsilon=1e-7)
    theirs = keras.optimizers.Lamb(learning_rate=0.01, epsilon=1e-7)
    worst = 0.0
    for step_grads in grads:
        tensors = [keras.ops.convert_to_tensor(g, "float32") for g in step_grads]
        ours.apply_gradients(zip(tensors, ours_vars))
        theirs.apply_gradients(zip(tensors, theirs_vars))
        for a, b in zip(ours_vars, theirs_vars):
            assert_float32_close(a.numpy(), b.numpy(), ulps=KERAS_LAMB_ULPS)
            worst = max(worst, float(np.max(np.abs(a.numpy() - b.numpy()))))
    print(f"LAMB vs keras.optimizers.Lamb: max abs difference {worst:.2e}")


# Golden values copied from Keras 3.15.1, keras/src/optimizers/lamb_test.py
# (.venv/lib/python3.11/site-packages/keras/src/optimizers/lamb_test.py).
# Keras's Lamb defaults to epsilon=1e-7, so we pass it.


def test_keras_golden_single_step():
    optimizer = LAMB(learning_rate=0.5, epsilon=1e-7)
    variable = keras.Variable([1.0, 2.0, 3.0, 4.0])
    optimizer.apply_gradients(zip([keras.ops.convert_to_tensor([1.0, 6.0, 7.0, 2.0])], [variable]))
    np.testing.assert_allclose(variable.numpy(), [-0.3693, 0.6306, 1.6306, 2.6306],
                               rtol=1e-4, atol=1e-4)


def test_keras_golden_correctness():
    optimizer = LAMB(epsilon=1e-7)
    x = keras.Variable(np.ones([10], dtype="float32"))
    grads = keras.ops.convert_to_tensor(np.arange(1, 11, dtype="float32") / 10)
    first_grads = keras.ops.full((10,), 0.01)
    golden = np.tile([[0.999], [0.9982], [0.9974], [0.9965], [0.9955]], (1, 10))
    optimizer.apply_gradients(zip([first_grads], [x]))
    for i in range(5):
        np.testing.assert_allclose(x.numpy(), golden[i], rtol=5e-4, atol=5e-4)
        optimizer.apply_gradients(zip([grads], [x]))


def test_keras_golden_weight_decay_exclusions():
    # Keras's test_weight_decay: variables excluded from weight decay (by the
    # base-class method, by name or by variable) keep their value under zero
    # gradients. The decayed value differs by design: Keras's Lamb decays
    # outside the trust ratio (1.9760959); ours is coupled, so with a zero
    # gradient r = decay * w, the trust ratio is ||w|| / ||r|| = 1/decay and
    # the step is lr * w: w -> (1 - lr) w = 0 at lr = 1.
    grads = keras.ops.zeros(())
    var1, var2, var3 = (keras.Variable(2.0), keras.Variable(2.0, name="exclude"),
                        keras.Variable(2.0))
    optimizer_1 = LAMB(learning_rate=1.0, weight_decay=0.004)
    optimizer_1.apply_gradients(zip([grads], [var1]))
    optimizer_2 = LAMB(learning_rate=1.0, weight_decay=0.004)
    optimizer_2.exclude_from_weight_decay(var_names=["exclude"])
    optimizer_2.apply_gradients(zip([grads, grads], [var1, var2]))
    optimizer_3 = LAMB(learning_rate=1.0, weight_decay=0.004)
    optimizer_3.exclude_from_weight_decay(var_list=[var3])
    optimizer_3.apply_gradients(zip([grads, grads], [var1, var3]))
    assert var2.numpy() == pytest.approx(2.0, abs=1e-6)
    assert var3.numpy() == pytest.approx(2.0, abs=1e-6)
    assert var1.numpy() == pytest.approx(0.0, abs=1e-6)
    # The same exclusions through our argument (a regex on the path).
    var4 = keras.Variable(2.0, name="exclude_me")
    optimizer_4 = LAMB(learning_rate=1.0, weight_decay=0.004,
                       exclude_from_weight_decay=["exclude"])
    optimizer_4.apply_gradients(zip([grads], [var4]))
    assert var4.numpy() == pytest.approx(2.0, abs=1e-6)


def test_keras_golden_clipping():
    optimizer = LAMB(clipnorm=1)
    clipped = optimizer._clip_gradients([np.array([100.0, 100.0])])
    np.testing.assert_allclose(clipped[0], [2**0.5 / 2, 2**0.5 / 2])
    optimizer = LAMB(clipvalue=1)
    clipped = optimizer._clip_gradients([np.array([100.0, 100.0])])
    np.testing.assert_allclose(clipped[0], [1.0, 1.0])
