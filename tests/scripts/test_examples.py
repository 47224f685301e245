"""Smoke tests of examples/: the CIFAR-10 loader and pipelines, the ResNets, the demo.

They use the real CIFAR-10 JPEG copy ($TF_GRADMIX_DATA or ../shared/data) and
skip only when no copy exists; nothing here downloads.
"""

import json
import tarfile
from pathlib import Path

import keras
import numpy as np
import pytest
import tensorflow as tf

import tf_gradmix
from examples import cifar10, resnet
from tf_gradmix import residual

import real_data

pytestmark = pytest.mark.backends("tensorflow")


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """The real CIFAR-10, decoded into a fresh cache directory."""
    source = cifar10.find_cifar10()  # raises if $TF_GRADMIX_DATA is set but wrong
    if source is None:
        real_data.missing("CIFAR-10 JPEG")
    cache_dir = tmp_path_factory.mktemp("cifar_cache")
    data = cifar10.load_cifar10(cache_dir=cache_dir, verbose=False)
    return source, cache_dir, data


# --------------------------------------------------------------------------
# Loader


@pytest.mark.slow
def test_loader_decodes_real_cifar10(cifar):
    source, cache_dir, ((x_train, y_train), (x_test, y_test)) = cifar
    assert x_train.shape == (50000, 32, 32, 3) and x_train.dtype == np.uint8
    assert x_test.shape == (10000, 32, 32, 3) and x_test.dtype == np.uint8
    assert y_train.shape == (50000,) and y_train.dtype == np.int64
    assert y_test.shape == (10000,) and y_test.dtype == np.int64
    np.testing.assert_array_equal(np.bincount(y_train, minlength=10), [5000] * 10)
    np.testing.assert_array_equal(np.bincount(y_test, minlength=10), [1000] * 10)
    # Sorted by class, then file name.
    np.testing.assert_array_equal(y_train, np.repeat(np.arange(10), 5000))
    np.testing.assert_array_equal(y_test, np.repeat(np.arange(10), 1000))
    # Real images, not blanks: CIFAR-10's mean pixel is about 120 of 255.
    assert 100 < x_train[::50].mean() < 140
    assert x_train[::50].std() > 40
    assert len(list(Path(cache_dir).glob("*.npz"))) == 1


@pytest.mark.slow
def test_pillow_decodes_like_tensorflow_within_the_idct_difference(cifar):
    """Machines without TensorFlow decode with Pillow: the same images, labels and order, pixels within 5 levels."""
    source, cache_dir, (_, (x_test, y_test)) = cifar
    assert cifar10.decoder() == "tensorflow"
    per_class = 30
    records = cifar10._read_encoded(source)["test"]
    first = [r for c in cifar10.CLASSES
             for r in sorted((r for r in records if r[0] == c), key=lambda r: r[1])[:per_class]]
    images, labels = cifar10._decode(first, "test", per_class, using="pillow")
    rows = np.concatenate([np.arange(c * 1000, c * 1000 + per_class) for c in range(10)])
    np.testing.assert_array_equal(labels, y_test[rows])
    # The libraries' JPEG decoders round differently (pinned versions: 65% of the values differ, by 0.99
    # levels on average, at most 5): the same images, not the same bytes.
    difference = np.abs(images.astype(int) - x_test[rows])
    assert difference.max() <= 5
    assert difference.mean() < 1.2
    with pytest.raises(ValueError, match="`using` must be 'tensorflow' or 'pillow', got 'opencv'"):
        cifar10._decode(first, "test", per_class, using="opencv")


@pytest.mark.slow
def test_loader_order_matches_the_files(cifar):
    """Image i is the i-th file of its split in sorted order, decoded independently."""
    source, _, ((x_train, _), (x_test, _)) = cifar
    wanted = {
        "train/airplane/0000.jpg": x_train[0],
        "train/cat/0007.jpg": x_train[3 * 5000 + 7],
        "train/truck/4999.jpg": x_train[-1],
        "test/frog/0123.jpg": x_test[6 * 1000 + 123],
    }
    if source.is_file():
        with tarfile.open(source) as tar:
            for member in tar:
                name = member.name.removeprefix("./")
                if name in wanted:
                    image = tf.io.decode_jpeg(tar.extractfile(member).read(), channels=3)
                    np.testing.assert_array_equal(image.numpy(), wanted.pop(name))
    else:
        for name in list(wanted):
            image = tf.io.decode_jpeg((source / name).read_bytes(), channels=3)
            np.testing.assert_array_equal(image.numpy(), wanted.pop(name))
    assert not wanted, f"files not found in {source}: {sorted(wanted)}"


