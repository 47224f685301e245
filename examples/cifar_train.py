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
* data: CIFAR-10 from a local JPEG copy (``--data-dir`` or ``$TF_GRADMIX_DATA``,
  read in place; see ``examples/cifar10.py``), else
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
package there). The flags are the fields of :class:`Config`; from Python,
``run(Config(model="resnet8", train_size=4096))`` trains the same run and
returns the result dict.
"""

import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Optional, Tuple

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from examples import cifar10, curvature, data, mixing, results, threads  # noqa: E402
from examples.config import check_choices, config_from_argv, flag_of, option, values_of  # noqa: E402

DATASETS = ("cifar10", "cifar100")
MODELS = ("resnet18", "resnet8")
OPTIMIZERS = ("nesterov", "lars", "adam", "lamb")
SCHEDULES = ("eq15", "cosine")
SCHEDULE_GROUP = "optimization (the paper's §5.1 schedule)"
NOISES = ("none", "gaussian", "rademacher")
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)


#: What ``--quick`` sets (it wins over the same flags given with it).
QUICK = dict(model="resnet8", widths=(4, 8, 8), train_size=128, val_size=64, test_size=100, batch_size=32, epochs=2)


@dataclasses.dataclass(frozen=True)
class Config:
    """One run of the trainer; each field is the flag ``--field-name`` (booleans also ``--no-field-name``)."""

    dataset: str = option("cifar10", choices=DATASETS, group="data")
    data_dir: Optional[str] = data.data_dir_field("CIFAR-10 JPEG copy", "TFDS")
    tfds_data_dir: Optional[str] = option(None, help="TFDS data_dir when loading through TensorFlow Datasets",
                                          affects_result=False, group="data")
    cache_dir: Optional[str] = data.cache_dir_field()
    train_size: Optional[int] = option(None, help="fixed class-balanced training subset (default: all that is "
                                                  "not validation)", group="data")
    val_size: int = option(0, help="class-balanced validation split held out of the training set", group="data")
    test_size: Optional[int] = option(None, help="class-balanced subset of the test set (default: all)",
                                      group="data")
    data_seed: int = option(0, help="seed of the subset and the validation split (fixed across --seed)",
                            group="data")
    augment: bool = option(True, help="flip + crop", group="data")
    model: str = option("resnet18", choices=MODELS, group="model")
    widths: Tuple[int, int, int] = option((16, 32, 64), help="stage widths of --model resnet8", group="model")
    bn_momentum: float = option(0.9, group="model")
    weight_decay: float = option(5e-4, help="L2 on kernels (nesterov, adam) or the optimizer's coupled decay "
                                            "(lars, lamb)", group="model")
    optimizer: str = option("nesterov", choices=OPTIMIZERS, group=SCHEDULE_GROUP)
    batch_size: int = option(1024, group=SCHEDULE_GROUP)
    epochs: int = option(200, group=SCHEDULE_GROUP)
    schedule: str = option("eq15", choices=SCHEDULES, help="eq15: the paper's polynomial warmup and decay; "
                           "cosine: linear warmup, cosine decay to 0", group=SCHEDULE_GROUP)
    base_lr: Optional[float] = option(None, help="rate at --base-batch-size (default: the recipe's)",
                                      group=SCHEDULE_GROUP)
    base_batch_size: Optional[int] = option(None, help="default: the recipe's (200)", group=SCHEDULE_GROUP)
    warmup_epochs: Optional[float] = option(None, help="default: the recipe's 20 of 200 epochs, scaled to "
                                                       "--epochs", group=SCHEDULE_GROUP)
    noise: str = option("none", choices=NOISES, group="GradientMix")
    stddev: float = option(1.0, help="stddev of the weights w = 1 + stddev * xi (unused with --noise none)",
                           group="GradientMix")
    noise_batch_size: Optional[int] = option(None, help="instead of --stddev: stddev = sqrt(B / this - 1)",
                                             group="GradientMix")
    seed: int = option(0, help="initial weights, batch order, augmentation, mixing noise", group="run")
    out: Optional[str] = option(None, help="logs, backups and result (default runs/cifar_train/<name>)",
                                affects_result=False, group="run")
    json_out: Optional[str] = option(None, help="where to write the result (default <out>/result.json)",
                                     affects_result=False, group="run")
    # Only how often fit logs validation numbers; training and the final numbers are the same.
    validation_freq: int = option(1, help="evaluate the validation split every this many epochs",
                                  affects_result=False, group="run")
    ggn_size: int = option(0, help="after training, log Tr(G) (tf_gradmix.diagnostics.ggn_trace) on this many "
                                   "training examples", group="run")
    ggn_probes: Optional[int] = option(None, help="Hutchinson probes for Tr(G) (default: exact)", group="run")
    threads: Optional[int] = threads.threads_field()
    tensorboard: bool = option(True, help="TensorBoard logs under --out", affects_result=False, group="run")
    verbose: Optional[int] = option(None, choices=(0, 1, 2), help="Keras fit verbosity (default: 1 on a "
                                    "terminal, else 2)", affects_result=False, group="run")
    quick: bool = option(False, help="tiny settings for a smoke test (seconds, meaningless numbers)", group="run")

    def __post_init__(self):
        check_choices(self)
        object.__setattr__(self, "widths", tuple(self.widths))
        if self.quick:
            for name, value in QUICK.items():
                object.__setattr__(self, name, value)
        if self.dataset == "cifar100" and self.data_dir:
            raise ValueError("--data-dir is the CIFAR-10 JPEG copy; CIFAR-100 loads through TFDS (--tfds-data-dir)")
        for name in ("batch_size", "epochs", "validation_freq"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {getattr(self, name)}")
        mixing.check_mixing(self)


def parse_args(argv=None):
    """The :class:`Config` of a command line (``sys.argv[1:]`` by default)."""
    return config_from_argv(Config, sys.argv[1:] if argv is None else argv, description=__doc__.split("\n")[0])


def run_name(config):
    """A readable name for the run's output folder."""
    noise = "plain" if config.noise == "none" else f"{config.noise}{mixing.mixing_stddev(config):.3g}"
    size = f"n{config.train_size}" if config.train_size else "full"
    c = config
    return f"{c.dataset}_{c.model}_{size}_{c.optimizer}_b{c.batch_size}_e{c.epochs}_{noise}_s{c.seed}"


