"""Gradient accumulation: ``gradient_accumulation_steps`` on the inner optimizer.

Across replicas (``tf_gradmix.backend.tensorflow.optimizer``, TensorFlow, MirroredStrategy)
against the per-example oracle; on every backend (on JAX through
``tf_gradmix.backend.jax.optimizer``) against stock Keras's own
accumulation on one device, for optimizers whose update depends on the
update count (Adam's and LAMB's bias corrections), on clipping, weight decay
and loss scaling."""

import contextlib
import functools
import types

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
    mixer,
    numpy,
    per_example_gradients,
    plain_copy,
    regularization_gradient,
    weights_of,
)

if keras.backend.backend() == "tensorflow":  # the tests that use it are marked
    import tensorflow as tf

K = 4  # logical CPU replicas (conftest)

#: Inner optimizers whose accumulated update is compared with stock Keras's.
#: ``epsilon`` is large against the gradients (about 0.1 here) so that
#: float32 rounding of a gradient entry near zero cannot flip the sign of an
#: Adam step; counting micro-steps instead of updates in the bias corrections
#: changes the first Adam step by about a third.
INNER_OPTIMIZERS = {
    "sgd_momentum": lambda steps: keras.optimizers.SGD(0.1, momentum=0.9, gradient_accumulation_steps=steps),
    "sgd_clipnorm": lambda steps: keras.optimizers.SGD(0.1, clipnorm=0.05, gradient_accumulation_steps=steps),
    "adam": lambda steps: keras.optimizers.Adam(0.1, epsilon=0.01, gradient_accumulation_steps=steps),
    "adamw": lambda steps: keras.optimizers.AdamW(
        0.1, weight_decay=0.1, epsilon=0.01, gradient_accumulation_steps=steps),
    "lamb": lambda steps: gm.optimizers.LAMB(0.1, epsilon=0.01, gradient_accumulation_steps=steps),
    "sgd_loss_scale": lambda steps: keras.optimizers.SGD(
        0.1, loss_scale_factor=128.0, gradient_accumulation_steps=steps),
}