@pytest.mark.slow
def test_loader_reuses_its_cache(cifar, monkeypatch):
    _, cache_dir, ((x_train, y_train), (x_test, y_test)) = cifar

    def no_decoding(*args, **kwargs):
        raise AssertionError("decoded again instead of using the cache")

    monkeypatch.setattr(cifar10, "_read_encoded", no_decoding)
    (x2, y2), (x3, y3) = cifar10.load_cifar10(cache_dir=cache_dir, verbose=False)
    np.testing.assert_array_equal(x2, x_train)
    np.testing.assert_array_equal(y2, y_train)
    np.testing.assert_array_equal(x3, x_test)
    np.testing.assert_array_equal(y3, y_test)


@pytest.mark.slow
def test_subset_loader_decodes_only_the_subsets_and_equals_subsets_of_the_full_arrays(cifar, tmp_path, monkeypatch):
    _, cache_dir, ((x_train, y_train), (x_test, y_test)) = cifar
    expected = cifar10.subset(x_train, y_train, 203, seed=4), cifar10.subset(x_test, y_test, 57, seed=4)
    decoded = []
    real_decode = cifar10._decode_with_tensorflow
    monkeypatch.setattr(cifar10, "_decode_with_tensorflow", lambda jpegs: decoded.append(len(jpegs)) or
                        real_decode(jpegs))
    subset_cache = tmp_path / "subset_cache"
    for directory in (subset_cache, subset_cache, cache_dir):  # decoded; its own cache; the full cache
        got = cifar10.load_cifar10_subset(203, 57, seed=4, cache_dir=directory, verbose=False)
        for (x, y), (x_expected, y_expected) in zip(got, expected):
            np.testing.assert_array_equal(x, x_expected)
            np.testing.assert_array_equal(y, y_expected)
        assert y.dtype == np.int64
    assert decoded == [203, 57]  # only the subsets' images, once
    assert [p.name.endswith("-subset-203-57-4.npz") for p in subset_cache.glob("*.npz")] == [True]
    with pytest.raises(ValueError, match="`test_size`: expected 1 to 10000, got 0"):
        cifar10.load_cifar10_subset(10, 0, cache_dir=subset_cache)


def test_cache_verification_rejects_bad_files(tmp_path):
    x_tr = np.zeros((2, 32, 32, 3), np.uint8)
    y = np.zeros(2, np.int64)
    arrays = (x_tr, y, x_tr, y)
    good = dict(format=1, key="k", x_train=x_tr, y_train=y, x_test=x_tr, y_test=y)

    np.savez(tmp_path / "wrong_checksum.npz", checksum="0" * 64, **good)
    assert cifar10._load_cache(tmp_path / "wrong_checksum.npz", "k") is None
    # Right checksum, wrong key (another tar): not used.
    np.savez(tmp_path / "other_key.npz", checksum=cifar10._checksum(*arrays), **good)
    assert cifar10._load_cache(tmp_path / "other_key.npz", "another") is None
    # Right key and checksum but not CIFAR-10's shapes and labels: not used.
    assert cifar10._load_cache(tmp_path / "other_key.npz", "k") is None
    (tmp_path / "garbage.npz").write_bytes(b"not a zip file")
    assert cifar10._load_cache(tmp_path / "garbage.npz", "k") is None


