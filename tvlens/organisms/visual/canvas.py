"""2×2 visual-prompt canvases for ``organism-visual`` (Hojel et al. 2024, §3 "Visual Prompting").

A canvas is the visual prompt of MAE-VQGAN: four images in a 2×2 grid, the top row an example input
and its output, the bottom row the query and a masked cell the model inpaints::

    +-----------+-------------+
    | example-in| example-out |
    +-----------+-------------+
    | query-in  | query-out   |  ← [MASK] at every position
    +-----------+-------------+

Each image is a 6×6 grid of palette codes (:mod:`tvlens.organisms.visual.images`), so the canvas is a
12×12 grid of codes, read in raster order as 144 tokens.  Token ids ``0..8`` are the palette codes;
:data:`VOCAB` lists every token.  ``cell_roles()`` gives each position its cell (the position classes
of the paper's ρ_token maps, §4.1).

Prompts without examples — the setting task vectors are patched into (§4.2) — mask the example row
(``examples="masked"``) or draw it black (``examples="blank"``); the training-only ``task`` variant
also masks the example row and writes a task token into every position of the query-out cell.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
from jaxtyping import Int

import numpy as np

from tvlens.organisms.visual.images import COLOR_NAMES, GRID, N_COLORS, TASKS, Split, check_codes, corrupt, random_pair

__all__ = [
    "VOCAB",
    "MASK",
    "PAD",
    "TASK_TOKEN",
    "N_CELLS",
    "CANVAS_SIDE",
    "N_POSITIONS",
    "ROLES",
    "EXAMPLE_IN",
    "EXAMPLE_OUT",
    "QUERY_IN",
    "QUERY_OUT",
    "cell_roles",
    "cell_positions",
    "assemble",
    "disassemble",
    "make_canvas",
    "make_target",
    "make_batch",
    "random_canvases",
    "prediction_cells",
]

# Palette codes first, so a token id below N_COLORS *is* a palette code.
SPECIALS = ("[MASK]", "[PAD]", "[UNK]", "[CLS]", "[SEP]")
VOCAB: tuple[str, ...] = (*COLOR_NAMES, *SPECIALS, *(f"[{t.upper()}]" for t in TASKS))
MASK, PAD = N_COLORS, N_COLORS + 1
TASK_TOKEN: dict[str, int] = {t: N_COLORS + len(SPECIALS) + i for i, t in enumerate(TASKS)}

N_CELLS = 4
CANVAS_SIDE = 2 * GRID  # codes per canvas side
N_POSITIONS = CANVAS_SIDE * CANVAS_SIDE  # tokens per canvas
ROLES: tuple[str, ...] = ("example-in", "example-out", "query-in", "query-out")
EXAMPLE_IN, EXAMPLE_OUT, QUERY_IN, QUERY_OUT = range(N_CELLS)

Examples = Literal["shown", "masked", "blank", "task"]


def cell_roles() -> Int[torch.Tensor, "pos"]:
    """The cell (0 example-in, 1 example-out, 2 query-in, 3 query-out; see :data:`ROLES`) of each of
    the 144 raster-order canvas positions."""
    r = torch.arange(CANVAS_SIDE).repeat_interleave(CANVAS_SIDE)
    c = torch.arange(CANVAS_SIDE).repeat(CANVAS_SIDE)
    return (r // GRID) * 2 + c // GRID


def cell_positions(role: int) -> Int[torch.Tensor, "n"]:
    """The 36 raster-order positions of one cell (``role`` one of 0..3), in the cell's own raster order."""
    if role not in range(N_CELLS):
        raise ValueError(f"role must be 0..{N_CELLS - 1} ({', '.join(ROLES)}), got {role!r}.")
    return torch.nonzero(cell_roles() == role).squeeze(-1)


def assemble(cells: Int[torch.Tensor, "*batch 4 6 6"]) -> Int[torch.Tensor, "*batch pos"]:
    """Lay four 6×6 token grids (example-in, example-out, query-in, query-out) out as a 2×2 canvas and
    read it in raster order.  Any token ids are allowed (codes, [MASK], task tokens)."""
    cells = torch.as_tensor(cells)
    if cells.shape[-3:] != (N_CELLS, GRID, GRID):
        raise ValueError(
            f"cells has shape {tuple(cells.shape)}, expected (..., {N_CELLS}, {GRID}, {GRID}): "
            f"{N_CELLS} cells ({', '.join(ROLES)}) of {GRID}×{GRID} tokens. Pass exactly four grids."
        )
    lead = cells.shape[:-3]
    grid = cells.reshape(*lead, 2, 2, GRID, GRID).transpose(-3, -2)  # (..., cell row, code row, cell col, code col)
    return grid.reshape(*lead, N_POSITIONS)


def disassemble(tokens: Int[torch.Tensor, "*batch pos"]) -> Int[torch.Tensor, "*batch 4 6 6"]:
    """Inverse of :func:`assemble`: split raster-order canvas tokens into the four 6×6 cell grids."""
    tokens = torch.as_tensor(tokens)
    if tokens.ndim == 0 or tokens.shape[-1] != N_POSITIONS:
        raise ValueError(
            f"canvas tokens have shape {tuple(tokens.shape)}, expected (..., {N_POSITIONS}): a "
            f"{CANVAS_SIDE}×{CANVAS_SIDE} canvas of {N_CELLS} cells in raster order. Build canvases with make_canvas."
        )
    lead = tokens.shape[:-1]
    grid = tokens.reshape(*lead, 2, GRID, 2, GRID).transpose(-3, -2)
    return grid.reshape(*lead, N_CELLS, GRID, GRID)


