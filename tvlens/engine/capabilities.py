"""What each model supports, checked once per model and remembered: the one capability cache.

The engine's fast strategies rely on properties of an architecture that are cheap to test and
expensive to get wrong — asking the model for the final logits only (``logits_to_keep``), running
the last block's MLP on one position, taking a tree-shaped 4D attention mask, recomputing a suffix
from cached keys / values.  Each is verified against the plain forward the first time it is needed
and cached per model (weakly: a model that goes away takes its entries with it).  Where a check
fails the engine takes a slower exact strategy, so results never depend on the answer.
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable, TypeVar

__all__ = ["cached", "known", "remember", "forget"]

T = TypeVar("T")

#: model -> {capability key: result}
_CACHE: "weakref.WeakKeyDictionary[Any, dict[Hashable, Any]]" = weakref.WeakKeyDictionary()


def _entries(model: Any) -> dict[Hashable, Any]:
    try:
        return _CACHE.setdefault(model, {})
    except TypeError:  # a model that cannot be weakly referenced: check every time
        return {}


def cached(model: Any, key: Hashable, check: Callable[[], T]) -> T:
    """``check()`` the first time ``key`` is asked of ``model``, the remembered answer after."""
    entries = _entries(model)
    if key not in entries:
        entries[key] = check()
    return entries[key]


def known(model: Any, key: Hashable, default: Any = None) -> Any:
    """The remembered answer for ``key``, or ``default`` when it was never checked."""
    return _entries(model).get(key, default)


def remember(model: Any, key: Hashable, value: Any) -> None:
    """Record an answer learnt while running (e.g. a keyword the model turned out not to take)."""
    _entries(model)[key] = value


def forget(model: Any) -> None:
    """Drop every remembered answer for ``model`` (after changing its weights or hooks contract)."""
    _CACHE.pop(model, None)
