"""benchmarks/accelerator.py: the one command for a GPU or TPU, run here on a CPU with ``--quick``.

The machines it is meant for have JAX (or PyTorch) and no TensorFlow, so the
end-to-end run blocks TensorFlow's import (a ``tensorflow`` package that
raises ImportError, first on PYTHONPATH, also in the memory probes' processes).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from benchmarks import accelerator
from examples import cifar10

import real_data

pytestmark = pytest.mark.backends("jax")

REPO = Path(__file__).resolve().parents[2]


def test_augment_crops_and_flips_each_image_and_keeps_the_order():
    rng = np.random.default_rng(0)
    x = rng.integers(1, 256, (64, 32, 32, 3), dtype=np.uint8)  # no zeros: padding is recognisable
    out = accelerator.augment(x, np.random.default_rng(1))
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)))
    flipped = 0
    for image, source in zip(out, padded):
        crops = [(source[dy:dy + 32, dx:dx + 32], flip) for dy in range(9) for dx in range(9)
                 for flip in (False, True)]
        matches = [flip for crop, flip in crops if np.array_equal(image, crop[:, ::-1] if flip else crop)]
        assert matches, "an output image is no crop (or flipped crop) of its own input"
        flipped += matches[0]
    assert 10 < flipped < 54  # about half of 64 flipped
    assert not np.array_equal(out, accelerator.augment(x, np.random.default_rng(2)))


def test_merge_takes_each_part_from_the_last_run_that_has_it():
    first = {"device": "d", "backend": "jax", "overhead": {"a": 1}, "cifar_large_batch": {"epochs": 1},
             "skipped": {"weights_and_accumulation": "stopped"}}
    second = {"device": "d", "backend": "jax", "weights_and_accumulation": {"b": 2},
              "cifar_large_batch": {"epochs": 49}, "skipped": {"overhead": "not in --parts"}}
    merged = accelerator.merge([first, second])
    assert merged["overhead"] == {"a": 1}
    assert merged["weights_and_accumulation"] == {"b": 2}
    assert merged["cifar_large_batch"] == {"epochs": 49}
    assert merged["skipped"] == {}
    assert [run["skipped"] for run in merged["runs"]] == [first["skipped"], second["skipped"]]


def test_bad_arguments_are_refused_by_name(capsys):
    for argv, words in ((["--parts", "overhead,speed"], "--parts: unknown part(s) ['speed']"),
                        (["--budget-minutes", "0"], "--budget-minutes must be positive, got 0.0"),
                        (["--cifar-batch", "0"], "--cifar-batch must be at least 1, got 0")):
        with pytest.raises(SystemExit):
            accelerator.main(argv + ["--quick"])
        assert words in capsys.readouterr().err


def test_a_spent_budget_stops_every_part_cleanly_and_still_writes_the_results(tmp_path):
    results = accelerator.main(["--quick", "--budget-minutes", "0.005", "--out", str(tmp_path),
                                "--parts", "overhead,weights_and_accumulation"])
    written = json.loads((tmp_path / accelerator.RESULTS_NAME).read_text())
    assert written["skipped"] == results["skipped"]
    assert set(written["skipped"]) == {"overhead", "weights_and_accumulation", "cifar_large_batch"}
    assert "budget ran out" in written["skipped"]["weights_and_accumulation"]
    assert written["skipped"]["cifar_large_batch"] == "not in --parts"
    assert "configs" not in json.dumps(written.get("overhead", {}))  # nothing half-measured is reported


@pytest.mark.slow
def test_quick_run_on_jax_without_tensorflow_writes_every_part_and_the_figure(tmp_path):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    blocker = tmp_path / "blocked" / "tensorflow"
    blocker.mkdir(parents=True)
    (blocker / "__init__.py").write_text('raise ImportError("TensorFlow is not installed here")\n')
    env = dict(os.environ, KERAS_BACKEND="jax",
               PYTHONPATH=os.pathsep.join([str(blocker.parent), str(REPO)]),
               JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax-cache"))
    env.pop("XLA_FLAGS", None)
    out = tmp_path / "out"
    # The budget is a cap: generous, so that a loaded machine cannot cut a part short.
    result = subprocess.run([sys.executable, "-m", "benchmarks.accelerator", "--quick", "--budget-minutes", "30",
                             "--out", str(out), "--cache-dir", str(tmp_path / "cifar-cache")],
                            capture_output=True, text=True, timeout=1800, env=env, cwd=REPO)
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads((out / accelerator.RESULTS_NAME).read_text())
    assert (out / accelerator.FIGURE_NAME).stat().st_size > 10_000
    assert results["backend"] == "jax" and results["platform"] == "cpu" and results["skipped"] == {}
    # Decoded with Pillow: TensorFlow was not importable.
    assert [p.name.endswith("-pillow.npz") for p in (tmp_path / "cifar-cache").glob("*.npz")] == [True]

    for precision in accelerator.PRECISIONS:
        entry = results["overhead"]["precisions"][precision]
        assert set(entry["configs"]) == set(accelerator.OVERHEAD_CONFIGS)
        for stats in entry["configs"].values():
            assert stats["median_step_ms"] > 0 and stats["rounds"] >= 2
            assert stats["paired_ratio_iqr"][0] <= stats["median_paired_ratio"] <= stats["paired_ratio_iqr"][1]
        assert entry["configs"]["plain"]["ratio_of_medians"] == 1.0
        assert entry["peak_memory"]["plain"]["peak_bytes"] > 0
        assert entry["peak_memory"]["sample"]["peak_bytes"] > 0

    draws = results["weights_and_accumulation"]["draw_weights"]
    assert draws["batch"] == 32768 and set(draws["by_noise"]) == {"gaussian", "rademacher", "bernoulli"}
    accumulation = results["weights_and_accumulation"]["accumulation"]
    assert set(accumulation["configs"]) == {"keras_accumulating", "gradientmix_accumulating",
                                            "gradientmix_whole_step"}

    cifar = results["cifar_large_batch"]
    assert cifar["arms"]["gaussian_rule"] == pytest.approx(np.sqrt(64 / 16 - 1))
    assert cifar["epochs_completed"] == cifar["epochs"] >= 1
    for history in cifar["history"].values():
        assert [h["epoch"] for h in history] == list(range(1, cifar["epochs"] + 1))
        assert all(0.0 <= h["test_accuracy"] <= 1.0 and np.isfinite(h["train_loss"]) for h in history)
