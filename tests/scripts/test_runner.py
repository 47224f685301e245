"""experiments/runner.py: keys, rows, resume after a kill, parallel runs; and the recorded results files."""

import dataclasses
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tf_gradmix
from examples import gd_vs_sgd
from examples.config import argv_of, config_from_argv
from experiments import runner, temperature
from tests.scripts import quadratic_trainer as quadratic

pytestmark = pytest.mark.backend_independent  # the scripts' logic, the same on every backend

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "experiments" / "results"
TRAINER = "tests.scripts.quadratic_trainer"


def quad(**kwargs):
    return runner.Run(TRAINER, quadratic.Config(**kwargs), {"phase": "test"})


def log_targets(log):
    return [json.loads(line)["target"] for line in Path(log).read_text().splitlines()] if Path(log).exists() else []


# -- keys ------------------------------------------------------------------------


def test_the_key_is_the_trainer_and_the_result_changing_fields_sorted():
    config = gd_vs_sgd.Config(batch_size=32, lr=0.1, threads=1, out="/tmp/x.json", data_dir="/d")
    key = runner.key_of("examples.gd_vs_sgd", config)
    assert key == (
        '{"config": {"batch_size": 32, "data_seed": 0, "eval_every": 200, "filters": [16, 32], "ggn_size": 512, '
        '"lr": 0.1, "momentum": 0.0, "noise": "none", "optimizer": "sgd", "penalty_factor": 0.0, '
        '"reference_batch_size": 32, "seed": 0, "stddev": null, "stddev_factor": 1.0, "steps": 2000, '
        '"test_size": null, "train_size": 1024, "trust_coefficient": 0.001, "val_size": 1000}, '
        '"trainer": "examples.gd_vs_sgd"}'
    )
    # Flag order, thread counts and paths do not change it; any result-changing field does.
    a = runner.key_of(*runner.config_of_command("python -m examples.gd_vs_sgd --lr 0.1 --batch-size 32"))
    b = runner.key_of(*runner.config_of_command(
        "python examples/gd_vs_sgd.py --batch-size 32 --threads 1 --lr 0.1 --out r.json --momentum 0"))
    assert a == b == key
    assert runner.key_of("examples.gd_vs_sgd", gd_vs_sgd.Config(batch_size=32, lr=0.1, seed=1)) != key
    assert runner.key_of("examples.other", config) != key


def test_recorded_commands_name_the_trainer_as_a_module_or_a_script_or_by_its_old_name():
    assert runner.parse_command("python -m examples.gd_vs_sgd --lr 0.1") == ("examples.gd_vs_sgd", ["--lr", "0.1"])
    assert runner.parse_command("python examples/gd_vs_sgd.py --lr 0.1") == ("examples.gd_vs_sgd", ["--lr", "0.1"])
    assert runner.parse_command("python examples/cifar_resnet18.py --epochs 2")[0] == "examples.cifar_train"
    with pytest.raises(ValueError, match="not a trainer command"):
        runner.parse_command("make test")
    with pytest.raises(ValueError, match="refuses the recorded command"):
        runner.config_of_command("python -m examples.gd_vs_sgd --lr -1")
    with pytest.raises(ValueError, match="the trainer examples.cifar10 has no Config"):
        runner.config_of_command("python -m examples.cifar10 --lr 1")


# -- rows and resume ---------------------------------------------------------------


