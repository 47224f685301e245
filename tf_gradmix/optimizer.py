r"""The ``GradientMix`` optimizer wrapper.

Plain data-parallel training averages gradients with fixed weights ``1/N``.
GradientMix mixes them with random weights ``pi = w / N`` redrawn every step
(paper Eq. 3 and 4, weights as in :mod:`tf_gradmix.noise`):

.. math::

    g = \sum_{b=1}^{B} \pi_b \nabla \ell_b \quad\text{(sample level)},
    \qquad
    g = \sum_{k=1}^{K} \pi_k g_k \quad\text{(device level)},

with ``B`` the examples of the global batch, ``l_b`` the loss of example
``b``, ``K`` the replicas and ``g_k`` the mean gradient of replica ``k``.

* The **sample level** is applied by the model (:class:`tf_gradmix.Model`,
  :class:`tf_gradmix.Sequential`, :func:`tf_gradmix.enable`), which asks this
  wrapper for the step's per-example weights (:meth:`GradientMix.example_weights`).
* The **device level** is applied here, in :meth:`GradientMix.apply`: the
  gradients that reach ``apply`` on the TensorFlow backend are still those of
  one replica (Keras divides the loss by ``K`` and sums across replicas
  inside the inner optimizer's update), so scaling them by ``w_k`` before
  delegating yields ``sum_k pi_k g_k`` with a stock model and ``train_step``.

Every weight is a pure function of ``(seed, raw step, level, replica)``; the
raw step is this wrapper's own counter, which advances on every call of
``apply`` (every micro-batch under ``gradient_accumulation_steps``).
"""

import secrets
import warnings

import keras
import tensorflow as tf

from tf_gradmix import compat, mixing_check, validation
from tf_gradmix import noise as noise_lib

__all__ = ["GradientMix", "find_gradient_mix", "DEFAULT_STDDEV", "LEVELS"]

LEVELS = ("sample", "device")

#: Default ``stddev`` of the weights ``w``. The paper never states its kappa
#: (= stddev / N). 1.0 doubles the gradient covariance of a batch, i.e. about
#: the noise of half the batch (gamma ~= 2); with Rademacher noise it keeps
#: each example at double weight or drops it, with probability 1/2 each (a
#: subset of binomial size, half the batch on average).
DEFAULT_STDDEV = 1.0

# Base-optimizer arguments that belong on the inner optimizer.
_INNER_ONLY_ARGS = (
    "learning_rate",
    "weight_decay",
    "clipnorm",
    "clipvalue",
    "global_clipnorm",
    "use_ema",
    "ema_momentum",
    "ema_overwrite_frequency",
    "loss_scale_factor",
    "gradient_accumulation_steps",
)


def require_tensorflow_backend(what):
    """Raises a clear error when Keras runs on another backend."""
    backend = keras.backend.backend()
    if backend != "tensorflow":
        raise RuntimeError(
            f"{what} supports only the TensorFlow backend of Keras, but "
            f"KERAS_BACKEND is {backend!r}. Set KERAS_BACKEND=tensorflow "
            "before importing keras."
        )


def find_gradient_mix(optimizer):
    """The ``GradientMix`` in a chain of wrappers (``inner_optimizer``), or None.

    ``keras.optimizers.LossScaleOptimizer(GradientMix(...))`` is found too.
    """
    seen = 0
    while optimizer is not None and seen < 16:
        if isinstance(optimizer, GradientMix):
            return optimizer
        optimizer = getattr(optimizer, "inner_optimizer", None)
        seen += 1
    return None


def _replica_context():
    context = tf.distribute.get_replica_context()
    if context is None:
        raise RuntimeError(
            "GradientMix weights must be computed in a replica context "
            "(inside `strategy.run` or a Keras train step), not in a "
            "cross-replica context."
        )
    return context


def _scale_gradient(gradient, scale):
    if gradient is None:
        return None
    if isinstance(gradient, tf.IndexedSlices):
        return tf.IndexedSlices(
            gradient.values * tf.cast(scale, gradient.values.dtype),
            gradient.indices,
            gradient.dense_shape,
        )
    return gradient * tf.cast(scale, gradient.dtype)


