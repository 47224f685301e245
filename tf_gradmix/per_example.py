"""Per-example gradients and curvature diagnostics.

Everything here measures a model ``f(x; theta)`` with a loss ``loss``; the
symbols used throughout:

* ``x_i, y_i``: example ``i`` of the data (``x``, ``y`` arguments), ``n`` of them;
* ``z_i = f(x_i)``: the model output for example ``i`` (flattened to ``D`` values);
* ``l_i = loss(y_i, z_i)``: the value ``loss`` returns for a batch made of
  example ``i`` alone (averaged if it returns per-element values), so that
  ``L = (1/n) sum_i l_i`` is the mean loss (Keras's ``sum_over_batch_size``);
* ``g_i = grad_theta l_i``: the per-example gradient (:func:`per_example_gradients`);
* ``J_i = d z_i / d theta`` (``D x P``) and ``H_i = d^2 l_i / d z_i^2`` (``D x D``).

Diagnostics (all return plain Python floats, computed in batches of
``batch_size`` examples, layer losses such as weight regularisers excluded):

* :func:`ggn_trace`: ``Tr G`` with ``G = (1/n) sum_i J_i^T H_i J_i``, the
  generalised Gauss-Newton matrix of ``L`` (the paper's Table 1; its Eq. 5
  sums over the data set, ``n`` times larger: compare differences of natural
  logs, not values). Exact, or Hutchinson's estimator.
* :func:`empirical_fisher_trace`: ``Tr F_emp = (1/n) sum_i |g_i|^2``, what the
  paper's Eq. 10-11 contain; it equals the GGN only in special cases
  (Kunstner et al., 2019).
* :func:`gradient_noise_scale`: ``B_simple = tr(Sigma) / |G|^2`` (McCandlish
  et al., 2018), from per-example gradients or from gradient norms at two
  batch sizes (:func:`noise_scale_from_gradient_norms`).
* :class:`DiagnosticsLogger`: a Keras callback logging these every N epochs.

Per-example gradients use ``tf.vectorized_map``: each example runs through
the model as a batch of one, so layers whose training-mode output for one
example depends on the others (BatchNormalization) or that draw one random
mask for the whole vectorised batch (Dropout and other random layers: every
example would share one mask) give wrong results; they are refused with a
clear error (:func:`check_per_example_safe`). The curvature functions run the
model in inference mode, where BatchNorm models are fine.

:func:`per_example_train_step` is the opt-in exact per-example mixing mode:
one Keras train step that mixes ``g = sum_b w_b g_b / B`` from materialised
per-example gradients instead of reweighting the loss.

References:
    McCandlish, Kaplan, Amodei et al. (2018). An Empirical Model of
    Large-Batch Training. arXiv:1812.06162.
    Kunstner, Hennig, Balles (2019). Limitations of the empirical Fisher
    approximation for natural gradient descent. NeurIPS.
    Hutchinson (1989). A stochastic estimator of the trace of the influence
    matrix for Laplacian smoothing splines.
    Schraudolph (2002). Fast curvature matrix-vector products for
    second-order gradient descent. Neural Computation.
"""

import math
from typing import NamedTuple

import keras
import numpy as np
import tensorflow as tf

from tf_gradmix import compat
from tf_gradmix import noise as noise_lib
from tf_gradmix.model import is_enabled
from tf_gradmix.optimizer import find_gradient_mix

__all__ = [
    "per_example_gradients",
    "check_per_example_safe",
    "per_example_train_step",
    "ggn_trace",
    "ggn_vector_product",
    "empirical_fisher_trace",
    "gradient_noise_scale",
    "noise_scale_from_gradient_norms",
    "TraceEstimate",
    "NoiseScale",
    "DiagnosticsLogger",
]

DEFAULT_BATCH_SIZE = 64
SPLITS = ("output", "logits")

_ZERO = tf.UnconnectedGradients.ZERO


# -- results ------------------------------------------------------------------


class TraceEstimate(NamedTuple):
    """A trace averaged over examples, with its standard errors.

    Attributes:
        trace: the estimate of ``Tr M = (1/n) sum_i t_i`` on the given examples.
        stderr: standard error of ``trace`` from Hutchinson's probes for these
            examples (``0.0`` when exact).
        data_stderr: standard error from using ``n`` examples rather than the
            whole data distribution: ``std_i(t_i) / sqrt(n)`` with ``t_i`` the
            (estimated) per-example traces (slightly conservative with
            probes).
        num_examples: ``n``.
        num_probes: Hutchinson probes, ``None`` when exact.
    """

    trace: float
    stderr: float
    data_stderr: float
    num_examples: int
    num_probes: object = None

    @property
    def total_stderr(self):
        """``sqrt(stderr^2 + data_stderr^2)``."""
        return math.hypot(self.stderr, self.data_stderr)

    @property
    def log_trace(self):
        """Natural log of ``trace``."""
        return math.log(self.trace) if self.trace > 0 else float("nan")

    @property
    def log_stderr(self):
        """Standard error of ``log_trace`` (delta method: ``total_stderr / trace``)."""
        return self.total_stderr / self.trace if self.trace > 0 else float("nan")


