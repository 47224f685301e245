"""The experiment runner: every sweep runs its configurations through it.

A run is a trainer (a module of ``examples/``, run as ``python -m`` from the
repository root) and its ``Config``. The runner starts each run in a
subprocess, ``python -m <trainer> <argv_of(config)>`` (the flags that differ
from the defaults, plus ``--threads``), reads the result dict the trainer
prints as the last line of its standard output (JSON), and appends one line
to a JSONL results file: the result's fields, the sweep's labels (e.g.
``phase``), and

* ``trainer`` and ``config``: the module and every field of the config that
  changes the result (paths and thread counts do not), enough to rebuild the
  run with ``config_from_dict``;
* ``key``: the run's identity, :func:`key_of` the trainer and that config;
* ``command``: the exact command that ran;
* ``elapsed_seconds``, ``finished_utc`` and ``machine`` (cores, runs in
  parallel, threads per run, the load average before and after the run);
* ``tf_gradmix_version``: the version of the package the trainer ran (its
  noise stream changed in 0.2.0); rows without it were made by 0.1.0.

With ``reuse_processes`` (the sweeps' ``--reuse-processes``), runs go to
long-lived workers, ``python -m experiments.runner --serve``: a run takes an
idle one or starts one (so at most ``parallel`` of them), and each run is the
trainer's ``main(argv)`` there (its standard output captured as from a
subprocess), Keras's global state cleared after it. Workers stay for later
``run_all`` calls of the process and end at its exit (or
:func:`close_workers`): one Keras import per worker instead of one per run,
which is most of the CPU time of a short run. The trainers seed each run, so
its result is the one it gives in a process of its own. A run that fails ends
its worker.

A run whose key is in the results file is not run again, so a sweep that was
stopped (Ctrl-C, or a kill of its process group) continues where it stopped
when started again. Rows written by earlier versions of the sweeps (other
``key`` formats, no ``config``) are recognised by their ``command``, parsed
with the trainer's own command line.

    python -m experiments.runner experiments/results/*.jsonl             # rows recognised, per file
    python -m experiments.runner --commands experiments/results/cifar10_gd_vs_sgd.jsonl   # each row's command
"""

import argparse
import atexit
import contextlib
import dataclasses
import importlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from examples.config import argv_of, config_from_argv, config_from_dict, values_of

ROOT = Path(__file__).resolve().parents[1]

#: Trainers that moved: recorded commands name the old module; its flags are unchanged.
MOVED_TRAINERS = {"examples.cifar_resnet18": "examples.cifar_train"}

#: The sweeps' flag for ``run_all(reuse_processes=True)``.
REUSE_HELP = ("run the runs in long-lived worker processes, one per run going at a time (one Keras import a worker "
              "instead of one a run: seconds of CPU for short runs such as --extra --quick)")

#: Row fields the runner writes; they replace result fields of the same name.
RUNNER_FIELDS = (
    "trainer", "config", "key", "command", "elapsed_seconds", "finished_utc", "machine", "tf_gradmix_version",
)


@dataclasses.dataclass(frozen=True)
class Run:
    """One run: ``trainer`` (e.g. ``"examples.gd_vs_sgd"``), its ``config``, and ``labels`` for the row only."""

    trainer: str
    config: object
    labels: dict = dataclasses.field(default_factory=dict)

    def __post_init__(self):
        if not dataclasses.is_dataclass(self.config) or isinstance(self.config, type):
            raise TypeError(f"config must be a dataclass instance (the trainer's Config), got {self.config!r}")
        clash = sorted(set(self.labels) & set(RUNNER_FIELDS))
        if clash:
            raise ValueError(f"labels may not set the runner's fields {', '.join(clash)}")


def config_class(trainer):
    """The trainer module's ``Config``."""
    cls = getattr(importlib.import_module(trainer), "Config", None)
    if cls is None:
        raise ValueError(f"the trainer {trainer} has no Config")
    return cls


def result_values(config):
    """What identifies a run's computation: the fields of ``config`` that change its result."""
    return values_of(config, affects_result_only=True)


def key_of(trainer, config):
    """The canonical key of a run: the trainer and its result-changing config fields, sorted, as JSON."""
    return json.dumps({"trainer": trainer, "config": result_values(config)}, sort_keys=True)


def parse_command(command):
    """``(trainer module, argv)`` of a recorded command (``python -m examples.x ...``, ``python examples/x.py ...``)."""
    words = shlex.split(command)
    if len(words) >= 3 and words[1] == "-m":
        trainer, argv = words[2], words[3:]
    elif len(words) >= 2 and words[1].endswith(".py"):
        trainer, argv = words[1][: -len(".py")].replace("/", "."), words[2:]
    else:
        raise ValueError(f"not a trainer command (python -m examples.x or python examples/x.py): {command!r}")
    return MOVED_TRAINERS.get(trainer, trainer), argv


def config_of_command(command):
    """``(trainer, config)`` of a recorded command, parsed with the trainer's own command line."""
    trainer, argv = parse_command(command)
    cls = config_class(trainer)
    try:
        return trainer, config_from_argv(cls, argv)
    except SystemExit as error:  # argparse has printed why
        raise ValueError(f"the trainer {trainer} refuses the recorded command {command!r}") from error


