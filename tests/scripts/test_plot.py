"""experiments/plot.py groups rows of every recorded format by the run's config."""

import dataclasses
import json
import shlex

import pytest

from examples.config import argv_of
from experiments import plot, runner
from experiments.stats import load as load_lines

pytestmark = pytest.mark.backend_independent  # the scripts' logic, the same on every backend

RECORDED = plot.DEFAULT  # results/cifar10_resnet8_gap.jsonl: rows written by sweep.py before the runner


def _runner_row(old, config, **result):
    """The row the runner writes for ``config``, with ``old``'s result fields."""
    row = {k: v for k, v in old.items() if k not in runner.RUNNER_FIELDS}
    row.update(result, seed=config.seed)
    row.update(trainer="examples.cifar_train", config=runner.result_values(config),
               key=runner.key_of("examples.cifar_train", config),
               command=shlex.join(["python", "-m", "examples.cifar_train", *argv_of(config)]))
    return row


def test_an_old_and_a_new_row_of_one_setup_land_in_one_table(tmp_path):
    old = load_lines(RECORDED)[0]
    assert "trainer" not in old and old["command"].startswith("python examples/cifar_resnet18.py ")
    trainer, config = runner.config_of_row(old)
    other_seed = _runner_row(old, dataclasses.replace(config, seed=7), test_acc=0.5)
    same_run = _runner_row(old, config, test_acc=0.25)  # recorded again: replaces the old row
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in (old, other_seed)))
    records = plot.load(path)
    assert len(plot.by_setup(records)) == 1
    (group, runs), = plot.groups(records).items()
    assert group == ("nesterov", 64, "none", 0.0) and [r["seed"] for r in runs] == [0, 7]
    # sweep.py's old config dict lacked fields the runner's rows have (schedule, quick, ...): same setup anyway.
    assert set(old["config"]) - {"role"} < set(records[0]["config"])
    path.write_text("".join(json.dumps(r) + "\n" for r in (old, other_seed, same_run)))
    records = plot.load(path)
    assert [(r["seed"], r["test_acc"]) for r in records] == [(0, 0.25), (7, 0.5)]
    assert "| nesterov | 64 | 1280 | none | 0 |  | 0,7 |" in plot.table(records)