class NoiseScale(NamedTuple):
    """The simple gradient noise scale of McCandlish et al. (2018).

    Attributes:
        b_simple: ``tr(Sigma) / |G|^2``, the critical-batch-size estimate (in
            examples). Negative or huge when ``|G|^2`` is not resolved.
        trace_sigma: unbiased ``tr(Sigma)``, the trace of the per-example
            gradient covariance.
        grad_sq_norm: unbiased ``|G|^2``, the squared norm of the true gradient.
    """

    b_simple: float
    trace_sigma: float
    grad_sq_norm: float


# -- helpers ------------------------------------------------------------------


def _walk_layers(layer, seen=None):
    """``layer`` and every layer nested in it (models, wrappers, attributes)."""
    seen = set() if seen is None else seen
    if id(layer) in seen:
        return
    seen.add(id(layer))
    yield layer
    children = list(getattr(layer, "layers", None) or [])
    for value in vars(layer).values():
        if isinstance(value, keras.layers.Layer):
            children.append(value)
        elif isinstance(value, (list, tuple)):
            children.extend(v for v in value if isinstance(v, keras.layers.Layer))
    for child in children:
        yield from _walk_layers(child, seen)


def _couples_examples(layer):
    return isinstance(layer, keras.layers.BatchNormalization) and layer.trainable


def _is_random(layer):
    if getattr(layer, "rate", None) == 0:
        return False
    return any(isinstance(v, keras.random.SeedGenerator) for v in vars(layer).values())


def check_per_example_safe(model, training=True):
    """Raises if per-example gradients of ``model`` would be wrong.

    ``tf.vectorized_map`` runs each example as a batch of one. In training mode
    (``training=True``) that is wrong for

    * trainable ``BatchNormalization`` layers (also inside nested models):
      each example would be normalised by its own statistics, and the moving
      statistics would be updated from one example;
    * random layers (``Dropout``, ``GaussianNoise``, random augmentation, any
      layer holding a ``keras.random.SeedGenerator``): every example would
      share one random mask.

    In inference mode (``training=False``) every layer is per example.
    Custom layers that mix examples (e.g. batch statistics computed by hand)
    cannot be detected.

    Args:
        model: a ``keras.Model`` (or layer).
        training: the mode the model will run in.

    Raises:
        ValueError: naming the offending layers.
    """
    if not training:
        return
    coupling = [l.name for l in _walk_layers(model) if _couples_examples(l)]
    if coupling:
        raise ValueError(
            "Per-example gradients (tf.vectorized_map) are wrong for models "
            "whose training-mode output for one example depends on the other "
            "examples of the batch, and this model has trainable "
            f"BatchNormalization layers: {coupling[:5]}"
            f"{' ...' if len(coupling) > 5 else ''}. Use the loss-reweighting "
            "path (tf_gradmix.Model / enable without per-example gradients), "
            "compute diagnostics with training=False, or replace BatchNorm "
            "(e.g. GroupNormalization / LayerNormalization)."
        )
    random = [l.name for l in _walk_layers(model) if _is_random(l)]
    if random:
        raise ValueError(
            "Per-example gradients (tf.vectorized_map) in training mode would "
            "give every example the same random mask, and this model has "
            f"random layers: {random[:5]}{' ...' if len(random) > 5 else ''}. "
            "Use the loss-reweighting path, or training=False."
        )


def _single_output(output):
    flat = tf.nest.flatten(output)
    if len(flat) != 1:
        raise NotImplementedError(
            "tf_gradmix.diagnostics supports models with a single output "
            f"tensor; this model returns {len(flat)}."
        )
    return flat[0]


def _get_loss(loss, model=None):
    if loss is None:
        loss = getattr(model, "loss", None)
        if loss is None:
            raise ValueError(
                "No `loss` given and the model is not compiled with one."
            )
    if isinstance(loss, (list, tuple, dict)):
        raise NotImplementedError("Pass a single loss (one model output).")
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    if not callable(loss):
        raise TypeError(f"Invalid value for argument `loss`: {loss!r}.")
    return loss


def _example_loss(loss, y_i, z_i):
    """``l_i``: ``loss`` on a batch of one, averaged to a scalar."""
    value = loss(y_i[None], z_i[None])
    return tf.reduce_mean(tf.cast(value, z_i.dtype))


def _logits_of(output):
    """The logits and link (``"softmax"``/``"sigmoid"``) of a probability output."""
    logits = getattr(output, "_keras_logits", None)
    op = getattr(output, "op", None)
    op_type = getattr(op, "type", None)
    if op_type not in ("Softmax", "Sigmoid"):
        raise ValueError(
            "split='logits' needs a model whose output is a softmax or sigmoid "
            f"(a Keras activation or layer); its last op is {op_type!r}. For "
            "a model that outputs logits already, use split='output'."
        )
    if logits is None:
        logits = op.inputs[0]
    return logits, op_type.lower()


def _apply_link(link, logits):
    if link is None:
        return logits
    # Keras's activations mark the result with its logits, so Keras's
    # probability losses take their stable from-logits path.
    return keras.activations.get(link)(logits)


