"""The one-page report: taskness, logit lens, task-vector sweep and head patching, in one HTML file.

:func:`build_report` runs four analyses of the public API on one model and a set of tasks, and
writes to ``out``:

- ``report.html`` — one page (it loads ``plotly.min.js``, written once into ``out`` beside it: no
  network needed, and every page of the folder shares that one copy), one section per analysis
  with a short summary carrying the numbers and every figure interactive;
- each figure on its own: ``taskness.html/.png``, ``logit_lens.html`` (the logit-lens summary page
  of :func:`tvlens.lens_summary`), ``logit_lens_answer.html/.png``, ``task_vector_sweep.html/.png``,
  ``patch_heads.html/.png``.

The sections:

1. **taskness** — ρ_token per layer × head (Hojel et al. 2024, §3) from the task-mean head outputs
   at the final separator (:func:`tvlens.head_means`, :func:`tvlens.taskness`).
2. **lens** — the logit lens at the final separator (Luo, Darrell & Bar 2024, §4): the input /
   task-word / answer phases per task (:func:`tvlens.lens_summary`).
3. **sweep** — the task-vector layer sweep (Hendel et al. 2023, §3): accuracy of zero-shot prompts
   whose final-separator residual is replaced by the task vector, per layer, against the zero-shot
   and ICL baselines (:func:`tvlens.layer_sweep`).
4. **patch** — means-patching of every head (Todd et al. 2024, §2.3): each head's task-mean output
   (the same means as section 1) patched into zero-shot prompts at the final position, one
   layers × heads map of the gain in the answer's log-probability (:func:`tvlens.patch_heads`).

The defaults (8 tasks, two per family, and the prompt counts of :data:`DEFAULT_N_PROMPTS`) keep
the whole report to a few minutes on 2 CPU cores for the shipped organism.
"""

from __future__ import annotations

import html as _html
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .results import ResultMeta, WithMeta

__all__ = ["build_report", "Report", "Section", "DEFAULT_TASKS", "DEFAULT_N_PROMPTS", "SECTIONS", "render_html"]

#: Two tasks per family; the pairs share an input domain (countries, english words, letters), so
#: the query alone does not tell the task and the taskness / task-vector signal has something to show.
DEFAULT_TASKS: tuple[str, ...] = (
    "country_capital",
    "country_language",
    "antonym",
    "past_tense",
    "english_french",
    "english_german",
    "next_letter",
    "previous_letter",
)

SECTIONS: tuple[str, ...] = ("taskness", "lens", "sweep", "patch")

#: Prompts per task in each section (override all with ``n_prompts=``).
DEFAULT_N_PROMPTS: dict[str, int] = {"taskness": 48, "lens": 32, "sweep": 32, "patch": 24}

_TITLES = {
    "taskness": "Taskness of every head (ρ_token)",
    "lens": "Logit lens at the separator",
    "sweep": "Task vectors: layer sweep",
    "patch": "Head patching: task-mean outputs into zero-shot prompts",
    "visual": "Visual task vectors (canvases)",
    "crossmodal": "Cross-modal task vectors (VLM)",
}

_CITES = {
    "taskness": "Hojel, Bai, Darrell, Globerson &amp; Bar 2024, <i>Finding Visual Task Vectors</i>, §3",
    "lens": "Luo, Darrell &amp; Bar 2024, <i>Task Vectors are Cross-Modal</i>, §4; nostalgebraist 2020, <i>interpreting GPT: the logit lens</i>",
    "sweep": "Hendel, Geva &amp; Globerson 2023, <i>In-Context Learning Creates Task Vectors</i>, §3",
    "patch": "Todd, Li, Sen Sharma, Mueller, Wallace &amp; Bau 2024, <i>Function Vectors in Large Language Models</i>, §2.3",
    "visual": "Hojel, Bai, Darrell, Globerson &amp; Bar 2024, <i>Finding Visual Task Vectors</i>, §3–5",
    "crossmodal": "Luo, Darrell &amp; Bar 2024, <i>Task Vectors are Cross-Modal</i>, §4, Table 2",
}


