"""Every tvlens figure: layers x heads, layers x positions, curves, bars; HTML/PNG writing.

One look for the whole toolkit: the ``plotly_white`` template, a sequential ``Viridis`` scale
for non-negative scores and a ``RdBu`` scale centred at 0 for signed effects, layers on the y
axis with **layer 0 at the top** (matrix order, as ``px.imshow`` and TransformerLens figures
draw it), sizes that grow with the number of layers and heads.

This module never runs a model: it takes numbers (torch tensors, numpy arrays or nested lists)
and returns ``plotly.graph_objects.Figure`` objects. ``save_figure`` writes a standalone HTML
file (plotly.js embedded, no network needed) and, when kaleido works, a PNG.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import plotly.graph_objects as go

__all__ = [
    "TEMPLATE",
    "layer_head_heatmap",
    "layer_position_heatmap",
    "line_plot",
    "bar_plot",
    "save_figure",
    "to_numpy",
]

TEMPLATE = "plotly_white"
SEQUENTIAL_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"  # red = positive, blue = negative, white = 0
_FONT = dict(size=12)

_png_warned = False


def to_numpy(values: Any) -> np.ndarray:
    """Convert a torch tensor / numpy array / nested list to a float64 numpy array (CPU, detached)."""
    if hasattr(values, "detach"):  # torch.Tensor without importing torch here
        values = values.detach().to("cpu").double().numpy()
    return np.asarray(values, dtype=np.float64)


def _check_2d(arr: np.ndarray, what: str) -> None:
    if arr.ndim != 2:
        raise ValueError(
            f"{what} expects a 2-D array [{what.split('_')[0]}, ...], got shape {tuple(arr.shape)}; "
            "select one task / average over the extra axes first"
        )
    if arr.size == 0:
        raise ValueError(f"{what} got an empty array of shape {tuple(arr.shape)}; pass at least one value")


def _colour_range(arr: np.ndarray, diverging: bool, zmin: float | None, zmax: float | None):
    finite = arr[np.isfinite(arr)]
    if diverging:
        if zmin is None and zmax is None:
            m = float(np.max(np.abs(finite))) if finite.size else 1.0
            m = m if m > 0 else 1.0
            return -m, m, 0.0
        return zmin, zmax, 0.0
    return zmin, zmax, None


def _heatmap(
    arr: np.ndarray,
    *,
    x: list,
    y: list,
    xlabel: str,
    ylabel: str,
    hover: str,
    customdata: np.ndarray,
    title: str,
    zlabel: str,
    diverging: bool,
    text: Any,
    zmin: float | None,
    zmax: float | None,
    width: int,
    height: int,
) -> go.Figure:
    zmin_, zmax_, zmid = _colour_range(arr, diverging, zmin, zmax)
    z = np.where(np.isfinite(arr), arr, np.nan)  # plotly/JSON cannot carry inf: show it as a gap
    trace_kw: dict[str, Any] = dict(
        z=z,
        x=x,
        y=y,
        colorscale=DIVERGING_SCALE if diverging else SEQUENTIAL_SCALE,
        colorbar=dict(title=dict(text=zlabel, side="right")),
        customdata=customdata,
        hovertemplate=hover + "<extra></extra>",
        xgap=1,
        ygap=1,
    )
    if zmin_ is not None:
        trace_kw["zmin"] = zmin_
    if zmax_ is not None:
        trace_kw["zmax"] = zmax_
    if zmid is not None and zmin is None and zmax is None:
        trace_kw["zmid"] = zmid
    if text is not None:
        t = np.asarray(text)
        if t.shape != arr.shape:
            raise ValueError(f"text has shape {t.shape} but values have shape {arr.shape}; pass one label per cell")
        trace_kw["text"] = t.astype(str)
        trace_kw["texttemplate"] = "%{text}"
    fig = go.Figure(go.Heatmap(**trace_kw))
    fig.update_layout(
        template=TEMPLATE,
        title=dict(text=title, x=0.5, xanchor="center"),
        width=width,
        height=height,
        font=_FONT,
        margin=dict(l=70, r=30, t=60 if title else 30, b=60),
    )
    fig.update_xaxes(title_text=xlabel, type="category", showgrid=False)
    # layer / head 0 at the top, like a matrix
    fig.update_yaxes(title_text=ylabel, type="category", autorange="reversed", showgrid=False)
    return fig


def _cells(n: int, per: int, lo: int, hi: int) -> int:
    return int(min(hi, max(lo, n * per)))


def layer_head_heatmap(
    values: Any,
    *,
    title: str = "",
    zlabel: str = "value",
    diverging: bool = False,
    transpose: bool = False,
    text: Any = None,
    zmin: float | None = None,
    zmax: float | None = None,
    layers: Sequence[int] | None = None,
) -> go.Figure:
    """Heatmap of a ``[layer, head]`` array: layers on y (layer 0 at the top), heads on x.

    ``diverging=True`` uses a red/blue scale centred at 0 (for signed effects);
    ``transpose=True`` draws heads on y and layers ("blocks") on x, the orientation of
    Hojel et al. 2024, Fig. 2. Hover shows ``layer %d, head %d, value %.4g``; non-finite values
    are drawn as gaps. ``text`` (same shape) is written into the cells. ``layers`` gives the
    layer ids of the rows when ``values`` covers a subset of the layers (default ``0..n-1``).
    """
    arr = to_numpy(values)
    _check_2d(arr, "layer_head_heatmap")
    n_layers, n_heads = arr.shape
    layer_ids = np.arange(n_layers) if layers is None else np.asarray(list(layers), dtype=np.int64)
    if layer_ids.shape != (n_layers,):
        raise ValueError(f"layers has {layer_ids.size} ids but values have {n_layers} rows; pass one layer id per row")
    # customdata[..., 0] = layer, [..., 1] = head, in the orientation drawn
    L, H = np.meshgrid(layer_ids, np.arange(n_heads), indexing="ij")
    custom = np.stack([L, H], axis=-1)
    hover = "layer %{customdata[0]}, head %{customdata[1]}, value %{z:.4g}"
    txt = None if text is None else np.asarray(text)
    if txt is not None and txt.shape != arr.shape:
        raise ValueError(f"text has shape {txt.shape} but values have shape {arr.shape}; pass one label per cell")
    if transpose:
        arr, custom = arr.T, custom.transpose(1, 0, 2)
        txt = None if txt is None else txt.T
        x, y, xlabel, ylabel = layer_ids.tolist(), list(range(n_heads)), "layer (block)", "head"
        nx, ny = n_layers, n_heads
    else:
        x, y, xlabel, ylabel = list(range(n_heads)), layer_ids.tolist(), "head", "layer"
        nx, ny = n_heads, n_layers
    width = _cells(nx, 34, 460, 1400) + 190
    height = _cells(ny, 26, 220, 1200) + 130
    return _heatmap(
        arr, x=x, y=y, xlabel=xlabel, ylabel=ylabel, hover=hover, customdata=custom, title=title,
        zlabel=zlabel, diverging=diverging, text=txt, zmin=zmin, zmax=zmax, width=width, height=height,
    )


def layer_position_heatmap(
    values: Any,
    pos_labels: Sequence[str] | None = None,
    *,
    title: str = "",
    zlabel: str = "value",
    diverging: bool = False,
    text: Any = None,
    zmin: float | None = None,
    zmax: float | None = None,
    xlabel: str = "position",
) -> go.Figure:
    """Heatmap of a ``[layer, pos]`` array: layers on y (layer 0 at the top), positions on x.

    ``pos_labels`` names the positions (e.g. the tokens of one prompt, or token classes); when
    labels repeat, each is prefixed with its index so repeated tokens keep their own column.
    Hover shows ``layer %d, pos <label>, value %.4g``.
    """
    arr = to_numpy(values)
    _check_2d(arr, "layer_position_heatmap")
    n_layers, n_pos = arr.shape
    if pos_labels is None:
        labels = [str(p) for p in range(n_pos)]
    else:
        if len(pos_labels) != n_pos:
            raise ValueError(
                f"pos_labels has {len(pos_labels)} labels but values have {n_pos} positions; pass one label per position"
            )
        labels = [str(lab) for lab in pos_labels]
        if len(set(labels)) != len(labels):  # a category axis would merge repeated labels
            labels = [f"{i}: {lab}" for i, lab in enumerate(labels)]
    L, P = np.meshgrid(np.arange(n_layers), np.arange(n_pos), indexing="ij")
    lab_arr = np.asarray(labels, dtype=object)[P]
    custom = np.stack([L.astype(object), lab_arr], axis=-1)
    hover = "layer %{customdata[0]}, pos %{customdata[1]}, value %{z:.4g}"
    width = _cells(n_pos, 30, 360, 1600) + 190
    height = _cells(n_layers, 26, 220, 1200) + 160
    return _heatmap(
        arr, x=labels, y=list(range(n_layers)), xlabel=xlabel, ylabel="layer", hover=hover, customdata=custom,
        title=title, zlabel=zlabel, diverging=diverging, text=text, zmin=zmin, zmax=zmax, width=width, height=height,
    )


def _series_items(series: Mapping[str, Any]) -> list[tuple[str, np.ndarray]]:
    if not isinstance(series, Mapping) or not series:
        raise ValueError("series must be a non-empty dict {name: ys}; e.g. {'accuracy': [0.1, 0.5]}")
    return [(str(k), to_numpy(v).reshape(-1)) for k, v in series.items()]


def line_plot(
    xs: Any,
    series: Mapping[str, Any],
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    hlines: Mapping[str, float] | None = None,
    errors: Mapping[str, Any] | None = None,
) -> go.Figure:
    """One line per entry of ``series`` ({name: ys}) over ``xs``; ``hlines`` ({name: y}) draws
    dashed horizontal reference lines (e.g. zero-shot and ICL accuracy); ``errors`` ({name: err})
    adds symmetric error bars to the named series."""
    x = to_numpy(xs).reshape(-1) if not _is_labels(xs) else list(xs)
    items = _series_items(series)
    fig = go.Figure()
    for name, ys in items:
        if len(ys) != len(x):
            raise ValueError(f"series {name!r} has {len(ys)} values but xs has {len(x)}; pass one y per x")
        kw: dict[str, Any] = {}
        if errors and name in errors:
            kw["error_y"] = dict(type="data", array=to_numpy(errors[name]).reshape(-1), visible=True)
        fig.add_trace(
            go.Scatter(x=x, y=ys, mode="lines+markers", name=name,
                       hovertemplate=f"{name}<br>{xlabel or 'x'} %{{x}}, {ylabel or 'y'} %{{y:.4g}}<extra></extra>", **kw)
        )
    _add_hlines(fig, hlines)
    if not _is_labels(xs) and len(x) and np.all(np.mod(x, 1) == 0) and len(x) <= 40:
        fig.update_xaxes(tickmode="array", tickvals=list(x))  # integer xs (layers, shots): no 0.5 ticks
    fig.update_layout(
        template=TEMPLATE, title=dict(text=title, x=0.5, xanchor="center"), xaxis_title=xlabel, yaxis_title=ylabel,
        width=max(640, min(1200, 40 * len(x) + 300)), height=460, font=_FONT,
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
        margin=dict(l=70, r=30, t=80 if title else 30, b=110),
    )
    return fig


_GREYS = ["#555555", "#999999", "#222222", "#bbbbbb"]
_HLINE_LABELS = ["top left", "bottom right", "top right", "bottom left"]


def _add_hlines(fig: go.Figure, hlines: Mapping[str, float] | None) -> None:
    """Dashed reference lines ({name: y}); the labels' corners alternate so that lines at nearly the
    same y (two models' ICL accuracy, say) stay readable."""
    for i, (name, y) in enumerate((hlines or {}).items()):
        fig.add_hline(y=float(y), line_dash="dash", line_color=_GREYS[i % len(_GREYS)],
                      annotation_text=str(name), annotation_position=_HLINE_LABELS[i % len(_HLINE_LABELS)])


def _is_labels(xs: Any) -> bool:
    return isinstance(xs, Sequence) and not isinstance(xs, str) and len(xs) > 0 and isinstance(xs[0], str)


def bar_plot(
    labels: Sequence[Any],
    series: Mapping[str, Any] | Any,
    *,
    title: str = "",
    xlabel: str = "",
    ylabel: str = "",
    errors: Mapping[str, Any] | None = None,
    hlines: Mapping[str, float] | None = None,
) -> go.Figure:
    """Grouped bar chart: one bar group per label, one bar per entry of ``series`` ({name: ys});
    a bare array is treated as one unnamed series. ``errors`` adds error bars; ``hlines`` reference lines."""
    if not isinstance(series, Mapping):
        series = {ylabel or "value": series}
    labs = [str(lab) for lab in labels]
    fig = go.Figure()
    for name, ys in _series_items(series):
        if len(ys) != len(labs):
            raise ValueError(f"series {name!r} has {len(ys)} values but there are {len(labs)} labels")
        kw: dict[str, Any] = {}
        if errors and name in errors:
            kw["error_y"] = dict(type="data", array=to_numpy(errors[name]).reshape(-1), visible=True)
        fig.add_trace(go.Bar(x=labs, y=ys, name=name,
                             hovertemplate=f"{name}<br>%{{x}}: %{{y:.4g}}<extra></extra>", **kw))
    _add_hlines(fig, hlines)
    fig.update_layout(
        template=TEMPLATE, title=dict(text=title, x=0.5, xanchor="center"), xaxis_title=xlabel, yaxis_title=ylabel,
        barmode="group", width=max(480, min(1400, 60 * len(labs) * max(1, len(series)) + 260)), height=420,
        font=_FONT, showlegend=len(series) > 1,
    )
    fig.update_xaxes(type="category")
    return fig


def _target_paths(path: str | Path) -> tuple[Path, Path]:
    p = Path(path)
    if p.suffix.lower() in (".html", ".htm", ".png"):
        base = p.with_suffix("")
    else:
        base = p
    return base.with_name(base.name + ".html"), base.with_name(base.name + ".png")


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    from .results import atomic_write_bytes

    atomic_write_bytes(path, data)


def save_figure(fig: go.Figure, path: str | Path, *, png: bool = True, html: bool = True, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as standalone HTML (plotly.js embedded, works offline) and, if ``png``, as PNG.

    ``path`` may end in ``.html``/``.png`` or have no extension; both files share its stem.
    Parent directories are created. PNG export uses kaleido; if it is missing or fails, one
    warning is issued per session and the HTML is still written. Returns the paths written.
    """
    global _png_warned
    if not isinstance(fig, go.Figure):
        raise ValueError(f"save_figure expects a plotly Figure, got {type(fig).__name__}; call .plot() first")
    html_path, png_path = _target_paths(path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if html:
        text = fig.to_html(include_plotlyjs=True, full_html=True)
        _atomic_write_bytes(html_path, text.encode("utf-8"))
        written.append(html_path)
    if png:
        try:
            data = fig.to_image(format="png", scale=scale)
        except Exception as exc:  # kaleido missing / broken: keep the HTML
            if not _png_warned:
                warnings.warn(
                    f"PNG export failed ({type(exc).__name__}: {exc}); wrote HTML only. "
                    'Install kaleido==0.2.1 with plotly<6 (pip install "kaleido==0.2.1") to get PNGs.',
                    RuntimeWarning,
                    stacklevel=2,
                )
                _png_warned = True
        else:
            _atomic_write_bytes(png_path, data)
            written.append(png_path)
    return written
