"""Streaming per-head statistics and the ρ_token taskness score.

``head_means`` runs each task's ICL prompts through the model once, hooking only
``blocks.{l}.attn.hook_z`` (one forward per batch serves every layer and head), and folds the
selected activations into float64 running moments (count, mean, sum of squared deviations) with
the parallel update of Chan, Golub & LeVeque (1979) — Welford's algorithm applied batch-wise.
Memory is independent of ``n_prompts``: nothing but the running moments is kept.

``taskness`` turns the moments into the ρ_token score of Hojel et al. 2024 ("Finding Visual Task
Vectors", §3, activation scoring), per layer × head and, when several token positions are
collected, per layer × head × position::

    ρ(i) = Σ_e Var(h_all^i[e]) / ( (1/n) Σ_j Σ_e Var(h_task_j^i[e]) )

high when a head's activation varies across tasks but little within a task.

Variance convention: everywhere in this module ``Var`` is the **population** variance
(divide by the count, ``ddof=0``, like ``numpy.var`` and ``torch.var(unbiased=False)``);
``HeadStats.z_var_sample`` gives the ``ddof=1`` version. ``Var(h_all)`` is the population
variance of the pooled samples of all tasks, computed exactly from the per-task moments by the
law of total variance (each task weighted by its sample count).
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..checks import check_int as _check_int
from ..engine.batch import rows_inputs
from ..engine.plan import rows_per_forward
from ..results import LayerHeadGrid, Plotted, ResultMeta, Saved, Tabular, WithMeta
from ..tasks import task_name as _task_name
from ..vocabulary import BATCH_SIZE, FINAL, FINAL_POSITION, N_PROMPTS, PROGRESS, final_alias

__all__ = [
    "HeadStats",
    "head_means",
    "Taskness",
    "taskness",
    "rho_token",
    "taskness_from_stats",
    "TasknessValidation",
    "validate_taskness",
    "DEFAULT_EPS",
]

#: Relative floor of the within-task variance, see :func:`rho_token`.
DEFAULT_EPS = 1e-6
#: Prompts are generated this many at a time (so memory stays flat in ``n_prompts``); chunk ``i``
#: uses seed ``seed + i * _SEED_STRIDE``. ``n_prompts <= _PROMPT_CHUNK`` means exactly
#: ``icl_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed)``.
_PROMPT_CHUNK = 1024
_SEED_STRIDE = 1_000_003

ALL = "all"


# --------------------------------------------------------------------------------------------
# running moments
# --------------------------------------------------------------------------------------------


def _chan_merge(
    n_a: Tensor, mean_a: Tensor, m2_a: Tensor, n_b: Tensor, mean_b: Tensor, m2_b: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Combine two sets of moments (count, mean, M2 = Σ (x-mean)²); counts broadcast over the
    trailing feature axis. Chan, Golub & LeVeque 1979, the pairwise form of Welford's update."""
    n = n_a + n_b
    w = torch.where(n > 0, n_b / n.clamp_min(1), torch.zeros_like(n))
    while w.ndim < mean_a.ndim:
        w = w.unsqueeze(-1)
    delta = mean_b - mean_a
    mean = mean_a + delta * w
    na = n_a
    while na.ndim < mean_a.ndim:
        na = na.unsqueeze(-1)
    m2 = m2_a + m2_b + delta * delta * (na * w)
    return n, mean, m2


class _Moments:
    """Running count/mean/M2 of feature vectors per *rank* (distance from the end of the selected
    tokens: rank 0 = the last one). The rank axis grows on demand; rows with count 0 hold zeros,
    so growing is exact."""

    def __init__(self, n_features: int, device: torch.device):
        self.f = n_features
        self.device = device
        self.count = torch.zeros(0, dtype=torch.float64, device=device)
        self.mean = torch.zeros(0, n_features, dtype=torch.float64, device=device)
        self.m2 = torch.zeros(0, n_features, dtype=torch.float64, device=device)

    def _grow(self, p: int) -> None:
        extra = p - self.count.shape[0]
        if extra > 0:
            self.count = torch.cat([self.count, self.count.new_zeros(extra)])
            self.mean = torch.cat([self.mean, self.mean.new_zeros(extra, self.f)])
            self.m2 = torch.cat([self.m2, self.m2.new_zeros(extra, self.f)])

    def add(self, ranks: Int[Tensor, " n"], vals: Float[Tensor, "n f"]) -> None:
        if vals.shape[0] == 0:
            return
        p = int(ranks.max()) + 1
        self._grow(p)
        if p == 1:
            cnt = vals.new_full((1,), float(vals.shape[0]))
            mean_b = vals.mean(0, keepdim=True)
            dev = vals - mean_b
            m2_b = (dev * dev).sum(0, keepdim=True)
        else:
            cnt = torch.bincount(ranks, minlength=p).to(torch.float64)
            s = vals.new_zeros(p, self.f).index_add_(0, ranks, vals)
            mean_b = s / cnt.clamp_min(1).unsqueeze(-1)
            dev = vals - mean_b[ranks]
            m2_b = vals.new_zeros(p, self.f).index_add_(0, ranks, dev * dev)
        n, mean, m2 = _chan_merge(self.count[:p], self.mean[:p], self.m2[:p], cnt, mean_b, m2_b)
        self.count[:p], self.mean[:p], self.m2[:p] = n, mean, m2


