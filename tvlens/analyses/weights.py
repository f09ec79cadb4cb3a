"""Weight-space task vectors beside activation task vectors: Ilharco et al. 2023's experiments on tvlens tasks.

Every experiment fine-tunes (:func:`tvlens.vectors.finetune.finetune`) on train-split prompts,
chooses ``λ`` on the **dev** split and reports on held-out **test** queries; accuracy is the
first answer token at the final separator, as everywhere in tvlens.

- :func:`weight_addition` — Ilharco et al. 2023, §4: one model ``θ + λ Σ_i τ_i`` for several tasks,
  scored by *normalised accuracy* (each task's accuracy over that of its own fine-tune), with
  TIES / DARE merging through ``peft`` beside plain addition, and which task's answer the merged
  model gives when tasks share an input domain (zero-shot is then ambiguous by construction).
- :func:`weight_negation` — §3: ``θ − λτ_A`` with ``λ`` the one that lowers task A's dev accuracy
  most while control tasks keep ≥ ``keep`` (95%) of their dev accuracy.
- :func:`weight_analogy` — §5: is the vector of a composed task (``french_spanish`` = french→english
  then english→spanish) approximated by combining its parts: ``τ_A + τ_B``, or the analogy
  ``τ_B + (τ_A − τ_identity)``?
- :func:`weights_vs_activations` — on the same tasks: ``θ + λτ_A`` against Hendel et al. 2023's task
  vector and Todd et al. 2024's function vector at their dev-best layer, and the cosine of A's
  activation task vector in ``θ`` and in ``θ + τ_A``.
- :func:`peft_comparison` — task vectors as parameter-efficient fine-tuning: zero-shot accuracy
  against trained parameters for the free activation task vector, soft per-head weights
  (:func:`tvlens.soft_select`, one α per head), LoRA at several ranks and full fine-tuning.

Each returns a frozen result with ``.plot()``, ``.to_frame()``, ``.to_html(path)``, ``.save(path)``
and ``.load(path, model=...)``. The task vectors come from ``vectors`` ({task: WeightVector}) or are
fine-tuned with ``finetune_kw`` (its ``seed`` seeds the fine-tune; the experiment's ``seed`` the
evaluation prompts), and with ``cache=`` a folder keeps them between calls (:func:`weight_vectors`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..results import ResultMeta, Tabular, load_result, save_tensors
from ..vocabulary import N_PROMPTS
from ..vectors.weights import WeightVector, _figure_page, applied, merge, weighted_sum

__all__ = [
    "COMPOSED_TASKS",
    "AdditionResult",
    "NegationResult",
    "AnalogyResult",
    "WeightsVsActivations",
    "PeftComparison",
    "weight_vectors",
    "weight_addition",
    "weight_negation",
    "weight_analogy",
    "weights_vs_activations",
    "peft_comparison",
]

#: Shipped tasks that are compositions of two others: name -> (first, second), task = second(first(x)).
COMPOSED_TASKS: dict[str, tuple[str, str]] = {
    "french_spanish": ("french_english", "english_spanish"),
    "german_french": ("german_english", "english_french"),
    "italian_german": ("italian_english", "english_german"),
    "spanish_italian": ("spanish_english", "english_italian"),
    "capital_continent": ("capital_country", "country_continent"),
    "past_to_participle": ("past_to_present", "present_participle"),
}
_ADD_LAMS = tuple(round(0.1 * i, 2) for i in range(1, 11))
_NEG_LAMS = (0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0, 4.0)
_ANALOGY_LAMS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0)
_WEIGHT_LAMS = (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)


# ==============================================================================================
# shared plumbing


@dataclass(frozen=True, eq=False)
class _Result(Tabular):
    """Generic storage for the results below: tensor fields in safetensors, the rest in JSON; each
    result's table is its :meth:`records` (:meth:`to_frame` as a DataFrame)."""

    def _title(self) -> str:
        return type(self).__name__

    def to_html(self, path: str | Path) -> Path:
        """A standalone page: the figure (plotly embedded) and the table."""
        return _figure_page(path, self.plot(), self.to_frame(), self._title())

    def save(self, path: str | Path) -> Path:
        tensors, rest = {}, {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, Tensor):
                tensors[f.name] = v
            elif f.name != "meta":
                rest[f.name] = v
        return save_tensors(path, tensors, {"kind": type(self).__name__, "fields": rest, "meta": self.meta.to_dict()})

    @classmethod
    def load(cls, path: str | Path, model: Any = None):
        """Load a saved result; with ``model``, refuse one computed on another model."""
        tensors, meta = load_result(path, cls.__name__, model=model)
        kw = {k: _tuples(v) for k, v in meta.get("fields", {}).items()}
        return cls(**kw, **tensors, meta=ResultMeta.from_dict(meta.get("meta", {})))


def _tuples(v: Any) -> Any:
    if isinstance(v, list):
        return tuple(_tuples(x) for x in v)
    if isinstance(v, dict):
        return {k: _tuples(x) for k, x in v.items()}
    return v


def _resolve(tasks: Any, minimum: int = 1, what: str = "this experiment") -> list[Any]:
    from ..tasks import resolve_tasks

    out = resolve_tasks(tasks)
    if len(out) < minimum:
        raise ValueError(f"{what} needs at least {minimum} tasks, got {[t.name for t in out]}; pass more task names")
    return out


def _lams(lams: Sequence[float] | None, default: Sequence[float]) -> tuple[float, ...]:
    values = tuple(default if lams is None else lams)
    if not values:
        raise ValueError("lams is empty; pass the λ values to choose from on the dev split, e.g. (0.5, 1.0)")
    for x in values:
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not math.isfinite(float(x)):
            raise ValueError(f"every λ must be a finite number, got {x!r}; pass e.g. lams=(0.25, 0.5, 1.0)")
    return tuple(float(x) for x in values)


