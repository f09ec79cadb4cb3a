"""Benchmark: tvlens against nnsight and pyvene, each written the way its docs recommend, in one run.

A researcher choosing a tool compares it with the other tools, not with a naive loop. Every sweep
below is written in each library, per site and in the library's batched form, on the same
weights and prompts, and the numbers are checked equal (to 1e-5) before any time is reported:

* ``heads, final`` — every head's ``hook_z`` (the input of ``o_proj`` / ``c_proj``, one head's
  slice) replaced by its task mean at the final position; metric = the answer's log-prob, averaged
  over prompts.
* ``heads, all``   — the same at every position.
* ``layers, TV``   — Hendel et al. 2023's layer sweep: the final-position residual entering layer
  ``l`` replaced by the task vector of layer ``l``, for every layer.

Ways (``sites`` = (layer, head) pairs, or layers for the TV sweep):

* tvlens   — ``tvlens.patch_heads(model, prompts, means, positions=..., metric="logprob")``; the TV
  sweep through the engine ``layer_sweep`` uses (``PatchRunner`` + ``replace_resid``, one column
  per layer).
* nnsight  — ``LanguageModel(hf_model, tokenizer=...)``; per site: one ``trace`` per site that
  writes into ``o_proj.input`` (or the layer's ``.input``) and saves the answer log-prob
  (docs/patterns/activation-patching.md, per-head-attention.md "inline reshape"); batched: one
  ``tracer.invoke`` per site inside one ``trace`` (docs/concepts/batching-and-invokers.md),
  as many invokes per trace as their logits fit in ``--peer-memory`` (whole layers when one
  fits: at GPT-2-small shape 144 sites in one trace would hold ~14 GB of logits).
* pyvene   — ``IntervenableModel({"layer": l, "component": "head_attention_value_output",
  "unit": "h.pos", "intervention_type": VanillaIntervention})`` with the mean as
  ``source_representations`` and ``pv.GET_LOC((head, pos))`` locations (pyvene_101,
  IOI_Replication: one model per layer, one call per head); batched: one call per layer with the
  heads along the batch (each row its own head location and source row). The TV sweep uses
  ``"block_input"`` with ``unit_locations={"base": last}``; it has no batched form here, since
  pyvene places an intervention at the same layer for every row of a call.

nnsight and pyvene run on a plain Hugging Face model of the bridge's class whose parameters *are*
the bridge's tensors (no copy): the bridge replaces the HF model's submodules in place by its own
wrapped components, which would charge the peers the bridge's hook overhead (~2× per forward on
the organism). Every way runs under ``torch.no_grad()``, on ``--threads`` threads (default 1).

Cases: the shipped organism (8 zero-shot ``antonym`` prompts, means from ``tvlens.head_means``,
vectors from ``tvlens.task_vectors_all_layers``) and a random GPT-2-small shape (12 × 12, d768,
50257 vocab, 8 prompts × 60 random tokens, built as ``bench_patching.py`` does; means and vectors
from a second random batch). Each peer site costs one full forward, so at GPT-2 shape the peers'
head sweeps are timed on the heads of ``--peer-layers`` evenly spread layers and scaled to all
layers (marked ``×k`` in the table; their agreement is checked on those sites); tvlens always runs
the whole sweep. Repeats are interleaved (tvlens, nnsight, pyvene, tvlens, ...) so every way sees
the same machine load; the fastest is reported, as wall time and as CPU time of the process.
First-call costs (nnsight's trace compilation, tvlens's one-time recompute self-check) are paid in
an untimed warm-up on one site. Peak memory is the largest growth of the process RSS during a way
(``bench_patching.PeakMemory``, freed memory handed back to the OS before each way).

    python benchmarks/bench_peers.py                 # both cases (~20 min on one loaded core)
    python benchmarks/bench_peers.py --cases organism
    python benchmarks/bench_peers.py --quick         # smoke run: organism + a small GPT-2 shape
    python benchmarks/bench_peers.py --cases organism --profile final,tv   # where tvlens's time goes

Needs the benchmark extra: ``pip install -e ".[bench]"`` (nnsight, pyvene, pinned).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench_patching import PeakMemory, build_checkpoint, prompts  # noqa: E402

TOL = 1e-5  # every way must agree with tvlens to this, on every site it computed
#: --sweeps key -> label in the table
SWEEPS = {"final": "heads, final", "all": "heads, all", "tv": "layers, TV"}


# ------------------------------------------------------------------------------------------------
# models and cases


def plain_hf(bridge: Any) -> torch.nn.Module:
    """A plain HF model of the bridge's class whose parameters are the bridge's own tensors.

    ``bridge.original_model`` is the HF model, but the bridge has swapped its submodules for
    wrapped components (``BlockBridge``, ``LinearBridge`` ...), so its module paths and forward are
    no longer plain HF. The state-dict keys differ only by ``_original_component.``; aliases of one
    tensor (``q`` / ``q_proj``) collapse to the same key.
    """
    hf = bridge.original_model
    cfg = copy.deepcopy(hf.config)
    cfg.output_attentions = False  # set by the bridge for its pattern hooks; a researcher leaves it off
    cfg._attn_implementation = "sdpa"  # what from_pretrained gives by default
    plain = type(hf)(cfg)
    shared: dict[str, torch.Tensor] = {}
    for key, t in hf.state_dict(keep_vars=True).items():
        shared.setdefault(key.replace("_original_component.", ""), t)
    plain.load_state_dict({k: shared[k] for k in plain.state_dict()}, assign=True, strict=True)
    ptrs = {p.data_ptr() for p in bridge.parameters()}
    assert all(p.data_ptr() in ptrs for p in plain.parameters()), "plain HF model does not share the bridge's weights"
    return plain.eval()


@dataclass
class Case:
    name: str
    model: Any  # the tvlens bridge
    hf: torch.nn.Module  # plain HF model on the same tensors
    batch: Any  # .tokens, .attention_mask, .answer_ids
    means: Any  # what tvlens is given: a HeadStats or a [layer, head, d_head] tensor
    mean_z: torch.Tensor  # [layer, head, d_head] float32, what the peers patch
    vectors: torch.Tensor  # [layer, d_model] task vector per layer
    peer_layers: list[int]  # head sweeps: the peers run the heads of these layers


def evenly(n: int, k: int | None) -> list[int]:
    if k is None or k >= n:
        return list(range(n))
    return sorted({round(i * (n - 1) / max(1, k - 1)) for i in range(k)}) if k > 1 else [n // 2]


def organism_case(args: argparse.Namespace) -> Case:
    import tvlens

    model = tvlens.load_model("organism", device="cpu")
    batch = tvlens.icl_prompts(model, "antonym", n_prompts=8, n_shots=0)
    stats = tvlens.head_means(model, "antonym", n_prompts=100, progress=False)
    vectors = torch.stack([tv.vector for tv in tvlens.task_vectors_all_layers(model, "antonym")]).float()
    L = model.cfg.n_layers
    return Case("organism", model, plain_hf(model), batch, stats, stats.z_mean[0].float(), vectors,
                evenly(L, args.peer_layers))


def gpt2_case(args: argparse.Namespace) -> Case:
    import tvlens
    from tvlens.hooks import act_name

    shape = dict(n_layer=4, n_head=4, d_model=128, vocab=2000) if args.quick else \
        dict(n_layer=12, n_head=12, d_model=768, vocab=50257)
    name = "gpt2-random-{n_layer}x{n_head}-d{d_model}-v{vocab}".format(**shape)
    model = tvlens.load_model(build_checkpoint(Path(args.cache_dir) / name, **shape), device="cpu")
    n_pos = 20 if args.quick else args.pos
    batch, source = prompts(shape["vocab"], args.batch, n_pos, 1), prompts(shape["vocab"], args.batch, n_pos, 2)
    L = model.cfg.n_layers
    # "task" means and vectors of a random model: the source batch's final-position averages
    names = [act_name("z", l) for l in range(L)] + [act_name("resid_pre", l) for l in range(L)]
    _, cache = model.run_with_cache(source.tokens, names_filter=lambda n: n in names)
    mean_z = torch.stack([cache[act_name("z", l)][:, -1].mean(0) for l in range(L)]).float()
    vectors = torch.stack([cache[act_name("resid_pre", l)][:, -1].mean(0) for l in range(L)]).float()
    peer_layers = evenly(L, 1 if args.peer_layers is None and not args.quick else args.peer_layers)
    return Case(f"GPT-2-small shape ({name})" if not args.quick else f"small GPT-2 shape ({name})", model,
                plain_hf(model), batch, mean_z, mean_z, vectors, peer_layers)


# ------------------------------------------------------------------------------------------------
# helpers shared by the peers' ways


def answer_logprob(last_logits: torch.Tensor, answers: torch.Tensor) -> torch.Tensor:
    """[rows, d_vocab] final-position logits -> [rows] log-prob of each row's answer."""
    return last_logits.float().log_softmax(-1).gather(-1, answers[:, None])[:, 0]


