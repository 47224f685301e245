"""Tests of tf_gradmix.optimizers.LARS against a float64 NumPy reference."""


import keras
import numpy as np
import pytest

from tf_gradmix import schedules
from tf_gradmix.optimizers import LARS

from oracles import assert_float32_close, relative_error, two_dense_layers_variables

# Against the float64 reference: float32 rounding only (oracles.assert_float32_close,
# 32 ulps = 3.8e-6 of the largest weight); measured: at most 1.2e-7 relative.


def numpy_lars(weights, grads_per_step, lrs, *, momentum, nesterov, weight_decay,
               trust_coefficient, epsilon, use_decay, use_adaptation):
    """The MLPerf LARS rule in float64, written from the issue's formulas."""
    w = [np.array(x, np.float64) for x in weights]
    v = [np.zeros_like(x) for x in w]
    for grads, lr in zip(grads_per_step, lrs):
        for i, g in enumerate(grads):
            g = np.asarray(g, np.float64)
            decay = weight_decay if use_decay[i] else 0.0
            w_norm, g_norm = np.linalg.norm(w[i]), np.linalg.norm(g)
            if use_adaptation[i] and w_norm > 0 and g_norm > 0:
                trust = trust_coefficient * w_norm / (g_norm + decay * w_norm + epsilon)
            else:
                trust = 1.0
            u = g + decay * w[i]
            v[i] = momentum * v[i] + lr * trust * u
            if nesterov:
                w[i] = w[i] - (momentum * v[i] + lr * trust * u)
            else:
                w[i] = w[i] - v[i]
    return w


def make_grads(variables, steps, seed=1):
    rng = np.random.default_rng(seed)
    grads = [[rng.normal(size=v.shape) for v in variables] for _ in range(steps)]
    grads[1][2] = np.zeros(variables[2].shape)  # a zero gradient (trust ratio 1)
    return grads


# (optimizer kwargs, expected use_decay, expected use_adaptation) for
# variables [a/kernel, a/bias, b/kernel, b/bias].
CASES = {
    "bias_excluded": (
        dict(nesterov=False, exclude_from_weight_decay=["bias"]),
        [True, False, True, False],
        [True, False, True, False],
    ),
    "nesterov_separate_lists": (
        dict(nesterov=True, exclude_from_weight_decay=["^a/"],
             exclude_from_layer_adaptation=["b/kernel"]),
        [False, False, True, True],
        [True, True, False, True],
    ),
    "empty_adaptation_list": (
        dict(exclude_from_weight_decay=["bias"], exclude_from_layer_adaptation=[]),
        [True, False, True, False],
        [True, True, True, True],
    ),
    "exclude_1d_variables": (
        dict(nesterov=True, exclude_1d_variables=True),
        [True, False, True, False],
        [True, False, True, False],
    ),
}

HYPER = dict(learning_rate=0.5, momentum=0.9, weight_decay=0.01,
             trust_coefficient=0.02, epsilon=1e-3)


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_numpy_reference(case):
    kwargs, use_decay, use_adaptation = CASES[case]
    variables = two_dense_layers_variables()
    initial = [v.numpy() for v in variables]
    grads = make_grads(variables, steps=5)
    optimizer = LARS(**HYPER, **kwargs)
    for step_grads in grads:
        optimizer.apply_gradients(
            zip([keras.ops.convert_to_tensor(g, "float32") for g in step_grads], variables)
        )
    assert [optimizer.uses_weight_decay(v) for v in variables] == use_decay
    assert [optimizer.uses_layer_adaptation(v) for v in variables] == use_adaptation
    expected = numpy_lars(
        initial, grads, [HYPER["learning_rate"]] * len(grads),
        momentum=HYPER["momentum"], nesterov=kwargs.get("nesterov", False),
        weight_decay=HYPER["weight_decay"],
        trust_coefficient=HYPER["trust_coefficient"], epsilon=HYPER["epsilon"],
        use_decay=use_decay, use_adaptation=use_adaptation,
    )
    for variable, reference in zip(variables, expected):
        error = relative_error(variable.numpy(), reference)
        print(f"LARS {case} {variable.path}: relative error {error:.2e}")
        assert_float32_close(variable.numpy(), reference)