def updates_of(make_inner, model_class, steps, updates=2, micro_batch=16, strategy=None):
    """Weight changes after each of ``updates`` updates of one ``fit`` (float64, flat)."""
    x, y = data(micro_batch * steps * updates)
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        model = functional(model_class)  # seeded: the same initial weights
        inner = make_inner(steps)
        optimizer = inner if model_class is keras.Model else mixer(stddev=0.0, inner=inner)
        model.compile(optimizer, SCCE)
    weights = [flat(weights_of(model))]

    class AfterEachUpdate(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if (batch + 1) % steps == 0:
                weights.append(flat(weights_of(self.model)))

    # One fit (one input pipeline, the costly part of a fit under a strategy) of every micro-batch.
    model.fit(x, y, batch_size=micro_batch, epochs=1, shuffle=False, verbose=0, callbacks=[AfterEachUpdate()])
    assert len(weights) == updates + 1
    return [after - before for before, after in zip(weights, weights[1:])], optimizer


@functools.cache
def stock_updates(name):
    """Stock Keras's updates on one device with ``INNER_OPTIMIZERS[name]``: the
    reference of every comparison below, trained once per optimizer."""
    return updates_of(INNER_OPTIMIZERS[name], keras.Model, steps=3)[0]


def assert_updates_close(actual, expected):
    """Updates of float32 training from equal weights and data, up to rounding.

    The gradients agree to a few float32 ulps of their largest entry, and an
    update (SGD, Adam with the large ``epsilon`` above, LAMB's trust ratio)
    is a smooth function of them; ``1e-5`` of the largest update entry leaves
    room for that, while the errors these tests catch (bias corrections that
    count micro-steps, a gradient accumulated twice or dropped, clipping or
    decay on the wrong quantity) move entries by percents of it.
    """
    for a, e in zip(actual, expected):
        np.testing.assert_allclose(a, e, rtol=0, atol=1e-5 * np.max(np.abs(e)))


@pytest.mark.parametrize("name", sorted(INNER_OPTIMIZERS))
def test_accumulated_updates_equal_stock_keras_on_one_device(name):
    """``GradientMix(stddev=0)`` mixes nothing, so it must update as the inner optimizer alone does."""
    make_inner = INNER_OPTIMIZERS[name]
    expected = stock_updates(name)
    actual, optimizer = updates_of(make_inner, gm.Model, steps=3)
    assert_updates_close(actual, expected)
    assert int(numpy(optimizer.iterations)) == 2 and int(numpy(optimizer.raw_step)) == 6


@pytest.mark.backends("jax")
@pytest.mark.parametrize("name", ["adamw", "lamb", "sgd_loss_scale"])
def test_accumulated_updates_in_one_jax_step_with_a_conditional_equal_stock_keras(name, monkeypatch):
    """Where ``fit``'s two compiled steps do not apply (a custom loop, another
    wrapper around the ``GradientMix``), one step holds the update in a
    conditional: the same updates as stock Keras."""
    from tf_gradmix.backend.jax import optimizer as jax_optimizer

    monkeypatch.setattr(jax_optimizer, "train_function", lambda model: None)
    make_inner = INNER_OPTIMIZERS[name]
    expected = stock_updates(name)
    actual, optimizer = updates_of(make_inner, gm.Model, steps=3)
    assert_updates_close(actual, expected)
    assert int(numpy(optimizer.iterations)) == 2 and int(numpy(optimizer.raw_step)) == 6


@pytest.mark.slow
@pytest.mark.backends("tensorflow")
@pytest.mark.parametrize("name", sorted(set(INNER_OPTIMIZERS) - {"sgd_clipnorm"}))
def test_accumulated_updates_across_replicas_equal_stock_keras_on_one_device(name, mirrored_strategy):
    """Under MirroredStrategy (where Keras cannot accumulate) the update of a
    global micro-batch spread over ``K`` replicas is the one-device update.
    (Clipping acts per replica there, as in Keras without accumulation: the
    clipping test above.)"""
    make_inner = INNER_OPTIMIZERS[name]
    expected = stock_updates(name)
    actual, optimizer = updates_of(make_inner, gm.Model, steps=3, strategy=mirrored_strategy)
    assert_updates_close(actual, expected)
    assert int(numpy(optimizer.iterations)) == 2 and int(numpy(optimizer.raw_step)) == 6


@pytest.fixture(scope="module")
def one_window(mirrored_strategy, tmp_path_factory):
    """``one_window(level)``: one ``fit`` of a window of 3 micro-batches of 16
    across the ``K`` replicas (``SGD(1.0)``, so the update is the accumulated
    mean), read mid-window (after 2 micro-batches) by a callback that also
    saves a weights file and a checkpoint there, as ``BackupAndRestore`` does.
    Trained once per level for the tests that inspect it."""
    runs = {}

    def run(level):
        if level not in runs:
            runs[level] = _one_window(mirrored_strategy, level, tmp_path_factory.mktemp(f"window_{level}"))
        return runs[level]

    return run


def _one_window(strategy, level, folder):
    x, y = data(48)
    with strategy.scope():
        inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=3)
        model = functional(gm.Model)
        opt = mixer(level=level, stddev=0.6, seed=3, inner=inner)
        model.compile(opt, SCCE)
    run = types.SimpleNamespace(x=x, y=y, model=model, opt=opt, inner=inner, ref=plain_copy(model),
                                before=flat(weights_of(model)), weights_file=folder / "mid_window.weights.h5")

    class MidWindow(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 1:  # two micro-steps of three
                run.mid_weights = flat(weights_of(model))
                run.mid_local = local_accumulators(strategy, opt)
                run.mid_read = flat([numpy(a) for a in inner._accumulated_gradients])
                model.save_weights(run.weights_file)  # what BackupAndRestore writes
                run.checkpoint = tf.train.Checkpoint(optimizer=opt).write(str(folder / "mid_window"))

    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0, callbacks=[MidWindow()])
    run.update = run.before - flat(weights_of(model))
    run.local = local_accumulators(strategy, opt)
    run.counts = int(numpy(opt.raw_step)), int(numpy(opt.iterations)), int(numpy(inner._iterations))
    return run


