"""Task vectors, function vectors and instruction vectors: extract, apply, sweep, combine, save.

**Task vector** (Hendel et al. 2023, "In-Context Learning Creates Task Vectors"): run
few-shot prompts ``x1 → y1 \\n ... xk → yk \\n x' →`` whose final query ``x'`` is a *dummy* (an
input of the task that is not the query of interest), read the residual stream at the final
separator ``→`` entering block ``L``, and average it over prompts.  Patching that vector into a
*zero-shot* prompt ``x →`` at the same place (replacing the state there) makes the model apply
the task to ``x``.  :func:`layer_sweep` finds the layer ``L``: the accuracy of the patched
zero-shot prompts per layer, best layer chosen on a dev split and reported on a test split,
next to the zero-shot and ICL baselines measured in the same run (Hendel's protocol).

**Where a vector lives.** tvlens' *layer* ``L`` is the residual stream **entering block L**,
``blocks.L.hook_resid_pre`` (``L`` in ``0..n_layers``; layer 0 is the token embedding, layer
``n_layers`` the stream after the last block), at the **final separator**, which is position ``-1``
of every tvlens prompt (batches are left-padded).  Hendel et al.'s "layer ℓ" is the hidden state
their code reads *out of* ``layers[ℓ]`` — tvlens layer ``ℓ + 1`` (measured: tvlens L2 equals Hendel
ℓ1 to 4.8e-6); Todd et al. 2024 likewise add their function vector to the output of layer ``ℓ``,
tvlens layer ``ℓ + 1``.

**Function vector** (Todd et al. 2024, "Function Vectors in Large Language Models"): the
task-mean output ``z̄`` of every attention head at the final separator over clean ICL prompts
(:func:`tvlens.analyses.taskness.head_means`); each head's causal indirect effect (CIE) is the gain in the
probability of the correct answer when ``z̄`` of that head alone is patched, at the final
position, into prompts whose demonstrations have *shuffled labels*; the function vector is the
sum of the top-k heads' ``z̄ @ W_O``, *added* to the residual stream of zero-shot prompts.

**Instruction vector** (Luo et al. 2024, "Task Vectors are Cross-Modal"): the same read-out
as a task vector, from prompts that hold the task's instruction sentence and a query but no
examples. **Ensembles** average exemplar and instruction vectors (Luo et al.). Vectors of one
model and layer support ``+ - * /`` and :func:`mean` (the activation-space analogue of Ilharco et
al. 2023's task arithmetic); mixing models or layers raises ``ValueError`` naming both.

**Prompts.** Every function that builds prompts from a task takes how they are written as
keywords (``separator``, ``example_sep``, ``prepend_bos``: :func:`tvlens.inputs.text.prompt_options`)
and writes every prompt it builds with them. :func:`task_vector`, :func:`evaluate_vector` and
:func:`layer_sweep` (:class:`SweepPrompts`) also take ready batches, text or multimodal — Luo et
al. 2024 (§4): a vector read from a VLM's image-ICL prompts, patched into image queries. Scores
count a prompt when its top token starts any accepted answer (:func:`tvlens.metrics.accepted_metric`).

Speed (all exact; ``tests/test_vectors.py`` compares with the naive loop of
``tests/reference_vectors.py``): extraction hooks every requested layer in one pass that stops
after the last of them, and the MLP of the last block a pass runs sees only the final position
(the only one read); prompts of all tasks are pooled into length-sorted batches; in a sweep, each
ICL prompt is packed with the extraction prompt that shows the same demonstrations (shared prefix,
tree attention mask), so the demos run once for both; evaluating the vectors at every layer uses
:class:`tvlens.engine.PatchRunner`, which runs the zero-shot prompts once and recomputes only the
final token from the patched layer up, all layers side by side.
"""

from __future__ import annotations

import dataclasses
import html
import math
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import hooks as _hooks
from ..checks import check_int as _check_int
from ..vocabulary import BATCH_SIZE, N_PROMPTS
from ..engine.plan import RowsBatch, rows_per_forward, length_buckets, pad_id_of, pad_left, row_inputs, rows_of
from ..engine.readout import run_rows, run_shared, tree_mask_ok
from ..inputs.text import prompt_options, prompt_record
from ..metrics import accepted_ids, accepted_metric, cat_accepted
from ..results import Plotted, ResultMeta, Tabular, WithMeta, check_same_model, load_result, load_tensors, save_tensors

__all__ = [
    "TaskVector",
    "FunctionVector",
    "SweepResult",
    "task_vector",
    "task_vectors_all_layers",
    "instruction_vector",
    "function_vector",
    "apply_vector",
    "vector_applied",
    "evaluate_vector",
    "layer_sweep",
    "SweepPrompts",
    "ensemble",
    "mean",
    "POSITION_RULE",
    "KINDS",
]

#: What a vector's ``layer`` and position mean (stored with every saved vector).
POSITION_RULE = "final separator (position -1 of a left-padded tvlens prompt), blocks.{layer}.hook_resid_pre (residual entering block {layer})"
#: How a vector was made.
KINDS = ("task", "instruction", "function", "ensemble", "arithmetic", "custom")
_MODES = ("replace", "add")
_SPLITS = ("train", "dev", "test")
_SWEEP_KINDS = ("task", "instruction", "ensemble", "function")
_LABEL = {"task": "TV", "instruction": "IV", "ensemble": "TV+IV", "function": "FV"}


# ----------------------------------------------------------------------------------------------
# the vector objects


