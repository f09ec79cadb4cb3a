"""Fine-tuning a copy of a model on tvlens prompts: the θ_ft behind a weight-space task vector.

Ilharco et al. 2023 ("Editing Models with Task Arithmetic", §2) build a task vector from a model
fine-tuned on the task: ``τ = θ_ft − θ_pre``. :func:`finetune` trains a *deep copy* of the model
(the caller's weights are never touched) on prompts built by :func:`tvlens.icl_prompts` from the
**train** split of one task or a mixture of tasks — zero-shot ``"x →"`` prompts by default, or
few-shot ones (``n_shots=(0, 5)`` mixes both) — and returns the fine-tuned model with its
:class:`~tvlens.vectors.weights.WeightVector`.

- ``method="full"``: every parameter is trained (fine for small models such as the organism);
- ``method="lora"``: low-rank adapters (Hu et al. 2022) injected by ``peft`` into the linear
  layers of the blocks; the vector is peft's own delta ``scaling · B A`` per adapted weight.
- ``loss="first_token"``: cross-entropy of the answer's first token at the final separator (what
  tvlens's accuracy scores); ``loss="answer"``: teacher forcing over every answer token.

The models are TransformerLens bridges whose parameters are those of the wrapped Hugging Face
module (``model.original_model``): the deep copy of the bridge is trained as it is (its forward is
the HF forward), LoRA adapters are injected into the copy's ``original_model``, and the returned
model is again a bridge loaded by :func:`tvlens.load_model` (for LoRA, a copy of the base with the
delta added), so nothing is re-loaded from disk and every tvlens function runs on it.

Training is deterministic for a ``seed`` (own ``torch.Generator`` for batches; peft's adapter
initialisation under a seeded, forked global RNG; dropout off), runs on the model's device (or
``device=``), shows a tqdm bar, and logs zero-shot and ICL accuracy on the dev split at the start,
every ``eval_every`` steps and at the end.
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from jaxtyping import Float
from torch import Tensor

from ..checks import check_float, check_int as _check_int
from ..results import ResultMeta, Tabular
from .weights import WeightVector, _figure_page, apply, weights_digest

__all__ = ["FineTuned", "finetune", "peft_model", "lora_layers", "lora_targets", "METHODS", "LOSSES"]

METHODS = ("full", "lora")
LOSSES = ("first_token", "answer")
_LOG = logging.getLogger("tvlens.finetune")
_NOT_ADAPTED = ("lm_head", "embed", "wte", "wpe", "unembed")


@dataclass(frozen=True, eq=False)
class FineTuned(Tabular):
    """A fine-tuned copy of a model and its weight task vector.

    - ``model``: the fine-tuned model (a new object; for LoRA the base with the adapter merged);
    - ``vector``: ``τ = θ_ft − θ_base`` (:class:`~tvlens.vectors.weights.WeightVector`);
    - ``loss``: ``[step]`` training loss; ``eval_steps``: steps at which the dev split was scored;
    - ``zero_shot`` / ``icl``: ``[eval, task]`` first-token accuracy on the dev split, zero-shot
      and with ``meta.extra["eval_shots"]`` demonstrations.
    """

    model: Any
    vector: WeightVector
    tasks: tuple[str, ...]
    loss: Float[Tensor, " step"]
    eval_steps: tuple[int, ...]
    zero_shot: Float[Tensor, "eval task"]
    icl: Float[Tensor, "eval task"]
    n_trained: int
    seconds: float
    meta: ResultMeta = field(default_factory=ResultMeta)

    def __repr__(self) -> str:
        zs = ", ".join(f"{t} {a:.2f}" for t, a in zip(self.tasks, self.zero_shot[-1].tolist()))
        return (f"FineTuned(tasks={list(self.tasks)}, method={self.meta.extra.get('method')!r}, steps={len(self.loss)}, "
                f"n_trained={self.n_trained}, dev zero-shot: {zs}, {self.seconds:.1f}s)")

    def records(self) -> list[dict[str, Any]]:
        """One row per (eval step, task): dev zero-shot and ICL accuracy."""
        return [dict(step=s, task=t, zero_shot=float(self.zero_shot[i, j]), icl=float(self.icl[i, j]))
                for i, s in enumerate(self.eval_steps) for j, t in enumerate(self.tasks)]

    def plot(self, *, title: str | None = None) -> Any:
        """Training loss and dev accuracy (zero-shot solid, ICL dashed) against the step."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        fig = make_subplots(rows=1, cols=2, subplot_titles=["training loss", "dev accuracy"])
        fig.add_trace(go.Scatter(y=self.loss.tolist(), x=list(range(1, len(self.loss) + 1)), name="loss"), row=1, col=1)
        for j, t in enumerate(self.tasks):
            fig.add_trace(go.Scatter(x=list(self.eval_steps), y=self.zero_shot[:, j].tolist(), name=f"{t} zero-shot",
                                     mode="lines+markers"), row=1, col=2)
            fig.add_trace(go.Scatter(x=list(self.eval_steps), y=self.icl[:, j].tolist(), name=f"{t} ICL",
                                     mode="lines+markers", line=dict(dash="dash")), row=1, col=2)
        fig.update_layout(template="plotly_white", width=1000, height=420,
                          title=dict(text=title or f"fine-tuning {self.meta.model} ({self.meta.extra.get('method')})", x=0.5))
        return fig

    def to_html(self, path: str | Path) -> Path:
        return _figure_page(path, self.plot(), self.to_frame(), "Fine-tuning")


