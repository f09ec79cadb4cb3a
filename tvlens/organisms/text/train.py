"""Train the tvlens model organism: a small Llama-shaped transformer that does in-context task
inference on the tvlens task suite.

    python -m tvlens.organisms.text.train --out DIR [--seed S] [--tvp-layer L | --no-tvp]
                                    [--icl-steps N] [--extra-steps M] [--minutes X] [--micro]

Two phases, both on sequences in exactly the tvlens prompt format
(``<bos> [instruction \\n] x1 → y1 \\n ... xk → yk \\n q → y``, 0–8 shots, see
:mod:`tvlens.inputs.text`), with the cross-entropy of *every* answer token (all shots), so the model
learns every shot count; some prompts carry the task's instruction sentence before the examples
or instead of them (Luo et al.'s instruction vectors have something to find):

1. ``--icl-steps`` steps of that language-model loss (ICL emerges after a plateau);
2. ``--extra-steps`` more steps with, for ``organism``, the task-vector prompting loss of
   Yang et al. 2025 (arXiv 2501.09240, "TVP-loss") added: the residual state of a few-shot
   prompt's final separator at layer ``L*`` (``blocks.L*.hook_resid_pre``) replaces the state of
   the separator of a zero-shot prompt of the same task at ``L*``, and the cross-entropy of the
   zero-shot prompt's answer is added to the loss.  ``organism-natural`` (``--no-tvp``) trains
   these steps with the language-model loss only, on the same batches.

Phase 1 is identical for both organisms (same seed, same batches), so it can be run once:
``--snapshot PATH`` writes the exact end-of-phase-1 state (model, optimiser, step) and
``--resume PATH`` starts phase 2 from it; the result is bit-identical to an uninterrupted run
(phase 2 draws its batches from generators seeded afresh at the phase boundary).

Deterministic for a seed on a given device and thread count: all randomness comes from the
script's own ``random.Random`` / ``torch.Generator`` objects seeded from ``--seed``, the data are
generated single-threaded, ``torch.use_deterministic_algorithms(True)`` is on and the number of
threads is fixed (``--threads``).  ``--minutes`` is only a safety cap: if it stops training early
the result depends on the machine's speed (the log says so, with the step); ``--stop-after STEP``
reproduces such a run deterministically.

``--hard-task-weight A`` (phase 2): tasks are sampled from a mix of the uniform distribution and one
proportional to the phase-1 model's per-task error (weights computed once, from fixed batches, when
phase 2 starts; identical for both organisms since they share phase 1), so the tasks that are hard to
tell apart from the demonstrations (successor vs predecessor, next vs previous letter, swap case) get
more practice.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from tvlens.organisms.resid_hook import ResidHook
from tvlens.organisms.text.tokenizer import NEWLINE, SEPARATOR, build_tokenizer, words_of

__all__ = ["ModelShape", "TrainConfig", "EpisodeSampler", "build_model", "train", "main", "MICRO"]


@dataclass(frozen=True)
class ModelShape:
    """Architecture of the organism (a ``transformers.LlamaConfig``: RoPE, RMSNorm, gated MLP)."""

    d_model: int = 128
    n_layers: int = 4
    n_heads: int = 8
    n_kv_heads: int = 4  # grouped-query attention: 2 query heads share each key/value head
    d_mlp: int = 512
    n_ctx: int = 256
    rope_theta: float = 10000.0


@dataclass(frozen=True)
class TrainConfig:
    seed: int = 0
    shape: ModelShape = field(default_factory=ModelShape)
    batch_size: int = 32
    icl_steps: int = 3000
    extra_steps: int = 3000
    tvp_layer: int | None = 2  # None: organism-natural (language-model loss only)
    tvp_weight: float = 1.0
    tvp_min_shots: int = 3  # few-shot source prompts for TVP-loss have at least this many demos
    lr: float = 2e-3
    warmup: int = 100
    min_lr_frac: float = 0.1  # cosine decay to lr*min_lr_frac over phase 2
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    max_shots: int = 8
    p_instruction: float = 0.15  # instruction sentence before the examples
    p_instruction_only: float = 0.08  # instruction sentence instead of the examples (0 shots)
    log_every: int = 100
    threads: int = 1
    tasks: tuple[str, ...] | None = None  # None: the whole suite
    minutes: float | None = None  # safety cap on wall-clock time (breaks determinism if hit)
    hard_task_weight: float = 2.0  # phase 2: mix uniform task sampling with sampling ∝ the phase-1 model's per-task error
    stop_after: int | None = None  # stop at this global step (the schedule still assumes icl+extra steps)
    checkpoint_every: int = 0  # >0: write a resumable state every this many steps (to --snapshot + ".last")

    def phase1_key(self) -> str:
        """Hash of everything phase 1 depends on (a snapshot is only resumed under the same key)."""
        d = dataclasses.asdict(self)
        for k in ("extra_steps", "tvp_layer", "tvp_weight", "tvp_min_shots", "min_lr_frac", "log_every", "minutes",
                  "checkpoint_every", "hard_task_weight", "stop_after"):
            d.pop(k)
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


#: A config that trains in seconds (tests): 2 layers, 4 heads / 2 kv heads, 6 tasks, 10 steps.
MICRO = TrainConfig(
    shape=ModelShape(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, d_mlp=64, n_ctx=128),
    batch_size=8,
    icl_steps=6,
    extra_steps=4,
    tvp_layer=1,
    warmup=2,
    log_every=5,
    threads=1,
    tasks=None,
)
MICRO_N_TASKS = 6


# --------------------------------------------------------------------------------------------
# data


@dataclass
class Batch:
    tokens: torch.Tensor  # [batch, pos] right-padded
    targets: torch.Tensor  # [batch, pos] next-token target at answer positions, -100 elsewhere
    n_prior: torch.Tensor  # [batch, pos] number of demos before this answer (first answer tokens), -1 elsewhere
    task_idx: list[int]
    n_shots: list[int]  # demos before the final query
    instruction: list[bool]
    final_sep: list[int]  # position of the final separator (the query's →)
    used: list[list[int]]  # pair indices used in the row


class EpisodeSampler:
    """Generates training sequences in the tvlens prompt format, token ids directly.

    Each row: a task drawn uniformly, ``k`` ~ U{0..max_shots} demos and a query drawn without
    replacement from *all* the task's pairs (the organism memorises the facts; only evaluation
    uses the held-out split for queries).
    """

    def __init__(self, tasks: Sequence[Any], tokenizer: Any, cfg: TrainConfig):
        self.tasks = list(tasks)
        self.cfg = cfg
        self.task_weights: list[float] | None = None
        self._cum: list[float] | None = None
        vocab = tokenizer.get_vocab()
        self.pad = tokenizer.pad_token_id
        self.bos = tokenizer.bos_token_id
        self.sep = vocab[SEPARATOR]
        self.nl = vocab[NEWLINE]

        def enc(text: str) -> list[int]:
            # through the tokenizer, so that its case normaliser maps natural-case data onto the vocabulary
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            missing = [w for w, i in zip(words_of(text), ids) if i == tokenizer.unk_token_id]
            if missing:
                raise ValueError(f"words {missing[:5]} are not in the organism's vocabulary; rebuild the tokenizer")
            return list(ids)

        self.xs = [[enc(x) for x, _ in t.pairs] for t in self.tasks]
        self.ys = [[enc(y) for _, y in t.pairs] for t in self.tasks]
        self.instr = [enc(getattr(t, "instruction", "") or "") for t in self.tasks]
        for t, x in zip(self.tasks, self.xs):
            if len(x) < cfg.max_shots + 2:
                raise ValueError(f"task {t.name!r} has {len(x)} pairs; training needs at least {cfg.max_shots + 2}")

    def set_task_weights(self, weights: Sequence[float] | None) -> None:
        self.task_weights = None if weights is None else [float(w) for w in weights]
        if weights is not None:
            c, acc = [], 0.0
            for w in self.task_weights:
                acc += w
                c.append(acc)
            self._cum = c

    def row(self, rng: random.Random) -> tuple[list[int], list[int], list[int], int, int, bool, int, list[int]]:
        cfg = self.cfg
        if self.task_weights is None:
            ti = rng.randrange(len(self.tasks))
        else:
            ti = rng.choices(range(len(self.tasks)), cum_weights=self._cum)[0]
        u = rng.random()
        if u < cfg.p_instruction_only and self.instr[ti]:
            k, instr = 0, True
        else:
            k = rng.randint(0, cfg.max_shots)
            instr = u < cfg.p_instruction_only + cfg.p_instruction and bool(self.instr[ti])
        idx = rng.sample(range(len(self.xs[ti])), k + 1)
        toks = [self.bos]
        tg: list[int] = [-100]
        npri: list[int] = [-1]
        if instr:
            seg = self.instr[ti] + [self.nl]
            toks += seg
            tg += [-100] * len(seg)
            npri += [-1] * len(seg)
        final_sep = -1
        for i, pi in enumerate(idx):
            x, y = self.xs[ti][pi], self.ys[ti][pi]
            toks += x
            tg += [-100] * len(x)
            npri += [-1] * len(x)
            final_sep = len(toks)
            toks.append(self.sep)
            # target at position p is the token at p+1: the separator predicts y[0], y[j] predicts y[j+1]
            tg.append(y[0])
            npri.append(i)
            toks += y
            tg += y[1:] + [-100]
            npri += [-1] * len(y)
            if i < k:
                toks.append(self.nl)
                tg.append(-100)
                npri.append(-1)
        # the last target slot (after the final answer token) is -100 already
        return toks, tg, npri, ti, k, instr, final_sep, idx

    def batch(self, rng: random.Random, n: int) -> Batch:
        rows = [self.row(rng) for _ in range(n)]
        T = max(len(r[0]) for r in rows)
        tokens = torch.full((n, T), self.pad, dtype=torch.long)
        targets = torch.full((n, T), -100, dtype=torch.long)
        n_prior = torch.full((n, T), -1, dtype=torch.long)
        for b, (toks, tg, npri, *_rest) in enumerate(rows):
            L = len(toks)
            tokens[b, :L] = torch.tensor(toks)
            # tg[p] is the target predicted *at* p (already shifted when built)
            targets[b, :L] = torch.tensor(tg[:L])
            n_prior[b, :L] = torch.tensor(npri[:L])
        return Batch(
            tokens=tokens,
            targets=targets,
            n_prior=n_prior,
            task_idx=[r[3] for r in rows],
            n_shots=[r[4] for r in rows],
            instruction=[r[5] for r in rows],
            final_sep=[r[6] for r in rows],
            used=[r[7] for r in rows],
        )

    def zero_shot_partners(self, rng: random.Random, batch: Batch, rows: list[int]):
        """For each row, a zero-shot prompt ``<bos> q → y`` of the same task with a query not used
        in the row.  Returns tokens, targets (as in :class:`Batch`) and the separator positions."""
        seqs, seps = [], []
        for b in rows:
            ti = batch.task_idx[b]
            used = set(batch.used[b])
            while True:
                pi = rng.randrange(len(self.xs[ti]))
                if pi not in used:
                    break
            x, y = self.xs[ti][pi], self.ys[ti][pi]
            toks = [self.bos] + x + [self.sep] + y
            tg = [-100] * (1 + len(x)) + y + [-100]
            seqs.append((toks, tg[: len(toks)]))
            seps.append(1 + len(x))
        T = max(len(s[0]) for s in seqs)
        tokens = torch.full((len(rows), T), self.pad, dtype=torch.long)
        targets = torch.full((len(rows), T), -100, dtype=torch.long)
        for i, (toks, tg) in enumerate(seqs):
            tokens[i, : len(toks)] = torch.tensor(toks)
            targets[i, : len(tg)] = torch.tensor(tg)
        return tokens, targets, seps


# --------------------------------------------------------------------------------------------
# model


def build_model(shape: ModelShape, tokenizer: Any, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=shape.d_model,
        intermediate_size=shape.d_mlp,
        num_hidden_layers=shape.n_layers,
        num_attention_heads=shape.n_heads,
        num_key_value_heads=shape.n_kv_heads,
        head_dim=shape.d_model // shape.n_heads,
        max_position_embeddings=shape.n_ctx,
        rope_theta=shape.rope_theta,
        rms_norm_eps=1e-5,
        hidden_act="silu",
        tie_word_embeddings=False,
        attention_bias=False,
        mlp_bias=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    try:
        config._attn_implementation = "sdpa"
    except Exception:  # pragma: no cover
        pass
    # initialise under a private generator: the global RNG is saved and restored
    devices = []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model


def _answer_loss(model, tokens: torch.Tensor, targets: torch.Tensor):
    """CE over answer positions only (the unembedding is applied to those positions only)."""
    hidden = model.model(input_ids=tokens).last_hidden_state
    sel = targets != -100
    logits = model.lm_head(hidden[sel])
    tgt = targets[sel]
    return F.cross_entropy(logits, tgt), logits, sel


# --------------------------------------------------------------------------------------------
# training


@torch.no_grad()
def _hard_task_weights(model, sampler: EpisodeSampler, cfg: TrainConfig, device) -> list[float]:
    """Per-task sampling weights for phase 2: ``(1-a) + a * err_t / mean(err)`` with
    ``a = hard_task_weight / (1 + hard_task_weight)``, where ``err_t`` is the model's first-token
    error on answers with at least one demonstration before them, on 48 fixed batches (their own
    generator), so the weights are the same for both organisms (computed from the shared phase-1 model)."""
    was_training = model.training
    model.eval()
    rng = random.Random(cfg.seed * 1_000_003 + 4)
    n_t = len(sampler.tasks)
    wrong = torch.zeros(n_t)
    seen = torch.zeros(n_t)
    for _ in range(48):
        b = sampler.batch(rng, cfg.batch_size)
        tokens, targets = b.tokens.to(device), b.targets.to(device)
        _, logits, sel = _answer_loss(model, tokens, targets)
        npri = b.n_prior.to(device)[sel]
        rows = torch.arange(tokens.shape[0], device=device)[:, None].expand_as(tokens)[sel]
        m = npri >= 1
        err = (logits.argmax(-1) != targets[sel])[m].float().cpu()
        tix = torch.tensor(b.task_idx)[rows[m].cpu()]
        wrong.index_add_(0, tix, err)
        seen.index_add_(0, tix, torch.ones_like(err))
    err = wrong / seen.clamp(min=1)
    a = cfg.hard_task_weight / (1 + cfg.hard_task_weight)
    w = (1 - a) + a * err / err.mean().clamp(min=1e-6)
    model.train(was_training)
    return [round(float(x), 6) for x in w]


def _lr_at(cfg: TrainConfig, step: int) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    if step < cfg.icl_steps or cfg.extra_steps == 0:
        return cfg.lr
    t = (step - cfg.icl_steps) / max(1, cfg.extra_steps)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * t)))


def _resolve_tasks(cfg: TrainConfig, micro: bool = False):
    from tvlens.tasks import list_tasks, load_task

    names = list(cfg.tasks) if cfg.tasks else list_tasks()
    tasks = [load_task(n) for n in names]
    if micro and not cfg.tasks:
        tasks = tasks[:MICRO_N_TASKS]
    return tasks


def _organism_tokenizer():
    from tvlens.organisms.text.tokenizer import default_organism_tokenizer

    return default_organism_tokenizer()


def train(
    cfg: TrainConfig,
    out: str | Path | None,
    *,
    tasks: Sequence[Any] | None = None,
    tokenizer: Any = None,
    snapshot: str | Path | None = None,
    resume: str | Path | None = None,
    micro: bool = False,
    verbose: bool = True,
):
    """Train an organism and (if ``out``) save it as an HF directory (config, safetensors,
    tokenizer, ``training_log.json``).  Returns ``(model, log)``."""
    t_start = time.time()
    torch.set_num_threads(cfg.threads)
    det_before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        return _train(cfg, out, tasks, tokenizer, snapshot, resume, micro, verbose, t_start)
    finally:
        torch.use_deterministic_algorithms(det_before)


def _log(verbose: bool, msg: str):
    if verbose:
        print(msg, flush=True)


def _train(cfg, out, tasks, tokenizer, snapshot, resume, micro, verbose, t_start):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if tasks is None:
        tasks = _resolve_tasks(cfg, micro)
    if tokenizer is None:
        tokenizer = _organism_tokenizer()
    sampler = EpisodeSampler(tasks, tokenizer, cfg)
    shape = cfg.shape
    if cfg.tvp_layer is not None and not (0 <= cfg.tvp_layer < shape.n_layers):
        raise ValueError(f"--tvp-layer {cfg.tvp_layer} is out of range; the model has layers 0..{shape.n_layers - 1}")
    model = build_model(shape, tokenizer, cfg.seed).to(device)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=cfg.lr,
        betas=(0.9, 0.98),
        eps=1e-8,
    )
    log: dict[str, Any] = {
        "config": dataclasses.asdict(cfg),
        "tasks": [t.name for t in tasks],
        "n_params": sum(p.numel() for p in model.parameters()),
        "device": str(device),
        "torch": torch.__version__,
        "steps": [],
        "stopped_early": False,
    }
    step = 0
    phase1_seconds = None
    rng_states = None
    if resume is not None:
        snap = torch.load(resume, map_location=device, weights_only=False)
        if snap["phase1_key"] != cfg.phase1_key():
            raise ValueError(
                f"snapshot {resume} was made with a different phase-1 configuration "
                f"({snap['phase1_key']} != {cfg.phase1_key()}); rerun without --resume"
            )
        model.load_state_dict(snap["model"])
        opt.load_state_dict(snap["optimizer"])
        step = snap["step"]
        log["steps"] = snap["log_steps"]
        if "rng" in snap:
            rng_states = snap["rng"]
        if snap.get("task_weights") is not None:
            sampler.set_task_weights(snap["task_weights"])
            log["task_weights"] = dict(zip((t.name for t in tasks), snap["task_weights"]))
        phase1_seconds = snap["seconds"]
        log["resumed_from"] = str(resume)
        _log(verbose, f"resumed phase-1 snapshot at step {step} ({phase1_seconds:.0f}s of training)")

    total = cfg.icl_steps + cfg.extra_steps
    rng = random.Random(cfg.seed * 1_000_003 + 1)
    rng2 = random.Random(cfg.seed * 1_000_003 + 2)  # phase-2 batches (same for both organisms)
    rng_tvp = random.Random(cfg.seed * 1_000_003 + 3)  # phase-2 zero-shot partners
    if rng_states is not None:  # mid-run resume (crash recovery): continue the same streams
        for r_, st in zip((rng, rng2, rng_tvp), rng_states):
            r_.setstate(st)
    hook = ResidHook()
    handle = None
    if cfg.tvp_layer is not None:
        handle = model.model.layers[cfg.tvp_layer].register_forward_pre_hook(hook, with_kwargs=True)
    acc_sum = torch.zeros(cfg.max_shots + 1)
    acc_n = torch.zeros(cfg.max_shots + 1)
    loss_sum = tvp_sum = tvp_acc_sum = 0.0
    n_logged = 0
    t_phase = time.time()
    model.train()
    try:
        while step < total:
            if cfg.stop_after is not None and step >= cfg.stop_after:
                _log(verbose, f"stopping at step {step} (--stop-after)")
                break
            if cfg.minutes is not None and time.time() - t_start > 60 * cfg.minutes:
                log["stopped_early"] = True
                _log(verbose, f"stopping at step {step}: --minutes {cfg.minutes} reached (run is not reproducible)")
                break
            phase2 = step >= cfg.icl_steps
            if phase2 and cfg.hard_task_weight > 0 and sampler.task_weights is None:
                sampler.set_task_weights(_hard_task_weights(model, sampler, cfg, device))
                log["task_weights"] = dict(zip((t.name for t in tasks), sampler.task_weights))
                _log(verbose, "phase-2 task weights: " + " ".join(f"{t.name}:{w:.2f}" for t, w in zip(tasks, sampler.task_weights)))
            batch = sampler.batch(rng2 if phase2 else rng, cfg.batch_size)
            tokens, targets = batch.tokens.to(device), batch.targets.to(device)
            use_tvp = phase2 and cfg.tvp_layer is not None
            # the whole residual is kept and indexed after the forward, as when the shipped organism was
            # trained: indexing it inside the hook changes the order gradients are summed in (weights ~1e-7 apart)
            hook.mode = "capture" if use_tvp else None
            hook.rows = hook.pos = None
            loss, logits, sel = _answer_loss(model, tokens, targets)
            total_loss = loss
            if use_tvp:
                # the few-shot rows whose final-separator residual is patched into their zero-shot partners
                src_rows = [
                    b for b in range(len(batch.task_idx))
                    if batch.n_shots[b] >= cfg.tvp_min_shots and not batch.instruction[b]
                ]
                if src_rows:
                    rows_t = torch.tensor(src_rows, device=device)
                    seps_t = torch.tensor([batch.final_sep[b] for b in src_rows], device=device)
                    src = hook.captured[rows_t, seps_t]
                    zt, ztg, zsep = sampler.zero_shot_partners(rng_tvp, batch, src_rows)
                    hook.mode = "patch"
                    hook.rows = torch.arange(len(src_rows), device=device)
                    hook.pos = torch.tensor(zsep, device=device)
                    hook.value = src
                    tvp_loss, zlogits, zsel = _answer_loss(model, zt.to(device), ztg.to(device))
                    total_loss = total_loss + cfg.tvp_weight * tvp_loss
                    tvp_sum += tvp_loss.item()
                    # first-token accuracy of the patched zero-shot prompts
                    first = torch.zeros_like(ztg, dtype=torch.bool)
                    first[torch.arange(len(zsep)), torch.tensor(zsep)] = True
                    firsts = first.to(device)[zsel]
                    tvp_acc_sum += (zlogits.argmax(-1)[firsts] == ztg.to(device)[zsel][firsts]).float().mean().item()
                hook.mode = None
                hook.captured = hook.value = None
            for g in opt.param_groups:
                g["lr"] = _lr_at(cfg, step)
            opt.zero_grad(set_to_none=True)
            total_loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            # per-shot first-token accuracy on the training batch (free: logits exist)
            with torch.no_grad():
                npri = batch.n_prior.to(device)[sel]
                correct = logits.argmax(-1) == targets[sel]
                m = npri >= 0
                acc_sum.index_add_(0, npri[m].cpu(), correct[m].float().cpu())
                acc_n.index_add_(0, npri[m].cpu(), torch.ones(int(m.sum())))
            loss_sum += loss.item()
            n_logged += 1
            if step % cfg.log_every == 0 or step == total:
                acc = (acc_sum / acc_n.clamp(min=1)).tolist()
                rec = {
                    "step": step,
                    "seconds": round(time.time() - t_start, 1),
                    "loss": round(loss_sum / n_logged, 4),
                    "acc_by_shots": [round(a, 3) for a in acc],
                    "lr": _lr_at(cfg, step - 1),
                }
                if use_tvp:
                    rec["tvp_loss"] = round(tvp_sum / n_logged, 4)
                    rec["tvp_acc"] = round(tvp_acc_sum / n_logged, 3)
                log["steps"].append(rec)
                shots = " ".join(f"{a:.2f}" for a in acc)
                extra = f" tvp {rec['tvp_loss']:.3f} acc {rec['tvp_acc']:.2f}" if use_tvp else ""
                _log(verbose, f"step {step:5d} {rec['seconds']:7.1f}s loss {rec['loss']:.3f} acc@shots [{shots}]{extra}")
                acc_sum.zero_(), acc_n.zero_()
                loss_sum = tvp_sum = tvp_acc_sum = 0.0
                n_logged = 0
            if (
                snapshot is not None and cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0
                and step != cfg.icl_steps and step < total
            ):
                model._tvlens_task_weights = sampler.task_weights
                _write_state(Path(str(snapshot) + ".last"), cfg, model, opt, step, log, time.time() - t_start,
                             (rng, rng2, rng_tvp))
            if step == cfg.icl_steps:
                phase1_seconds = time.time() - t_start
                if snapshot is not None:
                    # no generator states: phase 2 reseeds its generators at the boundary
                    _write_state(Path(snapshot), cfg, model, opt, step, log, phase1_seconds)
                    _log(verbose, f"phase-1 snapshot written to {snapshot}")
    finally:
        if handle is not None:
            handle.remove()
    model.eval()
    log["final_step"] = step
    log["phase1_seconds"] = phase1_seconds
    if resume is not None:
        log["phase2_seconds"] = round(time.time() - t_phase, 1)
    elif phase1_seconds is not None:
        log["phase2_seconds"] = round(time.time() - t_start - phase1_seconds, 1)
    # wall-clock of the whole training; for a resumed run, phase 1's time (from the snapshot) + this process's
    log["total_seconds"] = round(time.time() - t_start + ((phase1_seconds or 0.0) if resume is not None else 0.0), 1)
    if out is not None:
        save(model, tokenizer, out, log)
        _log(verbose, f"saved to {out}")
    return model, log


def _write_state(path: Path, cfg, model, opt, step, log, seconds, rngs=None) -> None:
    """Write a training state atomically; with ``rngs`` it is a mid-phase state that resumes exactly,
    without them the phase-1 snapshot (phase 2 reseeds its generators)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(str(path) + ".tmp")
    state = {
        "phase1_key": cfg.phase1_key(),
        "model": model.state_dict(),
        "optimizer": opt.state_dict(),
        "step": step,
        "log_steps": log["steps"],
        "seconds": seconds,
    }
    if rngs is not None:
        state["rng"] = [r.getstate() for r in rngs]
        state["task_weights"] = getattr(model, "_tvlens_task_weights", None)
    torch.save(state, tmp)
    tmp.replace(path)


