"""The CIFAR trainer of the examples: ResNet-18 or ResNet-8 on CIFAR-10/100 with GradientMix.

The Table 1 run (``examples/ggn_trace.py``) is a preset of this script.
(``make demo``, ``examples/demo.py``, is a preset of the equal-rate study's
trainer, ``examples/gd_vs_sgd.py``.)

The GradientMix paper (§5.1, Figures 1-2, Table 1) trains the CIFAR ResNet-18
at large batch sizes with SGD + Nesterov, LARS, Adam or LAMB, with the
learning rate scaled linearly from batch 200 and warmed up for 20 of 200
epochs, then decayed (its Eq. 15). This script runs that setup:

* model: ``--model resnet18`` (the CIFAR ResNet-18 of ``examples/resnet.py``,
  11.2M parameters) or ``--model resnet8`` (16-32-64 channels, 79k
  parameters, for CPUs); ``--widths`` overrides the ResNet-8 widths;
* data: CIFAR-10 from a local JPEG copy (``--data-dir``, ``$TF_GRADMIX_DATA``
  or ``../shared/data``, read in place; see ``examples/cifar10.py``), else
  CIFAR-10/100 through TensorFlow Datasets (``--dataset cifar100`` always
  uses TFDS); ``--train-size`` trains on a fixed class-balanced subset and
  ``--val-size`` holds a class-balanced validation split out of the training
  set (choose hyperparameters such as ``stddev`` there, never on the test set);
* optimizer: ``--optimizer nesterov|lars|adam|lamb`` with the settings of
  ``tf_gradmix.recipes.CIFAR_SGD/CIFAR_LARS/CIFAR_ADAM/CIFAR_LAMB`` and the
  schedule ``tf_gradmix.schedules.PolynomialWarmupDecay`` (peak rate
  ``tf_gradmix.schedules.scaled_learning_rate(base, 200, B)``), or with
  ``--schedule cosine`` the same warmup then Keras's cosine decay;
* GradientMix: ``--noise none|gaussian|rademacher`` with ``--stddev`` or
  ``--noise-batch-size`` (the stddev whose gradient noise is that of a smaller
  batch, ``sqrt(B / B_noise - 1)``), sample level (paper Eq. 4);
* logs: TensorBoard and CSV under ``--out``; resumable: rerun the same
  command after an interruption and ``keras.callbacks.BackupAndRestore``
  continues from the last finished epoch (the mixing noise continues too,
  it is a pure function of the step);
* result: a JSON summary (``--json-out``, default ``<out>/result.json``)
  with train (inference mode, no augmentation), validation and test
  accuracy and loss, steps, wall time and the paper's gamma-bar; with
  ``--ggn-size N`` also log Tr(G) on N training examples (Table 1 analogue).

Examples::

    # The paper's setup (accelerator): ResNet-18, batch 8K, Gaussian mixing.
    python -m examples.cifar_train --batch-size 8192 --noise gaussian --stddev 1
    # CPU scale: ResNet-8 on a 4096-image subset.
    python -m examples.cifar_train --model resnet8 --train-size 4096 \\
        --val-size 2000 --batch-size 1024 --epochs 50 --noise rademacher
    python -m examples.cifar_train --quick     # smoke test, seconds

Run it from the repository root (``python -m`` finds the ``examples``
package there).
"""

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from examples import cifar10, threads  # noqa: E402

