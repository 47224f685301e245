"""The GradientMix wrapper: device level, distribution, config and bad input."""

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
    numpy,
    per_example_gradients,
    plain_copy,
    regularization_gradient,
    relative_error,
    weights_of,
)

if keras.backend.backend() == "tensorflow":  # the tests that use it are marked
    import tensorflow as tf

K = 4  # logical CPU replicas (conftest)


def replica_slices(n, replicas=K):
    size = n // replicas
    return [slice(k * size, (k + 1) * size) for k in range(replicas)]


def fit_one_step(model, x, y, **kwargs):
    before = flat(weights_of(model))
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **kwargs)
    return before - flat(weights_of(model)), history


# -- device level under MirroredStrategy -------------------------------------


@pytest.fixture(scope="module")
def device_level_run(mirrored_strategy):
    """A stock model at the device level (stddev 0.9, seed 2) on the 4
    replicas: 2 epochs of 4 global batches of 16, with ``GammaLogger``.

    Returns the first batch, the reference model's starting weights, the
    first step's update, the optimizer and the history.
    """
    keras.config.set_dtype_policy("float32")
    x, y = data(64)
    with mirrored_strategy.scope():
        model = functional(keras.Model)  # a stock model: the device level needs no hook
        opt = mixer(level="device", stddev=0.9, seed=2)
        model.compile(opt, SCCE)
    start, before, after_first = model.get_weights(), flat(weights_of(model)), []

    def first_step_end(batch, logs):
        if batch == 0 and not after_first:
            after_first.append(flat(weights_of(model)))

    history = model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0,
                        callbacks=[gm.GammaLogger(), keras.callbacks.LambdaCallback(on_train_batch_end=first_step_end)])
    assert int(numpy(opt.raw_step)) == 8
    return dict(x=x[:16], y=y[:16], start=start, update=before - after_first[0], opt=opt, history=history.history)


@pytest.mark.parametrize("wrapping", ["plain", "loss_scale", "mixed_bfloat16"])
@pytest.mark.backends("tensorflow")
def test_device_level_update_is_the_replica_mix(mirrored_strategy, request, wrapping):
    if wrapping == "plain":  # the first step of the shared run
        run = request.getfixturevalue("device_level_run")
        x, y, opt, update = run["x"], run["y"], run["opt"], run["update"]
        ref = functional(keras.Model)
        ref.set_weights(run["start"])
    else:
        if wrapping == "mixed_bfloat16":
            keras.config.set_dtype_policy("mixed_bfloat16")
        x, y = data(16)
        with mirrored_strategy.scope():
            model = functional(keras.Model)  # a stock model: the device level needs no hook
            opt = mixer(level="device", stddev=0.9, seed=2)
            outer = keras.optimizers.LossScaleOptimizer(opt) if wrapping == "loss_scale" else opt
            model.compile(outer, SCCE)
        ref = plain_copy(model)  # same dtype policy
        update, _ = fit_one_step(model, x, y)

    w = numpy(opt.device_weights(K, step=0)).astype(np.float64)
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    per_replica = [
        mean_gradient(ref, x[s], y[s], loss_fn) + regularization_gradient(ref, x[s]) for s in replica_slices(16)
    ]
    expected = sum(w[k] / K * per_replica[k] for k in range(K))
    if wrapping != "mixed_bfloat16":
        assert_float32_close(update, expected)
        assert np.linalg.norm(expected - sum(per_replica) / K) > 0.05 * np.linalg.norm(expected)
    else:
        # bfloat16 activations carry 8 significant bits (relative 2^-9 per
        # rounding), and the distributed step rounds at other points than the
        # reference (the loss is scaled before the backward pass), so compare
        # in norm at 1%: the weights' effect is far larger.
        error = np.linalg.norm(update - expected) / np.linalg.norm(expected)
        effect = np.linalg.norm(expected - sum(per_replica) / K) / np.linalg.norm(expected)
        assert error < 1e-2 and effect > 10 * error, (error, effect)