# ----------------------------------------------------------------------------------------------
# peft plumbing (shared with tvlens.vectors.weights.merge)


def _hf_module(model: Any) -> Any:
    hf = getattr(model, "original_model", None)
    return hf if hf is not None else model


def lora_targets(model: Any) -> list[str]:
    """Names of the linear layers LoRA adapts by default: every ``nn.Linear`` (or GPT-2 ``Conv1D``)
    of the model except the embedding and the unembedding."""
    kinds: tuple[type, ...] = (torch.nn.Linear,)
    try:
        from transformers.pytorch_utils import Conv1D

        kinds += (Conv1D,)
    except ImportError:  # pragma: no cover
        pass
    names = [n for n, m in _hf_module(model).named_modules()
             if isinstance(m, kinds) and not any(k in n for k in _NOT_ADAPTED)]
    if not names:
        raise ValueError(f"found no linear layer to adapt in {type(model).__name__}; pass target_modules=[...] "
                         "(module names from model.named_modules()) or use method='full'")
    return names


def peft_model(model: Any, *, rank: int, lora_alpha: float, target_modules: Sequence[str] | str, adapter: str = "default",
               existing: Any = None) -> Any:
    """Inject a LoRA adapter with ``peft`` into the Hugging Face module inside ``model`` (in place:
    pass a copy). With ``existing`` (a PeftModel on the same module), add ``adapter`` to it."""
    from peft import LoraConfig, get_peft_model

    cfg = LoraConfig(r=int(rank), lora_alpha=float(lora_alpha), lora_dropout=0.0, bias="none",
                     target_modules=target_modules if isinstance(target_modules, str) else list(target_modules))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if existing is not None:
            existing.add_adapter(adapter, cfg)
            return existing
        return get_peft_model(_hf_module(model), cfg, adapter_name=adapter)


def lora_layers(pm: Any) -> dict[str, Any]:
    """The LoRA layers of a PeftModel by module name (the names of the base model's modules)."""
    from peft.tuners.lora import LoraLayer

    return {n: m for n, m in pm.get_base_model().named_modules() if isinstance(m, LoraLayer)}


# ----------------------------------------------------------------------------------------------
# checks and data


def _check_tasks(task_list: Sequence[Any], shots: Sequence[int], min_train_pairs: int) -> None:
    for t in task_list:
        n = len({x for x, _ in t.split("train")})
        if n < min_train_pairs:
            raise ValueError(f"task {t.name!r} has {n} distinct inputs in its train split, fewer than the "
                             f"{min_train_pairs} fine-tuning needs; use a task with more pairs or lower min_train_pairs")
        if max(shots) >= n:
            raise ValueError(f"task {t.name!r} has {n} train inputs, too few for {max(shots)}-shot training prompts "
                             f"(the query is left out of its demos); use n_shots < {n}")


