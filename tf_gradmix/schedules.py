"""Learning-rate schedules of large-batch training.

* :class:`PolynomialWarmupDecay`: polynomial warmup then polynomial decay,
  the GradientMix paper's Eq. 15 (and the MLPerf LARS schedule).
* :class:`InverseSqrtWarmup`: linear warmup then ``1/sqrt(t)`` decay
  (Vaswani et al.), used with Adam/LAMB.
* :func:`scaled_learning_rate`: the linear scaling rule (Goyal et al.).

Keras calls a schedule with the optimizer's step counter. Under
``gradient_accumulation_steps=k`` that is the raw micro-step count (``k``
calls per update), so give ``total_steps`` and ``warmup_steps`` in
micro-steps (``k`` times the number of updates) in that case.
"""


import keras
from keras import ops

from tf_gradmix import validation

__all__ = [
    "PolynomialWarmupDecay",
    "InverseSqrtWarmup",
    "scaled_learning_rate",
    "inverse_sqrt_warmup_steps",
]


@keras.saving.register_keras_serializable(package="tf_gradmix")
class PolynomialWarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    r"""Polynomial warmup to a peak, polynomial decay to an end rate.

    The GradientMix paper's Eq. 15, with ``t`` the step Keras passes to the
    schedule, ``T`` = ``total_steps`` and ``T_w`` = ``warmup_steps``:

    .. math::

        \eta_t = \begin{cases}
          \eta_{init} + (\eta_{peak} - \eta_{init})
            \left(\frac{t}{T_w}\right)^{p_w} & t < T_w \\
          \eta_{end} + (\eta_{peak} - \eta_{end})
            \left(1 - \frac{t - T_w}{T - T_w}\right)^{p_d}
            & T_w \le t \le T \\
          \eta_{end} & t > T
        \end{cases}

    with ``eta_peak`` = ``peak_learning_rate``, ``eta_init`` =
    ``initial_learning_rate``, ``eta_end`` = ``end_learning_rate``,
    ``p_w`` = ``warmup_power`` and ``p_d`` = ``decay_power``. The default
    powers (linear warmup, quadratic decay) are the MLPerf LARS schedule's.
    ``warmup_steps=0`` starts at the peak; with ``warmup_steps ==
    total_steps`` the rate warms up for the whole run and is
    ``end_learning_rate`` from step ``T`` on.

    Under ``gradient_accumulation_steps=k`` Keras passes the raw micro-step
    count (``k`` per update) to the schedule, not the update count: give
    ``total_steps`` and ``warmup_steps`` in micro-steps then.

    Args:
        peak_learning_rate: float ``>= 0``, the rate at ``t = T_w``.
        total_steps: int ``>= 1``, ``T``.
        warmup_steps: int in ``[0, total_steps]``, ``T_w``.
        initial_learning_rate: float ``>= 0``, the rate at ``t = 0``.
        end_learning_rate: float ``>= 0``, the rate at and after ``t = T``.
        warmup_power: float ``> 0``, ``p_w``.
        decay_power: float ``> 0``, ``p_d``.

    Example:

    ```python
    schedule = tf_gradmix.schedules.PolynomialWarmupDecay(
        peak_learning_rate=0.1 * 4096 / 256, total_steps=3600,
        warmup_steps=360)
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    ```

    References:
        - GradientMix: a simple yet effective regularization for large batch
          training, Eq. 15.
        - [Goyal et al., 2017. Accurate, large minibatch SGD](
          https://arxiv.org/abs/1706.02677) (warmup).
    """

    def __init__(
        self,
        peak_learning_rate,
        total_steps,
        warmup_steps,
        initial_learning_rate=0.0,
        end_learning_rate=0.0,
        warmup_power=1.0,
        decay_power=2.0,
    ):
        super().__init__()
        self.peak_learning_rate = validation.number(
            "peak_learning_rate", peak_learning_rate, low=0.0
        )
        self.total_steps = validation.integer("total_steps", total_steps, low=1)
        self.warmup_steps = validation.integer(
            "warmup_steps", warmup_steps, low=0, high=self.total_steps
        )
        self.initial_learning_rate = validation.number(
            "initial_learning_rate", initial_learning_rate, low=0.0
        )
        self.end_learning_rate = validation.number(
            "end_learning_rate", end_learning_rate, low=0.0
        )
        self.warmup_power = validation.number(
            "warmup_power", warmup_power, low=0.0, low_open=True
        )
        self.decay_power = validation.number(
            "decay_power", decay_power, low=0.0, low_open=True
        )

    def __call__(self, step):
        t = ops.cast(step, "float32")
        warmup_steps = float(self.warmup_steps)
        # The divisions are guarded so that unselected branches stay finite.
        warmup_fraction = ops.clip(t / max(warmup_steps, 1.0), 0.0, 1.0)
        warmup = self.initial_learning_rate + (
            self.peak_learning_rate - self.initial_learning_rate
        ) * ops.power(warmup_fraction, self.warmup_power)
        decay_length = max(float(self.total_steps - self.warmup_steps), 1.0)
        decay_fraction = ops.clip((t - warmup_steps) / decay_length, 0.0, 1.0)
        decay = self.end_learning_rate + (
            self.peak_learning_rate - self.end_learning_rate
        ) * ops.power(1.0 - decay_fraction, self.decay_power)
        end = ops.full_like(t, self.end_learning_rate)
        return ops.where(
            t < warmup_steps,
            warmup,
            ops.where(t < float(self.total_steps), decay, end),
        )

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "total_steps": self.total_steps,
            "warmup_steps": self.warmup_steps,
            "initial_learning_rate": self.initial_learning_rate,
            "end_learning_rate": self.end_learning_rate,
            "warmup_power": self.warmup_power,
            "decay_power": self.decay_power,
        }