def _n_queries(task: Any, split: str) -> int:
    return len({x for x, _ in task.split(split)})


def _accuracy(model: Any, task: Any, *, n_shots: int, split: str, n_prompts: int, seed: int) -> float:
    """First-token accuracy on ``split``; zero-shot prompts use each distinct query once."""
    from ..inputs.text import evaluate_icl

    n = min(n_prompts, _n_queries(task, split)) if n_shots == 0 else n_prompts
    return evaluate_icl(model, task, n_shots, n_prompts=n, split=split, seed=seed).first_token


def _accuracies(model: Any, tasks: Sequence[Any], **kw: Any) -> list[float]:
    return [_accuracy(model, t, **kw) for t in tasks]


def _cache_path(cache: Path, task: Any, finetune_kw: Mapping[str, Any]) -> Path:
    key = json.dumps({k: finetune_kw[k] for k in sorted(finetune_kw)}, default=str, sort_keys=True)
    digest = hashlib.sha256(f"{task.name}|{task.pairs}|{key}".encode()).hexdigest()[:10]
    return cache / f"{task.name}-{finetune_kw.get('method', 'full')}-{digest}"


def weight_vectors(model: Any, tasks: Any, *, vectors: Mapping[str, WeightVector] | None = None,
                   cache: str | Path | None = None, progress: bool = True, **finetune_kw: Any) -> dict[str, WeightVector]:
    """``{task: τ_task}``: the given ``vectors``, and for every other task one fine-tune of a copy of
    ``model`` (:func:`tvlens.vectors.finetune.finetune` with ``finetune_kw``).

    ``cache``: a folder where each fine-tuned vector is saved (named by task and a hash of the
    task's pairs and ``finetune_kw``) and loaded from on the next call with the same settings; a
    file made on another base model is refused.
    """
    from ..results import check_writable
    from ..vectors.finetune import finetune

    task_list = tasks if isinstance(tasks, (list, tuple)) and all(hasattr(t, "pairs") for t in tasks) else _resolve(tasks)
    out = dict(vectors or {})
    for v in out.values():
        if not isinstance(v, WeightVector):
            raise TypeError(f"vectors must map task names to WeightVectors, got {type(v).__name__}")
        v.check_model(model)
    folder = check_writable(Path(cache)) if cache is not None else None
    for t in task_list:
        if t.name in out:
            continue
        path = _cache_path(folder, t, finetune_kw) if folder is not None else None
        if path is not None and path.with_suffix(".json").exists():
            out[t.name] = WeightVector.load(path, model=model)
            continue
        out[t.name] = finetune(model, t, progress=progress, **finetune_kw).vector
        if path is not None:
            out[t.name].save(path)
    return out


def _choose(curve: Sequence[float], lams: Sequence[float]) -> float:
    """The λ with the highest dev score (the smallest on ties)."""
    best = max(curve)
    return lams[list(curve).index(best)]


# ==============================================================================================
# addition (Ilharco et al. 2023, §4)


@dataclass(frozen=True, eq=False)
class AdditionResult(_Result):
    """Multi-task models ``θ + λ · merge(τ_1 ... τ_n)``, one per merge method (Ilharco et al. 2023, §4).

    - ``base`` / ``finetuned``: ``[task]`` zero-shot test accuracy of ``θ`` and of each task's own
      fine-tune ``θ + τ_i``;
    - ``merged``: ``[method, task]`` zero-shot test accuracy of the merged model at ``lams[m]``;
    - ``normalized``: ``merged / finetuned`` (Ilharco et al.'s normalised accuracy);
    - ``dev_curve``: ``[method, lam, task]`` dev normalised accuracy, from which ``λ`` was chosen;
    - ``answered_as``: ``[method, task, answer_task]`` fraction of ``task``'s test queries the merged
      model answers with ``answer_task``'s answer (NaN where that task does not take the query);
      ``answer_tasks`` are ``tasks`` then the suite's other tasks sharing one of their input domains:
      off the diagonal, the tasks that win when inputs are shared.
    """

    tasks: tuple[str, ...]
    domains: tuple[str, ...]
    methods: tuple[str, ...]
    lams: tuple[float, ...]
    grid: tuple[float, ...]
    base: Float[Tensor, " task"]
    finetuned: Float[Tensor, " task"]
    merged: Float[Tensor, "method task"]
    normalized: Float[Tensor, "method task"]
    dev_curve: Float[Tensor, "method lam task"]
    answered_as: Float[Tensor, "method task answer_task"]
    answer_tasks: tuple[str, ...] = ()
    meta: ResultMeta = field(default_factory=ResultMeta)

    def _title(self) -> str:
        return f"Task addition over {len(self.tasks)} tasks ({self.meta.model})"

    def summary(self) -> dict[str, float]:
        """Mean normalised accuracy per method."""
        return {m: float(self.normalized[i].mean()) for i, m in enumerate(self.methods)}

    @property
    def normalized_capped(self) -> Float[Tensor, "method task"]:
        """Normalised accuracy capped at 1: a merged model beating a weak own fine-tune earns no credit
        that could hide another task's loss in the mean."""
        return self.normalized.clamp(max=1.0)

    def _top_other(self, i: int, j: int) -> tuple[str, float]:
        """The other task whose answers the merged model gives most often on ``tasks[j]``'s queries."""
        row = [(float(v), name) for k, (v, name) in enumerate(zip(self.answered_as[i, j].tolist(), self.answer_tasks))
               if k != j and not math.isnan(v)]
        return (max(row)[1], max(row)[0]) if row and max(row)[0] > 0 else ("", 0.0)

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for i, m in enumerate(self.methods):
            for j, t in enumerate(self.tasks):
                other, frac = self._top_other(i, j)
                rows.append(dict(method=m, lam=self.lams[i], task=t, domain=self.domains[j], base=float(self.base[j]),
                                 finetuned=float(self.finetuned[j]), merged=float(self.merged[i, j]),
                                 normalized=float(self.normalized[i, j]), answered_as=other, answered_as_frac=frac))
            rows.append(dict(method=m, lam=self.lams[i], task="mean", domain="", base=float(self.base.mean()),
                             finetuned=float(self.finetuned.mean()), merged=float(self.merged[i].mean()),
                             normalized=float(self.normalized[i].mean()),
                             answered_as=f"capped mean {float(self.normalized_capped[i].mean()):.3f}"))
        return rows

    def plot(self, *, title: str | None = None) -> Any:
        from ..plot import bar_plot

        series = {f"{m} (λ={self.lams[i]:g})": self.normalized[i] for i, m in enumerate(self.methods)}
        return bar_plot(list(self.tasks), series, title=title or self._title(), ylabel="normalised accuracy",
                        hlines={"80%": 0.8})