def _batches(x, y, batch_size):
    """Yields ``(x, y)`` batches of arrays/tensors, or a dataset's elements."""
    if isinstance(x, tf.data.Dataset):
        if y is not None:
            raise ValueError("With a tf.data.Dataset `x`, `y` must be None.")
        for element in x:
            if not isinstance(element, (tuple, list)) or len(element) < 2:
                raise ValueError("The dataset must yield (x, y) batches.")
            yield element[0], element[1]
        return
    n = len(tf.nest.flatten(x)[0])
    for start in range(0, n, batch_size):
        sl = slice(start, start + batch_size)
        yield (
            tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[sl]), x),
            tf.convert_to_tensor(y[sl]),
        )


def _variables(model):
    # The backing tf.Variables: what tapes and ForwardAccumulator understand.
    return [v.value for v in model.trainable_variables]


def _vectorized_example_gradients(model, x, y, example_scalar, variables, training):
    """``[B, *v.shape]`` gradients of ``example_scalar(output_i, y_i)`` for each example."""

    def one(args):
        x_i, y_i = args
        x_i = tf.nest.map_structure(lambda t: t[None], x_i)
        with tf.GradientTape() as tape:
            output = _single_output(model(x_i, training=training))
            value = example_scalar(output, y_i)
        return tape.gradient(value, variables, unconnected_gradients=_ZERO)

    return tf.vectorized_map(one, (x, y), fallback_to_while_loop=True)


def _batch_function(fn, batches):
    """``fn`` as one ``tf.function`` for every batch size (traced once).

    Returns the function and the batches (an iterator whose first element was
    read to find the signature).
    """
    batches = iter(batches)
    try:
        first = next(batches)
    except StopIteration:
        raise ValueError("No examples given.") from None

    def spec(t):
        return tf.TensorSpec([None] + list(t.shape[1:]), t.dtype)

    signature = tf.nest.map_structure(spec, first)
    function = tf.function(fn, input_signature=list(signature))

    def all_batches():
        yield first
        yield from batches

    return function, all_batches()


def _maybe_function(fn, *args):
    if tf.executing_eagerly():
        return tf.function(fn)(*args)
    return fn(*args)


# -- per-example gradients ----------------------------------------------------


def per_example_gradients(model, x, y, loss, training=True):
    """Per-example gradients ``g_i = grad_theta l_i`` with ``tf.vectorized_map``.

    ``l_i = mean(loss(y[i:i+1], model(x[i:i+1])))``: the loss of a batch made
    of example ``i`` alone. Layer losses (regularisers, ``add_loss``) are not
    included. Memory grows as ``B x`` the number of parameters.

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs, a tensor/array (or nested structure) with ``B`` examples
            on axis 0.
        y: targets with ``B`` examples on axis 0.
        loss: a Keras loss (instance, function or name) called as
            ``loss(y_true, y_pred)``.
        training: mode of the forward pass (default ``True``). In training
            mode models with trainable BatchNormalization or random layers
            are refused (:func:`check_per_example_safe`).

    Returns:
        A list with one tensor per ``model.trainable_variables``, of shape
        ``[B, *variable.shape]``.

    Raises:
        ValueError: for models whose training-mode output for one example
            depends on the other examples (BatchNorm) or that share random
            masks across examples.
    """
    check_per_example_safe(model, training=training)
    loss = _get_loss(loss)
    variables = _variables(model)

    def compute(x, y):
        return _vectorized_example_gradients(
            model, x, y, lambda z, y_i: _example_loss(loss, y_i, z[0]), variables, training
        )

    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    return _maybe_function(compute, x, tf.convert_to_tensor(y))


# -- the exact per-example mixing mode -----------------------------------------


def _unscale_for_distribution(loss):
    # Keras divides each replica's loss by the replica count; the tracker
    # records the unscaled value (as Keras's own train_step does).
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    return loss * tf.cast(replicas, loss.dtype) if replicas > 1 else loss


def _detached_outputs(y_pred, tape):
    """Copies of the tensors a Keras loss reads from ``y_pred``, as watched leaves.

    A Keras loss reads the output, or the logits Keras attached to a softmax
    or sigmoid output (``compat.transform_output`` keeps that structure).
    Returns the transformed output and the list of ``(original, leaf)`` pairs.
    """
    pairs = []

    def leaf(tensor):
        copy = tf.stop_gradient(tensor)
        tape.watch(copy)
        pairs.append((tensor, copy))
        return copy

    return compat.transform_output(y_pred, leaf), pairs


def _loss_facing(output):
    """The originals ``_detached_outputs`` would detach, in the same order."""
    found = []

    def record(tensor):
        found.append(tensor)
        return tensor

    compat.transform_output(output, record)
    return found


