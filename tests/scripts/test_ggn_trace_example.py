"""``examples/ggn_trace.py`` (the GGN trace of three ResNets) on quick settings."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.backends("tensorflow")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_ggn_trace_example_quick(tmp_path):
    # About 40 s of CPU (mostly tracing three ResNets); the timeout leaves room
    # for a loaded machine.
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3", CUDA_VISIBLE_DEVICES="")
    result = subprocess.run(
        [sys.executable, "-m", "examples.ggn_trace", "--quick", "--out", str(tmp_path / "runs")],
        capture_output=True, text=True, timeout=240, env=env, cwd=REPO,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "log Tr G" in result.stdout and "Rademacher" in result.stdout
