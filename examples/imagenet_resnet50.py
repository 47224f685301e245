"""ResNet-50 on ImageNet at global batch 32768 with GradientMix.

The GradientMix paper's headline setup: ResNet-50
(``keras.applications.ResNet50(weights=None)``) on TFDS ``imagenet2012`` at a
global batch of 32K, with the Table 3 recipe (LARS or Nesterov momentum, the
Eq. 15 polynomial warmup/decay schedule, BatchNorm momentum 0.9) from
:mod:`tf_gradmix.recipes`, and sample-level GradientMix.

Strategies (``--strategy``):

* ``tpu``: ``TPUStrategy`` (``--tpu`` names the TPU; default: the local one);
* ``multi_worker``: ``MultiWorkerMirroredStrategy``, one process per host,
  cluster from ``TF_CONFIG``; ``--collective-timeout`` makes survivors of a
  dead worker fail instead of hanging (restart all; ``--backup-dir`` resumes
  at the last finished epoch);
* ``mirrored``: ``MirroredStrategy`` over the local GPUs;
* ``default``: no distribution (debugging).

Input pipeline (TFDS performance guide): ``tfds.ReadConfig(input_context=...)``
shards the files per worker through the strategy's ``InputContext``, images
are read undecoded (``SkipDecoding``) and decoded + cropped in parallel
``map`` calls, batched per replica, and prefetched. Shuffling and crops are
seeded and ``deterministic``, so a run is reproducible from its start; a run
resumed by ``BackupAndRestore`` restarts this stream at its resumed epoch (it
is not the uninterrupted run's order, unlike the exact-resume test, whose
data order is a function of the epoch).

Example (8 hosts, 4 GPUs each: per-replica batch 1024)::

    TF_CONFIG=... python -m examples.imagenet_resnet50 --strategy multi_worker \\
        --recipe lars --data-dir gs://my-bucket/tfds --backup-dir /ckpt

Offline test: ``tests/scripts/test_imagenet_example.py`` runs the pipeline and a few
steps on ``tfds.testing.mock_data`` at 32x32 pixels and batch 8.
"""

import argparse
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

import tf_gradmix as gm  # noqa: E402
from tf_gradmix import distribute, recipes, residual, schedules  # noqa: E402
from tf_gradmix.optimizers import LARS  # noqa: E402

NUM_CLASSES = 1000
TRAIN_EXAMPLES = 1_281_167
MEAN_RGB = (0.485 * 255, 0.456 * 255, 0.406 * 255)
STDDEV_RGB = (0.229 * 255, 0.224 * 255, 0.225 * 255)
RECIPES = {
    "lars": recipes.RESNET50_IMAGENET_32K_LARS,
    "nesterov": recipes.RESNET50_IMAGENET_32K_NESTEROV,
}


# -- strategy --------------------------------------------------------------------


def make_strategy(kind, tpu=None, collective_timeout=None):
    """The ``tf.distribute`` strategy named by ``--strategy``."""
    if kind == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "")
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        return tf.distribute.TPUStrategy(resolver)
    if kind == "multi_worker":
        return distribute.multi_worker_strategy(collective_timeout=collective_timeout)
    if kind == "mirrored":
        return tf.distribute.MirroredStrategy()
    if kind == "default":
        return tf.distribute.get_strategy()
    raise ValueError(f"Invalid value for `--strategy`: {kind!r}.")


# -- input pipeline ----------------------------------------------------------------


def _decode_and_crop(image_bytes, image_size, training, seed):
    """Decodes a JPEG: a random-area crop + flip for training, center crop else."""
    if training:
        shape = tf.io.extract_jpeg_shape(image_bytes)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([0.0, 0.0, 1.0, 1.0], shape=[1, 1, 4]),
            seed=seed,
            area_range=(0.08, 1.0),
            aspect_ratio_range=(3 / 4, 4 / 3),
            min_object_covered=0.1,
            use_image_if_no_bounding_boxes=True,
        )
        y, x, _ = tf.unstack(begin)
        h, w, _ = tf.unstack(size)
        image = tf.io.decode_and_crop_jpeg(image_bytes, tf.stack([y, x, h, w]), channels=3)
        image = tf.image.stateless_random_flip_left_right(image, seed=seed + 1)
    else:
        image = tf.io.decode_jpeg(image_bytes, channels=3)
        shape = tf.shape(image)
        side = tf.minimum(shape[0], shape[1])
        image = tf.image.resize_with_crop_or_pad(image, side, side)
    image = tf.image.resize(image, [image_size, image_size])
    image = (image - MEAN_RGB) / STDDEV_RGB
    return tf.cast(image, tf.float32)