def per_example_train_step(model, data, per_example_fn=None):
    """One Keras train step that mixes materialised per-example gradients.

    The opt-in exact alternative to loss reweighting. For a batch of ``B``
    examples with predictions ``yhat_b``, Keras's loss ``L`` (the model's own
    ``compute_loss``, with sample weights and its reduction) and mixing weights
    ``w_b`` (``GradientMix.example_weights(B)``, mean 1):

    .. math::

        g_b = J_b^\\top \\frac{\\partial L}{\\partial \\hat y_b},\\qquad
        g = \\sum_b w_b\\, g_b + \\nabla_\\theta L_{\\text{layers}},

    where ``g_b`` (computed for all ``b`` with ``tf.vectorized_map``) is example
    ``b``'s gradient of the batch loss: ``s_b grad l_b / B`` for the default
    ``sum_over_batch_size`` reduction (``s_b`` the user's sample weight), and
    the same rule with the loss's own denominator for other reductions. Layer
    losses ``L_layers`` (regularisers, ``add_loss``) are added unmixed. This
    equals the reweighting path (:class:`tf_gradmix.Model`) up to float
    rounding. With a plain optimizer, or ``GradientMix(level="device")``,
    ``w_b = 1`` (plain averaging; the device weights are applied by the
    optimizer). On a model with the sample-level hook
    (:func:`tf_gradmix.enable`), the hook's ``compute_loss`` already weights
    ``dL/dyhat_b`` by ``w_b`` (and logs gamma), so no weight is applied twice.

    The step runs one batched forward pass (loss, metrics, layer losses) and
    one vectorised per-example forward and backward pass; memory grows as
    ``B x`` parameters. Follows Keras's TensorFlow ``train_step``: loss
    tracker, ``optimizer.scale_loss``, ``optimizer.apply``, ``compute_metrics``.

    Args:
        model: a compiled ``keras.Model`` with one output and no trainable
            BatchNormalization or random layers.
        data: the step's data, ``x``, ``(x, y)`` or ``(x, y, sample_weight)``.
        per_example_fn: optional ``fn(per_example_grads) -> per_example_grads``
            applied to the list of ``[B, *v.shape]`` gradients ``g_b`` before
            mixing (e.g. per-example clipping). Default: none.

    Returns:
        The logs dict, like ``keras.Model.train_step``.

    Raises:
        ValueError: for BatchNorm or random-layer models (see
            :func:`check_per_example_safe`).

    Example (what ``train_step`` of a per-example model does)::

        class PerExampleModel(keras.Model):
            def train_step(self, data):
                return tf_gradmix.diagnostics.per_example_train_step(self, data)
    """
    check_per_example_safe(model, training=True)
    x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
    variables = _variables(model)
    optimizer = model.optimizer

    # 1. Batched forward pass: loss value, dL/dyhat and the layer losses' gradient.
    with tf.GradientTape(persistent=True) as tape:
        y_pred = model(x, training=True)
        loss_input, pairs = _detached_outputs(y_pred, tape)
        loss = model.compute_loss(x, y, loss_input, sample_weight, training=True)
        tracker = compat.loss_tracker(model)
        if tracker is not None:
            tracker.update_state(
                _unscale_for_distribution(loss),
                sample_weight=tf.shape(tf.nest.flatten(x)[0])[0],
            )
        scaled = optimizer.scale_loss(loss) if optimizer is not None else loss
    cotangents = tape.gradient(
        scaled, [leaf for _, leaf in pairs], unconnected_gradients=_ZERO
    )
    layer_grads = tape.gradient(scaled, variables, unconnected_gradients=_ZERO)
    del tape

    # 2. Per-example gradients g_b = J_b^T dL/dyhat_b (vectorised).
    def contribution(output, cotangent_b):
        facing = _loss_facing(output)
        if len(facing) != len(cotangent_b):
            raise RuntimeError("Per-example outputs differ from the batched ones.")
        return tf.add_n(
            [tf.reduce_sum(t[0] * tf.cast(c, t.dtype)) for t, c in zip(facing, cotangent_b)]
        )

    per_example = _vectorized_example_gradients(
        model, x, cotangents, contribution, variables, training=True
    )
    if per_example_fn is not None:
        per_example = per_example_fn(per_example)

    # 3. Mix: g = sum_b w_b g_b (+ layer losses, unmixed).
    batch_size = tf.shape(tf.nest.flatten(x)[0])[0]
    weights = tf.ones([batch_size])
    mixer = find_gradient_mix(optimizer)
    if mixer is not None and mixer.level == "sample" and not is_enabled(model):
        weights = mixer.example_weights(batch_size)
        gamma = getattr(model, "_gradmix_gamma", None)
        if gamma is not None:
            gamma.update_state(noise_lib.gamma(weights))
    grads = [
        tf.tensordot(tf.cast(weights, g.dtype), g, axes=1) + extra
        for g, extra in zip(per_example, layer_grads)
    ]
    if variables:
        optimizer.apply(grads, model.trainable_variables)
    return model.compute_metrics(x, y, y_pred, sample_weight=sample_weight)


# -- GGN ----------------------------------------------------------------------


def _check_split(split):
    if split not in SPLITS:
        raise ValueError(
            f"Invalid value for argument `split`: {split!r}. Expected one of {SPLITS}."
        )


def _split_output(model, x, split):
    """``(z, link)``: the tensor the GGN is split at, and the link to the loss."""
    output = _single_output(model(x, training=False))
    if split == "output":
        return output, None
    return _logits_of(output)


