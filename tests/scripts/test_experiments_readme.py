"""experiments/README.md's command for every results file: named, rerunning nothing, and running on quick settings.

The table below is the test's copy of the README's table *Reproducing every
results file*: one entry per command, with the quick settings that make it
run in seconds (a tiny training subset, a few steps, a temporary results
file; real CIFAR-10 through ``$TF_GRADMIX_DATA``, which tests/conftest.py
sets). An entry without quick settings is not run; every file has one that is.
"""

import contextlib
import dataclasses
import importlib
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Optional

import pytest

from examples import cifar10
from experiments import runner, temperature

import real_data

pytestmark = pytest.mark.backend_independent  # the scripts' logic, the same on every backend

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"
README = REPO / "experiments" / "README.md"

#: The sweep.py commands behind cifar10_resnet8_gap.jsonl and multi30k_transformer.jsonl, in the order they ran.
SWEEP_COMMANDS = [
    "python -m experiments.sweep --phase all --jobs 2 --threads 1",
    "python -m experiments.sweep --phase seeds --seeds 0 1 --jobs 2 --threads 1",
    "python -m experiments.sweep --phase seeds --seeds 0 2 --jobs 2 --threads 1",
    "python -m experiments.sweep --phase gap --small-batch 1024 --large-batch 2048 --jobs 2 --threads 1",
    "python -m experiments.sweep --phase gap --small-batch 128 --large-batch 256 --jobs 2 --threads 1",
    "python -m experiments.sweep --phase gap --small-batch 128 --large-batch 1024 --epochs 80 --seeds 0 --jobs 2 "
    "--threads 1",
    "python -m experiments.sweep --phase select --jobs 2 --threads 1",
    "python -m experiments.sweep --phase seeds --seeds 0 1 2 --jobs 2 --threads 1",
    "python -m experiments.sweep --optimizer lamb --phase gap --seeds 0 --jobs 2 --threads 1",
    "python -m experiments.sweep --optimizer lamb --phase lr --base-lrs 0.01 0.03 --jobs 2 --threads 1",
    "python -m experiments.sweep --optimizer lamb --base-lr 0.03 --phase gap --seeds 0 --jobs 2 --threads 1",
    "python -m experiments.sweep --optimizer lamb --base-lr 0.03 --phase select --jobs 2 --threads 1",
    "python -m experiments.sweep --optimizer lamb --base-lr 0.03 --phase seeds --seeds 0 1 --jobs 2 --threads 1",
    "python -m experiments.sweep --phase curve --curve-batches 64 256 1024 --seeds 0 --noises gaussian --jobs 2 "
    "--threads 1",
]
MULTI30K_COMMANDS = [
    "python -m experiments.sweep --task multi30k --phase gap --seeds 0 --jobs 2 --threads 1",
    "python -m experiments.sweep --task multi30k --phase select --stddevs 1.0 --no-noise-equivalent --jobs 2 "
    "--threads 1",
]

#: The LAMB and LARS sweeps (experiments/lars_lamb_sweep.sh): rate, gap and noise arms, then the matched arm.
LAYERWISE_RATES = {"lamb": "1e-4 3e-4 1e-3 3e-3", "lars": "0.3 0.5 0.7 1 1.5 2 3 10"}
LAYERWISE_FLAGS = "--lazy-gd --noises gaussian bernoulli isotropic --seed-major --threads 1 --parallel 1"
LAYERWISE_COMMANDS = {name: f"python -m experiments.temperature --optimizer {name} --rates {rates} {LAYERWISE_FLAGS}"
                      for name, rates in LAYERWISE_RATES.items()}
LAYERWISE_MATCHED = {name: f"python -m experiments.temperature --optimizer {name} --rates {rates} --phase matched "
                           f"{LAYERWISE_FLAGS}" for name, rates in LAYERWISE_RATES.items()}
#: Their chosen rates (validation).
LAYERWISE_CHOSEN = {"lamb": "0.003", "lars": "0.7"}

#: cifar_train on a tiny subset and ResNet, for every run of a sweep.py command; every evaluated split as large as
#: the training subset (one batch shape for the test step); no log Tr(G) (seconds of tracing per run, the
#: trainer's own code, which tests/scripts/test_paper_examples.py's quick run runs).
TINY_CIFAR = ("--train-size 128 --val-size 128 --test-size 128 --epochs 1 --small-batch 16 --large-batch 32 "
              "--widths 4 8 8 --ggn-size 0")

#: Every sweep command runs its quick runs one after another in the runner's worker process (one Keras import
#: instead of one a run; the commands run in this process, so one worker serves them all), one run at a time;
#: tests/scripts/test_runner.py checks that a worker gives each run's row and that runs go side by side with
#: --parallel/--jobs 2.
REUSE = "--reuse-processes --parallel 1"
REUSE_JOBS = "--reuse-processes --jobs 1"  # sweep.py's name for --parallel