def save(model, tokenizer, out: str | Path, log: dict) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    (out / "training_log.json").write_text(json.dumps(log, indent=1, default=str))


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tvlens.organisms.text.train", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="output directory (HF checkpoint + tokenizer + training_log.json)")
    p.add_argument("--seed", type=int, default=0)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--tvp-layer", type=int, default=None, help="layer L* of the TVP-loss (default 2)")
    g.add_argument("--no-tvp", action="store_true", help="language-model loss only (organism-natural)")
    p.add_argument("--icl-steps", type=int, default=None, help="phase-1 steps (language-model loss)")
    p.add_argument("--extra-steps", type=int, default=None, help="phase-2 steps (+ TVP-loss unless --no-tvp)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--minutes", type=float, default=None, help="wall-clock safety cap (stopping early is not reproducible)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--checkpoint-every", type=int, default=None, help="write a resumable state to SNAPSHOT.last every N steps")
    p.add_argument("--log-every", type=int, default=None)
    p.add_argument("--stop-after", type=int, default=None,
                   help="stop at this global step, deterministically (the lr schedule still spans all steps)")
    p.add_argument("--hard-task-weight", type=float, default=None,
                   help="phase 2: mix uniform task sampling with sampling by the phase-1 model's per-task error")
    p.add_argument("--tasks", default=None, help="comma-separated task names (default: the whole suite)")
    p.add_argument("--snapshot", default=None, help="write the end-of-phase-1 state here")
    p.add_argument("--resume", default=None, help="start phase 2 from a --snapshot file of the same phase-1 config")
    p.add_argument("--micro", action="store_true", help="tiny config, a few steps (tests)")
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    cfg = MICRO if a.micro else TrainConfig()
    upd: dict[str, Any] = {"seed": a.seed}
    if a.no_tvp:
        upd["tvp_layer"] = None
    elif a.tvp_layer is not None:
        upd["tvp_layer"] = a.tvp_layer
    for k in ("icl_steps", "extra_steps", "batch_size", "minutes", "threads", "checkpoint_every", "log_every",
              "hard_task_weight", "stop_after"):
        if getattr(a, k) is not None:
            upd[k] = getattr(a, k)
    if a.tasks:
        upd["tasks"] = tuple(t.strip() for t in a.tasks.split(",") if t.strip())
    cfg = dataclasses.replace(cfg, **upd)
    train(cfg, a.out, snapshot=a.snapshot, resume=a.resume, micro=a.micro, verbose=not a.quiet)
    return 0


if __name__ == "__main__":
    sys.exit(main())