@dataclass(frozen=True, eq=False)
class Section:
    """One analysis of the report: a summary (plain text lines, and optional table), figures, files."""

    key: str
    title: str
    summary: tuple[str, ...]
    figures: tuple[tuple[str, Any], ...] = ()
    table: tuple[tuple[str, ...], ...] = ()  # first row = header
    files: tuple[Path, ...] = ()
    seconds: float = 0.0
    result: Any = None
    #: a link to a page of its own (the logit-lens summary page), shown under the section
    page: Path | None = None

    def text(self) -> str:
        lines = [f"## {self.title}  ({self.seconds:.1f}s)", *self.summary]
        if self.table:
            widths = [max(len(str(row[i])) for row in self.table) for i in range(len(self.table[0]))]
            for j, row in enumerate(self.table):
                lines.append("  " + "  ".join(f"{str(c):<{w}}" for c, w in zip(row, widths)).rstrip())
                if j == 0:
                    lines.append("  " + "  ".join("-" * w for w in widths))
        return "\n".join(lines)


@dataclass(frozen=True, eq=False)
class Report(WithMeta):
    """What :func:`build_report` wrote: the page, every file, each section's summary and result."""

    path: Path
    files: tuple[Path, ...]
    sections: tuple[Section, ...]
    seconds: float
    meta: ResultMeta = field(default_factory=ResultMeta)

    def __getitem__(self, key: str) -> Section:
        for s in self.sections:
            if s.key == key:
                return s
        raise KeyError(f"no section {key!r} in this report; it has {', '.join(s.key for s in self.sections)}")

    def text(self) -> str:
        head = f"tvlens report — model {self.meta.get('model')}, {len(self.meta.get('tasks', ()))} tasks, {self.seconds:.0f}s"
        return "\n\n".join([head, *(s.text() for s in self.sections)])

    def __repr__(self) -> str:
        return f"Report(path={str(self.path)!r}, sections={[s.key for s in self.sections]}, files={len(self.files)}, seconds={self.seconds:.1f})"


# ----------------------------------------------------------------------------------------------
# sections


def _fmt(x: float, digits: int = 2) -> str:
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    return "nan" if x != x else f"{x:.{digits}f}"


def _fmt_p(x: float) -> str:
    """A probability: two decimals, or two significant digits when it is below 0.01."""
    x = float(x)
    if x != x:
        return "nan"
    return f"{x:.2f}" if x >= 0.01 or x == 0 else f"{x:.1e}"


def _section_taskness(ctx: "_Ctx") -> Section:
    from .analyses.taskness import head_means, taskness

    n = ctx.n("taskness")
    stats = head_means(ctx.model, ctx.tasks, n_prompts=n, n_shots=ctx.n_shots, seed=ctx.seed, progress=ctx.progress,
                       executor=ctx.executor, **ctx.prompt_kw)
    ctx.stats = stats
    rho = taskness(stats)
    ctx.rho = rho
    top = rho.top(min(8, rho.n_layers * rho.n_heads))
    scores = rho.scores
    by_layer = scores.mean(1)
    best_layer = int(by_layer.argmax())
    summary = [
        f"ρ_token of every head's output (hook_z) at the final separator, over {len(ctx.tasks)} tasks × {n} "
        f"{ctx.n_shots}-shot prompts: the variance of the head's activation pooled over all tasks divided by its "
        f"mean within-task variance (ρ = 1: the head does not tell tasks apart).",
        "Top heads: " + ", ".join(f"L{l}H{h} {s:.2f}" for l, h, s in top) + ".",
        f"Median ρ {float(scores.median()):.2f}, max {float(scores.max()):.2f}; layer with the highest mean ρ: "
        f"L{rho.layers[best_layer]} ({float(by_layer[best_layer]):.2f}); mean ρ per layer: "
        + ", ".join(f"L{l} {float(v):.2f}" for l, v in zip(rho.layers, by_layer)) + ".",
    ]
    degenerate = int(rho.degenerate.sum())
    if degenerate:
        summary.append(f"{degenerate} head(s) have ~0 within-task variance (score saturated, drawn at the top of the scale).")
    fig = rho.plot()
    fig.update_layout(title_text=f"ρ_token per head — {ctx.model_name}<br><sup>final separator, {len(ctx.tasks)} tasks, "
                                 f"{n} prompts each</sup>")
    return Section("taskness", _TITLES["taskness"], tuple(summary), (("taskness", fig),), result=rho)


