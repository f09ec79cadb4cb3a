"""Slow, obvious implementations of tvlens.vectors.activation, for tests and benchmarks to compare against.

``naive_layer_sweep`` is Hendel et al. 2023's sweep written as the plain loop: for every task and
every layer, extract the task vector with one ``run_with_hooks`` per prompt batch (full forward,
hook on ``blocks.{L}.hook_resid_pre``), then run the zero-shot prompts of each split with one
``run_with_hooks`` per batch that replaces the final position at that layer. Baselines: one plain
forward per batch. Prompts are built exactly as ``tvlens.vectors.activation.layer_sweep`` documents.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from tvlens.hooks import act_name
from tvlens.inputs.text import icl_prompts
from tvlens.tasks import resolve_tasks


def _score(logits_last: torch.Tensor, answer_ids: torch.Tensor) -> torch.Tensor:
    ok = (logits_last.argmax(-1) == answer_ids).float()
    lp = logits_last.float().log_softmax(-1).gather(-1, answer_ids[:, None])[:, 0]
    return torch.stack([ok, lp], -1)


def naive_task_vector(model: Any, batch: Any, layer: int, batch_size: int = 64) -> torch.Tensor:
    """Mean final-position residual entering block ``layer``: one full ``run_with_hooks`` per chunk."""
    total, n = None, 0
    for chunk in batch.chunks(batch_size):
        store = {}

        def grab(act, hook):
            store["x"] = act[:, -1].detach().clone()

        model.run_with_hooks(chunk.tokens, attention_mask=chunk.attention_mask,
                             fwd_hooks=[(act_name("resid_pre", layer), grab)])
        s = store["x"].double().sum(0)
        total = s if total is None else total + s
        n += len(chunk)
    return (total / n).float()


def naive_patched_scores(model: Any, batch: Any, layer: int, vector: torch.Tensor, mode: str = "replace",
                         alpha: float = 1.0, batch_size: int = 64) -> torch.Tensor:
    """``[rows, 2]`` (correct, answer log-prob) with the vector patched at the final position of ``layer``."""
    out = []
    for chunk in batch.chunks(batch_size):
        def patch(act, hook):
            act = act.clone()
            act[:, -1] = vector if mode == "replace" else act[:, -1] + alpha * vector
            return act

        logits = model.run_with_hooks(chunk.tokens, attention_mask=chunk.attention_mask,
                                      fwd_hooks=[(act_name("resid_pre", layer), patch)])
        out.append(_score(logits[:, -1], chunk.answer_ids))
    return torch.cat(out)


def naive_scores(model: Any, batch: Any, batch_size: int = 64) -> torch.Tensor:
    out = []
    for chunk in batch.chunks(batch_size):
        logits = model(chunk.tokens, attention_mask=chunk.attention_mask)
        out.append(_score(logits[:, -1], chunk.answer_ids))
    return torch.cat(out)


def naive_sweep_prompts(model: Any, task: Any, *, n_prompts: int, n_shots: int, seed: int,
                        splits: Sequence[str]) -> tuple[Any, list[Any], Any]:
    """Hendel's prompts for one task: dummy-query extraction prompts, zero-shot prompts per split,
    and ICL prompts on the last split's zero-shot queries."""
    ext = icl_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, dummy_query=True, split="test")
    zs = []
    for sp in splits:
        n = min(n_prompts, len({x for x, _ in task.split(sp)}))
        zs.append(icl_prompts(model, task, n_prompts=n, n_shots=0, seed=seed, split=sp))
    icl = icl_prompts(model, task, queries=list(zip(zs[-1].queries, zs[-1].answers)), n_shots=n_shots, seed=seed)
    return ext, zs, icl


@torch.no_grad()
def naive_layer_sweep(model: Any, tasks: Any, *, n_prompts: int, n_shots: int = 5, mode: str = "replace",
                      alpha: float = 1.0, seed: int = 0, splits: Sequence[str] = ("dev", "test"),
                      layers: Sequence[int] | None = None, batch_size: int = 64,
                      prompts: Sequence[Any] | None = None) -> dict[str, torch.Tensor]:
    """``prompts``: per task, ready ``(extraction, [zero-shot per split], icl)`` batches, as
    :func:`naive_sweep_prompts` builds them (default: built here)."""
    task_list = resolve_tasks(tasks)
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    T, S, J = len(task_list), len(splits), len(layers)
    acc = torch.zeros(T, S, J)
    lp = torch.zeros(T, S, J)
    zs_acc = torch.zeros(T, S)
    zs_lp = torch.zeros(T, S)
    icl_acc = torch.zeros(T)
    icl_lp = torch.zeros(T)
    vectors = torch.zeros(T, J, model.cfg.d_model)
    for t, task in enumerate(task_list):
        ext, zs, icl = (prompts[t] if prompts is not None else
                        naive_sweep_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, splits=splits))
        for j, layer in enumerate(layers):
            tv = naive_task_vector(model, ext, layer, batch_size)
            vectors[t, j] = tv
            for s, batch in enumerate(zs):
                sc = naive_patched_scores(model, batch, layer, tv, mode, alpha, batch_size).mean(0)
                acc[t, s, j], lp[t, s, j] = sc[0], sc[1]
        for s, batch in enumerate(zs):
            sc = naive_scores(model, batch, batch_size).mean(0)
            zs_acc[t, s], zs_lp[t, s] = sc[0], sc[1]
        sc = naive_scores(model, icl, batch_size).mean(0)
        icl_acc[t], icl_lp[t] = sc[0], sc[1]
    return {"accuracy": acc, "logprob": lp, "zero_shot": zs_acc, "zero_shot_logprob": zs_lp, "icl": icl_acc,
            "icl_logprob": icl_lp, "vectors": vectors}
