"""Slow, obvious reference implementations for tvlens.analyses.taskness (to be merged into tests/reference.py).

Everything here uses ``run_with_cache`` on a whole PromptBatch at once, explicit Python loops
over rows and positions, stacks every sample, and calls ``torch.mean`` / ``torch.var`` — no
streaming, no moment algebra, no law of total variance.
"""

from __future__ import annotations

import torch


def z_samples(model, batch, *, positions: str = "separator", token_class: int | None = None, layers=None):
    """{rank_from_end: [n_samples, layer, head, d_head] float64} of hook_z at the selected tokens."""
    n_layers = model.cfg.n_layers
    layers = list(range(n_layers)) if layers is None else list(layers)
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    z = torch.stack([cache[f"blocks.{layer}.attn.hook_z"] for layer in layers], dim=1).to(torch.float64)
    # z: [batch, layer, pos, head, d_head]
    out: dict[int, list[torch.Tensor]] = {}
    for row in range(batch.tokens.shape[0]):
        if positions == "separator":
            chosen = [batch.tokens.shape[1] - 1]
        elif positions == "all":
            chosen = [p for p in range(batch.tokens.shape[1]) if int(batch.attention_mask[row, p]) == 1]
        else:
            chosen = [p for p in range(batch.tokens.shape[1])
                      if int(batch.attention_mask[row, p]) == 1 and int(batch.token_class[row, p]) == token_class]
        for rank, p in enumerate(reversed(chosen)):
            out.setdefault(rank, []).append(z[row, :, p])
    return {r: torch.stack(v) for r, v in out.items()}


def moments(samples: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Mean and population variance over the sample axis."""
    return samples.mean(0), samples.var(0, unbiased=False), samples.shape[0]


def rho_from_samples(per_task: list[torch.Tensor], eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """ρ_token (Hojel et al. 2024) from raw samples ``[n_j, *cell, d]`` per task; pooled variance by concatenation.

    Same zero-variance rule as tvlens: within floored at eps * mean(total over cells).
    """
    pooled = torch.cat(per_task, dim=0)
    total = pooled.var(0, unbiased=False).sum(-1)
    within = torch.stack([s.var(0, unbiased=False).sum(-1) for s in per_task]).mean(0)
    floor = eps * float(total.mean())
    return total / within.clamp_min(floor), total, within
