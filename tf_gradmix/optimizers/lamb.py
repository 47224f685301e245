"""LAMB: layer-wise adaptive moments, with exclusion lists."""

import keras
from keras import ops

from tf_gradmix import validation
from tf_gradmix.optimizers.layerwise import LayerwiseExclusions, dense_gradient, document_exclusions, trust_ratio

__all__ = ["LAMB"]


@keras.saving.register_keras_serializable(package="tf_gradmix")
@document_exclusions
class LAMB(LayerwiseExclusions, keras.optimizers.Optimizer):
    r"""Layer-wise Adaptive Moments for Batch training (LAMB).

    Adam moments with bias correction, a coupled weight decay and a per-layer
    trust ratio, as in You et al. (2019) and tensorflow-addons'
    ``LAMB``. For each variable ``w`` with gradient ``g`` at step ``t``
    (``t = 1`` on the first update):

    .. math::

        m_t &= \beta_1 m_{t-1} + (1 - \beta_1)\, g \\
        v_t &= \beta_2 v_{t-1} + (1 - \beta_2)\, g^2 \\
        \hat m_t &= m_t / (1 - \beta_1^t), \qquad
            \hat v_t = v_t / (1 - \beta_2^t) \\
        r_t &= \frac{\hat m_t}{\sqrt{\hat v_t} + \epsilon}
            + \lambda_w\, w \\
        \rho_t &= \frac{\lVert w\rVert}{\lVert r_t\rVert}
            \text{ if } w \text{ is adapted and both norms} > 0,
            \text{ else } 1 \\
        w &\leftarrow w - \alpha_t\, \rho_t\, r_t

    with ``alpha_t`` = ``learning_rate``, ``beta_1``, ``beta_2``,
    ``epsilon`` the arguments of the same names, and ``lambda_w`` =
    ``weight_decay`` unless ``w`` is excluded from weight decay (then 0).

    With ``weight_decay=0`` and no exclusions this is
    ``keras.optimizers.Lamb`` (pass the same ``epsilon``: Keras's default is
    1e-7, ours 1e-6 as in tensorflow-addons and the LAMB paper's code).
    Keras's ``Lamb`` cannot exclude variables from the trust ratio and
    applies its ``weight_decay`` decoupled, outside the trust ratio.

    Args:
        learning_rate: float ``>= 0``, a
            ``keras.optimizers.schedules.LearningRateSchedule`` or a callable
            with no arguments.
        beta_1: float in ``[0, 1)``, decay rate of the first moment.
        beta_2: float in ``[0, 1)``, decay rate of the second moment.
        epsilon: float ``> 0`` added to ``sqrt(v_hat)``. ``0`` is refused:
            it gives ``0 / 0 = NaN`` for a variable whose gradient is zero
            (tensorflow-addons silently used 1e-7 instead of 0).
{exclusion_args}
        name: optimizer name.
        **base_kwargs: the other arguments of
            ``keras.optimizers.Optimizer`` (``clipnorm``, ``use_ema``,
            ``gradient_accumulation_steps``, ...).

    Example:

    ```python
    import tf_gradmix as gm
    optimizer = gm.optimizers.LAMB(
        learning_rate=gm.schedules.InverseSqrtWarmup(1e-3, warmup_steps=500),
        weight_decay=0.01, exclude_from_weight_decay=["bias", "layer_norm"])
    model.compile(optimizer=gm.GradientMix(optimizer), ...)
    ```

    References:
        - [You et al., 2019. Large batch optimization for deep learning:
          training BERT in 76 minutes](https://arxiv.org/abs/1904.00962)
    """

    def __init__(
        self,
        learning_rate=0.001,
        beta_1=0.9,
        beta_2=0.999,
        epsilon=1e-6,
        weight_decay=0.0,
        exclude_from_weight_decay=None,
        exclude_from_layer_adaptation=None,
        name="lamb",
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
        self.beta_1 = validation.number("beta_1", beta_1, low=0.0, high=1.0, high_open=True)
        self.beta_2 = validation.number("beta_2", beta_2, low=0.0, high=1.0, high_open=True)
        self.epsilon = validation.number("epsilon", epsilon, low=0.0)
        if self.epsilon == 0:
            raise validation.invalid(
                "epsilon",
                epsilon,
                "a number > 0: with epsilon=0 a variable whose gradient is 0 "
                "gets the update 0 / 0 = NaN (tensorflow-addons replaced 0 by "
                "1e-7: pass epsilon=1e-7 for its behaviour)",
            )

    def build(self, var_list):
        """Creates the moment slots and matches the exclusion patterns."""
        if self.built:
            return
        super().build(var_list)
        self._momentums, self._velocities = self.add_optimizer_variables(
            var_list, ["momentum", "velocity"]
        )

    def update_step(self, gradient, variable, learning_rate):
        """One LAMB step for one variable (see the class docstring)."""
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate, dtype)
        gradient = dense_gradient(gradient, dtype)
        weights = ops.convert_to_tensor(variable)
        local_step = ops.cast(self.iterations + 1, dtype)
        beta_1 = ops.cast(self.beta_1, dtype)
        beta_2 = ops.cast(self.beta_2, dtype)

        m = self._momentums[index]
        v = self._velocities[index]
        new_m = m + (gradient - m) * (1 - beta_1)
        new_v = v + (ops.square(gradient) - v) * (1 - beta_2)
        self.assign(m, new_m)
        self.assign(v, new_v)
        m_hat = new_m / (1 - ops.power(beta_1, local_step))
        v_hat = new_v / (1 - ops.power(beta_2, local_step))
        update = m_hat / (ops.sqrt(v_hat) + ops.cast(self.epsilon, dtype))
        if self._use_decay[index] and self.weight_decay:
            update = update + ops.cast(self.weight_decay, dtype) * weights

        if self._use_adaptation[index]:
            w_norm = ops.sqrt(ops.sum(ops.square(weights)))
            r_norm = ops.sqrt(ops.sum(ops.square(update)))
            trust = trust_ratio(w_norm, r_norm, r_norm)
            self.assign_sub(variable, (lr * trust) * update)
        else:
            self.assign_sub(variable, lr * update)

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "beta_1": self.beta_1,
                "beta_2": self.beta_2,
                "epsilon": self.epsilon,
            }
        )
        return config

