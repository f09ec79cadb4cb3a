"""Finding the task heads: REINFORCE head selection (Hojel et al. 2024) and soft per-head weights.

ρ_token (:func:`tvlens.taskness`) ranks heads one at a time. The functions here search for the
*set* of heads whose task-mean activations, patched into **zero-shot** prompts at the final
separator, best make the model perform the task:

- :func:`reinforce_select` — Hojel et al. 2024 ("Finding Visual Task Vectors", §3.2): one
  Bernoulli variable per head, ``p = sigmoid(θ)`` with ``θ`` initialised at −1; a sampled mask
  ``m`` patches head ``(l, h)``'s task-mean ``z`` in at the final position where ``m[l, h] = 1``;
  the reward is the answer's log-probability (or first-token accuracy); ``θ`` follows the
  REINFORCE gradient ``E[(R(m) − b) ∇θ log p(m)]`` with Adam (lr 0.1), where the baseline ``b``
  (the mean reward of the step's samples) reduces the variance. All sampled masks of a step are
  evaluated in *one* batched forward: prompts × masks along the batch dimension.
- :func:`soft_select` — the "soft task vector" of the ``task_vectors`` package (J. Newsom):
  per-head ``α = sigmoid(θ) ∈ [0, 1]`` blends each head with its task mean,
  ``z_final ← z_final + α (mean − z_final)``, and ``θ`` is trained by gradient descent through the
  frozen model on the answer log-probability (plus an L1 penalty ``l1 · Σ α``). The model's
  weights never change and never get gradients; only ``θ`` does.
- :func:`compare_selections` — on held-out (test-split) prompts: zero-shot, ρ top-k, CIE top-k
  (Todd et al. 2024), REINFORCE, soft α, random-k (mean of draws) and ICL, per family.

A :class:`Selection` is a frozen result: per-head probabilities (REINFORCE) or weights α (soft),
the final boolean mask, the reward curve and metadata; ``.heads()``, ``.plot()``, ``.to_html()``,
``.save()`` / ``.load()`` (refusing a different model).

**Ready prompts.** Wherever ``tasks`` is taken, one can instead give each task's ready prompts, text or
multimodal: :class:`~tvlens.vectors.activation.SweepPrompts` (``context``: the prompts the head means
are taken from, e.g. image-ICL prompts of a VLM; ``queries``: zero-shot prompts per split, e.g. image
queries without context, Luo, Darrell & Bar 2024 §4; ``icl``: the ICL baseline) or one batch of
zero-shot queries per task with ``head_means=tvlens.head_means(model, [ICL batch per task])``. Each
query is scored against its own accepted answers, and each row's images go with it through every
re-padding and subset (:meth:`PatchObjective.from_batches`). Bad input is refused before any forward.

Patching rule everywhere in this module: only the final position (the final separator ``→``,
index −1 of the left-padded :class:`~tvlens.inputs.text.PromptBatch`) is changed, and only in
``blocks.{l}.attn.hook_z`` (the head's output before ``W_O``), with ``torch.lerp(z, mean, w)``
— exact replacement for ``w = 1``, untouched for ``w = 0``.
"""

from __future__ import annotations

from ..checks import check_float, check_int as _check_int
from ..tasks import task_name as _task_name
from ..engine.plan import RowsBatch, gather_inputs, merge_batches, pad_id_of, pad_left, row_inputs, rows_of
from ..inputs.text import prompt_options, prompt_record
from ..metrics import FINAL_POSITION, accepted_ids, accepted_metric, cat_accepted
from ..vocabulary import FINAL, final_alias
from ..results import LayerHeadGrid, ResultMeta, Saved, Tabular
from ..results import tensor_digest as _tensor_digest
import hashlib
import io
import math
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "Selection",
    "reinforce_select",
    "soft_select",
    "select_restarts",
    "compare_selections",
    "Comparison",
    "evaluate_heads",
    "PatchObjective",
]

#: the metrics a selection objective can be scored by (a subset of :data:`tvlens.metrics.METRICS`)
REWARDS = ("logprob", "accuracy")
#: the engine's strategy: "auto" recomputes only the final token where the model supports it
FAST = ("auto", True, False)
BASELINES = ("mean", "loo", "ema", "none")


# ==============================================================================================
# helpers
# ==============================================================================================


def _resolve_tasks(tasks: Any) -> list[Any]:
    """Task names / Task objects / spec string -> list of Task objects (validated, no forward)."""
    if tasks is None:
        raise ValueError("no tasks given; pass task names (e.g. ['country_capital', 'antonym']), 'family:knowledge' or 'all'")
    from ..tasks import resolve_tasks

    if isinstance(tasks, str) or not isinstance(tasks, Sequence):
        tasks = [tasks]
    out = resolve_tasks(list(tasks))
    if not out:
        raise ValueError("no tasks given; pass task names, 'family:knowledge' or 'all'")
    return out


def _weights_checksum(model: Any) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes() if p.numel() else b"")
    return h.hexdigest()




# ==============================================================================================
# ready prompts: text or multimodal batches given per task
# ==============================================================================================


@dataclass(frozen=True)
class _Given:
    """One task's ready prompts: the queries the objective scores, the context its head means come
    from (``None``: they must be given) and the ICL baseline's prompts (``None``: no ICL number)."""

    name: str
    family: str
    queries: Any
    context: Any = None
    icl: Any = None


def _family_of(name: str) -> str:
    from ..tasks import list_tasks, load_task

    return load_task(name).family if name in list_tasks() else "custom"


def _ready_prompts(model: Any, tasks: Any, split: str, prompt_kw: Mapping[str, Any], where: str) -> list[_Given] | None:
    """``tasks`` as ready prompts, checked against the model before any forward; ``None`` when they are tasks.

    Ready prompts are :class:`~tvlens.vectors.activation.SweepPrompts` (one task's ``context``
    prompts — the head means' source — and its zero-shot ``queries`` per split; ``split`` picks the
    one scored) or prompt batches (a :class:`~tvlens.PromptBatch` or
    :class:`~tvlens.inputs.multimodal.MultimodalBatch` of one task's zero-shot queries, named by its
    ``task``; head means must then be given). Refused: a mix of tasks and prompts, a task twice,
    prompt options (they apply when prompts are built), a batch without answers, tokens outside the
    model's vocabulary, and what :func:`tvlens.inputs.multimodal.check_inputs` refuses (images for a
    text-only model, image tokens without images, images another model's vision tower takes)."""
    from ..vectors.activation import SweepPrompts, _given_batch, _is_batch

    ready = lambda t: isinstance(t, SweepPrompts) or _is_batch(t)  # noqa: E731
    items = [tasks] if ready(tasks) else (list(tasks) if isinstance(tasks, (list, tuple)) else [])
    if not any(ready(t) for t in items):
        return None
    bad = [type(t).__name__ for t in items if not ready(t)]
    if bad:
        raise TypeError(f"{where}: give tasks either all as names / Task objects or all as ready prompts (SweepPrompts or "
                        f"prompt batches), not a mix; got {', '.join(bad)} beside ready prompts")
    given = []
    for t in items:
        if isinstance(t, SweepPrompts):
            if split not in t.queries:
                raise ValueError(f"{where}: SweepPrompts of task {t.task!r} have no queries for split {split!r} (they have "
                                 f"{', '.join(map(repr, t.queries))}); give queries={{{split!r}: prompts}} or pass split=")
            given.append(_Given(t.task, t.family or "custom", t.queries[split], t.context, t.icl))
        else:
            name = str(getattr(t, "task", "custom"))
            given.append(_Given(name, _family_of(name), t))
    names = [g.name for g in given]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"{where}: task(s) {', '.join(dup)} given more than once; give each task's prompts once (one "
                         "batch per task, named by its .task)")
    from ..models import ModelInfo

    n_vocab = ModelInfo.of(model).d_vocab
    for g in given:
        for what, b in (("queries", g.queries), ("context", g.context), ("icl", g.icl)):
            if b is None:
                continue
            label = f"{where}: the {what} of task {g.name!r}"
            if what == "queries" and getattr(b, "answer_ids", None) is None:
                raise ValueError(f"{label} carry no answers (answer_ids): the objective scores each query's accepted "
                                 "answers; build them with tvlens.icl_prompts or tvlens.inputs.multimodal, which record them")
            _given_batch(model, b, prompt_kw, where, label)  # left padding, images fit for this model, no prompt options
            real = b.tokens[b.attention_mask.bool()]
            ids = torch.cat([real.reshape(-1), accepted_ids(b).reshape(-1)]) if what == "queries" else real
            if bool((ids < 0).any()) or bool((ids >= n_vocab).any()):
                raise ValueError(f"{label} hold token ids up to {int(ids.max())} but this model's vocabulary has {n_vocab}: "
                                 "they were built for another model; rebuild them with this model")
            if what == "context" and len(b) < 2:
                raise ValueError(f"{label} hold {len(b)} prompt(s); head means need at least two")
    return given


def _given_means(model: Any, given: Sequence[_Given], head_means: Any) -> Tensor:
    """``[task, layer, head, d_head]`` means for ready prompts: from ``head_means`` (a ``HeadStats`` with
    these task names, or a tensor), else at the final separator of each task's context prompts."""
    if head_means is None:
        missing = [g.name for g in given if g.context is None]
        if missing:
            raise ValueError(f"no head means for the ready prompts of {', '.join(missing)}: pass head_means="
                             "tvlens.head_means(model, [ICL batch per task]) (e.g. image-ICL prompts of a VLM), or give "
                             "SweepPrompts(task, context, queries) whose context prompts the means are taken from")
        head_means = _context_stats(model, given)
    return _means_for(model, [SimpleNamespace(name=g.name) for g in given], head_means, n_prompts=0, n_shots=0, seed=0)


def _context_stats(model: Any, given: Sequence[_Given]) -> Any:
    """:func:`tvlens.head_means` at the final separator of each task's context prompts, named as the given tasks."""
    import dataclasses

    from .taskness import head_means as compute

    named = [dataclasses.replace(g.context, task=g.name) if dataclasses.is_dataclass(g.context) and
             getattr(g.context, "task", g.name) != g.name else g.context for g in given]
    return compute(model, named, positions=FINAL, progress=False)


# ==============================================================================================
# the batched masked forward
# ==============================================================================================




