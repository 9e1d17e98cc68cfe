"""Checks of one setting's value, each a one-line `ConfigError` naming the key and what is allowed.

    integer("data.runs", runs, 1, 100)          # an int (not a bool) within the bounds
    number("optim.lr", lr, 1e-12, 1.0)           # an int or float, finite, within the bounds
    fraction("loss.label_smoothing", value)      # a number in [0, 1)
    flag("eval.text", text)                      # true or false
    one_of("data.sampler", sampler, SAMPLERS)    # one of the allowed strings

Every constructor that takes settings from `conf/` checks them with these, so the messages read the
same everywhere: `optim.lr=0 must be a number from 1e-12 to 1`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from handclip.errors import ConfigError


def _show(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"


def _bounds(low: float | None, high: float | None, *, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        if low_open or high_open:
            return f" in {'(' if low_open else '['}{_show(low)}, {_show(high)}{')' if high_open else ']'}"
        return f" from {_show(low)} to {_show(high)}"
    if low is not None:
        return f" {'>' if low_open else '>='} {_show(low)}"
    if high is not None:
        return f" {'<' if high_open else '<='} {_show(high)}"
    return ""


def _fail(key: str, value: Any, what: str, hint: str) -> ConfigError:
    return ConfigError(f"{key}={value!r} must be {what}{hint}")


def integer(key: str, value: Any, low: int | None = None, high: int | None = None, hint: str = "") -> int:
    """`value` if it is an integer (not a bool) in [low, high]; else a ConfigError naming `key`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or (low is not None and value < low)
        or (high is not None and value > high)
    ):
        raise _fail(key, value, "an integer" + _bounds(low, high), hint)
    return value


def number(
    key: str, value: Any, low: float | None = None, high: float | None = None, *, low_open: bool = False,
    high_open: bool = False, hint: str = "",
) -> float:  # fmt: skip
    """`value` as a float if it is a finite number (not a bool) within the bounds (open where asked)."""
    ok = not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        raise _fail(key, value, "a number" + _bounds(low, high, low_open=low_open, high_open=high_open), hint)
    return float(value)


def fraction(key: str, value: Any, hint: str = "") -> float:
    """A number in [0, 1)."""
    return number(key, value, 0, 1, high_open=True, hint=hint)


def flag(key: str, value: Any) -> bool:
    """`value` if it is true or false."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false")
    return value


def one_of(key: str, value: Any, allowed: Iterable[Any]) -> Any:
    """`value` if it is one of `allowed`."""
    allowed = tuple(allowed)
    if value not in allowed:
        raise ConfigError(f"{key}={value!r}: choose one of {', '.join(str(a) for a in allowed)}")
    return value
