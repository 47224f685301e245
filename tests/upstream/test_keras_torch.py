"""Keras's PyTorch backend as ``tf_gradmix.backend.torch`` finds it.

Keras 3.15's PyTorch trainer trains one device at a time: ``train_step``
calls the model itself (no ``DistributedDataParallel`` around it) and there
is no PyTorch ``distribution_lib``. So ``tf_gradmix.backend.torch`` treats
``fit`` as one device (``num_data_shards() == 1``) and multi-device PyTorch
training is a custom ``DistributedDataParallel`` loop. When this fails,
Keras wraps the model in DDP inside ``fit`` (developed on Keras's main
branch): then each process's batch is a shard, and the model hook only
needs to give shard ``rank`` its weight (as on JAX) with
``num_data_shards()`` and ``replica_id()`` read inside ``fit`` too.
"""

import importlib.util
import inspect

import pytest

pytestmark = pytest.mark.backends("torch")


def test_keras_torch_fit_does_not_wrap_the_model_in_distributed_data_parallel():
    from keras.src.backend.torch import trainer

    source = inspect.getsource(trainer)
    assert "DistributedDataParallel" not in source and "torch.distributed" not in source
    assert importlib.util.find_spec("keras.src.backend.torch.distribution_lib") is None



def test_keras_torch_fit_hands_the_whole_batch_gradients_to_the_optimizer():
    """``TorchTrainer.train_step`` applies ``v.value.grad`` after one ``backward()`` of the batch loss."""
    from keras.src.backend.torch.trainer import TorchTrainer

    source = inspect.getsource(TorchTrainer.train_step)
    for fragment in ("loss.backward()", "gradients = [v.value.grad for v in trainable_weights]",
                     "self.optimizer.apply(gradients, trainable_weights)"):
        assert fragment in source, fragment


def test_keras_torch_fit_still_refuses_steps_per_execution_above_one():
    """Stock Keras: ``fit`` with ``steps_per_execution=2`` raises on PyTorch.

    ``test_model.py::test_steps_per_execution_gives_the_same_run`` is skipped on
    PyTorch for this; when this fails, Keras runs several steps per call there
    too and that test should run on PyTorch.
    """
    import keras
    import numpy as np

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(1)])
    model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=2)
    x = np.zeros((8, 3), "float32")
    with pytest.raises(ValueError, match="`steps_per_execution` must be 1 with the PyTorch backend"):
        model.fit(x, x[:, :1], batch_size=4, epochs=1, verbose=0)