#: gd_vs_sgd on a tiny subset, for every run of a temperature.py command (b = 32: two blocks in the penalty's
#: double backprop, which its train step unrolls).
TINY_ARMS = "--train-size 64 --batch-size 32 --steps 4 --fit-threshold 0 --seeds 0"
#: Every evaluated split as large as the training subset: one batch shape for the test step.
TINY_EXTRA = "--extra --val-size 64 --test-size 64 --eval-every 2 --ggn-size 8"
#: multi30k_transformer's ``--quick`` model (its ``tiny`` size) instead of the sweep's 2+2-layer, d_model 128 one.
TINY_TRANSFORMER = "--layers 1 --d-model 32 --heads 2 --ff 64 --dropout 0"


@dataclasses.dataclass(frozen=True)
class Entry:
    """One command of the README's table."""

    files: tuple  # what it produces, names in experiments/results/
    command: Optional[str]  # as the README gives it (None: the README points to a list of commands)
    quick: Optional[str] = None  # flags appended for the quick run; {tmp} is a temporary folder shared by the entries
    outputs: tuple = ()  # (temporary file, JSONL rows expected there after this entry, or None for another file)


ENTRIES = [
    Entry(("cifar10_gd_vs_sgd.jsonl",), "python -m experiments.temperature --parallel 2 --threads 1",
          f"{REUSE} --rates 0.1 --noises gaussian {TINY_ARMS} --results {{tmp}}/sgd.jsonl {TINY_EXTRA}",
          (("sgd.jsonl", 3),)),  # rate phase: small batch + GD; gap: the same runs; arms: Gaussian
    Entry(("cifar10_gd_vs_sgd.jsonl",),
          "python -m experiments.temperature --phase penalty --lr 0.1 --parallel 2 --threads 1",
          f"{REUSE} --penalty-factors 4 {TINY_ARMS} --results {{tmp}}/sgd.jsonl {TINY_EXTRA}",
          (("sgd.jsonl", 5),)),  # + λ = lr/4 and 4 lr/4 on seed 0
    Entry(("cifar10_gd_vs_sgd_adam.jsonl",),
          "python -m experiments.temperature --optimizer adam --rates 1e-4 3e-4 1e-3 3e-3 --lazy-gd "
          "--noises gaussian bernoulli isotropic --seed-major --parallel 2 --threads 1",
          f"{REUSE} --rates 1e-3 --noises isotropic {TINY_ARMS} --results {{tmp}}/adam.jsonl {TINY_EXTRA}",
          (("adam.jsonl", 3),)),
    # LAMB and LARS: the code path of the Adam entry with another --optimizer, so on quick settings one run each
    # (the arms phase at a given rate, one noise, one seed); the matched phase measures before it runs (minutes).
    *(Entry((f"cifar10_gd_vs_sgd_{name}.jsonl",), LAYERWISE_COMMANDS[name],
            f"{REUSE} --phase arms --lr {lr} --noises gaussian {TINY_ARMS} --results {{tmp}}/{name}.jsonl {TINY_EXTRA}",
            ((f"{name}.jsonl", 1),)) for name, lr in (("lamb", "1e-3"), ("lars", "1"))),
    *(Entry((f"cifar10_gd_vs_sgd_{name}.jsonl",), LAYERWISE_MATCHED[name]) for name in LAYERWISE_MATCHED),
    Entry(("cifar10_gd_vs_sgd_test_accuracy.png",),
          "python -m experiments.temperature_report --lr 0.1 --figure "
          "experiments/results/cifar10_gd_vs_sgd_test_accuracy.png",
          "--results {tmp}/sgd.jsonl --figure {tmp}/sgd.png", (("sgd.png", None),)),
    Entry(("cifar10_gd_vs_sgd_penalty_step_time.json",),
          "python -m benchmarks.gradient_penalty --threads 1 --rounds 11 --steps 3 "
          "--out experiments/results/cifar10_gd_vs_sgd_penalty_step_time.json",
          "--rounds 1 --steps 1 --warmup-steps 1 --train-size 64 --out {tmp}/step_time.json",
          (("step_time.json", None),)),
    Entry(("cifar10_gd_vs_sgd_sgd_and_adam.png", "cifar10_gd_vs_sgd_lars_and_lamb.png"),
          "python -m experiments.temperature_report --write",
          "--results {tmp}/sgd.jsonl --adam-results {tmp}/adam.jsonl --adam-lr 1e-3 "
          "--step-time {tmp}/step_time.json --into {tmp}",  # LARS and LAMB: the recorded files
          (("cifar10_gd_vs_sgd_sgd_and_adam.png", None), ("cifar10_gd_vs_sgd_lars_and_lamb.png", None),
           ("README.md", None), ("experiments_README.md", None))),
    # sweep.py: the first command of each task on quick settings (every run --quick); the others are its
    # phases on the recorded rows (tests/scripts/test_recorded_commands.py: they rerun nothing).
    Entry(("cifar10_resnet8_gap.jsonl",), SWEEP_COMMANDS[0],
          f"{REUSE_JOBS} {TINY_CIFAR} --results {{tmp}}/gap.jsonl --run-dir {{tmp}}/runs",
          (("gap.jsonl", 2),)),  # the gap phase's two runs; one epoch fits nothing, so it stops there
    *(Entry(("cifar10_resnet8_gap.jsonl",), command) for command in SWEEP_COMMANDS[1:]),
    Entry(("multi30k_transformer.jsonl",), MULTI30K_COMMANDS[0],
          f"{REUSE_JOBS} --results {{tmp}}/multi30k.jsonl --run-dir {{tmp}}/runs --extra --quick {TINY_TRANSFORMER}",
          (("multi30k.jsonl", 2),)),
    *(Entry(("multi30k_transformer.jsonl",), command) for command in MULTI30K_COMMANDS[1:]),
    Entry(("cifar10_resnet8_gap_n2048_e40_accuracy_vs_batch.png", "cifar10_resnet8_gap_n2048_e40_large_batch.png"),
          "python -m experiments.plot experiments/results/cifar10_resnet8_gap.jsonl", "--out {tmp}",
          (("cifar10_resnet8_gap_n2048_e40_accuracy_vs_batch.png", None),
           ("cifar10_resnet8_gap_n2048_e40_large_batch.png", None))),
    Entry(("multi30k_transformer_n10000_e8_d128_accuracy_vs_batch.png",),
          "python -m experiments.plot experiments/results/multi30k_transformer.jsonl", "--out {tmp}",
          (("multi30k_transformer_n10000_e8_d128_accuracy_vs_batch.png", None),)),
    Entry(("cifar10_resnet8_capped_rate.jsonl",), "python -m experiments.capped_rate --parallel 2 --threads 1",
          f"{REUSE} --seeds 0 --epochs 1 --small-batch 16 --large-batch 64 --results {{tmp}}/capped.jsonl "
          "--extra --train-size 128 --val-size 128 --test-size 128 --widths 4 8 8 --ggn-size 0",
          (("capped.jsonl", 3),)),
]


