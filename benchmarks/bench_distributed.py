"""Benchmark: the same sweep on 1 and 2 Ray workers, against the local loop, measured in one run.

Cases (organism, one ``layer_sweep`` over ``--tasks`` tasks: one unit per task):

* ``local loop``  — ``executor=None``: the sweep's own single-process loop;
* ``ray x1`` / ``ray x2`` — ``RayExecutor(n_workers=1|2)`` on a local cluster (loopback, no
  dashboard), replicas loaded before the clock starts; the speed-up is ``ray x1 / ray x2``;
* ``overhead``    — ``--overhead-units`` trivial units (a unit returns one number), local
  executor vs one Ray worker: the executor's own cost per unit (scheduling, pickling, the round
  trip), and ``(ray x1 - local loop) / units`` on the real sweep.

``--scaling`` also measures the per-unit cost of a final-position head sweep (``patch_heads`` of
one task's means into ``--prompts`` zero-shot prompts; a unit = one layer's heads) on the
organism and on a randomly initialised GPT-2-small shape, and prints the cost per (site, prompt)
with the FLOPs the engine's last-token recompute spends on it, for the README's scaling note.

The machine's load (``os.getloadavg``) is printed before and after: on a shared 2-core machine
two workers cannot give 2x, and other jobs shift every number.

    python benchmarks/bench_distributed.py                 # speed-up and overhead (~2-4 min)
    python benchmarks/bench_distributed.py --scaling       # plus the per-unit costs
    python benchmarks/bench_distributed.py --quick         # smoke run
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f}, {b:.2f}, {c:.2f}"


def _tiny(model):
    return torch.zeros(1)


def timed(fn) -> tuple[float, object]:
    t = time.perf_counter()
    out = fn()
    return time.perf_counter() - t, out


def block_flops(d_model: int, d_mlp: int, n_heads: int, n_kv: int, d_head: int, ctx: int, gated: bool) -> float:
    """Multiply-add FLOPs (x2) of one token through one block attending to ``ctx`` positions."""
    qkvo = d_model * d_head * (2 * n_heads + 2 * n_kv)
    mlp = d_model * d_mlp * (3 if gated else 2)
    attn = 2 * n_heads * d_head * ctx
    return 2.0 * (qkvo + mlp + attn)


def site_flops(n_layers: int, d_vocab: int, d_model: int, **kw) -> float:
    """FLOPs per (head site, prompt) of the last-token recompute, averaged over the layers: a site at
    layer l recomputes the final token through blocks l..L-1 and the unembedding."""
    mean_blocks = (n_layers + 1) / 2
    return mean_blocks * block_flops(d_model=d_model, **kw) + 2.0 * d_model * d_vocab


def scaling(args) -> None:
    from bench_patching import build_checkpoint

    import tvlens
    from tvlens.models import ModelInfo

    cache = Path(args.cache_dir)
    rows = []
    cases = [("organism", "organism")]
    if not args.quick:
        cases.append(("GPT-2-small shape", str(build_checkpoint(cache / "gpt2-small-shape", n_layer=12, n_head=12,
                                                                d_model=768, vocab=50257))))
    for label, name in cases:
        m = tvlens.load_model(name, device="cpu")
        info = ModelInfo.of(m)
        n = args.prompts
        if label == "organism":
            target = tvlens.icl_prompts(m, "antonym", n_prompts=n, n_shots=0, seed=1)
            means = tvlens.head_means(m, ["antonym", "country_capital"], n_prompts=16).select(["antonym"])
            src = means
            n_pos = target.tokens.shape[1]
        else:
            from bench_patching import prompts

            n_pos = 60
            target = prompts(info.d_vocab, n, n_pos, seed=0)
            src = torch.randn(info.n_layers, info.n_heads, info.d_head) * 0.1
        tvlens.patch_heads(m, target, src, layers=[info.n_layers - 1], progress=False)  # warm-up
        sec, _ = timed(lambda: tvlens.patch_heads(m, target, src, metric="logprob", progress=False))
        sites = info.n_layers * info.n_heads
        cfg = m.cfg
        d_mlp = int(getattr(cfg, "d_mlp", 4 * info.d_model) or 4 * info.d_model)
        gated = "llama" in str(getattr(cfg, "original_architecture", "")).lower() or info.normalization.lower().startswith("rms")
        f = site_flops(info.n_layers, info.d_vocab, info.d_model, d_mlp=d_mlp, n_heads=info.n_heads,
                       n_kv=info.n_kv_heads, d_head=info.d_head, ctx=n_pos, gated=gated)
        per = sec / (sites * n)
        rows.append((label, f"{info.n_layers}x{info.n_heads}, d{info.d_model}, vocab {info.d_vocab}", n, n_pos, sec,
                     sec / info.n_layers, per * 1e6, f, f / per / 1e9))
    print(f"\nper-unit costs (final-position head sweep, one task's means into {args.prompts} prompts; load {load()})")
    print("| model | shape | prompts | tokens | sweep s | per unit (layer) s | µs per site·prompt | FLOPs per site·prompt | achieved GFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.2f} | {r[5]:.3f} | {r[6]:.1f} | {r[7]:.3g} | {r[8]:.1f} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small sizes (smoke run)")
    ap.add_argument("--tasks", type=int, default=8, help="tasks of the layer sweep (one unit each)")
    ap.add_argument("--prompts", type=int, default=24, help="prompts per task")
    ap.add_argument("--overhead-units", type=int, default=200)
    ap.add_argument("--scaling", action="store_true", help="also measure per-unit costs for the scaling note")
    ap.add_argument("--cache-dir", default=os.environ.get("TVLENS_BENCH_CACHE", str(Path(tempfile.gettempdir()) / "tvlens-bench")))
    args = ap.parse_args(argv)
    if args.quick:
        args.tasks, args.prompts, args.overhead_units = 2, 4, 20
    torch.set_num_threads(1)

    import ray

    import tvlens
    from tvlens.runs.executors import LocalExecutor, RayExecutor, Unit

    print(f"load before: {load()}  (2 cores; other jobs may be running)")
    ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False)
    try:
        m = tvlens.load_model("organism", device="cpu")
        tasks = [t.name for t in tvlens.resolve_tasks("all")][: args.tasks]
        kw = dict(n_prompts=args.prompts, n_shots=3, seed=0)
        tvlens.layer_sweep(m, tasks[:1], **kw)  # warm-up
        t_local, ref = timed(lambda: tvlens.layer_sweep(m, tasks, **kw))
        times = {}
        for n in (1, 2):
            with RayExecutor(n, threads_per_worker=1) as ex:
                ex.prepare(m)  # replicas loaded before the clock starts
                tvlens.layer_sweep(m, tasks[:n], executor=ex, **kw)  # warm-up on every worker
                times[n], got = timed(lambda: tvlens.layer_sweep(m, tasks, executor=ex, **kw))
                assert float((got.logprob - ref.logprob).abs().max()) < 1e-4, "ray and local disagree"
                if n == 1:
                    units = [Unit(i, _tiny) for i in range(args.overhead_units)]
                    t_ray_tiny, _ = timed(lambda: ex.run(m, units, progress=False))
                    t_loc_tiny, _ = timed(lambda: LocalExecutor(split=True).run(m, units, progress=False))
        n_units = len(tasks)
        print(f"\nlayer_sweep on the organism: {len(tasks)} tasks x {args.prompts} prompts ({n_units} units); "
              f"load after: {load()}")
        print("| case | seconds | vs local loop | per unit s |")
        print("|---|---|---|---|")
        print(f"| local loop (executor=None) | {t_local:.2f} | 1.00x | {t_local / n_units:.3f} |")
        for n in (1, 2):
            print(f"| ray x{n} | {times[n]:.2f} | {t_local / times[n]:.2f}x | {times[n] / n_units:.3f} |")
        print(f"\nspeed-up of 2 workers over 1: **{times[1] / times[2]:.2f}x** (2 cores shared; load {load()})")
        print(f"executor overhead per unit: ray x1 {1e3 * (t_ray_tiny - t_loc_tiny) / args.overhead_units:.2f} ms "
              f"(trivial units: ray {1e3 * t_ray_tiny / args.overhead_units:.2f} ms, local "
              f"{1e3 * t_loc_tiny / args.overhead_units:.3f} ms); on the sweep "
              f"(ray x1 - local loop) / units = {1e3 * (times[1] - t_local) / n_units:.0f} ms")
    finally:
        ray.shutdown()
    if args.scaling:
        scaling(args)


if __name__ == "__main__":
    main()
