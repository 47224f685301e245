"""CIFAR-10 for the examples: an offline loader and tf.data input pipelines.

Where the images come from: ``data_dir`` passed to :func:`load_cifar10`
(``--data-dir`` in scripts), else ``$TF_GRADMIX_DATA`` (the search of
``examples/data.py``); with neither, ``keras.datasets.cifar10.load_data()``,
which downloads.

A data directory may hold ``cifar10-jpeg/cifar10-jpeg.tar.gz`` (or the tar
directly), or an extracted copy with ``train/<class>/*.jpg`` and
``test/<class>/*.jpg``. An explicit ``data_dir`` or ``TF_GRADMIX_DATA`` that
holds neither is an error, never a silent download.

The tar is read in place (nothing is copied into the repository), decoded with
``tf.io.decode_jpeg`` (with Pillow where TensorFlow is not installed) in sorted
path order (the two decoders round differently: about 1 of 255 intensity levels
on average, at most 5, so each has its own cache file), and the uint8 arrays are cached as
an ``.npz`` under ``cache_dir``, ``$TF_GRADMIX_CACHE`` or ``~/.cache/tf_gradmix``,
keyed by the tar's sha256 (the folder's file names, sizes and mtimes for an
extracted copy). A cache file is checked (shapes, labels, a checksum of the
arrays) before use and rebuilt when it does not match. :func:`load_cifar10_subset`
gives class-balanced subsets (as :func:`subset` of the full arrays) decoding only
their images, for quick runs.

The JPEG copy (quality about 75) is slightly lossy against the original
release: expect about a point lower accuracy than published CIFAR-10 numbers.

Example::

    (x_train, y_train), (x_test, y_test) = load_cifar10()
    x_small, y_small = subset(x_train, y_train, 10_000, seed=0)
    train_ds = make_dataset(x_small, y_small, 2048, training=True, seed=0)
    test_ds = make_dataset(x_test, y_test, 1000, training=False)
"""

import hashlib
import os
import re
import tarfile
import tempfile
from pathlib import Path

import numpy as np

from examples import data

__all__ = [
    "CLASSES",
    "MEAN",
    "STD",
    "find_cifar10",
    "load_cifar10",
    "load_cifar10_subset",
    "subset",
    "balanced_indices",
    "train_val_indices",
    "train_val_split",
    "make_dataset",
    "normalize",
    "augment_image",
]

#: Class names in label order.
CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
NUM_TRAIN_PER_CLASS = 5000
NUM_TEST_PER_CLASS = 1000
IMAGE_SHAPE = (32, 32, 3)

#: Per-channel mean and standard deviation of the CIFAR-10 training images
#: (in [0, 1]), used to normalise inputs.
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

TAR_NAME = "cifar10-jpeg.tar.gz"
CACHE_ENV = "TF_GRADMIX_CACHE"
_MEMBER = re.compile(r"^(?:\./)?(train|test)/([a-z]+)/([^/]+\.jpe?g)$", re.IGNORECASE)
_CACHE_FORMAT = 1


# --------------------------------------------------------------------------
# Finding the data


def _source_in(directory):
    """The tar or extracted folder of CIFAR-10 JPEGs in ``directory``, or None."""
    directory = Path(directory).expanduser()
    if directory.is_file() and directory.name.endswith((".tar.gz", ".tgz", ".tar")):
        return directory
    for base in (directory / "cifar10-jpeg", directory):
        if (base / TAR_NAME).is_file():
            return base / TAR_NAME
        if (base / "train").is_dir() and (base / "test").is_dir():
            return base
    return None


def find_cifar10(data_dir=None):
    """Where :func:`load_cifar10` reads CIFAR-10 from.

    Args:
        data_dir: a directory (or the tar itself) to use; see the module
            docstring for the search order.

    Returns:
        The path of the tar or of the extracted folder, or ``None`` when only
        the ``keras.datasets`` download is left.

    Raises:
        FileNotFoundError: ``data_dir`` or ``$TF_GRADMIX_DATA`` is set but
            holds no CIFAR-10 JPEG copy.
    """
    return data.find(
        data_dir, _source_in, "CIFAR-10 JPEG copy",
        f"cifar10-jpeg/{TAR_NAME}, {TAR_NAME}, or train/<class>/*.jpg and test/<class>/*.jpg folders",
    )


