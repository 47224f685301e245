"""The ImageNet ResNet-50 example, offline: TFDS mock data at a tiny size."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds  # a pinned requirement: never skipped

pytestmark = pytest.mark.backends("tensorflow")


@pytest.fixture(scope="module")
def example():
    from examples import imagenet_resnet50

    return imagenet_resnet50


def test_pipeline_shards_per_worker_and_batches_per_replica(example, monkeypatch):
    context = tf.distribute.InputContext(
        num_input_pipelines=2, input_pipeline_id=1, num_replicas_in_sync=4
    )
    # TFDS shards the files per worker from `read_config.input_context`.
    # Its mock data generates examples in code and ignores the read config,
    # so the split itself cannot be observed offline: record what the
    # example hands to `tfds.load` instead (the real load, mocked by TFDS).
    loads = []
    real_load = tfds.load

    def recording_load(*args, **kwargs):
        loads.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(tfds, "load", recording_load)
    with tfds.testing.mock_data(num_examples=12):
        ds = example.make_dataset("train", 8, 16, True, input_context=context)
        images, labels = next(iter(ds))
        # Per-replica batch: 8 / 4 replicas.
        assert images.shape == (2, 16, 16, 3) and labels.shape == (2, 1000)
        assert np.all(np.isfinite(images.numpy()))
        np.testing.assert_allclose(labels.numpy().sum(1), 1.0)
        validation = example.make_dataset("validation", 8, 16, False, input_context=context)
        assert next(iter(validation))[0].shape[1:] == (16, 16, 3)
    assert [kw["split"] for kw in loads] == ["train", "validation"]
    for kw in loads:
        assert kw["read_config"].input_context is context


@pytest.mark.slow
def test_a_few_training_steps(example):
    # One device: ResNet-50 under the 4-replica MirroredStrategy costs minutes
    # on 2 cores; the distributed paths are covered in test_distribute.py.
    args = [
        "--recipe", "lars",
        "--global-batch-size", "8",
        "--image-size", "32",
        "--epochs", "1",
        "--steps-per-epoch", "4",
        "--steps-per-execution", "2",
        "--validation-steps", "1",
    ]
    with tfds.testing.mock_data(num_examples=16):
        history = example.main(args, strategy=tf.distribute.get_strategy())
    for key in ("loss", "top1", "gradmix_gamma", "val_loss"):
        assert np.all(np.isfinite(history.history[key])), key
    assert "gradmix_gamma" not in [k for k in history.history if k.startswith("val_")]
