"""LARS: layer-wise adaptive rate scaling with classic momentum.

The exclusion handling it shares with LAMB is in
:mod:`tf_gradmix.optimizers.layerwise`.
"""

import keras
from keras import ops

from tf_gradmix import validation
from tf_gradmix.optimizers.layerwise import LayerwiseExclusions, dense_gradient, document_exclusions, trust_ratio

__all__ = ["LARS"]


@keras.saving.register_keras_serializable(package="tf_gradmix")
@document_exclusions
class LARS(LayerwiseExclusions, keras.optimizers.Optimizer):
    r"""Layer-wise Adaptive Rate Scaling (LARS) with classic momentum.

    The update of the MLPerf ResNet-50 reference. For each variable ``w``
    with gradient ``g`` at step ``t``:

    .. math::

        \lambda_w &= \lambda \text{ unless } w \text{ is excluded from
            weight decay, else } 0 \\
        \rho_t &= \eta\,\frac{\lVert w\rVert}{\lVert g\rVert +
            \lambda_w \lVert w\rVert + \epsilon}
            \text{ if } w \text{ is adapted and }
            \lVert w\rVert > 0,\ \lVert g\rVert > 0, \text{ else } 1 \\
        u_t &= g + \lambda_w\, w \\
        v_t &= \mu\, v_{t-1} + \alpha_t\, \rho_t\, u_t \\
        w &\leftarrow w - v_t
            \qquad (\text{Nesterov: } w \leftarrow w - (\mu\, v_t +
            \alpha_t\, \rho_t\, u_t))

    with ``alpha_t`` = ``learning_rate`` (a float or a schedule), ``mu`` =
    ``momentum``, ``lambda`` = ``weight_decay``, ``eta`` =
    ``trust_coefficient``, ``epsilon`` = ``epsilon`` and ``v`` the momentum
    slot (zeros at the start).

    Args:
        learning_rate: float ``>= 0``, a
            ``keras.optimizers.schedules.LearningRateSchedule`` (e.g.
            :class:`tf_gradmix.schedules.PolynomialWarmupDecay`) or a callable
            with no arguments.
        momentum: float in ``[0, 1)``, ``mu``.
        nesterov: bool, Nesterov momentum.
{exclusion_args}
        trust_coefficient: float ``eta >= 0``; ``eta / lambda`` bounds the
            trust ratio. 0.001 in You et al. and MLPerf.
        epsilon: float ``>= 0`` added to the trust-ratio denominator. ``0``
            is safe: the ratio is only computed where ``||w|| > 0`` and
            ``||g|| > 0``, so the denominator is positive. (The MLPerf
            reference's default 0 silently becomes 1e-7 there; pass 1e-7 for
            exactly its rule.)
        name: optimizer name.
        **base_kwargs: the other arguments of
            ``keras.optimizers.Optimizer`` (``clipnorm``, ``use_ema``,
            ``gradient_accumulation_steps``, ...).

    Example:

    ```python
    import keras, tf_gradmix as gm
    optimizer = gm.optimizers.LARS(
        learning_rate=gm.schedules.PolynomialWarmupDecay(
            peak_learning_rate=10.0, total_steps=10_000, warmup_steps=500),
        momentum=0.9, weight_decay=5e-5, exclude_1d_variables=True)
    model.compile(optimizer=gm.GradientMix(optimizer), ...)
    ```

    References:
        - [You, Gitman and Ginsburg, 2017. Large batch training of
          convolutional networks](https://arxiv.org/abs/1708.03888)
        - [MLPerf ResNet-50 reference, `lars_optimizer.py`](
          https://github.com/mlcommons/training/tree/master/image_classification/tensorflow2)
    """

    def __init__(
        self,
        learning_rate=0.01,
        momentum=0.9,
        nesterov=False,
        weight_decay=0.0,
        trust_coefficient=0.001,
        epsilon=0.0,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        name="lars",
        exclude_1d_variables=False,
        **base_kwargs,
    ):
        super().__init__(
            learning_rate,
            name,
            weight_decay,
            exclude_from_weight_decay,
            exclude_from_layer_adaptation,
            exclude_1d_variables,
            **base_kwargs,
        )
        self.momentum = validation.number("momentum", momentum, low=0.0, high=1.0, high_open=True)
        self.nesterov = validation.boolean("nesterov", nesterov)
        self.trust_coefficient = validation.number(
            "trust_coefficient", trust_coefficient, low=0.0
        )
        self.epsilon = validation.number("epsilon", epsilon, low=0.0)

    def build(self, var_list):
        """Creates the momentum slots and matches the exclusion patterns."""
        if self.built:
            return
        super().build(var_list)
        self._momentums = self.add_optimizer_variables(var_list, "momentum")

    def update_step(self, gradient, variable, learning_rate):
        """One LARS step for one variable (see the class docstring)."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = dense_gradient(gradient, dtype)
        weights = ops.convert_to_tensor(variable)
        decay = self.weight_decay if self._use_decay[index] else 0.0

        update = gradient + ops.cast(decay, dtype) * weights if decay else gradient
        if self._use_adaptation[index]:
            w_norm = ops.sqrt(ops.sum(ops.square(weights)))
            g_norm = ops.sqrt(ops.sum(ops.square(gradient)))
            denominator = g_norm + ops.cast(decay, dtype) * w_norm + ops.cast(
                self.epsilon, dtype
            )
            trust = trust_ratio(
                w_norm, g_norm, denominator, ops.cast(self.trust_coefficient, dtype)
            )
            step = (lr * trust) * update
        else:
            step = lr * update

        velocity = self._momentums[index]
        momentum = ops.cast(self.momentum, dtype)
        new_velocity = momentum * velocity + step
        self.assign(velocity, new_velocity)
        if self.nesterov:
            self.assign_sub(variable, momentum * new_velocity + step)
        else:
            self.assign_sub(variable, new_velocity)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "momentum": self.momentum,
                "nesterov": self.nesterov,
                "trust_coefficient": self.trust_coefficient,
                "epsilon": self.epsilon,
            }
        )
        return config

