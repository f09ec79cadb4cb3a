"""Weight-space task vectors: τ = θ_ft − θ_base, their arithmetic, geometry, application and merging.

Ilharco et al. 2023 ("Editing Models with Task Arithmetic", §2): fine-tune a pre-trained model
``θ_pre`` on a task and take the element-wise difference ``τ = θ_ft − θ_pre``, a direction in
*weight* space. Adding ``λτ`` teaches the task (§4 addition: ``θ + λ Σ_i τ_i`` is one multi-task
model), subtracting it removes the behaviour (§3 negation: ``θ − λτ``), and analogies
``τ̂_D = τ_C + (τ_B − τ_A)`` help where data is scarce (§5). ``λ`` is chosen on held-out
validation data. tvlens's activation task vectors (:mod:`tvlens.vectors.activation`) live in the
residual stream instead; :mod:`tvlens.analyses.weights` compares the two on the same tasks.

A :class:`WeightVector` is a frozen set of per-parameter deltas keyed by the model's own parameter
names (``model.named_parameters()``), optionally with the LoRA factors they came from (Hu et al.
2022: ``ΔW = scaling · B A``, computed by ``peft``), plus a :class:`~tvlens.results.ResultMeta`
holding the base model's fingerprint and a digest of the base weights it applies to. Applying it
to a model with another fingerprint, other parameter names or shapes, or weights that are not
the base's (another vector already applied, say) is refused before anything is changed.

- arithmetic: ``a + b``, ``a - b``, ``-a``, ``2.0 * a``, ``a / 2``, :func:`mean`, :func:`analogy`;
- geometry: :meth:`WeightVector.norms`, :meth:`WeightVector.cosine`, :func:`geometry` (per layer,
  per module kind, per parameter) → :class:`WeightGeometry` with ``.plot()`` / ``.to_frame()``;
- application: :func:`applied` (a context manager that restores every weight bit for bit, also
  when the body raises) and :func:`apply` (a new model, the caller's untouched);
- merging beyond addition through ``peft`` (:func:`merge`): TIES (Yadav et al. 2023) and DARE
  (Yu et al. 2024) on dense deltas with ``peft.utils.merge_utils``, and on LoRA vectors with
  ``LoraModel.add_weighted_adapter`` (linear, cat, svd, TIES, DARE);
- ``save`` / ``load`` in safetensors + JSON, refused for another base model.
"""

from __future__ import annotations

import copy
import hashlib
import html as _html
import math
import re
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Iterable, Iterator, Mapping, Sequence

import torch
from jaxtyping import Float
from torch import Tensor

from ..results import ResultMeta, Saved, Tabular, WithMeta, atomic_write_text, check_same_model, load_result, save_tensors

__all__ = [
    "WeightVector",
    "WeightGeometry",
    "applied",
    "apply",
    "mean",
    "analogy",
    "weighted_sum",
    "geometry",
    "merge",
    "weights_digest",
    "parameter_group",
    "weights_applied",
    "apply_weights",
    "merge_weights",
    "weight_geometry",
    "KINDS",
    "TENSOR_MERGES",
    "ADAPTER_MERGES",
]

#: How a weight vector was made.
KINDS = ("full", "lora", "arithmetic", "merge", "custom")
#: Merges of dense deltas, one parameter at a time, by ``peft.utils.merge_utils``.
TENSOR_MERGES = ("task_arithmetic", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: Merges of LoRA vectors by ``peft``'s ``LoraModel.add_weighted_adapter``.
ADAPTER_MERGES = ("linear", "cat", "svd", "ties", "ties_svd", "dare_linear", "dare_ties", "dare_linear_svd",
                  "dare_ties_svd", "magnitude_prune", "magnitude_prune_svd")
_SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
_GROUPINGS = ("layer", "module", "layer_module", "parameter", "all")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|h|blocks|layer)\.(\d+)\.")
_SAMPLE = 4096


# ----------------------------------------------------------------------------------------------
# helpers


def _finite_scalar(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) and not (
            isinstance(value, Tensor) and value.numel() == 1):
        raise TypeError(f"{what} must be a real number, got {type(value).__name__} {value!r}; pass e.g. {what}=0.5")
    x = float(value)
    if not math.isfinite(x):
        raise ValueError(f"{what} must be finite, got {x}; pass a finite number (chosen on a dev split)")
    return x


