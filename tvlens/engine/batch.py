"""What the engine reads from a batch: the inputs protocol.

Any object with ``tokens`` ``[batch, pos]`` works (a :class:`tvlens.PromptBatch`, a canvas batch,
a multimodal batch, a ``SimpleNamespace``); :func:`as_batch` checks it once, before any forward,
and returns an :class:`EngineBatch`.
"""

from __future__ import annotations

from collections.abc import Iterator
import dataclasses
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, ClassVar, Protocol, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from ..checks import check_int

__all__ = ["Inputs", "EngineBatch", "RowSlicing", "row_index", "as_batch", "rows_inputs"]

class Inputs(Protocol):
    """What the engine needs from a batch (a :class:`tvlens.PromptBatch`, a canvas or multimodal batch).

    Only ``tokens`` is required.  ``attention_mask`` (``1`` = real token, left padding) defaults to
    all ones; ``answer_ids`` feed the built-in metrics; ``model_inputs()`` returns the extra forward
    arguments (``pixel_values``, ``image_grid_thw``, ``token_type_ids`` ...), ``query_positions``
    (``[batch, query]``) the positions whose logits are read when it is not the last one (a canvas's
    masked cell, Hojel et al. 2024 §2), and ``select(index)``
    the batch restricted to some rows when those extra tensors are not row-aligned (Qwen2.5-VL
    flattens its patches over the batch).
    """

    tokens: Int[Tensor, "batch pos"]


def row_index(index: Sequence[int] | Tensor, n: int) -> list[int]:
    """The rows (``0..n-1``) that ``index`` names, by torch's indexing rules: row numbers (negative
    from the end) or a boolean mask of ``n``; anything else raises IndexError naming the range."""
    index = index.cpu() if isinstance(index, Tensor) else torch.as_tensor(list(index))  # a list of bools is a mask
    try:
        return torch.arange(n)[index.reshape(-1) if index.numel() else index.long()].tolist()
    except IndexError as err:
        raise IndexError(f"{err}: a batch of {n} prompts takes rows -{n}..{n - 1} or a boolean mask of {n}") from None