#: The commands' modules that run in this process (``main(argv)``, standard output captured): their code is what
#: is tested, not a new interpreter's start. The benchmark sets TensorFlow's thread pools, which only a fresh
#: process can, so it runs as a subprocess.
IN_PROCESS = ("experiments.temperature", "experiments.sweep", "experiments.capped_rate",
              "experiments.temperature_report", "experiments.plot")


def run_command(words):
    """Runs ``python -m <module> <argv>`` (``words``) from the repository root; its standard output."""
    assert words[:2] == ["python", "-m"], words
    if words[2] not in IN_PROCESS:
        done = subprocess.run([sys.executable, *words[1:]], cwd=REPO, capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, (words, done.stdout[-2000:], done.stderr[-3000:])
        return done.stdout
    out = io.StringIO()
    with contextlib.chdir(REPO), contextlib.redirect_stdout(out):
        importlib.import_module(words[2]).main(words[3:])
    return out.getvalue()


def readme_table():
    """``{file name: [commands]}`` of the README's table (a file may have several rows)."""
    section = README.read_text().split("\n## Reproducing every results file\n", 1)[1].split("\n## ", 1)[0]
    table = {}
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0].startswith("`"):
            for name in cells[0].split("`")[1::2]:
                table.setdefault(name, []).append(cells[2].strip("`"))
    return table


def test_the_readme_gives_a_command_for_every_results_file():
    table = readme_table()
    on_disk = sorted(p.name for p in RESULTS.iterdir())
    assert sorted(table) == on_disk  # every file, and no file that is gone
    assert sorted({name for entry in ENTRIES for name in entry.files}) == on_disk
    for entry in ENTRIES:
        if entry.command is not None:
            for name in entry.files:
                assert entry.command in table[name], (name, entry.command)


def _no_runs(*args, **kwargs):
    raise AssertionError(f"the command would start a run: {args[0]}")


