"""Exact, batched activation patching — and the fast recompute machinery the rest of tvlens reuses.

Activation patching (Vig et al. 2020; Meng et al. 2022; the TransformerLens ``patching`` module)
asks how much a component carries: run a *target* prompt batch, replace one site's activation
(a head's ``hook_z``, a layer's residual at one position, ...) with its value from a *source* —
another prompt batch (clean -> corrupted, ICL -> shuffled labels) or task-mean activations
(means-patching, as in Todd et al. 2024 §2.2 and the taskness validation) — and measure a metric of
the final-position logits.  One sweep gives a ``[layer, head]`` (or ``[layer, pos]``) map.

The obvious implementation (TransformerLens ``get_act_patch_*``, Todd's CIE loop) runs one full
forward per site.  This module computes **the same numbers** (to float rounding; tested against
the naive loop to 1e-4) from much less work, using only what causal attention guarantees:

* **Final-position patching** changes nothing upstream of the patched layer and nothing at
  earlier positions.  So the target is run **once**, keeping every layer's residual and the keys /
  values each attention layer used; then for every site only the *last token* is recomputed, from
  the patched layer upwards, attending to the cached keys / values.  Many sites ride in one forward:
  they are laid out along the *sequence* axis as extra "final tokens" that share the cached prefix
  and see only their own key (a block-diagonal mask), so the prefix is never copied per site.
  Sites join the stream at their own layer (the stream grows as layers go up): a site at layer
  ``l`` costs ``n_layers - l`` single-token block evaluations.
* **Patching from position ``p`` on** (``positions="all"`` / ``"each"``, :func:`patch_positions`)
  changes only positions ``>= p`` from the patched layer on.  Those suffixes are recomputed from
  the cached residual at the patched layer (not from the embedding), sites along the batch axis,
  attending to the cached keys / values of positions ``< p``.
* Sites are processed in chunks sized to a memory budget, with a progress bar, and the metric is
  reduced on the device per chunk: there is no per-site host synchronisation.

The machinery is one generic engine, :class:`PatchRunner`, driven by a list of :class:`Edit` s —
``act <- act + weight * (value - act) + add`` at one hook of one layer for a set of *columns*
(one column = one patched configuration, e.g. one site, one head mask, one layer of a
task-vector sweep).  :func:`patch_heads`, :func:`patch_positions`, ``vectors.layer_sweep`` (replace / add a
residual at each layer) and ``selection`` (many head masks, REINFORCE samples as columns; soft
``alpha`` blends with gradients) are small specialisations of it, in the spirit of TransformerLens'
``patching.py`` (one generic function, small partials) without its per-site Python loop.

The engine drives the bridge's own blocks (``model.blocks[l]``), so every architecture detail
(LayerNorm / RMSNorm, learned positions / RoPE, grouped-query attention, soft-capping ...) is the
model's own code; it hands the attention its cached keys / values through the ``past_key_values``
protocol and gives the recomputed tokens their true position ids and rotary embeddings.  The first
time a model is used (per layout), the runner checks that recomputing an *unpatched* column
reproduces the target's logits; on a model where that fails (or that is not a TransformerLens 4
bridge) it falls back to the naive loop with a warning, so results are always exact.

:func:`attribution_patch_heads` is the gradient approximation (Nanda 2023, "Attribution
patching"; Syed et al. 2023): one forward + backward on the target and one forward on the source
give every site's linear estimate at once; ``confirm_top=k`` re-runs the exact patch for the
``k`` largest sites and reports the correlation.

Hooks are attached only through :mod:`tvlens.hooks` and are removed on every exit path; the cache
hand-off uses a forward pre-hook on the attention module that is likewise removed in ``finally``.

Reusing the engine (one target pass, then any number of edited columns)::

    runner = PatchRunner(model, zero_shot_batch)                 # runs the batch once
    # Hendel's layer sweep: column l replaces the final residual at layer l by the task vector
    logits = runner.logits([replace_resid(l, tv[l], columns=l) for l in range(L)], n_columns=L)
    # REINFORCE: column s patches the task means of the heads in masks[s] ([sample, layer, head])
    edits = [replace_heads(l, masks[:, l], mean_z[l]) for l in range(L)]
    reward = runner.map(edits, lambda lg: lg.log_softmax(-1)[..., 0], n_columns=len(masks))
    # soft selection: alpha [layer, head] with requires_grad; logits are differentiable in it
    logits = runner.logits([blend_heads(l, alpha[l], mean_z[l]) for l in range(L)], n_columns=1)

How exact: a patched column computes the same arithmetic as the full patched forward on the
positions that can differ, with the cached (bit-identical) activations elsewhere; the remaining
differences are float rounding from different batch shapes (≈1e-6 on logits in float32).
"""

from __future__ import annotations

import inspect
import math
import time
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .. import hooks as _hooks
from ..hooks import act_name
from ..results import tensor_digest as _digest

__all__ = [
    "PatchResult",
    "patch_heads",
    "patch_positions",
    "attribution_patch_heads",
    "PatchRunner",
    "Edit",
    "replace_resid",
    "add_resid",
    "replace_heads",
    "blend_heads",
    "final_position_logits",
    "METRICS",
]

Positions = Literal["final", "all", "each"]
MetricFn = Callable[[Tensor, Any], Tensor]

#: Built-in metrics of the final-position logits (per prompt, higher = more of the answer).
METRICS = ("logit_diff", "prob", "logprob", "accuracy")

#: Activation kinds an :class:`Edit` may touch, and the trailing shape of one position's activation.
_UNIT = {  # kind -> which axis set: "model" = (d_model,), "heads" = (n_heads, d_head), "kv" = (n_kv, d_head)
    "resid_pre": "model",
    "resid_mid": "model",
    "resid_post": "model",
    "attn_out": "model",
    "mlp_out": "model",
    "z": "heads",
    "q": "heads",
    "k": "kv",
    "v": "kv",
}
_CACHE_KWARGS = ("cache", "past_key_values", "past_key_value", "layer_past")
_DEFAULT_CPU_BUDGET = 512 << 20  # bytes of transient activations per chunk on CPU
#: model -> {layout key: passed?}: the recompute self-check is a property of the architecture, run once per model
_VERIFIED: "weakref.WeakKeyDictionary[Any, dict]" = weakref.WeakKeyDictionary()


# ----------------------------------------------------------------------------------------------
# prompt batches


@dataclass(frozen=True)
class _Prompts:
    """The parts of a prompt batch this module reads (any object with ``tokens`` works)."""

    tokens: Tensor  # [batch, pos] long
    mask: Tensor  # [batch, pos] long, 0 = padding (left)
    answer_ids: Tensor | None  # [batch]
    foil_ids: Tensor | None  # [batch]
    obj: Any  # the caller's object, handed to user metrics

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    def slice(self, i: int, j: int) -> "_Prompts":
        obj = self.obj
        if hasattr(obj, "slice") and callable(obj.slice):
            obj = obj.slice(i, j)
        elif obj is not None:
            obj = SimpleNamespace(
                tokens=self.tokens[i:j], attention_mask=self.mask[i:j],
                answer_ids=None if self.answer_ids is None else self.answer_ids[i:j],
            )
        cut = lambda t: None if t is None else t[i:j]  # noqa: E731
        return _Prompts(self.tokens[i:j], self.mask[i:j], cut(self.answer_ids), cut(self.foil_ids), obj)


def _as_prompts(batch: Any, what: str) -> _Prompts:
    if isinstance(batch, _Prompts):
        return batch
    tokens = batch if isinstance(batch, Tensor) else getattr(batch, "tokens", None)
    if not isinstance(tokens, Tensor):
        raise TypeError(
            f"{what} must be a prompt batch (an object with .tokens, .attention_mask, .answer_ids such as "
            f"tvlens.PromptBatch) or a [batch, pos] token tensor; got {type(batch).__name__}"
        )
    if tokens.ndim == 1:
        tokens = tokens[None]
    if tokens.ndim != 2 or tokens.is_floating_point():
        raise ValueError(f"{what}.tokens must be an integer tensor [batch, pos]; got shape {tuple(tokens.shape)}")
    if tokens.shape[0] == 0 or tokens.shape[1] == 0:
        raise ValueError(f"{what} is empty (tokens shape {tuple(tokens.shape)}); build it with at least one prompt")
    mask = getattr(batch, "attention_mask", None)
    mask = torch.ones_like(tokens) if mask is None else mask.to(tokens.device).long()
    if mask.shape != tokens.shape:
        raise ValueError(f"{what}.attention_mask has shape {tuple(mask.shape)} but tokens have {tuple(tokens.shape)}")
    if not bool(mask[:, -1].all()):
        raise ValueError(
            f"{what} has padding at the final position; tvlens batches are LEFT-padded so that the final "
            "separator is the last token of every row (build them with tvlens.icl_prompts)"
        )
    answers = getattr(batch, "answer_ids", None)
    if answers is not None:
        answers = torch.as_tensor(answers).long().reshape(-1)
        if answers.numel() != tokens.shape[0]:
            raise ValueError(f"{what}.answer_ids has {answers.numel()} entries for {tokens.shape[0]} prompts")
    foils = getattr(batch, "foil_ids", None)
    if foils is not None:
        foils = torch.as_tensor(foils).long().reshape(-1)
    return _Prompts(tokens.long(), mask, answers, foils, batch if not isinstance(batch, Tensor) else None)


# ----------------------------------------------------------------------------------------------
# metrics


def _metric_name(metric: Any) -> str:
    if isinstance(metric, str):
        return metric
    return getattr(metric, "__name__", None) or type(metric).__name__


