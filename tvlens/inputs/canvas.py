"""Visual prompts: canvases of palette images, the inputs of visual in-context learning.

Hojel et al. 2024 ("Finding Visual Task Vectors", §3 "Visual Prompting") study MAE-VQGAN, which
inpaints a grid canvas: the top row an example input and its output, the bottom row a query and a
masked cell the model fills in.  The canvas is read as tokens (VQGAN codes; here the palette codes
of ``organism-visual``, :mod:`tvlens.organisms.visual.images`) in raster order::

    +-------------+-------------+
    | example-in  | example-out |   ... k example rows (k-shot)
    +-------------+-------------+
    | query-in    | query-out   |   <- [MASK] at every position: the cell the model predicts
    +-------------+-------------+

A :class:`CanvasBatch` implements the engine's inputs protocol (:mod:`tvlens.engine.batch`):
``tokens`` (no padding), ``attention_mask``, ``query_positions`` (the query-out cell, in the cell's
own raster order, so the logits read there reshape to the cell), ``targets`` (the cell's codes),
``token_class`` (each position's :class:`CellRole`, the position classes of the paper's ρ maps,
§4.1) and ``task``.  The canvases the task vectors are patched into (§4.2) carry no example: their
example row is masked (``examples="masked"``) or drawn black (``examples="blank"``).

Builders: :func:`canvases` (fresh held-out images of the organism's generator: 1-shot, k-shot or no
example), :func:`canvas_from_images` (your own 12×12 palette images) and :func:`concat`
(several tasks in one batch).  Scores: :func:`score_cells` (code accuracy, exact cell, accuracy on
the codes the task changes, pixel error of the decoded image).  Everything is checked before any forward, with errors that say what was
wrong and how to fix it.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from enum import IntEnum
from typing import Any, Literal

import numpy as np
import torch
from jaxtyping import Float, Int, UInt8
from torch import Tensor

from ..engine.batch import RowSlicing, row_index
from ..organisms.visual import canvas as _cv
from ..organisms.visual import images as _im

__all__ = [
    "CellRole",
    "CanvasLayout",
    "CanvasBatch",
    "CellScores",
    "canvases",
    "canvas_from_images",
    "concat",
    "predicted_codes",
    "score_cells",
    "changed_accuracy",
    "canvas_picture",
    "MASK",
    "N_CODES",
    "EXAMPLES",
]

#: token id of a masked position (the organism's ``[MASK]``); ids ``0..N_CODES-1`` are palette codes
MASK = _cv.MASK
N_CODES = _im.N_COLORS
#: the example rows of a canvas: shown (ICL), masked or blank (no example, the patching target)
EXAMPLES = ("shown", "masked", "blank")
Examples = Literal["shown", "masked", "blank"]
#: how a masked position is drawn in pictures (no palette colour is this dark blue-gray)
MASK_RGB = (40, 44, 72)


class CellRole(IntEnum):
    """Which cell of the canvas a position belongs to (the token classes of a canvas)."""

    EXAMPLE_IN = 0
    EXAMPLE_OUT = 1
    QUERY_IN = 2
    QUERY_OUT = 3

    @property
    def label(self) -> str:
        return self.name.lower().replace("_", "-")


@dataclass(frozen=True)
class CanvasLayout:
    """A grid of ``rows × 2`` cells of ``grid × grid`` codes, read in raster order over the whole canvas.

    ``rows = k + 1`` for ``k`` example pairs; ``rows=2, grid=6`` is ``organism-visual``'s 2×2 canvas
    of 144 tokens.
    """

    rows: int = 2
    grid: int = _im.GRID

    def __post_init__(self) -> None:
        if self.rows < 1 or self.grid < 1:
            raise ValueError(f"a canvas layout needs rows >= 1 and grid >= 1, got rows={self.rows}, grid={self.grid}; "
                             "use rows = number of example pairs + 1")

    @property
    def n_cells(self) -> int:
        return 2 * self.rows

    @property
    def shots(self) -> int:
        return self.rows - 1

    @property
    def height(self) -> int:
        return self.rows * self.grid

    @property
    def width(self) -> int:
        return 2 * self.grid

    @property
    def n_pos(self) -> int:
        return self.height * self.width

    @property
    def key(self) -> str:
        """A short name of the layout, stored with means so that means of another layout are refused."""
        return f"{self.rows}x2 cells of {self.grid}x{self.grid} codes, raster order"

    def roles(self) -> Int[Tensor, " pos"]:
        """The :class:`CellRole` of each raster position."""
        r = torch.arange(self.height).repeat_interleave(self.width)
        c = torch.arange(self.width).repeat(self.height)
        query_row = (r // self.grid) == self.rows - 1
        return (query_row.long() * 2 + c // self.grid).long()

    def cell_positions(self, row: int, col: int) -> Int[Tensor, " cell_pos"]:
        """The raster positions of cell (``row``, ``col``), in the cell's own raster order."""
        if not (0 <= row < self.rows and 0 <= col < 2):
            raise ValueError(f"cell ({row}, {col}) is outside a {self.rows}x2 canvas; use row 0..{self.rows - 1}, col 0..1")
        g = self.grid
        rr = torch.arange(g).repeat_interleave(g) + row * g
        cc = torch.arange(g).repeat(g) + col * g
        return rr * self.width + cc

    @property
    def query_positions(self) -> Int[Tensor, " cell_pos"]:
        return self.cell_positions(self.rows - 1, 1)

    def assemble(self, cells: Int[Tensor, "*batch cell gh gw"]) -> Int[Tensor, "*batch pos"]:
        """Cells in reading order (example-in, example-out, ..., query-in, query-out) -> raster tokens."""
        cells = torch.as_tensor(cells)
        if cells.ndim < 3 or tuple(cells.shape[-3:]) != (self.n_cells, self.grid, self.grid):
            raise ValueError(f"cells have shape {tuple(cells.shape)}, but this canvas ({self.key}) needs "
                             f"(..., {self.n_cells}, {self.grid}, {self.grid}): {self.shots} example pair(s), the query "
                             "and its output cell, in reading order; pass exactly that many cells")
        lead = cells.shape[:-3]
        grid = cells.reshape(*lead, self.rows, 2, self.grid, self.grid).transpose(-3, -2)
        return grid.reshape(*lead, self.n_pos)

    def disassemble(self, tokens: Int[Tensor, "*batch pos"]) -> Int[Tensor, "*batch cell gh gw"]:
        """Inverse of :meth:`assemble`."""
        tokens = torch.as_tensor(tokens)
        if tokens.ndim == 0 or tokens.shape[-1] != self.n_pos:
            raise ValueError(f"canvas tokens have {tokens.shape[-1] if tokens.ndim else 0} positions, but this canvas "
                             f"({self.key}) has {self.n_pos}; build canvases with tvlens.inputs.canvas.canvases")
        lead = tokens.shape[:-1]
        grid = tokens.reshape(*lead, self.rows, self.grid, 2, self.grid).transpose(-3, -2)
        return grid.reshape(*lead, self.n_cells, self.grid, self.grid)