def test_explicit_data_dir_without_cifar_is_an_error(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="data_dir"):
        cifar10.load_cifar10(data_dir=tmp_path, cache_dir=tmp_path)
    monkeypatch.setenv("TF_GRADMIX_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="TF_GRADMIX_DATA"):
        cifar10.load_cifar10(cache_dir=tmp_path)


# --------------------------------------------------------------------------
# Subsets and pipelines


@pytest.mark.slow
def test_subset_and_validation_split_are_balanced_and_fixed(cifar):
    _, _, ((x_train, y_train), _) = cifar
    idx = cifar10.balanced_indices(y_train, 1000, seed=3)
    np.testing.assert_array_equal(np.bincount(y_train[idx], minlength=10), [100] * 10)
    assert len(np.unique(idx)) == 1000
    np.testing.assert_array_equal(idx, cifar10.balanced_indices(y_train, 1000, seed=3))
    assert not np.array_equal(np.sort(idx), np.sort(cifar10.balanced_indices(y_train, 1000, seed=4)))
    xs, ys = cifar10.subset(x_train, y_train, 1000, seed=3)
    np.testing.assert_array_equal(xs, x_train[idx])
    np.testing.assert_array_equal(ys, y_train[idx])
    # Uneven n: the first classes get one more.
    counts = np.bincount(y_train[cifar10.balanced_indices(y_train, 1003, seed=0)], minlength=10)
    np.testing.assert_array_equal(counts, [101] * 3 + [100] * 7)
    held_out = cifar10.balanced_indices(y_train, 500, seed=5, exclude=idx)
    assert not set(held_out) & set(idx)

    # The split, with example ids standing in for images.
    ids = np.arange(len(ys))
    (id_tr, y_tr), (id_val, y_val) = cifar10.train_val_split(ids, ys, 200, seed=1)
    assert len(id_tr) == 800 and len(id_val) == 200
    np.testing.assert_array_equal(np.bincount(y_val, minlength=10), [20] * 10)
    assert not set(id_tr) & set(id_val)
    assert sorted([*id_tr, *id_val]) == ids.tolist()
    np.testing.assert_array_equal(y_tr, ys[id_tr])
    np.testing.assert_array_equal(y_val, ys[id_val])


def _batches(dataset, epochs):
    return [[(x.numpy(), y.numpy()) for x, y in dataset] for _ in range(epochs)]


def _denormalize(images):
    pixels = (images * np.array(cifar10.STD) + np.array(cifar10.MEAN)) * 255.0
    return np.round(pixels).astype(np.uint8)


@pytest.fixture(scope="module")
def small(cifar):
    _, _, ((x_train, y_train), _) = cifar
    return cifar10.subset(x_train, y_train, 200, seed=0)


@pytest.mark.slow
def test_training_pipeline_is_deterministic_and_reshuffles(small):
    x, y = small
    runs = [
        _batches(cifar10.make_dataset(x, y, 64, training=True, seed=7), epochs=2)
        for _ in range(2)
    ]
    for epoch_a, epoch_b in zip(*runs):  # same seed: the same batches, epoch by epoch
        assert len(epoch_a) == len(epoch_b) == 3  # 200 // 64, remainder dropped
        for (xa, ya), (xb, yb) in zip(epoch_a, epoch_b):
            np.testing.assert_array_equal(xa, xb)
            np.testing.assert_array_equal(ya, yb)
    first, second = runs[0]
    assert not np.array_equal(first[0][1], second[0][1]), "same order in two epochs"
    other = _batches(cifar10.make_dataset(x, y, 64, training=True, seed=8), epochs=1)[0]
    assert not np.array_equal(first[0][1], other[0][1]), "seed has no effect"
    assert first[0][0].dtype == np.float32 and first[0][0].shape == (64, 32, 32, 3)


@pytest.mark.slow
def test_augmentation_flips_and_crops_but_keeps_labels(small):
    x, y = small
    plain = _batches(cifar10.make_dataset(x, y, 64, training=True, seed=7, augment=False), 1)[0]
    augmented = _batches(cifar10.make_dataset(x, y, 64, training=True, seed=7), 1)[0]
    changed = 0
    for (xp, yp), (xa, ya) in zip(plain, augmented):
        np.testing.assert_array_equal(yp, ya)  # same order and labels
        originals, outputs = _denormalize(xp), _denormalize(xa)
        changed += int(np.sum(np.any(originals != outputs, axis=(1, 2, 3))))
        for original, output in zip(originals, outputs):
            padded = np.pad(original, ((4, 4), (4, 4), (0, 0)))
            candidates = [
                image[dy : dy + 32, dx : dx + 32]
                for image in (padded, padded[:, ::-1])
                for dy in range(9)
                for dx in range(9)
            ]
            assert any(np.array_equal(output, c) for c in candidates), (
                "augmented image is not a flip + pad-4 crop of its original"
            )
    assert changed > 0.8 * 3 * 64  # 1/162 of them keep the original by chance


@pytest.mark.slow
def test_evaluation_pipeline_keeps_order_and_every_example(small):
    x, y = small
    batches = _batches(cifar10.make_dataset(x, y, 64, training=False), 1)[0]
    assert [len(b[1]) for b in batches] == [64, 64, 64, 8]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in batches]), y)
    np.testing.assert_array_equal(_denormalize(np.concatenate([b[0] for b in batches])), x)
    kept = _batches(cifar10.make_dataset(x, y, 64, training=True, seed=0, drop_remainder=False), 1)[0]
    assert sorted(np.concatenate([b[1] for b in kept]).tolist()) == sorted(y.tolist())