# --------------------------------------------------------------------------------------------
# HeadStats
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class HeadStats(Plotted, WithMeta, LayerHeadGrid, Tabular):
    """Per task, per layer, per head: mean, population variance and count of ``hook_z``.

    Shapes (``pos`` only when ``per_position``; ``pos`` is right-aligned: index ``-1`` is the last
    selected token of each prompt — the final separator for ``positions="all"`` —, ``-2`` the one
    before, ...):

    - ``z_mean``, ``z_var``: ``[task, layer, head, d_head]`` or ``[task, layer, head, pos, d_head]``,
      float64, population variance (``ddof=0``);
    - ``count``: ``[task]`` or ``[task, pos]`` int64 — samples behind each moment (left padding and
      prompts too short for a position are not counted);
    - ``out_mean``, ``out_var`` (when ``include_output``): the head's contribution to the residual
      stream, ``z @ W_O[layer, head]``, ``[..., d_model]``, accumulated directly (its variance needs
      the covariance of z, so it is not derivable from ``z_var``); ``out_mean == z_mean @ W_O``.

    ``layers`` lists the model layers of the ``layer`` axis (all layers by default).
    """

    tasks: tuple[str, ...]
    z_mean: Float[Tensor, "task layer head *pos d_head"]
    z_var: Float[Tensor, "task layer head *pos d_head"]
    count: Int[Tensor, "task *pos"]
    positions: str = FINAL
    layers: tuple[int, ...] = ()
    out_mean: Float[Tensor, "task layer head *pos d_model"] | None = None
    out_var: Float[Tensor, "task layer head *pos d_model"] | None = None
    meta: ResultMeta = field(default_factory=ResultMeta)

    # ---- shape helpers ----
    @property
    def per_position(self) -> bool:
        return self.z_mean.ndim == 5

    @property
    def n_tasks(self) -> int:
        return len(self.tasks)

    @property
    def grid(self) -> Tensor:
        return self.z_mean[0]

    @property
    def d_head(self) -> int:
        return self.z_mean.shape[-1]

    @property
    def n_positions(self) -> int:
        return self.z_mean.shape[3] if self.per_position else 1

    @property
    def z_var_sample(self) -> Tensor:
        """Sample variance (``ddof=1``); 0 where fewer than 2 samples."""
        return _sample_var(self.z_var, self.count, self.per_position)

    @property
    def out_var_sample(self) -> Tensor | None:
        return None if self.out_var is None else _sample_var(self.out_var, self.count, self.per_position)

    def task_index(self, task: Any) -> int:
        name = _task_name(task)
        try:
            return self.tasks.index(name)
        except ValueError:
            raise KeyError(f"task {name!r} is not in these stats; they hold {', '.join(self.tasks)}") from None

    def mean(self, task: Any) -> Tensor:
        """``z_mean`` of one task: ``[layer, head, (pos,) d_head]`` (the task-mean head outputs of Todd et al. 2024)."""
        return self.z_mean[self.task_index(task)]

    def plot(self, task: Any = None, *, transpose: bool = False):
        """Layers × heads heatmap of ‖z̄‖, the norm of each head's task-mean ``hook_z`` at the final
        position (the vectors a function vector sums, Todd et al. 2024, §2.2): of ``task``, or the
        mean over the tasks; per-position stats show their last position."""
        from ..plot import layer_head_heatmap

        z = self.z_mean if task is None else self.z_mean[self.task_index(task)][None]
        norm = z.norm(dim=-1).float()  # [task, layer, head(, pos)]
        norm = (norm[..., -1] if self.per_position else norm).mean(0)
        what = f"task {task}" if task is not None else f"mean over {len(self.tasks)} tasks"
        return layer_head_heatmap(norm, title=f"‖task-mean hook_z‖ per head<br><sup>{what} · {self.positions}</sup>",
                                  zlabel="‖z̄‖", transpose=transpose, layers=self.layers or None)

    def __repr__(self) -> str:
        pos = f", pos={self.n_positions}" if self.per_position else ""
        return (
            f"HeadStats(tasks={list(self.tasks)}, positions={self.positions!r}, layers={self.n_layers}, "
            f"heads={self.n_heads}, d_head={self.d_head}{pos}, include_output={self.out_mean is not None}, "
            f"model={self.meta.get('model', '?')!r})"
        )

    def records(self) -> list[dict[str, Any]]:
        """One row per (task, layer, head[, pos]): ``count`` (samples), ``mean_norm`` (‖z̄‖ of the
        task-mean ``hook_z``), ``var`` (its variance, averaged over d_head) and, with ``include_output``,
        ``out_norm`` (‖z̄ @ W_O‖). The vectors themselves stay in ``z_mean`` / ``mean(task)``."""
        norm = self.z_mean.norm(dim=-1)  # [task, layer, head(, pos)]
        var = self.z_var.mean(-1)
        out = None if self.out_mean is None else self.out_mean.norm(dim=-1)
        rows = []
        for ti, task in enumerate(self.tasks):
            for li, layer in enumerate(self.layers or range(norm.shape[1])):
                for h in range(norm.shape[2]):
                    cells = [(None, norm[ti, li, h], var[ti, li, h])] if not self.per_position else \
                        [(p - norm.shape[3], norm[ti, li, h, p], var[ti, li, h, p]) for p in range(norm.shape[3])]
                    for k, (pos, n, v) in enumerate(cells):
                        row = {"task": task, "layer": int(layer), "head": h}
                        if pos is not None:
                            row["pos"] = pos
                        row["count"] = int(self.count[ti] if self.count.ndim == 1 else self.count[ti, k])
                        row["mean_norm"], row["var"] = float(n), float(v)
                        if out is not None:
                            row["out_norm"] = float(out[ti, li, h] if pos is None else out[ti, li, h, k])
                        rows.append(row)
        return rows

    # ---- transformations ----
    def select(self, tasks: Sequence[Any]) -> "HeadStats":
        """The stats of a subset of the tasks (in the given order)."""
        idx = [self.task_index(t) for t in tasks]
        return self._take(idx)

    def _take(self, idx: list[int]) -> "HeadStats":
        t = torch.tensor(idx, dtype=torch.long)
        pick = lambda x: None if x is None else x.index_select(0, t)  # noqa: E731
        return HeadStats(
            tasks=tuple(self.tasks[i] for i in idx), z_mean=pick(self.z_mean), z_var=pick(self.z_var),
            count=pick(self.count), positions=self.positions, layers=self.layers, out_mean=pick(self.out_mean),
            out_var=pick(self.out_var), meta=self.meta,
        )

    def at_position(self, pos: int = -1) -> "HeadStats":
        """Per-position stats reduced to one right-aligned position (``-1`` = last selected token)."""
        if not self.per_position:
            if pos not in (-1, 0):
                raise ValueError(f"these stats hold one position ({self.positions!r}); use pos=-1")
            return self
        if not -self.n_positions <= pos < self.n_positions:
            raise ValueError(f"position {pos} is out of range: these stats hold {self.n_positions} positions (-{self.n_positions}..-1)")
        pick = lambda x: None if x is None else x[:, :, :, pos]  # noqa: E731
        label = FINAL if (pos in (-1, self.n_positions - 1) and self.positions == ALL) else f"{self.positions}[{pos}]"
        return HeadStats(self.tasks, pick(self.z_mean), pick(self.z_var), self.count[:, pos], label, self.layers,
                         pick(self.out_mean), pick(self.out_var), self.meta)

    def pooled(self) -> "HeadStats":
        """Per-position stats pooled over all positions (every selected token one sample), exactly."""
        if not self.per_position:
            return self

        def pool(mean: Tensor, var: Tensor) -> tuple[Tensor, Tensor]:
            c = self.count.to(torch.float64)  # [task, pos]
            n = c.sum(1)  # [task]
            cw = (c / n.clamp_min(1).unsqueeze(1))[:, None, None, :, None]
            mu = (mean * cw).sum(3)
            v = ((var + (mean - mu.unsqueeze(3)) ** 2) * cw).sum(3)
            return mu, v

        zm, zv = pool(self.z_mean, self.z_var)
        om, ov = (None, None) if self.out_mean is None else pool(self.out_mean, self.out_var)
        return HeadStats(self.tasks, zm, zv, self.count.sum(1), f"{self.positions} (pooled)", self.layers, om, ov,
                         self.meta)

    def merge(self, other: "HeadStats") -> "HeadStats":
        """Combine with stats of more prompts (Chan's parallel update, exact): tasks present in both
        are merged, tasks present in one are carried over. Both must come from the same model,
        positions, layers and ``include_output`` setting."""
        if not isinstance(other, HeadStats):
            raise TypeError(f"merge expects HeadStats, got {type(other).__name__}")
        for what, a, b in (
            ("positions", self.positions, other.positions),
            ("layers", self.layers, other.layers),
            ("model config hash", self.meta.get("config_hash"), other.meta.get("config_hash")),
            ("include_output", self.out_mean is not None, other.out_mean is not None),
            ("shape", tuple(self.z_mean.shape[1:3]) + (self.d_head,), tuple(other.z_mean.shape[1:3]) + (other.d_head,)),
        ):
            if a != b:
                raise ValueError(f"cannot merge HeadStats with different {what} ({a!r} vs {b!r}); recompute them alike")
        a, b = self, other
        if a.per_position and a.n_positions != b.n_positions:  # right-aligned: pad on the left with empty rows
            p = max(a.n_positions, b.n_positions)
            a, b = a._pad_positions(p), b._pad_positions(p)
        tasks = list(a.tasks) + [t for t in b.tasks if t not in a.tasks]
        outs: dict[str, list[Tensor]] = {"count": [], "z_mean": [], "z_var": [], "out_mean": [], "out_var": []}
        for t in tasks:
            ia = a.tasks.index(t) if t in a.tasks else None
            ib = b.tasks.index(t) if t in b.tasks else None
            if ia is not None and ib is not None:
                n_a, n_b = a.count[ia].to(torch.float64), b.count[ib].to(torch.float64)
                na_e, nb_e = _expand_count(n_a, a.per_position), _expand_count(n_b, a.per_position)
                n, zm, zm2 = _chan_merge(na_e, a.z_mean[ia], a.z_var[ia] * na_e.unsqueeze(-1),
                                         nb_e, b.z_mean[ib], b.z_var[ib] * nb_e.unsqueeze(-1))
                outs["z_mean"].append(zm)
                outs["z_var"].append(_safe_div(zm2, n.unsqueeze(-1)))
                outs["count"].append((n_a + n_b).round().to(torch.int64))
                if a.out_mean is not None:
                    n, om, om2 = _chan_merge(na_e, a.out_mean[ia], a.out_var[ia] * na_e.unsqueeze(-1),
                                             nb_e, b.out_mean[ib], b.out_var[ib] * nb_e.unsqueeze(-1))
                    outs["out_mean"].append(om)
                    outs["out_var"].append(_safe_div(om2, n.unsqueeze(-1)))
            else:
                src, i = (a, ia) if ia is not None else (b, ib)
                for k in outs:
                    v = getattr(src, k)
                    if v is not None:
                        outs[k].append(v[i])
        meta = a.meta.replace(n_prompts=None, merged_from=[a.meta.get("seed"), b.meta.get("seed")])
        stack = lambda k: torch.stack(outs[k]) if outs[k] else None  # noqa: E731
        return HeadStats(tuple(tasks), stack("z_mean"), stack("z_var"), stack("count"), a.positions, a.layers,
                         stack("out_mean"), stack("out_var"), meta)

    def _pad_positions(self, p: int) -> "HeadStats":
        extra = p - self.n_positions
        if extra <= 0:
            return self

        def pad(x: Tensor | None) -> Tensor | None:
            if x is None:
                return None
            shape = list(x.shape)
            shape[3] = extra
            return torch.cat([x.new_zeros(shape), x], dim=3)

        count = torch.cat([self.count.new_zeros(self.count.shape[0], extra), self.count], dim=1)
        return HeadStats(self.tasks, pad(self.z_mean), pad(self.z_var), count, self.positions, self.layers,
                         pad(self.out_mean), pad(self.out_var), self.meta)

    # ---- storage ----
    def save(self, path: str | Path) -> Path:
        """Write ``<path>.safetensors`` (tensors) + ``<path>.json`` (tasks, positions, layers, meta), atomically."""
        from ..results import save_tensors

        tensors = {"z_mean": self.z_mean, "z_var": self.z_var, "count": self.count}
        if self.out_mean is not None:
            tensors.update(out_mean=self.out_mean, out_var=self.out_var)
        meta = {"kind": "HeadStats", "tasks": list(self.tasks), "positions": self.positions, "layers": list(self.layers),
                "meta": self.meta.to_dict()}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "HeadStats":
        """Read what :meth:`save` wrote; with ``model``, refuse stats of a different model."""
        from ..results import load_result

        tensors, meta = load_result(path, "HeadStats", model=model, what="HeadStats file")
        inner = dict(meta.get("meta", {}))
        return cls(tuple(meta["tasks"]), tensors["z_mean"], tensors["z_var"], tensors["count"], final_alias(meta["positions"]),
                   tuple(meta.get("layers", ())), tensors.get("out_mean"), tensors.get("out_var"), inner)