@pytest.mark.slow
@pytest.mark.parametrize("level", ["sample", "device"])
@pytest.mark.backends("tensorflow")
def test_gradient_accumulation_across_replicas(one_window, level):
    # Stock Keras 3.15 cannot accumulate under a strategy (keras-team/keras#20582,
    # tests/upstream/test_keras_distribute.py); GradientMix does it in cross-replica context.
    run = one_window(level)
    x, y, opt, ref, update = run.x, run.y, run.opt, run.ref, run.update

    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    regularization = regularization_gradient(ref, x)
    expected = regularization if level == "sample" else 0.0
    for step in range(3):
        device = numpy(opt.device_weights(K, step=step))
        for k in range(K):
            s = slice(16 * step + 4 * k, 16 * step + 4 * k + 4)
            grads = per_example_gradients(ref, x[s], y[s], loss_fn)
            if level == "sample":
                w = numpy(opt.example_weights(4, step=step, replica_id=k))
            else:  # the replica's whole loss, regularizer included, weighs w_k
                w = np.full(4, device[k])
                expected = expected + device[k] * regularization / K / 3
            # Each micro-batch: Keras's pi = w / (K B_k); the update averages the 3.
            expected = expected + grads.T @ w / (K * 4) / 3
    assert_float32_close(update, expected)
    raw_step, iterations, inner_iterations = run.counts
    assert raw_step == 3 and iterations == 1
    assert inner_iterations == 3  # Keras's micro-step count


def accumulation_terms(opt, ref, x, y, level, steps, micro_batch=16):
    """``terms[s][k]``: what replica ``k`` adds at micro-step ``s`` (float64).

    Keras weighs replica ``k``'s examples by ``1 / (K B_k)`` and adds the
    regularizer once per replica's loss, scaled by ``1 / K``; GradientMix
    multiplies by ``w_b`` (sample level) or by ``w_k`` (device level: the
    replica's whole loss).
    """
    loss_fn = keras.losses.SparseCategoricalCrossentropy()
    regularization = regularization_gradient(ref, x)
    size = micro_batch // K
    terms = []
    for step in range(steps):
        device = numpy(opt.device_weights(K, step=step))
        row = []
        for k in range(K):
            s = slice(micro_batch * step + size * k, micro_batch * step + size * (k + 1))
            grads = per_example_gradients(ref, x[s], y[s], loss_fn)
            if level == "sample":
                w = numpy(opt.example_weights(size, step=step, replica_id=k))
                row.append(grads.T @ w / (K * size) + regularization / K)
            else:
                w = np.full(size, device[k])
                row.append(grads.T @ w / (K * size) + device[k] * regularization / K)
        terms.append(row)
    return terms


def local_accumulators(strategy, optimizer):
    """Each replica's own copy of the inner optimizer's accumulators, flat."""
    accumulators = optimizer.inner_optimizer._accumulated_gradients
    return [
        flat([strategy.experimental_local_results(a.value)[k] for a in accumulators])
        for k in range(K)
    ]


@pytest.mark.slow
@pytest.mark.parametrize("level", ["sample", "device"])
@pytest.mark.backends("tensorflow")
def test_accumulators_hold_per_replica_values_until_the_update(one_window, mirrored_strategy, level):
    """Across replicas each replica accumulates on its own (no all-reduce per
    micro-batch); the update sums the replicas once and is exact. A weights
    file or checkpoint saved mid-window holds the sum over replicas; loading it
    gives each replica a 1/K share, so the resumed update equals the
    uninterrupted one to float32 rounding."""
    run = one_window(level)
    x, y, model, opt, inner = run.x, run.y, run.model, run.opt, run.inner
    accumulators = inner._accumulated_gradients
    from tf_gradmix.backend.tensorflow import optimizer as tf_optimizer

    assert all(tf_optimizer.is_per_replica(a) for a in accumulators)
    assert [a.path for a in accumulators] == [
        f"{inner.name}/{v.path.replace('/', '_')}_gradient_accumulator" for v in model.trainable_variables
    ]
    assert sum(any(a is v for v in inner.variables) for a in accumulators) == len(accumulators)
    terms = accumulation_terms(opt, run.ref, x, y, level, steps=3)

    # Two micro-steps of three: no update, and each replica holds its own sum.
    np.testing.assert_array_equal(run.mid_weights, run.before)
    for k in range(K):
        assert_float32_close(run.mid_local[k], terms[0][k] + terms[1][k])
    assert not np.allclose(run.mid_local[0], run.mid_local[1])
    total = sum(terms[0][k] + terms[1][k] for k in range(K))
    assert_float32_close(run.mid_read, total)  # read: the sum

    update = run.update
    assert_float32_close(update, sum(sum(row) for row in terms) / 3)
    for k in range(K):
        np.testing.assert_array_equal(run.local[k], 0.0)
    raw_step, iterations, _ = run.counts
    assert raw_step == 3 and iterations == 1

    # Restart from the mid-window file: each replica gets 1/K of the sum.
    with mirrored_strategy.scope():
        restarted_inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=3)
        restarted = functional(gm.Model)
        restarted_opt = mixer(level=level, stddev=0.6, seed=3, inner=restarted_inner)
        restarted.compile(restarted_opt, SCCE)
        restarted_opt.build(restarted.trainable_variables)
    for restore in (
        lambda: tf.train.Checkpoint(optimizer=restarted_opt).read(run.checkpoint).assert_consumed(),
        lambda: restarted.load_weights(run.weights_file),
    ):
        restore()
        for k in range(K):
            assert_float32_close(local_accumulators(mirrored_strategy, restarted_opt)[k], total / K)
    restarted.fit(x[32:], y[32:], batch_size=16, epochs=1, shuffle=False, verbose=0)
    assert_float32_close(run.before - flat(weights_of(restarted)), update)