def _answer_ids(model: Any, task: Any, queries: Sequence[str]) -> list[set[int] | None]:
    """The first tokens of every answer ``task`` accepts for each query (None where it does not take
    the query): the same accepted-answer rule as every tvlens metric (:func:`tvlens.metrics.accepted_ids`)."""
    from ..inputs.text import icl_prompts
    from ..metrics import accepted_ids

    table = task.as_dict()
    known = [q for q in queries if q in table]
    ids: dict[str, set[int]] = {}
    if known:
        b = icl_prompts(model, task, queries=known, n_shots=0)  # by input: every accepted answer comes along
        ids = {q: set(row) for q, row in zip(known, accepted_ids(b).tolist())}
    return [ids.get(q) for q in queries]


def _answer_tasks(task_list: Sequence[Any]) -> list[Any]:
    """``task_list`` then every other shipped task sharing one of their input domains."""
    from ..tasks import list_tasks, load_task

    names, domains = {t.name for t in task_list}, {t.domain for t in task_list if t.domain}
    others = [load_task(n) for n in list_tasks() if n not in names]
    return [*task_list, *(t for t in others if t.domain in domains)]


def _answered_as(model: Any, task_list: Sequence[Any], answer_tasks: Sequence[Any], seed: int, n_prompts: int) -> Tensor:
    """``[task, answer_task]``: fraction of ``task``'s test queries answered with ``answer_task``'s answer."""
    from ..inputs.text import final_logits, icl_prompts

    out = torch.full((len(task_list), len(answer_tasks)), float("nan"))
    for i, t in enumerate(task_list):
        b = icl_prompts(model, t, n_prompts=min(n_prompts, _n_queries(t, "test")), n_shots=0, split="test", seed=seed)
        pred = final_logits(model, b).argmax(-1).tolist()
        for j, u in enumerate(answer_tasks):
            ids = _answer_ids(model, u, b.queries)
            pairs = [(p, a) for p, a in zip(pred, ids) if a is not None]
            if pairs:
                out[i, j] = sum(p in a for p, a in pairs) / len(pairs)
    return out


def _merged_vector(model: Any, vs: Sequence[WeightVector], method: str, density: float, seed: int) -> WeightVector:
    if method == "task_arithmetic":
        return weighted_sum(vs, [1.0] * len(vs))
    use_adapters = all(v.lora for v in vs)
    return merge(vs, method, density=density, seed=seed, model=model if use_adapters else None)


def weight_addition(
    model: Any,
    tasks: Any,
    *,
    vectors: Mapping[str, WeightVector] | None = None,
    cache: str | Path | None = None,
    methods: Sequence[str] = ("task_arithmetic", "ties", "dare_ties"),
    lams: Sequence[float] | None = None,
    density: float = 0.5,
    n_prompts: int = 50,
    seed: int = 0,
    progress: bool = True,
    finetune_kw: Mapping[str, Any] | None = None,
) -> AdditionResult:
    """Ilharco et al. 2023, §4 (addition): one model ``θ + λ · merge(τ_1, ..., τ_n)`` for all ``tasks``.

    ``"task_arithmetic"`` is the plain sum ``Σ τ_i``; other methods merge through ``peft``
    (:func:`tvlens.vectors.weights.merge`: ``peft.utils.merge_utils`` for dense deltas, and
    ``add_weighted_adapter`` when every vector is a LoRA vector, e.g. ``"ties_svd"``, ``"cat"``).
    For each method ``λ`` is chosen from ``lams`` (default 0.1 ... 1.0, as in the paper) to maximise the
    mean normalised accuracy on the dev split; the test split is reported. Vectors missing from
    ``vectors`` are fine-tuned with ``finetune_kw``.
    """
    task_list = _resolve(tasks, 2, "task addition")
    grid = _lams(lams, _ADD_LAMS)
    methods = tuple(methods)
    if not methods:
        raise ValueError("methods is empty; pass e.g. ('task_arithmetic', 'ties')")
    vecs = weight_vectors(model, task_list, vectors=vectors, cache=cache, progress=progress, **dict(finetune_kw or {}))
    vs = [vecs[t.name] for t in task_list]
    merged_vs = [_merged_vector(model, vs, m, density, seed) for m in methods]  # bad merges fail before evaluation
    answer_tasks = _answer_tasks(task_list)
    kw = dict(n_shots=0, n_prompts=n_prompts, seed=seed)
    base = _accuracies(model, task_list, split="test", **kw)
    own_dev, own_test = [], []
    for t, v in zip(task_list, vs):
        with applied(model, v):
            own_dev.append(_accuracy(model, t, split="dev", **kw))
            own_test.append(_accuracy(model, t, split="test", **kw))
    own_dev_t = torch.tensor(own_dev).clamp_min(1e-6)
    curves, chosen, merged, answered = [], [], [], []
    for mv in merged_vs:
        curve = []
        for lam in grid:
            with applied(model, mv, lam):
                curve.append(torch.tensor(_accuracies(model, task_list, split="dev", **kw)) / own_dev_t)
        lam = _choose([float(c.mean()) for c in curve], grid)
        with applied(model, mv, lam):
            merged.append(_accuracies(model, task_list, split="test", **kw))
            answered.append(_answered_as(model, task_list, answer_tasks, seed, n_prompts))
        curves.append(torch.stack(curve))
        chosen.append(lam)
    merged_t = torch.tensor(merged)
    ft = torch.tensor(own_test)
    meta = ResultMeta.for_model(model, tasks=[t.name for t in task_list], seed=seed, density=density,
                                finetune=dict(finetune_kw or {}), protocol="ilharco2023 §4")
    return AdditionResult(tasks=tuple(t.name for t in task_list), domains=tuple(t.domain for t in task_list),
                          methods=methods, lams=tuple(chosen), grid=grid, base=torch.tensor(base), finetuned=ft,
                          merged=merged_t, normalized=merged_t / ft.clamp_min(1e-6), dev_curve=torch.stack(curves),
                          answered_as=torch.stack(answered), answer_tasks=tuple(t.name for t in answer_tasks), meta=meta)