@dataclass(frozen=True, eq=False)
class CanvasBatch(RowSlicing):
    """Canvases whose query-out cell the model inpaints — the engine's inputs protocol for visual ICL.

    - ``tokens`` ``[batch, pos]``: palette codes and ``[MASK]`` in raster order (no padding);
    - ``attention_mask`` ``[batch, pos]``: all ones;
    - ``query_positions`` ``[batch, query]``: the query-out cell's positions (the logits the engine reads);
    - ``targets`` ``[batch, query]``: the cell's true codes, in the same order;
    - ``token_class`` ``[batch, pos]``: the :class:`CellRole` of each position;
    - ``tasks``: each row's task (``task``: the one task of a single-task batch);
    - ``layout``, ``examples`` (``"shown"``, ``"masked"`` or ``"blank"``), ``seed``, ``noise``
      (corrupted cells per example output).

    ``answer_ids`` is ``None``: a cell has many answers, scored from ``targets`` (:func:`score_cells`).
    """

    tokens: Int[Tensor, "batch pos"]
    targets: Int[Tensor, "batch query"]
    tasks: tuple[str, ...]
    layout: CanvasLayout = field(default_factory=CanvasLayout)
    examples: str = "shown"
    seed: int | None = None
    noise: int = 0

    def __post_init__(self) -> None:
        b = int(self.tokens.shape[0]) if self.tokens.ndim == 2 else -1
        if self.tokens.ndim != 2 or self.tokens.shape[1] != self.layout.n_pos:
            raise ValueError(f"canvas tokens have shape {tuple(self.tokens.shape)}, expected [batch, {self.layout.n_pos}] "
                             f"({self.layout.key}); build them with tvlens.inputs.canvas.canvases")
        if tuple(self.targets.shape) != (b, self.layout.grid ** 2):
            raise ValueError(f"targets have shape {tuple(self.targets.shape)}, expected [{b}, {self.layout.grid ** 2}]: "
                             "the query-out cell's codes of every canvas")
        if len(self.tasks) != b:
            raise ValueError(f"{b} canvases but {len(self.tasks)} task names; give one task per canvas")
        if self.examples not in EXAMPLES:
            raise ValueError(f"examples={self.examples!r}; use one of {', '.join(EXAMPLES)}")

    # ---- the inputs protocol ----
    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def attention_mask(self) -> Int[Tensor, "batch pos"]:
        return torch.ones_like(self.tokens)

    @property
    def query_positions(self) -> Int[Tensor, "batch query"]:
        return self.layout.query_positions.expand(len(self), -1).clone()

    @property
    def token_class(self) -> Int[Tensor, "batch pos"]:
        return self.layout.roles().expand(len(self), -1).clone()

    @property
    def answer_ids(self) -> None:
        return None

    @property
    def task(self) -> str:
        names = sorted(set(self.tasks))
        return names[0] if len(names) == 1 else "+".join(names)

    @property
    def task_names(self) -> tuple[str, ...]:
        """The distinct tasks, in order of first appearance."""
        return tuple(dict.fromkeys(self.tasks))

    def model_inputs(self) -> dict[str, Tensor]:
        return {}

    def select(self, index: Any) -> "CanvasBatch":
        """The canvases ``index`` (row numbers or a boolean mask)."""
        return replace(self, **self._row_fields(row_index(index, len(self))))

    # ---- images ----
    def cells(self) -> Int[Tensor, "batch cell gh gw"]:
        """Every cell's tokens in reading order (the query-out cell as the model sees it: masked)."""
        return self.layout.disassemble(self.tokens)

    @property
    def query_codes(self) -> Int[Tensor, "batch query"]:
        """The query-in cell's codes, in the order of ``targets`` (what copying the query would answer)."""
        return self.cells()[:, -2].reshape(len(self), -1)

    @property
    def changed(self) -> Tensor:
        """``[batch, query]`` bool: the codes where the answer differs from the query-in cell."""
        return self.targets != self.query_codes

    def target_cells(self) -> Int[Tensor, "batch gh gw"]:
        g = self.layout.grid
        return self.targets.reshape(-1, g, g)

    def images(self) -> dict[str, UInt8[np.ndarray, "..."]]:
        """The canvases as palette images (the inverse of :func:`canvas_from_images`):
        ``example_pairs`` ``[batch, shots, 2, H, W, 3]`` (shown examples only), ``queries`` and
        ``targets`` ``[batch, H, W, 3]``."""
        cells = self.cells()
        out: dict[str, np.ndarray] = {
            "queries": np.stack([_im.codes_to_image(c[-2]) for c in cells]),
            "targets": np.stack([_im.codes_to_image(t) for t in self.target_cells()]),
        }
        if self.examples == "shown":
            out["example_pairs"] = np.stack([np.stack([np.stack([_im.codes_to_image(c[2 * s]), _im.codes_to_image(c[2 * s + 1])])
                                                       for s in range(self.layout.shots)]) for c in cells])
        return out

    def picture(self, row: int, *, answer: Tensor | None = None) -> UInt8[np.ndarray, "h w 3"]:
        """Canvas ``row`` as one RGB picture; ``answer`` (``[query]`` codes) fills the query-out cell."""
        tokens = self.tokens[row].clone()
        if answer is not None:
            tokens[self.layout.query_positions] = torch.as_tensor(answer).reshape(-1).to(tokens.dtype)
        return canvas_picture(tokens, self.layout)

    # ---- checks ----
    def check_model(self, model: Any) -> None:
        """Refuse a model these canvases cannot run on (too few positions, another vocabulary), before any forward."""
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        if self.layout.n_pos > info.n_ctx:
            raise ValueError(f"these canvases have {self.layout.n_pos} positions ({self.layout.key}) but the model reads at "
                             f"most {info.n_ctx}; use fewer example pairs (shots={max(0, info.n_ctx // (self.layout.width * self.layout.grid) - 1)} "
                             "fit) or a model with more positions")
        if info.d_vocab <= MASK:
            raise ValueError(f"the model's vocabulary has {info.d_vocab} tokens, but canvases use ids up to {MASK} (the palette "
                             "codes and [MASK]); use a model trained on canvases, such as organism-visual")

    def __repr__(self) -> str:
        return (f"CanvasBatch(n={len(self)}, tasks={list(self.task_names)}, examples={self.examples!r}, "
                f"shots={self.layout.shots}, noise={self.noise}, positions={self.layout.n_pos})")