# --------------------------------------------------------------------------
# Reading and decoding


def _source_key(source):
    """A key that changes whenever the source's content may have changed."""
    digest = hashlib.sha256()
    if source.is_file():
        with open(source, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        return "sha256-" + digest.hexdigest()
    for path in sorted(source.glob("t*/*/*")):
        stat = path.stat()
        digest.update(f"{path.relative_to(source)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return "files-" + digest.hexdigest()


def _read_encoded(source):
    """``{split: [(class, name, jpeg_bytes), ...]}`` from a tar or a folder."""
    found = {"train": [], "test": []}
    if source.is_file():
        with tarfile.open(source, "r:*") as tar:
            for member in tar:
                match = _MEMBER.match(member.name)
                if member.isfile() and match:
                    split, cls, name = match.groups()
                    found[split].append((cls, name, tar.extractfile(member).read()))
    else:
        for split in found:
            for path in (source / split).glob("*/*"):
                if path.suffix.lower() in (".jpg", ".jpeg"):
                    found[split].append((path.parent.name, path.name, path.read_bytes()))
    return found


def decoder():
    """``"tensorflow"`` where TensorFlow imports, else ``"pillow"`` (machines without TensorFlow)."""
    try:
        import tensorflow  # noqa: F401
    except ImportError:
        return "pillow"
    return "tensorflow"


def _decode_with_tensorflow(jpegs):
    import tensorflow as tf

    def decode(jpeg):
        image = tf.io.decode_jpeg(jpeg, channels=3)
        return tf.ensure_shape(image, IMAGE_SHAPE)

    dataset = (
        tf.data.Dataset.from_tensor_slices(jpegs)
        .map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        .batch(5000)
    )
    return np.concatenate([batch.numpy() for batch in dataset])


def _decode_with_pillow(jpegs):
    import io

    from PIL import Image

    images = np.empty((len(jpegs), *IMAGE_SHAPE), np.uint8)
    for i, jpeg in enumerate(jpegs):
        with Image.open(io.BytesIO(jpeg)) as image:
            images[i] = np.asarray(image.convert("RGB"))
    return images


def _decode(records, split, expected_per_class, using=None, select=None):
    """Sorted, decoded ``(images uint8 [N,32,32,3], labels int64 [N])``.

    ``using``: ``"tensorflow"`` or ``"pillow"``; default :func:`decoder`.
    ``select``: optional function of the sorted labels returning the indices
    to decode; then only those images and labels are returned, in that order.
    """
    using = using or decoder()
    if using not in ("tensorflow", "pillow"):
        raise ValueError(f"`using` must be 'tensorflow' or 'pillow', got {using!r}")
    unknown = sorted({cls for cls, _, _ in records} - set(CLASSES))
    if unknown:
        raise ValueError(f"Unknown CIFAR-10 class folders in {split}/: {unknown}")
    records = sorted(records, key=lambda r: (CLASSES.index(r[0]), r[1]))
    labels = np.array([CLASSES.index(cls) for cls, _, _ in records], np.int64)
    counts = np.bincount(labels, minlength=len(CLASSES))
    if not np.all(counts == expected_per_class):
        raise ValueError(
            f"CIFAR-10 {split}/ has {counts.tolist()} images per class, expected "
            f"{expected_per_class} each."
        )

    jpegs = [jpeg for _, _, jpeg in records]
    if select is not None:
        idx = select(labels)
        jpegs, labels = [jpegs[i] for i in idx], labels[idx]
    images = _decode_with_tensorflow(jpegs) if using == "tensorflow" else _decode_with_pillow(jpegs)
    return images, labels


def _checksum(*arrays):
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).data)
    return digest.hexdigest()


