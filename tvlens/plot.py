"""Every tvlens figure: layers x heads, layers x positions, curves, bars; HTML/PNG writing.

One look for the whole toolkit: the ``plotly_white`` template, a sequential ``Viridis`` scale
for non-negative scores and a ``RdBu`` scale centred at 0 for signed effects, layers on the y
axis with **layer 0 at the top** (matrix order, as ``px.imshow`` and TransformerLens figures
draw it), sizes that grow with the number of layers and heads.

This module never runs a model: it takes numbers (torch tensors, numpy arrays or nested lists)
and returns ``plotly.graph_objects.Figure`` objects. ``save_figure`` writes an HTML file that
loads ``plotly.min.js`` from its own folder (one copy per output folder, written beside it: the
pages work offline and stay small) and, when kaleido works, a PNG. :func:`html_page` writes a
page of several figures the same way.

In a Jupyter kernel, importing this module makes plotly's default renderer
``"plotly_mimetype+tvlens"`` (unless ``PLOTLY_RENDERER`` or a renderer of your own is set):
JupyterLab and VS Code draw the plotly mime type; the HTML part embeds plotly.js once per kernel,
without require.js, so classic Notebook and ``jupyter nbconvert --to html`` exports show the
figures offline too.
"""

from __future__ import annotations

import os
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
    "attention_heatmaps",
    "save_figure",
    "html_page",
    "clear_of_toolbar",
    "use_notebook_renderer",
    "figure_div",
    "write_plotlyjs",
    "png_support",
    "to_numpy",
    "PLOTLY_JS",
    "FIGURE_CONFIG",
]

TEMPLATE = "plotly_white"
SEQUENTIAL_SCALE = "Viridis"
DIVERGING_SCALE = "RdBu_r"  # red = positive, blue = negative, white = 0
_FONT = dict(size=12)
#: the file every HTML page of an output folder loads plotly from (written once per folder)
PLOTLY_JS = "plotly.min.js"
#: plotly's config for every figure tvlens writes or shows
FIGURE_CONFIG = {"displaylogo": False}
#: pixels kept free above the title for plotly's toolbar (the "modebar", ~25 px high at the top right)
_MODEBAR_PX = 30

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
        title=_title(title),
        width=width,
        height=height,
        font=_FONT,
        margin=dict(l=70, r=30, t=_top_margin(title), b=60),
    )
    fig.update_xaxes(title_text=xlabel, type="category", showgrid=False)
    # layer / head 0 at the top, like a matrix
    fig.update_yaxes(title_text=ylabel, type="category", autorange="reversed", showgrid=False)
    return fig


def _title(text: str) -> dict:
    """A centred title that starts below plotly's toolbar, so the toolbar never covers its ends."""
    return dict(text=text, x=0.5, xanchor="center", y=1.0, yref="container", yanchor="top", pad=dict(t=_MODEBAR_PX))


def _top_margin(title: str) -> int:
    if not title:
        return _MODEBAR_PX + 10
    return _MODEBAR_PX + 30 + 22 * str(title).count("<br>")


def clear_of_toolbar(fig: go.Figure) -> go.Figure:
    """Move ``fig``'s title below plotly's toolbar (in place) and grow the top margin to fit it.

    For figures built elsewhere (``make_subplots``, a title set after :func:`layer_head_heatmap`
    via ``update_layout(title_text=...)``); tvlens applies it to every figure it writes or shows.
    """
    text = fig.layout.title.text
    if not text:
        return fig
    fig.update_layout(title=dict(y=1.0, yref="container", yanchor="top", pad=dict(t=_MODEBAR_PX)))
    need = _top_margin(text)
    if fig.layout.margin.t is None or fig.layout.margin.t < need:
        fig.update_layout(margin=dict(t=need))
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
        template=TEMPLATE, title=_title(title), xaxis_title=xlabel, yaxis_title=ylabel,
        width=max(640, min(1200, 40 * len(x) + 300)), height=460, font=_FONT,
        legend=dict(orientation="h", yanchor="top", y=-0.2, xanchor="left", x=0),
        margin=dict(l=70, r=30, t=_top_margin(title), b=110),
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
        template=TEMPLATE, title=_title(title), xaxis_title=xlabel, yaxis_title=ylabel,
        barmode="group", width=max(480, min(1300, 60 * len(labs) * max(1, len(series)) + 260)), height=420,
        font=_FONT, showlegend=len(series) > 1, margin=dict(t=_top_margin(title)),
    )
    fig.update_xaxes(type="category")
    return fig