def _rows(batches: Sequence[Any]) -> list[tuple[list[int], tuple[int, ...]]]:
    """(prompt tokens without padding, answer tokens) of every prompt of ``batches``."""
    out = []
    for b in batches:
        for r in range(len(b)):
            out.append((b.tokens[r][b.attention_mask[r].bool()].tolist(), tuple(b.answer_tokens[r])))
    return out


def _collate(rows: Sequence[tuple[list[int], tuple[int, ...]]], loss: str, pad: int) -> tuple[Tensor, Tensor, Tensor]:
    """Left-padded tokens, mask, and targets ``[batch, pos]`` (-100 where nothing is predicted)."""
    seqs = [p + list(a[:-1]) if loss == "answer" else p for p, a in rows]
    width = max(len(s) for s in seqs)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros_like(tokens)
    targets = torch.full_like(tokens, -100)
    for i, (s, (_, a)) in enumerate(zip(seqs, rows)):
        tokens[i, width - len(s):] = torch.tensor(s)
        mask[i, width - len(s):] = 1
        answer = list(a) if loss == "answer" else [a[0]]
        targets[i, width - len(answer):] = torch.tensor(answer)
    return tokens, mask, targets


def _dev_scores(model: Any, batches: Sequence[tuple[Any, Any]]) -> tuple[list[float], list[float]]:
    from ..inputs.text import evaluate_prompts

    zs = [evaluate_prompts(model, z).first_token for z, _ in batches]
    icl = [evaluate_prompts(model, k).first_token for _, k in batches]
    return zs, icl


# ----------------------------------------------------------------------------------------------
# the fine-tune