# --------------------------------------------------------------------------
# ResNets


def _check_residual_naming(model):
    adds = [layer for layer in model.layers if layer.name.endswith("_add")]
    assert adds
    for add in adds:
        block = add.name.removesuffix("_add")
        bn = model.get_layer(f"{block}_2_bn")
        assert isinstance(bn, keras.layers.BatchNormalization)
        assert any(t is bn.output for t in add.input), f"{bn.name} does not feed {add.name}"
        assert bn in residual.residual_batch_norms(model)
        conv = model.get_layer(f"{block}_2_conv")
        assert bn.input is conv.output
    return adds


def test_resnet8_size_and_naming():
    model = resnet.cifar_resnet(model_class=tf_gradmix.Model)
    assert isinstance(model, tf_gradmix.Model)
    # By hand: convs 76,720 + BN 4 x 336 + dense 650 (~79k).
    assert model.count_params() == 78_714
    adds = _check_residual_naming(model)
    assert [a.name for a in adds] == ["conv2_block1_add", "conv3_block1_add", "conv4_block1_add"]
    # Projection shortcuts exactly where the shape changes.
    names = {layer.name for layer in model.layers}
    assert {"conv3_block1_0_conv", "conv3_block1_0_bn", "conv4_block1_0_conv"} <= names
    assert "conv2_block1_0_conv" not in names
    assert model.get_layer("conv2_block1_1_bn").momentum == 0.9
    out = model.get_layer("predictions")
    assert out.activation is keras.activations.linear  # logits
    logits = model(np.zeros((2, 32, 32, 3), np.float32))
    assert logits.shape == (2, 10)


def test_resnet18_cifar_size_and_naming():
    model = resnet.resnet18_cifar(num_classes=10)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    # The usual CIFAR ResNet-18: 11,173,962 trainable; + 2 x 4,800 BN statistics.
    assert trainable == 11_173_962
    assert model.count_params() == 11_183_562
    adds = _check_residual_naming(model)
    assert len(adds) == 8
    assert adds[-1].name == "conv5_block2_add"
    assert model.get_layer("conv1_conv").kernel.shape == (3, 3, 3, 64)
    assert model.get_layer("conv5_block2_2_conv").kernel.shape == (3, 3, 512, 512)


# --------------------------------------------------------------------------
# The demo, end to end


@pytest.mark.slow
def test_demo_quick_runs_end_to_end(cifar, tmp_path, capsys):
    from examples import demo

    source, cache_dir, _ = cifar
    out = tmp_path / "demo"
    # ``python -m examples.demo --quick ...`` as the README says, in this process (its logic is tested;
    # a new interpreter would import TensorFlow again).
    capsys.readouterr()
    demo.main(["--quick", "--data-dir", str(source), "--cache-dir", str(cache_dir), "--out", str(out)])
    stdout = capsys.readouterr().out
    assert "| run | batch | stddev | temperature lr(1+s²)/B | train acc | test acc" in stdout
    assert "One seed at CPU scale" in stdout

    results = json.loads((out / "results.json").read_text())["results"]
    assert [r["run"] for r in results] == ["small batch", "full batch (GD)", "GD + GradientMix (gaussian)"]
    assert [r["batch_size"] for r in results] == [32, 100, 100]  # --quick: N = 100
    # Equal rate and steps; the mixed full batch has the small batch's temperature.
    assert len({r["lr"] for r in results}) == 1 and {r["steps"] for r in results} == {4}
    temperatures = [r["lr"] * (1 + r["stddev"] ** 2) / r["batch_size"] for r in results]
    assert temperatures[2] == pytest.approx(temperatures[0]) and temperatures[1] < temperatures[0]
    assert [r["gamma_bar"] is not None for r in results] == [False, False, True]
    for r in results:
        assert all(np.isfinite(r[k]) for k in ("train_acc", "test_acc", "train_loss", "test_loss"))
    assert "full batch (GD)" in (out / "results.md").read_text()
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
