"""Stock Keras ``fit`` still fails under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585): plain ``keras.Model``, no tf_gradmix model.

Guards ``tf_gradmix/backend/tensorflow/trainer.py``, the workaround
tf_gradmix's models apply, and its version guard ``MULTI_WORKER_FIT_BROKEN``.
When this fails, upstream fixed the bug: narrow the guard and revisit the
workaround. A real two-worker cluster on 127.0.0.1 (``tests/mwms_cluster.py``).
"""

import keras
import numpy as np
import pytest

from tf_gradmix import distribute
from tf_gradmix.backend.tensorflow import trainer as gm_trainer

from mwms_cluster import run_cluster

pytestmark = pytest.mark.backends("tensorflow")

# Worker i reads rows [8 s + 4 i, 8 s + 4 i + 4) at step s: 3 steps of 4 each.
SHARDS = [[list(range(s * 8 + k * 4, s * 8 + k * 4 + 4)) for s in range(3)] for k in range(2)]


@pytest.fixture(scope="module")
def stock_results(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("mwms_stock")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(24, 3)).astype("float32")
    y = (np.sin(x).sum(1, keepdims=True) + 0.1 * rng.normal(size=(24, 1))).astype("float32")
    np.savez(tmp_path / "data.npz", x=x, y=y)
    spec = {"task": "fit_cases", "data": str(tmp_path / "data.npz"), "cases": [], "shards": SHARDS}
    return run_cluster(spec, tmp_path, "stock")


@pytest.mark.slow
def test_stock_keras_fit_still_fails_under_multi_worker(stock_results):
    """keras-team/keras#20585: fit fails converting a PerReplica value, and
    Keras's reduction of per-replica logs fails; the guard covers the
    installed Keras."""
    for result in stock_results:
        assert "Attempt to convert a value (PerReplica" in str(result["stock_fit_error"])
        assert "Invalid reduction dimension 0" in str(result["stock_reduce_error"])
    assert gm_trainer.multi_worker_fit_workaround_applies(), (
        f"Keras {keras.__version__} is outside the range the multi-worker fit "
        f"workaround covers ({gm_trainer.MULTI_WORKER_FIT_BROKEN}): re-check "
        f"{gm_trainer.MULTI_WORKER_FIT_ISSUE} and update the guard."
    )
    assert distribute.multi_worker_fit_supported()
    assert not gm_trainer.multi_worker_fit_workaround_applies((3, 16))