def finetune(
    model: Any,
    tasks: Any,
    *,
    method: str = "full",
    steps: int = 150,
    lr: float | None = None,
    batch_size: int = 32,
    n_prompts: int = 64,
    n_shots: int | Sequence[int] = 0,
    loss: str = "first_token",
    rank: int = 4,
    lora_alpha: float | None = None,
    target_modules: Sequence[str] | str | None = None,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: str | torch.device | None = None,
    progress: bool = True,
    eval_every: int | None = None,
    n_eval_prompts: int = 16,
    eval_shots: int = 5,
    min_train_pairs: int = 8,
) -> FineTuned:
    """Fine-tune a copy of ``model`` on ``tasks`` (one task or a mixture) and return it with its
    weight task vector ``τ = θ_ft − θ`` (Ilharco et al. 2023, §2).

    Training prompts: for every task and every ``k`` in ``n_shots``, ``n_prompts`` ``k``-shot prompts
    from :func:`tvlens.icl_prompts` with train-split queries and demos (seed ``seed``), pooled;
    each step draws ``batch_size`` of them (own ``torch.Generator(seed)``) and takes one AdamW step
    (``lr`` defaults to 3e-4 for ``method="full"`` and 3e-3 for ``"lora"``) on ``loss``. The dev
    split's zero-shot and ``eval_shots``-shot accuracy are logged. ``model`` is deep-copied first
    and never changed. All arguments and prompts are checked before the copy is made.
    """
    from ..tasks import resolve_tasks

    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; use 'full' (every weight) or 'lora' (peft adapters)")
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; use 'first_token' or 'answer' (teacher forcing over the answer)")
    steps = _check_int("steps", steps, 1)
    batch_size = _check_int("batch_size", batch_size, 1)
    n_prompts = _check_int("n_prompts", n_prompts, 1)
    seed = _check_int("seed", seed, 0)
    rank = _check_int("rank", rank, 1)
    eval_shots = _check_int("eval_shots", eval_shots, 0)
    n_eval_prompts = _check_int("n_eval_prompts", n_eval_prompts, 1)
    min_train_pairs = _check_int("min_train_pairs", min_train_pairs, 1)
    eval_every = steps if eval_every is None else _check_int("eval_every", eval_every, 1)
    lr = check_float("lr", (3e-4 if method == "full" else 3e-3) if lr is None else lr, 0.0, strict=True)
    weight_decay = check_float("weight_decay", weight_decay)
    alpha = check_float("lora_alpha", 2.0 * rank if lora_alpha is None else lora_alpha, 0.0, strict=True)
    shots = [n_shots] if isinstance(n_shots, int) else list(n_shots)
    if not shots:
        raise ValueError("n_shots is empty; pass 0 (zero-shot prompts), 5, or a list such as (0, 5)")
    shots = [_check_int("n_shots", k, 0) for k in shots]
    task_list = resolve_tasks(tasks)
    _check_tasks(task_list, shots, min_train_pairs)

    train, dev = _finetune_prompts(model, task_list, shots, n_prompts=n_prompts, n_eval_prompts=n_eval_prompts,
                                   eval_shots=eval_shots, seed=seed)
    targets = None
    if method == "lora":
        targets = lora_targets(model) if target_modules is None else target_modules

    t0 = time.perf_counter()
    work = copy.deepcopy(model)
    if device is not None:
        work = work.to(device)
    work.eval()  # dropout off: the same seed gives the same weights
    params, pm = _trainable(work, method, seed=seed, rank=rank, lora_alpha=alpha, target_modules=targets)
    n_trained = sum(p.numel() for p in params)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    curves = _train(work, opt, train, dev, task_list, method=method, steps=steps, batch_size=batch_size, loss=loss,
                    eval_every=eval_every, eval_shots=eval_shots, seed=seed, progress=progress)
    for p in work.parameters():
        p.requires_grad_(False)

    extra = dict(method=method, steps=steps, lr=lr, batch_size=batch_size, n_prompts=n_prompts, n_shots=shots, loss=loss,
                 weight_decay=weight_decay, n_trained=n_trained, eval_shots=eval_shots, source="ilharco2023")
    if method == "lora":
        extra.update(rank=rank, lora_alpha=alpha)
        vector = _lora_vector(model, pm, task_list, seed, extra)
        tuned = apply(model, vector)
    else:
        vector = WeightVector.between(model, work, task=_label(task_list), kind="full", seed=seed, **extra)
        tuned = work
    meta = ResultMeta.for_model(model, tasks=[t.name for t in task_list], seed=seed, **extra)
    return FineTuned(model=tuned, vector=vector, tasks=tuple(t.name for t in task_list), **curves,
                     n_trained=n_trained, seconds=time.perf_counter() - t0, meta=meta)


def _finetune_prompts(model: Any, task_list: Sequence[Any], shots: Sequence[int], *, n_prompts: int, n_eval_prompts: int,
                      eval_shots: int, seed: int) -> tuple[list[Any], list[tuple[Any, Any]]]:
    """The training prompts (``n_prompts`` train-split ``k``-shot prompts per task and ``k``) and, per
    task, the dev split's zero-shot prompts with their ``eval_shots``-shot twins (same queries)."""
    from ..inputs.text import icl_prompts

    train = [icl_prompts(model, t, n_prompts=n_prompts, n_shots=k, split="train", seed=seed) for t in task_list for k in shots]
    dev = []
    for t in task_list:
        n = min(n_eval_prompts, len({x for x, _ in t.split("dev")}))
        z = icl_prompts(model, t, n_prompts=n, n_shots=0, split="dev", seed=seed)
        dev.append((z, icl_prompts(model, t, queries=list(zip(z.queries, z.answers)), n_shots=eval_shots, seed=seed)))
    return train, dev


def _trainable(work: Any, method: str, *, seed: int, rank: int, lora_alpha: float,
               target_modules: Any) -> tuple[list[torch.nn.Parameter], Any]:
    """The parameters ``method`` trains in the copy ``work`` (every weight, or fresh LoRA adapters seeded
    by ``seed`` under a private RNG), and the peft model holding the adapters (``None`` for ``"full"``)."""
    if method == "full":
        params = list(work.parameters())
        for p in params:
            p.requires_grad_(True)
        return params, None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pm = peft_model(work, rank=rank, lora_alpha=lora_alpha, target_modules=target_modules)
    return [p for p in work.parameters() if p.requires_grad], pm


