"""Sample level inside ``fit``: exactness against per-example loops.

Every update is checked after real ``fit`` steps with ``SGD(1.0)`` (so the
update is the gradient) against an independent float64 loop over examples,
using the weights ``GradientMix.example_weights`` reports for that step.
Runs on TensorFlow and JAX (the oracles are backend-agnostic).
"""

import os

import keras
import numpy as np
import pytest

import tf_gradmix as gm

from oracles import (
    FLOAT32_EPS,
    SCCE,
    UNROLLED_ULPS,
    assert_float32_close,
    data,
    flat,
    functional,
    gradient,
    mixer,
    mlp_layers,
    numpy,
    per_example_gradients,
    plain_copy,
    recover_weights,
    regularization_gradient,
    relative_error,
    weights_of,
)

B = 16


class Subclassed(keras.Model):
    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden, self.out = mlp_layers()

    def call(self, x):
        return self.out(self.hidden(x))


def build(kind):
    keras.utils.set_random_seed(0)
    if kind == "gm.Model":
        return functional(gm.Model)
    if kind == "gm.Sequential":
        return gm.Sequential([keras.Input((5,))] + mlp_layers())
    if kind == "enable(functional)":
        return gm.enable(functional(keras.Model))
    if kind == "enable(Sequential)":
        return gm.enable(keras.Sequential([keras.Input((5,))] + mlp_layers()))
    if kind == "enable(subclassed)":
        model = Subclassed()
        model(np.zeros((1, 5), "float32"))
        return gm.enable(model)
    raise AssertionError(kind)


def one_step_update(model, optimizer, x, y, **fit_kwargs):
    model.compile(optimizer=optimizer, loss=SCCE)
    before = flat(weights_of(model))
    history = model.fit(x, y, batch_size=len(x), epochs=1, shuffle=False, verbose=0, **fit_kwargs)
    return before - flat(weights_of(model)), history


@pytest.fixture(scope="module")
def mlp_oracle():
    """``oracle(model, x, y)``: the float64 per-example gradients (mean
    cross-entropy) and the regularizer's gradient of :func:`plain_copy` of
    ``model`` on ``(x, y)``.

    Both are pure functions of the weights and the data, so they are computed
    once per (weights, data) and reused by every test of the module that
    starts from the same point (every model built from seed 0 does).
    """
    cache = {}

    def oracle(model, x, y):
        key = (flat(model.get_weights()).tobytes(), x.tobytes(), np.asarray(y).tobytes())
        if key not in cache:
            ref = plain_copy(model)
            cache[key] = (
                per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy()),
                regularization_gradient(ref, x),
            )
        return cache[key]

    return oracle


@pytest.mark.parametrize(
    "kind", ["gm.Model", "gm.Sequential", "enable(functional)", "enable(Sequential)", "enable(subclassed)"]
)
@pytest.mark.parametrize("noise", ["gaussian", "rademacher", "bernoulli"])
def test_fit_update_equals_per_example_mix(mlp_oracle, kind, noise):
    x, y = data()
    model = build(kind)
    grads, regularization = mlp_oracle(model, x, y)
    opt = mixer(noise)
    update, _ = one_step_update(model, opt, x, y)

    w = numpy(opt.example_weights(B, step=0, replica_id=0)).astype(np.float64)
    expected = grads.T @ (w / B) + regularization
    assert_float32_close(update, expected)

    if noise == "rademacher":
        recovered = recover_weights(update - regularization, grads)
        np.testing.assert_allclose(recovered, w, atol=2e-4)
        assert set(np.round(recovered, 3)) == {0.3, 1.7}  # exactly 1 -+ 0.7


class InferenceBatchNorm(keras.layers.BatchNormalization):
    """BatchNorm that always normalises with its moving statistics.

    (A functional ``BatchNormalization()(h, training=False)`` does not stay
    in inference mode under ``fit`` in Keras 3.15; ``trainable=False`` would
    freeze the scale and offset too.) The scale and offset still train.
    """

    def call(self, inputs, training=None, mask=None):
        return super().call(inputs, training=False, mask=mask)


