"""Equal rate, equal steps: full-batch descent against small-batch SGD on CIFAR-10.

The cleanest test of what GradientMix can give back (Zhu et al. 2019; Wu et
al. 2020). At a fixed learning rate ``lr`` and a fixed number of steps, SGD
with batch ``b`` runs at the temperature ``lr / b``; full-batch gradient
descent (GD) on ``N`` examples at ``lr / N``: it has lost the sampling noise.
GradientMix on the full batch at
``stddev = noise.stddev_for_temperature(N, lr, b, lr) = sqrt(N / b - 1)``
restores the temperature of the small batch, with the structure of the
gradient covariance (its noise is a random combination of the per-example
gradients). One run of this script trains one arm:

* ``--batch-size 32 --noise none``: plain SGD, reshuffled every epoch;
* ``--batch-size 0 --noise none``: plain GD (every step sees all ``N``);
* ``--batch-size 0 --noise gaussian|rademacher|bernoulli``: GD + GradientMix
  (``tf_gradmix.Model`` + ``tf_gradmix.GradientMix``, real ``fit``);
* ``--batch-size 0 --noise isotropic``: the control: GD plus Gaussian noise
  whose norm each step equals that of the Gaussian mixing noise
  ``g_mix - g_mean`` of the same batch, in a uniformly random direction of
  parameter space (same size, no structure);
* ``--batch-size 0 --penalty-factor 1``: the noise-free control: GD on the
  loss plus SGD's implicit regularizer (Smith et al. 2021),
  ``L(θ) + λ · (1/m) Σ_k ||∇L_k(θ)||²`` with ``L_k`` the mean loss over
  block ``k`` of ``b = --reference-batch-size`` examples (a fixed partition
  of the subset into ``m = ⌈N/b⌉`` blocks) and ``λ = --penalty-factor · lr/4``.

``--stddev`` (default: the temperature rule against ``--reference-batch-size``)
is scaled by ``--stddev-factor`` (e.g. 0.5 for the half-stddev arm).

Setup: a fixed class-balanced subset of ``--train-size`` training images, no
augmentation; ``--val-size`` more images held out of training for choosing
the rate; the 10,000 test images; a two-layer strided CNN without
BatchNorm (16 and 32 filters, about 21k parameters); plain SGD at a fixed
rate (``--optimizer``: or Adam, LARS, LAMB; see :func:`make_optimizer`).
The same ``--seed`` gives the same initial weights in every arm and the same
batch order to the small batch.

Prints one JSON object (and writes it to ``--out``): final train / val / test
accuracy and cross-entropy, the validation curve, the mean of ``w^2``
(gamma-bar), and log Tr(G) of the trained model on the training subset.

    python -m examples.gd_vs_sgd --batch-size 32 --seed 0
    python -m examples.gd_vs_sgd --batch-size 0 --noise gaussian --seed 0

The flags are the fields of :class:`Config` (``--field-name``); from Python,
``run(Config(batch_size=32))`` returns the same dict.
"""

import dataclasses
import math
import os
import sys
import time
from typing import Optional

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

from examples import cifar10, curvature, data, results, threads  # noqa: E402
from examples.config import check_choices, config_from_argv, flag_of, option  # noqa: E402

NOISES = ("none", "gaussian", "rademacher", "bernoulli", "isotropic")
OPTIMIZERS = ("sgd", "adam", "lars", "lamb")
#: The optimizers that take ``--momentum``.
MOMENTUM_OPTIMIZERS = ("sgd", "lars")
#: LARS's trust coefficient ``eta`` unless given: You et al. and the MLPerf reference.
LARS_TRUST_COEFFICIENT = 1e-3