def weights_digest(t: Tensor) -> str:
    """A short hash of a parameter's shape and a strided sample of its values.

    Identifies the base weights a delta applies to at the cost of a few thousand values per
    parameter (hashing every weight of a large model would take seconds).
    """
    t = t.detach()
    flat = t.reshape(-1)
    sample = flat[:: max(1, flat.numel() // _SAMPLE)][:_SAMPLE].to("cpu", torch.float32)
    h = hashlib.sha256(str(tuple(t.shape)).encode())
    h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


def parameter_group(name: str, by: str) -> str:
    """The group of parameter ``name`` for :func:`geometry`: its layer (``"embed"`` / ``"final"``
    outside the blocks), its module kind (``q_proj``, ``down_proj``, ``lm_head`` ...), both, itself, or ``"all"``."""
    clean = name.replace("._original_component", "").replace(".base_layer", "")
    m = _LAYER_RE.search(clean)
    parts = [p for p in clean.split(".") if p not in ("weight", "bias")]
    kind = parts[-1] if parts else clean
    if m is not None:
        layer = m.group(1)
    else:
        layer = "embed" if re.search(r"embed|wte|wpe", clean) else "final"
    if by == "layer":
        return layer
    if by == "module":
        return kind
    if by == "layer_module":
        return f"{layer}.{kind}"
    if by == "parameter":
        return clean
    if by == "all":
        return "all"
    raise ValueError(f"unknown grouping {by!r}; use one of {', '.join(_GROUPINGS)}")


def _group_order(groups: Iterable[str]) -> list[str]:
    def key(g: str) -> tuple:
        head = g.split(".", 1)[0]
        rank = (0, 0) if head == "embed" else (1, int(head)) if head.isdigit() else (2, 0)
        return (*rank, g)

    return sorted(set(groups), key=key)


def _model_params(model: Any) -> dict[str, Tensor]:
    if not hasattr(model, "named_parameters"):
        raise TypeError(f"expected a torch model (a tvlens.load_model bridge), got {type(model).__name__}; "
                        "load one with tvlens.load_model(name_or_path)")
    return dict(model.named_parameters())


# ----------------------------------------------------------------------------------------------
# the vector


@dataclass(frozen=True, eq=False)
class WeightVector(WithMeta, Tabular):
    """A weight-space task vector (Ilharco et al. 2023, §2): per-parameter deltas ``θ_ft − θ_base``.

    Attributes:
        deltas: parameter name (as in ``base.named_parameters()``) -> float32 CPU delta of that
            parameter's shape. Parameters left out are unchanged.
        task: the task (or an expression such as ``"(a + b)"``).
        kind: ``"full"`` (full fine-tune), ``"lora"`` (a LoRA delta), ``"arithmetic"``, ``"merge"``
            or ``"custom"``.
        meta: the base model's name and fingerprint (checked whenever the vector meets a model),
            seed, and in ``extra`` how it was made.
        lora: for LoRA vectors, parameter name -> ``(A [r, in], B [out, r], scaling)`` with
            ``delta = scaling · B @ A`` (as ``peft`` computes it); ``None`` otherwise.
        base_digests: parameter name -> :func:`weights_digest` of the base's value of it.
    """

    deltas: Mapping[str, Tensor]
    task: str
    kind: str = "full"
    meta: ResultMeta = field(default_factory=ResultMeta)
    lora: Mapping[str, tuple[Tensor, Tensor, float]] | None = None
    base_digests: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.deltas, Mapping) or not self.deltas:
            raise ValueError("deltas must be a non-empty {parameter name: tensor} mapping; "
                             "build a WeightVector with WeightVector.between(base, finetuned) or tvlens.finetune")
        clean: dict[str, Tensor] = {}
        for name, d in self.deltas.items():
            if not isinstance(name, str) or not isinstance(d, Tensor) or not d.is_floating_point():
                raise TypeError(f"delta {name!r} must be a floating-point tensor keyed by a parameter name, "
                                f"got {type(d).__name__}; pass {{name: tensor}}")
            d = d.detach().to("cpu", torch.float32).contiguous()
            if not bool(torch.isfinite(d).all()):
                raise ValueError(f"delta {name!r} of {self.task!r} has NaN/inf entries; re-run the fine-tune "
                                 "with a smaller learning rate or drop that vector")
            clean[name] = d
        object.__setattr__(self, "deltas", MappingProxyType(dict(sorted(clean.items()))))
        if self.kind not in KINDS:
            raise ValueError(f"unknown kind {self.kind!r}; use one of {', '.join(KINDS)}")
        if not isinstance(self.meta, ResultMeta):
            raise TypeError(f"meta must be a tvlens.results.ResultMeta, got {type(self.meta).__name__}")
        object.__setattr__(self, "base_digests", MappingProxyType(
            {n: str(self.base_digests[n]) for n in clean if n in self.base_digests}))
        if self.lora is not None:
            missing = sorted(set(self.lora) - set(clean))
            if missing:
                raise ValueError(f"LoRA factors given for {missing[:3]} that have no delta; give one delta per factor pair")
            object.__setattr__(self, "lora", MappingProxyType({
                k: (a.detach().to("cpu", torch.float32).contiguous(), b.detach().to("cpu", torch.float32).contiguous(),
                    float(s)) for k, (a, b, s) in sorted(self.lora.items())}))

    # -- construction --------------------------------------------------------------------------

    @classmethod
    def between(cls, base: Any, finetuned: Any, *, task: str = "custom", kind: str = "full",
                names: Sequence[str] | None = None, **extra: Any) -> "WeightVector":
        """``θ_finetuned − θ_base`` for every parameter (or ``names``) whose value changed.

        Both models must have the same parameter names and shapes (a fine-tuned copy of ``base``).
        """
        pb, pf = _model_params(base), _model_params(finetuned)
        if set(pb) != set(pf) or any(pb[n].shape != pf[n].shape for n in pb):
            only = sorted(set(pb) ^ set(pf))[:3] or [n for n in pb if pb[n].shape != pf[n].shape][:3]
            raise ValueError(f"the two models have different parameter sets or shapes (e.g. {only}); "
                             "pass a fine-tuned copy of the base model (tvlens.finetune makes one)")
        names = list(pb) if names is None else list(names)
        deltas = {}
        with torch.no_grad():
            for n in names:
                d = pf[n].detach().to("cpu", torch.float32) - pb[n].detach().to("cpu", torch.float32)
                if bool(d.any()):
                    deltas[n] = d
        if not deltas:
            raise ValueError("the fine-tuned model equals the base: every delta is zero; train for more steps "
                             "or with a larger learning rate")
        meta = ResultMeta.for_model(base, tasks=(task,), **extra)
        return cls(deltas=deltas, task=task, kind=kind, meta=meta,
                   base_digests={n: weights_digest(pb[n]) for n in deltas})

    # -- identity ------------------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.deltas)

    @property
    def n_params(self) -> int:
        """Number of scalar weights the vector changes."""
        return sum(d.numel() for d in self.deltas.values())

    @property
    def n_trained(self) -> int:
        """Trained parameters behind it: LoRA factor entries for a LoRA vector, else :attr:`n_params`."""
        if self.lora:
            return sum(a.numel() + b.numel() for a, b, _ in self.lora.values())
        return int(self.meta.extra.get("n_trained", self.n_params))

    def norm(self) -> float:
        """The L2 norm of the whole vector (all parameters flattened)."""
        return math.sqrt(sum(float(d.double().pow(2).sum()) for d in self.deltas.values()))

    def __repr__(self) -> str:
        return (f"WeightVector(task={self.task!r}, kind={self.kind!r}, model={self.model!r}, "
                f"n_tensors={len(self.deltas)}, n_params={self.n_params}, norm={self.norm():.4g})")

    # -- checks --------------------------------------------------------------------------------

    def check_model(self, model: Any, *, check_base: bool = True) -> dict[str, Tensor]:
        """Refuse a model this vector does not apply to; return its parameters by name.

        Checked: the model fingerprint (tvlens's config hash), the parameter names and shapes, and
        (``check_base``) that the parameters still hold the base weights (:attr:`base_digests`).
        """
        check_same_model(model, self.meta.to_dict(), what=f"weight vector {self.task!r}")
        params = _model_params(model)
        missing = [n for n in self.deltas if n not in params]
        if missing:
            raise ValueError(f"weight vector {self.task!r} changes {len(missing)} parameters this model does not have "
                             f"(e.g. {missing[0]!r}); apply it to the architecture it was made on ({self.model!r})")
        wrong = [(n, tuple(self.deltas[n].shape), tuple(params[n].shape)) for n in self.deltas
                 if self.deltas[n].shape != params[n].shape]
        if wrong:
            n, want, got = wrong[0]
            raise ValueError(f"weight vector {self.task!r} has delta {n!r} of shape {want} but the model's parameter "
                             f"is {got}; apply it to the model it was made on ({self.model!r})")
        if check_base:
            changed = [n for n, want in self.base_digests.items() if weights_digest(params[n]) != want]
            if changed:
                raise ValueError(
                    f"the model's weights are not the base weight vector {self.task!r} was computed from ({len(changed)} "
                    f"parameters differ, e.g. {changed[0]!r}): another vector is applied or the model was trained; "
                    "apply the sum (applied(model, a + b)) to the base model, or pass check_base=False to apply it anyway")
        return params

    def _check_compatible(self, other: "WeightVector", op: str) -> None:
        if not isinstance(other, WeightVector):
            raise TypeError(f"cannot {op} a WeightVector and a {type(other).__name__}; both operands must be WeightVectors")
        if self.config_hash != other.config_hash:
            raise ValueError(f"cannot {op} vectors of different base models ({self.model!r}, hash {self.config_hash} "
                             f"vs {other.model!r}, hash {other.config_hash}); compute both on the same base model")
        if set(self.deltas) != set(other.deltas):
            extra = sorted(set(self.deltas) ^ set(other.deltas))
            raise ValueError(f"cannot {op} {self.task!r} and {other.task!r}: they change different parameter sets "
                             f"({len(extra)} differ, e.g. {extra[0]!r}); use a.padded_like(b) to treat the missing "
                             "parameters as unchanged (zero delta)")
        differ = [n for n, d in self.base_digests.items() if other.base_digests.get(n, d) != d]
        if differ:
            raise ValueError(f"cannot {op} {self.task!r} and {other.task!r}: they were computed from different base "
                             f"weights ({len(differ)} parameters differ, e.g. {differ[0]!r}); fine-tune both from one base model")
        bad = [n for n in self.deltas if self.deltas[n].shape != other.deltas[n].shape]
        if bad:
            raise ValueError(f"cannot {op} {self.task!r} and {other.task!r}: parameter {bad[0]!r} has shapes "
                             f"{tuple(self.deltas[bad[0]].shape)} and {tuple(other.deltas[bad[0]].shape)}; "
                             "compute both on the same architecture")

    # -- arithmetic (Ilharco et al. 2023, §2: element-wise operations on task vectors) ---------

    def _derived(self, deltas: Mapping[str, Tensor], task: str, parts: Sequence["WeightVector"], kind: str = "arithmetic",
                 lora: Mapping[str, tuple[Tensor, Tensor, float]] | None = None, **extra: Any) -> "WeightVector":
        tasks = tuple(dict.fromkeys(t for v in parts for t in v.meta.tasks))
        meta = ResultMeta(model=self.meta.model, config_hash=self.meta.config_hash, tasks=tasks, seed=self.meta.seed,
                          extra={**{k: v for k, v in self.meta.extra.items() if k in ("n_layers", "d_model")}, **extra})
        digests = {k: v for p in parts for k, v in p.base_digests.items()}
        return WeightVector(deltas=deltas, task=task, kind=kind, meta=meta, lora=lora, base_digests=digests)

    def __add__(self, other: Any) -> "WeightVector":
        self._check_compatible(other, "add")
        return self._derived({n: self.deltas[n] + other.deltas[n] for n in self.deltas},
                             f"({self.task} + {other.task})", [self, other])

    def __sub__(self, other: Any) -> "WeightVector":
        self._check_compatible(other, "subtract")
        return self._derived({n: self.deltas[n] - other.deltas[n] for n in self.deltas},
                             f"({self.task} - {other.task})", [self, other])

    def __neg__(self) -> "WeightVector":
        return self * -1.0

    def __mul__(self, scale: Any) -> "WeightVector":
        if isinstance(scale, WeightVector):
            raise TypeError("WeightVectors multiply by numbers only (2.0 * tau); use tau.cosine(other) for their similarity")
        s = _finite_scalar(scale, "scale")
        lora = {k: (a, b, sc * s) for k, (a, b, sc) in self.lora.items()} if self.lora else None
        return self._derived({n: d * s for n, d in self.deltas.items()}, f"{s:g}*{self.task}", [self],
                             kind=self.kind if lora else "arithmetic", lora=lora)

    __rmul__ = __mul__

    def __truediv__(self, scale: Any) -> "WeightVector":
        s = _finite_scalar(scale, "divisor")
        if s == 0.0:
            raise ZeroDivisionError("cannot divide a weight vector by 0; pass a non-zero divisor")
        return self * (1.0 / s)

    def padded_like(self, other: "WeightVector") -> "WeightVector":
        """This vector with a zero delta for every parameter ``other`` changes and this one does not."""
        deltas = dict(self.deltas)
        for n, d in other.deltas.items():
            deltas.setdefault(n, torch.zeros_like(d))
        out = self._derived(deltas, self.task, [self], kind=self.kind if self.kind != "lora" else "arithmetic")
        object.__setattr__(out, "base_digests", MappingProxyType({**other.base_digests, **self.base_digests}))
        return out

    # -- geometry ------------------------------------------------------------------------------

    def cosine(self, other: "WeightVector") -> float:
        """Cosine similarity of the two flattened vectors (Ilharco et al. 2023, App. B: task vectors of
        different tasks are close to orthogonal)."""
        self._check_compatible(other, "compare")
        dot = sum(float((self.deltas[n].double() * other.deltas[n].double()).sum()) for n in self.deltas)
        den = self.norm() * other.norm()
        return dot / den if den > 0 else float("nan")

    def norms(self, by: str = "layer") -> "WeightGeometry":
        """Norm per layer / module kind / parameter (see :func:`geometry`)."""
        return geometry([self], by=by)

    def plot(self, by: str = "layer") -> Any:
        """The vector's norm per ``by`` group (layer, module kind, parameter; :func:`geometry`)."""
        return self.norms(by).plot()

    def to_html(self, path: str | Path, by: str = "layer") -> Path:
        return self.norms(by).to_html(path)

    def records(self) -> list[dict[str, Any]]:
        """One row per parameter: its layer group, size and the norm of its delta."""
        return [{"task": self.task, "parameter": n, "layer": parameter_group(n, "layer"), "numel": int(d.numel()),
                 "norm": float(d.double().norm())} for n, d in self.deltas.items()]

    # -- storage -------------------------------------------------------------------------------

    def _json(self) -> dict[str, Any]:
        return {"type": "WeightVector", "task": self.task, "kind": self.kind, "meta": self.meta.to_dict(),
                "base_digests": dict(self.base_digests), "shapes": {n: list(d.shape) for n, d in self.deltas.items()},
                "lora_scaling": {n: s for n, (_, _, s) in self.lora.items()} if self.lora else None}

    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (deltas, LoRA factors) and ``<path>.json`` (metadata), atomically."""
        tensors = {f"delta/{n}": d for n, d in self.deltas.items()}
        for n, (a, b, _) in (self.lora or {}).items():
            tensors[f"lora_A/{n}"], tensors[f"lora_B/{n}"] = a, b
        return save_tensors(path, tensors, self._json())

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "WeightVector":
        """Load a saved vector; with ``model``, refuse one made on another base model or architecture."""
        tensors, meta = load_result(path, "WeightVector", model=model, what=f"weight vector file {str(path)!r}")
        deltas = {k.split("/", 1)[1]: t for k, t in tensors.items() if k.startswith("delta/")}
        scaling = meta.get("lora_scaling")
        lora = {n: (tensors[f"lora_A/{n}"], tensors[f"lora_B/{n}"], float(s)) for n, s in scaling.items()} if scaling else None
        vec = cls(deltas=deltas, task=str(meta.get("task", "?")), kind=str(meta.get("kind", "custom")),
                  meta=ResultMeta.from_dict(meta.get("meta", {})), lora=lora, base_digests=dict(meta.get("base_digests") or {}))
        if model is not None:
            vec.check_model(model, check_base=False)
        return vec


# ----------------------------------------------------------------------------------------------
# combining


def _vectors(vectors: Sequence[WeightVector], what: str, minimum: int = 1) -> list[WeightVector]:
    vs = list(vectors)
    if len(vs) < minimum or not all(isinstance(v, WeightVector) for v in vs):
        raise ValueError(f"{what} needs at least {minimum} WeightVector(s), got {[type(v).__name__ for v in vs]}; "
                         "pass a list of vectors from tvlens.finetune")
    for v in vs[1:]:
        vs[0]._check_compatible(v, what)
    return vs


def weighted_sum(vectors: Sequence[WeightVector], weights: Sequence[float]) -> WeightVector:
    """``Σ_i w_i τ_i`` (Ilharco et al. 2023, §4: multi-task vectors are sums, scaled by ``λ``)."""
    vs = _vectors(vectors, "sum")
    ws = [_finite_scalar(w, "weight") for w in weights]
    if len(ws) != len(vs):
        raise ValueError(f"{len(vs)} vectors but {len(ws)} weights; give one weight per vector")
    deltas = {n: sum(w * v.deltas[n].double() for w, v in zip(ws, vs)).float() for n in vs[0].deltas}
    label = " + ".join(f"{w:g}*{v.task}" for w, v in zip(ws, vs))
    return vs[0]._derived(deltas, f"({label})", vs, weights=ws)


def mean(vectors: Sequence[WeightVector]) -> WeightVector:
    """The element-wise mean of task vectors of one base model."""
    vs = _vectors(vectors, "average")
    out = weighted_sum(vs, [1.0 / len(vs)] * len(vs))
    return out._derived(out.deltas, "mean(" + ", ".join(v.task for v in vs) + ")", vs)


def analogy(a: WeightVector, b: WeightVector, c: WeightVector) -> WeightVector:
    """``τ̂ = τ_a + (τ_b − τ_c)`` (Ilharco et al. 2023, §5: "A is to B as C is to D").

    For example ``analogy(τ_english_spanish, τ_french_english, τ_english_identity)``: french→spanish
    is english→spanish with the input language moved as french→english moves it from english→english.
    """
    vs = _vectors([a, b, c], "combine")
    return vs[0]._derived({n: a.deltas[n] + (b.deltas[n] - c.deltas[n]) for n in a.deltas},
                          f"({a.task} + ({b.task} - {c.task}))", vs)


# ----------------------------------------------------------------------------------------------
# applying


@contextmanager
def applied(model: Any, tau: WeightVector, lam: float = 1.0, *, check_base: bool = True) -> Iterator[Any]:
    """Context manager: inside the block the model's weights are ``θ + λτ``; on exit (also on an
    exception or ``KeyboardInterrupt``) every changed parameter is restored bit for bit from a copy.

    >>> with applied(model, tau_a + tau_b, lam=0.6):
    ...     acc = tvlens.evaluate_icl(model, "antonym", n_shots=0).first_token

    Everything is checked before a weight is touched (:meth:`WeightVector.check_model`, finite
    ``lam``). tvlens results computed inside the block record the base model's fingerprint.
    """
    if not isinstance(tau, WeightVector):
        raise TypeError(f"tau must be a WeightVector, got {type(tau).__name__}; make one with tvlens.finetune")
    lam = _finite_scalar(lam, "lam")
    params = tau.check_model(model, check_base=check_base)
    saved = {n: params[n].detach().clone() for n in tau.deltas}
    try:
        with torch.no_grad():
            for n, d in tau.deltas.items():
                p = params[n]
                p.add_(d.to(p.device, p.dtype), alpha=lam)
        yield model
    finally:
        with torch.no_grad():
            for n, original in saved.items():
                params[n].copy_(original)


def apply(model: Any, tau: WeightVector, lam: float = 1.0) -> Any:
    """A new model with weights ``θ + λτ`` (a deep copy; ``model`` is not changed). Its tvlens
    fingerprint is computed from its own weights."""
    if not isinstance(tau, WeightVector):
        raise TypeError(f"tau must be a WeightVector, got {type(tau).__name__}; make one with tvlens.finetune")
    lam = _finite_scalar(lam, "lam")
    tau.check_model(model)
    new = copy.deepcopy(model)
    params = dict(new.named_parameters())
    with torch.no_grad():
        for n, d in tau.deltas.items():
            params[n].add_(d.to(params[n].device, params[n].dtype), alpha=lam)
    return new


# ----------------------------------------------------------------------------------------------
# geometry


@dataclass(frozen=True, eq=False)
class WeightGeometry(Saved, Tabular):
    """Norms and pairwise cosines of weight vectors per parameter group.

    - ``norms``: ``[group, vector]`` L2 norm of each vector's deltas in the group;
    - ``cosines``: ``[group, vector, vector]`` cosine similarity within the group (NaN where a norm is 0);
    - ``groups``: layer indices (``embed``, ``0`` ... ``final``), module kinds, parameters, or ``all``.
    """

    vectors: tuple[str, ...]
    groups: tuple[str, ...]
    by: str
    norms: Float[Tensor, "group vector"]
    cosines: Float[Tensor, "group vector vector2"]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        """Long table: one row per (group, vector), with its norm and its cosine to every other vector."""
        rows = []
        for g, group in enumerate(self.groups):
            for i, v in enumerate(self.vectors):
                row = {"group": group, "vector": v, "norm": float(self.norms[g, i])}
                row.update({f"cos({w})": float(self.cosines[g, i, j]) for j, w in enumerate(self.vectors) if j != i})
                rows.append(row)
        return rows

    def plot(self, *, title: str | None = None) -> Any:
        """Norms per group (bars, one per vector) and, for ≥ 2 vectors, the cosine of each pair per group."""
        from plotly.subplots import make_subplots
        import plotly.graph_objects as go

        pairs = [(i, j) for i in range(len(self.vectors)) for j in range(i + 1, len(self.vectors))]
        fig = make_subplots(rows=2 if pairs else 1, cols=1, shared_xaxes=True, vertical_spacing=0.08,
                            subplot_titles=["norm", "cosine"] if pairs else ["norm"])
        xs = list(self.groups)
        for i, v in enumerate(self.vectors):
            fig.add_trace(go.Bar(x=xs, y=self.norms[:, i].tolist(), name=f"‖{v}‖"), row=1, col=1)
        for i, j in pairs:
            fig.add_trace(go.Scatter(x=xs, y=self.cosines[:, i, j].tolist(), mode="lines+markers",
                                     name=f"cos({self.vectors[i]}, {self.vectors[j]})"), row=2, col=1)
        fig.update_layout(template="plotly_white", barmode="group", height=420 + 280 * bool(pairs),
                          width=max(640, min(1400, 40 * len(xs) + 400)),
                          title=dict(text=title or f"weight task vectors per {self.by} ({self.meta.model})", x=0.5))
        fig.update_xaxes(type="category")
        return fig

    def to_html(self, path: str | Path) -> Path:
        return _figure_page(path, self.plot(), self.to_frame(), f"Weight vectors per {self.by}")


def _figure_page(path: str | Path, fig: Any, frame: Any, title: str) -> Path:
    """One standalone page: the figure (plotly embedded) and the table under it."""
    body = fig.to_html(include_plotlyjs=True, full_html=False)
    table = frame.to_html(index=False, float_format=lambda x: f"{x:.3f}", na_rep="")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{_html.escape(title)}</title></head>"
            f"<body><h2>{_html.escape(title)}</h2>{body}{table}</body></html>")
    out = Path(path)
    if out.suffix != ".html":
        out = out.with_suffix(".html")
    return atomic_write_text(out, page)


def geometry(vectors: Sequence[WeightVector], by: str = "layer") -> WeightGeometry:
    """Norms and cosines of ``vectors`` per ``by`` group: ``"layer"``, ``"module"`` (q_proj, down_proj,
    ...), ``"layer_module"``, ``"parameter"`` or ``"all"`` (Ilharco et al. 2023, App. B compare task
    vectors by cosine similarity)."""
    vs = _vectors(vectors, "compare")
    if by not in _GROUPINGS:
        raise ValueError(f"unknown grouping {by!r}; use one of {', '.join(_GROUPINGS)}")
    groups = _group_order(parameter_group(n, by) for n in vs[0].deltas)
    index = {g: k for k, g in enumerate(groups)}
    V, G = len(vs), len(groups)
    gram = torch.zeros(G, V, V, dtype=torch.float64)
    for n in vs[0].deltas:
        flat = torch.stack([v.deltas[n].reshape(-1).double() for v in vs])  # [vector, n]
        gram[index[parameter_group(n, by)]] += flat @ flat.T
    norms = gram.diagonal(dim1=1, dim2=2).clamp_min(0).sqrt()
    den = norms[:, :, None] * norms[:, None, :]
    cos = torch.where(den > 0, gram / den.clamp_min(1e-300), torch.full_like(gram, float("nan")))
    labels = [v.task if [w.task for w in vs].count(v.task) == 1 else f"{v.task}#{i}" for i, v in enumerate(vs)]
    return WeightGeometry(vectors=tuple(labels), groups=tuple(groups), by=by, norms=norms.float(),
                          cosines=cos.float(), meta=vs[0].meta)


# ----------------------------------------------------------------------------------------------
# merging through peft


def merge(
    vectors: Sequence[WeightVector],
    method: str = "ties",
    *,
    weights: Sequence[float] | None = None,
    density: float = 0.5,
    majority_sign_method: str = "total",
    seed: int = 0,
    model: Any = None,
    svd_rank: int | None = None,
) -> WeightVector:
    """Merge task vectors with ``peft``'s merging methods.

    Without ``model`` (any vectors): one parameter at a time with ``peft.utils.merge_utils``
    (:data:`TENSOR_MERGES`): ``"task_arithmetic"`` (Ilharco et al. 2023: the weighted sum),
    ``"ties"`` (Yadav et al. 2023: trim to the top ``density`` fraction by magnitude, elect a sign,
    average the agreeing entries), ``"dare_linear"`` / ``"dare_ties"`` (Yu et al. 2024: drop entries
    at random with probability ``1 − density`` and rescale, then sum / TIES), ``"magnitude_prune"``.

    With ``model`` (the base) and LoRA vectors only: ``peft``'s ``add_weighted_adapter`` on a copy of
    the model holding each vector as an adapter (:data:`ADAPTER_MERGES`; ``"cat"`` is the exact sum,
    ``"linear"``/``"ties"``/``"dare_*"`` combine the A and B factors, the ``*_svd`` variants combine
    full deltas and refactor them at ``svd_rank``). The merged adapter's delta is read back through
    peft. Random draws (DARE) use ``seed``. The result is to be scaled by ``λ`` chosen on dev.
    """
    vs = _vectors(vectors, "merge")
    ws = [1.0] * len(vs) if weights is None else [_finite_scalar(w, "weight") for w in weights]
    if len(ws) != len(vs):
        raise ValueError(f"{len(vs)} vectors but {len(ws)} weights; give one weight per vector")
    density = _finite_scalar(density, "density")
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density must be in (0, 1], got {density}; 0.2-0.5 are usual for TIES/DARE")
    if majority_sign_method not in ("total", "frequency"):
        raise ValueError(f"majority_sign_method must be 'total' or 'frequency', got {majority_sign_method!r}")
    label = f"{method}(" + ", ".join(v.task for v in vs) + ")"
    if model is None:
        if method not in TENSOR_MERGES:
            raise ValueError(f"unknown merge {method!r} for dense deltas; use one of {', '.join(TENSOR_MERGES)} "
                             f"(or pass model= and LoRA vectors for {', '.join(ADAPTER_MERGES)})")
        deltas = _merge_tensors(vs, method, ws, density, majority_sign_method, seed)
        return vs[0]._derived(deltas, label, vs, kind="merge", method=method, density=density, weights=ws, via="merge_utils")
    if method not in ADAPTER_MERGES:
        raise ValueError(f"unknown adapter merge {method!r}; use one of {', '.join(ADAPTER_MERGES)}")
    not_lora = [v.task for v in vs if not v.lora]
    if not_lora:
        raise ValueError(f"add_weighted_adapter merges LoRA vectors, but {not_lora} are not; fine-tune them with "
                         "method='lora', or leave model= out to merge dense deltas with peft.utils.merge_utils")
    if any(set(v.lora) != set(vs[0].lora) for v in vs):
        raise ValueError("these LoRA vectors adapt different modules; fine-tune them with the same target_modules")
    ranks = {int(next(iter(v.lora.values()))[0].shape[0]) for v in vs}
    if method in _SAME_RANK and len(ranks) > 1:
        raise ValueError(f"merge {method!r} needs LoRA vectors of one rank, got ranks {sorted(ranks)}; use "
                         f"'{method}_svd' or 'cat', or fine-tune them at one rank")
    for v in vs:
        v.check_model(model)
    lora, deltas = _merge_adapters(model, vs, method, ws, density, majority_sign_method, seed, svd_rank)
    return vs[0]._derived(deltas, label, vs, kind="merge", lora=lora, method=method, density=density, weights=ws,
                          via="add_weighted_adapter")


def _merge_tensors(vs: Sequence[WeightVector], method: str, ws: Sequence[float], density: float, sign: str,
                   seed: int) -> dict[str, Tensor]:
    from peft.utils import merge_utils

    fn = getattr(merge_utils, method)
    w = torch.tensor(ws, dtype=torch.float32)
    out = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for n in vs[0].deltas:
            tensors = [v.deltas[n] for v in vs]
            if method == "task_arithmetic":
                out[n] = fn(tensors, w)
            elif method in ("ties", "dare_ties"):
                out[n] = fn(tensors, w, density, sign)
            else:
                out[n] = fn(tensors, w, density)
    return out


def _merge_adapters(model: Any, vs: Sequence[WeightVector], method: str, ws: Sequence[float], density: float,
                    sign: str, seed: int, svd_rank: int | None) -> tuple[dict, dict]:
    from .finetune import lora_layers, peft_model

    work = copy.deepcopy(model)
    names = [f"t{i}" for i in range(len(vs))]
    modules = [n[: -len(".weight")] for n in vs[0].lora]
    for i, (v, name) in enumerate(zip(vs, names)):
        a0, _, s0 = next(iter(v.lora.values()))
        rank = int(a0.shape[0])
        pm = peft_model(work, rank=rank, lora_alpha=s0 * rank, target_modules=modules, adapter=name,
                        existing=None if i == 0 else pm)
        for mod, layer in lora_layers(pm).items():
            a, b, s = v.lora[f"{mod}.weight"]
            with torch.no_grad():
                layer.lora_A[name].weight.copy_(a)
                layer.lora_B[name].weight.copy_(b)
            layer.scaling[name] = s
    kw: dict[str, Any] = dict(adapters=names, weights=list(ws), adapter_name="merged", combination_type=method)
    if method not in ("linear", "cat", "svd"):
        kw.update(density=density)
    if method in ("ties", "dare_ties", "ties_svd", "dare_ties_svd"):
        kw.update(majority_sign_method=sign)
    if svd_rank is not None:
        kw.update(svd_rank=int(svd_rank))
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.manual_seed(seed)
        pm.add_weighted_adapter(**kw)
    lora, deltas = {}, {}
    with torch.no_grad():
        for mod, layer in lora_layers(pm).items():
            deltas[f"{mod}.weight"] = layer.get_delta_weight("merged").detach().float().cpu()
            lora[f"{mod}.weight"] = (layer.lora_A["merged"].weight.detach(), layer.lora_B["merged"].weight.detach(),
                                     float(layer.scaling["merged"]))
    return lora, deltas


#: Top-level names (``tvlens.weights_applied`` ...), unambiguous beside the activation-vector API.
weights_applied = applied
apply_weights = apply
merge_weights = merge
weight_geometry = geometry
