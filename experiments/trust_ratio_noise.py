"""Per layer, the noise-to-signal ratio of the update after LARS's or LAMB's trust ratio.

The layer-wise trust ratio sets the length of each layer's update (``eta ||w||``
for LARS, ``||w||`` for LAMB, times the rate); only the direction of the
layer's gradient survives it. So the part of the gradient noise that changes
the update's length is normalised away, and noise shortens the *mean* update
instead. This script measures, on the training subset of
``examples/gd_vs_sgd.py`` (at initialisation, or after ``--train-steps`` of
plain GD with the optimizer), for draws of each arm's gradient:

* ``sgd<b>``: the mean gradient of ``b`` examples drawn without replacement;
* ``gd``: the full-batch gradient (no noise);
* ``gd+gaussian``, ``gd+bernoulli``: ``(1/N) sum_n w_n g_n`` with the mixing
  weights of ``tf_gradmix.noise`` at ``--stddev`` (default
  ``stddev_for_noise_batch_size(N, b)``);
* ``gd+isotropic``: the full-batch gradient plus a random direction of the
  Gaussian mixing noise's norm (the trainer's isotropic control).

Each draw ``g`` becomes one layer's update direction ``u`` as the optimizer
makes it from a single gradient: LARS ``u = eta ||w|| g / ||g||``; LAMB
``r = g / (sqrt(v) + eps)`` with ``v`` the arm's per-coordinate mean of
``g^2`` over the draws (Adam's second moment at its stationary value), then
``u = ||w|| r / ||r||``; a variable of at most one dimension (a bias, excluded
as the trainer excludes it) or with ``||w|| = 0`` keeps ``u = g`` (LARS) or
``u = r`` (LAMB). Momentum is left out: it averages successive draws of every
arm alike. Per arm and layer it reports, over the draws:

* ``nsr_raw``: ``E||g - E g||^2 / ||E g||^2``, the gradient's noise-to-signal;
* ``nsr_raw_expected``: the same in expectation, from the per-example
  gradients (no draws): ``(N-b)/(b(N-1)) mean_n ||g_n - g||^2`` for the small
  batch, ``stddev^2/N mean_n ||g_n||^2`` for mixing, that times the layer's
  share of the parameters for the isotropic control, over ``||g||^2``;
* ``nsr``: ``E||u - E u||^2 / ||E u||^2``, the same after the trust ratio;
* ``mean_step``: ``||E u|| / E||u||``, the share of the update's length that
  the noise leaves in the mean step (1 without noise);
* ``cos_gd``: the cosine between ``E u`` and GD's update;

and ``top_share``: the share of ``sum_n ||g_n||^2`` that the 1% of examples
with the largest gradients carry (how few examples dominate the gradient).

    python -m experiments.trust_ratio_noise --optimizer lars --lr 1 --train-steps 0
    python -m experiments.trust_ratio_noise --optimizer lamb --lr 3e-3 --train-steps 500 --out runs/lamb_nsr.json

``--stddev-factors`` adds Gaussian arms at the stddev times each factor
(``gd+gaussian x0.5``), and :func:`matched_factor` picks the one whose update
after the trust ratio has the small batch's noise-to-signal ratio.
"""

import argparse
import json
import math
import os
from pathlib import Path

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