# ==============================================================================================
# negation (Ilharco et al. 2023, §3)


@dataclass(frozen=True, eq=False)
class NegationResult(_Result):
    """``θ − λτ_A`` per target task A (Ilharco et al. 2023, §3), ``n_shots``-shot ICL accuracy on test.

    - ``target_before`` / ``target_after``: ``[task]`` accuracy of A before and after negation;
    - ``control_before`` / ``control_after``: ``[task]`` mean accuracy of A's control tasks (the
      other tasks, minus those sharing A's input domain, which are reported as ``shared_*``);
    - ``lams``: the λ chosen on dev (largest drop of A with controls ≥ ``keep`` of their accuracy;
      0 when no λ keeps them).
    """

    tasks: tuple[str, ...]
    families: tuple[str, ...]
    controls: tuple[tuple[str, ...], ...]
    lams: tuple[float, ...]
    grid: tuple[float, ...]
    keep: float
    n_shots: int
    target_before: Float[Tensor, " task"]
    target_after: Float[Tensor, " task"]
    control_before: Float[Tensor, " task"]
    control_after: Float[Tensor, " task"]
    shared_before: Float[Tensor, " task"]
    shared_after: Float[Tensor, " task"]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def _title(self) -> str:
        return f"Task negation, {self.n_shots}-shot accuracy ({self.meta.model})"

    @property
    def kept(self) -> Float[Tensor, " task"]:
        """Fraction of the controls' accuracy kept, per target."""
        return self.control_after / self.control_before.clamp_min(1e-6)

    @property
    def drop(self) -> Float[Tensor, " task"]:
        """Drop of the target's accuracy, in accuracy points (0..1)."""
        return self.target_before - self.target_after

    def summary(self) -> dict[str, float]:
        return dict(target_before=float(self.target_before.mean()), target_after=float(self.target_after.mean()),
                    drop=float(self.drop.mean()), control_before=float(self.control_before.mean()),
                    control_after=float(self.control_after.mean()), kept=float(self.kept.mean()))

    def records(self) -> list[dict[str, Any]]:
        rows = [dict(task=t, family=self.families[i], lam=self.lams[i], target_before=float(self.target_before[i]),
                     target_after=float(self.target_after[i]), drop=float(self.drop[i]),
                     control_before=float(self.control_before[i]), control_after=float(self.control_after[i]),
                     kept=float(self.kept[i]), shared_before=float(self.shared_before[i]),
                     shared_after=float(self.shared_after[i]), n_controls=len(self.controls[i]))
                for i, t in enumerate(self.tasks)]
        s = self.summary()
        rows.append(dict(task="mean", family="", lam=float("nan"), **{k: s[k] for k in
                    ("target_before", "target_after", "drop", "control_before", "control_after", "kept")},
                         shared_before=float(self.shared_before.nanmean()), shared_after=float(self.shared_after.nanmean()),
                         n_controls=float("nan")))
        return rows

    def plot(self, *, title: str | None = None) -> Any:
        from ..plot import bar_plot

        series = {"target before": self.target_before, "target after": self.target_after,
                  "controls before": self.control_before, "controls after": self.control_after}
        return bar_plot(list(self.tasks), series, title=title or self._title(), ylabel=f"{self.n_shots}-shot accuracy")


def _negation_lam(model: Any, target: Any, v: WeightVector, controls: Sequence[Any], grid: Sequence[float], keep: float,
                  kw: Mapping[str, Any]) -> float:
    """Ilharco et al. 2023, §3: the λ giving the lowest dev target accuracy with controls ≥ ``keep`` of theirs."""
    base_ctrl = sum(_accuracies(model, controls, split="dev", **kw)) / max(1, len(controls))
    best, best_acc = 0.0, _accuracy(model, target, split="dev", **kw)
    for lam in grid:
        with applied(model, v, -lam):
            ctrl = sum(_accuracies(model, controls, split="dev", **kw)) / max(1, len(controls))
            if controls and ctrl < keep * base_ctrl:
                continue
            acc = _accuracy(model, target, split="dev", **kw)
        if acc < best_acc:
            best, best_acc = lam, acc
    return best


