"""Procedural images, the palette codebook and the eight image-to-image tasks of ``organism-visual``.

Hojel et al. 2024 (§3, "Visual Prompting") study MAE-VQGAN, which inpaints a 2×2 canvas of
images whose tokens are VQGAN codes.  This organism replaces the learnt VQGAN codebook by a fixed
palette of nine colours: an image is a 6×6 grid of palette *codes*, each drawn as a solid 2×2-pixel
patch, so an image is a ``12×12×3`` ``uint8`` array and quantisation (image → codes → image) is
lossless.

Inputs are 1–3 objects (rectangles, crosses, discs, random blobs) in distinct chromatic colours on
black.  The tasks act on code grids; every task leaves a distinct *colour-histogram* signature on the
example pair (the one spatial task, ``hflip``, is the one that keeps the histogram), because tasks
that differ only by where the colours go were not learnt from one example in the training budget:

=========  =================================================================================
hflip      mirror left–right                                  (histogram unchanged)
outline    object cells whose 4 neighbours share their colour become black (fewer coloured)
dilate     black cells 4-adjacent to an object take its colour               (more coloured)
recolor    rotate colours within {red, green, blue} and within {yellow, cyan, magenta}
swapcolor  swap red↔yellow, green↔cyan, blue↔magenta
invert     black↔white and each colour to its complement (red↔cyan, green↔magenta, blue↔yellow)
segment    every object cell white                                (only black and white)
gray       every object cell gray                                  (only black and gray)
=========  =================================================================================

Everything here is pure numpy/torch and deterministic: samplers take a ``numpy.random.Generator``.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Sequence
from typing import Literal

import numpy as np
import torch
from jaxtyping import Int, UInt8

__all__ = [
    "PALETTE",
    "COLOR_NAMES",
    "N_COLORS",
    "BLACK",
    "WHITE",
    "GRAY",
    "CHROMATIC",
    "GRID",
    "PATCH",
    "IMAGE_SIZE",
    "TASKS",
    "TRANSFORMS",
    "codes_to_image",
    "image_to_codes",
    "check_codes",
    "apply_task",
    "random_codes",
    "random_pair",
    "corrupt",
    "is_held_out",
    "stack_codes",
    "hflip",
    "outline",
    "dilate",
    "recolor",
    "swapcolor",
    "invert",
    "segment",
    "gray",
]

GRID = 6  # codes per image side
PATCH = 2  # pixels per code side
IMAGE_SIZE = GRID * PATCH  # pixels per image side

COLOR_NAMES: tuple[str, ...] = ("black", "red", "green", "blue", "yellow", "cyan", "magenta", "white", "gray")
PALETTE: UInt8[np.ndarray, "color 3"] = np.array(
    [
        [0, 0, 0],
        [255, 0, 0],
        [0, 255, 0],
        [0, 0, 255],
        [255, 255, 0],
        [0, 255, 255],
        [255, 0, 255],
        [255, 255, 255],
        [128, 128, 128],
    ],
    dtype=np.uint8,
)
PALETTE.setflags(write=False)
N_COLORS = len(COLOR_NAMES)
BLACK, RED, GREEN, BLUE, YELLOW, CYAN, MAGENTA, WHITE, GRAY = range(N_COLORS)
# Object colours of input images; white and gray only ever appear in task outputs, so that segment
# and gray are never the identity.
CHROMATIC: tuple[int, ...] = (RED, GREEN, BLUE, YELLOW, CYAN, MAGENTA)

Codes = Int[np.ndarray, "6 6"]


def _lut(mapping: dict[int, int]) -> np.ndarray:
    """A code → code lookup table that is the identity outside ``mapping``."""
    lut = np.arange(N_COLORS)
    for src, dst in mapping.items():
        lut[src] = dst
    lut.setflags(write=False)
    return lut


# The three colour permutations are chosen so that no chromatic colour goes to the same place under
# two of them: one object in the example pair tells them apart.
_RECOLOR = _lut({RED: GREEN, GREEN: BLUE, BLUE: RED, YELLOW: CYAN, CYAN: MAGENTA, MAGENTA: YELLOW})
_SWAP = _lut({RED: YELLOW, YELLOW: RED, GREEN: CYAN, CYAN: GREEN, BLUE: MAGENTA, MAGENTA: BLUE})
_INVERT = _lut(
    {BLACK: WHITE, WHITE: BLACK, RED: CYAN, CYAN: RED, GREEN: MAGENTA, MAGENTA: GREEN, BLUE: YELLOW, YELLOW: BLUE}
)


# --------------------------------------------------------------------------------------------------
# validation and the codebook


def check_codes(codes: object, *, name: str = "codes") -> Codes:
    """Return ``codes`` as an ``int64`` numpy array of shape ``(6, 6)`` with values in the palette.

    Accepts numpy arrays, torch tensors and nested lists; raises ``ValueError`` saying what is wrong
    and how to fix it.
    """
    arr = codes.detach().cpu().numpy() if isinstance(codes, torch.Tensor) else np.asarray(codes)
    if arr.shape != (GRID, GRID):
        raise ValueError(
            f"{name} has shape {tuple(arr.shape)}, expected ({GRID}, {GRID}): one palette code per 2×2 patch. "
            f"Pass a {GRID}×{GRID} grid of codes, or convert a {IMAGE_SIZE}×{IMAGE_SIZE}×3 image with image_to_codes."
        )
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} has dtype {arr.dtype}, expected integers. Pass palette codes 0..{N_COLORS - 1}.")
    bad = (arr < 0) | (arr >= N_COLORS)
    if bad.any():
        r, c = map(int, np.argwhere(bad)[0])
        raise ValueError(
            f"{name}[{r}, {c}] = {int(arr[r, c])} is not a palette code. "
            f"Use codes 0..{N_COLORS - 1} ({', '.join(COLOR_NAMES)})."
        )
    return arr.astype(np.int64)


def codes_to_image(codes: object) -> UInt8[np.ndarray, "12 12 3"]:
    """Draw a 6×6 code grid as a 12×12 RGB image, each code a solid 2×2-pixel patch."""
    grid = check_codes(codes)
    return PALETTE[grid].repeat(PATCH, axis=0).repeat(PATCH, axis=1)


def image_to_codes(image: object) -> Int[np.ndarray, "6 6"]:
    """Quantise a 12×12×3 ``uint8`` image back to its 6×6 code grid (exact inverse of ``codes_to_image``).

    Raises ``ValueError`` for a wrong shape or dtype, a patch that is not one solid colour, or a
    colour outside the palette.
    """
    img = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if img.shape != (IMAGE_SIZE, IMAGE_SIZE, 3):
        raise ValueError(
            f"image has shape {tuple(img.shape)}, expected ({IMAGE_SIZE}, {IMAGE_SIZE}, 3) (height, width, RGB). "
            f"Resize to {IMAGE_SIZE}×{IMAGE_SIZE} with nearest-neighbour sampling and drop any alpha channel."
        )
    if img.dtype != np.uint8:
        raise ValueError(f"image has dtype {img.dtype}, expected uint8. Convert with image.astype(np.uint8) from 0..255.")
    patches = img.reshape(GRID, PATCH, GRID, PATCH, 3).transpose(0, 2, 1, 3, 4).reshape(GRID, GRID, PATCH * PATCH, 3)
    corner = patches[:, :, :1]
    if (patches != corner).any():
        r, c = map(int, np.argwhere((patches != corner).any(axis=(2, 3)))[0])
        raise ValueError(
            f"image patch at code ({r}, {c}) (pixels {PATCH * r}:{PATCH * r + PATCH}, {PATCH * c}:{PATCH * c + PATCH}) "
            f"is not one solid colour. Each code is a solid {PATCH}×{PATCH} patch; draw images with codes_to_image."
        )
    rgb = corner[:, :, 0]  # (6, 6, 3)
    match = (rgb[:, :, None, :] == PALETTE[None, None]).all(axis=-1)  # (6, 6, color)
    if not match.any(axis=-1).all():
        r, c = map(int, np.argwhere(~match.any(axis=-1))[0])
        raise ValueError(
            f"image colour {tuple(int(v) for v in rgb[r, c])} at code ({r}, {c}) is not in the palette. "
            f"Use only the palette colours {dict(zip(COLOR_NAMES, map(tuple, PALETTE.tolist())))}."
        )
    return match.argmax(axis=-1).astype(np.int64)


# --------------------------------------------------------------------------------------------------
# the eight tasks (code grid → code grid)


def hflip(codes: object) -> Codes:
    """Mirror left–right: the one global spatial task (keeps the colour histogram)."""
    return check_codes(codes)[:, ::-1].copy()


def outline(codes: object) -> Codes:
    """Keep each object's boundary: a coloured cell whose 4 neighbours all share its colour (outside
    the image counts as background) becomes black."""
    g = check_codes(codes)
    p = np.pad(g, 1, constant_values=-1)
    same = (p[:-2, 1:-1] == g) & (p[2:, 1:-1] == g) & (p[1:-1, :-2] == g) & (p[1:-1, 2:] == g)
    out = g.copy()
    out[(g != BLACK) & same] = BLACK
    return out


def dilate(codes: object) -> Codes:
    """Grow every object by one cell: a black cell 4-adjacent to an object takes the colour of its
    first coloured neighbour in the order up, down, left, right (a fixed rule, so it is deterministic)."""
    g = check_codes(codes)
    p = np.pad(g, 1, constant_values=BLACK)
    out = g.copy()
    # Fill in reverse priority so that the highest-priority neighbour writes last.
    for nb in (p[1:-1, 2:], p[1:-1, :-2], p[2:, 1:-1], p[:-2, 1:-1]):
        take = (g == BLACK) & (nb != BLACK)
        out[take] = nb[take]
    return out


def recolor(codes: object) -> Codes:
    """Rotate colours: red→green→blue→red and yellow→cyan→magenta→yellow (black, white, gray kept)."""
    return _RECOLOR[check_codes(codes)]


def swapcolor(codes: object) -> Codes:
    """Swap red↔yellow, green↔cyan, blue↔magenta (black, white, gray kept)."""
    return _SWAP[check_codes(codes)]


def invert(codes: object) -> Codes:
    """Colour negative: black↔white, red↔cyan, green↔magenta, blue↔yellow (gray, its own negative, kept)."""
    return _INVERT[check_codes(codes)]


def segment(codes: object) -> Codes:
    """Foreground mask: every non-black cell white."""
    g = check_codes(codes)
    return np.where(g == BLACK, BLACK, WHITE)


def gray(codes: object) -> Codes:
    """Desaturate: every non-black cell gray."""
    g = check_codes(codes)
    return np.where(g == BLACK, BLACK, GRAY)


TRANSFORMS: dict[str, Callable[[object], Codes]] = {
    "hflip": hflip,
    "outline": outline,
    "dilate": dilate,
    "recolor": recolor,
    "swapcolor": swapcolor,
    "invert": invert,
    "segment": segment,
    "gray": gray,
}
TASKS: tuple[str, ...] = tuple(TRANSFORMS)


def apply_task(task: str, codes: object) -> Codes:
    """Apply the task named ``task`` (one of :data:`TASKS`) to a 6×6 code grid."""
    if task not in TRANSFORMS:
        raise ValueError(f"unknown task {task!r}. Use one of {', '.join(TASKS)}.")
    return TRANSFORMS[task](codes)


# --------------------------------------------------------------------------------------------------
# sampling

Split = Literal["train", "test", "any"]


def is_held_out(codes: object) -> bool:
    """Whether an input image belongs to the held-out split: one image in eight, by a checksum of
    its codes, so training can never draw an evaluation image."""
    return zlib.crc32(check_codes(codes).astype(np.uint8).tobytes()) % 8 == 0


def _shape_mask(rng: np.random.Generator) -> np.ndarray:
    """A boolean mask of one object (rectangle, cross, disc or blob) at a random place."""
    kind = int(rng.integers(4))
    if kind == 0:  # filled rectangle, 2–4 cells a side
        h, w = (int(v) for v in rng.integers(2, 5, size=2))
        m = np.ones((h, w), dtype=bool)
    elif kind == 1:  # plus sign
        m = np.array([[0, 1, 0], [1, 1, 1], [0, 1, 0]], dtype=bool)
    elif kind == 2:  # disc: a 4×4 square without its corners
        m = np.ones((4, 4), dtype=bool)
        m[[0, 0, 3, 3], [0, 3, 0, 3]] = False
    else:  # blob: a random 4-connected walk of 4–9 cells inside a 4×4 box
        m = np.zeros((4, 4), dtype=bool)
        r, c = (int(v) for v in rng.integers(4, size=2))
        m[r, c] = True
        target = int(rng.integers(4, 10))
        while m.sum() < target:
            dr, dc = ((-1, 0), (1, 0), (0, -1), (0, 1))[int(rng.integers(4))]
            r, c = min(max(r + dr, 0), 3), min(max(c + dc, 0), 3)
            m[r, c] = True
        m = m[np.ix_(m.any(axis=1), m.any(axis=0))]
    top = int(rng.integers(GRID - m.shape[0] + 1))
    left = int(rng.integers(GRID - m.shape[1] + 1))
    full = np.zeros((GRID, GRID), dtype=bool)
    full[top : top + m.shape[0], left : left + m.shape[1]] = m
    return full


def _informative(g: Codes) -> bool:
    """Whether one example pair on ``g`` identifies its task: every task changes ``g`` and no two tasks
    give the same output."""
    outs = [TRANSFORMS[t](g).tobytes() for t in TASKS]
    return g.tobytes() not in outs and len(set(outs)) == len(outs)


_MAX_DRAWS = 10_000  # about 3 draws in 4 are informative; only broken transforms reach this


def random_codes(rng: np.random.Generator, *, split: Split = "train") -> Codes:
    """Draw one input image as codes: 1–3 objects in distinct chromatic colours on black, redrawn until
    every task changes it and all eight outputs differ (so an example pair always names its task),
    and until it falls in ``split`` (``"train"``, ``"test"`` = held out, or ``"any"``)."""
    if split not in ("train", "test", "any"):
        raise ValueError(f"split must be 'train', 'test' or 'any', got {split!r}.")
    for _ in range(_MAX_DRAWS):
        n_obj = int(rng.integers(1, 4))
        colors = rng.choice(np.array(CHROMATIC), size=n_obj, replace=False)
        g = np.zeros((GRID, GRID), dtype=np.int64)
        for color in colors:  # later objects are drawn over earlier ones
            g[_shape_mask(rng)] = int(color)
        if not _informative(g):
            continue
        if split == "any" or is_held_out(g) == (split == "test"):
            return g
    raise RuntimeError(
        f"no informative {split} image in {_MAX_DRAWS} draws: a task leaves every image unchanged or two tasks "
        "agree everywhere. Check the transforms in TRANSFORMS."
    )


def random_pair(task: str, rng: np.random.Generator, *, split: Split = "train") -> tuple[Codes, Codes]:
    """One (input, output) pair of ``task`` on a freshly drawn input image."""
    x = random_codes(rng, split=split)
    return x, apply_task(task, x)


def corrupt(codes: object, n: int, rng: np.random.Generator) -> Codes:
    """Replace ``n`` distinct random cells by random *different* palette codes: noisy examples make
    one-shot prompts imperfect, which a mean task vector (an average over many prompts) is not."""
    g = check_codes(codes).copy()
    if not 0 <= n <= g.size:
        raise ValueError(f"n = {n} cells to corrupt, expected 0..{g.size}.")
    cells = rng.choice(g.size, size=n, replace=False)
    shift = rng.integers(1, N_COLORS, size=n)
    flat = g.reshape(-1)
    flat[cells] = (flat[cells] + shift) % N_COLORS
    return g


def stack_codes(grids: Sequence[object]) -> Int[torch.Tensor, "n 6 6"]:
    """Stack code grids into one ``int64`` tensor, validating each."""
    return torch.from_numpy(np.stack([check_codes(g, name=f"grids[{i}]") for i, g in enumerate(grids)]))