@dataclass(frozen=True, eq=False)
class TaskVector(Plotted, WithMeta, Tabular):
    """A vector in the residual stream at one layer, applied at the final separator.

    Attributes:
        vector: ``[d_model]`` float32 CPU tensor.
        layer: the residual stream entering block ``layer`` (``blocks.{layer}.hook_resid_pre``).
        task: the task it was made from (or an expression such as ``"(a + b)"``).
        kind: ``"task"`` (Hendel), ``"instruction"`` (Luo), ``"function"`` (Todd),
            ``"ensemble"``, ``"arithmetic"`` or ``"custom"``.
        meta: model name and config hash (checked when the vector is applied or loaded),
            seed, and in ``meta.extra`` how it was made (``n_prompts``, ``n_shots``, ``d_model``,
            ``n_layers``, ...).
        position: the position rule, :data:`POSITION_RULE`.
    """

    vector: Float[Tensor, " d_model"]
    layer: int
    task: str
    kind: str = "task"
    meta: ResultMeta = field(default_factory=ResultMeta)
    position: str = POSITION_RULE

    def __post_init__(self) -> None:
        super().__post_init__()
        v = self.vector
        if not isinstance(v, Tensor):
            raise TypeError(f"vector must be a torch.Tensor of shape [d_model], got {type(v).__name__}")
        if v.ndim != 1 or v.numel() == 0:
            raise ValueError(f"a task vector is one residual-stream vector of shape [d_model], got shape {tuple(v.shape)}")
        if not v.is_floating_point():
            raise ValueError(f"vector must be floating point, got {v.dtype}")
        v = v.detach().to("cpu", torch.float32).contiguous()
        if not bool(torch.isfinite(v).all()):
            bad = int((~torch.isfinite(v)).sum())
            raise ValueError(
                f"vector for task {self.task!r} (layer {self.layer}) has {bad} NaN/inf entries; "
                "recompute it (check the prompts and the model's dtype) or drop it"
            )
        object.__setattr__(self, "vector", v)
        if isinstance(self.layer, bool) or not isinstance(self.layer, int) or self.layer < 0:
            raise ValueError(f"layer must be a non-negative int (the block whose input the vector lives in), got {self.layer!r}")
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(self.meta, ResultMeta):
            raise TypeError(f"meta must be a tvlens.results.ResultMeta, got {type(self.meta).__name__}")

    # -- identity ------------------------------------------------------------------------------

    @property
    def d_model(self) -> int:
        return int(self.vector.shape[0])

    @property
    def hook_name(self) -> str:
        """The TransformerLens hook the vector is applied at (``blocks.{layer}.hook_resid_pre``; the last
        block's ``hook_resid_post`` for ``layer == n_layers``)."""
        return _hooks.resid_name(self.layer, int(self.meta.extra.get("n_layers") or self.layer + 1))

    @property
    def norm(self) -> float:
        return float(self.vector.norm())

    def describe(self) -> str:
        h = f", config hash {self.config_hash}" if self.config_hash else ""
        return f"{self.kind} vector {self.task!r} (model {self.model!r}{h}, layer {self.layer}, d_model {self.d_model})"

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(task={self.task!r}, kind={self.kind!r}, layer={self.layer}, "
                f"model={self.model!r}, d_model={self.d_model}, norm={self.norm:.4g})")

    def plot(self, *, title: str | None = None) -> Any:
        """The vector's ``d_model`` components, one line over the residual dimensions (a few large
        dimensions stand out here before any decoding); its norm and layer in the title."""
        from ..plot import line_plot

        return line_plot(list(range(self.d_model)), {self.task: self.vector.float()}, xlabel="residual dimension",
                         ylabel="component",
                         title=title or f"{self.kind} vector — {self.task}<br><sup>layer {self.layer} · ‖v‖ {self.norm:.3g}</sup>")

    def records(self) -> list[dict[str, Any]]:
        """One row: task, kind, layer, norm, d_model, model and how it was made (the scalar settings
        of ``meta.extra``); ``pd.concat`` the frames of several vectors to compare them. The vector
        itself is ``.vector``."""
        row = {"task": self.task, "kind": self.kind, "layer": self.layer, "norm": self.norm, "d_model": self.d_model,
               "model": self.model}
        row.update({k: v for k, v in self.meta.extra.items() if isinstance(v, (int, float, str, bool)) and k not in row})
        return [row]

    @classmethod
    def from_tensor(cls, model: Any, vector: Tensor, *, layer: int, task: str = "custom", kind: str = "custom",
                    **extra: Any) -> "TaskVector":
        """Wrap a user tensor as a vector of ``model`` at ``layer`` (checks width and layer range)."""
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        layer = _hooks.check_layer(model, layer, allow_end=True)
        if not isinstance(vector, Tensor) or vector.ndim != 1 or vector.shape[0] != info.d_model:
            shape = tuple(vector.shape) if isinstance(vector, Tensor) else type(vector).__name__
            raise ValueError(f"vector has shape {shape} but this model's residual stream is d_model={info.d_model}; "
                             f"pass a tensor of shape [{info.d_model}]")
        meta = ResultMeta.for_model(model, tasks=(task,), **_model_extra(info), **extra)
        return cls(vector=vector, layer=layer, task=task, kind=kind, meta=meta)

    # -- checks --------------------------------------------------------------------------------

    def check_model(self, model: Any, *, layer: int | None = None) -> int:
        """Raise ``ValueError`` unless this vector fits ``model`` (same config hash, width, layer range).

        Returns the layer it will be applied at (``layer`` if given and allowed, else ``self.layer``).
        """
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        check_same_model(model, self.meta.to_dict(), what=self.describe())
        if self.d_model != info.d_model:
            raise ValueError(f"{self.describe()} has width {self.d_model} but model {info.name!r} has d_model={info.d_model}; "
                             "use a vector extracted from this model")
        target = self.layer if layer is None else _hooks.check_layer(model, layer, allow_end=True)
        if target != self.layer and self.kind != "function":
            raise ValueError(
                f"{self.describe()} was extracted at layer {self.layer}, not {target}: a residual-stream state only "
                f"means something at its own layer; extract one at layer {target} (task_vector(..., layer={target})) "
                "or leave layer=None"
            )
        _hooks.check_layer(model, target, allow_end=True)
        return target

    def decode(self, model: Any, top_k: int = 10) -> list[tuple[str, float]]:
        """The vector's top tokens under the logit lens (Hendel et al. 2023: task vectors decode
        to words that describe the task), via :func:`tvlens.analyses.lens.decode`."""
        from ..analyses.lens import decode

        self.check_model(model, layer=None)
        return decode(model, self.vector, top_k, layer=self.layer)

    # -- arithmetic (Ilharco et al. 2023, in activation space) -------------------------------

    def _derived(self, vector: Tensor, task: str, kind: str = "arithmetic", tasks: Sequence[str] | None = None,
                 **extra: Any) -> "TaskVector":
        ex = {k: v for k, v in self.meta.extra.items() if k in ("d_model", "n_layers")}
        ex.update(kind=kind, **extra)
        meta = dataclasses.replace(self.meta, extra=ex, tasks=tuple(tasks) if tasks is not None else self.meta.tasks)
        return TaskVector(vector=vector, layer=self.layer, task=task, kind=kind, meta=meta)

    def __add__(self, other: Any) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        _check_compatible([self, other], "add")
        return self._derived(self.vector + other.vector, f"({self.task} + {other.task})",
                             parts=[self.task, other.task], tasks=_union_tasks([self, other]))

    def __sub__(self, other: Any) -> "TaskVector":
        if not isinstance(other, TaskVector):
            return NotImplemented
        _check_compatible([self, other], "subtract")
        return self._derived(self.vector - other.vector, f"({self.task} - {other.task})",
                             parts=[self.task, other.task], tasks=_union_tasks([self, other]))

    def __mul__(self, scale: Any) -> "TaskVector":
        s = _scalar(scale, "multiply")
        if s is None:
            return NotImplemented
        return self._derived(self.vector * s, f"{_fmt(s)} * {self.task}", scale=s)

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> "TaskVector":
        s = _scalar(scale, "divide")
        if s is None:
            return NotImplemented
        if s == 0:
            raise ZeroDivisionError(f"cannot divide {self.describe()} by 0")
        return self._derived(self.vector / s, f"{self.task} / {_fmt(s)}", scale=1.0 / s)

    def __neg__(self) -> "TaskVector":
        return self._derived(-self.vector, f"-{self.task}", scale=-1.0)

    # -- storage -------------------------------------------------------------------------------

    def _tensors(self) -> dict[str, Tensor]:
        return {"vector": self.vector}

    def _json(self) -> dict[str, Any]:
        return {"type": type(self).__name__, "task": self.task, "kind": self.kind, "layer": self.layer,
                "position": self.position, "hook": self.hook_name, "d_model": self.d_model,
                "meta": self.meta.to_dict()}

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (the tensor) and ``<path>.json`` (metadata), atomically."""
        return save_tensors(path, self._tensors(), self._json())

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "TaskVector":
        """Load a saved vector (a :class:`FunctionVector` comes back as one).

        With ``model``: refuse (``ValueError``) a vector from a different model (config hash),
        of another width, or at a layer this model does not have.
        """
        tensors, meta = load_tensors(path)
        if "vector" not in tensors or "layer" not in meta:
            raise ValueError(f"{str(path)!r} is not a saved tvlens vector (no 'vector' tensor / 'layer' field); "
                             "save vectors with TaskVector.save")
        kls: type[TaskVector] = FunctionVector if meta.get("type") == "FunctionVector" else TaskVector
        if not issubclass(kls, cls):
            raise ValueError(f"{str(path)!r} holds a {meta.get('type')}, not a {cls.__name__}; load it with TaskVector.load")
        kw: dict[str, Any] = dict(vector=tensors["vector"], layer=int(meta["layer"]), task=str(meta.get("task", "?")),
                                  kind=str(meta.get("kind", "custom")), meta=ResultMeta.from_dict(meta.get("meta", {})),
                                  position=str(meta.get("position", POSITION_RULE)))
        if kls is FunctionVector:
            kw.update(cie=tensors.get("cie"), top_heads=tuple(tuple(int(x) for x in h) for h in meta.get("top_heads", ())),
                      mean_head_outputs=tensors.get("head_outputs"))
        vec = kls(**kw)
        if model is not None:
            from ..models import ModelInfo

            info = ModelInfo.of(model)
            check_same_model(model, meta.get("meta", {}), what=f"vector file {str(path)!r}")
            if vec.d_model != info.d_model:
                raise ValueError(f"vector file {str(path)!r} has width {vec.d_model} but this model has d_model={info.d_model}; "
                                 "load it with the model it was made with")
            if not 0 <= vec.layer < info.n_layers:
                raise ValueError(f"vector file {str(path)!r} is at layer {vec.layer} but this model has layers "
                                 f"0..{info.n_layers - 1}; load it with the model it was made with")
        return vec


@dataclass(frozen=True, eq=False, repr=False)
class FunctionVector(TaskVector):
    """A function vector (Todd et al. 2024): the sum of the top heads' task-mean outputs.

    Extra attributes: ``cie`` ``[layer, head]`` — each head's causal indirect effect (gain in the
    answer's probability on shuffled-label prompts when that head's task-mean output is patched in);
    ``top_heads`` — the ``(layer, head)`` pairs summed, best first; ``mean_head_outputs``
    ``[k, d_model]`` — each top head's ``z̄ @ W_O``. Applied with ``mode="add"`` by default, at any
    layer (``apply_vector(..., layer=l)``): it is a sum of head outputs, not a state.
    """

    cie: Float[Tensor, "layer head"] | None = None
    top_heads: tuple[tuple[int, int], ...] = ()
    mean_head_outputs: Float[Tensor, "k d_model"] | None = None

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.cie is not None:
            object.__setattr__(self, "cie", self.cie.detach().to("cpu", torch.float32))
        if self.mean_head_outputs is not None:
            object.__setattr__(self, "mean_head_outputs", self.mean_head_outputs.detach().to("cpu", torch.float32))

    def _tensors(self) -> dict[str, Tensor]:
        out = {"vector": self.vector}
        if self.cie is not None:
            out["cie"] = self.cie
        if self.mean_head_outputs is not None:
            out["head_outputs"] = self.mean_head_outputs
        return out

    def _json(self) -> dict[str, Any]:
        return {**super()._json(), "top_heads": [list(h) for h in self.top_heads]}

    def plot(self, *, title: str | None = None) -> Any:
        """Heatmap of the CIE ``[layer, head]`` (shared plot module); the top heads are marked."""
        from .. import plot as _plot

        if self.cie is None:
            raise ValueError("this function vector carries no CIE map (it was built from given heads); nothing to plot")
        text = [["" for _ in range(self.cie.shape[1])] for _ in range(self.cie.shape[0])]
        for rank, (l, h) in enumerate(self.top_heads):
            text[l][h] = f"#{rank + 1}"
        return _plot.layer_head_heatmap(
            self.cie, title=title or f"Causal indirect effect per head — {self.task} (top {len(self.top_heads)} marked)",
            zlabel="CIE (Δ p(answer))", diverging=True, text=text,
        )

    def to_html(self, path: str | Path) -> Path:
        from .. import plot as _plot

        return _plot.save_figure(self.plot(), path, png=False)[0]

    def records(self) -> list[dict[str, Any]]:
        """One row per head: layer, head, ``cie`` (causal indirect effect, NaN without a CIE map),
        ``rank`` in :attr:`top_heads` (1 = best; NaN if not summed) and ``out_norm`` (‖z̄ @ W_O‖ of the
        summed heads). The vector's own summary: ``TaskVector.records``."""
        ranks = {tuple(h): i + 1 for i, h in enumerate(self.top_heads)}
        norms = {} if self.mean_head_outputs is None else {
            tuple(h): float(v.norm()) for h, v in zip(self.top_heads, self.mean_head_outputs)}
        if self.cie is not None:
            heads = [(l, h) for l in range(self.cie.shape[0]) for h in range(self.cie.shape[1])]
        else:
            heads = [tuple(h) for h in self.top_heads]
        nan = float("nan")
        return [{"task": self.task, "layer": l, "head": h, "cie": float(self.cie[l, h]) if self.cie is not None else nan,
                 "rank": ranks.get((l, h), nan), "out_norm": norms.get((l, h), nan)} for l, h in heads]


# ----------------------------------------------------------------------------------------------
# helpers: checks


def _model_extra(info: Any) -> dict[str, Any]:
    return {"d_model": info.d_model, "n_layers": info.n_layers}


def _fmt(x: float) -> str:
    return f"{x:g}"


def _scalar(x: Any, op: str) -> float | None:
    if isinstance(x, bool):
        return None
    if isinstance(x, (int, float)):
        s = float(x)
    elif isinstance(x, Tensor) and x.numel() == 1:
        s = float(x)
    else:
        return None
    if not math.isfinite(s):
        raise ValueError(f"cannot {op} a vector by {x!r}: the scale must be finite")
    return s


