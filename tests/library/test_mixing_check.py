"""Sample-level mixing is never silently empty or partial, and its fixes.

* a loss that reads no prediction (``add_loss`` only) is refused at the first
  step, before any update;
* a ``compute_loss`` that reaches trainable variables around the predictions
  warns once, naming them; regularizers raise nothing;
* ``gradmix_gamma`` is absent where no gradient was weighted;
* a custom ``train_step`` gets a message that says what happened, and the
  recipe of ``docs/custom_training.md`` equals the per-example oracle;
* ``GradientMix("adam")`` and config dicts build the inner optimizer.
"""

import os
import pathlib
import re
import warnings

import keras
import numpy as np
import pytest

import tf_gradmix as gm
from tf_gradmix.mixing_check import PartialMixingWarning

from oracles import (
    SCCE,
    assert_float32_close,
    data,
    flat,
    functional,
    mixer,
    numpy,
    per_example_gradients,
    plain_copy,
    regularization_gradient,
    weights_of,
)

if keras.backend.backend() == "tensorflow":  # the tests that use it are marked
    import tensorflow as tf

B = 16
DOCS = pathlib.Path(__file__).resolve().parents[2] / "docs"


class PerExampleLoss(keras.layers.Layer):
    """Endpoint layer: adds the mean cross-entropy with ``add_loss``."""

    def call(self, labels, probabilities):
        losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        self.add_loss(keras.ops.mean(losses))
        return probabilities


def add_loss_model():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    labels = keras.Input((), dtype="int32")
    probabilities = keras.layers.Dense(3, activation="softmax")(
        keras.layers.Dense(8, activation="tanh")(inputs)
    )
    return keras.Model([inputs, labels], PerExampleLoss()(labels, probabilities))


def snapshot(model):
    return [w.copy() for w in model.get_weights()]


def assert_unchanged(before, model):
    for a, b in zip(before, model.get_weights()):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("noise", ["gaussian", "bernoulli"])
def test_add_loss_only_is_refused_at_the_first_step_before_any_update(noise):
    x, y = data()
    model = gm.enable(add_loss_model())
    optimizer = mixer(noise, stddev=1.0)
    model.compile(optimizer=optimizer)
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        model.fit([x, y], epochs=1, batch_size=B, verbose=0)
    message = str(error.value)
    for part in (
        "does not depend on its predictions",
        "`add_loss`",
        "level='device'",
        "optimizer.example_weights(batch_size)",
        "before any update",
    ):
        assert part in message
    assert_unchanged(before, model)
    assert int(numpy(optimizer.iterations)) == 0
    assert int(numpy(optimizer.raw_step)) == 0


def test_add_loss_only_trains_at_device_level():
    x, y = data()
    model = gm.enable(add_loss_model())
    model.compile(optimizer=mixer(level="device"))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # single replica
        history = model.fit([x, y], epochs=1, batch_size=B, verbose=0)
    assert np.isfinite(history.history["loss"][0])


class SummedPerExampleLoss(keras.layers.Layer):
    """Endpoint layer: ``add_loss`` of the per-example losses (Keras sums them), or returns them."""

    def __init__(self, as_output=False, **kwargs):
        super().__init__(**kwargs)
        self.as_output = as_output

    def call(self, labels, probabilities):
        losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        if self.as_output:
            return losses
        self.add_loss(losses)
        return probabilities


class PerExample(keras.losses.Loss):
    """The refusal's remedy: a compiled loss whose per-example values are the model's output."""

    def call(self, y_true, y_pred):
        return y_pred