@keras.saving.register_keras_serializable(package="tf_gradmix")
class InverseSqrtWarmup(keras.optimizers.schedules.LearningRateSchedule):
    r"""Linear warmup, then decay as the inverse square root of the step.

    .. math::

        \eta_t = \eta_{peak} \min\left(\frac{t + 1}{T_w},
            \sqrt{\frac{T_w}{t + 1}}\right)

    with ``eta_peak`` = ``peak_learning_rate`` (reached at ``t + 1 = T_w``)
    and ``T_w`` = ``warmup_steps``; ``t`` is the step Keras passes (the raw
    micro-step under ``gradient_accumulation_steps``). This is Vaswani et
    al.'s schedule with the ``d_model^-0.5`` factor folded into the peak.
    The GradientMix paper uses 4000 warmup steps at batch 64 and scales them
    as ``4000 * 64 / B`` for batch ``B`` (see :mod:`tf_gradmix.recipes`).

    Args:
        peak_learning_rate: float ``>= 0``.
        warmup_steps: int ``>= 1``, ``T_w``.

    References:
        - [Vaswani et al., 2017. Attention is all you need](
          https://arxiv.org/abs/1706.03762), Eq. 3.
    """

    def __init__(self, peak_learning_rate, warmup_steps):
        super().__init__()
        self.peak_learning_rate = validation.number(
            "peak_learning_rate", peak_learning_rate, low=0.0
        )
        self.warmup_steps = validation.integer("warmup_steps", warmup_steps, low=1)

    def __call__(self, step):
        t1 = ops.cast(step, "float32") + 1.0
        warmup_steps = float(self.warmup_steps)
        return self.peak_learning_rate * ops.minimum(
            t1 / warmup_steps, ops.sqrt(warmup_steps / t1)
        )

    def get_config(self):
        return {
            "peak_learning_rate": self.peak_learning_rate,
            "warmup_steps": self.warmup_steps,
        }


def scaled_learning_rate(base_learning_rate, base_batch_size, batch_size):
    """The linear scaling rule: ``base_learning_rate * batch_size / base_batch_size``.

    E.g. 0.1 at batch 256 gives 12.8 at batch 32768 (Goyal et al., 2017).
    For LARS and LAMB the trust ratio already adapts the step per layer; the
    rule gives the usual starting point for the peak rate.

    Args:
        base_learning_rate: float ``>= 0``, the rate tuned at ``base_batch_size``.
        base_batch_size: int ``>= 1``.
        batch_size: int ``>= 1``, the global batch size to scale to.

    Returns:
        float.

    References:
        - [Goyal et al., 2017. Accurate, large minibatch SGD: training
          ImageNet in 1 hour](https://arxiv.org/abs/1706.02677)
    """
    base_learning_rate = validation.number("base_learning_rate", base_learning_rate, low=0.0)
    base_batch_size = validation.integer("base_batch_size", base_batch_size, low=1)
    batch_size = validation.integer("batch_size", batch_size, low=1)
    return base_learning_rate * batch_size / base_batch_size


def inverse_sqrt_warmup_steps(batch_size, base_warmup_steps=4000, base_batch_size=64):
    """Warmup steps of :class:`InverseSqrtWarmup` at ``batch_size``.

    ``round(base_warmup_steps * base_batch_size / batch_size)``, at least 1:
    the paper's 4000 steps at batch 64 become 8 steps at batch 32K.
    """
    batch_size = validation.integer("batch_size", batch_size, low=1)
    base_warmup_steps = validation.integer("base_warmup_steps", base_warmup_steps, low=1)
    base_batch_size = validation.integer("base_batch_size", base_batch_size, low=1)
    return max(1, round(base_warmup_steps * base_batch_size / batch_size))
