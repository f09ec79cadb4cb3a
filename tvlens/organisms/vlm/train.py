"""Train ``organism-vlm``: a CLIP tower + projector on the frozen text organism (Luo et al. 2024 shape).

Luo, Darrell & Bar 2024 (*Task Vectors are Cross-Modal*, §4) find that a task vector taken from
**text** in-context examples, patched at the last position of a middle layer into an **image** query,
makes a VLM do the task. This script builds a VLM on which that question has a real answer offline,
while keeping every cross-modal number a measurement:

* the language model is the shipped text ``organism`` (its task vector planted at layer 2 by
  TVP-loss), **frozen**; only the vision tower and projector (~0.19 M parameters) train;
* **stage 1** (``--stage1-steps``): image prompts only, in the text organism's format with the four
  ``<image>`` tokens where the input word would be —

  - image ICL, 1–5 image → word demonstrations and an image query; the answer of every example after
    the first is a target (the first has no context, so it defines no task);
  - instruction + 0–2 image examples + image query, every answer a target;
  - no context, ``<bos> <image>×4 → name``: the item's own name is the target, the behaviour Luo et
    al. report for VLMs without context ("No Context: France", §4, Table 2), so no-context prompts
    do not silently do one of the tasks;

* **stage 2** (``--stage2-steps``): stage 1's loss plus a TVP-style loss (Yang et al. 2025,
  arXiv 2501.09240) **within the image modality**: the final-separator state at
  ``blocks.{L}.hook_resid_pre`` (``--tvp-layer``, default 2) of every image-ICL prompt with ≥ 3
  demonstrations replaces that of a no-context image prompt of the same task (another query), and the
  cross-entropy of that prompt's answer is added. Gradients flow through both forwards.

No prompt ever mixes text examples with an image query: text→image transfer (xBase, xPatch) is never
trained, so it stays a measurement (``python -m tvlens.organisms.vlm.check``).

**Language-model learning** (``--lm-lr``, default 0 = frozen). With the language model frozen, the
no-context naming target hardly takes (the frozen organism guesses one of the query domain's tasks
instead). ``--lm-lr`` lets the language model's decoder layers and final norm (not its embeddings or
unembedding) learn at that rate, without weight decay, from ``--lm-losses``: ``naming`` (only the
no-context naming rows, run in a forward of their own) or ``image`` (every stage-1 image-prompt row:
image ICL, instruction + image query, naming). The TVP partner forward never reaches the language
model, and neither does any text-only or mixed prompt, so cross-modal numbers stay measurements.
``--naming-weight`` scales the naming rows' token losses in the token mean.

Queries and demonstrations come from each task's **train** split; the few items that are in no task's
train split of their domain are added to one task's training pool (a dev pair where possible) so that
every item is seen as an image once (recorded in ``training_log.json`` as ``orphans``). Training images
are renderings with variants in ``[1, 10**6)``; evaluation uses variants ``>= 10**6``.

Deterministic for a seed, device and thread count (``--threads``, default 1). Writes the checkpoint,
``training_log.json`` and ``metrics.json`` (quick dev evaluation) to ``--out``.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from ..resid_hook import ResidHook

from .build import build_vlm, decoder_layers, language_model, save_vlm
from .images import DOMAIN_TASKS, domain_of_task
from .prompts import Image, Prompt, PromptCodec, collate

__all__ = ["TrainConfig", "task_pools", "train", "main"]

#: training renderings use variants below this; evaluation renderings use variants from it on
EVAL_VARIANT0 = 10**6


@dataclass
class TrainConfig:
    seed: int = 0
    threads: int = 1
    batch_size: int = 32
    stage1_steps: int = 1500
    stage2_steps: int = 1500
    lr: float = 2e-3
    min_lr: float = 2e-4
    warmup: int = 100
    weight_decay: float = 0.01
    clip: float = 1.0
    max_shots: int = 5
    p_instruction: float = 0.15
    p_naming: float = 0.10
    tvp_layer: int = 2
    tvp_min_shots: int = 3
    tvp_weight: float = 1.0
    #: learning rate of the language model's decoder layers (embeddings and unembedding stay frozen);
    #: 0 = the language model is frozen (the shipped recipe)
    lm_lr: float = 0.0
    #: which losses train the language model when ``lm_lr > 0``: ``"naming"`` (only the no-context
    #: naming rows) or ``"image"`` (every stage-1 image-prompt loss; never the TVP loss, never text)
    lm_losses: str = "naming"
    #: weight of the naming rows' token losses relative to the other rows' (1 = one token among all)
    naming_weight: float = 1.0
    eval_every: int = 250
    eval_queries: int = 8
    minutes: float | None = None
    #: stop after this many steps (to check reproducibility against a logged run); None = run all
    stop_after: int | None = None
    tasks: tuple[str, ...] = field(default_factory=lambda: tuple(t for ts in DOMAIN_TASKS.values() for t in ts))


# ----------------------------------------------------------------------------------------------
# data


def task_pools(tasks: Sequence[str]) -> tuple[dict[str, list[tuple[str, str]]], list[dict[str, str]]]:
    """Per task, the (input, output) pairs image prompts are trained on: its train split, plus the
    items of its domain that are in no task's train split (each added to the first task that has it
    in dev, else in test), so every item appears as an image in some training pool."""
    from tvlens.tasks import load_task

    pools = {t: list(load_task(t).split("train")) for t in tasks}
    orphans: list[dict[str, str]] = []
    for domain, dtasks in DOMAIN_TASKS.items():
        dtasks = [t for t in dtasks if t in pools]
        seen = {x for t in dtasks for x, _ in pools[t]}
        for split in ("dev", "test"):
            for t in dtasks:
                for x, y in load_task(t).split(split):
                    if x not in seen:
                        pools[t].append((x, y))
                        seen.add(x)
                        orphans.append({"task": t, "item": x, "split": split})
    return pools, orphans


class Sampler:
    """Draws the training prompts described in the module docstring from a ``random.Random``."""

    def __init__(self, codec: PromptCodec, cfg: TrainConfig):
        from tvlens.tasks import load_task

        self.codec, self.cfg = codec, cfg
        self.tasks = list(cfg.tasks)
        self.pools, self.orphans = task_pools(self.tasks)
        self.instructions = {t: load_task(t).instruction for t in self.tasks}
        self.domain = {t: domain_of_task(t) for t in self.tasks}
        self.items = {d: sorted({x for t in self.tasks if self.domain[t] == d for x, _ in self.pools[t]}) for d in DOMAIN_TASKS}

    def _image(self, rng: random.Random, task: str, item: str) -> Image:
        return Image(self.domain[task], item, rng.randrange(1, EVAL_VARIANT0))

    def row(self, rng: random.Random) -> tuple[Prompt, dict[str, Any]]:
        cfg = self.cfg
        task = self.tasks[rng.randrange(len(self.tasks))]
        u = rng.random()
        if u < cfg.p_naming:
            item = rng.choice(self.items[self.domain[task]])
            p = self.codec.prompt([], self._image(rng, task, item), answer=item)
            return p, {"task": task, "kind": "naming", "k": 0, "used": []}
        instr = u < cfg.p_naming + cfg.p_instruction
        k = rng.randint(0, 2) if instr else rng.randint(1, cfg.max_shots)
        pool = self.pools[task]
        idx = rng.sample(range(len(pool)), k + 1)
        ex = [(self._image(rng, task, pool[i][0]), pool[i][1]) for i in idx]
        p = self.codec.prompt(
            ex[:-1], ex[-1][0], answer=ex[-1][1],
            instruction=self.instructions[task] if instr else None,
            train_from=0 if instr else 1,
        )
        return p, {"task": task, "kind": "instruction" if instr else "icl", "k": k, "used": idx}

    def partner(self, rng: random.Random, meta: dict[str, Any]) -> Prompt:
        """A no-context image prompt ``<bos> <image>×4 → y'`` of the same task with an unused query."""
        task, pool = meta["task"], self.pools[meta["task"]]
        while True:
            i = rng.randrange(len(pool))
            if i not in meta["used"]:
                break
        x, y = pool[i]
        return self.codec.prompt([], self._image(rng, task, x), answer=y)