# --------------------------------------------------------------------------
# Data


def load_arrays(config):
    """``(x_train, y_train), (x_test, y_test)`` uint8 images and int64 labels."""
    if config.dataset == "cifar10":
        source = cifar10.find_cifar10(config.data_dir)
        if source is not None:
            return cifar10.load_cifar10(config.data_dir, config.cache_dir)
    import tensorflow_datasets as tfds

    print(f"{config.dataset}: loading through TensorFlow Datasets (downloads if needed).", flush=True)
    arrays = []
    for split in ("train", "test"):
        dataset = tfds.load(config.dataset, split=split, as_supervised=True, data_dir=config.tfds_data_dir)
        batches = list(tfds.as_numpy(dataset.batch(10000)))
        arrays.append((
            np.concatenate([images for images, _ in batches]).astype(np.uint8),
            np.concatenate([labels for _, labels in batches]).astype(np.int64),
        ))
    return tuple(arrays)


def split_data(config, arrays):
    """Training subset, validation split (held out of training) and test set."""
    (x_all, y_all), (x_test, y_test) = arrays
    val_idx = np.array([], np.int64)
    if config.val_size:
        val_idx = cifar10.balanced_indices(y_all, config.val_size, seed=config.data_seed + 1)
    if config.train_size:
        train_idx = cifar10.balanced_indices(
            y_all, config.train_size, seed=config.data_seed, exclude=val_idx
        )
    else:
        train_idx = np.random.default_rng(config.data_seed).permutation(
            np.setdiff1d(np.arange(len(y_all)), val_idx)
        )
    if config.test_size and config.test_size < len(y_test):
        x_test, y_test = cifar10.subset(x_test, y_test, config.test_size, seed=config.data_seed)
    val = (x_all[val_idx], y_all[val_idx]) if config.val_size else None
    return (x_all[train_idx], y_all[train_idx]), val, (x_test, y_test)