def _check_arrays(x_train, y_train, x_test, y_test, sizes=None):
    """Checks CIFAR-10's shapes and labels; ``sizes``: ``(train, test)`` of class-balanced subsets."""
    for i, (name, x, y, per_class) in enumerate((
        ("train", x_train, y_train, NUM_TRAIN_PER_CLASS),
        ("test", x_test, y_test, NUM_TEST_PER_CLASS),
    )):
        n = per_class * len(CLASSES) if sizes is None else sizes[i]
        counts = [n // 10 + (c < n % 10) for c in range(10)]
        if x.shape != (n, *IMAGE_SHAPE) or x.dtype != np.uint8:
            raise ValueError(f"{name} images: shape {x.shape} {x.dtype}, expected ({n}, 32, 32, 3) uint8")
        if y.shape != (n,) or np.bincount(y, minlength=10).tolist() != counts:
            raise ValueError(f"{name} labels: not {counts} of the 10 classes")


def _cache_dir(cache_dir):
    if cache_dir is None:
        cache_dir = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "tf_gradmix"
    return Path(cache_dir).expanduser()


def _cache_file(source, using, cache_dir, subset=""):
    """``(key, path)`` of the decoded cache of ``source`` by decoder ``using`` (``subset``: a subset's suffix).

    The decoders' IDCTs differ by a few intensity levels: one cache each.
    """
    key = _source_key(source)
    decoder_suffix = "" if using == "tensorflow" else f"-{using}"
    return (f"{key}{subset}{decoder_suffix}",
            _cache_dir(cache_dir) / f"cifar10-jpeg-{key[:24]}{subset}{decoder_suffix}.npz")


def _load_cache(path, key, sizes=None):
    """The cached arrays if ``path`` is a valid cache for ``key``, else None (``sizes``: of a subset)."""
    try:
        with np.load(path, allow_pickle=False) as cache:
            if int(cache["format"]) != _CACHE_FORMAT or str(cache["key"]) != key:
                return None
            arrays = tuple(cache[k] for k in ("x_train", "y_train", "x_test", "y_test"))
            if str(cache["checksum"]) != _checksum(*arrays):
                return None
        _check_arrays(*arrays, sizes=sizes)
        return arrays
    except (OSError, KeyError, ValueError):
        return None


def _save_cache(path, key, arrays):
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.stem, suffix=".tmp.npz")
    os.close(fd)
    try:
        np.savez(
            tmp,
            format=_CACHE_FORMAT,
            key=key,
            checksum=_checksum(*arrays),
            **dict(zip(("x_train", "y_train", "x_test", "y_test"), arrays)),
        )
        os.replace(tmp, path)  # atomic: concurrent loaders never see half a file
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_cifar10(data_dir=None, cache_dir=None, verbose=True):
    """Loads CIFAR-10 as uint8 arrays, offline when a local copy exists.

    Args:
        data_dir: directory holding the JPEG copy (see module docstring);
            default ``$TF_GRADMIX_DATA``, then ``keras.datasets``.
        cache_dir: where decoded arrays are cached; default
            ``$TF_GRADMIX_CACHE``, then ``~/.cache/tf_gradmix``.
        verbose: print where the data came from.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``: images uint8
        ``[50000, 32, 32, 3]`` and ``[10000, 32, 32, 3]``, labels int64
        ``[50000]`` and ``[10000]`` in :data:`CLASSES` order. The JPEG copy is
        sorted by class, then file name; the ``keras.datasets`` copy keeps
        its own order.
    """
    say = print if verbose else (lambda *a, **k: None)
    source = find_cifar10(data_dir)
    if source is None:
        import keras

        say("CIFAR-10: no local copy found; using keras.datasets.cifar10 (downloads).")
        (x_train, y_train), (x_test, y_test) = keras.datasets.cifar10.load_data()
        return (x_train, y_train.reshape(-1).astype(np.int64)), (
            x_test,
            y_test.reshape(-1).astype(np.int64),
        )

    using = decoder()
    key, cache = _cache_file(source, using, cache_dir)
    arrays = _load_cache(cache, key) if cache.exists() else None
    if arrays is not None:
        say(f"CIFAR-10: {source} (decoded cache {cache})")
    else:
        say(f"CIFAR-10: decoding {source} ...", flush=True)
        records = _read_encoded(source)
        x_train, y_train = _decode(records["train"], "train", NUM_TRAIN_PER_CLASS, using)
        x_test, y_test = _decode(records["test"], "test", NUM_TEST_PER_CLASS, using)
        arrays = (x_train, y_train, x_test, y_test)
        _check_arrays(*arrays)
        _save_cache(cache, key, arrays)
        say(f"CIFAR-10: cached decoded arrays in {cache}")
    x_train, y_train, x_test, y_test = arrays
    return (x_train, y_train), (x_test, y_test)