def _resolve_metric(metric: str | MetricFn, prompts: _Prompts, clean_logits: Tensor) -> Callable[[Tensor], Tensor]:
    """Return ``fn(logits [batch, column, d_vocab]) -> [batch, column]`` and validate it on the clean run.

    ``logit_diff`` is the answer's logit minus a *foil* logit: ``batch.foil_ids`` when the batch
    carries them, otherwise the target run's own highest-scoring wrong token (fixed per prompt, so
    the metric is linear in the logits).  ``prob`` / ``logprob`` are the answer's softmax
    probability / log-probability, ``accuracy`` is 1 when the answer is the top token.
    """
    B = len(prompts)
    if callable(metric) and not isinstance(metric, str):
        user = metric
        batch_obj = prompts.obj if prompts.obj is not None else SimpleNamespace(
            tokens=prompts.tokens, attention_mask=prompts.mask, answer_ids=prompts.answer_ids)

        def fn(logits: Tensor) -> Tensor:
            cols = [torch.as_tensor(user(logits[:, s], batch_obj)) for s in range(logits.shape[1])]
            for c in cols[:1]:
                _check_metric_output(c, B, metric)
            return torch.stack([c.to(logits.device, torch.float32) for c in cols], 1)

        clean = fn(clean_logits[:, None])  # shape check before any sweep work
        bad = int((~torch.isfinite(clean)).sum())
        if bad:
            raise ValueError(f"metric {_metric_name(metric)!r} returned NaN/inf for {bad} of {B} prompts on the unpatched "
                             "target run; a patching metric must be finite (look for log(0) or a division by zero in it)")
        return fn
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or a function (logits [batch, d_vocab], batch) -> [batch]")
    if prompts.answer_ids is None:
        raise ValueError(f"metric {metric!r} needs the correct answers: give the target batch .answer_ids (tvlens.icl_prompts does)")
    ans = prompts.answer_ids.to(clean_logits.device)
    V = clean_logits.shape[-1]
    if bool((ans < 0).any()) or bool((ans >= V).any()):
        raise ValueError(f"target answer_ids out of range for a vocabulary of {V} tokens")
    if metric == "logit_diff":
        foil = prompts.foil_ids
        if foil is None:
            masked = clean_logits.float().scatter(-1, ans[:, None], float("-inf"))
            foil = masked.argmax(-1)
        foil = foil.to(clean_logits.device)

    def fn(logits: Tensor) -> Tensor:
        idx = ans[:, None, None].expand(logits.shape[0], logits.shape[1], 1)
        if metric == "accuracy":
            return (logits.argmax(-1) == idx[..., 0]).float()
        if metric == "logit_diff":
            fidx = foil[:, None, None].expand_as(idx)
            return (logits.gather(-1, idx) - logits.gather(-1, fidx))[..., 0].float()
        lp = logits.float().log_softmax(-1).gather(-1, idx)[..., 0]
        return lp if metric == "logprob" else lp.exp()

    return fn


def _check_metric_output(value: Any, n: int, metric: Any) -> None:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"metric {_metric_name(metric)!r} returned {shape} for {n} prompts; a metric must map "
            f"(logits [batch, d_vocab], batch) to one value per prompt, a tensor of shape [{n}] "
            "(e.g. logits.log_softmax(-1)[torch.arange(len(logits)), batch.answer_ids])"
        )


# ----------------------------------------------------------------------------------------------
# edits


@dataclass(frozen=True)
class Edit:
    """One intervention at ``hook`` of ``layer``: ``act <- lerp(act, value, weight) + add``.

    That is ``act + weight * (value - act) + add``: ``weight=1`` replaces the activation by
    ``value`` (exactly), a fractional ``weight`` blends (soft selection), ``add`` adds a vector
    (function vectors).  It applies to the *columns* in ``columns`` (``None``: every column) — a
    column is one patched configuration evaluated side by side with the others (one site of a
    sweep, one head mask, one layer of a task-vector sweep).  ``weight``, ``value`` and ``add``
    broadcast, aligned from the right, against the activation viewed as

    * ``[batch, column, *unit]`` at the final position (:meth:`PatchRunner.logits` with
      ``start_pos=-1``), or at position ``pos`` when one is named;
    * ``[batch, column, pos, *unit]`` for a suffix run (``start_pos=p``) with ``pos=None``:
      every recomputed position ``p..`` is edited,

    where ``unit`` is ``(d_model,)`` for ``resid_pre/resid_mid/resid_post/attn_out/mlp_out``,
    ``(n_heads, d_head)`` for ``z``/``q`` and ``(n_kv_heads, d_head)`` for ``k``/``v``, and the
    column axis has ``len(columns)`` entries (or 1, to broadcast).  Examples::

        Edit(6, "resid_pre", value=task_vector)                          # Hendel: replace
        Edit(9, "resid_pre", add=2.0 * function_vector)                  # Todd: add
        Edit(3, "z", weight=mask[..., None], value=mean_z[3])           # head masks, [column, head]

    The helpers :func:`replace_resid`, :func:`add_resid`, :func:`replace_heads`,
    :func:`blend_heads` build them.  ``weight`` / ``value`` / ``add`` may require grad.
    """

    layer: int
    hook: str = "resid_pre"
    weight: Tensor | float = 1.0
    value: Tensor | None = None
    add: Tensor | None = None
    columns: int | slice | Sequence[int] | Tensor | None = None
    pos: int | None = None


def replace_resid(layer: int, value: Tensor, *, columns: Any = None, hook: str = "resid_pre", pos: int | None = None) -> Edit:
    """Replace the residual (``hook``) at ``layer`` by ``value`` (Hendel et al. 2023's task-vector patch)."""
    return Edit(layer, hook, 1.0, value, None, columns, pos)


def add_resid(layer: int, value: Tensor, *, alpha: float | Tensor = 1.0, columns: Any = None,
              hook: str = "resid_pre", pos: int | None = None) -> Edit:
    """Add ``alpha * value`` to the residual at ``layer`` (Todd et al. 2024's function-vector intervention)."""
    return Edit(layer, hook, 0.0, None, alpha * value, columns, pos)


def replace_heads(layer: int, mask: Tensor, value: Tensor, *, columns: Any = None, hook: str = "z",
                  pos: int | None = None) -> Edit:
    """Replace the heads selected by ``mask`` (``[..., head]``, 0/1) with ``value`` (``[..., head, d_head]``).

    ``mask`` of shape ``[column, head]`` evaluates one head set per column (REINFORCE samples);
    ``value`` of shape ``[head, d_head]`` (task means) broadcasts over prompts and columns.
    """
    return Edit(layer, hook, mask.to(value.dtype)[..., None], value, None, columns, pos)


def blend_heads(layer: int, alpha: Tensor, value: Tensor, *, columns: Any = None, hook: str = "z",
                pos: int | None = None) -> Edit:
    """``z <- (1 - alpha) * z + alpha * value`` per head: soft selection weights, differentiable in ``alpha``."""
    return Edit(layer, hook, alpha[..., None], value, None, columns, pos)


@dataclass
class _NormEdit:
    """An :class:`Edit` with resolved layer, column indices and tensors on the model's device."""

    layer: int
    hook: str
    weight: Tensor | float
    value: Tensor | None
    add: Tensor | None
    columns: list[int]  # global column indices, in the order of the tensors' column axis
    pos: int | None  # absolute position index (non-negative) or None
    canon_rank: int  # rank of the canonical view the tensors broadcast against

    def tensors(self) -> tuple[Any, Any, Any]:
        return self.weight, self.value, self.add

    def col_axis(self, t: Any) -> int | None:
        """Axis of ``t`` that indexes columns, or None when ``t`` broadcasts over them."""
        if not isinstance(t, Tensor):
            return None
        ax = t.ndim - (self.canon_rank - 1)
        if ax < 0 or t.shape[ax] == 1:
            return None
        return ax

    def select(self, local: Sequence[int]) -> tuple[Any, Any, Any]:
        """``weight`` / ``value`` / ``add`` restricted to the given local column positions."""
        out = []
        for t in self.tensors():
            ax = self.col_axis(t)
            if ax is not None:
                t = t.index_select(ax, torch.as_tensor(local, device=t.device))
            out.append(t)
        return out[0], out[1], out[2]

    def apply(self, sub: Tensor, weight: Any, value: Any, add: Any) -> Tensor:
        """The edited activation for the region ``sub`` (canonical view)."""
        new = sub
        if value is not None:
            w = weight if isinstance(weight, Tensor) else torch.tensor(float(weight), dtype=sub.dtype, device=sub.device)
            new = torch.lerp(new, value.expand_as(new) if value.shape != new.shape else value, w.to(sub.dtype))
        if add is not None:
            new = new + add
        return new.expand_as(sub) if new.shape != sub.shape else new


def _unit_shape(model_info: Any, kind: str) -> tuple[int, ...]:
    u = _UNIT[kind]
    if u == "model":
        return (model_info.d_model,)
    return (model_info.n_heads if u == "heads" else model_info.n_kv_heads, model_info.d_head)


def _columns_list(spec: Any, n_columns: int | None) -> list[int] | None:
    if spec is None:
        return None if n_columns is None else list(range(n_columns))
    if isinstance(spec, bool):
        raise TypeError("Edit.columns must be an int, a slice, a sequence of ints or None")
    if isinstance(spec, int):
        return [spec]
    if isinstance(spec, slice):
        if n_columns is None and spec.stop is None:
            raise ValueError("an Edit with an open slice of columns needs n_columns")
        return list(range(*spec.indices(n_columns if n_columns is not None else spec.stop)))
    if isinstance(spec, Tensor):
        return [int(c) for c in spec.reshape(-1).tolist()]
    return [int(c) for c in spec]