class PatchObjective:
    """Zero-shot prompts of one or more tasks and their task-mean head outputs, ready to score
    many head weightings at once.

    For a weighting ``w [S, layer, head]`` (0/1 masks or soft α), the final-position ``hook_z`` of
    every prompt of task ``t`` becomes ``lerp(z, mean_t, w)`` and the metric (answer log-prob or
    first-token accuracy) is read at the final position.  Each weighting is one *column* of the
    engine's :class:`~tvlens.engine.runner.PatchRunner`: the ``N`` prompts run once, and a REINFORCE
    step of ``S`` masks costs ``S·N`` single-token recomputations (``fast=False``, or a model the
    fast path does not support: whole forwards, weightings along the batch axis — the same numbers,
    tested against a one-mask-at-a-time loop to 1e-4).  A subset of prompts (``rows=``, soft
    selection's minibatches) reuses the cached run.

    Gradients reach the weights (soft α); the model's weights are constants throughout.
    Build with :meth:`PatchObjective.build` (from tasks) or directly from tensors.
    """

    def __init__(
        self,
        model: Any,
        tokens: Int[Tensor, "batch pos"],
        attention_mask: Int[Tensor, "batch pos"],
        answer_ids: Int[Tensor, " batch"],
        row_task: Int[Tensor, " batch"],
        means: Float[Tensor, "task layer head d_head"],
        *,
        task_names: Sequence[str] = (),
        max_memory: int | None = None,
        fast: bool | str = "auto",
        accepted: Int[Tensor, "batch accepted"] | None = None,
        inputs: Sequence[Mapping[str, Tensor]] | None = None,
    ) -> None:
        from ..hooks import device_of
        from ..models import ModelInfo

        info = ModelInfo.of(model)
        if means.ndim != 4 or tuple(means.shape[1:]) != (info.n_layers, info.n_heads, info.d_head):
            raise ValueError(
                f"head means must be [task, layer, head, d_head] = [*, {info.n_layers}, {info.n_heads}, {info.d_head}] for "
                f"this model, got {tuple(means.shape)}; compute them with tvlens.head_means(model, tasks)"
            )
        if int(row_task.max()) >= means.shape[0]:
            raise ValueError(f"prompts refer to task {int(row_task.max())} but only {means.shape[0]} task means were given")
        self.model = model
        self.info = info
        self.device = device_of(model)
        self.dtype = next(model.parameters()).dtype
        self.tokens = tokens.to(self.device)
        self.attention_mask = attention_mask.to(self.device)
        self.answer_ids = answer_ids.to(self.device)
        #: [N, accepted]: the first token of every accepted answer (answer_ids first; a metric scores the best)
        self.accepted = (answer_ids[:, None] if accepted is None else accepted).to(self.device)
        if self.accepted.ndim != 2 or self.accepted.shape[0] != self.answer_ids.shape[0]:
            raise ValueError(f"accepted must be [batch, n_accepted] with batch={self.answer_ids.shape[0]}, got "
                             f"{tuple(self.accepted.shape)}; build it with tvlens.metrics.accepted_ids(batch)")
        self.row_task = row_task.to(self.device)
        self.means = means.to(device=self.device, dtype=self.dtype)
        #: [N, layer, head, d_head]: the mean each row's heads are pulled towards
        self.row_means = self.means[self.row_task]
        self.task_names = tuple(task_names)
        self.max_memory = max_memory
        if fast not in FAST:
            raise ValueError(f"fast must be one of {FAST}, got {fast!r}")
        self.fast = fast
        if inputs is not None and len(inputs) != self.tokens.shape[0]:
            raise ValueError(f"inputs must hold one dict of extra model inputs per row ({self.tokens.shape[0]}), "
                             f"got {len(inputs)}")
        #: each row's extra model inputs (``pixel_values`` ...; empty dicts for text): they go where their row goes
        self.inputs = [dict(i) for i in inputs] if inputs is not None and any(inputs) else None
        self._runner: Any = None

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        model: Any,
        tasks: Sequence[Any],
        means: Float[Tensor, "task layer head d_head"],
        *,
        n_prompts: int | None,
        split: str,
        seed: int,
        max_memory: int | None = None,
        fast: bool | str = "auto",
        prompt_kw: Mapping[str, Any] | None = None,
    ) -> "PatchObjective":
        """Zero-shot prompts (``n_shots=0``) of each task from ``split``: ``n_prompts`` distinct
        queries per task (all of the split when ``None`` or when the split is smaller), written with
        ``prompt_kw`` (:func:`tvlens.inputs.text.prompt_options`); every accepted answer is kept."""
        from ..inputs.text import _pad_id, _tokenizer_of, icl_prompts

        batches = []
        for task in tasks:
            n_split = len({x for x, _ in task.split(split)})  # distinct queries (an input may have several answers)
            n = n_split if n_prompts is None else min(int(n_prompts), n_split)
            batches.append(icl_prompts(model, task, n_prompts=n, n_shots=0, seed=seed, split=split, **dict(prompt_kw or {})))
        tokens, mask, answers, owners = merge_batches(batches, _pad_id(_tokenizer_of(model)))
        return cls(model, tokens, mask, answers, owners, means, task_names=[t.name for t in tasks], max_memory=max_memory,
                   fast=fast, accepted=cat_accepted([accepted_ids(b) for b in batches]))

    @classmethod
    def from_batches(
        cls,
        model: Any,
        batches: Sequence[Any],
        means: Float[Tensor, "task layer head d_head"],
        *,
        task_names: Sequence[str] = (),
        max_memory: int | None = None,
        fast: bool | str = "auto",
    ) -> "PatchObjective":
        """The objective over ready batches, batch ``t`` being task ``t``'s zero-shot queries (text
        :class:`~tvlens.PromptBatch` es or :class:`~tvlens.inputs.multimodal.MultimodalBatch` es of
        image queries, Luo et al. 2024 §4), scored against every accepted answer of each row.

        Rows of all batches are left-padded to one width; each row's images (its extra model inputs,
        :func:`tvlens.engine.plan.row_inputs`) travel with it, and so do inputs laid out along the
        positions (Gemma 3's ``token_type_ids``), padded like the mask. Check the batches first
        (:func:`_ready_prompts`)."""
        rows: list[Tensor] = []
        inputs: list[dict[str, Tensor]] = []
        owners: list[int] = []
        for t, b in enumerate(batches):
            own = rows_of(b)
            rows.extend(own)
            owners.extend([t] * len(own))
            inputs.extend(row_inputs(b))
        tokens, mask = pad_left(rows, pad_id_of(model))  # each row's inputs are padded with it when gathered
        accepted = cat_accepted([accepted_ids(b) for b in batches])
        return cls(model, tokens, mask, accepted[:, 0], torch.as_tensor(owners, dtype=torch.long), means,
                   task_names=task_names, max_memory=max_memory, fast=fast, accepted=accepted, inputs=inputs)

    @property
    def n_rows(self) -> int:
        return int(self.tokens.shape[0])

    def digest(self) -> str:
        """Fingerprint of the prompts and means (a checkpoint is only resumed on the same objective)."""
        several = (self.accepted,) if self.accepted.shape[1] > 1 else ()  # single-answer digests as before
        images = () if self.inputs is None else tuple(
            v for _, v in sorted(gather_inputs(self.inputs, range(self.n_rows)).items()))
        return _tensor_digest(self.tokens, self.attention_mask, self.answer_ids, self.row_task, self.means.float(), *several,
                              *images)

    # ---- the forward --------------------------------------------------------------------------
    def _check_weights(self, weights: Tensor) -> Tensor:
        if weights.ndim == 2:
            weights = weights.unsqueeze(0)
        shape = (self.info.n_layers, self.info.n_heads)
        if weights.ndim != 3 or tuple(weights.shape[1:]) != shape:
            raise ValueError(f"head weights must be [sample, layer, head] with [layer, head] = {shape}, got {tuple(weights.shape)}")
        return weights.to(self.device)

    def _get_runner(self) -> Any:
        """The engine's runner over all prompts (their forward run once, on first use)."""
        if self._runner is None:
            from types import SimpleNamespace

            from ..engine.runner import PatchRunner

            if self.inputs is None:
                target = SimpleNamespace(tokens=self.tokens, attention_mask=self.attention_mask, answer_ids=self.answer_ids)
            else:  # rows with their own images, also in a subset of rows (soft selection's minibatches)
                target = RowsBatch(self.tokens, self.attention_mask, self.answer_ids, rows=self.inputs)
            with torch.no_grad():
                self._runner = PatchRunner(self.model, target, fast=self.fast)
        return self._runner

    def _edits(self, weights: Tensor, rows: Tensor | None = None) -> list:
        """One ``Edit`` per layer: ``z_final <- lerp(z_final, row mean, w[column, head])``."""
        from ..engine.sites import Edit

        active = range(self.info.n_layers) if weights.requires_grad else [
            layer for layer in range(self.info.n_layers) if bool((weights[:, layer] != 0).any())]
        means = self.row_means if rows is None else self.row_means[rows]
        return [Edit(layer, "z", weight=weights[:, layer, :, None], value=means[:, layer][:, None])
                for layer in active]

    def per_row(self, weights: Float[Tensor, "sample layer head"], metric: str = "logprob", rows: Tensor | None = None) -> Tensor:
        """The metric per weighting and prompt: [sample, row] (float32; float64 on a float64 model).

        Scored against every accepted answer (:func:`tvlens.metrics.accepted_metric`: accuracy when
        the top token starts any, log-prob of the best). Differentiable in ``weights`` when grad mode
        is on (the soft objective)."""
        if metric not in REWARDS:
            raise ValueError(f"metric must be one of {REWARDS}, got {metric!r}")
        weights = self._check_weights(weights)
        runner = self._get_runner()
        accepted = self.accepted
        if rows is not None:
            rows = rows.to(self.device)
            runner, accepted = runner.subset(rows), accepted[rows]
        edits = self._edits(weights, rows)
        if not edits:  # nothing patched: the runner's clean logits
            clean = accepted_metric(runner.clean_logits, accepted, metric)
            return clean.unsqueeze(0).expand(weights.shape[0], -1).clone()
        per_column = accepted[:, None, :]  # [row, 1 (sample), accepted]
        if torch.is_grad_enabled() and weights.requires_grad:
            logits = runner.logits(edits, n_columns=weights.shape[0])  # [row, sample, vocab]
            return accepted_metric(logits, per_column, metric).T
        with torch.no_grad():
            vals = runner.map(edits, lambda lg: accepted_metric(lg, per_column, metric), n_columns=weights.shape[0],
                              max_memory=self.max_memory)
        return vals.T

    def per_task(self, weights: Float[Tensor, "sample layer head"], metric: str = "accuracy") -> Float[Tensor, "sample task"]:
        """The metric averaged per task: [sample, task]."""
        with torch.no_grad():
            vals = self.per_row(weights, metric)
        n_tasks = self.means.shape[0]
        out = torch.zeros(vals.shape[0], n_tasks, dtype=vals.dtype, device=vals.device)
        out.index_add_(1, self.row_task, vals)
        counts = torch.bincount(self.row_task, minlength=n_tasks).clamp_min(1).to(vals.dtype)
        return (out / counts).cpu()

    def reward(self, masks: Bool[Tensor, "sample layer head"], metric: str = "logprob") -> Float[Tensor, " sample"]:
        """Mean metric over the prompts for each mask (no gradient): the REINFORCE reward."""
        with torch.no_grad():
            return self.per_row(masks.to(self.dtype), metric).mean(1).float().cpu()

    def soft_loss(self, theta: Float[Tensor, "layer head"], *, l1: float = 0.0, rows: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """``−mean log p(answer) + l1 · Σ sigmoid(θ)`` with ``α = sigmoid(θ)`` blended in; returns (loss, mean log-prob)."""
        alpha = torch.sigmoid(theta)
        logp = self.per_row(alpha.unsqueeze(0), "logprob", rows)[0]
        objective = logp.mean()
        return -objective + l1 * alpha.sum(), objective.detach()


# ==============================================================================================
# the result
# ==============================================================================================


@dataclass(frozen=True, eq=False)
class Selection(LayerHeadGrid, Tabular):
    """A set of heads (and per-head weights) whose task means, patched in at the final position,
    make zero-shot prompts do the task.

    - ``probabilities``: ``[layer, head]`` — the Bernoulli probabilities ``sigmoid(θ)`` (REINFORCE),
      the blending weights α (soft), or 0/1 (a fixed set such as a top-k by ρ);
    - ``mask``: ``[layer, head]`` bool — the final selection (``probabilities > 0.5``, or the set);
    - ``rewards``: ``[step]`` — the training curve (mean reward of each step's samples for
      REINFORCE, mean answer log-prob for soft; empty for a fixed set);
    - ``method``: ``"reinforce"``, ``"soft"``, or how a fixed set was chosen (``"rho_topk"``, ...);
    - ``head_means``: ``[task, layer, head, d_head]`` task means used (optional), with ``tasks``;
    - ``meta``: :class:`~tvlens.results.ResultMeta` (model, config hash, tasks, seed, settings).
    """

    probabilities: Float[Tensor, "layer head"]
    mask: Bool[Tensor, "layer head"]
    rewards: Float[Tensor, " step"]
    method: str
    meta: ResultMeta
    tasks: tuple[str, ...] = ()
    head_means: Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.probabilities.ndim != 2 or self.mask.shape != self.probabilities.shape:
            raise ValueError(f"probabilities and mask must be [layer, head] of one shape, got "
                             f"{tuple(self.probabilities.shape)} and {tuple(self.mask.shape)}")

    # ---- reading ----
    @property
    def alphas(self) -> Float[Tensor, "layer head"]:
        """The soft weights α (soft selections); for other methods the probabilities."""
        return self.probabilities

    @property
    def grid(self) -> Tensor:
        return self.probabilities

    @property
    def weights(self) -> Float[Tensor, "layer head"]:
        """What is patched when the selection is applied: α for a soft selection, the 0/1 mask otherwise."""
        return self.probabilities.clone() if self.method == "soft" else self.mask.to(self.probabilities.dtype)

    def heads(self) -> list[tuple[int, int]]:
        """The selected heads ``(layer, head)``, most probable (largest α) first."""
        idx = self.mask.nonzero().tolist()
        return sorted(((int(l), int(h)) for l, h in idx), key=lambda lh: (-float(self.probabilities[lh]), lh))

    def __len__(self) -> int:
        return int(self.mask.sum())

    def __repr__(self) -> str:
        heads = ", ".join(f"L{l}H{h}" for l, h in self.heads()[:8])
        more = " ..." if len(self) > 8 else ""
        return (f"Selection(method={self.method!r}, model={getattr(self.meta, 'model', '?')!r}, tasks={len(self.tasks)}, "
                f"n_selected={len(self)}/{self.mask.numel()}, steps={self.rewards.numel()}, heads=[{heads}{more}])")

    # ---- figures ----
    def _title(self) -> str:
        what = {"reinforce": "REINFORCE probability", "soft": "soft weight α"}.get(self.method, self.method)
        tasks = ", ".join(self.tasks[:4]) + (" ..." if len(self.tasks) > 4 else "")
        return f"{what} per head — {getattr(self.meta, 'model', '?')} ({tasks}); {len(self)} selected"

    def records(self) -> list[dict[str, Any]]:
        """One row per head: its probability (or α), weight and whether it is selected."""
        w = self.weights
        return [{"method": self.method, "layer": l, "head": h, "probability": float(self.probabilities[l, h]),
                 "weight": float(w[l, h]), "selected": bool(self.mask[l, h])}
                for l in range(self.n_layers) for h in range(self.n_heads)]

    def plot(self, transpose: bool = False):
        """Layers × heads heatmap of the probabilities / α; selected heads marked with ●."""
        from ..plot import layer_head_heatmap

        text = [["●" if bool(m) else "" for m in row] for row in self.mask.tolist()]
        values = self.probabilities.float()
        if transpose:
            values, text = values.T, [list(r) for r in zip(*text)]
        zlabel = "α" if self.method == "soft" else "p(select)"
        return layer_head_heatmap(values, title=self._title(), zlabel=zlabel, transpose=transpose, text=text, zmin=0.0, zmax=1.0)

    def plot_rewards(self):
        """The training curve (reward per step)."""
        from ..plot import line_plot

        ylabel = "mean log p(answer)" if self.meta.extra.get("metric", "logprob") == "logprob" else "accuracy"
        return line_plot(list(range(self.rewards.numel())), {self.method: self.rewards.float()}, title=f"{self.method} reward per step",
                         xlabel="step", ylabel=ylabel)

    def to_html(self, path: str | Path) -> Path:
        """Standalone HTML of :meth:`plot`."""
        from ..plot import save_figure

        written = save_figure(self.plot(), Path(path), png=False)
        return written[0]

    # ---- storage ----
    def save(self, path: str | Path) -> Path:
        """Save to ``<path>.safetensors`` + ``<path>.json`` (atomic)."""
        from ..results import save_tensors

        tensors = {"probabilities": self.probabilities.float(), "mask": self.mask.to(torch.uint8),
                   "rewards": self.rewards.float()}
        if self.head_means is not None:
            tensors["head_means"] = self.head_means
        meta = {"kind": "tvlens.Selection", "method": self.method, "tasks": list(self.tasks), **self.meta.to_dict()}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "Selection":
        """Load what :meth:`save` wrote; with ``model``, refuse a file made with another model."""
        from ..results import ResultMeta, load_result

        tensors, meta = load_result(path, "Selection", model=model, what="selection")
        if model is not None:
            from ..models import ModelInfo

            info = ModelInfo.of(model)
            if tuple(tensors["mask"].shape) != (info.n_layers, info.n_heads):
                raise ValueError(f"this selection is [layer, head] = {tuple(tensors['mask'].shape)} but the model has "
                                 f"{info.n_layers} layers × {info.n_heads} heads; load it with the model it was made for")
        return cls(
            probabilities=tensors["probabilities"], mask=tensors["mask"].bool(), rewards=tensors["rewards"],
            method=meta["method"], meta=ResultMeta.from_dict(meta), tasks=tuple(meta.get("tasks", ())),
            head_means=tensors.get("head_means"),
        )

    def evaluate(self, model: Any, tasks: Any = None, *, metric: str = "accuracy", split: str = "test",
                 n_prompts: int | None = None, seed: int = 0, fast: bool | str = "auto",
                 **prompt_kw: Any) -> Float[Tensor, " task"]:
        """Score this selection (:attr:`weights` patched with its own ``head_means``) on ``tasks``
        (default: the tasks it was made for) — first-token accuracy on the test split by default.
        ``tasks`` may be ready prompts of tasks it was made for (as in :func:`evaluate_heads`: e.g.
        image queries of a VLM). ``**prompt_kw``: how the prompts are written (as in :func:`evaluate_heads`)."""
        from ..results import check_same_model

        check_same_model(model, self.meta.to_dict(), what="selection")
        if self.head_means is None:
            raise ValueError("this selection carries no head means; use tvlens.analyses.selection.evaluate_heads(model, tasks, "
                             "selection, head_means=...)")
        given = None if tasks is None else _ready_prompts(model, tasks, split, prompt_kw, "Selection.evaluate")
        task_list = given if given is not None else _resolve_tasks(list(self.tasks) if tasks is None else tasks)
        missing = [t.name for t in task_list if t.name not in self.tasks]
        if missing:
            raise ValueError(f"this selection has head means for {', '.join(self.tasks)}, not for {', '.join(missing)}; "
                             "use evaluate_heads(model, tasks, selection, head_means=...) with means for those tasks")
        means = self.head_means[[self.tasks.index(t.name) for t in task_list]]
        return evaluate_heads(model, tasks if given is not None else task_list, self, head_means=means, metric=metric,
                              split=split, n_prompts=n_prompts,
                              seed=seed, fast=fast, **prompt_kw)[0]

    # ---- construction from a fixed set ----
    @classmethod
    def from_heads(cls, model: Any, heads: Sequence[tuple[int, int]], *, method: str = "manual", tasks: Sequence[str] = (),
                   head_means: Tensor | None = None, **extra: Any) -> "Selection":
        """A fixed set of heads as a Selection (probability 1 on the set, 0 elsewhere)."""
        from ..hooks import check_head, check_layer
        from ..models import ModelInfo
        from ..results import ResultMeta

        info = ModelInfo.of(model)
        mask = torch.zeros(info.n_layers, info.n_heads, dtype=torch.bool)
        for layer, head in heads:
            mask[check_layer(model, int(layer)), check_head(model, int(head))] = True
        return cls(probabilities=mask.float(), mask=mask, rewards=torch.zeros(0), method=method,
                   meta=ResultMeta.for_model(model, tasks=tuple(tasks), **extra), tasks=tuple(tasks), head_means=head_means)


# ==============================================================================================
# task means
# ==============================================================================================


def _means_for(model: Any, tasks: Sequence[Any], head_means: Any, *, n_prompts: int, n_shots: int, seed: int,
               prompt_kw: Mapping[str, Any] | None = None) -> Tensor:
    """[task, layer, head, d_head] task-mean z at the final separator of ``n_shots``-shot prompts."""
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    names = [t.name for t in tasks]
    if head_means is None:
        from .taskness import head_means as compute

        # queries from the train split, so the held-out test queries never feed the means
        head_means = compute(model, list(tasks), n_prompts=n_prompts, n_shots=n_shots, positions=FINAL, seed=seed,
                             split="train", progress=False, **dict(prompt_kw or {}))
    if isinstance(head_means, Tensor):
        means = head_means
        if means.ndim == 3:
            means = means.unsqueeze(0).expand(len(names), *means.shape)
        if means.ndim != 4 or means.shape[0] != len(names):
            raise ValueError(f"head_means tensor must be [task, layer, head, d_head] with {len(names)} tasks (or [layer, head, "
                             f"d_head] for one shared mean), got {tuple(head_means.shape)}")
    else:
        stats = head_means
        if not hasattr(stats, "z_mean") or not hasattr(stats, "mean"):
            raise TypeError(f"head_means must be a HeadStats (tvlens.head_means) or a tensor, got {type(stats).__name__}")
        cfg_hash = getattr(stats, "meta", {}).get("config_hash")
        if cfg_hash not in (None, info.config_hash):
            raise ValueError("these head means come from another model (config hash differs); recompute them with "
                             "tvlens.head_means(model, tasks)")
        if getattr(stats, "per_position", False):
            stats = stats.at_position(-1)
        elif final_alias(getattr(stats, "positions", FINAL)) != FINAL:
            raise ValueError(f"selection patches the final separator, but these head means were taken at positions="
                             f"{stats.positions!r}; compute them with positions='final' (the separator) or 'all'")
        missing = [n for n in names if n not in stats.tasks]
        if missing:
            raise ValueError(f"head means lack task(s) {', '.join(missing)} (they hold {', '.join(stats.tasks)}); compute "
                             "them for these tasks")
        if tuple(stats.layers) not in ((), tuple(range(info.n_layers))):
            raise ValueError(f"head means cover layers {stats.layers}, selection needs all {info.n_layers}; "
                             "compute them with layers=None")
        means = torch.stack([stats.mean(n) for n in names])
    if tuple(means.shape[1:]) != (info.n_layers, info.n_heads, info.d_head):
        raise ValueError(f"head means have [layer, head, d_head] = {tuple(means.shape[1:])} but the model has "
                         f"{(info.n_layers, info.n_heads, info.d_head)}; compute them with this model")
    return means.detach().cpu()


def _objective(model: Any, tasks: Any, head_means: Any, where: str, *, split: str, n_prompts: int | None,
               n_mean_prompts: int, n_shots: int, seed: int, max_memory: int | None, fast: bool | str,
               prompt_kw: Mapping[str, Any]) -> tuple["PatchObjective", Tensor]:
    """The selection objective and its ``[task, layer, head, d_head]`` means, every input checked before any forward.

    ``tasks`` are task names (zero-shot prompts of ``split`` built here, means from ``n_shots``-shot
    prompts unless ``head_means``) or ready prompts (:func:`_ready_prompts`: text or multimodal
    batches, scored as they are)."""
    given = _ready_prompts(model, tasks, split, prompt_kw, where)
    if given is not None:
        means = _given_means(model, given, head_means)
        return PatchObjective.from_batches(model, [g.queries for g in given], means, task_names=[g.name for g in given],
                                           max_memory=max_memory, fast=fast), means
    task_list = _resolve_tasks(tasks)
    if n_prompts is not None:
        _check_int("n_prompts", n_prompts, 1)
    means = _means_for(model, task_list, head_means, n_prompts=n_mean_prompts, n_shots=n_shots, seed=seed, prompt_kw=prompt_kw)
    return PatchObjective.build(model, task_list, means, n_prompts=n_prompts, split=split, seed=seed, max_memory=max_memory,
                                fast=fast, prompt_kw=prompt_kw), means


def _progress(total: int, desc: str, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="step", disable=not enabled, initial=initial, leave=False)


class _Plateau:
    """Early stopping: an exponential moving average of the reward has not improved by more than
    ``tol`` for ``patience`` steps."""

    def __init__(self, patience: int | None, tol: float, beta: float = 0.9) -> None:
        self.patience, self.tol, self.beta = patience, tol, beta
        self.ema: float | None = None
        self.best = -math.inf
        self.since = 0

    def update(self, value: float) -> bool:
        self.ema = value if self.ema is None else self.beta * self.ema + (1 - self.beta) * value
        if self.ema > self.best + self.tol:
            self.best, self.since = self.ema, 0
        else:
            self.since += 1
        return self.patience is not None and self.since >= self.patience

    def state(self) -> dict:
        return {"ema": self.ema, "best": self.best, "since": self.since}

    def load(self, state: Mapping) -> None:
        self.ema, self.best, self.since = state["ema"], state["best"], state["since"]


# ==============================================================================================
# checkpoints
# ==============================================================================================


def _save_checkpoint(path: Path, state: dict) -> None:
    from ..results import atomic_write_bytes

    buf = io.BytesIO()
    torch.save(state, buf)
    atomic_write_bytes(path, buf.getvalue())


class _Run:
    """One selection optimisation's state and per-step bookkeeping, shared by REINFORCE and soft selection.

    Holds θ, Adam, the sampling generator, the reward curve and the plateau detector; resumes them
    from ``checkpoint`` when it holds this configuration, and after each step records the step's
    value, advances the progress bar, checks early stopping and writes the checkpoint.
    """

    def __init__(self, theta: Tensor, *, lr: float, seed: int, patience: int | None, tol: float, steps: int,
                 checkpoint: Path | None, checkpoint_every: int, info: Any, config: dict, desc: str, progress: bool,
                 label: str, threshold: float) -> None:
        self.theta, self.opt = theta, torch.optim.Adam([theta], lr=lr)
        self.gen = torch.Generator().manual_seed(seed)
        self.curve: list[float] = []
        self.stopper = _Plateau(patience, tol)
        self.ema_baseline: float | None = None
        self.step, self.done = 0, False
        self.steps, self.checkpoint, self.every = steps, checkpoint, checkpoint_every
        self.info, self.config, self.label, self.threshold = info, config, label, threshold
        state = None if checkpoint is None else _load_checkpoint(checkpoint, info.config_hash, config)
        if state is not None:
            with torch.no_grad():
                theta.copy_(state["theta"])
            self.opt.load_state_dict(state["optimizer"])
            self.gen.set_state(state["generator"])
            self.stopper.load(state["plateau"])
            self.curve, self.ema_baseline = list(state["curve"]), state["ema_baseline"]
            self.step, self.done = int(state["step"]), bool(state["done"])
        self.bar = _progress(steps, desc, progress, initial=min(self.step, steps))

    @property
    def running(self) -> bool:
        return not self.done and self.step < self.steps

    def end_step(self, value: float) -> None:
        self.curve.append(float(value))
        self.step += 1
        self.bar.update(1)
        self.bar.set_postfix(**{self.label: f"{value:.4g}"}, heads=int((torch.sigmoid(self.theta) > self.threshold).sum()))
        self.done = self.stopper.update(float(value))
        if self.done and self.step < self.steps and not self.bar.disable:  # say so: the bar stops short of its total
            self.bar.set_description_str(f"{self.bar.desc} (stopped early)")
            self.bar.write(f"{self.bar.desc.split(' (')[0]}: stopped early after {self.step} of {self.steps} steps: the "
                           f"moving-average {self.label} gained less than tol={self.stopper.tol:g} in the last "
                           f"{self.stopper.patience} steps (patience={self.stopper.patience}; patience=None runs every step)",
                           file=sys.stderr)
        if self.checkpoint is not None and (self.step % self.every == 0 or self.done or self.step >= self.steps):
            _save_checkpoint(self.checkpoint, self._snapshot())

    def _snapshot(self) -> dict:
        return {"kind": "tvlens.analyses.selection.checkpoint", "config_hash": self.info.config_hash, "config": self.config,
                "theta": self.theta.detach().clone(), "optimizer": self.opt.state_dict(), "generator": self.gen.get_state(),
                "curve": list(self.curve), "plateau": self.stopper.state(), "ema_baseline": self.ema_baseline,
                "step": self.step, "done": self.done}


def _load_checkpoint(path: Path, model_hash: str, config: dict) -> dict | None:
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)  # tensors, numbers, strings: no pickled code
    except Exception as err:
        raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); delete it to start afresh") from err
    if not isinstance(state, dict) or state.get("kind") != "tvlens.analyses.selection.checkpoint":
        raise ValueError(f"{str(path)!r} is not a tvlens selection checkpoint; pass another checkpoint= path")
    if state.get("config_hash") != model_hash:
        raise ValueError(
            f"checkpoint {str(path)!r} was written for another model (config hash {state.get('config_hash')}, this model "
            f"{model_hash}); pass a new checkpoint= path or load the model it came from"
        )
    saved = state.get("config", {})
    diff = sorted(k for k in set(saved) | set(config) if saved.get(k) != config.get(k))
    if diff:
        detail = "; ".join(f"{k}: checkpoint {saved.get(k)!r} vs now {config.get(k)!r}" for k in diff[:4])
        raise ValueError(
            f"checkpoint {str(path)!r} was written with a different configuration ({detail}); resume with the same "
            "settings, or pass a new checkpoint= path to start afresh"
        )
    return state