def test_add_loss_remedy_keeps_the_sum_only_with_a_sum_reduction():
    """What the refusal says: ``loss=lambda y_true, y_pred: y_pred`` averages the
    per-example losses ``add_loss`` summed (a gradient B times smaller), and a
    loss with ``reduction='sum'`` keeps the sum."""
    x, y = data()

    def endpoint(as_output):
        keras.utils.set_random_seed(0)
        inputs = keras.Input((5,))
        labels = keras.Input((), dtype="int32")
        probabilities = keras.layers.Dense(3, activation="softmax")(keras.layers.Dense(8, activation="tanh")(inputs))
        return keras.Model([inputs, labels], SummedPerExampleLoss(as_output)(labels, probabilities))

    def update(model, optimizer, targets, **compile_kwargs):
        model.compile(optimizer=optimizer, **compile_kwargs)
        before = flat(weights_of(model))
        model.fit([x, y], targets, batch_size=B, epochs=1, shuffle=False, verbose=0)
        return before - flat(weights_of(model))

    summed = update(endpoint(False), keras.optimizers.SGD(1.0), None)  # plain Keras, add_loss's sum
    refused = gm.enable(endpoint(False))
    refused.compile(optimizer=mixer(stddev=0.0))
    with pytest.raises(ValueError) as error:
        refused.fit([x, y], epochs=1, batch_size=B, verbose=0)
    message = str(error.value)
    for part in ("`loss=lambda y_true, y_pred: y_pred`", "mean over the batch", "sums", "reduction='sum'"):
        assert part in message

    zeros = np.zeros(B, "float32")  # a compiled loss wants targets; unused
    mean = update(gm.enable(endpoint(True)), mixer(stddev=0.0), zeros, loss=lambda y_true, y_pred: y_pred)
    assert_float32_close(mean, summed / B)
    kept = update(gm.enable(endpoint(True)), mixer(stddev=0.0), zeros, loss=PerExample(reduction="sum"))
    assert_float32_close(kept, summed)


def test_compute_loss_that_ignores_y_pred_is_refused():
    class CallsItselfAgain(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            return keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(y, self(x, training=training))
            )

    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    model = gm.enable(CallsItselfAgain(inputs, keras.layers.Dense(3, activation="softmax")(inputs)))
    model.compile(optimizer=mixer())
    x, y = data()
    before = snapshot(model)
    with pytest.raises(ValueError, match="does not depend on its predictions"):
        model.fit(x, y, batch_size=B, verbose=0)
    assert_unchanged(before, model)


class Distiller(keras.Model):
    """A student trained on labels and on a second, trainable model's outputs."""

    def __init__(self, student, other, **kwargs):
        super().__init__(**kwargs)
        self.student = student
        self.other = other

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        other = self.other(x, training=training)
        student = keras.losses.sparse_categorical_crossentropy(y, y_pred)
        distill = keras.ops.sum((y_pred - other) ** 2, axis=-1)
        return keras.ops.mean(student + distill)


def distiller(other_regularizer=None):
    keras.utils.set_random_seed(0)
    student = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(3, activation="softmax", name="student_dense")]
    )
    other = keras.Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, activation="tanh", name="other_hidden"),
            keras.layers.Dense(
                3, activation="softmax", name="other_out", kernel_regularizer=other_regularizer
            ),
        ]
    )
    model = Distiller(student, other)
    model(np.zeros((1, 5), "float32"))
    return model


def test_compute_loss_reaching_a_second_model_warns_once_with_its_variables():
    x, y = data()
    model = gm.enable(distiller())
    opt = mixer()
    model.compile(optimizer=opt)
    other = [numpy(v) for v in model.other.trainable_variables]
    students = [numpy(v) for v in model.student.trainable_variables]
    with pytest.warns(PartialMixingWarning) as record:
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    # (Keras's PyTorch backend adds NumPy DeprecationWarnings of its own.)
    record = [r for r in record if issubclass(r.category, PartialMixingWarning)]
    assert len(record) == 1
    message = str(record[0].message)
    assert "4 trainable variable(s)" in message
    for name in ("other_hidden/kernel", "other_hidden/bias", "other_out/kernel", "other_out/bias"):
        assert name in message
    assert "student_dense" not in message
    assert "`teacher.trainable = False`" in message

    # What the warning says: the student's gradient is mixed, the other
    # model's is the plain mean (SGD(1.0): update = gradient).
    w = numpy(opt.example_weights(B, step=0, replica_id=0)).astype(np.float64)
    x64 = x.astype(np.float64)

    def forward(params):
        h = x64
        for i, (kernel, bias) in enumerate(zip(params[::2], params[1::2])):
            z = h @ kernel + bias
            h = np.tanh(z) if i + 1 < len(params) // 2 else _softmax(z)
        return h

    p_student, p_other = forward(students), forward(other)
    onehot = np.eye(3)[y]
    d_student = (p_student - onehot) + _softmax_jvp(p_student, 2 * (p_student - p_other))
    d_other = -2 * (p_student - p_other)
    expected_student = _dense_grads(x64, d_student * (w / B)[:, None])
    update_student = flat(students) - flat(weights_of(model.student))
    assert_float32_close(update_student, expected_student)
    expected_other = _two_layer_grads(x64, other, d_other / B)
    update_other = flat(other) - flat(weights_of(model.other))
    assert_float32_close(update_other, expected_other)

    model.compile(optimizer=mixer(seed=6))  # a new train function, traced again
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialMixingWarning)
        model.fit(x, y, batch_size=B, epochs=1, verbose=0)  # warned once per model


