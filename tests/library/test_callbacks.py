"""The Keras callbacks of ``tf_gradmix.callbacks``: DiagnosticsLogger against the diagnostics it calls."""

import keras
import pytest

import tf_gradmix as gm
from tf_gradmix import diagnostics as diag

from oracles import build_model, data, mlp, relative_error

pytestmark = pytest.mark.backends("tensorflow")


def test_diagnostics_logger_every_n_epochs():
    model = build_model(mlp)
    x, y = data(16)
    model.compile(optimizer="sgd", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    logger = gm.DiagnosticsLogger(x[:8], y[:8], every_n_epochs=2, batch_size=4)
    history = model.fit(x, y, epochs=2, batch_size=8, verbose=0, callbacks=[logger])
    assert [h["epoch"] for h in logger.history] == [1]
    assert history.history["ggn_trace"] == [logger.history[0]["ggn_trace"]]
    expected = diag.ggn_trace(model, x[:8], y[:8], model.loss).trace
    assert relative_error(logger.history[-1]["ggn_trace"], expected) <= 1e-6
    assert set(logger.history[0]) == {
        "epoch", "ggn_trace", "log_ggn_trace", "log_ggn_trace_stderr",
        "empirical_fisher_trace", "gradient_noise_scale",
    }
