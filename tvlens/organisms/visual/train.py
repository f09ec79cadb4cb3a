"""Train ``organism-visual``: a small bidirectional masked-token predictor that does visual in-context
learning by inpainting 2×2 canvases, in the setting of MAE-VQGAN (Hojel et al. 2024, §3).

    python -m tvlens.organisms.visual.train --out DIR [--seed S] [--steps N] [--threads T]

The model is a ``transformers.BertForMaskedLM`` over the canvas vocabulary of
:mod:`tvlens.organisms.visual.canvas` (9 palette codes, [MASK], specials, one token per task).  Each
training canvas (:func:`sample_batch`) shows one task's example pair and a query, and the loss is
the cross-entropy of the masked query-out cell only.  A fraction of canvases has the example row
masked (the model learns its no-example prior, the baseline task vectors are patched into), and a
fraction carries the task token in the masked cell (the task named instead of shown).

Position embeddings start as *cell-local* codes — sin-cos of the row and the column inside the
cell plus ±1 codes saying which cell — and are trained: the same place in two cells starts out
alike, which is what comparing an example pair position by position needs; a whole-canvas 2-D
sin-cos start learned ICL much worse.

Deterministic for a seed on a given thread count: torch's initialisation is seeded with
``torch.manual_seed``, data come from the script's own ``numpy.random.Generator``,
``torch.use_deterministic_algorithms(True)`` is on, and the number of threads is fixed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from jaxtyping import Float, Int

from tvlens.organisms.visual import canvas as cv
from tvlens.organisms.visual import images as im

__all__ = [
    "ModelShape",
    "TrainConfig",
    "MICRO",
    "build_model",
    "cell_local_position_codes",
    "sample_batch",
    "build_tokenizer",
    "train",
    "save",
    "main",
]


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the organism (a ``transformers.BertConfig``, no dropout)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    d_mlp: int = 256


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    shape: ModelShape = ModelShape()
    batch_size: int = 32
    lr: float = 2e-3
    warmup_steps: int = 100
    steps: int = 3000
    p_masked_examples: float = 0.1  # example row [MASK]: learns the no-example prior
    p_task_token: float = 0.1  # example row [MASK], task token in the query-out cell
    # Scale of the initial cell-local position codes, against word embeddings of std 0.02.  Larger
    # starts drown the colour identity in the embedding LayerNorm: at 0.1 the colour-mapping tasks sat
    # near 0.7 for 750 steps, at 1.0 the loss stayed far higher.
    pos_scale: float = 0.02
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_per_task: int = 32
    log_every: int = 50


# A config for tests: a few steps of a tiny model, seconds on one core.
MICRO = TrainConfig(shape=ModelShape(d_model=32, n_layers=1, n_heads=2, d_mlp=64), batch_size=8, steps=20, warmup_steps=5,
                    eval_every=10, eval_per_task=2, log_every=5)


def cell_local_position_codes(d_model: int) -> Float[torch.Tensor, "pos d_model"]:
    """Initial position embeddings: for each raster position, sin-cos features of its row and column
    inside its cell (3/8 of the dimensions each) and ±1 features of its cell row and cell column
    (1/8 each)."""
    n_rc = (3 * d_model // 8) // 2 * 2  # even: sin and cos pairs
    n_cell = (d_model - 2 * n_rc) // 2
    pos = torch.arange(cv.N_POSITIONS)
    row, col = pos // cv.CANVAS_SIDE, pos % cv.CANVAS_SIDE
    local_r, local_c = (row % im.GRID).float(), (col % im.GRID).float()
    cell_r, cell_c = (row // im.GRID).float(), (col // im.GRID).float()

    def sincos(x: torch.Tensor, n: int) -> torch.Tensor:
        freqs = torch.exp(-math.log(100.0) * torch.arange(n // 2).float() / max(n // 2, 1))
        ang = x[:, None] * freqs[None] * math.pi / 2
        return torch.cat([ang.sin(), ang.cos()], dim=-1)

    sign = lambda x, n: (2 * x - 1)[:, None].expand(-1, n)  # noqa: E731
    n_last = d_model - 2 * n_rc - n_cell
    return torch.cat([sincos(local_r, n_rc), sincos(local_c, n_rc), sign(cell_r, n_cell), sign(cell_c, n_last)], dim=-1)


def build_model(cfg: TrainConfig):
    """A freshly initialised ``BertForMaskedLM`` of ``cfg.shape`` (seeded by the caller), its position
    embeddings set to the cell-local codes."""
    from transformers import BertConfig, BertForMaskedLM

    s = cfg.shape
    config = BertConfig(
        vocab_size=len(cv.VOCAB),
        hidden_size=s.d_model,
        num_hidden_layers=s.n_layers,
        num_attention_heads=s.n_heads,
        intermediate_size=s.d_mlp,
        hidden_act="gelu",
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        max_position_embeddings=cv.N_POSITIONS,
        type_vocab_size=1,
        pad_token_id=cv.PAD,
        tie_word_embeddings=True,
    )
    model = BertForMaskedLM(config)
    with torch.no_grad():
        model.bert.embeddings.position_embeddings.weight.copy_(cfg.pos_scale * cell_local_position_codes(s.d_model))
    return model


def sample_batch(
    rng: np.random.Generator, cfg: TrainConfig
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"], list[str]]:
    """One training batch: canvas tokens, query-out targets and each canvas's task.  Tasks are
    uniform; each canvas shows its example pair, masks it (``p_masked_examples``) or masks it and
    names the task in the query-out cell (``p_task_token``).  Example and query are independent
    training-split images."""
    tasks = [im.TASKS[int(i)] for i in rng.integers(len(im.TASKS), size=cfg.batch_size)]
    rows, variants = [], []
    for task in tasks:
        ex_in, ex_out = im.random_pair(task, rng, split="train")
        q_in, q_out = im.random_pair(task, rng, split="train")
        rows.append((ex_in, ex_out, q_in, q_out))
        u = rng.random()
        p_mask, p_task = cfg.p_masked_examples, cfg.p_masked_examples + cfg.p_task_token
        variants.append("masked" if u < p_mask else "task" if u < p_task else "shown")
    tokens, target = cv.make_batch(rows, examples=variants, tasks=tasks)
    return tokens, target, tasks


def _lr(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up, then cosine decay to zero."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    t = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * t))


def masked_cell_loss(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the query-out positions only (target ``-100`` elsewhere)."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100)


def train(cfg: TrainConfig, *, threads: int = 1, progress: bool = False) -> tuple[Any, list[dict[str, Any]]]:
    """Train the organism; returns the model (eval mode) and the log (one dict per logged step)."""
    from tvlens.organisms.visual.check import quick_eval

    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.98), weight_decay=0.0)
    data_rng = np.random.default_rng([cfg.seed, 0])
    eval_rng_seed = [cfg.seed, 1]
    log: list[dict[str, Any]] = []
    t0 = time.time()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr(step, cfg)
        tokens, target, _ = sample_batch(data_rng, cfg)
        loss = masked_cell_loss(model(input_ids=tokens).logits, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        last = step + 1 == cfg.steps
        if (step + 1) % cfg.log_every == 0 or last:
            entry: dict[str, Any] = {"step": step + 1, "loss": round(loss.item(), 5), "lr": _lr(step, cfg),
                                     "seconds": round(time.time() - t0, 1)}
            if (step + 1) % cfg.eval_every == 0 or last:
                model.eval()
                entry.update(quick_eval(model, cfg, np.random.default_rng(eval_rng_seed)))
                model.train()
            log.append(entry)
            if progress:
                print(json.dumps(entry), flush=True)
    model.eval()
    return model, log


def build_tokenizer():
    """A WordLevel tokenizer over the symbol names of :data:`canvas.VOCAB` (``"black red [MASK] …"``,
    whitespace-separated, nothing added around), so HF and TransformerLens load the directory offline."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab={w: i for i, w in enumerate(cv.VOCAB)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, mask_token="[MASK]", pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
        sep_token="[SEP]", model_max_length=cv.N_POSITIONS,
    )


