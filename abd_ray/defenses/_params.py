"""Small validators shared by the defenses' hyperparameter checks (ValueError naming the key and the range)."""

from __future__ import annotations

import numbers
from typing import Any


def as_int(name: str, value: Any, lo: int | None = None, hi: int | None = None) -> int:
    """``value`` as an int (integral floats accepted, bools refused) within [lo, hi]."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not ok and isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        ok, value = True, int(value)
    if not ok or (lo is not None and value < lo) or (hi is not None and value > hi):
        rng = f"{'-inf' if lo is None else lo}..{'inf' if hi is None else hi}"
        raise ValueError(f"defense.{name}={value!r} must be an integer in {rng}")
    return int(value)


def as_float(
    name: str, value: Any, lo: float | None = None, hi: float | None = None, lo_open: bool = False,
    hi_open: bool = False,
) -> float:
    """``value`` as a float within the interval given (open or closed at either end)."""
    if not isinstance(value, numbers.Real) or isinstance(value, bool) or value != value:
        raise ValueError(f"defense.{name}={value!r} must be a number")
    v = float(value)
    bad = (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        left = "(" if lo_open else "["
        right = ")" if hi_open else "]"
        low = "-inf" if lo is None else lo
        high = "inf" if hi is None else hi
        raise ValueError(f"defense.{name}={value!r} is outside {left}{low}, {high}{right}")
    return v


def as_bool(name: str, value: Any) -> bool:
    """``value`` as a bool (true/false, or 0/1)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    raise ValueError(f"defense.{name}={value!r} must be true or false")


def as_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise ValueError(f"defense.{name}={value!r} is not allowed; allowed: {', '.join(choices)}")
    return value