def bn_cnn(model_class):
    """Conv + BatchNorm (inference mode: examples independent) + pooling."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((6, 6, 2))
    h = inputs
    for filters, strides in ((4, 1), (6, 2)):
        h = keras.layers.Conv2D(filters, 3, strides=strides, padding="same")(h)
        h = InferenceBatchNorm()(h)
        h = keras.layers.Activation("relu")(h)
    h = keras.layers.GlobalAveragePooling2D()(h)
    model = model_class(inputs, keras.layers.Dense(3)(h))
    rng = np.random.default_rng(1)  # non-trivial moving statistics
    for v in model.non_trainable_variables:
        if "moving_mean" in v.path:
            v.assign(rng.normal(0.0, 0.3, v.shape).astype("float32"))
        else:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype("float32"))
    return model


@pytest.fixture(scope="module")
def bn_cnn_oracle():
    """The data, the plain model's per-example gradients and its moving
    statistics (float64 oracle, computed once for both noises)."""
    rng = np.random.default_rng(2)
    x = rng.normal(size=(B, 6, 6, 2)).astype("float32")
    y = rng.integers(0, 3, B)
    ref = bn_cnn(keras.Model)
    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    return x, y, grads, [numpy(v) for v in ref.non_trainable_weights]


@pytest.mark.parametrize("noise", ["gaussian", "rademacher"])
def test_batchnorm_cnn_update_equals_per_example_mix(bn_cnn_oracle, noise):
    """A convolutional BatchNorm model against the per-example loop.

    BatchNorm runs in inference mode (moving statistics), so each example's
    gradient is its own and the loop is an exact oracle; the scale and offset
    of every BatchNorm layer are trained and mixed like any weight.
    """
    x, y, grads, ref_statistics = bn_cnn_oracle
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model = bn_cnn(gm.Model)
    opt = mixer(noise, stddev=0.8, seed=17)
    model.compile(opt, loss_fn)
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    assert np.linalg.matrix_rank(grads) == B  # so least squares gives every w_b
    w = numpy(opt.example_weights(B, step=0, replica_id=0)).astype(np.float64)
    assert_float32_close(update, grads.T @ w / B)
    recovered = recover_weights(update, grads)
    np.testing.assert_allclose(recovered, w, atol=1e-4)
    assert len([v for v in model.trainable_variables if "batch_norm" in v.path]) == 4
    assert len(model.non_trainable_weights) == len(ref_statistics) == 4
    for a, b in zip(model.non_trainable_weights, ref_statistics):
        np.testing.assert_array_equal(a, b)  # moving statistics untouched


@pytest.mark.parametrize("noise", ["gaussian", "rademacher", "bernoulli"])
def test_weights_fit_applies_have_mean_one_and_std_stddev(noise):
    """The weights recovered from ``fit``'s updates, not from the API.

    A linear model with a loss linear in the output, ``l_b = y_b . f(x_b)``,
    has per-example gradients that do not depend on the weights, so each
    step's update ``sum_b w_b g_b / B`` (SGD, rate 1) gives back every
    ``w_b`` by least squares. 64 steps of 16 examples = 1024 weights.
    """
    stddev, steps = 0.6, 64
    rng = np.random.default_rng(7)
    x = rng.normal(size=(steps * B, 16)).astype("float32")
    y = rng.normal(size=(steps * B, 8)).astype("float32")
    model = gm.Sequential([keras.Input((16,)), keras.layers.Dense(8)])
    model.compile(mixer(noise, stddev=stddev, seed=23), loss=lambda t, p: keras.ops.sum(t * p, axis=-1))
    snapshots = []

    def snapshot(*_, **__):
        if hasattr(model, "jax_state_sync"):  # JAX keeps the state out of the variables mid-epoch
            model.jax_state_sync()
        snapshots.append(flat(weights_of(model)))

    record = keras.callbacks.LambdaCallback(on_train_batch_begin=snapshot, on_train_end=snapshot)
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    assert len(snapshots) == steps + 1
    recovered = []
    for step in range(steps):
        part = slice(step * B, (step + 1) * B)
        # kernel gradient x_b y_b^T, bias gradient y_b (variables' order).
        grads = np.concatenate(
            [np.einsum("bi,bj->bij", x[part], y[part]).reshape(B, -1), y[part]], axis=1
        ).astype(np.float64)
        recovered.append(recover_weights(snapshots[step] - snapshots[step + 1], grads))
    w = np.concatenate(recovered)
    n = w.size
    # 4 standard errors: the mean's is stddev/sqrt(n) = 0.019; the standard
    # deviation's is stddev * sqrt((kurtosis - 1) / (4n)), at most
    # stddev/sqrt(2n) = 0.013 for these laws (Gaussian kurtosis 3, the
    # two-point laws less). Wrong rules this rejects: stddev^2 as the spread
    # (0.36), weights pi = w/B (mean 1/16), w - 1 (mean 0).
    assert abs(w.mean() - 1.0) < 4 * stddev / np.sqrt(n)
    assert abs(w.std(ddof=1) - stddev) < 4 * stddev / np.sqrt(2 * n)
    if noise == "rademacher":
        np.testing.assert_allclose(np.abs(w - 1.0), stddev, atol=1e-3)  # w = 1 +- stddev
    if noise == "bernoulli":  # w = b / p: 0 or 1 + stddev^2
        np.testing.assert_allclose(np.minimum(np.abs(w), np.abs(w - 1 - stddev**2)), 0.0, atol=1e-3)
    # Fresh weights every step: consecutive steps' weights are uncorrelated.
    corr = np.corrcoef(np.stack(recovered[:-1]).ravel(), np.stack(recovered[1:]).ravel())[0, 1]
    assert abs(corr) < 4 / np.sqrt(n)


def test_weights_are_redrawn_every_step():
    x, y = data()
    model = build("gm.Model")
    opt = mixer("rademacher", stddev=1.0)
    one_step_update(model, opt, x, y)
    ref = plain_copy(model)
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    recovered = recover_weights(update - regularization_gradient(ref, x), grads)
    w0 = numpy(opt.example_weights(B, step=0, replica_id=0))
    w1 = numpy(opt.example_weights(B, step=1, replica_id=0))
    np.testing.assert_allclose(recovered, w1, atol=2e-4)
    assert not np.array_equal(w0, w1)
    assert int(numpy(opt.raw_step)) == 2


NESTEROV = dict(learning_rate=0.1, momentum=0.9, nesterov=True)


@pytest.fixture(scope="module")
def plain_nesterov_run():
    """Plain Keras, SGD with Nesterov momentum, 3 epochs of 3 steps: the
    weights and the loss history both levels' ``stddev=0`` runs must match."""
    plain = functional(keras.Model)
    plain.compile(keras.optimizers.SGD(**NESTEROV), SCCE)
    history = plain.fit(*data(48), batch_size=16, epochs=3, shuffle=False, verbose=0)
    return plain.get_weights(), history.history