def test_a_row_holds_the_result_labels_config_key_exact_command_timing_and_load(tmp_path):
    results = tmp_path / "r.jsonl"
    run = quad(target=2.0, steps=5)
    [row] = runner.run_all([run], results, threads=1, echo=lambda line: None)
    assert row == json.loads(results.read_text())  # one line, the row returned
    assert row["phase"] == "test" and row["trainer"] == TRAINER
    assert row["config"] == {"target": 2.0, "lr": 0.1, "steps": 5, "fail": False}  # no paths or threads
    assert row["key"] == runner.key_of(TRAINER, run.config) == runner.key_of_row(row)
    assert row["command"] == f"python -m {TRAINER} --target 2.0 --steps 5 --threads 1"
    assert row["threads_seen"] == 1  # the thread setting reached the trainer
    w = 0.0
    for _ in range(5):
        w -= 0.1 * 2 * (w - 2.0)
    assert row["w"] == w and row["loss"] == (w - 2.0) ** 2
    machine = row["machine"]
    assert machine["cpus"] == os.cpu_count() and machine["parallel_runs"] == 1 and machine["threads_per_run"] == 1
    assert len(machine["loadavg_before"]) == 3 and len(machine["loadavg_after"]) == 3
    assert 0 < row["elapsed_seconds"] < 600 and time.strptime(row["finished_utc"], "%Y-%m-%dT%H:%M:%SZ")
    assert row["tf_gradmix_version"] == tf_gradmix.__version__  # the package the trainer ran
    # The row reproduces its run: its command gives the same result, its config the same key.
    words = shlex.split(row["command"])
    again = subprocess.run([sys.executable, *words[1:]], cwd=REPO, capture_output=True, text=True, check=True)
    assert json.loads(again.stdout.splitlines()[-1]) == {k: row[k] for k in ("w", "loss", "threads_seen")}
    assert runner.config_of_row(row) == (TRAINER, quadratic.Config(target=2.0, steps=5))


def test_finished_runs_are_not_run_again_and_a_repeated_config_runs_once(tmp_path):
    results, log = tmp_path / "r.jsonl", str(tmp_path / "log")
    first = [quad(target=1.0, log=log), quad(target=2.0, log=log)]
    runner.run_all(first, results, echo=lambda line: None)
    lines = []
    # The same configs with other paths (not part of the key), a new one, and a repeat of it.
    again = [quad(target=2.0), quad(target=1.0, threads=4), quad(target=3.0, log=log), quad(target=3.0, log=log)]
    rows = runner.run_all(again, results, echo=lines.append)
    assert lines[0] == f"2 of 3 runs already in {results}; 1 to run"
    assert log_targets(log) == [1.0, 2.0, 3.0]
    assert [r["config"]["target"] for r in rows] == [2.0, 1.0, 3.0, 3.0]
    assert len(runner.read_rows(results)) == 3


def test_a_killed_sweep_continues_without_rerunning_its_finished_runs(tmp_path):
    results, log, gate = tmp_path / "r.jsonl", str(tmp_path / "log"), tmp_path / "gate"
    gate.touch()
    runs = [f"quadratic_trainer.Config(target={t}, log={log!r}{', gate=' + repr(str(gate)) if t == 2 else ''})"
            for t in (1, 2, 3)]
    sweep = (
        "from experiments import runner; from tests.scripts import quadratic_trainer\n"
        f"runner.run_all([runner.Run({TRAINER!r}, c) for c in [{', '.join(runs)}]], {str(results)!r})\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", sweep], cwd=REPO, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while log_targets(log) != [1, 2] and time.time() < deadline:  # run 1 done, run 2 held at the gate
            time.sleep(0.05)
        assert log_targets(log) == [1, 2] and len(runner.read_rows(results)) == 1
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the sweep and its run under way, as a Ctrl-C or kill would
        proc.wait()
    gate.unlink()
    config = dict(log=log)
    resumed = [quad(target=1, **config), quad(target=2, **config), quad(target=3, **config)]
    rows = runner.run_all(resumed, results, echo=lambda line: None)
    assert log_targets(log) == [1, 2, 2, 3]  # run 1 was not run again; the killed run 2 was
    assert [r["config"]["target"] for r in rows] == [1, 2, 3] and len(runner.read_rows(results)) == 3


def test_runs_go_in_parallel_and_a_failed_run_is_reported_after_the_others_finish(tmp_path):
    results, meet = tmp_path / "r.jsonl", tmp_path / "meet"
    meet.mkdir()
    # Each of the two waits until both have started: this finishes only if they run side by side.
    both = [quad(target=t, rendezvous=str(meet)) for t in (1.0, 2.0)]
    assert len(runner.run_all(both, results, parallel=2, echo=lambda line: None)) == 2
    lines = []
    with pytest.raises(RuntimeError, match=f"1 run\\(s\\) failed: python -m {TRAINER} --target 5.0 --fail"):
        runner.run_all([quad(target=5.0, fail=True), quad(target=6.0)], results, echo=lines.append)
    assert any(line.startswith("FAILED (exit status 3)") for line in lines)
    assert sorted(r["config"]["target"] for r in runner.read_rows(results)) == [1.0, 2.0, 6.0]


