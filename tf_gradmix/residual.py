"""Residual blocks of a functional Keras model, found from its graph.

* :func:`residual_batch_norms`: the BatchNorm that ends the residual branch
  of each residual block.
* :func:`set_residual_gamma`: sets that BatchNorm's initial scale
  ``gamma_0`` (Goyal et al., 2017: ``gamma_0 = 0`` starts every block as the
  identity; large-batch recipes tune it).
"""

import keras
import numpy as np

from tf_gradmix import validation

__all__ = ["residual_batch_norms", "set_residual_gamma"]

def _functional_models(model):
    """``model`` and every functional sub-model in it."""
    found = []
    stack = [model]
    while stack:
        current = stack.pop()
        found.append(current)
        for layer in getattr(current, "layers", []):
            if isinstance(layer, keras.Model):
                stack.append(layer)
    return found


def _producers(model):
    """Maps ``id(output tensor)`` to the layer of ``model`` that produced it."""
    producers = {}
    for layer in model.layers:
        try:
            outputs = layer.output
        except (AttributeError, ValueError):
            continue  # never called, or called more than once (shared)
        for tensor in keras.tree.flatten(outputs):
            producers[id(tensor)] = layer
    return producers


def _layer_inputs(layer):
    try:
        inputs = layer.input
    except (AttributeError, ValueError):
        return []
    return keras.tree.flatten(inputs)


def residual_batch_norms(model):
    """The BatchNorm layer that ends the residual branch of each residual block.

    Works from the functional graph: for every ``keras.layers.Add`` whose
    inputs have different depths (longest path from the model inputs), the
    deepest input is the residual branch and the others are shortcuts
    (identity or a projection, which may itself end in a BatchNorm, e.g.
    ``conv2_block1_0_bn`` in ``keras.applications.ResNet50``). The
    residual branch's producer is followed back through weightless layers
    (e.g. ``Dropout``) to a ``BatchNormalization``. Residual branches that
    end in anything else (e.g. a convolution in pre-activation ResNets) are
    skipped. Functional sub-models are searched too.

    Args:
        model: a functional ``keras.Model`` (``keras.applications.ResNet50``,
            the ResNets of ``examples/``, ...).

    Returns:
        list of ``keras.layers.BatchNormalization``, in model order.
    """
    found = []
    for graph in _functional_models(model):
        producers = _producers(graph)
        depths = {}

        def depth(tensor, producers=producers, depths=depths):
            key = id(tensor)
            if key in depths:
                return depths[key]
            # Iterative longest-path computation (deep nets overflow recursion).
            stack = [tensor]
            while stack:
                current = stack[-1]
                layer = producers.get(id(current))
                parents = _layer_inputs(layer) if layer is not None else []
                parents = [p for p in parents if id(p) != id(current)]
                pending = [p for p in parents if id(p) not in depths]
                if pending:
                    stack.extend(pending)
                    continue
                stack.pop()
                depths[id(current)] = 1 + max(
                    (depths[id(p)] for p in parents), default=-1
                )
            return depths[key]

        for layer in graph.layers:
            if not isinstance(layer, keras.layers.Add):
                continue
            inputs = _layer_inputs(layer)
            if len(inputs) < 2:
                continue
            input_depths = [depth(t) for t in inputs]
            deepest = max(input_depths)
            if input_depths.count(deepest) != 1:
                continue  # no unique residual branch: not a residual block
            tensor = inputs[input_depths.index(deepest)]
            producer = producers.get(id(tensor))
            while producer is not None and not isinstance(
                producer, keras.layers.BatchNormalization
            ):
                parents = _layer_inputs(producer)
                if producer.weights or len(parents) != 1:
                    producer = None
                    break
                producer = producers.get(id(parents[0]))
            if producer is not None and producer not in found:
                found.append(producer)
    order = {id(layer): i for i, layer in enumerate(_all_layers(model))}
    return sorted(found, key=lambda layer: order.get(id(layer), len(order)))


def _all_layers(model):
    layers = []
    for graph in _functional_models(model):
        layers.extend(graph.layers)
    return layers


def set_residual_gamma(model, gamma_0):
    """Sets the scale ``gamma`` of every residual block's final BatchNorm to ``gamma_0``.

    ``gamma_0 = 0`` makes every residual block start as the identity
    (Goyal et al., 2017, "zero gamma"); large-batch recipes tune it. Call it
    after building the model and before training; the value is stored in
    the weights, so it survives ``model.save`` (the layer config keeps its
    ``gamma_initializer``). The layers are found by
    :func:`residual_batch_norms`.

    Args:
        model: a functional ``keras.Model`` with residual blocks.
        gamma_0: float, the initial scale.

    Returns:
        the list of BatchNormalization layers that were set.

    Raises:
        ValueError: if ``gamma_0`` is not a finite number, if no residual
            block ending in a BatchNorm is found, or if such a BatchNorm has
            ``scale=False``.
    """
    gamma_0 = validation.number("gamma_0", gamma_0)
    layers = residual_batch_norms(model)
    if not layers:
        raise ValueError(
            f"Model {model.name!r} has no residual block whose residual branch "
            "ends in a BatchNormalization (looked for keras.layers.Add layers "
            "in its functional graph)."
        )
    for layer in layers:
        if layer.gamma is None:
            raise ValueError(
                f"BatchNormalization layer {layer.name!r} has scale=False: it "
                "has no gamma to set."
            )
        layer.gamma.assign(np.full(layer.gamma.shape, gamma_0, dtype=layer.gamma.dtype))
    return layers