# ---------------------------------------------------------------------------------------------
# builders


def _check_task(task: str) -> str:
    if task not in _im.TRANSFORMS:
        raise ValueError(f"unknown visual task {task!r}; use one of {', '.join(_im.TASKS)}")
    return task


def _task_rng(task: str, seed: int) -> np.random.Generator:
    return np.random.default_rng([int(seed), zlib.crc32(task.encode())])


def _top_cells(pairs: Sequence[tuple[np.ndarray, np.ndarray]], examples: str, g: int) -> list[Tensor]:
    """The example rows' cells: the pairs, or masked / black cells."""
    if examples == "shown":
        return [torch.from_numpy(np.asarray(c)) for pair in pairs for c in pair]
    fill = MASK if examples == "masked" else _im.BLACK
    return [torch.full((g, g), fill, dtype=torch.long)] * (2 * len(pairs))


def canvases(
    task: str,
    n: int,
    *,
    shots: int = 1,
    examples: Examples = "shown",
    seed: int = 0,
    split: str = "test",
    noise: int = 0,
) -> CanvasBatch:
    """``n`` canvases of ``task`` on fresh images of ``split`` (held-out by default).

    ``shots`` example pairs above the query (1 = the 2×2 canvas of Hojel et al. 2024, §3);
    ``examples="masked"`` / ``"blank"`` hide them — the no-example canvases task vectors are patched
    into (§4.2).  The same ``seed`` gives the same queries and targets whatever ``examples`` is, so
    ICL and no-example canvases can be compared row by row.  ``noise`` cells of each example output
    are corrupted (:func:`tvlens.organisms.visual.images.corrupt`): noisy examples make one-shot ICL
    imperfect while a task vector (a mean over many canvases) is not affected.
    """
    _check_task(task)
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n={n!r} canvases; ask for at least one (an int >= 1)")
    if isinstance(shots, bool) or not isinstance(shots, int) or shots < 1:
        raise ValueError(f"shots={shots!r}: a canvas has at least one example row (shown, masked or blank); "
                         "use shots >= 1 and examples='masked' or 'blank' for no example")
    if examples not in EXAMPLES:
        raise ValueError(f"examples={examples!r}; use one of {', '.join(EXAMPLES)}")
    if split not in ("train", "test", "any"):
        raise ValueError(f"split={split!r}; use 'test' (held-out images), 'train' or 'any'")
    layout = CanvasLayout(rows=shots + 1)
    rng = _task_rng(task, seed)
    rows, targets = [], []
    for _ in range(n):  # the examples are drawn even when hidden, so queries do not depend on `examples`
        pairs = [_im.random_pair(task, rng, split=split) for _ in range(shots)]
        if noise:
            pairs = [(x, _im.corrupt(y, noise, rng)) for x, y in pairs]
        q_in, q_out = _im.random_pair(task, rng, split=split)
        out = torch.full((layout.grid, layout.grid), MASK, dtype=torch.long)
        rows.append(layout.assemble(torch.stack([*_top_cells(pairs, examples, layout.grid), torch.from_numpy(q_in), out])))
        targets.append(torch.from_numpy(q_out).reshape(-1))
    return CanvasBatch(torch.stack(rows).long(), torch.stack(targets).long(), (task,) * n, layout, examples, seed, noise)