def make_dataset(config, x, y, batch_size, training):
    dataset = cifar10.make_dataset(
        x, y, batch_size, training=training, seed=config.seed, augment=config.augment
    )
    if config.dataset == "cifar100":
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


def build_model(config, num_classes):
    import keras

    import tf_gradmix as gm
    from examples import resnet

    # Weight decay: an L2 kernel penalty for SGD/Adam; for LARS/LAMB the
    # optimizer's coupled decay (inside the trust ratio, 1-D variables excluded).
    l2 = config.weight_decay if config.optimizer in ("nesterov", "adam") else 0.0
    model_class = keras.Model if config.noise == "none" else gm.Model
    if config.model == "resnet18":
        return resnet.resnet18_cifar(
            num_classes=num_classes, bn_momentum=config.bn_momentum, weight_decay=l2,
            model_class=model_class,
        )
    return resnet.cifar_resnet(
        stage_widths=tuple(config.widths), num_classes=num_classes,
        bn_momentum=config.bn_momentum, weight_decay=l2, model_class=model_class,
    )


def schedule_settings(config, steps_per_epoch):
    """Peak rate, total and warmup steps of the paper's §5.1 schedule."""
    import tf_gradmix as gm

    recipe = recipe_for(config.optimizer)
    base_lr = config.base_lr if config.base_lr is not None else recipe["base_learning_rate"]
    base_batch = config.base_batch_size or recipe["base_batch_size"]
    warmup_epochs = config.warmup_epochs
    if warmup_epochs is None:  # 20 of 200 epochs, scaled to this run's length
        warmup_epochs = recipe["warmup_epochs"] * config.epochs / recipe["epochs"]
    total_steps = steps_per_epoch * config.epochs
    return {
        "peak_learning_rate": gm.schedules.scaled_learning_rate(base_lr, base_batch, config.batch_size),
        "total_steps": total_steps,
        "warmup_steps": min(total_steps, round(warmup_epochs * steps_per_epoch)),
        "warmup_power": recipe["warmup_power"],
        "decay_power": recipe["decay_power"],
        "base_learning_rate": base_lr,
        "base_batch_size": base_batch,
    }


def build_optimizer(config, settings):
    import keras

    import tf_gradmix as gm

    recipe = recipe_for(config.optimizer)
    if config.schedule == "cosine":
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
    if config.optimizer == "nesterov":
        optimizer = keras.optimizers.SGD(schedule, momentum=0.9, nesterov=True)
    elif config.optimizer == "adam":
        optimizer = keras.optimizers.Adam(schedule)
    elif config.optimizer == "lars":
        optimizer = gm.optimizers.LARS(
            schedule, momentum=0.9, weight_decay=config.weight_decay,
            trust_coefficient=recipe["trust_coefficient"],
            exclude_1d_variables=recipe["exclude_1d_variables"],
        )
    else:
        optimizer = gm.optimizers.LAMB(
            schedule, weight_decay=config.weight_decay,
            exclude_1d_variables=recipe["exclude_1d_variables"],
        )
    if config.noise == "none":
        return optimizer
    return gm.GradientMix(
        optimizer, level="sample", noise=config.noise, stddev=mixing.mixing_stddev(config), seed=config.seed + 1
    )


# --------------------------------------------------------------------------
# Training


def log_ggn_trace(config, model, x, y):
    """log Tr(G) on ``--ggn-size`` fixed, class-balanced training examples (Table 1 analogue)."""
    n = min(config.ggn_size, len(y))
    idx = cifar10.balanced_indices(y, n, seed=config.data_seed + 2) if n >= 10 else np.arange(n)
    return curvature.log_ggn_trace(model, x[idx], y[idx], num_probes=config.ggn_probes, seed=config.seed)


