"""Measure ``organism-vlm`` through the TransformerLens bridge: Luo et al.'s cross-modal table.

Luo, Darrell & Bar 2024 (*Task Vectors are Cross-Modal*, §4, Table 2) compare, on image queries:

==================  ===============================================================================
No Context          ``<bos> <image>×4 →``: the image query alone
Image ICL Base      5 image → word demonstrations in context, then the image query
Image ICL Patch     the mean last-position state of image-ICL prompts at layer L patched into No Context
Text ICL xBase      5 text demonstrations in context (``france → paris``), then the image query
Text ICL xPatch     the mean last-position state of text-ICL prompts patched into No Context
Instruction xBase   the task's instruction sentence, then the image query
Instruction xPatch  the mean last-position state of ``instruction \\n x →`` text prompts, patched
Ensemble            the mean of the instruction and text-exemplar vectors, patched (Luo §4.2)
==================  ===============================================================================

Patching replaces ``blocks.{L}.hook_resid_pre`` at the last position (Hendel et al. 2023, §3); the
layer of each patched condition is picked on the dev split and the table is measured on the test
split with held-out renderings (variants never used in training). Accuracy is first-token accuracy
(argmax at the final separator equals the answer's first token). Standard errors treat an *item* as
the unit (its renderings are averaged first), SE of the task mean = sqrt(Σ_t var_t / n_t) / T.

Also measured: the cross-task control (task A's text vector on task B's image queries of the same
domain, scored against B's answers where A's and B's first answer tokens differ, and against A's),
and the similarity of text-ICL and image-ICL task vectors (raw and centred cosine, same task vs other
tasks, Luo §5), next to the same numbers for an untrained vision tower (the text organism under a
fresh, untrained CLIP tower + projector).

This script uses plain bridge hooks (``run_with_hooks`` / ``run_with_cache``); it sets
``PIP_NO_INDEX=1`` before booting, because the bridge runs ``pip install torchvision`` when it cannot
load a processor.

    python -m tvlens.organisms.vlm.check [--checkpoint DIR] [--markdown table.md]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Sequence

os.environ.setdefault("PIP_NO_INDEX", "1")  # the bridge may shell out to pip: never let it reach an index
os.environ.setdefault("UV_OFFLINE", "1")

import numpy as np
import torch

from .build import build_vlm, load_vlm, save_vlm
from .images import DOMAIN_TASKS, domain_of_task
from .prompts import Image, Prompt, PromptCodec, collate
from .train import EVAL_VARIANT0, task_pools

__all__ = ["CONDITIONS", "Runner", "measure", "main"]

CHECKPOINT = Path(__file__).parent / "checkpoint"
CONDITIONS = (
    "No Context",
    "Image ICL Base",
    "Image ICL Patch",
    "Text ICL xBase",
    "Text ICL xPatch",
    "Instruction xBase",
    "Instruction xPatch",
    "Ensemble",
)
PATCHED = {"Image ICL Patch": "image", "Text ICL xPatch": "text", "Instruction xPatch": "instruction", "Ensemble": "ensemble"}


def resid_pre(layer: int) -> str:
    """Hook name of the residual stream entering block ``layer``."""
    return f"blocks.{layer}.hook_resid_pre"


class Runner:
    """Batched last-position forwards of a booted bridge, with optional last-position patching."""

    def __init__(self, bridge: Any, processor: Any, batch_size: int = 64):
        self.bridge, self.processor, self.bs = bridge, processor, batch_size
        self.codec = PromptCodec(processor.tokenizer)
        self.n_layers = bridge.cfg.n_layers

    def _chunks(self, prompts: Sequence[Prompt]):
        for i in range(0, len(prompts), self.bs):
            yield collate(prompts[i : i + self.bs], self.codec.pad, self.processor, left=True)

    @torch.no_grad()
    def argmax(self, prompts: Sequence[Prompt], layer: int | None = None, vector: torch.Tensor | None = None) -> torch.Tensor:
        """First predicted token of each prompt; with ``vector`` ``[d_model]`` or ``[batch, d_model]``
        patched into ``blocks.{layer}.hook_resid_pre`` at the last position."""
        out, start = [], 0
        for tokens, mask, pv, _, _ in self._chunks(prompts):
            n = tokens.shape[0]
            kw = {"attention_mask": mask} | ({"pixel_values": pv} if pv is not None else {})
            if vector is None:
                logits = self.bridge(tokens, **kw)
            else:
                v = vector if vector.ndim == 1 else vector[start : start + n]

                def patch(resid, hook, v=v):
                    resid = resid.clone()
                    resid[:, -1] = v
                    return resid

                logits = self.bridge.run_with_hooks(tokens, fwd_hooks=[(resid_pre(layer), patch)], **kw)
            out.append(logits[:, -1].argmax(-1))
            start += n
        return torch.cat(out)

    @torch.no_grad()
    def states(self, prompts: Sequence[Prompt], layers: Sequence[int]) -> torch.Tensor:
        """``[layer, batch, d_model]`` last-position ``hook_resid_pre`` states."""
        names = {resid_pre(l) for l in layers}
        rows = []
        for tokens, mask, pv, _, _ in self._chunks(prompts):
            kw = {"attention_mask": mask} | ({"pixel_values": pv} if pv is not None else {})
            _, cache = self.bridge.run_with_cache(tokens, names_filter=lambda n: n in names, **kw)
            rows.append(torch.stack([cache[resid_pre(l)][:, -1] for l in layers]))
        return torch.cat(rows, dim=1)


def boot(path: str | Path) -> tuple[Any, Any]:
    """The bridge (compatibility mode, no weight processing) and processor of a checkpoint."""
    from transformer_lens.model_bridge import TransformerBridge

    _, processor = load_vlm(path)
    bridge = TransformerBridge.boot_transformers(str(path), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    return bridge, processor


# ----------------------------------------------------------------------------------------------
# prompts of one task


class TaskPrompts:
    """All prompts of one task for one split: queries (items × renderings), contexts for vectors."""

    def __init__(self, codec: PromptCodec, task: str, pool: list[tuple[str, str]], split: str, n_variants: int, n_ctx: int, seed: int):
        from tvlens.tasks import load_task

        t = load_task(task)
        rng = random.Random(f"{seed}:{task}:{split}")
        self.task, self.domain = task, domain_of_task(task)
        base = EVAL_VARIANT0 + (0 if split == "test" else 500_000)
        self.pairs = list(t.split(split))
        self.items = [x for x, _ in self.pairs for _ in range(n_variants)]
        self.answers_text = [y for _, y in self.pairs for _ in range(n_variants)]
        self.answers = torch.tensor([codec.words(y)[0] for y in self.answers_text])
        self.q_images = [Image(self.domain, x, base + 1000 * j + v) for j, (x, _) in enumerate(self.pairs) for v in range(n_variants)]
        train = list(t.split("train"))
        demo_img = lambda x, j: Image(self.domain, x, base + 400_000 + j)  # noqa: E731
        self.no_context = [codec.prompt([], q) for q in self.q_images]
        self.image_base, self.text_base = [], []
        for i, q in enumerate(self.q_images):
            demos = rng.sample(pool, 5)
            self.image_base.append(codec.prompt([(demo_img(a, 10 * i + j), b) for j, (a, b) in enumerate(demos)], q))
            self.text_base.append(codec.prompt(rng.sample(train, 5), q))
        self.instruction_base = [codec.prompt([], q, instruction=t.instruction) for q in self.q_images]
        # contexts the task vectors are averaged over (queries from train: Hendel's dummy query)
        self.ctx: dict[str, list[Prompt]] = {"image": [], "text": [], "instruction": []}
        for i in range(n_ctx):
            ex = rng.sample(pool, 6)
            self.ctx["image"].append(codec.prompt([(demo_img(a, 10_000 + 10 * i + j), b) for j, (a, b) in enumerate(ex[:5])], demo_img(ex[5][0], 20_000 + i)))
            tx = rng.sample(train, 6)
            self.ctx["text"].append(codec.prompt(tx[:5], tx[5][0]))
            self.ctx["instruction"].append(codec.prompt([], rng.choice(train)[0], instruction=t.instruction))


def task_vectors(runner: Runner, tp: TaskPrompts, layers: Sequence[int]) -> dict[str, torch.Tensor]:
    """``{kind: [layer, d_model]}`` mean last-position states (Hendel et al. 2023, §3; Luo §4)."""
    vec = {k: runner.states(v, layers).mean(1) for k, v in tp.ctx.items()}
    vec["ensemble"] = (vec["instruction"] + vec["text"]) / 2
    return vec


# ----------------------------------------------------------------------------------------------
# statistics


def item_stats(correct: torch.Tensor, items: Sequence[str], keep: torch.Tensor | None = None) -> tuple[float, float, int]:
    """Mean accuracy, its variance estimate over items (renderings of an item averaged first), n items."""
    per: dict[str, list[float]] = {}
    for c, x, k in zip(correct.float().tolist(), items, (keep.tolist() if keep is not None else [True] * len(items))):
        if k:
            per.setdefault(x, []).append(c)
    vals = np.array([np.mean(v) for v in per.values()]) if per else np.zeros(0)
    if len(vals) == 0:
        return float("nan"), float("nan"), 0
    var = float(vals.var(ddof=1)) if len(vals) > 1 else 0.0
    return float(vals.mean()), var, len(vals)


def pooled(rows: Sequence[tuple[float, float, int]]) -> dict[str, float]:
    """Mean over tasks and its standard error sqrt(Σ var_t / n_t) / T."""
    rows = [r for r in rows if r[2] > 0]
    T = len(rows)
    mean = sum(r[0] for r in rows) / T
    se = math.sqrt(sum(r[1] / r[2] for r in rows)) / T
    return {"mean": mean, "se": se, "tasks": T}


# ----------------------------------------------------------------------------------------------
# the measurement


def measure(path: str | Path = CHECKPOINT, n_variants: int = 3, n_ctx: int = 32, seed: int = 0, untrained_baseline: bool = True, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Luo et al.'s table, the cross-task control and the text/image vector similarity (see module doc)."""
    t0 = time.time()
    bridge, processor = boot(path)
    runner = Runner(bridge, processor)
    layers = list(range(runner.n_layers))
    tasks = [t for ts in DOMAIN_TASKS.values() for t in ts]
    pools, orphans = task_pools(tasks)
    trained_pairs = {(o["task"], o["item"]) for o in orphans}
    codec = runner.codec
    dev = {t: TaskPrompts(codec, t, pools[t], "dev", 1, n_ctx, seed) for t in tasks}
    test = {t: TaskPrompts(codec, t, pools[t], "test", n_variants, n_ctx, seed) for t in tasks}
    vecs = {t: task_vectors(runner, test[t], layers) for t in tasks}
    log(f"vectors done ({time.time() - t0:.0f} s)")

    # layer choice on dev, per patched condition (mean over tasks)
    layer_curves: dict[str, list[float]] = {}
    best_layer: dict[str, int] = {}
    for cond, kind in PATCHED.items():
        curve = []
        for li, L in enumerate(layers):
            accs = [runner.argmax(dev[t].no_context, L, vecs[t][kind][li]).eq(dev[t].answers).float().mean().item() for t in tasks]
            curve.append(float(np.mean(accs)))
        layer_curves[cond] = curve
        best_layer[cond] = layers[int(np.argmax(curve))]
    log(f"layer choice on dev: {best_layer} ({time.time() - t0:.0f} s)")

    correct: dict[str, dict[str, torch.Tensor]] = {c: {} for c in CONDITIONS}
    for t in tasks:
        tp = test[t]
        correct["No Context"][t] = runner.argmax(tp.no_context).eq(tp.answers)
        correct["Image ICL Base"][t] = runner.argmax(tp.image_base).eq(tp.answers)
        correct["Text ICL xBase"][t] = runner.argmax(tp.text_base).eq(tp.answers)
        correct["Instruction xBase"][t] = runner.argmax(tp.instruction_base).eq(tp.answers)
        for cond, kind in PATCHED.items():
            L = best_layer[cond]
            correct[cond][t] = runner.argmax(tp.no_context, L, vecs[t][kind][layers.index(L)]).eq(tp.answers)
    log(f"table done ({time.time() - t0:.0f} s)")

    def table(keep_fn=None) -> dict[str, Any]:
        res: dict[str, Any] = {}
        for cond in CONDITIONS:
            per = {}
            for t in tasks:
                keep = keep_fn(t) if keep_fn else None
                per[t] = item_stats(correct[cond][t], test[t].items, keep)
            res[cond] = {**pooled(list(per.values())), "per_task": {t: round(v[0], 4) for t, v in per.items()}}
        return res

    main_table = table()
    clean_table = table(lambda t: torch.tensor([(t, x) not in trained_pairs for x in test[t].items]))

    # paired comparison xPatch - xBase on the same queries
    diffs = [item_stats(correct["Text ICL xPatch"][t].float() - correct["Text ICL xBase"][t].float() + 0, test[t].items) for t in tasks]
    paired = pooled(diffs)
    paired["z"] = paired["mean"] / paired["se"] if paired["se"] > 0 else float("nan")

    control = cross_task_control(runner, test, vecs, tasks, best_layer["Text ICL xPatch"], layers)
    log(f"control done ({time.time() - t0:.0f} s)")
    sim_layer = best_layer["Text ICL xPatch"]
    similarity = vector_similarity({t: vecs[t]["text"][layers.index(sim_layer)] for t in tasks}, {t: vecs[t]["image"][layers.index(sim_layer)] for t in tasks})
    result: dict[str, Any] = {
        "table": main_table,
        "table_without_trained_orphans": clean_table,
        "orphans_trained": sorted(f"{a}:{b}" for a, b in trained_pairs),
        "xpatch_minus_xbase": paired,
        "layer_curves_dev": layer_curves,
        "best_layer": best_layer,
        "cross_task_control": control,
        "similarity": {"layer": sim_layer, "trained": similarity},
        "settings": {"n_variants": n_variants, "n_ctx": n_ctx, "seed": seed, "shots": 5, "split": "test", "checkpoint": str(path)},
    }
    if untrained_baseline:
        result["similarity"]["untrained_vision"] = untrained_similarity(path, tasks, pools, n_ctx, seed, sim_layer)
    result["seconds"] = round(time.time() - t0, 1)
    return result