@pytest.mark.backends("tensorflow")
def test_device_level_bernoulli_keeps_a_random_subset_of_replicas(mirrored_strategy):
    x, y = data(16)
    with mirrored_strategy.scope():
        model = functional(keras.Model)
        opt = mixer("bernoulli", level="device", stddev=1.0, seed=3)
        model.compile(opt, SCCE)
    ref = plain_copy(model)
    update, _ = fit_one_step(model, x, y)

    w = numpy(opt.device_weights(K, step=0)).astype(np.float64)
    assert set(np.unique(w)) <= {0.0, 2.0} and 0 < np.count_nonzero(w) < K  # seed 3: a strict subset
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    per_replica = [
        mean_gradient(ref, x[s], y[s], loss_fn) + regularization_gradient(ref, x[s]) for s in replica_slices(16)
    ]
    assert_float32_close(update, sum(w[k] / K * per_replica[k] for k in range(K)))


@pytest.mark.backends("tensorflow")
def test_sample_level_under_mirrored_strategy_is_the_global_batch_mix(mirrored_strategy):
    x, y = data(16)
    with mirrored_strategy.scope():
        model = functional(gm.Model)
        opt = mixer("gaussian", stddev=0.8, seed=4)
        model.compile(opt, SCCE)
    ref = plain_copy(model)
    update, history = fit_one_step(model, x, y)

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    expected = regularization_gradient(ref, x)
    replica_weights = []
    for k, s in enumerate(replica_slices(16)):
        w_k = numpy(opt.example_weights(4, step=0, replica_id=k))
        replica_weights.append(w_k)
        # Keras averages within a replica and divides by K: pi_b = w_b / (K B_k).
        expected = expected + per_example_gradients(ref, x[s], y[s], loss_fn).T @ w_k / (K * 4)
    assert_float32_close(update, expected)
    # Independent noise on every replica.
    for a in range(K):
        for b in range(a + 1, K):
            assert not np.allclose(replica_weights[a], replica_weights[b])
    gamma = np.mean([np.mean(w**2) for w in replica_weights])
    assert history.history["gradmix_gamma"][0] == pytest.approx(gamma, rel=1e-5)


def replica_gradients(model, x, y):
    """Per-variable gradients (float64) of the replica loss: mean loss + layer losses."""
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    with tf.GradientTape() as tape:
        loss = loss_fn(y, model(x, training=True)) + tf.add_n(model.losses)
    return [numpy(g).astype(np.float64) for g in tape.gradient(loss, model.trainable_variables)]


def clip(grads, kind, limit):
    """Keras's clipping rules in float64: per tensor, or by the global norm."""
    if kind == "clipnorm":
        return [g * limit / max(np.linalg.norm(g), limit) for g in grads]
    norm = np.sqrt(sum(np.sum(g**2) for g in grads))
    return [g * limit / max(norm, limit) for g in grads]


@pytest.mark.parametrize("kind", ["clipnorm", "global_clipnorm"])
@pytest.mark.backends("tensorflow")
def test_inner_clipping_acts_per_replica_after_the_device_weights(mirrored_strategy, kind):
    """The inner optimizer's clipping acts per replica, on that replica's
    gradients, after the device weights (docs/api.md): replica k contributes
    clip(w_k g_k / K)."""
    x, y = data(16)
    with mirrored_strategy.scope():
        model = functional(keras.Model)
    ref = plain_copy(model)
    w = numpy(mixer(level="device", stddev=0.9, seed=2).device_weights(K, step=0)).astype(np.float64)
    replica = [[w[k] * g / K for g in replica_gradients(ref, x[s], y[s])] for k, s in enumerate(replica_slices(16))]
    # A limit that clips some replicas (or tensors) and not others.
    norms = [np.linalg.norm(g) for r in replica for g in r] if kind == "clipnorm" else [
        np.sqrt(sum(np.sum(g**2) for g in r)) for r in replica
    ]
    limit = float(np.median(norms))
    with mirrored_strategy.scope():
        opt = mixer(level="device", stddev=0.9, seed=2, inner=keras.optimizers.SGD(1.0, **{kind: limit}))
        model.compile(opt, SCCE)
    update, _ = fit_one_step(model, x, y)

    expected = flat(sum(np.array(c, dtype=object) for c in (clip(r, kind, limit) for r in replica)))
    assert_float32_close(update, expected)
    # The other orders are far from it: clipping before the weights, or the sum.
    unweighted = [[g / K for g in replica_gradients(ref, x[s], y[s])] for s in replica_slices(16)]
    before = flat(
        sum(np.array([w[k] * g for g in clip(r, kind, limit)], dtype=object) for k, r in enumerate(unweighted))
    )
    summed = flat(clip(list(sum(np.array(r, dtype=object) for r in replica)), kind, limit))
    for other in (before, summed):
        assert relative_error(other, expected) > 0.01