# ==============================================================================================
# REINFORCE
# ==============================================================================================


def reinforce_select(
    model: Any,
    tasks: Any = None,
    *,
    head_means: Any = None,
    steps: int = 60,
    samples_per_step: int = 16,
    lr: float = 0.1,
    init_logit: float = -1.0,
    baseline: str = "mean",
    sparsity: float = 0.0,
    seed: int = 0,
    metric: str = "logprob",
    n_prompts: int = 8,
    split: str = "train",
    n_mean_prompts: int = 32,
    n_shots: int = 5,
    positions: str = FINAL,
    patience: int | None = 10,
    tol: float = 1e-3,
    threshold: float = 0.5,
    reward_fn: Callable[[Tensor], Tensor] | None = None,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    max_memory: int | None = None,
    fast: bool | str = "auto",
    **prompt_kw: Any,
) -> Selection:
    """Select heads with REINFORCE (Hojel et al. 2024, "Finding Visual Task Vectors", §3.2).

    Each head ``(l, h)`` has a Bernoulli variable with ``p = sigmoid(θ[l, h])``, ``θ`` initialised at
    ``init_logit`` (−1, as in the paper). A step samples ``samples_per_step`` masks ``m`` (own
    ``torch.Generator(seed)``), scores them in one batched forward — the reward ``R(m)`` is the mean
    ``metric`` over zero-shot prompts of ``tasks`` with every selected head's ``hook_z`` at the final
    separator replaced by its task mean (each prompt gets its own task's mean) — and takes an Adam
    step (``lr``) on

        L(θ) = −(1/S) Σ_s (R(m_s) − b) log p_θ(m_s) + sparsity · Σ_{l,h} p_θ[l, h],

    whose gradient is the REINFORCE estimate of −∇E[R] plus the gradient of the expected number of
    heads times ``sparsity``. ``baseline`` is the variance-reducing ``b``: ``"mean"`` (the step's mean
    reward), ``"loo"`` (leave-one-out mean: unbiased), ``"ema"`` (running mean over steps) or ``"none"``.

    Args:
        tasks: the tasks (names, ``Task`` objects, ``"family:..."``); one mask is learnt for all of
            them (Hojel et al.'s multi-task variant), each prompt patched with its own task's means.
            Or each task's ready prompts (module docstring): ``SweepPrompts`` (their ``queries[split]``
            are scored; means from their ``context`` unless ``head_means``) or one batch of queries per
            task (``head_means`` required) — e.g. a VLM's image queries with image-ICL means;
            ``n_prompts``, ``n_mean_prompts``, ``n_shots`` and prompt options then do not apply.
        head_means: a ``HeadStats`` / ``[task, layer, head, d_head]`` tensor; default
            ``tvlens.head_means(model, tasks, n_prompts=n_mean_prompts, n_shots=n_shots, split="train")``.
        metric: ``"logprob"`` (log-probability of the answer's first token) or ``"accuracy"``.
        n_prompts: zero-shot prompts per task (distinct queries of ``split``; capped at its size).
        patience / tol: stop early when the moving-average reward has not improved by ``tol`` for
            ``patience`` steps (``patience=None``: always run ``steps``); with ``progress`` a line
            on stderr says when and why it stopped, and ``meta.extra["stopped_early"]`` records it.
        steps, samples_per_step, n_prompts, n_mean_prompts: the defaults (60, 16, 8, 32) are sized
            for an interactive session; a step costs one forward of ``samples_per_step × n_prompts ×
            len(tasks)`` final-token rows, so raise them (e.g. 200, 64, 32, 100) for a closer optimum.
        threshold: the final mask is ``p > threshold``.
        reward_fn: replaces the model-based reward: ``reward_fn(masks [S, layer, head] bool) -> [S]``
            (tasks and means are then not needed; used to test the optimiser).
        checkpoint: a file path; the state is written there atomically every ``checkpoint_every`` steps
            and at the end, and a run finding it resumes from it (refusing another model or settings).

    Returns:
        a :class:`Selection` (``method="reinforce"``): ``probabilities = sigmoid(θ)``, the final mask,
        the per-step mean reward; ``meta.extra`` holds the settings and ``final_reward``, the reward
        of the final mask.
    """
    from ..models import ModelInfo
    from ..results import ResultMeta

    info = ModelInfo.of(model)
    steps = _check_int("steps", steps, 1)
    samples_per_step = _check_int("samples_per_step", samples_per_step, 2 if baseline == "loo" else 1,
                                  "the leave-one-out baseline needs at least two samples per step")
    lr = check_float("lr", lr, 0.0, strict=True)
    init_logit = check_float("init_logit", init_logit)
    sparsity = check_float("sparsity", sparsity, 0.0)
    threshold = check_float("threshold", threshold)
    seed = _check_int("seed", seed, 0)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    if baseline not in BASELINES:
        raise ValueError(f"baseline must be one of {BASELINES}, got {baseline!r}")
    if metric not in REWARDS:
        raise ValueError(f"metric must be one of {REWARDS}, got {metric!r}")
    if positions not in FINAL_POSITION:
        raise ValueError(f"positions={positions!r} is not supported: selection patches the final position (the "
                         "separator) only; use positions='final'")
    if patience is not None:
        patience = _check_int("patience", patience, 1)
    if reward_fn is not None and not callable(reward_fn):
        raise TypeError("reward_fn must be a function masks [S, layer, head] -> rewards [S]")
    if checkpoint is not None:
        from ..results import check_writable

        checkpoint = check_writable(Path(checkpoint))
    prompt_kw = prompt_options("reinforce_select", prompt_kw)
    prompt_meta = prompt_record(prompt_kw)

    reward, objective, means, task_names = _reward_of(
        model, tasks, head_means, reward_fn, metric, split=split, n_prompts=n_prompts, n_mean_prompts=n_mean_prompts,
        n_shots=n_shots, seed=seed, max_memory=max_memory, fast=fast, prompt_kw=prompt_kw)
    config = dict(method="reinforce", tasks=list(task_names), samples_per_step=samples_per_step, lr=lr, init_logit=init_logit,
                  baseline=baseline, sparsity=sparsity, seed=seed, metric=metric, n_prompts=n_prompts, split=split,
                  n_mean_prompts=n_mean_prompts, n_shots=n_shots, threshold=threshold, **prompt_meta,
                  objective=objective.digest() if objective is not None else "reward_fn")

    shape = (info.n_layers, info.n_heads)
    theta = torch.full(shape, init_logit, dtype=torch.float32, requires_grad=True)
    run = _Run(theta, lr=lr, seed=seed, patience=patience, tol=tol, steps=steps, checkpoint=checkpoint,
               checkpoint_every=checkpoint_every, info=info, config=config, desc="reinforce_select", progress=progress,
               label="reward", threshold=threshold)
    try:
        while run.running:
            _reinforce_step(theta, reward, run, samples_per_step=samples_per_step, baseline=baseline, sparsity=sparsity)
    finally:
        run.bar.close()
    curve = run.curve

    probs = torch.sigmoid(theta.detach()).clone()
    mask = probs > threshold
    final_reward = float(reward(mask.unsqueeze(0))[0])
    meta = ResultMeta.for_model(model, tasks=task_names, seed=seed, **{k: v for k, v in config.items() if k not in ("tasks", "seed")},
                                steps_run=len(curve), stopped_early=len(curve) < steps, final_reward=final_reward)
    return Selection(probabilities=probs, mask=mask, rewards=torch.tensor(curve, dtype=torch.float32), method="reinforce",
                     meta=meta, tasks=task_names, head_means=means)