OPTIMIZERS = ("nesterov", "lars", "adam", "lamb")
SCHEDULES = ("eq15", "cosine")
NOISES = ("none", "gaussian", "rademacher")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    d = p.add_argument_group("data")
    d.add_argument("--dataset", choices=("cifar10", "cifar100"), default="cifar10")
    d.add_argument("--data-dir", default=None, help="CIFAR-10 JPEG copy (default $TF_GRADMIX_DATA, then "
                                                    "../shared/data, then TFDS)")
    d.add_argument("--tfds-data-dir", default=None, help="TFDS data_dir when loading through TensorFlow Datasets")
    d.add_argument("--cache-dir", default=None, help="decoded-array cache of the JPEG copy")
    d.add_argument("--train-size", type=int, default=None, help="fixed class-balanced training subset (default: all "
                                                                "that is not validation)")
    d.add_argument("--val-size", type=int, default=0, help="class-balanced validation split held out of the training "
                                                           "set")
    d.add_argument("--test-size", type=int, default=None, help="class-balanced subset of the test set (default: all)")
    d.add_argument("--data-seed", type=int, default=0, help="seed of the subset and the validation split (fixed across "
                                                            "--seed)")
    d.add_argument("--no-augment", dest="augment", action="store_false", help="no flip + crop")
    m = p.add_argument_group("model")
    m.add_argument("--model", choices=("resnet18", "resnet8"), default="resnet18")
    m.add_argument("--widths", type=int, nargs=3, default=(16, 32, 64), help="stage widths of --model resnet8")
    m.add_argument("--bn-momentum", type=float, default=0.9)
    m.add_argument("--weight-decay", type=float, default=5e-4, help="L2 on kernels (nesterov, adam) or the "
                                                                    "optimizer's coupled decay (lars, lamb)")
    o = p.add_argument_group("optimization (the paper's §5.1 schedule)")
    o.add_argument("--optimizer", choices=OPTIMIZERS, default="nesterov")
    o.add_argument("--batch-size", type=int, default=1024)
    o.add_argument("--epochs", type=int, default=200)
    o.add_argument("--schedule", choices=SCHEDULES, default="eq15",
                   help="eq15: the paper's polynomial warmup and decay; cosine: linear warmup, cosine decay to 0")
    o.add_argument("--base-lr", type=float, default=None, help="rate at --base-batch-size (default: the recipe's)")
    o.add_argument("--base-batch-size", type=int, default=None, help="default: the recipe's (200)")
    o.add_argument("--warmup-epochs", type=float, default=None, help="default: the recipe's 20 of 200 epochs, scaled "
                                                                     "to --epochs")
    g = p.add_argument_group("GradientMix")
    g.add_argument("--noise", choices=NOISES, default="none")
    g.add_argument("--stddev", type=float, default=1.0, help="stddev of the weights w = 1 + stddev * xi")
    g.add_argument("--noise-batch-size", type=int, default=None, help="instead of --stddev: stddev = sqrt(B / this - "
                                                                      "1)")
    r = p.add_argument_group("run")
    r.add_argument("--seed", type=int, default=0, help="initial weights, batch order, augmentation, mixing noise")
    r.add_argument("--out", default=None, help="logs, backups and result (default runs/cifar_train/<name>)")
    r.add_argument("--json-out", default=None, help="where to write the result (default <out>/result.json)")
    r.add_argument("--validation-freq", type=int, default=1, help="evaluate the validation split every this many "
                                                                  "epochs")
    r.add_argument("--ggn-size", type=int, default=0, help="after training, log Tr(G) "
                                                           "(tf_gradmix.diagnostics.ggn_trace) on this many training "
                                                           "examples")
    r.add_argument("--ggn-probes", type=int, default=None, help="Hutchinson probes for Tr(G) (default: exact)")
    r.add_argument("--threads", type=int, default=None, help="TensorFlow intra-op threads (default: all cores)")
    r.add_argument("--no-tensorboard", dest="tensorboard", action="store_false")
    r.add_argument("--verbose", type=int, default=None, choices=(0, 1, 2))
    r.add_argument("--quick", action="store_true", help="tiny settings for a smoke test (seconds, meaningless numbers)")
    args = p.parse_args(argv)
    if args.quick:
        args.model, args.widths = "resnet8", (4, 8, 8)
        args.train_size, args.val_size, args.test_size = 128, 64, 100
        args.batch_size, args.epochs = 32, 2
    if args.verbose is None:
        args.verbose = 1 if sys.stdout.isatty() else 2
    if args.dataset == "cifar100" and args.data_dir:
        p.error("--data-dir is the CIFAR-10 JPEG copy; CIFAR-100 loads through TFDS (--tfds-data-dir)")
    if args.noise_batch_size is not None:
        if args.noise == "none":
            p.error("--noise-batch-size needs --noise gaussian or rademacher")
        if not 0 < args.noise_batch_size <= args.batch_size:
            p.error("--noise-batch-size must be in [1, --batch-size]")
        args.stddev = math.sqrt(args.batch_size / args.noise_batch_size - 1.0)
    if args.noise == "none":
        args.stddev = 0.0
    return args