@pytest.mark.backends("tensorflow")
def test_gamma_logger_reports_device_gamma_bar(device_level_run):
    opt, history = device_level_run["opt"], device_level_run["history"]
    assert len(history["gradmix_gamma"]) == 2
    for epoch in range(2):
        steps = range(4 * epoch, 4 * epoch + 4)
        expected = np.mean([np.mean(numpy(opt.device_weights(K, step=s)) ** 2) for s in steps])
        assert history["gradmix_gamma"][epoch] == pytest.approx(expected, rel=1e-6)


@pytest.mark.backends("tensorflow")  # on JAX a stock model is refused (test_jax.py)
def test_device_level_on_a_single_replica_warns():
    x, y = data()
    model = functional(keras.Model)
    model.compile(mixer(level="device"), SCCE)
    with pytest.warns(UserWarning, match="single replica"):
        model.fit(x, y, verbose=0)


# -- any inner optimizer -----------------------------------------------------


INNER = {
    "sgd_nesterov": lambda: keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
    "adam": lambda: keras.optimizers.Adam(1e-2),
    "adamw": lambda: keras.optimizers.AdamW(1e-2, weight_decay=0.1),
    "lamb": lambda: keras.optimizers.Lamb(1e-2),
    "lion": lambda: keras.optimizers.Lion(1e-3),
    "sgd_clip_ema": lambda: keras.optimizers.SGD(0.1, clipnorm=0.5, use_ema=True),
}


@pytest.mark.parametrize("name", sorted(INNER))
@pytest.mark.backends("tensorflow")
def test_wraps_any_keras_optimizer(name):
    x, y = data(32)
    plain = functional(keras.Model)
    plain.compile(INNER[name](), SCCE)
    plain.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    zero = functional(gm.Model)
    zero.compile(mixer(inner=INNER[name](), stddev=0.0), SCCE)
    zero.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), zero.get_weights()):
        np.testing.assert_array_equal(a, b)  # stddev=0 is plain training
    mixed = functional(gm.Model)
    init = flat(weights_of(mixed))
    opt = mixer(inner=INNER[name](), stddev=1.0)
    mixed.compile(opt, SCCE)
    history = mixed.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))

    # Oracle: a fresh inner optimizer fed, step by step, the gradient of the
    # explicitly weighted loss (no GradientMix in the loop).
    ref = functional(keras.Model)
    inner = INNER[name]()
    per_example_loss = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    for step, part in enumerate(replica_slices(32, 2) * 2):
        w = opt.example_weights(16, step=step, replica_id=0)
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(per_example_loss(y[part], ref(x[part], training=True)) * w)
            loss = loss + tf.add_n(ref.losses)
        inner.apply_gradients(zip(tape.gradient(loss, ref.trainable_variables), ref.trainable_variables))
    inner.finalize_variable_values(ref.trainable_variables)  # EMA, as fit does
    # Compared: the weights themselves (each step rounds them to float32, so
    # the error scales with the weights, not with the smaller updates).
    expected = flat(weights_of(ref))
    assert_float32_close(flat(weights_of(mixed)), expected)
    # A wrong weight moves the result by a share of the update: the updates
    # with and without mixing differ by more than 5%.
    plain_update = init - flat(weights_of(plain))
    assert relative_error(plain_update, init - expected) > 0.05