def run(config):
    """Trains once as ``config`` says; writes the result to ``--json-out`` and returns it (a JSON-ready dict)."""
    threads.limit_threads(config.threads)
    import keras

    import tf_gradmix as gm

    wall_start = time.perf_counter()
    out = Path(config.out or Path("runs") / "cifar_train" / run_name(config))
    out.mkdir(parents=True, exist_ok=True)
    (x_train, y_train), val, (x_test, y_test) = split_data(config, load_arrays(config))
    num_classes = 100 if config.dataset == "cifar100" else 10
    if len(y_train) < config.batch_size:
        raise SystemExit(f"--batch-size {config.batch_size} exceeds the {len(y_train)} training examples")
    steps_per_epoch = len(y_train) // config.batch_size  # partial batches are dropped
    settings = schedule_settings(config, steps_per_epoch)
    print(
        f"Run {run_name(config)}: {len(y_train)} training images, "
        f"{0 if val is None else len(val[1])} validation (held out of training), "
        f"{len(y_test)} test; {steps_per_epoch} steps/epoch x {config.epochs} epochs = "
        f"{settings['total_steps']} steps; peak LR {settings['peak_learning_rate']:g} "
        f"({settings['base_learning_rate']:g} x B/{settings['base_batch_size']}), warmup "
        f"{settings['warmup_steps']} steps; noise {config.noise} stddev {mixing.mixing_stddev(config):.4g}.",
        flush=True,
    )

    keras.utils.set_random_seed(config.seed)
    model = build_model(config, num_classes)
    model.compile(
        optimizer=build_optimizer(config, settings),
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
    if config.tensorboard:
        callbacks.append(keras.callbacks.TensorBoard(str(out / "tensorboard")))
    train_ds = make_dataset(config, x_train, y_train, config.batch_size, training=True)
    eval_batch = 1000
    val_ds = None if val is None else make_dataset(config, *val, eval_batch, training=False)
    fit_start = time.perf_counter()
    history = model.fit(
        train_ds, epochs=config.epochs, validation_data=val_ds,
        validation_freq=config.validation_freq, callbacks=callbacks,
        shuffle=False, verbose=results.fit_verbose(config.verbose),
    )
    fit_seconds = time.perf_counter() - fit_start

    def evaluate(x, y):
        logs = model.evaluate(make_dataset(config, x, y, eval_batch, training=False), verbose=0, return_dict=True)
        return float(logs["acc"]), float(logs["xent"])

    # Final numbers in inference mode; train = the training images, no
    # augmentation. Losses are the cross-entropy alone (no L2 term).
    train_acc, train_loss = evaluate(x_train, y_train)
    val_acc, val_loss = evaluate(*val) if val is not None else (None, None)
    test_acc, test_loss = evaluate(x_test, y_test)
    logs = history.history
    gammas = logs.get(gm.model.GAMMA_METRIC)
    result = {
        "config": values_of(config),
        "name": run_name(config),
        "seed": config.seed,
        "train_examples": int(len(y_train)),
        "val_examples": 0 if val is None else int(len(val[1])),
        "test_examples": int(len(y_test)),
        "steps": settings["total_steps"],
        "peak_learning_rate": settings["peak_learning_rate"],
        "warmup_steps": settings["warmup_steps"],
        "stddev": mixing.mixing_stddev(config),
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
        "gamma_bar": float(np.mean(gammas)) if gammas else (1.0 if config.noise == "none" else None),
        "fit_seconds": fit_seconds,
        "epochs_run_in_this_process": len(logs.get("loss", [])),
        "history": {k: [float(v) for v in vals] for k, vals in logs.items()},
    }
    if config.ggn_size:
        try:
            result.update(log_ggn_trace(config, model, x_train, y_train))
        except Exception as error:  # keep the training result; say what failed
            print(f"Tr(G) failed: {error!r}", flush=True)
            result["ggn_error"] = repr(error)
    result["wall_seconds"] = time.perf_counter() - wall_start
    json_out = Path(config.json_out or out / "result.json")
    results.write_result(result, json_out)
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
    """Trains the CIFAR run of the command line ``argv``; prints its result last, as one JSON line."""
    return results.main(run, parse_args, argv)


if __name__ == "__main__":
    main()
