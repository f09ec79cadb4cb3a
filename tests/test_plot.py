"""tvlens.plot: the shared figures look alike, carry the right hover data, and save offline."""

from __future__ import annotations

import warnings

import numpy as np
import plotly.graph_objects as go
import pytest
import torch

from tvlens import plot
from tvlens.plot import bar_plot, layer_head_heatmap, layer_position_heatmap, line_plot, save_figure


def _cell(fig, layer, head):
    """(z, customdata) of the drawn cell showing (layer, head), whatever the orientation."""
    tr = fig.data[0]
    z, cd = np.asarray(tr.z, dtype=float), np.asarray(tr.customdata)
    hits = [(i, j) for i in range(z.shape[0]) for j in range(z.shape[1]) if int(cd[i, j, 0]) == layer and int(cd[i, j, 1]) == head]
    assert len(hits) == 1
    i, j = hits[0]
    return z[i, j], tr.x[j], tr.y[i]


def test_heatmap_hover_has_layer_head_value():
    vals = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    fig = layer_head_heatmap(vals, title="rho", zlabel="score")
    tr = fig.data[0]
    assert isinstance(tr, go.Heatmap)
    assert "layer %{customdata[0]}" in tr.hovertemplate and "head %{customdata[1]}" in tr.hovertemplate
    assert "%{z:.4g}" in tr.hovertemplate
    z, x, y = _cell(fig, 2, 1)
    assert z == 9.0 and (x, y) == (1, 2)  # heads on x, layers on y
    assert fig.layout.yaxis.autorange == "reversed"  # layer 0 at the top
    assert tr.colorbar.title.text == "score" and fig.layout.title.text == "rho"
    # the toolkit's own look: plotly_white's white plot background (the default template's is #E5ECF6)
    import plotly.io as pio

    assert fig.layout.template.layout.plot_bgcolor == pio.templates[plot.TEMPLATE].layout.plot_bgcolor == "white"


def test_heatmap_transpose_keeps_hover_identity():
    vals = np.random.default_rng(0).normal(size=(3, 5))
    fig = layer_head_heatmap(vals, transpose=True)
    assert np.asarray(fig.data[0].z).shape == (5, 3)
    z, x, y = _cell(fig, 2, 4)
    assert z == pytest.approx(vals[2, 4]) and (x, y) == (2, 4)  # layers (blocks) on x, heads on y
    assert fig.layout.xaxis.title.text.startswith("layer")


def test_heatmap_diverging_is_centred_and_sizes_scale():
    vals = np.array([[-1.0, 3.0], [0.5, 0.0]])
    fig = layer_head_heatmap(vals, diverging=True)
    assert fig.data[0].zmin == -3.0 and fig.data[0].zmax == 3.0
    big = layer_head_heatmap(np.zeros((24, 16)))
    small = layer_head_heatmap(np.zeros((2, 4)))
    assert big.layout.height > small.layout.height and big.layout.width > small.layout.width


def test_heatmap_layers_text_and_nonfinite():
    vals = np.array([[1.0, np.inf], [np.nan, 2.0]])
    fig = layer_head_heatmap(vals, layers=[5, 7], text=[["a", "b"], ["c", "d"]])
    z = np.asarray(fig.data[0].z, dtype=float)
    assert np.isnan(z[0, 1]) and list(fig.data[0].y) == [5, 7]
    assert list(np.asarray(fig.data[0].text).ravel()) == ["a", "b", "c", "d"]
    with pytest.raises(ValueError, match="2-D"):
        layer_head_heatmap(np.zeros(3))
    with pytest.raises(ValueError, match="text"):
        layer_head_heatmap(np.zeros((2, 2)), text=[["a"]])


def test_layer_position_heatmap_labels():
    fig = layer_position_heatmap(np.ones((2, 3)), ["<bos>", "→", "→"])
    assert list(fig.data[0].x) == ["0: <bos>", "1: →", "2: →"]  # repeated tokens keep their column
    assert "pos %{customdata[1]}" in fig.data[0].hovertemplate
    assert list(layer_position_heatmap(np.ones((1, 2)), ["-2", "-1"]).data[0].x) == ["-2", "-1"]
    with pytest.raises(ValueError, match="one label per position"):
        layer_position_heatmap(np.ones((2, 3)), ["a"])


def test_line_and_bar_plots():
    fig = line_plot([0, 1, 2], {"top-k": [0.1, 0.5, 0.9], "random": np.array([0.1, 0.2, 0.2])},
                    title="t", xlabel="k", ylabel="acc", hlines={"ICL": 0.8})
    assert [tr.name for tr in fig.data] == ["top-k", "random"]
    assert any(s.y0 == 0.8 for s in fig.layout.shapes)
    with pytest.raises(ValueError, match="one y per x"):
        line_plot([0, 1], {"a": [1, 2, 3]})
    b = bar_plot(["a", "b"], {"x": [1, 2], "y": [2, 1]})
    assert len(b.data) == 2 and b.layout.barmode == "group"


def test_line_plot_keeps_close_reference_labels_apart_and_ticks_integer_xs():
    fig = line_plot([0, 1, 2, 3], {"a": [0, 1, 0, 1]}, hlines={"ICL A": 0.99, "ICL B": 1.0, "zero-shot": 0.3})
    labels = [(a.text, a.x, a.y, a.xanchor, a.yanchor) for a in fig.layout.annotations]
    assert len({pos[1:] for pos in labels}) == 3, labels  # no two labels share a corner
    assert list(fig.layout.xaxis.tickvals) == [0, 1, 2, 3]
    assert line_plot([0.5, 1.5], {"a": [1, 2]}).layout.xaxis.tickvals is None  # non-integer xs: plotly's ticks


def test_save_figure_writes_html_and_png(tmp_path):
    fig = layer_head_heatmap(np.eye(3))
    paths = save_figure(fig, tmp_path / "deep" / "dir" / "fig.html")
    html = tmp_path / "deep" / "dir" / "fig.html"
    assert html in paths
    text = html.read_text()
    assert "<script" in text and 'src="https://cdn.plot.ly' not in text and len(text) > 1_000_000  # plotly.js embedded
    png = tmp_path / "deep" / "dir" / "fig.png"
    try:
        import kaleido  # noqa: F401
    except ImportError:
        pytest.skip("kaleido not installed: PNG export is optional")
    assert png in paths and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_save_figure_png_failure_warns_once_and_keeps_html(tmp_path, monkeypatch):
    def broken(self, *a, **k):
        raise RuntimeError("no chrome")

    monkeypatch.setattr(go.Figure, "to_image", broken)
    monkeypatch.setattr(plot, "_png_warned", False)
    fig = layer_head_heatmap(np.eye(2))
    with pytest.warns(RuntimeWarning, match="PNG export failed"):
        paths = save_figure(fig, tmp_path / "a")
    assert paths == [tmp_path / "a.html"] and (tmp_path / "a.html").exists()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert save_figure(fig, tmp_path / "b") == [tmp_path / "b.html"]  # second failure: silent