def test_schedule_learning_rate_matches_reference():
    schedule = schedules.PolynomialWarmupDecay(1.0, total_steps=6, warmup_steps=2)
    variables = two_dense_layers_variables()
    initial = [v.numpy() for v in variables]
    grads = make_grads(variables, steps=5)
    optimizer = LARS(schedule, weight_decay=0.01, trust_coefficient=0.02,
                     exclude_1d_variables=True)
    for step_grads in grads:
        optimizer.apply_gradients(zip([keras.ops.convert_to_tensor(g, "float32") for g in step_grads],
                                      variables))
    lrs = [float(schedule(t)) for t in range(5)]
    expected = numpy_lars(initial, grads, lrs, momentum=0.9, nesterov=False,
                          weight_decay=0.01, trust_coefficient=0.02, epsilon=0.0,
                          use_decay=[True, False, True, False],
                          use_adaptation=[True, False, True, False])
    for variable, reference in zip(variables, expected):
        assert_float32_close(variable.numpy(), reference)


@pytest.mark.backends("tensorflow")
def test_mirrored_strategy_matches_reference(mirrored_strategy):
    import tensorflow as tf

    strategy = mirrored_strategy
    replicas = strategy.num_replicas_in_sync
    assert replicas == 4
    kwargs, use_decay, use_adaptation = CASES["nesterov_separate_lists"]
    with strategy.scope():
        variables = two_dense_layers_variables()
        optimizer = LARS(**HYPER, **kwargs)
        optimizer.build(variables)
    initial = [v.numpy() for v in variables]
    grads = make_grads(variables, steps=4)
    # Keras sums the replicas' gradients: replica k gets share[k] of the
    # total, so the all-reduced gradient is the reference gradient.
    share = np.array([0.1, 0.2, 0.3, 0.4])

    @tf.function
    def step(per_replica_grads):
        def replica_fn(replica_grads):
            optimizer.apply_gradients(zip(replica_grads, variables))

        strategy.run(replica_fn, args=(per_replica_grads,))

    for step_grads in grads:
        per_replica = strategy.experimental_distribute_values_from_function(
            lambda ctx, g=step_grads: [
                tf.constant(x * share[ctx.replica_id_in_sync_group], tf.float32) for x in g
            ]
        )
        step(per_replica)
    expected = numpy_lars(
        initial, grads, [HYPER["learning_rate"]] * len(grads),
        momentum=HYPER["momentum"], nesterov=True, weight_decay=HYPER["weight_decay"],
        trust_coefficient=HYPER["trust_coefficient"], epsilon=HYPER["epsilon"],
        use_decay=use_decay, use_adaptation=use_adaptation,
    )
    for variable, reference in zip(variables, expected):
        for replica_value in strategy.experimental_local_results(variable.value):
            error = relative_error(replica_value.numpy(), reference)
            print(f"LARS mirrored {variable.path}: relative error {error:.2e}")
            assert_float32_close(variable.numpy(), reference)


def test_base_class_decay_is_never_applied_and_its_method_still_works():
    variables = two_dense_layers_variables()
    optimizer = LARS(learning_rate=0.1, weight_decay=0.5)
    # The base-class method is not shadowed by the constructor argument.
    assert callable(optimizer.exclude_from_weight_decay)
    optimizer.exclude_from_weight_decay(var_names=["^b$"])  # Keras matches `name`
    optimizer.build(variables)
    assert [optimizer.uses_weight_decay(v) for v in variables] == [True, True, True, True]
    optimizer = LARS(learning_rate=0.1, weight_decay=0.5)
    optimizer.exclude_from_weight_decay(var_list=[variables[0]])
    optimizer.build(variables)
    assert [optimizer.uses_weight_decay(v) for v in variables] == [False, True, True, True]
    # Zero gradients, excluded from adaptation: only the coupled decay acts,
    # once: w <- w - lr * wd * w (no decoupled decay on top).
    optimizer = LARS(learning_rate=0.1, momentum=0.0, weight_decay=0.5,
                     exclude_from_layer_adaptation=[".*"])
    before = variables[0].numpy().astype(np.float64)
    optimizer.apply_gradients(zip([keras.ops.zeros(v.shape) for v in variables], variables))
    np.testing.assert_allclose(variables[0].numpy(), before * (1 - 0.1 * 0.5), rtol=1e-6)
