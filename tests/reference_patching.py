"""Slow, obvious activation patching: one ``run_with_hooks`` per site (the TransformerLens way).

These are the references ``tests/test_patching.py`` compares ``tvlens.analyses.patching`` against. They
share no code with it: plain hook functions writing into a clone of the activation.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor

HOOK = {
    "z": "blocks.{}.attn.hook_z",
    "q": "blocks.{}.attn.hook_q",
    "k": "blocks.{}.attn.hook_k",
    "v": "blocks.{}.attn.hook_v",
    "resid_pre": "blocks.{}.hook_resid_pre",
    "resid_mid": "blocks.{}.hook_resid_mid",
    "resid_post": "blocks.{}.hook_resid_post",
    "attn_out": "blocks.{}.hook_attn_out",
    "mlp_out": "blocks.{}.hook_mlp_out",
}


def forward(model, batch, fwd_hooks=()) -> Tensor:
    """Final-position logits ``[batch, d_vocab]`` of one hooked forward."""
    with torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, attention_mask=batch.attention_mask, fwd_hooks=list(fwd_hooks))
    return logits[:, -1]


def cache_acts(model, batch, kind: str) -> dict[int, Tensor]:
    """``{layer: activation [batch, pos, ...]}`` of one clean run."""
    store = {}
    hooks = [(HOOK[kind].format(l), lambda act, hook, l=l: store.__setitem__(l, act.detach().clone()))
             for l in range(model.cfg.n_layers)]
    forward(model, batch, hooks)
    return store


def logprob(logits: Tensor, batch) -> Tensor:
    return logits.log_softmax(-1)[torch.arange(len(logits)), batch.answer_ids]


def prob(logits: Tensor, batch) -> Tensor:
    return logprob(logits, batch).exp()


def accuracy(logits: Tensor, batch) -> Tensor:
    return (logits.argmax(-1) == batch.answer_ids).float()


def logit_diff_against(foil: Tensor) -> Callable:
    def logit_diff(logits: Tensor, batch) -> Tensor:
        rows = torch.arange(len(logits))
        return logits[rows, batch.answer_ids] - logits[rows, foil]
    return logit_diff


def default_foil(model, batch) -> Tensor:
    """The target run's best wrong token (tvlens' default foil for logit_diff)."""
    logits = forward(model, batch).clone()
    logits[torch.arange(len(logits)), batch.answer_ids] = float("-inf")
    return logits.argmax(-1)


def naive_patch_heads(model, target, source, *, positions: str, metric: Callable, component: str = "z",
                      means: Tensor | None = None) -> Tensor:
    """Prompt-mean metric with head ``(l, h)`` of ``component`` patched: ``[layer, head]`` or ``[layer, head, pos]``.

    ``source`` is a batch (paired prompt by prompt), or ``None`` with ``means`` ``[layer, head, d_head]``.
    """
    L = model.cfg.n_layers
    src = cache_acts(model, source, component) if means is None else None
    probe = cache_acts(model, target, component)
    n_units, P = probe[0].shape[2], target.tokens.shape[1]

    def value(l: int, h: int, pos: int | None) -> Tensor:
        if means is not None:
            return means[l, h]
        if positions == "final":
            return src[l][:, -1, h]
        if pos is None:
            return src[l][:, :, h]
        return src[l][:, pos, h]

    def run(l: int, h: int, pos) -> float:
        def patch(act, hook):
            act = act.clone()
            if positions == "final":
                act[:, -1, h] = value(l, h, None)
            elif positions == "all":
                act[:, :, h] = value(l, h, None)
            else:
                act[:, pos, h] = value(l, h, pos)
            return act
        return float(metric(forward(model, target, [(HOOK[component].format(l), patch)]), target).mean())

    if positions == "each":
        out = torch.zeros(L, n_units, P)
        for l in range(L):
            for h in range(n_units):
                for p in range(P):
                    out[l, h, p] = run(l, h, p)
        return out
    out = torch.zeros(L, n_units)
    for l in range(L):
        for h in range(n_units):
            out[l, h] = run(l, h, None)
    return out


def naive_patch_positions(model, target, source, *, hook: str, metric: Callable) -> Tensor:
    """Prompt-mean metric with ``hook`` at ``(layer, pos)`` replaced by the source's: ``[layer, pos]``."""
    kind = hook
    src = cache_acts(model, source, kind)
    L, P = model.cfg.n_layers, target.tokens.shape[1]
    out = torch.zeros(L, P)
    for l in range(L):
        for p in range(P):
            def patch(act, hook, l=l, p=p):
                act = act.clone()
                act[:, p] = src[l][:, p]
                return act
            out[l, p] = float(metric(forward(model, target, [(HOOK[kind].format(l), patch)]), target).mean())
    return out


def naive_resid_columns(model, batch, layer_values: list[tuple[int, Tensor, str]]) -> Tensor:
    """Final-position logits ``[batch, column, d_vocab]``: column j replaces (``"replace"``) or adds to
    (``"add"``) ``resid_pre`` of layer ``layer_values[j][0]`` at the final position."""
    cols = []
    for layer, vec, mode in layer_values:
        def patch(act, hook, vec=vec, mode=mode):
            act = act.clone()
            act[:, -1] = vec if mode == "replace" else act[:, -1] + vec
            return act
        cols.append(forward(model, batch, [(HOOK["resid_pre"].format(layer), patch)]))
    return torch.stack(cols, 1)