def config_of_row(row):
    """``(trainer, config)`` of a results row: its ``trainer`` and ``config``, else its ``command``."""
    if "trainer" in row and "config" in row:
        return row["trainer"], config_from_dict(config_class(row["trainer"]), row["config"])
    if "command" not in row:
        raise ValueError(f"row without trainer/config or command: key {row.get('key')!r}")
    return config_of_command(row["command"])


def key_of_row(row):
    """The canonical key of a results row, in any format the sweeps have written."""
    return key_of(*config_of_row(row))


def read_rows(path):
    """The rows of a JSONL results file (none if it does not exist)."""
    path = Path(path)
    if not path.exists():
        return []
    rows = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number} is not a JSON line ({error}); repair or remove it") from None
    return rows


def rows_by_key(path):
    """``{canonical key: row}`` of a results file; a later row of the same key wins."""
    found = {}
    for number, row in enumerate(read_rows(path), 1):
        try:
            found[key_of_row(row)] = row
        except (ValueError, TypeError) as error:
            raise ValueError(f"{path}: row {number}: {error}") from error
    return found


def command_of(run, threads=None):
    """The argv of ``run``'s subprocess after ``python``: ``-m <trainer>`` and the config's flags."""
    config = run.config
    if threads is not None:
        if "threads" not in {f.name for f in dataclasses.fields(config)}:
            raise ValueError(f"threads={threads}: {run.trainer}.Config has no threads field")
        config = dataclasses.replace(config, threads=threads)
    return ["-m", run.trainer, *argv_of(config)]


def package_version():
    """The version of the tf_gradmix the trainers import: the repository's own (they run from its root)."""
    text = (ROOT / "tf_gradmix" / "__init__.py").read_text()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


def _row(run, result, command, started, load_before, parallel, threads):
    row = dict(result)
    row.update(run.labels)
    row.update(
        trainer=run.trainer,
        config=result_values(run.config),
        key=key_of(run.trainer, run.config),
        command=command,
        elapsed_seconds=time.time() - started,
        finished_utc=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        machine={"cpus": os.cpu_count(), "parallel_runs": parallel, "threads_per_run": threads,
                 "loadavg_before": list(load_before), "loadavg_after": list(os.getloadavg())},
        tf_gradmix_version=package_version(),
    )
    return row


class _Workers:
    """Idle worker processes (``python -m experiments.runner --serve``), reused run after run; closed at exit."""

    def __init__(self):
        self._idle, self._lock = [], threading.Lock()
        atexit.register(self.close)

    def run(self, argv):
        """Runs ``argv`` (``-m <trainer> <flags>``) in an idle worker or a new one; a ``CompletedProcess``."""
        with self._lock:
            worker = self._idle.pop() if self._idle else None
        if worker is None:
            stderr = tempfile.TemporaryFile("w+")  # a file, never a full pipe; each run reads what it appended
            worker = subprocess.Popen([sys.executable, "-m", "experiments.runner", "--serve"], cwd=ROOT,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True)
            worker.stderr_file = stderr
        start = worker.stderr_file.seek(0, os.SEEK_END)
        reply = None
        try:
            worker.stdin.write(json.dumps(argv) + "\n")
            worker.stdin.flush()
            reply = json.loads(worker.stdout.readline() or "null")
        except (OSError, ValueError):
            pass
        worker.stderr_file.seek(start)
        stderr = worker.stderr_file.read()
        if reply is None:  # the worker died
            worker.kill()
            returncode = worker.wait()
            return subprocess.CompletedProcess(argv, returncode or -1, "", stderr)
        if reply["returncode"] == 0:
            with self._lock:
                self._idle.append(worker)
        else:  # a failed run may leave the process in any state
            self._end(worker)
        return subprocess.CompletedProcess(argv, reply["returncode"], reply["stdout"], stderr + reply["stderr"])

    @staticmethod
    def _end(worker):
        with contextlib.suppress(OSError):
            worker.stdin.close()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        worker.stderr_file.close()

    def close(self):
        with self._lock:
            idle, self._idle = self._idle, []
        for worker in idle:
            self._end(worker)


_WORKERS, _WORKERS_LOCK = None, threading.Lock()


def _workers():
    global _WORKERS
    with _WORKERS_LOCK:  # run_all's threads may ask at once
        if _WORKERS is None:
            _WORKERS = _Workers()
        return _WORKERS


def close_workers():
    """Ends the idle workers of ``reuse_processes`` now (they end at exit anyway); later runs start new ones."""
    if _WORKERS is not None:
        _WORKERS.close()