def make_dataset(
    split,
    global_batch_size,
    image_size,
    training,
    input_context=None,
    data_dir=None,
    seed=0,
):
    """One worker's pipeline (call it from ``distribute_datasets_from_function``).

    Args:
        split: TFDS split, e.g. ``"train"``, ``"validation"``.
        global_batch_size: examples per step across all replicas.
        image_size: output height and width.
        training: random crops and flips, shuffling, repeat, drop remainder.
        input_context: the strategy's ``tf.distribute.InputContext``; the
            files are sharded per worker through it and the batch is the
            per-replica batch.
        data_dir: TFDS data directory.
        seed: shuffling and augmentation seed (deterministic per epoch).
    """
    import tensorflow_datasets as tfds

    batch_size = global_batch_size
    if input_context is not None:
        batch_size = input_context.get_per_replica_batch_size(global_batch_size)
    read_config = tfds.ReadConfig(
        input_context=input_context,
        shuffle_seed=seed,
        interleave_cycle_length=16,
        interleave_block_length=1,
    )
    ds = tfds.load(
        "imagenet2012",
        split=split,
        data_dir=data_dir,
        shuffle_files=training,
        read_config=read_config,
        decoders={"image": tfds.decode.SkipDecoding()},
    )
    if training:
        ds = ds.shuffle(16 * batch_size, seed=seed, reshuffle_each_iteration=True)

    def preprocess(index, example):
        # Stateless augmentation keyed on the example's position: the same
        # image gets the same crop every time the pipeline is rebuilt.
        element_seed = tf.stack([tf.cast(seed, tf.int64), index])
        image = _decode_and_crop(example["image"], image_size, training, element_seed)
        label = tf.one_hot(example["label"], NUM_CLASSES)
        return image, label

    ds = ds.enumerate().map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=training)
    options = tf.data.Options()
    options.deterministic = True
    options.experimental_optimization.map_parallelization = True
    return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


# -- model and optimizer -----------------------------------------------------------


def make_model(recipe, image_size):
    """ResNet-50 (no pretrained weights) with the recipe's BatchNorm settings."""
    model = keras.applications.ResNet50(
        weights=None, input_shape=(image_size, image_size, 3), classes=NUM_CLASSES
    )
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.momentum = recipe["bn_momentum"]
            layer.epsilon = recipe["bn_epsilon"]
    if recipe["gamma_0"] is not None:
        residual.set_residual_gamma(model, recipe["gamma_0"])
    return gm.enable(model)  # sample-level mixing hook + multi-worker fit fix


def make_optimizer(recipe, total_steps, warmup_steps):
    """The recipe's optimizer and Eq. 15 schedule, wrapped in GradientMix.

    ``total_steps``/``warmup_steps`` are counted as Keras counts them (raw
    steps; with gradient accumulation use ``distribute.micro_steps``).
    """
    schedule = schedules.PolynomialWarmupDecay(
        peak_learning_rate=recipe["peak_learning_rate"],
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        initial_learning_rate=recipe["initial_learning_rate"],
        end_learning_rate=recipe["end_learning_rate"] or 0.0,
        warmup_power=recipe["warmup_power"],
        decay_power=recipe["decay_power"],
    )
    if recipe["optimizer"] == "LARS":
        inner = LARS(
            schedule,
            momentum=recipe["momentum"],
            nesterov=recipe["nesterov"],
            weight_decay=recipe["weight_decay"],
            trust_coefficient=recipe["trust_coefficient"],
            epsilon=recipe["epsilon"],
            exclude_1d_variables=recipe["exclude_1d_variables"],
        )
    else:
        inner = keras.optimizers.SGD(
            schedule,
            momentum=recipe["momentum"],
            nesterov=recipe["nesterov"],
            weight_decay=recipe["weight_decay"],
        )
    return gm.GradientMix(
        inner,
        level=recipe["mixing_level"],
        noise=recipe["mixing_noise"],
        stddev=recipe["mixing_stddev"],
        seed=0,
    )


