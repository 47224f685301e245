"""examples/config.py: command lines derived from dataclasses, and every trainer's Config round trip."""

import dataclasses
import importlib
import re
from pathlib import Path
from typing import Optional

import pytest

from examples import config as cfg

pytestmark = pytest.mark.backend_independent  # the scripts' logic, the same on every backend

REPO = Path(__file__).resolve().parents[2]


@dataclasses.dataclass(frozen=True)
class Sample:
    """A sample of every kind of field."""

    train_size: int = cfg.option(1024, help="N, the training subset", group="data")
    lr: float = cfg.option(0.05, help="the rate")
    noise: str = cfg.option("none", choices=("none", "gaussian", "rademacher"))
    filters: tuple[int, int] = cfg.option((16, 32))
    rates: tuple[float, ...] = cfg.option((0.05, 0.1))
    names: list[str] = cfg.option(default_factory=lambda: ["a"], choices=("a", "b", "c"))
    augment: bool = cfg.option(True, help="flip + crop")
    quick: bool = cfg.option(False)
    stddev: Optional[float] = cfg.option(None)
    data_dir: Optional[Path] = cfg.option(None, aliases=("--data_dir",), affects_result=False)

    def __post_init__(self):
        cfg.check_choices(self)
        if self.train_size <= 0:
            raise ValueError(f"--train-size must be positive, got {self.train_size}")


def test_flags_are_the_field_names_with_dashes_and_parse_to_the_field_types():
    config = cfg.config_from_argv(Sample, [
        "--train-size", "512", "--lr", "0.1", "--noise", "gaussian", "--filters", "8", "4",
        "--rates", "1e-3", "3e-3", "1e-2", "--names", "b", "c", "--no-augment", "--quick", "--stddev", "0.5",
        "--data_dir", "/tmp/d",
    ])
    assert config == Sample(512, 0.1, "gaussian", (8, 4), (1e-3, 3e-3, 1e-2), ["b", "c"], False, True, 0.5,
                            Path("/tmp/d"))
    assert isinstance(config.filters, tuple) and isinstance(config.rates, tuple) and isinstance(config.data_dir, Path)
    assert cfg.config_from_argv(Sample, []) == Sample()
    assert cfg.config_from_argv(Sample, ["--data-dir", "/tmp/d"]).data_dir == Path("/tmp/d")  # both spellings
    assert cfg.config_from_argv(Sample, ["--augment"]).augment is True
    assert cfg.config_from_argv(Sample, ["--no-quick"]).quick is False


def test_argv_has_only_the_flags_that_differ_from_the_defaults_and_round_trips():
    assert cfg.argv_of(Sample()) == []
    config = Sample(train_size=100, lr=0.1 + 0.2, filters=(1, 2), names=["c"], augment=False, quick=True,
                    stddev=1.7320508075688772, data_dir=Path("/x"))
    argv = cfg.argv_of(config)
    assert argv == ["--train-size", "100", "--lr", "0.30000000000000004", "--filters", "1", "2", "--names", "c",
                    "--no-augment", "--quick", "--stddev", "1.7320508075688772", "--data-dir", "/x"]
    assert cfg.config_from_argv(Sample, argv) == config  # floats exactly, not rounded
    with pytest.raises(ValueError, match="--filters: an empty list"):
        cfg.argv_of(Sample(filters=()))
    # Flags of some fields, to extend: train_size 0 alone is no valid Sample, the whole line decides.
    assert cfg.flags_of(Sample, {"train_size": 0, "lr": 0.05, "quick": True}) == ["--train-size", "0", "--quick"]
    assert cfg.config_from_argv(Sample, cfg.flags_of(Sample, {"train_size": 0}) + ["--train-size", "8"]).train_size == 8
    with pytest.raises(ValueError, match="Sample has no field epochs"):
        cfg.flags_of(Sample, {"epochs": 1})


def test_bad_values_exit_with_a_usage_error_naming_the_flag(capsys):
    for argv, named in ((["--train-size", "0"], "--train-size must be positive, got 0"),
                        (["--noise", "uniform"], "--noise: invalid choice: 'uniform'"),
                        (["--filters", "1"], "--filters: expected 2 arguments"),
                        (["--lr", "fast"], "--lr: invalid float value: 'fast'"),
                        (["--names", "z"], "--names: invalid choice: 'z'"),
                        (["--frobnicate"], "unrecognized arguments: --frobnicate")):
        with pytest.raises(SystemExit) as exit_:
            cfg.config_from_argv(Sample, argv)
        assert exit_.value.code == 2
        assert named in capsys.readouterr().err


def test_a_config_built_directly_is_checked_as_the_command_line_is():
    with pytest.raises(ValueError, match="--noise must be one of none, gaussian, rademacher, got 'uniform'"):
        Sample(noise="uniform")
    with pytest.raises(ValueError, match="--names must be one of a, b, c, got 'z'"):
        Sample(names=["a", "z"])