def _union_tasks(vs: Sequence[TaskVector]) -> list[str]:
    out: dict[str, None] = {}
    for v in vs:
        for t in (v.meta.tasks or (v.task,)):
            out.setdefault(t, None)
    return list(out)


def _check_compatible(vs: Sequence[TaskVector], op: str) -> None:
    """Vectors combined must come from one model (config hash), one layer and one width."""
    if not vs:
        raise ValueError(f"cannot {op} an empty list of vectors; pass at least one TaskVector")
    for v in vs:
        if not isinstance(v, TaskVector):
            raise TypeError(f"cannot {op} {type(v).__name__} with task vectors; pass TaskVector objects")
    a = vs[0]
    for b in vs[1:]:
        if a.config_hash and b.config_hash and a.config_hash != b.config_hash:
            raise ValueError(f"cannot {op} {a.describe()} and {b.describe()}: they come from different models; "
                             "combine vectors of one model only")
        if a.layer != b.layer:
            raise ValueError(f"cannot {op} {a.describe()} and {b.describe()}: they live at different layers "
                             f"({a.layer} vs {b.layer}); extract both at one layer")
        if a.d_model != b.d_model:
            raise ValueError(f"cannot {op} {a.describe()} and {b.describe()}: widths differ ({a.d_model} vs {b.d_model})")


def _check_mode(mode: str | None, vector: TaskVector | None, alpha: float) -> str:
    if mode is None:
        mode = "add" if vector is not None and vector.kind == "function" else "replace"
    if mode not in _MODES:
        raise ValueError(f"unknown mode {mode!r}; use 'replace' (Hendel et al. 2023) or 'add' (Todd et al. 2024)")
    a = _scalar(alpha, "scale")
    if a is None:
        raise TypeError(f"alpha must be a number, got {type(alpha).__name__}")
    if mode == "replace" and a != 1.0:
        raise ValueError(f"alpha={alpha} only applies to mode='add' (replace sets the state to the vector); "
                         "use mode='add' or scale the vector itself (2 * tv)")
    return mode


def _check_layers(model: Any, layers: Sequence[int] | None) -> list[int]:
    from ..models import ModelInfo

    n = ModelInfo.of(model).n_layers
    if layers is None:
        return list(range(n))
    if isinstance(layers, int):
        layers = [layers]
    out = sorted({_hooks.check_layer(model, int(l), allow_end=True) for l in layers})
    if not out:
        raise ValueError("layers is empty; pass layer indices or None for all layers")
    return out


def _task_obj(task: Any) -> Any:
    from ..inputs.text import _resolve_task

    return _resolve_task(task)


# ----------------------------------------------------------------------------------------------
# extraction


def _is_batch(x: Any) -> bool:
    """A ready batch of prompts (a :class:`~tvlens.PromptBatch`, a multimodal batch), not a task."""
    return isinstance(getattr(x, "tokens", None), Tensor) and hasattr(x, "attention_mask")


def _extraction_prompts(model: Any, task: Any, *, n_prompts: int, n_shots: int, dummy_query: bool, seed: int,
                        prompt_kw: Mapping[str, Any]) -> Any:
    """Hendel et al. 2023: few-shot prompts whose final query is a dummy from the train split.

    The demos of prompt ``i`` are those the ICL baseline's prompt ``i`` (same seed, test split)
    shows; only the query differs (a dummy instead of the test query). Only read, never scored: no
    answer tokens are built.
    """
    from ..inputs.text import context_prompts

    return context_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, dummy_query=dummy_query,
                           split="test", **prompt_kw)


def _means_by_owner(caps: dict[int, Tensor], layers: Sequence[int], owner: Tensor, n: int) -> Tensor:
    out = torch.zeros((n, len(layers), caps[layers[0]].shape[1]), dtype=torch.float64)
    count = torch.bincount(owner, minlength=n).to(torch.float64)
    for j, layer in enumerate(layers):
        out[:, j].index_add_(0, owner, caps[layer].to(torch.float64))
    return (out / count[:, None, None]).to(torch.float32)


def _vectors_from_batches(model: Any, batches: Sequence[Any], layers: Sequence[int], batch_size: int) -> Tensor:
    """Mean final-position residual per batch and layer: ``[batch_index, layer_index, d_model]``, one pass."""
    rows, owner, inputs = [], [], []
    for b, batch in enumerate(batches):
        r = rows_of(batch)
        rows.extend(r)
        owner.extend([b] * len(r))
        inputs.extend(row_inputs(batch))
    _, caps = run_rows(model, rows, capture=layers, logits=False, batch_size=batch_size, inputs=inputs)
    return _means_by_owner(caps, list(layers), torch.as_tensor(owner), len(batches))


def _extract_with_icl(model: Any, ext: Sequence[Any], icl: Sequence[Any], layers: Sequence[int],
                      batch_size: int, extra: Sequence[Any] = ()) -> tuple[Tensor, Tensor]:
    """Mean final residuals of ``[*ext, *extra]`` batches at ``layers`` ([batch, layer, d_model]) and the
    final logits of every ICL prompt (rows of ``icl`` concatenated).

    ICL prompt ``i`` of a task is packed with the task's extraction prompt ``i`` (they share the demos)
    when the model takes tree attention masks exactly; otherwise everything runs unpacked."""
    ext_rows = [rows_of(b) for b in ext]
    icl_rows = [rows_of(b) for b in icl]
    extra_rows = [rows_of(b) for b in extra]
    n_b = len(ext) + len(extra)
    icl_inputs = [i for b in icl for i in row_inputs(b)]
    # images (or other extra inputs) ride with their own rows: no packing of two prompts into one sequence
    with_inputs = any(icl_inputs) or any(i for b in [*ext, *extra] for i in row_inputs(b))
    if not ext or with_inputs or not tree_mask_ok(model):
        vecs = _vectors_from_batches(model, [*ext, *extra], layers, batch_size) if n_b else None
        logits, _ = run_rows(model, [r for rs in icl_rows for r in rs], batch_size=batch_size, inputs=icl_inputs)
        return vecs, logits
    if len(ext) != len(icl):
        raise ValueError("internal: one ICL batch per extraction batch")
    pairs, pair_owner, single, single_owner = [], [], [], []
    for t, (er, ir) in enumerate(zip(ext_rows, icl_rows)):
        if len(ir) > len(er):
            raise ValueError("internal: more ICL prompts than extraction prompts")
        for i, e in enumerate(er):
            if i < len(ir):
                pairs.append((e, ir[i]))
                pair_owner.append(t)
            else:
                single.append(e)
                single_owner.append(t)
    for k, rs in enumerate(extra_rows):
        single.extend(rs)
        single_owner.extend([len(ext) + k] * len(rs))
    caps_p, logits = run_shared(model, pairs, layers, batch_size)
    owner = pair_owner
    caps = caps_p
    if single:
        _, caps_s = run_rows(model, single, capture=layers, logits=False, batch_size=batch_size)
        caps = {l: torch.cat([caps_p[l], caps_s[l]]) for l in caps_p}
        owner = pair_owner + single_owner
    vecs = _means_by_owner(caps, list(layers), torch.as_tensor(owner), n_b)
    return vecs, logits


def _make_meta(model: Any, task_names: Sequence[str], seed: int | None, **extra: Any) -> ResultMeta:
    from ..models import ModelInfo

    return ResultMeta.for_model(model, tasks=tuple(task_names), seed=seed, **_model_extra(ModelInfo.of(model)), **extra)


def task_vectors_all_layers(
    model: Any,
    task: Any,
    *,
    layers: Sequence[int] | None = None,
    n_prompts: int = 50,
    n_shots: int = 5,
    dummy_query: bool = True,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    **prompt_kw: Any,
) -> list[TaskVector]:
    """Task vectors of ``task`` at every layer in ``layers`` (default all), from ONE pass of hooks.

    Same as ``[task_vector(model, task, layer=l, ...) for l in layers]``, which would run the prompts
    once per layer; here every layer's ``hook_resid_pre`` is read in the same forward, which stops
    after the last requested layer. ``task`` may be a ready batch, as in :func:`task_vector`.
    """
    n_prompts = _check_int("n_prompts", n_prompts, 1)
    n_shots = _check_int("n_shots", n_shots, 0)
    batch_size = rows_per_forward(batch_size)
    ls = _check_layers(model, layers)
    prompt_kw = prompt_options("task_vector", prompt_kw)
    if _is_batch(task):
        batch, name = _given_batch(model, task, prompt_kw, "task_vector"), str(getattr(task, "task", "custom"))
        made = dict(n_prompts=len(batch), n_shots=int(getattr(batch, "n_shots", -1)), source="prompts",
                    context=str(getattr(batch, "context", "text")))
    else:
        task = _task_obj(task)
        name = task.name
        batch = _extraction_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, dummy_query=dummy_query, seed=seed,
                                    prompt_kw=prompt_kw)
        made = dict(n_prompts=n_prompts, n_shots=n_shots, dummy_query=bool(dummy_query), source="hendel2023",
                    **prompt_record(prompt_kw))
    vecs = _vectors_from_batches(model, [batch], ls, batch_size)[0]
    return [
        TaskVector(vector=vecs[j], layer=l, task=name, kind="task", meta=_make_meta(model, [name], seed, kind="task", **made))
        for j, l in enumerate(ls)
    ]


def _given_batch(model: Any, batch: Any, prompt_kw: Mapping[str, Any], where: str, what: str = "prompts") -> Any:
    """A ready batch (text or multimodal), checked against the model before any forward (``what``
    names it in the messages)."""
    if prompt_kw:
        raise ValueError(f"{where}: prompt options {sorted(prompt_kw)} only apply when a task is given; build the batch "
                         "with them instead")
    from ..engine.batch import as_batch

    from ..inputs.multimodal import check_inputs

    as_batch(batch, "prompts")  # left padding, shapes
    # every batch: a text batch holding a VLM's image placeholders would run on placeholder embeddings
    check_inputs(model, batch, what)
    return batch


