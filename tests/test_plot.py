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
    # offline and small: plotly.js is one file beside the page, loaded by a relative src
    assert 'src="plotly.min.js"' in text and "cdn.plot.ly" not in text and len(text) < 100_000
    from plotly.offline import get_plotlyjs

    js = html.parent / plot.PLOTLY_JS
    assert js.read_text(encoding="utf-8") == get_plotlyjs()
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


def test_one_plotly_js_per_folder(tmp_path):
    fig = line_plot([0, 1], {"a": [0, 1]}, title="t")
    save_figure(fig, tmp_path / "a", png=False)
    js = tmp_path / plot.PLOTLY_JS
    stamp = js.stat().st_mtime_ns
    save_figure(fig, tmp_path / "b", png=False)
    page = plot.html_page(tmp_path / "page", [plot.figure_div(fig), "<p>x</p>"], title="page")
    assert js.stat().st_mtime_ns == stamp  # written once, not again for every page
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.html", "b.html", "page.html", plot.PLOTLY_JS]
    text = page.read_text()
    assert text.count("<script charset='utf-8' src='plotly.min.js'>") == 1 and "Plotly.newPlot" in text
    assert len(text) < 100_000
    js.write_text("stale")  # another plotly version wrote it: replaced
    save_figure(fig, tmp_path / "c", png=False)
    assert js.stat().st_size > 1_000_000


def test_titles_start_below_the_toolbar():
    for fig in (layer_head_heatmap(np.eye(2), title="a long title<br><sup>sub</sup>"),
                line_plot([0, 1], {"a": [0, 1]}, title="t"), bar_plot(["a"], {"x": [1]}, title="t")):
        t = fig.layout.title
        assert t.yref == "container" and t.yanchor == "top" and t.pad.t >= 25, fig.layout.title
        assert fig.layout.margin.t >= t.pad.t + 20
    import plotly.graph_objects as go

    other = go.Figure(layout=dict(title_text="set elsewhere", margin=dict(t=20)))
    plot.clear_of_toolbar(other)
    assert other.layout.title.pad.t >= 25 and other.layout.margin.t > 20


def test_png_support_says_what_to_install(monkeypatch):
    import importlib.metadata as md

    def versions(**v):
        def version(name):
            if v.get(name) is None:
                raise md.PackageNotFoundError(name)
            return v[name]
        return version

    monkeypatch.setattr(md, "version", versions(plotly="5.24.1", kaleido="0.2.1"))
    assert plot.png_support() == (True, "")
    monkeypatch.setattr(md, "version", versions(plotly="5.24.1", kaleido=None))
    ok, why = plot.png_support()
    assert not ok and "kaleido==0.2.1" in why
    monkeypatch.setattr(md, "version", versions(plotly="6.3.0", kaleido="0.2.1"))
    ok, why = plot.png_support()
    assert not ok and "kaleido>=1" in why and "chrom" in why.lower()
    monkeypatch.setattr(md, "version", versions(plotly="7.1.0", kaleido="1.5.0"))
    assert plot.png_support() == (True, "")
    monkeypatch.setattr(md, "version", versions(plotly="5.24.1", kaleido="1.5.0"))
    ok, why = plot.png_support()
    assert not ok and "plotly>=6" in why


def test_png_export_failure_names_the_fix(tmp_path, monkeypatch):
    monkeypatch.setattr(plot, "png_support", lambda: (False, 'pip install "kaleido==0.2.1"'))
    monkeypatch.setattr(plot, "_png_warned", False)
    with pytest.warns(RuntimeWarning, match="kaleido==0.2.1"):
        assert save_figure(layer_head_heatmap(np.eye(2)), tmp_path / "x") == [tmp_path / "x.html"]


def test_notebook_renderer_embeds_plotly_js_once_without_require():
    from plotly.offline import get_plotlyjs

    import copy

    r = plot._OfflineNotebookRenderer()
    fig = line_plot([0, 1], {"a": [0, 1]}, title="t")
    # plotly renders each figure with a copy of the renderer: the "sent" state must be shared by the copies
    first, second = (copy.copy(r).to_mimebundle(fig.to_dict())["text/html"] for _ in range(2))
    js = get_plotlyjs()
    assert first.count(js) == 1 and js not in second
    assert "Plotly.newPlot" in first and "Plotly.newPlot" in second
    assert "require" not in second and "cdn.plot.ly" not in second
    assert "window.define = undefined" in first  # an AMD loader (classic Notebook) must not swallow plotly.js
    import plotly.io as pio

    saved = pio.renderers.default
    try:
        plot.use_notebook_renderer()
        assert pio.renderers.default == plot.NOTEBOOK_RENDERER
        pio.renderers["tvlens"]._state["sent"] = False  # as in a new kernel
        bundles = [pio.renderers._build_mime_bundle(fig.to_dict(), renderers_string=plot.NOTEBOOK_RENDERER)
                   for _ in range(3)]
        assert all("application/vnd.plotly.v1+json" in b and "text/html" in b for b in bundles)
        assert [b["text/html"].count(js) for b in bundles] == [1, 0, 0]  # once per kernel, through plotly's own path
    finally:
        pio.renderers.default = saved


