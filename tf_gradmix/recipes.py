"""Large-batch hyperparameters as data, with the source of every value.

The GradientMix paper trains ResNet-50 on ImageNet at batch 32K with
Nesterov momentum and LARS (its Table 3), Adam and LAMB (its §5.3), and
ResNets on CIFAR (its §5.1). The recipes below hold those settings so users
can start from them. **Every value carries a** ``source``: whether it is the
paper's, a well-known public reference's (MLPerf, Goyal et al., You et al.),
derived from other values, or ours. The numbers of the paper's Table 3 and
§5.3 were not available to us when this module was written; where we know
no value the setting is ``None`` (see :meth:`Recipe.missing`) rather than an
invented one. Fill them in with :meth:`Recipe.replace`.

The paper gives no mixing ``stddev``. Ours is
:data:`tf_gradmix.optimizer.DEFAULT_STDDEV` (1.0): it doubles the gradient
covariance, about the gradient noise of half the batch
(``gamma ~= 1 + stddev^2 = 2``). For a target noise-equivalent batch use
:func:`tf_gradmix.noise.stddev_for_noise_batch_size` (e.g. a 32K batch with
the noise of a 4K batch needs a stddev near 2.6).

Functions live elsewhere: :func:`tf_gradmix.residual.set_residual_gamma`
sets the initial scale ``gamma_0`` of every residual block's final
BatchNorm, :func:`tf_gradmix.schedules.inverse_sqrt_warmup_steps` scales the
warmup of the inverse-square-root schedule. Their old names in this module
are deprecated (removed in 0.2.0).
"""

import dataclasses
import math
import types

from tf_gradmix import deprecation
from tf_gradmix.optimizer import DEFAULT_STDDEV

__all__ = [
    "Setting",
    "Recipe",
    "RESNET50_IMAGENET_32K_NESTEROV",
    "RESNET50_IMAGENET_32K_LARS",
    "ADAM_LAMB_INVERSE_SQRT",
    "CIFAR_SGD",
    "CIFAR_LARS",
    "CIFAR_ADAM",
    "CIFAR_LAMB",
]

# Functions that used to live here, under their old names.
__getattr__ = deprecation.module_getattr(__name__, {
    "inverse_sqrt_warmup_steps": deprecation.Renamed("tf_gradmix.schedules.inverse_sqrt_warmup_steps", "0.2.0"),
    "residual_batch_norms": deprecation.Renamed("tf_gradmix.residual.residual_batch_norms", "0.2.0"),
    "set_residual_gamma": deprecation.Renamed("tf_gradmix.residual.set_residual_gamma", "0.2.0"),
})

IMAGENET_TRAIN_EXAMPLES = 1_281_167

# -- sources -------------------------------------------------------------------
# Kept as constants so every recipe cites the same words.