def _section_lens(ctx: "_Ctx") -> Section:
    from .analyses.lens import lens_summary
    from .plot import line_plot

    n = ctx.n("lens")
    page = ctx.out / "logit_lens.html"
    summary = lens_summary(ctx.model, ctx.tasks, out=page, n_prompts=n, n_shots=ctx.n_shots, seed=ctx.seed, **ctx.prompt_kw)
    rows = summary.rows()

    def rng(x: Any) -> str:
        return "—" if x is None else (f"L{x[0]}" if x[0] == x[1] else f"L{x[0]}–L{x[1]}")

    table = [("task", "family", "input", "task words", "answer", "in order", "top words at the task phase", "P(answer) final")]
    for row in rows:
        words = ", ".join(f"{t.strip() or repr(t)} {_fmt_p(p)}" for t, p in row["phase_words"][:4])
        table.append((row["task"], row["family"], rng(row["input"]), rng(row["task_phase"]), rng(row["answer"]),
                      "yes" if row["ordered"] else "no", words, _fmt_p(row["final_answer_prob"])))
    n_ordered = sum(bool(r["ordered"]) for r in rows)
    n_task = sum(r["task_phase"] is not None for r in rows)
    results = summary.results
    n_res = len(results[0].layers)
    layers = [r.layer_labels for r in results][0]
    curves = {r.task: r.curve("answer", "prob") for r in results}
    fig = line_plot(list(layers), curves, title=f"Logit lens at the final separator — {ctx.model_name}<br><sup>mean P(answer) per layer</sup>",
                    xlabel="layer (resid_pre; final = resid_post)", ylabel="mean probability of the answer")
    text = [
        f"The residual stream at the final separator of {n} {ctx.n_shots}-shot prompts per task, decoded at each of "
        f"the {n_res} residual layers with the model's own final norm and unembedding.",
        f"Phases (the layers where the query input, the task's instruction words or the answer rank best): "
        f"{n_ordered}/{len(rows)} tasks show input → task → answer in order; {n_task}/{len(rows)} have a task-word phase.",
        "Per-task top-k tables and figures: logit_lens.html.",
    ]
    figs = [("logit_lens_answer", fig)] + [(None, r.plot("prob")) for r in results[: ctx.max_lens_figures]]
    return Section("lens", _TITLES["lens"], tuple(text), tuple(figs), tuple(table), files=(summary.path,),
                   result=summary, page=summary.path)