def cross_task_control(runner: Runner, test: dict[str, TaskPrompts], vecs: dict, tasks: Sequence[str], layer: int, layers: Sequence[int]) -> dict[str, float]:
    """A's text-ICL vector on B's image queries (A ≠ B, same domain): accuracy against B's answers on
    the queries where A's and B's first answer tokens differ, and against A's answers."""
    from tvlens.tasks import load_task

    vs_b, vs_a = [], []
    for b in tasks:
        for a in tasks:
            if a == b or domain_of_task(a) != domain_of_task(b):
                continue
            amap = dict(load_task(a).pairs)
            tp = test[b]
            defined = torch.tensor([x in amap for x in tp.items])  # A may lack an item of B
            a_ans = torch.tensor([runner.codec.words(amap[x])[0] if x in amap else -1 for x in tp.items])
            pred = runner.argmax(tp.no_context, layer, vecs[a]["text"][layers.index(layer)])
            differ = (a_ans != tp.answers) & defined
            if differ.any():
                vs_b.append(pred[differ].eq(tp.answers[differ]).float().mean().item())
            vs_a.append(pred[defined].eq(a_ans[defined]).float().mean().item())
    return {"layer": layer, "pairs": len(vs_a), "vs_B_where_answers_differ": float(np.mean(vs_b)), "vs_A": float(np.mean(vs_a))}


