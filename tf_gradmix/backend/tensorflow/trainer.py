"""The ``fit`` side of the TensorFlow backend: multi-worker ``fit`` under ``MultiWorkerMirroredStrategy``.

Stock Keras 3 (tested: 3.15.1) cannot ``fit`` or ``evaluate`` under
``MultiWorkerMirroredStrategy`` with more than one worker (upstream:
https://github.com/keras-team/keras/issues/20585, open). :func:`install_fit`,
called by the one hook installer of :mod:`tf_gradmix.model` (for
:class:`tf_gradmix.Model`, :class:`tf_gradmix.Sequential` and
:func:`tf_gradmix.enable` alike), installs the workaround below on a model;
it acts only under that strategy with more than one worker, on the Keras
versions of :data:`MULTI_WORKER_FIT_BROKEN`.
"""

import contextlib
import warnings

import keras
import tensorflow as tf

from tf_gradmix.backend import _keras
from tf_gradmix.backend._keras import keras_version

# ---------------------------------------------------------------------------
# Multi-worker `fit` under MultiWorkerMirroredStrategy (keras-team/keras#20585)
# ---------------------------------------------------------------------------
#
# Stock Keras 3 (tested: 3.15.1) cannot `fit` or `evaluate` under
# `tf.distribute.MultiWorkerMirroredStrategy` with more than one worker
# (upstream: https://github.com/keras-team/keras/issues/20585, open):
#
# 1. `TensorFlowTrainer._maybe_symbolic_build` takes the first distributed
#    batch and calls `strategy.reduce("MEAN", batch, axis=None)` on it, which
#    fails for a multi-worker strategy with "Attempt to convert a value
#    (PerReplica:{...}) with an unsupported type". The batch is only used for
#    its shapes and dtypes, so we hand Keras the first local replica's batch.
# 2. `reduce_per_replica(..., reduction="auto")` reduces every log of the step
#    with `strategy.reduce("MEAN", v, axis=0)` in multi-worker mode, which fails
#    for scalar logs ("Invalid reduction dimension 0 for input with 0
#    dimensions"). We give every log a leading axis of length 1 inside the
#    replica function; the same reduction then returns the mean over all
#    replicas of all workers, in the log's original shape - what Keras
#    computes for MirroredStrategy.
#
# Both changes act only when the model's strategy is a MultiWorkerMirroredStrategy
# with more than one worker; every other strategy runs stock Keras code.
# `tests/upstream/test_keras_multi_worker.py` checks that stock fit still fails on the
# installed Keras (so we notice an upstream fix) and that the guard below
# covers the installed version.

#: Keras versions (inclusive ``(major, minor)`` bounds) known to need the
#: multi-worker fit workaround; the upper bound is the newest version tested.
MULTI_WORKER_FIT_BROKEN = ((3, 0), (3, 15))

MULTI_WORKER_FIT_ISSUE = "https://github.com/keras-team/keras/issues/20585"

# A module global: the warning is once per process, like Python's own "once" filter.
_warned_unguarded_version = False


def multi_worker_fit_workaround_applies(version=None):
    """Whether this Keras version gets the multi-worker ``fit`` workaround."""
    version = keras_version() if version is None else tuple(version[:2])
    low, high = MULTI_WORKER_FIT_BROKEN
    return low <= version <= high


def is_multi_worker(strategy):
    """Keras's own test for "collective all-reduce in multi-worker mode"."""
    return isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and _keras.in_multi_worker_mode(strategy)


def _needs_workaround(model):
    global _warned_unguarded_version
    if not is_multi_worker(model.distribute_strategy):
        return False
    if multi_worker_fit_workaround_applies():
        return True
    if not _warned_unguarded_version:
        _warned_unguarded_version = True
        warnings.warn(
            f"tf_gradmix's MultiWorkerMirroredStrategy fit workaround is "
            f"tested on Keras {MULTI_WORKER_FIT_BROKEN[1]} and is off for Keras "
            f"{keras.__version__}; see {MULTI_WORKER_FIT_ISSUE}.",
            stacklevel=3,
        )
    return False


def _first_local_batch(strategy, batch):
    def local(value):
        if isinstance(value, tf.distribute.DistributedValues):
            return strategy.experimental_local_results(value)[0]
        return value

    return tf.nest.map_structure(local, batch)


def _with_leading_axis(step_function):
    def step(data):
        logs = step_function(data)
        return tf.nest.map_structure(
            lambda v: tf.expand_dims(v, 0) if isinstance(v, tf.Tensor) else v, logs
        )

    return step


def _multi_worker_symbolic_build(model, base, iterator=None, data_batch=None):
    if iterator is None or not _needs_workaround(model):
        return base(iterator=iterator, data_batch=data_batch)
    for _, _, batches in iterator:
        data_batch = _first_local_batch(model.distribute_strategy, next(batches))
        break
    return base(iterator=None, data_batch=data_batch)


def _multi_worker_make_function(model, base, step_function):
    if _needs_workaround(model):
        step_function = _with_leading_axis(step_function)
    return base(step_function)


def install_fit(model):
    """Installs the workaround on ``model`` (see the section comment above); returns ``model``."""
    _keras.wrap_trainer_method(
        model,
        "_maybe_symbolic_build",
        lambda base: lambda iterator=None, data_batch=None: _multi_worker_symbolic_build(
            model, base, iterator, data_batch
        ),
    )
    _keras.wrap_trainer_method(
        model,
        "_make_function",
        lambda base: lambda step_function: _multi_worker_make_function(model, base, step_function),
    )
    return model


def metric_scope(model):
    """Metrics of ``model`` are created in its strategy's scope (so they are mirrored)."""
    strategy = getattr(model, "distribute_strategy", None)
    return strategy.scope() if strategy is not None else contextlib.nullcontext()


def restore_after_failed_step(model, args):
    """Nothing to do: TensorFlow's variables hold the state throughout ``fit``."""
    del model, args