def weight_negation(
    model: Any,
    tasks: Any,
    *,
    controls: Any = None,
    vectors: Mapping[str, WeightVector] | None = None,
    cache: str | Path | None = None,
    lams: Sequence[float] | None = None,
    keep: float = 0.95,
    n_shots: int = 5,
    n_prompts: int = N_PROMPTS,
    seed: int = 0,
    progress: bool = True,
    finetune_kw: Mapping[str, Any] | None = None,
) -> NegationResult:
    """Ilharco et al. 2023, §3 (negation): subtract ``λτ_A`` to make the model *forget* task A.

    For each target A: ``λ`` from ``lams`` is the one that lowers A's dev ``n_shots``-shot accuracy most
    while the control tasks keep ≥ ``keep`` of their dev accuracy. Controls are ``controls`` if given,
    else the other ``tasks`` whose input domain differs from A's (tasks sharing A's inputs are
    reported apart, as ``shared_*``). Test accuracies before and after are reported.
    """
    task_list = _resolve(tasks, 2, "task negation")
    grid = _lams(lams, _NEG_LAMS)
    if isinstance(keep, bool) or not isinstance(keep, (int, float)) or not 0.0 < float(keep) <= 1.0:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}; Ilharco et al. keep 95% of control accuracy (0.95)")
    fixed = _resolve(controls) if controls is not None else None
    vecs = weight_vectors(model, task_list, vectors=vectors, cache=cache, progress=progress, **dict(finetune_kw or {}))
    kw = dict(n_shots=n_shots, n_prompts=n_prompts, seed=seed)
    cols: dict[str, list] = {k: [] for k in ("lam", "tb", "ta", "cb", "ca", "sb", "sa", "ctrl")}
    for t in task_list:
        ctrl = fixed if fixed is not None else [u for u in task_list if u.name != t.name and u.domain != t.domain]
        ctrl = [u for u in ctrl if u.name != t.name]
        shared = [u for u in task_list if u.name != t.name and u.domain == t.domain]
        lam = _negation_lam(model, t, vecs[t.name], ctrl, grid, float(keep), kw)
        before = _accuracies(model, [t, *ctrl, *shared], split="test", **kw)
        with applied(model, vecs[t.name], -lam):
            after = _accuracies(model, [t, *ctrl, *shared], split="test", **kw)
        k = 1 + len(ctrl)
        cols["lam"].append(lam)
        cols["ctrl"].append(tuple(u.name for u in ctrl))
        for key, vals in (("b", before), ("a", after)):
            cols["t" + key].append(vals[0])
            cols["c" + key].append(sum(vals[1:k]) / max(1, len(ctrl)))
            cols["s" + key].append(sum(vals[k:]) / len(shared) if shared else float("nan"))
    meta = ResultMeta.for_model(model, tasks=[t.name for t in task_list], seed=seed, n_prompts=n_prompts,
                                finetune=dict(finetune_kw or {}), protocol="ilharco2023 §3")
    T = torch.tensor
    return NegationResult(tasks=tuple(t.name for t in task_list), families=tuple(t.family for t in task_list),
                          controls=tuple(cols["ctrl"]), lams=tuple(cols["lam"]), grid=grid, keep=float(keep), n_shots=n_shots,
                          target_before=T(cols["tb"]), target_after=T(cols["ta"]), control_before=T(cols["cb"]),
                          control_after=T(cols["ca"]), shared_before=T(cols["sb"]), shared_after=T(cols["sa"]), meta=meta)


# ==============================================================================================
# analogy (Ilharco et al. 2023, §5)


@dataclass(frozen=True, eq=False)
class AnalogyResult(_Result):
    """Composed tasks C = second ∘ first against combinations of their parts' vectors (Ilharco et al. 2023, §5).

    ``candidates``: ``"own"`` (τ_C, fine-tuned on C itself), ``"sum"`` (τ_first + τ_second),
    ``"analogy"`` (τ_second + (τ_first − τ_identity), identity = copying the middle domain),
    ``"first"`` / ``"second"`` (one part alone). ``accuracy``: ``[task, candidate]`` zero-shot test
    accuracy of C at the dev-chosen ``lams[task][candidate]``; ``cosine``: ``[task, candidate]``
    cosine of the candidate with τ_C; ``base``: ``[task]`` zero-shot accuracy of θ.
    """

    tasks: tuple[str, ...]
    parts: tuple[tuple[str, str], ...]
    candidates: tuple[str, ...]
    lams: tuple[tuple[float, ...], ...]
    base: Float[Tensor, " task"]
    accuracy: Float[Tensor, "task candidate"]
    cosine: Float[Tensor, "task candidate"]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def _title(self) -> str:
        return f"Task analogies for composed tasks ({self.meta.model})"

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for i, t in enumerate(self.tasks):
            row: dict[str, Any] = dict(task=t, first_task=self.parts[i][0], second_task=self.parts[i][1],
                                       base=float(self.base[i]))
            for j, c in enumerate(self.candidates):
                row[c] = float(self.accuracy[i, j])
                row[f"lam_{c}"] = self.lams[i][j]
                row[f"cos_{c}"] = float(self.cosine[i, j])
            rows.append(row)
        return rows

    def plot(self, *, title: str | None = None) -> Any:
        from ..plot import bar_plot

        series = {"θ": self.base, **{c: self.accuracy[:, j] for j, c in enumerate(self.candidates)}}
        return bar_plot(list(self.tasks), series, title=title or self._title(), ylabel="zero-shot accuracy")


def _identity_task(task: Any) -> Any:
    """Copying the inputs of ``task`` (``x → x``): the identity on the middle domain of a composition."""
    from ..tasks import Task

    return Task(name=f"identity_{task.domain or task.name}", family="custom", instruction="Repeat the word.",
                pairs=tuple((x, x) for x in task.inputs), domain=task.domain)


def _check_composed(name: str, first: Any, second: Any, composed: Any) -> None:
    table_b = second.as_dict()
    comp = {x: table_b[y] for x, y in first.as_dict().items() if y in table_b}
    agree = sum(comp.get(x) == y for x, y in composed.pairs)
    if agree < 0.8 * len(composed.pairs):
        raise ValueError(f"{name!r} is not the composition {first.name} then {second.name} on this data ({agree} of "
                         f"{len(composed.pairs)} pairs agree); pass composed={{name: (first, second)}} with its real parts")