def _expand_count(c: Tensor, per_position: bool) -> Tensor:
    """[] or [pos] counts -> broadcastable against [layer, head, (pos)] (before the feature axis)."""
    return c if not per_position else c.view(1, 1, -1)


def _safe_div(a: Tensor, n: Tensor) -> Tensor:
    return torch.where(n > 0, a / n.clamp_min(1), torch.zeros_like(a))


def _sample_var(var: Tensor, count: Tensor, per_position: bool) -> Tensor:
    c = count.to(torch.float64)
    c = c.view(c.shape[0], 1, 1, -1, 1) if per_position else c.view(-1, 1, 1, 1)
    return torch.where(c > 1, var * c / (c - 1).clamp_min(1), torch.zeros_like(var))


# --------------------------------------------------------------------------------------------
# head_means
# --------------------------------------------------------------------------------------------




def _is_prompt_batch(x: Any) -> bool:
    return hasattr(x, "tokens") and hasattr(x, "attention_mask") and hasattr(x, "token_class")


def _resolve_task_list(tasks: Any) -> list[Any]:
    """Names / Task objects / PromptBatches, validated (no forward pass)."""
    if tasks is None:
        raise ValueError("no tasks given; pass task names (e.g. ['country_capital', 'antonym']), 'all', or PromptBatches")
    if isinstance(tasks, str):
        from ..tasks import resolve_tasks

        out: list[Any] = list(resolve_tasks(tasks))
    else:
        if not isinstance(tasks, Sequence):
            tasks = [tasks]
        out = []
        plain = [t for t in tasks if isinstance(t, str)]
        resolved: dict[str, Any] = {}
        if plain:
            from ..tasks import resolve_tasks

            for t in resolve_tasks(list(plain)):
                resolved[t.name] = t
        for t in tasks:
            out.append(resolved.get(t, t) if isinstance(t, str) else t)
    if not out:
        raise ValueError("no tasks given; pass task names (e.g. ['country_capital', 'antonym']), 'all', or PromptBatches")
    names = [_task_name(t) for t in out]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"task(s) {', '.join(dup)} given more than once; pass each task once")
    return out


def _resolve_positions(positions: Any) -> tuple[str, int | None]:
    """-> (label, token class value or None). "final" (or "separator", "last") and the FINAL_SEP class
    are the same thing."""
    if isinstance(positions, str) and positions.lower() in FINAL_POSITION:
        return FINAL, None
    if isinstance(positions, str) and positions.lower() == ALL:
        return ALL, None
    try:
        from ..inputs.text import TokenClass
    except ImportError as err:  # pragma: no cover - prompts ships with tvlens
        raise ValueError(f"positions={positions!r} needs tvlens.inputs.text.TokenClass, which is unavailable: {err}") from err
    names = [c.name for c in TokenClass]
    cls = None
    if isinstance(positions, TokenClass):
        cls = positions
    elif isinstance(positions, str) and positions.upper() in names:
        cls = TokenClass[positions.upper()]
    if cls is None:
        raise ValueError(
            f"unknown positions {positions!r}; use 'final' (the final separator only; 'separator' says the same), 'all' (every non-pad token, "
            f"right-aligned) or a token class: {', '.join(n.lower() for n in names if n != 'PAD')}"
        )
    if cls.name == "PAD":
        raise ValueError("positions='pad' selects padding, which carries no activations; choose another token class")
    if cls.name == "FINAL_SEP":
        return FINAL, None
    return cls.name.lower(), int(cls)