def is_llama(hf: torch.nn.Module) -> bool:
    return hasattr(hf, "model") and hasattr(hf.model, "layers")


def head_dim(case: Case) -> int:
    return case.mean_z.shape[-1]


def logit_bytes(case: Case) -> int:
    """Bytes of full logits one site's forward produces (the peers compute every position's)."""
    B, P = case.batch.tokens.shape
    return B * P * case.model.cfg.d_vocab * 4


def sites_per_call(case: Case, budget: int, per_layer: int) -> int:
    """How many sites one batched call may hold in ``budget``: whole layers when one fits."""
    fit = max(1, budget // logit_bytes(case))
    return (fit // per_layer) * per_layer if fit >= per_layer else fit


def inputs(case: Case) -> dict[str, torch.Tensor]:
    return {"input_ids": case.batch.tokens, "attention_mask": case.batch.attention_mask}


# ------------------------------------------------------------------------------------------------
# tvlens


def tvlens_heads(case: Case, sites: list[tuple[int, int]], positions: str, *, warmup: bool = False) -> torch.Tensor:
    import tvlens

    res = tvlens.patch_heads(case.model, case.batch, case.means, positions=positions, metric="logprob",
                             progress=False, **(dict(sites=sites) if warmup else {}))
    return torch.stack([res.values[l, h] for l, h in sites])


def tvlens_layers(case: Case, layers: list[int]) -> torch.Tensor:
    from tvlens.engine import PatchRunner, replace_resid

    answers = case.batch.answer_ids
    runner = PatchRunner(case.model, case.batch)
    edits = [replace_resid(l, case.vectors[l], columns=j) for j, l in enumerate(layers)]

    def fn(lg: torch.Tensor) -> torch.Tensor:  # [batch, column, d_vocab] -> [batch, column]
        return lg.float().log_softmax(-1).gather(-1, answers[:, None, None].expand(lg.shape[0], lg.shape[1], 1))[..., 0]

    return runner.map(edits, fn, n_columns=len(layers)).mean(0)


# ------------------------------------------------------------------------------------------------
# nnsight (one LanguageModel per case, built once: wrapping is not part of a sweep)


def nnsight_model(case: Case) -> Any:
    import warnings

    from nnsight import LanguageModel

    with warnings.catch_warnings():  # it warns that a pre-loaded model's tokenizer is ours to manage
        warnings.simplefilter("ignore")
        return LanguageModel(case.hf, tokenizer=case.model.tokenizer)


def _nn_o_proj(lm: Any, llama: bool, l: int) -> Any:
    return lm.model.layers[l].self_attn.o_proj if llama else lm.transformer.h[l].attn.c_proj


def _nn_block(lm: Any, llama: bool, l: int) -> Any:
    return lm.model.layers[l] if llama else lm.transformer.h[l]


def nnsight_heads_per_site(case: Case, lm: Any, sites: list[tuple[int, int]], positions: str) -> torch.Tensor:
    llama, d, ans, x = is_llama(case.hf), head_dim(case), case.batch.answer_ids, inputs(case)
    pos = -1 if positions == "final" else slice(None)
    out = []
    for l, h in sites:
        with lm.trace(x):
            z = _nn_o_proj(lm, llama, l).input  # [batch, pos, head * d_head]: the heads' z, concatenated
            z[:, pos, h * d:(h + 1) * d] = case.mean_z[l, h]
            lp = answer_logprob(lm.lm_head.output[:, -1], ans).mean().save()
        out.append(lp)
    return torch.stack(out)


def nnsight_heads_batched(case: Case, lm: Any, sites: list[tuple[int, int]], positions: str, budget: int) -> torch.Tensor:
    llama, d, ans, x = is_llama(case.hf), head_dim(case), case.batch.answer_ids, inputs(case)
    pos = -1 if positions == "final" else slice(None)
    n = sites_per_call(case, budget, case.mean_z.shape[1])
    out = []
    for c in range(0, len(sites), n):
        with lm.trace() as tracer:
            for l, h in sites[c:c + n]:
                with tracer.invoke(x):  # one invoke per site: all of them ride in one forward
                    z = _nn_o_proj(lm, llama, l).input
                    z[:, pos, h * d:(h + 1) * d] = case.mean_z[l, h]
                    out.append(answer_logprob(lm.lm_head.output[:, -1], ans).mean().save())
    return torch.stack(out)


def nnsight_layers_per_site(case: Case, lm: Any, layers: list[int]) -> torch.Tensor:
    llama, ans, x = is_llama(case.hf), case.batch.answer_ids, inputs(case)
    out = []
    for l in layers:
        with lm.trace(x):
            _nn_block(lm, llama, l).input[:, -1] = case.vectors[l]  # the residual entering layer l
            lp = answer_logprob(lm.lm_head.output[:, -1], ans).mean().save()
        out.append(lp)
    return torch.stack(out)


def nnsight_layers_batched(case: Case, lm: Any, layers: list[int], budget: int) -> torch.Tensor:
    llama, ans, x = is_llama(case.hf), case.batch.answer_ids, inputs(case)
    n = sites_per_call(case, budget, len(layers))
    out = []
    for c in range(0, len(layers), n):
        with lm.trace() as tracer:
            for l in layers[c:c + n]:
                with tracer.invoke(x):
                    _nn_block(lm, llama, l).input[:, -1] = case.vectors[l]
                    out.append(answer_logprob(lm.lm_head.output[:, -1], ans).mean().save())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# pyvene


def _pv_heads_model(case: Case, l: int) -> Any:
    import pyvene as pv

    return pv.IntervenableModel({"layer": l, "component": "head_attention_value_output", "unit": "h.pos",
                                 "intervention_type": pv.VanillaIntervention}, model=case.hf)


def _positions(case: Case, positions: str) -> list[int]:
    P = case.batch.tokens.shape[1]
    return [P - 1] if positions == "final" else list(range(P))


def pyvene_heads_per_site(case: Case, sites: list[tuple[int, int]], positions: str) -> torch.Tensor:
    B = case.batch.tokens.shape[0]
    ans, x, pos = case.batch.answer_ids, inputs(case), _positions(case, positions)
    out, models = [], {}
    for l, h in sites:
        if l not in models:  # one IntervenableModel per layer, one call per head (IOI_Replication)
            models[l] = _pv_heads_model(case, l)
        loc = [[[[h]] * B, [pos] * B]]  # pv.GET_LOC((h, pos)) for several positions
        _, cf = models[l](x, unit_locations={"base": loc}, source_representations=case.mean_z[l, h])
        out.append(answer_logprob(cf.logits[:, -1], ans).mean())
    return torch.stack(out)


def pyvene_heads_batched(case: Case, sites: list[tuple[int, int]], positions: str, budget: int) -> torch.Tensor:
    B = case.batch.tokens.shape[0]
    ans, x, pos = case.batch.answer_ids, inputs(case), _positions(case, positions)
    n = min(sites_per_call(case, budget, 1), case.mean_z.shape[1])
    out = []
    by_layer: dict[int, list[int]] = {}
    for l, h in sites:
        by_layer.setdefault(l, []).append(h)
    for l, heads in by_layer.items():
        model = _pv_heads_model(case, l)
        for c in range(0, len(heads), n):
            hs = heads[c:c + n]
            rows = len(hs) * B  # row r: head hs[r // B], prompt r % B
            base = {k: v.repeat(len(hs), 1) for k, v in x.items()}
            head_of_row = torch.as_tensor(hs).repeat_interleave(B)
            loc = [[[[int(h)] for h in head_of_row], [pos] * rows]]
            # one source row per base row ([rows, 1 head, positions, d_head]): pyvene broadcasts only a [d] source
            src = case.mean_z[l][head_of_row][:, None, None, :].expand(rows, 1, len(pos), head_dim(case))
            _, cf = model(base, unit_locations={"base": loc}, source_representations=src)
            out.append(answer_logprob(cf.logits[:, -1], ans.repeat(len(hs))).view(len(hs), B).mean(1))
    return torch.cat(out)


def pyvene_layers_per_site(case: Case, layers: list[int]) -> torch.Tensor:
    import pyvene as pv

    P = case.batch.tokens.shape[1]
    ans, x = case.batch.answer_ids, inputs(case)
    out = []
    for l in layers:
        model = pv.IntervenableModel({"layer": l, "component": "block_input",
                                      "intervention_type": pv.VanillaIntervention}, model=case.hf)
        _, cf = model(x, unit_locations={"base": P - 1}, source_representations=case.vectors[l])
        out.append(answer_logprob(cf.logits[:, -1], ans).mean())
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------
# measurement


def _release() -> None:
    """Hand freed heap back to the OS, so that each way's RSS growth is its own."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


@dataclass
class Way:
    sweep: str
    name: str
    run: Callable[[], torch.Tensor]  # values of `sites`, in order
    sites: list  # the sites this way computes
    warm: Callable[[], Any]  # one site, untimed
    scale: float = 1.0  # timed on a subset: time x scale = the whole sweep
    wall: float = math.inf
    cpu: float = math.inf
    peak: int = 0
    diff: float | None = None
    values: torch.Tensor | None = None


def ways_for(case: Case, args: argparse.Namespace, lm: Any) -> list[Way]:
    L, H = case.mean_z.shape[:2]
    budget = args.peer_memory
    all_sites = [(l, h) for l in range(L) for h in range(H)]
    peer_sites = [(l, h) for l in case.peer_layers for h in range(H)]
    scale = len(all_sites) / len(peer_sites)
    layers = list(range(L))
    one = [(0, 0)]
    ways = []
    for positions in ("final", "all"):
        sweep = f"heads, {positions}"
        ways += [
            Way(sweep, f'tvlens patch_heads(positions="{positions}")',
                lambda p=positions: tvlens_heads(case, all_sites, p), all_sites,
                lambda p=positions: tvlens_heads(case, one, p, warmup=True)),
            Way(sweep, "nnsight: one trace per site", lambda p=positions: nnsight_heads_per_site(case, lm, peer_sites, p),
                peer_sites, lambda p=positions: nnsight_heads_per_site(case, lm, one, p), scale),
            Way(sweep, f"nnsight: one invoke per site, {min(len(peer_sites), sites_per_call(case, budget, H))} per trace",
                lambda p=positions: nnsight_heads_batched(case, lm, peer_sites, p, budget), peer_sites,
                lambda p=positions: nnsight_heads_batched(case, lm, one * 2, p, budget), scale),
            Way(sweep, "pyvene: one call per site", lambda p=positions: pyvene_heads_per_site(case, peer_sites, p),
                peer_sites, lambda p=positions: pyvene_heads_per_site(case, one, p), scale),
            Way(sweep, "pyvene: one call per layer, heads along the batch",
                lambda p=positions: pyvene_heads_batched(case, peer_sites, p, budget), peer_sites,
                lambda p=positions: pyvene_heads_batched(case, one, p, budget), scale),
        ]
    ways += [
        Way("layers, TV", "tvlens engine (PatchRunner, a column per layer)", lambda: tvlens_layers(case, layers),
            layers, lambda: tvlens_layers(case, [0])),
        Way("layers, TV", "nnsight: one trace per layer", lambda: nnsight_layers_per_site(case, lm, layers), layers,
            lambda: nnsight_layers_per_site(case, lm, [0])),
        Way("layers, TV", f"nnsight: one invoke per layer, {min(L, sites_per_call(case, budget, L))} per trace",
            lambda: nnsight_layers_batched(case, lm, layers, budget), layers,
            lambda: nnsight_layers_batched(case, lm, [0, 0], budget)),
        Way("layers, TV", "pyvene: one call per layer", lambda: pyvene_layers_per_site(case, layers), layers,
            lambda: pyvene_layers_per_site(case, [0])),
    ]
    return [w for w in ways if w.sweep in [SWEEPS[k] for k in args.sweeps]]


def measure(way: Way) -> float:
    """Run ``way`` once; keep its best times and largest peak; return this run's wall seconds."""
    _release()
    with PeakMemory(torch.device("cpu")) as mem:
        t0, c0 = time.perf_counter(), time.process_time()
        values = way.run()
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    way.wall, way.cpu, way.peak = min(way.wall, wall), min(way.cpu, cpu), max(way.peak, mem.peak)
    if way.values is None:
        way.values = values.detach().float()
    return wall


def run_case(case: Case, args: argparse.Namespace, repeats: int) -> list[Way]:
    lm = nnsight_model(case)
    ways = ways_for(case, args, lm)
    L, H = case.mean_z.shape[:2]
    B, P = case.batch.tokens.shape
    print(f"\n{case.name}: {L} layers x {H} heads, d_model {case.model.cfg.d_model}, vocab {case.model.cfg.d_vocab}; "
          f"{B} prompts x {P} tokens; peers' head sweeps on layers {case.peer_layers}; best of {repeats}", flush=True)
    for w in ways:
        w.warm()
    for rep in range(repeats):  # interleaved: every way sees the same machine load
        for w in ways:
            wall = measure(w)
            print(f"  [{rep + 1}/{repeats}] {w.sweep:13s} {w.name:52s} {wall * w.scale:8.2f} s", flush=True)
    for sweep in SWEEPS.values():  # agreement with tvlens on every site each way computed
        group = [w for w in ways if w.sweep == sweep]
        if not group:
            continue
        ref = dict(zip(group[0].sites, group[0].values.tolist()))
        for w in group[1:]:
            w.diff = max(abs(v - ref[s]) for s, v in zip(w.sites, w.values.tolist()))
    return ways


# ------------------------------------------------------------------------------------------------
# report


#: the issue's bars: (case prefix, sweep) -> tvlens must be this many times faster than the best peer
TARGETS = {("GPT-2-small", "heads, final"): 5.0, ("GPT-2-small", "heads, all"): 2.0, ("organism", "heads, final"): 2.0}


def report(results: list[tuple[Case, list[Way]]], args: argparse.Namespace, load0: tuple) -> bool:
    print()
    head = (f"{'case':18s} {'sweep':13s} {'way':52s} {'s':>8s} {'CPU s':>8s} {'ratio':>7s} {'peak MB':>8s}  max |diff|")
    print(head)
    print("-" * len(head))
    ok = True
    for case, ways in results:
        label = case.name.split(" (")[0]
        for sweep in SWEEPS.values():
            group = [w for w in ways if w.sweep == sweep]
            if not group:
                continue
            base = group[0]
            for w in group:
                scaled = f" x{w.scale:g}" if w.scale != 1 else ""
                diff = "-" if w.diff is None else f"{w.diff:.1e}"
                print(f"{label:18s} {sweep:13s} {w.name + scaled:52s} {w.wall * w.scale:8.2f} {w.cpu * w.scale:8.2f} "
                      f"{w.wall * w.scale / base.wall:6.1f}x {w.peak / 2**20:8.0f}  {diff}")
                if w.diff is not None and not w.diff <= TOL:
                    ok = False
            label = ""
    load1 = os.getloadavg()
    print(f"(s = wall seconds, best of the repeats; CPU = process CPU seconds; ratio = way's wall time / tvlens's; "
          f"peak MB = largest RSS growth during the way; x k = timed on 1/k of the sites and scaled; "
          f"{args.threads} thread(s); load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} at start, "
          f"{load1[0]:.2f} {load1[1]:.2f} {load1[2]:.2f} at end, on {os.cpu_count()} cores)")
    print()
    for case, ways in results:
        for (prefix, sweep), bar in TARGETS.items():
            group = [w for w in ways if w.sweep == sweep]
            if not case.name.startswith(prefix) or not group:
                continue
            best = min(group[1:], key=lambda w: w.wall * w.scale)
            ratio = best.wall * best.scale / group[0].wall
            print(f"target {prefix} {sweep}: tvlens {ratio:.1f}x faster than the best peer ({best.name}); "
                  f"bar {bar:g}x: {'met' if ratio >= bar else 'NOT met'}")
    worst = max((w.diff for _, ways in results for w in ways if w.diff is not None), default=0.0)
    print(f"agreement: max |way - tvlens| over every case, sweep and site = {worst:.2e} (must be <= {TOL:g}): "
          f"{'ok' if ok else 'MISMATCH'}")
    return ok


def profile_tvlens(case: Case, args: argparse.Namespace) -> None:
    """cProfile of tvlens's way in each ``--profile`` sweep (after a warm-up): hot spots by own and cumulative time."""
    import cProfile
    import pstats

    L, H = case.mean_z.shape[:2]
    sites = [(l, h) for l in range(L) for h in range(H)]
    for key in args.profile:
        what = {"final": ("tvlens.patch_heads(positions='final')", lambda: tvlens_heads(case, sites, "final")),
                "all": ("tvlens.patch_heads(positions='all')", lambda: tvlens_heads(case, sites, "all")),
                "tv": ("the engine's task-vector layer sweep", lambda: tvlens_layers(case, list(range(L))))}[key]
        # warm-up on one site: the one-time costs (self-check, lazy imports) stay out of the profile
        tvlens_layers(case, [0]) if key == "tv" else tvlens_heads(case, [(0, 0)], key, warmup=True)
        n = args.profile_runs
        prof = cProfile.Profile()
        t0 = time.perf_counter()
        prof.enable()
        for _ in range(n):
            what[1]()
        prof.disable()
        print(f"\ncProfile of {n} x {what[0]} on {case.name}: {(time.perf_counter() - t0) / n:.3f} s per run "
              f"under the profiler (times below are totals over the {n} runs)")
        stats = pstats.Stats(prof).strip_dirs()
        stats.sort_stats("tottime").print_stats(args.profile_top)
        stats.sort_stats("cumulative").print_stats(args.profile_top)


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> list[tuple[Case, list[Way]]]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smoke run: one repeat, organism + a 4x4 d128 GPT-2 shape")
    ap.add_argument("--cases", default="organism,gpt2", help="comma list of: organism, gpt2")
    ap.add_argument("--sweeps", default=",".join(SWEEPS),
                    help="comma list of: final (heads, final position), all (heads, all positions), tv (task-vector layers)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per way on the organism (default 5; --quick 1)")
    ap.add_argument("--gpt2-repeats", type=int, default=None, help="timed runs per way at GPT-2 shape (default 2; --quick 1)")
    ap.add_argument("--peer-layers", type=int, default=None,
                    help="the peers' head sweeps run the heads of this many evenly spread layers, scaled to all "
                         "(default: all layers on the organism, 1 at GPT-2 shape)")
    ap.add_argument("--peer-memory", type=int, default=3 << 29,
                    help="bytes of logits one batched nnsight trace / pyvene call may hold (default 1.5 GiB)")
    ap.add_argument("--batch", type=int, default=8, help="prompts at GPT-2 shape")
    ap.add_argument("--pos", type=int, default=60, help="tokens per prompt at GPT-2 shape")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", default=None,
                    help="comma list of sweeps (final, all, tv): cProfile tvlens's way in each, per case, instead of "
                         "comparing with the peers")
    ap.add_argument("--profile-runs", type=int, default=20, help="runs under the profiler (after one warm-up)")
    ap.add_argument("--profile-top", type=int, default=25)
    ap.add_argument("--cache-dir", default=os.environ.get("TVLENS_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "tvlens-bench")))
    args = ap.parse_args(argv)
    args.sweeps = [s.strip() for s in args.sweeps.split(",")]
    args.profile = None if args.profile is None else [s.strip() for s in args.profile.split(",")]
    unknown = [s for s in args.sweeps + (args.profile or []) if s not in SWEEPS]
    if unknown:
        ap.error(f"unknown sweeps {unknown}; use {', '.join(SWEEPS)}")
    torch.set_num_threads(args.threads)
    load0 = os.getloadavg()
    import nnsight
    import pyvene
    from importlib.metadata import version

    import tvlens

    # the tree measured: an editable install elsewhere would otherwise go unnoticed
    print(f"tvlens {version('tvlens')} from {Path(tvlens.__file__).parent}, nnsight {nnsight.__version__}, "
          f"pyvene {version('pyvene')}, "
          f"torch {torch.__version__}, transformers {version('transformers')}; {args.threads} thread(s); "
          f"load average {load0[0]:.2f} {load0[1]:.2f} {load0[2]:.2f} on {os.cpu_count()} cores", flush=True)
    del pyvene
    results = []
    with torch.no_grad():
        for name in [c.strip() for c in args.cases.split(",")]:
            if name == "organism":
                case, repeats = organism_case(args), args.repeats or (1 if args.quick else 5)
            elif name == "gpt2":
                case, repeats = gpt2_case(args), args.gpt2_repeats or (1 if args.quick else 2)
            else:
                ap.error(f"unknown case {name!r}; use organism, gpt2")
            if args.profile:
                profile_tvlens(case, args)
                continue
            results.append((case, run_case(case, args, repeats)))
    if args.profile:
        return results
    if not report(results, args, load0):
        sys.exit("MISMATCH: a way disagrees with tvlens by more than 1e-5")
    return results


if __name__ == "__main__":
    main()