@pytest.mark.backends("tensorflow")
@pytest.mark.slow
def test_clipping_under_accumulation_acts_per_replica_on_the_accumulated_mean(mirrored_strategy):
    """``clipvalue`` on the inner optimizer: once per update, on each replica's
    accumulated mean (its share of the update), before the sum across
    replicas; as without accumulation, where Keras clips each replica's
    gradients."""
    x, y = data(48)
    clip = 0.01
    with mirrored_strategy.scope():
        inner = keras.optimizers.SGD(1.0, clipvalue=clip, gradient_accumulation_steps=3)
        model = functional(gm.Model)
        opt = mixer(level="sample", stddev=0.6, seed=3, inner=inner)
        model.compile(opt, SCCE)
    ref = plain_copy(model)
    terms = accumulation_terms(opt, ref, x, y, "sample", steps=3)
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))
    means = [sum(terms[s][k] for s in range(3)) / 3 for k in range(K)]
    assert np.mean([np.mean(np.abs(m) > clip) for m in means]) > 0.2  # clipping acts
    expected = sum(np.clip(m, -clip, clip) for m in means)
    assert_float32_close(update, expected)
    # Not the same as clipping the summed update.
    assert np.max(np.abs(np.clip(sum(means), -clip, clip) - expected)) > 1e-3


@pytest.mark.backends("tensorflow")
def test_inner_optimizer_built_before_the_wrapper_fails_clearly_under_accumulation(mirrored_strategy):
    x, y = data(48)
    with mirrored_strategy.scope():
        inner = keras.optimizers.SGD(1.0, gradient_accumulation_steps=3)
        model = functional(gm.Model)
        inner.build(model.trainable_variables)  # mirrored accumulators, Keras's
        model.compile(mixer(inner=inner), SCCE)
    with pytest.raises(RuntimeError, match="per-replica variables.*strategy's scope.*20582"):
        model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)


@pytest.mark.backends("tensorflow")
def test_accumulation_across_replicas_refuses_a_moving_average_and_gradient_overwritten_variables(mirrored_strategy):
    """Neither is reproduced by an update made once per window; both fail at the first step, naming the setting."""
    x, y = data(48)
    with mirrored_strategy.scope():
        model = functional(gm.Model)
        model.compile(mixer(inner=keras.optimizers.SGD(0.1, use_ema=True, gradient_accumulation_steps=3)), SCCE)
    with pytest.raises(ValueError, match=r"`use_ema=True`.*gradient_accumulation_steps=3, 4 replicas"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
    with mirrored_strategy.scope():
        model = functional(gm.Model)
        model.trainable_variables[-1].overwrite_with_gradient = True
        model.compile(mixer(inner=keras.optimizers.SGD(0.1, gradient_accumulation_steps=3)), SCCE)
    with pytest.raises(ValueError, match=r"`overwrite_with_gradient`.*\['dense_[0-9]+/bias'\]"):
        model.fit(x, y, batch_size=16, epochs=1, verbose=0)
