"""Command lines derived from dataclasses: a trainer's settings are defined once.

A trainer declares its settings as a dataclass, one field per flag; the flag
is the field's name with dashes (``train_size`` -> ``--train-size``)::

    @dataclasses.dataclass(frozen=True)
    class Config:
        train_size: int = option(1024, help="N, the training subset")
        filters: tuple[int, int] = option((16, 32))
        noise: str = option("none", choices=("none", "gaussian"))
        augment: bool = option(True, help="flip + crop")   # --augment / --no-augment
        threads: Optional[int] = option(None, affects_result=False)

        def __post_init__(self):           # checks raise ValueError naming the flag
            ...

    config = config_from_argv(Config, ["--train-size", "512"])
    argv_of(config)                         # ['--train-size', '512']: only what differs
    config_from_argv(Config, argv_of(config)) == config

Types a field may have: ``int``, ``float``, ``str``, ``bool`` (``--flag`` /
``--no-flag``), ``Path``, ``Optional`` of these (default ``None``), and
``tuple[X, X]`` (that many values), ``tuple[X, ...]`` or ``list[X]`` (one or
more values; ``metadata["nargs"]`` may fix the count). A field's ``metadata``
(set through :func:`option`, or a plain :func:`dataclasses.field` with the same
keys) holds its help text, choices, extra spellings (``aliases``), argument
group, and whether it changes what the run computes (``affects_result``: paths
and thread counts do not; an experiment's key leaves those out). A boolean
takes both spellings, ``--augment`` and ``--no-augment``; :func:`argv_of`
writes the one that differs from the default.
"""

import argparse
import dataclasses
import types
import typing
from pathlib import Path

SCALARS = (int, float, str, Path)


def option(default=dataclasses.MISSING, *, help="", choices=None, aliases=(), group=None, affects_result=True,
           default_factory=dataclasses.MISSING):
    """A dataclass field that is also a flag: its default, help text, choices and other spellings.

    ``aliases`` are further flags for the same field (e.g. an older spelling
    that recorded commands use); ``group`` names the ``--help`` section;
    ``affects_result=False`` marks a setting that does not change what the
    run computes (where data or outputs live, thread counts).
    """
    metadata = {"help": help, "choices": None if choices is None else tuple(choices), "aliases": tuple(aliases),
                "group": group, "affects_result": bool(affects_result)}
    return dataclasses.field(default=default, default_factory=default_factory, metadata=metadata)


def flag_of(name):
    """``train_size`` -> ``--train-size``."""
    return "--" + name.replace("_", "-")


def _fields(cls):
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"expected a dataclass class, got {cls!r}")
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init]