def weight_analogy(
    model: Any,
    composed: Sequence[str] | Mapping[str, tuple[str, str]] = ("french_spanish", "german_french", "italian_german",
                                                               "spanish_italian", "capital_continent", "past_to_participle"),
    *,
    vectors: Mapping[str, WeightVector] | None = None,
    cache: str | Path | None = None,
    lams: Sequence[float] | None = None,
    n_prompts: int = 50,
    seed: int = 0,
    progress: bool = True,
    finetune_kw: Mapping[str, Any] | None = None,
) -> AnalogyResult:
    """Ilharco et al. 2023, §5 (analogies) on composed tasks: is ``τ_C`` of ``C = second ∘ first``
    (``french_spanish`` = ``english_spanish`` after ``french_english``) approximated by its parts?

    Candidates: ``τ_first + τ_second``; the analogy ``τ_second + (τ_first − τ_id)`` ("french→spanish
    is to english→spanish as french→english is to english→english", ``id`` the identity on the
    second task's inputs, fine-tuned like the others); each part alone; and ``τ_C`` itself. ``λ``
    per candidate on dev, zero-shot accuracy of C on test, and the cosine with ``τ_C``.
    """
    from ..tasks import load_task

    pairs = dict(composed) if isinstance(composed, Mapping) else {}
    names = list(composed)
    for n in names:
        if n not in pairs:
            if n not in COMPOSED_TASKS:
                raise ValueError(f"{n!r} is not a known composed task; use one of {', '.join(COMPOSED_TASKS)} "
                                 "or pass composed={name: (first, second)}")
            pairs[n] = COMPOSED_TASKS[n]
    if not names:
        raise ValueError(f"composed is empty; pass names from {', '.join(COMPOSED_TASKS)}")
    grid = _lams(lams, _ANALOGY_LAMS)
    triples = []
    for n in names:
        c, a, b = load_task(n), load_task(pairs[n][0]), load_task(pairs[n][1])
        _check_composed(n, a, b, c)
        triples.append((c, a, b, _identity_task(b)))
    needed = list({t.name: t for tr in triples for t in tr}.values())
    vecs = weight_vectors(model, needed, vectors=vectors, cache=cache, progress=progress, **dict(finetune_kw or {}))
    kw = dict(n_shots=0, n_prompts=n_prompts, seed=seed)
    candidates = ("own", "sum", "analogy", "first", "second")
    acc, cos, chosen, base = [], [], [], []
    for c, a, b, ident in triples:
        tc, ta, tb, ti = vecs[c.name], vecs[a.name], vecs[b.name], vecs[ident.name]
        cands = dict(own=tc, sum=ta + tb, analogy=tb + (ta - ti), first=ta, second=tb)
        row_acc, row_lam = [], []
        for key in candidates:
            curve = []
            for lam in grid:
                with applied(model, cands[key], lam):
                    curve.append(_accuracy(model, c, split="dev", **kw))
            lam = _choose(curve, grid)
            with applied(model, cands[key], lam):
                row_acc.append(_accuracy(model, c, split="test", **kw))
            row_lam.append(lam)
        base.append(_accuracy(model, c, split="test", **kw))
        acc.append(row_acc)
        chosen.append(tuple(row_lam))
        cos.append([tc.cosine(cands[key]) for key in candidates])
    meta = ResultMeta.for_model(model, tasks=names, seed=seed, finetune=dict(finetune_kw or {}), grid=list(grid),
                                protocol="ilharco2023 §5")
    return AnalogyResult(tasks=tuple(names), parts=tuple(tuple(pairs[n]) for n in names), candidates=candidates,
                         lams=tuple(chosen), base=torch.tensor(base), accuracy=torch.tensor(acc), cosine=torch.tensor(cos),
                         meta=meta)


# ==============================================================================================
# weights vs activations


@dataclass(frozen=True, eq=False)
class WeightsVsActivations(_Result):
    """Weight and activation task vectors of the same tasks, zero-shot test accuracy.

    ``zero_shot``, ``weights`` (``θ + λτ_A``, λ on dev), ``task_vector`` (Hendel et al. 2023 at the
    task's dev-best layer), ``function_vector`` (Todd et al. 2024, added at its dev-best layer),
    ``icl`` (``n_shots``-shot, same queries): ``[task]``. ``tv_cosine``: ``[task]`` cosine of A's
    activation task vector (best layer) extracted in ``θ`` and in ``θ + τ_A``; ``tv_norm_ratio`` their
    norm ratio; ``tv_finetuned``: accuracy of the task vector extracted from ``θ + τ_A`` patched into ``θ``.
    """

    tasks: tuple[str, ...]
    families: tuple[str, ...]
    lams: tuple[float, ...]
    tv_layers: tuple[int, ...]
    fv_layers: tuple[int, ...]
    zero_shot: Float[Tensor, " task"]
    weights: Float[Tensor, " task"]
    task_vector: Float[Tensor, " task"]
    function_vector: Float[Tensor, " task"]
    icl: Float[Tensor, " task"]
    tv_cosine: Float[Tensor, " task"]
    tv_norm_ratio: Float[Tensor, " task"]
    tv_finetuned: Float[Tensor, " task"]
    meta: ResultMeta = field(default_factory=ResultMeta)

    _COLUMNS = ("zero_shot", "weights", "task_vector", "function_vector", "icl", "tv_finetuned")

    def _title(self) -> str:
        return f"Weight vs activation task vectors ({self.meta.model})"

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for i, t in enumerate(self.tasks):
            row: dict[str, Any] = dict(task=t, family=self.families[i], lam=self.lams[i], tv_layer=self.tv_layers[i],
                                       fv_layer=self.fv_layers[i])
            row.update({c: float(getattr(self, c)[i]) for c in self._COLUMNS})
            row.update(tv_cosine=float(self.tv_cosine[i]), tv_norm_ratio=float(self.tv_norm_ratio[i]))
            rows.append(row)
        mean = dict(task="mean", family="", lam=float("nan"), tv_layer=float("nan"), fv_layer=float("nan"))
        mean.update({c: float(getattr(self, c).mean()) for c in (*self._COLUMNS, "tv_cosine", "tv_norm_ratio")})
        return [*rows, mean]

    def plot(self, *, title: str | None = None) -> Any:
        from ..plot import bar_plot

        labels = {"zero_shot": "θ zero-shot", "weights": "θ + λτ (weights)", "task_vector": "task vector (Hendel)",
                  "function_vector": "function vector (Todd)", "icl": "ICL"}
        return bar_plot(list(self.tasks), {v: getattr(self, k) for k, v in labels.items()}, title=title or self._title(),
                        ylabel="zero-shot accuracy (test)")