def _output_hessians(loss, z, y, link):
    """``H_i = d^2 l_i / d z_i^2`` for every example: ``[B, D, D]``."""
    batch = tf.shape(z)[0]
    shape = tf.shape(z)[1:]
    flat = tf.reshape(z, [batch, -1])
    with tf.GradientTape() as outer:
        outer.watch(flat)
        with tf.GradientTape() as inner:
            inner.watch(flat)

            def one(args):
                z_i, y_i = args
                return _example_loss(loss, y_i, _apply_link(link, tf.reshape(z_i, shape)[None])[0])

            total = tf.reduce_sum(
                tf.vectorized_map(one, (flat, y), fallback_to_while_loop=True)
            )
        gradient = inner.gradient(total, flat)
    return outer.batch_jacobian(gradient, flat)


def _exact_chunk(model, loss, split, x, y):
    """Per-example ``t_i = Tr(J_i^T H_i J_i) = Tr(H_i J_i J_i^T)``: ``[B]``."""
    variables = _variables(model)
    z, link = _split_output(model, x, split)
    hessians = _output_hessians(loss, z, y, link)

    def jacobian_one(x_i):
        x_i = tf.nest.map_structure(lambda t: t[None], x_i)
        with tf.GradientTape() as tape:
            z_i, _ = _split_output(model, x_i, split)
            z_i = tf.reshape(z_i, [-1])
        jac = tape.jacobian(z_i, variables, unconnected_gradients=_ZERO)
        return [tf.reshape(j, [tf.shape(z_i)[0], -1]) for j in jac]

    jacobians = tf.vectorized_map(jacobian_one, x, fallback_to_while_loop=True)
    gram = tf.add_n([tf.einsum("bdp,bep->bde", j, j) for j in jacobians])
    return tf.einsum("bde,bde->b", hessians, gram)


def _rademacher(variables, seed, probe):
    key = tf.stack([tf.cast(seed, tf.int64), tf.cast(probe, tf.int64)])
    out = []
    for index, v in enumerate(variables):
        s = tf.random.experimental.stateless_fold_in(key, index)
        bits = tf.random.stateless_uniform(v.shape, seed=s, minval=0, maxval=2, dtype=tf.int32)
        out.append(tf.cast(2 * bits - 1, v.dtype))
    return out


def _jvp(model, x, split, tangents):
    """``(z, J v)`` by forward-mode autodiff (``ForwardAccumulator`` wants ``v.value``)."""
    variables = _variables(model)
    with tf.autodiff.ForwardAccumulator(
        primals=variables, tangents=tangents
    ) as acc:
        z, link = _split_output(model, x, split)
    return z, acc.jvp(z, unconnected_gradients=_ZERO), link


def _hutchinson_chunk(model, loss, split, seed, x, y, num_probes):
    """``q[k, i] = (J_i v_k)^T H_i (J_i v_k)`` for probes ``k``: ``[K, B]``."""
    variables = _variables(model)
    z, link = _split_output(model, x, split)
    hessians = _output_hessians(loss, z, y, link)
    batch = tf.shape(z)[0]

    def probe(k):
        _, u, _ = _jvp(model, x, split, _rademacher(variables, seed, k))
        u = tf.reshape(u, [batch, -1])
        return tf.einsum("bd,bde,be->b", u, hessians, u)

    return tf.map_fn(probe, tf.range(num_probes), fn_output_signature=z.dtype)


def ggn_vector_product(model, x, y, loss, vector, split="output"):
    """``G v = (1/n) sum_i J_i^T H_i (J_i v)`` on one batch (inference mode).

    Forward mode gives ``J_i v``, the output Hessian ``H_i`` multiplies it, and
    reverse mode gives ``J_i^T (...)`` (Schraudolph, 2002). ``v^T G v`` needs
    only the first two steps, which is what :func:`ggn_trace` uses.

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs of the ``n`` examples (one batch).
        y: their targets.
        loss: a Keras loss (see :func:`ggn_trace`).
        vector: list of tensors shaped like ``model.trainable_variables``.
        split: ``"output"`` or ``"logits"`` (see :func:`ggn_trace`).

    Returns:
        list of tensors shaped like ``model.trainable_variables``.
    """
    _check_split(split)
    loss = _get_loss(loss)
    variables = _variables(model)

    def compute(x, y, vector):
        z, u, link = _jvp(model, x, split, vector)
        hessians = _output_hessians(loss, z, y, link)
        batch = tf.shape(z)[0]
        hu = tf.einsum("bde,be->bd", hessians, tf.reshape(u, [batch, -1]))
        hu = tf.stop_gradient(tf.reshape(hu, tf.shape(z)))
        with tf.GradientTape() as tape:
            z, _ = _split_output(model, x, split)
            inner = tf.reduce_sum(z * hu) / tf.cast(batch, z.dtype)
        return tape.gradient(inner, variables, unconnected_gradients=_ZERO)

    x = tf.nest.map_structure(tf.convert_to_tensor, x)
    vector = [tf.convert_to_tensor(v, dtype=w.dtype) for v, w in zip(vector, variables)]
    return _maybe_function(compute, x, tf.convert_to_tensor(y), vector)