def test_attention_heatmaps():
    pats = torch.softmax(torch.randn(3, 4, 4), -1)
    fig = plot.attention_heatmaps(pats, ["<bos>", "a", "→", "b"], ["L0H1", "L1H0", "L1H2"], title="t")
    assert [a.text for a in fig.layout.annotations][:3] == ["L0H1", "L1H0", "L1H2"]
    assert len(fig.data) == 3 and fig.layout.width <= 1400
    with pytest.raises(ValueError, match="one name per head"):
        plot.attention_heatmaps(pats, ["a", "b", "c", "d"], ["x"])


def test_lens_page_top_words_skip_special_tokens_and_show_small_probabilities(tmp_path):
    """A large vocabulary spreads probability thin and an untrained model may rank reserved tokens
    first: the summary page names words, not special tokens, with readable small probabilities."""
    from tvlens.analyses.lens import LensResult, LensSummary
    from tvlens.results import ResultMeta

    n, vocab = 3, 6
    probs = torch.full((n, vocab), 1e-5)
    probs[:, 0] = 0.9    # a reserved special token, ranked first
    probs[:, 4] = 3e-5   # the best real word
    probs[:, 2] = 2e-5
    nan = torch.full((1, n), float("nan"))
    one = torch.ones(1, n)
    r = LensResult(
        layers=tuple(range(n)), n_layers=n - 1, top_ids=torch.tensor([[0, 4]] * n), top_probs=torch.tensor([[0.9, 3e-5]] * n),
        top_tokens=tuple(("<|reserved_special_token_0|>", " paris") for _ in range(n)), answer_rank=one * 3,
        answer_prob=one * 1e-5, input_rank=one * 4, input_prob=one * 1e-5, task_rank=nan, task_prob=nan, task_words=(),
        task_word_rank=torch.zeros(n, 0), task_word_prob=torch.zeros(n, 0), answer_ids=torch.zeros(1, dtype=torch.long),
        input_ids=torch.zeros(1, dtype=torch.long), position="separator", lens="logit", task="synthetic", mean_probs=probs,
        token_strings={0: "<|reserved_special_token_0|>", 2: " city", 4: " paris"},
        meta=ResultMeta(extra={"special_ids": [0]}))
    _, words, _ = r.task_phase_words(2)
    assert [w for w, _ in words] == [" paris", " city"]
    page = LensSummary(results=(r,)).to_html(tmp_path / "lens.html").read_text()
    assert "paris (3.0e-05)" in page and "(0.00)" not in page and "reserved_special" not in page.split("<h2")[0]


def test_head_stats_and_task_vectors_plot_what_they_hold():
    """HeadStats.plot draws ‖z̄‖ per (layer, head) (one task's, or the mean over tasks); TaskVector.plot
    draws the vector's own components."""
    from tvlens.analyses.taskness import HeadStats
    from tvlens.vectors.activation import TaskVector

    g = torch.Generator().manual_seed(0)
    z = torch.randn(2, 3, 4, 5, generator=g, dtype=torch.float64)  # [task, layer, head, d_head]
    stats = HeadStats(("a", "b"), z, z.abs(), torch.full((2,), 7), "final", (0, 1, 2))
    for task, want in ((None, z.norm(dim=-1).mean(0)), ("b", z[1].norm(dim=-1))):
        fig = stats.plot(task)
        for layer, head in ((0, 0), (2, 3), (1, 2)):
            assert _cell(fig, layer, head)[0] == pytest.approx(float(want[layer, head]), rel=1e-6)
    v = torch.randn(16, generator=g)
    tv = TaskVector(v, layer=2, task="antonym")
    assert np.allclose(np.asarray(tv.plot().data[0].y, dtype=float), v.numpy())
