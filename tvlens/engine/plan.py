"""The batching plan: one memory budget per device, length buckets, left padding.

Every forward the engine runs is sized here: :func:`memory_budget` is the one budget (bytes of
transient activations per pass), :func:`bytes_per_row` what one (prompt, column) row of a
recompute costs, :func:`length_buckets` groups prompts of similar length so a pass carries little
padding.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import Tensor

from .. import hooks as _hooks
from ..checks import check_int

__all__ = ["CPU_BUDGET", "DEFAULT_BATCH", "MAX_TOKENS", "memory_budget", "bytes_per_row", "rows_per_run",
           "length_buckets", "pad_left", "rows_of", "row_inputs", "pad_inputs", "gather_inputs", "RowsBatch",
           "POSITION_INPUTS", "pad_id_of", "rows_per_forward",
           "merge_batches"]

CPU_BUDGET = 512 << 20  # bytes of transient activations per chunk on CPU


def memory_budget(device: torch.device, max_memory: int | None = None) -> int:
    """Bytes of transient activations one pass may use on ``device`` (``max_memory`` overrides).

    The one budget every forward is sized by: 512 MiB on the CPU, 40% of free memory on a GPU.
    """
    if max_memory is not None:
        if int(max_memory) < 1:
            raise ValueError(f"max_memory must be a positive number of bytes, got {max_memory}")
        return int(max_memory)
    if device.type == "cuda":
        try:
            free, _ = torch.cuda.mem_get_info(device)
            return int(free * 0.4)
        except Exception:  # pragma: no cover - exotic setups
            return 4 << 30
    return CPU_BUDGET


def bytes_per_row(model: Any, info: Any, P: int, start_pos: int, dtype: torch.dtype) -> int:
    """Rough transient bytes of one (prompt, column) row recomputed from ``start_pos`` (chunk sizing)."""
    T = P - start_pos
    d_mlp = int(getattr(getattr(model, "cfg", None), "d_mlp", None) or 4 * info.d_model)
    per_tok = 8 * info.d_model + 3 * d_mlp + 2 * info.n_heads * (P + 64)
    prefix = 0 if T == 1 else 4 * info.n_kv_heads * info.d_head * start_pos + 2 * info.n_heads * info.d_head * P
    elt = torch.finfo(dtype).bits // 8 if dtype.is_floating_point else 4
    return int(elt * (T * per_tok + prefix) + 4 * 3 * info.d_vocab)


def rows_per_run(model: Any, info: Any, P: int, start_pos: int, batch_size: int | None,
                 max_memory: int | None) -> int | None:
    """Prompts per target run: ``batch_size`` rows, or as many as fit the memory budget (one column each)."""
    if batch_size is not None:
        return max(1, int(batch_size))
    try:
        dtype = next(model.parameters()).dtype
    except StopIteration:  # pragma: no cover
        dtype = torch.float32
    budget = memory_budget(_hooks.device_of(model), max_memory)
    # the target's own forward and caches scale like a full-length row; keep a handful of columns per chunk
    per_prompt = 4 * bytes_per_row(model, info, P, start_pos, dtype) + bytes_per_row(model, info, P, 0, dtype)
    return max(1, int(budget // max(1, per_prompt)))


#: Rows per forward pass in the extraction / evaluation passes, and a cap on rows x tokens.
DEFAULT_BATCH = 64


MAX_TOKENS = 4096


def rows_per_forward(batch_size: int | None) -> int:
    """Prompts per forward for a ``batch_size`` argument: ``None`` (the vocabulary's default) lets the
    plan decide (:data:`DEFAULT_BATCH`, and :func:`length_buckets` keeps rows x tokens under
    :data:`MAX_TOKENS`); an int (>= 1) caps it."""
    if batch_size is None:
        return DEFAULT_BATCH
    return check_int("batch_size", batch_size, 1, "a batch holds at least one prompt")


def rows_of(batch: Any) -> list[Tensor]:
    """The prompts of a left-padded batch without their padding (one 1-D token tensor each)."""
    mask = batch.attention_mask.bool()
    return [batch.tokens[i][mask[i]] for i in range(batch.tokens.shape[0])]


#: extra model inputs laid out along the positions (``[batch, pos]``, as Gemma 3's ``token_type_ids``):
#: a row's are cut to its real positions with its tokens and left-padded with zeros like its mask
POSITION_INPUTS = frozenset({"token_type_ids", "mm_token_type_ids"})


def row_inputs(batch: Any) -> list[dict[str, Tensor]]:
    """Each row's extra model inputs (``pixel_values`` ...), in row order, its :data:`POSITION_INPUTS`
    cut to its real positions as :func:`rows_of` cuts its tokens; empty dicts for a text batch."""
    from .batch import as_batch

    eb = as_batch(batch, "prompts")
    if not eb.extra:
        return [{} for _ in range(len(eb))]
    real = eb.mask.bool()
    rows = [eb.take(torch.tensor([i])).extra for i in range(len(eb))]
    return [{k: v[:, real[i].to(v.device)] if k in POSITION_INPUTS else v for k, v in r.items()}
            for i, r in enumerate(rows)]


def pad_inputs(extra: dict[str, Tensor], width: int) -> dict[str, Tensor]:
    """One row's extra inputs with its :data:`POSITION_INPUTS` left-padded (zeros) to ``width`` positions."""
    def pad(v: Tensor) -> Tensor:
        return torch.cat([v.new_zeros((v.shape[0], width - v.shape[1])), v], 1) if v.shape[1] < width else v

    return {k: pad(v) if k in POSITION_INPUTS else v for k, v in extra.items()}


def gather_inputs(inputs: Sequence[dict[str, Tensor]] | None, idx: Sequence[int], width: int | None = None
                  ) -> dict[str, Tensor]:
    """The extra inputs of rows ``idx`` as one batch's (concatenated in row order, as their images are;
    :data:`POSITION_INPUTS` left-padded to ``width``, by default the longest row's, as :func:`pad_left` pads)."""
    idx = list(idx)
    if not inputs or not inputs[idx[0]]:
        return {}
    keys = inputs[idx[0]]
    if width is None:
        width = max([int(inputs[i][k].shape[1]) for i in idx for k in keys if k in POSITION_INPUTS], default=0)
    rows = [pad_inputs(inputs[i], width) for i in idx]
    return {k: torch.cat([r[k] for r in rows]) for k in keys}


@dataclass
class RowsBatch:
    """Rows re-padded into one left-padded batch with their extra model inputs (the engine's inputs protocol).

    ``rows``: each row's own extra inputs (:func:`row_inputs`); given, ``inputs`` is gathered from
    them and :meth:`select` keeps every row's images with it (rows may hold different numbers of
    images, so ``pixel_values`` is not row-aligned and cannot be cut by row index)."""

    tokens: Tensor
    attention_mask: Tensor
    answer_ids: Tensor | None = None
    inputs: dict[str, Tensor] = field(default_factory=dict)
    rows: Sequence[dict[str, Tensor]] = ()

    def __post_init__(self) -> None:
        if self.rows and not self.inputs:
            self.inputs = gather_inputs(list(self.rows), range(len(self.rows)), int(self.tokens.shape[1]))

    def model_inputs(self) -> dict[str, Tensor]:
        return self.inputs

    def select(self, index: Any) -> "RowsBatch":
        """Rows ``index`` with their own extra inputs (needs ``rows`` when there are any)."""
        idx = torch.as_tensor(index, dtype=torch.long).reshape(-1).cpu()
        if self.inputs and not self.rows:
            raise ValueError("this RowsBatch has extra inputs but not each row's own (rows=): build it with "
                             "rows=row_inputs(...) so its rows can be taken with their images")
        ans = None if self.answer_ids is None else self.answer_ids[idx.to(self.answer_ids.device)]
        return RowsBatch(self.tokens[idx], self.attention_mask[idx], ans, rows=[self.rows[i] for i in idx.tolist()])


def length_buckets(lengths: Sequence[int], batch_size: int, *, exact: bool = False) -> list[list[int]]:
    """Row indices grouped into forward passes of similar length (little or no padding;
    ``exact``: one length per pass, so no padding at all)."""
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], i))
    chunks: list[list[int]] = []
    cur: list[int] = []
    for i in order:
        if cur and (len(cur) >= batch_size or (len(cur) + 1) * lengths[i] > max(MAX_TOKENS, lengths[i])
                    or (exact and lengths[i] != lengths[cur[0]])):
            chunks.append(cur)
            cur = []
        cur.append(i)
    if cur:
        chunks.append(cur)
    return chunks


