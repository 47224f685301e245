"""experiments/stats.py against values computed by hand."""

import json
import math

import pytest

from experiments import stats

pytestmark = pytest.mark.backend_independent  # the scripts' logic, the same on every backend


def test_load_keeps_file_order_and_lets_a_later_line_of_a_key_replace_an_earlier_one(tmp_path):
    path = tmp_path / "runs.jsonl"
    lines = [{"key": "a", "v": 1}, {"key": "b", "v": 2}, {"key": "a", "v": 3}]
    path.write_text("\n".join(json.dumps(r) for r in lines[:2]) + "\n\n" + json.dumps(lines[2]) + "\n")
    assert stats.load(path) == [{"key": "a", "v": 3}, {"key": "b", "v": 2}]
    assert stats.load(path, key=None) == lines


def test_mean_std_is_the_sample_std_of_the_finite_values():
    mean, std, n = stats.mean_std([1.0, 2.0, None, 3.0, float("nan"), 4.0])
    # mean 2.5; squared deviations 2.25 + 0.25 + 0.25 + 2.25 = 5, over n - 1 = 3.
    assert (mean, n) == (2.5, 4) and std == pytest.approx(math.sqrt(5 / 3), rel=1e-15)
    assert stats.mean_std([7.0]) == (7.0, 0.0, 1)
    mean, std, n = stats.mean_std([None, float("inf")])
    assert n == 0 and math.isnan(mean) and math.isnan(std)


def test_format_mean_std():
    # 34.1 and 31.7 points: mean 32.9, std 2.4 / sqrt(2) = 1.697.
    assert stats.format_mean_std([0.341, 0.317], 100) == "32.9 ± 1.7"
    # +5 and +9 points: +7.0 ± 2.83.
    assert stats.format_mean_std([0.05, 0.09], 100, signed=True) == "+7.0 ± 2.8"
    assert stats.format_mean_std([-0.05, -0.09], 100, signed=True) == "-7.0 ± 2.8"
    assert stats.format_mean_std([5.8577], 1, 3) == "5.858"
    assert stats.format_mean_std([None]) == "–"


def _runs():
    """Three seeds; seed 2 has no gap (small == GD); the mixed arm lacks seed 3, which the others have."""
    table = {  # seed: (small, gd, mixed)
        0: (0.40, 0.30, 0.35),
        1: (0.44, 0.32, 0.41),
        2: (0.36, 0.36, 0.37),
        3: (0.50, 0.40, None),
    }
    runs = {}
    for seed, accs in table.items():
        for arm, acc in zip(("sgd32", "gd", "gd+gaussian"), accs):
            if acc is not None:
                runs[(arm, seed)] = {"arm": arm, "seed": seed, "test_acc": acc}
    return runs


def test_paired_differences_pair_seeds():
    diff = stats.paired_differences(_runs(), "gd+gaussian", "gd")
    assert list(diff) == [0, 1, 2]
    assert diff[0] == pytest.approx(0.05, abs=1e-15) and diff[1] == pytest.approx(0.09, abs=1e-15)
    assert diff[2] == pytest.approx(0.01, abs=1e-15)
    assert stats.paired_differences(_runs(), "sgd32", "gd")[3] == pytest.approx(0.10, abs=1e-15)
    assert list(stats.paired_differences(_runs(), "sgd32", "gd+gaussian")) == [0, 1, 2]  # no seed 3 to pair


def test_gap_recovered_per_seed_skips_seeds_without_a_gap_or_without_the_arm():
    shares = stats.gap_recovered(_runs(), "gd+gaussian", "gd", "sgd32")
    # (0.35 - 0.30) / (0.40 - 0.30) = 0.5; (0.41 - 0.32) / (0.44 - 0.32) = 0.75.
    assert list(shares) == [0, 1]
    assert shares[0] == pytest.approx(0.5, rel=1e-12) and shares[1] == pytest.approx(0.75, rel=1e-12)
    assert stats.gap_recovered(_runs(), "gd", "gd", "sgd32") == {0: 0.0, 1: 0.0, 3: 0.0}
    assert list(stats.gap_recovered(_runs(), "sgd32", "gd", "gd+gaussian")) == [0, 1, 2]  # high lacks seed 3


def test_by_arm_seed_selects_the_rate_and_the_later_run():
    records = [
        {"arm": "gd", "seed": 0, "lr": 0.1, "test_acc": 0.1},
        {"arm": "gd", "seed": 0, "lr": 0.2, "test_acc": 0.2},
        {"arm": "gd", "seed": 0, "lr": 0.1 + 1e-12, "test_acc": 0.3},
    ]
    assert stats.by_arm_seed(records, 0.1) == {("gd", 0): records[2]}
    assert stats.by_arm_seed(records)[("gd", 0)] is records[2]
    assert stats.seeds(_runs()) == [0, 1, 2, 3] and stats.seeds(_runs(), "gd+gaussian") == [0, 1, 2]
    assert stats.arms(_runs()) == ["sgd32", "gd", "gd+gaussian"]


def test_quantile_and_paired_ratios():
    # Sorted 1, 2, 4, 8: q = 0.25 sits at position 0.75 (between 1 and 2), q = 0.5 at 1.5 (between 2 and 4).
    assert stats.quantile([8.0, 1.0, 4.0, 2.0], 0.25) == 1.75
    assert stats.quantile([8.0, 1.0, 4.0, 2.0], 0.5) == 3.0
    assert stats.quantile([8.0, 1.0, 4.0, 2.0, None], 1.0) == 8.0
    assert stats.quantile([3.0], 0.75) == 3.0
    with pytest.raises(ValueError, match="q must be in"):
        stats.quantile([1.0], 1.5)
    assert stats.paired_ratios([300.0, 500.0], [100.0, 200.0]) == [3.0, 2.5]
    with pytest.raises(ValueError, match="2 and 1 rounds"):
        stats.paired_ratios([1.0, 2.0], [1.0])


def test_a_run_diverged_when_its_loss_is_not_finite_or_ends_above_chance():
    assert not stats.diverged({"train_loss": 1e-9}) and not stats.diverged({"arm": "gd"})
    assert not stats.diverged({"train_loss": 2.30})  # log 10 = 2.3026: the uniform prediction
    for loss in (float("nan"), float("inf"), 2.31, 5.3e12):
        assert stats.diverged({"train_loss": loss}), loss
    assert not stats.diverged({"train_loss": 5.0}, chance_loss=math.log(1000))
    runs = {("gd", 0): {"train_loss": 0.1}, ("gd", 1): {"train_loss": 5.3e12}}
    assert list(stats.converged(runs)) == [("gd", 0)] and stats.diverged_seeds(runs, "gd") == [1]
