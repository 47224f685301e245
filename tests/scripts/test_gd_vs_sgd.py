"""The equal-rate, equal-steps study: its isotropic control, rate choice and report."""

import argparse
import json
import math

import keras
import numpy as np
import pytest

from examples import cifar10, gd_vs_sgd
from experiments import temperature, temperature_report
from tf_gradmix import noise

import real_data
from oracles import assert_float32_close, flat, per_example_gradients, weights_of

pytestmark = pytest.mark.backends("tensorflow")


def test_default_stddev_is_the_temperature_rule():
    args = gd_vs_sgd.parse_args(["--noise", "gaussian", "--lr", "0.1", "--reference-batch-size", "32"])
    assert gd_vs_sgd.stddev_of(args, 1024) == pytest.approx(math.sqrt(31))
    half = gd_vs_sgd.parse_args(["--noise", "gaussian", "--stddev-factor", "0.5"])
    assert gd_vs_sgd.stddev_of(half, 1024) == pytest.approx(math.sqrt(31) / 2)
    assert gd_vs_sgd.stddev_of(gd_vs_sgd.parse_args([]), 1024) == 0.0
    with pytest.raises(SystemExit):
        gd_vs_sgd.parse_args(["--batch-size", "32", "--noise", "gaussian"])  # noise is for GD only