@pytest.mark.parametrize("level", ["sample", "device"])
def test_stddev_zero_reproduces_plain_training_bit_for_bit(plain_nesterov_run, level):
    x, y = data(48)
    plain_weights, plain_history = plain_nesterov_run
    mixed = functional(gm.Model)
    mixed.compile(mixer(stddev=0.0, inner=keras.optimizers.SGD(**NESTEROV), level=level), SCCE)
    history = mixed.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
    for a, b in zip(plain_weights, mixed.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert plain_history["loss"] == history.history["loss"]
    assert history.history["gradmix_gamma"] == [1.0, 1.0, 1.0]


def relu_mlp_data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(256, 20)).astype("float32"), rng.integers(0, 10, 256)


def train_relu_mlp(model_class, optimizer):
    """Seeded 20-32-10 ReLU MLP, batch 32, one epoch of 8 steps: its weights and history."""
    keras.utils.set_random_seed(1)
    model = model_class([keras.Input((20,)), keras.layers.Dense(32, activation="relu"), keras.layers.Dense(10)])
    model.compile(optimizer, keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    history = model.fit(*relu_mlp_data(), batch_size=32, epochs=1, shuffle=False, verbose=0)
    return model.get_weights(), history.history


@pytest.fixture(scope="module")
def plain_relu_mlp_run():
    """Plain Keras's run of :func:`train_relu_mlp` with SGD(0.1), shared by both levels."""
    return train_relu_mlp(keras.Sequential, keras.optimizers.SGD(0.1))


@pytest.mark.parametrize("level", ["sample", "device"])
def test_stddev_zero_is_plain_bit_for_bit_where_the_mixing_op_would_round_differently(plain_relu_mlp_run, level):
    """A 20-32-10 ReLU MLP, SGD(0.1), batch 32, 8 steps: with the predictions
    passed through the mixing op (all weights 1), JAX's XLA fuses the backward
    pass differently and the weights drifted from plain Keras by 3.7e-9;
    stddev=0 leaves the predictions untouched on every backend."""
    plain, plain_history = plain_relu_mlp_run
    zero, zero_history = train_relu_mlp(
        gm.Sequential, mixer(stddev=0.0, seed=1, inner=keras.optimizers.SGD(0.1), level=level)
    )
    for a, b in zip(plain, zero, strict=True):
        np.testing.assert_array_equal(a, b)
    assert zero_history["loss"] == plain_history["loss"]
    assert zero_history["gradmix_gamma"] == [1.0]


def test_logged_loss_is_the_plain_loss_and_gamma_the_mean_of_w_squared():
    x, y = data(32)
    model = functional(gm.Model)
    ref = plain_copy(model)
    ref.compile(loss=SCCE)
    plain_loss = ref.evaluate(x[:16], y[:16], verbose=0)
    opt = mixer(stddev=1.5)
    model.compile(opt, SCCE)
    # The first step's loss is the plain loss at the initial weights; the
    # epoch's `loss` averages both steps, so compare the first step's logs
    # (the running mean after one step: what a 1-step run's history holds).
    batch_logs = []
    record = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: batch_logs.append(dict(logs)))
    history = model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[record])
    assert len(batch_logs) == 2
    first_loss = float(batch_logs[0]["loss"])
    assert first_loss == pytest.approx(plain_loss, rel=1e-6)  # vs evaluate()
    # Bit for bit the loss plain `fit` logs for the same step.
    plain_fit = plain_copy(functional(gm.Model))
    plain_fit.compile(keras.optimizers.SGD(1.0), SCCE)
    plain_first = plain_fit.fit(x[:16], y[:16], batch_size=16, epochs=1, verbose=0)
    assert first_loss == plain_first.history["loss"][0]
    assert float(batch_logs[1]["loss"]) == history.history["loss"][0]  # the logs are the history's

    gammas = [np.mean(numpy(opt.example_weights(16, step=s, replica_id=0)) ** 2) for s in (0, 1)]
    assert history.history["gradmix_gamma"][0] == pytest.approx(np.mean(gammas), rel=1e-6)


