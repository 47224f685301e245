"""Real ``MultiWorkerMirroredStrategy`` clusters of worker processes on 127.0.0.1.

Each worker is ``tests/workers/mwms_worker.py`` run by the same interpreter,
configured by a JSON spec; ports are picked at run time and every wait is
bounded. Shared by tests/library/test_distribute.py and
tests/upstream/test_keras_multi_worker.py.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tf_gradmix import distribute

WORKER = Path(__file__).resolve().parent / "workers" / "mwms_worker.py"
PROCESS_TIMEOUT = 240  # seconds, per worker process


def start(spec, tmp_path, name):
    spec_path = tmp_path / f"{name}.json"
    spec_path.write_text(json.dumps(spec))
    log = open(tmp_path / f"{name}.log", "w")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TF_CONFIG", None)
    process = subprocess.Popen(
        [sys.executable, str(WORKER), str(spec_path)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    process.log_path = tmp_path / f"{name}.log"
    return process


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


def run_cluster(spec, tmp_path, name, workers=2):
    ports = distribute.free_local_ports(workers)
    processes = [
        start(dict(spec, ports=ports, index=i, out=str(tmp_path / f"{name}{i}.npz")), tmp_path, f"{name}{i}")
        for i in range(workers)
    ]
    wait_all(processes)
    return [dict(np.load(tmp_path / f"{name}{i}.npz")) for i in range(workers)]