def ggn_trace(
    model,
    x,
    y,
    loss,
    num_probes=None,
    seed=0,
    batch_size=DEFAULT_BATCH_SIZE,
    split="output",
):
    """Trace of the generalised Gauss-Newton matrix of the mean loss.

    .. math::

        \\operatorname{Tr} G,\\qquad G = \\frac{1}{n} \\sum_{i=1}^{n} J_i^\\top H_i J_i,

    with ``J_i`` the Jacobian of the model output ``z_i`` for example ``i``
    and ``H_i`` the Hessian of ``l_i = loss(y_i, z_i)`` with respect to
    ``z_i``. The paper's Eq. 5 sums over the data set (``n`` times this):
    compare differences of (natural) logs with its Table 1, not values.

    The model runs in inference mode (``training=False``), so BatchNorm
    models use their moving statistics and Dropout is off.

    * ``num_probes=None``: exact. ``Tr(J_i^T H_i J_i) = Tr(H_i J_i J_i^T)``
      from each example's full Jacobian (``D`` backward passes of one
      example, vectorised) and ``H_i`` by autodiff of ``loss``.
    * ``num_probes=K``: Hutchinson's estimator with Rademacher probes
      ``v_k`` (entries +-1, shared by all examples):
      ``Tr G ~= (1/K) sum_k v_k^T G v_k`` and
      ``v^T G v = (1/n) sum_i (J_i v)^T H_i (J_i v)``, ``J_i v`` by
      forward mode (the reverse half of the GGN-vector product,
      :func:`ggn_vector_product`, is not needed for the quadratic form).
      Costs ``K`` forward-mode passes over the data.

    Where the split is taken (``split``): ``"output"`` (default) splits at
    the model's output, whatever it is. For a model ending in a softmax with
    a probability loss (cross-entropy with ``from_logits=False``) that makes
    ``H_i`` the Hessian of ``-log p_y`` in the probabilities, and
    ``J_i^T H_i J_i = grad log p_y grad log p_y^T``: with hard labels the
    output-split GGN *is* the empirical Fisher. ``"logits"`` splits before
    the final softmax/sigmoid (``H_i = diag(p) - p p^T`` for softmax
    cross-entropy: the usual GGN = Fisher of the predictive distribution); it
    equals ``"output"`` for a model that outputs logits with a
    ``from_logits=True`` loss. Use logits (either way) to compare with the paper.

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs (array/tensor with the ``n`` examples on axis 0), or a
            ``tf.data.Dataset`` of ``(x, y)`` batches (then ``y=None``).
        y: targets, or ``None`` with a dataset.
        loss: a Keras loss (instance, function or name) called as
            ``loss(y_true, y_pred)``; it must be twice differentiable in
            ``y_pred``.
        num_probes: ``None`` for exact, else the number ``K`` of probes.
        seed: int seed of the probes.
        batch_size: examples per computation (memory: the exact mode holds
            ``batch_size x D x`` parameters floats).
        split: ``"output"`` or ``"logits"``.

    Returns:
        :class:`TraceEstimate` (``.trace``, ``.stderr`` from the probes,
        ``.data_stderr`` from the examples, ``.log_trace``, ``.log_stderr``).
    """
    _check_split(split)
    loss = _get_loss(loss)
    if num_probes is not None and (int(num_probes) != num_probes or num_probes < 2):
        raise ValueError(f"Invalid value for argument `num_probes`: {num_probes!r}.")
    if num_probes is None:
        chunk = lambda x, y: _exact_chunk(model, loss, split, x, y)  # noqa: E731
    else:
        chunk = lambda x, y: _hutchinson_chunk(  # noqa: E731
            model, loss, split, seed, x, y, int(num_probes)
        )
    fn, batches = _batch_function(chunk, _batches(x, y, batch_size))
    chunks = [fn(xb, yb).numpy().astype(np.float64) for xb, yb in batches]
    if num_probes is None:
        per_example = np.concatenate(chunks)
        n = per_example.size
        return TraceEstimate(
            float(per_example.mean()), 0.0, _stderr(per_example), n, None
        )
    q = np.concatenate(chunks, axis=1)  # [K, n]
    n = q.shape[1]
    return TraceEstimate(
        float(q.mean()), _stderr(q.mean(axis=1)), _stderr(q.mean(axis=0)), n, int(num_probes)
    )


def _stderr(values):
    values = np.asarray(values, np.float64)
    if values.size < 2:
        return float("nan")
    return float(values.std(ddof=1) / math.sqrt(values.size))


# -- empirical Fisher and noise scale -----------------------------------------


def _per_example_stats(model, x, y, loss, batch_size, training):
    """Yields ``(sum_i g_i, |g_i|^2 for each i)`` per batch."""
    check_per_example_safe(model, training=training)
    variables = _variables(model)

    def stats(x, y):
        grads = _vectorized_example_gradients(
            model, x, y, lambda z, y_i: _example_loss(loss, y_i, z[0]), variables, training
        )
        sq = tf.add_n(
            [tf.reduce_sum(tf.reshape(tf.square(g), [tf.shape(g)[0], -1]), axis=1) for g in grads]
        )
        return [tf.reduce_sum(g, axis=0) for g in grads], sq

    stats, batches = _batch_function(stats, _batches(x, y, batch_size))
    for xb, yb in batches:
        sums, sq = stats(xb, yb)
        yield [s.numpy().astype(np.float64) for s in sums], sq.numpy().astype(np.float64)


