"""Attention patterns of chosen heads on one prompt, for looking at the heads an analysis found.

:func:`attention_patterns` reads ``blocks.{l}.attn.hook_pattern`` of the heads it is given — a
list of ``(layer, head)``, or the result of a sweep (a :class:`~tvlens.PatchResult`, a
``Taskness``, a ``FunctionVector``, a ``Selection``: its top heads) — on one prompt, in one forward
pass, and returns :class:`AttentionPatterns`:

- ``.show()`` — circuitsvis's interactive view (``circuitsvis.attention.attention_heads``, the
  TransformerLens ecosystem's tool; the ``viz`` extra). circuitsvis loads its viewer script from a
  CDN, so the browser showing it needs the network;
- ``.plot()`` / ``.to_html(path)`` — the same patterns as plotly heatmaps (query × key, one per
  head), offline like every tvlens figure.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .. import hooks as _hooks
from ..results import ResultMeta, Saved, Tabular, WithMeta

__all__ = ["AttentionPatterns", "attention_patterns"]


@dataclass(frozen=True, eq=False)
class AttentionPatterns(Saved, WithMeta, Tabular):
    """``patterns`` ``[head, query, key]`` (softmaxed attention of each chosen head on one prompt,
    padding removed), ``heads`` their ``(layer, head)``, ``tokens`` the prompt's tokens."""

    patterns: Float[Tensor, "head query_pos key_pos"]
    heads: tuple[tuple[int, int], ...]
    tokens: tuple[str, ...]
    meta: ResultMeta = field(default_factory=ResultMeta)

    @property
    def names(self) -> list[str]:
        return [f"L{l}H{h}" for l, h in self.heads]

    def records(self) -> list[dict[str, Any]]:
        """One row per (head, query, key): the attention weight, with both tokens."""
        return [{"layer": l, "head": h, "query": q, "key": k, "query_token": self.tokens[q], "key_token": self.tokens[k],
                 "weight": float(self.patterns[i, q, k])}
                for i, (l, h) in enumerate(self.heads) for q in range(len(self.tokens)) for k in range(len(self.tokens))]

    def __repr__(self) -> str:
        return f"AttentionPatterns(heads={self.names}, tokens={len(self.tokens)})"

    def show(self, **kw: Any) -> Any:
        """circuitsvis's attention-heads view (displays itself in a notebook; ``str()`` is its HTML).
        Keyword arguments go to ``circuitsvis.attention.attention_heads``."""
        try:
            from circuitsvis.attention import attention_heads
        except ImportError as err:
            raise ImportError("the interactive attention view uses circuitsvis, which is not installed; "
                              'pip install "tvlens[viz]" (or circuitsvis==1.43.3), or use .plot() for plotly heatmaps') from err
        return attention_heads(attention=self.patterns.float(), tokens=list(self.tokens),
                               attention_head_names=self.names, **kw)

    def plot(self, *, title: str | None = None) -> Any:
        """plotly heatmaps, one per head: query position on y, key position on x (offline)."""
        from ..plot import attention_heatmaps

        return attention_heatmaps(self.patterns, list(self.tokens), self.names,
                                  title=title or f"Attention patterns — {self.meta.get('what', 'chosen heads')}")

    def to_html(self, path: str | Path) -> Path:
        from ..plot import save_figure

        return save_figure(self.plot(), path, png=False)[0]


