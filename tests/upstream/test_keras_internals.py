"""The Keras private internals tf_gradmix relies on: fails when upstream changes them.

No upstream bug behind these: each test pins a private attribute or code path
of Keras 3.15 that the compatibility code reads, and names that code
(``tf_gradmix/backend/_keras.py``, ``tf_gradmix/backend/tensorflow/``). When
one fails, Keras changed: update that code and ``_keras.TESTED_KERAS``.
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tf_gradmix.backend import _keras
from tf_gradmix.backend import tensorflow as tf_backend
from tf_gradmix.backend.tensorflow import trainer as gm_trainer
from tf_gradmix.model import mix_predictions

pytestmark = pytest.mark.backends("tensorflow")


def test_installed_keras_is_a_tested_version():
    """``_keras.TESTED_KERAS``: the versions the workarounds are switched on for."""
    assert _keras.keras_version() in _keras.TESTED_KERAS, (
        f"Keras {keras.__version__} is not a version tf_gradmix.backend was "
        "checked against; re-run this file and update TESTED_KERAS."
    )


# Extreme logits: a cross-entropy computed from clipped probabilities differs
# from the one computed from logits, so a lost annotation shows in the value.
LOGITS = np.array([[30.0, -30.0, 0.0], [-40.0, 40.0, 1.0]], "float32")
LABELS = np.array([1, 0])


def _losses(make_output, loss):
    @tf.function
    def run():
        out = make_output(tf.constant(LOGITS))
        weights = tf.constant([1.0, 1.0])
        naive = tf.identity(out)
        return loss(LABELS, out), loss(LABELS, mix_predictions(out, weights)), loss(LABELS, naive)

    return [float(v) for v in run()]


@pytest.mark.parametrize(
    "make_output",
    [keras.activations.softmax, lambda t: tf.nn.softmax(t)],
    ids=["keras_softmax(_keras_logits)", "raw_Softmax_op"],
)
def test_probability_outputs_keep_their_logits(make_output):
    """Keras's cross-entropy reads the logits a softmax output carries
    (``_keras_logits``, or the raw Softmax op's input);
    ``tf_gradmix.backend.tensorflow.transform_output`` keeps them through the mix."""
    plain, mixed, naive = _losses(make_output, keras.losses.SparseCategoricalCrossentropy())
    assert mixed == plain
    # Without the annotation Keras takes another path: this is what transform_output guards.
    assert naive != pytest.approx(plain, rel=1e-3)


def test_sigmoid_outputs_keep_their_logits():
    """As above, for a sigmoid output and binary cross-entropy (``transform_output``)."""
    labels = np.array([[0.0, 1.0, 0.0], [1.0, 0.0, 1.0]], "float32")  # confidently wrong

    @tf.function
    def run():
        out = keras.activations.sigmoid(tf.constant(LOGITS))
        loss = keras.losses.BinaryCrossentropy()
        return loss(labels, out), loss(labels, mix_predictions(out, tf.ones([2]))), loss(labels, tf.identity(out))

    plain, mixed, naive = [float(v) for v in run()]
    assert mixed == plain and naive != pytest.approx(plain, rel=1e-3)


def test_masks_survive_the_transform():
    """``_keras_mask`` on ``y_pred``, which Keras's losses read: kept by ``transform_output``."""
    @tf.function
    def run():
        out = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 4)).astype("float32"))
        out._keras_mask = tf.constant([[True, True, False], [True, False, False]])
        return tf_backend.transform_output(out, tf.identity)._keras_mask

    np.testing.assert_array_equal(run().numpy(), [[True, True, False], [True, False, False]])


def test_keras_still_decides_the_training_argument_once_per_model():
    """``model._compute_loss_has_training_arg`` and ``model._tracker.locked``:
    set and unlocked by ``_keras.set_compute_loss`` and ``track_metric``."""
    model = keras.Sequential([keras.Input((2,)), keras.layers.Dense(1)])
    assert model._compute_loss_has_training_arg is True
    assert hasattr(model._tracker, "locked")


def test_trainer_methods_the_multi_worker_workaround_wraps(mirrored_strategy):
    """``_keras.WRAPPED_TRAINER_METHODS`` are methods of Keras 3.15's
    ``TensorFlowTrainer`` with the arguments ``tf_gradmix.backend.tensorflow.trainer``
    passes (keras-team/keras#20585), and ``_keras.in_multi_worker_mode`` is
    the test Keras itself applies to the strategy."""
    import inspect

    from keras.src.backend.tensorflow.trainer import TensorFlowTrainer

    parameters = {
        name: list(inspect.signature(getattr(TensorFlowTrainer, name)).parameters)
        for name in _keras.WRAPPED_TRAINER_METHODS
    }
    assert parameters == {"_maybe_symbolic_build": ["self", "iterator", "data_batch"],
                          "_make_function": ["self", "step_function"]}
    assert "strategy.extended._in_multi_worker_mode()" in inspect.getsource(inspect.getmodule(TensorFlowTrainer))
    assert _keras.in_multi_worker_mode(mirrored_strategy) is False
    with pytest.raises(ValueError, match="Invalid value for argument `name`"):
        _keras.wrap_trainer_method(keras.Sequential(), "fit", lambda base: base)


def test_an_untested_keras_version_is_warned_about():
    """``_keras.warn_if_untested`` and the multi-worker fit guard switch off past TESTED_KERAS."""
    assert _keras.warn_if_untested() is False  # the installed, tested version
    with pytest.warns(UserWarning, match=r"tested with Keras 3\.15.*version-guarded workarounds are off"):
        assert _keras.warn_if_untested((3, 99)) is True
    assert not gm_trainer.multi_worker_fit_workaround_applies((3, 99))


def test_optimizer_internals_used_by_accumulation():
    """What ``tf_gradmix.backend.tensorflow.optimizer`` (and the JAX one) read
    of a Keras optimizer through ``tf_gradmix/backend/_keras.py``: one
    accumulator per variable, found by variable in any order; the raw counter
    counts micro-steps (``iterations`` counts updates); a variable tracked from
    outside joins ``optimizer.variables``."""
    variables = [keras.Variable(np.zeros((2, 3), "float32")), keras.Variable(np.zeros((3,), "float32"))]
    optimizer = keras.optimizers.SGD(0.1, gradient_accumulation_steps=2)
    optimizer.build(variables)
    accumulators = _keras.gradient_accumulators(optimizer, variables[::-1])
    assert [tuple(a.shape) for a in accumulators] == [(3,), (2, 3)]
    assert all(a.path.endswith("_gradient_accumulator") for a in accumulators)
    grads = [np.ones((2, 3), "float32"), np.full((3,), 2.0, "float32")]
    for _ in range(3):
        optimizer.apply(grads, variables)
    np.testing.assert_array_equal(_keras.gradient_accumulators(optimizer, variables)[1].numpy(), 2.0)
    assert int(_keras.raw_iterations(optimizer).numpy()) == 3
    assert int(optimizer.iterations.numpy()) == 1
    extra = keras.Variable(np.zeros(()), trainable=False, name="extra")
    _keras.track_optimizer_variable(optimizer, extra)
    assert any(v is extra for v in optimizer.variables)
