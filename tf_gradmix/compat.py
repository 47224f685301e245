"""The one place that relies on Keras internals not covered by its public API.

Everything here is tied to the Keras versions we test (3.15) and is checked by
``tests/test_compat.py``, which fails when upstream behaviour changes.

* Tensor annotations of model outputs. Keras's TensorFlow losses read two
  attributes of ``y_pred``: ``_keras_mask`` (set by masking layers; masked
  sequence losses) and ``_keras_logits`` (set by Keras's softmax and sigmoid,
  so cross-entropies on probabilities are computed from the logits), and they
  also recognise a raw ``Softmax``/``Sigmoid`` op by its type
  (``keras/src/backend/tensorflow/nn.py::_get_logits``). A transformed output
  must carry the same annotations, or the loss changes value.
"""

import keras
import tensorflow as tf

#: Keras versions whose internals this module was written against.
TESTED_KERAS = ((3, 15),)

_PROBABILITY_OPS = {"Softmax": tf.nn.softmax, "Sigmoid": tf.math.sigmoid}


def keras_version():
    return tuple(int(p) for p in keras.__version__.split(".")[:2])


def transform_output(y_pred, transform):
    """Applies ``transform`` to a model output, keeping Keras's annotations.

    ``transform`` must keep values unchanged (it may change gradients). The
    mask is copied; logits attached by Keras are transformed too; an output
    made by a raw ``Softmax``/``Sigmoid`` op is rebuilt with the same op on
    transformed logits, so Keras's losses take the same numerically stable
    path as for the original output.
    """
    logits = getattr(y_pred, "_keras_logits", None)
    op_type = None
    if logits is None and not tf.executing_eagerly() and hasattr(y_pred, "op"):
        op_type = y_pred.op.type if y_pred.op.type in _PROBABILITY_OPS else None
    if op_type is not None and len(y_pred.op.inputs) == 1:
        result = _PROBABILITY_OPS[op_type](transform(y_pred.op.inputs[0]))
    else:
        result = transform(y_pred)
    if logits is not None:
        result._keras_logits = transform(logits)
    mask = getattr(y_pred, "_keras_mask", None)
    if mask is not None:
        result._keras_mask = mask
    return result


def set_compute_loss(model, compute_loss):
    """Installs ``compute_loss`` (which takes ``training``) on one model.

    Keras decides once, in ``Trainer.__init__``, whether ``compute_loss``
    accepts ``training`` (``_compute_loss_has_training_arg``, Keras >= 3.3)
    and otherwise calls it without; a replacement installed later must update
    that flag or evaluation would be treated as training.
    """
    model.compute_loss = compute_loss
    model._compute_loss_has_training_arg = True
