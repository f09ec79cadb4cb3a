"""Argument checks shared by every public function: bad input fails before any work, naming the
argument, what it got and what it takes."""

from __future__ import annotations

import math
from typing import Any

import numpy as np

__all__ = ["check_int", "check_float"]


def check_int(name: str, value: Any, minimum: int | None = None, why: str = "") -> int:
    """``value`` as an int (a numpy integer too, never a bool) that is at least ``minimum``; ``why``
    says what the bound is for, in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is too small: {name} must be >= {minimum}" + (f" ({why})" if why else ""))
    return int(value)


def check_float(name: str, value: Any, minimum: float | None = None, *, strict: bool = False) -> float:
    """``value`` as a finite float (an int or a numpy number too, never a bool) that is at least
    ``minimum`` (``strict``: greater than it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)) or \
            not math.isfinite(float(value)):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    value = float(value)
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name}={value} must be {'>' if strict else '>='} {minimum}")
    return value