def task_vector(
    model: Any,
    task: Any,
    *,
    layer: int,
    n_prompts: int = 50,
    n_shots: int = 5,
    dummy_query: bool = True,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    **prompt_kw: Any,
) -> TaskVector:
    """Hendel et al. 2023's task vector (§3.1): the residual entering block ``layer`` at the final
    separator, averaged over ``n_prompts`` ``n_shots``-shot prompts of ``task``.

    With ``dummy_query=True`` (Hendel et al.) each prompt's final query is a dummy input from the
    train split (not among its demos), so the vector cannot carry a test query; ``False`` leaves the
    test query in (an ablation). Demos come from the train split; prompts are seeded by ``seed``.
    ``**prompt_kw``: how the prompts are written (``separator``, ``example_sep``, ``prepend_bos``;
    see :func:`tvlens.inputs.text.prompt_options`).

    ``task`` may also be a ready batch — a :class:`~tvlens.PromptBatch` or a
    :class:`~tvlens.inputs.multimodal.MultimodalBatch` (Luo et al. 2024, §3: image-ICL prompts of a
    VLM) — whose final-position residuals are averaged as they are (``n_prompts``, ``n_shots``,
    ``dummy_query`` then do not apply).
    """
    _hooks.check_layer(model, layer, allow_end=True)
    return task_vectors_all_layers(model, task, layers=[layer], n_prompts=n_prompts, n_shots=n_shots,
                                   dummy_query=dummy_query, seed=seed, batch_size=batch_size, **prompt_kw)[0]


def instruction_vector(
    model: Any,
    task: Any,
    *,
    layer: int,
    n_prompts: int = 50,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    **prompt_kw: Any,
) -> TaskVector:
    """Luo et al. 2024's instruction-based vector (§4.2): the residual entering block ``layer`` at the
    final separator of prompts ``"<instruction>\\n x →"`` (the task's instruction sentence, no
    examples), averaged over ``n_prompts`` train-split queries ``x``. ``**prompt_kw`` as in
    :func:`task_vector`.
    """
    n_prompts = _check_int("n_prompts", n_prompts, 1)
    layer = _hooks.check_layer(model, layer, allow_end=True)
    prompt_kw = prompt_options("instruction_vector", prompt_kw)
    task = _task_obj(task)
    batch = _instruction_prompts(model, task, n_prompts=n_prompts, seed=seed, prompt_kw=prompt_kw)
    vec = _vectors_from_batches(model, [batch], [layer], batch_size)[0, 0]
    return TaskVector(vector=vec, layer=layer, task=task.name, kind="instruction",
                      meta=_make_meta(model, [task.name], seed, kind="instruction", n_prompts=n_prompts, n_shots=0,
                                      source="luo2024", instruction=task.instruction, **prompt_record(prompt_kw)))


def _instruction_prompts(model: Any, task: Any, *, n_prompts: int, seed: int, prompt_kw: Mapping[str, Any]) -> Any:
    """Luo et al. 2024: the instruction and a train-split query, no demonstrations."""
    from ..inputs.text import icl_prompts

    return icl_prompts(model, task, n_prompts=n_prompts, n_shots=0, seed=seed, instruction="only", split="train",
                       **prompt_kw)


# ----------------------------------------------------------------------------------------------
# combining


def ensemble(vectors: Sequence[TaskVector], weights: Sequence[float] | None = None) -> TaskVector:
    """Weighted average of vectors of one model and layer (Luo et al. 2024: exemplar + instruction
    vectors). ``weights`` default to equal; they are normalised to sum to 1."""
    vs = list(vectors)
    _check_compatible(vs, "ensemble")
    if weights is None:
        w = torch.full((len(vs),), 1.0 / len(vs), dtype=torch.float64)
    else:
        w = torch.as_tensor([float(x) for x in weights], dtype=torch.float64)
        if w.shape[0] != len(vs):
            raise ValueError(f"{len(vs)} vectors but {w.shape[0]} weights; give one weight per vector")
        if not bool(torch.isfinite(w).all()) or float(w.sum()) == 0.0:
            raise ValueError(f"weights {list(weights)} must be finite and not sum to 0")
        w = w / w.sum()
    stacked = torch.stack([v.vector.to(torch.float64) for v in vs])
    vec = (w[:, None] * stacked).sum(0).to(torch.float32)
    names = [v.task for v in vs]
    task = names[0] if len(set(names)) == 1 else "ensemble(" + ", ".join(names) + ")"
    return vs[0]._derived(vec, task, kind="ensemble", parts=[f"{v.kind}:{v.task}" for v in vs],
                          weights=w.tolist(), tasks=_union_tasks(vs))


def mean(vectors: Sequence[TaskVector]) -> TaskVector:
    """Unweighted mean of vectors of one model and layer (``kind="arithmetic"``)."""
    vs = list(vectors)
    _check_compatible(vs, "average")
    vec = torch.stack([v.vector.to(torch.float64) for v in vs]).mean(0).to(torch.float32)
    return vs[0]._derived(vec, "mean(" + ", ".join(v.task for v in vs) + ")", kind="arithmetic",
                          parts=[v.task for v in vs], tasks=_union_tasks(vs))


# ----------------------------------------------------------------------------------------------
# applying