def _train(work: Any, opt: torch.optim.Optimizer, train: Sequence[Any], dev: Sequence[tuple[Any, Any]],
           task_list: Sequence[Any], *, method: str, steps: int, batch_size: int, loss: str, eval_every: int,
           eval_shots: int, seed: int, progress: bool) -> dict[str, Any]:
    """``steps`` AdamW steps on minibatches drawn by ``torch.Generator(seed)``; the dev scores at step 0,
    every ``eval_every`` steps and at the end. Returns FineTuned's curves (loss, eval_steps, zero_shot, icl)."""
    from tqdm.auto import tqdm

    rows = _rows(train)
    pad = int(train[0].options.get("pad_token_id", 0))
    device = next(work.parameters()).device
    gen = torch.Generator().manual_seed(seed)
    losses: list[float] = []
    evals: list[int] = []
    zs_log: list[list[float]] = []
    icl_log: list[list[float]] = []

    def log(step: int) -> None:
        with torch.no_grad():
            zs, icl = _dev_scores(work, dev)
        evals.append(step)
        zs_log.append(zs)
        icl_log.append(icl)
        _LOG.info("step %d: dev zero-shot %s, %d-shot %s", step, _fmt(task_list, zs), eval_shots, _fmt(task_list, icl))

    log(0)
    bar = tqdm(range(1, steps + 1), desc=f"fine-tune ({method})", disable=not progress, leave=False)
    for step in bar:
        idx = torch.randperm(len(rows), generator=gen)[:batch_size].tolist()
        tokens, mask, tgt = _collate([rows[i] for i in idx], loss, pad)
        logits = work(tokens.to(device), attention_mask=mask.to(device))
        value = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), tgt.to(device).reshape(-1),
                                ignore_index=-100)
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        losses.append(value.item())
        bar.set_postfix(loss=f"{losses[-1]:.3f}")
        if step % eval_every == 0 or step == steps:
            log(step)
    return dict(loss=torch.tensor(losses), eval_steps=tuple(evals), zero_shot=torch.tensor(zs_log),
                icl=torch.tensor(icl_log))


def _label(task_list: Sequence[Any]) -> str:
    return task_list[0].name if len(task_list) == 1 else "+".join(t.name for t in task_list)


def _fmt(task_list: Sequence[Any], values: Sequence[float]) -> str:
    return ", ".join(f"{t.name} {v:.2f}" for t, v in zip(task_list, values))


def _lora_vector(base: Any, pm: Any, task_list: Sequence[Any], seed: int, extra: Mapping[str, Any]) -> WeightVector:
    """The LoRA delta of every adapted weight, as peft computes it (``get_delta_weight``).

    peft's ``merge_and_unload`` is not used: it swaps modules of the bridge's wrapped model for
    plain ones and so detaches them from the bridge's hook points; the delta is added by
    :func:`~tvlens.vectors.weights.apply` instead.
    """
    base_params = dict(base.named_parameters())
    deltas, factors = {}, {}
    with torch.no_grad():
        for mod, layer in lora_layers(pm).items():
            name = f"{mod}.weight"
            if name not in base_params:
                raise RuntimeError(f"peft adapted {mod!r}, which has no weight {name!r} in the base model")
            deltas[name] = layer.get_delta_weight("default").detach().float().cpu()
            factors[name] = (layer.lora_A["default"].weight.detach().float().cpu(),
                             layer.lora_B["default"].weight.detach().float().cpu(), float(layer.scaling["default"]))
    meta = ResultMeta.for_model(base, tasks=[t.name for t in task_list], seed=seed, **extra)
    return WeightVector(deltas=deltas, task=_label(task_list), kind="lora", meta=meta, lora=factors,
                        base_digests={n: weights_digest(base_params[n]) for n in deltas})