def vector_similarity(text: dict[str, torch.Tensor], image: dict[str, torch.Tensor]) -> dict[str, float]:
    """Cosine of text-ICL vs image-ICL task vectors, same task vs other tasks, raw and centred
    (each modality's mean over tasks subtracted: what is shared by all tasks is removed)."""
    tasks = list(text)
    T = torch.stack([text[t] for t in tasks]).double()
    I = torch.stack([image[t] for t in tasks]).double()
    out = {}
    for name, (a, b) in {"raw": (T, I), "centred": (T - T.mean(0), I - I.mean(0))}.items():
        a = a / a.norm(dim=-1, keepdim=True)
        b = b / b.norm(dim=-1, keepdim=True)
        C = a @ b.T
        eye = torch.eye(len(tasks), dtype=torch.bool)
        out[f"{name}_same_task"] = C[eye].mean().item()
        out[f"{name}_other_tasks"] = C[~eye].mean().item()
        out[f"{name}_nearest_is_same"] = (C.argmax(1) == torch.arange(len(tasks))).float().mean().item()
    return out


def untrained_similarity(path: str | Path, tasks, pools, n_ctx: int, seed: int, layer: int) -> dict[str, float]:
    """The same similarity with the text organism under a fresh, untrained vision tower + projector."""
    from tvlens.organisms import organism_path

    model, processor = build_vlm(organism_path("organism"), seed=seed)
    with tempfile.TemporaryDirectory() as tmp:
        save_vlm(model, processor, tmp)
        bridge, processor = boot(tmp)
        runner = Runner(bridge, processor)
        text, image = {}, {}
        for t in tasks:
            tp = TaskPrompts(runner.codec, t, pools[t], "test", 1, n_ctx, seed)
            v = task_vectors(runner, tp, [layer])
            text[t], image[t] = v["text"][0], v["image"][0]
    return vector_similarity(text, image)