def _as_rows(prompts: Any, attention_mask: Tensor | None) -> tuple[list[Tensor], list[dict[str, Tensor]]]:
    if isinstance(getattr(prompts, "tokens", None), Tensor) and hasattr(prompts, "attention_mask"):
        return rows_of(prompts), row_inputs(prompts)  # a PromptBatch, or a multimodal batch with its images
    if isinstance(prompts, Tensor) and not prompts.is_floating_point():
        tokens = prompts[None] if prompts.ndim == 1 else prompts
        if tokens.ndim != 2:
            raise ValueError(f"tokens must be [batch, pos], got shape {tuple(prompts.shape)}")
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.to(tokens.device).long()
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but tokens have {tuple(tokens.shape)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("the last position of some row is padding; tvlens applies vectors at position -1, "
                             "so pad on the LEFT (tvlens.icl_prompts does)")
        return rows_of(SimpleNamespace(tokens=tokens.cpu(), attention_mask=mask.cpu())), [{} for _ in range(len(tokens))]
    raise TypeError(f"prompts must be a tvlens PromptBatch (tvlens.icl_prompts) or a [batch, pos] token tensor, "
                    f"got {type(prompts).__name__}")


def apply_vector(
    model: Any,
    prompts: Any,
    vector: TaskVector,
    *,
    mode: str | None = None,
    alpha: float = 1.0,
    layer: int | None = None,
    attention_mask: Tensor | None = None,
    batch_size: int | None = BATCH_SIZE,
) -> Float[Tensor, "batch d_vocab"]:
    """Run ``prompts`` with ``vector`` at the final position; return the final-position logits (float32 CPU).

    ``mode="replace"`` (Hendel et al. 2023): the residual entering block ``layer`` at the final
    separator becomes the vector. ``mode="add"`` (Todd et al. 2024): ``alpha * vector`` is added
    to it. ``mode=None`` picks ``"add"`` for function vectors, ``"replace"`` otherwise.
    ``layer`` defaults to ``vector.layer`` (only function vectors may be applied elsewhere).
    ``prompts``: a :class:`tvlens.PromptBatch` or left-padded tokens (+ ``attention_mask``).
    """
    if not isinstance(vector, TaskVector):
        raise TypeError(f"vector must be a TaskVector, got {type(vector).__name__}")
    mode = _check_mode(mode, vector, alpha)
    target = vector.check_model(model, layer=layer)
    batch_size = rows_per_forward(batch_size)
    rows, inputs = _as_rows(prompts, attention_mask)
    value = vector.vector * float(alpha) if mode == "add" else vector.vector
    logits, _ = run_rows(model, rows, patch_layer=target, patch_value=value, patch_mode=mode, batch_size=batch_size,
                         inputs=inputs)
    return logits


@contextmanager
def vector_applied(model: Any, vector: TaskVector, *, mode: str | None = None, alpha: float = 1.0,
                   layer: int | None = None) -> Iterator[Any]:
    """Context manager: every forward inside the block has ``vector`` applied at the LAST position.

    >>> with vector_applied(model, tv):
    ...     logits = model(tokens)          # left-padded tokens: position -1 is the separator

    Hooks go through :func:`tvlens.hooks.hooked` and are removed on exit, also on exceptions.
    Note that with incremental decoding every step's last position is patched.
    """
    if not isinstance(vector, TaskVector):
        raise TypeError(f"vector must be a TaskVector, got {type(vector).__name__}")
    from ..models import ModelInfo

    mode = _check_mode(mode, vector, alpha)
    target = vector.check_model(model, layer=layer)
    value = vector.vector * float(alpha) if mode == "add" else vector.vector

    def patch(act: Tensor, hook: Any = None) -> Tensor:
        act = act.clone()
        v = value.to(act.device, act.dtype)
        act[:, -1] = v if mode == "replace" else act[:, -1] + v
        return act

    with _hooks.hooked(model, [(_hooks.resid_name(target, ModelInfo.of(model).n_layers), patch)]):
        yield model


def evaluate_vector(
    model: Any,
    task: Any,
    vector: TaskVector,
    *,
    n_prompts: int = 50,
    seed: int = 0,
    split: str = "test",
    mode: str | None = None,
    alpha: float = 1.0,
    layer: int | None = None,
    batch_size: int | None = BATCH_SIZE,
    **prompt_kw: Any,
) -> float:
    """First-token accuracy of zero-shot prompts ``"x →"`` of ``task`` (up to ``n_prompts`` distinct
    queries from ``split``) with ``vector`` applied (see :func:`apply_vector`): Hendel et al. 2023's
    "task vector" accuracy (§3). A prompt counts when its top token starts any accepted answer
    (:func:`tvlens.metrics.accepted_metric`). ``**prompt_kw`` as in :func:`task_vector`.

    ``task`` may also be a ready batch of queries (a :class:`~tvlens.PromptBatch`, or a
    :class:`~tvlens.inputs.multimodal.MultimodalBatch` of image queries, Luo et al. 2024 §4), scored
    against its own answers (``n_prompts``, ``seed``, ``split`` then do not apply).
    """
    if not isinstance(vector, TaskVector):
        raise TypeError(f"vector must be a TaskVector, got {type(vector).__name__}")
    _check_mode(mode, vector, alpha)
    vector.check_model(model, layer=layer)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    prompt_kw = prompt_options("evaluate_vector", prompt_kw)
    if _is_batch(task):
        batch = _given_batch(model, task, prompt_kw, "evaluate_vector")
    else:
        batch = _zero_shot_prompts(model, _task_obj(task), split, _check_int("n_prompts", n_prompts, 1), seed, prompt_kw)
    logits = apply_vector(model, batch, vector, mode=mode, alpha=alpha, layer=layer, batch_size=batch_size)
    return float(_scores(logits, accepted_ids(batch))[:, 0].mean())


# ----------------------------------------------------------------------------------------------
# evaluating a grid of vectors on zero-shot prompts (PatchRunner: exact final-token recompute)


def _scores(logits: Float[Tensor, "batch *column d_vocab"], accepted: Tensor) -> Tensor:
    """``[batch, *column, 2]``: whether the top token starts an accepted answer, and the best accepted
    answer's first-token log-probability (:func:`tvlens.metrics.accepted_metric`; ``accepted``:
    ``[batch, n_accepted]`` from :func:`tvlens.metrics.accepted_ids`)."""
    acc = accepted.to(logits.device)
    acc = acc.reshape(acc.shape[0], *([1] * (logits.ndim - 2)), acc.shape[-1])
    return torch.stack([accepted_metric(logits, acc, "accuracy"), accepted_metric(logits, acc, "logprob")], -1).cpu()


@torch.no_grad()
def _grid_eval(
    model: Any,
    batches: Sequence[Any],
    vectors: Tensor,
    col_layers: Sequence[int],
    mode: str,
    alpha: float,
    *,
    rows_per_group: int = 512,
) -> tuple[list[Tensor], list[Tensor]]:
    """Patch ``vectors[b, c]`` at layer ``col_layers[c]`` into the final position of every prompt of
    batch ``b``, for every column ``c``.  Returns per batch ``scores [rows, column, 2]`` (top-1
    correct, answer log-prob; see :func:`_scores`) and the unpatched ``scores [rows, 2]`` (the
    zero-shot baseline).

    The prompts of all batches are pooled and grouped by length (no padding: no attention mask);
    each group is one :class:`~tvlens.engine.PatchRunner`: the prompts run once, then only the
    final token is recomputed from each column's layer up, every column side by side."""
    from ..engine.runner import PatchRunner
    from ..engine.sites import add_resid, replace_resid
    from ..models import ModelInfo

    n_layers = ModelInfo.of(model).n_layers
    pad = pad_id_of(model)
    rows: list[Tensor] = []
    owner: list[int] = []
    answers: list[Tensor] = []
    inputs: list[dict[str, Tensor]] = []
    for b, batch in enumerate(batches):
        r = rows_of(batch)
        rows.extend(r)
        owner.extend([b] * len(r))
        answers.append(accepted_ids(batch))
        inputs.extend(row_inputs(batch))
    own = torch.as_tensor(owner)
    acc_all = cat_accepted(answers)
    got = torch.empty((len(rows), len(col_layers), 2))
    got0 = torch.empty((len(rows), 2))
    by_layer: dict[int, list[int]] = {}
    for c, l in enumerate(col_layers):
        by_layer.setdefault(int(l), []).append(c)
    for idx in length_buckets([int(r.shape[0]) for r in rows], rows_per_group, exact=True):
        it = torch.as_tensor(idx)
        tokens, mask = pad_left([rows[i] for i in idx], pad)
        target = RowsBatch(tokens, mask, acc_all[it, 0], rows=[inputs[i] for i in idx])
        runner = PatchRunner(model, target)
        edits = []
        for l, cols in by_layer.items():
            val = vectors[own[it]][:, cols]  # [rows, cols, d_model]: each row's own task's vector
            hook, block = _hooks.resid_site(l, n_layers)  # layer n_layers: after the last block
            if mode == "replace":
                edits.append(replace_resid(block, val, columns=cols, hook=hook))
            else:
                edits.append(add_resid(block, val, alpha=float(alpha), columns=cols, hook=hook))
        ans = acc_all[it]
        got[it] = runner.map(edits, lambda logits: _scores(logits, ans), n_columns=len(col_layers)).to(got.dtype)
        got0[it] = _scores(runner.clean_logits, ans).to(got0.dtype)
    per_col = [got[own == b] for b in range(len(batches))]
    clean = [got0[own == b] for b in range(len(batches))]
    return per_col, clean


# ----------------------------------------------------------------------------------------------
# layer sweep


@dataclass(frozen=True, eq=False)
class SweepResult(Tabular):
    """Accuracy of task vectors per task and layer, with the baselines of the same run.

    ``accuracy[t, s, j]``: first-token accuracy on zero-shot prompts of task ``tasks[t]`` with
    queries from split ``splits[s]`` when the task's vector is patched at ``layers[j]`` (a prompt
    counts when its top token starts any accepted answer).
    ``zero_shot[t, s]``: the same prompts unpatched. ``icl[t]``: ``n_shots``-shot ICL accuracy on
    the report split (``splits[-1]``). ``n_eval[t, s]``: zero-shot prompts per cell.
    ``vectors[t, j]``: the task vectors themselves. ``logprob`` / ``zero_shot_logprob`` /
    ``icl_logprob``: the mean log-probability of the answer's first token in the same cells (the
    best accepted answer's; a smooth companion of the accuracy). Hendel's protocol: the best layer is chosen
    on ``splits[0]`` (dev) and reported on ``splits[-1]`` (test).
    """

    tasks: tuple[str, ...]
    families: tuple[str, ...]
    layers: tuple[int, ...]
    splits: tuple[str, ...]
    accuracy: Float[Tensor, "task split layer"]
    zero_shot: Float[Tensor, "task split"]
    icl: Float[Tensor, " task"]
    n_eval: Int[Tensor, "task split"]
    vectors: Float[Tensor, "task layer d_model"]
    logprob: Float[Tensor, "task split layer"] | None = None
    zero_shot_logprob: Float[Tensor, "task split"] | None = None
    icl_logprob: Float[Tensor, " task"] | None = None
    mode: str = "replace"
    alpha: float = 1.0
    kind: str = "task"
    meta: ResultMeta = field(default_factory=ResultMeta)

    # -- selection ------------------------------------------------------------------------------

    @property
    def select_split(self) -> str:
        return self.splits[0]

    @property
    def report_split(self) -> str:
        return self.splits[-1]

    def curve(self, split: str | None = None) -> Tensor:
        """Mean accuracy over tasks per layer on ``split`` (default the report split): ``[layer]``."""
        return self.accuracy[:, self._split_index(split)].mean(0)

    @property
    def best_layer(self) -> int:
        """The layer with the highest mean accuracy over tasks on the selection (dev) split (earliest on ties)."""
        c = self.curve(self.select_split)
        return int(self.layers[int(torch.nonzero(c == c.max())[0])])

    @property
    def best_layers(self) -> dict[str, int]:
        """Per task, the layer with the highest accuracy on the selection split (Hendel: per dataset)."""
        acc = self.accuracy[:, self._split_index(self.select_split)]
        out = {}
        for t, name in enumerate(self.tasks):
            row = acc[t]
            out[name] = int(self.layers[int(torch.nonzero(row == row.max())[0])])
        return out

    def at_best(self, per_task: bool = True) -> Tensor:
        """Report-split accuracy of each task's vector at its dev-best layer (``per_task=False``: at
        the global :attr:`best_layer`): ``[task]``."""
        s = self._split_index(self.report_split)
        if per_task:
            j = [self.layers.index(self.best_layers[t]) for t in self.tasks]
            return self.accuracy[torch.arange(len(self.tasks)), s, torch.as_tensor(j)]
        return self.accuracy[:, s, self.layers.index(self.best_layer)]

    def vector(self, task: str, layer: int | None = None) -> TaskVector:
        """The task vector of ``task`` at ``layer`` (default: the task's dev-best layer)."""
        if task not in self.tasks:
            raise KeyError(f"task {task!r} is not in this sweep; it has {', '.join(self.tasks)}")
        layer = self.best_layers[task] if layer is None else int(layer)
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not swept; choose one of {list(self.layers)}")
        ex = {k: v for k, v in self.meta.extra.items() if k in ("d_model", "n_layers", "n_prompts", "n_shots", "dummy_query")}
        meta = dataclasses.replace(self.meta, tasks=(task,), extra={**ex, "kind": self.kind, "from": "layer_sweep"})
        return TaskVector(vector=self.vectors[self.tasks.index(task), self.layers.index(layer)], layer=layer, task=task,
                          kind=self.kind, meta=meta)

    def _split_index(self, split: str | None) -> int:
        split = self.report_split if split is None else split
        if split not in self.splits:
            raise ValueError(f"split {split!r} was not evaluated; this sweep has {', '.join(self.splits)}")
        return self.splits.index(split)

    # -- summaries ------------------------------------------------------------------------------

    def summary(self) -> dict[str, dict[str, float]]:
        """Per family (and ``"all"``): mean zero-shot, task vector at per-task best layer, at the
        global best layer, ICL — all on the report split — and the number of tasks."""
        s = self._split_index(self.report_split)
        best, glob = self.at_best(True), self.at_best(False)
        out: dict[str, dict[str, float]] = {}
        fams = list(dict.fromkeys(self.families)) + ["all"]
        for fam in fams:
            idx = torch.as_tensor([i for i, f in enumerate(self.families) if fam == "all" or f == fam])
            icl = float(self.icl[idx].mean())
            tv = float(best[idx].mean())
            out[fam] = {"n_tasks": int(idx.numel()), "zero_shot": float(self.zero_shot[idx, s].mean()), "task_vector": tv,
                        f"task_vector@L{self.best_layer}": float(glob[idx].mean()), "icl": icl,
                        "tv_over_icl": tv / icl if icl > 0 else float("nan")}
        return out

    def table(self, by: str = "family") -> str:
        """A text table: per family (``by="family"``) or per task (``by="task"``), report split."""
        if by not in ("family", "task"):
            raise ValueError(f"by must be 'family' or 'task', got {by!r}")
        L = self.best_layer
        v = _LABEL.get(self.kind, "vec")
        head = f"{'':<22}{'tasks':>6}{'zero-shot':>11}{v + '@best':>10}{f'{v}@L{L}':>9}{'ICL':>7}{v + '/ICL':>10}"
        if by == "task":
            head = f"{'task':<22}{'family':>12}{'zero-shot':>11}{v + '@best':>10}{'best L':>7}{f'{v}@L{L}':>9}{'ICL':>7}"
        lines = [f"{self.kind}-vector layer sweep ({self.mode}{'' if self.mode == 'replace' else f', alpha={self.alpha:g}'}) — "
                 f"{self.meta.model}, best layer chosen on {self.select_split!r}, accuracy on {self.report_split!r}", head]
        if by == "family":
            for fam, d in self.summary().items():
                lines.append(f"{fam:<22}{d['n_tasks']:>6}{d['zero_shot']:>11.3f}{d['task_vector']:>10.3f}"
                             f"{d[f'task_vector@L{L}']:>9.3f}{d['icl']:>7.3f}{d['tv_over_icl']:>10.2f}")
        else:
            s = self._split_index(self.report_split)
            best, glob, bl = self.at_best(True), self.at_best(False), self.best_layers
            for t, name in enumerate(self.tasks):
                lines.append(f"{name:<22}{self.families[t]:>12}{float(self.zero_shot[t, s]):>11.3f}{float(best[t]):>10.3f}"
                             f"{bl[name]:>7}{float(glob[t]):>9.3f}{float(self.icl[t]):>7.3f}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        d = self.summary()["all"]
        return (f"SweepResult({self.kind}, {len(self.tasks)} tasks, layers {self.layers[0]}..{self.layers[-1]}, mode={self.mode!r}, "
                f"best_layer={self.best_layer}, zero-shot {d['zero_shot']:.3f}, TV {d['task_vector']:.3f}, ICL {d['icl']:.3f})")

    # -- figures / files ------------------------------------------------------------------------

    def plot(self, *, title: str | None = None) -> Any:
        """Mean accuracy vs layer on each split, with dashed zero-shot and ICL baselines (report split)."""
        from .. import plot as _plot

        series = {f"{self.kind} vector ({sp})": self.curve(sp).tolist() for sp in self.splits}
        s = self._split_index(self.report_split)
        hlines = {f"ICL {self.meta.extra.get('n_shots', '')}-shot ({self.report_split})": float(self.icl.mean()),
                  f"zero-shot ({self.report_split})": float(self.zero_shot[:, s].mean())}
        return _plot.line_plot(
            list(self.layers), series, hlines=hlines, xlabel="layer (residual entering block)", ylabel="accuracy",
            title=title or f"{self.kind.capitalize()} vector ({self.mode}) accuracy by layer — {self.meta.model}, {len(self.tasks)} tasks "
                           f"(best layer {self.best_layer})",
        )

    def to_html(self, path: str | Path) -> Path:
        """An HTML page (loading ``plotly.min.js`` from its folder, written there once): the plot and
        the per-family and per-task tables."""
        from .. import plot as _plot

        text = html.escape(self.table("family") + "\n\n" + self.table("task"))
        p = Path(path)
        if p.suffix != ".html":
            p = p.with_suffix(".html")
        return _plot.html_page(p, [_plot.figure_div(self.plot()), f"<pre>{text}</pre>"], title="tvlens layer sweep")

    def records(self) -> list[dict[str, Any]]:
        """One row per (task, split, layer)."""
        rows = []
        for t, name in enumerate(self.tasks):
            for s, sp in enumerate(self.splits):
                for j, l in enumerate(self.layers):
                    rows.append({"task": name, "family": self.families[t], "split": sp, "layer": l,
                                 "accuracy": float(self.accuracy[t, s, j]), "zero_shot": float(self.zero_shot[t, s]),
                                 "icl": float(self.icl[t])})
        return rows

    def save(self, path: str | Path) -> Path:
        tensors = {"accuracy": self.accuracy, "zero_shot": self.zero_shot, "icl": self.icl, "n_eval": self.n_eval,
                   "vectors": self.vectors}
        for name in ("logprob", "zero_shot_logprob", "icl_logprob"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        meta = {"type": "SweepResult", "tasks": list(self.tasks), "families": list(self.families), "layers": list(self.layers),
                "splits": list(self.splits), "mode": self.mode, "alpha": self.alpha, "kind": self.kind,
                "meta": self.meta.to_dict()}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "SweepResult":
        tensors, meta = load_result(path, "SweepResult", model=model, what=f"sweep file {str(path)!r}")
        return cls(tasks=tuple(meta["tasks"]), families=tuple(meta["families"]), layers=tuple(meta["layers"]),
                   splits=tuple(meta["splits"]), accuracy=tensors["accuracy"], zero_shot=tensors["zero_shot"],
                   icl=tensors["icl"], n_eval=tensors["n_eval"], vectors=tensors["vectors"], logprob=tensors.get("logprob"),
                   zero_shot_logprob=tensors.get("zero_shot_logprob"), icl_logprob=tensors.get("icl_logprob"), mode=meta["mode"],
                   kind=meta.get("kind", "task"),
                   alpha=float(meta["alpha"]), meta=ResultMeta.from_dict(meta.get("meta", {})))


def _zero_shot_prompts(model: Any, task: Any, split: str, n_prompts: int, seed: int,
                       prompt_kw: Mapping[str, Any] | None = None) -> Any:
    """Zero-shot prompts ``"x →"`` for distinct queries of ``split`` (at most ``n_prompts``)."""
    from ..inputs.text import icl_prompts

    n = min(n_prompts, len({x for x, _ in task.split(split)}))
    return icl_prompts(model, task, n_prompts=max(1, n), n_shots=0, seed=seed, split=split, **(prompt_kw or {}))


@dataclass(frozen=True, eq=False)
class SweepPrompts:
    """One task's ready prompts for :func:`layer_sweep`, text or multimodal (Luo et al. 2024, §4).

    ``context``: the prompts the task vector is read from (their final-position residual, averaged;
    e.g. image-ICL prompts of a VLM). ``queries``: per split, the zero-shot prompts the vector is
    patched into (e.g. image queries without context). ``icl``: the ICL baseline's prompts on the
    report split's queries (``None``: the sweep's ``icl`` is NaN for this task). ``family``: by
    default that of the shipped task of this name (else ``"custom"``).
    """

    task: str
    context: Any
    queries: Mapping[str, Any]
    icl: Any = None
    family: str | None = None

    def __post_init__(self) -> None:
        for name, b in [("context", self.context), *((f"queries[{k!r}]", v) for k, v in dict(self.queries).items()),
                        *([("icl", self.icl)] if self.icl is not None else [])]:
            if not _is_batch(b):
                raise TypeError(f"SweepPrompts.{name} must be a prompt batch (tvlens.icl_prompts, "
                                f"tvlens.inputs.multimodal.image_icl_prompts, ...), got {type(b).__name__}")
        if not self.queries:
            raise ValueError("SweepPrompts.queries is empty; give {split: zero-shot prompts} for every split swept")
        if self.family is None:
            from ..tasks import list_tasks, load_task

            object.__setattr__(self, "family", load_task(self.task).family if self.task in list_tasks() else "custom")


def layer_sweep(
    model: Any,
    tasks: Any,
    *,
    n_prompts: int = 50,
    n_shots: int = 5,
    mode: str | None = None,
    alpha: float = 1.0,
    seed: int = 0,
    splits: Sequence[str] = ("dev", "test"),
    layers: Sequence[int] | None = None,
    kind: str = "task",
    dummy_query: bool = True,
    center: bool = False,
    function_kw: Mapping[str, Any] | None = None,
    batch_size: int | None = BATCH_SIZE,
    checkpoint: str | Path | None = None,
    executor: Any = None,
    **prompt_kw: Any,
) -> SweepResult:
    """Hendel et al. 2023's layer sweep: for every task and layer, the accuracy of the task vector
    patched into zero-shot prompts, with the zero-shot and ICL baselines of the same run.

    Per task: ``n_prompts`` ``n_shots``-shot prompts with dummy queries give the task vector at every
    layer (one pass, all layers hooked); zero-shot prompts of each split in ``splits`` (up to
    ``n_prompts`` distinct queries) are run once, and the final token is recomputed with the
    vector patched at each layer (:class:`tvlens.engine.PatchRunner`: exact, and no prefix is
    recomputed); ICL accuracy is measured with ``n_shots`` demonstrations on the same queries as the
    report split's (``splits[-1]``) zero-shot prompts, so zero-shot, task-vector and ICL accuracies
    are paired, as in Hendel's tables. The best layer is chosen on ``splits[0]``.

    ``kind`` picks the vector swept: ``"task"`` (Hendel, above), ``"instruction"`` (Luo et al.:
    ``n_prompts`` instruction-only prompts, see :func:`instruction_vector`), ``"ensemble"`` (the
    mean of the two, Luo et al.), or ``"function"`` (Todd et al.: one function vector per task,
    :func:`function_vector` with ``n_shots`` and ``function_kw``, added at each layer).
    ``mode`` defaults to ``"add"`` for function vectors and ``"replace"`` otherwise; ``"add"`` adds
    ``alpha *`` the vector. ``center=True`` first subtracts the mean vector over the swept tasks at
    each layer (the task-specific part; needs >= 2 tasks).
    All prompts are built (and their errors raised) before any forward pass.

    ``checkpoint``: a file (:class:`tvlens.runs.checkpoint.SweepCheckpoint`) where each task's vectors and
    ICL baseline, then each task's layer grid, are written atomically as they finish; re-run with
    the same arguments after an interruption, the sweep computes only the unfinished tasks. A file
    from another model or configuration is refused before any forward pass. (Tasks then run one at
    a time instead of batched together: equal to float rounding.)

    ``executor`` (:mod:`tvlens.runs.executors`): ``None`` runs here; a ``RayExecutor`` runs one
    unit per task on the workers' replicas (with ``center=True``, then one unit per task for the
    grid of its centred vectors), the same task-by-task numbers as with ``checkpoint``.

    ``**prompt_kw``: how every prompt of the sweep is written (``separator``, ``example_sep``,
    ``prepend_bos``; :func:`tvlens.inputs.text.prompt_options`). Accuracy counts a prompt when its
    top token starts any accepted answer; the log-probability is the best accepted answer's
    (:func:`tvlens.metrics.accepted_metric`).

    ``tasks`` may instead be :class:`SweepPrompts` — one task's ready prompts each, text or
    multimodal (Luo et al. 2024, §4: a vector read from image-ICL prompts and patched into image
    queries); ``kind="task"`` only, and ``n_prompts``, ``n_shots``, ``dummy_query`` do not apply.
    """
    from ..runs.executors import executor_meta, splits as _splits

    t0 = time.perf_counter()
    n_prompts = _check_int("n_prompts", n_prompts, 1)
    n_shots = _check_int("n_shots", n_shots, 0)
    batch_size = rows_per_forward(batch_size)
    mode, splits = _sweep_mode_and_splits(kind, mode, alpha, splits)
    ls = _check_layers(model, layers)
    prompt_kw = prompt_options("layer_sweep", prompt_kw)
    # every prompt first: bad input fails before any forward pass
    plan = _sweep_plan(model, tasks, kind=kind, splits=splits, n_prompts=n_prompts, n_shots=n_shots, seed=seed,
                       dummy_query=dummy_query, center=center, prompt_kw=prompt_kw, checkpoint=checkpoint,
                       executor=executor)
    task_list = plan.tasks
    ck_config = dict(
        what="layer_sweep", tasks=[t.name for t in task_list], n_prompts=n_prompts, n_shots=n_shots, mode=mode,
        alpha=float(alpha), seed=seed, splits=list(splits), layers=list(ls), kind=kind, dummy_query=bool(dummy_query),
        center=bool(center), function_kw=dict(function_kw or {}), batch_size=batch_size, **prompt_record(prompt_kw))
    if _splits(executor):  # one unit per task, on the executor's workers
        from ..runs import distributed

        return distributed.layer_sweep(
            model, task_list, executor=executor, n_prompts=n_prompts, n_shots=n_shots, mode=mode, alpha=float(alpha),
            seed=seed, splits=splits, layers=list(ls), kind=kind, dummy_query=bool(dummy_query), center=bool(center),
            function_kw=dict(function_kw) if function_kw else None, batch_size=batch_size, checkpoint=checkpoint,
            t0=t0, ck_config=ck_config, prompt_kw=prompt_kw)
    ck = None
    if checkpoint is not None:  # opened before any forward: a mismatched file is refused before work
        from ..runs.checkpoint import SweepCheckpoint

        ck = SweepCheckpoint(checkpoint, model=model, config=ck_config)
    fkw = {**prompt_kw, **dict(function_kw or {})}
    fkw.setdefault("n_shots", n_shots)
    fkw.setdefault("seed", seed)
    T = len(task_list)

    def vectors_and_icl(idx: list[int]) -> tuple[Tensor, Tensor]:
        return _sweep_vectors_and_icl(model, plan, idx, ls, kind=kind, function_kw=fkw, batch_size=batch_size)

    def grid_of(idx: list[int], v: Tensor) -> tuple[Tensor, Tensor]:
        return _sweep_grid(model, plan, idx, v, ls, mode=mode, alpha=alpha)

    if ck is None:
        vecs, icl_mean = vectors_and_icl(list(range(T)))
        vecs = vecs - vecs.mean(0, keepdim=True) if center else vecs
        grid, base = grid_of(list(range(T)), vecs)
    else:
        vecs, icl_mean, grid, base = _checkpointed_sweep(ck, task_list, vectors_and_icl, grid_of, center=center)
    made = dict(n_prompts=n_prompts, n_shots=n_shots, dummy_query=bool(dummy_query)) if not plan.given else dict(
        source="prompts", n_prompts=max(len(b) for b in plan.context), n_shots=int(getattr(plan.context[0], "n_shots", -1)))
    meta = _make_meta(model, [t.name for t in task_list], seed, kind=kind, **made, center=bool(center),
                      seconds=time.perf_counter() - t0, hook=POSITION_RULE,
                      **({"function_kw": dict(function_kw)} if function_kw else {}), executor=executor_meta(executor),
                      **prompt_record(prompt_kw))
    return _sweep_result(plan, ls, splits, vecs, icl_mean, grid, base, mode=mode, alpha=alpha, kind=kind, meta=meta)


@dataclass
class _SweepPlan:
    """Every prompt of a sweep, per task: built (and checked) before any forward."""

    tasks: list[Any]  # Task objects, or SimpleNamespace(name, family) for given prompts
    context: list[Any]  # extraction prompts (kind task / ensemble, or given)
    instruction: list[Any]  # instruction-only prompts (kind instruction / ensemble)
    zero_shot: list[list[Any]]  # [task][split] query prompts the vectors are patched into
    icl: list[Any]  # ICL baseline prompts on the report split's queries (None: not measured)
    given: bool = False


def _sweep_mode_and_splits(kind: str, mode: str | None, alpha: float, splits: Any) -> tuple[str, tuple[str, ...]]:
    """The checked patch mode (``add`` for function vectors, ``replace`` for the others by default,
    Todd et al. 2024 §2.3 / Hendel et al. 2023 §3.1) and the splits (selection split first, report split last)."""
    if kind not in _SWEEP_KINDS:
        raise ValueError(f"unknown kind {kind!r} for a layer sweep; use one of {', '.join(map(repr, _SWEEP_KINDS))}")
    if mode is None:
        mode = "add" if kind == "function" else "replace"
    mode = _check_mode(mode, None, alpha)
    splits = tuple(splits) if not isinstance(splits, str) else (splits,)
    if not splits or any(s not in _SPLITS for s in splits) or len(set(splits)) != len(splits):
        raise ValueError(f"splits must be distinct names from {_SPLITS} (selection split first, report split last), got {splits!r}")
    return mode, splits


def _sweep_result(plan: Any, ls: Sequence[int], splits: tuple[str, ...], vecs: Tensor, icl_mean: Tensor, grid: Tensor,
                  base: Tensor, *, mode: str, alpha: float, kind: str, meta: ResultMeta) -> "SweepResult":
    """The :class:`SweepResult` of a sweep's tensors: ``grid`` ``[task, split, layer, (accuracy, log-prob)]``,
    ``base`` ``[task, split, 2]`` (zero-shot), ``icl_mean`` ``[task, 2]``."""
    tasks = plan.tasks
    n_eval = torch.as_tensor([len(b) for z in plan.zero_shot for b in z]).reshape(len(tasks), len(splits))
    return SweepResult(tasks=tuple(t.name for t in tasks), families=tuple(t.family for t in tasks),
                       layers=tuple(ls), splits=splits, accuracy=grid[..., 0], zero_shot=base[..., 0], icl=icl_mean[:, 0],
                       n_eval=n_eval, vectors=vecs, logprob=grid[..., 1], zero_shot_logprob=base[..., 1],
                       icl_logprob=icl_mean[:, 1], mode=mode, alpha=float(alpha), kind=kind, meta=meta)


def _checkpointed_sweep(ck: Any, task_list: Sequence[Any], vectors_and_icl: Callable, grid_of: Callable, *,
                        center: bool) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The sweep task by task, every finished part on disk: each task's vectors and ICL scores first
    (centring needs every task's vectors), then each task's grid; parts already in ``ck`` are read."""
    for t, task in enumerate(task_list):
        if ("vectors", task.name) not in ck:
            v, im = vectors_and_icl([t])
            ck.record(("vectors", task.name), {"vectors": v[0], "icl": im[0]})
    vecs = torch.stack([ck[("vectors", t.name)]["vectors"] for t in task_list])
    icl_mean = torch.stack([ck[("vectors", t.name)]["icl"] for t in task_list])
    if center:
        vecs = vecs - vecs.mean(0, keepdim=True)
    for t, task in enumerate(task_list):
        if ("grid", task.name) not in ck:
            g, b = grid_of([t], vecs[t:t + 1])
            ck.record(("grid", task.name), {"grid": g[0], "base": b[0]})
    grid = torch.stack([ck[("grid", t.name)]["grid"] for t in task_list])
    base = torch.stack([ck[("grid", t.name)]["base"] for t in task_list])
    return vecs, icl_mean, grid, base


def _sweep_plan(model: Any, tasks: Any, *, kind: str, splits: tuple[str, ...], n_prompts: int, n_shots: int, seed: int,
                dummy_query: bool, center: bool, prompt_kw: Mapping[str, Any], checkpoint: Any,
                executor: Any) -> _SweepPlan:
    """Build every prompt of a layer sweep (Hendel et al. 2023, §3: context prompts with dummy queries,
    zero-shot queries per split, ICL on the report split's queries), refusing bad input first."""
    given = [tasks] if isinstance(tasks, SweepPrompts) else (
        list(tasks) if isinstance(tasks, (list, tuple)) and tasks and all(isinstance(t, SweepPrompts) for t in tasks) else None)
    if given is not None:
        return _given_plan(model, given, kind=kind, splits=splits, center=center, prompt_kw=prompt_kw,
                           checkpoint=checkpoint, executor=executor)
    from ..inputs.text import icl_prompts
    from ..tasks import resolve_tasks

    task_list = resolve_tasks(tasks)
    if center and len(task_list) < 2:
        raise ValueError("center=True subtracts the mean vector over tasks, which needs at least 2 tasks")
    if kind == "function" and n_shots < 1:
        raise ValueError("function vectors need n_shots >= 1 (mean head outputs of few-shot prompts)")
    ext = [_extraction_prompts(model, t, n_prompts=n_prompts, n_shots=n_shots, dummy_query=dummy_query, seed=seed,
                               prompt_kw=prompt_kw) for t in task_list] if kind in ("task", "ensemble") else []
    ins = [_instruction_prompts(model, t, n_prompts=n_prompts, seed=seed, prompt_kw=prompt_kw)
           for t in task_list] if kind in ("instruction", "ensemble") else []
    zs = [[_zero_shot_prompts(model, t, sp, n_prompts, seed, prompt_kw) for sp in splits] for t in task_list]
    # ICL on exactly the report split's zero-shot queries: zero-shot, task vector and ICL are paired
    icl = [icl_prompts(model, t, queries=list(zip(z[-1].queries, z[-1].answers)), n_shots=n_shots, seed=seed, **prompt_kw)
           for t, z in zip(task_list, zs)]
    return _SweepPlan(task_list, ext, ins, zs, icl)


def _given_plan(model: Any, given: Sequence[SweepPrompts], *, kind: str, splits: tuple[str, ...], center: bool,
                prompt_kw: Mapping[str, Any], checkpoint: Any, executor: Any) -> _SweepPlan:
    """A sweep over ready prompts (:class:`SweepPrompts`), checked against the model before any forward."""
    if kind != "task":
        raise ValueError(f"a sweep over given prompts (SweepPrompts) reads the vector from their context prompts: "
                         f"kind='task' only, got kind={kind!r}")
    if checkpoint is not None or executor is not None:
        raise ValueError("a sweep over given prompts (SweepPrompts) runs here, without checkpoint= or executor=")
    if center and len(given) < 2:
        raise ValueError("center=True subtracts the mean vector over tasks, which needs at least 2 tasks")
    names = [g.task for g in given]
    if len(set(names)) != len(names):
        raise ValueError(f"SweepPrompts name the same task twice ({names}); give each task once")
    for g in given:
        missing = [sp for sp in splits if sp not in g.queries]
        if missing:
            raise ValueError(f"SweepPrompts of task {g.task!r} have no queries for split(s) {missing}; give "
                             f"queries={{split: prompts}} for every split in splits={list(splits)}")
        _given_batch(model, g.context, prompt_kw, "layer_sweep")
        for sp in splits:
            _given_batch(model, g.queries[sp], {}, "layer_sweep")
        if g.icl is not None:
            _given_batch(model, g.icl, {}, "layer_sweep")
    return _SweepPlan([SimpleNamespace(name=g.task, family=g.family) for g in given], [g.context for g in given], [],
                      [[g.queries[sp] for sp in splits] for g in given], [g.icl for g in given], given=True)


def _sweep_vectors_and_icl(model: Any, plan: _SweepPlan, idx: list[int], ls: Sequence[int], *, kind: str,
                           function_kw: Mapping[str, Any], batch_size: int) -> tuple[Tensor, Tensor]:
    """Uncentred vectors ``[len(idx), layer, d_model]`` and ICL scores ``[len(idx), 2]`` (accuracy,
    log-prob; NaN where no ICL prompts were given) of the plan's tasks ``idx``."""
    n, L = len(idx), len(ls)
    sub_icl = [plan.icl[t] for t in idx]
    with_icl = [b for b in sub_icl if b is not None]
    icl_rows = lambda: [r for b in with_icl for r in rows_of(b)]  # noqa: E731
    icl_inputs = lambda: [i for b in with_icl for i in row_inputs(b)]  # noqa: E731
    if kind == "function":
        fvs = [function_vector(model, plan.tasks[t], **function_kw) for t in idx]
        v = torch.stack([fv.vector for fv in fvs])[:, None].expand(n, L, -1).contiguous()
        icl_logits, _ = run_rows(model, icl_rows(), batch_size=batch_size, inputs=icl_inputs())
    elif plan.given and not (len(with_icl) == n and all(len(plan.icl[t]) <= len(plan.context[t]) for t in idx)):
        # ready prompts without an ICL batch for every task (or with more ICL rows than context rows):
        # nothing to pack them with
        v = _vectors_from_batches(model, [plan.context[t] for t in idx], ls, batch_size)
        icl_logits = run_rows(model, icl_rows(), batch_size=batch_size, inputs=icl_inputs())[0] if with_icl else None
    else:
        # one pass: every layer's vector, and ICL prompt i packed with context prompt i (exact for any two
        # rows: the packed forward shares only their common token prefix, which Hendel's prompts make the demos)
        both, icl_logits = _extract_with_icl(model, [plan.context[t] for t in idx] if plan.context else [], sub_icl, ls,
                                             batch_size, extra=[plan.instruction[t] for t in idx] if plan.instruction else [])
        v = both if kind in ("task", "instruction") else (both[:n].double() + both[n:].double()).div(2).float()
    out = torch.full((n, 2), float("nan"))
    if with_icl:
        sc = _scores(icl_logits, cat_accepted([accepted_ids(b) for b in with_icl]))  # [rows, 2]
        has = [i for i, b in enumerate(sub_icl) if b is not None]
        owner = torch.repeat_interleave(torch.arange(len(has)), torch.as_tensor([len(b) for b in with_icl]))
        means = torch.zeros(len(has), 2).index_add_(0, owner, sc) / torch.bincount(owner, minlength=len(has)).float()[:, None]
        out[torch.as_tensor(has)] = means
    return v, out


def _sweep_grid(model: Any, plan: _SweepPlan, idx: list[int], v: Tensor, ls: Sequence[int], *, mode: str,
                alpha: float) -> tuple[Tensor, Tensor]:
    """``[len(idx), split, layer, 2]`` patched scores and ``[len(idx), split, 2]`` zero-shot scores."""
    S, L = len(plan.zero_shot[0]), len(ls)
    per_col, clean = _grid_eval(model, [plan.zero_shot[t][s] for t in idx for s in range(S)], v.repeat_interleave(S, dim=0),
                                ls, mode, alpha)
    return (torch.stack([c.mean(0) for c in per_col]).reshape(len(idx), S, L, 2),
            torch.stack([c.mean(0) for c in clean]).reshape(len(idx), S, 2))


# ----------------------------------------------------------------------------------------------
# function vectors


def _default_fv_layer(n_layers: int) -> int:
    """Todd et al. 2024 add the FV at about a third of the depth (GPT-J: output of layer 9 of 28)."""
    return max(0, min(n_layers - 1, n_layers // 3))


def function_vector(
    model: Any,
    task: Any,
    *,
    k: int = 10,
    n_prompts: int = N_PROMPTS,
    n_cie_prompts: int = 25,
    n_shots: int = 10,
    seed: int = 0,
    layer: int | None = None,
    heads: Sequence[tuple[int, int]] | None = None,
    batch_size: int | None = BATCH_SIZE,
    executor: Any = None,
    **prompt_kw: Any,
) -> FunctionVector:
    """Todd et al. 2024's function vector of ``task``.

    1. Task-mean head outputs ``z̄[l, h]`` at the final separator over ``n_prompts`` clean
       ``n_shots``-shot prompts (train-split queries), from :func:`tvlens.analyses.taskness.head_means`
       (Todd et al. average over 100: pass ``n_prompts=100`` to follow them).
    2. CIE of each head: mean over ``n_cie_prompts`` shuffled-label ``n_shots``-shot prompts of
       ``p(answer | z̄[l, h] patched at the final position) - p(answer)``, by
       :func:`tvlens.analyses.patching.patch_heads` (exact, one target pass + final-token recompute).
    3. FV = ``sum over the top k heads of z̄[l, h] @ W_O[l, h]`` (``heads`` skips 2 and uses
       the given ``(layer, head)`` list, e.g. heads chosen by the average CIE over many tasks).

    ``layer`` (where the FV is added, ``mode="add"``) defaults to ``n_layers // 3`` — Todd et al.'s
    "about a third of the way in" — and is only the default: a function vector may be applied at
    any layer (``apply_vector(..., layer=l)``). ``executor`` (:mod:`tvlens.runs.executors`) runs
    steps 1 and 2 on a cluster (prompt blocks, then one unit per layer of heads). ``**prompt_kw``:
    how the clean and shuffled-label prompts are written (as in :func:`task_vector`).
    """
    from ..models import ModelInfo
    from ..analyses.patching import patch_heads
    from ..inputs.text import icl_prompts
    from ..analyses.taskness import head_means

    info = ModelInfo.of(model)
    if "n_heads" in prompt_kw:  # a model's head count everywhere else in tvlens
        raise TypeError("function_vector takes k= (how many top-CIE heads are summed), not n_heads=")
    k = _check_int("k", k, 1)
    n_prompts = _check_int("n_prompts", n_prompts, 2)
    n_cie_prompts = _check_int("n_cie_prompts", n_cie_prompts, 1)
    n_shots = _check_int("n_shots", n_shots, 1)
    total = info.n_layers * info.n_heads
    if heads is None and k > total:
        raise ValueError(f"k={k} but the model has only {total} heads ({info.n_layers} layers x {info.n_heads}); "
                         f"use k <= {total}")
    layer = _default_fv_layer(info.n_layers) if layer is None else _hooks.check_layer(model, layer)
    if heads is not None:
        heads = [(_hooks.check_layer(model, int(l)), _hooks.check_head(model, int(h))) for l, h in heads]
        if not heads:
            raise ValueError("heads is empty; give (layer, head) pairs or leave heads=None to pick them by CIE")
    prompt_kw = prompt_options("function_vector", prompt_kw)
    task = _task_obj(task)
    corrupted = None
    if heads is None:  # build prompts first: bad input fails before the forward passes
        corrupted = icl_prompts(model, task, n_prompts=n_cie_prompts, n_shots=n_shots, seed=seed + 1,
                                shuffle_labels=True, split="train", **prompt_kw)
    stats = head_means(model, [task], n_prompts=n_prompts, n_shots=n_shots, seed=seed, batch_size=batch_size,
                       split="train", progress=False, executor=executor, **prompt_kw)
    mean_z = stats.mean(task.name).to(torch.float32)  # [layer, head, d_head]
    if mean_z.ndim != 3:
        raise RuntimeError(f"head_means returned shape {tuple(mean_z.shape)}; expected [layer, head, d_head]")
    cie = None
    if heads is None:
        res = patch_heads(model, corrupted, mean_z, metric="prob", progress=False, batch_size=None, executor=executor)
        cie = (res.values - res.target_value).to(torch.float32)
        order = torch.argsort(cie.reshape(-1), descending=True, stable=True)[:k]
        heads = [(int(i) // info.n_heads, int(i) % info.n_heads) for i in order]
    W_O = model.W_O.detach().to("cpu", torch.float32)  # [layer, head, d_head, d_model]
    outs = torch.stack([mean_z[l, h] @ W_O[l, h] for l, h in heads])  # [k, d_model]
    vec = outs.to(torch.float64).sum(0).to(torch.float32)
    meta = _make_meta(model, [task.name], seed, kind="function", n_prompts=n_prompts, n_cie_prompts=n_cie_prompts,
                      n_shots=n_shots, n_heads=len(heads), source="todd2024", executor=stats.meta.get("executor"),
                      **prompt_record(prompt_kw))
    return FunctionVector(vector=vec, layer=layer, task=task.name, kind="function", meta=meta, cie=cie,
                          top_heads=tuple(heads), mean_head_outputs=outs)