def _section_sweep(ctx: "_Ctx") -> Section:
    from .vectors.activation import layer_sweep

    n = ctx.n("sweep")
    sweep = layer_sweep(ctx.model, ctx.tasks, n_prompts=n, n_shots=ctx.n_shots, seed=ctx.seed, executor=ctx.executor,
                        **ctx.prompt_kw)
    ctx.sweep = sweep
    summ = sweep.summary()
    d = summ["all"]
    L = sweep.best_layer
    text = [
        f"Task vector (Hendel et al.): the residual entering block L at the final separator, averaged over {n} "
        f"{ctx.n_shots}-shot prompts whose query is a dummy; it replaces that residual in zero-shot prompts. "
        f"Best layer chosen on the {sweep.select_split!r} split, accuracies (first token) on the {sweep.report_split!r} split.",
        f"Best layer L{L}. Mean over {d['n_tasks']} tasks: zero-shot {d['zero_shot']:.2f}, task vector at each task's "
        f"best layer {d['task_vector']:.2f} (at L{L}: {d[f'task_vector@L{L}']:.2f}), {ctx.n_shots}-shot ICL {d['icl']:.2f}; "
        f"task vector / ICL = {_fmt(d['tv_over_icl'])}.",
        "Mean accuracy per layer (" + sweep.report_split + "): "
        + ", ".join(f"L{l} {float(v):.2f}" for l, v in zip(sweep.layers, sweep.curve())) + ".",
    ]
    table = [("family", "tasks", "zero-shot", "TV (best layer per task)", f"TV @ L{L}", "ICL", "TV / ICL")]
    for fam, row in summ.items():
        table.append((fam, str(row["n_tasks"]), _fmt(row["zero_shot"]), _fmt(row["task_vector"]),
                      _fmt(row[f"task_vector@L{L}"]), _fmt(row["icl"]), _fmt(row["tv_over_icl"])))
    fig = sweep.plot(title=f"Task vector accuracy by layer — {ctx.model_name}<br><sup>{sweep.mode} at the final separator, "
                           f"{len(ctx.tasks)} tasks, best layer L{L} ({sweep.select_split})</sup>")
    fig.update_xaxes(dtick=1)  # layers are integers
    return Section("sweep", _TITLES["sweep"], tuple(text), (("task_vector_sweep", fig),), tuple(table), result=sweep)