def test_reused_processes_run_one_run_after_another_and_a_failed_run_ends_its_worker(tmp_path):
    results, log, meet = tmp_path / "r.jsonl", str(tmp_path / "log"), tmp_path / "meet"
    meet.mkdir()
    lines = []

    def run_all(runs, **kwargs):
        return runner.run_all(runs, results, reuse_processes=True, echo=lines.append, **kwargs)

    def pids():
        return [json.loads(line)["pid"] for line in Path(log).read_text().splitlines()]

    first = run_all([quad(target=2.0, steps=5, log=log), quad(target=3.0, log=log)], threads=1)
    second = run_all([quad(target=4.0, log=log)])  # a later call: the same worker
    assert len(set(pids())) == 1 and pids()[0] != os.getpid()
    # Each row as a run in its own process gives it: result, command, key.
    alone = runner.run_all([quad(target=2.0, steps=5)], tmp_path / "alone.jsonl", threads=1, echo=lambda line: None)
    for name in ("w", "loss", "threads_seen", "key", "config", "phase"):
        assert first[0][name] == alone[0][name], name
    assert first[0]["command"] == alone[0]["command"].replace(" --threads", f" --log {log} --threads")
    assert [r["config"]["target"] for r in first + second] == [2.0, 3.0, 4.0]
    with pytest.raises(RuntimeError, match=f"1 run\\(s\\) failed: python -m {TRAINER} --target 5.0 --fail"):
        run_all([quad(target=5.0, fail=True, log=log), quad(target=6.0, log=log)])
    assert any(line.startswith("FAILED (exit status 3)") for line in lines)
    assert len(set(pids())) == 2 and pids()[-2] == pids()[0]  # the failed run's worker ended; 6 ran in a new one
    # Two at a time: each waits until both have started, so this finishes only in two workers side by side.
    both = run_all([quad(target=t, rendezvous=str(meet), log=log) for t in (7.0, 8.0)], parallel=2)
    assert len(both) == 2 and len(set(pids()[-2:])) == 2
    assert sorted(r["config"]["target"] for r in runner.read_rows(results)) == [2.0, 3.0, 4.0, 6.0, 7.0, 8.0]
    runner.close_workers()
    run_all([quad(target=9.0, log=log)])
    assert pids()[-1] not in pids()[:-1]  # closed: a new worker
    runner.close_workers()


