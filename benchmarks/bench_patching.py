"""Benchmark: tvlens.analyses.patching against the naive TransformerLens-style loop, measured in the same run.

Cases (all on the same target/source batches, metric = answer log-prob at the final position):

* ``heads, final``  — every head's ``hook_z`` patched at the final position: naive = one
  ``run_with_hooks`` per head + a ``.item()`` per site (TransformerLens ``get_act_patch_*``);
  tvlens = :func:`tvlens.analyses.patching.patch_heads` (cached target, last-token recompute, sites batched).
* ``heads, all``    — every head patched at every position (TL ``..._all_pos``).
* ``attribution``   — :func:`tvlens.analyses.patching.attribution_patch_heads` vs the exact tvlens sweep:
  time ratio and the correlation of the estimates with the exact effects.

The default model is a randomly initialised GPT-2-small shape (12 layers x 12 heads, d_model 768,
vocab 50257) built offline from a config; prompts are random token ids (60 tokens, batch 8), run
on 2 CPU threads.  ``--quick`` uses a small shape for a smoke run; ``--model organism`` runs on the
shipped organism.  Peak memory is the largest growth of the process RSS (CPU) or of
``torch.cuda.max_memory_allocated`` (GPU) during each case.

    python benchmarks/bench_patching.py            # full (a few minutes on 2 threads)
    python benchmarks/bench_patching.py --quick
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


# ------------------------------------------------------------------------------------------------
# model


def build_checkpoint(out: Path, *, n_layer: int, n_head: int, d_model: int, vocab: int, n_ctx: int = 128) -> Path:
    """A random GPT-2 checkpoint with a trivial word-level tokenizer (token ``t<i>`` = id i)."""
    if (out / "config.json").exists():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=vocab, n_embd=d_model, n_layer=n_layer, n_head=n_head, n_positions=n_ctx,
                     bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model = GPT2LMHeadModel(cfg)
    vocab_map = {f"t{i}": i for i in range(vocab)}
    tok = Tokenizer(models.WordLevel(vocab_map, unk_token="t1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", bos_token="t0", eos_token="t0", unk_token="t1")
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    fast.save_pretrained(out)
    return out


def build_organism_shaped(out: Path) -> Path:
    """The organism's architecture (Llama, 4 layers x 8 heads, 4 kv heads, d_model 128) with random weights."""
    if (out / "config.json").exists():
        return out
    from tvlens.organisms.text.tokenizer import build_tokenizer
    from tvlens.organisms.text.train import ModelShape, build_model
    from tvlens.tasks import suite_vocabulary

    tok = build_tokenizer(suite_vocabulary())
    model = build_model(ModelShape(), tok, seed=0)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def prompts(vocab: int, batch: int, n_pos: int, seed: int) -> SimpleNamespace:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(2, vocab, (batch, n_pos), generator=g)
    return SimpleNamespace(tokens=tokens, attention_mask=torch.ones_like(tokens),
                           answer_ids=torch.randint(2, vocab, (batch,), generator=g))


# ------------------------------------------------------------------------------------------------
# measurement