def _reward_of(model: Any, tasks: Any, head_means: Any, reward_fn: Callable[[Tensor], Tensor] | None, metric: str, *,
               split: str, n_prompts: int, n_mean_prompts: int, n_shots: int, seed: int, max_memory: int | None,
               fast: Any, prompt_kw: Mapping[str, Any]) -> tuple[Callable[[Tensor], Tensor], Any, Any, tuple[str, ...]]:
    """The reward of masks ``[S, layer, head] -> [S]``: the patched metric on the tasks' zero-shot
    prompts (a :class:`PatchObjective`), or ``reward_fn``'s; with the objective, means and task names."""
    if reward_fn is None:
        objective, means = _objective(model, tasks, head_means, "reinforce_select", split=split, n_prompts=n_prompts,
                                      n_mean_prompts=n_mean_prompts, n_shots=n_shots, seed=seed, max_memory=max_memory,
                                      fast=fast, prompt_kw=prompt_kw)
        return (lambda masks: objective.reward(masks, metric)), objective, means, objective.task_names

    def reward(masks: Tensor) -> Tensor:
        r = torch.as_tensor(reward_fn(masks)).detach().float().cpu().reshape(-1)
        if r.numel() != masks.shape[0]:
            raise ValueError(f"reward_fn returned {r.numel()} rewards for {masks.shape[0]} masks; return one per mask")
        return r

    return reward, None, None, tuple(_task_name(t) for t in (tasks or ()))


