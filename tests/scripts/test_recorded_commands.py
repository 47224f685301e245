"""Every recorded run of the CIFAR and Multi30k trainers still means what it meant.

Each row of the results files below carries the command that ran it. Its
flags must parse into the trainer's ``Config``; that Config's command line
(``argv_of``) must parse back to the same Config; and the Config must hold
the values the row recorded as its configuration (so no flag changed its
spelling or its meaning). And the sweeps' commands that experiments/README.md
gives for these files, run on copies of them, find every run recorded. No
training runs here.
"""

import shlex
import shutil
from pathlib import Path

import pytest

from examples import cifar_train, mixing, multi30k_transformer
from examples.config import argv_of, config_from_argv, values_of
from experiments import capped_rate, runner, sweep
from tests.scripts.test_experiments_readme import readme_table

pytestmark = pytest.mark.backends("tensorflow")

RESULTS = Path(__file__).resolve().parents[2] / "experiments" / "results"

#: Results file -> the trainer whose commands it records.
TRAINERS = {
    "cifar10_resnet8_gap.jsonl": cifar_train,
    "cifar10_resnet8_capped_rate.jsonl": cifar_train,
    "multi30k_transformer.jsonl": multi30k_transformer,
}


def _rows(name):
    import json

    lines = (RESULTS / name).read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


def trainer_argv(command):
    """The trainer's flags of a recorded command: ``python examples/x.py ...`` or ``python -m examples.x ...``."""
    words = shlex.split(command)
    assert words[0] == "python", command
    start = 3 if words[1] == "-m" else 2
    return words[start:]


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_recorded_commands_parse_into_configs_that_round_trip(name):
    trainer = TRAINERS[name]
    rows = _rows(name)
    assert rows, name
    for row in rows:
        config = config_from_argv(trainer.Config, trainer_argv(row["command"]))
        assert config_from_argv(trainer.Config, argv_of(config)) == config, row["command"]
        # The row's recorded configuration: what each flag meant when it ran.
        values = values_of(config, affects_result_only=True)
        values["stddev"] = mixing.mixing_stddev(config)
        recorded = {k: v for k, v in row["config"].items() if k in values}
        assert recorded, row["command"]
        assert {k: values[k] for k in recorded} == recorded, row["command"]


def _no_runs(*args, **kwargs):
    raise AssertionError(f"the command would start a run: {args[0]}")


@pytest.mark.parametrize("name", sorted(TRAINERS))
def test_the_readme_commands_find_every_recorded_run(name, tmp_path, monkeypatch):
    monkeypatch.setattr(runner.subprocess, "run", _no_runs)
    copy = tmp_path / name
    shutil.copy(RESULTS / name, copy)
    commands = readme_table()[name]
    assert commands, name
    for command in commands:
        module, *argv = shlex.split(command)[2:]
        main = {"experiments.sweep": sweep.main, "experiments.capped_rate": capped_rate.main}[module]
        main(argv + ["--results", str(copy)])
    assert copy.read_text() == (RESULTS / name).read_text()  # nothing appended


def test_recorded_results_name_no_machine_paths():
    """Results files are read on other machines: paths in them are relative to the repository."""
    repo = Path(__file__).resolve().parents[2]
    for folder in ("experiments/results", "benchmarks/results"):
        for path in sorted((repo / folder).iterdir()):
            if path.suffix in (".json", ".jsonl"):
                text = path.read_text()
                for prefix in ("/tmp/", "/work/", "/root/", "/home/"):
                    assert prefix not in text, f"{path.name} records a path under {prefix}"