@keras.saving.register_keras_serializable(package="tf_gradmix")
class GradientMix(keras.optimizers.Optimizer):
    """Mixes per-example or per-replica gradients with random weights.

    Wraps any Keras 3 optimizer like ``keras.optimizers.LossScaleOptimizer``
    does: ``learning_rate`` and ``iterations`` are the inner optimizer's, and
    ``variables`` are this wrapper's own (its raw step counter and its seed)
    followed by the inner optimizer's.

    The weights of one step are ``pi_n = w_n / N`` with
    ``w_n = 1 + stddev * xi_n`` (paper Eq. 12 with ``kappa = stddev / N``):

    * ``level="sample"`` (paper Eq. 4): one weight per example of each
      replica's batch, ``g = sum_b pi_b grad l_b``. A whole sequence is one
      example; its tokens share its weight. The model must apply it: use
      :class:`tf_gradmix.Model`, :class:`tf_gradmix.Sequential` or
      :func:`tf_gradmix.enable`, or :meth:`example_weights` in a custom loop.
    * ``level="device"`` (paper Eq. 3): one weight per replica,
      ``g = sum_k pi_k g_k``; works with any model. With a single replica it
      only randomises the step length (a warning says so).

    Gradient clipping set on the inner optimizer (``clipnorm``, ...) acts per
    replica on the already weighted gradients, like Keras's own clipping
    under a distribution strategy; under ``gradient_accumulation_steps``
    once per update, on the replica's accumulated mean.

    With ``gradient_accumulation_steps`` on the inner optimizer and more than
    one replica, each replica accumulates its weighted micro-batch gradients
    in its own variables and the update sums them across replicas once
    (Keras alone cannot accumulate under a strategy, keras-team/keras#20582).

    Args:
        inner_optimizer: the ``keras.optimizers.Optimizer`` that makes the
            update (SGD, Adam, AdamW, Lamb, Lion, ``tf_gradmix.optimizers.LARS``,
            ...), or any identifier ``keras.optimizers.get`` accepts (a name
            such as ``"adam"``, or a config dict), built with Keras's
            defaults. Learning rate, clipping, weight decay, EMA and
            ``gradient_accumulation_steps`` are set on it.
        level: ``"sample"`` or ``"device"``.
        noise: ``"gaussian"``, ``"rademacher"``, ``"bernoulli"`` (Poisson
            sampling, ``w = b / p`` with ``p = 1 / (1 + stddev^2)``) or a
            :class:`tf_gradmix.noise.Noise` instance: the distribution of ``w``.
        stddev: the standard deviation ``sigma >= 0`` of ``w``, a float or a
            ``keras.optimizers.schedules.LearningRateSchedule`` called with
            the raw step (to anneal the noise). ``0`` reproduces plain
            training exactly. Default :data:`DEFAULT_STDDEV` (1.0). To target
            a noise-equivalent batch size use
            :meth:`GradientMix.for_noise_batch_size` or
            :func:`tf_gradmix.noise.stddev_for_noise_batch_size`.
        seed: int seed of the stateless noise stream; ``None`` draws one
            now. Either way the seed is kept in a variable of this optimizer
            (and in its config), so a ``.keras`` reload and a
            ``BackupAndRestore`` restore continue the same stream, and all
            workers of a ``MultiWorkerMirroredStrategy`` use the chief's.
        name: optimizer name, default ``"gradient_mix"``.

    Example:

    ```python
    import keras, tf_gradmix as gm
    model = gm.Sequential([keras.Input((784,)), keras.layers.Dense(10)])
    model.compile(
        optimizer=gm.GradientMix(keras.optimizers.SGD(0.1, momentum=0.9,
                                 nesterov=True), noise="rademacher", stddev=0.5),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ```

    References:
        GradientMix: a simple yet effective regularization for large batch
        training.
    """

    def __init__(
        self,
        inner_optimizer,
        level="sample",
        noise="gaussian",
        stddev=DEFAULT_STDDEV,
        seed=None,
        name=None,
        **kwargs,
    ):
        require_tensorflow_backend("tf_gradmix.GradientMix")
        self._check_inner_only_kwargs(kwargs)
        if isinstance(inner_optimizer, (str, dict)):
            inner_optimizer = self._optimizer_from_identifier(inner_optimizer)
        if not isinstance(inner_optimizer, keras.optimizers.Optimizer):
            raise TypeError(
                "Invalid value for argument `inner_optimizer`: expected a "
                "keras.optimizers.Optimizer instance, got "
                f"{inner_optimizer!r} of type {type(inner_optimizer).__name__}."
            )
        if find_gradient_mix(inner_optimizer) is not None:
            raise ValueError(
                "Invalid value for argument `inner_optimizer`: "
                f"{inner_optimizer!r} is (or wraps) a GradientMix already; "
                "mixing twice is not supported. Wrap the base optimizer once."
            )
        validation.one_of("level", level, LEVELS)
        noise = noise_lib.get(noise)
        stddev = self._validate_stddev(stddev)
        if seed is not None:
            seed = validation.integer("seed", seed, low=0, high=2**31 - 1)
        super().__init__(learning_rate=0.0, name=name or "gradient_mix", **kwargs)
        self.level = level
        self.noise = noise
        self.stddev = stddev
        self._seed_variable = self._create_seed_variable(seed)
        self.inner_optimizer = inner_optimizer
        self._warned_single_replica = False
        # Set when a step asks for the sample-level weights: the model hook
        # (or a custom loop) is in place. Checked when `apply` is traced.
        self._sample_weights_requested = False
        # Set when `scale_loss` put this step's device weight into the loss
        # (a Keras train step); `apply` then leaves the gradients as they are.
        self._device_weight_in_loss = False

    # -- construction helpers ------------------------------------------------

    def _create_seed_variable(self, seed):
        """The seed as a variable: saved and restored with the optimizer.

        ``seed=None`` draws the seed here. Keeping it in a variable (not only
        in the config) makes a ``BackupAndRestore`` restore, which rebuilds
        the optimizer from code with ``seed=None`` again, load the seed of
        the interrupted run. Under ``MultiWorkerMirroredStrategy`` the
        initial value of a mirrored variable is the chief's, broadcast to
        every worker, so all workers share one seed.
        """
        if seed is None:
            seed = secrets.randbelow(2**31 - 1)
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(
                seed,
                name="seed",
                dtype="int",
                trainable=False,
                aggregation="only_first_replica",
            )
        self._track_variable(variable)
        return variable

    @staticmethod
    def _optimizer_from_identifier(identifier):
        """``keras.optimizers.get(identifier)`` with an error naming the argument."""
        try:
            return keras.optimizers.get(identifier)
        except (ValueError, TypeError) as error:
            raise ValueError(
                "Invalid value for argument `inner_optimizer`: "
                f"{identifier!r} is not an optimizer identifier that "
                f"keras.optimizers.get accepts ({error})."
            ) from error

    @staticmethod
    def _check_inner_only_kwargs(kwargs):
        for arg in _INNER_ONLY_ARGS:
            if arg in kwargs and kwargs[arg] not in (None, False):
                raise ValueError(
                    f"GradientMix does not take `{arg}={kwargs[arg]!r}`: set "
                    f"`{arg}` on the `inner_optimizer`, which makes the update."
                )
            kwargs.pop(arg, None)
        if kwargs:
            raise TypeError(
                "GradientMix got unexpected arguments: "
                f"{', '.join(f'`{k}`' for k in kwargs)}."
            )

    @staticmethod
    def _validate_stddev(stddev):
        if isinstance(stddev, keras.optimizers.schedules.LearningRateSchedule):
            return stddev
        return validation.number("stddev", stddev, low=0.0, error=TypeError)

    @classmethod
    def for_noise_batch_size(
        cls, inner_optimizer, batch_size, noise_batch_size, **kwargs
    ):
        """A ``GradientMix`` whose gradient noise is that of a smaller batch.

        ``stddev = sqrt(batch_size / noise_batch_size - 1)``; see
        :func:`tf_gradmix.noise.stddev_for_noise_batch_size`. E.g. a 32K batch
        with the noise of a 4K batch: ``stddev`` about 2.65.
        """
        stddev = noise_lib.stddev_for_noise_batch_size(batch_size, noise_batch_size)
        return cls(inner_optimizer, stddev=stddev, **kwargs)

    # -- the noise -----------------------------------------------------------

    @property
    def seed(self):
        """The seed of the noise stream (int), as held in the saved state."""
        return int(self._seed_variable.numpy())

    @property
    def raw_step(self):
        """This wrapper's step counter: one per ``apply`` (per micro-batch)."""
        return self._iterations

    def current_stddev(self, step=None):
        """``stddev`` at ``step`` (default: the current raw step), float32."""
        if isinstance(self.stddev, keras.optimizers.schedules.LearningRateSchedule):
            step = self.raw_step if step is None else step
            return tf.cast(self.stddev(step), tf.float32)
        return tf.constant(self.stddev, tf.float32)

    def example_weights(self, batch_size, step=None, replica_id=None):
        """The sample-level weights ``w`` (mean 1) of this step and replica.

        ``pi_b = w_b / B``. In a custom training loop, multiply each example's
        loss by its weight before averaging::

            w = optimizer.example_weights(tf.shape(x)[0])
            loss = tf.nn.compute_average_loss(per_example_loss * w,
                                              global_batch_size=GLOBAL_BATCH)

        (broadcast ``w`` over token axes for sequence losses). Call it before
        ``optimizer.apply_gradients`` of the same step; the noise is the one
        ``fit`` would use.

        Args:
            batch_size: number of examples in this replica's batch.
            step: raw step to draw for; default the current one.
            replica_id: global replica id; default this replica's.

        Returns:
            float32 tensor of shape ``[batch_size]``.
        """
        self._sample_weights_requested = True
        step = self.raw_step if step is None else step
        if replica_id is None:
            replica_id = _replica_context().replica_id_in_sync_group
        seed = noise_lib.step_seed(
            self._seed_variable, step, noise_lib.SAMPLE_STREAM, replica_id
        )
        return noise_lib.mixing_weights(
            self.noise, self.current_stddev(step), [batch_size], seed
        )

    def device_weights(self, num_replicas=None, step=None):
        """The device-level weights ``w`` (mean 1) of all ``K`` replicas.

        Every replica computes the same vector and uses its own entry.

        Args:
            num_replicas: ``K``; default the current strategy's replica count.
            step: raw step to draw for; default the current one.

        Returns:
            float32 tensor of shape ``[K]``.
        """
        if num_replicas is None:
            num_replicas = tf.distribute.get_strategy().num_replicas_in_sync
        step = self.raw_step if step is None else step
        seed = noise_lib.step_seed(self._seed_variable, step, noise_lib.DEVICE_STREAM)
        return noise_lib.mixing_weights(
            self.noise, self.current_stddev(step), [num_replicas], seed
        )

    # -- the update ----------------------------------------------------------

    def build(self, var_list):
        # Accumulation across replicas (keras-team/keras#20582): each replica
        # accumulates in its own variables, see `apply`.
        compat.build_with_per_replica_accumulators(self.inner_optimizer, var_list)
        super().build(var_list)

    @property
    def variables(self):
        return self._variables + self.inner_optimizer.variables

    def apply(self, grads, trainable_variables=None):
        if not self.built:
            if trainable_variables is None:
                raise ValueError(
                    "GradientMix must be built before `apply` is called "
                    "without `trainable_variables`."
                )
            with keras.name_scope(self.name, caller=self):
                self.build(list(trainable_variables))
            self.built = True
        if self.level == "sample":
            self._check_sample_hook()
        elif self._device_weight_in_loss:
            self._device_weight_in_loss = False  # consumed by this step
        else:
            grads = self._apply_device_weights(grads, trainable_variables)
        if self._accumulates_across_replicas():
            # Keras cannot accumulate under a strategy (keras-team/keras#20582).
            compat.apply_accumulated_across_replicas(
                self.inner_optimizer, grads, trainable_variables
            )
        else:
            self.inner_optimizer.apply(grads, trainable_variables)
        self._iterations.assign_add(1)

    def _accumulates_across_replicas(self):
        context = tf.distribute.get_replica_context()
        return bool(
            self.inner_optimizer.gradient_accumulation_steps
            and context is not None
            and context.num_replicas_in_sync > 1
        )

    def _check_sample_hook(self):
        if not self._sample_weights_requested:
            raise ValueError(mixing_check.sample_weights_not_requested_message())

    def _replica_device_weight(self):
        """``w_k`` of this replica at the current step."""
        context = _replica_context()
        num_replicas = context.num_replicas_in_sync
        if num_replicas == 1 and not self._warned_single_replica:
            self._warned_single_replica = True
            warnings.warn(
                "GradientMix(level='device') with a single replica only "
                "multiplies each step by a random factor (a random step "
                "length); use level='sample' to mix examples.",
                stacklevel=4,
            )
        return self.device_weights(num_replicas)[context.replica_id_in_sync_group]

    def _apply_device_weights(self, grads, trainable_variables):
        weight = self._replica_device_weight()
        variables = trainable_variables or compat.optimizer_trainable_variables(
            self.inner_optimizer
        )
        return [
            g if getattr(v, "overwrite_with_gradient", False) else _scale_gradient(g, weight)
            for g, v in zip(grads, variables)
        ]

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
        """The inner optimizer's loss scaling; at device level, times ``w_k``.

        Keras's train step calls this on each replica's loss before the
        backward pass, so the device weight costs one scalar multiplication
        instead of a pass over every gradient. Where the gradients do not
        come through here (a ``LossScaleOptimizer`` around this wrapper, a
        custom loop), :meth:`apply` weights the gradients instead.
        """
        loss = self.inner_optimizer.scale_loss(loss)
        if self.level == "device":
            loss = loss * tf.cast(self._replica_device_weight(), loss.dtype)
            self._device_weight_in_loss = True
        return loss

    def finalize_variable_values(self, var_list):
        self.inner_optimizer.finalize_variable_values(var_list)

    # -- config --------------------------------------------------------------

    def get_config(self):
        if isinstance(self.stddev, keras.optimizers.schedules.LearningRateSchedule):
            stddev = keras.saving.serialize_keras_object(self.stddev)
        else:
            stddev = self.stddev
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
        inner = keras.saving.deserialize_keras_object(
            config.pop("inner_optimizer"), custom_objects=custom_objects
        )
        if isinstance(config.get("stddev"), dict):
            config["stddev"] = keras.saving.deserialize_keras_object(
                config["stddev"], custom_objects=custom_objects
            )
        return cls(inner, **config)

    def __repr__(self):
        return (
            f"GradientMix({self.inner_optimizer.__class__.__name__}, "
            f"level={self.level!r}, noise={self.noise.name or self.noise!r}, "
            f"stddev={self.stddev!r}, seed={self.seed})"
        )
