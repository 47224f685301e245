r"""The ``GradientMix`` optimizer wrapper.

Plain data-parallel training averages gradients with fixed weights ``1/N``.
GradientMix mixes them with random weights ``pi = w / N`` redrawn every step
(paper Eq. 3 and 4, weights as in :mod:`tf_gradmix.noise`):

.. math::

    g = \sum_{b=1}^{B} \pi_b \nabla \ell_b \quad\text{(sample level)},
    \qquad
    g = \sum_{k=1}^{K} \pi_k g_k \quad\text{(device level)},

with ``B`` the examples of the global batch, ``l_b`` the loss of example
``b``, ``K`` the devices and ``g_k`` the mean gradient of device ``k``'s
shard. The sample level is applied by the model hook (:mod:`tf_gradmix.model`),
which asks this wrapper for the step's weights. The device level is applied
here on TensorFlow, where the gradients reaching ``apply`` are one replica's;
on JAX they are global, so the model hook applies it too.
"""

import secrets
import warnings

import keras

from tf_gradmix import backend, mixing_check, validation
from tf_gradmix import noise as noise_lib

__all__ = ["GradientMix", "find_gradient_mix", "is_enabled", "SampleHook", "DEFAULT_STDDEV", "LEVELS"]

LEVELS = ("sample", "device")

#: Default ``stddev`` of the weights ``w``: about the gradient noise of half the batch (gamma ~= 2).
DEFAULT_STDDEV = 1.0

#: The attribute holding the :class:`SampleHook` of a model whose ``compute_loss`` applies the weights.
SAMPLE_HOOK_ATTRIBUTE = "_gradmix"

#: The attribute holding that model's ``gradmix_gamma`` metric (an attribute so that Keras tracks and logs it).
GAMMA_ATTRIBUTE = "_gradmix_gamma"

# Base-optimizer arguments that belong on the inner optimizer.
_INNER_ONLY_ARGS = (
    "learning_rate", "weight_decay", "clipnorm", "clipvalue", "global_clipnorm", "use_ema",
    "ema_momentum", "ema_overwrite_frequency", "loss_scale_factor", "gradient_accumulation_steps",
)


class SampleHook:
    """What tf_gradmix keeps on a model with the sample-level hook (:mod:`tf_gradmix.model`).

    The model's only tf_gradmix attributes are this object and its gamma
    metric (:data:`SAMPLE_HOOK_ATTRIBUTE`, :data:`GAMMA_ATTRIBUTE`), both
    set by the hook installer.
    """

    def __init__(self, gamma_metric):
        self.gamma_metric = gamma_metric
        #: Set when a traced step logged gamma (:meth:`log_gamma`); read by the hook's train function.
        self.gamma_logged = False
        #: Whether the train step is :func:`tf_gradmix.exact.train_step`.
        self.per_example = False
        #: Whether the partial-mixing warning was given (once per model).
        self.warned_partial = False
        #: The hook's wrapper of Keras's train function, once made.
        self.train_function = None
        #: The train function whose first step checked the loss (eager steps, PyTorch).
        self.checked_function = None

    def log_gamma(self, weights):
        """Adds ``gamma = mean(w^2)`` of this step's weights to ``gradmix_gamma``: the one place gamma is logged."""
        self.gamma_metric.update_state(noise_lib.gamma(weights))
        self.gamma_logged = True


def sample_hook(model):
    """The :class:`SampleHook` of ``model``, or None."""
    return getattr(model, SAMPLE_HOOK_ATTRIBUTE, None)


def is_enabled(model):
    """Whether ``model`` applies GradientMix's sample-level weights (has the model hook)."""
    return sample_hook(model) is not None


def find_gradient_mix(optimizer):
    """The ``GradientMix`` in a chain of wrappers (``inner_optimizer``), or None."""
    for _ in range(16):
        if optimizer is None or isinstance(optimizer, GradientMix):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
    return None


