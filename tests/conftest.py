"""Test configuration shared by every test module.

Four logical CPU devices must be configured before TensorFlow initialises its
runtime, so it happens here, once, at import time (configured later, TensorFlow
refuses).
"""

import os

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import tensorflow as tf  # noqa: E402

NUM_LOGICAL_CPUS = 4

_cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(
    _cpu, [tf.config.LogicalDeviceConfiguration()] * NUM_LOGICAL_CPUS
)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def mirrored_strategy():
    """The one MirroredStrategy of the test process (several misbehave)."""
    devices = [f"/cpu:{i}" for i in range(NUM_LOGICAL_CPUS)]
    return tf.distribute.MirroredStrategy(devices)


@pytest.fixture(autouse=True)
def _clear_keras_session():
    import keras

    keras.backend.clear_session()
    keras.config.set_dtype_policy("float32")
    yield
