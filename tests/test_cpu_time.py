"""tests/cpu_time.py, the plugin behind ``make test-fast``: it records each test's CPU time and deselects by it."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.backends("tensorflow")  # the plugin does not depend on the backend: run it once

TESTS = Path(__file__).resolve().parent

SAMPLE = '''
import subprocess, sys, time

def test_quick():
    pass

def test_burns_cpu_in_a_subprocess():
    burn = "import time\\nt = time.process_time()\\nwhile time.process_time() - t < 0.6: pass"
    subprocess.run([sys.executable, "-c", burn], check=True)

def test_burns_cpu_here():
    t = time.process_time()
    while time.process_time() - t < 0.6:
        pass
'''


def _pytest(tmp_path, *args, xdist=False):
    env = dict(os.environ, PYTHONPATH=str(TESTS), KERAS_BACKEND="tensorflow")
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "cpu_time",
               *(["-n", "2"] if xdist else []), "--cpu-time-record", str(tmp_path / "record.json"), *args,
               str(tmp_path / "test_sample.py")]
    return subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("xdist", [False, True], ids=["one_process", "xdist"])
def test_records_each_tests_cpu_time_then_deselects_the_costly_ones(tmp_path, xdist):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    done = _pytest(tmp_path, "--record-cpu-time", xdist=xdist)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((tmp_path / "record.json").read_text())["tensorflow"]
    cost = {name.split("::")[1]: seconds for name, seconds in record.items()}
    assert set(cost) == {"test_quick", "test_burns_cpu_in_a_subprocess", "test_burns_cpu_here"}
    assert cost["test_quick"] < 0.3
    # Each burns 0.6 s; os.times() counts whole clock ticks (10 ms), so a tick or two may fall outside.
    assert cost["test_burns_cpu_here"] >= 0.57
    assert cost["test_burns_cpu_in_a_subprocess"] >= 0.57  # the waited-for child's time counts

    done = _pytest(tmp_path, "--max-cpu-time", "0.5", "-rA", xdist=xdist)
    assert done.returncode == 0, done.stdout + done.stderr
    ran = sorted(line.split("::")[1] for line in done.stdout.splitlines() if line.startswith("PASSED "))
    assert ran == ["test_quick"], done.stdout  # (xdist's controller does not count the workers' deselections)


def test_a_non_positive_limit_is_refused_by_name(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    done = _pytest(tmp_path, "--max-cpu-time", "0")
    assert done.returncode != 0 and "--max-cpu-time must be positive, got 0.0" in done.stderr