def _heads_of(heads: Any, k: int) -> list[tuple[int, int]]:
    """(layer, head) pairs from a list, or the top ``k`` heads of a result."""
    if hasattr(heads, "top_heads") and getattr(heads, "top_heads"):  # FunctionVector
        return [tuple(map(int, h)) for h in heads.top_heads][:k]
    if hasattr(heads, "heads") and callable(heads.heads):  # Selection
        return [tuple(map(int, h)) for h in heads.heads()][:k]
    if hasattr(heads, "top") and callable(heads.top):  # PatchResult, Taskness
        top = heads.top(k)
        if top and len(top[0]) != 3:
            raise ValueError("attention_patterns takes head results [layer, head]; this result has other axes "
                             f"({getattr(heads, 'dims', '?')}); pass heads=[(layer, head), ...]")
        return [(int(t[0]), int(t[1])) for t in top]
    if isinstance(heads, Sequence) and not isinstance(heads, str) and all(
            isinstance(h, Sequence) and len(h) == 2 for h in heads):
        return [(int(l), int(h)) for l, h in heads]
    raise TypeError(f"heads must be [(layer, head), ...] or a result with top heads (PatchResult, Taskness, "
                    f"FunctionVector, Selection), got {type(heads).__name__}")


@torch.no_grad()
def attention_patterns(model: Any, prompts: Any, heads: Any, *, k: int = 6, prompt: int = 0,
                       n_shots: int = 5, seed: int = 0) -> AttentionPatterns:
    """The attention patterns of ``heads`` on prompt ``prompt`` of ``prompts``.

    Args:
        prompts: a :class:`~tvlens.PromptBatch`, or a task name / ``Task`` (then
            ``icl_prompts(model, task, n_prompts=prompt + 1, n_shots=n_shots, seed=seed)``).
        heads: ``[(layer, head), ...]``, or a result whose top ``k`` heads are taken: a
            ``PatchResult`` (largest effect), ``Taskness`` (highest ρ), ``FunctionVector`` (its summed
            heads), ``Selection`` (its selected heads).
        k: how many heads to take from a result.
        prompt: which row of the batch (its padding is removed).

    One forward pass; only the chosen layers' ``hook_pattern`` is hooked.
    """
    from ..inputs.text import icl_prompts
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    chosen = _heads_of(heads, int(k))
    if not chosen:
        raise ValueError("no heads to show: pass heads=[(layer, head), ...] or a result with at least one head")
    chosen = [(_hooks.check_layer(model, l), _hooks.check_head(model, h)) for l, h in chosen]
    if hasattr(prompts, "tokens"):
        batch = prompts
    elif isinstance(prompts, str) or hasattr(prompts, "pairs"):
        batch = icl_prompts(model, prompts, n_prompts=prompt + 1, n_shots=n_shots, seed=seed)
    else:
        raise TypeError(f"prompts must be a PromptBatch or a task name, got {type(prompts).__name__}; build your own "
                        "prompts with tvlens.prompts_from_text(model, texts, answers)")
    if not 0 <= prompt < batch.tokens.shape[0]:
        raise ValueError(f"prompt={prompt} is out of range: the batch has {batch.tokens.shape[0]} prompts")
    mask = getattr(batch, "attention_mask", None)
    row = batch.tokens[prompt]
    keep = torch.ones_like(row, dtype=torch.bool) if mask is None else mask[prompt].bool()
    tokens = row[keep][None]
    layers = sorted({l for l, _ in chosen})
    got: dict[int, Tensor] = {}

    def grab(layer: int):
        def hook(pattern: Tensor, hook: Any) -> None:
            got[layer] = pattern[0].detach().float().cpu()  # [head, query, key]
        return hook

    _hooks.run(model, tokens, fwd_hooks=[(_hooks.act_name("pattern", l), grab(l)) for l in layers])
    patterns = torch.stack([got[l][h] for l, h in chosen])
    tok = getattr(model, "tokenizer", None)
    strings = tuple(tok.decode([int(t)]) if tok is not None else str(int(t)) for t in tokens[0].tolist())
    what = getattr(heads, "meta", {})
    what = what.get("what") if isinstance(what, dict) else None
    return AttentionPatterns(patterns=patterns, heads=tuple(chosen), tokens=strings,
                             meta={"model": info.name, "what": what or f"{len(chosen)} heads", "prompt": prompt,
                                   "task": str(getattr(batch, "task", ""))})