def _reinforce_step(theta: Tensor, reward: Callable[[Tensor], Tensor], run: Any, *, samples_per_step: int,
                    baseline: str, sparsity: float) -> None:
    """One REINFORCE update of the Bernoulli logits ``theta`` (Hojel et al. 2024, §3.2; Williams 1992):
    sample masks, score them, step along ``(r - b) ∇ log p(mask)`` with an L1 pull on ``sigmoid(θ)``."""
    with torch.no_grad():
        p = torch.sigmoid(theta)
        masks = torch.bernoulli(p.expand(samples_per_step, *theta.shape), generator=run.gen).bool()
    r = reward(masks)
    if baseline == "mean":
        b = r.mean()
    elif baseline == "loo":
        b = (r.sum() - r) / (r.numel() - 1)
    elif baseline == "ema":
        ema = run.ema_baseline
        b = torch.tensor(r.mean().item() if ema is None else ema)
        run.ema_baseline = r.mean().item() if ema is None else 0.9 * ema + 0.1 * r.mean().item()
    else:
        b = torch.zeros(())
    advantage = (r - b).detach()
    m = masks.float()
    log_p = (m * F.logsigmoid(theta) + (1 - m) * F.logsigmoid(-theta)).sum((1, 2))  # [S]
    loss = -(advantage * log_p).mean() + sparsity * torch.sigmoid(theta).sum()
    run.opt.zero_grad()
    loss.backward()
    run.opt.step()
    run.end_step(float(r.mean()))


# ==============================================================================================
# soft α
# ==============================================================================================


def soft_select(
    model: Any,
    tasks: Any,
    *,
    head_means: Any = None,
    steps: int = 100,
    lr: float = 0.05,
    l1: float = 1e-3,
    init_logit: float = -1.0,
    seed: int = 0,
    n_prompts: int = 32,
    batch_size: int | None = None,
    split: str = "train",
    n_mean_prompts: int = 100,
    n_shots: int = 5,
    patience: int | None = 30,
    tol: float = 1e-3,
    threshold: float = 0.5,
    progress: bool = True,
    checkpoint: str | Path | None = None,
    checkpoint_every: int = 10,
    max_memory: int | None = None,
    fast: bool | str = "auto",
    **prompt_kw: Any,
) -> Selection:
    """Soft per-head task weights trained by gradient descent (the ``task_vectors`` package's "soft
    task vector", J. Newsom; a relaxation of Hojel et al.'s binary masks).

    Each head has ``α = sigmoid(θ) ∈ [0, 1]``; at the final separator of each zero-shot prompt,
    ``z ← z + α (mean − z)`` (``torch.lerp``) with the prompt's task mean. ``θ`` (initialised at
    ``init_logit``) is trained with Adam (``lr``) to minimise

        −mean log p(answer's first token) + l1 · Σ_{l,h} α[l, h]

    by back-propagating through the frozen model: no weight is modified and none gets a gradient
    (``requires_grad`` stays False on them); only ``θ`` does. ``batch_size`` (optional) trains on a
    random subset of the prompts per step (own ``torch.Generator(seed)``); by default every step
    uses all prompts. Early stopping and checkpoints as in :func:`reinforce_select`; ``tasks`` may be
    ready prompts, text or multimodal, as there.

    Returns a :class:`Selection` (``method="soft"``) with ``probabilities`` = α, mask ``α > threshold``,
    and the mean answer log-prob per step as the reward curve.
    """
    from ..models import ModelInfo
    from ..results import ResultMeta

    info = ModelInfo.of(model)
    steps = _check_int("steps", steps, 1)
    lr = check_float("lr", lr, 0.0, strict=True)
    l1 = check_float("l1", l1, 0.0)
    init_logit = check_float("init_logit", init_logit)
    threshold = check_float("threshold", threshold)
    seed = _check_int("seed", seed, 0)
    _check_int("n_prompts", n_prompts, 1)
    checkpoint_every = _check_int("checkpoint_every", checkpoint_every, 1)
    if batch_size is not None:
        batch_size = _check_int("batch_size", batch_size, 1)
    if patience is not None:
        patience = _check_int("patience", patience, 1)
    if checkpoint is not None:
        from ..results import check_writable

        checkpoint = check_writable(Path(checkpoint))
    prompt_kw = prompt_options("soft_select", prompt_kw)
    prompt_meta = prompt_record(prompt_kw)
    objective, means = _objective(model, tasks, head_means, "soft_select", split=split, n_prompts=n_prompts,
                                  n_mean_prompts=n_mean_prompts, n_shots=n_shots, seed=seed, max_memory=max_memory, fast=fast,
                                  prompt_kw=prompt_kw)
    task_names = objective.task_names
    config = dict(method="soft", tasks=list(task_names), lr=lr, l1=l1, init_logit=init_logit, seed=seed, n_prompts=n_prompts,
                  batch_size=batch_size, split=split, n_mean_prompts=n_mean_prompts, n_shots=n_shots, threshold=threshold,
                  **prompt_meta, objective=objective.digest())

    dtype = objective.dtype if objective.dtype == torch.float64 else torch.float32
    theta = torch.full((info.n_layers, info.n_heads), init_logit, dtype=dtype, requires_grad=True)
    run = _Run(theta, lr=lr, seed=seed, patience=patience, tol=tol, steps=steps, checkpoint=checkpoint,
               checkpoint_every=checkpoint_every, info=info, config=config, desc="soft_select", progress=progress,
               label="logprob", threshold=threshold)
    n = objective.n_rows
    try:
        while run.running:
            rows = None
            if batch_size is not None and batch_size < n:
                rows = torch.randperm(n, generator=run.gen)[:batch_size]
            with torch.enable_grad():
                loss, objective_value = objective.soft_loss(theta, l1=l1, rows=rows)
                run.opt.zero_grad()
                loss.backward()
            run.opt.step()
            run.end_step(float(objective_value))
    finally:
        run.bar.close()
    curve = run.curve

    alphas = torch.sigmoid(theta.detach()).float().clone()
    with torch.no_grad():
        final_reward = float(objective.per_row(alphas.unsqueeze(0), "logprob").mean())
    meta = ResultMeta.for_model(model, tasks=task_names, seed=seed, **{k: v for k, v in config.items() if k not in ("tasks", "seed")},
                                metric="logprob", steps_run=len(curve), stopped_early=len(curve) < steps,
                                final_reward=final_reward)
    return Selection(probabilities=alphas, mask=alphas > threshold, rewards=torch.tensor(curve, dtype=torch.float32),
                     method="soft", meta=meta, tasks=task_names, head_means=means)