PAPER_TABLE_3_UNAVAILABLE = (
    "GradientMix paper Table 3: its value was not available to us; fill it in "
    "from the paper"
)
PAPER_TABLE_3_BN = (
    "GradientMix paper Table 3 uses BatchNorm momentum 0.9 (reported to us "
    "without the table itself); same as the MLPerf reference resnet_model.py "
    "(_BATCH_NORM_DECAY = 0.9)"
)
PAPER_ABSTRACT = "GradientMix paper abstract: ResNet-50 on ImageNet at batch 32K"
PAPER_S51 = "GradientMix paper §5.1 (CIFAR), as quoted to us from the paper"
PAPER_S53_WARMUP = (
    "GradientMix paper (Adam/LAMB runs): 4000 warmup steps at batch 64, "
    "scaled as 4000 * 64 / B, as quoted to us from the paper"
)
PAPER_S53_UNAVAILABLE = (
    "GradientMix paper §5.3: its value was not available to us; fill it in "
    "from the paper"
)
MLPERF_LARS_UTIL = (
    "not the paper: MLPerf ResNet-50 reference, mlcommons/training "
    "image_classification/tensorflow2/lars_util.py (defaults for batch >= "
    "32768: base LR 31.2, 25 warmup epochs, end LR 1e-4, poly power 2)"
)
MLPERF_LARS_OPTIMIZER = (
    "not the paper: MLPerf ResNet-50 reference, mlcommons/training "
    "image_classification/tensorflow2/lars_optimizer.py (eeta=0.001, "
    "skip_list ['batch_normalization', 'bias'])"
)
MLPERF_README = (
    "not the paper: MLPerf v1.0 ResNet-50 reference run commands, "
    "mlcommons/training image_classification/README_tensorflow2.md (batch "
    "2K/4K: momentum 0.9, label smoothing 0.1, weight decay 2e-4, "
    "lars_epsilon 0); the 32K value may differ"
)
MLPERF_BN_EPSILON = (
    "not the paper: MLPerf reference resnet_model.py (_BATCH_NORM_EPSILON = 1e-5)"
)
GOYAL = (
    "not the paper: Goyal et al. 2017, Accurate, Large Minibatch SGD "
    "(0.1 per 256 examples, linear scaling, 5-epoch gradual warmup, weight "
    "decay 1e-4, momentum 0.9, gamma = 0 for the last BN of each residual block)"
)
YOU_LARS = (
    "not the paper: You et al. 2017/2018, LARS (ResNet-50, 90 epochs at "
    "batch 32K; trust coefficient 0.001)"
)
DERIVED = "derived from the other settings of this recipe"
OURS_STDDEV = (
    "ours, not the paper (which gives no stddev): "
    "tf_gradmix.optimizer.DEFAULT_STDDEV = 1.0, about the gradient noise of "
    "half the batch; see tf_gradmix.noise.stddev_for_noise_batch_size for a "
    "target noise-equivalent batch"
)
OURS_MIXING = (
    "ours: the paper's sample-level GradientMix (Eq. 4) with Gaussian weights"
)
OURS_EXCLUDE = (
    "ours: exclude every ndim <= 1 variable (biases, BN scale/offset), the "
    "ndim-based equivalent of MLPerf's skip_list for keras.applications names"
)
OURS_DEFAULT_POWERS = (
    "ours, not the paper: Eq. 15 with the MLPerf powers (linear warmup, "
    "quadratic decay)"
)
USER = "user override"


@dataclasses.dataclass(frozen=True)
class Setting:
    """One hyperparameter: its ``value`` (``None`` if unknown) and ``source``."""

    value: object
    source: str


@dataclasses.dataclass(frozen=True)
class Recipe:
    """Named hyperparameters, each a :class:`Setting` with its source.

    ``recipe["momentum"]`` is a value, ``recipe.source("momentum")`` says
    where it comes from, ``recipe.missing()`` lists the settings with no
    known value, and ``recipe.replace(momentum=0.95)`` returns a copy with
    user values (source ``"user override"``).
    """

    name: str
    description: str
    settings: types.MappingProxyType

    def __post_init__(self):
        object.__setattr__(self, "settings", types.MappingProxyType(dict(self.settings)))

    def __getitem__(self, key):
        return self.settings[key].value

    def __contains__(self, key):
        return key in self.settings

    def keys(self):
        return self.settings.keys()

    def source(self, key):
        """Where the value of ``key`` comes from."""
        return self.settings[key].source

    def values(self):
        """All settings as a plain ``{name: value}`` dict (``None`` = unknown)."""
        return {key: setting.value for key, setting in self.settings.items()}

    def missing(self):
        """Names of the settings whose value is not known (``None``)."""
        return [key for key, setting in self.settings.items() if setting.value is None]

    def replace(self, **values):
        """A copy with ``values`` set (marked as user overrides)."""
        unknown = sorted(set(values) - set(self.settings))
        if unknown:
            raise ValueError(
                f"Recipe {self.name!r} has no setting(s) {unknown}. Known: "
                f"{sorted(self.settings)}."
            )
        settings = dict(self.settings)
        for key, value in values.items():
            settings[key] = Setting(value, USER)
        return Recipe(self.name, self.description, settings)

    def __repr__(self):
        lines = [f"Recipe({self.name!r}:"]
        for key, setting in self.settings.items():
            lines.append(f"  {key} = {setting.value!r}  # {setting.source}")
        return "\n".join(lines) + ")"


