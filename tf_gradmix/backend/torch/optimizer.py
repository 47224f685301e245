"""The PyTorch backend's optimizer side: the whole batch's gradients, Keras's own step.

Keras's PyTorch train step (and a ``DistributedDataParallel`` loop, after
``backward()``) hands the gradients of the whole batch to the optimizer, so
the model hook or the loop has weighted them already; the inner optimizer
runs its own step, with its own ``gradient_accumulation_steps`` (eager, so
Keras's conditional update costs nothing on the micro-steps).
"""

__all__ = ["build_optimizer", "apply_gradients"]


def build_optimizer(inner, var_list):
    """Builds ``inner`` for ``var_list``, as Keras does."""
    inner.build(var_list)


def apply_gradients(inner, grads, trainable_variables=None, weight=None):
    """``inner.apply``: ``weight`` must be None (the model hook or the loop weights on PyTorch)."""
    if weight is not None:
        raise ValueError("On PyTorch the gradients reaching the optimizer are the whole batch's; "
                         "the model hook (or the loop's loss) weights them.")
    inner.apply(grads, trainable_variables)