class RowSlicing:
    """Slices and chunks of a batch class that defines ``__len__`` and ``select(rows)`` (text,
    multimodal, canvas): every way of taking rows goes through its one ``select``.

    A dataclass batch's ``select`` can take its per-row fields from :meth:`_row_fields`: every tensor
    (along its first axis) and every non-empty tuple is one entry per row, except the fields the
    class names in ``_NOT_PER_ROW`` (images, several to a row), which its ``select`` takes itself.
    A field added to such a batch is then sliced with its rows without touching ``select``.
    """

    _NOT_PER_ROW: ClassVar[tuple[str, ...]] = ()

    def _row_fields(self, idx: list[int]) -> dict[str, Any]:
        """Every per-row field at rows ``idx``, as ``dataclasses.replace`` takes them."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            v = getattr(self, f.name)
            if f.name in self._NOT_PER_ROW:
                continue
            if isinstance(v, Tensor) and v.ndim:
                out[f.name] = v[torch.as_tensor(idx, dtype=torch.long, device=v.device)]
            elif isinstance(v, tuple) and v:
                out[f.name] = tuple(v[i] for i in idx)
        return out

    def slice(self, start: int, stop: int | None = None) -> Any:
        """Rows ``start:stop`` (padding width unchanged, so results of chunks concatenate along pos)."""
        return self.select(range(len(self))[start:stop])

    def __getitem__(self, item: slice) -> Any:
        if not isinstance(item, slice):
            name = type(self).__name__
            raise TypeError(f"index a {name} with a slice (batch[2:5]) or use batch.select([...])")
        return self.select(range(len(self))[item])

    def chunks(self, batch_size: int) -> Iterator[Any]:
        """Consecutive sub-batches of at most ``batch_size`` rows, in order."""
        batch_size = check_int("batch_size", batch_size, 1)
        for i in range(0, len(self), batch_size):
            yield self.slice(i, i + batch_size)


@dataclass(frozen=True)
class EngineBatch:
    """A checked batch: tokens, left-padding mask, answers, and the extra model inputs."""

    tokens: Int[Tensor, "batch pos"]
    mask: Int[Tensor, "batch pos"]  # 0 = padding (left)
    answer_ids: Int[Tensor, " batch"] | None
    foil_ids: Int[Tensor, " batch"] | None
    obj: Any  # the caller's object, handed to user metrics
    extra: dict[str, Tensor] = field(default_factory=dict)  # forward kwargs beside the tokens
    query: Int[Tensor, "batch query"] | None = None  # positions whose logits are read (None: the final one)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def n_pos(self) -> int:
        return int(self.tokens.shape[1])

    def model_inputs(self, device: torch.device | None = None) -> dict[str, Tensor]:
        """The extra forward arguments, on ``device``."""
        return {k: v.to(device) if device is not None else v for k, v in self.extra.items()}

    def repeat_inputs(self, n: int, device: torch.device | None = None) -> dict[str, Tensor]:
        """The extra arguments of the batch repeated ``n`` times along the batch axis (``tokens.repeat(n, 1)``).

        Concatenating copies is right both for row-aligned tensors and for inputs flattened over
        the batch, since the copies follow each other in the same order as the repeated tokens.
        """
        return {k: torch.cat([v] * n).to(device) if device is not None else torch.cat([v] * n) for k, v in self.extra.items()}

    def take(self, index: Tensor) -> "EngineBatch":
        """The batch restricted to rows ``index``."""
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        obj, extra = self.obj, self.extra
        if obj is not None and callable(getattr(obj, "select", None)):
            obj = obj.select(index)
            extra = _extra_of(obj)
        else:
            rows = len(self)
            bad = [k for k, v in extra.items() if v.ndim == 0 or v.shape[0] != rows]
            if bad:
                raise ValueError(f"cannot take rows of the extra model inputs {bad}: they are not row-aligned; give the "
                                 "batch a select(index) method that slices them (as tvlens's multimodal batches do)")
            extra = {k: v[index.to(v.device)] for k, v in extra.items()}
            if obj is not None:
                obj = SimpleNamespace(tokens=self.tokens[index], attention_mask=self.mask[index],
                                      answer_ids=None if self.answer_ids is None else self.answer_ids[index], **extra)
        cut = lambda t: None if t is None else t[index.to(t.device)]  # noqa: E731
        return EngineBatch(self.tokens[index], self.mask[index], cut(self.answer_ids), cut(self.foil_ids), obj, extra,
                           cut(self.query))

    def slice(self, i: int, j: int) -> "EngineBatch":
        return self.take(torch.arange(i, min(j, len(self))))


def rows_inputs(batch: Any, i: int, j: int) -> dict[str, Tensor]:
    """The extra model inputs (images ...) of rows ``i..j-1`` of a batch; none for a text batch."""
    if not callable(getattr(batch, "model_inputs", None)):
        return {}
    return as_batch(batch, "prompts").slice(i, j).extra


def _extra_of(batch: Any) -> dict[str, Tensor]:
    fn = getattr(batch, "model_inputs", None)
    if not callable(fn):
        return {}
    extra = dict(fn())
    bad = [k for k, v in extra.items() if not isinstance(v, Tensor)]
    if bad:
        raise TypeError(f"model_inputs() must return tensors; {bad} are not (give them as tensors)")
    return extra


def as_batch(batch: Any, what: str) -> EngineBatch:
    """Check ``batch`` once, before any forward, and return what the engine reads of it."""
    if isinstance(batch, EngineBatch):
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
    obj = batch if not isinstance(batch, Tensor) else None
    return EngineBatch(tokens.long(), mask, answers, foils, obj, _extra_of(obj), _query_of(batch, tokens.shape, what))


def _query_of(batch: Any, shape: tuple[int, int], what: str) -> Tensor | None:
    """``batch.query_positions`` ``[batch, query]``, checked (a canvas reads its masked cell, not the last token)."""
    q = getattr(batch, "query_positions", None)
    if q is None:
        return None
    q = torch.as_tensor(q)
    if q.ndim == 1:
        q = q[None].expand(shape[0], -1)
    if q.ndim != 2 or q.shape[0] != shape[0] or q.shape[1] == 0 or q.is_floating_point():
        raise ValueError(f"{what}.query_positions must be integer positions [batch, query] = [{shape[0]}, n >= 1]; "
                         f"got shape {tuple(q.shape)}")
    if bool((q < 0).any()) or bool((q >= shape[1]).any()):
        raise ValueError(f"{what}.query_positions must lie in 0..{shape[1] - 1} (the batch has {shape[1]} positions)")
    return q.long()
