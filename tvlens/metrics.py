"""One vocabulary of metrics for every analysis: what a patched forward is scored by.

Built-in metrics read the logits at the query position against the batch's answers:
``logit_diff`` (answer minus a foil), ``logprob``, ``prob`` and ``accuracy`` (answer is the top
token); any function ``(logits [batch, d_vocab], batch) -> [batch]`` works too.

**Several accepted answers** (a batch with ``accepted_answer_tokens``, e.g. Todd et al. 2024's
``next_item``, where one input has several right outputs): every built-in metric scores the *best*
accepted answer, by the first token of each (Hendel et al. 2023, §3 and Todd et al. 2024, §2 score
the first answer token). ``accuracy`` is 1 when the top token is the first token of any accepted
answer; ``logprob`` / ``prob`` are the maximum over the accepted answers' first tokens; ``logit_diff``
is the maximum accepted logit minus the foil, the top token that starts no accepted answer. With
one accepted answer per row all of them are the usual single-answer metrics.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Callable, Sequence

import torch
from jaxtyping import Int
from torch import Tensor

from .engine.batch import EngineBatch
from .vocabulary import FINAL_POSITION

__all__ = ["FINAL_POSITION", "METRICS", "MetricFn", "resolve_metric", "metric_name", "check_metric_output", "answer_metric",
           "accepted_metric", "accepted_ids", "cat_accepted"]

#: Built-in metrics of the final-position logits (per prompt, higher = more of the answer).

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
    acc = accepted_ids(prompts.obj if prompts.obj is not None else prompts, prompts.answer_ids).to(clean_logits.device)
    V = clean_logits.shape[-1]
    if bool((acc < 0).any()) or bool((acc >= V).any()):
        raise ValueError(f"target answer_ids out of range for a vocabulary of {V} tokens")
    if metric == "logit_diff":
        foil = prompts.foil_ids
        if foil is None:  # the top token that starts no accepted answer
            masked = clean_logits.float().scatter(-1, acc, float("-inf"))
            foil = masked.argmax(-1)
        foil = foil.to(clean_logits.device)

    def fn(logits: Tensor) -> Tensor:
        idx = acc[:, None, :]  # [batch, 1 (column), accepted]
        if metric == "logit_diff":
            best = logits.gather(-1, idx.expand(logits.shape[0], logits.shape[1], -1)).max(-1).values
            return (best - logits.gather(-1, foil[:, None, None].expand(logits.shape[0], logits.shape[1], 1))[..., 0]).float()
        return accepted_metric(logits, idx, metric)

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
    return accepted_metric(logits, answers[..., None], metric)


def accepted_metric(logits: Tensor, accepted: Int[Tensor, "... accepted"], metric: str) -> Tensor:
    """``logits [..., d_vocab]`` scored against every accepted answer's first token -> ``[...]``.

    ``accepted`` is ``[..., n_accepted]``, broadcast on the leading axes of ``logits`` (rows padded
    by repeating an id, see :func:`accepted_ids`). ``accuracy``: the top token is one of them;
    ``logprob`` / ``prob``: the largest of their log-probabilities / probabilities.
    """
    if metric not in ("accuracy", "logprob", "prob"):
        raise ValueError(f"metric must be 'accuracy', 'logprob' or 'prob', got {metric!r}")
    idx = accepted.to(logits.device).expand(*logits.shape[:-1], accepted.shape[-1])
    if metric == "accuracy":
        return (logits.argmax(-1, keepdim=True) == idx).any(-1).float()
    logp = logits.log_softmax(-1) if logits.dtype == torch.float64 else logits.float().log_softmax(-1)
    best = logp.gather(-1, idx).max(-1).values
    return best if metric == "logprob" else best.exp()


def accepted_ids(batch: Any, answer_ids: Tensor | None = None) -> Int[Tensor, "batch accepted"]:
    """The first token of every accepted answer of each row, ``answer_ids`` first: ``[batch, n_accepted]``.

    Rows with fewer accepted answers repeat their first id (a repeat changes no metric of
    :func:`accepted_metric`). A batch without ``accepted_answer_tokens`` has one column, its
    ``answer_ids``.
    """
    ans = torch.as_tensor(batch.answer_ids if answer_ids is None else answer_ids).long().reshape(-1).cpu()
    alts = getattr(batch, "accepted_answer_tokens", None)
    if alts is None:
        return ans[:, None]
    if len(alts) != ans.shape[0]:
        raise ValueError(f"the batch has {ans.shape[0]} answer ids but {len(alts)} rows of accepted answers")
    firsts = [list(dict.fromkeys([int(ans[r]), *(int(a[0]) for a in row if len(a))])) for r, row in enumerate(alts)]
    width = max((len(f) for f in firsts), default=1)
    out = ans[:, None].repeat(1, width)
    for r, f in enumerate(firsts):
        out[r, : len(f)] = torch.as_tensor(f, dtype=torch.long)
    return out


def cat_accepted(parts: Sequence[Tensor]) -> Int[Tensor, "batch accepted"]:
    """Concatenate :func:`accepted_ids` of several batches along the rows, padding each to the widest
    by repeating its first column."""
    width = max(p.shape[1] for p in parts)
    return torch.cat([torch.cat([p, p[:, :1].expand(-1, width - p.shape[1])], 1) for p in parts])