def select_restarts(
    model: Any,
    tasks: Any,
    *,
    method: str = "reinforce",
    n_restarts: int = 4,
    seed: int = 0,
    executor: Any = None,
    progress: bool = True,
    **kw: Any,
) -> Selection:
    """The best of ``n_restarts`` independent selections, from seeds ``seed .. seed + n_restarts - 1``.

    REINFORCE (Hojel et al. 2024, §3.2) and its soft relaxation are stochastic searches; running
    them from several seeds and keeping the highest ``final_reward`` (the reward of the final
    mask; ties: the lower seed) guards against a poor local optimum. Each restart is one unit of
    ``executor`` (:mod:`tvlens.runs.executors`): by default one after the other here, on a
    ``RayExecutor`` side by side on its workers. The task means are computed once (``head_means=``,
    else :func:`tvlens.head_means` with ``n_mean_prompts``, ``n_shots`` and ``seed``) and shared by
    every restart. ``kw``: the options of :func:`reinforce_select` / :func:`soft_select` (prompt
    options among them: ``separator``, ``example_sep``, ``prepend_bos``, used for the shared means too).

    Returns the best :class:`Selection`; ``meta.extra["restarts"]`` lists every restart's seed and
    final reward, ``meta.extra["executor"]`` who ran them.
    """
    import dataclasses

    from ..results import ResultMeta
    from ..runs import distributed

    if method not in ("reinforce", "soft"):
        raise ValueError(f"unknown method {method!r}; use 'reinforce' (reinforce_select) or 'soft' (soft_select)")
    n_restarts = _check_int("n_restarts", n_restarts, 1, "run at least one selection")
    seed = _check_int("seed", seed, 0)
    for bad in ("seed", "checkpoint", "progress"):
        if bad in kw:
            raise TypeError(f"select_restarts sets {bad!r} of each restart itself; remove it from the options "
                            "(restarts use seeds seed .. seed + n_restarts - 1, without checkpoints)")
    from ..inputs.text import PROMPT_OPTIONS

    if _ready_prompts(model, tasks, kw.get("split", "train"), {}, "select_restarts") is not None:
        raise ValueError("select_restarts takes task names (its restarts may run on an executor's workers, which build "
                         "their own prompts); for ready prompts, run reinforce_select / soft_select(model, prompts, seed=s) "
                         "for each seed and keep the highest meta.extra['final_reward']")
    task_list = _resolve_tasks(tasks)
    prompt_kw = prompt_options("select_restarts", {k: v for k, v in kw.items() if k in PROMPT_OPTIONS})
    given = kw.pop("head_means", None)
    if given is None:
        from .taskness import head_means as compute

        given = compute(model, task_list, n_prompts=kw.get("n_mean_prompts", 100), n_shots=kw.get("n_shots", 5),
                        positions=FINAL, seed=seed, split="train", progress=False, executor=executor, **prompt_kw)
    means = _means_for(model, task_list, given, n_prompts=kw.get("n_mean_prompts", 100), n_shots=kw.get("n_shots", 5),
                       seed=seed, prompt_kw=prompt_kw)
    runs = distributed.restarts(model, task_list, method=method, seeds=range(seed, seed + n_restarts),
                                executor=executor, head_means=means, kw=kw, progress=progress)
    rewards = [float(r.meta.extra.get("final_reward", float("-inf"))) for r in runs]
    best = max(range(n_restarts), key=lambda i: (rewards[i], -i))
    d = runs[best].meta.to_dict()
    d["extra"] = {**d["extra"], "restarts": [{"seed": seed + i, "final_reward": rewards[i]} for i in range(n_restarts)]}
    return dataclasses.replace(runs[best], meta=ResultMeta.from_dict(d))


# ==============================================================================================
# evaluation and comparison
# ==============================================================================================

#: column keys of a Comparison, in display order, with their labels
METHOD_LABELS = {
    "zero_shot": "zero-shot",
    "rho_topk": "ρ top-k",
    "cie_topk": "CIE top-k",
    "reinforce": "REINFORCE",
    "soft": "soft α",
    "random_k": "random-k",
    "icl": "ICL",
}
DEFAULT_METHODS = tuple(METHOD_LABELS)


def evaluate_heads(
    model: Any,
    tasks: Any,
    weights: Float[Tensor, "sample layer head"] | Selection | Sequence[Selection],
    *,
    head_means: Any = None,
    metric: str = "accuracy",
    split: str = "test",
    n_prompts: int | None = None,
    seed: int = 0,
    n_mean_prompts: int = 100,
    n_shots: int = 5,
    max_memory: int | None = None,
    fast: bool | str = "auto",
    **prompt_kw: Any,
) -> Float[Tensor, "sample task"]:
    """Score head weightings on zero-shot prompts with the task means patched in at the final separator.

    ``weights``: ``[sample, layer, head]`` (0/1 masks or α), a :class:`Selection` (its
    :attr:`Selection.weights`) or several. Returns ``[sample, task]`` first-token accuracy (or mean
    answer log-prob with ``metric="logprob"``) on ``split`` (all its queries unless ``n_prompts``).
    All weightings run in batched forwards (weightings × prompts along the batch dimension). A
    prompt counts when its top token starts any accepted answer. ``**prompt_kw``: how the prompts
    are written (``separator``, ``example_sep``, ``prepend_bos``). ``tasks`` may be ready prompts, text
    or multimodal (``SweepPrompts``: their ``queries[split]``; or one batch of queries per task), as in
    :func:`reinforce_select`.
    """
    prompt_kw = prompt_options("evaluate_heads", prompt_kw)
    if isinstance(weights, Selection):
        weights = weights.weights.unsqueeze(0)
    elif isinstance(weights, Sequence) and weights and all(isinstance(s, Selection) for s in weights):
        weights = torch.stack([s.weights for s in weights])
    elif not isinstance(weights, Tensor):
        raise TypeError(f"weights must be a [sample, layer, head] tensor or Selection(s), got {type(weights).__name__}")
    obj, _ = _objective(model, tasks, head_means, "evaluate_heads", split=split, n_prompts=n_prompts,
                        n_mean_prompts=n_mean_prompts, n_shots=n_shots, seed=seed, max_memory=max_memory, fast=fast,
                        prompt_kw=prompt_kw)
    return obj.per_task(weights.float() if weights.dtype == torch.bool else weights, metric)