def test_isotropic_control_has_the_mixing_noise_norm_in_a_random_direction():
    """One SGD(1.0) step: update = g_mean + r u with r = ||g_mix - g_mean||, u random."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(16, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, 16)
    args = gd_vs_sgd.parse_args(["--noise", "isotropic", "--seed", "3", "--filters", "2", "4"])
    model = gd_vs_sgd.build_model(args, gd_vs_sgd.isotropic_model_class())
    model.configure_noise(2.0, seed=3)
    ref = gd_vs_sgd.build_model(args, keras.Sequential)  # same seed: same weights
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    model.compile(keras.optimizers.SGD(1.0), loss, metrics=["accuracy"])
    before = flat(weights_of(model))
    model.fit(x, y, batch_size=16, epochs=1, shuffle=False, verbose=0)
    update = before - flat(weights_of(model))

    grads = per_example_gradients(ref, x, y, loss)  # float64 [B, P]
    w = noise.mixing_weights(
        noise.Gaussian(), 2.0, [16], noise.step_seed(3, 0, noise.SAMPLE_STREAM)
    ).numpy().astype(np.float64)
    g_mean = grads.mean(0)
    mixing_noise = grads.T @ (w - 1.0) / 16
    added = update - g_mean
    # float32 rounding of the update is a few ulps of its largest entry per
    # element; over P elements the norm moves by at most sqrt(P) times that.
    tolerance = 64 * np.finfo(np.float32).eps * np.max(np.abs(update)) * math.sqrt(update.size)
    assert abs(np.linalg.norm(added) - np.linalg.norm(mixing_noise)) <= tolerance
    cosine = added @ mixing_noise / (np.linalg.norm(added) * np.linalg.norm(mixing_noise))
    assert abs(cosine) < 0.2  # random direction: about 1/sqrt(P); mixing's own would give 1


def _rate_records(values):
    return [
        {"lr": lr, "arm": arm, "train_acc": train, "val_acc": val}
        for lr, arm, train, val in values
    ]


def test_rate_choice_uses_validation_among_rates_where_both_arms_fit():
    args = argparse.Namespace(batch_size=32, fit_threshold=0.99, rates=(0.05, 0.1, 0.2))
    records = _rate_records(
        [
            (0.05, "sgd32", 1.0, 0.31), (0.05, "gd", 1.0, 0.33),
            (0.1, "sgd32", 1.0, 0.34), (0.1, "gd", 1.0, 0.32),
            (0.2, "sgd32", 1.0, 0.36), (0.2, "gd", 0.95, 0.30),  # best val, but GD does not fit
        ]
    )
    assert temperature.choose_rate(args, records) == 0.1
    unfit = _rate_records([(0.05, "sgd32", 0.9, 0.3), (0.05, "gd", 1.0, 0.3)])
    with pytest.raises(SystemExit, match="No rate"):
        temperature.choose_rate(args, unfit)


def test_report_pairs_seeds_and_computes_the_recovered_share():
    def run(arm, seed, acc):
        return {"arm": arm, "seed": seed, "test_acc": acc, "test_loss": 2.0, "train_acc": 1.0,
                "stddev": 5.57 if "+" in arm else 0.0, "log_ggn_trace": 5.0}

    runs = {}
    for seed, (small, gd, mixed) in enumerate([(0.40, 0.30, 0.35), (0.44, 0.32, 0.41)]):
        for arm, acc in (("sgd32", small), ("gd", gd), ("gd+gaussian", mixed)):
            runs[(arm, seed)] = run(arm, seed, acc)
    rows = {line.split("|")[1].strip(): line for line in temperature_report.table(runs).splitlines()[2:]}
    cells = [c.strip() for c in rows["gd+gaussian"].split("|")]
    # Δ vs GD: +5, +9 -> 7.0 ± 2.8; vs small: -5, -3; recovered 50% and 75%.
    assert cells[5] == "+7.0 ± 2.8" and cells[6] == "-4.0 ± 1.4" and cells[7] == "62 ± 18 %"


@pytest.mark.slow
def test_one_arm_runs_end_to_end_on_real_cifar10(tmp_path):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    out = tmp_path / "arm.json"
    # ``python -m examples.gd_vs_sgd ...``, in this process (a new interpreter would import TensorFlow again).
    gd_vs_sgd.main([
        "--train-size", "100", "--val-size", "100", "--test-size", "200",
        "--steps", "4", "--eval-every", "2", "--noise", "bernoulli", "--ggn-size", "16",
        "--out", str(out),
    ])
    result = json.loads(out.read_text())
    assert result["arm"] == "gd+bernoulli" and result["batch_size"] == 100 and result["steps"] == 4
    assert result["stddev"] == pytest.approx(math.sqrt(100 / 32 - 1))
    # Bernoulli weights are 0 or 1 + stddev^2, so mean(w^2) = (1 + s^2) * kept share.
    assert 0 < result["gamma_bar"] <= (1 + result["stddev"] ** 2) ** 2
    assert result["history"]["step"] == [2, 4] and len(result["history"]["val_acc"]) == 2
    assert math.isfinite(result["log_ggn_trace"]) and result["ggn_examples"] == 16


def test_penalty_arm_arguments():
    args = gd_vs_sgd.parse_args(["--penalty-factor", "1", "--lr", "0.1"])
    assert gd_vs_sgd.penalty_weight_of(args) == pytest.approx(0.025)  # λ = lr/4 (Smith et al. 2021)
    assert gd_vs_sgd.arm_name(args) == "gd+penalty"
    assert gd_vs_sgd.arm_name(gd_vs_sgd.parse_args(["--penalty-factor", "4"])) == "gd+penalty x4"
    assert gd_vs_sgd.penalty_weight_of(gd_vs_sgd.parse_args([])) == 0.0
    for bad in (["--penalty-factor", "1", "--batch-size", "32"], ["--penalty-factor", "1", "--noise", "gaussian"],
                ["--penalty-factor", "-1"]):
        with pytest.raises(SystemExit):
            gd_vs_sgd.parse_args(bad)


def test_lars_and_lamb_arms_take_the_recipes_settings():
    from tf_gradmix import optimizers

    lars = gd_vs_sgd.make_optimizer(gd_vs_sgd.parse_args(["--optimizer", "lars", "--lr", "2", "--momentum", "0.9"]))
    assert isinstance(lars, optimizers.LARS) and lars.momentum == 0.9 and lars.trust_coefficient == 1e-3
    assert lars.exclude_1d_variables and lars.weight_decay == 0 and float(lars.learning_rate) == 2.0
    lamb = gd_vs_sgd.make_optimizer(gd_vs_sgd.parse_args(["--optimizer", "lamb", "--lr", "0.01"]))
    assert isinstance(lamb, optimizers.LAMB) and lamb.exclude_1d_variables and lamb.weight_decay == 0
    tuned = gd_vs_sgd.parse_args(["--optimizer", "lars", "--trust-coefficient", "0.02"])
    assert gd_vs_sgd.make_optimizer(tuned).trust_coefficient == 0.02
    for bad in (["--optimizer", "lamb", "--momentum", "0.9"], ["--trust-coefficient", "0.02"],
                ["--optimizer", "lars", "--trust-coefficient", "0"], ["--optimizer", "lars", "--momentum", "1"]):
        with pytest.raises(SystemExit):
            gd_vs_sgd.parse_args(bad)
    # The sweep: LARS with the recipe's momentum unless given; each optimizer its own results file.
    args = temperature.parse_args(["--optimizer", "lars"])
    assert args.momentum == 0.9 and args.results == temperature.LARS_RESULTS
    assert temperature.small_batch(args, 1.0, 0) == gd_vs_sgd.Config(optimizer="lars", lr=1.0, momentum=0.9,
                                                                       batch_size=32)
    assert temperature.parse_args(["--optimizer", "lars", "--momentum", "0"]).momentum == 0.0
    args = temperature.parse_args(["--optimizer", "lamb"])
    assert args.momentum == 0.0 and args.results == temperature.LAMB_RESULTS
    with pytest.raises(SystemExit):
        temperature.parse_args(["--optimizer", "lamb", "--momentum", "0.9"])


@pytest.mark.slow
def test_lars_and_lamb_arms_run_end_to_end_on_real_cifar10():
    """The layer-wise optimizers under GradientMix's train step and the isotropic control's (plain fit as Adam's)."""
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    tiny = dict(train_size=64, val_size=50, test_size=100, steps=2, eval_every=2, ggn_size=0)
    for optimizer, momentum, kind in (("lars", 0.9, "gaussian"), ("lamb", 0.0, "isotropic")):
        config = gd_vs_sgd.Config(optimizer=optimizer, lr=0.01, momentum=momentum, noise=kind, **tiny)
        result = gd_vs_sgd.run(config)
        assert result["optimizer"] == optimizer and result["steps"] == 2 and math.isfinite(result["train_loss"])
        assert result["trust_coefficient"] == (1e-3 if optimizer == "lars" else None)
        assert result["arm"] == gd_vs_sgd.arm_name(config)


def _unflatten(vector, like):
    arrays, offset = [], 0
    for a in like:
        arrays.append(vector[offset : offset + a.size].reshape(a.shape))
        offset += a.size
    return arrays


def test_gradient_penalty_step_matches_a_finite_difference_reference():
    """One SGD(1.0) step of ``L + λ (1/m) Σ_k ||∇L_k||²`` against a float64 reference.

    ``∇||∇L_k||² = 2 H_k g_k`` (``g_k = ∇L_k``), and the reference takes the
    Hessian-vector product by central differences of float64 first
    derivatives along ``g_k``: no double backprop, unlike the model.
    """
    rng = np.random.default_rng(1)
    n, b = 10, 4  # blocks of 4, 4 and 2 examples: a ragged last block too
    x = rng.normal(size=(n, 32, 32, 3)).astype("float32")
    y = rng.integers(0, 10, n)
    args = gd_vs_sgd.parse_args(["--penalty-factor", "1", "--filters", "2", "4", "--seed", "2"])
    model = gd_vs_sgd.build_model(args, gd_vs_sgd.gradient_penalty_model_class())
    weight = 0.1
    model.configure_penalty(weight, b)
    model.compile(keras.optimizers.SGD(1.0), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    before = weights_of(model)
    import tensorflow as tf

    model.fit(tf.data.Dataset.from_tensors((x, y)), epochs=1, steps_per_epoch=1, verbose=0)
    update = flat(before) - flat(weights_of(model))

    keras.config.set_dtype_policy("float64")
    ref = gd_vs_sgd.build_model(args, keras.Sequential)
    keras.config.set_dtype_policy("float32")
    theta = flat(before)

    def block_gradient(point, lo, hi):
        ref.set_weights(_unflatten(point, before))
        with tf.GradientTape() as tape:
            logits = ref(x[lo:hi].astype(np.float64), training=True)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(y[lo:hi], logits, from_logits=True))
        return flat(tape.gradient(loss, ref.trainable_variables))

    blocks = [(lo, min(lo + b, n)) for lo in range(0, n, b)]
    loss_gradient, penalty_gradient = np.zeros_like(theta), np.zeros_like(theta)
    h = 1e-8  # float64: truncation ~h², rounding ~1e-16/h; small enough to cross no ReLU kink
    for lo, hi in blocks:
        g = block_gradient(theta, lo, hi)
        loss_gradient += (hi - lo) / n * g
        u = g / np.linalg.norm(g)
        hessian_u = (block_gradient(theta + h * u, lo, hi) - block_gradient(theta - h * u, lo, hi)) / (2 * h)
        penalty_gradient += weight / len(blocks) * 2 * np.linalg.norm(g) * hessian_u
    # The penalty must matter, or a wrong one would pass.
    assert np.linalg.norm(penalty_gradient) > 0.2 * np.linalg.norm(loss_gradient)
    assert_float32_close(update, loss_gradient + penalty_gradient)


def test_lazy_rate_search_runs_gd_only_where_it_can_change_the_choice(monkeypatch):
    table = {  # lr -> (small batch train, val; GD train)
        1e-4: (0.90, 0.34, 1.0), 3e-4: (1.0, 0.36, 0.95), 1e-3: (1.0, 0.35, 1.0), 3e-3: (1.0, 0.33, 1.0),
    }
    requested = []

    def fake_run_all(args, runs, phase):
        records = []
        for run in runs:
            lr, gd = run.lr, run.batch_size == 0
            requested.append((lr, gd))
            train, val, gd_train = table[lr]
            records.append({"lr": lr, "arm": "gd" if gd else "sgd32", "train_acc": gd_train if gd else train,
                            "val_acc": val})
        return records

    monkeypatch.setattr(temperature, "run_all", fake_run_all)
    args = temperature.parse_args(["--optimizer", "adam", "--rates", *map(str, table), "--lazy-gd"])
    # Best small-batch validation where it fits: 3e-4, but GD does not fit there; next 1e-3.
    assert temperature.search_rate(args) == 1e-3
    assert [r for r in requested if r[1]] == [(3e-4, True), (1e-3, True)]
    assert temperature.small_batch(args, 1e-3, 0) == gd_vs_sgd.Config(optimizer="adam", lr=1e-3, batch_size=32)
    assert args.results == temperature.ADAM_RESULTS
    sgd = temperature.parse_args(["--steps", "4", "--extra", "--ggn-size", "0", "--eval-every", "2"])  # --extra last
    assert temperature.full_batch(sgd, 0.1, 2, "gaussian", 0.5) == gd_vs_sgd.Config(
        lr=0.1, seed=2, steps=4, eval_every=2, ggn_size=0, noise="gaussian", stddev_factor=0.5)


@pytest.mark.slow
def test_penalty_arm_runs_end_to_end_on_real_cifar10(tmp_path):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    out = tmp_path / "arm.json"
    gd_vs_sgd.main([  # in this process, as above
        "--train-size", "100", "--val-size", "100", "--test-size", "200", "--optimizer", "adam", "--lr", "0.01",
        "--steps", "2", "--eval-every", "2", "--penalty-factor", "4", "--ggn-size", "0", "--out", str(out),
    ])
    result = json.loads(out.read_text())
    assert result["arm"] == "gd+penalty x4" and result["optimizer"] == "adam" and result["batch_size"] == 100
    assert result["penalty_weight"] == pytest.approx(0.01) and result["penalty_block_size"] == 32
    assert math.isfinite(result["train_loss"]) and result["steps"] == 2


def test_larger_penalty_is_chosen_on_validation():
    def run(factor, val):
        return {"lr": 0.1, "penalty_weight": factor * 0.1 / 4, "val_acc": val}

    assert temperature.choose_penalty_factor([run(1, 0.40), run(4, 0.35), run(16, 0.37)]) == 16
    assert temperature.choose_penalty_factor([run(1, 0.40), run(4, 0.37), run(16, 0.37)]) == 4  # tie: smaller
    assert temperature.choose_penalty_factor([run(1, 0.40)]) is None