def _steps(epochs, batch_size, examples=IMAGENET_TRAIN_EXAMPLES):
    return math.ceil(epochs * examples / batch_size)


def _mixing_settings():
    return {
        "mixing_level": Setting("sample", OURS_MIXING),
        "mixing_noise": Setting("gaussian", OURS_MIXING),
        "mixing_stddev": Setting(DEFAULT_STDDEV, OURS_STDDEV),
    }


_BATCH_32K = 32768
_LARS_EPOCHS = 90
_LARS_WARMUP_EPOCHS = 25

RESNET50_IMAGENET_32K_LARS = Recipe(
    name="resnet50_imagenet_32k_lars",
    description=(
        "ResNet-50 on ImageNet at batch 32K with LARS and the Eq. 15 schedule "
        "(the setting of the paper's Table 3). The paper's own Table 3 "
        "numbers were not available to us: the values are MLPerf's LARS "
        "reference where one exists; check every `source`."
    ),
    settings={
        "batch_size": Setting(_BATCH_32K, PAPER_ABSTRACT),
        "optimizer": Setting("LARS", "GradientMix paper Table 3 (LARS column)"),
        "epochs": Setting(_LARS_EPOCHS, YOU_LARS),
        "total_steps": Setting(_steps(_LARS_EPOCHS, _BATCH_32K), DERIVED),
        "warmup_epochs": Setting(_LARS_WARMUP_EPOCHS, MLPERF_LARS_UTIL),
        "warmup_steps": Setting(_steps(_LARS_WARMUP_EPOCHS, _BATCH_32K), DERIVED),
        "warmup_power": Setting(1.0, MLPERF_LARS_UTIL),
        "decay_power": Setting(2.0, MLPERF_LARS_UTIL),
        "initial_learning_rate": Setting(0.0, MLPERF_LARS_UTIL),
        "peak_learning_rate": Setting(31.2, MLPERF_LARS_UTIL),
        "end_learning_rate": Setting(1e-4, MLPERF_LARS_UTIL),
        "momentum": Setting(0.9, MLPERF_README),
        "nesterov": Setting(False, MLPERF_LARS_OPTIMIZER),
        "weight_decay": Setting(2e-4, MLPERF_README),
        "trust_coefficient": Setting(1e-3, MLPERF_LARS_OPTIMIZER),
        "epsilon": Setting(0.0, MLPERF_README),
        "exclude_1d_variables": Setting(True, OURS_EXCLUDE),
        "label_smoothing": Setting(0.1, MLPERF_README),
        "bn_momentum": Setting(0.9, PAPER_TABLE_3_BN),
        "bn_epsilon": Setting(1e-5, MLPERF_BN_EPSILON),
        "gamma_0": Setting(None, PAPER_TABLE_3_UNAVAILABLE + " (Goyal et al. use 0.0)"),
        **_mixing_settings(),
    },
)

_NESTEROV_WARMUP_EPOCHS = 5