def pad_left(rows: Sequence[Tensor], pad_id: int) -> tuple[Tensor, Tensor]:
    width = max(int(r.shape[0]) for r in rows)
    tokens = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        tokens[i, width - r.shape[0]:] = r
        mask[i, width - r.shape[0]:] = 1
    return tokens, mask


def pad_id_of(model: Any) -> int:
    tok = getattr(model, "tokenizer", None)
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tok, attr, None)
        if v is not None:
            return int(v)
    return 0


def merge_batches(batches: Sequence[Any], pad_id: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-pad several PromptBatches to one width -> tokens, attention_mask, answer_ids, row_task."""
    width = max(int(b.lengths.max()) for b in batches)
    toks, masks, answers, owners = [], [], [], []
    for ti, b in enumerate(batches):
        b = b.trimmed()
        extra = width - b.tokens.shape[1]
        t, m = b.tokens.cpu(), b.attention_mask.cpu()
        if extra > 0:
            t = torch.cat([torch.full((len(b), extra), pad_id, dtype=t.dtype), t], 1)
            m = torch.cat([torch.zeros((len(b), extra), dtype=m.dtype), m], 1)
        toks.append(t)
        masks.append(m)
        answers.append(b.answer_ids.cpu())
        owners.append(torch.full((len(b),), ti, dtype=torch.long))
    return torch.cat(toks), torch.cat(masks), torch.cat(answers), torch.cat(owners)