def test_bad_arguments_and_bad_files_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="parallel must be at least 1, got 0"):
        runner.run_all([], tmp_path / "r.jsonl", parallel=0)
    with pytest.raises(ValueError, match="labels may not set the runner's fields key"):
        runner.Run(TRAINER, quadratic.Config(), {"key": "x"})
    with pytest.raises(TypeError, match="config must be a dataclass instance"):
        runner.Run(TRAINER, {"target": 1.0})
    @dataclasses.dataclass(frozen=True)
    class Unthreaded:
        x: int = 1

    with pytest.raises(ValueError, match="threads=2: some.trainer.Config has no threads field"):
        runner.command_of(runner.Run("some.trainer", Unthreaded()), 2)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"command": "python -m examples.gd_vs_sgd"}\n{"comm')
    with pytest.raises(ValueError, match="broken.jsonl:2 is not a JSON line"):
        runner.rows_by_key(broken)


def test_the_command_line_counts_the_rows_and_gives_the_command_that_reruns_each(tmp_path, capsys):
    results = tmp_path / "r.jsonl"
    runner.run_all([quad(target=2.0, threads=3)], results, echo=lambda line: None)
    old = {"key": '{"--batch-size": "32", "--lr": "0.05"}',
           "command": "python examples/gd_vs_sgd.py --train-size 1024 --steps 2000 --momentum 0 --lr 0.05 --seed 0 "
                      "--reference-batch-size 32 --batch-size 32"}
    with open(results, "a") as f:
        f.write(json.dumps(old) + "\n")
    runner.main(["--commands", str(results)])
    assert capsys.readouterr().out.splitlines() == [
        f"{results}: 2 rows, 2 recognised, 2 distinct runs",
        f"  python -m {TRAINER} --target 2.0",  # the thread count is not part of the run
        "  python -m examples.gd_vs_sgd --batch-size 32",
    ]


# -- the recorded results files ----------------------------------------------------------


@pytest.mark.parametrize("path", sorted(RESULTS.glob("*.jsonl")), ids=lambda p: p.name)
def test_every_recorded_row_is_recognised_and_its_command_reproduces_its_config(path):
    rows = runner.read_rows(path)
    keys = runner.rows_by_key(path)
    assert len(rows) > 0 and len(keys) == len(rows)  # every row recognised, no two rows the same run
    for row in rows:
        trainer, config = runner.config_of_row(row)
        # The command the current interface writes for it parses back to the same config.
        assert config_from_argv(runner.config_class(trainer), argv_of(config)) == config


def plan(args, rates):
    """Every Config the Regime A sweep runs for ``args`` at the chosen rate, with ``rates`` searched."""
    lr = args.lr
    both = (temperature.small_batch, temperature.full_batch)
    configs = [arm(args, rate, 0) for rate in rates for arm in both]
    configs += [arm(args, lr, seed) for seed in args.seeds for arm in both]
    configs += [temperature.full_batch(args, lr, seed, noise, factor)
                for noise, factor in temperature.noise_arms(args) for seed in args.seeds]
    return {runner.key_of(temperature.EXAMPLE, c) for c in configs}


def test_the_regime_a_sweep_finds_every_recorded_run_in_its_plan():
    sgd = temperature.parse_args(["--lr", "0.1"])
    recorded = set(runner.rows_by_key(RESULTS / "cifar10_gd_vs_sgd.jsonl"))
    sweep = plan(sgd, (0.05, 0.1, 0.2))
    assert sweep <= recorded  # the whole SGD sweep is recorded: nothing would rerun
    # The rest are runs of the penalty phase, which writes to the same file and may still be under way.
    penalty = {runner.key_of(temperature.EXAMPLE, temperature.penalized(sgd, sgd.lr, seed, factor))
               for seed in sgd.seeds for factor in sgd.penalty_factors}
    assert recorded - sweep <= penalty
    adam = temperature.parse_args(["--optimizer", "adam", "--lr", "3e-3", "--noises", "gaussian", "bernoulli",
                                   "isotropic"])
    assert set(runner.rows_by_key(RESULTS / "cifar10_gd_vs_sgd_adam.jsonl")) <= plan(adam, (1e-4, 3e-4, 1e-3, 3e-3))


def test_rows_the_running_old_sweeps_append_match_the_runs_the_new_sweep_plans():
    """The old temperature.py, still running elsewhere, writes these commands; their rows must count as done."""
    old = "python -m examples.gd_vs_sgd --train-size 1024 --steps 2000 {} --reference-batch-size 32 --batch-size 0 {}"
    sgd = temperature.parse_args(["--phase", "penalty", "--lr", "0.1"])
    adam = temperature.parse_args(["--optimizer", "adam", "--noises", "isotropic"])
    for command, config in (
        (old.format("--momentum 0 --lr 0.1 --seed 0", "--penalty-factor 1"), temperature.penalized(sgd, 0.1, 0, 1.0)),
        (old.format("--momentum 0 --lr 0.1 --seed 2", "--penalty-factor 16"), temperature.penalized(sgd, 0.1, 2, 16)),
        (old.format("--optimizer adam --lr 0.003 --seed 1", "--noise isotropic"),
         temperature.full_batch(adam, 3e-3, 1, "isotropic")),
    ):
        row = {"key": "(an old format)", "command": command, "arm": "whatever the result said"}
        assert runner.key_of_row(row) == runner.key_of(temperature.EXAMPLE, config), command
