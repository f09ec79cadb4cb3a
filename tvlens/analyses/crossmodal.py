"""Cross-modal task vectors in vision-language models (Luo, Darrell & Bar 2024, *Task Vectors are Cross-Modal*).

A task vector is the residual state at the final separator of a middle layer (Hendel et al. 2023,
§3). Luo et al. take it from **text** in-context examples, from **image** in-context examples or
from a short **instruction**, and patch it into the last position of an **image** query that has no
context (§4, Table 2): text-derived vectors make the model do the task on images — better than
putting the same text examples in the image query's context. This module measures all of it through
tvlens's engine (:class:`~tvlens.engine.PatchRunner` with :class:`~tvlens.engine.Edit` s, and
:func:`~tvlens.engine.readout.read`), never with a forward loop of its own:

* :func:`crossmodal_table` — Luo's table in one call: No Context, Image ICL Base, Image ICL Patch,
  Text ICL xBase, Text ICL xPatch, Instruction xBase, Instruction xPatch, and the instruction +
  exemplar ensemble (§4.2); the layer of every patched condition chosen on the dev split, the table
  reported on the test split per task and mean, with standard errors (items are the unit) and paired
  tests (xPatch vs xBase over the same queries); the cross-task control (task A's vector on task B's
  image queries, scored against B where the answers differ); the other direction, image-ICL vectors
  on text queries (§4.3); task conflict, an instruction vector against a conflicting instruction in
  context (§4.2, "Task Conflict"). Returns a :class:`CrossModalTable`.
* :func:`task_similarity` — text-ICL vs image-ICL task vectors: raw and centred cosine, same vs other
  task, nearest task, next to the same numbers for the model with an untrained vision tower; and a
  2-D projection of per-prompt task vectors coloured by task, marked by modality (§5, Fig. 1b).
  Returns a :class:`TaskSimilarity`.
* :func:`llm_to_vlm` — the same text ICL prompts through the language model the VLM was built on and
  through the VLM: cosine of their task vectors per task, and the LLM's vectors patched into the
  VLM's image queries (§5, "LLM to VLM transfer", LLM-VLM xPatch). Returns an :class:`LlmVlmTransfer`.
* :func:`crossmodal_lens` — the logit lens at the final separator of image-ICL and text-ICL prompts,
  with the input → task → answer phases (§4.1, Fig. 4). Returns a :class:`CrossModalLens`.

Accuracy is first-token accuracy (the argmax at the final separator is the first token of an
accepted answer). Standard errors take an *item* as the unit (its renderings averaged first); the SE
of a mean over tasks is ``sqrt(Σ_t var_t / n_t) / T``.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..engine import PatchRunner, replace_resid
from ..engine.plan import rows_per_forward
from ..engine.readout import read
from ..hooks import device_of, resid_name
from ..inputs import multimodal as mm
from ..inputs.text import icl_prompts
from ..results import ResultMeta, Tabular, load_result, save_tensors
from ..vocabulary import BATCH_SIZE, N_PROMPTS

__all__ = [
    "CONDITIONS",
    "TEXT_QUERY_CONDITIONS",
    "IMAGE_TASKS",
    "CrossModalVectors",
    "crossmodal_vectors",
    "CrossModalTable",
    "crossmodal_table",
    "TaskSimilarity",
    "task_similarity",
    "LlmVlmTransfer",
    "llm_to_vlm",
    "CrossModalLens",
    "crossmodal_lens",
    "untrained_vision_copy",
    "patch_vector",
    "crossmodal_page",
    "CrossModalExamples",
    "crossmodal_examples",
]

UInt8Tensor = Tensor  # uint8 images [..., h, w, c]

#: Luo et al. 2024, Table 2's rows, in order
CONDITIONS = ("No Context", "Image ICL Base", "Image ICL Patch", "Text ICL xBase", "Text ICL xPatch",
              "Instruction xBase", "Instruction xPatch", "Ensemble")
#: the patched conditions and the vector each patches (the ensemble: mean of instruction and text vectors)
PATCHED = {"Image ICL Patch": "image", "Text ICL xPatch": "text", "Instruction xPatch": "instruction", "Ensemble": "ensemble"}
#: image-ICL vectors on text queries (Luo §4.3), in order
TEXT_QUERY_CONDITIONS = ("No Context", "Text ICL Base", "Text ICL Patch", "Image ICL xBase", "Image ICL xPatch")
_TEXT_PATCHED = {"Text ICL Patch": "text", "Image ICL xPatch": "image"}
KINDS = ("image", "text", "instruction", "ensemble")
#: paired comparisons over the same queries: (patched, base)
PAIRS = (("Text ICL xPatch", "Text ICL xBase"), ("Image ICL Patch", "Image ICL Base"),
         ("Instruction xPatch", "Instruction xBase"), ("Ensemble", "Text ICL xPatch"))


def _image_tasks() -> tuple[str, ...]:
    from ..organisms.vlm.images import DOMAIN_TASKS

    return tuple(t for ts in DOMAIN_TASKS.values() for t in ts)


#: the tasks whose inputs ``organism-vlm``'s image generator draws (flags, numbers, letters)
IMAGE_TASKS = _image_tasks()


# ----------------------------------------------------------------------------------------------
# small statistics


def _item_stats(correct: Tensor, items: Sequence[str]) -> tuple[float, float, int]:
    """Mean, variance over items (an item's renderings averaged first), number of items."""
    per: dict[str, list[float]] = {}
    for c, x in zip(correct.float().tolist(), items):
        per.setdefault(x, []).append(c)
    vals = torch.tensor([sum(v) / len(v) for v in per.values()], dtype=torch.float64)
    if vals.numel() == 0:
        return float("nan"), float("nan"), 0
    var = float(vals.var(unbiased=True)) if vals.numel() > 1 else 0.0
    return float(vals.mean()), var, int(vals.numel())


def _pooled(rows: Sequence[tuple[float, float, int]]) -> tuple[float, float]:
    """Mean over tasks and its standard error ``sqrt(Σ var_t / n_t) / T``."""
    rows = [r for r in rows if r[2] > 0 and math.isfinite(r[0])]
    if not rows:
        return float("nan"), float("nan")
    T = len(rows)
    return sum(r[0] for r in rows) / T, math.sqrt(sum(r[1] / r[2] for r in rows)) / T


def _paired(a: Mapping[str, Tensor], b: Mapping[str, Tensor], items: Mapping[str, Sequence[str]]) -> tuple[float, float, float, float]:
    """Paired difference a − b over the same queries: mean, SE, z, two-sided normal p."""
    diffs = [_item_stats(a[t].float() - b[t].float(), items[t]) for t in a]
    mean, se = _pooled(diffs)
    z = mean / se if se > 0 else (0.0 if mean == 0 else math.copysign(math.inf, mean))
    p = math.erfc(abs(z) / math.sqrt(2)) if math.isfinite(z) else 0.0
    return mean, se, z, p


def _hits(pred: Int[Tensor, " batch"], batch: Any) -> Tensor:
    """First-token accuracy: the prediction is the first token of an accepted answer."""
    accepted = batch.accepted_answer_tokens
    return torch.tensor([int(p) in {a[0] for a in acc if a} for p, acc in zip(pred.tolist(), accepted)])


# ----------------------------------------------------------------------------------------------
# forwards (all through the engine)


def _check(model: Any, batch: Any, what: str) -> None:
    mm.check_inputs(model, batch, what)


def _rows(batch: Any, i: int, j: int) -> Any:
    return batch.select(list(range(i, min(j, len(batch)))))


@torch.no_grad()
def _final_states(model: Any, batch: Any, layers: Sequence[int], batch_size: int) -> Float[Tensor, "layer batch d_model"]:
    """The residual entering each block of ``layers`` at the final separator, one row per prompt."""
    from ..models import ModelInfo

    n_layers = ModelInfo.of(model).n_layers
    names = [resid_name(l, n_layers) for l in layers]
    out = []
    batch_size = rows_per_forward(batch_size)
    for i in range(0, len(batch), batch_size):
        sub = _rows(batch, i, i + batch_size)
        acts, _ = read(model, sub.tokens, sub.attention_mask, names, last=True, cast=torch.float32, **_inputs(sub, model))
        out.append(torch.stack([acts[n][:, 0].cpu() for n in names]))
    return torch.cat(out, dim=1)


def _inputs(batch: Any, model: Any) -> dict[str, Tensor]:
    fn = getattr(batch, "model_inputs", None)
    if not callable(fn):
        return {}
    dev = device_of(model)
    return {k: v.to(dev) for k, v in fn().items()}


@torch.no_grad()
def _predict(model: Any, batch: Any, batch_size: int) -> Int[Tensor, " batch"]:
    """Argmax at the final separator of each prompt (no edit)."""
    out = []
    batch_size = rows_per_forward(batch_size)
    for i in range(0, len(batch), batch_size):
        sub = _rows(batch, i, i + batch_size)
        _, logits = read(model, sub.tokens, sub.attention_mask, [], **_inputs(sub, model))
        out.append(logits.argmax(-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def _patched_predictions(model: Any, batch: Any, columns: Sequence[tuple[int, Tensor]], batch_size: int
                         ) -> tuple[Int[Tensor, " batch"], Int[Tensor, "batch column"]]:
    """Clean argmax and the argmax with column ``c``'s vector replacing the final residual entering
    block ``layer_c`` (Hendel et al. 2023, §3; Luo et al. 2024, §4): one :class:`PatchRunner` per chunk."""
    clean, patched = [], []
    edits = [replace_resid(layer, vec, columns=c) for c, (layer, vec) in enumerate(columns)]
    batch_size = rows_per_forward(batch_size)
    for i in range(0, len(batch), batch_size):
        runner = PatchRunner(model, _rows(batch, i, i + batch_size))
        clean.append(runner.clean_logits.argmax(-1).cpu())
        if columns:
            patched.append(runner.map(edits, lambda lg: lg.argmax(-1), n_columns=len(columns)).cpu())
        else:
            patched.append(torch.zeros((len(clean[-1]), 0), dtype=torch.long))
    return torch.cat(clean), torch.cat(patched)


def patch_vector(model: Any, batch: Any, vector: Any, *, batch_size: int | None = BATCH_SIZE) -> Int[Tensor, " batch"]:
    """Argmax at the final separator with a :class:`~tvlens.TaskVector` replacing the residual there (Luo §4 xPatch).

    Refuses, before any forward, a vector made with another model (config hash, width, layer) and a
    batch the model cannot run (:func:`tvlens.inputs.multimodal.check_inputs`).
    """
    layer = vector.check_model(model)
    _check(model, batch, "the query prompts")
    _, pred = _patched_predictions(model, batch, [(layer, vector.vector)], batch_size)
    return pred[:, 0]


# ----------------------------------------------------------------------------------------------
# task vectors of every kind


def _task_name(task: Any) -> str:
    return str(getattr(task, "name", task))


def _context_batches(model: Any, task: str, n_contexts: int, n_shots: int, seed: int, picture: Any) -> dict[str, Any]:
    """Prompts the vectors are averaged over: queries from the train split (Hendel's dummy query)."""
    kw = dict(n_prompts=n_contexts, seed=seed, split="train")
    return {
        "text": icl_prompts(model, task, n_shots=n_shots, **kw),
        "image": mm.image_icl_prompts(model, task, n_shots=n_shots, picture=picture, **kw),
        "instruction": icl_prompts(model, task, n_shots=0, instruction="only", **kw),
    }


@dataclass(frozen=True)
class CrossModalVectors:
    """Mean final-separator residuals of text-ICL, image-ICL and instruction prompts, at every layer.

    ``mean[task][kind]`` is ``[layer, d_model]`` over ``layers`` (``kind`` in image, text,
    instruction, ensemble = (instruction + text) / 2, Luo et al. 2024, §4.2).
    """

    layers: tuple[int, ...]
    mean: Mapping[str, Mapping[str, Tensor]]
    n_contexts: int
    n_shots: int
    seed: int
    model_hash: str

    def at(self, task: str, kind: str, layer: int) -> Float[Tensor, " d_model"]:
        return self.mean[task][kind][self.layers.index(layer)]


def crossmodal_vectors(model: Any, tasks: Sequence[Any] | None = None, *, n_contexts: int = 32, n_shots: int = 5,
                       layers: Sequence[int] | None = None, seed: int = 0, batch_size: int | None = BATCH_SIZE,
                       picture: Callable | None = None) -> CrossModalVectors:
    """Task vectors from text ICL, image ICL and instructions for each task (Luo et al. 2024, §4)."""
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    layers = _layers(model, layers)
    names = [_task_name(t) for t in (tasks or IMAGE_TASKS)]
    mean: dict[str, dict[str, Tensor]] = {}
    for t in names:
        batches = _context_batches(model, t, n_contexts, n_shots, seed, picture)
        for k, b in batches.items():
            _check(model, b, f"the {k} context prompts of {t!r}")
        mean[t] = {k: _final_states(model, b, layers, batch_size).mean(1) for k, b in batches.items()}
        mean[t]["ensemble"] = (mean[t]["instruction"] + mean[t]["text"]) / 2
    return CrossModalVectors(tuple(layers), mean, n_contexts, n_shots, seed, info.config_hash)


def _layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    from ..hooks import check_layer
    from ..models import ModelInfo

    n = ModelInfo.of(model).n_layers
    if layers is None:
        return list(range(n))
    out = sorted({check_layer(model, int(l)) for l in layers})
    if not out:
        raise ValueError("layers is empty; pass at least one layer (e.g. layers=[2]) or None for all")
    return out


# ----------------------------------------------------------------------------------------------
# result plumbing


class _Saved(Tabular):
    """save / load / to_html shared by the results of this module (safetensors + JSON, refused for another model)."""

    KIND: ClassVar[str] = ""

    def _tensors(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def _json(self) -> dict[str, Any]:
        raise NotImplementedError

    def save(self, path: Any) -> Any:
        """Write ``<path>.safetensors`` and ``<path>.json`` (atomic); returns the tensor file's path."""
        return save_tensors(path, self._tensors(), {"kind": self.KIND, "meta": self.meta.to_dict(), **self._json()})

    @classmethod
    def load(cls, path: Any, model: Any = None) -> Any:
        """Load a saved result; with ``model``, refuse one made with another model."""
        tensors, meta = load_result(path, cls.KIND, model=model)
        return cls._restore(tensors, meta)

    def to_html(self, path: Any) -> Any:
        """``.plot()`` as an HTML file (plotly.js beside it); returns its path."""
        from ..plot import save_figure

        return save_figure(self.plot(), path, png=False)[0]


def _meta(model: Any, tasks: Sequence[str], seed: int, **extra: Any) -> ResultMeta:
    return ResultMeta.for_model(model, tasks=tuple(tasks), seed=seed, **extra)


# ----------------------------------------------------------------------------------------------
# the table


@dataclass(frozen=True, eq=False)
class CrossModalTable(_Saved):
    """Luo et al. 2024's Table 2 on one model: accuracy per condition and task, test split.

    ``accuracy`` / ``item_var`` ``[condition, task]`` (variance over items), ``n_items`` ``[task]``,
    ``mean`` / ``se`` ``[condition]``; ``layers`` the dev-chosen layer of each patched condition;
    ``curves`` ``[kind, layer]`` the dev accuracy of patching each kind of vector at each layer;
    ``paired`` ``[pair, 4]`` (mean difference, SE, z, p) for :data:`PAIRS`; ``control`` the
    cross-task control; ``text_query`` the image → text direction (same layout, on text queries);
    ``conflict`` task conflict (instruction vector of A into B's instruction-in-context prompts).
    """

    KIND: ClassVar[str] = "CrossModalTable"

    conditions: tuple[str, ...]
    tasks: tuple[str, ...]
    accuracy: Float[Tensor, "condition task"]
    item_var: Float[Tensor, "condition task"]
    n_items: Int[Tensor, " task"]
    mean: Float[Tensor, " condition"]
    se: Float[Tensor, " condition"]
    layers: Mapping[str, int]
    curve_layers: tuple[int, ...]
    curves: Float[Tensor, "kind layer"]
    paired: Float[Tensor, "pair 4"]
    control: Mapping[str, float]
    text_query: Mapping[str, Any]
    conflict: Mapping[str, float]
    settings: Mapping[str, Any]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def cell(self, condition: str, task: str | None = None) -> tuple[float, float]:
        """(accuracy, SE) of one condition: mean over tasks, or one task."""
        c = self.conditions.index(condition)
        if task is None:
            return float(self.mean[c]), float(self.se[c])
        t = self.tasks.index(task)
        n = max(1, int(self.n_items[t]))
        return float(self.accuracy[c, t]), math.sqrt(float(self.item_var[c, t]) / n)

    def pair(self, patched: str = "Text ICL xPatch", base: str = "Text ICL xBase") -> dict[str, float]:
        """Paired difference ``patched − base`` over the same queries: mean, se, z, p."""
        i = [tuple(p) for p in PAIRS].index((patched, base))
        return dict(zip(("mean", "se", "z", "p"), (float(x) for x in self.paired[i])))

    def records(self) -> list[dict[str, Any]]:
        """Long frame: one row per (condition, task) and per condition's mean ('mean'), with SE and layer."""
        rows = []
        for c, cond in enumerate(self.conditions):
            layer = self.layers.get(cond)
            for t, task in enumerate(self.tasks):
                acc, se = self.cell(cond, task)
                rows.append(dict(condition=cond, task=task, accuracy=acc, se=se, n_items=int(self.n_items[t]), layer=layer))
            rows.append(dict(condition=cond, task="mean", accuracy=float(self.mean[c]), se=float(self.se[c]),
                             n_items=int(self.n_items.sum()), layer=layer))
        return rows

    def markdown(self) -> str:
        """The table as markdown: means with SE and layers, the paired tests, control, per task."""
        lines = ["| condition | accuracy ± SE (test) | layer (dev) |", "|---|---|---|"]
        for c, cond in enumerate(self.conditions):
            layer = self.layers.get(cond)
            lines.append(f"| {cond} | {float(self.mean[c]):.3f} ± {float(self.se[c]):.3f} | {'L' + str(layer) if layer is not None else '—'} |")
        if self.control:
            lines.append(f"| cross-task control: A's text vector on B's image queries, vs B where answers differ "
                         f"({int(self.control['pairs'])} pairs) | {self.control['vs_B']:.3f} | L{int(self.control['layer'])} |")
            lines.append(f"| … the same, scored vs A's answers | {self.control['vs_A']:.3f} | L{int(self.control['layer'])} |")
        lines.append("")
        for (a, b), row in zip(PAIRS, self.paired.tolist()):
            lines.append(f"* {a} − {b}, paired over the same queries: {row[0]:+.3f} ± {row[1]:.3f} (z = {row[2]:.2f}, p = {row[3]:.2g})")
        lines += ["", "| task | " + " | ".join(self.conditions) + " |", "|---" * (len(self.conditions) + 1) + "|"]
        for t, task in enumerate(self.tasks):
            lines.append(f"| {task} | " + " | ".join(f"{float(self.accuracy[c, t]):.2f}" for c in range(len(self.conditions))) + " |")
        lines += ["", "| dev accuracy by layer | " + " | ".join(f"L{l}" for l in self.curve_layers) + " |",
                  "|---" * (len(self.curve_layers) + 1) + "|"]
        for k, kind in enumerate(KINDS):
            lines.append(f"| {kind} vector on image queries | " + " | ".join(f"{v:.3f}" for v in self.curves[k].tolist()) + " |")
        tq = self.text_query
        if tq:
            lines += ["", "| text queries (image → text) | accuracy ± SE | layer (dev) |", "|---|---|---|"]
            for c, cond in enumerate(tq["conditions"]):
                layer = tq["layers"].get(cond)
                lines.append(f"| {cond} | {tq['mean'][c]:.3f} ± {tq['se'][c]:.3f} | {'L' + str(layer) if layer is not None else '—'} |")
        cf = self.conflict
        if cf:
            lines += ["", f"Task conflict ({int(cf['pairs'])} task pairs; B's instruction in context, A's instruction vector "
                      f"patched at L{int(cf['layer'])}; queries where A's and B's answers differ): answers A "
                      f"{cf['follows_patch']:.3f}, answers B {cf['follows_context']:.3f}; without the patch: answers B "
                      f"{cf['base_context']:.3f}, answers A {cf['base_patch']:.3f}."]
        return "\n".join(lines)

    def section(self) -> Any:
        """The report section (:class:`tvlens.report.Section`) of this table."""
        from ..report import Section

        p = self.pair()
        summary = (
            f"Luo et al.'s Table 2 on {len(self.tasks)} tasks with image inputs, test split "
            f"({self.settings.get('renderings')} held-out rendering(s) per item), layers chosen on dev; first-token "
            "accuracy ± SE (items are the unit).",
            f"Text ICL xPatch − xBase, paired over the same queries: {p['mean']:+.3f} ± {p['se']:.3f} (z = {p['z']:.2f}).",
            (f"Cross-task control (A's text vector on B's image queries, scored vs B where answers differ): "
             f"{self.control['vs_B']:.3f}." if self.control and self.control.get("pairs") else ""),
        )
        table = [("condition", "accuracy ± SE", "layer")] + [
            (c, f"{float(self.mean[i]):.3f} ± {float(self.se[i]):.3f}",
             f"L{self.layers[c]}" if c in self.layers else "—") for i, c in enumerate(self.conditions)]
        return Section("crossmodal", "Cross-modal task vectors (VLM)", tuple(x for x in summary if x),
                       (("crossmodal_table", self.plot()),), tuple(table), result=self)

    def __repr__(self) -> str:
        xp, xb = self.cell("Text ICL xPatch"), self.cell("Text ICL xBase")
        return (f"CrossModalTable(tasks={len(self.tasks)}, Text ICL xPatch={xp[0]:.3f}±{xp[1]:.3f}, "
                f"xBase={xb[0]:.3f}±{xb[1]:.3f}, model={self.meta.model!r})")

    def plot(self, *, title: str | None = None) -> Any:
        """Bars: mean accuracy ± SE per condition (test), the text-query direction beside it when measured."""
        from ..plot import bar_plot

        hl = {"cross-task control": self.control["vs_B"]} if self.control else None
        fig = bar_plot(list(self.conditions), {"image queries": self.mean}, errors={"image queries": self.se},
                       ylabel="first-token accuracy (test)", hlines=hl,
                       title=title or f"cross-modal transfer (Luo et al. 2024, Table 2) — {self.meta.model}")
        fig.update_yaxes(range=[0, 1.05])
        return fig

    def _tensors(self) -> dict[str, Tensor]:
        out = dict(accuracy=self.accuracy, item_var=self.item_var, n_items=self.n_items, mean=self.mean, se=self.se,
                   curves=self.curves, paired=self.paired)
        return {k: v.contiguous() for k, v in out.items()}

    def _json(self) -> dict[str, Any]:
        return dict(conditions=list(self.conditions), tasks=list(self.tasks), layers=dict(self.layers),
                    curve_layers=list(self.curve_layers), control=dict(self.control), text_query=dict(self.text_query),
                    conflict=dict(self.conflict), settings=dict(self.settings))

    @classmethod
    def _restore(cls, t: Mapping[str, Tensor], m: Mapping[str, Any]) -> "CrossModalTable":
        return cls(conditions=tuple(m["conditions"]), tasks=tuple(m["tasks"]), accuracy=t["accuracy"], item_var=t["item_var"],
                   n_items=t["n_items"], mean=t["mean"], se=t["se"], layers=dict(m["layers"]),
                   curve_layers=tuple(m["curve_layers"]), curves=t["curves"], paired=t["paired"], control=dict(m["control"]),
                   text_query=dict(m["text_query"]), conflict=dict(m["conflict"]), settings=dict(m["settings"]),
                   meta=ResultMeta.from_dict(m["meta"]))


def _split_items(task: str, split: str) -> list[str]:
    from ..tasks import load_task

    seen: dict[str, None] = {}
    for x, _ in load_task(task).split(split):
        seen.setdefault(x, None)
    return list(seen)


def _query_batches(model: Any, task: str, split: str, renderings: int, n_shots: int, seed: int, picture: Any,
                   which: Sequence[str]) -> dict[str, Any]:
    """The query batches of one task and split, all over the same queries in the same order."""
    q = _split_items(task, split)
    kw = dict(queries=q, seed=seed, split=split, picture=picture)
    make = {
        "No Context": lambda: mm.image_query_prompts(model, task, renderings=renderings, **kw),
        "Image ICL Base": lambda: mm.image_icl_prompts(model, task, n_shots=n_shots, renderings=renderings, **kw),
        "Text ICL xBase": lambda: mm.text_icl_image_query_prompts(model, task, n_shots=n_shots, renderings=renderings, **kw),
        "Instruction xBase": lambda: mm.instruction_image_query_prompts(model, task, renderings=renderings, **kw),
        "text:No Context": lambda: icl_prompts(model, task, queries=q, n_shots=0, seed=seed, split=split),
        "text:Text ICL Base": lambda: icl_prompts(model, task, queries=q, n_shots=n_shots, seed=seed, split=split),
        "text:Image ICL xBase": lambda: mm.image_icl_text_query_prompts(model, task, n_shots=n_shots, **kw),
    }
    out = {w: make[w]() for w in which}
    for w, b in out.items():
        _check(model, b, f"the {w} prompts of {task!r}")
    return out


def _dev_curves(model: Any, vecs: CrossModalVectors, tasks: Sequence[str], kinds: Sequence[str], query: str,
                seed: int, picture: Any, batch_size: int) -> Tensor:
    """``[kind, layer]`` dev accuracy of patching each kind of vector at each layer into context-free queries."""
    key = "No Context" if query == "image" else "text:No Context"
    acc = torch.zeros((len(kinds), len(vecs.layers), len(tasks)))
    for ti, t in enumerate(tasks):
        b = _query_batches(model, t, "dev", 1, 0, seed, picture, [key])[key]
        cols = [(l, vecs.at(t, k, l)) for k in kinds for l in vecs.layers]
        _, pred = _patched_predictions(model, b, cols, batch_size)
        hits = torch.stack([_hits(pred[:, c], b) for c in range(len(cols))], 1).float().mean(0)
        acc[:, :, ti] = hits.reshape(len(kinds), len(vecs.layers))
    return acc.mean(-1)


def crossmodal_table(
    model: Any,
    tasks: Sequence[Any] | None = None,
    *,
    n_shots: int = 5,
    renderings: int = 3,
    n_contexts: int = 32,
    layers: Sequence[int] | None = None,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    control: bool = True,
    text_query: bool = True,
    conflict: bool = True,
    vectors: CrossModalVectors | None = None,
    picture: Callable | None = None,
) -> CrossModalTable:
    """Luo, Darrell & Bar 2024's cross-modal table (§4, Table 2) in one call, on a VLM.

    For each task: task vectors from ``n_contexts`` text-ICL, image-ICL and instruction prompts
    (``n_shots`` demonstrations, queries from train: Hendel's dummy query), the layer of each kind
    chosen on the dev split (mean over tasks), then on the test split (every test item in
    ``renderings`` held-out renderings): the base conditions with their context in the prompt and
    the patched conditions (the vector replaces the final residual entering the chosen block of the
    no-context image query). Also (flags): the cross-task control, image-ICL vectors on text queries
    (§4.3) and task conflict (§4.2). ``tasks`` default: :data:`IMAGE_TASKS` (``organism-vlm``'s
    pictures; pass ``picture=`` for others). Raises before any forward on bad input.
    """
    mm.vision_spec(model)  # a text-only model is refused here
    names = [_task_name(t) for t in (tasks or IMAGE_TASKS)]
    if len(set(names)) != len(names):
        raise ValueError(f"tasks has duplicates: {names}; name each task once")
    _check_pos("renderings", renderings)
    _check_pos("n_contexts", n_contexts)
    vecs = vectors or crossmodal_vectors(model, names, n_contexts=n_contexts, n_shots=n_shots, layers=layers, seed=seed,
                                         batch_size=batch_size, picture=picture)
    _check_vectors(model, vecs, names)
    curves = _dev_curves(model, vecs, names, KINDS, "image", seed, picture, batch_size)
    best = {cond: vecs.layers[int(curves[KINDS.index(k)].argmax())] for cond, k in PATCHED.items()}
    correct: dict[str, dict[str, Tensor]] = {c: {} for c in CONDITIONS}
    items: dict[str, list[str]] = {}
    ctl, cft = _Tally(model), _Tally(model)
    for t in names:
        qb = _query_batches(model, t, "test", renderings, n_shots, seed, picture,
                            ["No Context", "Image ICL Base", "Text ICL xBase", "Instruction xBase"])
        nc = qb["No Context"]
        items[t] = list(nc.queries)
        others = [a for a in names if a != t and _same_domain(a, t)] if control else []
        cols = [(best[c], vecs.at(t, k, best[c])) for c, k in PATCHED.items()]
        cols += [(best["Text ICL xPatch"], vecs.at(a, "text", best["Text ICL xPatch"])) for a in others]
        clean, pred = _patched_predictions(model, nc, cols, batch_size)
        correct["No Context"][t] = _hits(clean, nc)
        for c, cond in enumerate(PATCHED):
            correct[cond][t] = _hits(pred[:, c], nc)
        for j, a in enumerate(others):
            ctl.add(pred[:, len(PATCHED) + j], nc, a)
        for cond in ("Image ICL Base", "Text ICL xBase"):
            correct[cond][t] = _hits(_predict(model, qb[cond], batch_size), qb[cond])
        ib = qb["Instruction xBase"]
        rivals = [a for a in names if a != t and _same_domain(a, t)] if conflict else []
        li = best["Instruction xPatch"]
        iclean, ipred = _patched_predictions(model, ib, [(li, vecs.at(a, "instruction", li)) for a in rivals], batch_size)
        correct["Instruction xBase"][t] = _hits(iclean, ib)
        for j, a in enumerate(rivals):
            cft.add_conflict(iclean, ipred[:, j], ib, a)
    acc, var, n_items, mean, se = _summarise(correct, names, items, CONDITIONS)
    paired = torch.tensor([_paired(correct[a], correct[b], items) for a, b in PAIRS], dtype=torch.float32)
    tq = _text_query(model, vecs, names, n_shots, seed, picture, batch_size) if text_query else {}
    settings = dict(n_shots=n_shots, renderings=renderings, n_contexts=vecs.n_contexts, seed=seed, split="test",
                    layer_split="dev", accuracy="first token", se_unit="item")
    return CrossModalTable(
        conditions=CONDITIONS, tasks=tuple(names), accuracy=acc, item_var=var, n_items=n_items, mean=mean, se=se,
        layers=best, curve_layers=vecs.layers, curves=curves, paired=paired,
        control=ctl.control(best["Text ICL xPatch"]) if control else {},
        text_query=tq, conflict=cft.conflict(li) if conflict else {}, settings=settings,
        meta=_meta(model, names, seed, analysis="crossmodal_table"),
    )


def _check_pos(name: str, v: Any) -> None:
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_vectors(model: Any, vecs: CrossModalVectors, names: Sequence[str]) -> None:
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    if vecs.model_hash != info.config_hash:
        raise ValueError(f"these vectors were made with another model (config hash {vecs.model_hash}, this model's is "
                         f"{info.config_hash}); recompute them with crossmodal_vectors(model, tasks)")
    missing = [t for t in names if t not in vecs.mean]
    if missing:
        raise ValueError(f"the vectors lack tasks {missing}; compute them for every task of the table")


def _same_domain(a: str, b: str) -> bool:
    from ..organisms.vlm.images import domain_of_task

    try:
        return domain_of_task(a) == domain_of_task(b)
    except ValueError:
        return True


class _Tally:
    """Accumulates the cross-task control and the task-conflict counts over task pairs."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vs_b: list[float] = []
        self.vs_a: list[float] = []
        self.follow_patch: list[float] = []
        self.follow_ctx: list[float] = []
        self.base_ctx: list[float] = []
        self.base_patch: list[float] = []

    def _a_ids(self, batch: Any, a: str) -> tuple[Tensor, Tensor]:
        """Task A's answer to each of the batch's query items (first token as it follows the separator), and where A defines one."""
        from ..inputs.text import answer_first_tokens
        from ..tasks import load_task

        amap = {x: y for x, y in load_task(a).pairs}
        first = answer_first_tokens(self.model, a)
        defined = torch.tensor([x in amap for x in batch.queries])
        ids = torch.tensor([first[amap[x]][0] if x in amap else -1 for x in batch.queries], dtype=torch.long)
        return ids, defined

    def add(self, pred: Tensor, batch: Any, a: str) -> None:
        a_ids, defined = self._a_ids(batch, a)
        differ = defined & (a_ids != batch.answer_ids)
        if bool(differ.any()):
            self.vs_b.append(float(pred[differ].eq(batch.answer_ids[differ]).float().mean()))
        if bool(defined.any()):
            self.vs_a.append(float(pred[defined].eq(a_ids[defined]).float().mean()))

    def add_conflict(self, clean: Tensor, pred: Tensor, batch: Any, a: str) -> None:
        a_ids, defined = self._a_ids(batch, a)
        differ = defined & (a_ids != batch.answer_ids)
        if not bool(differ.any()):
            return
        b_ids = batch.answer_ids[differ]
        self.follow_patch.append(float(pred[differ].eq(a_ids[differ]).float().mean()))
        self.follow_ctx.append(float(pred[differ].eq(b_ids).float().mean()))
        self.base_ctx.append(float(clean[differ].eq(b_ids).float().mean()))
        self.base_patch.append(float(clean[differ].eq(a_ids[differ]).float().mean()))

    @staticmethod
    def _m(xs: Sequence[float]) -> float:
        return sum(xs) / len(xs) if xs else float("nan")

    def control(self, layer: int) -> dict[str, float]:
        return dict(layer=layer, pairs=len(self.vs_a), vs_B=self._m(self.vs_b), vs_A=self._m(self.vs_a))

    def conflict(self, layer: int) -> dict[str, float]:
        return dict(layer=layer, pairs=len(self.follow_patch), follows_patch=self._m(self.follow_patch),
                    follows_context=self._m(self.follow_ctx), base_context=self._m(self.base_ctx),
                    base_patch=self._m(self.base_patch))


def _summarise(correct: Mapping[str, Mapping[str, Tensor]], names: Sequence[str], items: Mapping[str, Sequence[str]],
               conditions: Sequence[str]) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    acc = torch.zeros((len(conditions), len(names)))
    var = torch.zeros_like(acc)
    n_items = torch.zeros(len(names), dtype=torch.long)
    mean, se = torch.zeros(len(conditions)), torch.zeros(len(conditions))
    for c, cond in enumerate(conditions):
        rows = []
        for t, task in enumerate(names):
            m, v, n = _item_stats(correct[cond][task], items[task])
            acc[c, t], var[c, t], n_items[t] = m, v, n
            rows.append((m, v, n))
        mean[c], se[c] = _pooled(rows)
    return acc, var, n_items, mean, se


def _text_query(model: Any, vecs: CrossModalVectors, names: Sequence[str], n_shots: int, seed: int, picture: Any,
                batch_size: int) -> dict[str, Any]:
    """Image-ICL and text-ICL vectors patched into text queries without context (Luo et al. 2024, §4.3)."""
    kinds = tuple(_TEXT_PATCHED.values())
    curves = _dev_curves(model, vecs, names, kinds, "text", seed, picture, batch_size)
    best = {cond: vecs.layers[int(curves[kinds.index(k)].argmax())] for cond, k in _TEXT_PATCHED.items()}
    correct: dict[str, dict[str, Tensor]] = {c: {} for c in TEXT_QUERY_CONDITIONS}
    items: dict[str, list[str]] = {}
    for t in names:
        qb = _query_batches(model, t, "test", 1, n_shots, seed, picture,
                            ["text:No Context", "text:Text ICL Base", "text:Image ICL xBase"])
        zs = qb["text:No Context"]
        items[t] = list(zs.queries)
        cols = [(best[c], vecs.at(t, k, best[c])) for c, k in _TEXT_PATCHED.items()]
        clean, pred = _patched_predictions(model, zs, cols, batch_size)
        correct["No Context"][t] = _hits(clean, zs)
        for c, cond in enumerate(_TEXT_PATCHED):
            correct[cond][t] = _hits(pred[:, c], zs)
        for cond in ("Text ICL Base", "Image ICL xBase"):
            b = qb["text:" + cond]
            correct[cond][t] = _hits(_predict(model, b, batch_size), b)
    acc, var, n_items, mean, se = _summarise(correct, names, items, TEXT_QUERY_CONDITIONS)
    p = _paired(correct["Image ICL xPatch"], correct["Image ICL xBase"], items)
    return dict(conditions=list(TEXT_QUERY_CONDITIONS), mean=mean.tolist(), se=se.tolist(), accuracy=acc.tolist(),
                layers=best, curves=curves.tolist(), paired_xpatch_xbase=list(p))


# ----------------------------------------------------------------------------------------------
# similarity of task representations


@dataclass(frozen=True, eq=False)
class TaskSimilarity(_Saved):
    """Text-ICL vs image-ICL task vectors at one layer (Luo et al. 2024, §5 and Fig. 1b).

    ``cosine`` ``[which, kind, task(text), task(image)]``: ``which`` 0 = this model, 1 = the same model
    with an untrained vision tower (the baseline; NaN when not measured), ``kind`` 0 = raw cosine,
    1 = centred (each modality's mean over tasks removed). ``summary[which][kind]`` holds the same-task
    mean, the other-task mean and the fraction of tasks whose nearest image vector is their own.
    ``points`` ``[n, 2]`` is the 2-D projection (PCA over both modalities, centred per modality when
    ``centred_projection``) of per-prompt task vectors; ``point_task`` / ``point_modality``
    (0 text, 1 image) label them.
    """

    KIND: ClassVar[str] = "TaskSimilarity"

    tasks: tuple[str, ...]
    layer: int
    cosine: Float[Tensor, "which kind task task2"]
    summary: Mapping[str, Mapping[str, Mapping[str, float]]]
    points: Float[Tensor, "point 2"]
    point_task: Int[Tensor, " point"]
    point_modality: Int[Tensor, " point"]
    settings: Mapping[str, Any]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        """One row per (model, cosine kind): same-task, other-task, nearest-is-same."""
        return [dict(model=w, cosine=k, **v) for w, ks in self.summary.items() for k, v in ks.items()]

    def markdown(self) -> str:
        lines = [f"| text vs image task vectors (L{self.layer}) | same task | other tasks | nearest is the same task |",
                 "|---|---|---|---|"]
        for w, ks in self.summary.items():
            for k in ("centred", "raw"):
                s = ks[k]
                lines.append(f"| {w}, {k} cosine | {s['same_task']:.3f} | {s['other_tasks']:.3f} | "
                             f"{round(s['nearest_is_same'] * len(self.tasks))}/{len(self.tasks)} |")
        return "\n".join(lines)

    def plot(self, *, title: str | None = None) -> Any:
        """Left: centred cosine text × image vectors; right: the 2-D projection, colour = task, marker = modality."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from ..plot import TEMPLATE

        fig = make_subplots(rows=1, cols=2, column_widths=[0.45, 0.55], horizontal_spacing=0.12,
                            subplot_titles=[f"centred cosine at L{self.layer} (rows text ICL, columns image ICL)",
                                            "per-prompt task vectors, 2-D PCA (● text ICL, ✕ image ICL)"])
        fig.add_trace(go.Heatmap(z=self.cosine[0, 1].numpy(), x=list(self.tasks), y=list(self.tasks), zmin=-1, zmax=1,
                                 colorscale="RdBu_r", colorbar=dict(x=0.42, len=0.9)), row=1, col=1)
        palette = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
                   "#17becf", "#393b79", "#ad494a", "#8ca252", "#de9ed6"]
        for ti, task in enumerate(self.tasks):
            for mi, (name, sym) in enumerate((("text", "circle"), ("image", "x"))):
                sel = (self.point_task == ti) & (self.point_modality == mi)
                if not bool(sel.any()):
                    continue
                p = self.points[sel]
                fig.add_trace(go.Scatter(x=p[:, 0].numpy(), y=p[:, 1].numpy(), mode="markers", name=task,
                                         legendgroup=task, marker=dict(color=palette[ti % len(palette)], symbol=sym, size=7),
                                         showlegend=mi == 0, hovertemplate=f"{task} ({name})<extra></extra>"), row=1, col=2)
        fig.update_yaxes(autorange="reversed", row=1, col=1)
        fig.update_layout(template=TEMPLATE, width=1300, height=620, font=dict(size=11),
                          title=dict(text=title or f"task vectors across modalities (Luo et al. 2024, §5) — {self.meta.model}",
                                     x=0.5, xanchor="center"))
        return fig

    def _tensors(self) -> dict[str, Tensor]:
        return dict(cosine=self.cosine.contiguous(), points=self.points.contiguous(), point_task=self.point_task,
                    point_modality=self.point_modality)

    def _json(self) -> dict[str, Any]:
        return dict(tasks=list(self.tasks), layer=self.layer, summary={w: dict(k) for w, k in self.summary.items()},
                    settings=dict(self.settings))

    @classmethod
    def _restore(cls, t: Mapping[str, Tensor], m: Mapping[str, Any]) -> "TaskSimilarity":
        return cls(tasks=tuple(m["tasks"]), layer=int(m["layer"]), cosine=t["cosine"], summary=m["summary"],
                   points=t["points"], point_task=t["point_task"], point_modality=t["point_modality"],
                   settings=dict(m["settings"]), meta=ResultMeta.from_dict(m["meta"]))


def _cosines(text: Tensor, image: Tensor) -> tuple[Tensor, dict[str, dict[str, float]]]:
    """``[kind, task, task]`` raw and centred cosines of two ``[task, d_model]`` sets, and their summaries."""
    out, summ = [], {}
    for name, (a, b) in (("raw", (text, image)), ("centred", (text - text.mean(0), image - image.mean(0)))):
        a = a.double() / a.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        b = b.double() / b.double().norm(dim=-1, keepdim=True).clamp_min(1e-12)
        C = a @ b.T
        eye = torch.eye(C.shape[0], dtype=torch.bool)
        summ[name] = dict(same_task=float(C[eye].mean()), other_tasks=float(C[~eye].mean()) if C.shape[0] > 1 else float("nan"),
                          nearest_is_same=float((C.argmax(1) == torch.arange(C.shape[0])).float().mean()))
        out.append(C.float())
    return torch.stack(out), summ


def untrained_vision_copy(model: Any, seed: int = 0) -> Any:
    """A copy of the VLM whose vision tower and projector are re-initialised (untrained), the language model unchanged.

    The baseline of Luo et al.'s similarity question: how alike text and image task vectors are
    when the vision side has learnt nothing (the image-ICL prompts' answer words still carry the task).
    """
    mm.vision_spec(model)
    twin = copy.deepcopy(model)
    hf = twin.original_model
    inner = getattr(hf, "model", hf)
    parts = [getattr(inner, n) for n in ("vision_tower", "multi_modal_projector", "visual") if getattr(inner, n, None) is not None]
    if not parts:
        raise ValueError("cannot find this VLM's vision tower (vision_tower / multi_modal_projector / visual) to re-initialise")
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        torch.manual_seed(seed)
        for part in parts:
            for mod in part.modules():
                if hasattr(mod, "reset_parameters"):
                    mod.reset_parameters()
            for name, p in part.named_parameters():
                if name.endswith("class_embedding"):
                    p.normal_(0.0, 0.02)
    from ..engine import capabilities

    capabilities.forget(twin)
    return twin


def task_similarity(
    model: Any,
    tasks: Sequence[Any] | None = None,
    *,
    layer: int | None = None,
    n_contexts: int = 32,
    n_shots: int = 5,
    seed: int = 0,
    baseline: Any = "untrained",
    batch_size: int | None = BATCH_SIZE,
    picture: Callable | None = None,
) -> TaskSimilarity:
    """How alike are task vectors from text ICL and image ICL (Luo et al. 2024, §5)?

    At ``layer`` (default: the model's middle layer, ``n_layers // 2``; pass the table's
    ``layers["Text ICL xPatch"]`` to match it), the mean final-separator state of ``n_contexts``
    text-ICL and image-ICL prompts per task; raw and centred cosines, same vs other task, nearest
    task. ``baseline="untrained"`` repeats it on :func:`untrained_vision_copy` (``None``: skip; or a
    model). The projection is a PCA of the per-prompt states of both modalities, each centred on its
    own mean (the modality offset removed, as the centred cosine does).
    """
    from ..models import ModelInfo

    mm.vision_spec(model)
    names = [_task_name(t) for t in (tasks or IMAGE_TASKS)]
    layer = _layers(model, [ModelInfo.of(model).n_layers // 2 if layer is None else layer])[0]
    states = _modal_states(model, names, layer, n_contexts, n_shots, seed, batch_size, picture)
    text = torch.stack([states[t]["text"].mean(0) for t in names])
    image = torch.stack([states[t]["image"].mean(0) for t in names])
    cos, summ = _cosines(text, image)
    summary = {"trained": summ}
    base = torch.full_like(cos, float("nan"))
    if baseline is not None:
        other = untrained_vision_copy(model, seed) if isinstance(baseline, str) and baseline == "untrained" else baseline
        if isinstance(baseline, str) and baseline != "untrained":
            raise ValueError(f"baseline must be 'untrained', a model or None, got {baseline!r}")
        bs = _modal_states(other, names, layer, n_contexts, n_shots, seed, batch_size, picture)
        base, summary["untrained vision"] = _cosines(torch.stack([bs[t]["text"].mean(0) for t in names]),
                                                     torch.stack([bs[t]["image"].mean(0) for t in names]))
        del other
    pts, ptask, pmod = _projection(states, names)
    return TaskSimilarity(tasks=tuple(names), layer=layer, cosine=torch.stack([cos, base]), summary=summary, points=pts,
                          point_task=ptask, point_modality=pmod,
                          settings=dict(n_contexts=n_contexts, n_shots=n_shots, baseline=str(baseline) if isinstance(baseline, str) or baseline is None else "model"),
                          meta=_meta(model, names, seed, analysis="task_similarity"))


def _modal_states(model: Any, names: Sequence[str], layer: int, n_contexts: int, n_shots: int, seed: int,
                  batch_size: int, picture: Any) -> dict[str, dict[str, Tensor]]:
    out = {}
    for t in names:
        b = _context_batches(model, t, n_contexts, n_shots, seed, picture)
        out[t] = {}
        for k in ("text", "image"):
            _check(model, b[k], f"the {k} context prompts of {t!r}")
            out[t][k] = _final_states(model, b[k], [layer], batch_size)[0]
    return out


def _projection(states: Mapping[str, Mapping[str, Tensor]], names: Sequence[str]) -> tuple[Tensor, Tensor, Tensor]:
    """2-D PCA of per-prompt states, each modality centred on its own mean."""
    xs, ts, ms = [], [], []
    for mi, k in enumerate(("text", "image")):
        block = torch.cat([states[t][k] for t in names])
        xs.append(block - block.mean(0))
        ts += [ti for ti, t in enumerate(names) for _ in range(states[t][k].shape[0])]
        ms += [mi] * block.shape[0]
    X = torch.cat(xs).double()
    X = X - X.mean(0)
    _, _, V = torch.linalg.svd(X, full_matrices=False)
    pts = (X @ V[:2].T).float()
    return pts, torch.tensor(ts, dtype=torch.long), torch.tensor(ms, dtype=torch.long)


# ----------------------------------------------------------------------------------------------
# LLM -> VLM


@dataclass(frozen=True, eq=False)
class LlmVlmTransfer(_Saved):
    """The LLM a VLM was built on vs the VLM, on the same text ICL prompts (Luo et al. 2024, §5).

    ``cosine`` ``[layer, task]``: cosine of the two models' text-ICL task vectors; ``other_cosine``
    ``[layer]`` the same between different tasks (the baseline). ``xpatch`` ``[source, task]``: accuracy
    on the VLM's no-context image queries (test) with the VLM's own (``source`` 0, VLM-VLM xPatch)
    or the LLM's (1, LLM-VLM xPatch) text vector patched at ``layer`` (chosen on dev for the VLM's).
    """

    KIND: ClassVar[str] = "LlmVlmTransfer"

    tasks: tuple[str, ...]
    layers: tuple[int, ...]
    layer: int
    cosine: Float[Tensor, "layer task"]
    other_cosine: Float[Tensor, " layer"]
    xpatch: Float[Tensor, "source task"]
    xpatch_se: Float[Tensor, " source"]
    llm: str
    settings: Mapping[str, Any]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        li = self.layers.index(self.layer)
        return [dict(task=t, cosine=float(self.cosine[li, i]), vlm_vlm_xpatch=float(self.xpatch[0, i]),
                     llm_vlm_xpatch=float(self.xpatch[1, i])) for i, t in enumerate(self.tasks)]

    def markdown(self) -> str:
        li = self.layers.index(self.layer)
        return "\n".join([
            f"| L{self.layer} | cosine (LLM vs VLM text vectors) | image-query accuracy ± SE |", "|---|---|---|",
            f"| other tasks (baseline) | {float(self.other_cosine[li]):.3f} | |",
            f"| VLM-VLM xPatch | — | {float(self.xpatch[0].mean()):.3f} ± {float(self.xpatch_se[0]):.3f} |",
            f"| LLM-VLM xPatch (vectors of {self.llm}) | {float(self.cosine[li].mean()):.3f} | "
            f"{float(self.xpatch[1].mean()):.3f} ± {float(self.xpatch_se[1]):.3f} |",
        ])

    def plot(self, *, title: str | None = None) -> Any:
        from ..plot import line_plot

        return line_plot(list(self.layers), {"same task": self.cosine.mean(1), "other tasks": self.other_cosine},
                         xlabel="layer", ylabel="cosine, LLM vs VLM text-ICL vectors",
                         title=title or f"LLM → VLM: {self.llm} vs {self.meta.model} (Luo et al. 2024, §5)")

    def _tensors(self) -> dict[str, Tensor]:
        return dict(cosine=self.cosine, other_cosine=self.other_cosine, xpatch=self.xpatch, xpatch_se=self.xpatch_se)

    def _json(self) -> dict[str, Any]:
        return dict(tasks=list(self.tasks), layers=list(self.layers), layer=self.layer, llm=self.llm, settings=dict(self.settings))

    @classmethod
    def _restore(cls, t: Mapping[str, Tensor], m: Mapping[str, Any]) -> "LlmVlmTransfer":
        return cls(tasks=tuple(m["tasks"]), layers=tuple(m["layers"]), layer=int(m["layer"]), cosine=t["cosine"],
                   other_cosine=t["other_cosine"], xpatch=t["xpatch"], xpatch_se=t["xpatch_se"], llm=str(m["llm"]),
                   settings=dict(m["settings"]), meta=ResultMeta.from_dict(m["meta"]))


def llm_to_vlm(
    vlm: Any,
    llm: Any,
    tasks: Sequence[Any] | None = None,
    *,
    n_contexts: int = 32,
    n_shots: int = 5,
    renderings: int = 3,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    picture: Callable | None = None,
) -> LlmVlmTransfer:
    """Luo et al. 2024 (§5): do the LLM and the VLM built on it make the same task vectors from text?

    The same text ICL prompts (same seeds; their token ids must agree) through both; cosine per task
    and layer; then each model's vectors patched into the VLM's no-context image queries (test) at
    the layer where the VLM's own vectors do best on dev. The LLM's vectors are used on the VLM on
    purpose here (the two share the residual width; that is the question asked).
    """
    from ..models import ModelInfo

    mm.vision_spec(vlm)
    iv, il = ModelInfo.of(vlm), ModelInfo.of(llm)
    if mm.is_vlm(llm):
        raise ValueError("llm is a vision-language model; pass the text-only language model the VLM was built on "
                         "(for organism-vlm: load_model('organism'))")
    if (iv.d_model, iv.n_layers) != (il.d_model, il.n_layers):
        raise ValueError(f"the LLM ({il.name}: d_model {il.d_model}, {il.n_layers} layers) and the VLM ({iv.name}: "
                         f"d_model {iv.d_model}, {iv.n_layers} layers) do not share a residual stream; pass the language "
                         "model the VLM was built on")
    names = [_task_name(t) for t in (tasks or IMAGE_TASKS)]
    layers = list(range(iv.n_layers))
    vv, lv = {}, {}
    for t in names:
        bv = icl_prompts(vlm, t, n_prompts=n_contexts, n_shots=n_shots, seed=seed, split="train")
        bl = icl_prompts(llm, t, n_prompts=n_contexts, n_shots=n_shots, seed=seed, split="train")
        if not torch.equal(bv.tokens, bl.tokens):
            raise ValueError(f"the text ICL prompts of {t!r} tokenize differently on the LLM and the VLM, so their vectors "
                             "do not come from the same inputs; use the LLM whose tokenizer the VLM extends")
        vv[t] = _final_states(vlm, bv, layers, batch_size).mean(1)
        lv[t] = _final_states(llm, bl, layers, batch_size).mean(1)
    V = torch.stack([vv[t] for t in names], 1)  # [layer, task, d_model]
    Lm = torch.stack([lv[t] for t in names], 1)
    Vn, Ln = V / V.norm(dim=-1, keepdim=True), Lm / Lm.norm(dim=-1, keepdim=True)
    C = torch.einsum("ltd,lsd->lts", Ln, Vn)
    eye = torch.eye(len(names), dtype=torch.bool)
    cosine = C[:, eye]
    other = C[:, ~eye].mean(-1) if len(names) > 1 else torch.full((len(layers),), float("nan"))
    dev = torch.zeros(len(layers))
    for t in names:
        b = _query_batches(vlm, t, "dev", 1, 0, seed, picture, ["No Context"])["No Context"]
        _, pred = _patched_predictions(vlm, b, [(l, vv[t][l]) for l in layers], batch_size)
        dev += torch.stack([_hits(pred[:, l], b).float().mean() for l in layers]) / len(names)
    layer = layers[int(dev.argmax())]
    correct: dict[str, dict[str, Tensor]] = {"VLM-VLM": {}, "LLM-VLM": {}}
    items = {}
    for t in names:
        b = _query_batches(vlm, t, "test", renderings, 0, seed, picture, ["No Context"])["No Context"]
        items[t] = list(b.queries)
        _, pred = _patched_predictions(vlm, b, [(layer, vv[t][layer]), (layer, lv[t][layer])], batch_size)
        correct["VLM-VLM"][t], correct["LLM-VLM"][t] = _hits(pred[:, 0], b), _hits(pred[:, 1], b)
    acc, _, _, _, se = _summarise(correct, names, items, ("VLM-VLM", "LLM-VLM"))
    return LlmVlmTransfer(tasks=tuple(names), layers=tuple(layers), layer=layer, cosine=cosine, other_cosine=other,
                          xpatch=acc, xpatch_se=se, llm=il.name,
                          settings=dict(n_contexts=n_contexts, n_shots=n_shots, renderings=renderings, dev_curve=dev.tolist(),
                                        xpatch_paired=list(_paired(correct["LLM-VLM"], correct["VLM-VLM"], items))),
                          meta=_meta(vlm, names, seed, analysis="llm_to_vlm"))


# ----------------------------------------------------------------------------------------------
# the logit lens on VLMs


@dataclass(frozen=True, eq=False)
class CrossModalLens(_Saved):
    """The logit lens at the final separator of image-ICL and text-ICL prompts (Luo et al. 2024, §4.1, Fig. 4).

    ``prob`` / ``geo_rank`` ``[modality, task, category, layer]`` (modality 0 text ICL, 1 image ICL;
    category input, task, answer; layers ``l`` = ``resid_pre`` of block ``l``, ``n_layers`` = the
    final ``resid_post``): mean probability and geometric-mean rank over prompts of the query item's
    word (input), the best-ranked task word (task) and the answer's first token. ``phases[m][t]`` are
    the phase ranges by the rule of :class:`tvlens.analyses.lens.Phases` (``"mean"`` = the task-mean
    curves). ``top_words[m][t]`` the top tokens of the mean distribution at the task phase.
    """

    KIND: ClassVar[str] = "CrossModalLens"
    MODALITIES: ClassVar[tuple[str, str]] = ("text ICL", "image ICL")

    tasks: tuple[str, ...]
    layers: tuple[int, ...]
    prob: Float[Tensor, "modality task category layer"]
    geo_rank: Float[Tensor, "modality task category layer"]
    phases: Mapping[str, Mapping[str, Mapping[str, Any]]]
    top_words: Mapping[str, Mapping[str, Sequence[tuple[str, float]]]]
    task_words: Mapping[str, Sequence[str]]
    settings: Mapping[str, Any]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        from .lens import CATEGORIES

        rows = []
        for m, mod in enumerate(self.MODALITIES):
            for t, task in enumerate(self.tasks):
                for c, cat in enumerate(CATEGORIES):
                    for li, layer in enumerate(self.layers):
                        rows.append(dict(modality=mod, task=task, category=cat, layer=layer,
                                         prob=float(self.prob[m, t, c, li]), geo_rank=float(self.geo_rank[m, t, c, li])))
        return rows

    def markdown(self) -> str:
        lines = ["| | input | task | answer | ordered |", "|---|---|---|---|---|"]
        fmt = lambda r: "—" if r is None else (f"L{r[0]}" if r[0] == r[1] else f"L{r[0]}–{r[1]}")  # noqa: E731
        for mod in self.MODALITIES:
            ph = self.phases[mod]["mean"]
            lines.append(f"| {mod} (mean over tasks) | {fmt(ph['input'])} | {fmt(ph['task'])} | {fmt(ph['answer'])} | {ph['ordered']} |")
        return "\n".join(lines)

    def plot(self, *, title: str | None = None) -> Any:
        """Mean probability of input / task / answer by layer, text ICL and image ICL side by side."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from ..plot import TEMPLATE
        from .lens import _COLOURS, CATEGORIES

        fig = make_subplots(rows=1, cols=2, shared_yaxes=True, subplot_titles=[
            f"{m} — phases {self._phase_str(m)}" for m in self.MODALITIES])
        labels = [f"L{l}" for l in self.layers]
        for m in range(2):
            for c, cat in enumerate(CATEGORIES):
                fig.add_trace(go.Scatter(x=labels, y=self.prob[m, :, c].mean(0).numpy(), mode="lines+markers", name=cat,
                                         line=dict(color=_COLOURS[cat]), showlegend=m == 0, legendgroup=cat), row=1, col=m + 1)
        fig.update_yaxes(title_text="mean probability at the separator", row=1, col=1)
        fig.update_layout(template=TEMPLATE, width=1100, height=460, font=dict(size=12),
                          title=dict(text=title or f"logit lens on a VLM (Luo et al. 2024, Fig. 4) — {self.meta.model}",
                                     x=0.5, xanchor="center"))
        return fig

    def _phase_str(self, mod: str) -> str:
        ph = self.phases[mod]["mean"]
        fmt = lambda r: "—" if r is None else (f"L{r[0]}" if r[0] == r[1] else f"L{r[0]}–{r[1]}")  # noqa: E731
        return " · ".join(f"{c} {fmt(ph[c])}" for c in ("input", "task", "answer"))

    def _tensors(self) -> dict[str, Tensor]:
        return dict(prob=self.prob.contiguous(), geo_rank=self.geo_rank.contiguous())

    def _json(self) -> dict[str, Any]:
        return dict(tasks=list(self.tasks), layers=list(self.layers), phases=self.phases, top_words=self.top_words,
                    task_words=self.task_words, settings=dict(self.settings))

    @classmethod
    def _restore(cls, t: Mapping[str, Tensor], m: Mapping[str, Any]) -> "CrossModalLens":
        ph = {mod: {k: {c: (tuple(v) if isinstance(v, list) else v) for c, v in d.items()} for k, d in p.items()}
              for mod, p in m["phases"].items()}
        return cls(tasks=tuple(m["tasks"]), layers=tuple(m["layers"]), prob=t["prob"], geo_rank=t["geo_rank"], phases=ph,
                   top_words={k: {t2: [tuple(x) for x in v] for t2, v in d.items()} for k, d in m["top_words"].items()},
                   task_words=m["task_words"], settings=dict(m["settings"]), meta=ResultMeta.from_dict(m["meta"]))


def _phases_of(prob: Tensor, geo_rank: Tensor, layers: Sequence[int], metric: str) -> dict[str, Any]:
    """Phase ranges from ``[category, layer]`` curves, by the rule of :class:`tvlens.analyses.lens.Phases`."""
    from .lens import CATEGORIES, _runs

    scores = -geo_rank if metric == "rank" else prob
    leader = []
    for li in range(len(layers)):
        vals = [(float(scores[c, li]), c, CATEGORIES[c]) for c in range(3) if math.isfinite(float(scores[c, li]))]
        leader.append(max(vals)[2] if vals else "")
    out: dict[str, Any] = {c: _runs(leader, list(layers), c) for c in CATEGORIES}
    out["ordered"] = bool(all(out[c] is not None for c in CATEGORIES) and out["input"][1] < out["task"][0]
                          and out["task"][1] < out["answer"][0])
    out["leader"] = leader
    return out


def crossmodal_lens(
    model: Any,
    tasks: Sequence[Any] | None = None,
    *,
    n_prompts: int = N_PROMPTS,
    n_shots: int = 5,
    task_words: Mapping[str, Sequence[str]] | Sequence[str] | None = None,
    metric: str = "rank",
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    top_k: int = 5,
    picture: Callable | None = None,
) -> CrossModalLens:
    """The logit lens at the separator of text-ICL and image-ICL prompts (Luo et al. 2024, §4.1, Fig. 4).

    Per layer, the residual at the final separator decoded with the model's final norm and
    unembedding (:class:`tvlens.analyses.lens.LogitLens`); tracked: the query item's word (*input*;
    for an image query, the word naming what the image shows), the task words (the task's instruction
    content words plus ``task_words`` — one list for all tasks or ``{task: [...]}``) and the answer.
    Phases by the rule of :class:`tvlens.analyses.lens.Phases` (``metric="rank"``: geometric-mean
    rank; ``"prob"``: mean probability, as Luo's figure).
    """
    from ..models import ModelInfo
    from .lens import CATEGORIES, _default_task_words, _nanmean, _resolve_task, _token_strings, logit_lens

    mm.vision_spec(model)
    if metric not in ("rank", "prob"):
        raise ValueError(f"metric must be 'rank' or 'prob', got {metric!r}")
    info = ModelInfo.of(model)
    names = [_task_name(t) for t in (tasks or IMAGE_TASKS)]
    layers = tuple(range(info.n_layers + 1))
    P = torch.full((2, len(names), 3, len(layers)), float("nan"))
    R = torch.full_like(P, float("nan"))
    words_used: dict[str, list[str]] = {}
    dists: dict[tuple[int, int], Tensor] = {}
    batches = {}
    for t in names:  # every batch built and checked before the first forward
        batches[t] = (icl_prompts(model, t, n_prompts=n_prompts, n_shots=n_shots, seed=seed, split="test"),
                      mm.image_icl_prompts(model, t, n_prompts=n_prompts, n_shots=n_shots, seed=seed, split="test", picture=picture))
        for b in batches[t]:
            _check(model, b, f"the lens prompts of {t!r}")
    for ti, t in enumerate(names):
        extra = task_words.get(t, []) if isinstance(task_words, Mapping) else list(task_words or [])
        words = list(dict.fromkeys([*_default_task_words(_resolve_task(t)), *extra]))
        for m, b in enumerate(batches[t]):
            res = logit_lens(model, b, task_words=words if extra else None, top_k=top_k, batch_size=batch_size)
            words_used[t] = list(res.task_words)
            for c, cat in enumerate(CATEGORIES):
                P[m, ti, c] = res.curve(cat, "prob")
                R[m, ti, c] = res.curve(cat, "geo_rank")
            dists[(m, ti)] = res.mean_probs
    phases: dict[str, dict[str, Any]] = {}
    top: dict[str, dict[str, list[tuple[str, float]]]] = {}
    for m, mod in enumerate(CrossModalLens.MODALITIES):
        phases[mod] = {t: _phases_of(P[m, ti], R[m, ti], layers, metric) for ti, t in enumerate(names)}
        phases[mod]["mean"] = _phases_of(_nanmean(P[m], 0), _nanmean(R[m].log(), 0).exp(), layers, metric)
        top[mod] = {}
        for ti, t in enumerate(names):
            ph = phases[mod][t]["task"] or (info.n_layers // 2, info.n_layers // 2)
            sel = [li for li, l in enumerate(layers) if ph[0] <= l <= ph[1]]
            p = dists[(m, ti)][sel].mean(0)
            ids = p.topk(top_k).indices.tolist()
            top[mod][t] = list(zip(_token_strings(model, ids), [float(p[i]) for i in ids]))
    return CrossModalLens(tasks=tuple(names), layers=layers, prob=P, geo_rank=R, phases=phases, top_words=top,
                          task_words=words_used, settings=dict(n_prompts=n_prompts, n_shots=n_shots, metric=metric),
                          meta=_meta(model, names, seed, analysis="crossmodal_lens"))


# ----------------------------------------------------------------------------------------------
# one page


def _md_html(md: str) -> str:
    """The markdown these results write (pipe tables, bullets, paragraphs) as HTML."""
    import html

    out, rows = [], []

    def flush() -> None:
        if rows:
            head, *body = [r for r in rows if not set(r.replace("|", "").strip()) <= {"-"}]
            cells = lambda r, tag: "".join(f"<{tag}>{html.escape(c.strip())}</{tag}>" for c in r.strip().strip("|").split("|"))  # noqa: E731
            out.append("<table><tr>" + cells(head, "th") + "</tr>" + "".join(f"<tr>{cells(r, 'td')}</tr>" for r in body) + "</table>")
            rows.clear()

    for line in md.splitlines():
        if line.startswith("|"):
            rows.append(line)
            continue
        flush()
        if line.startswith("* "):
            out.append(f"<li>{html.escape(line[2:])}</li>")
        elif line.strip():
            out.append(f"<p>{html.escape(line)}</p>")
    flush()
    return "\n".join(out)


def crossmodal_page(path: Any, *, table: CrossModalTable | None = None, similarity: TaskSimilarity | None = None,
                    llm: LlmVlmTransfer | None = None, lens: CrossModalLens | None = None,
                    examples: "CrossModalExamples | None" = None) -> Any:
    """One HTML page of the results given (tables and figures; plotly.js beside it): Luo et al. 2024 on one model."""
    from ..plot import figure_div, html_page

    parts = ["<h1>Cross-modal task vectors (Luo, Darrell &amp; Bar 2024)</h1>"]
    titles = {"table": "The cross-modal table (§4, Table 2)", "similarity": "Text vs image task vectors (§5)",
              "llm": "LLM → VLM (§5)", "lens": "Logit lens: input → task → answer (§4.1)",
              "examples": "Example prompts and the model's answers"}
    for key, r in (("table", table), ("similarity", similarity), ("llm", llm), ("lens", lens), ("examples", examples)):
        if r is None:
            continue
        parts += [f"<h2>{titles[key]}</h2>", _md_html(r.markdown()), figure_div(r.plot())]
    if len(parts) == 1:
        raise ValueError("crossmodal_page needs at least one result (table=, similarity=, llm=, lens= or examples=)")
    model = next(r for r in (table, similarity, llm, lens, examples) if r is not None).meta.model
    return html_page(path, parts, title=f"tvlens — cross-modal task vectors — {model}")


# ----------------------------------------------------------------------------------------------
# example prompts with the model's answers


@dataclass(frozen=True, eq=False)
class CrossModalExamples(_Saved):
    """A few image queries shown the four ways of Luo et al. 2024 (Table 1 / slide "xPatch"), with the model's answers.

    Row ``i``: ``demo_images[i]`` (``[shot, h, w, c]``) with ``demo_words[i]`` (the image-ICL prompt),
    ``text_demos[i]`` (the Text ICL xBase prompt's examples), ``query_images[i]``, the truth and
    ``answers[i]``: condition -> the model's first answer token (No Context, Image ICL Base, Text ICL
    xBase, Text ICL xPatch at ``layer``).
    """

    KIND: ClassVar[str] = "CrossModalExamples"

    tasks: tuple[str, ...]
    demo_images: UInt8Tensor
    demo_words: tuple[tuple[str, ...], ...]
    text_demos: tuple[tuple[tuple[str, str], ...], ...]
    query_images: UInt8Tensor
    queries: tuple[str, ...]
    truths: tuple[str, ...]
    answers: tuple[Mapping[str, str], ...]
    layer: int
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        return [dict(task=t, query=q, truth=y, **a) for t, q, y, a in zip(self.tasks, self.queries, self.truths, self.answers)]

    def markdown(self) -> str:
        conds = list(self.answers[0]) if self.answers else []
        lines = ["| task | query (image of) | truth | " + " | ".join(conds) + " |", "|---" * (3 + len(conds)) + "|"]
        for t, q, y, a in zip(self.tasks, self.queries, self.truths, self.answers):
            lines.append(f"| {t} | {q} | {y} | " + " | ".join(a[c] for c in conds) + " |")
        return "\n".join(lines)

    def plot(self, *, title: str | None = None, scale: int = 5) -> Any:
        """One row per example: the image-ICL prompt (pictures → words), the query picture, the model's answers."""
        import numpy as np
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from ..plot import TEMPLATE

        n = len(self.tasks)
        fig = make_subplots(rows=n, cols=1, vertical_spacing=0.5 / max(n, 1),
                            subplot_titles=[f"{t}: image ICL, then the query (truth: {y})" for t, y in zip(self.tasks, self.truths)])
        for i in range(n):
            tiles = [*self.demo_images[i].numpy(), self.query_images[i].numpy()]
            h, w = tiles[0].shape[:2]
            gap = 40
            strip = np.full((h * scale, len(tiles) * (w * scale + gap), 3), 255, dtype=np.uint8)
            for j, im in enumerate(tiles):
                x0 = j * (w * scale + gap)
                strip[:, x0:x0 + w * scale] = np.kron(im, np.ones((scale, scale, 1), dtype=np.uint8))
            fig.add_trace(go.Image(z=strip), row=i + 1, col=1)
            for j, word in enumerate([*self.demo_words[i], "?"]):
                fig.add_annotation(x=j * (w * scale + gap) + w * scale / 2, y=h * scale + 4, text=f"→ {word}", showarrow=False,
                                   yanchor="top", font=dict(size=12), row=i + 1, col=1)
            text = "  ·  ".join(f"{c}: <b>{a}</b>" for c, a in self.answers[i].items())
            demos = ", ".join(f"{x} → {y}" for x, y in self.text_demos[i])
            fig.add_annotation(x=0, y=h * scale + 26, xanchor="left", yanchor="top", showarrow=False, align="left",
                               text=f"text examples (xBase / xPatch source): {demos}<br>{text}", font=dict(size=11),
                               row=i + 1, col=1)
            fig.update_xaxes(visible=False, row=i + 1, col=1)
            fig.update_yaxes(visible=False, row=i + 1, col=1)
        fig.update_layout(template=TEMPLATE, width=980, height=270 * n + 110, margin=dict(l=20, r=20, t=60, b=70),
                          title=dict(text=title or f"image queries four ways (Luo et al. 2024) — {self.meta.model}, patch at L{self.layer}",
                                     x=0.5, xanchor="center"))
        return fig

    def _tensors(self) -> dict[str, Tensor]:
        return dict(demo_images=self.demo_images.contiguous(), query_images=self.query_images.contiguous())

    def _json(self) -> dict[str, Any]:
        return dict(tasks=list(self.tasks), demo_words=self.demo_words, text_demos=self.text_demos, queries=list(self.queries),
                    truths=list(self.truths), answers=[dict(a) for a in self.answers], layer=self.layer)

    @classmethod
    def _restore(cls, t: Mapping[str, Tensor], m: Mapping[str, Any]) -> "CrossModalExamples":
        return cls(tasks=tuple(m["tasks"]), demo_images=t["demo_images"], demo_words=tuple(tuple(w) for w in m["demo_words"]),
                   text_demos=tuple(tuple(tuple(p) for p in d) for d in m["text_demos"]), query_images=t["query_images"],
                   queries=tuple(m["queries"]), truths=tuple(m["truths"]), answers=tuple(m["answers"]), layer=int(m["layer"]),
                   meta=ResultMeta.from_dict(m["meta"]))



def crossmodal_examples(model: Any, tasks: Sequence[Any] | None = None, *, per_task: int = 1, n_shots: int = 3,
                        layer: int | None = None, n_contexts: int = 16, seed: int = 0, picture: Callable | None = None
                        ) -> CrossModalExamples:
    """Test queries of each task answered four ways: no context, image ICL, text ICL xBase, text ICL xPatch (Luo §4).

    The text vector is the mean of ``n_contexts`` text-ICL prompts at ``layer`` (default ``n_layers // 2``).
    """
    from ..models import ModelInfo

    mm.vision_spec(model)
    names = [_task_name(t) for t in (tasks or IMAGE_TASKS[::3])]
    layer = _layers(model, [ModelInfo.of(model).n_layers // 2 if layer is None else layer])[0]
    tok = getattr(model, "tokenizer", None)
    say = lambda i: tok.decode([int(i)]).strip() if tok is not None else str(int(i))  # noqa: E731
    rows: dict[str, list] = {k: [] for k in ("task", "dimg", "dword", "tdemo", "qimg", "q", "y", "ans")}
    for t in names:
        q = _split_items(t, "test")[:per_task]
        kw = dict(queries=q, seed=seed, split="test", picture=picture)
        nc = mm.image_query_prompts(model, t, **kw)
        ib = mm.image_icl_prompts(model, t, n_shots=n_shots, **kw)
        xb = mm.text_icl_image_query_prompts(model, t, n_shots=n_shots, **kw)
        for b in (nc, ib, xb):
            _check(model, b, f"the example prompts of {t!r}")
        text = icl_prompts(model, t, n_prompts=n_contexts, n_shots=n_shots, seed=seed, split="train")
        vec = _final_states(model, text, [layer], 64).mean(1)[0]
        clean, pred = _patched_predictions(model, nc, [(layer, vec)], 64)
        base, xbase = _predict(model, ib, 64), _predict(model, xb, 64)
        for r in range(len(nc)):
            imgs = ib.row_images(r)
            rows["task"].append(t)
            rows["dimg"].append(torch.from_numpy(np.stack(imgs[:-1])))
            rows["dword"].append(tuple(y for _, y in ib.demos[r]))
            rows["tdemo"].append(tuple(xb.demos[r]))
            rows["qimg"].append(torch.from_numpy(imgs[-1]))
            rows["q"].append(nc.queries[r])
            rows["y"].append(nc.answers[r])
            rows["ans"].append({"No Context": say(clean[r]), "Image ICL Base": say(base[r]), "Text ICL xBase": say(xbase[r]),
                                "Text ICL xPatch": say(pred[r, 0])})
    return CrossModalExamples(tasks=tuple(rows["task"]), demo_images=torch.stack(rows["dimg"]), demo_words=tuple(rows["dword"]),
                              text_demos=tuple(rows["tdemo"]), query_images=torch.stack(rows["qimg"]), queries=tuple(rows["q"]),
                              truths=tuple(rows["y"]), answers=tuple(rows["ans"]), layer=layer,
                              meta=_meta(model, names, seed, analysis="crossmodal_examples"))
