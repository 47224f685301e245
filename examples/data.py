"""Where the examples find their data sets, and the data arguments of their command lines.

Every loader (``examples/cifar10.py``, ``examples/multi30k.py``) looks in
``data_dir`` when given (``--data-dir`` in scripts), else in the directory
named by the environment variable ``TF_GRADMIX_DATA``. A directory given
either way that holds no copy is an error, never a silent fallback; with
neither, the loader uses its library's download (``keras.datasets``,
TensorFlow Datasets) or says that there is none.
"""

import os

from examples.config import option

__all__ = ["DATA_ENV", "find", "data_dir_field", "cache_dir_field"]

DATA_ENV = "TF_GRADMIX_DATA"


def find(data_dir, locate, name, expected):
    """The data set's location in ``data_dir``, else in ``$TF_GRADMIX_DATA``.

    Args:
        data_dir: the directory the caller was given, or None.
        locate: ``locate(directory) -> Path | None``, the data set inside
            ``directory`` (None: not there).
        name: the data set's name, for the error message (``"CIFAR-10 JPEG copy"``).
        expected: what ``locate`` looks for, for the error message.

    Returns:
        What ``locate`` found, or None when neither ``data_dir`` nor
        ``$TF_GRADMIX_DATA`` is set.

    Raises:
        FileNotFoundError: ``data_dir`` or ``$TF_GRADMIX_DATA`` is set but
            ``locate`` finds nothing there.
    """
    for origin, directory in (("data_dir", data_dir), (DATA_ENV, os.environ.get(DATA_ENV))):
        if directory:
            found = locate(directory)
            if found is None:
                raise FileNotFoundError(f"No {name} in {origin}={str(directory)!r}: expected {expected}.")
            return found
    return None


def data_dir_field(what, otherwise=None):
    """A Config field ``data_dir`` (flag ``--data-dir``): the directory that holds ``what``.

    ``otherwise``: where the loader turns when neither the flag nor ``$TF_GRADMIX_DATA`` is set.
    """
    fallback = f", then {otherwise}" if otherwise else ""
    return option(None, help=f"{what} (default: ${DATA_ENV}{fallback})", affects_result=False, group="data")


def cache_dir_field():
    """A Config field ``cache_dir`` (flag ``--cache-dir``): where decoded arrays are cached."""
    return option(None, help="decoded-array cache (default: $TF_GRADMIX_CACHE or ~/.cache/tf_gradmix)",
                  affects_result=False, group="data")
