"""The sheet of ``organism-vlm``'s synthetic images, one panel per domain.

Shows what the vision tower sees (Luo et al. 2024, §4 use flags, animal and food photographs; here
flags, 7-segment numbers and letter glyphs drawn by :mod:`tvlens.organisms.vlm.images`): every item
of every domain, canonical rendering, labelled, and one row of held-out renderings.

    python -m tvlens.organisms.vlm.figures [--out figures/vlm_images.png]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import numpy as np

from .images import DOMAINS, IMAGE_SIZE, domain_items, render

__all__ = ["mosaic", "image_sheet"]

_GAP = 4
_COLS = 14


#: vertical room under each tile for its label
_LABEL = 14


def mosaic(images: np.ndarray, cols: int = _COLS, gap: int = _GAP, scale: int = 4, label: int = _LABEL) -> np.ndarray:
    """Tile ``[n, 16, 16, 3]`` images, each scaled ×``scale`` (nearest), on a white background, with
    ``label`` pixels below each row of tiles for text."""
    n = len(images)
    rows = -(-n // cols)
    s = IMAGE_SIZE * scale
    out = np.full((rows * (s + gap + label) + gap, cols * (s + gap) + gap, 3), 255, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        big = np.kron(im, np.ones((scale, scale, 1), dtype=np.uint8))
        y0, x0 = gap + r * (s + gap + label), gap + c * (s + gap)
        out[y0 : y0 + s, x0 : x0 + s] = big
    return out


def image_sheet(path: str | Path = "figures/vlm_images.png", variants: Sequence[int] = (1000001, 1000002)) -> Path:
    """Write the sheet (PNG through :func:`tvlens.plot.save_figure`); returns the PNG path."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    from tvlens.plot import save_figure

    heights = []
    panels = []
    for d in DOMAINS:
        items = domain_items(d)
        imgs = [render(d, x) for x in items]
        # two held-out renderings of the first items show the noise the test images carry
        pad = [np.full((IMAGE_SIZE, IMAGE_SIZE, 3), 255, np.uint8)] * (-len(imgs) % _COLS)
        extra = [render(d, x, v) for v in variants for x in items[: _COLS // 2]]
        m = mosaic(np.stack(imgs + pad + extra))
        panels.append((d, items, m))
        heights.append(m.shape[0])
    fig = make_subplots(rows=len(DOMAINS), cols=1, row_heights=heights, vertical_spacing=0.04,
                        subplot_titles=[f"{d}: {len(items)} items, canonical renderings; last row: two held-out renderings of the first seven" for d, items, _ in panels])
    s = IMAGE_SIZE * 4
    for r, (d, items, m) in enumerate(panels, start=1):
        fig.add_trace(go.Image(z=m), row=r, col=1)
        for i, x in enumerate(items):
            rr, cc = divmod(i, _COLS)
            fig.add_annotation(x=_GAP + cc * (s + _GAP) + s / 2, y=_GAP + rr * (s + _GAP + _LABEL) + s + 1, text=x, showarrow=False,
                               yanchor="top", font={"size": 8}, row=r, col=1)
        fig.update_xaxes(visible=False, row=r, col=1)
        fig.update_yaxes(visible=False, row=r, col=1)
    width = panels[0][2].shape[1]
    fig.update_layout(width=width + 40, height=sum(heights) + 60 * len(DOMAINS) + 40, margin={"l": 20, "r": 20, "t": 40, "b": 10},
                      plot_bgcolor="white", paper_bgcolor="white")
    out = Path(path).with_suffix(".png")
    written = save_figure(fig, out, png=True, html=False, scale=1.5)
    if out not in written:
        raise RuntimeError(f"PNG export failed for {out}: kaleido is needed to write the sheet")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvlens.organisms.vlm.figures")
    ap.add_argument("--out", default="figures/vlm_images.png")
    args = ap.parse_args(argv)
    print(image_sheet(args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