def save(model: Any, out: Path, cfg: TrainConfig, log: list[dict[str, Any]], *, extra: dict[str, Any]) -> None:
    """Write the HF directory (config, safetensors weights, tokenizer) and the training log."""
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    build_tokenizer().save_pretrained(out)
    (out / "training_log.json").write_text(
        json.dumps({"config": dataclasses.asdict(cfg), **extra, "log": log}, indent=1) + "\n"
    )


def _machine() -> dict[str, Any]:
    try:
        uptime = subprocess.run(["uptime"], capture_output=True, text=True, check=False).stdout.strip()
    except OSError:
        uptime = ""
    return {"python": sys.version.split()[0], "torch": torch.__version__, "platform": platform.platform(),
            "uptime": uptime}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, required=True, help="output HF directory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=TrainConfig.steps)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (another organism may train beside it)")
    ap.add_argument("--pos-scale", type=float, default=TrainConfig.pos_scale, help="scale of the initial position codes")
    ap.add_argument("--eval-every", type=int, default=TrainConfig.eval_every)
    ap.add_argument("--micro", action="store_true", help="the tiny test configuration")
    args = ap.parse_args(argv)
    cfg = MICRO if args.micro else TrainConfig()
    if not args.micro:
        cfg = dataclasses.replace(cfg, steps=args.steps, pos_scale=args.pos_scale, eval_every=args.eval_every)
    cfg = dataclasses.replace(cfg, seed=args.seed)
    start = _machine()
    t0 = time.time()
    model, log = train(cfg, threads=args.threads, progress=True)
    wall = time.time() - t0
    save(model, args.out, cfg, log, extra={"threads": args.threads, "wall_seconds": round(wall, 1),
                                            "machine_at_start": start, "machine_at_end": _machine()})
    print(f"trained {cfg.steps} steps in {wall / 60:.1f} min → {args.out}", flush=True)


if __name__ == "__main__":
    main()
