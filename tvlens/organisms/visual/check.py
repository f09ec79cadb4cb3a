"""Measure ``organism-visual`` on held-out images (Hojel et al. 2024, §5 evaluates one-shot prompts
against prompts with no examples).  Placeholder; filled in below."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from tvlens.organisms.visual import canvas as cv
from tvlens.organisms.visual import images as im


@torch.no_grad()
def cell_scores(model: Any, tokens: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per canvas: masked-cell code accuracy and whether the whole cell is exact."""
    logits = model(input_ids=tokens).logits
    pred = cv.prediction_cells(logits)
    truth = cv.disassemble(target)[:, cv.QUERY_OUT]
    hit = (pred == truth).float().flatten(1)
    return hit.mean(1), (hit.min(1).values == 1).float()


def quick_eval(model: Any, cfg: Any, rng: np.random.Generator) -> dict[str, Any]:
    """Code accuracy on held-out canvases, per task for 1-shot ICL and overall for the baselines."""
    from tvlens.organisms.visual.train import sample_batch

    out: dict[str, Any] = {}
    tasks = [t for t in im.TASKS for _ in range(cfg.eval_per_task)]
    for variant in ("shown", "masked", "task"):
        tok, tgt, _ = sample_batch(rng, cfg, split="test", tasks=tasks, examples=variant)
        acc, exact = cell_scores(model, tok, tgt)
        out[f"{variant}_acc"] = round(acc.mean().item(), 4)
        if variant == "shown":
            per = acc.reshape(len(im.TASKS), -1).mean(1)
            out["shown_acc_per_task"] = {t: round(v, 4) for t, v in zip(im.TASKS, per.tolist())}
            out["shown_exact"] = round(exact.mean().item(), 4)
    return out
