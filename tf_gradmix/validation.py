"""Argument checks shared by every module of tf_gradmix.

Bad input fails at once with an error naming the argument and the value:
``Invalid value for argument `name`: value. Expected ...``. Each check
returns the value in its normal form (``float``, ``int``, ``list``), so a
constructor stores what the check returns.
"""

import math
import numbers
import re

import keras

__all__ = [
    "invalid",
    "number",
    "integer",
    "multiple",
    "boolean",
    "one_of",
    "learning_rate",
    "patterns",
]


def invalid(name, value, expected, error=ValueError):
    """The error for argument ``name`` holding ``value`` (not raised here)."""
    return error(f"Invalid value for argument `{name}`: {value!r}. Expected {expected}.")


def _interval(low, high, low_open, high_open):
    return (
        f"{'(' if low_open else '['}{'-inf' if low is None else low}, "
        f"{'inf' if high is None else high}{')' if high_open else ']'}"
    )


def number(name, value, low=None, high=None, low_open=False, high_open=False, error=ValueError):
    """``value`` as a finite float in ``[low, high]`` (ends open when asked).

    ``None`` bounds are unbounded. ``bool`` and non-real values raise
    ``error`` (``ValueError`` by default).
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(name, value, "a real number", error)
    number = float(value)
    out_of_range = (
        not math.isfinite(number)
        or (low is not None and (number <= low if low_open else number < low))
        or (high is not None and (number >= high if high_open else number > high))
    )
    if out_of_range:  # the message shows the value as given
        raise invalid(name, value, f"a finite number in {_interval(low, high, low_open, high_open)}")
    return number


def integer(name, value, low=None, high=None):
    """``value`` as an int in ``[low, high]``; ``bool`` and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise invalid(name, value, f"an integer in {_interval(low, high, False, False)}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise invalid(name, value, f"an integer in {_interval(low, high, False, False)}")
    return int(value)


def multiple(name, value, divisor, divisor_text):
    """``value`` as an int ``>= 1`` that ``divisor`` divides (``divisor_text`` names it)."""
    value = integer(name, value, low=1)
    if value % divisor:
        raise invalid(name, value, f"a multiple of {divisor_text}")
    return value


def boolean(name, value):
    """``value`` if it is ``True`` or ``False``."""
    if not isinstance(value, bool):
        raise invalid(name, value, "True or False")
    return value


def one_of(name, value, choices):
    """``value`` if it is one of ``choices``."""
    if value not in choices:
        raise invalid(name, value, f"one of {tuple(choices)}")
    return value


def learning_rate(value, name="learning_rate"):
    """A float ``>= 0``; a ``LearningRateSchedule`` or a callable passes through."""
    if isinstance(value, keras.optimizers.schedules.LearningRateSchedule) or callable(value):
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise invalid(
            name,
            value,
            "a float >= 0, a keras.optimizers.schedules.LearningRateSchedule or "
            "a callable with no arguments (for a tensor or tf.Variable `lr`: "
            "float(lr) for a constant, `lambda: lr` to follow the variable)",
        )
    return number(name, value, low=0.0)


def patterns(name, value):
    """A list of regular expressions (or ``None``); a lone string is refused."""
    if value is None:
        return None
    if isinstance(value, (str, bytes)):
        raise invalid(
            name, value, f"a list of regular expressions, e.g. `{name}=[{value!r}]`, or None"
        )
    try:
        value = list(value)
    except TypeError:
        raise invalid(name, value, "a list of regular expressions or None") from None
    for pattern in value:
        if not isinstance(pattern, str):
            raise invalid(
                name, pattern, f"a regular expression (a string) in the list {value!r}"
            )
        try:
            re.compile(pattern)
        except re.error as error:
            raise invalid(name, pattern, f"a valid regular expression ({error})") from None
    return value