def attention_heatmaps(patterns: Any, tokens: Sequence[str], names: Sequence[str], *, title: str = "",
                       cols: int = 3) -> go.Figure:
    """One query × key heatmap per head (``patterns`` ``[head, query, key]``, rows summing to 1),
    ``cols`` per row; query tokens on y (first at the top), key tokens on x, hover: head, query, key, weight."""
    from plotly.subplots import make_subplots

    arr = to_numpy(patterns)
    if arr.ndim != 3 or arr.shape[1:] != (len(tokens), len(tokens)):
        raise ValueError(f"patterns must be [head, query, key] with query = key = {len(tokens)} tokens, got shape "
                         f"{tuple(arr.shape)}; pass the patterns of one prompt and its tokens")
    if len(names) != arr.shape[0]:
        raise ValueError(f"{len(names)} names for {arr.shape[0]} heads; pass one name per head")
    labels = [f"{i}: {t!r}"[:24] for i, t in enumerate(tokens)]
    n = arr.shape[0]
    cols = max(1, min(int(cols), n))
    rows = (n + cols - 1) // cols
    fig = make_subplots(rows=rows, cols=cols, subplot_titles=list(names), horizontal_spacing=0.08, vertical_spacing=0.12)
    for i in range(n):
        fig.add_trace(go.Heatmap(z=arr[i], x=labels, y=labels, colorscale=SEQUENTIAL_SCALE, zmin=0, zmax=1,
                                 showscale=i == 0, colorbar=dict(title=dict(text="attention", side="right")),
                                 hovertemplate=f"{names[i]}<br>query %{{y}}<br>key %{{x}}<br>weight %{{z:.3f}}<extra></extra>"),
                      row=i // cols + 1, col=i % cols + 1)
    fig.update_yaxes(autorange="reversed", showticklabels=len(tokens) <= 40, tickfont=dict(size=8))
    fig.update_xaxes(showticklabels=len(tokens) <= 40, tickfont=dict(size=8), tickangle=-60)
    side = _cells(len(tokens), 12, 220, 380)
    fig.update_layout(template=TEMPLATE, title=_title(title), font=_FONT, width=min(1320, cols * side + 260),
                      height=rows * (side + 120) + 80, margin=dict(t=_top_margin(title) + 20, l=110, b=110))
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


def write_plotlyjs(folder: str | Path) -> Path:
    """Write plotly.js as ``folder/plotly.min.js`` (once: kept when it is already the same file).

    Every page tvlens writes into ``folder`` loads it with ``<script src="plotly.min.js">``, so the
    pages work offline and only this one file carries the library (~4.6 MB)."""
    from plotly.offline import get_plotlyjs

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / PLOTLY_JS
    data = get_plotlyjs().encode("utf-8")
    if not (path.is_file() and path.stat().st_size == len(data) and path.read_bytes() == data):
        _atomic_write_bytes(path, data)
    return path


def _prepared(fig: go.Figure) -> go.Figure:
    return clear_of_toolbar(go.Figure(fig))


def figure_div(fig: go.Figure) -> str:
    """``fig`` as an HTML ``<div>`` (no plotly.js: the page loads it once, see :func:`html_page`)."""
    import plotly.io as pio

    return pio.to_html(_prepared(fig), full_html=False, include_plotlyjs=False, config=FIGURE_CONFIG)


_PAGE_CSS = (
    "body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:24px;color:#222}"
    "table{border-collapse:collapse;margin:8px 0}td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
    "th{background:#f3f3f3}p{max-width:1100px;line-height:1.45}"
)


def html_page(path: str | Path, body: str | Sequence[str], *, title: str, css: str | None = None) -> Path:
    """Write an HTML page whose figures (:func:`figure_div`) load ``plotly.min.js`` from the page's folder.

    ``body`` is HTML (a string or a list of parts joined by newlines); ``css`` replaces the default
    style. plotly.js is written beside the page by :func:`write_plotlyjs`. Returns the page's path
    (``.html`` is added when ``path`` has no HTML suffix)."""
    import html as _html

    from .results import atomic_write_text

    out = Path(path)
    if out.suffix.lower() not in (".html", ".htm"):
        out = out.with_name(out.name + ".html")
    write_plotlyjs(out.parent)
    parts = body if isinstance(body, str) else "\n".join(body)
    text = "\n".join([
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{_html.escape(title)}</title>",
        f"<style>{_PAGE_CSS if css is None else css}</style>",
        f"<script charset='utf-8' src='{PLOTLY_JS}'></script>",
        "</head><body>",
        parts,
        "</body></html>",
    ])
    atomic_write_text(out, text)
    return out


def png_support() -> tuple[bool, str]:
    """Whether PNG export can work here, and what to install when it cannot.

    plotly 5 exports through kaleido 0.2.1 (which bundles its own Chromium); plotly >= 6 needs
    kaleido >= 1, which drives a Chrome or Chromium installed on the system."""
    from importlib.metadata import PackageNotFoundError, version

    def major(name: str) -> int | None:
        try:
            return int(version(name).split(".")[0])
        except (PackageNotFoundError, ValueError):
            return None

    plotly_major, kaleido_major = major("plotly") or 0, major("kaleido")
    if plotly_major < 6:
        if kaleido_major is None:
            return False, 'kaleido is not installed; with plotly 5 install it with pip install "kaleido==0.2.1"'
        if kaleido_major >= 1:
            return False, ('kaleido >= 1 needs plotly >= 6; pip install "kaleido==0.2.1" (bundles its own Chromium) '
                           'or pip install "plotly>=6" (then kaleido uses a system Chrome)')
        return True, ""
    if kaleido_major is None or kaleido_major < 1:
        return False, (f"plotly {plotly_major} exports PNGs with kaleido >= 1 and a Chrome or Chromium on the system; "
                       'pip install "kaleido>=1", then apt-get install chromium (or run plotly_get_chrome)')
    return True, ""


def _png_bytes(fig: go.Figure, scale: float) -> bytes:
    ok, why = png_support()
    if not ok:
        raise RuntimeError(why)
    try:
        return fig.to_image(format="png", scale=scale)
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}".strip()
        if "chrome" in text.lower():
            text += " (kaleido >= 1 needs a Chrome or Chromium: apt-get install chromium, or run plotly_get_chrome)"
        raise RuntimeError(text) from exc


