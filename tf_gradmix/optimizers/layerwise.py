"""Layer-wise exclusions shared by LARS and LAMB.

Exclusion patterns for the coupled weight decay and the layer adaptation
(trust ratio), matched once per variable path in ``build``; the trust
ratio; the config of those arguments.
"""

import re

from keras import ops

from tf_gradmix import backend, validation


def refuse_legacy_arguments(base_kwargs):
    """Raises for the legacy ``decay`` argument instead of ignoring it.

    tensorflow-addons' LAMB and Model Garden's LARS took ``decay``: the
    rate is divided by ``1 + decay * t``. Keras 3 only warns and ignores it.
    """
    if base_kwargs.get("decay") is not None:
        raise validation.invalid(
            "decay",
            base_kwargs["decay"],
            "no value: Keras 3 optimizers have no `decay`. For the legacy "
            "inverse time decay lr / (1 + decay * t) pass learning_rate="
            "keras.optimizers.schedules.InverseTimeDecay(lr, decay_steps=1, "
            "decay_rate=decay)",
        )


def dense_gradient(gradient, dtype):
    """The gradient as a dense tensor of ``dtype`` (norms need all entries)."""
    return ops.cast(backend.current().dense_gradient(gradient), dtype)


def trust_ratio(w_norm, other_norm, denominator, coefficient=1.0):
    """``coefficient * ||w|| / denominator``, or 1 where ``||w||`` or the other norm is 0.

    The layer adaptation of LARS (``other_norm = ||g||``, ``denominator =
    ||g|| + lambda ||w|| + eps``, ``coefficient = eta``) and LAMB
    (``other_norm = denominator = ||r||``); a zero norm (a fresh zero
    initialisation, a zero gradient) leaves the step unscaled. The inner
    ``where`` keeps the division finite in both branches, so its gradient too.
    """
    adapt = ops.logical_and(ops.greater(w_norm, 0), ops.greater(other_norm, 0))
    safe = ops.where(adapt, denominator, ops.ones_like(denominator))
    return ops.where(adapt, coefficient * w_norm / safe, ops.ones_like(w_norm))


def _matches(patterns, path):
    return any(re.search(pattern, path) is not None for pattern in patterns)


class LayerwiseExclusions:
    """Mixin: coupled weight decay and layer adaptation with exclusions.

    Used by :class:`LARS` and :class:`tf_gradmix.optimizers.LAMB`. It

    * stores the pattern lists under ``weight_decay_exclusions`` and
      ``layer_adaptation_exclusions`` (never under the constructor argument
      name ``exclude_from_weight_decay``, which is a method of the Keras base
      class and stays usable);
    * keeps ``weight_decay`` as the *coupled* decay of the update rule and
      turns off the base class's decoupled decay (``_apply_weight_decay``), so
      one decay is applied, never two, and ``weight_decay`` in the config has
      one meaning;
    * decides once per variable in ``build()`` (by its ``path``) whether it
      gets decay and layer adaptation; ``update_step`` reads the stored
      booleans by variable index;
    * validates the shared arguments, refuses the legacy ``decay`` and adds
      the shared arguments to ``get_config``.
    """

    def __init__(
        self,
        learning_rate,
        name,
        weight_decay,
        exclude_from_weight_decay,
        exclude_from_layer_adaptation,
        exclude_1d_variables,
        **base_kwargs,
    ):
        learning_rate = validation.learning_rate(learning_rate)
        refuse_legacy_arguments(base_kwargs)
        super().__init__(learning_rate=learning_rate, name=name, **base_kwargs)
        if weight_decay is None:
            weight_decay = 0.0
        self.weight_decay = validation.number("weight_decay", weight_decay, low=0.0)
        self.weight_decay_exclusions = validation.patterns(
            "exclude_from_weight_decay", exclude_from_weight_decay
        )
        self.layer_adaptation_exclusions = validation.patterns(
            "exclude_from_layer_adaptation", exclude_from_layer_adaptation
        )
        self.exclude_1d_variables = validation.boolean(
            "exclude_1d_variables", exclude_1d_variables
        )

    def build(self, var_list):
        """Builds the base optimizer and matches the exclusion patterns once."""
        super().build(var_list)
        self._use_decay, self._use_adaptation = self._match_exclusions(var_list)

    def _match_exclusions(self, var_list):
        """Per-variable (use_weight_decay, use_layer_adaptation) booleans."""
        decay_patterns = self.weight_decay_exclusions or []
        if self.layer_adaptation_exclusions is None:
            adaptation_patterns = decay_patterns
        else:
            adaptation_patterns = self.layer_adaptation_exclusions
        use_decay, use_adaptation = [], []
        for variable in var_list:
            path = getattr(variable, "path", None) or variable.name
            small = self.exclude_1d_variables and len(variable.shape) <= 1
            use_decay.append(
                not small
                and not _matches(decay_patterns, path)
                # Honour the base class's `exclude_from_weight_decay()` method.
                and self._use_weight_decay(variable)
            )
            use_adaptation.append(not small and not _matches(adaptation_patterns, path))
        return tuple(use_decay), tuple(use_adaptation)

    def uses_weight_decay(self, variable):
        """Whether the built optimizer decays ``variable`` (a model variable)."""
        return self._use_decay[self._get_variable_index(variable)]

    def uses_layer_adaptation(self, variable):
        """Whether the built optimizer applies the trust ratio to ``variable``."""
        return self._use_adaptation[self._get_variable_index(variable)]

    def _apply_weight_decay(self, variables):
        # The decay of LARS/LAMB is coupled: it is part of `update_step`.
        # The base class's decoupled decay must never run in addition.
        return

    def get_config(self):
        config = super().get_config()
        config.update(
            {
                "weight_decay": self.weight_decay,
                "exclude_from_weight_decay": self.weight_decay_exclusions,
                "exclude_from_layer_adaptation": self.layer_adaptation_exclusions,
                "exclude_1d_variables": self.exclude_1d_variables,
            }
        )
        return config


EXCLUSION_ARGS_DOC = """        weight_decay: float ``lambda >= 0``, the coupled weight decay added
            to the update direction (and, for LARS, to the trust-ratio
            denominator). Keras's decoupled weight decay is not applied.
        exclude_from_weight_decay: list of regular expressions; a variable
            whose ``path`` (e.g. ``"dense/bias"``) matches one of them with
            ``re.search`` gets no weight decay. ``None`` or ``[]``: none is
            excluded. The base-class method ``exclude_from_weight_decay()``
            still works and adds to these (it is not saved in configs).
        exclude_from_layer_adaptation: list of regular expressions, as above,
            for the trust ratio (excluded variables use a ratio of 1).
            ``None`` (default): the same list as ``exclude_from_weight_decay``;
            ``[]``: none is excluded.
        exclude_1d_variables: bool. If True, every variable with
            ``ndim <= 1`` (biases, normalisation scales and offsets) is
            excluded from both weight decay and layer adaptation, in addition
            to the patterns. This is the usual large-batch default, and the
            only reliable one for ``keras.applications`` models, whose
            BatchNorm layers are named like ``conv2_block1_1_bn``."""


def document_exclusions(cls):
    """Fills ``{exclusion_args}`` in the docstring of ``cls`` with the arguments above.

    ``python -OO`` strips docstrings (``cls.__doc__`` is ``None``): then
    there is nothing to fill.
    """
    if cls.__doc__:
        cls.__doc__ = cls.__doc__.replace("{exclusion_args}", EXCLUSION_ARGS_DOC)
    return cls