def run_name(args):
    """A readable name for the run's output folder."""
    noise = "plain" if args.noise == "none" else f"{args.noise}{args.stddev:.3g}"
    size = f"n{args.train_size}" if args.train_size else "full"
    return f"{args.dataset}_{args.model}_{size}_{args.optimizer}_b{args.batch_size}_e{args.epochs}_{noise}_s{args.seed}"


# --------------------------------------------------------------------------
# Data


def load_arrays(args):
    """``(x_train, y_train), (x_test, y_test)`` uint8 images and int64 labels."""
    if args.dataset == "cifar10":
        source = cifar10.find_cifar10(args.data_dir)
        if source is not None:
            return cifar10.load_cifar10(args.data_dir, args.cache_dir)
    import tensorflow_datasets as tfds

    print(f"{args.dataset}: loading through TensorFlow Datasets (downloads if needed).", flush=True)
    arrays = []
    for split in ("train", "test"):
        dataset = tfds.load(args.dataset, split=split, as_supervised=True, data_dir=args.tfds_data_dir)
        batches = list(tfds.as_numpy(dataset.batch(10000)))
        arrays.append((
            np.concatenate([images for images, _ in batches]).astype(np.uint8),
            np.concatenate([labels for _, labels in batches]).astype(np.int64),
        ))
    return tuple(arrays)


def split_data(args, arrays):
    """Training subset, validation split (held out of training) and test set."""
    (x_all, y_all), (x_test, y_test) = arrays
    val_idx = np.array([], np.int64)
    if args.val_size:
        val_idx = cifar10.balanced_indices(y_all, args.val_size, seed=args.data_seed + 1)
    if args.train_size:
        train_idx = cifar10.balanced_indices(
            y_all, args.train_size, seed=args.data_seed, exclude=val_idx
        )
    else:
        train_idx = np.random.default_rng(args.data_seed).permutation(
            np.setdiff1d(np.arange(len(y_all)), val_idx)
        )
    if args.test_size and args.test_size < len(y_test):
        x_test, y_test = cifar10.subset(x_test, y_test, args.test_size, seed=args.data_seed)
    val = (x_all[val_idx], y_all[val_idx]) if args.val_size else None
    return (x_all[train_idx], y_all[train_idx]), val, (x_test, y_test)


def make_dataset(args, x, y, batch_size, training):
    dataset = cifar10.make_dataset(
        x, y, batch_size, training=training, seed=args.seed, augment=args.augment
    )
    if args.dataset == "cifar100":
        import tensorflow as tf

        # cifar10.make_dataset normalised with CIFAR-10 statistics; re-normalise.
        scale = tf.constant(cifar10.STD) / tf.constant(CIFAR100_STD)
        shift = (tf.constant(cifar10.MEAN) - tf.constant(CIFAR100_MEAN)) / tf.constant(CIFAR100_STD)
        dataset = dataset.map(lambda im, lab: (im * scale + shift, lab))
    return dataset


# --------------------------------------------------------------------------
# Model and optimizer


def recipe_for(name):
    import tf_gradmix as gm

    return {
        "nesterov": gm.recipes.CIFAR_SGD,
        "lars": gm.recipes.CIFAR_LARS,
        "adam": gm.recipes.CIFAR_ADAM,
        "lamb": gm.recipes.CIFAR_LAMB,
    }[name]


def build_model(args, num_classes):
    import keras

    import tf_gradmix as gm
    from examples import resnet

    # Weight decay: an L2 kernel penalty for SGD/Adam; for LARS/LAMB the
    # optimizer's coupled decay (inside the trust ratio, 1-D variables excluded).
    l2 = args.weight_decay if args.optimizer in ("nesterov", "adam") else 0.0
    model_class = keras.Model if args.noise == "none" else gm.Model
    if args.model == "resnet18":
        return resnet.resnet18_cifar(
            num_classes=num_classes, bn_momentum=args.bn_momentum, weight_decay=l2,
            model_class=model_class,
        )
    return resnet.cifar_resnet(
        stage_widths=tuple(args.widths), num_classes=num_classes,
        bn_momentum=args.bn_momentum, weight_decay=l2, model_class=model_class,
    )