def save_figure(fig: go.Figure, path: str | Path, *, png: bool = True, html: bool = True, scale: float = 2.0) -> list[Path]:
    """Write ``fig`` as HTML and, if ``png``, as PNG; returns the paths written.

    The HTML loads ``plotly.min.js`` from its own folder, written there once by
    :func:`write_plotlyjs`: offline, and a folder of figures carries one copy of plotly.js (keep the
    two files together when you move a page). ``path`` may end in ``.html``/``.png`` or have no
    extension; both files share its stem. Parent directories are created. PNG export uses kaleido
    (:func:`png_support` says what it needs); if it is missing or fails, one warning saying what
    to install is issued per session and the HTML is still written.
    """
    global _png_warned
    if not isinstance(fig, go.Figure):
        raise ValueError(f"save_figure expects a plotly Figure, got {type(fig).__name__}; call .plot() first")
    html_path, png_path = _target_paths(path)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if html:
        write_plotlyjs(html_path.parent)
        text = _prepared(fig).to_html(include_plotlyjs="directory", full_html=True, config=FIGURE_CONFIG)
        _atomic_write_bytes(html_path, text.encode("utf-8"))
        written.append(html_path)
    if png:
        try:
            data = _png_bytes(fig, scale)
        except Exception as exc:  # kaleido missing / broken: keep the HTML
            if not _png_warned:
                warnings.warn(f"PNG export failed ({exc}); wrote HTML only", RuntimeWarning, stacklevel=2)
                _png_warned = True
        else:
            _atomic_write_bytes(png_path, data)
            written.append(png_path)
    return written


# ----------------------------------------------------------------------------------------------
# notebooks


def _renderer_base() -> type:
    from plotly.io._base_renderers import MimetypeRenderer

    return MimetypeRenderer


class _OfflineNotebookRenderer(_renderer_base()):
    """plotly renderer for notebooks: ``text/html`` that embeds plotly.js once per kernel, with
    require.js (classic Notebook) set aside while it loads, so the figure also shows in
    ``jupyter nbconvert --to html`` exports and offline; combined with ``plotly_mimetype`` (drawn by
    JupyterLab and VS Code)."""

    def __init__(self) -> None:
        # shared by the copies plotly makes of a renderer for each figure: plotly.js goes out once per kernel
        self._state = {"sent": False}

    def activate(self) -> None:  # called by plotly when the renderer becomes the default
        pass

    def script(self) -> str:
        from plotly.offline import get_plotlyjs

        return ("<script type='text/javascript'>window.PlotlyConfig = {MathJaxConfig: 'local'};"
                "window.__tvlens_define = window.define; window.define = undefined;</script>\n"
                f"<script type='text/javascript'>{get_plotlyjs()}</script>\n"
                "<script type='text/javascript'>window.define = window.__tvlens_define;</script>\n")

    def to_mimebundle(self, fig_dict: dict) -> dict:
        import plotly.io as pio

        fig = _prepared(go.Figure(fig_dict))
        div = pio.to_html(fig, include_plotlyjs=False, full_html=False, config=FIGURE_CONFIG,
                          default_width="100%", default_height=525, validate=False)
        head = "" if self._state["sent"] else self.script()
        self._state["sent"] = True
        return {"text/html": head + div}


NOTEBOOK_RENDERER = "plotly_mimetype+tvlens"


def use_notebook_renderer() -> None:
    """Make ``plotly_mimetype+tvlens`` plotly's default renderer (see the module docstring)."""
    import plotly.io as pio

    if "tvlens" not in pio.renderers:
        pio.renderers["tvlens"] = _OfflineNotebookRenderer()
    pio.renderers.default = NOTEBOOK_RENDERER


def _in_kernel() -> bool:
    import sys

    ipython = sys.modules.get("IPython")
    try:
        shell = ipython.get_ipython() if ipython is not None else None
    except Exception:  # pragma: no cover - an IPython too old or half-imported
        return False
    return shell is not None and "IPKernelApp" in getattr(shell, "config", {})


def _auto_renderer() -> None:
    """In a Jupyter kernel, replace plotly's own notebook default (whose HTML needs require.js)."""
    if os.environ.get("PLOTLY_RENDERER") or not _in_kernel():
        return
    import plotly.io as pio

    if pio.renderers.default in ("plotly_mimetype+notebook", "vscode", "notebook", "notebook_connected",
                                 "plotly_mimetype+notebook_connected"):
        use_notebook_renderer()


_auto_renderer()
