"""Old public names: one helper serves them, each with the version that removes it.

A module lists its old names and hands the list to :func:`module_getattr`,
which becomes the module's ``__getattr__`` (PEP 562). Reading an old name
then warns with a ``DeprecationWarning`` that names the replacement and the
first version without the old name, and returns the replacement, imported
only at that moment (so an old name adds no import between modules). A name
that is already gone raises an ``AttributeError`` that says where it went.

Example::

    __getattr__ = deprecation.module_getattr(__name__, {
        "set_residual_gamma": deprecation.Renamed("tf_gradmix.residual.set_residual_gamma", "0.2.0"),
    })
"""

import dataclasses
import importlib
import warnings

__all__ = ["Moved", "Renamed", "module_getattr"]


@dataclasses.dataclass(frozen=True)
class Renamed:
    """An old name that still works until ``removal_version``.

    Args:
        replacement: the full dotted path of the new name, e.g.
            ``"tf_gradmix.residual.set_residual_gamma"``.
        removal_version: the first tf_gradmix version without the old name.
    """

    replacement: str
    removal_version: str


@dataclasses.dataclass(frozen=True)
class Moved:
    """An old name that is gone: reading it raises and names ``replacement``."""

    replacement: str
    reason: str = ""


def _resolve(path):
    module_name, _, attribute = path.rpartition(".")
    return getattr(importlib.import_module(module_name), attribute)


def module_getattr(module_name, names):
    """A module ``__getattr__`` serving the old ``names`` of ``module_name``.

    Args:
        module_name: the module's ``__name__``.
        names: ``{old_name: Renamed(...) or Moved(...)}``.

    Returns:
        A function to assign to the module's ``__getattr__``.
    """
    names = dict(names)
    for old, entry in names.items():
        if not isinstance(entry, (Renamed, Moved)):
            raise TypeError(f"names[{old!r}] must be a Renamed or Moved entry, got {entry!r}")

    def __getattr__(name):
        entry = names.get(name)
        if isinstance(entry, Renamed):
            warnings.warn(
                f"{module_name}.{name} is deprecated and will be removed in tf_gradmix "
                f"{entry.removal_version}; use {entry.replacement}.",
                DeprecationWarning,
                stacklevel=2,
            )
            return _resolve(entry.replacement)
        if isinstance(entry, Moved):
            raise AttributeError(f"{module_name}.{name} moved to {entry.replacement}" + (
                f": {entry.reason}" if entry.reason else "."))
        raise AttributeError(f"module {module_name!r} has no attribute {name!r}")

    return __getattr__