def test_help_shows_the_field_metadata_groups_and_defaults():
    text = cfg.parser_for(Sample).format_help()
    assert "A sample of every kind of field." in text
    assert re.search(r"data:\s+--train-size TRAIN_SIZE\s+N, the training subset \(default: 1024\)", text)
    assert re.search(r"--augment, --no-augment\s+flip \+ crop", text)
    assert "--data-dir DATA_DIR, --data_dir DATA_DIR" in text
    assert "{none,gaussian,rademacher}" in text


def test_dicts_convert_back_to_the_field_types_and_unknown_names_are_refused():
    config = Sample(filters=(3, 4), data_dir=Path("/d"))
    values = cfg.values_of(config)
    assert values["filters"] == [3, 4] and values["data_dir"] == "/d"
    assert "data_dir" not in cfg.values_of(config, affects_result_only=True)
    assert cfg.values_of(Sample(lr=2, rates=(1, 0.5)))["lr"] == 2.0 and cfg.values_of(Sample(rates=(1, 0.5)))[
        "rates"] == [1.0, 0.5] and isinstance(cfg.values_of(Sample(lr=2))["lr"], float)
    assert cfg.config_from_dict(Sample, values) == config
    assert cfg.config_from_dict(Sample, {"lr": 0.2}) == Sample(lr=0.2)
    with pytest.raises(ValueError, match="Sample has no field epochs"):
        cfg.config_from_dict(Sample, {"epochs": 3})
    with pytest.raises(ValueError, match="--filters takes a list of values, got '16'"):
        cfg.config_from_dict(Sample, {"filters": "16"})


def test_unsupported_field_types_are_refused_by_name():
    @dataclasses.dataclass
    class Odd:
        pair: tuple[int, str] = (1, "a")

    with pytest.raises(TypeError, match=r"Odd.pair: tuples must be"):
        cfg.parser_for(Odd)


# -- every trainer's Config -----------------------------------------------------


def trainer_modules():
    """The example modules that define a ``Config`` (found by text: nothing is imported to list them)."""
    return sorted(f"examples.{p.stem}" for p in (REPO / "examples").glob("*.py")
                  if re.search(r"^class Config\b", p.read_text(), re.M))


def _candidates(field, value):
    """Non-default values to try for one field (the Config's own checks may refuse some)."""
    choices = field.metadata.get("choices")
    if isinstance(value, bool):
        return [not value]
    if choices is not None and not isinstance(value, (tuple, list)):
        return [c for c in choices if c != value]
    if isinstance(value, int):
        return [value * 2, value + 1, 1, 2, 0]
    if isinstance(value, float):
        return [value * 2, value / 2, value + 0.25, 0.5, 1.0]
    if isinstance(value, (tuple, list)):
        if choices is not None:
            return [type(value)(c for c in choices if c not in value) or type(value)(choices[:1])]
        return [type(value)(v * 2 for v in value), type(value)(v + 1 for v in value)]
    if isinstance(value, str):
        return [value + "-other"]
    hint = str(field.type)
    if value is None and "int" in hint:
        return [1, 2, 4, 16]
    if value is None and "float" in hint:
        return [0.5, 1.0, 2.0]
    if value is None:
        return ["/tmp/other"]
    raise AssertionError(f"no candidate values for {field.name}={value!r}")


def _changed(default, fields, name):
    """``default`` with field ``name`` at a non-default value its Config accepts, alone or with one other field."""
    others = [(f.name, v) for f in fields if f.name != name for v in _candidates(f, getattr(default, f.name))]
    for value in _candidates(next(f for f in fields if f.name == name), getattr(default, name)):
        if value == getattr(default, name):
            continue
        for extra in [{}] + [{other: v} for other, v in others]:  # e.g. a flag valid only with another one
            try:
                changed = dataclasses.replace(default, **{name: value}, **extra)
            except ValueError:
                continue
            if getattr(changed, name) != getattr(default, name):
                return changed
    raise AssertionError(f"{type(default).__module__}.Config.{name}: no non-default value accepted")


@pytest.mark.parametrize("module", trainer_modules())
def test_every_field_of_every_trainer_config_round_trips_through_its_command_line(module):
    Config = importlib.import_module(module).Config
    default = Config()
    assert cfg.argv_of(default) == [] and cfg.config_from_argv(Config, []) == default
    fields = dataclasses.fields(Config)
    for field in fields:
        changed = _changed(default, fields, field.name)
        argv = cfg.argv_of(changed)
        assert cfg.flag_of(field.name) in argv or "--no-" + cfg.flag_of(field.name)[2:] in argv, argv
        assert cfg.config_from_argv(Config, argv) == changed, (field.name, argv)
        assert cfg.config_from_dict(Config, cfg.values_of(changed)) == changed