def _prompt_chunks(model: Any, task: Any, *, n_prompts: int, n_shots: int, seed: int, prompt_kw: dict) -> Iterator[Any]:
    """The prompts ``head_means`` uses for ``task``, generated ``_PROMPT_CHUNK`` at a time."""
    if _is_prompt_batch(task):
        yield task
        return
    from ..inputs.text import icl_prompts

    done, i = 0, 0
    while done < n_prompts:
        n = min(_PROMPT_CHUNK, n_prompts - done)
        yield icl_prompts(model, task, n_prompts=n, n_shots=n_shots, seed=seed + i * _SEED_STRIDE, **prompt_kw)
        done += n
        i += 1


def _selection(mask: Tensor, token_class: Tensor, mode: str, cls: int | None) -> Tensor:
    if mode == FINAL:
        sel = torch.zeros_like(mask, dtype=torch.bool)
        sel[:, -1] = True
        return sel
    if mode == ALL:
        return mask.bool()
    return (token_class == cls) & mask.bool()


def head_means(
    model: Any,
    tasks: Any,
    *,
    n_prompts: int = N_PROMPTS,
    n_shots: int = 5,
    positions: Any = FINAL,
    batch_size: int | None = BATCH_SIZE,
    seed: int = 0,
    include_output: bool = False,
    layers: Sequence[int] | None = None,
    progress: bool = PROGRESS,
    executor: Any = None,
    **prompt_kw: Any,
) -> HeadStats:
    """Mean, variance and count of every head's ``hook_z`` over each task's ICL prompts.

    The task-mean head outputs are the "mean head activations" of Todd et al. 2024 (function
    vectors, §2.2, averaged over ten-shot prompts) and the per-task means of Hojel et al. 2024 (§3).

    Args:
        model: a tvlens / TransformerLens model (``tvlens.load_model``).
        tasks: task names, ``Task`` objects, a spec string (``"all"``, ``"family:knowledge"``,
            ``"a,b"``) or ready ``PromptBatch`` es (used as they are; ``n_prompts``/``n_shots``/
            ``seed`` then do not apply).
        n_prompts: prompts per task (>= 2, a variance needs two samples).
        n_shots: demonstrations per prompt.
        positions: ``"final"`` (or ``"separator"``) — the final separator (``→``) only, the position task vectors
            live at; ``"all"`` — every non-pad token, **aligned from the right** (index ``-1`` is the
            final separator, ``-2`` the query's last token, ...; a prompt shorter than a position
            does not count there); or a ``TokenClass`` name (``"demo_sep"``, ``"query_input"``, ...)
            — the tokens of that class, aligned by occurrence from the right (``-1`` = last one).
        batch_size: prompts per forward pass (``None``: the engine's plan decides; results do not
            depend on it beyond float rounding).
        seed: prompt sampling seed (prompt chunk ``i`` of 1024 uses ``seed + i * 1000003``).
        include_output: also accumulate the moments of each head's residual contribution
            ``z @ W_O`` (``[d_model]``).
        layers: restrict to these layers (default all); only their ``hook_z`` is hooked and the
            forward stops after the last of them.
        progress: show a tqdm bar.
        executor: where to run (:mod:`tvlens.runs.executors`): ``None`` — this process, the loop
            below; a ``RayExecutor`` — blocks of each task's prompts on the workers' replicas,
            merged exactly by Chan's update (:meth:`HeadStats.merge`). ``meta["executor"]`` says which.
        **prompt_kw: passed to ``icl_prompts`` (``separator=``, ``instruction=``, ...).

    Only ``blocks.{l}.attn.hook_z`` is hooked; each batch is one forward serving all layers and
    heads; moments are float64 and updated with Chan's parallel formula, so memory does not grow
    with ``n_prompts``.
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    task_list = _resolve_task_list(tasks)
    _check_int("n_prompts", n_prompts, 2, "a variance needs at least two prompts per task")
    _check_int("n_shots", n_shots, 0, "the number of demonstrations cannot be negative")
    batch_size = rows_per_forward(batch_size)
    mode, cls = _resolve_positions(positions)
    from ..inputs.text import PROMPT_OPTIONS, prompt_options

    prompt_options("head_means", {k: v for k, v in prompt_kw.items() if k in PROMPT_OPTIONS})  # before any forward
    layer_ids = _layer_ids(model, info, layers)
    for t in task_list:
        if _is_prompt_batch(t) and len(t) < 2:
            raise ValueError(f"PromptBatch for task {_task_name(t)!r} has {len(t)} prompt(s); a variance needs at least two")
    from ..runs.executors import executor_meta, splits

    if splits(executor):  # the same prompts, in blocks on the executor's workers
        from ..runs import distributed

        return distributed.head_means(model, task_list, executor=executor, n_prompts=n_prompts, n_shots=n_shots,
                                      mode=mode, positions=positions, batch_size=batch_size, seed=seed,
                                      include_output=include_output, layer_ids=layer_ids, progress=progress,
                                      prompt_kw=prompt_kw)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=sum(len(t) if _is_prompt_batch(t) else n_prompts for t in task_list), desc="head_means",
                   unit="prompt")
    reader = _MomentReader(model, info, layer_ids, mode, cls, include_output, batch_size, bar)
    try:
        per_task = [reader.task(task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, prompt_kw=prompt_kw)
                    for task in task_list]
    finally:
        if bar is not None:
            bar.close()
    # per task: z mean, z var, count, then the output moments when include_output
    columns = [list(c) for c in zip(*per_task)]
    if mode != FINAL:  # right-aligned position axes may differ per task: pad on the left
        columns = _left_padded(columns, positions)
    z_means, z_vars, counts, *outs = columns
    o_means, o_vars = outs or ([], [])
    meta = stats_meta(info, task_list, n_prompts=n_prompts, n_shots=n_shots, seed=seed, batch_size=batch_size,
                      prompt_kw=prompt_kw, executor=executor_meta(executor))
    return HeadStats(
        tasks=tuple(_task_name(t) for t in task_list), z_mean=torch.stack(z_means), z_var=torch.stack(z_vars),
        count=torch.stack(counts), positions=mode, layers=tuple(layer_ids),
        out_mean=torch.stack(o_means) if o_means else None, out_var=torch.stack(o_vars) if o_vars else None, meta=meta,
    )


def _layer_ids(model: Any, info: Any, layers: Sequence[int] | int | None) -> list[int]:
    """The layers to read, sorted and checked (all when ``None``)."""
    from ..hooks import check_layer

    if layers is None:
        return list(range(info.n_layers))
    layer_ids = sorted({check_layer(model, int(layer)) for layer in ([layers] if isinstance(layers, int) else layers)})
    if not layer_ids:
        raise ValueError("layers is empty; pass at least one layer or layers=None for all")
    return layer_ids


class _MomentReader:
    """Streams one task's prompts through the model and returns the moments of its heads' ``hook_z``
    (and of ``z @ W_O`` with ``include_output``): one forward per ``batch_size`` prompts, stopped
    after the last layer read, prompts built a chunk at a time so memory stays flat."""

    def __init__(self, model: Any, info: Any, layer_ids: list[int], mode: str, cls: int | None, include_output: bool,
                 batch_size: int, bar: Any):
        from ..hooks import device_of

        self.model, self.layer_ids, self.mode, self.cls, self.batch_size, self.bar = model, layer_ids, mode, cls, batch_size, bar
        self.device = device_of(model)
        self.shape_z = (len(layer_ids), info.n_heads, info.d_head)
        self.shape_o = (len(layer_ids), info.n_heads, info.d_model) if include_output else None
        self.w_o = (model.W_O.detach()[layer_ids].to(device=self.device, dtype=torch.float64)  # [layer, head, d_head, d_model]
                    if include_output else None)
        self.stop_at = layer_ids[-1] + 1 if layer_ids[-1] + 1 < info.n_layers else None

    def task(self, task: Any, *, n_prompts: int, n_shots: int, seed: int, prompt_kw: dict) -> tuple[Tensor, ...]:
        acc_z = _Moments(math.prod(self.shape_z), self.device)
        acc_o = _Moments(math.prod(self.shape_o), self.device) if self.shape_o else None
        bs = self.batch_size
        for batch in _prompt_chunks(self.model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, prompt_kw=prompt_kw):
            for i in range(0, len(batch), bs):
                _accumulate_batch(
                    self.model, batch.tokens[i:i + bs], batch.attention_mask[i:i + bs], batch.token_class[i:i + bs],
                    mode=self.mode, cls=self.cls, layer_ids=self.layer_ids, acc_z=acc_z, acc_o=acc_o, w_o=self.w_o,
                    stop_at=self.stop_at, extra=rows_inputs(batch, i, i + bs),
                )
                if self.bar is not None:
                    self.bar.update(min(bs, len(batch) - i))
            del batch  # free this prompt chunk before the next one is built
        per_position = self.mode != FINAL
        out = _finish(acc_z, self.shape_z, per_position=per_position)
        if acc_o is not None:
            out = (*out, *_finish(acc_o, self.shape_o, per_position=per_position)[:2])
        return out


def _left_padded(columns: list[list[Tensor]], positions: Any) -> list[list[Tensor]]:
    """Per-task moments whose right-aligned position axes differ, zero-padded on the left to the longest
    (z mean and var and the output moments along axis 2, counts along axis 0)."""
    p = max(z.shape[2] for z in columns[0])
    if p == 0:
        raise ValueError(f"no token of class {positions!r} in any prompt; choose a class these prompts contain")

    def lpad(x: Tensor, axis: int) -> Tensor:
        extra = p - x.shape[axis]
        if extra == 0:
            return x
        shape = list(x.shape)
        shape[axis] = extra
        return torch.cat([x.new_zeros(shape), x], dim=axis)

    return [[lpad(x, 0 if j == 2 else 2) for x in col] for j, col in enumerate(columns)]


@torch.no_grad()
def stats_meta(info: Any, task_list: Sequence[Any], *, n_prompts: int | None, n_shots: int, seed: int, batch_size: int,
               prompt_kw: Mapping[str, Any], executor: Mapping[str, Any]) -> dict[str, Any]:
    """What :class:`HeadStats` records of how it was made (the same wherever it ran: here or on an
    executor's workers); ready PromptBatches record what they hold."""
    from ..results import version

    given = [t for t in task_list if _is_prompt_batch(t)]
    if given:
        n_prompts = None if len(given) < len(task_list) else max(len(t) for t in given)
        n_shots = getattr(given[0], "n_shots", n_shots)
        seed = getattr(given[0], "seed", seed)
    return {
        "model": info.name, "config_hash": info.config_hash, "n_prompts": n_prompts, "n_shots": n_shots, "seed": seed,
        "batch_size": batch_size, "variance": "population", "tvlens_version": version(),
        "prompt_kw": {k: v for k, v in prompt_kw.items() if isinstance(v, (str, int, float, bool, type(None)))},
        "executor": dict(executor),
    }


def _accumulate_batch(
    model: Any, tokens: Tensor, mask: Tensor, token_class: Tensor, *, mode: str, cls: int | None,
    layer_ids: list[int], acc_z: _Moments, acc_o: _Moments | None, w_o: Tensor | None, stop_at: int | None,
    extra: dict[str, Tensor] | None = None,
) -> None:
    from ..engine.plan import memory_budget
    from ..engine.readout import read
    from ..hooks import act_name

    # drop columns that are padding in every row (left padding): fewer positions, same result
    keep = mask.bool().any(0)
    first = int(keep.nonzero()[0]) if bool(keep.any()) else mask.shape[1] - 1
    tokens, mask, token_class = tokens[:, first:], mask[:, first:], token_class[:, first:]
    sel = _selection(mask, token_class, mode, cls)
    if not bool(sel.any()):
        return
    rank = sel.flip(1).cumsum(1).flip(1) - 1  # 0 = last selected token of the row
    rows, cols = sel.nonzero(as_tuple=True)
    ranks = rank[rows, cols].to(torch.long)
    device = acc_z.device
    rows_d, cols_d = rows.to(device), cols.to(device)
    names = [act_name("z", layer) for layer in layer_ids]
    # [n, head, d_head] per layer, copied inside the hook (the full hook_z is freed as the pass goes on)
    grabbed, _ = read(model, tokens, mask, names, at=(rows_d, cols_d), stop_at_layer=stop_at, cast=torch.float64,
                      **(extra or {}))
    vals = torch.stack([grabbed[name] for name in names], dim=1)  # [n, layer, head, d_head]
    ranks = ranks.to(device)
    acc_z.add(ranks, vals.reshape(vals.shape[0], -1))
    if acc_o is not None:
        per_tok = w_o.shape[0] * w_o.shape[1] * w_o.shape[3]
        # the head outputs (z @ W_O, float64) are materialised a block of rows at a time, within the budget
        step = max(1, memory_budget(device) // (8 * per_tok))
        for j in range(0, vals.shape[0], step):
            out = torch.einsum("nlhd,lhdm->nlhm", vals[j:j + step], w_o)
            acc_o.add(ranks[j:j + step], out.reshape(out.shape[0], -1))


def _finish(acc: _Moments, shape: tuple[int, int, int], *, per_position: bool) -> tuple[Tensor, Tensor, Tensor]:
    """-> mean, population var in [layer, head, (pos,) feat] (pos in natural order: -1 last) and count."""
    count = acc.count.flip(0)  # rank -> right-aligned position
    mean = acc.mean.flip(0)
    var = _safe_div(acc.m2.flip(0), count.unsqueeze(-1))
    p = count.shape[0]
    mean = mean.reshape(p, *shape).permute(1, 2, 0, 3).cpu()
    var = var.reshape(p, *shape).permute(1, 2, 0, 3).cpu()
    count = count.round().to(torch.int64).cpu()
    if not per_position:
        return mean[:, :, 0], var[:, :, 0], count[0]
    return mean.contiguous(), var.contiguous(), count


# --------------------------------------------------------------------------------------------
# ρ_token
# --------------------------------------------------------------------------------------------


def rho_token(
    means: Float[Tensor, "task *cell d"],
    variances: Float[Tensor, "task *cell d"],
    counts: Tensor,
    *,
    eps: float = DEFAULT_EPS,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """ρ_token of Hojel et al. 2024 (§3) from per-task moments; returns ``(rho, total, within, degenerate)``.

    For every cell (a head, or a head at one position) with per-task means ``μ_j``, population
    variances ``σ²_j`` (per dimension ``e``) and counts ``n_j``::

        N = Σ_j n_j,   μ = Σ_j n_j μ_j / N
        Var(h_all)[e] = Σ_j n_j (σ²_j[e] + (μ_j[e] − μ[e])²) / N        (law of total variance: exact)
        total  = Σ_e Var(h_all)[e]
        within = (1/n) Σ_j Σ_e σ²_j[e]
        ρ = total / max(within, ε),   ε = eps · mean(total over all cells)

    **Zero within-task variance rule.** ``within`` is floored at ``ε``, a fraction ``eps``
    (default 1e-6) of the average total variance of all cells, so no inf/NaN is ever produced:
    a head whose output is a deterministic function of the task (``within == 0 < total``) gets a
    very large finite score and ranks first; a constant head (``total == within == 0``) gets 0.
    Cells whose ``within`` is at or below ``ε`` are flagged in ``degenerate``. ``eps=0`` is not
    allowed (it would reintroduce the division by zero). Cells outside the floor are exact.

    ``counts`` broadcasts against ``means`` without its last axis (``[task]`` or ``[task, *cell]``).
    """
    if not eps > 0:
        raise ValueError(f"eps={eps} must be > 0 (it floors a zero within-task variance); the default is {DEFAULT_EPS}")
    if means.shape != variances.shape:
        raise ValueError(f"means {tuple(means.shape)} and variances {tuple(variances.shape)} differ in shape")
    _check_task_count(means.shape[0])
    means = means.to(torch.float64)
    variances = variances.to(torch.float64)
    c = counts.to(torch.float64)
    while c.ndim < means.ndim - 1:
        c = c.unsqueeze(-1)
    c = c.unsqueeze(-1)  # [task, *cell, 1]
    n = c.sum(0)
    w = c / n.clamp_min(1e-300)
    mu = (w * means).sum(0)
    var_all = (w * (variances + (means - mu) ** 2)).sum(0)
    total = var_all.sum(-1)
    within = variances.sum(-1).mean(0)
    scale = float(total.mean()) if total.numel() else 0.0
    floor = eps * scale if scale > 0 else eps
    degenerate = within <= floor
    rho = total / within.clamp_min(floor)
    return rho, total, within, degenerate


@dataclass(frozen=True, eq=False)
class Taskness(WithMeta, LayerHeadGrid, Tabular):
    """ρ_token taskness (Hojel et al. 2024) per layer × head, and per position when collected.

    - ``scores``: ``[layer, head]`` float64 — the head score (mean of its token scores when
      several positions were collected).
    - ``per_position``: ``[layer, head, pos]`` (right-aligned, ``-1`` last) or ``None``; only the
      positions where every task has >= 2 samples are kept (``pos_index`` gives their offsets).
    - ``total_var`` / ``within_var``: numerator Σ_e Var(h_all) and denominator (1/n) Σ_j Σ_e Var(h_task_j),
      same shape as ``per_position`` (or ``scores``).
    - ``degenerate``: ``[layer, head]`` bool — within-task variance at the floor for some position
      (score saturated, see :func:`rho_token`).
    """

    scores: Float[Tensor, "layer head"]
    tasks: tuple[str, ...]
    layers: tuple[int, ...]
    positions: str
    total_var: Float[Tensor, "layer head *pos"]
    within_var: Float[Tensor, "layer head *pos"]
    degenerate: Bool[Tensor, "layer head"]
    per_position: Float[Tensor, "layer head pos"] | None = None
    pos_index: tuple[int, ...] = ()
    meta: ResultMeta = field(default_factory=ResultMeta)

    @property
    def grid(self) -> Tensor:
        return self.scores

    def __repr__(self) -> str:
        top = ", ".join(f"L{l}H{h}={s:.3g}" for l, h, s in self.top(3))
        return (f"Taskness(model={self.meta.get('model', '?')!r}, tasks={len(self.tasks)}, positions={self.positions!r}, "
                f"shape={tuple(self.scores.shape)}, top=[{top}])")

    def top(self, k: int = 10) -> list[tuple[int, int, float]]:
        """The ``k`` highest-scoring heads as ``(layer, head, score)``, best first (ties: lower layer, head)."""
        _check_int("k", k, 1, "ask for at least one head")
        flat = self.scores.reshape(-1)
        order = sorted(range(flat.numel()), key=lambda i: (-float(flat[i]), i))[:k]
        return [(self.layers[i // self.n_heads], i % self.n_heads, float(flat[i])) for i in order]

    def records(self) -> list[dict[str, Any]]:
        """One row per head: layer, head, score, total_var, within_var, degenerate."""
        rows = []
        tot = self.total_var if self.total_var.ndim == 2 else self.total_var.mean(-1)
        wit = self.within_var if self.within_var.ndim == 2 else self.within_var.mean(-1)
        for li, layer in enumerate(self.layers):
            for h in range(self.n_heads):
                rows.append({"layer": layer, "head": h, "score": float(self.scores[li, h]),
                             "total_var": float(tot[li, h]), "within_var": float(wit[li, h]),
                             "degenerate": bool(self.degenerate[li, h])})
        return rows

    def _title(self) -> str:
        model = str(self.meta.get("model") or "model")
        model = model.rstrip("/").rsplit("/", 1)[-1]  # a checkpoint path: its folder name
        shown: list[str] = []
        for t in self.tasks:  # keep the subtitle short enough for a small figure
            if len(", ".join(shown + [t])) > 48:
                break
            shown.append(t)
        tasks = ", ".join(shown) + (", …" if len(shown) < len(self.tasks) else "")
        where = "final separator" if self.positions == FINAL else f"positions: {self.positions}"
        return f"ρ_token taskness — {model}<br><sup>{where} · {len(self.tasks)} tasks: {tasks}</sup>"

    def plot(self, transpose: bool = False):
        """Layers × heads heatmap of the scores (``transpose=True``: blocks on x, heads on y, as in
        Hojel et al. 2024, Fig. 2). Saturated (degenerate) heads are drawn at the top of the colour scale."""
        from ..plot import layer_head_heatmap

        zmax = None
        if bool(self.degenerate.any()) and not bool(self.degenerate.all()):
            zmax = float(self.scores[~self.degenerate].max())
        title = self._title()
        if bool(self.degenerate.any()):
            title += f"<br><sup>{int(self.degenerate.sum())} head(s) with ~0 within-task variance (colour saturated)</sup>"
        return layer_head_heatmap(self.scores, title=title, zlabel="ρ_token", transpose=transpose, zmax=zmax,
                                  zmin=0.0 if zmax is not None else None, layers=self.layers)

    def plot_positions(self, head: int | None = None):
        """Layers × positions heatmap: ``head``'s token scores, or the mean over heads."""
        if self.per_position is None:
            raise ValueError("these scores hold one position; compute taskness with positions='all' or a token class")
        from ..plot import layer_position_heatmap

        vals = self.per_position.mean(1) if head is None else self.per_position[:, head]
        what = "mean over heads" if head is None else f"head {head}"
        return layer_position_heatmap(vals, [str(p) for p in self.pos_index], title=self._title() + f"<sup> · {what}</sup>",
                                      zlabel="ρ_token", xlabel="position (from the end)")

    def to_html(self, path: str | Path, transpose: bool = False) -> Path:
        """Standalone HTML heatmap (plotly.js embedded)."""
        from ..plot import save_figure

        return save_figure(self.plot(transpose), path, png=False)[0]

    def to_png(self, path: str | Path, transpose: bool = False) -> list[Path]:
        """Static PNG (kaleido); if PNG export is unavailable, warns and writes the HTML instead."""
        from ..plot import save_figure

        written = save_figure(self.plot(transpose), path, png=True, html=False)
        if not written:
            written = save_figure(self.plot(transpose), path, png=False)
        return written

    def save(self, path: str | Path) -> Path:
        from ..results import save_tensors

        tensors = {"scores": self.scores, "total_var": self.total_var, "within_var": self.within_var,
                   "degenerate": self.degenerate.to(torch.uint8)}
        if self.per_position is not None:
            tensors["per_position"] = self.per_position
        meta = {"kind": "Taskness", "tasks": list(self.tasks), "layers": list(self.layers), "positions": self.positions,
                "pos_index": list(self.pos_index), "meta": self.meta.to_dict()}
        return save_tensors(path, tensors, meta)

    @classmethod
    def load(cls, path: str | Path) -> "Taskness":
        from ..results import load_tensors

        t, meta = load_tensors(path)
        if meta.get("kind") != "Taskness":
            raise ValueError(f"{str(path)!r} holds a {meta.get('kind', 'unknown')!r} result, not Taskness")
        return cls(t["scores"], tuple(meta["tasks"]), tuple(meta["layers"]), final_alias(meta["positions"]), t["total_var"],
                   t["within_var"], t["degenerate"].bool(), t.get("per_position"), tuple(meta.get("pos_index", ())),
                   dict(meta.get("meta", {})))


def taskness(model: Any, tasks: Any = None, *, eps: float = DEFAULT_EPS, **kw: Any) -> Taskness:
    """ρ_token taskness of every head (Hojel et al. 2024, "Finding Visual Task Vectors", §3).

    ``ρ(i) = Σ_e Var(h_all^i[e]) / ((1/n) Σ_j Σ_e Var(h_task_j^i[e]))`` — the variance of head
    ``i``'s activation pooled over all ``n`` tasks' prompts over its average within-task variance
    (population variances, pooled exactly from per-task moments; see :func:`rho_token` for the
    zero-variance rule). With several positions (``positions="all"`` or a token class) every
    position is scored separately and a head's score is the mean of its token scores, over the
    positions where every task has at least two samples.

    ``model``: a model (then ``head_means(model, tasks, **kw)`` is computed first; ``kw``
    takes its options, ``executor=`` among them) or a ``HeadStats`` (``tasks`` optionally selects a
    subset of its tasks). At least two tasks are needed.
    """
    if isinstance(model, HeadStats):
        if kw:
            raise TypeError(f"taskness(HeadStats) takes no head_means options, got {', '.join(kw)}")
        stats = model if tasks is None else model.select(_resolve_task_list(tasks))
    else:
        task_list = _resolve_task_list(tasks)
        if len(task_list) < 2 and any(hasattr(t, "tokens") for t in task_list):
            one = getattr(task_list[0], "task", None)
            raise ValueError(
                f"ρ_token compares tasks, but tasks is one PromptBatch (the prompts of one task{f', {one!r}' if one else ''}); "
                "pass one PromptBatch per task in a list, e.g. [tvlens.icl_prompts(model, 'antonym'), "
                "tvlens.icl_prompts(model, 'country_capital')], or task names")
        _check_task_count(len(task_list))
        if not eps > 0:
            raise ValueError(f"eps={eps} must be > 0 (it floors a zero within-task variance); the default is {DEFAULT_EPS}")
        stats = head_means(model, task_list, **kw)
    return taskness_from_stats(stats, eps=eps)


def _check_task_count(n_tasks: int) -> None:
    """Refuse fewer than two tasks: ρ_token is a between-task over within-task variance ratio (Hojel et al. 2024, §3.1)."""
    if n_tasks < 2:
        raise ValueError(f"ρ_token compares tasks: it needs at least 2 tasks, got {n_tasks}; pass more tasks")


def taskness_from_stats(stats: HeadStats, *, eps: float = DEFAULT_EPS) -> Taskness:
    _check_task_count(stats.n_tasks)
    meta = {k: stats.meta.get(k) for k in ("model", "config_hash", "n_prompts", "n_shots", "seed", "tvlens_version",
                                           "executor")}
    meta["eps"] = eps
    if not stats.per_position:
        if int(stats.count.min()) < 2:
            raise ValueError(f"every task needs >= 2 samples for a variance; counts are {stats.count.tolist()}")
        rho, total, within, degen = rho_token(stats.z_mean, stats.z_var, stats.count, eps=eps)
        return Taskness(rho, stats.tasks, stats.layers, stats.positions, total, within, degen, meta=meta)
    valid = (stats.count >= 2).all(0)  # [pos]
    if not bool(valid.any()):
        raise ValueError(f"no position has >= 2 samples in every task (positions={stats.positions!r}); use more prompts")
    idx = valid.nonzero().squeeze(1)
    p = stats.n_positions
    means = stats.z_mean[:, :, :, idx]
    variances = stats.z_var[:, :, :, idx]
    counts = stats.count[:, idx].view(stats.n_tasks, 1, 1, -1)
    rho, total, within, degen = rho_token(means, variances, counts, eps=eps)
    pos_index = tuple(int(i) - p for i in idx)
    meta["positions_scored"] = len(pos_index)
    return Taskness(rho.mean(-1), stats.tasks, stats.layers, stats.positions, total, within, degen.any(-1),
                    per_position=rho, pos_index=pos_index, meta=meta)


# --------------------------------------------------------------------------------------------
# validation: do high-ρ heads carry the task?
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class TasknessValidation(Saved, WithMeta, Tabular):
    """Zero-shot accuracy after patching task-mean head outputs at the final position.

    ``top_acc[task, k]``: top-k ρ heads patched; ``random_acc[task, k, draw]``: k random heads;
    ``zero_shot[task]``: no patch; ``icl[task]``: the ``n_shots``-shot ICL accuracy for reference.
    """

    ks: tuple[int, ...]
    tasks: tuple[str, ...]
    top_acc: Float[Tensor, "task k"]
    random_acc: Float[Tensor, "task k draw"]
    zero_shot: Float[Tensor, " task"]
    icl: Float[Tensor, " task"]
    meta: ResultMeta = field(default_factory=ResultMeta)

    def records(self) -> list[dict[str, Any]]:
        """One row per (task, k): top-k ρ accuracy, random-k's mean and spread over draws, and the task's
        zero-shot and ICL accuracy."""
        return [{"task": task, "k": k, "top_acc": float(self.top_acc[t, j]), "random_acc": float(self.random_acc[t, j].mean()),
                 "random_std": float(self.random_acc[t, j].std(unbiased=False)), "zero_shot": float(self.zero_shot[t]),
                 "icl": float(self.icl[t])} for t, task in enumerate(self.tasks) for j, k in enumerate(self.ks)]

    def summary(self) -> str:
        lines = [f"{'k':>4} {'top-k ρ':>9} {'random (mean±sd over draws)':>30}"]
        for i, k in enumerate(self.ks):
            r = self.random_acc[:, i].mean(0)  # per draw, mean over tasks
            lines.append(f"{k:>4} {float(self.top_acc[:, i].mean()):>9.3f} {float(r.mean()):>18.3f} ± {float(r.std(unbiased=False)):.3f}")
        lines.append(f"zero-shot {float(self.zero_shot.mean()):.3f}   ICL ({self.meta.get('n_shots')}-shot) {float(self.icl.mean()):.3f}")
        return "\n".join(lines)

    def plot(self):
        from ..plot import line_plot

        rnd = self.random_acc.mean(0)  # [k, draw]
        return line_plot(
            list(self.ks),
            {"top-k ρ heads": self.top_acc.mean(0), f"k random heads (mean of {rnd.shape[1]})": rnd.mean(1)},
            errors={f"k random heads (mean of {rnd.shape[1]})": rnd.std(1, unbiased=False)},
            hlines={"zero-shot": float(self.zero_shot.mean()), "ICL": float(self.icl.mean())},
            title=(f"Task-mean head outputs patched into zero-shot prompts<br><sup>"
                   f"{str(self.meta.get('model', '')).rstrip('/').rsplit('/', 1)[-1]} — "
                   f"{len(self.tasks)} task(s), final position</sup>"),
            xlabel="k heads patched", ylabel="first-token accuracy (mean over tasks)",
        )

    def to_html(self, path: str | Path) -> Path:
        from ..plot import save_figure

        return save_figure(self.plot(), path, png=False)[0]


@torch.no_grad()
def validate_taskness(
    model: Any,
    scores: Taskness,
    stats: HeadStats,
    tasks: Any = None,
    *,
    ks: Sequence[int] = (4, 8, 16),
    n_random: int = 10,
    n_prompts: int = 50,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    fast: bool = True,
    **prompt_kw: Any,
) -> TasknessValidation:
    """Patch the top-k ρ heads' task-mean ``z`` (from ``stats``, final position) into zero-shot
    prompts and compare first-token accuracy with patching k random heads (``n_random`` draws,
    ``torch.Generator(seed)``) — the check that a high ρ marks heads that carry the task
    (the mean-head patching of Todd et al. 2024 §2.3, restricted to the final token).

    All head sets are evaluated as columns of one :class:`tvlens.engine.PatchRunner` pass per task
    (``fast=False``: whole hooked forwards, head sets along the batch axis; same numbers). A prompt
    counts when its top token starts any accepted answer (:func:`tvlens.metrics.accepted_metric`).
    ``**prompt_kw``: how the prompts are written (``separator``, ``example_sep``, ``prepend_bos``;
    :func:`tvlens.inputs.text.prompt_options`)."""
    from ..engine.readout import final_logits
    from ..engine.runner import PatchRunner
    from ..engine.sites import replace_heads
    from ..models import ModelInfo
    from ..inputs.text import icl_prompts, prompt_options
    from ..metrics import accepted_ids, accepted_metric

    prompt_kw = prompt_options("validate_taskness", prompt_kw)
    info = ModelInfo.of(model)
    if stats.meta.get("config_hash") not in (None, info.config_hash):
        raise ValueError("these HeadStats come from another model; recompute them with head_means(model, ...)")
    task_list = _resolve_task_list(tasks if tasks is not None else list(stats.tasks))
    final = stats if not stats.per_position else stats.at_position(-1)
    if final.positions not in (FINAL,) and not stats.positions == ALL:
        raise ValueError(f"validation patches the final separator, but these stats hold positions={stats.positions!r}; "
                         "compute head_means with positions='separator' or 'all'")
    n_cells = scores.n_layers * scores.n_heads
    ks = tuple(int(k) for k in ks)
    for k in ks:
        if not 1 <= k <= n_cells:
            raise ValueError(f"k={k} is out of range: the scores cover {n_cells} heads; use 1..{n_cells}")
    _check_int("n_random", n_random, 1, "average over at least one random draw (10 or more give a stable baseline)")
    gen = torch.Generator().manual_seed(seed)
    random_sets = {k: [torch.randperm(n_cells, generator=gen)[:k].tolist() for _ in range(n_random)] for k in ks}
    ranked = [(scores.layers.index(l), h) for l, h, _ in scores.top(max(ks))]
    layer_pos = {layer: i for i, layer in enumerate(final.layers)}

    # one column per head set: for each k, the top-k set then the n_random random sets
    columns: list[list[tuple[int, int]]] = []
    for k in ks:
        columns.append(ranked[:k])
        columns.extend([(c // scores.n_heads, c % scores.n_heads) for c in cells] for cells in random_sets[k])
    masks = torch.zeros(len(columns), scores.n_layers, scores.n_heads)
    for ci, cells in enumerate(columns):
        for li, h in cells:
            masks[ci, li, h] = 1.0
    used = [li for li in range(scores.n_layers) if bool(masks[:, li].any())]
    for li in used:
        if scores.layers[li] not in layer_pos:
            raise ValueError(f"layer {scores.layers[li]} of the scores has no mean in these stats (layers {final.layers})")

    def correct(batch: Any) -> Tensor:
        """[batch] first-token correctness of the unpatched model."""
        logits = final_logits(model, batch.tokens, batch.attention_mask, batch_size=batch_size)
        return accepted_metric(logits, accepted_ids(batch).to(logits.device), "accuracy").cpu()

    def patched_correct(batch: Any, means: Tensor) -> Tensor:
        """[batch, column] correctness, every head set one column of the engine's runner."""
        runner = PatchRunner(model, batch, fast="auto" if fast else False)
        edits = [replace_heads(scores.layers[li], masks[:, li], means[layer_pos[scores.layers[li]]]) for li in used]
        accepted = accepted_ids(batch).to(runner.device)[:, None, :]  # [batch, 1 (column), accepted]
        return runner.map(edits, lambda lg: accepted_metric(lg, accepted, "accuracy"), len(columns)).cpu()

    top = torch.zeros(len(task_list), len(ks))
    rnd = torch.zeros(len(task_list), len(ks), n_random)
    zero = torch.zeros(len(task_list))
    icl = torch.zeros(len(task_list))
    n_shots = int(stats.meta.get("n_shots") or 5)
    for ti, task in enumerate(task_list):
        name = _task_name(task)
        means = final.mean(name)  # [layer, head, d_head]
        zs = icl_prompts(model, task, n_prompts=n_prompts, n_shots=0, seed=seed + 17, **prompt_kw)
        zero[ti] = correct(zs).mean()
        icl[ti] = correct(icl_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed + 17, **prompt_kw)).mean()
        acc = patched_correct(zs, means).mean(0).view(len(ks), 1 + n_random)
        top[ti], rnd[ti] = acc[:, 0], acc[:, 1:]
    meta = {"model": info.name, "config_hash": info.config_hash, "n_prompts": n_prompts, "seed": seed,
            "n_shots": stats.meta.get("n_shots"), "n_random": n_random}
    return TasknessValidation(ks, tuple(_task_name(t) for t in task_list), top, rnd, zero, icl, meta)