def make_canvas(
    example_in: object | None,
    example_out: object | None,
    query_in: object,
    *,
    examples: Examples = "shown",
    task: str | None = None,
) -> Int[torch.Tensor, "pos"]:
    """Tokens of one canvas whose query-out cell is to be inpainted.

    ``examples`` chooses the top row: ``"shown"`` (one example pair, 1-shot ICL), ``"masked"``
    ([MASK] everywhere) or ``"blank"`` (black images) — the no-example prompts of Hojel et al. §4.2 —
    or ``"task"``: example row masked and the query-out cell filled with ``task``'s token instead of
    [MASK] (the task given by name; used in training and as a reference).
    """
    if examples not in ("shown", "masked", "blank", "task"):
        raise ValueError(f"examples must be 'shown', 'masked', 'blank' or 'task', got {examples!r}.")
    q = torch.from_numpy(check_codes(query_in, name="query_in"))
    if examples == "shown":
        if example_in is None or example_out is None:
            raise ValueError("examples='shown' needs example_in and example_out; pass both, or examples='masked'.")
        top = [torch.from_numpy(check_codes(g, name=n)) for g, n in ((example_in, "example_in"), (example_out, "example_out"))]
    else:
        fill = 0 if examples == "blank" else MASK
        top = [torch.full((GRID, GRID), fill, dtype=torch.long)] * 2
    if examples == "task":
        if task not in TASK_TOKEN:
            raise ValueError(f"examples='task' needs task, one of {', '.join(TASKS)}; got {task!r}.")
        out = torch.full((GRID, GRID), TASK_TOKEN[task], dtype=torch.long)
    else:
        out = torch.full((GRID, GRID), MASK, dtype=torch.long)
    return assemble(torch.stack([*top, q, out]))


def make_target(query_out: object, *, ignore_index: int = -100) -> Int[torch.Tensor, "pos"]:
    """Training/evaluation target of a canvas: the query-out codes at the query-out positions and
    ``ignore_index`` everywhere else (the loss is on the masked cell only)."""
    target = torch.full((N_CELLS, GRID, GRID), ignore_index, dtype=torch.long)
    target[QUERY_OUT] = torch.from_numpy(check_codes(query_out, name="query_out"))
    return assemble(target)


def make_batch(
    pairs: Sequence[tuple[object, object, object, object]],
    *,
    examples: Examples | Sequence[Examples] = "shown",
    tasks: Sequence[str] | None = None,
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """Canvas tokens and targets for many ``(example_in, example_out, query_in, query_out)`` tuples;
    ``examples`` is one variant for all or one per canvas, ``tasks`` names each canvas's task (needed
    for the ``"task"`` variant)."""
    n = len(pairs)
    variants = [examples] * n if isinstance(examples, str) else list(examples)
    if len(variants) != n or (tasks is not None and len(tasks) != n):
        raise ValueError(f"{n} canvases but {len(variants)} example variants / {len(tasks or [])} tasks; pass one per canvas.")
    toks, tgts = [], []
    for i, (ei, eo, qi, qo) in enumerate(pairs):
        toks.append(make_canvas(ei, eo, qi, examples=variants[i], task=None if tasks is None else tasks[i]))
        tgts.append(make_target(qo))
    return torch.stack(toks), torch.stack(tgts)


def random_canvases(
    tasks: Sequence[str],
    rng: np.random.Generator,
    *,
    split: Split = "test",
    examples: Examples = "shown",
    noise: int = 0,
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"]]:
    """One canvas per entry of ``tasks`` on fresh images of ``split`` (held-out by default): tokens and
    query-out targets.  ``noise`` cells of each example output are replaced by other codes
    (:func:`images.corrupt`): a noisy example pair makes one-shot ICL imperfect, so that a patched task
    vector — a mean over many prompts — has room to beat it (Hojel et al. 2024, §5)."""
    rows = []
    for task in tasks:
        ex_in, ex_out = random_pair(task, rng, split=split)
        q_in, q_out = random_pair(task, rng, split=split)
        if noise:
            ex_out = corrupt(ex_out, noise, rng)
        rows.append((ex_in, ex_out, q_in, q_out))
    return make_batch(rows, examples=examples, tasks=list(tasks))


def prediction_cells(logits: torch.Tensor) -> Int[torch.Tensor, "*batch 6 6"]:
    """The query-out cell a model predicts: argmax over the palette codes only (specials and task tokens
    are never an answer) at the query-out positions, as 6×6 code grids.  ``logits`` is
    ``(..., pos, d_vocab)``."""
    if logits.shape[-2] != N_POSITIONS:
        raise ValueError(f"logits have {logits.shape[-2]} positions, expected {N_POSITIONS} (one canvas).")
    codes = logits[..., :N_COLORS].argmax(-1)
    return disassemble(codes)[..., QUERY_OUT, :, :]
