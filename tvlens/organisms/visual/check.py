"""Measure ``organism-visual`` on held-out images and check that it loads through the bridge.

    python -m tvlens.organisms.visual.check [--model DIR] [--per-task N] [--seed S] [--write]

Hojel et al. 2024 (§5) compare the one-shot visual prompt with prompts that carry no example pair;
this script measures, per task, on canvases built from held-out images
(:func:`images.is_held_out`):

* 1-shot ICL: masked-cell code accuracy and whole-cell exact accuracy;
* the no-example baselines: the example row masked, or drawn black;
* the task token in the masked cell (the task named instead of shown);
* 1-shot ICL with ``n`` cells of the example output corrupted (how much harder noisy examples make it).

It also boots the checkpoint with ``TransformerBridge.boot_transformers``, checks
``blocks.{l}.attn.hook_z`` at every position and that the bridge's logits equal HF's.  ``--write``
stores the numbers as ``metrics.json`` in the checkpoint directory.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tvlens.organisms.visual import canvas as cv
from tvlens.organisms.visual import images as im

__all__ = ["CHECKPOINT", "NOISE_LEVELS", "cell_scores", "quick_eval", "measure", "check_bridge", "main"]

CHECKPOINT = Path(__file__).parent / "checkpoint"
NOISE_LEVELS = (2, 4, 8)
VARIANTS = ("shown", "masked", "blank", "task")


@torch.no_grad()
def cell_scores(
    model: Any, tokens: torch.Tensor, target: torch.Tensor, *, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per canvas: masked-cell code accuracy (argmax over the palette), whether the whole cell is
    exact, and the accuracy on the *changed* codes only (where the answer differs from the query
    input: copying the query scores 0 there, so the background-heavy code accuracy's floor is gone)."""
    accs, exacts, changed = [], [], []
    for i in range(0, len(tokens), batch_size):
        logits = model(input_ids=tokens[i : i + batch_size]).logits
        pred = cv.prediction_cells(logits).flatten(1)
        cells = cv.disassemble(target[i : i + batch_size])
        truth, query = cells[:, cv.QUERY_OUT].flatten(1), cv.disassemble(tokens[i : i + batch_size])[:, cv.QUERY_IN].flatten(1)
        hit = (pred == truth).float()
        moved = (truth != query).float()  # every task changes every generated image, so never empty
        accs.append(hit.mean(1))
        exacts.append((hit.min(1).values == 1).float())
        changed.append((hit * moved).sum(1) / moved.sum(1).clamp(min=1))
    return torch.cat(accs), torch.cat(exacts), torch.cat(changed)


def quick_eval(model: Any, cfg: Any, rng: np.random.Generator) -> dict[str, Any]:
    """The training log's evaluation: held-out code accuracy per task for 1-shot ICL, overall for the
    masked-example baseline and the task token."""
    out: dict[str, Any] = {}
    tasks = [t for t in im.TASKS for _ in range(cfg.eval_per_task)]
    for variant in ("shown", "masked", "task"):
        tok, tgt = cv.random_canvases(tasks, rng, split="test", examples=variant)
        acc, exact, _ = cell_scores(model, tok, tgt)
        out[f"{variant}_acc"] = round(acc.mean().item(), 4)
        if variant == "shown":
            per = acc.reshape(len(im.TASKS), -1).mean(1)
            out["shown_acc_per_task"] = {t: round(v, 4) for t, v in zip(im.TASKS, per.tolist())}
            out["shown_exact"] = round(exact.mean().item(), 4)
    return out