def _default(field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return dataclasses.MISSING


def _shape(cls, field, hint):
    """``(scalar type, nargs, container)`` of a field: nargs None for one value; container tuple or list."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) != 1 or len(args) != 2:
            raise TypeError(f"{cls.__name__}.{field.name}: only Optional[X] unions are supported, got {hint}")
        return _shape(cls, field, rest[0])
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return args[0], field.metadata.get("nargs", "+"), tuple
        if args and all(a is args[0] for a in args):
            return args[0], len(args), tuple
        raise TypeError(f"{cls.__name__}.{field.name}: tuples must be tuple[X, ...] or of one type X, got {hint}")
    if origin is list and len(args) == 1:
        return args[0], field.metadata.get("nargs", "+"), list
    if hint in SCALARS or hint is bool:
        return hint, None, None
    raise TypeError(f"{cls.__name__}.{field.name}: unsupported type {hint}")


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless it is None or the help text already speaks of it."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def parser_for(cls, description=None, **parser_kwargs):
    """An :class:`argparse.ArgumentParser` with one flag per field of the dataclass ``cls``."""
    doc = (cls.__doc__ or "").strip().split("\n")[0]
    parser = argparse.ArgumentParser(
        description=description if description is not None else doc,
        formatter_class=_HelpFormatter, **parser_kwargs,
    )
    groups = {}
    for field, hint in _fields(cls):
        scalar, nargs, _ = _shape(cls, field, hint)
        meta = field.metadata
        target = parser
        if meta.get("group"):
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        names = [flag_of(field.name), *meta.get("aliases", ())]
        kwargs = {"dest": field.name, "help": meta.get("help") or " "}
        default = _default(field)
        if default is dataclasses.MISSING:
            kwargs["required"] = True
        else:
            kwargs["default"] = default
        if scalar is bool:
            if nargs is not None:
                raise TypeError(f"{cls.__name__}.{field.name}: lists of booleans are not supported")
            target.add_argument(*names, action=argparse.BooleanOptionalAction, **kwargs)
            continue
        if meta.get("choices") is not None:
            kwargs["choices"] = meta["choices"]
        if nargs is not None:
            kwargs["nargs"] = nargs
        target.add_argument(*names, type=scalar, **kwargs)
    return parser


def check_choices(config):
    """Raises ValueError naming the flag when a field (or an element of it) is not among its ``choices``.

    For ``__post_init__``: a config built directly is checked as the command line checks it.
    """
    for field, _ in _fields(type(config)):
        choices = field.metadata.get("choices")
        value = getattr(config, field.name)
        if choices is None or value is None:
            continue
        for item in value if isinstance(value, (tuple, list)) else (value,):
            if item not in choices:
                raise ValueError(f"{flag_of(field.name)} must be one of {', '.join(map(str, choices))}, got {item!r}")


def _converted(cls, values):
    """``values`` (a field -> value mapping) with tuples and lists as the fields' types want them."""
    out = {}
    for field, hint in _fields(cls):
        if field.name not in values:
            continue
        value = values[field.name]
        scalar, nargs, container = _shape(cls, field, hint)
        if container is not None and value is not None:
            if isinstance(value, (str, bytes)) or not isinstance(value, (list, tuple)):
                raise ValueError(f"{flag_of(field.name)} takes a list of values, got {value!r}")
            value = container(scalar(v) if scalar is Path else v for v in value)
        elif scalar is Path and value is not None:
            value = Path(value)
        out[field.name] = value
    return out


def config_from_argv(cls, argv, description=None):
    """The ``cls`` instance a command line gives; a bad flag or value exits with a usage error naming it."""
    parser = parser_for(cls, description)
    namespace = parser.parse_args(list(argv))
    try:
        return cls(**_converted(cls, vars(namespace)))
    except (TypeError, ValueError) as error:
        parser.error(str(error))


def config_from_dict(cls, values):
    """The ``cls`` instance of a mapping such as :func:`values_of` gives (lists back to tuples).

    Fields missing from ``values`` take their defaults; a name that is not a
    field is an error.
    """
    names = {f.name for f, _ in _fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)} (fields: {', '.join(sorted(names))})")
    return cls(**_converted(cls, values))


def values_of(config, affects_result_only=False):
    """The fields of a config as JSON-ready values, in field order.

    Tuples become lists, paths strings, and integers in float fields floats
    (so equal settings give equal JSON, hence equal run keys).
    """
    out = {}
    for field, hint in _fields(type(config)):
        if affects_result_only and not field.metadata.get("affects_result", True):
            continue
        scalar, _, _ = _shape(type(config), field, hint)
        value = getattr(config, field.name)
        if isinstance(value, (tuple, list)):
            out[field.name] = [_json_ready(scalar, v) for v in value]
        else:
            out[field.name] = _json_ready(scalar, value)
    return out


def _json_ready(scalar, value):
    if isinstance(value, Path):
        return str(value)
    if scalar is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # 16 and 16.0 are one setting of a float field
    return value


def _text(value):
    if isinstance(value, float):
        return repr(value)  # the shortest text that parses back to the same float
    return str(value)


def argv_of(config):
    """The flags of ``config`` that differ from the defaults, in field order (a short, exact command line)."""
    return flags_of(type(config), {f.name: getattr(config, f.name) for f, _ in _fields(type(config))})


def flags_of(cls, values):
    """The flags that set the fields ``values`` (a name -> value mapping) of ``cls``, defaults left out.

    For a command line to extend: unlike a ``cls`` instance, the values need
    not make a valid config on their own (``config_from_argv`` checks the
    whole line).
    """
    unknown = sorted(set(values) - {f.name for f, _ in _fields(cls)})
    if unknown:
        raise ValueError(f"{cls.__name__} has no field {', '.join(unknown)}")
    argv = []
    for field, hint in _fields(cls):
        if field.name not in values:
            continue
        value, default = values[field.name], _default(field)
        scalar, nargs, _ = _shape(cls, field, hint)
        if default is not dataclasses.MISSING and value == default and type(value) is type(default):
            continue
        flag = flag_of(field.name)
        if value is None:
            raise ValueError(f"{flag}: None differs from the default {default!r} and has no command-line spelling")
        if scalar is bool:
            argv.append(flag if value else "--no-" + flag[2:])
        elif nargs is not None:
            if not value:
                raise ValueError(f"{flag}: an empty list has no command-line spelling")
            argv += [flag, *map(_text, value)]
        else:
            argv += [flag, _text(value)]
    return argv