def _codes(image: Any, what: str) -> np.ndarray:
    try:
        return _im.image_to_codes(image)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def canvas_from_images(
    task: str | Sequence[str],
    queries: Any,
    targets: Any,
    example_pairs: Any = None,
    *,
    examples: Examples = "shown",
    shots: int | None = None,
) -> CanvasBatch:
    """Canvases from your own images (``uint8`` ``[H, W, 3]``, 12×12 pixels of palette colours).

    ``queries`` / ``targets``: ``[batch, 12, 12, 3]`` (the query and its true output);
    ``example_pairs``: ``[batch, shots, 2, 12, 12, 3]`` (input, output) — required with
    ``examples="shown"``; with ``"masked"`` / ``"blank"`` give ``shots`` (default 1) instead.
    The exact inverse of :meth:`CanvasBatch.images`.
    """
    queries = [np.asarray(q) for q in queries]
    targets = [np.asarray(t) for t in targets]
    n = len(queries)
    if n == 0 or len(targets) != n:
        raise ValueError(f"{n} query images and {len(targets)} target images; give one target (the true output) per query")
    tasks = (task,) * n if isinstance(task, str) else tuple(task)
    if len(tasks) != n:
        raise ValueError(f"{n} canvases but {len(tasks)} task names; give one task, or one per canvas")
    for t in set(tasks):
        _check_task(t)
    if examples not in EXAMPLES:
        raise ValueError(f"examples={examples!r}; use one of {', '.join(EXAMPLES)}")
    if examples == "shown":
        if example_pairs is None:
            raise ValueError("examples='shown' needs example_pairs [batch, shots, 2, 12, 12, 3]; pass them, or use "
                             "examples='masked' for canvases without examples")
        pairs = [np.asarray(p) for p in example_pairs]
        if len(pairs) != n or any(p.ndim != 5 or p.shape[1] != 2 for p in pairs) or len({p.shape[0] for p in pairs}) != 1:
            raise ValueError(f"example_pairs must be [batch={n}, shots, 2, 12, 12, 3] with the same shots for every canvas; "
                             f"got {[tuple(p.shape) for p in pairs][:3]}")
        k = int(pairs[0].shape[0])
    else:
        k = 1 if shots is None else int(shots)
        pairs = [None] * n
    layout = CanvasLayout(rows=k + 1)
    rows, tgts = [], []
    for i in range(n):
        shown = [] if pairs[i] is None else [(_codes(pairs[i][s][0], f"example_pairs[{i}][{s}][0]"),
                                              _codes(pairs[i][s][1], f"example_pairs[{i}][{s}][1]")) for s in range(k)]
        top = _top_cells(shown, examples, layout.grid) if shown else _top_cells([(None, None)] * k, examples, layout.grid)
        out = torch.full((layout.grid, layout.grid), MASK, dtype=torch.long)
        q = torch.from_numpy(_codes(queries[i], f"queries[{i}]"))
        rows.append(layout.assemble(torch.stack([*top, q, out])))
        tgts.append(torch.from_numpy(_codes(targets[i], f"targets[{i}]")).reshape(-1))
    return CanvasBatch(torch.stack(rows).long(), torch.stack(tgts).long(), tasks, layout, examples)


