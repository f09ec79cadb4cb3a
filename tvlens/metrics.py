"""One vocabulary of metrics for every analysis: what a patched forward is scored by.

Built-in metrics read the logits at the query position against ``batch.answer_ids``:
``logit_diff`` (answer minus a foil), ``logprob``, ``prob`` and ``accuracy`` (answer is the top
token); any function ``(logits [batch, d_vocab], batch) -> [batch]`` works too.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable

import torch
from torch import Tensor

from .engine.batch import EngineBatch

__all__ = ["FINAL_POSITION", "METRICS", "MetricFn", "resolve_metric", "metric_name", "check_metric_output", "answer_metric"]

#: Built-in metrics of the final-position logits (per prompt, higher = more of the answer).
#: the words for "the last position" (the final separator of a text ICL prompt), accepted everywhere
FINAL_POSITION = ("final", "separator", "last")

METRICS = ("logit_diff", "prob", "logprob", "accuracy")


MetricFn = Callable[[Tensor, Any], Tensor]


def metric_name(metric: Any) -> str:
    if isinstance(metric, str):
        return metric
    return getattr(metric, "__name__", None) or type(metric).__name__


def resolve_metric(metric: str | MetricFn, prompts: EngineBatch, clean_logits: Tensor) -> Callable[[Tensor], Tensor]:
    """Return ``fn(logits [batch, column, d_vocab]) -> [batch, column]`` and validate it on the clean run.

    ``logit_diff`` is the answer's logit minus a *foil* logit: ``batch.foil_ids`` when the batch
    carries them, otherwise the target run's own highest-scoring wrong token (fixed per prompt, so
    the metric is linear in the logits).  ``prob`` / ``logprob`` are the answer's softmax
    probability / log-probability, ``accuracy`` is 1 when the answer is the top token.
    """
    B = len(prompts)
    if callable(metric) and not isinstance(metric, str):
        user = metric
        batch_obj = prompts.obj if prompts.obj is not None else SimpleNamespace(
            tokens=prompts.tokens, attention_mask=prompts.mask, answer_ids=prompts.answer_ids)

        def fn(logits: Tensor) -> Tensor:
            cols = [torch.as_tensor(user(logits[:, s], batch_obj)) for s in range(logits.shape[1])]
            for c in cols[:1]:
                check_metric_output(c, B, metric)
            return torch.stack([c.to(logits.device, torch.float32) for c in cols], 1)

        clean = fn(clean_logits[:, None])  # shape check before any sweep work
        bad = int((~torch.isfinite(clean)).sum())
        if bad:
            raise ValueError(f"metric {metric_name(metric)!r} returned NaN/inf for {bad} of {B} prompts on the unpatched "
                             "target run; a patching metric must be finite (look for log(0) or a division by zero in it)")
        return fn
    if metric not in METRICS:
        raise ValueError(f"unknown metric {metric!r}; use one of {', '.join(METRICS)} or a function (logits [batch, d_vocab], batch) -> [batch]")
    if prompts.answer_ids is None:
        raise ValueError(f"metric {metric!r} needs the correct answers: give the target batch .answer_ids (tvlens.icl_prompts does)")
    ans = prompts.answer_ids.to(clean_logits.device)
    V = clean_logits.shape[-1]
    if bool((ans < 0).any()) or bool((ans >= V).any()):
        raise ValueError(f"target answer_ids out of range for a vocabulary of {V} tokens")
    if metric == "logit_diff":
        foil = prompts.foil_ids
        if foil is None:
            masked = clean_logits.float().scatter(-1, ans[:, None], float("-inf"))
            foil = masked.argmax(-1)
        foil = foil.to(clean_logits.device)

    def fn(logits: Tensor) -> Tensor:
        idx = ans[:, None, None].expand(logits.shape[0], logits.shape[1], 1)
        if metric == "accuracy":
            return (logits.argmax(-1) == idx[..., 0]).float()
        if metric == "logit_diff":
            fidx = foil[:, None, None].expand_as(idx)
            return (logits.gather(-1, idx) - logits.gather(-1, fidx))[..., 0].float()
        lp = logits.float().log_softmax(-1).gather(-1, idx)[..., 0]
        return lp if metric == "logprob" else lp.exp()

    return fn


def check_metric_output(value: Any, n: int, metric: Any) -> None:
    if not isinstance(value, Tensor) or value.shape != (n,):
        shape = tuple(value.shape) if isinstance(value, Tensor) else type(value).__name__
        raise ValueError(
            f"metric {metric_name(metric)!r} returned {shape} for {n} prompts; a metric must map "
            f"(logits [batch, d_vocab], batch) to one value per prompt, a tensor of shape [{n}] "
            "(e.g. logits.log_softmax(-1)[torch.arange(len(logits)), batch.answer_ids])"
        )


def answer_metric(logits: Tensor, answers: Tensor, metric: str) -> Tensor:
    """``logits [..., d_vocab]`` with ``answers`` broadcast on the leading axes -> ``logprob`` or ``accuracy`` [...]."""
    if metric == "accuracy":
        return (logits.argmax(-1) == answers).float()
    logp = logits.log_softmax(-1) if logits.dtype == torch.float64 else logits.float().log_softmax(-1)
    return logp.gather(-1, answers.expand(logp.shape[:-1]).unsqueeze(-1))[..., 0]
