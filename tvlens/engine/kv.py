"""Handing cached keys / values to the bridge's own attention blocks.

The bridge's attention modules take ``past_key_values``; these stand-ins record the keys and
values of the clean run (:class:`RecordKV`) and prepend the cached prefix when only a suffix is
recomputed (:class:`PrefixKV`), so recomputation runs the model's own attention code
(RoPE, GQA, soft-capping, ...) unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["CACHE_KWARGS", "RecordKV", "PrefixKV", "inject_cache", "Unsupported", "bool_mask"]

CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")


class RecordKV:
    """``past_key_values`` stand-in for the clean run: records the keys/values attention uses."""

    def __init__(self, store: dict, layer: int):
        self.store, self.layer = store, layer

    def update(self, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.store[self.layer] = (k.detach(), v.detach())
        return k, v


class PrefixKV:
    """``past_key_values`` stand-in for recomputation: prepends the cached keys/values of the prefix."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


def inject_cache(attn: torch.nn.Module, cache: Any):
    """Register a pre-hook handing ``cache`` to the attention as ``past_key_values``; returns the handle."""

    def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        for name in CACHE_KWARGS:
            kwargs.pop(name, None)
        kwargs["past_key_values"] = cache
        return args, kwargs

    return attn.register_forward_pre_hook(pre, with_kwargs=True)


class Unsupported(Exception):
    pass


def bool_mask(captured: Any, mask2d: Tensor, P: int, *, causal: bool = True) -> Tensor:
    """The attention mask a block used, as a boolean ``[batch|1, 1|heads, P, P]`` (True = attend)."""
    if isinstance(captured, Tensor) and captured.ndim == 4:
        m = captured[..., :P, :P]
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
        return m
    if captured is not None and not (isinstance(captured, Tensor) and captured.ndim == 2):
        raise Unsupported(f"attention_mask of shape {getattr(captured, 'shape', type(captured))}")
    allowed = torch.ones(P, P, dtype=torch.bool, device=mask2d.device)
    allowed = allowed.tril() if causal else allowed
    return allowed[None, None] & mask2d[:, None, None, :].bool()
