"""Benchmark: streaming per-head statistics (tvlens.head_means) vs the naive way.

Cases: head means of every layer's ``hook_z`` at the final separator over N prompts of one task,
for N in 100, 1,000, 10,000 (``--quick``: 100, 500, 2,000).

* naive  — ``run_with_cache`` per batch (every hook cached), keep the separator ``hook_z`` of
           every layer for every prompt, stack all, then mean / variance;
* tvlens — ``head_means`` (only ``hook_z`` hooked, float64 running moments, flat memory);
* plain  — the same batches through a plain forward with no hooks (throughput reference).

All three cut each batch to its longest prompt (columns that are padding in every row dropped).

Every case runs in its own subprocess (one thread) and reports its own peak RSS
(``ru_maxrss``) and the RSS after loading the model, so "peak memory" below is the growth over the
loaded model. All three build the same prompts the same way (1,024 at a time), so prompt
construction is in every time; ``prompts`` times it alone. Ratios are measured in the same run;
absolute times mean nothing on a shared machine.

Model: the shipped organism if ``load_model("organism")`` works, else a random Llama of the
organism's shape (4 layers, d_model 192, 8 heads / 4 kv heads) with the suite tokenizer.

    python benchmarks/bench_stats.py [--quick] [--positions separator|all] [--batch-size 32] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TASK = "country_capital"
N_SHOTS = 5


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def _current_rss_mb() -> float:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except OSError:
        return _rss_mb()


def _model_source(tmp: Path) -> str:
    import tvlens

    try:
        tvlens.load_model("organism", device="cpu")
        return "organism"
    except Exception:
        pass
    out = tmp / "organism-shaped"
    if not (out / "config.json").exists():
        from tvlens.organisms.text.tokenizer import default_organism_tokenizer
        from tvlens.organisms.text.train import ModelShape, build_model

        tok = default_organism_tokenizer()
        model = build_model(ModelShape(), tok, seed=0)
        out.mkdir(parents=True, exist_ok=True)
        model.save_pretrained(out)
        tok.save_pretrained(out)
    return str(out)


def child(method: str, n_prompts: int, source: str, positions: str, batch_size: int) -> dict:
    import torch

    torch.set_num_threads(1)
    import tvlens
    from tvlens.hooks import act_name, run
    from tvlens.analyses.taskness import _prompt_chunks, head_means

    model = tvlens.load_model(source, device="cpu")
    with torch.no_grad():  # warm-up (first-call allocations), not timed
        run(model, torch.zeros(2, 8, dtype=torch.long))
    base = _current_rss_mb()
    n_layers = model.cfg.n_layers
    t0 = time.perf_counter()
    if method == "tvlens":
        head_means(model, [TASK], n_prompts=n_prompts, n_shots=N_SHOTS, positions=positions, batch_size=batch_size)
    else:
        kept = []
        for batch in _prompt_chunks(model, TASK, n_prompts=n_prompts, n_shots=N_SHOTS, seed=0, prompt_kw={}):
            if method == "prompts":
                continue
            for i in range(0, len(batch), batch_size):
                tok, mask = batch.tokens[i:i + batch_size], batch.attention_mask[i:i + batch_size]
                first = int(mask.bool().any(0).nonzero()[0])  # drop all-pad columns, as head_means does
                tok, mask = tok[:, first:], mask[:, first:]
                with torch.no_grad():
                    if method == "plain":
                        run(model, tok, attention_mask=mask)
                        continue
                    _, cache = model.run_with_cache(tok, attention_mask=mask)
                z = torch.stack([cache[act_name("z", l)] for l in range(n_layers)], dim=1)  # [b, layer, pos, head, d]
                if positions == "separator":
                    kept.append(z[:, :, -1].clone())
                else:
                    m = mask.bool()
                    kept.append(z.permute(0, 2, 1, 3, 4)[m].clone())  # every non-pad token
                del cache, z
        if method == "naive":
            allz = torch.cat(kept).to(torch.float64)
            allz.mean(0), allz.var(0, unbiased=False)
    dt = time.perf_counter() - t0
    return {"method": method, "n": n_prompts, "seconds": dt, "peak_mb": _rss_mb(), "base_mb": base}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="100, 500, 2000 prompts instead of 100, 1000, 10000")
    ap.add_argument("--positions", default="separator", choices=["separator", "all"])
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--sizes", type=int, nargs="*", default=None)
    ap.add_argument("--model", default=None, help="checkpoint directory or name (default: organism, else organism-shaped random)")
    ap.add_argument("--child", nargs=3, metavar=("METHOD", "N", "SOURCE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        method, n, source = args.child
        print(json.dumps(child(method, int(n), source, args.positions, args.batch_size)))
        return

    sizes = args.sizes or ([100, 500, 2000] if args.quick else [100, 1000, 10000])
    with tempfile.TemporaryDirectory() as tmp:
        source = args.model or _model_source(Path(tmp))
        shown = source if source == "organism" or args.model else "random Llama, organism shape (4 layers, d192, 8 heads / 4 kv)"
        print(f"model: {shown}; "
              f"task {TASK}, {N_SHOTS}-shot, positions={args.positions}, batch {args.batch_size}, 1 thread")
        rows = []
        for n in sizes:
            res = {}
            for method in ("prompts", "plain", "naive", "tvlens"):
                cmd = [sys.executable, __file__, "--child", method, str(n), source, "--positions", args.positions,
                       "--batch-size", str(args.batch_size)]
                out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
                if out.returncode != 0:
                    print(out.stderr[-2000:], file=sys.stderr)
                    raise SystemExit(f"child {method} {n} failed")
                res[method] = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append((n, res))
        hdr = (f"{'prompts':>8} {'naive s':>8} {'tvlens s':>9} {'ratio':>6} {'plain s':>8} {'prompts s':>9} "
               f"{'tv/plain thr':>12} {'fwd-only':>8} {'naive peak MB':>13} {'tvlens peak MB':>14}")
        print(hdr)
        print("-" * len(hdr))
        for n, r in rows:
            nv, tv, pl, pr = r["naive"], r["tvlens"], r["plain"], r["prompts"]
            thr = pl["seconds"] / tv["seconds"]  # tvlens throughput relative to a plain forward
            fwd = (pl["seconds"] - pr["seconds"]) / max(1e-9, tv["seconds"] - pr["seconds"])
            print(f"{n:>8} {nv['seconds']:>8.2f} {tv['seconds']:>9.2f} {nv['seconds'] / tv['seconds']:>6.2f} "
                  f"{pl['seconds']:>8.2f} {pr['seconds']:>9.2f} {thr:>12.2f} {fwd:>8.2f} "
                  f"{nv['peak_mb'] - nv['base_mb']:>13.1f} {tv['peak_mb'] - tv['base_mb']:>14.1f}")
        print("ratio = naive / tvlens time; tv/plain thr = tvlens throughput / plain forward (prompt building "
              "included in both); fwd-only = the same with prompt building subtracted; peak MB = peak RSS minus "
              "RSS after model load.")
        if len(rows) >= 2:
            a, b = rows[-2][1]["tvlens"], rows[-1][1]["tvlens"]
            print(f"tvlens peak RSS {rows[-2][0]} -> {rows[-1][0]} prompts: {a['peak_mb']:.1f} -> {b['peak_mb']:.1f} MB "
                  f"({100 * (b['peak_mb'] / a['peak_mb'] - 1):+.1f}%)")


if __name__ == "__main__":
    main()