def _normalize_edits(edits: Iterable[Edit], info: Any, n_columns: int | None, n_pos: int, start_pos: int,
                     device: torch.device, dtype: torch.dtype, n_batch: int) -> tuple[list[_NormEdit], int]:
    """Validate edits and resolve columns; returns the edits and the number of columns."""
    edits = list(edits)
    for e in edits:
        if not isinstance(e, Edit):
            raise TypeError(f"edits must be tvlens.analyses.patching.Edit objects, got {type(e).__name__}")
        if e.hook not in _UNIT:
            raise ValueError(f"unknown hook {e.hook!r} for an Edit; use one of {', '.join(_UNIT)}")
        if not -info.n_layers <= int(e.layer) < info.n_layers:
            raise ValueError(f"Edit layer {e.layer} is out of range: this model has {info.n_layers} layers (0..{info.n_layers - 1})")
    if n_columns is None:  # infer from explicit columns, then from tensor shapes
        cols = [c for e in edits for c in (_columns_list(e.columns, None) or [])]
        n_columns = max(cols) + 1 if cols else 1
        if not cols:
            for e in edits:
                unit = len(_unit_shape(info, e.hook))
                rank = 2 + unit + (1 if (e.pos is None and start_pos < n_pos - 1) else 0)
                for t in (e.weight, e.value, e.add):
                    if isinstance(t, Tensor) and t.ndim >= rank - 1:
                        n_columns = max(n_columns, int(t.shape[t.ndim - (rank - 1)]))
    out = []
    for e in edits:
        layer = int(e.layer) % info.n_layers
        cols = _columns_list(e.columns, n_columns)
        if not cols:
            continue
        bad = [c for c in cols if not 0 <= c < n_columns]
        if bad:
            raise ValueError(f"Edit at layer {layer} names column {bad[0]} but there are {n_columns} columns (0..{n_columns - 1})")
        pos = None if e.pos is None else int(e.pos) % n_pos
        final_mode = start_pos == n_pos - 1
        if pos is not None:
            if pos < start_pos:
                raise ValueError(f"Edit position {e.pos} is before the recomputed suffix (start_pos={start_pos}); "
                                 f"use start_pos <= {pos}")
            if final_mode:
                pos = None  # the final position is the only one there is
        unit = _unit_shape(info, e.hook)
        rank = 2 + len(unit) + (1 if (pos is None and not final_mode) else 0)
        conv = lambda t: t.to(device=device, dtype=dtype) if isinstance(t, Tensor) else t  # noqa: E731
        if e.value is None and e.add is None:
            raise ValueError(f"Edit at layer {layer} has neither a value nor an add: it would change nothing")
        weight = conv(e.weight) if isinstance(e.weight, Tensor) else float(e.weight)
        ne = _NormEdit(layer, e.hook, weight, conv(e.value), conv(e.add), cols, pos, rank)
        canon = (n_batch, len(cols), *((n_pos - start_pos,) if rank > 2 + len(unit) else ()), *unit)
        names = "[batch, column, " + ("pos, " if len(canon) > 2 + len(unit) else "") + (
            "d_model]" if len(unit) == 1 else "head, d_head]")
        for name, t in (("weight", weight), ("value", ne.value), ("add", ne.add)):
            if isinstance(t, Tensor):
                try:
                    ok = t.ndim <= rank and torch.broadcast_shapes(t.shape, canon) == canon
                except RuntimeError:
                    ok = False
                if not ok:
                    raise ValueError(f"Edit.{name} at layer {layer} ({e.hook}) has shape {tuple(t.shape)}, which does not "
                                     f"broadcast to the activation {names} = {list(canon)}")
        out.append(ne)
    return out, n_columns


# ----------------------------------------------------------------------------------------------
# the cache hand-off to the bridge's attention


