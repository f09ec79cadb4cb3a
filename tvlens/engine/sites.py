"""Intervention sites as data: *what* to change, where, and for which column.

An :class:`Edit` is one site — (hook, layer, units, positions) — with the change written as
``act <- lerp(act, value, weight) + add``.  A head sweep, a position sweep, a (head × position)
mask (Hojel et al. 2024, §3.2), a soft α-blend per unit and a residual vector (Hendel et al. 2023,
§3; Todd et al. 2024, §2.3) are all the same object with different tensors; the engine
(:class:`tvlens.engine.runner.PatchRunner`) evaluates many of them side by side as *columns*
along the batch axis.  Shapes broadcast against the activation's canonical view:

* ``[batch, column, *unit]`` when only the final position is recomputed;
* ``[batch, column, pos, *unit]`` for a recomputed suffix (``start_pos=p``), so a weight with a
  ``pos`` axis is a mask over positions;

``unit`` is ``(d_model,)`` for residual-stream hooks, ``(head, d_head)`` for ``z``/``q`` and
``(n_kv_heads, d_head)`` for ``k``/``v``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import Tensor

__all__ = ["Edit", "replace_resid", "add_resid", "replace_heads", "blend_heads", "UNIT", "unit_shape",
           "normalize_edits", "restrict_columns", "NormEdit"]

#: Activation kinds an :class:`Edit` may touch, and the trailing shape of one position's activation.
UNIT = {  # kind -> which axis set: "model" = (d_model,), "heads" = (n_heads, d_head), "kv" = (n_kv, d_head)
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
      every recomputed position ``p..`` is edited — or only a set of them when ``pos`` is a
      sequence of positions or a boolean mask ``[pos]`` (a weight with a ``pos`` axis is a mask
      per column, e.g. Hojel et al. 2024's (head × position) masks),

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
    pos: int | Sequence[int] | Tensor | None = None


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
class NormEdit:
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


def unit_shape(model_info: Any, kind: str) -> tuple[int, ...]:
    u = UNIT[kind]
    if u == "model":
        return (model_info.d_model,)
    return (model_info.n_heads if u == "heads" else model_info.n_kv_heads, model_info.d_head)


def columns_list(spec: Any, n_columns: int | None) -> list[int] | None:
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


def normalize_edits(edits: Iterable[Edit], info: Any, n_columns: int | None, n_pos: int, start_pos: int,
                     device: torch.device, dtype: torch.dtype, n_batch: int) -> tuple[list[NormEdit], int]:
    """Validate edits and resolve columns; returns the edits and the number of columns."""
    edits = list(edits)
    for e in edits:
        if not isinstance(e, Edit):
            raise TypeError(f"edits must be tvlens.engine.Edit objects, got {type(e).__name__}")
        if e.hook not in UNIT:
            raise ValueError(f"unknown hook {e.hook!r} for an Edit; use one of {', '.join(UNIT)}")
        if not -info.n_layers <= int(e.layer) < info.n_layers:
            raise ValueError(f"Edit layer {e.layer} is out of range: this model has {info.n_layers} layers (0..{info.n_layers - 1})")
    if n_columns is None:  # infer from explicit columns, then from tensor shapes
        cols = [c for e in edits for c in (columns_list(e.columns, None) or [])]
        n_columns = max(cols) + 1 if cols else 1
        if not cols:
            for e in edits:
                unit = len(unit_shape(info, e.hook))
                rank = 2 + unit + (1 if (e.pos is None and start_pos < n_pos - 1) else 0)
                for t in (e.weight, e.value, e.add):
                    if isinstance(t, Tensor) and t.ndim >= rank - 1:
                        n_columns = max(n_columns, int(t.shape[t.ndim - (rank - 1)]))
    out = []
    for e in edits:
        layer = int(e.layer) % info.n_layers
        cols = columns_list(e.columns, n_columns)
        if not cols:
            continue
        bad = [c for c in cols if not 0 <= c < n_columns]
        if bad:
            raise ValueError(f"Edit at layer {layer} names column {bad[0]} but there are {n_columns} columns (0..{n_columns - 1})")
        final_mode = start_pos == n_pos - 1
        pos, pos_mask = _resolve_pos(e.pos, n_pos, start_pos)
        if pos_mask is not None and final_mode:
            if not bool(pos_mask[-1]):
                continue  # the only recomputed position is not in the set: nothing to change
            pos_mask = None
        if pos is not None:
            if pos < start_pos:
                raise ValueError(f"Edit position {e.pos} is before the recomputed suffix (start_pos={start_pos}); "
                                 f"use start_pos <= {pos}")
            if final_mode:
                pos = None  # the final position is the only one there is
        unit = unit_shape(info, e.hook)
        rank = 2 + len(unit) + (1 if (pos is None and not final_mode) else 0)
        conv = lambda t: t.to(device=device, dtype=dtype) if isinstance(t, Tensor) else t  # noqa: E731
        if e.value is None and e.add is None:
            raise ValueError(f"Edit at layer {layer} has neither a value nor an add: it would change nothing")
        weight = conv(e.weight) if isinstance(e.weight, Tensor) else float(e.weight)
        ne = NormEdit(layer, e.hook, weight, conv(e.value), conv(e.add), cols, pos, rank)
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
        if pos_mask is not None:  # a set of positions is a 0/1 factor on the edit along the recomputed suffix
            m = pos_mask[start_pos:].to(device=device, dtype=dtype).reshape(-1, *([1] * len(unit)))
            ne.weight = m * ne.weight if ne.value is not None else ne.weight
            ne.add = None if ne.add is None else ne.add * m
        out.append(ne)
    return out, n_columns


def _resolve_pos(pos: Any, n_pos: int, start_pos: int) -> tuple[int | None, Tensor | None]:
    """``Edit.pos`` as one position (non-negative) or as a boolean mask over ``n_pos`` positions."""
    if pos is None:
        return None, None
    if isinstance(pos, (int, torch.SymInt)) or (isinstance(pos, Tensor) and pos.ndim == 0 and not pos.dtype == torch.bool):
        if isinstance(pos, bool):
            raise TypeError("Edit.pos must be an int, a sequence of ints, a boolean mask [pos] or None; got a bool")
        return int(pos) % n_pos, None
    if isinstance(pos, Tensor) and pos.dtype == torch.bool:
        if pos.shape != (n_pos,):
            raise ValueError(f"Edit.pos as a mask must have one entry per position, shape [{n_pos}]; got {tuple(pos.shape)}")
        mask = pos.cpu()
    else:
        idx = [int(q) % n_pos for q in (pos.reshape(-1).tolist() if isinstance(pos, Tensor) else pos)]
        if not idx:
            raise ValueError("Edit.pos is an empty set of positions; name at least one, or use pos=None for all")
        mask = torch.zeros(n_pos, dtype=torch.bool)
        mask[idx] = True
    first = int(mask.nonzero()[0]) if bool(mask.any()) else n_pos - 1
    if first < start_pos:
        raise ValueError(f"Edit positions start at {first}, before the recomputed suffix (start_pos={start_pos}); "
                         f"use start_pos <= {first}")
    return None, mask


def restrict_columns(nedits: list[NormEdit], c0: int, c1: int) -> list[NormEdit]:
    """The edits' parts that touch columns ``c0..c1-1``, renumbered from 0."""
    out = []
    for e in nedits:
        local = [j for j, c in enumerate(e.columns) if c0 <= c < c1]
        if not local:
            continue
        w, v, a = e.select(local) if len(local) != len(e.columns) else e.tensors()
        out.append(NormEdit(e.layer, e.hook, w, v, a, [e.columns[j] - c0 for j in local], e.pos, e.canon_rank))
    return out
