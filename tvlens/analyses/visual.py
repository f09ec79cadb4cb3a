"""Visual task vectors (Hojel et al. 2024, "Finding Visual Task Vectors") on canvas-inpainting models.

A visual prompt is a canvas (:mod:`tvlens.inputs.canvas`): an example pair above a query and a
masked cell the model inpaints.  Its task vectors are **per-task mean outputs of attention heads at
token positions** (§3): the means of ``hook_z`` of every (layer, head, position) over one task's
1-shot canvases.  This module, every forward of which goes through the engine
(:class:`~tvlens.engine.runner.PatchRunner` with :class:`~tvlens.engine.sites.Edit` masks, and
:func:`~tvlens.analyses.taskness.head_means`), provides:

- :func:`canvas_means` / :func:`visual_taskness` — the task means and ρ_token (§3, "activation
  scoring") per (layer, head, position) and per head, drawn as layers × heads heatmaps and as maps
  over the canvas, each position where it sits in the 2×2 grid (Fig. 2);
- :class:`CanvasPatch` — mean-patching into canvases without examples at any (layer, head,
  position) mask, many masks per forward (the masks ride along the batch axis);
- selection over (head, position) pairs (§3.2): :func:`reinforce_pairs` (a Bernoulli per pair, the
  reward the target cell's log-likelihood, the step's mean reward as baseline, an optional size
  penalty), :func:`soft_pairs` (a blending weight α per pair, trained by gradient), and the paper's
  baselines :func:`cma_pairs` (CMA-ES through the ``cma`` package) and :func:`grs_pairs` (greedy
  random search), at equal budgets of forward passes; task-specific or multi-task (one mask shared
  by all tasks, each canvas patched with its own task's means);
- :func:`topk_curve` (top-k ρ pairs vs k random pairs vs another task's means), :func:`head_effects`
  (ρ per head beside the effect of patching that head at every position), :func:`task_arithmetic`
  (means of task A + (B − C), §5) and :func:`canvas_pictures` (ICL, patched, baseline and the truth
  side by side, Figs. 3–4);
- :func:`visual_study` — all of it on one model, with one comparison table and a report section.

A *mask* is a ``[column, layer, head, pos]`` tensor (0/1, or α in ``[0, 1]``): column ``c`` patches
the task mean of ``(layer, head)`` at ``pos`` wherever ``mask[c, layer, head, pos]`` is set.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int
from torch import Tensor

from ..inputs.canvas import CanvasBatch, canvases, changed_accuracy, concat, predicted_codes, score_cells
from ..organisms.visual.images import TASKS as VISUAL_TASKS
from ..organisms.visual.images import apply_task
from ..results import LayerHeadGrid, Plotted, ResultMeta, Saved, Tabular, WithMeta
from ..vocabulary import BATCH_SIZE, PROGRESS
from .taskness import HeadStats, Taskness, _check_task_count, head_means, taskness_from_stats

__all__ = [
    "VISUAL_TASKS",
    "canvas_means",
    "visual_taskness",
    "VisualTaskness",
    "CanvasPatch",
    "PairSelection",
    "reinforce_pairs",
    "soft_pairs",
    "cma_pairs",
    "grs_pairs",
    "topk_pairs",
    "random_pairs",
    "topk_curve",
    "TopkCurve",
    "head_effects",
    "HeadEffects",
    "task_arithmetic",
    "Arithmetic",
    "canvas_pictures",
    "visual_study",
    "VisualStudy",
]

METRICS = ("logprob", "accuracy", "exact", "changed")
#: the 0/1 scores of a patched cell (:meth:`CanvasPatch.scores`): code accuracy, exact cell, changed codes
SCORES = ("accuracy", "exact", "changed")


# ==============================================================================================
# task means and ρ_token over positions
# ==============================================================================================


def _resolve_visual_tasks(tasks: Any) -> list[str]:
    if tasks is None or tasks == "all":
        return list(VISUAL_TASKS)
    names = [t.strip() for t in tasks.split(",")] if isinstance(tasks, str) else [str(t) for t in tasks]
    bad = [t for t in names if t not in VISUAL_TASKS]
    if bad or not names:
        raise ValueError(f"unknown visual task(s) {bad or '(none)'}; use some of {', '.join(VISUAL_TASKS)} or 'all'")
    if len(set(names)) != len(names):
        raise ValueError(f"tasks {names} name a task twice; name each once")
    return names


def canvas_means(model: Any, tasks: Any = None, *, n: int = 32, seed: int = 0, shots: int = 1, noise: int = 0,
                 split: str = "train", batch_size: int | None = BATCH_SIZE) -> HeadStats:
    """Per-task mean and variance of every head's ``hook_z`` at every canvas position (Hojel et al. 2024, §3).

    ``n`` 1-shot canvases per task (training-split images by default, so held-out evaluation canvases
    never feed the means) go through :func:`tvlens.head_means` with ``positions="all"``: the result
    is ``[task, layer, head, pos, d_head]``, ``pos`` the canvas's raster positions. The canvas layout
    is recorded in ``meta["canvas_layout"]``, so means of another layout are refused when patched.
    """
    names = _resolve_visual_tasks(tasks)
    batches = [canvases(t, n, shots=shots, seed=seed, split=split, noise=noise) for t in names]
    batches[0].check_model(model)
    stats = head_means(model, batches, positions="all", batch_size=batch_size, progress=False)
    layout = batches[0].layout
    meta = {**stats.meta, "canvas_layout": layout.key, "n_canvases": n, "noise": noise, "split": split, "shots": shots}
    return replace(stats, meta=meta)


@dataclass(frozen=True, eq=False)
class VisualTaskness(Saved, Plotted, WithMeta, LayerHeadGrid, Tabular):
    """ρ_token per (layer, head, position) of a canvas, and per head (the mean over positions).

    ``per_position`` ``[layer, head, pos]`` (raster positions of the canvas), ``scores``
    ``[layer, head]``; ``rows`` × 2 cells of ``cell_side`` × ``cell_side`` positions; ``taskness`` is
    the underlying :class:`~tvlens.analyses.taskness.Taskness`.
    """

    per_position: Float[Tensor, "layer head pos"]
    scores: Float[Tensor, "layer head"]
    tasks: tuple[str, ...]
    layout_key: str
    rows: int
    cell_side: int
    taskness: Taskness
    meta: ResultMeta = field(default_factory=ResultMeta)

    @property
    def grid(self) -> Tensor:
        return self.scores

    def top_pairs(self, k: int) -> Int[Tensor, " k"]:
        """Flat indices (``(layer * n_heads + head) * n_pos + pos``) of the ``k`` pairs of highest ρ."""
        return _rank(self.per_position)[:k]

    def canvas_map(self, layer: int | None = None, head: int | None = None) -> Float[Tensor, "height width"]:
        """ρ per position laid out where the position sits on the canvas (mean over the heads / layers not given)."""
        v = self.per_position
        v = v[layer] if layer is not None else v.mean(0)
        v = v[head] if head is not None else v.mean(0)
        return v.reshape(self.rows * self.cell_side, 2 * self.cell_side)

    def plot(self, transpose: bool = True):
        """Layers × heads heatmap of ρ per head (blocks on x, as in Hojel et al. 2024, Fig. 2 left)."""
        from ..plot import layer_head_heatmap

        return layer_head_heatmap(self.scores, title=f"ρ_token per head (mean over the {self.per_position.shape[-1]} canvas "
                                  f"positions)<br><sup>{len(self.tasks)} tasks · {self.meta.get('model', '')}</sup>",
                                  zlabel="ρ_token", transpose=transpose)

    def plot_canvas(self, *, log: bool = True):
        """ρ per position drawn over the canvas for every (layer, head): rows = layers, columns = heads (Fig. 2 right)."""
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go

        L, H = self.n_layers, self.n_heads
        vals = self.per_position.clamp_min(1e-12)
        vals = vals.log10() if log else vals
        lo, hi = float(vals.min()), float(vals.max())
        fig = make_subplots(rows=L, cols=H, horizontal_spacing=0.01, vertical_spacing=0.03,
                            subplot_titles=[f"L{l}H{h} {float(self.scores[l, h]):.3g}" for l in range(L) for h in range(H)])
        for l in range(L):
            for h in range(H):
                m = vals[l, h].reshape(self.rows * self.cell_side, 2 * self.cell_side).numpy()
                fig.add_trace(go.Heatmap(z=m, zmin=lo, zmax=hi, coloraxis="coloraxis",
                                         hovertemplate=f"L{l}H{h} row %{{y}} col %{{x}}: %{{z:.3g}}<extra></extra>"),
                              row=l + 1, col=h + 1)
        fig.update_yaxes(autorange="reversed", showticklabels=False, scaleanchor=None)
        fig.update_xaxes(showticklabels=False)
        for l in range(L):  # white lines between the canvas cells
            for h in range(H):
                for r in range(1, self.rows):
                    fig.add_hline(y=r * self.cell_side - 0.5, line_color="white", line_width=1, row=l + 1, col=h + 1)
                fig.add_vline(x=self.cell_side - 0.5, line_color="white", line_width=1, row=l + 1, col=h + 1)
        fig.update_annotations(font_size=9)
        fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "log10 ρ" if log else "ρ"}},
                          title=f"ρ_token over the canvas, per head<br><sup>each map: example in | out above, query | "
                                f"masked cell below; {len(self.tasks)} tasks; over each map: ρ of the head</sup>",
                          width=max(640, 110 * H + 160), height=130 * L * self.rows // 2 + 140, margin=dict(t=90, l=20, r=20, b=20))
        return fig

    def plot_layers(self, *, log: bool = True):
        """One canvas map per layer (ρ per position, mean over the layer's heads)."""
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go

        L = self.n_layers
        maps = [self.canvas_map(layer=l).clamp_min(1e-12) for l in range(L)]
        maps = [m.log10() if log else m for m in maps]
        fig = make_subplots(rows=1, cols=L, subplot_titles=[f"layer {l}" for l in range(L)], horizontal_spacing=0.03)
        for l, m in enumerate(maps):
            fig.add_trace(go.Heatmap(z=m.numpy(), coloraxis="coloraxis"), row=1, col=l + 1)
        fig.update_yaxes(autorange="reversed", showticklabels=False)
        fig.update_xaxes(showticklabels=False)
        fig.update_layout(coloraxis={"colorscale": "Viridis", "colorbar": {"title": "log10 ρ" if log else "ρ"}},
                          title="ρ_token over the canvas, mean over each layer's heads", width=230 * L + 120, height=330)
        return fig

    def records(self) -> list[dict[str, Any]]:
        """One row per (layer, head, canvas position): its ρ."""
        L, H, P = self.per_position.shape
        rho = self.per_position.tolist()
        return [{"layer": l, "head": h, "pos": p, "rho": rho[l][h][p]} for l in range(L) for h in range(H) for p in range(P)]


def visual_taskness(model: Any, tasks: Any = None, **kw: Any) -> VisualTaskness:
    """ρ_token (Hojel et al. 2024, §3) of every (layer, head, canvas position), from :func:`canvas_means`.

    ``model``: a model (then ``canvas_means(model, tasks, **kw)`` runs first) or the
    :class:`HeadStats` it returned.
    """
    stats = model if isinstance(model, HeadStats) else canvas_means(model, tasks, **kw)
    if not stats.per_position or "canvas_layout" not in stats.meta:
        raise ValueError("these statistics are not per canvas position; compute them with "
                         "tvlens.analyses.visual.canvas_means(model, tasks)")
    rho = taskness_from_stats(stats)
    if rho.per_position.shape[-1] != stats.n_positions:
        raise ValueError(f"only {rho.per_position.shape[-1]} of {stats.n_positions} positions have >= 2 canvases in every "
                         "task; use more canvases per task")
    shots = int(stats.meta.get("shots", 1))
    from ..inputs.canvas import CanvasLayout

    layout = CanvasLayout(rows=shots + 1)
    return VisualTaskness(rho.per_position.float(), rho.scores.float(), stats.tasks, stats.meta["canvas_layout"], layout.rows,
                          layout.grid, rho, {"model": stats.meta.get("model"), "config_hash": stats.meta.get("config_hash")})


def _rank(values: Tensor) -> Tensor:
    """Flat indices sorted by value, highest first (non-finite values last)."""
    flat = values.reshape(-1).double()
    flat = torch.where(torch.isfinite(flat), flat, torch.full_like(flat, -math.inf))
    return torch.argsort(flat, descending=True, stable=True)


# ==============================================================================================
# patching at (layer, head, position) masks
# ==============================================================================================


class CanvasPatch:
    """Canvases (without examples, usually) and task means, ready to score many (layer, head, pos) masks.

    For a mask ``w [column, layer, head, pos]`` the canvas's ``hook_z`` of head ``(layer, head)`` at
    position ``pos`` becomes ``lerp(z, mean, w)`` — the task mean of the canvas's own task where
    ``w = 1`` (Hojel et al. 2024, §3.2) — and the query-out cell is read.  Every mask is one column of
    the engine's :class:`~tvlens.engine.runner.PatchRunner`: the masks ride along the batch axis of
    whole forwards (a bidirectional model changes every position), many per forward.

    ``means``: the :class:`HeadStats` of :func:`canvas_means` (checked: same model, same canvas
    layout, holding every task of ``target``), or a ``[task, layer, head, pos, d_head]`` tensor with
    ``tasks`` naming its rows.  ``task_map`` patches canvases of task ``t`` with the means of
    ``task_map[t]`` (another task's means: the control of §4.2); ``value`` (``[layer, head, pos,
    d_head]``) patches one given value into every canvas instead (vector arithmetic).
    ``rows_per_forward`` caps the (canvas, mask) rows of one forward (default: the engine's memory
    budget on a GPU, 32 on a CPU, where a forward of many canvases of 144 tokens runs slower per
    row once its activations leave the cache): more canvases than that are split into groups of
    ``rows_per_forward``, each with its own runner, and a group's forwards carry as many masks as fit.
    """

    def __init__(self, model: Any, target: CanvasBatch, means: HeadStats | Tensor, *, tasks: Sequence[str] | None = None,
                 task_map: Mapping[str, str] | None = None, value: Tensor | None = None,
                 rows_per_forward: int | None = None) -> None:
        from ..engine.runner import PatchRunner
        from ..hooks import device_of
        from ..models import ModelInfo

        if not isinstance(target, CanvasBatch):
            raise TypeError(f"target must be a CanvasBatch (tvlens.inputs.canvas.canvases), got {type(target).__name__}")
        self.info = info = ModelInfo.of(model)
        target.check_model(model)
        self.model, self.target = model, target
        self.n_pos = target.layout.n_pos
        self.shape = (info.n_layers, info.n_heads, self.n_pos)
        table, names = _means_table(means, tasks, info, target)
        task_map = dict(task_map or {})
        rows = [names.index(task_map.get(t, t)) if task_map.get(t, t) in names else -1 for t in target.tasks]
        missing = sorted({task_map.get(t, t) for t, r in zip(target.tasks, rows) if r < 0})
        if missing and value is None:
            raise ValueError(f"the means hold tasks {', '.join(names)}, not {', '.join(missing)}; compute them for every "
                             "task of the canvases (canvas_means(model, tasks))")
        self.device = device_of(model)
        self.dtype = next(model.parameters()).dtype
        self.rows_per_forward = rows_per_forward or (None if self.device.type == "cuda" else 32)
        # [layer, batch|1, 1, pos, head, d_head]: the value each canvas's heads are pulled towards
        if value is not None:
            v = torch.as_tensor(value)
            if tuple(v.shape) != (info.n_layers, info.n_heads, self.n_pos, info.d_head):
                raise ValueError(f"value must be [layer, head, pos, d_head] = {[info.n_layers, info.n_heads, self.n_pos, info.d_head]}, "
                                 f"got {list(v.shape)}")
            self.values = v.permute(0, 2, 1, 3)[:, None, None]
        elif len(set(rows)) == 1:
            self.values = table[rows[0]].permute(0, 2, 1, 3)[:, None, None]
        else:
            self.values = table[torch.tensor(rows)].permute(1, 0, 3, 2, 4)[:, :, None]
        self.values = self.values.to(self.device, self.dtype)
        self.targets = target.targets.to(self.device)
        self.moved = target.changed.to(self.device)  # [batch, query]: codes the task changes
        step = len(target) if self.rows_per_forward is None else max(1, min(len(target), self.rows_per_forward))
        self.groups = [torch.arange(a, min(a + step, len(target))) for a in range(0, len(target), step)]
        with torch.no_grad():
            self.runners = [PatchRunner(model, target.select(g)) for g in self.groups]
        self.runner = self.runners[0]
        self.clean_logits = torch.cat([r.clean_logits for r in self.runners])  # [batch, query, d_vocab]

    def __len__(self) -> int:
        return len(self.target)

    def check_masks(self, masks: Tensor) -> Tensor:
        """``masks`` as ``[column, layer, head, pos]`` on the model's device, or a clear error."""
        masks = torch.as_tensor(masks)
        if masks.ndim == 3:
            masks = masks[None]
        if masks.ndim != 4 or tuple(masks.shape[1:]) != self.shape:
            raise ValueError(f"a mask must be [column, layer, head, pos] with [layer, head, pos] = {list(self.shape)} for "
                             f"this model and canvas, got {list(masks.shape)}; build it with pairs_mask(...) or zeros of that shape")
        return masks.to(self.device, self.dtype)

    def edits(self, masks: Tensor, group: int = 0) -> list:
        """One :class:`Edit` per layer for the canvases of ``group``: weight ``[column, pos, head, 1]``
        (a head × position mask per column)."""
        from ..engine.sites import Edit

        live = range(self.info.n_layers) if masks.requires_grad else [l for l in range(self.info.n_layers)
                                                                     if bool((masks[:, l] != 0).any())]
        rows = self.groups[group].to(self.device)
        return [Edit(l, "z", weight=masks[:, l].permute(0, 2, 1)[..., None],
                     value=self.values[l] if self.values.shape[1] == 1 else self.values[l][rows]) for l in live]

    def _map(self, masks: Tensor, fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
        """``fn(logits [rows, column, query, d_vocab], rows)`` of every mask, group by group of canvases
        (no gradient), concatenated along the batch axis."""
        with torch.no_grad():
            if not self.edits(masks):
                rows = torch.arange(len(self))
                return fn(self.clean_logits[:, None].expand(-1, masks.shape[0], -1, -1), rows)
            return torch.cat([r.map(self.edits(masks, i), lambda lg, g=g: fn(lg, g), masks.shape[0], start_pos=0,
                                    batch_size=self.rows_per_forward)
                              for i, (r, g) in enumerate(zip(self.runners, self.groups))])

    def logits(self, masks: Float[Tensor, "column layer head pos"]) -> Float[Tensor, "batch column query d_vocab"]:
        """Logits at the query-out cell for every mask (differentiable in ``masks`` under grad mode)."""
        masks = self.check_masks(masks)
        if not self.edits(masks):
            return self.clean_logits[:, None].expand(len(self), masks.shape[0], *self.clean_logits.shape[1:])
        return torch.cat([r.logits(self.edits(masks, i), masks.shape[0], start_pos=0) for i, r in enumerate(self.runners)])

    def per_row(self, masks: Tensor, metric: str | Sequence[str] = "accuracy") -> Float[Tensor, "column batch"]:
        """The metric of every mask on every canvas (no gradient): ``logprob`` (mean log p of the cell's
        codes), ``accuracy`` (code accuracy), ``exact`` (whole cell right) or ``changed`` (accuracy on
        the codes the task changes, :attr:`CanvasBatch.changed`).  A sequence of metrics gives
        ``[metric, column, batch]`` from the same forwards."""
        names = [metric] if isinstance(metric, str) else list(metric)
        bad = [m for m in names if m not in METRICS]
        if bad or not names:
            raise ValueError(f"metric={metric!r}; use one (or a list) of {', '.join(METRICS)}")
        masks = self.check_masks(masks)

        def fn(lg: Tensor, rows: Tensor) -> Tensor:
            rows = rows.to(self.device)
            return torch.stack([_metric(lg, self.targets[rows], m, self.moved[rows]) for m in names], -1)

        vals = self._map(masks, fn).permute(2, 1, 0).float().cpu()  # [metric, column, batch]
        return vals[0] if isinstance(metric, str) else vals

    def reward(self, masks: Tensor, metric: str = "logprob") -> Float[Tensor, " column"]:
        return self.per_row(masks, metric).mean(1)

    def per_task(self, masks: Tensor, metric: str = "accuracy") -> dict[str, Tensor]:
        """``{task: [column]}``: the metric averaged over each task's canvases, and ``"mean"`` over tasks."""
        return _task_means(self.target, self.per_row(masks, metric))

    def scores(self, masks: Tensor, metrics: Sequence[str] = SCORES) -> dict[str, dict[str, Tensor]]:
        """``{metric: {task: [column]}}`` (and ``"mean"`` over tasks) for every mask, all metrics from
        the same forwards (default: code accuracy, exact cell, changed codes)."""
        vals = self.per_row(masks, list(metrics))
        return {m: _task_means(self.target, v) for m, v in zip(metrics, vals)}

    def predictions(self, masks: Tensor) -> Int[Tensor, "batch column query"]:
        """The predicted codes of the query-out cell for every mask."""
        return self._map(self.check_masks(masks), lambda lg, rows: predicted_codes(lg)).cpu()


def _metric(logits: Tensor, targets: Tensor, metric: str, moved: Tensor | None = None) -> Tensor:
    """``[batch, column, query, d_vocab]`` logits -> ``[batch, column]`` (``moved``: the changed codes)."""
    if metric == "logprob":
        lp = logits.float().log_softmax(-1)
        return lp.gather(-1, targets[:, None, :, None].expand(*lp.shape[:-1], 1))[..., 0].mean(-1)
    hit = (predicted_codes(logits) == targets[:, None]).float()
    if metric == "changed":
        if moved is None:
            raise ValueError("metric='changed' needs the canvases' query codes (CanvasPatch passes them)")
        return changed_accuracy(hit, moved)
    return hit.mean(-1) if metric == "accuracy" else (hit.min(-1).values == 1).float()


def _task_means(batch: CanvasBatch, vals: Tensor) -> dict[str, Tensor]:
    """``[..., batch]`` values -> ``{task: [...]}`` means over each task's canvases, and ``"mean"`` over tasks."""
    tasks = np.array(batch.tasks)
    out = {t: vals[..., torch.from_numpy(tasks == t)].mean(-1) for t in batch.task_names}
    out["mean"] = torch.stack(list(out.values())).mean(0)
    return out


def _means_table(means: Any, tasks: Sequence[str] | None, info: Any, target: CanvasBatch) -> tuple[Tensor, list[str]]:
    """``[task, layer, head, pos, d_head]`` means and their task names, checked against the model and the canvas."""
    shape = (info.n_layers, info.n_heads, target.layout.n_pos, info.d_head)
    if isinstance(means, HeadStats):
        h = means.meta.get("config_hash")
        if h not in (None, info.config_hash):
            raise ValueError("these means come from another model (config hash differs); compute them with "
                             "canvas_means(model, tasks) for this model")
        layout = means.meta.get("canvas_layout")
        if layout is None or not means.per_position:
            raise ValueError("these means are not per canvas position; compute them with canvas_means(model, tasks)")
        if layout != target.layout.key:
            raise ValueError(f"these means are of canvases '{layout}', the target canvases are '{target.layout.key}'; "
                             "compute the means on canvases of the same layout")
        if tuple(means.layers) not in ((), tuple(range(info.n_layers))):
            raise ValueError(f"these means cover layers {means.layers}; patching needs all {info.n_layers} (layers=None)")
        table, names = means.z_mean, list(means.tasks)
    else:
        table = torch.as_tensor(means)
        if table.ndim == 4:
            table = table[None]
        names = list(tasks or target.task_names)
        if table.shape[0] != len(names):
            raise ValueError(f"{table.shape[0]} rows of means but {len(names)} task names; pass tasks= naming each row")
    if tuple(table.shape[1:]) != shape:
        raise ValueError(f"means have [layer, head, pos, d_head] = {list(table.shape[1:])}, but this model and canvas need "
                         f"{list(shape)}; compute them with canvas_means on this model and layout")
    return table.detach().cpu(), names


def pairs_mask(indices: Tensor | Sequence[int], shape: tuple[int, int, int]) -> Float[Tensor, "layer head pos"]:
    """A 0/1 ``[layer, head, pos]`` mask with the flat (layer, head, pos) ``indices`` set."""
    m = torch.zeros(math.prod(shape))
    idx = torch.as_tensor(indices, dtype=torch.long).reshape(-1)
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= m.numel()):
        raise ValueError(f"pair indices must lie in 0..{m.numel() - 1} for [layer, head, pos] = {list(shape)}")
    m[idx] = 1.0
    return m.reshape(shape)


def topk_pairs(rho: VisualTaskness, k: int) -> Float[Tensor, "layer head pos"]:
    """The ``k`` (layer, head, position) pairs of highest ρ_token, as a mask."""
    return pairs_mask(rho.top_pairs(k), tuple(rho.per_position.shape))


def random_pairs(shape: tuple[int, int, int], k: int, n: int, *, seed: int = 0) -> Float[Tensor, "draw layer head pos"]:
    """``n`` masks of ``k`` random pairs each (``torch.Generator(seed)``)."""
    gen = torch.Generator().manual_seed(seed)
    total = math.prod(shape)
    return torch.stack([pairs_mask(torch.randperm(total, generator=gen)[:k], shape) for _ in range(n)])


# ==============================================================================================
# selection over (head, position) pairs
# ==============================================================================================


@dataclass(frozen=True, eq=False)
class PairSelection(Saved, Plotted, WithMeta, Tabular):
    """A set of (layer, head, position) pairs chosen by ``method``, and what it cost.

    ``weights`` ``[layer, head, pos]``: what is patched (α for ``soft``, 0/1 otherwise);
    ``probabilities``: the Bernoulli ``p`` (REINFORCE), α (soft), or the mask; ``curve``: the objective
    per step; ``evaluations``: masks evaluated on the selection canvases (each one forward of them).
    """

    method: str
    weights: Float[Tensor, "layer head pos"]
    probabilities: Float[Tensor, "layer head pos"]
    curve: Float[Tensor, " step"]
    evaluations: int
    tasks: tuple[str, ...]
    seconds: float = 0.0
    meta: ResultMeta = field(default_factory=ResultMeta)

    @property
    def mask(self) -> Tensor:
        return self.weights > 0.5

    @property
    def k(self) -> int:
        return int(self.mask.sum())

    def records(self) -> list[dict[str, Any]]:
        """One row per selected (layer, head, position) pair: its weight and probability."""
        return [{"method": self.method, "layer": int(l), "head": int(h), "pos": int(q),
                 "weight": float(self.weights[l, h, q]), "probability": float(self.probabilities[l, h, q])}
                for l, h, q in self.mask.nonzero().tolist()]

    def __repr__(self) -> str:
        return (f"PairSelection(method={self.method!r}, k={self.k}, tasks={list(self.tasks)}, evaluations={self.evaluations}, "
                f"final objective={float(self.curve[-1]) if self.curve.numel() else float('nan'):.4g})")

    def plot(self):
        """Pairs selected per (layer, head): a layers × heads heatmap of counts of positions."""
        from ..plot import layer_head_heatmap

        return layer_head_heatmap(self.mask.sum(-1).float(), title=f"{self.method}: positions selected per head (k={self.k})",
                                  zlabel="positions", transpose=True)


def _space(candidates: Tensor | None, shape: tuple[int, int, int]) -> Tensor:
    total = math.prod(shape)
    if candidates is None:
        return torch.arange(total)
    idx = torch.as_tensor(candidates, dtype=torch.long).reshape(-1)
    if idx.numel() == 0 or int(idx.min()) < 0 or int(idx.max()) >= total or idx.unique().numel() != idx.numel():
        raise ValueError(f"candidates must be distinct flat pair indices in 0..{total - 1} (e.g. rho.top_pairs(1024)); "
                         f"got {idx.numel()} indices")
    return idx


def _full(sub: Tensor, space: Tensor, shape: tuple[int, int, int]) -> Tensor:
    """``[S, n_candidates]`` weights -> ``[S, layer, head, pos]`` masks."""
    out = torch.zeros(sub.shape[0], math.prod(shape), dtype=sub.dtype, device=sub.device)
    out[:, space.to(sub.device)] = sub
    return out.reshape(sub.shape[0], *shape)


def _logit_run(obj: CanvasPatch, candidates: Tensor | None, init_logit: float, *, lr: float, seed: int, steps: int,
               progress: bool, desc: str, label: str) -> tuple[Tensor, Tensor, Any, float]:
    """The candidate space, one logit θ per candidate (from ``init_logit``) and the Adam loop that trains it."""
    from .selection import _Run

    space = _space(candidates, obj.shape)
    theta = torch.full((space.numel(),), float(init_logit), requires_grad=True)
    run = _Run(theta, lr=lr, seed=seed, patience=None, tol=0.0, steps=steps, checkpoint=None, checkpoint_every=steps,
               info=obj.info, config={}, desc=desc, progress=progress, label=label, threshold=0.5)
    return space, theta, run, time.perf_counter()


def _finish(method: str, weights: Tensor, probs: Tensor, curve: list[float], evals: int, obj: CanvasPatch, t0: float,
            **meta: Any) -> PairSelection:
    return PairSelection(method, weights.detach().float().cpu(), probs.detach().float().cpu(), torch.tensor(curve),
                         evals, obj.target.task_names, time.perf_counter() - t0,
                         {"model": obj.info.name, "config_hash": obj.info.config_hash, **meta})


def reinforce_pairs(obj: CanvasPatch, *, candidates: Tensor | None = None, steps: int = 60, samples: int = 8,
                    lr: float = 0.1, init_logit: float = -1.0, sparsity: float = 0.0, metric: str = "logprob",
                    seed: int = 0, progress: bool = PROGRESS) -> PairSelection:
    """REINFORCE over (layer, head, position) pairs (Hojel et al. 2024, §3.2).

    One Bernoulli per candidate pair, ``p = sigmoid(θ)`` (θ from ``init_logit``); each step samples
    ``samples`` masks, scores them in one batched forward — the reward ``R(m)`` is the mean
    log-likelihood of the target cell's codes (``metric``) on the canvases of ``obj`` patched at the
    mask — and takes an Adam step on ``−mean_s (R(m_s) − b) log p_θ(m_s) + sparsity · Σ p``, the
    baseline ``b`` being the mean reward of the step's samples.  ``sparsity`` is the size penalty
    (per pair, in reward units).  The final mask is ``p > 0.5``; ``steps × samples`` evaluations.
    """
    space, theta, run, t0 = _logit_run(obj, candidates, init_logit, lr=lr, seed=seed, steps=steps, progress=progress,
                                       desc="reinforce_pairs", label="reward")
    try:
        while run.running:
            with torch.no_grad():
                m = torch.bernoulli(torch.sigmoid(theta).expand(samples, -1), generator=run.gen)
            r = obj.reward(_full(m, space, obj.shape), metric).float()
            log_p = (m * F.logsigmoid(theta) + (1 - m) * F.logsigmoid(-theta)).sum(1)
            loss = -((r - r.mean()) * log_p).mean() + sparsity * torch.sigmoid(theta).sum()
            run.opt.zero_grad()
            loss.backward()
            run.opt.step()
            run.end_step(float(r.mean() - sparsity * m.sum(1).mean()))
    finally:
        run.bar.close()
    p = torch.sigmoid(theta.detach())
    return _finish("reinforce", _full((p > 0.5).float()[None], space, obj.shape)[0], _full(p[None], space, obj.shape)[0],
                   run.curve, steps * samples, obj, t0, sparsity=sparsity, lr=lr, samples=samples, steps=steps,
                   init_logit=init_logit, candidates=space.numel())


def soft_pairs(obj: CanvasPatch, *, candidates: Tensor | None = None, steps: int = 40, lr: float = 0.1,
               init_logit: float = -1.0, l1: float = 0.0, seed: int = 0, progress: bool = PROGRESS) -> PairSelection:
    """A soft weight α = sigmoid(θ) per pair, ``z ← lerp(z, mean, α)``, trained by gradient descent on
    ``−mean log p(target codes) + l1 · Σ α`` through the frozen model (a relaxation of Hojel et al.'s
    binary masks).  Each step is one forward and one backward (counted as 3 evaluations)."""
    space, theta, run, t0 = _logit_run(obj, candidates, init_logit, lr=lr, seed=seed, steps=steps, progress=progress,
                                       desc="soft_pairs", label="logprob")
    try:
        while run.running:
            alpha = torch.sigmoid(theta)
            lp = _metric(obj.logits(_full(alpha[None], space, obj.shape)), obj.targets, "logprob").mean()
            loss = -lp + l1 * alpha.sum()
            run.opt.zero_grad()
            loss.backward()
            run.opt.step()
            run.end_step(float(lp.detach()))
    finally:
        run.bar.close()
    a = torch.sigmoid(theta.detach())
    full = _full(a[None], space, obj.shape)[0]
    return _finish("soft", full, full, run.curve, 3 * steps, obj, t0, l1=l1, lr=lr, steps=steps, candidates=space.numel())


def cma_pairs(obj: CanvasPatch, *, candidates: Tensor | None = None, budget: int = 480, popsize: int = 8,
              sigma0: float = 0.5, x0: float = 0.0, sparsity: float = 0.0, metric: str = "logprob", seed: int = 0,
              diagonal: bool | None = None, progress: bool = PROGRESS) -> PairSelection:
    """CMA-ES (the ``cma`` package) over one real number per candidate pair, the mask being ``x > 0``
    (Hojel et al. 2024's CMA baseline); fitness = reward − ``sparsity`` · |mask|, each generation's
    ``popsize`` masks evaluated in one batched forward; ``budget`` evaluations in all.  ``diagonal``
    (default: above 256 candidates) uses the separable (diagonal-covariance) variant, whose update
    stays linear in the number of pairs."""
    import cma

    space = _space(candidates, obj.shape)
    n = space.numel()
    diagonal = n > 256 if diagonal is None else diagonal
    with _own_numpy_rng():
        return _cma_search(obj, space, cma, budget=budget, popsize=popsize, sigma0=sigma0, x0=x0, sparsity=sparsity,
                           metric=metric, seed=seed, diagonal=diagonal)


@contextlib.contextmanager
def _own_numpy_rng() -> Any:
    """``cma`` seeds and draws from numpy's global generator: put the user's state back afterwards."""
    state = np.random.get_state()
    try:
        yield
    finally:
        np.random.set_state(state)


def _cma_search(obj: CanvasPatch, space: Tensor, cma: Any, *, budget: int, popsize: int, sigma0: float, x0: float,
                sparsity: float, metric: str, seed: int, diagonal: bool) -> PairSelection:
    n = space.numel()
    es = cma.CMAEvolutionStrategy(np.full(n, float(x0)), sigma0, {"popsize": popsize, "seed": seed + 1, "verbose": -9,
                                                                  "CMA_diagonal": diagonal})
    best, best_x, curve, evals = -math.inf, np.full(n, float(x0)), [], 0
    t0 = time.perf_counter()
    while evals + popsize <= budget:
        xs = es.ask()
        m = torch.tensor(np.stack(xs) > 0, dtype=torch.float32)
        fit = obj.reward(_full(m, space, obj.shape), metric).float() - sparsity * m.sum(1)
        es.tell(xs, (-fit).tolist())
        evals += popsize
        i = int(fit.argmax())
        if float(fit[i]) > best:
            best, best_x = float(fit[i]), xs[i]
        curve.append(float(fit.mean()))
    w = torch.tensor(np.asarray(best_x) > 0, dtype=torch.float32)
    full = _full(w[None], space, obj.shape)[0]
    return _finish("cma", full, full, curve, evals, obj, t0, sparsity=sparsity, popsize=popsize, sigma0=sigma0,
                   diagonal=diagonal, candidates=n, best=best)


def grs_pairs(obj: CanvasPatch, *, candidates: Tensor | None = None, budget: int = 480, samples: int = 8,
              flip: float = 0.02, init_p: float = 0.27, sparsity: float = 0.0, metric: str = "logprob",
              seed: int = 0, progress: bool = PROGRESS) -> PairSelection:
    """Greedy random search (Hojel et al. 2024's GRS baseline): from a random mask (``init_p`` per
    pair, the REINFORCE start ``sigmoid(−1)``), each step proposes ``samples`` masks that flip a random
    ``flip`` fraction of the pairs, evaluates them in one batched forward and moves to the best if it
    improves the objective (reward − ``sparsity`` · |mask|); ``budget`` evaluations in all."""
    space = _space(candidates, obj.shape)
    n = space.numel()
    gen = torch.Generator().manual_seed(seed)
    cur = (torch.rand(n, generator=gen) < init_p).float()
    score = lambda m: obj.reward(_full(m, space, obj.shape), metric).float() - sparsity * m.sum(1)  # noqa: E731
    best = float(score(cur[None])[0])
    evals, curve = 1, [best]
    n_flip = max(1, round(flip * n))
    t0 = time.perf_counter()
    while evals + samples <= budget:
        props = cur.expand(samples, -1).clone()
        for s in range(samples):
            idx = torch.randperm(n, generator=gen)[:n_flip]
            props[s, idx] = 1 - props[s, idx]
        fit = score(props)
        evals += samples
        i = int(fit.argmax())
        if float(fit[i]) > best:
            best, cur = float(fit[i]), props[i]
        curve.append(best)
    full = _full(cur[None], space, obj.shape)[0]
    return _finish("grs", full, full, curve, evals, obj, t0, sparsity=sparsity, samples=samples, flip=flip, candidates=n)


# ==============================================================================================
# top-k vs random vs wrong-task means; ρ per head beside its effect
# ==============================================================================================


@dataclass(frozen=True, eq=False)
class TopkCurve(Saved, Plotted, WithMeta, Tabular):
    """No-example canvases patched at the top-k ρ pairs, at k random pairs (mean of draws) and at the
    top-k pairs with another task's means, per k, per task and metric (Hojel et al. 2024, §4.2); with
    the unpatched baseline, 1-shot ICL, and the share of the ICL − baseline gap each recovers.

    ``values[kind][metric]`` is ``[task, k]`` (``kind`` one of ``top``, ``random``, ``wrong``; ``metric``
    one of :data:`SCORES`), ``base[metric]`` and ``icl_scores[metric]`` are ``[task]``; row ``-1`` of
    every table is the mean over tasks (``tasks[-1] == "mean"``).  ``top``, ``random``, ``wrong``,
    ``baseline`` and ``icl`` are the task-mean code accuracies.
    """

    ks: tuple[int, ...]
    tasks: tuple[str, ...]
    values: dict[str, dict[str, Tensor]]
    base: dict[str, Tensor]
    icl_scores: dict[str, Tensor] | None = None
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        """One row per (kind, metric, task, k): the patched score, beside the task's baseline and ICL."""
        rows = []
        for kind, by_metric in self.values.items():
            for metric, table in by_metric.items():
                for t, task in enumerate(self.tasks):
                    for j, k in enumerate(self.ks):
                        rows.append({"kind": kind, "metric": metric, "task": task, "k": k, "value": float(table[t, j]),
                                     "baseline": float(self.base[metric][t]),
                                     "icl": float(self.icl_scores[metric][t]) if self.icl_scores else float("nan")})
        return rows

    @property
    def top(self) -> Tensor:
        return self.values["top"]["accuracy"][-1]

    @property
    def random(self) -> Tensor:
        return self.values["random"]["accuracy"][-1]

    @property
    def wrong(self) -> Tensor:
        return self.values["wrong"]["accuracy"][-1]

    @property
    def baseline(self) -> float:
        return float(self.base["accuracy"][-1])

    @property
    def icl(self) -> float:
        return float(self.icl_scores["accuracy"][-1]) if self.icl_scores else float("nan")

    def gap(self, kind: str = "top", metric: str = "accuracy") -> Float[Tensor, "task k"]:
        """Share of the ICL − baseline gap recovered, ``[task, k]`` (the mean row: of the task means)."""
        if not self.icl_scores:
            raise ValueError("no ICL scores: pass icl= to topk_curve to measure the gap")
        base, icl = self.base[metric][:, None], self.icl_scores[metric][:, None]
        return (self.values[kind][metric] - base) / (icl - base).clamp_min(1e-9)

    def recovered(self, acc: Tensor | float) -> Tensor:
        return (torch.as_tensor(acc) - self.baseline) / max(self.icl - self.baseline, 1e-9)

    def best_k(self, share: float = 0.9, metric: str = "accuracy") -> int | None:
        """The smallest k whose top-k pairs recover ``share`` of the task-mean gap (None: no k does)."""
        g = self.gap("top", metric)[-1]
        return next((k for k, v in zip(self.ks, g.tolist()) if v >= share), None)

    def rows(self) -> list[tuple]:
        return [(k, float(t), float(self.recovered(t)), float(r), float(self.recovered(r)), float(w))
                for k, t, r, w in zip(self.ks, self.top, self.random, self.wrong)]

    def table(self, metric: str = "accuracy") -> str:
        """Task means per k: top-k ρ, k random, wrong-task means, each with its share of the gap."""
        base, icl = float(self.base[metric][-1]), float(self.icl_scores[metric][-1]) if self.icl_scores else float("nan")
        lines = [f"{metric}: baseline {base:.3f}  ICL {icl:.3f}",
                 f"{'k':>6} {'top-k ρ':>8} {'gap':>6} {'random':>8} {'gap':>6} {'wrong-task':>10} {'gap':>6}"]
        vals = {kind: self.values[kind][metric][-1] for kind in ("top", "random", "wrong")}
        gaps = {kind: self.gap(kind, metric)[-1] if self.icl_scores else vals[kind] * math.nan for kind in vals}
        for j, k in enumerate(self.ks):
            lines.append(f"{k:>6} {float(vals['top'][j]):>8.3f} {float(gaps['top'][j]):>6.0%} {float(vals['random'][j]):>8.3f} "
                         f"{float(gaps['random'][j]):>6.0%} {float(vals['wrong'][j]):>10.3f} {float(gaps['wrong'][j]):>6.0%}")
        return "\n".join(lines)

    def task_table(self, kind: str = "top", metric: str = "accuracy") -> str:
        """Share of the gap per task (rows) and k (columns), with the task's baseline and ICL."""
        g = self.gap(kind, metric)
        lines = [f"{kind}, {metric}: share of the ICL − baseline gap",
                 f"{'task':<10}{'base':>7}{'ICL':>7}" + "".join(f"{k:>7}" for k in self.ks)]
        for i, t in enumerate(self.tasks):
            lines.append(f"{t:<10}{float(self.base[metric][i]):>7.3f}{float(self.icl_scores[metric][i]):>7.3f}"
                         + "".join(f"{float(v):>7.0%}" for v in g[i]))
        return "\n".join(lines)

    def plot(self, metric: str = "accuracy"):
        from ..plot import line_plot

        label = {"accuracy": "code accuracy", "exact": "exact-cell accuracy", "changed": "changed-code accuracy"}[metric]
        hl = {"no example": float(self.base[metric][-1])}
        if self.icl_scores:
            hl["1-shot ICL"] = float(self.icl_scores[metric][-1])
        fig = line_plot(list(self.ks), {"top-k ρ pairs": self.values["top"][metric][-1],
                                        "k random pairs": self.values["random"][metric][-1],
                                        "top-k, another task's means": self.values["wrong"][metric][-1]},
                        hlines=hl, xlabel="k (layer, head, position) pairs, log scale", ylabel=label,
                        title=f"Task means patched into canvases without examples<br><sup>{label}, mean over "
                              f"{len(self.tasks) - 1} tasks, {self.meta.get('n_canvases', '?')} held-out canvases</sup>")
        return fig.update_xaxes(type="log")


def _score_table(scores: Mapping[str, Mapping[str, Tensor]], tasks: Sequence[str]) -> dict[str, Tensor]:
    """``{metric: {task: [column]}}`` -> ``{metric: [task (+ mean), column]}``."""
    return {m: torch.stack([v[t] for t in (*tasks, "mean")]) for m, v in scores.items()}


def topk_curve(obj: CanvasPatch, wrong: CanvasPatch, rho: VisualTaskness, ks: Sequence[int], *,
               icl: CanvasBatch | Mapping[str, Mapping[str, float]] | None = None, n_random: int = 3,
               seed: int = 0) -> TopkCurve:
    """Top-k ρ pairs vs k random pairs (``n_random`` draws) vs the top-k with ``wrong``'s means (the
    same canvases patched with another task's means), all k in batched forwards, scored by code,
    exact-cell and changed-code accuracy per task (Hojel et al. 2024, §4.2).

    ``icl``: the 1-shot canvases of the same queries (scored here, unpatched), or their scores
    ``{metric: {task: value}}`` — the top of the gap.
    """
    shape = obj.shape
    ks = tuple(int(k) for k in ks)
    names = obj.target.task_names
    top = torch.stack([topk_pairs(rho, k) for k in ks])
    rnd = torch.cat([random_pairs(shape, k, n_random, seed=seed + i) for i, k in enumerate(ks)])
    both = _score_table(obj.scores(torch.cat([torch.zeros(1, *shape), top, rnd])), names)
    values = {"top": {m: v[:, 1:1 + len(ks)] for m, v in both.items()},
              "random": {m: v[:, 1 + len(ks):].reshape(len(names) + 1, len(ks), n_random).mean(-1) for m, v in both.items()},
              "wrong": _score_table(wrong.scores(top), names)}
    base = {m: v[:, 0] for m, v in both.items()}
    icl_scores = None
    if isinstance(icl, CanvasBatch):
        pred, sc = _icl_scores(obj.model, icl)
        icl_scores = {"accuracy": sc.code_acc, "exact": sc.exact, "changed": sc.changed}
        icl_scores = {m: torch.tensor([_by_task(icl, v)[t] for t in (*names, "mean")]) for m, v in icl_scores.items()}
    elif icl is not None:
        icl_scores = {m: torch.tensor([float(icl[m][t]) for t in (*names, "mean")]) for m in SCORES}
    return TopkCurve(ks, (*names, "mean"), values, base, icl_scores, {"n_random": n_random, "n_canvases": len(obj)})


@dataclass(frozen=True, eq=False)
class HeadEffects:
    """ρ per head beside the code accuracy of patching that head alone at every canvas position."""

    rho: Float[Tensor, "layer head"]
    accuracy: Float[Tensor, "layer head"]
    baseline: float

    @property
    def effect(self) -> Tensor:
        return self.accuracy - self.baseline

    def rows(self, k: int = 8) -> list[tuple[int, int, float, float]]:
        order = _rank(self.rho)[:k].tolist()
        H = self.rho.shape[1]
        return [(i // H, i % H, float(self.rho.reshape(-1)[i]), float(self.effect.reshape(-1)[i])) for i in order]

    def table(self, k: int = 8) -> str:
        lines = [f"{'head':>6} {'ρ':>9} {'Δ code acc (alone, all positions)':>34}"]
        lines += [f"  L{l}H{h} {r:>9.3g} {e:>+34.3f}" for l, h, r, e in self.rows(k)]
        best = int(self.effect.reshape(-1).argmax())
        H = self.rho.shape[1]
        lines.append(f"largest effect: L{best // H}H{best % H} {float(self.effect.reshape(-1)[best]):+.3f} "
                     f"(ρ {float(self.rho.reshape(-1)[best]):.3g}); baseline {self.baseline:.3f}")
        return "\n".join(lines)

    def plot(self):
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go

        fig = make_subplots(rows=1, cols=2, subplot_titles=["log10 ρ per head", "Δ code accuracy, head patched at every position"])
        fig.add_trace(go.Heatmap(z=self.rho.clamp_min(1e-12).log10().T.numpy(), colorscale="Viridis", showscale=False), 1, 1)
        fig.add_trace(go.Heatmap(z=self.effect.T.numpy(), colorscale="RdBu", zmid=0), 1, 2)
        fig.update_xaxes(title_text="layer", dtick=1)
        fig.update_yaxes(title_text="head", dtick=1, autorange="reversed")
        fig.update_layout(title="ρ_token per head beside its patching effect", width=900, height=380)
        return fig


def head_effects(obj: CanvasPatch, rho: VisualTaskness) -> HeadEffects:
    """Patch each head's task means at every position, one head per mask (all heads in batched forwards)."""
    L, H, P = obj.shape
    masks = torch.zeros(L * H, L, H, P)
    for i in range(L * H):
        masks[i, i // H, i % H] = 1.0
    acc = obj.per_task(masks)["mean"].reshape(L, H)
    base = float(obj.per_task(torch.zeros(1, L, H, P))["mean"][0])
    return HeadEffects(rho.scores, acc, base)


# ==============================================================================================
# vector arithmetic
# ==============================================================================================


@dataclass(frozen=True, eq=False)
class Arithmetic:
    """What canvases patched with ``means[a] + (means[b] − means[c])`` show: the agreement of the
    predicted cell with each task (and composition of two tasks) applied to the query."""

    formula: str
    agreement: dict[str, float]
    predictions: Int[Tensor, "batch query"]
    target: CanvasBatch
    truths: dict[str, Tensor] = field(default_factory=dict)  # name -> [batch, query] codes of the query so transformed

    def plot(self, rows: int = 4):
        """The patched canvases beside the query as ``a`` would make it and as the best match would."""
        best = self.best(1)[0][0]
        cols = {self.formula: (self.target, self.predictions), f"{self.target.task} (truth)": (self.target, None)}
        if best != self.target.task:
            cols[f"best match: {best}"] = (replace(self.target, targets=self.truths[best]), None)
        return canvas_pictures(cols, rows=rows, title=f"Vector arithmetic<br><sup>{self.table(3)}</sup>")

    def best(self, n: int = 5) -> list[tuple[str, float]]:
        return sorted(self.agreement.items(), key=lambda kv: -kv[1])[:n]

    def table(self, n: int = 6) -> str:
        return f"{self.formula}: " + ", ".join(f"{name} {v:.3f}" for name, v in self.best(n))


def task_arithmetic(model: Any, stats: HeadStats, a: str, b: str, c: str, mask: Tensor, *, n: int = 16, seed: int = 7,
                    examples: str = "masked") -> Arithmetic:
    """Patch ``mean_a + (mean_b − mean_c)`` at ``mask`` into canvases without examples (Hojel et al. 2024,
    §5, task composition) and score the predicted cell against every task, and every composition of
    two of ``a, b, c``, applied to the query image."""
    for t in (a, b, c):
        _resolve_visual_tasks([t])
    target = canvases(a, n, examples=examples, seed=seed)
    from ..models import ModelInfo

    table, names = _means_table(stats, None, ModelInfo.of(model), target)
    value = table[names.index(a)] + table[names.index(b)] - table[names.index(c)]
    obj = CanvasPatch(model, target, stats, value=value)
    pred = obj.predictions(mask[None])[:, 0]
    queries = target.cells()[:, -2]
    truths: dict[str, Callable[[Any], Any]] = {t: (lambda q, t=t: apply_task(t, q)) for t in VISUAL_TASKS}
    for t1 in (a, b, c):
        for t2 in (a, b, c):
            if t1 != t2:
                truths[f"{t2}∘{t1}"] = lambda q, t1=t1, t2=t2: apply_task(t2, apply_task(t1, q))
    agreement, codes = {}, {}
    for name, fn in truths.items():
        codes[name] = torch.stack([torch.from_numpy(fn(q.numpy())).reshape(-1) for q in queries])
        agreement[name] = float((pred == codes[name]).float().mean())
    return Arithmetic(f"{a} + ({b} − {c})", agreement, pred, target, codes)


# ==============================================================================================
# pictures
# ==============================================================================================


def canvas_pictures(columns: Mapping[str, tuple[CanvasBatch, Tensor | None]], *, rows: int = 2, title: str = ""):
    """A grid of canvas pictures: one column per entry of ``columns`` (``name -> (canvases, predicted
    codes [batch, query] or None for the ground truth)``), ``rows`` canvases of each task (Figs. 3–4)."""
    from plotly.subplots import make_subplots
    import plotly.graph_objects as go

    names = list(columns)
    first = columns[names[0]][0]
    picks = [i for t in first.task_names for i in [j for j, tt in enumerate(first.tasks) if tt == t][:rows]]
    fig = make_subplots(rows=len(picks), cols=len(names), horizontal_spacing=0.01, vertical_spacing=0.004,
                        column_titles=names, row_titles=[first.tasks[i] for i in picks])
    for r, i in enumerate(picks):
        for c, name in enumerate(names):
            batch, pred = columns[name]
            answer = batch.targets[i] if pred is None else pred[i]
            pic = batch.picture(i, answer=answer).repeat(6, 0).repeat(6, 1)
            fig.add_trace(go.Image(source=_png_uri(pic), hoverinfo="skip"), row=r + 1, col=c + 1)
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    fig.update_annotations(font_size=11)
    fig.update_layout(title=title or "Canvases: the masked cell as each method fills it", width=150 * len(names) + 120,
                      height=150 * len(picks) + 110, margin=dict(t=80, l=10, r=60, b=10))
    return fig


def _png_uri(pic: np.ndarray) -> str:
    """An RGB ``uint8`` array as a PNG data URI (flat colour blocks compress to a few hundred bytes)."""
    import base64
    import struct
    import zlib

    h, w, _ = pic.shape
    raw = b"".join(b"\x00" + pic[y].tobytes() for y in range(h))  # filter type 0 per scanline

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


# ==============================================================================================
# the study
# ==============================================================================================


@dataclass(frozen=True, eq=False)
class VisualStudy:
    """Everything :func:`visual_study` measured: baselines, ρ, the top-k curve, ρ per head beside its
    effect, the selection comparison (per task and multi-task, held-out canvases), arithmetic and
    pictures."""

    tasks: tuple[str, ...]
    baselines: dict[str, dict[str, float]]  # variant -> task -> code accuracy (and "mean")
    exact: dict[str, dict[str, float]]
    changed: dict[str, dict[str, float]]  # variant -> task -> accuracy on the codes the task changes
    rho: VisualTaskness
    curve: TopkCurve
    heads: HeadEffects
    comparison: list[dict[str, Any]]  # one row per (method, group)
    selections: dict[str, dict[str, PairSelection]]
    arithmetic: list[Arithmetic]
    figures: dict[str, Any]
    settings: dict[str, Any]
    seconds: float

    def baseline_table(self, metric: str = "accuracy") -> str:
        """Unpatched canvases per task: ``accuracy`` (code), ``exact`` (whole cell) or ``changed`` (changed codes)."""
        table = {"accuracy": self.baselines, "exact": self.exact, "changed": self.changed}[metric]
        head = f"{'task':<10}" + "".join(f"{v:>16}" for v in table)
        lines = [head]
        for t in [*self.tasks, "mean"]:
            lines.append(f"{t:<10}" + "".join(f"{table[v][t]:>16.3f}" for v in table))
        return "\n".join(lines)

    def comparison_table(self) -> str:
        cols = [*self.tasks, "mean"]
        lines = [f"{'method':<28}{'group':<11}{'k':>6}{'evals':>7}" + "".join(f"{c[:9]:>10}" for c in cols)]
        for row in self.comparison:
            lines.append(f"{row['method']:<28}{row['group']:<11}{row['k']:>6}{row['evaluations']:>7}"
                         + "".join(f"{row['acc'].get(c, float('nan')):>10.3f}" for c in cols))
        return "\n".join(lines)

    def text(self) -> str:
        s = self.settings
        parts = [f"visual study — {s.get('model')} · {len(self.tasks)} tasks · {self.seconds:.0f}s", "",
                 "code accuracy on held-out canvases:", self.baseline_table(), "",
                 "exact-cell accuracy:", self.baseline_table("exact"), "",
                 "changed-code accuracy:", self.baseline_table("changed"), "",
                 "top-k ρ pairs vs random vs wrong-task means (multi-task, no-example canvases):",
                 *[self.curve.table(m) for m in SCORES], "",
                 "ρ per head beside its patching effect:", self.heads.table(), "",
                 f"selection at a limited budget (candidates: top {s['candidates']} pairs by ρ; {s['budget']} evaluations each "
                 f"multi-task, {s['task_budget']} per task; "
                 f"held-out code accuracy):", self.comparison_table(), "",
                 "vector arithmetic (agreement of the patched cell with each task applied to the query):",
                 *[a.table() for a in self.arithmetic]]
        return "\n".join(parts)

    def save_figures(self, out: str | Path, *, png: bool = True) -> list[Path]:
        from ..plot import save_figure

        written: list[Path] = []
        for name, fig in self.figures.items():
            written += save_figure(fig, Path(out) / name, png=png)
        return written

    def to_html(self, path: str | Path) -> Path:
        """One page: the report section of this study (figures interactive, ``plotly.min.js`` beside it)."""
        from .. import __version__
        from ..plot import write_plotlyjs
        from ..report import render_html
        from ..results import atomic_write_text

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_plotlyjs(path.parent)
        s = self.settings
        meta = {"model": s.get("model"), "shape": s.get("shape", ""), "config_hash": s.get("config_hash", ""),
                "tasks": list(self.tasks), "n_shots": 1, "seed": s.get("seed"), "version": __version__,
                "seconds": self.seconds, "command": s.get("command", "tvlens visual")}
        atomic_write_text(path, render_html([self.section()], title=f"Visual task vectors — {s.get('model')}", meta=meta))
        return path

    def section(self):
        """The report section (:class:`tvlens.report.Section`) of this study."""
        from ..report import Section

        s = self.settings
        cmp_head = ("method", "group", "k", "evaluations", *self.tasks, "mean")
        table = [cmp_head] + [(r["method"], r["group"], str(r["k"]), str(r["evaluations"]),
                               *(f"{r['acc'].get(t, float('nan')):.3f}" for t in (*self.tasks, "mean"))) for r in self.comparison]
        b = self.baselines
        summary = (
            f"Canvases of {len(self.tasks)} image-to-image tasks on held-out images; code accuracy of the masked cell: "
            + "; ".join(f"{v} {b[v]['mean']:.3f}" for v in b) + ".",
            "Top-k ρ pairs (multi-task): " + ", ".join(f"k={k} {t:.3f} ({gt:.0%} of the gap), random {r:.3f} ({gr:.0%}), "
                                                       f"wrong-task {w:.3f}" for k, t, gt, r, gr, w in self.curve.rows()) + ".",
            "ρ per head beside its patching effect: " + "; ".join(f"L{l}H{h} ρ {r:.3g} Δ {e:+.3f}"
                                                                  for l, h, r, e in self.heads.rows(4)) + ".",
            f"Selection inside the top {s['candidates']} pairs by ρ, {s['budget']} evaluations (forwards of "
            f"{s['n_select']} canvases per task) per method; table: held-out code accuracy ({s['n_eval']} canvases per task).",
            "Vector arithmetic: " + " | ".join(a.table(4) for a in self.arithmetic),
        )
        return Section("visual", "Visual task vectors (canvases)", summary, tuple(self.figures.items()), tuple(table),
                       result=self)


def _icl_scores(model: Any, batch: CanvasBatch, rows: int = 32) -> tuple[Tensor, Any]:
    """ICL predictions and scores (code, exact, changed) of unpatched canvases, read by the engine's
    runner ``rows`` canvases per forward."""
    from ..engine.runner import PatchRunner

    with torch.no_grad():
        logits = [PatchRunner(model, batch.select(torch.arange(a, min(a + rows, len(batch))))).clean_logits
                  for a in range(0, len(batch), rows)]
    pred = predicted_codes(torch.cat(logits)).cpu()
    return pred, score_cells(pred, batch.targets, batch.query_codes)


def _by_task(batch: CanvasBatch, vals: Tensor) -> dict[str, float]:
    return {t: float(v) for t, v in _task_means(batch, vals).items()}


def visual_study(
    model: Any,
    tasks: Any = None,
    *,
    n_means: int = 32,
    n_select: int = 6,
    n_eval: int = 16,
    ks: Sequence[int] = (256, 512, 1024, 2048),
    candidates: int = 1024,
    budget: int = 320,
    task_budget: int | None = None,
    samples: int = 8,
    lr: float = 0.3,
    sparsity: float = 1e-3,
    methods: Sequence[str] = ("reinforce", "soft", "cma", "grs"),
    per_task: bool = True,
    noise: int = 4,
    arithmetic: Sequence[tuple[str, str, str]] = (("hflip", "invert", "gray"), ("recolor", "segment", "gray")),
    seed: int = 0,
    progress: bool = PROGRESS,
) -> VisualStudy:
    """Hojel et al. 2024 end to end on a canvas model, through tvlens's API.

    1. Baselines on ``n_eval`` held-out canvases per task: 1-shot ICL, ICL with ``noise`` corrupted
       cells in the example output, no example (masked row, black row).
    2. Task means of every (layer, head, position) over ``n_means`` 1-shot canvases per task
       (training images), ρ_token per pair and per head (§3).
    3. Top-k ρ pairs, k random pairs and the top-k with another task's means, patched into
       no-example canvases (multi-task: each canvas its own task's means); ρ per head beside the
       effect of patching that head at every position.
    4. Selection inside the ``candidates`` pairs of highest ρ at equal budgets of ``budget`` mask
       evaluations (``task_budget`` for the per-task selections; default ``budget``) on ``n_select``
       canvases per task (each evaluation one forward of those canvases):
       REINFORCE (Adam ``lr``) with a size penalty ``sparsity`` (§3.2), soft α, CMA-ES, GRS — multi-task, and per
       task when ``per_task``; each scored on the held-out canvases, beside the top-k ρ of the same k.
    5. Vector arithmetic ``a + (b − c)`` and pictures of every method's output (Figs. 3–4).
    """
    t0 = time.perf_counter()
    names = _resolve_visual_tasks(tasks)
    _check_task_count(len(names))  # ρ is the study's second step; refuse one task before the first
    unknown = [m for m in methods if m not in _STUDY_SEARCHES]
    if unknown:  # refused before the first forward, not when the loop reaches the method
        raise ValueError(f"unknown method(s) {unknown}; use some of {', '.join(_STUDY_SEARCHES)}")
    say = (lambda m: print(f"[visual] {m} ({time.perf_counter() - t0:.0f}s)", flush=True)) if progress else (lambda m: None)
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    ev = {v: concat([canvases(t, n_eval, examples=v, seed=seed + 1000) for t in names]) for v in ("shown", "masked", "blank")}
    ev["noisy"] = concat([canvases(t, n_eval, seed=seed + 1000, noise=noise) for t in names])
    preds, baselines, exact, changed = _study_baselines(model, ev, noise)
    say("baselines " + ", ".join(f"{k} {v['mean']:.3f}" for k, v in baselines.items()))

    stats = canvas_means(model, names, n=n_means, seed=seed)
    rho = visual_taskness(stats)
    say("means and ρ")
    wrong_map = {t: names[(i + 1) % len(names)] for i, t in enumerate(names)}
    target_ev = ev["masked"]
    obj_ev = CanvasPatch(model, target_ev, stats)
    obj_wrong = CanvasPatch(model, target_ev, stats, task_map=wrong_map)
    curve = topk_curve(obj_ev, obj_wrong, rho, ks, icl=ev["shown"], seed=seed)
    say("top-k curve\n" + curve.table())
    heads = head_effects(obj_ev, rho)
    say("head effects")

    space = rho.top_pairs(candidates)
    groups = {"multi": names, **({t: [t] for t in names} if per_task else {})}
    search = dict(candidates=space, samples=samples, lr=lr, sparsity=sparsity, seed=seed, progress=progress)
    comparison, selections, patched_preds = [], {}, {}
    for group, g_tasks in groups.items():
        sel_batch = concat([canvases(t, n_select, examples="masked", seed=seed + 2000, split="train") for t in g_tasks])
        obj = CanvasPatch(model, sel_batch, stats)
        budget_g = budget if group == "multi" or task_budget is None else task_budget
        found = selections[group] = {m: _search_pairs(m, obj, budget=budget_g, **search) for m in methods}
        eval_rows = [i for i, t in enumerate(target_ev.tasks) if t in g_tasks]
        sub = obj_ev if group == "multi" else CanvasPatch(model, target_ev.select(eval_rows), stats)
        rows, weights = _selection_rows(found, rho, group)
        accs = sub.per_task(weights)
        comparison += [{**row, "acc": {t: float(v[j]) for t, v in accs.items()}} for row, j in rows]
        if group == "multi":
            pr = sub.predictions(weights[:len(found)])
            patched_preds = {m: pr[:, j] for j, m in enumerate(found)}
        say(f"selection [{group}] " + ", ".join(f"{m} k={s.k} {float(accs['mean'][j]):.3f}" for j, (m, s) in enumerate(found.items())))

    if noise:  # Hojel et al.'s claim, patched vs 1-shot: means of noisy canvases against one noisy example
        noisy = CanvasPatch(model, target_ev, canvas_means(model, names, n=n_means, seed=seed, noise=noise))
        comparison += _noisy_means_rows(noisy, rho, ks, selections["multi"].get("reinforce"), noise)
        say(f"noise-{noise} means")

    best_k = curve.best_k(0.9, "exact") or curve.ks[-1]
    arith = [task_arithmetic(model, stats, a, b, c, topk_pairs(rho, best_k)) for a, b, c in arithmetic
             if all(t in names for t in (a, b, c))]
    say("arithmetic")

    topk_pred = obj_ev.predictions(topk_pairs(rho, best_k)[None])[:, 0]
    cols = {"1-shot ICL": (ev["shown"], preds["shown"]), f"top-{best_k} ρ": (target_ev, topk_pred),
            **{f"{m} (k={selections['multi'][m].k})": (target_ev, p) for m, p in patched_preds.items()},
            "no example": (target_ev, preds["masked"]), "truth": (ev["shown"], None)}
    figures = {"visual_rho_heads": rho.plot(), "visual_rho_canvas": rho.plot_canvas(), "visual_rho_layers": rho.plot_layers(),
               "visual_topk": curve.plot(), "visual_heads": heads.plot(),
               "visual_canvases": canvas_pictures(cols, rows=1, title="Held-out canvases: ICL, patched (multi-task), no "
                                                  "example, truth")}
    for i, a in enumerate(arith):
        figures[f"visual_arithmetic_{i}"] = a.plot()
    settings = {"model": info.name, "config_hash": info.config_hash,
                "shape": f"{info.n_layers} layers × {info.n_heads} heads, d_model {info.d_model}", "n_means": n_means, "n_select": n_select, "n_eval": n_eval, "ks": list(ks),
                "candidates": candidates, "budget": budget, "task_budget": task_budget or budget, "samples": samples, "lr": lr, "sparsity": sparsity, "noise": noise,
                "seed": seed, "best_k": best_k}
    return VisualStudy(tuple(names), baselines, exact, changed, rho, curve, heads, comparison, selections, arith, figures, settings,
                       time.perf_counter() - t0)


def _study_baselines(model: Any, ev: Mapping[str, Any], noise: int) -> tuple[dict, dict, dict, dict]:
    """Predictions, and per-task code accuracy, exact-cell accuracy and accuracy on the changed codes, of
    the study's held-out canvases: 1-shot ICL, noisy ICL, masked and blank example rows."""
    labels = {"shown": "1-shot ICL", "noisy": f"ICL noise {noise}", "masked": "masked example", "blank": "blank example"}
    preds, baselines, exact, changed = {}, {}, {}, {}
    for v, b in ev.items():
        preds[v], sc = _icl_scores(model, b)
        label = labels[v]
        baselines[label], exact[label] = _by_task(b, sc.code_acc), _by_task(b, sc.exact)
        changed[label] = _by_task(b, sc.changed)
    return preds, baselines, exact, changed


_STUDY_SEARCHES = ("reinforce", "soft", "cma", "grs")


def _search_pairs(method: str, obj: Any, *, candidates: Any, budget: int, samples: int, lr: float, sparsity: float,
                  seed: int, progress: bool) -> PairSelection:
    """One (head, position) search of the study, at ``budget`` mask evaluations (Hojel et al. 2024, §3.2)."""
    if method == "reinforce":
        return reinforce_pairs(obj, candidates=candidates, steps=budget // samples, samples=samples, sparsity=sparsity,
                               seed=seed, init_logit=0.0, lr=lr, progress=progress)
    if method == "soft":
        return soft_pairs(obj, candidates=candidates, steps=max(1, budget // 3), l1=sparsity, seed=seed, init_logit=0.0,
                          lr=0.2, progress=progress)
    if method == "cma":
        return cma_pairs(obj, candidates=candidates, budget=budget, popsize=samples, sparsity=sparsity, seed=seed,
                         progress=progress)
    if method == "grs":
        return grs_pairs(obj, candidates=candidates, budget=budget, samples=samples, sparsity=sparsity, seed=seed,
                         init_p=0.5, progress=progress)
    raise ValueError(f"unknown method {method!r}; use some of {', '.join(_STUDY_SEARCHES)}")


def _selection_rows(found: Mapping[str, PairSelection], rho: VisualTaskness,
                    group: str) -> tuple[list[tuple[dict[str, Any], int]], Float[Tensor, "mask layer head pos"]]:
    """One group's comparison rows — each selection beside the top-k ρ of its k, then soft α > 0.5 as a
    0/1 mask — each with the index of its mask in the stack returned beside them."""
    extra = [("soft, α > 0.5 as a 0/1 mask", found["soft"].mask.float())] if "soft" in found else []
    weights = torch.stack([s.weights for s in found.values()] + [topk_pairs(rho, max(1, s.k)) for s in found.values()]
                          + [w for _, w in extra])
    n = len(found)
    rows: list[tuple[dict[str, Any], int]] = []  # (row, its column of weights), each selection beside its top-k ρ
    for j, (m, s) in enumerate(found.items()):
        rows.append(({"method": m, "group": group, "k": s.k, "evaluations": s.evaluations, "seconds": s.seconds}, j))
        rows.append(({"method": f"top-k ρ (k of {m})", "group": group, "k": max(1, s.k), "evaluations": 0}, n + j))
    rows += [({"method": name, "group": group, "k": int(w.sum()), "evaluations": 0}, 2 * n + j)
             for j, (name, w) in enumerate(extra)]
    return rows, weights


def _noisy_means_rows(noisy: Any, rho: VisualTaskness, ks: Sequence[int], reinforce: PairSelection | None,
                      noise: int) -> list[dict[str, Any]]:
    """Comparison rows of top-k ρ (every k, and all pairs) and of REINFORCE's mask, patched with the
    means of noisy canvases."""
    n_all = rho.per_position.numel()
    rows = [(f"top-k ρ, noise-{noise} means", k, topk_pairs(rho, k)) for k in (*ks, n_all)]
    if reinforce is not None:
        rows.append((f"reinforce, noise-{noise} means", reinforce.k, reinforce.weights))
    acc = noisy.per_task(torch.stack([w for *_, w in rows]))
    return [{"method": name, "group": "multi", "k": int(k), "evaluations": 0, "acc": {t: float(v[j]) for t, v in acc.items()}}
            for j, (name, k, _) in enumerate(rows)]
