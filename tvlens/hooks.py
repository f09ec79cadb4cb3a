"""The one place where tvlens attaches hooks to a model.

Every forward pass with an intervention or a read-out goes through :func:`hooked` or :func:`run`.
Both guarantee that the hooks they added are removed when the block exits — on a normal return,
an exception raised inside a hook or a user metric, or a ``KeyboardInterrupt`` — and that hooks
the user attached beforehand are left alone.

Hook names are built by :func:`act_name` from the TransformerLens names
(``blocks.{layer}.attn.hook_z`` ...) so no other module types a hook-name literal.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

__all__ = ["act_name", "resid_name", "resid_site", "hooked", "run", "check_layer", "check_head", "hook_count", "device_of", "HookFn"]

HookFn = Callable[[Tensor, Any], Tensor | None]

_NAMES = {
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
    "z": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "pattern": "blocks.{}.attn.hook_pattern",
    "attn_scores": "blocks.{}.attn.hook_attn_scores",
    "ln1_scale": "blocks.{}.ln1.hook_scale",
    "ln2_scale": "blocks.{}.ln2.hook_scale",
    "ln2_in": "blocks.{}.ln2.hook_in",
}
_GLOBAL = {"embed": "hook_embed", "ln_final": "ln_final.hook_normalized", "ln_final_scale": "ln_final.hook_scale"}


def act_name(kind: str, layer: int | None = None) -> str:
    """TransformerLens hook name for an activation kind at a layer.

    >>> act_name("z", 3)
    'blocks.3.attn.hook_z'
    """
    if kind in _GLOBAL:
        return _GLOBAL[kind]
    if kind not in _NAMES:
        raise ValueError(f"unknown activation kind {kind!r}; use one of {', '.join([*_NAMES, *_GLOBAL])}")
    if layer is None:
        raise ValueError(f"activation kind {kind!r} needs a layer")
    return _NAMES[kind].format(int(layer))


def resid_name(layer: int, n_layers: int) -> str:
    """The residual stream *entering* block ``layer``; ``layer == n_layers`` is the stream after the last block.

    >>> resid_name(2, 4), resid_name(4, 4)
    ('blocks.2.hook_resid_pre', 'blocks.3.hook_resid_post')
    """
    kind, block = resid_site(layer, n_layers)
    return act_name(kind, block)


def resid_site(layer: int, n_layers: int) -> tuple[str, int]:
    """``(hook kind, block)`` of :func:`resid_name`: ``("resid_pre", layer)`` or ``("resid_post", n_layers - 1)``."""
    return ("resid_pre", int(layer)) if int(layer) < n_layers else ("resid_post", n_layers - 1)


def check_layer(model: Any, layer: int, *, allow_end: bool = False, what: str = "layer") -> int:
    """Validate a layer index (negative indices count from the end) and return it non-negative.

    ``allow_end`` admits ``n_layers`` itself (the final residual stream, after the last block).
    """
    from .models import ModelInfo

    n = ModelInfo.of(model).n_layers
    top = n + 1 if allow_end else n
    if isinstance(layer, bool) or not isinstance(layer, (int,)) and not (isinstance(layer, Tensor) and layer.numel() == 1):
        raise TypeError(f"{what} must be an int, got {type(layer).__name__}")
    layer = int(layer)
    if not -top <= layer < top:
        raise ValueError(f"{what} {layer} is out of range: this model has {n} layers, so use 0..{top - 1} (or negative indices)")
    return layer % top


def check_head(model: Any, head: int) -> int:
    """Validate a head index and return it non-negative."""
    from .models import ModelInfo

    n = ModelInfo.of(model).n_heads
    head = int(head)
    if not -n <= head < n:
        raise ValueError(f"head {head} is out of range: this model has {n} heads per layer, so use 0..{n - 1}")
    return head % n


@contextmanager
def hooked(model: Any, fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (), bwd_hooks: Sequence[tuple[str, HookFn]] = ()) -> Iterator[Any]:
    """Attach hooks for the duration of a ``with`` block; always removes exactly those hooks.

    Uses the model's own ``hooks()`` context manager (TransformerLens 3 and 4 both offer it),
    which removes the hooks it added at its own context level and leaves the user's hooks alone.
    """
    known = model.hook_dict
    for name, _ in [*fwd_hooks, *bwd_hooks]:
        if isinstance(name, str) and name not in known:
            raise ValueError(f"unknown hook point {name!r} for this model; hook names look like {act_name('z', 0)!r}")
    with model.hooks(fwd_hooks=list(fwd_hooks), bwd_hooks=list(bwd_hooks)):
        yield model


def run(
    model: Any,
    tokens: Int[Tensor, "batch pos"] | Float[Tensor, "batch pos d_model"],
    *,
    attention_mask: Int[Tensor, "batch pos"] | None = None,
    fwd_hooks: Sequence[tuple[str | Callable[[str], bool], HookFn]] = (),
    **forward_kwargs: Any,
) -> Tensor:
    """One forward pass with hooks attached only for its duration; returns what the model returns (logits).

    ``attention_mask`` is passed only when some position is padding, so an unpadded batch takes
    exactly the model's plain path.
    """
    device = device_of(model)
    tokens = tokens.to(device)
    if attention_mask is not None and not bool(attention_mask.all()):
        forward_kwargs["attention_mask"] = attention_mask.to(device)
    if not fwd_hooks:
        return model(tokens, **forward_kwargs)
    with hooked(model, fwd_hooks):
        return model(tokens, **forward_kwargs)


def hook_count(model: Any) -> int:
    """Number of forward and backward hooks currently attached anywhere on the model (0 when clean)."""
    total = 0
    for hp in {id(h): h for h in model.hook_dict.values()}.values():
        total += len(getattr(hp, "fwd_hooks", ())) + len(getattr(hp, "bwd_hooks", ()))
    for module in model.modules():
        total += len(getattr(module, "_forward_hooks", {})) + len(getattr(module, "_forward_pre_hooks", {}))
    return total


def device_of(model: Any) -> torch.device:
    """The device of the model's first parameter (CPU for a parameterless model)."""
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")