def record_draws(model, optimizer):
    """Records every request for mixing weights, with the step kind asking.

    Mixing needs weights: a step that never asks for them cannot mix. The
    requests happen while Keras traces the step functions, in Python, so a
    recording wrapper around the optimizer's two public methods sees them.
    """
    draws, kind = [], ["train"]
    for name in ("example_weights", "device_weights"):
        original = getattr(optimizer, name)

        def recording(*args, _original=original, _name=name, **kwargs):
            draws.append((kind[0], _name))
            return _original(*args, **kwargs)

        setattr(optimizer, name, recording)
    for name in ("test_step", "predict_step"):
        original = getattr(model, name)

        def step(*data, _original=original, _kind=name):  # (state, data) on JAX
            kind[0] = _kind
            try:
                return _original(*data)
            finally:
                kind[0] = "train"

        setattr(model, name, step)
    return draws


def test_evaluate_predict_and_validation_never_mix():
    """"Never mix" is observed three ways: evaluation and prediction steps
    draw no mixing weights (the cost), leave the noise counter alone, and do
    not touch the gamma metric; their values equal plain Keras's."""
    x, y = data(32)
    xv, yv = data(24, seed=1)
    model = functional(gm.Model)
    model.compile(mixer(stddev=2.0), SCCE, metrics=["accuracy"])
    draws = record_draws(model, model.optimizer)
    history = model.fit(x, y, batch_size=16, epochs=2, validation_data=(xv, yv), verbose=0)
    steps = int(numpy(model.optimizer.raw_step))

    ref = plain_copy(model)
    ref.compile(loss=SCCE, metrics=["accuracy"])
    expected = ref.evaluate(xv, yv, verbose=0, return_dict=True)
    got = model.evaluate(xv, yv, verbose=0, return_dict=True)
    assert got == pytest.approx(expected, rel=1e-6)
    assert "gradmix_gamma" not in got
    assert history.history["val_loss"][-1] == pytest.approx(expected["loss"], rel=1e-6)
    assert not any(k.startswith("val_gradmix") for k in history.history)
    np.testing.assert_array_equal(model.predict(xv, verbose=0), ref.predict(xv, verbose=0))
    assert int(numpy(model.optimizer.raw_step)) == steps == 4
    # evaluate() resets every metric first; a mixing test step would count.
    assert int(numpy(model._gradmix_gamma.count)) == 0
    kinds = {kind for kind, _ in draws}
    assert ("train", "example_weights") in draws  # the recorder sees training
    assert kinds == {"train"}, draws  # validation, evaluate, predict: no draw