#: LAMB's epsilon (``tf_gradmix.optimizers.LAMB``'s default, which the trainer uses).
LAMB_EPSILON = 1e-6
MIXING = ("gaussian", "bernoulli")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--optimizer", choices=("lars", "lamb"), required=True)
    p.add_argument("--lr", type=float, required=True, help="the rate of the --train-steps of plain GD")
    p.add_argument("--momentum", type=float, default=None, help="LARS's, for --train-steps (default 0.9)")
    p.add_argument("--train-steps", type=int, default=0, help="plain GD steps before measuring (0: at init)")
    p.add_argument("--train-size", type=int, default=1024)
    p.add_argument("--batch-size", type=int, default=32, help="b, the small batch")
    p.add_argument("--stddev", type=float, default=None, help="default: stddev_for_noise_batch_size(N, b)")
    p.add_argument("--noises", nargs="+", default=["gaussian", "bernoulli", "isotropic"],
                   choices=("gaussian", "bernoulli", "isotropic"))
    p.add_argument("--stddev-factors", type=float, nargs="+", default=(),
                   help="also Gaussian mixing at the stddev times each factor (arms gd+gaussian x<factor>)")
    p.add_argument("--draws", type=int, default=200, help="gradient draws per arm")
    p.add_argument("--seed", type=int, default=0, help="initial weights and the draws")
    p.add_argument("--chunk", type=int, default=256, help="examples per per-example-gradient call")
    p.add_argument("--data-dir", default=None, help="CIFAR-10 (default: $TF_GRADMIX_DATA)")
    p.add_argument("--threads", type=int, default=None, help="cap TensorFlow's thread pools (default: all cores)")
    p.add_argument("--out", type=Path, default=None, help="also write the JSON here")
    args = p.parse_args(argv)
    for name in ("train_size", "batch_size", "draws", "chunk"):
        if getattr(args, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    if any(not (f > 0 and math.isfinite(f)) for f in args.stddev_factors):
        p.error(f"--stddev-factors must be positive numbers, got {args.stddev_factors}")
    if args.train_steps < 0:
        p.error(f"--train-steps must be non-negative, got {args.train_steps}")
    if args.batch_size > args.train_size:
        p.error(f"--batch-size must be at most --train-size={args.train_size}, got {args.batch_size}")
    if args.momentum is None:
        args.momentum = 0.9 if args.optimizer == "lars" else 0.0
    return args


def layer_update(optimizer, g, w, v=None, trust_coefficient=1e-3, epsilon=LAMB_EPSILON):
    """One layer's update direction from one gradient ``g`` (flat float64), weights ``w``, LAMB's ``v``."""
    adapted = w.ndim > 1 and np.linalg.norm(w) > 0
    if optimizer == "lamb":
        r = g / (np.sqrt(v) + epsilon)
        norm = np.linalg.norm(r)
        return np.linalg.norm(w) * r / norm if adapted and norm > 0 else r
    norm = np.linalg.norm(g)
    return trust_coefficient * np.linalg.norm(w) * g / norm if adapted and norm > 0 else g


def draws_of(arm, grads, count, rng, mixing_weights):
    """``count`` draws of the flat gradient of ``arm`` from per-example gradients ``grads`` ``[N, P]``.

    ``mixing_weights(noise, k)``: the ``N`` weights of draw ``k``.
    """
    n = grads.shape[0]
    mean = grads.mean(0)
    out = np.empty((count, grads.shape[1]))
    for k in range(count):
        if arm == "gd":
            out[k] = mean
        elif arm.startswith("sgd"):
            out[k] = grads[rng.choice(n, int(arm[3:]), replace=False)].mean(0)
        elif arm == "gd+isotropic":
            noise_norm = np.linalg.norm((mixing_weights("gaussian", k) - 1.0) @ grads / n)
            direction = rng.standard_normal(grads.shape[1])
            out[k] = mean + noise_norm * direction / np.linalg.norm(direction)
        else:
            out[k] = mixing_weights(arm[3:], k) @ grads / n
    return out


def arm_stddev(arm, stddev):
    """The mixing stddev of an arm: ``stddev``, times ``f`` for ``gd+gaussian x<f>``."""
    _, _, factor = arm.partition(" x")
    return stddev * float(factor) if factor else stddev


def matched_factor(results, small, factors, adapted):
    """The factor of ``gd+gaussian x<factor>`` nearest the small batch's NSR after the trust ratio.

    Nearest: the smallest ``|median over the adapted layers of log(NSR_mixed / NSR_small)|``;
    ``adapted``: the indices of the layers the trust ratio scales (kernels).
    """
    def miss(factor):
        rows = results[f"gd+gaussian x{factor:g}"]
        return abs(float(np.median([math.log(rows[i]["nsr"] / results[small][i]["nsr"]) for i in adapted])))

    return min(factors, key=miss)


def expected_noise(arm, grads, stddev):
    """``E||g - E g||^2`` of one draw of ``arm`` from per-example gradients ``grads`` ``[N, P]`` (no draws)."""
    stddev = arm_stddev(arm, stddev)
    n = grads.shape[0]
    if arm == "gd":
        return 0.0
    if arm.startswith("sgd"):
        b = int(arm[3:])
        return (n - b) / (b * (n - 1)) * float(np.mean(np.sum((grads - grads.mean(0)) ** 2, 1)))
    return stddev ** 2 / n * float(np.mean(np.sum(grads ** 2, 1)))  # mixing; the isotropic control's norm too


def measure(optimizer, grads, weights, arms, count, rng, mixing_weights, stddev):
    """``{arm: [per layer {nsr_raw, nsr_raw_expected, nsr, mean_step, cos_gd}]}``.

    ``grads``: per-example gradients ``[N, P]`` (float64) of the variables
    ``weights`` (their arrays, in order, ``P`` their sizes summed).
    """
    bounds = np.cumsum([0] + [w.size for w in weights])
    results = {arm: [] for arm in arms}
    gd_mean = {}
    for arm in ["gd"] + [a for a in arms if a != "gd"]:  # GD first: the others' cosines are to its update
        draws = draws_of(arm, grads, count if arm in arms and arm != "gd" else 1, rng, mixing_weights)
        for layer, w in enumerate(weights):
            g = draws[:, bounds[layer]:bounds[layer + 1]]
            v = np.mean(g ** 2, axis=0) if optimizer == "lamb" else None
            u = np.stack([layer_update(optimizer, gk, w, v) for gk in g])
            mean_g, mean_u = g.mean(0), u.mean(0)
            if arm == "gd+isotropic":  # the Gaussian mixing noise's norm, in a uniform direction
                noise = expected_noise(arm, grads, stddev) * w.size / grads.shape[1]
            else:
                noise = expected_noise(arm, grads[:, bounds[layer]:bounds[layer + 1]], stddev)
            signal = float(np.sum(grads[:, bounds[layer]:bounds[layer + 1]].mean(0) ** 2))
            row = {
                "nsr_raw": float(np.mean(np.sum((g - mean_g) ** 2, 1)) / np.sum(mean_g ** 2)),
                "nsr_raw_expected": noise / signal,
                "nsr": float(np.mean(np.sum((u - mean_u) ** 2, 1)) / np.sum(mean_u ** 2)),
                "mean_step": float(np.linalg.norm(mean_u) / np.mean(np.linalg.norm(u, axis=1))),
            }
            if arm == "gd":
                gd_mean[layer] = mean_u
            row["cos_gd"] = float(mean_u @ gd_mean[layer] / (np.linalg.norm(mean_u) * np.linalg.norm(gd_mean[layer])))
            if arm in results:
                results[arm].append(row)
    return results


def top_share(grads, fraction=0.01):
    """The share of ``sum_n ||g_n||^2`` in the ``ceil(fraction N)`` examples of the largest ``||g_n||``."""
    squares = np.sort(np.sum(grads ** 2, 1))[::-1]
    return float(squares[:math.ceil(fraction * len(squares))].sum() / squares.sum())


def table(results, names):
    """Markdown: one row per arm and layer."""
    lines = ["| layer | arm | NSR of g (expected) | NSR after trust ratio | mean step / step length | cos to GD |",
             "|---|---|---:|---:|---:|---:|"]
    for layer, name in enumerate(names):
        for arm, rows in results.items():
            r = rows[layer]
            lines.append(f"| {name} | {arm} | {r['nsr_raw']:.3g} ({r['nsr_raw_expected']:.3g}) | {r['nsr']:.3g} | "
                         f"{r['mean_step']:.3f} | "
                         f"{r['cos_gd']:.3f} |")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    from examples import cifar10, gd_vs_sgd, threads

    threads.limit_threads(args.threads)
    import keras
    import tensorflow as tf

    from tf_gradmix import noise, per_example

    config = gd_vs_sgd.Config(data_dir=args.data_dir, train_size=args.train_size, optimizer=args.optimizer,
                              lr=args.lr, momentum=args.momentum, seed=args.seed, ggn_size=0)
    (x, y), _, _ = gd_vs_sgd.load_data(config)
    n = len(y)
    model = gd_vs_sgd.build_model(config, keras.Sequential)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(optimizer=gd_vs_sgd.make_optimizer(config), loss=loss)
    if args.train_steps:
        model.fit(gd_vs_sgd.training_dataset(config, x, y, n), steps_per_epoch=args.train_steps, epochs=1, verbose=0)
    images = cifar10.normalize(tf.constant(x))
    chunks = [per_example.per_example_gradients(model, images[i:i + args.chunk], y[i:i + args.chunk], loss)
              for i in range(0, n, args.chunk)]
    grads = np.concatenate([np.concatenate([np.reshape(g.numpy(), (g.shape[0], -1)) for g in chunk], 1)
                            for chunk in chunks]).astype(np.float64)
    weights = [np.asarray(v.numpy(), np.float64) for v in model.trainable_variables]
    stddev = noise.stddev_for_noise_batch_size(n, args.batch_size) if args.stddev is None else args.stddev

    def mixing_weights(kind, k):
        seed = noise.step_seed(args.seed, k, noise.SAMPLE_STREAM)
        name = kind.partition(" x")[0]
        return np.asarray(noise.mixing_weights(noise.get(name), arm_stddev(kind, stddev), [n], seed), np.float64)

    arms = [f"sgd{args.batch_size}", "gd"] + [f"gd+{kind}" for kind in args.noises]
    arms += [f"gd+gaussian x{factor:g}" for factor in args.stddev_factors]
    rng = np.random.default_rng(args.seed)
    results = measure(args.optimizer, grads, weights, arms, args.draws, rng, mixing_weights, stddev)
    names = [v.path for v in model.trainable_variables]
    train_loss = float(np.mean(loss(y, model(images, training=False))))
    out = {"optimizer": args.optimizer, "lr": args.lr, "train_steps": args.train_steps, "train_size": n,
           "batch_size": args.batch_size, "stddev": stddev, "draws": args.draws, "seed": args.seed,
           "train_loss": train_loss, "top_share": top_share(grads), "layers": names, "results": results}
    print(f"{args.optimizer}, {args.train_steps} GD steps at rate {args.lr:g} (training loss {train_loss:.3g}), "
          f"stddev {stddev:.3g}, {args.draws} draws per arm; the top 1% of examples carry "
          f"{out['top_share']:.0%} of sum ||g_n||^2:\n")
    print(table(results, names))
    if args.stddev_factors:
        adapted = [i for i, w in enumerate(weights) if w.ndim > 1]
        out["matched_factor"] = matched_factor(results, arms[0], args.stddev_factors, adapted)
        print(f"\nGaussian stddev factor nearest the small batch's NSR after the trust ratio: "
              f"{out['matched_factor']:g} (stddev {out['matched_factor'] * stddev:.4g})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out) + "\n")
    return out


if __name__ == "__main__":
    main()