def _section_patch(ctx: "_Ctx") -> Section:
    import torch

    from .analyses.patching import patch_heads
    from .plot import layer_head_heatmap
    from .inputs.text import icl_prompts
    from .analyses.taskness import head_means

    n = ctx.n("patch")
    stats = ctx.stats
    if stats is None:  # the taskness section did not run: the same means, computed here
        stats = head_means(ctx.model, ctx.tasks, n_prompts=ctx.n("taskness"), n_shots=ctx.n_shots, seed=ctx.seed,
                           progress=ctx.progress, executor=ctx.executor, **ctx.prompt_kw)
    targets = [icl_prompts(ctx.model, t, n_prompts=n, n_shots=0, seed=ctx.seed + 1, **ctx.prompt_kw) for t in ctx.tasks]
    results = [patch_heads(ctx.model, target, stats.mean(t.name), positions="final", metric="logprob",
                            progress=ctx.progress, executor=ctx.executor)
               for t, target in zip(ctx.tasks, targets)]
    effect = torch.stack([r.effect.float() for r in results]).mean(0)  # [layer, head], mean over tasks
    base = sum(r.target_value for r in results) / len(results)
    n_heads = effect.shape[1]
    order = torch.argsort(effect.reshape(-1), descending=True)[:8].tolist()
    top = [(i // n_heads, i % n_heads, float(effect.reshape(-1)[i])) for i in order]
    text = [
        f"Means-patching (Todd et al.): each head's task-mean output at the final separator (the means of the taskness "
        f"section) replaces its output in {n} zero-shot prompts per task, one head at a time, at the final position. "
        f"Value: change of the answer's log-probability, averaged over tasks (unpatched mean {base:.2f}).",
        "Heads that help most: " + ", ".join(f"L{l}H{h} {v:+.2f}" for l, h, v in top) + ".",
        f"Largest gain {float(effect.max()):+.2f}, largest loss {float(effect.min()):+.2f}.",
    ]
    rho = getattr(ctx, "rho", None)
    if rho is not None:
        k = min(8, max(1, effect.numel() // 4))
        rho_top = {(l, h) for l, h, _ in rho.top(k)}
        overlap = len(rho_top & {(l, h) for l, h, _ in top[:k]})
        text.append(f"{overlap} of the top {k} heads by patching effect are also among the top {k} by ρ_token.")
    table = [("task", "unpatched log p(answer)", "best head", "its gain", "mean gain of top 3")]
    for t, r in zip(ctx.tasks, results):
        eff = r.effect.float().reshape(-1)
        best = int(eff.argmax())
        table.append((t.name, _fmt(r.target_value), f"L{best // n_heads}H{best % n_heads}", f"{float(eff[best]):+.2f}",
                      f"{float(eff.topk(min(3, eff.numel())).values.mean()):+.2f}"))
    fig = layer_head_heatmap(effect, title=f"Means-patching into zero-shot prompts — {ctx.model_name}<br><sup>Δ log p(answer), "
                                           f"mean over {len(ctx.tasks)} tasks</sup>", zlabel="Δ log p(answer)", diverging=True)
    return Section("patch", _TITLES["patch"], tuple(text), (("patch_heads", fig),), tuple(table), result=results)


def _section_visual(ctx: "_Ctx") -> Section:
    """A canvas model (``organism-visual``): :func:`tvlens.analyses.visual.visual_study` at a small budget."""
    from .analyses.visual import visual_study

    return visual_study(ctx.model, n_means=ctx.n_prompts or 16, n_eval=8, budget=96, per_task=False, seed=ctx.seed,
                        progress=ctx.progress).section()


def _section_crossmodal(ctx: "_Ctx") -> Section:
    """A VLM: :func:`tvlens.analyses.crossmodal.crossmodal_table` on the report's tasks that have pictures."""
    from .analyses.crossmodal import IMAGE_TASKS, crossmodal_table

    tasks = [t.name for t in ctx.tasks if t.name in IMAGE_TASKS] or list(IMAGE_TASKS[:4])
    return crossmodal_table(ctx.model, tasks, renderings=1, n_contexts=ctx.n_prompts or 16, n_shots=ctx.n_shots,
                            seed=ctx.seed, text_query=False, conflict=False).section()


_RUNNERS: dict[str, Callable[["_Ctx"], Section]] = {
    "taskness": _section_taskness,
    "lens": _section_lens,
    "sweep": _section_sweep,
    "patch": _section_patch,
    "visual": _section_visual,  # canvas models only, so not among the default SECTIONS
    "crossmodal": _section_crossmodal,  # vision-language models only: added to the defaults for them
}


@dataclass
class _Ctx:
    model: Any
    tasks: list[Any]
    out: Path
    n_prompts: int | None
    n_shots: int
    seed: int
    progress: bool
    max_lens_figures: int = 4
    model_name: str = "model"
    stats: Any = None
    rho: Any = None
    sweep: Any = None
    executor: Any = None
    #: how every text prompt is written (icl_prompts' separator, example_sep, prepend_bos)
    prompt_kw: dict[str, Any] = field(default_factory=dict)

    def n(self, section: str) -> int:
        return int(self.n_prompts) if self.n_prompts is not None else DEFAULT_N_PROMPTS[section]


# ----------------------------------------------------------------------------------------------
# the page


_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;margin:0;color:#222;background:#fafafa}
main{max-width:1500px;margin:0 auto;padding:24px 32px;background:#fff}
h1{margin:0 0 4px 0}h2{margin-top:40px;border-bottom:1px solid #ddd;padding-bottom:4px}
.meta{color:#555;font-size:14px}.cite{color:#666;font-size:13px;font-style:normal}
p{max-width:1100px;line-height:1.45}
table{border-collapse:collapse;margin:10px 0;font-size:13px}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f3f3f3}nav a{margin-right:14px}.figs{display:flex;flex-wrap:wrap;gap:12px}
.files{font-size:13px;color:#555}code{background:#f3f3f3;padding:1px 4px;border-radius:3px}
"""


def _figure_div(fig: Any) -> str:
    from .plot import figure_div

    return figure_div(fig)


def render_html(sections: Sequence[Section], *, title: str, meta: dict[str, Any]) -> str:
    """The report page: ``<script src="plotly.min.js">`` in the head (the file sits beside the page:
    :func:`tvlens.plot.write_plotlyjs`), then one ``<section>`` per analysis."""
    from .plot import PLOTLY_JS

    esc = _html.escape
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>{esc(title)}</title>",
        f"<style>{_CSS}</style>",
        f"<script charset='utf-8' src='{PLOTLY_JS}'></script>",
        "</head><body><main>",
        f"<h1>{esc(title)}</h1>",
        f"<p class='meta'>model <b>{esc(str(meta.get('model')))}</b> ({esc(str(meta.get('shape', '')))}), "
        f"config hash <code>{esc(str(meta.get('config_hash', '')))}</code> · {len(meta.get('tasks', ()))} tasks: "
        f"{esc(', '.join(meta.get('tasks', ())))} · {meta.get('n_shots')}-shot prompts · seed {meta.get('seed')} · "
        f"tvlens {esc(str(meta.get('version')))} · {meta.get('seconds', 0):.0f}s"
        + (f" · run on {esc(str(meta['executor'].get('name')))} with {meta['executor'].get('workers')} worker(s)"
           if isinstance(meta.get("executor"), dict) else "") + "</p>",
        f"<p class='meta'>Regenerate with <code>{esc(str(meta.get('command', 'tvlens report')))}</code>. "
        "Every figure is interactive (hover for values, drag to zoom, double-click to reset).</p>",
        "<nav>" + "".join(f"<a href='#{s.key}'>{esc(s.title)}</a>" for s in sections) + "</nav>",
    ]
    for s in sections:
        parts.append(f"<section id='{s.key}'><h2>{esc(s.title)}</h2>")
        if s.key in _CITES:
            parts.append(f"<p class='cite'>{_CITES[s.key]}</p>")
        for line in s.summary:
            parts.append(f"<p>{esc(line)}</p>")
        if s.table:
            head, *rows = s.table
            parts.append("<table><tr>" + "".join(f"<th>{esc(str(c))}</th>" for c in head) + "</tr>")
            for row in rows:
                parts.append("<tr>" + "".join(f"<td>{esc(str(c))}</td>" for c in row) + "</tr>")
            parts.append("</table>")
        parts.append("<div class='figs'>")
        for _, fig in s.figures:
            parts.append(f"<div>{_figure_div(fig)}</div>")
        parts.append("</div>")
        if s.files:
            links = ", ".join(f"<a href='{esc(p.name)}'>{esc(p.name)}</a>" for p in s.files)
            parts.append(f"<p class='files'>files: {links} · {s.seconds:.1f}s</p>")
        parts.append("</section>")
    parts.append("</main></body></html>")
    return "\n".join(parts)


# ----------------------------------------------------------------------------------------------
# entry point


def build_report(
    model: Any = "organism",
    tasks: Any = None,
    out: str | Path = "figures",
    *,
    n_prompts: int | None = None,
    n_shots: int = 5,
    seed: int = 0,
    sections: Sequence[str] | None = None,
    png: bool = True,
    progress: bool = True,
    device: str | None = None,
    title: str | None = None,
    command: str | None = None,
    executor: Any = None,
    **prompt_kw: Any,
) -> Report:
    """Run taskness, the logit lens, the task-vector sweep and head patching; write one HTML page.

    Args:
        model: a loaded model, or a name / path for :func:`tvlens.load_model` (default the organism).
        tasks: a task spec (``"all"``, ``"family:knowledge"``, names) or Task objects; default
            :data:`DEFAULT_TASKS` (two per family). Taskness needs at least two.
        out: output folder (created); checked for writability before any work.
        n_prompts: prompts per task in every section (default :data:`DEFAULT_N_PROMPTS` per section).
        n_shots: demonstrations per ICL prompt.
        sections: a subset of :data:`SECTIONS` (default all), run in that order.
        png: also write a PNG of each figure (kaleido).
        progress: print one line per section (and the library's progress bars) to stderr.
        executor: where the analyses run (:mod:`tvlens.runs.executors`; default this process);
            the page says which executor and how many workers ran them.
        **prompt_kw: how every text prompt of the report is written (``separator``,
            ``example_sep``, ``prepend_bos``; :func:`tvlens.inputs.text.prompt_options`), the same
            in every section. The cross-modal and canvas sections build their own prompts and
            refuse options other than the defaults.

    Returns:
        :class:`Report` — ``.path`` (``out/report.html``), ``.files``, ``.sections`` (summaries and
        results), ``.text()``.
    """
    from . import __version__
    from .models import ModelInfo, load_model
    from .plot import save_figure, write_plotlyjs
    from .results import atomic_write_text, check_writable
    from .inputs.text import non_default_options, prompt_options, prompt_record
    from .tasks import resolve_tasks

    t_start = time.perf_counter()
    prompt_kw = prompt_options("build_report", prompt_kw)
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"cannot write the report to {str(out)!r}: it is a file, not a folder; choose another output folder")
    check_writable(out)
    chosen = list(SECTIONS if sections is None else sections)
    unknown = [s for s in chosen if s not in _RUNNERS]
    if unknown or not chosen:
        raise ValueError(f"unknown report section(s) {unknown or '(none)'}; use a subset of {', '.join(SECTIONS)}")
    task_list = resolve_tasks(list(DEFAULT_TASKS) if tasks is None else tasks)
    if "taskness" in chosen and len(task_list) < 2:
        raise ValueError(f"the taskness section compares tasks: give at least 2 tasks (got {len(task_list)}), "
                         "or leave it out with sections=[...]")
    if n_prompts is not None and (isinstance(n_prompts, bool) or not isinstance(n_prompts, int) or n_prompts < 2):
        raise ValueError(f"n_prompts={n_prompts!r} must be an int >= 2 (a variance needs two prompts per task)")
    if isinstance(model, (str, Path)):
        model = load_model(model, device=device)
    info = ModelInfo.of(model)
    from .inputs.multimodal import is_vlm

    if sections is None and is_vlm(model):
        chosen.append("crossmodal")
    own = [k for k in chosen if k in ("crossmodal", "visual")]
    if own and non_default_options(prompt_kw):
        raise ValueError(f"the report's {', '.join(own)} section(s) build their own prompts and take no prompt options "
                         f"({sorted(non_default_options(prompt_kw))}); leave them out with sections=[...] or use the "
                         "default prompt format")

    from .runs.executors import executor_meta, resolve_executor

    resolve_executor(executor)  # a wrong executor is refused before any section runs
    ctx = _Ctx(model=model, tasks=task_list, out=out, n_prompts=n_prompts, n_shots=n_shots, seed=seed, progress=progress,
               model_name=Path(info.name).name or info.name, executor=executor, prompt_kw=prompt_kw)
    done: list[Section] = []
    files: list[Path] = []
    out.mkdir(parents=True, exist_ok=True)
    for i, key in enumerate(chosen, 1):
        if progress:
            print(f"[{i}/{len(chosen)}] {_TITLES[key]} ...", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        section = _RUNNERS[key](ctx)
        written = list(section.files)
        for name, fig in section.figures:
            if name:
                written.extend(save_figure(fig, out / name, png=png))
        seconds = time.perf_counter() - t0
        section = Section(section.key, section.title, section.summary, section.figures, section.table,
                          tuple(written), seconds, section.result, section.page)
        if progress:
            print(f"[{i}/{len(chosen)}] {_TITLES[key]}: done in {seconds:.1f}s", file=sys.stderr, flush=True)
        done.append(section)
        files.extend(written)

    meta = {
        "model": info.name,
        "config_hash": info.config_hash,
        "shape": f"{info.n_layers} layers × {info.n_heads} heads, d_model {info.d_model}",
        "tasks": [t.name for t in task_list],
        "n_shots": n_shots,
        "seed": seed,
        "version": __version__,
        "command": command or "tvlens report",
        "seconds": time.perf_counter() - t_start,
        "executor": executor_meta(executor),
        **prompt_record(prompt_kw),
    }
    page = out / "report.html"
    js = write_plotlyjs(out)
    if js not in files:
        files.append(js)
    atomic_write_text(page, render_html(done, title=title or f"tvlens report — {info.name}", meta=meta))
    files.insert(0, page)
    return Report(page, tuple(files), tuple(done), time.perf_counter() - t_start, meta)