class _RecordKV:
    """``past_key_values`` stand-in for the clean run: records the keys/values attention uses."""

    def __init__(self, store: dict, layer: int):
        self.store, self.layer = store, layer

    def update(self, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        self.store[self.layer] = (k.detach(), v.detach())
        return k, v


class _PrefixKV:
    """``past_key_values`` stand-in for recomputation: prepends the cached keys/values of the prefix."""

    def __init__(self, k: Tensor, v: Tensor):
        self.k, self.v = k, v

    def update(self, k: Tensor, v: Tensor, *args: Any, **kwargs: Any) -> tuple[Tensor, Tensor]:
        return torch.cat([self.k, k], dim=-2), torch.cat([self.v, v], dim=-2)


def _inject_cache(attn: torch.nn.Module, cache: Any):
    """Register a pre-hook handing ``cache`` to the attention as ``past_key_values``; returns the handle."""

    def pre(module: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        kwargs = dict(kwargs)
        for name in _CACHE_KWARGS:
            kwargs.pop(name, None)
        kwargs["past_key_values"] = cache
        return args, kwargs

    return attn.register_forward_pre_hook(pre, with_kwargs=True)


class _Unsupported(Exception):
    pass


def _bool_mask(captured: Any, mask2d: Tensor, P: int) -> Tensor:
    """The attention mask a block used, as a boolean ``[batch|1, 1|heads, P, P]`` (True = attend)."""
    if isinstance(captured, Tensor) and captured.ndim == 4:
        m = captured[..., :P, :P]
        if m.dtype != torch.bool:
            m = m > torch.finfo(m.dtype).min / 2 if m.is_floating_point() else m != 0
        return m
    if captured is not None and not (isinstance(captured, Tensor) and captured.ndim == 2):
        raise _Unsupported(f"attention_mask of shape {getattr(captured, 'shape', type(captured))}")
    causal = torch.ones(P, P, dtype=torch.bool, device=mask2d.device).tril()
    return causal[None, None] & mask2d[:, None, None, :].bool()


# ----------------------------------------------------------------------------------------------
# the engine


def _default_budget(device: torch.device) -> int:
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.4)
        except Exception:  # pragma: no cover - exotic setups
            return 4 << 30
    return _DEFAULT_CPU_BUDGET


class PatchRunner:
    """A target batch run once and cached, plus exact recomputation of only what edits can change.

    ::

        runner = PatchRunner(model, batch)    # one forward of the target
        runner.clean_logits                   # [batch, d_vocab] at the final position
        logits = runner.logits([replace_resid(l, tv, columns=l) for l in range(L)], n_columns=L)
        logits.shape                          # [batch, L, d_vocab]: the task vector at every layer

    :meth:`logits` evaluates ``n_columns`` edited configurations side by side in one pass
    (``start_pos=-1``: only the final position is edited, only it is recomputed;
    ``start_pos=p``: positions ``p..`` are recomputed, sites along the batch axis).  Each column
    is recomputed from its lowest edited layer upwards, starting from the cached clean residual.
    :meth:`map` does the same in memory-bounded chunks and reduces each chunk with a function
    (a metric), so a sweep of thousands of columns never holds their logits at once.

    Gradients flow to ``Edit.weight`` / ``value`` / ``add`` when grad mode is on (the cached target
    activations are constants).  ``fast=False`` (or a model where the self-check fails) runs one
    full hooked forward per column instead — same numbers, slower.
    """

    def __init__(self, model: Any, target: Any, *, fast: bool | Literal["auto"] = "auto"):
        from ..models import ModelInfo

        self.model = model
        self.info = ModelInfo.of(model)
        self.prompts = _as_prompts(target, "target")
        self.device = _hooks.device_of(model)
        self.B, self.P = len(self.prompts), self.prompts.n_pos
        self.L = self.info.n_layers
        self._fast_setting = fast
        self._fast_ok: dict[str, bool] = {}
        self._kw_cache: dict = {}
        self.tokens = self.prompts.tokens.to(self.device)
        self.mask = self.prompts.mask.to(self.device)
        self.bridge = fast is not False and hasattr(model, "blocks") and all(
            hasattr(b, "attn") and hasattr(b, "original_component") for b in model.blocks)
        if fast is True and not self.bridge:
            raise ValueError("fast=True needs a TransformerLens 4 TransformerBridge (tvlens.load_model); use fast='auto'")
        with torch.no_grad():
            if self.bridge:
                self._capture()
            else:
                logits = _hooks.run(model, self.tokens, attention_mask=self.mask)
                self.clean_logits = logits[:, -1].detach()
        self.dtype = self.clean_logits.dtype if self.clean_logits.is_floating_point() else torch.float32
        try:
            self.dtype = next(model.parameters()).dtype
        except StopIteration:
            pass

    # -- clean run -----------------------------------------------------------------------------

    def _capture(self) -> None:
        model = self.model
        blocks = list(model.blocks)
        self.block_kwargs: list[dict] = [None] * self.L  # type: ignore[list-item]
        self.resid: list[Tensor] = [None] * self.L  # type: ignore[list-item]
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        self._hidden_name: list[str] = [None] * self.L  # type: ignore[list-item]
        handles = []

        def grab(layer: int):
            def pre(module: Any, args: tuple, kwargs: dict) -> None:
                fwd = module.original_component.forward
                params = inspect.signature(fwd).parameters
                bound = inspect.signature(fwd).bind_partial(*args, **kwargs).arguments
                flat: dict = {}
                for name, val in bound.items():
                    if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                        flat.update(val)
                    elif params[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                        flat[name] = val
                hidden_name = next(iter(params))
                self._hidden_name[layer] = hidden_name
                self.resid[layer] = flat.pop(hidden_name).detach()
                self.block_kwargs[layer] = flat
            return pre

        try:
            for layer, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(grab(layer), with_kwargs=True))
                handles.append(_inject_cache(block.attn, _RecordKV(kv, layer)))
            logits = _hooks.run(model, self.tokens, attention_mask=self.mask)
        finally:
            for h in handles:
                h.remove()
        self.clean_logits = logits[:, -1].detach()
        self.keys = [kv[layer][0] if layer in kv else None for layer in range(self.L)]
        self.values = [kv[layer][1] if layer in kv else None for layer in range(self.L)]
        if any(k is None for k in self.keys) or any(r is None for r in self.resid):
            self.bridge = False  # some block did not go through the bridge's attention: use the naive path

    # -- public ---------------------------------------------------------------------------------

    def clean_resid(self, layer: int) -> Tensor:
        """The target's clean residual entering block ``layer`` (``hook_resid_pre``), ``[batch, pos, d_model]``."""
        if not self.bridge:
            raise RuntimeError("clean residuals are cached only on the fast path (a TransformerBridge)")
        return self.resid[layer]

    def logits(self, edits: Iterable[Edit], n_columns: int | None = None, *, start_pos: int = -1) -> Float[Tensor, "batch column d_vocab"]:
        """Final-position logits of ``n_columns`` edited configurations, in one pass.

        ``start_pos=-1`` (default): the edits act on the final position only (``Edit.pos`` is
        ignored) and only the final token is recomputed.  ``start_pos=p``: edits act on positions
        ``>= p`` (all of them, or ``Edit.pos``) and positions ``p..`` are recomputed.
        """
        start_pos = int(start_pos) % self.P
        nedits, n_columns = _normalize_edits(edits, self.info, n_columns, self.P, start_pos, self.device, self.dtype,
                                             self.B)
        return self._logits(nedits, n_columns, start_pos)

    def map(self, edits: Iterable[Edit], fn: Callable[[Tensor], Tensor], n_columns: int | None = None, *,
            start_pos: int = -1, max_memory: int | None = None, batch_size: int | None = None,
            progress: bool = False, desc: str = "patching", pbar: Any = None) -> Tensor:
        """:meth:`logits` in column chunks, each reduced by ``fn(logits [batch, chunk, d_vocab]) -> [batch, chunk, ...]``.

        The chunk size keeps the transient activations under ``max_memory`` bytes (default: 512 MiB
        on CPU, 40% of free memory on a GPU), or holds ``batch_size`` (prompt, column) rows.
        ``progress`` shows a tqdm bar over columns when there are several chunks (``pbar``: advance
        an existing bar instead).  Returns the chunks' results concatenated along the column axis.
        """
        start_pos = int(start_pos) % self.P
        nedits, n_columns = _normalize_edits(edits, self.info, n_columns, self.P, start_pos, self.device, self.dtype,
                                             self.B)
        size = self.columns_per_chunk(start_pos, max_memory=max_memory, batch_size=batch_size)
        bounds = [(c, min(c + size, n_columns)) for c in range(0, n_columns, size)]
        own = None
        if pbar is None and progress and len(bounds) > 1:
            from tqdm.auto import tqdm

            pbar = own = tqdm(total=n_columns, desc=desc, unit="site")
        outs = []
        try:
            for c0, c1 in bounds:
                outs.append(fn(self._logits(_restrict(nedits, c0, c1), c1 - c0, start_pos)))
                if pbar is not None:
                    pbar.update(c1 - c0)
        finally:
            if own is not None:
                own.close()
        return torch.cat(outs, dim=1)

    def columns_per_chunk(self, start_pos: int = -1, *, max_memory: int | None = None, batch_size: int | None = None) -> int:
        """How many columns fit in one pass of :meth:`map` for this batch."""
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            return max(1, batch_size // self.B)
        budget = max_memory if max_memory is not None else _default_budget(self.device)
        return max(1, min(1024, int(budget // max(1, self.B * self.bytes_per_row(start_pos)))))

    def bytes_per_row(self, start_pos: int = -1) -> int:
        """Rough transient bytes per (prompt, column) row of a recompute pass (for chunk sizing)."""
        return _bytes_per_row(self.model, self.info, self.P, int(start_pos) % self.P, self.dtype)

    # -- internals ------------------------------------------------------------------------------

    def _use_fast(self, layout: str, start_pos: int) -> bool:
        if not self.bridge or self._fast_setting is False:
            return False
        # padding changes which mask the blocks receive: verify padded and unpadded batches separately
        key = (layout if layout == "seq" else ("batch", start_pos > 0), bool((self.mask == 0).any()))
        if key not in self._fast_ok:
            try:
                known = _VERIFIED.setdefault(self.model, {})
            except TypeError:  # pragma: no cover - unhashable model
                known = {}
            if key not in known:
                known[key] = self._self_check(start_pos)
            self._fast_ok[key] = known[key]
        return self._fast_ok[key]

    def _self_check(self, start_pos: int) -> bool:
        """Recompute one unedited column from layer 0; it must reproduce the target's logits."""
        problem = None
        try:
            with torch.no_grad():
                got = self._fast_logits([], 1, start_pos, force_start=0)[:, 0]
            ref = self.clean_logits
            tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 5e-2
            err = float((got.float() - ref.float()).abs().max())
            scale = float(ref.float().abs().max()) or 1.0
            if not err <= tol * max(1.0, scale):
                problem = f"recomputed logits differ from the target run by {err:.2e}"
        except _Unsupported as exc:
            problem = f"unsupported block argument ({exc})"
        if problem is None:
            return True
        if self._fast_setting is True:
            raise RuntimeError(f"tvlens.analyses.patching fast path unavailable for this model: {problem}")
        warnings.warn(f"tvlens.analyses.patching: fast recompute unavailable for this model ({problem}); using one full "
                      "forward per site instead (exact, slower)", RuntimeWarning, stacklevel=4)
        return False

    def _logits(self, nedits: list[_NormEdit], n_columns: int, start_pos: int) -> Tensor:
        layout = "seq" if start_pos == self.P - 1 else "batch"
        if self._use_fast(layout, start_pos):
            return self._fast_logits(nedits, n_columns, start_pos)
        return self._naive_logits(nedits, n_columns, start_pos)

    def _layer_kwargs(self, layer: int, layout: str, S: int, start_pos: int) -> dict:
        """The block's keyword arguments for the recomputed tokens (positions, rotary, mask)."""
        P, B = self.P, self.B
        if self._kw_cache.get("start_pos") != start_pos:  # keep only one suffix start's tensors alive
            self._kw_cache = {"start_pos": start_pos}
        key = (layer, layout, S, start_pos)
        hit = self._kw_cache.get(key)
        if hit is not None:
            return hit
        dev = self.device
        out: dict = {}
        for name, val in self.block_kwargs[layer].items():
            if name in _CACHE_KWARGS:
                continue
            if name == "use_cache":
                out[name] = False
            elif name == "attention_mask":
                ck = ("mask", id(val), layout, S, start_pos)
                m = self._kw_cache.get(ck)
                if m is None:
                    full = _bool_mask(val, self.mask, P)
                    if layout == "seq":
                        pref = full[:, :, -1:, : P - 1]
                        pref = pref.expand(pref.shape[0], pref.shape[1], S, P - 1)
                        eye = torch.eye(S, dtype=torch.bool, device=dev).expand(pref.shape[0], pref.shape[1], S, S)
                        m = torch.cat([pref, eye], dim=-1)
                    else:
                        m = full[:, :, start_pos:, :]
                        m = m.repeat(S, 1, 1, 1) if m.shape[0] == B else m
                    self._kw_cache[ck] = m
                out[name] = m
            elif name == "position_embeddings" and isinstance(val, (tuple, list)):
                out[name] = tuple(self._pos_rows(t, layout, S, start_pos) for t in val)
            elif name in ("position_ids",) and isinstance(val, Tensor):
                out[name] = self._pos_rows(val, layout, S, start_pos)
            elif name == "cache_position" and isinstance(val, Tensor):
                out[name] = (torch.full((S,), P - 1, dtype=val.dtype, device=val.device) if layout == "seq"
                             else val[start_pos:])
            elif val is None or isinstance(val, (bool, int, float, str)):
                out[name] = val
            else:
                raise _Unsupported(f"{name}={type(val).__name__}")
        self._kw_cache[key] = out
        return out

    def _pos_rows(self, t: Tensor, layout: str, S: int, start_pos: int) -> Tensor:
        """A ``[batch|1, pos, ...]`` tensor (position ids, rotary cos/sin) for the recomputed tokens."""
        if t.ndim < 2 or t.shape[1] != self.P or t.shape[0] not in (1, self.B):
            raise _Unsupported(f"position tensor of shape {tuple(t.shape)}")
        ck = ("pos", id(t), layout, S, start_pos)  # layers share these tensors: build them once
        hit = self._kw_cache.get(ck)
        if hit is not None:
            return hit
        if layout == "seq":
            last = t[:, -1:]
            out = last.expand(last.shape[0], S, *last.shape[2:])
        else:
            suf = t[:, start_pos:]
            out = suf.repeat(S, *([1] * (suf.ndim - 1))) if suf.shape[0] == self.B else suf
        self._kw_cache[ck] = out
        return out

    def _edit_hooks(self, nedits: list[_NormEdit], order_pos: dict[int, int], layout: str, start_pos: int) -> list:
        """One hook per (layer, kind) that applies that hook's edits on the canonical view."""
        groups: dict[tuple[int, str], list[_NormEdit]] = {}
        for e in nedits:
            groups.setdefault((e.layer, e.hook), []).append(e)
        B = self.B
        fwd = []
        for (layer, kind), es in groups.items():
            plans = []
            for e in es:
                idx = torch.as_tensor([order_pos[c] for c in e.columns], device=self.device)
                t = None if (e.pos is None or layout == "seq") else e.pos - start_pos
                plans.append((idx, t, e))

            def fn(act: Tensor, hook: Any = None, plans=plans) -> Tensor:
                if layout == "seq":
                    canon = act  # [B, S, *unit]
                else:
                    S = act.shape[0] // B
                    canon = act.reshape(S, B, *act.shape[1:]).transpose(0, 1)  # [B, S, T, *unit]
                for idx, t, e in plans:
                    sub = canon[:, idx] if t is None else canon[:, idx, t]
                    new = e.apply(sub, *e.tensors())
                    canon = canon.clone()
                    if t is None:
                        canon[:, idx] = new
                    else:
                        canon[:, idx, t] = new
                if layout == "seq":
                    return canon
                return canon.transpose(0, 1).reshape(act.shape)

            fwd.append((act_name(kind, layer), fn))
        return fwd

    def _fast_logits(self, nedits: list[_NormEdit], n_columns: int, start_pos: int, force_start: int | None = None) -> Tensor:
        model, B, P, L = self.model, self.B, self.P, self.L
        layout = "seq" if start_pos == P - 1 else "batch"
        start = [L] * n_columns
        for e in nedits:
            for c in e.columns:
                start[c] = min(start[c], e.layer)
        if force_start is not None:
            start = [min(s, force_start) for s in start]
        order = sorted(range(n_columns), key=lambda c: start[c])
        active = [c for c in order if start[c] < L]
        order_pos = {c: i for i, c in enumerate(active)}
        out = self.clean_logits[:, None].expand(B, n_columns, self.clean_logits.shape[-1])
        if not active:
            return out.clone()
        first = start[active[0]]
        n_at = {}
        for c in active:
            n_at[start[c]] = n_at.get(start[c], 0) + 1
        T = P - start_pos
        h: Tensor | None = None
        S = 0
        fwd = self._edit_hooks(nedits, order_pos, layout, start_pos)
        with _hooks.hooked(model, fwd):
            for layer in range(first, L):
                n_new = n_at.get(layer, 0)
                if n_new:
                    if layout == "seq":
                        new = self.resid[layer][:, -1:].expand(B, n_new, self.resid[layer].shape[-1])
                    else:
                        new = self.resid[layer][:, start_pos:].repeat(n_new, 1, 1)
                    h = new if h is None else torch.cat([h, new], dim=1 if layout == "seq" else 0)
                    S += n_new
                kwargs = self._layer_kwargs(layer, layout, S, start_pos)
                k, v = self.keys[layer], self.values[layer]
                if layout == "seq":
                    cache = _PrefixKV(k[:, :, : P - 1], v[:, :, : P - 1])
                elif start_pos > 0:
                    cache = _PrefixKV(k[:, :, :start_pos].repeat(S, 1, 1, 1), v[:, :, :start_pos].repeat(S, 1, 1, 1))
                else:
                    cache = None
                handle = _inject_cache(model.blocks[layer].attn, cache) if cache is not None else None
                try:
                    res = model.blocks[layer](h, **kwargs)
                finally:
                    if handle is not None:
                        handle.remove()
                h = res[0] if isinstance(res, tuple) else res
            final = h if layout == "seq" else h[:, -1].reshape(S, B, -1).transpose(0, 1)  # [B, S, d_model]
            logits = model.unembed(model.ln_final(final))
        if len(active) == n_columns and active == list(range(n_columns)):
            return logits
        res = out.clone() if not logits.requires_grad else out.to(logits.dtype).clone()
        res[:, torch.as_tensor(active, device=res.device)] = logits.to(res.dtype)
        return res

    def _naive_logits(self, nedits: list[_NormEdit], n_columns: int, start_pos: int) -> Tensor:
        """One hooked full forward per column (fallback, and the reference semantics)."""
        P = self.P
        final_mode = start_pos == P - 1
        outs = []
        for c in range(n_columns):
            fwd = []
            for e in nedits:
                if c not in e.columns:
                    continue
                parts = e.select([e.columns.index(c)])

                def fn(act: Tensor, hook: Any = None, e=e, parts=parts) -> Tensor:
                    orig, act = act, act.clone()  # read from the original: autograd needs it unmodified
                    if final_mode:
                        region = (slice(None), P - 1)
                    elif e.pos is not None:
                        region = (slice(None), e.pos)
                    else:
                        region = (slice(None), slice(start_pos, None))
                    sub = orig[region][:, None]  # [B, 1, (T,) *unit]
                    act[region] = e.apply(sub, *parts)[:, 0]
                    return act

                fwd.append((act_name(e.hook, e.layer), fn))
            if fwd:
                logits = _hooks.run(self.model, self.tokens, attention_mask=self.mask, fwd_hooks=fwd)[:, -1]
            else:
                logits = self.clean_logits
            outs.append(logits)
        return torch.stack(outs, dim=1)


def _bytes_per_row(model: Any, info: Any, P: int, start_pos: int, dtype: torch.dtype) -> int:
    """Rough transient bytes of one (prompt, column) row recomputed from ``start_pos`` (chunk sizing)."""
    T = P - start_pos
    d_mlp = int(getattr(getattr(model, "cfg", None), "d_mlp", None) or 4 * info.d_model)
    per_tok = 8 * info.d_model + 3 * d_mlp + 2 * info.n_heads * (P + 64)
    prefix = 0 if T == 1 else 4 * info.n_kv_heads * info.d_head * start_pos + 2 * info.n_heads * info.d_head * P
    elt = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return int(elt * (T * per_tok + prefix) + 4 * 3 * info.d_vocab)


def _prompts_per_group(model: Any, info: Any, P: int, start_pos: int, batch_size: int | None,
                       max_memory: int | None) -> int | None:
    """Prompts per target run: ``batch_size`` rows, or as many as fit the memory budget (one column each)."""
    if batch_size is not None:
        return max(1, int(batch_size))
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:  # pragma: no cover
        dtype = torch.float32
    budget = max_memory if max_memory is not None else _default_budget(_hooks.device_of(model))
    # the target's own forward and caches scale like a full-length row; keep a handful of columns per chunk
    per_prompt = 4 * _bytes_per_row(model, info, P, start_pos, dtype) + _bytes_per_row(model, info, P, 0, dtype)
    return max(1, int(budget // max(1, per_prompt)))


def _restrict(nedits: list[_NormEdit], c0: int, c1: int) -> list[_NormEdit]:
    """The edits' parts that touch columns ``c0..c1-1``, renumbered from 0."""
    out = []
    for e in nedits:
        local = [j for j, c in enumerate(e.columns) if c0 <= c < c1]
        if not local:
            continue
        w, v, a = e.select(local) if len(local) != len(e.columns) else e.tensors()
        out.append(_NormEdit(e.layer, e.hook, w, v, a, [e.columns[j] - c0 for j in local], e.pos, e.canon_rank))
    return out


def final_position_logits(model: Any, batch: Any, edits: Iterable[Edit], n_columns: int | None = None) -> Tensor:
    """``[batch, column, d_vocab]`` final-position logits with ``edits`` applied at the final position.

    A one-shot :class:`PatchRunner`; keep the runner instead when evaluating several edit sets
    on the same batch (the target forward is then paid once).
    """
    return PatchRunner(model, batch).logits(edits, n_columns)


# ----------------------------------------------------------------------------------------------
# sources


def _capture_acts(model: Any, prompts: _Prompts, kind: str, layers: Sequence[int], final_only: bool,
                  grad: bool = False) -> tuple[dict[int, Tensor], Tensor]:
    """Activations ``kind`` at ``layers`` ([batch, pos|1, *unit]) and the final-position logits."""
    store: dict[int, Tensor] = {}

    def grab(layer: int):
        def fn(act: Tensor, hook: Any = None) -> None:
            store[layer] = (act[:, -1:] if final_only else act).detach().clone()
        return fn

    device = _hooks.device_of(model)
    with torch.no_grad():
        logits = _hooks.run(model, prompts.tokens.to(device), attention_mask=prompts.mask.to(device),
                            fwd_hooks=[(act_name(kind, layer), grab(layer)) for layer in layers])
    return store, logits[:, -1].detach()


def _means_tensor(source: Any, kind: str, info: Any, positions: str = "final") -> Tensor | None:
    """Task-mean activations ``[layer, unit, d_head]`` from a tensor or a ``HeadStats``; None for a prompt batch.

    Layers a ``HeadStats`` does not cover are NaN (patching them is refused by the caller).
    """
    unit = _unit_shape(info, kind)
    want = (info.n_layers, *unit)
    if isinstance(source, Tensor):
        t = source
        if t.ndim == len(want) + 1 and t.shape[0] == 1:
            t = t[0]
        if tuple(t.shape) != want:
            several = t.ndim == len(want) + 1 and tuple(t.shape[1:]) == want
            raise ValueError(f"means source has shape {tuple(t.shape)}"
                             f"{' (several tasks: select one, e.g. means[i])' if several else ''}; patching {kind!r} "
                             f"needs task-mean activations of shape [layer, head, d_head] = {list(want)}")
        return t
    z = getattr(source, "z_mean", None)
    if not isinstance(z, Tensor) or hasattr(source, "tokens"):
        return None
    saved = (getattr(source, "meta", None) or {}).get("config_hash")
    if saved and saved != info.config_hash:
        raise ValueError(f"these head means come from another model (config hash {saved}, this model "
                         f"{info.config_hash}); recompute them with tvlens.head_means(model, tasks)")
    if kind != "z":
        raise ValueError(f"a HeadStats holds means of hook_z; patching component {kind!r} needs a tensor of "
                         f"{kind} means [layer, n_kv_heads, d_head] (or use component='z')")
    tasks = tuple(getattr(source, "tasks", ()) or ())
    if z.shape[0] != 1:
        raise ValueError(f"the HeadStats holds {z.shape[0]} tasks {list(tasks)}; patch one task's means: "
                         f"source=stats.select([{tasks[0] if tasks else 'task'!r}]) (or stats.mean(task))")
    z = z[0]
    if z.ndim == 4:  # per position, right-aligned: the final position is index -1
        if positions != "final":
            raise ValueError("per-position means can only be patched at the final position; pass "
                             "stats.at_position(-1) (or a pooled HeadStats) for positions='all'/'each'")
        z = z[:, :, -1]
    layers = tuple(getattr(source, "layers", ()) or range(z.shape[0]))
    if z.shape[1:] != want[1:]:
        raise ValueError(f"HeadStats means have heads × d_head = {tuple(z.shape[1:])} but this model needs {want[1:]}: "
                         "they come from a different model")
    full = torch.full(want, float("nan"), dtype=z.dtype, device=z.device)
    full[torch.as_tensor(layers, dtype=torch.long)] = z
    return full


# ----------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class PatchResult:
    """A patching sweep: ``values`` over sites, the metric averaged over prompts.

    ``values`` is ``[layer, head]`` (:func:`patch_heads`, ``positions="final"|"all"``),
    ``[layer, head, pos]`` (``positions="each"``) or ``[layer, pos]`` (:func:`patch_positions`);
    ``dims`` names the axes.  Without normalisation a value is the patched metric (compare it with
    ``target_value``, the unpatched target's metric); with ``normalize=True`` it is
    ``(patched - target) / (source - target)``: 0 = no effect, 1 = the source's full metric
    (TransformerLens convention).  Sites not swept are NaN.  ``per_prompt`` holds the raw
    per-prompt metric ``[prompt, *dims]``.  For :func:`attribution_patch_heads` (``method=
    "attribution"``) the values are the linear estimates, ``exact`` holds exactly patched values
    where they were confirmed (NaN elsewhere) and ``correlation`` their Pearson correlation.
    """

    values: Tensor
    dims: tuple[str, ...]
    metric: str
    target_value: float
    source_value: float | None
    normalized: bool
    per_prompt: Tensor | None = None
    method: str = "exact"
    exact: Tensor | None = None
    correlation: float | None = None
    pos_labels: tuple[str, ...] | None = None
    meta: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def effect(self) -> Tensor:
        """Change of the metric caused by each patch (``values - target_value``, or ``values`` if normalised)."""
        return self.values if self.normalized or self.method == "attribution" else self.values - self.target_value

    def top(self, k: int = 10, *, by: Literal["effect", "abs"] = "effect") -> list[tuple]:
        """The ``k`` sites with the largest effect (``by="abs"``: largest magnitude), as tuples ``(*index, value)``."""
        eff = self.effect.float()
        score = eff.abs() if by == "abs" else eff
        score = torch.where(torch.isnan(score), torch.full_like(score, -math.inf), score)
        k = min(int(k), int(torch.isfinite(score).sum()))
        if k <= 0:
            return []
        flat = score.reshape(-1).topk(k).indices
        out = []
        for i in flat.tolist():
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), score.shape))
            out.append((*idx, float(self.values[idx])))
        return out

    def plot(self, *, pos: int | None = -1, title: str | None = None) -> Any:
        """Heatmap (diverging, centred at 0 on the effect) with the shared plot module.

        ``[layer, head, pos]`` results show one position (``pos``, default the final one).
        """
        from .. import plot as _plot

        eff = self.effect
        label = ("normalised " if self.normalized else "Δ ") + self.metric
        if self.method == "attribution":
            label = "attribution Δ " + self.metric + (" (normalised)" if self.normalized else "")
        what = self.meta.get("what", "patching")
        if self.dims == ("layer", "pos"):
            return _plot.layer_position_heatmap(eff, list(self.pos_labels) if self.pos_labels else None,
                                                title=title or what, zlabel=label, diverging=True)
        if self.dims == ("layer", "head", "pos"):
            p = int(pos if pos is not None else -1) % eff.shape[-1]
            eff = eff[..., p]
            title = title or f"{what} (position {p})"
        return _plot.layer_head_heatmap(eff, title=title or what, zlabel=label, diverging=True)

    def to_html(self, path: str | Path, **plot_kw: Any) -> Path:
        """Write :meth:`plot` as a standalone HTML file; returns its path."""
        from .. import plot as _plot

        return _plot.save_figure(self.plot(**plot_kw), path, png=False)[0]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` + ``<path>.json`` (atomic); returns the tensor file's path."""
        from ..results import save_tensors, version

        tensors = {"values": self.values}
        for name in ("per_prompt", "exact"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = dict(kind="PatchResult", tvlens_version=version(), dims=list(self.dims), metric=self.metric,
                    target_value=self.target_value, source_value=self.source_value, normalized=self.normalized,
                    method=self.method, correlation=self.correlation,
                    pos_labels=None if self.pos_labels is None else list(self.pos_labels), meta=self.meta)
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "PatchResult":
        """Read a result written by :meth:`save`; with ``model``, refuse one made with a different model."""
        from ..results import load_result

        tensors, meta = load_result(path, "PatchResult", model=model, what="patching result")
        return cls(values=tensors["values"], dims=tuple(meta["dims"]), metric=meta["metric"],
                   target_value=meta["target_value"], source_value=meta["source_value"],
                   normalized=meta["normalized"], per_prompt=tensors.get("per_prompt"), method=meta["method"],
                   exact=tensors.get("exact"), correlation=meta["correlation"],
                   pos_labels=None if meta["pos_labels"] is None else tuple(meta["pos_labels"]), meta=meta["meta"])

    def to_frame(self) -> Any:
        """A pandas DataFrame with one row per site (requires pandas)."""
        import pandas as pd

        rows = []
        vals = self.values
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in vals.shape]).reshape(-1, vals.ndim).tolist():
            rows.append({**dict(zip(self.dims, idx)), "value": float(vals[tuple(idx)])})
        return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------
# sweeps


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, choices))}")


def _sites(info: Any, layers: Sequence[int] | None, heads: Sequence[int] | None, sites: Any, n_units: int) -> list[tuple[int, int]]:
    if sites is not None:
        out = [(int(l) % info.n_layers, int(h) % n_units) for l, h in sites]
        for (l, h), (l0, h0) in zip(out, sites):
            if not -info.n_layers <= int(l0) < info.n_layers or not -n_units <= int(h0) < n_units:
                raise ValueError(f"site ({l0}, {h0}) out of range: {info.n_layers} layers × {n_units} heads")
    else:
        ls = range(info.n_layers) if layers is None else [int(l) for l in layers]
        hs = range(n_units) if heads is None else [int(h) for h in heads]
        for l in ls:
            if not -info.n_layers <= l < info.n_layers:
                raise ValueError(f"layer {l} is out of range: this model has {info.n_layers} layers (0..{info.n_layers - 1})")
        for h in hs:
            if not -n_units <= h < n_units:
                raise ValueError(f"head {h} is out of range: there are {n_units} heads (0..{n_units - 1})")
        out = [(l % info.n_layers, h % n_units) for l in ls for h in hs]
    if not out:
        raise ValueError("empty site list: give at least one layer and one head (layers=None, heads=None sweep all)")
    return out


def _prompt_groups(n: int, rows: int | None) -> list[tuple[int, int]]:
    size = n if rows is None else max(1, min(n, rows))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _head_edits(sites: list[tuple[int, int]], n_units: int, src: dict[int, Tensor] | Tensor, pos: int,
                all_pos: bool, hook: str, device: torch.device, dtype: torch.dtype) -> list[Edit]:
    """One edit per layer: column j of that layer takes unit ``sites[j][1]`` from the source.

    The weight is a one-hot ``[column, (pos,) unit, 1]`` and the value the source activation,
    broadcast over columns — nothing per site is materialised beyond the activations themselves.
    """
    by_layer: dict[int, list[int]] = {}
    for j, (l, _) in enumerate(sites):
        by_layer.setdefault(l, []).append(j)
    edits = []
    for l, cols in by_layer.items():
        onehot = torch.zeros(len(cols), n_units, device=device, dtype=dtype)
        onehot[torch.arange(len(cols)), torch.as_tensor([sites[j][1] for j in cols])] = 1
        weight = onehot[:, None, :, None] if all_pos else onehot[:, :, None]
        if isinstance(src, Tensor):  # task means [layer, unit, d_head]: broadcast over prompts and positions
            value = src[l].to(device, dtype)
        else:
            a = src[l].to(device, dtype)  # [B, pos|1, unit, d_head]
            if all_pos:
                value = a[:, None]  # [B, 1(col), pos, unit, d]
            else:
                value = (a[:, 0] if a.shape[1] == 1 else a[:, pos])[:, None]  # [B, 1(col), unit, d]
        edits.append(Edit(l, hook, weight, value, None, cols, None if all_pos else pos))
    return edits


def _check_vocab(prompts: _Prompts, what: str, info: Any) -> None:
    """Refuse token ids outside the model's vocabulary (they would fail inside the embedding)."""
    lo, hi = int(prompts.tokens.min()), int(prompts.tokens.max())
    if lo < 0 or hi >= info.d_vocab:
        raise ValueError(f"{what} token ids span {lo}..{hi} but the model's vocabulary is 0..{info.d_vocab - 1}; "
                         "tokenize with this model's tokenizer (tvlens.icl_prompts does)")


def _validate_source(target: _Prompts, source: Any, positional: bool) -> _Prompts:
    src = _as_prompts(source, "source")
    if len(src) != len(target):
        raise ValueError(f"target has {len(target)} prompts but source has {len(src)}: patching pairs prompt i of the "
                         "source with prompt i of the target, so build them with the same n_prompts (or pass task-mean "
                         "activations as the source)")
    if positional and src.n_pos != target.n_pos:
        raise ValueError(f"target has {target.n_pos} positions but source has {src.n_pos}: patching every position "
                         "pairs them index by index, so both batches need the same length (pad them to a common length, "
                         "or use positions='final', which needs only the final positions)")
    return src


def _pos_labels(model: Any, prompts: _Prompts) -> tuple[str, ...]:
    tok = getattr(model, "tokenizer", None)
    row = prompts.tokens[0].tolist()
    labels = []
    for i, t in enumerate(row):
        s = None
        if tok is not None and prompts.mask[0, i]:
            try:
                s = tok.decode([t])
            except Exception:
                s = None
        labels.append(f"{i}:{s!s}" if s is not None else str(i))
    return tuple(labels)


def _finish(values: Tensor, per_prompt: Tensor, dims: tuple[str, ...], metric: Any, target_value: float,
            source_value: float | None, normalize: bool, meta: dict, **kw: Any) -> PatchResult:
    if normalize:
        if source_value is None:
            raise ValueError("normalize=True needs a source prompt batch (its metric is the 1 of the scale); "
                             "with task-mean activations as the source, leave normalize=False")
        denom = source_value - target_value
        values = (values - target_value) / denom if denom != 0 else torch.full_like(values, float("nan"))
    return PatchResult(values=values.cpu(), dims=dims, metric=_metric_name(metric), target_value=target_value,
                       source_value=source_value, normalized=normalize, per_prompt=per_prompt.cpu(), meta=meta, **kw)


def _meta(model: Any, **extra: Any) -> dict:
    try:
        from ..models import model_id

        mid = model_id(model)
    except Exception:  # pragma: no cover - a model without the foundation's fingerprint
        mid = {}
    return {**mid, **extra}




def _from_units(ck: Any, g0: int, p: int, layer_cols: dict[int, list[int]], n_cols: int) -> Tensor:
    """``[b, site]`` of one prompt group and position, assembled from its per-layer checkpoint units."""
    parts = {l: ck[(g0, p, l)]["values"] for l in layer_cols}
    first = next(iter(parts.values()))
    out = torch.empty((first.shape[0], n_cols), dtype=first.dtype)
    for l, cols in layer_cols.items():
        out[:, cols] = parts[l].to(out.dtype)
    return out


def patch_heads(
    model: Any,
    target: Any,
    source: Any,
    *,
    positions: Positions = "final",
    metric: str | MetricFn = "logit_diff",
    component: Literal["z", "q", "k", "v"] = "z",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    sites: Sequence[tuple[int, int]] | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    fast: bool | Literal["auto"] = "auto",
    checkpoint: str | Path | None = None,
) -> PatchResult:
    """Patch each attention head's output into the target run and measure ``metric``: ``[layer, head]``.

    For every head ``(l, h)`` the target batch is run with that head's ``hook_z`` replaced by its
    value in ``source`` — another prompt batch with as many prompts (clean -> corrupted, ICL ->
    zero-shot or shuffled labels), or **task-mean activations** ``[layer, head, d_head]`` (a
    tensor, or a ``HeadStats`` from :func:`tvlens.head_means`) broadcast over prompts
    (means-patching; Todd et al. 2024's causal indirect effect is ``prob`` with shuffled-label
    targets) — and ``metric`` of the final-position logits is averaged over prompts.

    Args:
        positions: ``"final"`` patches the final position (the separator; source and target may
            differ in length), ``"all"`` every position at once (TL ``..._all_pos``), ``"each"``
            every position separately -> ``[layer, head, pos]``; the last two need equal lengths.
        metric: ``"logit_diff"`` (answer minus foil logit, see :func:`_resolve_metric`), ``"prob"``,
            ``"logprob"``, ``"accuracy"`` or ``fn(logits [batch, d_vocab], batch) -> [batch]``.
        component: ``"z"`` (per query head, default), ``"q"``, or ``"k"`` / ``"v"`` per key-value
            head (grouped-query models have fewer of those: the result is ``[layer, n_kv_heads]``).
        layers, heads, sites: restrict the sweep to a grid or an explicit list of ``(layer, head)``;
            unswept sites are NaN.
        normalize: report ``(patched - target) / (source - target)`` (needs a source batch).
        batch_size: most (prompt, site) rows per forward; ``max_memory``: byte budget for one
            chunk (default 512 MiB on CPU); ``progress``: tqdm bar on multi-chunk sweeps.
        fast: ``"auto"`` uses the cached recompute (exact) and falls back to one forward per site
            if the model does not support it; ``False`` forces the naive loop.
        checkpoint: a file (:class:`tvlens.runs.checkpoint.SweepCheckpoint`) where every finished
            (prompt group, position, layer) is written atomically; an interrupted sweep re-run with
            the same arguments computes only the unfinished units. A file from another model or
            another configuration is refused before any work. (A metric *function* is identified
            by its name only.)

    Returns a :class:`PatchResult`.  Equal to the naive loop (one ``run_with_hooks`` per site) to
    float rounding, ≥ 20× faster at the final position on a GPT-2-small shape (benchmarks/bench_patching.py).
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    _check_choice("positions", positions, ("final", "all", "each"))
    _check_choice("component", component, ("z", "q", "k", "v"))
    if not (isinstance(metric, str) or callable(metric)):
        raise TypeError(f"metric must be a name or a function, got {type(metric).__name__}")
    if isinstance(metric, str):
        _check_choice("metric", metric, METRICS)
    n_units = info.n_kv_heads if component in ("k", "v") else info.n_heads
    site_list = _sites(info, layers, heads, sites, n_units)
    tgt = _as_prompts(target, "target")
    _check_vocab(tgt, "target", info)
    means = _means_tensor(source, component, info, positions)
    src = None if means is not None else _validate_source(tgt, source, positions != "final")
    if src is not None:
        _check_vocab(src, "source", info)
    if normalize and src is None:
        raise ValueError("normalize=True needs a source prompt batch (its metric is the 1 of the scale); "
                         "with task-mean activations as the source, leave normalize=False")
    if means is not None:
        missing = sorted({l for l, _ in site_list if not bool(torch.isfinite(means[l]).all())})
        if missing:
            raise ValueError(f"the means do not cover layers {missing}; restrict the sweep with layers=[...] "
                             "or compute the means for every layer")
    t0 = time.perf_counter()
    src_layers = sorted({l for l, _ in site_list})
    dev = _hooks.device_of(model)
    P = tgt.n_pos
    groups = _prompt_groups(len(tgt), _prompts_per_group(model, info, P, P - 1 if positions == "final" else 0,
                                                         batch_size, max_memory))
    pos_list = list(range(P)) if positions == "each" else [P - 1 if positions == "final" else 0]
    n_cols = len(site_list)
    per_prompt_chunks, tvals, svals = [], [], []
    ck = None
    if checkpoint is not None:  # opened before any forward: a mismatched file is refused before work
        from ..runs.checkpoint import SweepCheckpoint

        ck = SweepCheckpoint(checkpoint, model=model, config=dict(
            what="patch_heads", positions=positions, metric=_metric_name(metric), component=component,
            sites=[list(s) for s in site_list], normalize=bool(normalize), groups=[list(g) for g in groups],
            target=_digest(tgt.tokens, tgt.mask, *[t for t in (tgt.answer_ids, tgt.foil_ids) if t is not None]),
            source=_digest(means) if means is not None else _digest(src.tokens, src.mask)))
        layer_cols = {l: [j for j, s in enumerate(site_list) if s[0] == l] for l in src_layers}
    pbar = None
    if progress:
        total = n_cols * len(pos_list) * len(groups)
        if total > 64:
            from tqdm.auto import tqdm

            pbar = tqdm(total=total, desc=f"patch_heads[{positions}]", unit="site")
    try:
        for g0, g1 in groups:
            if ck is not None and ("clean", g0) in ck and not ck.remaining(
                    [(g0, p, l) for p in pos_list for l in src_layers]):  # finished earlier: no forward
                clean = ck[("clean", g0)]
                tvals.append(clean["target"])
                if "source" in clean:
                    svals.append(clean["source"])
                per_prompt_chunks.append(torch.stack([_from_units(ck, g0, p, layer_cols, n_cols) for p in pos_list], -1))
                if pbar is not None:
                    pbar.update(n_cols * len(pos_list))
                continue
            tg = tgt.slice(g0, g1)
            runner = PatchRunner(model, tg, fast=fast)
            fn = _resolve_metric(metric, tg, runner.clean_logits)
            tvals.append(fn(runner.clean_logits[:, None])[:, 0])
            if means is not None:
                src_acts: dict[int, Tensor] | Tensor = means
            else:
                sg = src.slice(g0, g1)
                src_acts, src_logits = _capture_acts(model, sg, component, src_layers, final_only=positions == "final")
                svals.append(fn(src_logits[:, None])[:, 0])
            if ck is not None:  # checkpointed values live on the CPU: keep everything there
                tvals[-1] = tvals[-1].cpu()
                svals[-1:] = [v.cpu() for v in svals[-1:]]
                ck.record(("clean", g0), {"target": tvals[-1], **({"source": svals[-1]} if means is None else {})})
            cols_out = []
            for p in pos_list:
                if ck is None:
                    edits = _head_edits(site_list, n_units, src_acts, p, positions == "all", component, dev, runner.dtype)
                    with torch.no_grad():
                        vals = runner.map(edits, fn, n_columns=n_cols, start_pos=p, max_memory=max_memory,
                                          batch_size=batch_size, pbar=pbar)  # [b, site]
                    cols_out.append(vals)
                    continue
                for l, cols in layer_cols.items():  # one unit per layer: its sites in one batched map
                    if (g0, p, l) in ck:
                        if pbar is not None:
                            pbar.update(len(cols))
                        continue
                    edits = _head_edits([site_list[j] for j in cols], n_units, src_acts, p, positions == "all",
                                        component, dev, runner.dtype)
                    with torch.no_grad():
                        vals = runner.map(edits, fn, n_columns=len(cols), start_pos=p, max_memory=max_memory,
                                          batch_size=batch_size, pbar=pbar)  # [b, sites of layer l]
                    ck.record((g0, p, l), {"values": vals})
                cols_out.append(_from_units(ck, g0, p, layer_cols, n_cols))
            per_prompt_chunks.append(torch.stack(cols_out, -1))  # [b, site, n_pos_list]
    finally:
        if pbar is not None:
            pbar.close()
    per_site = torch.cat(per_prompt_chunks, 0)  # [B, site, npos]
    target_value = float(torch.cat(tvals).mean())
    source_value = float(torch.cat(svals).mean()) if svals else None
    shape = (info.n_layers, n_units) + ((P,) if positions == "each" else ())
    per_prompt = torch.full((len(tgt), *shape), float("nan"), device=per_site.device)
    li = torch.as_tensor([l for l, _ in site_list])
    hi = torch.as_tensor([h for _, h in site_list])
    if positions == "each":
        per_prompt[:, li, hi] = per_site
    else:
        per_prompt[:, li, hi] = per_site[..., 0]
    values = per_prompt.mean(0)
    dims = ("layer", "head", "pos") if positions == "each" else ("layer", "head")
    meta = _meta(model, what=f"patch_heads ({component}, positions={positions})", positions=positions,
                 component=component, n_prompts=len(tgt), source="means" if means is not None else "prompts",
                 seconds=time.perf_counter() - t0, fast=fast)
    return _finish(values, per_prompt, dims, metric, target_value, source_value, normalize, meta,
                   pos_labels=_pos_labels(model, tgt) if positions == "each" else None)


def patch_positions(
    model: Any,
    target: Any,
    source: Any,
    *,
    hook: str = "resid_pre",
    metric: str | MetricFn = "logit_diff",
    layers: Sequence[int] | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    fast: bool | Literal["auto"] = "auto",
) -> PatchResult:
    """Patch one (layer, position) of a residual-stream activation at a time: ``[layer, pos]``.

    ``hook`` is ``"resid_pre"`` (TL ``get_act_patch_resid_pre``), ``"attn_out"``, ``"mlp_out"``,
    ``"resid_mid"`` or ``"resid_post"``; the value comes from ``source``, a prompt batch of the same
    shape (positions are paired index by index; tvlens batches are left-padded so the final
    separator lines up).  Each site recomputes only positions ``>= pos`` from its layer on.
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    allowed = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
    if hook not in allowed:
        raise ValueError(f"unknown hook {hook!r} for patch_positions; use one of {', '.join(allowed)}")
    if isinstance(metric, str):
        _check_choice("metric", metric, METRICS)
    ls = list(range(info.n_layers)) if layers is None else [int(l) for l in layers]
    if not ls:
        raise ValueError("empty site list: give at least one layer (layers=None sweeps all)")
    for l in ls:
        if not -info.n_layers <= l < info.n_layers:
            raise ValueError(f"layer {l} is out of range: this model has {info.n_layers} layers (0..{info.n_layers - 1})")
    ls = [l % info.n_layers for l in ls]
    tgt = _as_prompts(target, "target")
    _check_vocab(tgt, "target", info)
    src = _validate_source(tgt, source, True)
    _check_vocab(src, "source", info)
    t0 = time.perf_counter()
    P = tgt.n_pos
    dev = _hooks.device_of(model)
    groups = _prompt_groups(len(tgt), _prompts_per_group(model, info, P, 0, batch_size, max_memory))
    per, tvals, svals = [], [], []
    pbar = None
    if progress and len(ls) * P * len(groups) > 64:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(ls) * P * len(groups), desc=f"patch_positions[{hook}]", unit="site")
    try:
        for g0, g1 in groups:
            tg, sg = tgt.slice(g0, g1), src.slice(g0, g1)
            runner = PatchRunner(model, tg, fast=fast)
            fn = _resolve_metric(metric, tg, runner.clean_logits)
            tvals.append(fn(runner.clean_logits[:, None])[:, 0])
            acts, src_logits = _capture_acts(model, sg, hook, sorted(set(ls)), final_only=False)
            svals.append(fn(src_logits[:, None])[:, 0])
            cols = []
            for p in range(P):
                edits = [Edit(l, hook, 1.0, acts[l][:, p][:, None].to(dev, runner.dtype), None, [j], p)
                         for j, l in enumerate(ls)]
                with torch.no_grad():
                    cols.append(runner.map(edits, fn, n_columns=len(ls), start_pos=p, max_memory=max_memory,
                                           batch_size=batch_size, pbar=pbar))  # [b, layer]
            per.append(torch.stack(cols, -1))  # [b, layer, pos]
    finally:
        if pbar is not None:
            pbar.close()
    per_site = torch.cat(per, 0)
    per_prompt = torch.full((len(tgt), info.n_layers, P), float("nan"), device=per_site.device)
    per_prompt[:, torch.as_tensor(ls)] = per_site
    meta = _meta(model, what=f"patch_positions ({hook})", hook=hook, n_prompts=len(tgt),
                 seconds=time.perf_counter() - t0, fast=fast)
    return _finish(per_prompt.mean(0), per_prompt, ("layer", "pos"), metric, float(torch.cat(tvals).mean()),
                   float(torch.cat(svals).mean()), normalize, meta, pos_labels=_pos_labels(model, tgt))


def attribution_patch_heads(
    model: Any,
    target: Any,
    source: Any,
    *,
    metric: str | MetricFn = "logit_diff",
    positions: Positions = "final",
    component: Literal["z", "q", "k", "v"] = "z",
    confirm_top: int | Literal["all"] = 0,
    normalize: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Attribution patching (Nanda 2023; Syed et al. 2023): every head's patching effect, linearised.

    ``effect(l, h) ≈ Σ_pos Σ_d (source_z - target_z)[l, pos, h, d] · ∂metric/∂z[l, pos, h, d]``,
    the gradient taken on the target run — one forward + one backward on the target and one
    forward on the source, whatever the number of sites.  ``values`` are these estimated changes
    of the prompt-averaged metric (normalised by ``source - target`` when ``normalize``).

    ``confirm_top=k`` re-runs the exact patch (:func:`patch_heads`) for the ``k`` sites with the
    largest ``|estimate|`` (``"all"``: every site) and reports ``exact`` and the Pearson
    ``correlation`` between estimate and exact effect over those sites.  The metric must be
    differentiable (``accuracy`` is not).
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    _check_choice("positions", positions, ("final", "all", "each"))
    _check_choice("component", component, ("z", "q", "k", "v"))
    if metric == "accuracy":
        raise ValueError("attribution patching needs a differentiable metric; 'accuracy' is not — use 'logit_diff', "
                         "'logprob' or 'prob' (confirm with patch_heads(metric='accuracy'))")
    if isinstance(metric, str):
        _check_choice("metric", metric, METRICS)
    n_units = info.n_kv_heads if component in ("k", "v") else info.n_heads
    tgt = _as_prompts(target, "target")
    _check_vocab(tgt, "target", info)
    means = _means_tensor(source, component, info, positions)
    src = None if means is not None else _validate_source(tgt, source, positions != "final")
    if src is not None:
        _check_vocab(src, "source", info)
    if normalize and src is None:
        raise ValueError("normalize=True needs a source prompt batch; with task-mean activations leave normalize=False")
    if means is not None and not bool(torch.isfinite(means).all()):
        raise ValueError("attribution patching needs means for every layer; compute head_means with layers=None")
    t0 = time.perf_counter()
    L, P = info.n_layers, tgt.n_pos
    dev = _hooks.device_of(model)
    est_chunks, tvals, svals = [], [], []
    for g0, g1 in _prompt_groups(len(tgt), batch_size):
        tg = tgt.slice(g0, g1)
        leaves: dict[int, Tensor] = {}
        acts: dict[int, Tensor] = {}

        def tap(layer: int):
            def fn(act: Tensor, hook: Any = None) -> Tensor:
                leaf = torch.zeros_like(act, requires_grad=True)
                leaves[layer], acts[layer] = leaf, act.detach()
                return act + leaf
            return fn

        with torch.enable_grad():
            logits = _hooks.run(model, tg.tokens.to(dev), attention_mask=tg.mask.to(dev),
                                fwd_hooks=[(act_name(component, l), tap(l)) for l in range(L)])[:, -1]
            fn = _resolve_metric(metric, tg, logits.detach())
            m = fn(logits[:, None])[:, 0]
            grads = torch.autograd.grad(m.sum(), [leaves[l] for l in range(L)])
        tvals.append(m.detach())
        if means is None:
            s_acts, s_logits = _capture_acts(model, src.slice(g0, g1), component, list(range(L)),
                                             final_only=positions == "final")
            svals.append(fn(s_logits[:, None])[:, 0])
        per_layer = []
        for l in range(L):
            here = slice(-1, None) if positions == "final" else slice(None)  # [b, pos|1, unit, d_head]
            new = means[l].to(dev, acts[l].dtype)[None, None] if means is not None else s_acts[l]
            contrib = ((new - acts[l][:, here]).float() * grads[l][:, here].float()).sum(-1)  # [b, pos, unit]
            if positions == "each":
                per_layer.append(contrib.transpose(1, 2))  # [b, unit, pos]
            else:
                per_layer.append(contrib.sum(1))  # [b, unit]
        est_chunks.append(torch.stack(per_layer, 1).detach())  # [b, layer, unit(, pos)]
    per_prompt = torch.cat(est_chunks, 0)
    values = per_prompt.mean(0)
    target_value = float(torch.cat(tvals).mean())
    source_value = float(torch.cat(svals).mean()) if svals else None
    dims = ("layer", "head", "pos") if positions == "each" else ("layer", "head")
    seconds = time.perf_counter() - t0
    exact = None
    corr = None
    if confirm_top:
        flat = values.abs().reshape(-1)
        k = flat.numel() if confirm_top == "all" else min(int(confirm_top), flat.numel())
        idx = flat.topk(k).indices.tolist()
        coords = [tuple(int(x) for x in torch.unravel_index(torch.tensor(i), values.shape)) for i in idx]
        exact = torch.full(values.shape, float("nan"))
        by_pos: dict[int, list[tuple[int, int]]] = {}
        for c in coords:
            by_pos.setdefault(c[2] if positions == "each" else -1, []).append((c[0], c[1]))
        t1 = time.perf_counter()
        for p, sl in by_pos.items():
            res = _exact_subset(model, tgt, source if means is None else means, positions, p, metric, component, sl,
                                batch_size, max_memory, progress)
            for (l, h), v in zip(sl, res):
                if positions == "each":
                    exact[l, h, p] = v - target_value
                else:
                    exact[l, h] = v - target_value
        exact_seconds = time.perf_counter() - t1
        est = torch.stack([values[c].cpu() for c in coords]).float()
        ex = torch.stack([exact[c] for c in coords]).float()
        if len(coords) >= 2 and float(est.std()) > 0 and float(ex.std()) > 0:
            corr = float(torch.corrcoef(torch.stack([est, ex]))[0, 1])
        if normalize and source_value is not None and source_value != target_value:
            exact = exact / (source_value - target_value)
    else:
        exact_seconds = None
    meta = _meta(model, what=f"attribution patching ({component}, positions={positions})", positions=positions,
                 component=component, n_prompts=len(tgt), seconds=seconds, exact_seconds=exact_seconds,
                 confirmed=0 if not confirm_top else (values.numel() if confirm_top == "all" else int(confirm_top)))
    if normalize:
        denom = source_value - target_value
        values = values / denom if denom else torch.full_like(values, float("nan"))
    return PatchResult(values=values.cpu(), dims=dims, metric=_metric_name(metric), target_value=target_value,
                       source_value=source_value, normalized=normalize, per_prompt=per_prompt.cpu(),
                       method="attribution", exact=exact, correlation=corr,
                       pos_labels=_pos_labels(model, tgt) if positions == "each" else None, meta=meta)


def _exact_subset(model: Any, tgt: _Prompts, source: Any, positions: str, p: int, metric: Any, component: str,
                  sites: list[tuple[int, int]], batch_size: Any, max_memory: Any, progress: bool) -> list[float]:
    """Exact patched metric (prompt mean) for a few sites at one position mode."""
    if positions == "each":
        # one position only: patch it with the suffix engine
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        n_units = info.n_kv_heads if component in ("k", "v") else info.n_heads
        means = _means_tensor(source, component, info, "each")
        runner = PatchRunner(model, tgt)
        fn = _resolve_metric(metric, tgt, runner.clean_logits)
        if means is not None:
            src_acts: Any = means
        else:
            src_acts, _ = _capture_acts(model, _as_prompts(source, "source"), component, sorted({l for l, _ in sites}), False)
        edits = _head_edits(sites, n_units, src_acts, p, False, component, runner.device, runner.dtype)
        with torch.no_grad():
            vals = runner.map(edits, fn, n_columns=len(sites), start_pos=p, max_memory=max_memory, batch_size=batch_size)
        return vals.mean(0).tolist()
    res = patch_heads(model, tgt.obj if tgt.obj is not None else tgt, source, positions=positions, metric=metric,
                      component=component, sites=sites, batch_size=batch_size, max_memory=max_memory, progress=progress)
    return [float(res.values[l, h]) for l, h in sites]