def load_cifar10_subset(train_size, test_size, seed=0, data_dir=None, cache_dir=None, verbose=True):
    """Class-balanced subsets of CIFAR-10, decoding only their images.

    Equal to :func:`subset` of :func:`load_cifar10`'s arrays
    (``subset(x_train, y_train, train_size, seed)`` and the same of the test
    set), without decoding the other images: for quick runs on a few hundred
    images. A full decoded cache, where one exists, is used; otherwise the
    subset's arrays get a cache file of their own.

    Args:
        train_size: training images (at most 50,000).
        test_size: test images (at most 10,000).
        seed: the subsets' seed.
        data_dir, cache_dir, verbose: as for :func:`load_cifar10`.

    Returns:
        ``((x_train, y_train), (x_test, y_test))``, as :func:`subset` returns them.
    """
    for name, value, most in (("train_size", train_size, 10 * NUM_TRAIN_PER_CLASS),
                              ("test_size", test_size, 10 * NUM_TEST_PER_CLASS)):
        if not 1 <= value <= most:
            raise ValueError(f"Invalid value for argument `{name}`: expected 1 to {most}, got {value}.")
    say = print if verbose else (lambda *a, **k: None)
    source = find_cifar10(data_dir)
    using = decoder()
    if source is None or _cache_file(source, using, cache_dir)[1].exists():
        (x_train, y_train), (x_test, y_test) = load_cifar10(data_dir, cache_dir, verbose)
        return subset(x_train, y_train, train_size, seed), subset(x_test, y_test, test_size, seed)

    subset_key, cache = _cache_file(source, using, cache_dir, f"-subset-{train_size}-{test_size}-{seed}")
    arrays = _load_cache(cache, subset_key, (train_size, test_size)) if cache.exists() else None
    if arrays is not None:
        say(f"CIFAR-10: {source} (decoded subset cache {cache})")
    else:
        say(f"CIFAR-10: decoding {train_size} + {test_size} images of {source} ...", flush=True)
        records = _read_encoded(source)
        x_train, y_train = _decode(records["train"], "train", NUM_TRAIN_PER_CLASS, using,
                                   select=lambda y: balanced_indices(y, train_size, seed))
        x_test, y_test = _decode(records["test"], "test", NUM_TEST_PER_CLASS, using,
                                 select=lambda y: balanced_indices(y, test_size, seed))
        arrays = (x_train, y_train, x_test, y_test)
        _save_cache(cache, subset_key, arrays)
        say(f"CIFAR-10: cached the decoded subset in {cache}")
    x_train, y_train, x_test, y_test = arrays
    return (x_train, y_train), (x_test, y_test)


# --------------------------------------------------------------------------
# Subsets and splits


def balanced_indices(y, n, seed, exclude=None):
    """Indices of ``n`` examples, as equal a number from each class as possible.

    Classes get ``n // C`` each and the first ``n % C`` classes (label order)
    one more. The result is a pure function of ``(y, n, seed, exclude)``, in
    a shuffled order (so batching it unshuffled does not give class blocks).

    Args:
        y: int labels ``[N]``.
        n: how many examples.
        seed: int seed.
        exclude: optional indices that must not be chosen.
    """
    y = np.asarray(y)
    classes = np.unique(y)
    rng = np.random.default_rng(seed)
    allowed = np.ones(len(y), bool)
    if exclude is not None:
        allowed[np.asarray(exclude)] = False
    chosen = []
    for i, cls in enumerate(classes):
        want = n // len(classes) + (1 if i < n % len(classes) else 0)
        pool = np.flatnonzero((y == cls) & allowed)
        if want > len(pool):
            raise ValueError(
                f"Invalid value for argument `n`: {n} needs {want} examples of class "
                f"{cls}, only {len(pool)} available."
            )
        chosen.append(rng.choice(pool, size=want, replace=False))
    return rng.permutation(np.concatenate(chosen))