def serve():
    """A worker's loop: one JSON argv (``-m <trainer> <flags>``) a line on stdin, one JSON reply a line on stdout.

    The trainer's ``main(flags)`` runs with ``sys.stdout`` and ``sys.stderr``
    captured; the reply holds them and the exit status (0, a ``SystemExit``'s
    code, or 1 after an exception, whose traceback goes to ``stderr``). What
    the process itself writes to its standard output (e.g. native libraries)
    goes to its standard error, away from the replies.
    """
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    for line in iter(sys.stdin.readline, ""):
        argv = json.loads(line)
        if len(argv) < 2 or argv[0] != "-m":
            raise ValueError(f"a worker runs `-m <trainer> <flags>`, got {argv!r}")
        out, err, returncode = io.StringIO(), io.StringIO(), 0
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                importlib.import_module(argv[1]).main(argv[2:])
            except SystemExit as stop:  # argparse's errors, sys.exit()
                returncode = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
                if isinstance(stop.code, str):
                    print(stop.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 -- reported to the runner like a subprocess's traceback
                traceback.print_exc()
                returncode = 1
        if "keras" in sys.modules:
            sys.modules["keras"].backend.clear_session()
        replies.write(json.dumps({"returncode": returncode, "stdout": out.getvalue(), "stderr": err.getvalue()})
                      + "\n")
        replies.flush()


def run_argv(argv, reuse_processes=False):
    """Runs ``python <argv>`` (``-m <module> <flags>``) from the repository root; a ``CompletedProcess``.

    Its ``stdout`` and ``stderr`` are captured as text. With ``reuse_processes``
    it runs in an idle worker (or a new one), the module's ``main(flags)``.
    """
    if reuse_processes:
        return _workers().run(list(argv))
    return subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True)


def run_all(runs, results, parallel=1, threads=None, summary=None, echo=print, reuse_processes=False):
    """Runs every run of ``runs`` whose key is not in ``results`` yet; returns the rows of all of them.

    Args:
        runs: :class:`Run` objects in priority order (a repeated key runs once).
        results: the JSONL file, appended to one line per finished run.
        parallel: runs at a time (each a subprocess).
        threads: ``--threads`` for every run (None: the trainer's default).
        reuse_processes: run them in long-lived workers (see the module's
            docstring), one per run at a time, kept for later calls.
        summary: optional ``row -> str``, printed after each run.
        echo: where progress lines go.

    Raises:
        RuntimeError: after the other runs finished, if any run failed (its
            standard error's tail is printed); finished runs are recorded.
    """
    if parallel < 1:
        raise ValueError(f"parallel must be at least 1, got {parallel}")
    results = Path(results)
    done = rows_by_key(results)
    keys = [key_of(run.trainer, run.config) for run in runs]
    todo = {}
    for key, run in zip(keys, runs):
        if key not in done:
            todo.setdefault(key, run)
    echo(f"{len(set(keys)) - len(todo)} of {len(set(keys))} runs already in {results}; {len(todo)} to run")
    lock, failures = threading.Lock(), []

    def one(run):
        argv = command_of(run, threads)
        command = shlex.join(["python", *argv])
        echo(f"[{time.strftime('%H:%M:%S')}] {command}")
        started, load_before = time.time(), os.getloadavg()
        done_ = run_argv(argv, reuse_processes)
        lines = done_.stdout.strip().splitlines()
        try:
            if done_.returncode != 0 or not lines:
                raise ValueError(f"exit status {done_.returncode}")
            result = json.loads(lines[-1])
            if not isinstance(result, dict):
                raise ValueError(f"the last line of standard output is not a JSON object: {lines[-1][:200]!r}")
        except ValueError as error:
            echo(f"FAILED ({error}): {command}\n{done_.stderr[-3000:]}")
            with lock:
                failures.append(command)
            return
        row = _row(run, result, command, started, load_before, parallel, threads)
        with lock:  # one short append per run: a stopped sweep loses at most the runs under way
            results.parent.mkdir(parents=True, exist_ok=True)
            with open(results, "a") as f:
                f.write(json.dumps(row) + "\n")
        echo(f"    {summary(row) if summary else 'done'} ({row['elapsed_seconds']:.0f} s)")

    with ThreadPoolExecutor(max_workers=parallel) as pool:
        list(pool.map(one, todo.values()))
    if failures:
        raise RuntimeError(f"{len(failures)} run(s) failed: " + "; ".join(failures))
    done = rows_by_key(results)
    return [done[key] for key in keys]


def command_of_row(row):
    """The command that reruns a recorded row with the current interface (``python -m <trainer> <flags>``)."""
    trainer, config = config_of_row(row)
    return shlex.join(["python", "-m", trainer, *argv_of(config)])


def main(argv=None):
    p = argparse.ArgumentParser(description="Check JSONL results files: every row recognised, and its command.")
    p.add_argument("results", nargs="*", type=Path)
    p.add_argument("--commands", action="store_true", help="print the command that reruns each row")
    p.add_argument("--serve", action="store_true",
                   help="be a worker of run_all(reuse_processes=True): run one trainer argv (JSON) a line of stdin")
    args = p.parse_args(argv)
    if args.serve:
        return serve()
    if not args.results:
        p.error("give at least one results file")
    for path in args.results:
        rows, keys = read_rows(path), rows_by_key(path)
        print(f"{path}: {len(rows)} rows, {len(rows)} recognised, {len(keys)} distinct runs")
        if args.commands:
            for row in rows:
                print("  " + command_of_row(row))


if __name__ == "__main__":
    main()