def test_learning_rate_iterations_and_variables_are_forwarded():
    inner = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    opt = mixer(inner=inner)
    model = functional(gm.Model)
    model.compile(opt, SCCE)
    x, y = data(64)
    model.fit(x, y, batch_size=16, epochs=1, verbose=0,
              callbacks=[keras.callbacks.LearningRateScheduler(lambda epoch, lr: 0.05)])
    assert float(numpy(inner.learning_rate)) == pytest.approx(0.05)
    assert float(numpy(opt.learning_rate)) == pytest.approx(0.05)
    assert int(numpy(opt.raw_step)) == 4 and int(numpy(opt.iterations)) == 2
    own = {id(v) for v in opt.variables[: len(opt.variables) - len(inner.variables)]}
    assert id(opt.raw_step) in own
    assert id(opt._seed_variable) in own and opt.seed == 5  # the seed is saved state
    assert [id(v) for v in opt.variables[-len(inner.variables):]] == [id(v) for v in inner.variables]


def test_reduce_lr_on_plateau_reaches_the_inner_optimizer():
    """ReduceLROnPlateau reads and sets ``optimizer.learning_rate``; the
    reduced rate must be the one the inner optimizer updates with."""
    x, y = data(32)

    def run(model, optimizer):
        # min_delta so large that no epoch improves: halve after every epoch
        # but the first (which sets the best value).
        plateau = keras.callbacks.ReduceLROnPlateau(monitor="loss", factor=0.5, patience=0, min_delta=1e9)
        model.compile(optimizer, SCCE)
        return model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=[plateau])

    inner = keras.optimizers.SGD(0.1, momentum=0.9)
    mixed = functional(gm.Model)
    history = run(mixed, mixer(inner=inner, stddev=0.0))
    assert float(numpy(inner.learning_rate)) == pytest.approx(0.025)
    # The rate each epoch ran at; halved at the end of epochs 2 and 3.
    assert history.history["learning_rate"] == pytest.approx([0.1, 0.1, 0.05])
    plain = functional(keras.Model)
    run(plain, keras.optimizers.SGD(0.1, momentum=0.9))
    for a, b in zip(plain.get_weights(), mixed.get_weights()):
        np.testing.assert_array_equal(a, b)  # the same rates were applied


def test_sample_and_device_streams_are_separate():
    """Same seed and step: the two levels' weights are independent draws."""
    opt = mixer(stddev=1.0, seed=31)
    # 16 steps of 64 weights each: the 1024 pairs of 256 steps of 4, in a
    # sixteenth of the eager calls.
    steps, size = 16, 64
    sample = np.stack([numpy(opt.example_weights(size, step=s, replica_id=0)) for s in range(steps)])
    device = np.stack([numpy(opt.device_weights(size, step=s)) for s in range(steps)])
    assert sample.shape == device.shape == (steps, size)
    assert not np.any(sample == device)
    # Independent N(1, 1) pairs: |correlation| < 4 / sqrt(n) (4 standard errors).
    assert abs(np.corrcoef(sample.ravel(), device.ravel())[0, 1]) < 4 / np.sqrt(sample.size)