def empirical_fisher_trace(model, x, y, loss, batch_size=DEFAULT_BATCH_SIZE, training=False):
    """Trace of the empirical Fisher: the mean squared per-example gradient norm.

    .. math::

        \\operatorname{Tr} F_{\\text{emp}} = \\frac{1}{n} \\sum_{i=1}^{n} \\lVert g_i \\rVert^2,
        \\qquad g_i = \\nabla_\\theta l_i .

    This is what the paper's Eq. 10-11 contain. It is not the GGN (nor the
    Fisher): it uses the observed labels instead of the model's predictive
    distribution, and it includes the mean gradient (Kunstner et al., 2019).

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs, or a ``tf.data.Dataset`` of ``(x, y)`` batches.
        y: targets, or ``None`` with a dataset.
        loss: a Keras loss called as ``loss(y_true, y_pred)``.
        batch_size: examples per vectorised computation.
        training: forward mode (default ``False``; ``True`` refuses BatchNorm
            and random layers).

    Returns:
        :class:`TraceEstimate` (exact on these examples: ``stderr = 0``).
    """
    loss = _get_loss(loss)
    sq = np.concatenate([s for _, s in _per_example_stats(model, x, y, loss, batch_size, training)])
    return TraceEstimate(float(sq.mean()), 0.0, _stderr(sq), sq.size, None)


def noise_scale_from_gradient_norms(small_sq_norm, small_batch_size, big_sq_norm, big_batch_size):
    """``B_simple`` from squared gradient norms at two batch sizes.

    With ``E|G_B|^2 = |G|^2 + tr(Sigma) / B`` (McCandlish et al., 2018, App. A.1):

    .. math::

        |G|^2 \\approx \\frac{B_{big} |G_{B_{big}}|^2 - B_{small} |G_{B_{small}}|^2}{B_{big} - B_{small}},
        \\qquad
        \\operatorname{tr}\\Sigma \\approx \\frac{|G_{B_{small}}|^2 - |G_{B_{big}}|^2}{1/B_{small} - 1/B_{big}} .

    Average the squared norms over many batches before calling (the ratio of
    averages, not the average of ratios). Works with any model (BatchNorm
    included) and needs no per-example gradients, e.g. the per-replica and
    the all-reduced gradient of data-parallel training.

    Args:
        small_sq_norm: mean ``|G_B|^2`` of gradients of batches of ``small_batch_size``.
        small_batch_size: ``B_small``.
        big_sq_norm: mean ``|G_B|^2`` at ``big_batch_size``.
        big_batch_size: ``B_big > B_small``.

    Returns:
        :class:`NoiseScale`.
    """
    b_small, b_big = float(small_batch_size), float(big_batch_size)
    if not b_big > b_small > 0:
        raise ValueError(
            f"Need big_batch_size > small_batch_size > 0, got {big_batch_size}, {small_batch_size}."
        )
    grad_sq = (b_big * big_sq_norm - b_small * small_sq_norm) / (b_big - b_small)
    trace_sigma = (small_sq_norm - big_sq_norm) / (1.0 / b_small - 1.0 / b_big)
    b_simple = trace_sigma / grad_sq if grad_sq != 0 else float("inf")
    return NoiseScale(float(b_simple), float(trace_sigma), float(grad_sq))


