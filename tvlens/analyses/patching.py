"""Activation-patching sweeps over heads and positions: thin callers of :mod:`tvlens.engine`.

Activation patching (Vig et al. 2020; Meng et al. 2022; the TransformerLens ``patching`` module)
asks how much a component carries: run a *target* prompt batch, replace one site's activation
(a head's ``hook_z``, a layer's residual at one position, ...) with its value from a *source* —
another prompt batch (clean -> corrupted, ICL -> shuffled labels) or task-mean activations
(means-patching, as in Todd et al. 2024 §2.2 and the taskness validation) — and measure a metric of
the final-position logits.  One sweep gives a ``[layer, head]`` (or ``[layer, pos]``) map.

Every sweep here is a list of :class:`~tvlens.engine.sites.Edit` columns handed to the engine's
one intervention path (:class:`~tvlens.engine.runner.PatchRunner`), which recomputes only what an
edit can change; the numbers equal one full hooked forward per site (tested to 1e-4).

:func:`attribution_patch_heads` is the gradient approximation (Nanda 2023, "Attribution
patching"; Syed et al. 2023): one forward + backward on the target and one forward on the source
give every site's linear estimate at once; ``confirm_top=k`` re-runs the exact patch for the
``k`` largest sites and reports the correlation.

Hooks are attached only through :mod:`tvlens.hooks` and are removed on every exit path; the cache
hand-off uses a forward pre-hook on the attention module that is likewise removed in ``finally``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from .. import hooks as _hooks
from ..engine.batch import EngineBatch, as_batch
from ..engine.plan import rows_per_run
from ..engine.readout import capture_acts
from ..engine.runner import PatchRunner
from ..engine.sites import Edit, unit_shape
from ..hooks import act_name
from ..metrics import METRICS, MetricFn, metric_name, resolve_metric
from ..vocabulary import FINAL, final_alias
from ..results import ResultMeta, Tabular
from ..results import tensor_digest as _digest

__all__ = ["PatchResult", "patch_heads", "patch_positions", "attribution_patch_heads"]

Positions = Literal["final", "all", "each"]


# ----------------------------------------------------------------------------------------------
# sources


def _means_tensor(source: Any, kind: str, info: Any, positions: str = "final") -> Tensor | None:
    """Task-mean activations ``[layer, unit, d_head]`` from a tensor or a ``HeadStats``; None for a prompt batch.

    Layers a ``HeadStats`` does not cover are NaN (patching them is refused by the caller).
    """
    unit = unit_shape(info, kind)
    want = (info.n_layers, *unit)
    if hasattr(source, "cache_dict") or type(source).__name__ == "ActivationCache":
        raise TypeError("source is an ActivationCache; patch_heads runs the source itself, so pass the source prompts "
                        "(the PromptBatch or the [batch, pos] token tensor you ran) or task means "
                        "(tvlens.head_means(model, [task]), or a [layer, head, d_head] float tensor)")
    if isinstance(source, Tensor) and not source.is_floating_point():
        return None  # an integer tensor is a [batch, pos] token batch, not means
    if isinstance(source, Tensor):
        t = source
        if t.ndim == len(want) + 1 and t.shape[0] == 1:
            t = t[0]
        if tuple(t.shape) != want:
            several = t.ndim == len(want) + 1 and tuple(t.shape[1:]) == want
            raise ValueError(f"means source has shape {tuple(t.shape)}"
                             f"{' (several tasks: select one, e.g. means[i])' if several else ''}; patching {kind!r} "
                             f"needs task-mean activations of shape [layer, head, d_head] = {list(want)}")
        return t
    z = getattr(source, "z_mean", None)
    if not isinstance(z, Tensor) or hasattr(source, "tokens"):
        return None
    saved = (getattr(source, "meta", None) or {}).get("config_hash")
    if saved and saved != info.config_hash:
        raise ValueError(f"these head means come from another model (config hash {saved}, this model "
                         f"{info.config_hash}); recompute them with tvlens.head_means(model, tasks)")
    if kind != "z":
        raise ValueError(f"a HeadStats holds means of hook_z; patching component {kind!r} needs a tensor of "
                         f"{kind} means [layer, n_kv_heads, d_head] (or use component='z')")
    tasks = tuple(getattr(source, "tasks", ()) or ())
    if z.shape[0] != 1:
        raise ValueError(f"the HeadStats holds {z.shape[0]} tasks {list(tasks)}; patch one task's means: "
                         f"source=stats.select([{tasks[0] if tasks else 'task'!r}]) (or stats.mean(task))")
    z = z[0]
    if z.ndim == 4:  # per position, right-aligned: the final position is index -1
        if positions != "final":
            raise ValueError("per-position means can only be patched at the final position; pass "
                             "stats.at_position(-1) (or a pooled HeadStats) for positions='all'/'each'")
        z = z[:, :, -1]
    layers = tuple(getattr(source, "layers", ()) or range(z.shape[0]))
    if z.shape[1:] != want[1:]:
        raise ValueError(f"HeadStats means have heads × d_head = {tuple(z.shape[1:])} but this model needs {want[1:]}: "
                         "they come from a different model")
    full = torch.full(want, float("nan"), dtype=z.dtype, device=z.device)
    full[torch.as_tensor(layers, dtype=torch.long)] = z
    return full


# ----------------------------------------------------------------------------------------------
# results


@dataclass(frozen=True)
class PatchResult(Tabular):
    """A patching sweep: ``values`` over sites, the metric averaged over prompts.

    Two views of every site: ``values`` — what was measured (the **patched metric itself**, e.g.
    the patched log-probability; normalised or attribution values when those were asked for) —
    and ``effect`` — the **change** the patch causes (``values - target_value``), which ``.plot()``,
    ``.top()`` and the CLI show. ``.to_frame()`` has both columns.

    ``values`` is ``[layer, head]`` (:func:`patch_heads`, ``positions="final"|"all"``),
    ``[layer, head, pos]`` (``positions="each"``) or ``[layer, pos]`` (:func:`patch_positions`);
    ``dims`` names the axes.  Without normalisation a value is the patched metric (compare it with
    ``target_value``, the unpatched target's metric); with ``normalize=True`` it is
    ``(patched - target) / (source - target)``: 0 = no effect, 1 = the source's full metric
    (TransformerLens convention).  Sites not swept are NaN.  ``per_prompt`` holds the raw
    per-prompt metric ``[prompt, *dims]``.  For :func:`attribution_patch_heads` (``method=
    "attribution"``) the values are the linear estimates, ``exact`` holds exactly patched values
    where they were confirmed (NaN elsewhere) and ``correlation`` their Pearson correlation.
    """

    values: Float[Tensor, "*dims"]
    dims: tuple[str, ...]
    metric: str
    target_value: float
    source_value: float | None
    normalized: bool
    per_prompt: Float[Tensor, "prompt *dims"] | None = None
    method: str = "exact"
    exact: Float[Tensor, "*dims"] | None = None
    correlation: float | None = None
    pos_labels: tuple[str, ...] | None = None
    meta: ResultMeta = field(default_factory=ResultMeta)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.values.shape)

    @property
    def effect(self) -> Tensor:
        """Change of the metric caused by each patch (``values - target_value``, or ``values`` if normalised)."""
        return self.values if self.normalized or self.method == "attribution" else self.values - self.target_value

    def top(self, k: int = 10, *, by: Literal["effect", "abs"] = "effect") -> list[tuple]:
        """The ``k`` sites with the largest effect (``by="abs"``: largest magnitude), as tuples ``(*index, value)``."""
        eff = self.effect.float()
        score = eff.abs() if by == "abs" else eff
        score = torch.where(torch.isnan(score), torch.full_like(score, -math.inf), score)
        k = min(int(k), int(torch.isfinite(score).sum()))
        if k <= 0:
            return []
        flat = score.reshape(-1).topk(k).indices
        out = []
        for i in flat.tolist():
            idx = tuple(int(x) for x in torch.unravel_index(torch.tensor(i), score.shape))
            out.append((*idx, float(self.values[idx])))
        return out

    def plot(self, *, pos: int | None = -1, title: str | None = None) -> Any:
        """Heatmap (diverging, centred at 0 on the effect) with the shared plot module.

        ``[layer, head, pos]`` results show one position (``pos``, default the final one).
        """
        from .. import plot as _plot

        eff = self.effect
        label = ("normalised " if self.normalized else "Δ ") + self.metric
        if self.method == "attribution":
            label = "attribution Δ " + self.metric + (" (normalised)" if self.normalized else "")
        what = self.meta.get("what", "patching")
        if self.dims == ("layer", "pos"):
            return _plot.layer_position_heatmap(eff, list(self.pos_labels) if self.pos_labels else None,
                                                title=title or what, zlabel=label, diverging=True)
        if self.dims == ("layer", "head", "pos"):
            p = int(pos if pos is not None else -1) % eff.shape[-1]
            eff = eff[..., p]
            title = title or f"{what} (position {p})"
        return _plot.layer_head_heatmap(eff, title=title or what, zlabel=label, diverging=True)

    def to_html(self, path: str | Path, **plot_kw: Any) -> Path:
        """Write :meth:`plot` as a standalone HTML file; returns its path."""
        from .. import plot as _plot

        return _plot.save_figure(self.plot(**plot_kw), path, png=False)[0]

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` + ``<path>.json`` (atomic); returns the tensor file's path."""
        from ..results import save_tensors, version

        tensors = {"values": self.values}
        for name in ("per_prompt", "exact"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = dict(kind="PatchResult", tvlens_version=version(), dims=list(self.dims), metric=self.metric,
                    target_value=self.target_value, source_value=self.source_value, normalized=self.normalized,
                    method=self.method, correlation=self.correlation,
                    pos_labels=None if self.pos_labels is None else list(self.pos_labels), meta=self.meta.to_dict())
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "PatchResult":
        """Read a result written by :meth:`save`; with ``model``, refuse one made with a different model."""
        from ..results import load_result

        tensors, meta = load_result(path, "PatchResult", model=model, what="patching result")
        return cls(values=tensors["values"], dims=tuple(meta["dims"]), metric=meta["metric"],
                   target_value=meta["target_value"], source_value=meta["source_value"],
                   normalized=meta["normalized"], per_prompt=tensors.get("per_prompt"), method=meta["method"],
                   exact=tensors.get("exact"), correlation=meta["correlation"],
                   pos_labels=None if meta["pos_labels"] is None else tuple(meta["pos_labels"]),
                   meta=ResultMeta.from_dict(meta["meta"]))

    def records(self) -> list[dict[str, Any]]:
        """One row per site: its indices, ``value`` (the raw patched metric, or the normalised /
        attribution value, as :attr:`values`) and ``effect`` (the change the patch causes, as
        :attr:`effect` and the CLI print)."""
        rows = []
        vals, eff = self.values, self.effect
        for idx in torch.cartesian_prod(*[torch.arange(n) for n in vals.shape]).reshape(-1, vals.ndim).tolist():
            rows.append({**dict(zip(self.dims, idx)), "value": float(vals[tuple(idx)]), "effect": float(eff[tuple(idx)])})
        return rows


# ----------------------------------------------------------------------------------------------
# sweeps


def _check_choice(name: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ValueError(f"unknown {name} {value!r}; use one of {', '.join(map(repr, choices))}")


def _sites(info: Any, layers: Sequence[int] | None, heads: Sequence[int] | None, sites: Any, n_units: int) -> list[tuple[int, int]]:
    if sites is not None:
        out = [(int(l) % info.n_layers, int(h) % n_units) for l, h in sites]
        for (l, h), (l0, h0) in zip(out, sites):
            if not -info.n_layers <= int(l0) < info.n_layers or not -n_units <= int(h0) < n_units:
                raise ValueError(f"site ({l0}, {h0}) out of range: {info.n_layers} layers × {n_units} heads")
    else:
        ls = range(info.n_layers) if layers is None else [int(l) for l in layers]
        hs = range(n_units) if heads is None else [int(h) for h in heads]
        for l in ls:
            if not -info.n_layers <= l < info.n_layers:
                raise ValueError(f"layer {l} is out of range: this model has {info.n_layers} layers (0..{info.n_layers - 1})")
        for h in hs:
            if not -n_units <= h < n_units:
                raise ValueError(f"head {h} is out of range: there are {n_units} heads (0..{n_units - 1})")
        out = [(l % info.n_layers, h % n_units) for l in ls for h in hs]
    if not out:
        raise ValueError("empty site list: give at least one layer and one head (layers=None, heads=None sweep all)")
    return out


def _prompt_groups(n: int, rows: int | None) -> list[tuple[int, int]]:
    size = n if rows is None else max(1, min(n, rows))
    return [(i, min(i + size, n)) for i in range(0, n, size)]


def _head_edits(sites: list[tuple[int, int]], n_units: int, src: dict[int, Tensor] | Tensor, pos: int,
                all_pos: bool, hook: str, device: torch.device, dtype: torch.dtype) -> list[Edit]:
    """One edit per layer: column j of that layer takes unit ``sites[j][1]`` from the source.

    The weight is a one-hot ``[column, (pos,) unit, 1]`` and the value the source activation,
    broadcast over columns — nothing per site is materialised beyond the activations themselves.
    """
    by_layer: dict[int, list[int]] = {}
    for j, (l, _) in enumerate(sites):
        by_layer.setdefault(l, []).append(j)
    edits = []
    for l, cols in by_layer.items():
        onehot = torch.zeros(len(cols), n_units, device=device, dtype=dtype)
        onehot[torch.arange(len(cols)), torch.as_tensor([sites[j][1] for j in cols])] = 1
        weight = onehot[:, None, :, None] if all_pos else onehot[:, :, None]
        if isinstance(src, Tensor):  # task means [layer, unit, d_head]: broadcast over prompts and positions
            value = src[l].to(device, dtype)
        else:
            a = src[l].to(device, dtype)  # [B, pos|1, unit, d_head]
            if all_pos:
                value = a[:, None]  # [B, 1(col), pos, unit, d]
            else:
                value = (a[:, 0] if a.shape[1] == 1 else a[:, pos])[:, None]  # [B, 1(col), unit, d]
        edits.append(Edit(l, hook, weight, value, None, cols, None if all_pos else pos))
    return edits


def _check_vocab(prompts: EngineBatch, what: str, info: Any) -> None:
    """Refuse token ids outside the model's vocabulary (they would fail inside the embedding)."""
    lo, hi = int(prompts.tokens.min()), int(prompts.tokens.max())
    if lo < 0 or hi >= info.d_vocab:
        raise ValueError(f"{what} token ids span {lo}..{hi} but the model's vocabulary is 0..{info.d_vocab - 1}; "
                         "tokenize with this model's tokenizer (tvlens.icl_prompts does)")


def _validate_source(target: EngineBatch, source: Any, positional: bool) -> EngineBatch:
    src = as_batch(source, "source")
    if len(src) != len(target):
        raise ValueError(f"target has {len(target)} prompts but source has {len(src)}: patching pairs prompt i of the "
                         "source with prompt i of the target, so build them with the same n_prompts (or pass task-mean "
                         "activations as the source)")
    if positional and src.n_pos != target.n_pos:
        raise ValueError(f"target has {target.n_pos} positions but source has {src.n_pos}: patching every position "
                         "pairs them index by index, so both batches need the same length (pad them to a common length, "
                         "or use positions='final', which needs only the final positions)")
    return src


def _pos_labels(model: Any, prompts: EngineBatch) -> tuple[str, ...]:
    tok = getattr(model, "tokenizer", None)
    row = prompts.tokens[0].tolist()
    labels = []
    for i, t in enumerate(row):
        s = None
        if tok is not None and prompts.mask[0, i]:
            try:
                s = tok.decode([t])
            except Exception:
                s = None
        labels.append(f"{i}:{s!s}" if s is not None else str(i))
    return tuple(labels)


def _finish(values: Tensor, per_prompt: Tensor, dims: tuple[str, ...], metric: Any, target_value: float,
            source_value: float | None, normalize: bool, meta: ResultMeta, **kw: Any) -> PatchResult:
    if normalize:
        if source_value is None:
            raise ValueError("normalize=True needs a source prompt batch (its metric is the 1 of the scale); "
                             "with task-mean activations as the source, leave normalize=False")
        denom = source_value - target_value
        values = (values - target_value) / denom if denom != 0 else torch.full_like(values, float("nan"))
    return PatchResult(values=values.cpu(), dims=dims, metric=metric_name(metric), target_value=target_value,
                       source_value=source_value, normalized=normalize, per_prompt=per_prompt.cpu(), meta=meta, **kw)


def _meta(model: Any, **extra: Any) -> ResultMeta:
    return ResultMeta.for_model(model, **extra)


def _from_units(ck: Any, g0: int, p: int, layer_cols: dict[int, list[int]], n_cols: int) -> Tensor:
    """``[b, site]`` of one prompt group and position, assembled from its per-layer checkpoint units."""
    parts = {l: ck[(g0, p, l)]["values"] for l in layer_cols}
    first = next(iter(parts.values()))
    out = torch.empty((first.shape[0], n_cols), dtype=first.dtype)
    for l, cols in layer_cols.items():
        out[:, cols] = parts[l].to(out.dtype)
    return out


def patch_heads(
    model: Any,
    target: Any,
    source: Any,
    *,
    positions: Positions = FINAL,
    metric: str | MetricFn = "logit_diff",
    component: Literal["z", "q", "k", "v"] = "z",
    layers: Sequence[int] | None = None,
    heads: Sequence[int] | None = None,
    sites: Sequence[tuple[int, int]] | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    fast: bool | Literal["auto"] = "auto",
    checkpoint: str | Path | None = None,
    executor: Any = None,
) -> PatchResult:
    """Patch each attention head's output into the target run and measure ``metric``: ``[layer, head]``.

    For every head ``(l, h)`` the target batch is run with that head's ``hook_z`` replaced by its
    value in ``source`` — another prompt batch with as many prompts (clean -> corrupted, ICL ->
    zero-shot or shuffled labels), or **task-mean activations** ``[layer, head, d_head]`` (a
    tensor, or a ``HeadStats`` from :func:`tvlens.head_means`) broadcast over prompts
    (means-patching; Todd et al. 2024's causal indirect effect is ``prob`` with shuffled-label
    targets) — and ``metric`` of the final-position logits is averaged over prompts.

    Args:
        positions: ``"final"`` patches the final position (the separator; source and target may
            differ in length), ``"all"`` every position at once (TL ``..._all_pos``), ``"each"``
            every position separately -> ``[layer, head, pos]``; the last two need equal lengths.
        metric: ``"logit_diff"`` (answer minus foil logit, see :func:`resolve_metric`), ``"prob"``,
            ``"logprob"``, ``"accuracy"`` or ``fn(logits [batch, d_vocab], batch) -> [batch]``.
        component: ``"z"`` (per query head, default), ``"q"``, or ``"k"`` / ``"v"`` per key-value
            head (grouped-query models have fewer of those: the result is ``[layer, n_kv_heads]``).
        layers, heads, sites: restrict the sweep to a grid or an explicit list of ``(layer, head)``;
            unswept sites are NaN.
        normalize: report ``(patched - target) / (source - target)`` (needs a source batch).
        batch_size: most (prompt, site) rows per forward; ``max_memory``: byte budget for one
            chunk (default 512 MiB on CPU); ``progress``: tqdm bar on multi-chunk sweeps.
        fast: ``"auto"`` uses the cached recompute (exact) and falls back to one forward per site
            if the model does not support it; ``False`` forces the naive loop.
        checkpoint: a file (:class:`tvlens.runs.checkpoint.SweepCheckpoint`) where every finished
            (prompt group, position, layer) is written atomically; an interrupted sweep re-run with
            the same arguments computes only the unfinished units. A file from another model or
            another configuration is refused before any work. (A metric *function* is identified
            by its name only.)
        executor: where to run (:mod:`tvlens.runs.executors`): ``None`` — this process; a
            ``RayExecutor`` — one unit per layer of sites on the workers' replicas, merged as
            disjoint sites (with ``checkpoint``, every finished layer is kept).

    Returns a :class:`PatchResult`.  Equal to the naive loop (one ``run_with_hooks`` per site) to
    float rounding; ``benchmarks/bench_patching.py`` measures the two side by side.
    """
    from ..runs.executors import executor_meta, splits

    sw = _HeadSweep.check(model, target, source, positions=positions, metric=metric, component=component,
                          layers=layers, heads=heads, sites=sites, normalize=normalize)
    if splits(executor):  # one unit per layer of sites, on the executor's workers
        from ..runs import distributed

        return distributed.patch_heads(
            model, target, sw.means if sw.means is not None else source, executor=executor, site_list=sw.site_list,
            n_prompts=len(sw.tgt), n_units=sw.n_units, positions=sw.positions, metric=metric, component=component,
            normalize=normalize, batch_size=batch_size, max_memory=max_memory, progress=progress, fast=fast,
            checkpoint=checkpoint, has_source_batch=sw.src is not None,
            pos_labels=_pos_labels(model, sw.tgt) if sw.positions == "each" else None, ck_config=sw.config())
    t0 = time.perf_counter()
    P = sw.tgt.n_pos
    groups = _prompt_groups(len(sw.tgt), rows_per_run(model, sw.info, P, P - 1 if sw.positions == "final" else 0,
                                                      batch_size, max_memory))
    ck = None
    if checkpoint is not None:  # opened before any forward: a mismatched file is refused before work
        from ..runs.checkpoint import SweepCheckpoint

        ck = SweepCheckpoint(checkpoint, model=model, config={**sw.config(), "groups": [list(g) for g in groups]})
    total = len(sw.site_list) * len(sw.pos_list) * len(groups)
    pbar = _progress_bar(total, f"patch_heads[{sw.positions}]") if progress and total > 64 else None
    try:
        parts = [sw.run_group(model, g0, g1, ck, pbar, fast=fast, max_memory=max_memory, batch_size=batch_size)
                 for g0, g1 in groups]
    finally:
        if pbar is not None:
            pbar.close()
    tvals, svals, chunks = zip(*parts)
    per_prompt = sw.scatter(torch.cat(chunks, 0))
    values = per_prompt.mean(0)
    dims = ("layer", "head", "pos") if sw.positions == "each" else ("layer", "head")
    meta = _meta(model, what=f"patch_heads ({component}, positions={sw.positions})", positions=sw.positions,
                 component=component, n_prompts=len(sw.tgt), source="means" if sw.means is not None else "prompts",
                 seconds=time.perf_counter() - t0, fast=fast, executor=executor_meta(executor))
    source_value = float(torch.cat(svals).mean()) if sw.src is not None else None
    return _finish(values, per_prompt, dims, metric, float(torch.cat(tvals).mean()), source_value, normalize, meta,
                   pos_labels=_pos_labels(model, sw.tgt) if sw.positions == "each" else None)


def _progress_bar(total: int, desc: str) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="site")


@dataclass(frozen=True)
class _HeadSweep:
    """One :func:`patch_heads` call, checked: which (layer, unit) sites, patched from what, where.

    Built by :meth:`check` before any forward (every bad input raises there); :meth:`run_group`
    then sweeps one group of prompts and :meth:`scatter` lays the columns out as ``[layer, head]``.
    """

    info: Any
    tgt: EngineBatch
    src: EngineBatch | None
    means: Tensor | None  # [layer, unit, d_head] task means, or None with a source batch
    site_list: list[tuple[int, int]]
    n_units: int
    positions: str
    component: str
    metric: Any
    normalize: bool

    @classmethod
    def check(cls, model: Any, target: Any, source: Any, *, positions: Any, metric: Any, component: str,
              layers: Any, heads: Any, sites: Any, normalize: bool) -> "_HeadSweep":
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        positions = final_alias(positions)
        _check_choice("positions", positions, ("final", "all", "each"))
        _check_choice("component", component, ("z", "q", "k", "v"))
        if not (isinstance(metric, str) or callable(metric)):
            raise TypeError(f"metric must be a name or a function, got {type(metric).__name__}")
        if isinstance(metric, str):
            _check_choice("metric", metric, METRICS)
        n_units = info.n_kv_heads if component in ("k", "v") else info.n_heads
        site_list = _sites(info, layers, heads, sites, n_units)
        tgt = as_batch(target, "target")
        _check_vocab(tgt, "target", info)
        means = _means_tensor(source, component, info, positions)
        src = None if means is not None else _validate_source(tgt, source, positions != "final")
        if src is not None:
            _check_vocab(src, "source", info)
        if normalize and src is None:
            raise ValueError("normalize=True needs a source prompt batch (its metric is the 1 of the scale); "
                             "with task-mean activations as the source, leave normalize=False")
        if means is not None:
            missing = sorted({l for l, _ in site_list if not bool(torch.isfinite(means[l]).all())})
            if missing:
                raise ValueError(f"the means do not cover layers {missing}; restrict the sweep with layers=[...] "
                                 "or compute the means for every layer")
        return cls(info, tgt, src, means, site_list, n_units, positions, component, metric, bool(normalize))

    def config(self) -> dict[str, Any]:
        """What identifies this sweep in a checkpoint file (a metric function by its name only)."""
        tgt = self.tgt
        return dict(what="patch_heads", positions=self.positions, metric=metric_name(self.metric),
                    component=self.component, sites=[list(s) for s in self.site_list],
                    normalize=self.normalize, target=_digest(tgt.tokens, tgt.mask,
                                                   *[t for t in (tgt.answer_ids, tgt.foil_ids) if t is not None]),
                    source=_digest(self.means) if self.means is not None else _digest(self.src.tokens, self.src.mask))

    @property
    def pos_list(self) -> list[int]:
        P = self.tgt.n_pos
        return list(range(P)) if self.positions == "each" else [P - 1 if self.positions == "final" else 0]

    @property
    def layer_cols(self) -> dict[int, list[int]]:
        """The columns (indices into :attr:`site_list`) of each swept layer: one checkpoint unit each."""
        return {l: [j for j, s in enumerate(self.site_list) if s[0] == l] for l in sorted({l for l, _ in self.site_list})}

    def run_group(self, model: Any, g0: int, g1: int, ck: Any, pbar: Any, **run_kw: Any) -> tuple[Tensor, Tensor, Tensor]:
        """Target metric ``[b]``, source metric ``[b]`` (empty with means) and patched metric
        ``[b, site, n_pos_list]`` of prompts ``g0:g1``; a group a checkpoint finished runs no forward."""
        units = [(g0, p, l) for p in self.pos_list for l in self.layer_cols]
        if ck is not None and ("clean", g0) in ck and not ck.remaining(units):
            clean = ck[("clean", g0)]
            if pbar is not None:
                pbar.update(len(self.site_list) * len(self.pos_list))
            return clean["target"], clean.get("source", torch.empty(0)), self._from_ck(ck, g0)
        tg = self.tgt.slice(g0, g1)
        runner = PatchRunner(model, tg, fast=run_kw.pop("fast"))
        fn = resolve_metric(self.metric, tg, runner.clean_logits)
        tval, sval = fn(runner.clean_logits[:, None])[:, 0], torch.empty(0)
        src_acts: dict[int, Tensor] | Tensor = self.means
        if self.means is None:
            src_acts, src_logits = capture_acts(model, self.src.slice(g0, g1), self.component, list(self.layer_cols),
                                                final_only=self.positions == "final")
            sval = fn(src_logits[:, None])[:, 0]
        if ck is None:
            cols = [self._map(runner, fn, src_acts, p, list(range(len(self.site_list))), pbar, run_kw)
                    for p in self.pos_list]
            return tval, sval, torch.stack(cols, -1)
        # checkpointed values live on the CPU: keep everything there
        tval, sval = tval.cpu(), sval.cpu()
        ck.record(("clean", g0), {"target": tval, **({"source": sval} if self.means is None else {})})
        for p in self.pos_list:
            for l, cols in self.layer_cols.items():  # one unit per layer: its sites in one batched map
                if (g0, p, l) in ck:
                    if pbar is not None:
                        pbar.update(len(cols))
                    continue
                ck.record((g0, p, l), {"values": self._map(runner, fn, src_acts, p, cols, pbar, run_kw)})
        return tval, sval, self._from_ck(ck, g0)

    def _map(self, runner: PatchRunner, fn: Any, src_acts: Any, p: int, cols: list[int], pbar: Any,
             run_kw: dict[str, Any]) -> Tensor:
        """``[b, len(cols)]``: the metric with each of the sites ``cols`` patched at position ``p``."""
        edits = _head_edits([self.site_list[j] for j in cols], self.n_units, src_acts, p, self.positions == "all",
                            self.component, runner.device, runner.dtype)
        with torch.no_grad():
            return runner.map(edits, fn, n_columns=len(cols), start_pos=p, pbar=pbar, **run_kw)

    def _from_ck(self, ck: Any, g0: int) -> Tensor:
        n = len(self.site_list)
        return torch.stack([_from_units(ck, g0, p, self.layer_cols, n) for p in self.pos_list], -1)

    def scatter(self, per_site: Float[Tensor, "batch site n_pos"]) -> Tensor:
        """``[batch, layer, unit(, pos)]`` with NaN at unswept sites."""
        shape = (self.info.n_layers, self.n_units) + ((self.tgt.n_pos,) if self.positions == "each" else ())
        per_prompt = torch.full((len(self.tgt), *shape), float("nan"), dtype=per_site.dtype, device=per_site.device)
        li = torch.as_tensor([l for l, _ in self.site_list])
        hi = torch.as_tensor([h for _, h in self.site_list])
        per_prompt[:, li, hi] = per_site if self.positions == "each" else per_site[..., 0]
        return per_prompt


def patch_positions(
    model: Any,
    target: Any,
    source: Any,
    *,
    hook: str = "resid_pre",
    metric: str | MetricFn = "logit_diff",
    layers: Sequence[int] | None = None,
    normalize: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
    fast: bool | Literal["auto"] = "auto",
    executor: Any = None,
) -> PatchResult:
    """Patch one (layer, position) of a residual-stream activation at a time: ``[layer, pos]``.

    ``hook`` is ``"resid_pre"`` (TL ``get_act_patch_resid_pre``), ``"attn_out"``, ``"mlp_out"``,
    ``"resid_mid"`` or ``"resid_post"``; the value comes from ``source``, a prompt batch of the same
    shape (positions are paired index by index; tvlens batches are left-padded so the final
    separator lines up).  Each site recomputes only positions ``>= pos`` from its layer on.
    ``executor`` (:mod:`tvlens.runs.executors`): ``None`` runs here; a ``RayExecutor`` runs one
    unit per layer on the workers' replicas.
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    allowed = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")
    if hook not in allowed:
        raise ValueError(f"unknown hook {hook!r} for patch_positions; use one of {', '.join(allowed)}")
    if isinstance(metric, str):
        _check_choice("metric", metric, METRICS)
    ls = list(range(info.n_layers)) if layers is None else [int(l) for l in layers]
    if not ls:
        raise ValueError("empty site list: give at least one layer (layers=None sweeps all)")
    for l in ls:
        if not -info.n_layers <= l < info.n_layers:
            raise ValueError(f"layer {l} is out of range: this model has {info.n_layers} layers (0..{info.n_layers - 1})")
    ls = [l % info.n_layers for l in ls]
    tgt = as_batch(target, "target")
    _check_vocab(tgt, "target", info)
    src = _validate_source(tgt, source, True)
    _check_vocab(src, "source", info)
    from ..runs.executors import executor_meta, splits

    if splits(executor):  # one unit per layer, on the executor's workers
        from ..runs import distributed

        return distributed.patch_positions(model, target, source, executor=executor, layers=ls, n_prompts=len(tgt),
                                           n_pos=tgt.n_pos, hook=hook, metric=metric, normalize=normalize,
                                           batch_size=batch_size, max_memory=max_memory, progress=progress, fast=fast,
                                           pos_labels=_pos_labels(model, tgt))
    t0 = time.perf_counter()
    P = tgt.n_pos
    dev = _hooks.device_of(model)
    groups = _prompt_groups(len(tgt), rows_per_run(model, info, P, 0, batch_size, max_memory))
    per, tvals, svals = [], [], []
    pbar = None
    if progress and len(ls) * P * len(groups) > 64:
        from tqdm.auto import tqdm

        pbar = tqdm(total=len(ls) * P * len(groups), desc=f"patch_positions[{hook}]", unit="site")
    try:
        for g0, g1 in groups:
            tg, sg = tgt.slice(g0, g1), src.slice(g0, g1)
            runner = PatchRunner(model, tg, fast=fast)
            fn = resolve_metric(metric, tg, runner.clean_logits)
            tvals.append(fn(runner.clean_logits[:, None])[:, 0])
            acts, src_logits = capture_acts(model, sg, hook, sorted(set(ls)), final_only=False)
            svals.append(fn(src_logits[:, None])[:, 0])
            cols = []
            for p in range(P):
                edits = [Edit(l, hook, 1.0, acts[l][:, p][:, None].to(dev, runner.dtype), None, [j], p)
                         for j, l in enumerate(ls)]
                with torch.no_grad():
                    cols.append(runner.map(edits, fn, n_columns=len(ls), start_pos=p, max_memory=max_memory,
                                           batch_size=batch_size, pbar=pbar))  # [b, layer]
            per.append(torch.stack(cols, -1))  # [b, layer, pos]
    finally:
        if pbar is not None:
            pbar.close()
    per_site = torch.cat(per, 0)
    per_prompt = torch.full((len(tgt), info.n_layers, P), float("nan"), device=per_site.device)
    per_prompt[:, torch.as_tensor(ls)] = per_site
    meta = _meta(model, what=f"patch_positions ({hook})", hook=hook, n_prompts=len(tgt),
                 seconds=time.perf_counter() - t0, fast=fast, executor=executor_meta(executor))
    return _finish(per_prompt.mean(0), per_prompt, ("layer", "pos"), metric, float(torch.cat(tvals).mean()),
                   float(torch.cat(svals).mean()), normalize, meta, pos_labels=_pos_labels(model, tgt))


def attribution_patch_heads(
    model: Any,
    target: Any,
    source: Any,
    *,
    metric: str | MetricFn = "logit_diff",
    positions: Positions = FINAL,
    component: Literal["z", "q", "k", "v"] = "z",
    confirm_top: int | Literal["all"] = 0,
    normalize: bool = False,
    batch_size: int | None = None,
    max_memory: int | None = None,
    progress: bool = True,
) -> PatchResult:
    """Attribution patching (Nanda 2023; Syed et al. 2023): every head's patching effect, linearised.

    ``effect(l, h) ≈ Σ_pos Σ_d (source_z - target_z)[l, pos, h, d] · ∂metric/∂z[l, pos, h, d]``,
    the gradient taken on the target run — one forward + one backward on the target and one
    forward on the source, whatever the number of sites.  ``values`` are these estimated changes
    of the prompt-averaged metric (normalised by ``source - target`` when ``normalize``).

    ``confirm_top=k`` re-runs the exact patch (:func:`patch_heads`) for the ``k`` sites with the
    largest ``|estimate|`` (``"all"``: every site) and reports ``exact`` and the Pearson
    ``correlation`` between estimate and exact effect over those sites.  The metric must be
    differentiable (``accuracy`` is not).
    """
    if metric == "accuracy":
        raise ValueError("attribution patching needs a differentiable metric; 'accuracy' is not — use 'logit_diff', "
                         "'logprob' or 'prob' (confirm with patch_heads(metric='accuracy'))")
    # the same checks as patch_heads over every head (the gradient covers all of them at once)
    sw = _HeadSweep.check(model, target, source, positions=positions, metric=metric, component=component,
                          layers=None, heads=None, sites=None, normalize=normalize)
    positions, tgt, src, means = sw.positions, sw.tgt, sw.src, sw.means
    t0 = time.perf_counter()
    chunks = [_attribution_chunk(model, tgt.slice(g0, g1), None if means is not None else src.slice(g0, g1), means,
                                 metric, positions, component, sw.info.n_layers)
              for g0, g1 in _prompt_groups(len(tgt), batch_size)]
    est_chunks, tvals, svals = zip(*chunks)
    per_prompt = torch.cat(est_chunks, 0)
    values = per_prompt.mean(0)
    target_value = float(torch.cat(tvals).mean())
    source_value = float(torch.cat(svals).mean()) if means is None else None
    dims = ("layer", "head", "pos") if positions == "each" else ("layer", "head")
    seconds = time.perf_counter() - t0
    exact = corr = exact_seconds = None
    if confirm_top:
        t1 = time.perf_counter()
        exact, corr = _confirm_top(model, tgt, source if means is None else means, values, confirm_top, target_value,
                                   positions=positions, metric=metric, component=component, batch_size=batch_size,
                                   max_memory=max_memory, progress=progress)
        exact_seconds = time.perf_counter() - t1
        if normalize and source_value is not None and source_value != target_value:
            exact = exact / (source_value - target_value)
    meta = _meta(model, what=f"attribution patching ({component}, positions={positions})", positions=positions,
                 component=component, n_prompts=len(tgt), seconds=seconds, exact_seconds=exact_seconds,
                 confirmed=0 if not confirm_top else (values.numel() if confirm_top == "all" else int(confirm_top)))
    if normalize:
        denom = source_value - target_value
        values = values / denom if denom else torch.full_like(values, float("nan"))
    return PatchResult(values=values.cpu(), dims=dims, metric=metric_name(metric), target_value=target_value,
                       source_value=source_value, normalized=normalize, per_prompt=per_prompt.cpu(),
                       method="attribution", exact=exact, correlation=corr,
                       pos_labels=_pos_labels(model, tgt) if positions == "each" else None, meta=meta)


def _attribution_chunk(model: Any, tg: EngineBatch, sg: EngineBatch | None, means: Tensor | None, metric: Any,
                       positions: str, component: str, n_layers: int) -> tuple[Tensor, Tensor, Tensor | None]:
    """One chunk of prompts: the linearised effect of every head, ``[batch, layer, unit]`` (``[..., pos]``
    for ``"each"``), from one forward and backward on the target ``tg`` and one forward on the source
    ``sg`` (or the ``means`` written in); and the target's and source's per-prompt metric."""
    dev = _hooks.device_of(model)
    leaves: dict[int, Tensor] = {}
    acts: dict[int, Tensor] = {}

    def tap(layer: int):
        # a zero leaf added to the activation: its gradient is d metric / d activation
        def fn(act: Tensor, hook: Any = None) -> Tensor:
            leaf = torch.zeros_like(act, requires_grad=True)
            leaves[layer], acts[layer] = leaf, act.detach()
            return act + leaf
        return fn

    with torch.enable_grad():
        logits = _hooks.run(model, tg.tokens.to(dev), attention_mask=tg.mask.to(dev),
                            fwd_hooks=[(act_name(component, l), tap(l)) for l in range(n_layers)])[:, -1]
        fn = resolve_metric(metric, tg, logits.detach())
        m = fn(logits[:, None])[:, 0]
        grads = torch.autograd.grad(m.sum(), [leaves[l] for l in range(n_layers)])
    sval = None
    if sg is not None:
        s_acts, s_logits = capture_acts(model, sg, component, list(range(n_layers)), final_only=positions == "final")
        sval = fn(s_logits[:, None])[:, 0]
    here = slice(-1, None) if positions == "final" else slice(None)  # [b, pos|1, unit, d_head]
    per_layer = []
    for l in range(n_layers):
        new = means[l].to(dev, acts[l].dtype)[None, None] if means is not None else s_acts[l]
        contrib = ((new - acts[l][:, here]).float() * grads[l][:, here].float()).sum(-1)  # [b, pos, unit]
        per_layer.append(contrib.transpose(1, 2) if positions == "each" else contrib.sum(1))  # [b, unit(, pos)]
    return torch.stack(per_layer, 1).detach(), m.detach(), sval


def _confirm_top(model: Any, tgt: EngineBatch, source: Any, values: Tensor, confirm_top: int | str, target_value: float, *,
                 positions: str, metric: Any, component: str, batch_size: Any, max_memory: Any,
                 progress: bool) -> tuple[Tensor, float | None]:
    """The exact patching effect (:func:`patch_heads`) of the ``confirm_top`` sites of largest
    ``|estimate|`` (NaN elsewhere), and the Pearson correlation of estimate and exact effect over them."""
    flat = values.abs().reshape(-1)
    k = flat.numel() if confirm_top == "all" else min(int(confirm_top), flat.numel())
    idx = flat.topk(k).indices.tolist()
    coords = [tuple(int(x) for x in torch.unravel_index(torch.tensor(i), values.shape)) for i in idx]
    exact = torch.full(values.shape, float("nan"))
    by_pos: dict[int, list[tuple[int, int]]] = {}
    for c in coords:
        by_pos.setdefault(c[2] if positions == "each" else -1, []).append((c[0], c[1]))
    for p, sl in by_pos.items():
        res = _exact_subset(model, tgt, source, positions, p, metric, component, sl, batch_size, max_memory, progress)
        for (l, h), v in zip(sl, res):
            exact[(l, h, p) if positions == "each" else (l, h)] = v - target_value
    est = torch.stack([values[c].cpu() for c in coords]).float()
    ex = torch.stack([exact[c] for c in coords]).float()
    corr = None
    if len(coords) >= 2 and float(est.std()) > 0 and float(ex.std()) > 0:
        corr = float(torch.corrcoef(torch.stack([est, ex]))[0, 1])
    return exact, corr


def _exact_subset(model: Any, tgt: EngineBatch, source: Any, positions: str, p: int, metric: Any, component: str,
                  sites: list[tuple[int, int]], batch_size: Any, max_memory: Any, progress: bool) -> list[float]:
    """Exact patched metric (prompt mean) for a few sites at one position mode."""
    if positions == "each":
        # one position only: patch it with the suffix engine
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        n_units = info.n_kv_heads if component in ("k", "v") else info.n_heads
        means = _means_tensor(source, component, info, "each")
        runner = PatchRunner(model, tgt)
        fn = resolve_metric(metric, tgt, runner.clean_logits)
        if means is not None:
            src_acts: Any = means
        else:
            src_acts, _ = capture_acts(model, as_batch(source, "source"), component, sorted({l for l, _ in sites}), False)
        edits = _head_edits(sites, n_units, src_acts, p, False, component, runner.device, runner.dtype)
        with torch.no_grad():
            vals = runner.map(edits, fn, n_columns=len(sites), start_pos=p, max_memory=max_memory, batch_size=batch_size)
        return vals.mean(0).tolist()
    res = patch_heads(model, tgt.obj if tgt.obj is not None else tgt, source, positions=positions, metric=metric,
                      component=component, sites=sites, batch_size=batch_size, max_memory=max_memory, progress=progress)
    return [float(res.values[l, h]) for l, h in sites]
