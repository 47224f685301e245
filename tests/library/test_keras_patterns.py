"""Patterns of everyday Keras training code, each mixed exactly.

Small models of our own, one for each way Keras code trains: augmentation
layers, masks with ``ignore_class``, dict inputs and outputs with
``loss_weights``, a ``compute_loss`` override, a custom ``train_step``, a loss
added with ``add_loss``, an RNN with CTC, a string optimizer, and
recompiling a fine-tuned ``keras.applications`` model. Each runs one real
``fit`` step with ``SGD(1.0)`` (the update is the gradient) and compares it
with an independent update: the gradient of the ``w``-weighted loss written
out by hand, computed on a plain Keras copy in one batched pass
(:func:`weighted_gradient`), or the per-example loop of ``oracles.py``, using
the weights ``GradientMix.example_weights`` reports for the step.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradmix as gm

from oracles import (
    SCCE,
    UNROLLED_ULPS,
    assert_float32_close,
    data,
    flat,
    mixer,
    per_example_gradients,
    weights_of,
)

pytestmark = pytest.mark.backends("tensorflow")  # the patterns use TensorFlow ops and tapes

B = 8


def step_weights(optimizer, batch=B, step=0):
    return optimizer.example_weights(batch, step=step, replica_id=0).numpy()


def fit_update(model, optimizer, x, y, batch_size=B, **compile_kwargs):
    """``before - after`` of one real ``fit`` step."""
    model.compile(optimizer=optimizer, **compile_kwargs)
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=batch_size, epochs=1, shuffle=False, verbose=0)
    return before - flat(weights_of(model))


def weighted_gradient(reference, x, y, w, weighted_loss):
    """Gradient of ``weighted_loss(y, y_pred, w)`` + layer losses, plain Keras.

    One batched forward pass in training mode of ``reference`` (a plain
    Keras model in the same state as the model under test, random layers
    included), one backward pass: no tf_gradmix code.
    """
    with tf.GradientTape() as tape:
        y_pred = reference(x, training=True)
        loss = weighted_loss(y, y_pred, tf.constant(w, tf.float32))
        if reference.losses:
            loss = loss + tf.add_n(reference.losses)
    grads = tape.gradient(loss, reference.trainable_variables)
    return flat(
        [tf.zeros(v.shape) if g is None else g for g, v in zip(grads, reference.trainable_variables)]
    )


def twins(build, build_reference=None):
    """The model under test and its plain copy, built from the same seed."""
    keras.utils.set_random_seed(0)
    model = build()
    keras.utils.set_random_seed(0)
    reference = (build_reference or build)()
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)
    return model, reference


def images(n=B, size=8, channels=2, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, size, size, channels)).astype(np.float32), rng.integers(0, 3, n)


# -- augmentation layers ----------------------------------------------------------


def augmenting_cnn():
    return keras.Sequential(
        [
            keras.Input((8, 8, 2)),
            keras.layers.RandomFlip("horizontal"),
            keras.layers.RandomTranslation(0.25, 0.25),
            keras.layers.RandomContrast(0.5),
            keras.layers.Conv2D(4, 3, activation="relu"),
            keras.layers.GlobalAveragePooling2D(),
            keras.layers.Dense(3),
        ]
    )


def test_augmentation_layers_are_mixed_on_the_augmented_batch():
    x, y = images()
    model, reference = twins(augmenting_cnn)
    opt = mixer("gaussian")
    update = fit_update(
        gm.enable(model), opt, x, y, loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    w = step_weights(opt)
    expected = weighted_gradient(
        reference,
        x,
        y,
        w,
        lambda y, p, w: tf.reduce_mean(
            w * keras.losses.sparse_categorical_crossentropy(y, p, from_logits=True)
        ),
    )
    assert_float32_close(update, expected)
    # The augmentation was random: without it the gradient differs.
    assert np.max(np.abs(update - _unaugmented_gradient(reference, x, y, w))) > 1e-3


def _unaugmented_gradient(reference, x, y, w):
    head = keras.Sequential(reference.layers[3:])
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(
            w * keras.losses.sparse_categorical_crossentropy(y, head(x), from_logits=True)
        )
    return flat(tape.gradient(loss, head.trainable_variables))


# -- masks and ignore_class --------------------------------------------------------

T, VOCAB, TAGS = 6, 7, 4


def tagger():
    inputs = keras.Input((T,), dtype="int32")
    h = keras.layers.Embedding(VOCAB, 5, mask_zero=True)(inputs)
    h = keras.layers.Dense(6, activation="tanh")(h)
    return keras.Model(inputs, keras.layers.Dense(TAGS, activation="softmax")(h))


def tagged_sequences(n=B, seed=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(2, T + 1, n)
    tokens = np.zeros((n, T), np.int32)  # 0: padding, hidden by the Embedding's mask
    tags = np.zeros((n, T), np.int64)  # a valid class under the padding
    for b, length in enumerate(lengths):
        tokens[b, :length] = rng.integers(1, VOCAB, length)
        tags[b, :length] = rng.integers(0, TAGS, length)
        tags[b, rng.integers(0, length)] = -1  # an ignored token inside the sequence
    return tokens, tags


def test_padding_mask_and_ignore_class_weight_whole_sequences():
    x, y = tagged_sequences()
    model, reference = twins(tagger)
    opt = mixer("rademacher")
    update = fit_update(
        gm.enable(model), opt, x, y, loss=keras.losses.SparseCategoricalCrossentropy(ignore_class=-1)
    )
    w = step_weights(opt)

    def masked_mean(y, p, w):
        valid = tf.cast((y != -1) & (x != 0), tf.float32)
        token_loss = keras.losses.sparse_categorical_crossentropy(tf.maximum(y, 0), p)
        return tf.reduce_sum(w[:, None] * valid * token_loss) / tf.reduce_sum(valid)

    assert_float32_close(update, weighted_gradient(reference, x, y, w, masked_mean))


# -- dict inputs and outputs with loss_weights --------------------------------------


def two_headed():
    a = keras.Input((5,), name="a")
    b = keras.Input((3,), name="b")
    h = keras.layers.Dense(6, activation="tanh")(keras.layers.Concatenate()([a, b]))
    return keras.Model(
        {"a": a, "b": b},
        {
            "label": keras.layers.Dense(3, activation="softmax", name="label")(h),
            "score": keras.layers.Dense(2, name="score")(h),
        },
    )


def test_dict_inputs_and_outputs_with_loss_weights():
    rng = np.random.default_rng(1)
    x = {"a": rng.normal(size=(B, 5)).astype(np.float32), "b": rng.normal(size=(B, 3)).astype(np.float32)}
    y = {"label": rng.integers(0, 3, B), "score": rng.normal(size=(B, 2)).astype(np.float32)}
    model, reference = twins(two_headed)
    opt = mixer("gaussian")
    update = fit_update(
        gm.Model(model.inputs, model.outputs),
        opt,
        x,
        y,
        loss={"label": SCCE, "score": "mse"},
        loss_weights={"label": 1.0, "score": 0.25},
    )
    w = step_weights(opt)

    def weighted(y, p, w):
        ce = keras.losses.sparse_categorical_crossentropy(y["label"], p["label"])
        se = tf.reduce_mean(tf.square(y["score"] - p["score"]), axis=-1)
        return tf.reduce_mean(w * ce) + 0.25 * tf.reduce_mean(w * se)

    assert_float32_close(update, weighted_gradient(reference, x, y, w, weighted))


# -- a compute_loss override ----------------------------------------------------------


class ConfidencePenalty(keras.Model):
    """Cross-entropy minus 0.1 x the entropy of the predictions, written by hand.

    The override predates Keras's ``training`` argument, as old code does.
    """

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None):
        ce = keras.losses.sparse_categorical_crossentropy(y, y_pred)
        entropy = -keras.ops.sum(y_pred * keras.ops.log(y_pred + 1e-7), axis=-1)
        return keras.ops.mean(ce - 0.1 * entropy) + keras.ops.sum(self.losses)


def penalised_mlp():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01))(inputs)
    return ConfidencePenalty(inputs, keras.layers.Dense(3, activation="softmax")(h))


def test_compute_loss_override_is_mixed_with_its_own_terms():
    x, y = data(B)
    model, reference = twins(penalised_mlp)
    opt = mixer("gaussian")
    update = fit_update(gm.enable(model), opt, x, y)
    w = step_weights(opt)

    def weighted(y, p, w):
        ce = keras.losses.sparse_categorical_crossentropy(y, p)
        entropy = -tf.reduce_sum(p * tf.math.log(p + 1e-7), axis=-1)
        return tf.reduce_mean(w * (ce - 0.1 * entropy))

    assert_float32_close(update, weighted_gradient(reference, x, y, w, weighted))
    # Evaluation uses the override unmixed.
    assert np.isfinite(model.evaluate(x, y, verbose=0))


# -- a custom train_step ---------------------------------------------------------------


class StepThatCallsComputeLoss(keras.Model):
    """The "customize what happens in fit" pattern: the step calls ``compute_loss``."""

    def train_step(self, data):
        x, y = data
        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, training=True)
        grads = tape.gradient(loss, self.trainable_variables)
        self.optimizer.apply_gradients(zip(grads, self.trainable_variables))
        return {"loss": loss}


def custom_step_mlp():
    inputs = keras.Input((5,))
    h = keras.layers.Dense(8, activation="tanh")(inputs)
    return StepThatCallsComputeLoss(inputs, keras.layers.Dense(3, activation="softmax")(h))


def test_custom_train_step_that_calls_compute_loss_is_mixed_by_the_hook():
    x, y = data(B)
    model, reference = twins(custom_step_mlp)
    opt = mixer("rademacher")
    update = fit_update(gm.enable(model), opt, x, y, loss=SCCE)
    grads = per_example_gradients(reference, x, y, keras.losses.SparseCategoricalCrossentropy())
    assert_float32_close(update, grads.T @ (step_weights(opt).astype(np.float64) / B))


# -- losses added with add_loss -----------------------------------------------------------


class CrossEntropyEndpoint(keras.layers.Layer):
    """Endpoint layer: per-example cross-entropy from labels given as an input.

    ``mode="output"`` returns the per-example losses (the model output a
    compiled loss reads); ``mode="add_loss"`` adds their mean with
    ``add_loss``; ``mode="weighted"`` too, each multiplied by the
    optimizer's example weights while training.
    """

    def __init__(self, mode, optimizer=None, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode
        self.mixing_optimizer = optimizer

    def call(self, labels, probabilities, training=False):
        losses = keras.losses.sparse_categorical_crossentropy(labels, probabilities)
        if self.mode == "output":
            return losses
        if self.mode == "weighted" and training:
            w = self.mixing_optimizer.example_weights(keras.ops.shape(losses)[0])
            losses = losses * w
        self.add_loss(keras.ops.mean(losses))
        return probabilities


def endpoint_model(mode, optimizer=None):
    features = keras.Input((5,))
    labels = keras.Input((), dtype="int32")
    h = keras.layers.Dense(8, activation="tanh")(features)
    probabilities = keras.layers.Dense(3, activation="softmax", name="probabilities")(h)
    outputs = CrossEntropyEndpoint(mode, optimizer)(labels, probabilities)
    return keras.Model([features, labels], outputs)


def _endpoint_oracle(reference, x, y, w):
    plain = keras.Model(reference.inputs[0], reference.get_layer("probabilities").output)
    grads = per_example_gradients(plain, x, y, keras.losses.SparseCategoricalCrossentropy())
    return grads.T @ (w.astype(np.float64) / B)


def test_add_loss_fixes_per_example_losses_as_output_or_weighted_in_the_layer():
    x, y = data(B)
    # (a) The per-example losses as the model output, a compiled loss reads
    # them (Keras's compiled losses want targets: zeros, unused).
    model, reference = twins(lambda: endpoint_model("output"))
    opt = mixer("gaussian")
    update = fit_update(
        gm.enable(model), opt, [x, y], np.zeros(B), loss=lambda y_true, y_pred: y_pred
    )
    assert_float32_close(update, _endpoint_oracle(reference, x, y, step_weights(opt)))

    # (b) A plain model whose layer weights its add_loss with the optimizer's weights.
    opt = mixer("rademacher", seed=9)
    model, reference = twins(lambda: endpoint_model("weighted", opt))
    update = fit_update(model, opt, [x, y], None)
    assert_float32_close(update, _endpoint_oracle(reference, x, y, step_weights(opt)))


def test_add_loss_only_enabled_model_is_refused():
    x, y = data(B)
    model = gm.enable(endpoint_model("add_loss"))
    with pytest.raises(ValueError, match="does not depend on its predictions"):
        fit_update(model, mixer(), [x, y], None)


# -- an RNN with CTC ---------------------------------------------------------------------

FRAMES, FEATURES, SYMBOLS, LABEL_LENGTH = 7, 3, 4, 3  # symbol 0 is CTC's blank


def ctc_rnn():
    inputs = keras.Input((FRAMES, FEATURES))
    h = keras.layers.Bidirectional(keras.layers.GRU(4, return_sequences=True))(inputs)
    return keras.Model(inputs, keras.layers.Dense(SYMBOLS + 1)(h))  # logits


def ctc_data(n=B, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, FRAMES, FEATURES)).astype(np.float32)
    labels = np.zeros((n, LABEL_LENGTH), np.int32)  # 0-padded
    for b in range(n):
        length = rng.integers(1, LABEL_LENGTH + 1)
        labels[b, :length] = rng.integers(1, SYMBOLS + 1, length)
    return x, labels


def test_rnn_with_ctc_loss_is_mixed_per_sequence():
    x, y = ctc_data()
    model, reference = twins(ctc_rnn)
    opt = mixer("gaussian")
    update = fit_update(gm.enable(model), opt, x, y, loss=keras.losses.CTC())
    expected = weighted_gradient(
        reference, x, y, step_weights(opt), lambda y, p, w: tf.reduce_mean(w * keras.losses.ctc(y, p))
    )
    # The recurrent backward pass rounds in every frame: 2 ulps a layer-step.
    assert_float32_close(update, expected, ulps=UNROLLED_ULPS)


# -- a string optimizer --------------------------------------------------------------------


def test_string_optimizer_mixes_with_the_optimizer_keras_would_build():
    x, y = data(B)
    model, reference = twins(lambda: keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]))
    opt = gm.GradientMix("sgd", stddev=0.7, seed=5)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    update = fit_update(gm.enable(model), opt, x, y, loss=loss)
    lr = float(keras.optimizers.get("sgd").learning_rate)  # Keras's default, 0.01
    grads = per_example_gradients(reference, x, y, loss)
    before = flat(weights_of(reference))
    expected = before - lr * (grads.T @ (step_weights(opt).astype(np.float64) / B))
    # Compared as weights: the update (0.01 x the gradient) is rounded to
    # the float32 weights it is subtracted from.
    assert_float32_close(before - update, expected)

    # A string at compile time, as Keras scripts write it, trains like Keras.
    model, reference = twins(
        lambda: gm.Sequential([keras.Input((5,)), keras.layers.Dense(3)]),
        lambda: keras.Sequential([keras.Input((5,)), keras.layers.Dense(3)]),
    )
    fit_update(model, "adam", x, y, loss=loss)
    fit_update(reference, "adam", x, y, loss=loss)
    for a, b in zip(model.get_weights(), reference.get_weights()):
        np.testing.assert_array_equal(a, b)


# -- recompiling a fine-tuned keras.applications model --------------------------------------


def fine_tuned_application():
    base = keras.applications.MobileNet(
        input_shape=(32, 32, 3), alpha=0.25, include_top=False, weights=None, pooling="avg"
    )
    inputs = keras.Input((32, 32, 3))
    outputs = keras.layers.Dense(3, activation="softmax")(base(inputs))
    return keras.Model(inputs, outputs), base


def test_recompiled_fine_tuned_application_is_mixed_over_the_unfrozen_layers():
    rng = np.random.default_rng(2)
    x = rng.uniform(-1, 1, size=(B, 32, 32, 3)).astype(np.float32)
    y = rng.integers(0, 3, B)
    keras.utils.set_random_seed(0)
    model, base = fine_tuned_application()
    model = gm.enable(model)
    # Phase 1: the head alone (frozen base, its BatchNorm in inference mode).
    base.trainable = False
    fit_update(model, mixer(seed=1), x, y, loss=SCCE)
    # Phase 2: unfreeze the last blocks, recompile with a new optimizer.
    base.trainable = True
    for layer in base.layers[:-6]:
        layer.trainable = False
    keras.utils.set_random_seed(0)
    reference, reference_base = fine_tuned_application()
    for layer, twin in zip(base.layers, reference_base.layers):
        twin.trainable = layer.trainable
    reference.set_weights(model.get_weights())
    assert len(model.trainable_variables) == len(reference.trainable_variables) > 2
    opt = mixer("rademacher", seed=11)
    update = fit_update(model, opt, x, y, loss=SCCE)
    w = step_weights(opt)
    expected = weighted_gradient(
        reference,
        x,
        y,
        w,
        lambda y, p, w: tf.reduce_mean(w * keras.losses.sparse_categorical_crossentropy(y, p)),
    )
    assert_float32_close(update, expected, ulps=UNROLLED_ULPS)