def schedule_settings(args, steps_per_epoch):
    """Peak rate, total and warmup steps of the paper's §5.1 schedule."""
    import tf_gradmix as gm

    recipe = recipe_for(args.optimizer)
    base_lr = args.base_lr if args.base_lr is not None else recipe["base_learning_rate"]
    base_batch = args.base_batch_size or recipe["base_batch_size"]
    warmup_epochs = args.warmup_epochs
    if warmup_epochs is None:  # 20 of 200 epochs, scaled to this run's length
        warmup_epochs = recipe["warmup_epochs"] * args.epochs / recipe["epochs"]
    total_steps = steps_per_epoch * args.epochs
    return {
        "peak_learning_rate": gm.schedules.scaled_learning_rate(base_lr, base_batch, args.batch_size),
        "total_steps": total_steps,
        "warmup_steps": min(total_steps, round(warmup_epochs * steps_per_epoch)),
        "warmup_power": recipe["warmup_power"],
        "decay_power": recipe["decay_power"],
        "base_learning_rate": base_lr,
        "base_batch_size": base_batch,
    }


def build_optimizer(args, settings):
    import keras

    import tf_gradmix as gm

    recipe = recipe_for(args.optimizer)
    if args.schedule == "cosine":
        schedule = keras.optimizers.schedules.CosineDecay(
            initial_learning_rate=0.0,
            decay_steps=max(1, settings["total_steps"] - settings["warmup_steps"]),
            warmup_target=settings["peak_learning_rate"],
            warmup_steps=settings["warmup_steps"],
        )
    else:
        schedule = gm.schedules.PolynomialWarmupDecay(
            peak_learning_rate=settings["peak_learning_rate"],
            total_steps=settings["total_steps"],
            warmup_steps=settings["warmup_steps"],
            warmup_power=settings["warmup_power"],
            decay_power=settings["decay_power"],
        )
    if args.optimizer == "nesterov":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    elif args.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule)
    elif args.optimizer == "lars":
        optimizer = gm.optimizers.LARS(
            schedule, momentum=0.9, weight_decay=args.weight_decay,
            trust_coefficient=recipe["trust_coefficient"],
            exclude_1d_variables=recipe["exclude_1d_variables"],
        )
    else:
        optimizer = gm.optimizers.LAMB(
            schedule, weight_decay=args.weight_decay,
            exclude_1d_variables=recipe["exclude_1d_variables"],
        )
    if args.noise == "none":
        return optimizer
    return gm.GradientMix(
        optimizer, level="sample", noise=args.noise, stddev=args.stddev, seed=args.seed + 1
    )


# --------------------------------------------------------------------------
# Training


def log_ggn_trace(args, model, x, y):
    """log Tr(G) on ``--ggn-size`` fixed training examples (Table 1 analogue)."""
    import keras
    import tensorflow as tf

    from tf_gradmix import diagnostics

    n = min(args.ggn_size, len(y))
    idx = cifar10.balanced_indices(y, n, seed=args.data_seed + 2) if n >= 10 else np.arange(n)
    images = cifar10.normalize(tf.constant(x[idx])).numpy()
    estimate = diagnostics.ggn_trace(
        model, images, y[idx],
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        num_probes=args.ggn_probes, seed=args.seed, batch_size=32,
        split="output",  # the model outputs logits: the usual GGN (= Fisher)
    )
    return {
        "ggn_examples": int(n),
        "ggn_trace": float(estimate.trace),
        "log_ggn_trace": float(estimate.log_trace),
        "log_ggn_stderr": float(estimate.log_stderr),
    }