def concat(batches: Sequence[CanvasBatch]) -> CanvasBatch:
    """Several batches (e.g. one per task) as one, for a multi-task objective; layouts and variants must agree."""
    batches = list(batches)
    if not batches:
        raise ValueError("concat needs at least one CanvasBatch")
    first = batches[0]
    for b in batches[1:]:
        if b.layout != first.layout or b.examples != first.examples:
            raise ValueError(f"cannot concatenate canvases of different layouts or example variants ({first.layout.key}, "
                             f"{first.examples!r} vs {b.layout.key}, {b.examples!r}); build them alike")
    return CanvasBatch(torch.cat([b.tokens for b in batches]), torch.cat([b.targets for b in batches]),
                       tuple(t for b in batches for t in b.tasks), first.layout, first.examples, first.seed, first.noise)


# ---------------------------------------------------------------------------------------------
# scores and pictures


def predicted_codes(logits: Float[Tensor, "... query d_vocab"]) -> Int[Tensor, "... query"]:
    """The palette code the model predicts at each query position (argmax over the codes only)."""
    return logits[..., :N_CODES].argmax(-1)


@dataclass(frozen=True)
class CellScores:
    """Per canvas: code accuracy, whether the whole cell is exact, the accuracy on the *changed* codes
    (where the answer differs from the query-in cell; copying the query scores 0 there, so the
    background a task keeps does not count) and the decoded image's pixel error.

    ``changed`` is NaN when :func:`score_cells` got no ``queries`` (and 1 for a canvas whose answer
    equals its query: nothing to change); ``pixel_error`` is the mean absolute RGB difference of the
    decoded 12×12 images, in ``[0, 1]``.
    """

    code_acc: Float[Tensor, "*batch"]
    exact: Float[Tensor, "*batch"]
    pixel_error: Float[Tensor, "*batch"]
    changed: Float[Tensor, "*batch"] | None = None

    def mean(self) -> dict[str, float]:
        out = {"code_acc": float(self.code_acc.mean()), "exact": float(self.exact.mean()),
               "pixel_error": float(self.pixel_error.mean())}
        if self.changed is not None:
            out["changed"] = float(self.changed.mean())
        return out


