r"""Curvature of the mean loss: the generalised Gauss-Newton matrix and the empirical Fisher.

Symbols (``x``, ``y``, ``loss`` the arguments of every function here):

* ``x_i, y_i``: example ``i`` of the data, ``n`` of them;
* ``z_i = f(x_i)``: the model output for example ``i`` (flattened to ``D`` values);
* ``l_i = loss(y_i, z_i)``: the value ``loss`` returns for a batch made of
  example ``i`` alone (averaged if it returns per-element values), so that
  ``L = (1/n) sum_i l_i`` is the mean loss (Keras's ``sum_over_batch_size``);
* ``g_i = grad_theta l_i``: the per-example gradient;
* ``J_i = d z_i / d theta`` (``D x P``) and ``H_i = d^2 l_i / d z_i^2`` (``D x D``).

* :func:`ggn_trace`: ``Tr G`` with ``G = (1/n) sum_i J_i^T H_i J_i`` (the
  paper's Table 1; its Eq. 5 sums over the data set, ``n`` times larger:
  compare differences of natural logs, not values). Exact, or Hutchinson's
  estimator. :func:`ggn_vector_product` gives ``G v``.
* :func:`empirical_fisher_trace`: ``Tr F_emp = (1/n) sum_i |g_i|^2``, what
  the paper's Eq. 10-11 contain; it equals the GGN only in special cases
  (Kunstner et al., 2019).

Results are plain Python floats in a :class:`TraceEstimate`, computed in
batches of ``batch_size`` examples; layer losses (weight regularisers) are
excluded.

References:
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

import tf_gradmix.backend.tensorflow.diagnostics.sample as sample
from tf_gradmix import validation
from tf_gradmix.backend.tensorflow import per_example, probability_logits
from tf_gradmix.backend.tensorflow.diagnostics.sample import DEFAULT_BATCH_SIZE

__all__ = [
    "TraceEstimate",
    "ggn_trace",
    "ggn_vector_product",
    "empirical_fisher_trace",
    "SPLITS",
]

#: Where the GGN is split: at the model output, or before its final softmax/sigmoid.
SPLITS = ("output", "logits")

_ZERO = tf.UnconnectedGradients.ZERO


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


def _logits_of(output):
    """The logits and link (``"softmax"``/``"sigmoid"``) of a probability output."""
    found = probability_logits(output)
    if found is None:
        op_type = getattr(getattr(output, "op", None), "type", None)
        raise ValueError(
            "split='logits' needs a model whose output is a softmax or sigmoid "
            f"(a Keras activation or layer); its last op is {op_type!r}. For "
            "a model that outputs logits already, use split='output'."
        )
    return found


def _apply_link(link, logits):
    if link is None:
        return logits
    # Keras's activations mark the result with its logits, so Keras's
    # probability losses take their stable from-logits path.
    return keras.activations.get(link)(logits)


def check_split(split):
    """``split`` if it is one of :data:`SPLITS`."""
    return validation.one_of("split", split, SPLITS)


def _split_output(model, x, split):
    """``(z, link)``: the tensor the GGN is split at, and the link to the loss."""
    output = per_example.single_output(model(x, training=False))
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
                return per_example.example_loss(loss, y_i, _apply_link(link, tf.reshape(z_i, shape)[None])[0])

            total = tf.reduce_sum(
                tf.vectorized_map(one, (flat, y), fallback_to_while_loop=True)
            )
        gradient = inner.gradient(total, flat)
    return outer.batch_jacobian(gradient, flat)


def _exact_chunk(model, loss, split, x, y):
    """Per-example ``t_i = Tr(J_i^T H_i J_i) = Tr(H_i J_i J_i^T)``: ``[B]``."""
    variables = per_example.trainable_tensors(model)
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
    variables = per_example.trainable_tensors(model)
    with tf.autodiff.ForwardAccumulator(
        primals=variables, tangents=tangents
    ) as acc:
        z, link = _split_output(model, x, split)
    return z, acc.jvp(z, unconnected_gradients=_ZERO), link


def _hutchinson_chunk(model, loss, split, seed, x, y, num_probes):
    """``q[k, i] = (J_i v_k)^T H_i (J_i v_k)`` for probes ``k``: ``[K, B]``."""
    variables = per_example.trainable_tensors(model)
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
    check_split(split)
    loss = per_example.get_loss(loss)
    variables = per_example.trainable_tensors(model)

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
    return per_example.maybe_function(compute, x, tf.convert_to_tensor(y), vector)


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
    r"""Trace of the generalised Gauss-Newton matrix of the mean loss.

    .. math::

        \operatorname{Tr} G,\qquad G = \frac{1}{n} \sum_{i=1}^{n} J_i^\top H_i J_i,

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
    check_split(split)
    loss = per_example.get_loss(loss)
    if num_probes is not None:
        num_probes = validation.integer("num_probes", num_probes, low=2)
    if num_probes is None:
        chunk = lambda x, y: _exact_chunk(model, loss, split, x, y)  # noqa: E731
    else:
        chunk = lambda x, y: _hutchinson_chunk(  # noqa: E731
            model, loss, split, seed, x, y, int(num_probes)
        )
    fn, parts = sample.traced_over_batches(chunk, sample.iterate_batches(x, y, batch_size))
    chunks = [fn(xb, yb).numpy().astype(np.float64) for xb, yb in parts]
    if num_probes is None:
        traces = np.concatenate(chunks)
        n = traces.size
        return TraceEstimate(
            float(traces.mean()), 0.0, sample.stderr(traces), n, None
        )
    q = np.concatenate(chunks, axis=1)  # [K, n]
    n = q.shape[1]
    return TraceEstimate(
        float(q.mean()), sample.stderr(q.mean(axis=1)), sample.stderr(q.mean(axis=0)), n, int(num_probes)
    )


def empirical_fisher_trace(model, x, y, loss, batch_size=DEFAULT_BATCH_SIZE, training=False):
    r"""Trace of the empirical Fisher: the mean squared per-example gradient norm.

    .. math::

        \operatorname{Tr} F_{\text{emp}} = \frac{1}{n} \sum_{i=1}^{n} \lVert g_i \rVert^2,
        \qquad g_i = \nabla_\theta l_i .

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
    loss = per_example.get_loss(loss)
    sq = np.concatenate([s for _, s in sample.gradient_stats(model, x, y, loss, batch_size, training)])
    return TraceEstimate(float(sq.mean()), 0.0, sample.stderr(sq), sq.size, None)