def _weight_lam(model: Any, task: Any, v: WeightVector, grid: Sequence[float], kw: Mapping[str, Any]) -> tuple[float, float]:
    """λ chosen on dev for ``θ + λτ`` on ``task``; returns (λ, test accuracy)."""
    curve = []
    for lam in grid:
        with applied(model, v, lam):
            curve.append(_accuracy(model, task, split="dev", **kw))
    lam = _choose(curve, grid)
    with applied(model, v, lam):
        return lam, _accuracy(model, task, split="test", **kw)


def weights_vs_activations(
    model: Any,
    tasks: Any,
    *,
    vectors: Mapping[str, WeightVector] | None = None,
    cache: str | Path | None = None,
    lams: Sequence[float] | None = None,
    n_prompts: int = 50,
    n_shots: int = 5,
    seed: int = 0,
    progress: bool = True,
    finetune_kw: Mapping[str, Any] | None = None,
    function_kw: Mapping[str, Any] | None = None,
) -> WeightsVsActivations:
    """On the same tasks: ``θ + λτ_A`` (Ilharco et al. 2023) against A's activation task vector (Hendel et
    al. 2023, :func:`tvlens.layer_sweep`) and function vector (Todd et al. 2024, ``kind="function"``) at
    their dev-best layers, all scored zero-shot on test; and whether the fine-tune moves the activation
    task vector: the cosine of A's task vector extracted in ``θ`` and in ``θ + τ_A``."""
    from ..vectors.activation import evaluate_vector, layer_sweep, task_vector

    task_list = _resolve(tasks)
    grid = _lams(lams, _WEIGHT_LAMS)
    vecs = weight_vectors(model, task_list, vectors=vectors, cache=cache, progress=progress, **dict(finetune_kw or {}))
    kw = dict(n_shots=0, n_prompts=n_prompts, seed=seed)
    tv = layer_sweep(model, task_list, n_prompts=n_prompts, n_shots=n_shots, seed=seed)
    fv = layer_sweep(model, task_list, n_prompts=n_prompts, n_shots=n_shots, seed=seed, kind="function",
                     function_kw=dict(function_kw or {}))
    tvl, fvl = tv.best_layers, fv.best_layers
    lam_list, w_acc, cosines, ratios, moved = [], [], [], [], []
    for t in task_list:
        lam, acc = _weight_lam(model, t, vecs[t.name], grid, kw)
        lam_list.append(lam)
        w_acc.append(acc)
        before = task_vector(model, t, layer=tvl[t.name], n_prompts=n_prompts, n_shots=n_shots, seed=seed)
        with applied(model, vecs[t.name]):
            after = task_vector(model, t, layer=tvl[t.name], n_prompts=n_prompts, n_shots=n_shots, seed=seed)
        cosines.append(float(torch.nn.functional.cosine_similarity(before.vector, after.vector, dim=0)))
        ratios.append(float(after.vector.norm() / before.vector.norm().clamp_min(1e-12)))
        moved.append(evaluate_vector(model, t, after, n_prompts=n_prompts, seed=seed))
    icl = [_accuracy(model, t, n_shots=n_shots, split="test", n_prompts=n_prompts, seed=seed) for t in task_list]
    meta = ResultMeta.for_model(model, tasks=[t.name for t in task_list], seed=seed, n_prompts=n_prompts, n_shots=n_shots,
                                finetune=dict(finetune_kw or {}), grid=list(grid))
    T = torch.tensor
    return WeightsVsActivations(tasks=tuple(t.name for t in task_list), families=tuple(t.family for t in task_list),
                                lams=tuple(lam_list), tv_layers=tuple(tvl[t.name] for t in task_list),
                                fv_layers=tuple(fvl[t.name] for t in task_list),
                                zero_shot=T(_accuracies(model, task_list, split="test", **kw)), weights=T(w_acc),
                                task_vector=tv.at_best(True).float(), function_vector=fv.at_best(True).float(), icl=T(icl),
                                tv_cosine=T(cosines), tv_norm_ratio=T(ratios), tv_finetuned=T(moved), meta=meta)


# ==============================================================================================
# task vectors as parameter-efficient fine-tuning