_PALETTE = torch.from_numpy(_im.PALETTE.astype(np.float32)) / 255.0


def changed_accuracy(hit: Float[Tensor, "batch *column query"], moved: Tensor) -> Float[Tensor, "batch *column"]:
    """Accuracy over the codes ``moved`` ``[batch, query]`` marks (1 where none is marked)."""
    moved = moved.to(hit.device).reshape(moved.shape[0], *([1] * (hit.ndim - 2)), moved.shape[-1]).float()
    n = moved.sum(-1)
    return torch.where(n > 0, (hit * moved).sum(-1) / n.clamp(min=1), torch.ones_like(n))


def score_cells(pred: Int[Tensor, "batch *column query"], targets: Int[Tensor, "batch query"],
                queries: Int[Tensor, "batch query"] | None = None) -> CellScores:
    """Score predicted codes against the targets; ``pred`` may have axes after the batch (the engine's
    columns).  ``queries`` (:attr:`CanvasBatch.query_codes`) adds the changed-code accuracy."""
    pred, targets = torch.as_tensor(pred).cpu(), torch.as_tensor(targets).cpu()
    if pred.shape[-1] != targets.shape[-1]:
        raise ValueError(f"predictions have {pred.shape[-1]} codes per cell but targets {targets.shape[-1]}; "
                         "score the query-out cell's codes (predicted_codes of the logits at the query positions)")
    if targets.ndim != 2 or pred.shape[0] != targets.shape[0]:
        raise ValueError(f"predictions {tuple(pred.shape)} and targets {tuple(targets.shape)} do not match; pass predictions "
                         "[batch, ..., query] for targets [batch, query]")
    if queries is not None and tuple(torch.as_tensor(queries).shape) != tuple(targets.shape):
        raise ValueError(f"queries {tuple(torch.as_tensor(queries).shape)} must match targets {tuple(targets.shape)} "
                         "(CanvasBatch.query_codes)")
    moved = None if queries is None else targets != torch.as_tensor(queries).cpu()
    targets = targets.reshape(targets.shape[0], *([1] * (pred.ndim - 2)), targets.shape[1])
    hit = (pred == targets).float()
    err = (_PALETTE[pred.clamp(0, N_CODES - 1)] - _PALETTE[targets]).abs().mean((-1, -2))
    changed = None if moved is None else changed_accuracy(hit, moved)
    return CellScores(hit.mean(-1), (hit.min(-1).values == 1).float(), err, changed)


def canvas_picture(tokens: Int[Tensor, " pos"], layout: CanvasLayout | None = None, *, gap: int = 1) -> UInt8[np.ndarray, "h w 3"]:
    """One canvas as an RGB picture: each code a 2×2-pixel patch, [MASK] dark blue-gray, a white line between cells."""
    layout = layout or CanvasLayout()
    tokens = torch.as_tensor(tokens).reshape(-1)
    cells = layout.disassemble(tokens).numpy()
    p = _im.PATCH
    colours = np.concatenate([_im.PALETTE, np.zeros((max(0, MASK - N_CODES + 1), 3), np.uint8) + np.array(MASK_RGB, np.uint8)])
    side = layout.grid * p
    h, w = layout.rows * side + (layout.rows - 1) * gap, 2 * side + gap
    pic = np.full((h, w, 3), 255, dtype=np.uint8)
    for i, cell in enumerate(cells):
        r, c = divmod(i, 2)
        img = colours[np.clip(cell, 0, len(colours) - 1)].repeat(p, 0).repeat(p, 1)
        pic[r * (side + gap): r * (side + gap) + side, c * (side + gap): c * (side + gap) + side] = img
    return pic