@dataclass(frozen=True, eq=False)
class Comparison(Saved, Tabular):
    """Held-out accuracy of head-selection methods, per task and per family.

    - ``accuracy``: ``[task, method]`` first-token accuracy on the test split (NaN where a method
      was not available); ``methods`` are keys of :data:`METHOD_LABELS` or user-given names;
    - ``random_std``: ``[task]`` standard deviation of random-k accuracy over the draws;
    - ``n_selected``: ``[task, method]`` number of heads patched (α > 0.5 for soft; NaN for zero-shot / ICL);
    - ``selections``: method -> group -> :class:`Selection` (``group`` is a family, a task or ``"all"``);
    - ``k``: group -> k used for the top-k and random-k rows.
    """

    tasks: tuple[str, ...]
    families: tuple[str, ...]
    methods: tuple[str, ...]
    accuracy: Float[Tensor, "task method"]
    random_std: Float[Tensor, " task"]
    n_selected: Float[Tensor, "task method"]
    selections: Mapping[str, Mapping[str, Selection]]
    k: Mapping[str, int]
    per: str
    notes: tuple[str, ...]
    meta: ResultMeta

    def label(self, method: str) -> str:
        return METHOD_LABELS.get(method, method)

    @property
    def family_names(self) -> tuple[str, ...]:
        """The families present, in first-appearance order."""
        return tuple(dict.fromkeys(self.families))

    def family_accuracy(self) -> Float[Tensor, "family method"]:
        """Mean accuracy over the tasks of each family (rows as :attr:`family_names`), NaN-aware."""
        rows = []
        for fam in self.family_names:
            idx = [i for i, f in enumerate(self.families) if f == fam]
            rows.append(_nanmean(self.accuracy[idx], 0))
        return torch.stack(rows)

    def overall(self) -> Float[Tensor, " method"]:
        """Mean over families (each family weighted equally)."""
        return _nanmean(self.family_accuracy(), 0)

    def table(self, by: str = "family", fmt: str = "markdown") -> str:
        """The comparison as a text table: one row per family (``by="family"``, plus the mean over
        families) or per task (``by="task"``); ``fmt`` ``"markdown"`` or ``"tsv"``."""
        head, body = self._rows(by)
        if fmt == "tsv":
            return "\n".join("\t".join(r) for r in [head, *body])
        if fmt != "markdown":
            raise ValueError(f"fmt must be 'markdown' or 'tsv', got {fmt!r}")
        lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        lines += ["| " + " | ".join(r) + " |" for r in body]
        return "\n".join(lines)

    def _rows(self, by: str) -> tuple[list[str], list[list[str]]]:
        if by == "family":
            names = [*self.family_names, "mean"]
            values = torch.cat([self.family_accuracy(), self.overall()[None]])
        elif by == "task":
            names, values = list(self.tasks), self.accuracy
        else:
            raise ValueError(f"by must be 'family' or 'task', got {by!r}")
        head = [by, *(self.label(m) for m in self.methods)]
        body = [[n, *("—" if math.isnan(float(v)) else f"{float(v):.3f}" for v in row)] for n, row in zip(names, values)]
        return head, body

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return (f"Comparison(model={getattr(self.meta, 'model', '?')!r}, tasks={len(self.tasks)}, "
                f"families={list(self.family_names)}, methods={list(self.methods)}, per={self.per!r})")

    def records(self) -> list[dict[str, Any]]:
        """One row per (task, method): held-out accuracy, heads patched, and random-k's spread."""
        return [{"task": task, "family": self.families[t], "method": m, "accuracy": float(self.accuracy[t, j]),
                 "n_selected": float(self.n_selected[t, j]), "random_std": float(self.random_std[t]) if m == "random_k" else None}
                for t, task in enumerate(self.tasks) for j, m in enumerate(self.methods)]

    def to_frame(self, by: str = "family"):
        """A pandas DataFrame of :meth:`table`'s numbers (pandas must be installed)."""
        try:
            import pandas as pd
        except ImportError as err:  # pragma: no cover
            raise ImportError("to_frame needs pandas (pip install pandas); use .table() for a text table") from err
        if by == "family":
            return pd.DataFrame(self.family_accuracy().numpy(), index=list(self.family_names),
                                columns=[self.label(m) for m in self.methods])
        return pd.DataFrame(self.accuracy.numpy(), index=list(self.tasks), columns=[self.label(m) for m in self.methods])

    def plot(self):
        """Grouped bar plot: one group per family (and the mean), one bar per method."""
        from ..plot import bar_plot

        fam = self.family_accuracy()
        labels = [*self.family_names, "mean"]
        series = {self.label(m): torch.cat([fam[:, j], self.overall()[j:j + 1]]) for j, m in enumerate(self.methods)}
        # a method with no number anywhere would be a legend entry without a bar: name it in the title instead
        missing = [name for name, ys in series.items() if bool(torch.isnan(ys.double()).all())]
        series = {name: ys for name, ys in series.items() if name not in missing}
        ks = sorted(set(self.k.values()))
        title = f"Head selection, held-out first-token accuracy — {Path(str(getattr(self.meta, 'model', '?'))).name} (k={', '.join(map(str, ks))})"
        if missing:
            title += f"<br><sup>not available here: {', '.join(missing)} (see the notes)</sup>"
        return bar_plot(labels, series, title=title, xlabel="family", ylabel="accuracy")

    def heatmaps(self) -> dict[str, Any]:
        """One layers × heads heatmap per selection: ``{"<method> [<group>]": Figure}``."""
        out = {}
        for method, groups in self.selections.items():
            for group, sel in groups.items():
                fig = sel.plot()
                fig.update_layout(title=dict(text=f"{self.label(method)} [{group}] — {len(sel)} heads"))
                out[f"{method} [{group}]"] = fig
        return out

    def to_html(self, path: str | Path) -> Path:
        """One HTML page (loading ``plotly.min.js`` from its folder, written there once): the bar plot,
        the accuracy tables per family and per task, the notes and every selection heatmap."""
        from ..plot import figure_div, html_page

        esc = _html_escape

        def table(by: str) -> str:
            head, body = self._rows(by)
            rows = ["<tr>" + "".join(f"<th>{esc(c)}</th>" for c in head) + "</tr>"]
            rows += ["<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>" for r in body]
            return "<table>" + "".join(rows) + "</table>"

        model = str(getattr(self.meta, "model", "?"))
        ks = ", ".join(f"{g}: {k}" for g, k in self.k.items())
        parts = [f"<h1>Head selection — {esc(Path(model).name)}</h1>",
                 f"<p>Held-out first-token accuracy (test split) of zero-shot prompts with the selected heads' task means "
                 f"patched in at the final separator. {len(self.tasks)} task{'s' if len(self.tasks) != 1 else ''}: "
                 f"{esc(', '.join(self.tasks))}; one selection "
                 f"per {esc(self.per)}; k per group: {esc(ks)}.</p>",
                 figure_div(self.plot()), "<h2>Per family</h2>", table("family"), "<h2>Per task</h2>", table("task")]
        if self.notes:
            parts.append("<h2>Notes</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in self.notes) + "</ul>")
        parts.append("<h2>The selections</h2>")
        parts += [figure_div(fig) for fig in self.heatmaps().values()]
        return html_page(path, parts, title=f"tvlens selection comparison — {Path(model).name}")


def _html_escape(s: str) -> str:
    import html

    return html.escape(s)


def _nanmean(x: Tensor, dim: int) -> Tensor:
    x = x.double()
    ok = ~torch.isnan(x)
    total = torch.where(ok, x, torch.zeros_like(x)).sum(dim)
    n = ok.sum(dim)
    return torch.where(n > 0, total / n.clamp_min(1), torch.full_like(total, float("nan")))


def _groups(task_list: Sequence[Any], per: str) -> dict[str, list[Any]]:
    if per == "all":
        return {"all": list(task_list)}
    if per == "family":
        out: dict[str, list[Any]] = {}
        for t in task_list:
            out.setdefault(t.family, []).append(t)
        return out
    if per == "task":
        return {t.name: [t] for t in task_list}
    raise ValueError(f"per must be 'all', 'family' or 'task', got {per!r}")


def _given_selection(given: Any, group: str, tasks: Sequence[Any]) -> Selection | None:
    """A user-given selection for ``group``: a Selection, or a mapping keyed by group / family / task."""
    if given is None:
        return None
    if isinstance(given, Selection):
        return given
    if isinstance(given, Mapping):
        for key in (group, *{t.family for t in tasks}, *(t.name for t in tasks), "all"):
            if key in given:
                return given[key]
        raise KeyError(f"no selection given for group {group!r}; the mapping has {', '.join(map(str, given))}")
    raise TypeError(f"a given selection must be a Selection or a mapping group -> Selection, got {type(given).__name__}")


def _cie_scores(model: Any, task: Any, *, seed: int, k: int, **kw: Any) -> Tensor:
    """CIE [layer, head] of Todd et al. 2024 from :func:`tvlens.vectors.activation.function_vector`."""
    from ..vectors.activation import function_vector

    fv = function_vector(model, task, k=k, seed=seed, **kw)
    for attr in ("cie", "cie_scores", "indirect_effect"):
        val = getattr(fv, attr, None)
        if isinstance(val, Tensor):
            return val.detach().float().cpu().reshape(val.shape[-2], val.shape[-1]) if val.ndim == 2 else val.detach().float().cpu().mean(0)
    raise AttributeError("tvlens.vectors.activation.FunctionVector has no CIE tensor (looked for .cie); cannot rank heads by CIE")


def _topk_heads(scores: Tensor, k: int) -> list[tuple[int, int]]:
    flat = scores.reshape(-1).double()
    order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]) if not math.isnan(float(flat[i])) else math.inf, i))[:k]
    n_heads = scores.shape[1]
    return [(i // n_heads, i % n_heads) for i in order]


def compare_selections(
    model: Any,
    tasks: Any,
    *,
    k: int | None = None,
    selections: Mapping[str, Any] | None = None,
    methods: Sequence[str] = DEFAULT_METHODS,
    per: str = "family",
    n_random: int = 10,
    seed: int = 0,
    head_means: Any = None,
    n_prompts: int | None = None,
    n_shots: int = 5,
    n_icl_prompts: int = 50,
    n_mean_prompts: int = 100,
    reinforce_kw: Mapping[str, Any] | None = None,
    soft_kw: Mapping[str, Any] | None = None,
    cie_kw: Mapping[str, Any] | None = None,
    progress: bool = True,
    max_memory: int | None = None,
    fast: bool | str = "auto",
    **prompt_kw: Any,
) -> Comparison:
    """Compare ways of choosing the heads to patch, on held-out (test-split) zero-shot prompts.

    Every row patches the task-mean ``hook_z`` (``n_shots``-shot prompts, train-split queries) of a
    set of heads in at the final separator and reports first-token accuracy:

    - ``zero_shot``: nothing patched; ``icl``: ``n_shots``-shot prompts, nothing patched;
    - ``rho_topk``: the ``k`` heads of highest ρ_token (Hojel et al. 2024) over **all** ``tasks``;
    - ``cie_topk``: the ``k`` heads of highest causal indirect effect (Todd et al. 2024, via
      :func:`tvlens.vectors.activation.function_vector`), averaged over the group's tasks;
    - ``reinforce`` / ``soft``: :func:`reinforce_select` / :func:`soft_select` trained on the
      group's tasks (train split), or the ones passed in ``selections``; soft patches with its α;
    - ``random_k``: ``k`` random heads, mean over ``n_random`` draws (``torch.Generator(seed)``).

    ``per`` sets the groups a selection is learnt for: ``"family"`` (default: one mask per family,
    shared by its tasks), ``"task"`` or ``"all"``. ``k`` defaults to the number of heads REINFORCE
    selected for the group (8 when it selected none or did not run), so the fixed-size rows match
    its budget. ``selections`` maps a method name to a :class:`Selection` or to a mapping group
    (family / task / ``"all"``) -> Selection; names other than ``reinforce`` / ``soft`` add columns.
    ``reinforce_kw`` / ``soft_kw`` / ``cie_kw`` are passed to the respective functions.
    ``**prompt_kw``: how every prompt is written (``separator``, ``example_sep``, ``prepend_bos``),
    passed to each method and to the means, ICL and evaluation prompts alike.

    ``tasks`` may be :class:`~tvlens.vectors.activation.SweepPrompts`, text or multimodal (Luo et al.
    2024 §4: a VLM's image queries): selections learnt on ``queries["train"]``, scored on
    ``queries["test"]``, means (and ρ) from ``context`` unless ``head_means``, ICL from ``icl`` (NaN
    where absent); CIE top-k is skipped (it builds its own text prompts), with a note.
    """
    from ..models import ModelInfo
    from ..results import ResultMeta

    info = ModelInfo.of(model)
    prompt_kw = prompt_options("compare_selections", prompt_kw)
    given, tests, ready = _comparison_prompts(model, tasks, prompt_kw)
    task_list = given if given is not None else _resolve_tasks(tasks)
    methods = tuple(methods)
    unknown = [m for m in methods if m not in METHOD_LABELS]
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; use some of {list(METHOD_LABELS)} (add your own through selections=)")
    if k is not None:
        _check_int("k", k, 1)
        if k > info.n_layers * info.n_heads:
            raise ValueError(f"k={k} exceeds the {info.n_layers * info.n_heads} heads of this model")
    n_random = _check_int("n_random", n_random, 1)
    seed = _check_int("seed", seed, 0)
    groups = _groups(task_list, per)
    selections = dict(selections or {})
    all_methods = (*methods, *[m for m in selections if m not in METHOD_LABELS])
    notes: list[str] = []
    stats = _comparison_stats(model, task_list, given, head_means, n_mean_prompts=n_mean_prompts, n_shots=n_shots,
                              seed=seed, progress=progress, prompt_kw=prompt_kw)
    means = _means_for(model, task_list, stats, n_prompts=n_mean_prompts, n_shots=n_shots, seed=seed, prompt_kw=prompt_kw)
    rho = _rho_scores(stats, task_list, notes) if "rho_topk" in methods else None
    tally = _Tally.empty(task_list, all_methods)
    gen = torch.Generator().manual_seed(seed)
    chosen: dict[str, dict[str, Selection]] = {}
    ks: dict[str, int] = {}
    cie_on = "cie_topk" in methods  # off for the later groups once CIE top-k could not be computed
    learn = dict(seed=seed, progress=progress, fast=fast, max_memory=max_memory, prompt_kw=prompt_kw,
                 reinforce_kw=reinforce_kw, soft_kw=soft_kw, cie_kw=cie_kw)
    for group, g_tasks in groups.items():
        idx = [tally.index[t.name] for t in g_tasks]
        fixed = _learnt_selections(model, group, g_tasks, means[idx], methods, selections, ready, **learn)
        ks[group] = k_g = k if k is not None else (len(fixed["reinforce"]) if "reinforce" in fixed and len(fixed["reinforce"])
                                                   else min(8, info.n_layers * info.n_heads))
        sized, cie_on = _fixed_size_selections(model, g_tasks, k_g, rho, cie_on, given is not None, notes, seed=seed,
                                               prompt_kw=prompt_kw, cie_kw=cie_kw)
        fixed.update(sized)
        rows = _weightings(info, fixed, methods, n_random, k_g, gen)
        if given is None:
            obj = PatchObjective.build(model, g_tasks, means[idx], n_prompts=n_prompts, split="test", seed=seed,
                                       max_memory=max_memory, fast=fast, prompt_kw=prompt_kw)
        else:
            obj = PatchObjective.from_batches(model, [tests[t.name].queries for t in g_tasks], means[idx],
                                              task_names=[t.name for t in g_tasks], max_memory=max_memory, fast=fast)
        tally.record(idx, rows, obj.per_task(torch.stack([w for _, w in rows]), "accuracy").double(), k_g)
        for method, sel in fixed.items():
            chosen.setdefault(method, {})[group] = sel
    if "icl" in methods:
        _icl_column(model, task_list, tests, means, tally, notes, n_icl_prompts=n_icl_prompts, n_shots=n_shots, seed=seed,
                    max_memory=max_memory, fast=fast, prompt_kw=prompt_kw)
    meta = ResultMeta.for_model(model, tasks=[t.name for t in task_list], seed=seed, per=per, n_random=n_random, n_shots=n_shots,
                                n_prompts=n_prompts, n_icl_prompts=n_icl_prompts, n_mean_prompts=n_mean_prompts,
                                k=dict(ks), reinforce_kw=dict(reinforce_kw or {}), soft_kw=dict(soft_kw or {}),
                                **prompt_record(prompt_kw))
    return Comparison(tasks=tuple(t.name for t in task_list), families=tuple(t.family for t in task_list), methods=all_methods,
                      accuracy=tally.acc.float(), random_std=tally.rnd_std.float(), n_selected=tally.n_sel.float(),
                      selections=chosen, k=ks, per=per, notes=tuple(notes), meta=meta)


# -- the steps of compare_selections ------------------------------------------------------------


def _comparison_prompts(model: Any, tasks: Any, prompt_kw: Mapping[str, Any]) -> tuple[Any, dict, dict]:
    """Ready prompts (SweepPrompts) as train-split tasks, their test queries and the SweepPrompts by
    name; ``(None, {}, {})`` for task names, whose prompts each method builds."""
    given = _ready_prompts(model, tasks, "train", prompt_kw, "compare_selections")
    if given is None:
        return None, {}, {}
    from ..vectors.activation import SweepPrompts

    items = [tasks] if isinstance(tasks, SweepPrompts) else list(tasks)
    if not all(isinstance(t, SweepPrompts) for t in items):
        raise TypeError("compare_selections selects on train queries and scores on test queries: give ready prompts as "
                        "SweepPrompts(task, context, {'train': ..., 'test': ...}), not bare batches")
    tests = {g.name: g for g in _ready_prompts(model, items, "test", prompt_kw, "compare_selections")}
    return given, tests, {g.name: t for g, t in zip(given, items)}


def _comparison_stats(model: Any, task_list: Sequence[Any], given: Any, head_means: Any, *, n_mean_prompts: int,
                      n_shots: int, seed: int, progress: bool, prompt_kw: Mapping[str, Any]) -> Any:
    """The task means every method shares (a HeadStats, so ρ has its variances), unless given."""
    if head_means is not None:
        return head_means
    if given is not None:
        missing = [g.name for g in given if g.context is None]
        if missing:
            raise ValueError(f"no head means for the ready prompts of {', '.join(missing)}: pass head_means= or give "
                             "SweepPrompts with context prompts")
        return _context_stats(model, given)
    from .taskness import head_means as compute

    return compute(model, task_list, n_prompts=n_mean_prompts, n_shots=n_shots, positions=FINAL, seed=seed,
                   split="train", progress=progress, **prompt_kw)


def _rho_scores(stats: Any, task_list: Sequence[Any], notes: list[str]) -> Tensor | None:
    """ρ_token ``[layer, head]`` over all the tasks (Hojel et al. 2024, §3), or None with a note why not."""
    if isinstance(stats, Tensor):
        notes.append("ρ top-k skipped: head_means was given as a tensor (ρ needs the variances of a HeadStats)")
        return None
    if len(task_list) < 2:
        notes.append("ρ top-k skipped: ρ_token compares tasks and needs at least 2")
        return None
    from .taskness import taskness

    return taskness(stats.select([t.name for t in task_list]) if hasattr(stats, "select") else stats).scores.float()


def _learnt_selections(model: Any, group: str, g_tasks: Sequence[Any], g_means: Tensor, methods: Sequence[str],
                       selections: Mapping[str, Any], ready: Mapping[str, Any], *, seed: int, progress: bool, fast: Any,
                       max_memory: int | None, prompt_kw: Mapping[str, Any], reinforce_kw: Any, soft_kw: Any,
                       cie_kw: Any) -> dict[str, Selection]:
    """REINFORCE and soft selections learnt on the group's train queries (or given), then the user's own."""
    fixed: dict[str, Selection] = {}
    for method, fn, kw in (("reinforce", reinforce_select, reinforce_kw), ("soft", soft_select, soft_kw)):
        if method not in methods and method not in selections:
            continue
        sel = _given_selection(selections.get(method), group, g_tasks)
        if sel is None:
            sel = fn(model, [ready[t.name] for t in g_tasks] if ready else g_tasks, head_means=g_means, seed=seed,
                     progress=progress, **{"fast": fast, "max_memory": max_memory, **prompt_kw, **dict(kw or {})})
        fixed[method] = sel
    for method in selections:
        if method not in METHOD_LABELS:
            fixed[method] = _given_selection(selections[method], group, g_tasks)
    return fixed


def _fixed_size_selections(model: Any, g_tasks: Sequence[Any], k: int, rho: Tensor | None, cie: bool, ready: bool,
                           notes: list[str], *, seed: int, prompt_kw: Mapping[str, Any],
                           cie_kw: Any) -> tuple[dict[str, Selection], bool]:
    """The top-``k`` heads by ρ (over all tasks) and, if ``cie``, by CIE (Todd et al. 2024, averaged
    over the group); and whether CIE top-k is still to be computed for the next groups (once it
    cannot be, the note says why once and the later groups skip it)."""
    names = [t.name for t in g_tasks]
    out: dict[str, Selection] = {}
    if rho is not None:
        out["rho_topk"] = Selection.from_heads(model, _topk_heads(rho, k), method="rho_topk", tasks=names, k=k)
    if not cie:
        return out, False
    if ready:
        notes.append("CIE top-k skipped: ready prompts have no task whose text prompts function_vector would build")
        return out, False
    try:
        cie_scores = torch.stack([_cie_scores(model, t, seed=seed, k=k, **{**prompt_kw, **dict(cie_kw or {})})
                                  for t in g_tasks]).mean(0)
    except (ImportError, AttributeError) as err:
        notes.append(f"CIE top-k skipped: {type(err).__name__}: {err}")
        return out, False
    out["cie_topk"] = Selection.from_heads(model, _topk_heads(cie_scores, k), method="cie_topk", tasks=names, k=k)
    return out, True


def _weightings(info: Any, fixed: Mapping[str, Selection], methods: Sequence[str], n_random: int, k: int,
                gen: torch.Generator) -> list[tuple[str, Float[Tensor, "layer head"]]]:
    """Every (method, per-head weight) row one group is scored on: nothing, each selection, random-k draws."""
    rows: list[tuple[str, Tensor]] = []
    if "zero_shot" in methods:
        rows.append(("zero_shot", torch.zeros(info.n_layers, info.n_heads)))
    rows += [(method, sel.weights.float()) for method, sel in fixed.items()]
    if "random_k" in methods:
        for _ in range(n_random):
            perm = torch.randperm(info.n_layers * info.n_heads, generator=gen)[:k]
            w = torch.zeros(info.n_layers * info.n_heads)
            w[perm] = 1.0
            rows.append(("random_k", w.reshape(info.n_layers, info.n_heads)))
    return rows


@dataclass
class _Tally:
    """The comparison's table as it fills: accuracy and heads patched ``[task, method]``, random-k's spread."""

    index: dict[str, int]
    col: dict[str, int]
    acc: Float[Tensor, "task method"]
    n_sel: Float[Tensor, "task method"]
    rnd_std: Float[Tensor, " task"]

    @classmethod
    def empty(cls, task_list: Sequence[Any], methods: Sequence[str]) -> "_Tally":
        acc = torch.full((len(task_list), len(methods)), float("nan"), dtype=torch.float64)
        return cls({t.name: i for i, t in enumerate(task_list)}, {m: j for j, m in enumerate(methods)}, acc,
                   torch.full_like(acc, float("nan")), torch.full((len(task_list),), float("nan"), dtype=torch.float64))

    def record(self, idx: list[int], rows: Sequence[tuple[str, Tensor]], scores: Tensor, k: int) -> None:
        """One group's scores ``[row, task]``: each method's row, random-k as the mean over its draws."""
        for r, (method, w) in enumerate(rows):
            if method == "random_k":
                continue
            self.acc[idx, self.col[method]] = scores[r]
            if method != "zero_shot":
                self.n_sel[idx, self.col[method]] = float((w > 0.5).sum())
        draws = [scores[r] for r, (m, _) in enumerate(rows) if m == "random_k"]
        if draws:
            rr = torch.stack(draws)  # [draw, task]
            self.acc[idx, self.col["random_k"]] = rr.mean(0)
            self.rnd_std[idx] = rr.std(0, unbiased=False)
            self.n_sel[idx, self.col["random_k"]] = float(k)


def _icl_column(model: Any, task_list: Sequence[Any], tests: Mapping[str, Any], means: Tensor, tally: _Tally,
                notes: list[str], *, n_icl_prompts: int, n_shots: int, seed: int, max_memory: int | None, fast: Any,
                prompt_kw: Mapping[str, Any]) -> None:
    """ICL accuracy, nothing patched: each task's given ICL prompts (images ride with their rows), or
    ``n_icl_prompts`` ``n_shots``-shot prompts on the test split."""
    from ..inputs.text import evaluate_prompts, icl_prompts

    if not tests:
        for t in task_list:
            batch = icl_prompts(model, t, n_prompts=n_icl_prompts, n_shots=n_shots, seed=seed, split="test", **prompt_kw)
            tally.acc[tally.index[t.name], tally.col["icl"]] = evaluate_prompts(model, batch).first_token
        return
    zero = torch.zeros(1, *means.shape[1:3])
    for t in task_list:
        if tests[t.name].icl is None:
            continue
        i = tally.index[t.name]
        icl_obj = PatchObjective.from_batches(model, [tests[t.name].icl], means[i][None], max_memory=max_memory, fast=fast)
        tally.acc[i, tally.col["icl"]] = icl_obj.per_task(zero, "accuracy")[0, 0].double()
    if any(tests[t.name].icl is None for t in task_list):
        notes.append("ICL: NaN for tasks whose SweepPrompts carry no icl prompts")