# ----------------------------------------------------------------------------------------------
# model plumbing


def answer_loss(model: Any, tokens, mask, pv, targets, reduction: str = "mean") -> torch.Tensor:
    """Cross-entropy of the target tokens (the unembedding is applied at target positions only)."""
    h = model.model(input_ids=tokens, pixel_values=pv, attention_mask=mask).last_hidden_state
    sel = targets != -100
    return F.cross_entropy(model.lm_head(h[sel]), targets[sel], reduction=reduction)


def lm_trainables(model: Any) -> list[torch.nn.Parameter]:
    """The language model's decoder layers and final norm: what ``lm_lr > 0`` trains."""
    lm = language_model(model)
    return [p for n, p in lm.named_parameters() if not n.startswith("embed_tokens")]


def set_lm_grad(params: Sequence[torch.nn.Parameter], on: bool) -> None:
    for p in params:
        p.requires_grad_(on)


def split_loss(model: Any, prompts: Sequence[Prompt], metas: Sequence[dict[str, Any]], codec: PromptCodec, processor: Any,
               cfg: TrainConfig, lm_params: Sequence[torch.nn.Parameter], hook: "ResidHook", tvp_rows: Sequence[int]) -> torch.Tensor:
    """Stage-1 loss of a batch with the language model trainable (``cfg.lm_lr > 0``).

    The naming rows run in a forward of their own, so that with ``lm_losses="naming"`` only they put
    gradient into the language model. The loss is the same token mean as the single-forward path
    (the naming rows' tokens weighted by ``cfg.naming_weight``). The TVP capture (``tvp_rows``, indices
    into ``prompts``) runs in the non-naming forward."""
    naming = [b for b, m in enumerate(metas) if m["kind"] == "naming"]
    rest = [b for b, m in enumerate(metas) if m["kind"] != "naming"]
    total, count = torch.zeros(()), 0.0
    for rows, lm_on in ((rest, cfg.lm_losses == "image"), (naming, True)):
        if not rows:
            continue
        tokens, mask, pv, targets, seps = collate([prompts[b] for b in rows], codec.pad, processor, left=False)
        capture = [i for i, b in enumerate(rows) if b in set(tvp_rows)] if rows is rest else []
        if capture:
            hook.mode, hook.rows, hook.pos = "capture", torch.tensor(capture), seps[capture]
        set_lm_grad(lm_params, lm_on)
        try:
            s = answer_loss(model, tokens, mask, pv, targets, reduction="sum")
        finally:
            hook.mode = None
            set_lm_grad(lm_params, False)
        n = float((targets != -100).sum())
        w = cfg.naming_weight if rows is naming else 1.0
        total, count = total + w * s, count + w * n
    return total / count


def lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step < cfg.stage1_steps:
        return cfg.lr
    t = (step - cfg.stage1_steps) / max(1, cfg.stage2_steps)
    return cfg.min_lr + 0.5 * (cfg.lr - cfg.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


# ----------------------------------------------------------------------------------------------
# quick evaluation (dev split, held-out renderings): a progress signal, not the model card's numbers


@torch.no_grad()
def quick_eval(model: Any, processor: Any, sampler: Sampler, cfg: TrainConfig, hook: ResidHook) -> dict[str, float]:
    from tvlens.tasks import load_task

    codec, L = sampler.codec, cfg.tvp_layer
    rng = random.Random(12345)
    acc: dict[str, list[float]] = {"icl5": [], "no_context": [], "naming": [], "image_patch": [], "text_xpatch": []}
    for task in sampler.tasks:
        dom = sampler.domain[task]
        dev = list(load_task(task).split("dev"))[: cfg.eval_queries]
        train = list(load_task(task).split("train"))
        pool = sampler.pools[task]
        q_imgs = [Image(dom, x, EVAL_VARIANT0 + i) for i, (x, _) in enumerate(dev)]
        answers = torch.tensor([codec.words(y)[0] for _, y in dev])
        names = torch.tensor([codec.words(x)[0] for x, _ in dev])
        icl = [codec.prompt([(Image(dom, a, EVAL_VARIANT0 + 50 + j), b) for j, (a, b) in enumerate(rng.sample(pool, 5))], q) for q in q_imgs]
        zs = [codec.prompt([], q) for q in q_imgs]
        text = [codec.prompt(rng.sample(train, 5), rng.choice(train)[0]) for _ in q_imgs]
        acc["icl5"].append(_argmax(model, processor, icl, codec).eq(answers).float().mean().item())
        zp = _argmax(model, processor, zs, codec)
        acc["no_context"].append(zp.eq(answers).float().mean().item())
        acc["naming"].append(zp.eq(names).float().mean().item())
        for key, ctx in (("image_patch", icl), ("text_xpatch", text)):
            vec = _sep_states(model, processor, ctx, codec, L, hook).mean(0)
            acc[key].append(_argmax(model, processor, zs, codec, hook=hook, layer=L, value=vec).eq(answers).float().mean().item())
    return {k: sum(v) / len(v) for k, v in acc.items()}


def _argmax(model, processor, prompts, codec, hook=None, layer=None, value=None):
    tokens, mask, pv, _, _ = collate(prompts, codec.pad, processor, left=True)
    if hook is not None:
        hook.mode, hook.rows, hook.pos = "patch", torch.arange(len(prompts)), torch.full((len(prompts),), tokens.shape[1] - 1)
        hook.value = value.expand(len(prompts), -1)
    try:
        h = model.model(input_ids=tokens, pixel_values=pv, attention_mask=mask).last_hidden_state[:, -1]
    finally:
        if hook is not None:
            hook.mode = None
    return model.lm_head(h).argmax(-1)


def _sep_states(model, processor, prompts, codec, layer, hook):
    tokens, mask, pv, _, _ = collate(prompts, codec.pad, processor, left=True)
    hook.mode, hook.rows, hook.pos = "capture", torch.arange(len(prompts)), torch.full((len(prompts),), tokens.shape[1] - 1)
    try:
        model.model(input_ids=tokens, pixel_values=pv, attention_mask=mask)
    finally:
        hook.mode = None
    return hook.captured


# ----------------------------------------------------------------------------------------------
# training loop


def train(cfg: TrainConfig, out: str | Path, verbose: bool = True) -> dict[str, Any]:
    """Train and save the organism to ``out``; returns the training log."""
    from tvlens.organisms import organism_path

    t0 = time.time()
    torch.set_num_threads(cfg.threads)
    torch.use_deterministic_algorithms(True)
    model, processor = build_vlm(organism_path("organism"), seed=cfg.seed)
    codec = PromptCodec(processor.tokenizer)
    sampler = Sampler(codec, cfg)
    hook = ResidHook()
    handle = decoder_layers(model)[cfg.tvp_layer].register_forward_pre_hook(hook, with_kwargs=True)
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay, "scale": 1.0}, {"params": no_decay, "weight_decay": 0.0, "scale": 1.0}]
    if cfg.lm_losses not in ("naming", "image"):
        raise ValueError(f"lm_losses must be 'naming' or 'image', got {cfg.lm_losses!r}")
    lm_params = lm_trainables(model) if cfg.lm_lr > 0 else []
    if lm_params:
        # the language model moves at lm_lr / lr of the vision side's rate, without weight decay
        groups.append({"params": lm_params, "weight_decay": 0.0, "scale": cfg.lm_lr / cfg.lr})
    opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))
    split = bool(lm_params) or cfg.naming_weight != 1.0
    rng = random.Random(cfg.seed)
    log: dict[str, Any] = {"config": asdict(cfg), "orphans": sampler.orphans, "steps": [], "evals": []}
    total = cfg.stage1_steps + cfg.stage2_steps
    stopped_early = False
    window: dict[str, float] = {"lm": 0.0, "tvp": 0.0, "n": 0}
    for step in range(total):
        if (cfg.minutes is not None and time.time() - t0 > 60 * cfg.minutes) or (cfg.stop_after is not None and step >= cfg.stop_after):
            stopped_early = True
            break
        model.train()
        for g in opt.param_groups:
            g["lr"] = g["scale"] * lr_at(cfg, step)
        rows = [sampler.row(rng) for _ in range(cfg.batch_size)]
        prompts, metas = [r[0] for r in rows], [r[1] for r in rows]
        tvp_rows = [b for b, m in enumerate(metas) if step >= cfg.stage1_steps and m["kind"] == "icl" and m["k"] >= cfg.tvp_min_shots]
        if split:
            loss_lm = split_loss(model, prompts, metas, codec, processor, cfg, lm_params, hook, tvp_rows)
        else:
            tokens, mask, pv, targets, seps = collate(prompts, codec.pad, processor, left=False)
            if tvp_rows:
                hook.mode, hook.rows, hook.pos = "capture", torch.tensor(tvp_rows), seps[tvp_rows]
            try:
                loss_lm = answer_loss(model, tokens, mask, pv, targets)
            finally:
                hook.mode = None
        loss = loss_lm
        loss_tvp = torch.zeros(())
        if tvp_rows:
            vec = hook.captured
            partners = [sampler.partner(rng, metas[b]) for b in tvp_rows]
            ptok, pmask, ppv, ptg, psep = collate(partners, codec.pad, processor, left=False)
            hook.mode, hook.rows, hook.pos, hook.value = "patch", torch.arange(len(partners)), psep, vec
            try:
                loss_tvp = answer_loss(model, ptok, pmask, ppv, ptg)
            finally:
                hook.mode = None
            loss = loss + cfg.tvp_weight * loss_tvp
        opt.zero_grad(set_to_none=True)
        # autograd fills .grad only of leaves that require grad at backward time: the language model
        # is switched on here, and only the forwards that ran with it on (split_loss) reach it
        set_lm_grad(lm_params, True)
        loss.backward()
        set_lm_grad(lm_params, False)
        torch.nn.utils.clip_grad_norm_([*params, *lm_params], cfg.clip)
        opt.step()
        window["lm"] += loss_lm.item()
        window["tvp"] += loss_tvp.item()
        window["n"] += 1
        if (step + 1) % 50 == 0:
            entry = {"step": step + 1, "lm_loss": window["lm"] / window["n"], "tvp_loss": window["tvp"] / window["n"],
                     "lr": lr_at(cfg, step), "seconds": round(time.time() - t0, 1)}
            log["steps"].append(entry)
            window = {"lm": 0.0, "tvp": 0.0, "n": 0}
            if verbose:
                print(json.dumps(entry), flush=True)
        if (step + 1) % cfg.eval_every == 0 or step + 1 in (cfg.stage1_steps, total):
            model.eval()
            ev = {"step": step + 1, **quick_eval(model, processor, sampler, cfg, hook), "seconds": round(time.time() - t0, 1)}
            log["evals"].append(ev)
            if verbose:
                print("eval", json.dumps(ev), flush=True)
    handle.remove()
    model.eval()
    log["stopped_early"] = stopped_early
    log["seconds"] = round(time.time() - t0, 1)
    log["uptime_end"] = _uptime()
    log["trainable_parameters"] = sum(p.numel() for p in [*params, *lm_params])
    log["parameters"] = sum(p.numel() for p in model.parameters())
    out = Path(out)
    save_vlm(model, processor, out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1))
    final = log["evals"][-1] if log["evals"] else {}
    (out / "metrics.json").write_text(json.dumps({"quick_eval_dev": final}, indent=1))
    return log


def _uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5).stdout.strip()
    except Exception:  # pragma: no cover - informational only
        return ""


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvlens.organisms.vlm.train", description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="checkpoint directory to write")
    d = TrainConfig()
    for name in ("seed", "threads", "batch_size", "stage1_steps", "stage2_steps", "tvp_layer", "eval_every"):
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=getattr(d, name))
    for name in ("lr", "tvp_weight", "p_naming", "p_instruction", "lm_lr", "naming_weight"):
        ap.add_argument("--" + name.replace("_", "-"), type=float, default=getattr(d, name))
    ap.add_argument("--lm-losses", choices=("naming", "image"), default=d.lm_losses)
    ap.add_argument("--minutes", type=float, default=None, help="safety cap on wall time (a capped run is not reproducible)")
    ap.add_argument("--stop-after", type=int, default=None, help="stop after this many steps (reproducibility checks)")
    args = ap.parse_args(argv)
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k != "out"})
    print("uptime at start:", _uptime(), flush=True)
    train(cfg, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
