"""experiments/trust_ratio_noise.py: the update after the trust ratio, and its noise-to-signal ratio."""

import json
import math

import numpy as np
import pytest

from examples import cifar10
from experiments import trust_ratio_noise as tr

import real_data

pytestmark = pytest.mark.backends("tensorflow")


def test_the_trust_ratio_sets_each_adapted_layers_length():
    rng = np.random.default_rng(0)
    w, g, bias = rng.normal(size=(3, 4)), rng.normal(size=12), rng.normal(size=4)
    lars = tr.layer_update("lars", g, w, trust_coefficient=0.01)
    np.testing.assert_allclose(lars, 0.01 * np.linalg.norm(w) * g / np.linalg.norm(g), rtol=1e-15)
    np.testing.assert_array_equal(tr.layer_update("lars", bias, bias), bias)  # 1-D: excluded, plain gradient
    np.testing.assert_array_equal(tr.layer_update("lars", g, np.zeros((3, 4))), g)  # ||w|| = 0: ratio 1
    v = g ** 2 + 1.0
    r = g / (np.sqrt(v) + tr.LAMB_EPSILON)
    np.testing.assert_allclose(tr.layer_update("lamb", g, w, v), np.linalg.norm(w) * r / np.linalg.norm(r), rtol=1e-15)
    np.testing.assert_array_equal(tr.layer_update("lamb", bias, bias, np.ones(4)), bias / (1 + tr.LAMB_EPSILON))


@pytest.mark.parametrize("optimizer", ["lars", "lamb"])
def test_noise_in_the_length_alone_is_normalised_away(optimizer):
    """Every example the same gradient: mixing scales it by mean(w), which the trust ratio removes."""
    rng = np.random.default_rng(1)
    n, stddev = 64, math.sqrt(3)
    weights = [rng.normal(size=(2, 3)), rng.normal(size=(5,))]
    grads = np.tile(rng.normal(size=11), (n, 1))
    draws = np.random.default_rng(2).normal(1.0, stddev, size=(8, n))

    def mixing_weights(kind, k):
        return draws[k]

    arms = ["sgd16", "gd", "gd+gaussian", "gd+isotropic"]
    results = tr.measure(optimizer, grads, weights, arms, 8, rng, mixing_weights, stddev)
    kernel, bias = results["gd+gaussian"]
    assert kernel["nsr_raw_expected"] == pytest.approx(stddev ** 2 / n, rel=1e-12)  # Var(mean w) / (mean w)^2
    # The isotropic control: the whole gradient's noise, the kernel's share (6 of 11 parameters) of it.
    g = grads[0]
    assert results["gd+isotropic"][0]["nsr_raw_expected"] == pytest.approx(
        stddev ** 2 / n * np.sum(g ** 2) * 6 / 11 / np.sum(g[:6] ** 2), rel=1e-12)
    assert kernel["nsr_raw"] == pytest.approx(np.var(draws.mean(1)) / np.mean(draws.mean(1)) ** 2, rel=1e-9)
    assert kernel["nsr"] < 1e-25 and kernel["mean_step"] == pytest.approx(1, abs=1e-12)
    assert kernel["cos_gd"] == pytest.approx(1, abs=1e-12)
    # The bias is excluded from the trust ratio: the length noise passes on (LAMB's r is linear in g at a fixed v).
    assert bias["nsr"] == pytest.approx(bias["nsr_raw"], rel=1e-9)
    for arm in ("sgd16", "gd"):  # no noise at all: every example the same
        assert all(max(row["nsr_raw"], row["nsr_raw_expected"], row["nsr"]) < 1e-25 for row in results[arm])
    # The isotropic control puts the mixing noise's norm into a random direction: it survives the trust ratio.
    assert results["gd+isotropic"][0]["nsr"] > 1e-3


def test_top_share_is_the_largest_examples_share_of_the_squared_norms():
    grads = np.array([[3.0, 4.0]] + [[1.0, 0.0]] * 99)  # squared norms 25 and 99 ones
    assert tr.top_share(grads) == pytest.approx(25 / 124, rel=1e-15)
    assert tr.top_share(grads, fraction=0.02) == pytest.approx(26 / 124, rel=1e-15)