@keras.saving.register_keras_serializable(package="tf_gradmix")
class GradientMix(keras.optimizers.Optimizer):
    """Mixes per-example or per-device gradients with random weights.

    Wraps any Keras 3 optimizer like ``keras.optimizers.LossScaleOptimizer``:
    ``learning_rate`` and ``iterations`` are the inner optimizer's, and
    ``variables`` are this wrapper's own (its raw step counter and its seed)
    followed by the inner optimizer's. Each step's weights are
    ``pi_n = w_n / N`` with ``w_n = 1 + stddev * xi_n`` (paper Eq. 12 with
    ``kappa = stddev / N``), a pure function of the seed, this wrapper's raw
    step (one per ``apply``, so every micro-batch of
    ``gradient_accumulation_steps`` gets fresh weights) and the unit:

    * ``level="sample"`` (paper Eq. 4): one weight per example of the global
      batch (on TensorFlow, of each replica's batch); a sequence is one
      example. The model applies it: :class:`tf_gradmix.Model`,
      :class:`tf_gradmix.Sequential`, :func:`tf_gradmix.enable`, or
      :meth:`example_weights` in a custom loop.
    * ``level="device"`` (paper Eq. 3): one weight per device. On TensorFlow
      any model works (each replica's gradients are weighted in
      :meth:`apply`); on JAX the gradients are global and the model hook
      weights each shard of the batch, so a stock model is refused. With one
      device it only randomises the step length (a warning says so).

    Clipping set on the inner optimizer acts on the already weighted
    gradients (per replica on TensorFlow).

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` that makes the
            update (SGD, Adam, Lamb, ``tf_gradmix.optimizers.LARS``, ...), with
            its learning rate, clipping, weight decay, EMA and
            ``gradient_accumulation_steps``; or any identifier
            ``keras.optimizers.get`` accepts (``"adam"``, a config dict),
            built with Keras's defaults.
        level: ``"sample"`` or ``"device"``.
        noise: ``"gaussian"``, ``"rademacher"``, ``"bernoulli"`` or a
            :class:`tf_gradmix.noise.Noise`: the distribution of ``w``.
        stddev: ``sigma >= 0``, a float or a
            ``keras.optimizers.schedules.LearningRateSchedule`` of the raw
            step. ``0`` reproduces plain training exactly. For a
            noise-equivalent batch size see :meth:`for_noise_batch_size`.
        seed: int seed of the noise stream; ``None`` draws one now. It is kept
            in a variable of this optimizer (and its config), so a ``.keras``
            reload and ``BackupAndRestore`` continue the same stream.
        name: optimizer name, default ``"gradient_mix"``.

    Example:

    ```python
    import keras, tf_gradmix as gm
    model = gm.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.compile(
        optimizer=gm.GradientMix(keras.optimizers.SGD(0.1, momentum=0.9),
                                 noise="rademacher", stddev=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ```

    References:
        GradientMix: a simple yet effective regularization for large batch
        training.
    """

    #: Read by :mod:`tf_gradmix.backend`, which cannot import this module (it sits below it).
    is_gradient_mix = True

    def __init__(self, inner_optimizer, level="sample", noise="gaussian",
                 stddev=DEFAULT_STDDEV, seed=None, name=None, **kwargs):
        backend.require("tf_gradmix.GradientMix")
        for arg in _INNER_ONLY_ARGS:
            if kwargs.get(arg) not in (None, False):
                raise ValueError(
                    f"GradientMix does not take `{arg}={kwargs[arg]!r}`: set "
                    f"`{arg}` on the `inner_optimizer`, which makes the update."
                )
            kwargs.pop(arg, None)
        if kwargs:
            raise TypeError(f"GradientMix got unexpected arguments: {', '.join(f'`{k}`' for k in kwargs)}.")
        if isinstance(inner_optimizer, (str, dict)):
            try:
                inner_optimizer = keras.optimizers.get(inner_optimizer)
            except (ValueError, TypeError) as error:
                raise ValueError(
                    f"Invalid value for argument `inner_optimizer`: {inner_optimizer!r} is not an optimizer "
                    f"identifier that keras.optimizers.get accepts ({error})."
                ) from error
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "Invalid value for argument `inner_optimizer`: expected a keras.optimizers.Optimizer "
                f"instance, got {inner_optimizer!r} of type {type(inner_optimizer).__name__}."
            )
        if find_gradient_mix(inner_optimizer) is not None:
            raise ValueError(
                f"Invalid value for argument `inner_optimizer`: {inner_optimizer!r} is (or wraps) "
                "a GradientMix already; mixing twice is not supported. Wrap the base optimizer once."
            )
        validation.one_of("level", level, LEVELS)
        if not isinstance(stddev, keras.optimizers.schedules.LearningRateSchedule):
            stddev = validation.number("stddev", stddev, low=0.0, error=TypeError)
        if seed is not None:
            seed = validation.integer("seed", seed, low=0, high=2**31 - 1)
        super().__init__(learning_rate=0.0, name=name or "gradient_mix")
        self.level = level
        self.stream = noise_lib.NoiseStream(noise, stddev)
        self.inner_optimizer = inner_optimizer
        # The seed lives in a variable, so restoring a checkpoint into an
        # optimizer rebuilt with seed=None loads the interrupted run's seed.
        with keras.name_scope(self.name, caller=self):
            self._seed_variable = keras.Variable(
                secrets.randbelow(2**31 - 1) if seed is None else seed, name="seed",
                dtype="int", trainable=False, aggregation="only_first_replica",
            )
        self._track_variable(self._seed_variable)
        self._warned_single_device = False
        # Set when a traced step asks for the weights: the model hook (or a custom loop) is in place.
        self._sample_weights_requested = False

    @classmethod
    def for_noise_batch_size(cls, inner_optimizer, batch_size, noise_batch_size, **kwargs):
        """A ``GradientMix`` with the gradient noise of a smaller batch (see
        :func:`tf_gradmix.noise.stddev_for_noise_batch_size`; 32K with the noise of 4K: about 2.65)."""
        stddev = noise_lib.stddev_for_noise_batch_size(batch_size, noise_batch_size)
        return cls(inner_optimizer, stddev=stddev, **kwargs)

    # -- the noise -----------------------------------------------------------

    noise = property(lambda self: self.stream.noise, doc="The :class:`tf_gradmix.noise.Noise` of ``w``.")
    stddev = property(lambda self: self.stream.stddev, doc="``sigma``, a float or a schedule.")

    @property
    def seed(self):
        """The seed of the noise stream (int), as held in the saved state."""
        return int(keras.ops.convert_to_numpy(self._seed_variable.value))

    @property
    def raw_step(self):
        """This wrapper's step counter: one per ``apply`` (per micro-batch)."""
        return self._iterations

    def _state(self, step):
        read = backend.current().read
        return read(self._seed_variable), read(self._iterations) if step is None else step

    def current_stddev(self, step=None):
        """``stddev`` at ``step`` (default: the current raw step), float32."""
        return self.stream.stddev_at(self._state(step)[1])

    def example_weights(self, batch_size, step=None, replica_id=None):
        """The sample-level weights ``w`` (mean 1) of this step: ``[batch_size]`` float32.

        ``pi_b = w_b / B``. In a custom loop multiply each example's loss by its
        weight before averaging (broadcast over token axes), and call it before
        ``apply_gradients`` of the same step: the noise is the one ``fit`` uses.

        Args:
            batch_size: examples in the batch (on TensorFlow: this replica's).
            step: raw step to draw for; default the current one.
            replica_id: replica whose stream to draw; default this replica's
                (TensorFlow) or this process's rank in a ``DistributedDataParallel``
                loop (PyTorch); always 0 on JAX and in PyTorch's ``fit``, whose batch is global.
        """
        self._sample_weights_requested = True
        seed, step = self._state(step)
        if replica_id is None:
            replica_id = backend.current().replica_id()
        return self.stream.example_weights(seed, step, batch_size, replica_id)

    def device_weights(self, num_replicas=None, step=None):
        """The device-level weights ``w`` (mean 1) of all ``K`` devices: ``[K]`` float32.

        Args:
            num_replicas: ``K``; default the current strategy's replicas
                (TensorFlow), the data axis of the ``keras.distribution`` (JAX) or
                the world size of the ``torch.distributed`` process group of a
                ``DistributedDataParallel`` loop (PyTorch; 1 inside ``fit``).
            step: raw step to draw for; default the current one.
        """
        # A loop that asks for them weights its gradients itself (PyTorch's DDP loop).
        self._sample_weights_requested = True
        seed, step = self._state(step)
        return self.stream.device_weights(seed, step, num_replicas or self.num_devices())

    def num_devices(self):
        """``K``: replicas in sync (TensorFlow) or shards of the data axis (JAX)."""
        return backend.current().num_devices()

    def _weights_in_optimizer(self):
        """Whether :meth:`apply` weights the gradients (else the model hook weights the examples).

        The one place level and backend meet: only the device level where the
        gradients reaching ``apply`` are one replica's (TensorFlow).
        """
        return self.level == "device" and backend.current().GRADIENTS_PER_REPLICA

    def batch_weights(self, batch_size):
        """The weights the model hook puts on each example of this step, or None.

        Sample level: :meth:`example_weights`. Device level where the
        gradients are global (JAX): ``w_k`` for every example of shard ``k``.
        None where :meth:`apply` weights the gradients (device level on TensorFlow).
        """
        if self._weights_in_optimizer():
            return None
        if self.level == "sample":
            return self.example_weights(batch_size)
        self._sample_weights_requested = True
        self._warn_if_single_device()
        seed, step = self._state(None)
        return self.stream.shard_weights(seed, step, batch_size, self.num_devices())

    def _warn_if_single_device(self):
        if self.num_devices() == 1 and not self._warned_single_device:
            self._warned_single_device = True
            warnings.warn(
                "GradientMix(level='device') on a single replica (device) only multiplies each step by "
                "a random factor (a random step length); use level='sample' to mix examples.",
                stacklevel=4,
            )

    # -- the update ----------------------------------------------------------

    def build(self, var_list):
        backend.current().build_optimizer(self.inner_optimizer, var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        """Weights the gradients where that is this wrapper's job, then delegates to the inner optimizer.

        On JAX Keras calls :meth:`stateless_apply` (the base class's), which
        runs this method in a ``StatelessScope`` over all of :attr:`variables`.
        """
        if not self.built:
            if trainable_variables is None:
                raise ValueError("GradientMix must be built before `apply` is called without `trainable_variables`.")
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        module = backend.current()
        weight = None
        if self._weights_in_optimizer():
            self._warn_if_single_device()
            weight = self.device_weights()[module.replica_id()]
        else:
            self._check_hook()
        module.apply_gradients(self.inner_optimizer, grads, trainable_variables, weight)
        self._iterations.assign_add(1)

    def _check_hook(self):
        if self._sample_weights_requested:
            return
        if self.level == "sample":
            raise ValueError(mixing_check.sample_weights_not_requested_message())
        raise ValueError(
            "GradientMix(level='device') on JAX and PyTorch needs the model to weight each shard of "
            "the global batch (the gradients reaching the optimizer are already global), but this model has no "
            "GradientMix hook, so it would train unmixed. Use `model = tf_gradmix.enable(model)` (or "
            "build it with tf_gradmix.Model / tf_gradmix.Sequential)."
        )

    # -- forwarded state -----------------------------------------------------

    @property
    def learning_rate(self):
        return self.inner_optimizer.learning_rate

    @learning_rate.setter
    def learning_rate(self, learning_rate):
        self.inner_optimizer.learning_rate = learning_rate

    @property
    def iterations(self):
        """The inner optimizer's ``iterations`` (update steps, as Keras counts)."""
        return self.inner_optimizer.iterations

    def scale_loss(self, loss):
        return self.inner_optimizer.scale_loss(loss)

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- config --------------------------------------------------------------

    def get_config(self):
        stddev = self.stddev
        if isinstance(stddev, keras.optimizers.schedules.LearningRateSchedule):
            stddev = keras.saving.serialize_keras_object(stddev)
        return {
            "name": self.name,
            "inner_optimizer": keras.saving.serialize_keras_object(self.inner_optimizer),
            "level": self.level,
            "noise": noise_lib.serialize(self.noise),
            "stddev": stddev,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        inner = keras.saving.deserialize_keras_object(config.pop("inner_optimizer"), custom_objects=custom_objects)
        if isinstance(config.get("stddev"), dict):
            config["stddev"] = keras.saving.deserialize_keras_object(config["stddev"], custom_objects=custom_objects)
        return cls(inner, **config)

    def __repr__(self):
        return (f"GradientMix({self.inner_optimizer.__class__.__name__}, level={self.level!r}, "
                f"noise={self.noise.name or self.noise!r}, stddev={self.stddev!r}, seed={self.seed})")
