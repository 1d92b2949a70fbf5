"""Argument checks, in one place: every "must be a positive integer" of the package comes from here.

Each check returns the value (converted: an int for integers, a float for numbers) or raises a
ValueError whose one-line message names the argument as the caller knows it ("--batch", "k1",
"truncation"), says what it must be, and shows what it got. Booleans are not integers here (True is
not a block length), and NaN or infinity are not numbers unless a bound says otherwise.

This module imports nothing from bptt: the engine, the data layer and the commands all use it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def integer(name: str, value: Any, minimum: int | None = None, maximum: int | None = None,
            what: str | None = None) -> int:
    """value as an int, with minimum <= value <= maximum; what: the phrase of the message."""
    ok = _is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        if what is None:
            what = {1: "a positive integer", 0: "a non-negative integer"}.get(minimum, None) if maximum is None else None
        if what is None:
            low = "" if minimum is None else f" >= {minimum}"
            high = "" if maximum is None else f"{' and' if low else ''} <= {maximum}"
            what = f"an integer{low}{high}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)


def positive_int(name: str, value: Any) -> int:
    """An integer >= 1."""
    return integer(name, value, minimum=1)


def non_negative_int(name: str, value: Any) -> int:
    """An integer >= 0."""
    return integer(name, value, minimum=0)


def optional_int(name: str, value: Any, minimum: int = 0) -> int | None:
    """None, or an integer >= minimum ("a non-negative integer or None" for minimum 0)."""
    if value is None:
        return None
    what = "a non-negative integer or None" if minimum == 0 else f"an integer >= {minimum} or None"
    return integer(name, value, minimum=minimum, what=what)


def number(name: str, value: Any, low: float | None = None, high: float | None = None, *,
           low_open: bool = False, high_open: bool = False, what: str | None = None) -> float:
    """A finite real number within [low, high] (an open end with low_open / high_open), as a float."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        if what is None:
            if low is not None and high is not None:
                what = f"a finite number in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
            elif low is not None:
                what = f"a finite number {'>' if low_open else '>='} {low:g}"
            elif high is not None:
                what = f"a finite number {'<' if high_open else '<='} {high:g}"
            else:
                what = "a finite number"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return float(value)


def non_negative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    return number(name, value, low=0.0)


def flag(name: str, value: Any) -> bool:
    """True or False (not 0, 1 or "yes")."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be true or false, got {value!r}")
    return value


def choice(name: str, value: Any, choices) -> Any:
    """One of `choices` (a registry's keys, a tuple of names)."""
    options = list(choices)
    if value not in options:
        raise ValueError(f"unknown {name} {value!r}; choose one of {options}")
    return value


def device(value: Any, name: str = "--device"):
    """torch.device(value), or a ValueError naming the option when CUDA is asked for but absent."""
    import torch

    try:
        result = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{name} must be a device such as cpu or cuda, got {value!r}") from None
    if result.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{name} {result}: CUDA is not available in this torch build or on this machine")
    return result