def subset(x, y, n, seed=0):
    """A fixed, class-balanced subset ``(x[idx], y[idx])`` of ``n`` examples."""
    idx = balanced_indices(y, n, seed)
    return x[idx], y[idx]


def train_val_indices(y, val_size, seed=0):
    """The indices of :func:`train_val_split`: ``(train, val)``, without copying any image."""
    val = balanced_indices(y, val_size, seed)
    train = np.setdiff1d(np.arange(len(y)), val)
    return np.random.default_rng(seed).permutation(train), val


def train_val_split(x, y, val_size, seed=0):
    """Holds a class-balanced validation set out of a training set.

    Returns:
        ``((x_train, y_train), (x_val, y_val))``; the two share no example.
    """
    train, val = train_val_indices(y, val_size, seed)
    return (x[train], y[train]), (x[val], y[val])


# --------------------------------------------------------------------------
# tf.data pipelines


def normalize(images):
    """uint8 images to float32, per channel ``(x / 255 - MEAN) / STD``."""
    import tensorflow as tf

    images = tf.cast(images, tf.float32) / 255.0
    return (images - tf.constant(MEAN)) / tf.constant(STD)


def augment_image(image, seed):
    """Random horizontal flip and pad-4 random 32x32 crop, stateless.

    Args:
        image: uint8 ``[32, 32, 3]``.
        seed: int64 ``[2]`` stateless seed; the same seed, the same result.
    """
    import tensorflow as tf

    flip_seed, crop_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
    image = tf.pad(image, [[4, 4], [4, 4], [0, 0]], mode="CONSTANT")
    return tf.image.stateless_random_crop(image, IMAGE_SHAPE, crop_seed)


def make_dataset(
    x,
    y,
    batch_size,
    training,
    seed=0,
    augment=True,
    drop_remainder=None,
    prefetch=True,
):
    """A tf.data pipeline of normalised ``(images float32, labels int64)`` batches.

    Training pipelines shuffle the whole array and (with ``augment``) flip and
    pad-4 random crop each image. Both are seeded: a pipeline built twice with
    the same seed yields the same batches, epoch after epoch; each new
    iteration (each Keras epoch) gets a new order and new crops. Evaluation
    pipelines keep the order and never augment.

    Args:
        x: uint8 images ``[N, 32, 32, 3]``.
        y: int labels ``[N]``.
        batch_size: examples per batch.
        training: shuffle (and augment) when True.
        seed: int seed of the order and the augmentation.
        augment: flip + crop when training.
        drop_remainder: drop the last partial batch; default ``training``, so
            every training step sees exactly ``batch_size`` examples.
        prefetch: add ``prefetch(AUTOTUNE)``.
    """
    import tensorflow as tf

    if drop_remainder is None:
        drop_remainder = bool(training)
    y = np.asarray(y, np.int64)
    dataset = tf.data.Dataset.from_tensor_slices((x, y))
    if training:
        dataset = dataset.shuffle(len(y), seed=seed, reshuffle_each_iteration=True)
    if training and augment:
        # One int64 per example from a seeded stream that is redrawn, in a
        # fixed sequence, on every new iteration: new crops each epoch,
        # the same ones in every run.
        draws = tf.data.Dataset.random(seed=seed + 1, rerandomize_each_iteration=True)
        dataset = tf.data.Dataset.zip((dataset, draws)).map(
            lambda pair, draw: (augment_image(pair[0], tf.stack([draw, tf.constant(seed, tf.int64)])), pair[1]),
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
    dataset = dataset.batch(batch_size, drop_remainder=drop_remainder)
    dataset = dataset.map(
        lambda images, labels: (normalize(images), labels),
        num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True,
    )
    if prefetch:
        dataset = dataset.prefetch(tf.data.AUTOTUNE)
    return dataset