@pytest.mark.backends("tensorflow")
def test_custom_training_loop_gets_the_same_noise_as_fit():
    x, y = data(32)
    reference = functional(gm.Model)
    reference.compile(mixer(seed=12), SCCE)
    reference.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

    model = functional(keras.Model)
    opt = mixer(seed=12)
    per_example_loss = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    for s in replica_slices(32, 2):
        with tf.GradientTape() as tape:
            losses = per_example_loss(y[s], model(x[s], training=True))
            w = opt.example_weights(tf.shape(losses)[0])
            loss = tf.reduce_mean(losses * w) + tf.add_n(model.losses)
        grads = tape.gradient(loss, model.trainable_variables)
        opt.apply_gradients(zip(grads, model.trainable_variables))
    for a, b in zip(reference.get_weights(), model.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_stddev_schedule_anneals_the_noise():
    schedule = keras.optimizers.schedules.PolynomialDecay(2.0, decay_steps=4, end_learning_rate=0.0)
    annealed = mixer(stddev=schedule, seed=6)
    unit = mixer(stddev=1.0, seed=6)
    for step in range(6):
        w_a = numpy(annealed.example_weights(8, step=step, replica_id=0))
        w_u = numpy(unit.example_weights(8, step=step, replica_id=0))
        np.testing.assert_allclose(w_a - 1.0, float(schedule(step)) * (w_u - 1.0), rtol=1e-6, atol=1e-7)
    model = functional(gm.Model)
    model.compile(annealed, SCCE)
    history = model.fit(*data(64), batch_size=16, epochs=2, verbose=0)
    assert history.history["gradmix_gamma"][1] == 1.0  # stddev 0 after 4 steps
    assert history.history["gradmix_gamma"][0] > 1.0


def test_noise_batch_size_constructor():
    opt = gm.GradientMix.for_noise_batch_size(keras.optimizers.SGD(), batch_size=32768, noise_batch_size=4096)
    assert opt.stddev == pytest.approx(np.sqrt(7.0))


# -- config ------------------------------------------------------------------


def test_config_round_trip_keeps_every_argument():
    schedule = keras.optimizers.schedules.ExponentialDecay(1.5, 100, 0.5)
    opt = gm.GradientMix(
        keras.optimizers.SGD(0.3, momentum=0.8, nesterov=True),
        level="device", noise=gm.noise.Rademacher(), stddev=schedule, seed=77, name="mix",
    )
    restored = gm.GradientMix.from_config(opt.get_config())
    assert restored.get_config() == opt.get_config()
    assert restored.level == "device" and restored.seed == 77 and restored.name == "mix"
    assert restored.noise == gm.noise.Rademacher()
    assert restored.stddev.get_config() == schedule.get_config()
    assert restored.inner_optimizer.get_config() == opt.inner_optimizer.get_config()
    via_keras = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(via_keras, gm.GradientMix) and via_keras.get_config() == opt.get_config()


@pytest.mark.parametrize("noise", ["bernoulli", gm.noise.Bernoulli()])
def test_bernoulli_round_trips_by_name(noise):
    opt = mixer(noise, stddev=2.0, seed=8)
    assert opt.get_config()["noise"] == "bernoulli"
    restored = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert restored.noise == gm.noise.Bernoulli()
    w = numpy(restored.example_weights(32, step=3, replica_id=0))
    np.testing.assert_array_equal(w, numpy(opt.example_weights(32, step=3, replica_id=0)))
    assert set(np.unique(w)) <= {0.0, 5.0}


def test_seed_none_draws_a_seed_kept_in_the_config():
    a, b = mixer(seed=None), mixer(seed=None)
    assert isinstance(a.seed, int) and a.seed != b.seed
    assert a.get_config()["seed"] == a.seed


# -- bad input ---------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, error, pattern",
    [
        (dict(stddev=-0.5), ValueError, r"`stddev`: -0.5"),
        (dict(stddev=float("nan")), ValueError, r"`stddev`: nan"),
        (dict(stddev=float("inf")), ValueError, r"`stddev`: inf"),
        (dict(stddev="1.0"), TypeError, r"`stddev`: '1.0'"),
        (dict(stddev=True), TypeError, r"`stddev`: True"),
        (dict(noise="uniform"), ValueError, r"`noise`: 'uniform'"),
        (dict(level="global"), ValueError, r"`level`: 'global'"),
        (dict(seed=-1), ValueError, r"`seed`: -1"),
        (dict(learning_rate=0.1), ValueError, r"`learning_rate=0.1`.*inner_optimizer"),
        (dict(clipnorm=1.0), ValueError, r"`clipnorm=1.0`.*inner_optimizer"),
        (dict(gradient_accumulation_steps=4), ValueError, r"`gradient_accumulation_steps=4`.*inner_optimizer"),
        (dict(momentum=0.9), TypeError, r"`momentum`"),
    ],
)
def test_bad_arguments_fail_at_once_naming_argument_and_value(kwargs, error, pattern):
    with pytest.raises(error, match=pattern):
        gm.GradientMix(keras.optimizers.SGD(), **kwargs)