def gradient_noise_scale(
    model,
    x,
    y,
    loss,
    method="per_example",
    small_batch_size=None,
    batch_size=DEFAULT_BATCH_SIZE,
    training=False,
):
    """The simple gradient noise scale ``B_simple = tr(Sigma) / |G|^2``.

    ``G`` is the gradient of the mean loss and ``Sigma`` the covariance of
    per-example gradients; ``B_simple`` estimates the critical batch size
    (McCandlish et al., 2018): batches much smaller than it train almost
    perfectly data-efficiently, much larger ones waste examples.

    * ``method="per_example"``: from the ``n`` per-example gradients,
      ``tr(Sigma) = (sum_i |g_i|^2 - n |gbar|^2) / (n - 1)`` and the unbiased
      ``|G|^2 = |gbar|^2 - tr(Sigma) / n``. Refuses BatchNorm/random layers
      when ``training=True``.
    * ``method="two_batch"``: from the mean squared norm of the gradients of
      the ``n // small_batch_size`` disjoint batches of ``small_batch_size``
      examples (one ordinary backward pass each, any model, BatchNorm in
      training mode included) and of their average, the gradient of all
      ``n' = (n // small_batch_size) * small_batch_size`` examples, through
      :func:`noise_scale_from_gradient_norms`. With ``small_batch_size=1``
      it equals ``"per_example"``.

    Args:
        model: a ``keras.Model`` with one output.
        x: inputs, or a ``tf.data.Dataset`` of ``(x, y)`` batches (``"per_example"``).
        y: targets, or ``None`` with a dataset.
        loss: a Keras loss called as ``loss(y_true, y_pred)``; for
            ``"two_batch"`` its reduction must average over the batch
            (Keras's default).
        method: ``"per_example"`` or ``"two_batch"``.
        small_batch_size: ``B_small`` for ``"two_batch"``.
        batch_size: examples per vectorised computation (``"per_example"``).
        training: forward mode (default ``False``).

    Returns:
        :class:`NoiseScale`.
    """
    loss = _get_loss(loss)
    if method == "per_example":
        total, sq_sum, n = None, 0.0, 0
        for sums, sq in _per_example_stats(model, x, y, loss, batch_size, training):
            total = sums if total is None else [a + b for a, b in zip(total, sums)]
            sq_sum += float(sq.sum())
            n += sq.size
        if n < 2:
            raise ValueError("Need at least 2 examples.")
        mean_sq = sum(float(np.sum(np.square(t / n))) for t in total)
        return noise_scale_from_gradient_norms(sq_sum / n, 1, mean_sq, n)
    if method != "two_batch":
        raise ValueError(
            f"Invalid value for argument `method`: {method!r}. Expected "
            "'per_example' or 'two_batch'."
        )
    if isinstance(x, tf.data.Dataset):
        raise ValueError("method='two_batch' takes arrays, not a dataset.")
    if not small_batch_size or small_batch_size < 1:
        raise ValueError("method='two_batch' needs `small_batch_size` >= 1.")
    variables = _variables(model)

    @tf.function(reduce_retracing=True)
    def batch_gradient(x, y):
        with tf.GradientTape() as tape:
            output = _single_output(model(x, training=training))
            value = tf.cast(loss(y, output), output.dtype)
            value = tf.reduce_mean(value)
        return tape.gradient(value, variables, unconnected_gradients=_ZERO)

    total, sq_sum, count = None, 0.0, 0
    n = len(tf.nest.flatten(x)[0])
    # In training mode BatchNorm updates its moving statistics on every
    # call; a measurement must leave the model as it found it.
    state = [(v, v.numpy()) for v in model.non_trainable_variables]
    try:
        for start in range(0, n - small_batch_size + 1, small_batch_size):
            sl = slice(start, start + small_batch_size)
            grads = batch_gradient(
                tf.nest.map_structure(lambda a: tf.convert_to_tensor(a[sl]), x),
                tf.convert_to_tensor(y[sl]),
            )
            grads = [g.numpy().astype(np.float64) for g in grads]
            sq_sum += sum(float(np.sum(np.square(g))) for g in grads)
            total = grads if total is None else [a + b for a, b in zip(total, grads)]
            count += 1
    finally:
        for variable, value in state:
            variable.assign(value)
    if count < 2:
        raise ValueError("method='two_batch' needs at least 2 small batches.")
    big_sq = sum(float(np.sum(np.square(t / count))) for t in total)
    return noise_scale_from_gradient_norms(
        sq_sum / count, small_batch_size, big_sq, count * small_batch_size
    )


# -- callback -----------------------------------------------------------------


class DiagnosticsLogger(keras.callbacks.Callback):
    """Logs curvature and noise diagnostics every ``every_n_epochs`` epochs.

    Measured on a fixed sample ``(x, y)`` (e.g. 512 training examples), in
    inference mode, at the end of epochs ``every_n_epochs - 1``,
    ``2 * every_n_epochs - 1``, ... . Adds to the epoch's logs (so
    ``History`` and later callbacks see them; put it before them):

    * ``ggn_trace``, ``log_ggn_trace``, ``log_ggn_trace_stderr`` (:func:`ggn_trace`);
    * ``empirical_fisher_trace`` (:func:`empirical_fisher_trace`);
    * ``gradient_noise_scale`` (``B_simple``, :func:`gradient_noise_scale`).

    ``self.history`` keeps ``{"epoch": e, **values}`` for each measured epoch.

    Args:
        x: inputs of the fixed sample.
        y: its targets.
        loss: a Keras loss; default the model's compiled loss.
        every_n_epochs: measure every N epochs.
        num_probes: ``None`` for the exact GGN trace, else Hutchinson probes.
        seed: seed of the probes.
        batch_size: examples per computation.
        split: GGN split, ``"output"`` or ``"logits"`` (see :func:`ggn_trace`).
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
        batch_size=DEFAULT_BATCH_SIZE,
        split="output",
        ggn=True,
        empirical_fisher=True,
        noise_scale="per_example",
        small_batch_size=None,
        prefix="",
    ):
        super().__init__()
        if every_n_epochs < 1:
            raise ValueError(f"Invalid value for argument `every_n_epochs`: {every_n_epochs!r}.")
        _check_split(split)
        self.x, self.y = x, y
        self.loss = loss
        self.every_n_epochs = int(every_n_epochs)
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
        loss = _get_loss(self.loss, self.model)
        values = {}
        if self.ggn:
            est = ggn_trace(
                self.model, self.x, self.y, loss, num_probes=self.num_probes,
                seed=self.seed, batch_size=self.batch_size, split=self.split,
            )
            values["ggn_trace"] = est.trace
            values["log_ggn_trace"] = est.log_trace
            values["log_ggn_trace_stderr"] = est.log_stderr
        if self.empirical_fisher:
            values["empirical_fisher_trace"] = empirical_fisher_trace(
                self.model, self.x, self.y, loss, batch_size=self.batch_size
            ).trace
        if self.noise_scale:
            values["gradient_noise_scale"] = gradient_noise_scale(
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
