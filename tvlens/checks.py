"""Argument checks shared by every public function: bad input fails before any work, naming the
argument, what it got and what it takes."""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["check_int"]


def check_int(name: str, value: Any, minimum: int | None = None, why: str = "") -> int:
    """``value`` as an int (a numpy integer too, never a bool) that is at least ``minimum``; ``why``
    says what the bound is for, in the error."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name}={value} is too small: {name} must be >= {minimum}" + (f" ({why})" if why else ""))
    return int(value)
