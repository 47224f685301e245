"""``examples/ggn_trace.py`` (the GGN trace of three ResNets) on quick settings."""

import pytest

pytestmark = pytest.mark.backends("tensorflow")


@pytest.mark.slow
def test_ggn_trace_example_quick(tmp_path, capsys):
    # ``python -m examples.ggn_trace --quick``, in this process: its logic is tested, and a new
    # interpreter would import TensorFlow again.
    from examples import ggn_trace

    ggn_trace.main(["--quick", "--out", str(tmp_path / "runs")])
    stdout = capsys.readouterr().out
    assert "log Tr G" in stdout and "Rademacher" in stdout
