"""Synthetic 16×16 images of the concepts of three structured domains, for ``organism-vlm``.

Luo, Darrell & Bar 2024 (*Task Vectors are Cross-Modal*, §3, Table 1) pose the same task with a text
query (``france``) or an image query (a photograph of France's flag). No photographs ship with tvlens,
so the image of each concept is drawn in code. Every drawn item is the *input word* of existing
tvlens tasks, so text and image prompts of one task share its answers:

==========  ===================================  ==========================================================
domain      items (task inputs)                  picture
==========  ===================================  ==========================================================
``flag``    69 countries                         a synthetic flag: one of 10 patterns × 3 of 8 colours
``digits``  the numbers 1–70                     red 7-segment digits, the units always in the right half
``glyph``   the 52 letters a–z, A–Z              a 5×7 bitmap font glyph, scaled ×2, black on white
==========  ===================================  ==========================================================

The pictures have structure shared across items and tasks (a pattern, a colour, a segment, a stroke),
so a vision tower learns features rather than one arbitrary sprite per item, and each item has one
picture in every task it belongs to (``france`` is the same flag for capital, currency, language, ...).
The flags are not the real ones: patterns and colours are assigned to countries by a seeded greedy
draw that keeps every two flags different in at least two of (pattern, colour 1, 2, 3).

``variant=0`` is the canonical picture; every other variant is the same picture under seeded
per-channel gain and pixel noise, so a test image is a rendering no training step saw. Everything is
pure numpy and deterministic: the same ``(domain, item, variant)`` gives the same bytes everywhere.
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from typing import Mapping, Sequence

import numpy as np
from jaxtyping import UInt8

__all__ = [
    "IMAGE_SIZE",
    "DOMAINS",
    "DOMAIN_TASKS",
    "domain_items",
    "domain_of_task",
    "render",
    "render_batch",
    "check_image",
]

#: images are IMAGE_SIZE × IMAGE_SIZE × 3 uint8 (height, width, RGB)
IMAGE_SIZE = 16

#: the tasks whose input words each domain draws (every input of these tasks has a picture)
DOMAIN_TASKS: Mapping[str, tuple[str, ...]] = {
    "flag": ("country_capital", "country_currency", "country_continent", "country_language", "country_adjective"),
    "digits": ("successor", "predecessor", "double", "add_ten", "number_to_word"),
    "glyph": ("next_letter", "previous_letter", "swap_case"),
}
DOMAINS: tuple[str, ...] = tuple(DOMAIN_TASKS)

# ----------------------------------------------------------------------------------------------
# palettes

_FLAG_COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (200, 16, 46),
    "white": (245, 245, 245),
    "blue": (0, 56, 168),
    "green": (0, 122, 61),
    "yellow": (252, 209, 22),
    "black": (20, 20, 20),
    "orange": (255, 130, 0),
    "sky": (108, 172, 228),
}
_LED_ON = (255, 48, 32)
_LED_BACK = (16, 16, 24)
_INK = (10, 10, 10)
_PAPER = (240, 240, 232)

# ----------------------------------------------------------------------------------------------
# flags: pattern(c1, c2, c3) -> a 16×16 index map with values 0, 1, 2 (which colour each pixel has)


def _flag_pattern(kind: int) -> np.ndarray:
    n = IMAGE_SIZE
    y, x = np.mgrid[0:n, 0:n]
    m = np.zeros((n, n), dtype=np.int64)
    if kind == 0:  # horizontal tricolour
        m[5:11] = 1
        m[11:] = 2
    elif kind == 1:  # vertical tricolour
        m[:, 5:11] = 1
        m[:, 11:] = 2
    elif kind == 2:  # nordic cross with a thin inner cross
        m[6:10, :] = 1
        m[:, 4:8] = 1
        m[7:9, :] = 2
        m[:, 5:7] = 2
    elif kind == 3:  # bicolour halves with a central disc
        m[8:] = 1
        m[(y - 7.5) ** 2 + (x - 7.5) ** 2 <= 12] = 2
    elif kind == 4:  # diagonal split with a diagonal band
        m[x + y > 15] = 1
        m[np.abs(x + y - 15) <= 1] = 2
    elif kind == 5:  # stripes with a canton
        m[(y // 2) % 2 == 1] = 1
        m[:8, :8] = 2
    elif kind == 6:  # chevron at the hoist over a horizontal bicolour
        m[8:] = 1
        m[x <= 7 - np.abs(y - 7.5)] = 2
    elif kind == 7:  # border, field and a centre square
        m[2:14, 2:14] = 1
        m[6:10, 6:10] = 2
    elif kind == 8:  # saltire with a centre diamond
        m[(np.abs(x - y) <= 1) | (np.abs(x + y - 15) <= 1)] = 1
        m[np.abs(x - 7.5) + np.abs(y - 7.5) <= 2.5] = 2
    elif kind == 9:  # quartered with a central stripe
        m[(x >= 8) ^ (y >= 8)] = 1
        m[7:9, :] = 2
    else:
        raise ValueError(f"flag pattern {kind} does not exist (0–9)")
    return m


_N_PATTERNS = 10


@lru_cache(maxsize=1)
def _flag_table() -> dict[str, tuple[int, int, int, int]]:
    """country -> (pattern, colour1, colour2, colour3): a seeded greedy draw over all combinations,
    keeping every two flags different in at least two of the four attributes (so no two flags are
    one colour swap apart)."""
    n_col = len(_FLAG_COLOURS)
    combos = [
        (p, a, b, c)
        for p in range(_N_PATTERNS)
        for a in range(n_col)
        for b in range(n_col)
        for c in range(n_col)
        if len({a, b, c}) == 3
    ]
    order = np.random.default_rng(20240).permutation(len(combos))
    chosen: list[tuple[int, int, int, int]] = []
    # keyed by the case-folded name, so a flag does not depend on how the task data capitalises it
    items = sorted({x.casefold() for x in domain_items("flag")})
    for i in order:
        combo = combos[i]
        if all(sum(u != v for u, v in zip(combo, other)) >= 2 for other in chosen):
            chosen.append(combo)
            if len(chosen) == len(items):
                break
    return dict(zip(items, chosen))


def _draw_flag(item: str) -> np.ndarray:
    pattern, *cols = _flag_table()[item.casefold()]
    palette = np.array(list(_FLAG_COLOURS.values()), dtype=np.uint8)[cols]
    return palette[_flag_pattern(pattern)]


# ----------------------------------------------------------------------------------------------
# 7-segment digits

#: segments a b c d e f g lit for each digit
_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abdeg", "3": "abcdg", "4": "bcfg",
    "5": "acdfg", "6": "acdefg", "7": "abc", "8": "abcdefg", "9": "abcdfg",
}


#: the (rows, columns) each segment covers in a 14×6 digit: top, upper right, lower right, bottom,
#: lower left, upper left, middle
_SEGMENT_AREA = {"a": np.s_[0:2, :], "b": np.s_[0:7, 4:6], "c": np.s_[7:14, 4:6], "d": np.s_[12:14, :],
                 "e": np.s_[7:14, 0:2], "f": np.s_[0:7, 0:2], "g": np.s_[6:8, :]}


def _digit_mask(d: str) -> np.ndarray:
    """A 14×6 boolean mask of one 7-segment digit with 2-pixel strokes."""
    m = np.zeros((14, 6), dtype=bool)
    for s in _SEGMENTS[d]:
        m[_SEGMENT_AREA[s]] = True
    return m


def _draw_digits(item: str) -> np.ndarray:
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = _LED_BACK
    # right-aligned: the units digit is always in the right half (the right image patches)
    for d, x0 in zip(reversed(item), (9, 1)):
        img[1:15, x0 : x0 + 6][_digit_mask(d)] = _LED_ON
    return img


# ----------------------------------------------------------------------------------------------
# 5×7 glyphs

_FONT: dict[str, tuple[str, ...]] = {
    "A": (".###.", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "B": ("####.", "#...#", "#...#", "####.", "#...#", "#...#", "####."),
    "C": (".###.", "#...#", "#....", "#....", "#....", "#...#", ".###."),
    "D": ("####.", "#...#", "#...#", "#...#", "#...#", "#...#", "####."),
    "E": ("#####", "#....", "#....", "####.", "#....", "#....", "#####"),
    "F": ("#####", "#....", "#....", "####.", "#....", "#....", "#...."),
    "G": (".###.", "#...#", "#....", "#.###", "#...#", "#...#", ".####"),
    "H": ("#...#", "#...#", "#...#", "#####", "#...#", "#...#", "#...#"),
    "I": (".###.", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "J": ("..###", "...#.", "...#.", "...#.", "...#.", "#..#.", ".##.."),
    "K": ("#...#", "#..#.", "#.#..", "##...", "#.#..", "#..#.", "#...#"),
    "L": ("#....", "#....", "#....", "#....", "#....", "#....", "#####"),
    "M": ("#...#", "##.##", "#.#.#", "#.#.#", "#...#", "#...#", "#...#"),
    "N": ("#...#", "#...#", "##..#", "#.#.#", "#..##", "#...#", "#...#"),
    "O": (".###.", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "P": ("####.", "#...#", "#...#", "####.", "#....", "#....", "#...."),
    "Q": (".###.", "#...#", "#...#", "#...#", "#.#.#", "#..#.", ".##.#"),
    "R": ("####.", "#...#", "#...#", "####.", "#.#..", "#..#.", "#...#"),
    "S": (".####", "#....", "#....", ".###.", "....#", "....#", "####."),
    "T": ("#####", "..#..", "..#..", "..#..", "..#..", "..#..", "..#.."),
    "U": ("#...#", "#...#", "#...#", "#...#", "#...#", "#...#", ".###."),
    "V": ("#...#", "#...#", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "W": ("#...#", "#...#", "#...#", "#.#.#", "#.#.#", "#.#.#", ".#.#."),
    "X": ("#...#", "#...#", ".#.#.", "..#..", ".#.#.", "#...#", "#...#"),
    "Y": ("#...#", "#...#", ".#.#.", "..#..", "..#..", "..#..", "..#.."),
    "Z": ("#####", "....#", "...#.", "..#..", ".#...", "#....", "#####"),
    "a": (".....", ".....", ".###.", "....#", ".####", "#...#", ".####"),
    "b": ("#....", "#....", "#.##.", "##..#", "#...#", "#...#", "####."),
    "c": (".....", ".....", ".###.", "#....", "#....", "#...#", ".###."),
    "d": ("....#", "....#", ".##.#", "#..##", "#...#", "#...#", ".####"),
    "e": (".....", ".....", ".###.", "#...#", "#####", "#....", ".###."),
    "f": ("..##.", ".#..#", ".#...", "###..", ".#...", ".#...", ".#..."),
    "g": (".....", ".####", "#...#", "#...#", ".####", "....#", ".###."),
    "h": ("#....", "#....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "i": ("..#..", ".....", ".##..", "..#..", "..#..", "..#..", ".###."),
    "j": ("...#.", ".....", "..##.", "...#.", "...#.", "#..#.", ".##.."),
    "k": ("#....", "#....", "#..#.", "#.#..", "##...", "#.#..", "#..#."),
    "l": (".##..", "..#..", "..#..", "..#..", "..#..", "..#..", ".###."),
    "m": (".....", ".....", "##.#.", "#.#.#", "#.#.#", "#...#", "#...#"),
    "n": (".....", ".....", "#.##.", "##..#", "#...#", "#...#", "#...#"),
    "o": (".....", ".....", ".###.", "#...#", "#...#", "#...#", ".###."),
    "p": (".....", ".....", "####.", "#...#", "####.", "#....", "#...."),
    "q": (".....", ".....", ".##.#", "#..##", ".####", "....#", "....#"),
    "r": (".....", ".....", "#.##.", "##..#", "#....", "#....", "#...."),
    "s": (".....", ".....", ".###.", "#....", ".###.", "....#", "####."),
    "t": (".#...", ".#...", "###..", ".#...", ".#...", ".#..#", "..##."),
    "u": (".....", ".....", "#...#", "#...#", "#...#", "#..##", ".##.#"),
    "v": (".....", ".....", "#...#", "#...#", "#...#", ".#.#.", "..#.."),
    "w": (".....", ".....", "#...#", "#...#", "#.#.#", "#.#.#", ".#.#."),
    "x": (".....", ".....", "#...#", ".#.#.", "..#..", ".#.#.", "#...#"),
    "y": (".....", ".....", "#...#", "#...#", ".####", "....#", ".###."),
    "z": (".....", ".....", "#####", "...#.", "..#..", ".#...", "#####"),
}


def _draw_glyph(item: str) -> np.ndarray:
    rows = np.array([[c == "#" for c in r] for r in _FONT[item]], dtype=bool)
    big = np.kron(rows, np.ones((2, 2), dtype=bool))  # 14×10
    img = np.empty((IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    img[:] = _PAPER
    img[1:15, 3:13][big] = _INK
    return img


_DRAW = {"flag": _draw_flag, "digits": _draw_digits, "glyph": _draw_glyph}

# ----------------------------------------------------------------------------------------------
# public API


@lru_cache(maxsize=None)
def domain_items(domain: str) -> tuple[str, ...]:
    """The sorted items of ``domain``: the union of the inputs of its tasks (all splits).

    Raises:
        ValueError: ``domain`` is not one of :data:`DOMAINS`.
    """
    _check_domain(domain)
    from tvlens.tasks import load_task

    items = {x for name in DOMAIN_TASKS[domain] for x, _ in load_task(name).pairs}
    if domain == "glyph":
        missing = items - set(_FONT)
    elif domain == "digits":
        missing = {x for x in items if not x.isdigit() or len(x) > 2}
    else:
        missing = set()
    if missing:
        raise ValueError(f"domain {domain!r} cannot draw {sorted(missing)}: extend the generator in images.py")
    return tuple(sorted(items))


def domain_of_task(task: str) -> str:
    """The domain whose pictures are the inputs of ``task`` (``"country_capital"`` -> ``"flag"``).

    Raises:
        ValueError: no domain draws this task's inputs.
    """
    for domain, tasks in DOMAIN_TASKS.items():
        if task in tasks:
            return domain
    known = ", ".join(t for ts in DOMAIN_TASKS.values() for t in ts)
    raise ValueError(f"task {task!r} has no image domain; the tasks with pictures are: {known}")


def render(domain: str, item: str, variant: int = 0) -> UInt8[np.ndarray, "16 16 3"]:
    """The picture of ``item`` in ``domain``: a ``16×16×3`` ``uint8`` RGB array (height, width, channel).

    Country names match in any capitalisation; letters are case-sensitive (``a`` and ``A`` are two
    glyphs). ``variant=0`` is the canonical picture; ``variant=v>0`` adds seeded per-channel gain (±10%) and
    pixel noise (σ = 6 grey levels) drawn from ``(domain, item, v)`` only, so held-out prompts can use
    renderings no training step saw (Luo et al. 2024, §4: queries are held-out images).

    Raises:
        ValueError: unknown domain or item, or a negative / non-integer variant.
    """
    _check_domain(domain)
    if not _is_item(domain, item):
        near = [x for x in domain_items(domain) if x.lower().startswith(item[:1].lower())][:8]
        raise ValueError(f"{item!r} is not an item of domain {domain!r}; items starting alike: {near}")
    if isinstance(variant, bool) or not isinstance(variant, (int, np.integer)) or variant < 0:
        raise ValueError(f"variant must be an integer >= 0, got {variant!r}")
    img = _canonical(domain, item)
    if variant == 0:
        return img.copy()
    key = item.casefold() if domain == "flag" else item  # letters keep their case: it is their identity
    seed = zlib.crc32(f"{domain}\0{key}\0{int(variant)}".encode())
    rng = np.random.default_rng(seed)
    gain = rng.uniform(0.9, 1.1, size=3)
    noisy = img.astype(np.float64) * gain + rng.normal(0.0, 6.0, size=img.shape)
    return np.clip(np.rint(noisy), 0, 255).astype(np.uint8)


def render_batch(domain: str, items: Sequence[str], variants: Sequence[int] | int = 0) -> UInt8[np.ndarray, "n 16 16 3"]:
    """``render`` for several items (one variant for all, or one per item), stacked."""
    if isinstance(variants, (int, np.integer)):
        variants = [int(variants)] * len(items)
    if len(variants) != len(items):
        raise ValueError(f"got {len(items)} items but {len(variants)} variants: pass one variant or one per item")
    if not items:
        return np.zeros((0, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8)
    return np.stack([render(domain, x, v) for x, v in zip(items, variants)])


def check_image(image: np.ndarray, what: str = "image") -> UInt8[np.ndarray, "16 16 3"]:
    """Validate one picture: ``16×16×3`` ``uint8`` (height, width, RGB). Returns it unchanged.

    Raises:
        ValueError: wrong dtype, rank, size or channel count, with the shape that was given.
    """
    if not isinstance(image, np.ndarray):
        raise ValueError(f"{what} must be a numpy array of shape (16, 16, 3), got {type(image).__name__}")
    if image.ndim != 3:
        raise ValueError(f"{what} must have shape (height, width, channels) = (16, 16, 3), got shape {image.shape}")
    if image.shape[2] != 3:
        raise ValueError(f"{what} must have 3 colour channels (RGB, channels last), got shape {image.shape}")
    if image.shape[:2] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"{what} must be {IMAGE_SIZE}×{IMAGE_SIZE} pixels, got {image.shape[0]}×{image.shape[1]}")
    if image.dtype != np.uint8:
        raise ValueError(f"{what} must be uint8 in 0–255, got dtype {image.dtype}")
    return image


def _is_item(domain: str, item: str) -> bool:
    if domain == "flag":  # country names in any capitalisation ("France", "france")
        return isinstance(item, str) and item.casefold() in _casefolded("flag")
    return item in domain_items(domain)


@lru_cache(maxsize=None)
def _casefolded(domain: str) -> frozenset[str]:
    return frozenset(x.casefold() for x in domain_items(domain))


@lru_cache(maxsize=None)
def _canonical(domain: str, item: str) -> np.ndarray:
    img = _DRAW[domain](item)
    img.setflags(write=False)
    return img


def _check_domain(domain: str) -> None:
    if domain not in DOMAIN_TASKS:
        raise ValueError(f"unknown image domain {domain!r}; the domains are {', '.join(DOMAINS)}")