def test_freezing_the_second_model_removes_the_warning_and_its_updates():
    """What the warning suggests for a distillation teacher: ``teacher.trainable = False``.

    The student's first update is the one of the unfrozen run (checked
    against the oracle above); the frozen model's weights do not move.
    """
    x, y = data()

    def first_step(frozen):
        model = gm.enable(distiller())
        model.other.trainable = not frozen
        model.compile(optimizer=mixer())
        students = [numpy(v) for v in model.student.trainable_variables]
        others = [numpy(v) for v in model.other.weights]
        model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
        moved = [not np.array_equal(a, numpy(v)) for a, v in zip(others, model.other.weights)]
        return flat(students) - flat(weights_of(model.student)), moved

    with pytest.warns(PartialMixingWarning, match="teacher.trainable = False"):
        unfrozen, moved = first_step(frozen=False)
    assert any(moved)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialMixingWarning)
        frozen, moved = first_step(frozen=True)
    assert not any(moved)
    np.testing.assert_array_equal(frozen, unfrozen)


def _softmax(z):
    e = np.exp(z - z.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def _softmax_jvp(p, upstream):
    """Gradient at the logits of ``p = softmax(z)`` for upstream ``dL/dp``."""
    return p * (upstream - np.sum(upstream * p, axis=-1, keepdims=True))


def _dense_grads(x, d_logits):
    """Kernel and bias gradients of one Dense layer given ``dL/dlogits``."""
    return np.concatenate([(x.T @ d_logits).ravel(), d_logits.sum(axis=0)])


def _two_layer_grads(x, params, d_p):
    """Gradients of Dense(tanh) -> Dense(softmax) given ``dL/dp``."""
    k1, b1, k2, b2 = [np.asarray(p, np.float64) for p in params]
    h = np.tanh(x @ k1 + b1)
    p = _softmax(h @ k2 + b2)
    d_z2 = _softmax_jvp(p, d_p)
    d_h = d_z2 @ k2.T
    d_z1 = d_h * (1 - h**2)
    return np.concatenate(
        [(x.T @ d_z1).ravel(), d_z1.sum(0), (h.T @ d_z2).ravel(), d_z2.sum(0)]
    )


def test_regularizers_alone_raise_and_warn_nothing():
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    h = keras.layers.Dense(
        8,
        activation="tanh",
        kernel_regularizer=keras.regularizers.L2(0.01),
        bias_regularizer=keras.regularizers.L1(0.01),
        activity_regularizer=keras.regularizers.L2(0.01),
    )(inputs)
    out = keras.layers.Dense(3, activation="softmax", kernel_regularizer=keras.regularizers.L1L2(0.01, 0.01))(h)
    model = gm.Model(inputs, out)
    model.compile(optimizer=mixer(), loss=SCCE)
    x, y = data()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        history = model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    # 3 weight regularizers, 1 activity (JAX keeps no activity loss after a stateless fit).
    assert len(model.losses) == (3 if keras.backend.backend() == "jax" else 4)
    assert all(np.isfinite(history.history["loss"]))
    # The check restores the regularizers it replaces while tracing.
    assert isinstance(model.layers[1].kernel.regularizer, keras.regularizers.L2)
    assert model.layers[1].bias.regularizer.__class__ is keras.regularizers.L1
    assert model.layers[2].bias.regularizer is None


def test_a_regularized_second_model_is_still_named():
    x, y = data()
    model = gm.enable(distiller(other_regularizer=keras.regularizers.L2(0.1)))
    model.compile(optimizer=mixer())
    with pytest.warns(PartialMixingWarning, match="other_out/kernel"):
        model.fit(x, y, batch_size=B, verbose=0)


# -- custom train steps ----------------------------------------------------------


class AppliesGradientsItself:
    """Mixin: a custom ``train_step`` that computes the loss and applies gradients."""

    def train_step(self, data):
        x, y, _ = keras.utils.unpack_x_y_sample_weight(data)
        if keras.backend.backend() == "torch":
            import torch

            self.zero_grad()
            loss = keras.ops.mean(keras.losses.sparse_categorical_crossentropy(y, self(x, training=True)))
            loss.backward()
            grads = [v.value.grad for v in self.trainable_variables]
            with torch.no_grad():
                self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
            return {m.name: m.result() for m in self.metrics}
        with tf.GradientTape() as tape:
            loss = keras.ops.mean(
                keras.losses.sparse_categorical_crossentropy(y, self(x, training=True))
            )
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {m.name: m.result() for m in self.metrics}


class ApplyItself(AppliesGradientsItself, keras.Model):
    """A stock model whose ``train_step`` bypasses ``compute_loss``."""


def apply_itself(kind):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((5,))
    outputs = keras.layers.Dense(3, activation="softmax")(inputs)
    if kind == "enable":
        return gm.enable(ApplyItself(inputs, outputs))
    if kind == "gm.Model subclass":
        return type("GmApplyItself", (AppliesGradientsItself, gm.Model), {})(
            inputs, outputs
        )
    return ApplyItself(inputs, outputs)


@pytest.mark.parametrize("kind", ["enable", "gm.Model subclass"])
@pytest.mark.backends("tensorflow", "torch")  # the train_step above is written for these two
def test_custom_train_step_on_a_hooked_model_gets_the_true_message(kind):
    x, y = data()
    model = apply_itself(kind)
    model.compile(optimizer=mixer())
    before = snapshot(model)
    with pytest.raises(ValueError) as error:
        model.fit(x, y, batch_size=B, verbose=0)
    message = str(error.value)
    assert "has no GradientMix hook" not in message
    assert "`train_step`" in message and "apply_gradients" in message
    assert "optimizer.example_weights(keras.ops.shape(per_example_loss)[0])" in message
    assert "loss = keras.ops.mean(per_example_loss * w)" in message
    assert "level='device'" in message
    assert_unchanged(before, model)


@pytest.mark.backends("tensorflow", "torch")  # the train_step above is written for these two
def test_model_without_hook_keeps_the_enable_message():
    x, y = data()
    model = apply_itself("plain")
    model.compile(optimizer=mixer())
    with pytest.raises(ValueError, match=r"no GradientMix hook.*tf_gradmix.enable\(model\)"):
        model.fit(x, y, batch_size=B, verbose=0)


def recipe_code():
    """The Python block of docs/custom_training.md marked as the recipe."""
    text = (DOCS / "custom_training.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    recipes = [b for b in blocks if "class MixedTrainStep" in b]
    assert len(recipes) == 1, "docs/custom_training.md must hold one recipe block"
    return recipes[0]


@pytest.mark.parametrize("regularizer", [False, True])
@pytest.mark.backends("tensorflow")  # the recipe is a TensorFlow train_step
def test_documented_custom_train_step_recipe_equals_the_per_example_oracle(regularizer):
    namespace = {}
    exec(compile(recipe_code(), "docs/custom_training.md", "exec"), namespace)
    model_class = type("Classifier", (namespace["MixedTrainStep"], keras.Model), {})
    model = functional(model_class, regularizer=regularizer)
    ref = plain_copy(model)
    opt = mixer("rademacher")
    model.compile(optimizer=opt)
    x, y = data()
    before = flat(weights_of(model))
    history = model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    w = numpy(opt.example_weights(B, step=0, replica_id=0)).astype(np.float64)
    assert set(np.round(w, 3)) == {0.3, 1.7}
    expected = grads.T @ (w / B)
    if regularizer:
        expected += regularization_gradient(ref, x)
    assert_float32_close(update, expected)
    np.testing.assert_allclose(history.history["gradmix_gamma"], np.mean(w**2), rtol=1e-6)


@pytest.mark.backends("tensorflow", "torch")  # the train_step above is written for these two
def test_gamma_is_absent_where_no_gradient_was_weighted():
    """A hooked model whose custom step draws no weights logs no gamma (not 0)."""

    class PlainStep(AppliesGradientsItself, gm.Model):
        pass

    x, y = data()
    model = functional(PlainStep, regularizer=False)
    model.compile(optimizer=keras.optimizers.SGD(0.1))  # trains; nothing mixed
    history = model.fit(x, y, batch_size=B, epochs=2, verbose=0)
    assert "gradmix_gamma" in [m.name for m in model.metrics]
    assert "gradmix_gamma" not in history.history
    assert "gradmix_gamma" not in model.train_on_batch(x, y, return_dict=True)


# -- optimizer identifiers ------------------------------------------------------


def test_string_optimizer_trains_and_round_trips_through_a_keras_file(tmp_path):
    x, y = data()
    model = functional(gm.Model)
    model.compile(optimizer=gm.GradientMix("adam", seed=3), loss=SCCE)
    inner = model.optimizer.inner_optimizer
    assert type(inner) is type(keras.optimizers.get("adam"))  # PyTorch's is a subclass of Adam
    assert inner.get_config() == keras.optimizers.get("adam").get_config() | {
        "name": inner.name
    }
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    path = os.path.join(tmp_path, "adam.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert type(loaded.optimizer.inner_optimizer) is type(inner)
    assert loaded.optimizer.get_config() == model.optimizer.get_config()
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    loaded.fit(x, y, batch_size=4, epochs=1, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), loaded.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_config_dict_optimizer_is_built_like_keras_optimizers_get():
    identifier = {"class_name": "SGD", "config": {"learning_rate": 0.25, "momentum": 0.5}}
    opt = gm.GradientMix(identifier, seed=1)
    expected = keras.optimizers.get(dict(identifier))
    assert type(opt.inner_optimizer) is type(expected)
    assert float(numpy(opt.learning_rate)) == 0.25
    assert opt.inner_optimizer.momentum == expected.momentum == 0.5


@pytest.mark.parametrize("identifier", ["no_such_optimizer", {"class_name": "Dense", "config": {}}])
def test_bad_optimizer_identifier_names_the_argument_and_value(identifier):
    with pytest.raises(ValueError, match=r"`inner_optimizer`.*" + re.escape(repr(identifier)[:15])):
        gm.GradientMix(identifier)


# -- under a tf.distribute strategy (replica steps traced in their own threads) ---


@pytest.mark.backends("tensorflow")
def test_checks_and_recipe_hold_under_mirrored_strategy(mirrored_strategy):
    replicas = mirrored_strategy.num_replicas_in_sync
    x, y = data()
    with mirrored_strategy.scope():
        refused = gm.enable(add_loss_model())
        refused.compile(optimizer=mixer())
    with pytest.raises(ValueError, match="does not depend on its predictions"):
        refused.fit([x, y], batch_size=B, verbose=0)

    with mirrored_strategy.scope():
        partial = gm.enable(distiller())
        partial.compile(optimizer=mixer())
    with pytest.warns(PartialMixingWarning, match="other_hidden/kernel"):
        partial.fit(x, y, batch_size=B, verbose=0)

    # The recipe: replica k mixes its shard (examples k*B/K ...) with its own weights.
    namespace = {}
    exec(compile(recipe_code(), "docs/custom_training.md", "exec"), namespace)
    with mirrored_strategy.scope():
        model = functional(type("Classifier", (namespace["MixedTrainStep"], keras.Model), {}),
                           regularizer=False)
        opt = mixer("gaussian")
        model.compile(optimizer=opt)
    ref = plain_copy(model)
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=B, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))
    grads = per_example_gradients(ref, x, y, keras.losses.SparseCategoricalCrossentropy())
    shard = B // replicas
    w = np.concatenate(
        [opt.example_weights(shard, step=0, replica_id=k).numpy() for k in range(replicas)]
    ).astype(np.float64)
    assert_float32_close(update, grads.T @ (w / B))


@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
def test_checks_trace_under_xla_and_mixed_precision(policy):
    """XLA-compiled steps, low-precision predictions, a LossScaleOptimizer around GradientMix.

    PyTorch runs eagerly: tf_gradmix refuses ``jit_compile=True`` there (``backend/test_torch.py``).
    """
    keras.config.set_dtype_policy(policy)
    jit_compile = keras.backend.backend() != "torch"
    x, y = data()

    def optimizer():
        opt = mixer()
        return keras.optimizers.LossScaleOptimizer(opt) if policy == "mixed_float16" else opt

    model = functional(gm.Model)
    model.compile(optimizer=optimizer(), loss=SCCE, jit_compile=jit_compile)
    with warnings.catch_warnings():
        warnings.simplefilter("error", PartialMixingWarning)
        history = model.fit(x, y, batch_size=B, verbose=0)
    assert history.history["gradmix_gamma"][0] > 1

    partial = gm.enable(distiller())
    partial.compile(optimizer=optimizer(), jit_compile=jit_compile)
    with pytest.warns(PartialMixingWarning, match="4 trainable variable"):
        partial.fit(x, y, batch_size=B, verbose=0)
