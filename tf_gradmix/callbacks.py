"""Keras callbacks of tf_gradmix."""

import keras
import tensorflow as tf

from tf_gradmix import noise as noise_lib
from tf_gradmix.model import GAMMA_METRIC
from tf_gradmix.optimizer import find_gradient_mix

__all__ = ["GammaLogger"]


class GammaLogger(keras.callbacks.Callback):
    """Logs ``gradmix_gamma`` for device-level GradientMix on a stock model.

    :class:`tf_gradmix.Model` logs the paper's gamma-bar by itself. A stock
    ``keras.Model`` trained with ``GradientMix(level="device")`` cannot, so
    this callback recomputes it at the end of every epoch: the weights are a
    pure function of the seed and the step, so the mean of ``w^2`` over the
    epoch's steps and the ``K`` replicas needs no state from the train step.

    Put it first in ``callbacks`` so the progress bar and ``History`` see it.
    """

    def __init__(self):
        super().__init__()
        self._first_step = None

    def _mixer(self):
        mixer = find_gradient_mix(self.model.optimizer)
        if mixer is None:
            raise ValueError(
                "GammaLogger needs a model compiled with a tf_gradmix.GradientMix "
                f"optimizer; got {self.model.optimizer!r}."
            )
        return mixer

    def on_epoch_begin(self, epoch, logs=None):
        mixer = self._mixer()
        self._first_step = int(mixer.raw_step.numpy()) if mixer.built else 0

    def on_epoch_end(self, epoch, logs=None):
        mixer = self._mixer()
        if logs is None or GAMMA_METRIC in logs or mixer.level != "device":
            return
        last = int(mixer.raw_step.numpy())
        if last <= self._first_step:
            return
        replicas = self.model.distribute_strategy.num_replicas_in_sync
        steps = tf.range(self._first_step, last, dtype=tf.int64)
        gammas = tf.map_fn(
            lambda step: noise_lib.gamma(mixer.device_weights(replicas, step)),
            steps,
            fn_output_signature=tf.float32,
        )
        logs[GAMMA_METRIC] = float(tf.reduce_mean(gammas))
