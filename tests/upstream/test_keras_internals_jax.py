"""The Keras private internals tf_gradmix relies on under JAX: fails when upstream changes them.

Each test pins one private attribute or behaviour of Keras 3.15's JAX backend
that ``tf_gradmix/backend/_keras.py`` reads (its sections "Output masks" and
"The JAX train step's state") and names the code that depends on it
(``tf_gradmix/backend/jax/``). When one fails, Keras changed: update that code
and ``_keras.TESTED_KERAS``. The TensorFlow side is
``test_keras_internals.py``; the JAX trainer's compiled step,
``test_keras_jax.py``.
"""

import inspect

import jax.numpy as jnp
import keras
import numpy as np
import pytest

from tf_gradmix.backend import _keras
from tf_gradmix.backend import jax as jax_backend

from oracles import SCCE, data, functional

pytestmark = pytest.mark.backends("jax")


def test_output_masks_live_in_the_side_table_keras_losses_read():
    """``_keras.get_keras_mask``/``set_keras_mask`` (``keras.src.backend.common.masking``):
    a mask attached to a JAX array is what Keras's losses apply, and
    ``tf_gradmix.backend.jax.transform_output`` carries it to the mixed output."""
    rng = np.random.RandomState(0)
    y_true = jnp.asarray(rng.randint(0, 4, (2, 3)))
    logits = jnp.asarray(rng.randn(2, 3, 4).astype("float32"))
    mask = jnp.asarray([[True, True, False], [True, False, False]])
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    masked = jnp.array(logits)  # a new array: masks are keyed by array
    _keras.set_keras_mask(masked, mask)
    assert _keras.get_keras_mask(masked) is mask
    assert _keras.get_keras_mask(logits) is None
    # Keras averages a masked loss over the valid elements.
    per_element = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)(y_true, logits)
    valid = np.asarray(mask, "float32")
    expected = float(np.sum(np.asarray(per_element) * valid) / np.sum(valid))
    np.testing.assert_allclose(loss(y_true, masked), expected, rtol=1e-6)
    carried = jax_backend.transform_output(masked, lambda t: t * 1.0)
    assert _keras.get_keras_mask(carried) is mask


def test_compute_loss_still_sees_stale_optimizer_values_in_jax_steps():
    """Keras 3.15's ``JAXTrainer.compute_loss_and_updates`` takes the optimizer's
    values as ``optimizer_variables`` (``_keras.loss_step_optimizer_values``)
    but does not map them where ``compute_loss`` runs: a loss that reads an
    optimizer variable sees the variable's own value, not the step's. That is
    why ``tf_gradmix.backend.jax.trainer`` records them for ``read``; when
    this fails (the step's value is seen), that side channel can go."""
    from keras.src.backend.jax.trainer import JAXTrainer

    assert "optimizer_variables" in inspect.signature(JAXTrainer.compute_loss_and_updates).parameters
    seen = []

    class Probe(keras.Model):
        def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
            seen.append(int(keras.ops.convert_to_numpy(self.optimizer.iterations.value)))
            return super().compute_loss(x, y, y_pred, sample_weight, training=training)

    x, y = data(8)
    model = functional(Probe)
    model.compile(keras.optimizers.SGD(0.1), SCCE)
    model.optimizer.build(model.trainable_variables)
    values = [jnp.asarray(v.value) for v in model.optimizer.variables]
    index = next(i for i, v in enumerate(model.optimizer.variables) if v is model.optimizer.iterations)
    values[index] = jnp.asarray(7, values[index].dtype)
    kwargs = {"optimizer_variables": values}
    assert _keras.loss_step_optimizer_values(kwargs) is values
    model.compute_loss_and_updates(
        [v.value for v in model.trainable_variables],
        [v.value for v in model.non_trainable_variables],
        [v.value for v in model.metrics_variables],
        x, y, None, training=True, **kwargs,
    )
    assert seen == [0], seen


def test_a_step_that_raises_still_leaves_the_model_variables_purged():
    """Keras 3.15's JAX ``fit`` moves the state out of the variables before the
    first step and puts back only the state of a step that returned
    (keras-team/keras#21019 covers an interrupted ``fit``, not a step that
    raises): the model's variables hold no value afterwards. That is why
    ``tf_gradmix.backend.jax.trainer.restore_after_failed_step`` exists, fed by
    ``_keras.jax_train_state``; when this fails, Keras restores them itself."""

    class Refuses(keras.Model):
        def train_step(self, state, data):  # only the train function calls it, after the purge
            raise RuntimeError("refused")

    x, y = data(8)
    model = functional(Refuses)
    model.compile(keras.optimizers.SGD(0.1), SCCE)
    with pytest.raises(RuntimeError, match="refused"):
        model.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert all(v._value is None for v in model.trainable_variables)
    state = ([1], [2], [3], [4])
    assert _keras.jax_train_state((state, "data")) == state
    assert _keras.jax_train_state(("data",)) is None