def test_bad_inner_optimizer():
    with pytest.raises(TypeError, match=r"`inner_optimizer`.*0.1 of type float"):
        gm.GradientMix(0.1)
    with pytest.raises(ValueError, match=r"`inner_optimizer`.*GradientMix already"):
        gm.GradientMix(mixer())
    with pytest.raises(ValueError, match=r"`inner_optimizer`.*GradientMix already"):
        gm.GradientMix(keras.optimizers.LossScaleOptimizer(mixer()))


def test_sample_level_on_a_model_without_the_hook_fails_at_the_first_step():
    model = functional(keras.Model)
    model.compile(mixer(), SCCE)
    before = model.get_weights()
    with pytest.raises(ValueError, match=r"no GradientMix hook.*tf_gradmix\.enable\(model\)"):
        model.fit(*data(), verbose=0)
    # (A stock model on JAX has no tf_gradmix train function to put its state
    # back, and Keras's JAX fit leaves the variables unreadable after an error.)
    if keras.backend.backend() == "tensorflow":
        for a, b in zip(before, model.get_weights()):
            np.testing.assert_array_equal(a, b)


@pytest.mark.backends("tensorflow")
def test_other_backends_are_refused_clearly(monkeypatch):
    # Only the backend query is replaced (Keras's OpenVINO backend trains
    # nothing), and every public entry point must refuse; the TensorFlow-only
    # parts also refuse JAX and PyTorch.
    model = functional(keras.Model)
    monkeypatch.setattr(keras.backend, "backend", lambda: "openvino")
    for make in (
        lambda: gm.GradientMix(keras.optimizers.SGD()),
        lambda: gm.enable(model),
        lambda: gm.Sequential([keras.Input((2,)), keras.layers.Dense(1)]),
    ):
        refusal = r"supports the Keras backends 'tensorflow', 'jax', 'torch', but KERAS_BACKEND is 'openvino'"
        with pytest.raises(RuntimeError, match=refusal):
            make()
    for other in ("jax", "torch"):
        monkeypatch.setattr(keras.backend, "backend", lambda other=other: other)
        tensorflow_only = r"per_example_gradients=True\) supports the Keras backends 'tensorflow', but KERAS_BACKEND"
        with pytest.raises(RuntimeError, match=tensorflow_only):
            gm.enable(model, per_example_gradients=True)
        with pytest.raises(RuntimeError, match=r"DiagnosticsLogger supports the Keras backends 'tensorflow'"):
            gm.callbacks.DiagnosticsLogger(*data())


@pytest.mark.backends("tensorflow")
def test_device_weight_in_the_loss_equals_device_weight_on_the_gradients():
    # fit: Keras calls scale_loss, which carries w_k; a custom loop that does
    # not call it gets w_k applied to the gradients in apply(). Same update.
    x, y = data(32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # single replica
        fitted = functional(keras.Model)
        fitted.compile(mixer(level="device", stddev=0.8, seed=13), SCCE)
        fitted.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)

        model = functional(keras.Model)
        opt = mixer(level="device", stddev=0.8, seed=13)
        loss_fn = keras.losses.SparseCategoricalCrossentropy()
        for s in replica_slices(32, 2):
            with tf.GradientTape() as tape:
                loss = loss_fn(y[s], model(x[s], training=True)) + tf.add_n(model.losses)
            grads = tape.gradient(loss, model.trainable_variables)
            opt.apply_gradients(zip(grads, model.trainable_variables))
    # Two float32 paths (weight on the loss, weight on the gradients) round
    # differently: per variable, to 32 ulps of its largest entry (it ran at
    # 61% of the former rtol=1e-6, atol=1e-7).
    for a, b in zip(model.get_weights(), fitted.get_weights()):
        assert_float32_close(a, b)
    weights = [float(opt.device_weights(1, step=s)[0]) for s in (0, 1)]
    assert all(abs(w - 1.0) > 1e-3 for w in weights)  # the weights did act
