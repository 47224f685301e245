"""Real ``MultiWorkerMirroredStrategy`` clusters of worker processes on 127.0.0.1.

Each worker is a process that runs ``tests/workers/mwms_worker.py`` with a JSON
spec, forked by one fork server per pytest process (the same interpreter,
TensorFlow imported once); ports are picked at run time and every wait is
bounded. Shared by tests/library/test_distribute.py and
tests/upstream/test_keras_multi_worker.py, which also share one cluster run
(``main_cluster``): its workers record stock Keras's failure first, then
train tf_gradmix's cases.
"""

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tf_gradmix import distribute

FORKSERVER = Path(__file__).resolve().parent / "workers" / "mwms_forkserver.py"
PROCESS_TIMEOUT = 240  # seconds, per worker process

_forkserver = []  # the fork server of this pytest process, started on first use


class Worker:
    """A worker process forked by the fork server (``subprocess.Popen``'s
    ``pid``, ``poll``, ``wait`` and ``returncode``; negative: killed by that
    signal)."""

    def __init__(self, pid, log_path, status_path):
        self.pid = pid
        self.log_path = log_path
        self.status_path = status_path
        self.returncode = None

    def poll(self):
        if self.returncode is None and self.status_path.exists():
            self.returncode = int(self.status_path.read_text())
        return self.returncode

    def wait(self, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.poll() is None:
            if deadline is not None and time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"worker {self.pid}", timeout)
            time.sleep(0.1)
        return self.returncode


def forkserver(tmp_path):
    """The fork server (``tests/workers/mwms_forkserver.py``): it imports
    TensorFlow once and forks every worker of this pytest process. Its own
    output goes to ``forkserver.log`` in the ``tmp_path`` of its first use."""
    if not _forkserver or _forkserver[0].poll() is not None:
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        env.pop("TF_CONFIG", None)
        log_path = tmp_path / "forkserver.log"
        _forkserver[:] = [
            subprocess.Popen(
                [sys.executable, str(FORKSERVER)],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=open(log_path, "w"),
                env=env,
                text=True,
                start_new_session=True,
            )
        ]
        _forkserver[0].log_path = log_path
        atexit.register(stop_forkserver, _forkserver[0])
    return _forkserver[0]


def stop_forkserver(server):
    """Ends the fork server and waits for it (its workers' CPU time then counts as this process's)."""
    server.stdin.close()
    server.wait(timeout=PROCESS_TIMEOUT)


def start(spec, tmp_path, name):
    """Starts a worker process that runs ``spec``; its output goes to ``<name>.log``."""
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log_path, status_path = tmp_path / f"{name}.log", tmp_path / f"{name}.status"
    server = forkserver(tmp_path)
    server.stdin.write(f"{spec_path} {log_path} {status_path}\n")
    server.stdin.flush()
    ready, _, _ = select.select([server.stdout], [], [], PROCESS_TIMEOUT)
    reply = server.stdout.readline() if ready else ""
    if not reply:
        pytest.fail(f"the fork server did not answer (status {server.poll()}):\n{tail(server)}")
    return Worker(int(reply), log_path, status_path)


def kill(process):
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def tail(process):
    return process.log_path.read_text()[-3000:]


def wait_all(processes, timeout=PROCESS_TIMEOUT):
    """Waits for every process; kills the rest and fails on a timeout."""
    deadline = time.monotonic() + timeout
    try:
        for p in processes:
            p.wait(timeout=max(1, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        for p in processes:
            kill(p)
        pytest.fail("worker timed out:\n" + "\n----\n".join(tail(p) for p in processes))
    finally:
        for p in processes:
            if p.poll() is None:
                kill(p)
    for p in processes:
        assert p.returncode == 0, tail(p)


# -- the main cluster, run once per pytest session ------------------------------

LR = 0.1
# Worker i reads rows [8 s + 4 i, 8 s + 4 i + 4) at step s: 3 steps of 4 each.
EVEN = [[list(range(s * 8 + k * 4, s * 8 + k * 4 + 4)) for s in range(3)] for k in range(2)]
# Worker 0: 4, 4, then a partial batch of 3; worker 1: 4, 4, then nothing.
UNEVEN = [
    [list(range(0, 4)), list(range(8, 12)), list(range(16, 19))],
    [list(range(4, 8)), list(range(12, 14)), []],
]
CASES = [
    "model/plain/shards",
    "model/sample/shards",
    "sequential/sample/shards",
    "enable/sample/shards",
    "enable/device/shards",
    "model/device/shards",
    "model/sample/uneven",
    "enable/device/uneven",
    "model/sample/keras_split",
    # gradient_accumulation_steps=3 across the workers' replicas: one update
    # from the 3 steps' mixes (keras-team/keras#20582 handled in GradientMix).
    "model/sample-acc3/shards",
    "enable/device-acc3/shards",
]
# Levels whose traced replica step each worker records (graph/<level>).
TRACED_LEVELS = ["sample", "sample-acc3", "device-acc3"]

_session = {}  # what this pytest process already ran: "data", "main"


def data(tmp_path_factory):
    """``(path, x, y)``: 24 examples of 3 features and a noisy target, saved once."""
    if "data" not in _session:
        rng = np.random.default_rng(0)
        x = rng.normal(size=(24, 3)).astype("float32")
        y = (np.sin(x).sum(1, keepdims=True) + 0.1 * rng.normal(size=(24, 1))).astype("float32")
        path = tmp_path_factory.mktemp("data") / "data.npz"
        np.savez(path, x=x, y=y)
        _session["data"] = (path, x, y)
    return _session["data"]


def main_cluster(tmp_path_factory):
    """Both workers' results of the main two-worker cluster (``fit_cases``).

    Run on first use, then reused by every test module of this pytest
    process: one cluster start instead of one per module (a failed run is not
    run again: its error is raised again).
    """
    if "main" not in _session:
        tmp_path = tmp_path_factory.mktemp("mwms_fit")
        _session["main_dir"] = tmp_path
        spec = {
            "task": "fit_cases",
            "data": str(data(tmp_path_factory)[0]),
            "cases": CASES,
            "shards": EVEN,
            "uneven": UNEVEN,
            "learning_rate": LR,
            "default_seed": True,
            "compat_off": True,
            "traced_steps": TRACED_LEVELS,
        }
        ports = distribute.free_local_ports(2)
        processes = [
            start(dict(spec, ports=ports, index=i, out=str(tmp_path / f"fit{i}.npz"),
                       stock_out=str(tmp_path / f"stock{i}.npz")), tmp_path, f"fit{i}")
            for i in range(2)
        ]
        try:
            wait_all(processes)
            _session["main"] = [dict(np.load(tmp_path / f"fit{i}.npz")) for i in range(2)]
        except BaseException as error:
            _session["main"] = error
    if isinstance(_session["main"], BaseException):
        raise _session["main"]
    return _session["main"]


def stock_results(tmp_path_factory):
    """Both workers' records of stock Keras under the strategy: written by
    the main cluster's workers before any tf_gradmix model, so available even
    when a later case of that run failed."""
    try:
        main_cluster(tmp_path_factory)
    except BaseException:
        paths = [_session["main_dir"] / f"stock{i}.npz" for i in range(2)]
        if not all(path.exists() for path in paths):
            raise
    return [dict(np.load(_session["main_dir"] / f"stock{i}.npz")) for i in range(2)]