# ----------------------------------------------------------------------------------------------
# reporting


def markdown(result: dict[str, Any]) -> str:
    tab = result["table"]
    clean = result["table_without_trained_orphans"]
    bl = result["best_layer"]
    lines = ["| condition | accuracy ± SE (test) | layer (dev) | without trained orphan pairs |", "|---|---|---|---|"]
    for c in CONDITIONS:
        lines.append(f"| {c} | {tab[c]['mean']:.3f} ± {tab[c]['se']:.3f} | {('L' + str(bl[c])) if c in bl else '—'} | {clean[c]['mean']:.3f} ± {clean[c]['se']:.3f} |")
    ctl = result["cross_task_control"]
    lines.append(f"| cross-task control (A's text vector on B's images, vs B where answers differ) | {ctl['vs_B_where_answers_differ']:.3f} | L{ctl['layer']} | |")
    lines.append(f"| … scored vs A's answers | {ctl['vs_A']:.3f} | L{ctl['layer']} | |")
    p = result["xpatch_minus_xbase"]
    lines.append("")
    lines.append(f"Text ICL xPatch − xBase, paired over the same queries: {p['mean']:+.3f} ± {p['se']:.3f} (z = {p['z']:.2f})")
    lines.append("")
    lines.append("| task | " + " | ".join(CONDITIONS) + " |")
    lines.append("|---" * (len(CONDITIONS) + 1) + "|")
    for t in tab[CONDITIONS[0]]["per_task"]:
        lines.append(f"| {t} | " + " | ".join(f"{tab[c]['per_task'][t]:.2f}" for c in CONDITIONS) + " |")
    lines.append("")
    lines.append("| layer (dev, mean over tasks) | " + " | ".join(f"L{i}" for i in range(len(next(iter(result['layer_curves_dev'].values()))))) + " |")
    lines.append("|---" * (1 + len(next(iter(result["layer_curves_dev"].values())))) + "|")
    for c, curve in result["layer_curves_dev"].items():
        lines.append(f"| {c} | " + " | ".join(f"{a:.3f}" for a in curve) + " |")
    sim = result["similarity"]
    lines.append("")
    lines.append(f"| text vs image task vectors (L{sim['layer']}) | same task | other tasks | nearest is same task |")
    lines.append("|---|---|---|---|")
    for who in ("trained", "untrained_vision"):
        if who in sim:
            s = sim[who]
            for kind in ("centred", "raw"):
                lines.append(f"| {who}, {kind} cosine | {s[kind + '_same_task']:.3f} | {s[kind + '_other_tasks']:.3f} | {s[kind + '_nearest_is_same']:.2f} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tvlens.organisms.vlm.check", description=__doc__.split("\n")[0])
    ap.add_argument("--checkpoint", default=str(CHECKPOINT))
    ap.add_argument("--variants", type=int, default=3, help="held-out renderings per test item")
    ap.add_argument("--contexts", type=int, default=32, help="prompts each task vector is averaged over")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--markdown", default=None, help="also write the tables to this markdown file")
    ap.add_argument("--no-write", action="store_true", help="do not update the checkpoint's metrics.json")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = measure(args.checkpoint, n_variants=args.variants, n_ctx=args.contexts, seed=args.seed)
    md = markdown(result)
    print(md)
    if args.markdown:
        Path(args.markdown).write_text(md + "\n")
    if not args.no_write:
        mpath = Path(args.checkpoint) / "metrics.json"
        metrics = json.loads(mpath.read_text()) if mpath.exists() else {}
        metrics["check"] = result
        mpath.write_text(json.dumps(metrics, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
