"""Stock Keras ``fit`` still fails under ``MultiWorkerMirroredStrategy``
(keras-team/keras#20585): plain ``keras.Model``, no tf_gradmix model.

Guards ``tf_gradmix/backend/tensorflow/trainer.py``, the workaround
tf_gradmix's models apply, and its version guard ``MULTI_WORKER_FIT_BROKEN``.
When this fails, upstream fixed the bug: narrow the guard and revisit the
workaround. A real two-worker cluster on 127.0.0.1 (``tests/mwms_cluster.py``):
the main cluster of tests/library/test_distribute.py, whose workers record
stock Keras's failure before training any tf_gradmix model, and write it at
once (started here if that module has not run in this pytest process).
"""

import keras
import pytest

from tf_gradmix import distribute
from tf_gradmix.backend.tensorflow import trainer as gm_trainer

import mwms_cluster

pytestmark = pytest.mark.backends("tensorflow")


@pytest.fixture(scope="module")
def stock_results(tmp_path_factory):
    return mwms_cluster.stock_results(tmp_path_factory)


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
