"""ResNets for CIFAR as functional Keras models (no downloads, no weights).

* :func:`cifar_resnet`: a post-activation ResNet (He et al., 2016) with a
  3x3 stem and basic blocks; the default, 16-32-64 channels and one block a
  stage, is the ResNet-8-size net of the CPU-scale runs (78,714 parameters,
  about 1,100 training images/s on 2 CPU cores).
* :func:`resnet18_cifar`: the usual CIFAR ResNet-18 (3x3 stem without max
  pooling, stages 64-128-256-512 with 2 basic blocks each, 11.2M parameters).

Layers are named like ``keras.applications.ResNet*``, so code can find them by
name: stem ``conv1_conv``/``conv1_bn``/``conv1_relu``; in stage ``s``
(numbered from 2) block ``b`` (from 1): ``conv{s}_block{b}_{i}_conv`` and
``..._{i}_bn`` on the residual branch (``i = 1, 2``; ``_2_bn`` is the block's
last BN, the one that feeds the add, which
:func:`tf_gradmix.residual.residual_batch_norms` finds), the projection shortcut
``..._0_conv``/``..._0_bn`` (only where the shape changes), the sum
``..._add`` and ``..._out`` (ReLU after the add); then ``avg_pool`` and
``predictions``.

The output ``predictions`` is **logits** (no softmax): train with
``keras.losses.SparseCategoricalCrossentropy(from_logits=True)``.

Inputs are float images ``[32, 32, 3]``, normalised as in
:func:`cifar10.make_dataset`.
"""

import keras

__all__ = ["cifar_resnet", "resnet18_cifar"]


def _l2(weight_decay):
    # Keras's L2(l) adds l * sum(w^2) to the loss, whose gradient is 2 l w;
    # "weight decay wd" in the SGD sense (gradient wd * w) is L2(wd / 2).
    return keras.regularizers.L2(weight_decay / 2) if weight_decay else None


def _conv(filters, kernel_size, strides, name, weight_decay):
    return keras.layers.Conv2D(
        filters,
        kernel_size,
        strides=strides,
        padding="same",
        use_bias=False,
        kernel_initializer="he_normal",
        kernel_regularizer=_l2(weight_decay),
        name=name,
    )


def _bn(name, momentum, gamma_zero=False):
    return keras.layers.BatchNormalization(
        momentum=momentum,
        epsilon=1e-5,
        gamma_initializer="zeros" if gamma_zero else "ones",
        name=name,
    )


def _basic_block(x, filters, strides, name, bn_momentum, weight_decay, zero_init_residual):
    """conv-bn-relu-conv-bn, plus the (projected) input, then ReLU."""
    shortcut = x
    if strides != 1 or x.shape[-1] != filters:
        shortcut = _conv(filters, 1, strides, f"{name}_0_conv", weight_decay)(x)
        shortcut = _bn(f"{name}_0_bn", bn_momentum)(shortcut)
    x = _conv(filters, 3, strides, f"{name}_1_conv", weight_decay)(x)
    x = _bn(f"{name}_1_bn", bn_momentum)(x)
    x = keras.layers.ReLU(name=f"{name}_1_relu")(x)
    x = _conv(filters, 3, 1, f"{name}_2_conv", weight_decay)(x)
    x = _bn(f"{name}_2_bn", bn_momentum, gamma_zero=zero_init_residual)(x)
    x = keras.layers.Add(name=f"{name}_add")([shortcut, x])
    return keras.layers.ReLU(name=f"{name}_out")(x)


def cifar_resnet(
    stage_widths=(16, 32, 64),
    blocks_per_stage=(1, 1, 1),
    num_classes=10,
    bn_momentum=0.9,
    weight_decay=5e-4,
    zero_init_residual=False,
    input_shape=(32, 32, 3),
    stem_width=None,
    model_class=keras.Model,
    name=None,
):
    """A CIFAR ResNet of basic blocks, as a functional model.

    The first stage keeps the resolution, every later stage halves it
    (stride-2 first block with a 1x1 projection shortcut).

    Args:
        stage_widths: channels of each stage.
        blocks_per_stage: basic blocks in each stage.
        num_classes: size of the ``predictions`` logits.
        bn_momentum: BatchNorm momentum. 0.9, not Keras's 0.99: a large-batch
            run takes few steps, and with 0.99 the moving statistics stay
            near their initial values, and test accuracy collapses while
            training accuracy does not.
        weight_decay: SGD-style weight decay ``wd`` on conv and dense kernels
            (not BN, not biases), added as ``L2(wd / 2)`` kernel
            regularisers so the gradient gains ``wd * w``. These losses are
            not per example, so GradientMix does not mix them. 0 or None: off.
        zero_init_residual: initialise each block's last BN scale to 0 (each
            block starts as the identity; Goyal et al., 2017).
        input_shape: image shape.
        stem_width: channels of the 3x3 stem; default ``stage_widths[0]``.
        model_class: the model class to build, e.g. ``tf_gradmix.Model``.
        name: model name; default ``resnet{depth}_cifar``.

    Returns:
        A ``model_class`` instance mapping images to logits.
    """
    if len(stage_widths) != len(blocks_per_stage):
        raise ValueError(
            f"stage_widths {stage_widths} and blocks_per_stage {blocks_per_stage} "
            "must have the same length."
        )
    depth = 2 + 2 * sum(blocks_per_stage)
    inputs = keras.Input(shape=input_shape, name="image")
    x = _conv(stem_width or stage_widths[0], 3, 1, "conv1_conv", weight_decay)(inputs)
    x = _bn("conv1_bn", bn_momentum)(x)
    x = keras.layers.ReLU(name="conv1_relu")(x)
    for s, (width, blocks) in enumerate(zip(stage_widths, blocks_per_stage)):
        for b in range(blocks):
            strides = 2 if (s > 0 and b == 0) else 1
            x = _basic_block(
                x,
                width,
                strides,
                f"conv{s + 2}_block{b + 1}",
                bn_momentum,
                weight_decay,
                zero_init_residual,
            )
    x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
    outputs = keras.layers.Dense(
        num_classes,
        kernel_regularizer=_l2(weight_decay),
        name="predictions",
    )(x)
    return model_class(inputs, outputs, name=name or f"resnet{depth}_cifar")


def resnet18_cifar(
    num_classes=10,
    bn_momentum=0.9,
    weight_decay=5e-4,
    zero_init_residual=False,
    input_shape=(32, 32, 3),
    model_class=keras.Model,
    name="resnet18_cifar",
):
    """The CIFAR ResNet-18: 3x3 stem, stages 64-128-256-512, 2 blocks each.

    This is the network of the paper's CIFAR-10 experiments (Table 1). See
    :func:`cifar_resnet` for the arguments.
    """
    return cifar_resnet(
        stage_widths=(64, 128, 256, 512),
        blocks_per_stage=(2, 2, 2, 2),
        num_classes=num_classes,
        bn_momentum=bn_momentum,
        weight_decay=weight_decay,
        zero_init_residual=zero_init_residual,
        input_shape=input_shape,
        model_class=model_class,
        name=name,
    )