def test_plain_optimizer_on_gm_model_trains_like_keras():
    x, y = data(32)
    plain = functional(keras.Model)
    plain.compile(keras.optimizers.Adam(0.01), SCCE)
    ours = functional(gm.Model)
    ours.compile(keras.optimizers.Adam(0.01), SCCE)
    h = ours.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    plain.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(plain.get_weights(), ours.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert "gradmix_gamma" not in h.history


def contribution_gradients(model, x, y, loss_fn, sample_weight=None):
    """Gradient of each example's share of the batch loss (Keras reduction).

    Example b's share is the batch loss with every other sample weight set to
    zero; the shares add up to the batch loss for every reduction whose
    denominator does not depend on the weights.
    """
    outputs = model(x, training=True)
    base = np.ones(len(x), "float32") if sample_weight is None else sample_weight
    weights = []
    for b in range(len(x)):
        one_hot = np.zeros(len(x), "float32")
        one_hot[b] = base[b]
        # A (B, T) weight for (B, T) losses: Keras's masked path cannot
        # broadcast a (B,) weight against a (B, T) mask, and on PyTorch it
        # multiplies a (B, 1) one by the mask in place, which cannot grow it.
        shape = (len(x),) + (1,) * (len(outputs.shape) - 2)
        weights.append(np.broadcast_to(one_hot.reshape(shape), tuple(outputs.shape[:-1])).copy())
    if keras.backend.backend() == "jax":  # one compiled gradient, called per example
        import jax

        non_trainable = [v.value for v in model.non_trainable_variables]

        def share_of(trainable, weight):
            y_pred, _ = model.stateless_call(trainable, non_trainable, x, training=True)
            return loss_fn(y, y_pred, sample_weight=weight)

        value_and_grad = jax.jit(jax.value_and_grad(share_of))
        trainable = [v.value for v in model.trainable_variables]
        pairs = [value_and_grad(trainable, weight) for weight in weights]
        return np.stack([flat(g) for _, g in pairs]), np.array([float(v) for v, _ in pairs])
    rows, values = [], []
    for weight in weights:
        def share(y_pred, _, weight=weight):
            return loss_fn(y, y_pred, sample_weight=weight)

        values.append(float(numpy(share(outputs, None))))
        rows.append(gradient(model, share, x))
    return np.stack(rows), np.array(values)


def test_masked_sequence_loss_mixes_whole_sequences():
    rng = np.random.default_rng(3)
    lengths = rng.integers(2, 7, B)
    tokens = np.zeros((B, 6), "int32")
    for b, n in enumerate(lengths):
        tokens[b, :n] = rng.integers(1, 20, n)
    targets = rng.integers(0, 4, (B, 6))

    def model_of(cls):
        keras.utils.set_random_seed(1)
        inputs = keras.Input((6,), dtype="int32")
        h = keras.layers.Embedding(20, 8, mask_zero=True)(inputs)
        h = keras.layers.Dense(8, activation="tanh")(h)
        return cls(inputs, keras.layers.Dense(4)(h))

    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model, ref = model_of(gm.Model), model_of(keras.Model)
    opt = mixer("gaussian", stddev=0.8)
    model.compile(opt, loss_fn)
    before = flat(weights_of(model))
    history = model.fit(tokens, targets, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    grads, shares = contribution_gradients(ref, tokens, targets, loss_fn)
    ref.compile(loss=loss_fn)
    plain_loss = ref.evaluate(tokens, targets, verbose=0)
    assert shares.sum() == pytest.approx(plain_loss, rel=1e-5)  # oracle sanity
    assert history.history["loss"][0] == pytest.approx(plain_loss, rel=1e-6)
    w = numpy(opt.example_weights(B, step=0, replica_id=0))
    assert_float32_close(update, grads.T @ w)


@pytest.mark.parametrize("reduction", ["sum_over_batch_size", "sum", "mean_with_sample_weight"])
def test_every_reduction_is_mixed_exactly_with_user_sample_weights(mlp_oracle, reduction):
    x, y = data()
    s = np.random.default_rng(4).uniform(0.2, 2.0, B).astype("float32")
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=reduction)
    model = functional(gm.Model, regularizer=False)
    grads, _ = mlp_oracle(model, x, y)  # no regularizer here: only the loss's gradients
    opt = mixer("gaussian", stddev=1.2)
    model.compile(opt, loss_fn)
    before = flat(weights_of(model))
    model.fit(x, y, sample_weight=s, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    denominator = {"sum_over_batch_size": B, "sum": 1.0, "mean_with_sample_weight": s.sum()}[reduction]
    w = numpy(opt.example_weights(B, step=0, replica_id=0)).astype(np.float64)
    assert_float32_close(update, grads.T @ (s * w) / denominator)


def test_several_outputs_and_losses():
    x, y = data()
    y2 = np.random.default_rng(5).normal(size=(B, 2)).astype("float32")

    def model_of(cls):
        keras.utils.set_random_seed(2)
        inputs = keras.Input((5,))
        h = keras.layers.Dense(8, activation="relu")(inputs)
        return cls(
            inputs,
            {
                "cls": keras.layers.Dense(3, activation="softmax", name="cls")(h),
                "reg": keras.layers.Dense(2, name="reg")(h),
            },
        )

    model, ref = model_of(gm.Model), model_of(keras.Model)
    opt = mixer("rademacher", stddev=0.5)
    losses = {"cls": SCCE, "reg": "mse"}
    model.compile(opt, loss=losses, loss_weights={"cls": 1.0, "reg": 0.5})
    ref.compile(loss=losses, loss_weights={"cls": 1.0, "reg": 0.5})
    targets = {"cls": y, "reg": y2}
    plain = ref.evaluate(x, targets, verbose=0, return_dict=True)
    before = flat(weights_of(model))
    history = model.fit(x, targets, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    ce, mse = keras.losses.SparseCategoricalCrossentropy(), keras.losses.MeanSquaredError()

    def example_loss(label_and_target, out):  # columns: the class label (exact in float32), then y2
        return ce(label_and_target[:, 0], out["cls"]) + 0.5 * mse(label_and_target[:, 1:], out["reg"])

    both = np.concatenate([y[:, None].astype("float32"), y2], axis=1)
    rows = per_example_gradients(ref, x, both, example_loss)
    w = numpy(opt.example_weights(B, step=0, replica_id=0))
    assert_float32_close(update, rows.T @ w / B)
    for key, value in plain.items():  # every loss log is the plain value
        assert history.history[key][0] == pytest.approx(value, rel=1e-5), key


def test_gradient_accumulation_draws_fresh_weights_per_micro_batch():
    x, y = data(32)
    model = functional(gm.Model)
    ref = plain_copy(model)
    opt = mixer("gaussian", inner=keras.optimizers.SGD(1.0, gradient_accumulation_steps=2))
    model.compile(opt, SCCE)
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    # Both micro-batches see the initial weights (one update, at the end).
    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    expected = regularization_gradient(ref, x)
    for step, part in enumerate((slice(0, 16), slice(16, 32))):
        w = numpy(opt.example_weights(16, step=step, replica_id=0))
        expected = expected + grads[part].T @ w / 16 / 2
    assert_float32_close(update, expected)
    assert int(numpy(opt.raw_step)) == 2 and int(numpy(opt.iterations)) == 1


def test_steps_per_execution_gives_the_same_run():
    if keras.backend.backend() == "torch":
        pytest.skip("Keras 3.15's PyTorch fit refuses steps_per_execution > 1 (upstream sentinel: "
                    "test_keras_torch.py::test_keras_torch_fit_still_refuses_steps_per_execution_above_one)")
    x, y = data(96)
    runs = []
    for spe in (1, 3):
        model = functional(gm.Model)
        model.compile(mixer(stddev=1.0), SCCE, steps_per_execution=spe)
        runs.append((model.fit(x, y, batch_size=16, epochs=2, shuffle=False, verbose=0), model))
    (h1, m1), (h3, m3) = runs
    for a, b in zip(m1.get_weights(), m3.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert h1.history["gradmix_gamma"] == pytest.approx(h3.history["gradmix_gamma"], rel=1e-6)


@pytest.fixture(scope="module")
def saved_and_resumed(tmp_path_factory):
    """3 steps with ``seed=None`` and momentum, saved to a ``.keras`` file,
    loaded and trained 3 more steps; and a straight 6-step run with the seed
    the first run drew. What the loaded model is and holds, read once."""
    x, y = data(48)
    sgd = dict(learning_rate=0.1, momentum=0.9)
    first = functional(gm.Model)
    first.compile(mixer(inner=keras.optimizers.SGD(**sgd), seed=None, stddev=1.0), SCCE)
    first.fit(x[:24], y[:24], batch_size=8, epochs=1, shuffle=False, verbose=0)  # 3 steps
    seed = first.optimizer.seed
    path = os.path.join(tmp_path_factory.mktemp("saved"), "m.keras")
    first.save(path)
    loaded = keras.models.load_model(path)
    result = dict(
        seed=seed,
        loaded_type=type(loaded),
        optimizer_type=type(loaded.optimizer),
        loaded_seed=loaded.optimizer.seed,
        loaded_raw_step=int(numpy(loaded.optimizer.raw_step)),
    )
    loaded.fit(x[24:], y[24:], batch_size=8, epochs=1, shuffle=False, verbose=0)  # 3 more
    result["loaded_weights"] = loaded.get_weights()

    straight = functional(gm.Model)
    straight.compile(mixer(inner=keras.optimizers.SGD(**sgd), seed=seed, stddev=1.0), SCCE)
    straight.fit(x, y, batch_size=8, epochs=1, shuffle=False, verbose=0)  # 6 steps
    result["straight_weights"] = straight.get_weights()
    return result


def test_save_load_continues_the_same_noise_stream(saved_and_resumed):
    run = saved_and_resumed
    assert issubclass(run["loaded_type"], gm.Model)
    assert issubclass(run["optimizer_type"], gm.GradientMix) and run["loaded_seed"] == run["seed"]
    assert run["loaded_raw_step"] == 3
    for a, b in zip(run["straight_weights"], run["loaded_weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_saved_sequential_reloads_as_gm_sequential(tmp_path):
    x, y = data()
    model = build("gm.Sequential")
    model.compile(mixer(), SCCE)
    model.fit(x, y, verbose=0)
    path = os.path.join(tmp_path, "s.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded, gm.Sequential)
    assert gm.model.is_enabled(loaded)


def test_reloaded_enabled_model_fails_loudly_instead_of_training_unmixed(tmp_path):
    x, y = data()
    model = build("enable(functional)")
    model.compile(mixer(), SCCE)
    model.fit(x, y, verbose=0)
    path = os.path.join(tmp_path, "e.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    before = loaded.get_weights()
    with pytest.raises(ValueError, match=r"tf_gradmix.enable\(model\)"):
        loaded.fit(x, y, verbose=0)
    if keras.backend.backend() == "tensorflow":
        for a, b in zip(before, loaded.get_weights()):
            np.testing.assert_array_equal(a, b)
    else:  # a stock model: Keras's JAX fit leaves its variables unreadable after an error
        loaded = keras.models.load_model(path)
    gm.enable(loaded).fit(x, y, verbose=0)  # enabling again resumes mixing


@pytest.fixture(scope="module")
def backup_and_restore_run(tmp_path_factory):
    """``seed=None``, 3 epochs of 4 steps interrupted at the start of epoch 3
    with ``BackupAndRestore`` (on TensorFlow also ``ModelCheckpoint`` and
    ``TensorBoard``), run again with the same callbacks from code (a new
    drawn seed), and an uninterrupted run with the first run's seed.

    The restarted run rebuilds the optimizer, so it draws a new seed; the
    backup must bring back the old one (the seed is a variable).
    """
    x, y = data(64)
    tmp_path = tmp_path_factory.mktemp("backup_and_restore")

    def callbacks():
        found = [keras.callbacks.BackupAndRestore(str(tmp_path / "backup"))]
        if keras.backend.backend() == "tensorflow":
            found += [
                keras.callbacks.ModelCheckpoint(str(tmp_path / "ckpt-{epoch}.keras")),
                keras.callbacks.TensorBoard(str(tmp_path / "tb")),
            ]
        return found

    def run(seed, extra=(), fail_at=None):
        model = functional(gm.Model)
        model.compile(mixer(seed=seed, stddev=1.0), SCCE)

        class Interrupt(keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                if epoch == fail_at:
                    raise RuntimeError("interrupted")

        try:
            model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0, callbacks=list(extra) + [Interrupt()])
        except RuntimeError:
            return model, True
        return model, False

    interrupted, raised = run(None, callbacks(), fail_at=2)
    result = dict(
        interrupted=raised,
        seed=interrupted.optimizer.seed,
        raw_step=int(numpy(interrupted.optimizer.raw_step)),
        weights_step_9=numpy(interrupted.optimizer.example_weights(8, step=9, replica_id=0)),
        tmp_path=tmp_path,
    )
    resumed, raised = run(None, callbacks())
    assert not raised
    result.update(
        resumed_seed=resumed.optimizer.seed,
        resumed_weights_step_9=numpy(resumed.optimizer.example_weights(8, step=9, replica_id=0)),
        resumed=resumed.get_weights(),
        reference=run(result["seed"])[0].get_weights(),
    )
    return result


@pytest.mark.backends("tensorflow")
def test_callbacks_checkpoint_backup_and_tensorboard(backup_and_restore_run):
    run = backup_and_restore_run
    assert run["interrupted"]
    for a, b in zip(run["reference"], run["resumed"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert (run["tmp_path"] / "ckpt-3.keras").exists()
    assert any((run["tmp_path"] / "tb").rglob("*tfevents*"))


def test_default_seed_survives_backup_and_restore(backup_and_restore_run):
    """``seed=None``: the restored run continues the interrupted run's stream."""
    run = backup_and_restore_run
    assert run["interrupted"] and run["raw_step"] == 8
    assert run["resumed_seed"] == run["seed"]
    np.testing.assert_array_equal(run["resumed_weights_step_9"], run["weights_step_9"])
    for a, b in zip(run["reference"], run["resumed"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_default_seed_survives_a_keras_file(saved_and_resumed):
    run = saved_and_resumed
    assert isinstance(run["seed"], int)
    assert run["loaded_seed"] == run["seed"]
    # The straight run used the drawn seed: the loaded run continued its stream.
    for a, b in zip(run["straight_weights"], run["loaded_weights"], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def weighted_batch_gradient(model, x, y, w, loss_fn):
    """Gradient of ``mean_b w_b l_b`` (+ layer losses) on the whole batch.

    The oracle where examples interact (BatchNorm in training mode): Eq. 4's
    ``sum_b pi_b grad l_b`` is then the gradient of the weighted batch loss,
    with every example's loss seen through the batch statistics.
    """
    def objective(outputs, losses):
        per_example = loss_fn(y, outputs)
        return keras.ops.mean(per_example * keras.ops.cast(w, per_example.dtype)) + sum(losses)

    return gradient(model, objective, x)


@pytest.mark.backends("tensorflow")
@pytest.mark.slow
def test_keras_application_model_is_mixed_exactly():
    """MobileNetV3Small (BatchNorm in training mode, hard-swish, SE blocks)."""
    x = np.random.default_rng(0).uniform(size=(8, 32, 32, 3)).astype("float32")
    y = np.arange(8) % 4

    def application():
        keras.utils.set_random_seed(0)
        return keras.applications.MobileNetV3Small(
            input_shape=(32, 32, 3), weights=None, classes=4, include_preprocessing=False,
            dropout_rate=0.0,
        )

    plain = application()
    plain.compile(keras.optimizers.SGD(0.1), SCCE)
    plain_history = plain.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    zero = gm.enable(application())
    zero.compile(mixer(stddev=0.0, seed=1, inner=keras.optimizers.SGD(0.1)), SCCE)
    zero_history = zero.fit(x, y, batch_size=8, epochs=1, verbose=0).history
    for a, b in zip(plain.get_weights(), zero.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert zero_history["loss"] == plain_history["loss"]

    model, ref = gm.enable(application()), application()
    opt = mixer(stddev=1.0, seed=1, inner=keras.optimizers.SGD(1.0))
    update, history = one_step_update(model, opt, x, y)
    w = numpy(opt.example_weights(8, step=0, replica_id=0)).astype(np.float64)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(reduction=None)
    expected = weighted_batch_gradient(ref, x, y, w, loss_fn)
    assert_float32_close(update, expected, ulps=UNROLLED_ULPS)
    unmixed = weighted_batch_gradient(ref, x, y, np.ones(8), loss_fn)
    assert relative_error(unmixed, expected) > 0.05  # the weights matter
    # The loss value is the plain one up to float32 rounding of the forward
    # pass (the mixed step's graph differs; 1 ulp measured, 8 allowed).
    assert history.history["loss"][0] == pytest.approx(plain_history["loss"][0], rel=8 * FLOAT32_EPS)


def test_enable_rejects_non_models_and_is_idempotent():
    with pytest.raises(TypeError, match=r"argument `model`"):
        gm.enable(keras.layers.Dense(3))
    model = build("enable(functional)")
    assert gm.enable(model) is model


@pytest.mark.backends("tensorflow")
def test_per_example_gradient_mode_equals_reweighting():
    x, y = data(32)
    reweighted = functional(gm.Model)
    reweighted.compile(mixer(seed=21), SCCE)
    reweighted.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    per_example = gm.enable(functional(keras.Model), per_example_gradients=True)
    per_example.compile(mixer(seed=21), SCCE)
    history = per_example.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_float32_close(flat(per_example.get_weights()), flat(reweighted.get_weights()))
    assert history.history["gradmix_gamma"][0] > 1.0


@pytest.mark.backends("tensorflow")
def test_per_example_gradient_mode_refuses_batch_norm_at_once():
    model = keras.Sequential([keras.Input((5,)), keras.layers.Dense(4), keras.layers.BatchNormalization()])
    with pytest.raises(ValueError, match="BatchNormalization"):
        gm.enable(model, per_example_gradients=True)