def run(args):
    """Trains once and returns the result as a JSON-ready dict."""
    threads.limit_threads(args.threads)
    import keras

    import tf_gradmix as gm

    wall_start = time.perf_counter()
    out = Path(args.out or Path("runs") / "cifar_train" / run_name(args))
    out.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), val, (x_test, y_test) = split_data(args, load_arrays(args))
    num_classes = 100 if args.dataset == "cifar100" else 10
    if len(y_train) < args.batch_size:
        raise SystemExit(f"--batch-size {args.batch_size} exceeds the {len(y_train)} training examples")
    steps_per_epoch = len(y_train) // args.batch_size  # partial batches are dropped
    settings = schedule_settings(args, steps_per_epoch)
    print(
        f"Run {run_name(args)}: {len(y_train)} training images, "
        f"{0 if val is None else len(val[1])} validation (held out of training), "
        f"{len(y_test)} test; {steps_per_epoch} steps/epoch x {args.epochs} epochs = "
        f"{settings['total_steps']} steps; peak LR {settings['peak_learning_rate']:g} "
        f"({settings['base_learning_rate']:g} x B/{settings['base_batch_size']}), warmup "
        f"{settings['warmup_steps']} steps; noise {args.noise} stddev {args.stddev:.4g}.",
        flush=True,
    )

    keras.utils.set_random_seed(args.seed)
    model = build_model(args, num_classes)
    model.compile(
        optimizer=build_optimizer(args, settings),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=[
            keras.metrics.SparseCategoricalAccuracy(name="acc"),
            keras.metrics.SparseCategoricalCrossentropy(from_logits=True, name="xent"),
        ],
    )
    callbacks = [
        keras.callbacks.BackupAndRestore(str(out / "backup")),
        keras.callbacks.CSVLogger(str(out / "log.csv"), append=True),
    ]
    if args.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(out / "tensorboard")))
    train_ds = make_dataset(args, x_train, y_train, args.batch_size, training=True)
    eval_batch = 1000
    val_ds = None if val is None else make_dataset(args, *val, eval_batch, training=False)
    fit_start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=args.epochs, validation_data=val_ds,
        validation_freq=args.validation_freq, callbacks=callbacks,
        shuffle=False, verbose=args.verbose,
    )
    fit_seconds = time.perf_counter() - fit_start

    def evaluate(x, y):
        logs = model.evaluate(make_dataset(args, x, y, eval_batch, training=False), verbose=0, return_dict=True)
        return float(logs["acc"]), float(logs["xent"])

    # Final numbers in inference mode; train = the training images, no
    # augmentation. Losses are the cross-entropy alone (no L2 term).
    train_acc, train_loss = evaluate(x_train, y_train)
    val_acc, val_loss = evaluate(*val) if val is not None else (None, None)
    test_acc, test_loss = evaluate(x_test, y_test)
    logs = history.history
    gammas = logs.get(gm.model.GAMMA_METRIC)
    result = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in vars(args).items()},
        "name": run_name(args),
        "seed": args.seed,
        "train_examples": int(len(y_train)),
        "val_examples": 0 if val is None else int(len(val[1])),
        "test_examples": int(len(y_test)),
        "steps": settings["total_steps"],
        "peak_learning_rate": settings["peak_learning_rate"],
        "warmup_steps": settings["warmup_steps"],
        "train_acc": train_acc,
        "train_loss": train_loss,
        "val_acc": val_acc,
        "val_loss": val_loss,
        "test_acc": test_acc,
        "test_loss": test_loss,
        # Keras's training loss of the last epoch: augmented batches, L2 included.
        "last_epoch_train_loss": float(logs["loss"][-1]) if logs.get("loss") else None,
        # Plain averaging has every w = 1, so gamma = mean(w^2) = 1 exactly.
        # After a resume, the mean covers the epochs run since.
        "gamma_bar": float(np.mean(gammas)) if gammas else (1.0 if args.noise == "none" else None),
        "fit_seconds": fit_seconds,
        "epochs_run_in_this_process": len(logs.get("loss", [])),
        "history": {k: [float(v) for v in vals] for k, vals in logs.items()},
    }
    if args.ggn_size:
        try:
            result.update(log_ggn_trace(args, model, x_train, y_train))
        except Exception as error:  # keep the training result; say what failed
            print(f"Tr(G) failed: {error!r}", flush=True)
            result["ggn_error"] = repr(error)
    result["wall_seconds"] = time.perf_counter() - wall_start
    json_out = Path(args.json_out or out / "result.json")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(result, indent=1))
    gamma = "n/a" if result["gamma_bar"] is None else f"{result['gamma_bar']:.3f}"
    print(
        f"Done {result['name']}: train {100 * train_acc:.1f}%"
        + ("" if val_acc is None else f", val {100 * val_acc:.1f}%")
        + f", test {100 * test_acc:.1f}%, gamma-bar {gamma}, fit {fit_seconds:.0f} s. "
        f"Result in {json_out}.",
        flush=True,
    )
    return result


def main(argv=None):
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
