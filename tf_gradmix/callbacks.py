"""Keras callbacks of tf_gradmix.

* :class:`GammaLogger`: the paper's noise amount gamma-bar for device-level
  GradientMix on a stock model.
* :class:`DiagnosticsLogger`: curvature and gradient-noise measurements
  (:mod:`tf_gradmix.diagnostics`) every N epochs (TensorFlow only).
"""

import keras
import numpy as np

from tf_gradmix import backend, validation
from tf_gradmix import noise as noise_lib
from tf_gradmix.model import GAMMA_METRIC
from tf_gradmix.optimizer import find_gradient_mix

__all__ = ["GammaLogger", "DiagnosticsLogger"]


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
        self._first_step = int(keras.ops.convert_to_numpy(mixer.raw_step.value)) if mixer.built else 0

    def on_epoch_end(self, epoch, logs=None):
        mixer = self._mixer()
        if logs is None or GAMMA_METRIC in logs or mixer.level != "device":
            return
        last = int(keras.ops.convert_to_numpy(mixer.raw_step.value))
        if last <= self._first_step:
            return
        devices = backend.current().num_devices(self.model)
        seed = mixer.seed
        gammas = [
            keras.ops.convert_to_numpy(noise_lib.gamma(mixer.stream.device_weights(seed, step, devices)))
            for step in range(self._first_step, last)
        ]
        logs[GAMMA_METRIC] = float(np.mean(gammas))


class DiagnosticsLogger(keras.callbacks.Callback):
    """Logs curvature and noise diagnostics every ``every_n_epochs`` epochs.

    Measured on a fixed sample ``(x, y)`` (e.g. 512 training examples), in
    inference mode, at the end of epochs ``every_n_epochs - 1``,
    ``2 * every_n_epochs - 1``, ... . Adds to the epoch's logs (so
    ``History`` and later callbacks see them; put it before them):

    * ``ggn_trace``, ``log_ggn_trace``, ``log_ggn_trace_stderr`` (:func:`tf_gradmix.diagnostics.ggn_trace`);
    * ``empirical_fisher_trace`` (:func:`tf_gradmix.diagnostics.empirical_fisher_trace`);
    * ``gradient_noise_scale`` (``B_simple``, :func:`tf_gradmix.diagnostics.gradient_noise_scale`).

    ``self.history`` keeps ``{"epoch": e, **values}`` for each measured epoch.

    Args:
        x: inputs of the fixed sample.
        y: its targets.
        loss: a Keras loss; default the model's compiled loss.
        every_n_epochs: measure every N epochs.
        num_probes: ``None`` for the exact GGN trace, else Hutchinson probes.
        seed: seed of the probes.
        batch_size: examples per computation (default
            ``tf_gradmix.diagnostics.DEFAULT_BATCH_SIZE``).
        split: GGN split, ``"output"`` or ``"logits"`` (see :func:`tf_gradmix.diagnostics.ggn_trace`).
        ggn: log the GGN trace.
        empirical_fisher: log the empirical Fisher trace.
        noise_scale: log ``B_simple``; ``"per_example"``, ``"two_batch"``
            (with ``small_batch_size``), or ``False``.
        small_batch_size: for ``noise_scale="two_batch"``.
        prefix: prepended to every log name.
    """

    def __init__(
        self,
        x,
        y,
        loss=None,
        every_n_epochs=1,
        num_probes=None,
        seed=0,
        batch_size=None,
        split="output",
        ggn=True,
        empirical_fisher=True,
        noise_scale="per_example",
        small_batch_size=None,
        prefix="",
    ):
        backend.require("tf_gradmix.callbacks.DiagnosticsLogger", ("tensorflow",))
        from tf_gradmix import diagnostics
        from tf_gradmix.backend.tensorflow.diagnostics import curvature

        super().__init__()
        every_n_epochs = validation.integer("every_n_epochs", every_n_epochs, low=1)
        curvature.check_split(split)
        batch_size = diagnostics.DEFAULT_BATCH_SIZE if batch_size is None else batch_size
        self.x, self.y = x, y
        self.loss = loss
        self.every_n_epochs = every_n_epochs
        self.num_probes = num_probes
        self.seed = seed
        self.batch_size = batch_size
        self.split = split
        self.ggn = ggn
        self.empirical_fisher = empirical_fisher
        self.noise_scale = noise_scale
        self.small_batch_size = small_batch_size
        self.prefix = prefix
        self.history = []

    def measure(self):
        """The diagnostics of the current model, as a dict of floats."""
        from tf_gradmix import diagnostics
        from tf_gradmix.backend.tensorflow import per_example

        loss = per_example.get_loss(self.loss, self.model)
        values = {}
        if self.ggn:
            est = diagnostics.ggn_trace(
                self.model, self.x, self.y, loss, num_probes=self.num_probes,
                seed=self.seed, batch_size=self.batch_size, split=self.split,
            )
            values["ggn_trace"] = est.trace
            values["log_ggn_trace"] = est.log_trace
            values["log_ggn_trace_stderr"] = est.log_stderr
        if self.empirical_fisher:
            values["empirical_fisher_trace"] = diagnostics.empirical_fisher_trace(
                self.model, self.x, self.y, loss, batch_size=self.batch_size
            ).trace
        if self.noise_scale:
            values["gradient_noise_scale"] = diagnostics.gradient_noise_scale(
                self.model, self.x, self.y, loss, method=self.noise_scale,
                small_batch_size=self.small_batch_size, batch_size=self.batch_size,
            ).b_simple
        return {self.prefix + k: v for k, v in values.items()}

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every_n_epochs:
            return
        values = self.measure()
        self.history.append({"epoch": epoch, **values})
        if logs is not None:
            logs.update(values)