def measure(model: Any, *, per_task: int = 256, seed: int = 0) -> dict[str, Any]:
    """Per task and averaged: code and exact-cell accuracy for every prompt variant and noise level,
    each on its own ``per_task`` held-out canvases (seeded, so reruns give the same numbers)."""
    rows: dict[str, dict[str, float]] = {t: {} for t in im.TASKS}
    settings = [(v, 0) for v in VARIANTS] + [("shown", n) for n in NOISE_LEVELS]
    for k, (variant, noise) in enumerate(settings):
        rng = np.random.default_rng([seed, k])
        tasks = [t for t in im.TASKS for _ in range(per_task)]
        tok, tgt = cv.random_canvases(tasks, rng, split="test", examples=variant, noise=noise)
        scores = (x.reshape(len(im.TASKS), per_task).mean(1).tolist() for x in cell_scores(model, tok, tgt))
        name = variant if not noise else f"shown_noise{noise}"
        for t, a, e, c in zip(im.TASKS, *scores):
            rows[t].update({f"{name}_acc": round(a, 4), f"{name}_exact": round(e, 4), f"{name}_changed": round(c, 4)})
    mean = {key: round(float(np.mean([rows[t][key] for t in im.TASKS])), 4) for key in rows[im.TASKS[0]]}
    return {"per_task": rows, "mean": mean, "canvases_per_task": per_task, "seed": seed, "split": "test"}


@torch.no_grad()
def check_bridge(path: Path) -> dict[str, Any]:
    """Boot ``path`` through the TransformerLens bridge: ``hook_z`` shapes per layer and the largest
    |bridge logits − HF logits| on a few canvases."""
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import BertForMaskedLM

    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    # The bridge runs HF's eager attention; HF's default (sdpa) differs by float32 rounding only.
    hf = BertForMaskedLM.from_pretrained(path, attn_implementation="eager").eval()
    hf_sdpa = BertForMaskedLM.from_pretrained(path, attn_implementation="sdpa").eval()
    tokens, _ = cv.random_canvases(list(im.TASKS), np.random.default_rng(0), examples="shown")
    logits, cache = bridge.run_with_cache(tokens)
    n_layers, n_heads = hf.config.num_hidden_layers, hf.config.num_attention_heads
    d_head = hf.config.hidden_size // n_heads
    shapes = {f"blocks.{l}.attn.hook_z": list(cache[f"blocks.{l}.attn.hook_z"].shape) for l in range(n_layers)}
    expected = [len(tokens), cv.N_POSITIONS, n_heads, d_head]
    return {
        "hook_z_shapes": shapes,
        "hook_z_ok": all(s == expected for s in shapes.values()),
        "max_abs_logit_diff_bridge_vs_hf_eager": float((logits - hf(input_ids=tokens).logits).abs().max()),
        "max_abs_logit_diff_bridge_vs_hf_sdpa": float((logits - hf_sdpa(input_ids=tokens).logits).abs().max()),
    }


def table(metrics: dict[str, Any]) -> str:
    """The per-task results as a markdown table."""
    cols = [("1-shot", "shown_acc"), ("1-shot exact", "shown_exact"), ("1-shot changed", "shown_changed"),
            ("masked ex.", "masked_acc"), ("masked exact", "masked_exact"), ("masked changed", "masked_changed"),
            ("blank ex.", "blank_acc"), ("blank exact", "blank_exact"), ("blank changed", "blank_changed"),
            ("task token", "task_acc"), ("task exact", "task_exact"),
            *((f"noise {n}", f"shown_noise{n}_acc") for n in NOISE_LEVELS)]
    lines = ["| task | " + " | ".join(c for c, _ in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in [*metrics["per_task"].items(), ("**mean**", metrics["mean"])]:
        lines.append(f"| {name} | " + " | ".join(f"{row[k]:.3f}" for _, k in cols) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    from transformers import BertForMaskedLM

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=CHECKPOINT)
    ap.add_argument("--per-task", type=int, default=256)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--write", action="store_true", help="write metrics.json into the model directory")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    model = BertForMaskedLM.from_pretrained(args.model).eval()
    metrics = measure(model, per_task=args.per_task, seed=args.seed)
    metrics["bridge"] = check_bridge(args.model)
    metrics["seconds"] = round(time.time() - t0, 1)
    print(table(metrics))
    print(json.dumps({"mean": metrics["mean"], "bridge": metrics["bridge"]}, indent=1))
    if args.write:
        (args.model / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")


if __name__ == "__main__":
    main()