def test_small_batch_draws_are_means_of_distinct_examples():
    grads = np.arange(8.0)[:, None] * np.ones((1, 2))
    draws = tr.draws_of("sgd4", grads, 50, np.random.default_rng(3), None)
    sums = draws[:, 0] * 4
    assert np.all(sums >= 0 + 1 + 2 + 3) and np.all(sums <= 4 + 5 + 6 + 7)  # 4 distinct of 0..7
    np.testing.assert_array_equal(tr.draws_of("sgd8", grads, 2, np.random.default_rng(3), None),
                                  np.full((2, 2), 3.5))


@pytest.mark.slow
def test_it_runs_end_to_end_on_real_cifar10(tmp_path):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    out = tmp_path / "nsr.json"
    result = tr.main(["--optimizer", "lars", "--lr", "0.01", "--train-size", "64", "--batch-size", "16",
                      "--draws", "4", "--train-steps", "1", "--chunk", "32", "--out", str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert list(result["results"]) == ["sgd16", "gd", "gd+gaussian", "gd+bernoulli", "gd+isotropic"]
    assert len(result["layers"]) == 6 and result["stddev"] == pytest.approx(math.sqrt(64 / 16 - 1))
    assert all(row["nsr"] == 0 and row["mean_step"] == pytest.approx(1) for row in result["results"]["gd"])
    assert all(math.isfinite(row["nsr"]) and row["nsr"] > 0 for row in result["results"]["gd+gaussian"])


def test_expected_noise_is_the_mean_of_the_draws():
    """Per-example gradients of different sizes: the draws' mean squared noise tends to the expectation."""
    rng = np.random.default_rng(4)
    grads = rng.normal(size=(40, 3)) * rng.uniform(0.1, 3.0, size=(40, 1)) + 0.5
    stddev = math.sqrt(40 / 8 - 1)
    draws = rng.normal(1.0, stddev, size=(8000, 40))
    for arm in ("sgd8", "gd+gaussian"):
        g = tr.draws_of(arm, grads, 8000, rng, lambda kind, k: draws[k])
        measured = np.mean(np.sum((g - grads.mean(0)) ** 2, 1))
        # 8,000 draws: the mean squared norm has a relative spread of about 1% here; 8% is 8 of them.
        assert measured == pytest.approx(tr.expected_noise(arm, grads, stddev), rel=0.08), arm


def test_the_matched_factor_is_nearest_the_small_batch_over_the_kernels():
    def rows(*nsrs):
        return [{"nsr": v} for v in nsrs]

    results = {"sgd32": rows(3.0, 100.0, 4.0, 5.0), "gd+gaussian x0.5": rows(2.0, 1.0, 3.0, 3.0),
               "gd+gaussian x1": rows(12.0, 1.0, 11.0, 13.0)}
    # Kernels 0, 2, 3 (layer 1, a bias, is left out): x0.5 misses by a factor 1.33 to 1.67, x1 by 2.6 to 4.
    assert tr.matched_factor(results, "sgd32", [0.5, 1.0], [0, 2, 3]) == 0.5
    assert tr.arm_stddev("gd+gaussian x0.5", 5.0) == 2.5 and tr.arm_stddev("gd+gaussian", 5.0) == 5.0


@pytest.mark.slow
def test_the_matched_phase_measures_then_runs_the_arm_on_every_seed(tmp_path, capsys):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    from experiments import runner, temperature

    results = tmp_path / "lars.jsonl"
    try:  # the measurement and the arm's run in one worker process (one TensorFlow import)
        temperature.main(["--optimizer", "lars", "--phase", "matched", "--lr", "0.01", "--train-size", "64",
                          "--batch-size", "16", "--steps", "2", "--seeds", "0", "--match-steps", "1",
                          "--match-factors", "0.5", "1", "--results", str(results), "--reuse-processes",
                          "--extra", "--val-size", "50", "--test-size", "100", "--eval-every", "2", "--ggn-size", "0"])
    finally:
        runner.close_workers()
    stddev = float(capsys.readouterr().out.split("matched stddev: ")[1].split()[0])
    assert stddev in (float(f"{0.5 * math.sqrt(3):.3g}"), float(f"{math.sqrt(3):.3g}"))
    (row,) = runner.read_rows(results)
    assert row["arm"] == f"gd+gaussian s={stddev:g}" and row["phase"] == "matched" and row["momentum"] == 0.9
    assert row["stddev"] == pytest.approx(stddev)