@dataclasses.dataclass(frozen=True)
class Config:
    """One arm of the equal-rate, equal-steps study: GD, small-batch SGD, or GD + noise or penalty."""

    data_dir: Optional[str] = data.data_dir_field("CIFAR-10 JPEG copy", "keras.datasets")
    cache_dir: Optional[str] = data.cache_dir_field()
    train_size: int = option(1024, help="N, the fixed class-balanced training subset")
    val_size: int = option(1000, help="held out of training, for choosing the rate")
    test_size: Optional[int] = option(None, help="class-balanced subset of the test images (default: all 10,000)")
    data_seed: int = option(0, help="seed of the subsets and the validation split")
    filters: tuple[int, int] = option((16, 32), help="filters of the two convolutions")
    batch_size: int = option(0, help="b; 0 = full batch (GD)")
    optimizer: str = option("sgd", choices=OPTIMIZERS, help="the same in every arm")
    lr: float = option(0.05, help="the fixed learning rate")
    momentum: float = option(0.0, help="SGD and LARS only")
    trust_coefficient: float = option(LARS_TRUST_COEFFICIENT, help="LARS only: eta of the layer-wise trust ratio")
    steps: int = option(2000, help="optimizer steps")
    eval_every: int = option(200, help="steps between validation evaluations")
    noise: str = option("none", choices=NOISES, help="the full batch's noise (none: plain GD or SGD)")
    stddev: Optional[float] = option(None, help="default: stddev_for_temperature(N, lr, reference b, lr)")
    reference_batch_size: int = option(32, help="b of the temperature rule and of the penalty's blocks")
    stddev_factor: float = option(1.0, help="scales the stddev (e.g. 0.5 for the half-stddev arm)")
    penalty_factor: float = option(0.0, help="GD + the gradient-norm penalty at λ = factor · lr/4 over blocks of "
                                   "the reference batch size; 0 = none")
    seed: int = option(0, help="initial weights, batch order and noise stream")
    ggn_size: int = option(512, help="training examples for log Tr(G); 0 skips it")
    threads: Optional[int] = threads.threads_field()
    out: Optional[str] = option(None, affects_result=False, help="write the JSON result here too")

    def __post_init__(self):
        check_choices(self)
        for name in ("train_size", "val_size", "steps", "eval_every", "reference_batch_size"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{flag_of(name)} must be positive, got {getattr(self, name)}")
        if self.batch_size < 0 or self.batch_size > self.train_size:
            raise ValueError(f"--batch-size must be in [0, --train-size={self.train_size}], got {self.batch_size}")
        if self.steps % self.eval_every:
            raise ValueError(f"--steps ({self.steps}) must be a multiple of --eval-every ({self.eval_every})")
        if self.noise != "none" and self.batch_size not in (0, self.train_size):
            raise ValueError(f"--noise is for the full batch (--batch-size 0) in this study, got --noise {self.noise} "
                             f"with --batch-size {self.batch_size}")
        if self.penalty_factor < 0 or not math.isfinite(self.penalty_factor):
            raise ValueError(f"--penalty-factor must be a non-negative number, got {self.penalty_factor}")
        if self.penalty_factor and (self.noise != "none" or self.batch_size not in (0, self.train_size)):
            raise ValueError("--penalty-factor is an arm of its own: full batch (--batch-size 0) and --noise none, "
                             f"got --batch-size {self.batch_size} --noise {self.noise}")
        if self.lr <= 0 or not math.isfinite(self.lr):
            raise ValueError(f"--lr must be a positive number, got {self.lr}")
        if self.momentum and self.optimizer not in MOMENTUM_OPTIMIZERS:
            raise ValueError(f"--momentum is for --optimizer sgd or lars, got --momentum {self.momentum} with "
                             f"--optimizer {self.optimizer}")
        if not 0 <= self.momentum < 1:
            raise ValueError(f"--momentum must be in [0, 1), got {self.momentum}")
        if not (self.trust_coefficient > 0 and math.isfinite(self.trust_coefficient)):
            raise ValueError(f"--trust-coefficient must be a positive number, got {self.trust_coefficient}")
        if self.trust_coefficient != LARS_TRUST_COEFFICIENT and self.optimizer != "lars":
            raise ValueError(f"--trust-coefficient is for --optimizer lars, got --trust-coefficient "
                             f"{self.trust_coefficient} with --optimizer {self.optimizer}")
        if self.stddev is not None and (self.stddev < 0 or not math.isfinite(self.stddev)):
            raise ValueError(f"--stddev must be a non-negative number, got {self.stddev}")
        if self.test_size is not None and self.test_size <= 0:
            raise ValueError(f"--test-size must be positive, got {self.test_size}")
        if self.ggn_size < 0:
            raise ValueError(f"--ggn-size must be non-negative, got {self.ggn_size}")


def parse_args(argv=None):
    """The :class:`Config` of a command line (``sys.argv[1:]`` by default)."""
    return config_from_argv(Config, sys.argv[1:] if argv is None else argv, description=__doc__.split("\n")[0])


def stddev_of(config, n):
    """The arm's stddev: the temperature rule unless given, times the factor."""
    if config.noise == "none":
        return 0.0
    from tf_gradmix import noise

    base = config.stddev
    if base is None:
        base = noise.stddev_for_temperature(n, config.lr, config.reference_batch_size, config.lr)
    return base * config.stddev_factor


def penalty_weight_of(config):
    """λ of the gradient-norm penalty: ``--penalty-factor · lr / 4`` (Smith et al. 2021)."""
    return config.penalty_factor * config.lr / 4


def make_optimizer(config):
    """The optimizer of every arm, at ``--lr`` and without weight decay.

    SGD (``--momentum``); Adam (Keras defaults but the rate);
    ``tf_gradmix.optimizers.LARS`` (``--momentum``, ``--trust-coefficient``)
    and ``tf_gradmix.optimizers.LAMB`` (its defaults), both with the recipes'
    exclusion of every variable of at most one dimension (the biases here)
    from the trust ratio.
    """
    import keras

    if config.optimizer == "adam":
        return keras.optimizers.Adam(config.lr)
    if config.optimizer in ("lars", "lamb"):
        from tf_gradmix import optimizers

        if config.optimizer == "lars":
            return optimizers.LARS(config.lr, momentum=config.momentum, trust_coefficient=config.trust_coefficient,
                                   exclude_1d_variables=True)
        return optimizers.LAMB(config.lr, exclude_1d_variables=True)
    return keras.optimizers.SGD(config.lr, momentum=config.momentum)


def build_model(config, cls):
    import keras

    keras.utils.set_random_seed(config.seed)  # the same initial weights in every arm
    f1, f2 = config.filters
    return cls(
        [
            keras.Input(cifar10.IMAGE_SHAPE),
            keras.layers.Conv2D(f1, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Conv2D(f2, 3, strides=2, padding="same", activation="relu"),
            keras.layers.Flatten(),
            keras.layers.Dense(len(cifar10.CLASSES)),
        ]
    )


def isotropic_model_class():
    """A Sequential whose train step adds isotropic noise of the mixing noise's norm."""
    import keras
    import tensorflow as tf

    from tf_gradmix import noise as noise_lib

    class IsotropicNoise(keras.Sequential):
        def configure_noise(self, stddev, seed):
            self.noise_stddev = float(stddev)
            self.noise_seed = int(seed)

        def train_step(self, data):
            x, y = data
            variables = self.trainable_variables
            step = self.optimizer.iterations
            w = noise_lib.mixing_weights(
                noise_lib.Gaussian(), self.noise_stddev, [tf.shape(x)[0]],
                noise_lib.step_seed(self.noise_seed, step, noise_lib.SAMPLE_STREAM),
            )
            with tf.GradientTape(persistent=True) as tape:
                logits = self(x, training=True)
                losses = keras.losses.sparse_categorical_crossentropy(y, logits, from_logits=True)
                mean_loss = tf.reduce_mean(losses)
                mixing_noise = tf.reduce_mean((w - 1.0) * losses)  # g_mix - g_mean, by linearity
            grads = tape.gradient(mean_loss, variables)
            noise_norm = tf.linalg.global_norm(tape.gradient(mixing_noise, variables))
            del tape
            # One standard normal number per parameter, from the stream no device weight uses here.
            sizes = [int(np.prod(v.shape)) for v in variables]
            normal = noise_lib.normal(
                [sum(sizes)], noise_lib.step_seed(self.noise_seed, step, noise_lib.DEVICE_STREAM)
            )
            directions = [tf.reshape(d, v.shape) for d, v in zip(tf.split(normal, sizes), variables)]
            scale = noise_norm / tf.linalg.global_norm(directions)  # uniform on the sphere of that radius
            self.optimizer.apply([g + scale * d for g, d in zip(grads, directions)], variables)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(mean_loss)
            return self.compute_metrics(x, y, logits)

    return IsotropicNoise


def gradient_penalty_model_class():
    """A Sequential whose train step descends the loss plus the mean squared block-gradient norm.

    The objective over the batch of ``n`` examples, split in order into
    ``m = ⌈n / b⌉`` blocks ``B_k`` of ``b`` examples (the last may be smaller),
    is SGD's implicit regularizer made explicit (Smith et al. 2021, "On the
    origin of implicit regularization in SGD", Eq. 1 for an epoch of
    ``m`` steps of batch ``b``)::

        L(θ) + λ · (1/m) Σ_k ||∇L_k(θ)||²,   L_k = mean loss over B_k,

    with ``λ = lr/4`` there (``weight``; ``block_size`` is ``b``). Its gradient
    needs second derivatives: each block's gradient is taken inside a second
    tape (double backprop), one block at a time. Geiping et al. 2022
    ("Stochastic training is not necessary for generalization") train full
    batch with a related penalty. No noise: every step is the same function
    of the weights.
    """
    import keras
    import tensorflow as tf

    class GradientNormPenalty(keras.Sequential):
        def configure_penalty(self, weight, block_size):
            if weight < 0 or not math.isfinite(weight):
                raise ValueError(f"weight must be a non-negative number, got {weight}")
            if block_size <= 0:
                raise ValueError(f"block_size must be positive, got {block_size}")
            self.penalty_weight = float(weight)
            self.penalty_block_size = int(block_size)

        def train_step(self, data):
            x, y = data
            n = x.shape[0]
            if n is None:
                raise ValueError("GradientNormPenalty needs a batch of static size (the blocks are fixed)")
            b = self.penalty_block_size
            starts = range(0, n, b)
            m = len(starts)
            variables = self.trainable_variables
            grads = [tf.zeros_like(v) for v in variables]
            logits, mean_loss = [], 0.0
            for start in starts:
                xb, yb = x[start : start + b], y[start : start + b]
                with tf.GradientTape() as outer:
                    with tf.GradientTape() as inner:
                        block_logits = self(xb, training=True)
                        block_loss = tf.reduce_mean(
                            keras.losses.sparse_categorical_crossentropy(yb, block_logits, from_logits=True)
                        )
                    squared_norm = tf.add_n([tf.reduce_sum(tf.square(g)) for g in inner.gradient(block_loss,
                                                                                                   variables)])
                    share = xb.shape[0] / n  # L = Σ_k (|B_k| / n) L_k
                    objective = share * block_loss + self.penalty_weight / m * squared_norm
                grads = [a + g for a, g in zip(grads, outer.gradient(objective, variables))]
                logits.append(block_logits)
                mean_loss += share * block_loss
            self.optimizer.apply(grads, variables)
            for metric in self.metrics:
                if metric.name == "loss":
                    metric.update_state(mean_loss)
            return self.compute_metrics(x, y, tf.concat(logits, 0))

    return GradientNormPenalty


def load_data(config):
    (x_all, y_all), (x_test, y_test) = cifar10.load_cifar10(config.data_dir, config.cache_dir, verbose=False)
    # cifar10.train_val_split, then cifar10.subset of its training part, indexing the images once.
    pool, val = cifar10.train_val_indices(y_all, config.val_size, seed=config.data_seed)
    train = pool[cifar10.balanced_indices(y_all[pool], config.train_size, seed=config.data_seed + 1)]
    (x_train, y_train), (x_val, y_val) = (x_all[train], y_all[train]), (x_all[val], y_all[val])
    if config.test_size:
        # The JPEG copy is sorted by class: take a class-balanced subset.
        x_test, y_test = cifar10.subset(x_test, y_test, config.test_size, seed=config.data_seed)
    return (x_train, y_train), (x_val, y_val), (x_test, y_test)


def training_dataset(config, x, y, batch):
    import tensorflow as tf

    if batch == len(y):  # GD: every step is the whole, fixed subset
        images = cifar10.normalize(tf.constant(x))
        return tf.data.Dataset.from_tensors((images, tf.constant(y, tf.int64))).repeat()
    return cifar10.make_dataset(x, y, batch, training=True, seed=config.seed, augment=False).repeat()


def log_ggn_trace(config, model, x, y):
    """log Tr(G) of the trained model on the first ``--ggn-size`` training examples."""
    n = min(config.ggn_size, len(y))
    return curvature.log_ggn_trace(model, x[:n], y[:n], batch_size=64)


def run(config):
    """Trains the arm of ``config`` (a :class:`Config`) and returns its result dict (see the module docstring)."""
    threads.limit_threads(config.threads)
    import keras

    import tf_gradmix as gm

    (x_train, y_train), (x_val, y_val), (x_test, y_test) = load_data(config)
    n = len(y_train)
    batch = config.batch_size or n
    stddev = stddev_of(config, n)
    inner = make_optimizer(config)
    if config.penalty_factor:
        model, optimizer = build_model(config, gradient_penalty_model_class()), inner
        model.configure_penalty(penalty_weight_of(config), config.reference_batch_size)
    elif config.noise == "none":
        model, optimizer = build_model(config, keras.Sequential), inner
    elif config.noise == "isotropic":
        model, optimizer = build_model(config, isotropic_model_class()), inner
        model.configure_noise(stddev, config.seed)
    else:
        model = build_model(config, gm.Sequential)
        optimizer = gm.GradientMix(inner, noise=config.noise, stddev=stddev, seed=config.seed)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=optimizer, loss=loss, metrics=["accuracy"])

    def evaluate(x, y):
        result = model.evaluate(cifar10.make_dataset(x, y, 1000, training=False), verbose=0, return_dict=True)
        return float(result["accuracy"]), float(result["loss"])

    # One fit: Keras keeps the iterator of the repeated dataset across its
    # epochs, so the small batch's order runs on through the whole run.
    started = time.perf_counter()
    logs = model.fit(
        training_dataset(config, x_train, y_train, batch),
        steps_per_epoch=config.eval_every,
        epochs=config.steps // config.eval_every,
        validation_data=cifar10.make_dataset(x_val, y_val, 1000, training=False),
        callbacks=[keras.callbacks.TerminateOnNaN()],
        verbose=0,
    ).history
    fit_seconds = time.perf_counter() - started
    done = config.eval_every * len(logs["loss"])
    history = {
        "step": [config.eval_every * (i + 1) for i in range(len(logs["loss"]))],
        "val_acc": [float(v) for v in logs["val_accuracy"]],
        "train_loss": [float(v) for v in logs["loss"]],
    }
    gammas = logs.get("gradmix_gamma")

    metrics = {}  # train_acc, train_loss, val_acc, ..., test_loss
    for split, (x, y) in (("train", (x_train, y_train)), ("val", (x_val, y_val)), ("test", (x_test, y_test))):
        metrics[f"{split}_acc"], metrics[f"{split}_loss"] = evaluate(x, y)
    result = {
        "arm": arm_name(config),
        "noise": config.noise,
        "batch_size": batch,
        "train_size": n,
        "optimizer": config.optimizer,
        "lr": config.lr,
        "momentum": config.momentum,
        "trust_coefficient": config.trust_coefficient if config.optimizer == "lars" else None,
        "steps": done,
        "stddev": stddev,
        "penalty_weight": penalty_weight_of(config),
        "penalty_block_size": config.reference_batch_size if config.penalty_factor else None,
        "seed": config.seed,
        **metrics,
        "gamma_bar": float(np.mean(gammas)) if gammas else None,
        "history": history,
        "parameters": int(model.count_params()),
        "fit_seconds": fit_seconds,
    }
    if config.ggn_size and math.isfinite(metrics["train_loss"]):
        result.update(log_ggn_trace(config, model, x_train, y_train))
    return result


def arm_name(config):
    """A short label: ``sgd32``, ``gd``, ``gd+gaussian``, ``gd+gaussian x0.5``, ``gd+penalty x4``."""
    if config.batch_size and config.batch_size != config.train_size:
        return f"sgd{config.batch_size}"
    if config.penalty_factor:
        return "gd+penalty" + ("" if config.penalty_factor == 1.0 else f" x{config.penalty_factor:g}")
    if config.noise == "none":
        return "gd"
    factor = "" if config.stddev_factor == 1.0 else f" x{config.stddev_factor:g}"
    given = "" if config.stddev is None else f" s={config.stddev:g}"
    return f"gd+{config.noise}{given}{factor}"


def main(argv=None):
    config = parse_args(argv)
    result = run(config)
    if config.out:
        results.write_result(result, config.out)
    results.print_result(result)


if __name__ == "__main__":
    main()