# -- training ----------------------------------------------------------------------


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", default="mirrored",
                        choices=["tpu", "multi_worker", "mirrored", "default"])
    parser.add_argument("--tpu", default=None, help="TPU name or address")
    parser.add_argument("--recipe", default="lars", choices=sorted(RECIPES))
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--global-batch-size", type=int, default=None,
                        help="default: the recipe's (32768)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--epochs", type=int, default=None, help="default: the recipe's")
    parser.add_argument("--steps-per-epoch", type=int, default=None,
                        help="default: ImageNet train examples // batch")
    parser.add_argument("--validation-steps", type=int, default=None)
    parser.add_argument("--steps-per-execution", type=int, default=1)
    parser.add_argument("--mixing-stddev", type=float, default=None)
    parser.add_argument("--backup-dir", default=None,
                        help="keras.callbacks.BackupAndRestore directory")
    parser.add_argument("--collective-timeout", type=float, default=None,
                        help="seconds; multi_worker only")
    return parser.parse_args(argv)


def main(argv=None, strategy=None):
    """Trains; returns the ``History``. ``strategy`` overrides ``--strategy``."""
    args = parse_args(argv)
    recipe = RECIPES[args.recipe]
    if args.mixing_stddev is not None:
        recipe = recipe.replace(mixing_stddev=args.mixing_stddev)
    if recipe["optimizer"] == "SGD" and recipe["epochs"] is None and args.epochs is None:
        raise SystemExit(
            "The Nesterov recipe has no known epoch count (paper Table 3 value "
            "unavailable): pass --epochs."
        )
    batch = args.global_batch_size or recipe["batch_size"]
    if batch != recipe["batch_size"]:
        # Linear scaling rule (Goyal et al.) from the recipe's batch.
        recipe = recipe.replace(peak_learning_rate=schedules.scaled_learning_rate(
            recipe["peak_learning_rate"], recipe["batch_size"], batch))
    epochs = args.epochs or recipe["epochs"]
    steps_per_epoch = args.steps_per_epoch or TRAIN_EXAMPLES // batch
    total_steps = epochs * steps_per_epoch
    warmup_steps = round(total_steps * recipe["warmup_epochs"] / (recipe["epochs"] or epochs))
    warmup_steps = min(warmup_steps, total_steps)

    strategy = strategy or make_strategy(args.strategy, args.tpu, args.collective_timeout)

    def train_fn(context):
        return make_dataset("train", batch, args.image_size, True, context, args.data_dir).repeat()

    def eval_fn(context):
        return make_dataset("validation", batch, args.image_size, False, context, args.data_dir)

    train = distribute.distribute_dataset(strategy, train_fn)
    validation = distribute.distribute_dataset(strategy, eval_fn)
    with strategy.scope():
        model = make_model(recipe, args.image_size)
        model.compile(
            optimizer=make_optimizer(recipe, total_steps, warmup_steps),
            loss=keras.losses.CategoricalCrossentropy(label_smoothing=recipe["label_smoothing"]),
            metrics=[keras.metrics.CategoricalAccuracy(name="top1"),
                     keras.metrics.TopKCategoricalAccuracy(5, name="top5")],
            steps_per_execution=args.steps_per_execution,
        )
    callbacks = []
    if args.backup_dir:
        # Each worker backs up to its own directory (Keras 3 writes from
        # every worker); all hold the same weights.
        backup = os.path.join(args.backup_dir, f"worker{distribute.worker_index(strategy)}")
        callbacks.append(keras.callbacks.BackupAndRestore(backup, save_freq="epoch"))
    return model.fit(
        train,
        epochs=epochs,
        steps_per_epoch=steps_per_epoch,
        validation_data=validation,
        validation_steps=args.validation_steps,
        callbacks=callbacks,
        verbose=2,
    )


if __name__ == "__main__":
    main(sys.argv[1:])