def test_the_regime_a_commands_rerun_nothing_that_is_recorded(tmp_path, monkeypatch, capsys):
    """The README's commands, on copies of the recorded files: the same rate is chosen and nothing runs."""
    monkeypatch.setattr(runner.subprocess, "run", _no_runs)
    sgd = tmp_path / "sgd.jsonl"
    shutil.copy(RESULTS / "cifar10_gd_vs_sgd.jsonl", sgd)
    temperature.main(shlex.split(ENTRIES[0].command)[3:] + ["--results", str(sgd)])  # rate, gap and arms
    assert "chosen rate (validation): 0.1\n" in capsys.readouterr().out
    adam = tmp_path / "adam.jsonl"
    shutil.copy(RESULTS / "cifar10_gd_vs_sgd_adam.jsonl", adam)
    temperature.main(shlex.split(ENTRIES[2].command)[3:] + ["--phase", "rate", "--results", str(adam)])
    assert "chosen rate (validation): 0.003\n" in capsys.readouterr().out
    assert sgd.read_text() == (RESULTS / "cifar10_gd_vs_sgd.jsonl").read_text()
    for name, command in LAYERWISE_COMMANDS.items():  # rate, gap and arms
        copy = tmp_path / f"{name}.jsonl"
        shutil.copy(RESULTS / f"cifar10_gd_vs_sgd_{name}.jsonl", copy)
        temperature.main(shlex.split(command)[3:] + ["--results", str(copy)])
        assert f"chosen rate (validation): {LAYERWISE_CHOSEN[name]}\n" in capsys.readouterr().out
        assert copy.read_text() == (RESULTS / f"cifar10_gd_vs_sgd_{name}.jsonl").read_text()


def test_a_command_finds_its_runs_done_without_importing_keras():
    """Started again, a command only reads its results file: no Keras or backend import (seconds of CPU each).

    The runner parses each recorded row through its trainer's module, so the trainers' module level stays light
    too. (experiments/capped_rate.py takes its rates from tf_gradmix's recipes, so it imports Keras.)
    """
    modules = ("experiments.temperature", "experiments.sweep", "experiments.temperature_report", "experiments.plot",
               "examples.gd_vs_sgd", "examples.cifar_train", "examples.multi30k_transformer")
    code = (f"import sys, {', '.join(modules)}; "
            "print(sorted({'keras', 'tensorflow', 'jax', 'torch'} & set(sys.modules)))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


@pytest.mark.slow
@pytest.mark.backends("tensorflow")  # minutes of training; the scripts and their rows do not change per backend
def test_every_command_runs_on_quick_settings(tmp_path):
    if cifar10.find_cifar10() is None:
        real_data.missing("CIFAR-10 JPEG")
    try:
        for entry in ENTRIES:
            if entry.quick is None:
                continue  # another command of its file runs (see the test below)
            words = shlex.split(entry.command) + shlex.split(entry.quick.format(tmp=tmp_path))
            run_command(words)
            for name, rows in entry.outputs:
                path = tmp_path / name
                assert path.stat().st_size > 0, (entry.command, name)
                if rows is None:
                    continue
                recorded = runner.read_rows(path)
                assert len(recorded) == len(runner.rows_by_key(path)) == rows, (entry.command, len(recorded))
                assert all(row["command"].startswith(f"python -m {row['trainer']} ") for row in recorded)
                # Started again, it finds every run done.
                lines = run_command(words).splitlines()
                assert not any(line.startswith("[") for line in lines), lines  # no run started
                assert len(runner.read_rows(path)) == rows
    finally:
        runner.close_workers()
    step_time = json.loads((tmp_path / "step_time.json").read_text())
    assert step_time["rounds"] == 1 and step_time["train_size"] == 64


def test_every_results_file_has_a_command_run_on_quick_settings():
    quick = {name for entry in ENTRIES if entry.quick is not None for name in entry.files}
    assert sorted({name for entry in ENTRIES for name in entry.files} - quick) == []


def test_the_lars_lamb_script_runs_the_commands_of_the_table():
    """experiments/lars_lamb_sweep.sh runs, for each optimizer, the rates and flags the README's commands give."""
    script = (REPO / "experiments" / "lars_lamb_sweep.sh").read_text()
    assert f"ARMS=({LAYERWISE_FLAGS})" in script
    for name, rates in LAYERWISE_RATES.items():
        assert f"{name.upper()}_RATES=({rates})" in script
        for command in (LAYERWISE_COMMANDS[name], LAYERWISE_MATCHED[name]):
            assert command in readme_table()[f"cifar10_gd_vs_sgd_{name}.jsonl"]
        phases = ("", "--phase matched ")
        assert [f'--optimizer {name} --rates "${{{name.upper()}_RATES[@]}}" {phase}"${{ARMS[@]}}"' in script
                for phase in phases] == [True, True]