class PeakMemory:
    """Peak growth of memory during a ``with`` block: process RSS sampled every 2 ms, or CUDA allocator peak."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        self.base = self._rss()
        self._stop = threading.Event()
        self._max = self.base

        def sample() -> None:
            while not self._stop.is_set():
                self._max = max(self._max, self._rss())
                time.sleep(0.002)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()
            self.peak = torch.cuda.max_memory_allocated() - self.base
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self._max, self._rss()) - self.base


def timed(fn, device: torch.device, repeats: int = 1):
    """Run ``fn`` ``repeats`` times; returns (result, wall seconds, CPU seconds of this process, peak
    memory growth in bytes), the times the best run's and the peak the largest.

    CPU seconds (all threads) are reported next to wall time because the machine may be shared:
    other processes stretch wall time, much less the CPU time this process itself burns. With
    ``repeats`` > 1 the first run also pays one-time costs (tvlens's per-model capability checks,
    the allocator's first chunks), which a sweep pays once per model, not per call.
    """
    best = None
    for _ in range(max(1, repeats)):
        with PeakMemory(device) as mem:
            t0, c0 = time.perf_counter(), time.process_time()
            out = fn()
            if device.type == "cuda":
                torch.cuda.synchronize()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        if best is None or wall < best[1]:
            best = (out, wall, cpu, mem.peak if best is None else max(best[3], mem.peak))
        else:
            best = (*best[:3], max(best[3], mem.peak))
    return best


def naive_heads(model, target, source, positions: str, sites: list[tuple[int, int]]) -> torch.Tensor:
    """TransformerLens-style sweep: one run_with_hooks per head, a .item() per site; [site] values."""
    from tvlens.hooks import act_name

    L = model.cfg.n_layers
    dev = next(model.parameters()).device
    tokens, mask = target.tokens.to(dev), target.attention_mask.to(dev)
    answers = target.answer_ids.to(dev)
    cache = {}
    with torch.no_grad():
        model.run_with_hooks(source.tokens.to(dev), attention_mask=source.attention_mask.to(dev), fwd_hooks=[
            (act_name("z", l), lambda act, hook, l=l: cache.__setitem__(l, act.clone())) for l in range(L)])
    out = torch.zeros(len(sites))
    for i, (l, h) in enumerate(sites):
        def patch(act, hook, l=l, h=h):
            if positions == "final":
                act[:, -1, h] = cache[l][:, -1, h]
            else:
                act[:, :, h] = cache[l][:, :, h]
            return act
        with torch.no_grad():
            logits = model.run_with_hooks(tokens, attention_mask=mask, fwd_hooks=[(act_name("z", l), patch)])
        lp = logits[:, -1].log_softmax(-1)[torch.arange(len(answers)), answers].mean()
        out[i] = lp.item()
    return out


# ------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small shapes (smoke run, seconds)")
    ap.add_argument("--model", default=None, help="'organism', 'organism-shaped' (its architecture, random weights) "
                    "or a checkpoint path (default: random GPT-2-small shape)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--pos", type=int, default=None)
    ap.add_argument("--cases", default="final,all,attribution,attribution-all",
                    help="comma list of: final, all, attribution, attribution-all")
    ap.add_argument("--naive-sites", type=int, default=None,
                    help="time the naive loop on this many evenly spread sites and scale (default: all sites)")
    ap.add_argument("--repeats", type=int, default=None,
                    help="best of this many runs of each way (default: 3 where one plain forward takes under 0.2 s, else 1)")
    ap.add_argument("--cache-dir", default=os.environ.get("TVLENS_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "tvlens-bench")))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    import tvlens
    from tvlens.analyses.patching import attribution_patch_heads, patch_heads

    device = torch.device(args.device)
    if args.model is None:
        shape = dict(n_layer=4, n_head=4, d_model=128, vocab=2000) if args.quick else \
            dict(n_layer=12, n_head=12, d_model=768, vocab=50257)
        name = "gpt2-random-{n_layer}x{n_head}-d{d_model}-v{vocab}".format(**shape)
        path = build_checkpoint(Path(args.cache_dir) / name, **shape)
        model = tvlens.load_model(path, device=args.device)
    elif args.model == "organism-shaped":
        name = "organism-shaped (random weights)"
        model = tvlens.load_model(build_organism_shaped(Path(args.cache_dir) / "organism-shaped"), device=args.device)
    else:
        name = args.model
        model = tvlens.load_model(args.model, device=args.device)
    batch = args.batch or (4 if args.quick else 8)
    n_pos = args.pos or (20 if args.quick else 60)
    vocab = model.cfg.d_vocab
    target, source = prompts(vocab, batch, n_pos, 1), prompts(vocab, batch, n_pos, 2)
    L, H = model.cfg.n_layers, model.cfg.n_heads
    print(f"model {name}: {L} layers x {H} heads, d_model {model.cfg.d_model}, vocab {vocab}; "
          f"batch {batch} x {n_pos} tokens; {args.threads} threads on {device}; load {fmt_load()}")

    with torch.no_grad():  # warm-up (allocator, lazy inits)
        model(target.tokens.to(device))
        _, t_fwd, c_fwd, _ = timed(lambda: model(target.tokens.to(device)), device)
    print(f"one plain forward: {t_fwd:.3f} s wall, {c_fwd:.3f} s CPU")
    reps = args.repeats or (3 if t_fwd < 0.2 else 1)
    if reps > 1:
        print(f"each way timed as the best of {reps} runs")

    all_sites = [(l, h) for l in range(L) for h in range(H)]
    k = args.naive_sites or len(all_sites)
    naive_sites = all_sites[:: max(1, len(all_sites) // k)][:k]
    scale = len(all_sites) / len(naive_sites)
    if scale != 1:
        print(f"naive loop timed on {len(naive_sites)} of {len(all_sites)} sites (evenly spread) and scaled by {scale:.1f}: "
              "every naive site costs one full forward")
    rows = []
    cases = args.cases.split(",")
    exact = {}
    for positions in [c for c in ("final", "all") if c in cases]:
        ref, t_naive, c_naive, m_naive = timed(lambda: naive_heads(model, target, source, positions, naive_sites), device,
                                               reps)
        res, t_fast, c_fast, m_fast = timed(lambda: patch_heads(model, target, source, positions=positions,
                                                                metric="logprob", progress=False), device, reps)
        got = torch.stack([res.values[l, h] for l, h in naive_sites])
        err = float((got - ref).abs().max())
        rows.append((f"heads, {positions} ({L * H} sites)", t_naive * scale, t_fast, c_naive * scale, c_fast,
                     m_naive, m_fast, f"max |diff| {err:.1e}; load {fmt_load()}"))
        print(f"  measured {rows[-1][0]}: naive {t_naive * scale:.1f} s, tvlens {t_fast:.1f} s", flush=True)
        exact[positions] = (res, t_fast, c_fast, m_fast)
    for case in [c for c in cases if c.startswith("attribution")]:
        positions = "all" if case == "attribution-all" else "final"
        if positions not in exact:
            exact[positions] = timed(lambda: patch_heads(model, target, source, positions=positions, metric="logprob",
                                                         progress=False), device)
        res, t_ex, c_ex, m_ex = exact[positions]
        att, t_att, c_att, m_att = timed(lambda: attribution_patch_heads(model, target, source, metric="logprob",
                                                                         positions=positions), device)
        est = att.values.reshape(-1)
        ex = (res.values - res.target_value).reshape(-1)
        corr = float(torch.corrcoef(torch.stack([est, ex]))[0, 1])
        rows.append((f"attribution vs exact tvlens ({positions})", t_ex, t_att, c_ex, c_att, m_ex, m_att,
                     f"corr {corr:.3f} (naive col = exact tvlens); load {fmt_load()}"))

    print()
    head = (f"{'case':36s} {'naive s':>8s} {'tvlens s':>8s} {'ratio':>6s} {'naive CPU':>9s} {'tvl CPU':>8s} "
            f"{'ratio':>6s} {'naive MB':>8s} {'tvl MB':>7s}  note")
    print(head)
    print("-" * len(head))
    for case, tn, tf, cn, cf, mn, mf, note in rows:
        print(f"{case:36s} {tn:8.2f} {tf:8.2f} {tn / tf:5.1f}x {cn:9.2f} {cf:8.2f} {cn / cf:5.1f}x "
              f"{mn / 2**20:8.0f} {mf / 2**20:7.0f}  {note}")
    print("(s = wall seconds, CPU = process CPU seconds, MB = peak memory growth during the case, "
          "load = 1/5/15-minute load average when the case ended)")


def fmt_load() -> str:
    """The machine's load averages: on a shared machine they say how far wall time is from CPU time."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


if __name__ == "__main__":
    main()