RESNET50_IMAGENET_32K_NESTEROV = Recipe(
    name="resnet50_imagenet_32k_nesterov",
    description=(
        "ResNet-50 on ImageNet at batch 32K with Nesterov momentum and the "
        "Eq. 15 schedule (the setting of the paper's Table 3). The paper's "
        "own Table 3 numbers were not available to us: values come from "
        "Goyal et al. and MLPerf where one exists, else None; check every "
        "`source`."
    ),
    settings={
        "batch_size": Setting(_BATCH_32K, PAPER_ABSTRACT),
        "optimizer": Setting("SGD", "GradientMix paper Table 3 (Nesterov column)"),
        "epochs": Setting(None, PAPER_TABLE_3_UNAVAILABLE),
        "total_steps": Setting(None, PAPER_TABLE_3_UNAVAILABLE),
        "warmup_epochs": Setting(_NESTEROV_WARMUP_EPOCHS, GOYAL),
        "warmup_steps": Setting(_steps(_NESTEROV_WARMUP_EPOCHS, _BATCH_32K), DERIVED),
        "warmup_power": Setting(1.0, OURS_DEFAULT_POWERS),
        "decay_power": Setting(2.0, OURS_DEFAULT_POWERS),
        "initial_learning_rate": Setting(0.0, OURS_DEFAULT_POWERS),
        "peak_learning_rate": Setting(0.1 * _BATCH_32K / 256, GOYAL),
        "end_learning_rate": Setting(None, PAPER_TABLE_3_UNAVAILABLE),
        "momentum": Setting(0.9, GOYAL),
        "nesterov": Setting(True, "GradientMix paper Table 3 (Nesterov column)"),
        "weight_decay": Setting(1e-4, GOYAL),
        "label_smoothing": Setting(0.1, MLPERF_README),
        "bn_momentum": Setting(0.9, PAPER_TABLE_3_BN),
        "bn_epsilon": Setting(1e-5, MLPERF_BN_EPSILON),
        "gamma_0": Setting(None, PAPER_TABLE_3_UNAVAILABLE + " (Goyal et al. use 0.0)"),
        **_mixing_settings(),
    },
)

ADAM_LAMB_INVERSE_SQRT = Recipe(
    name="adam_lamb_inverse_sqrt",
    description=(
        "Adam/LAMB settings of the paper's §5.3: inverse-square-root warmup "
        "(tf_gradmix.schedules.InverseSqrtWarmup) with 4000 warmup steps at "
        "batch 64, scaled to 4000 * 64 / B "
        "(tf_gradmix.schedules.inverse_sqrt_warmup_steps). The "
        "other §5.3 numbers were not available to us."
    ),
    settings={
        "schedule": Setting("InverseSqrtWarmup", PAPER_S53_WARMUP),
        "base_warmup_steps": Setting(4000, PAPER_S53_WARMUP),
        "base_batch_size": Setting(64, PAPER_S53_WARMUP),
        "peak_learning_rate": Setting(None, PAPER_S53_UNAVAILABLE),
        "beta_1": Setting(None, PAPER_S53_UNAVAILABLE + " (Adam/LAMB default 0.9)"),
        "beta_2": Setting(None, PAPER_S53_UNAVAILABLE + " (Adam/LAMB default 0.999)"),
        "epsilon": Setting(None, PAPER_S53_UNAVAILABLE + " (LAMB default 1e-6)"),
        "weight_decay": Setting(None, PAPER_S53_UNAVAILABLE),
        **_mixing_settings(),
    },
)


def _cifar(name, optimizer, base_learning_rate, extra):
    return Recipe(
        name=name,
        description=(
            f"CIFAR ResNets with {optimizer} (the paper's §5.1): scale the base "
            "rate linearly from batch 200 "
            "(tf_gradmix.schedules.scaled_learning_rate), warm up for 20 of "
            "200 epochs, then decay (Eq. 15, PolynomialWarmupDecay)."
        ),
        settings={
            "optimizer": Setting(optimizer, PAPER_S51),
            "base_learning_rate": Setting(base_learning_rate, PAPER_S51),
            "base_batch_size": Setting(200, PAPER_S51),
            "epochs": Setting(200, PAPER_S51),
            "warmup_epochs": Setting(20, PAPER_S51),
            "warmup_power": Setting(1.0, OURS_DEFAULT_POWERS),
            "decay_power": Setting(2.0, OURS_DEFAULT_POWERS),
            **extra,
            **_mixing_settings(),
        },
    )


CIFAR_SGD = _cifar("cifar_sgd", "SGD", 0.1, {})
CIFAR_LARS = _cifar(
    "cifar_lars",
    "LARS",
    0.1,
    {
        "trust_coefficient": Setting(1e-3, PAPER_S51),
        "exclude_1d_variables": Setting(True, OURS_EXCLUDE),
    },
)
CIFAR_ADAM = _cifar("cifar_adam", "Adam", 1e-3, {})
CIFAR_LAMB = _cifar(
    "cifar_lamb", "LAMB", 1e-3, {"exclude_1d_variables": Setting(True, OURS_EXCLUDE)}
)
