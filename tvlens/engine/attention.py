"""Attention as the wrapped model computes it, in passes that read nothing inside attention.

TransformerLens 4's bridge re-implements rotary attention step by step
(``PositionEmbeddingsAttentionBridge.forward``) so that ``hook_rot_q`` / ``hook_rot_k``,
``hook_attn_scores`` and ``hook_pattern`` fire where HookedTransformer fires them, and so that
fully masked query rows give zeros instead of NaN.  Its base class's forward
(``AttentionBridge.forward``) instead hands the computation to the wrapped Hugging Face module:
``hook_in``, the HF attention (its q / k / v / o projections are the bridge's ``LinearBridge`` s),
``hook_out``.  On every query row that sees a key the two compute the same arithmetic; the
re-implementation adds elementwise passes over ``[batch, head, query_pos, key_pos]``.

:func:`delegated` runs a pass through the base-class forward when the pass asks for no hook inside
attention and none is attached there, on models where a check (once per model, padded and
unpadded) finds the same final logits and residuals as the re-implementation.  Everything else —
hooks inside attention, the intervention path's cached keys / values, any model that fails the
check — runs the bridge's attention as it is.
"""

from __future__ import annotations

import types
from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from .. import hooks as _hooks
from ..hooks import act_name
from . import capabilities

__all__ = ["delegated", "delegation_ok"]


def _attention_bridge() -> type | None:
    try:
        from transformer_lens.model_bridge.generalized_components.attention import AttentionBridge
    except ImportError:  # TransformerLens 3 (HookedTransformer): no bridge, nothing to delegate
        return None
    return AttentionBridge


def _base_forward() -> Any:
    cls = _attention_bridge()
    return None if cls is None else cls.forward


def _attention_modules(model: Any) -> list[Any]:
    """The blocks' attention bridges whose forward re-implements the one of their base class (else [])."""
    return capabilities.cached(model, "attention_modules", lambda: _find_attention(model))


def _hook_points(model: Any) -> list[Any]:
    """Every hook point inside those attention modules (their layout does not change: found once)."""
    from transformer_lens.hook_points import HookPoint

    return capabilities.cached(model, "attention_hook_points", lambda: [
        m for a in _attention_modules(model) for m in a.modules() if isinstance(m, HookPoint)])


def _find_attention(model: Any) -> list[Any]:
    cls, base = _attention_bridge(), _base_forward()
    blocks = getattr(model, "blocks", None)
    if cls is None or base is None or blocks is None:
        return []
    mods = [getattr(b, "attn", None) for b in blocks]
    if not mods or not all(isinstance(a, cls) and getattr(a, "original_component", None) is not None for a in mods):
        return []
    return mods if any(type(a).forward is not base for a in mods) else []


def _hooked_inside(model: Any) -> bool:
    """Whether any hook point inside attention carries a hook someone attached (the HF module's own
    output-capturing hooks are not hook points: they run on the delegated path as in plain HF)."""
    return any(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks for m in _hook_points(model))


def _asks_inside(names: Sequence[Any]) -> bool:
    # a filter function may match any hook point: treat it as one inside attention
    return any(not isinstance(n, str) or ".attn." in n for n in names)


@contextmanager
def _swapped(mods: Sequence[Any]) -> Iterator[None]:
    base = _base_forward()
    own = [a for a in mods if "forward" not in vars(a)]  # a nested call leaves the outer swap alone
    for a in own:
        # set on the instance past nn.Module.__setattr__, which the bridge forwards to the HF module
        object.__setattr__(a, "forward", types.MethodType(base, a))
    try:
        yield
    finally:
        for a in own:
            object.__delattr__(a, "forward")


@contextmanager
def delegated(model: Any, names: Sequence[Any] = ()) -> Iterator[None]:
    """Within the block, the model's attention runs as the wrapped HF module computes it, when that
    is exact for this model and the pass's hook ``names`` read nothing inside attention."""
    mods = _attention_modules(model)
    if not mods or _asks_inside(names) or _hooked_inside(model) or not delegation_ok(model):
        yield
        return
    with _swapped(mods):
        yield


def delegation_ok(model: Any) -> bool:
    """Does the delegated attention give this model's final logits and residuals (checked once per model)?"""
    return capabilities.cached(model, "delegated_attention", lambda: _check(model))


@torch.no_grad()
def _check(model: Any) -> bool:
    from ..models import ModelInfo

    mods = _attention_modules(model)
    if not mods:
        return False
    info = ModelInfo.of(model)
    g = torch.Generator().manual_seed(2)
    dev = _hooks.device_of(model)
    tokens = torch.randint(0, info.d_vocab, (3, 9), generator=g).to(dev)
    mask = torch.ones_like(tokens)
    mask[1, :4] = 0  # a left-padded row: its pad queries see no key
    names = [act_name("resid_pre", layer) for layer in range(info.n_layers)]

    def run(m: Any) -> list[torch.Tensor]:
        store: dict[str, torch.Tensor] = {}

        def grab(name: str) -> Any:
            def fn(act: torch.Tensor, hook: Any) -> None:
                store[name] = act[:, -1].detach().clone()
            return fn
        out = _hooks.run(model, tokens, attention_mask=m, fwd_hooks=[(n, grab(n)) for n in names])[:, -1]
        return [out, *(store[n] for n in names)]

    try:
        refs = [run(None), run(mask)]
        with _swapped(mods):
            gots = [run(None), run(mask)]
    except Exception:
        return False
    dtype = next(model.parameters()).dtype
    tol = 1e-6 if dtype in (torch.float32, torch.float64) else 1e-3
    for ref, got in zip([t for r in refs for t in r], [t for r in gots for t in r]):
        scale = max(1.0, float(ref.float().abs().max()))
        if not bool(torch.isfinite(got).all()) or float((got.float() - ref.float()).abs().max()) > tol * scale:
            return False
    return True