@dataclass(frozen=True, eq=False)
class PeftComparison(_Result):
    """Zero-shot test accuracy against trained parameters, on the same tasks and training prompts.

    ``methods``: ``zero_shot``, ``task_vector`` (Hendel et al. 2023: extracted, nothing trained),
    ``soft_heads`` (one α per head, :func:`tvlens.soft_select`), ``lora_r{r}`` (peft LoRA), ``full``.
    ``accuracy``: ``[method, task]``; ``n_trained``: ``[method]`` trained parameters per task;
    ``seconds``: ``[method]`` wall time per task (training + extraction).
    """

    tasks: tuple[str, ...]
    methods: tuple[str, ...]
    accuracy: Float[Tensor, "method task"]
    n_trained: Float[Tensor, " method"]
    seconds: Float[Tensor, " method"]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def _title(self) -> str:
        return f"Task vectors as parameter-efficient fine-tuning ({self.meta.model})"

    def records(self) -> list[dict[str, Any]]:
        rows = []
        for i, m in enumerate(self.methods):
            row: dict[str, Any] = dict(method=m, n_trained=int(self.n_trained[i]), mean=float(self.accuracy[i].mean()),
                                       seconds_per_task=float(self.seconds[i]))
            row.update({t: float(self.accuracy[i, j]) for j, t in enumerate(self.tasks)})
            rows.append(row)
        return rows

    def plot(self, *, title: str | None = None) -> Any:
        """Mean zero-shot accuracy against trained parameters (log axis; 0 drawn at 1)."""
        import plotly.graph_objects as go

        fig = go.Figure()
        x = [max(1.0, float(n)) for n in self.n_trained]
        y = self.accuracy.mean(1).tolist()
        where = ["top center" if k % 2 == 0 else "bottom center" for k in range(len(x))]  # neighbours' labels apart
        fig.add_trace(go.Scatter(x=x, y=y, mode="markers+text", text=list(self.methods), textposition=where,
                                 marker=dict(size=11), hovertemplate="%{text}: %{y:.3f} (%{x:.3g} params)<extra></extra>"))
        lora = [i for i, m in enumerate(self.methods) if m.startswith("lora")]
        if len(lora) > 1:
            fig.add_trace(go.Scatter(x=[x[i] for i in lora], y=[y[i] for i in lora], mode="lines", name="LoRA ranks"))
        fig.update_xaxes(type="log", title="trained parameters per task (0 drawn at 1)")
        fig.update_yaxes(title="zero-shot accuracy (test, mean over tasks)", range=[0, 1.15])
        fig.update_layout(template="plotly_white", width=820, height=480, showlegend=False,
                          title=dict(text=title or self._title(), x=0.5))
        return fig


def peft_comparison(
    model: Any,
    tasks: Any,
    *,
    ranks: Sequence[int] = (1, 2, 4, 8),
    steps: int = 150,
    n_train_prompts: int = 64,
    n_prompts: int = 50,
    n_shots: int = 5,
    seed: int = 0,
    full: bool = True,
    progress: bool = True,
    finetune_kw: Mapping[str, Any] | None = None,
    soft_kw: Mapping[str, Any] | None = None,
) -> PeftComparison:
    """Task vectors as parameter-efficient fine-tuning: per task, zero-shot test accuracy of the
    activation task vector (Hendel et al. 2023, free: extracted from ``n_train_prompts`` ``n_shots``-shot
    prompts, best layer on dev), soft per-head weights (:func:`tvlens.soft_select`: one α per head
    trained on ``n_train_prompts`` zero-shot train prompts), LoRA at ``ranks`` and full fine-tuning
    (``steps`` steps on ``n_train_prompts`` zero-shot train prompts, :func:`tvlens.vectors.finetune.finetune`).
    Every method is scored on up to ``n_prompts`` distinct test queries."""
    from ..analyses.selection import evaluate_heads, soft_select
    from ..models import ModelInfo
    from ..vectors.activation import evaluate_vector, layer_sweep
    from ..vectors.finetune import finetune

    task_list = _resolve(tasks)
    ranks = tuple(int(r) for r in ranks)
    if any(r < 1 for r in ranks):
        raise ValueError(f"LoRA ranks must be >= 1, got {ranks}; pass e.g. ranks=(1, 2, 4, 8)")
    info = ModelInfo.of(model)
    fkw = dict(steps=steps, n_prompts=n_train_prompts, seed=seed, progress=progress, **dict(finetune_kw or {}))
    kw = dict(n_shots=0, n_prompts=n_prompts, seed=seed)
    rows: dict[str, list[float]] = {}
    n_trained: dict[str, float] = {}
    secs: dict[str, float] = {}

    rows["zero_shot"], n_trained["zero_shot"], secs["zero_shot"] = _accuracies(model, task_list, split="test", **kw), 0, 0.0
    t0 = time.perf_counter()
    sweep = layer_sweep(model, task_list, n_prompts=n_train_prompts, n_shots=n_shots, seed=seed)
    rows["task_vector"] = [evaluate_vector(model, t, sweep.vector(t.name), n_prompts=n_prompts, seed=seed) for t in task_list]
    n_trained["task_vector"] = 0
    secs["task_vector"] = (time.perf_counter() - t0) / len(task_list)
    t0 = time.perf_counter()
    soft = []
    for t in task_list:
        sel = soft_select(model, [t], seed=seed, n_prompts=n_train_prompts, n_shots=n_shots, progress=progress,
                          **dict(soft_kw or {}))
        soft.append(float(evaluate_heads(model, [t], sel, split="test", n_prompts=min(n_prompts, _n_queries(t, "test")),
                                          seed=seed, n_shots=n_shots)[0, 0]))
    rows["soft_heads"], n_trained["soft_heads"] = soft, info.n_layers * info.n_heads
    secs["soft_heads"] = (time.perf_counter() - t0) / len(task_list)
    variants = [(f"lora_r{r}", dict(method="lora", rank=r)) for r in ranks] + ([("full", dict(method="full"))] if full else [])
    for name, extra in variants:
        accs, t0 = [], time.perf_counter()
        for t in task_list:
            ft = finetune(model, t, **{**fkw, **extra})
            accs.append(_accuracy(ft.model, t, split="test", **kw))
            n_trained[name] = ft.n_trained
        rows[name], secs[name] = accs, (time.perf_counter() - t0) / len(task_list)
    methods = tuple(rows)
    meta = ResultMeta.for_model(model, tasks=[t.name for t in task_list], seed=seed, steps=steps, n_prompts=n_prompts,
                                n_train_prompts=n_train_prompts, ranks=list(ranks), finetune=dict(finetune_kw or {}), soft=dict(soft_kw or {}))
    return PeftComparison(tasks=tuple(t.name for t in task_list), methods=methods,
                          accuracy=torch.tensor([rows[m] for m in methods], dtype=torch.float32),
                          n_trained=torch.tensor([float(n_trained[m]) for m in methods]),
                          seconds=torch.tensor([secs[m] for m in methods]), meta=meta)
