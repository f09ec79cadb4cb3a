"""Benchmark: one batched REINFORCE step over (head, position) masks against a per-sample loop, in one run.

A REINFORCE step of Hojel et al. 2024 (§3.2) scores ``--samples`` sampled masks on ``--canvases``
no-example canvases. Cases (same masks, same canvases, same task means):

* ``per-sample loop`` — the naive way: one ``run_with_hooks`` per (mask, canvas), a plain hook
  function replacing ``hook_z`` at the mask's (head, position) pairs in every layer;
* ``per-mask loop``   — one ``run_with_hooks`` per mask over all canvases;
* ``tvlens``          — :meth:`tvlens.analyses.visual.CanvasPatch.reward`: every mask one column
  of the engine's runner, the masks along the batch axis of whole forwards of at most 32 rows
  (the CPU default of ``rows_per_forward``);
* ``tvlens, 1 forward`` — the same with every mask in one forward (the GPU setting).

The three give the same rewards (checked to 1e-4 here). The model is ``organism-visual`` when its
checkpoint is there, otherwise a randomly initialised model of the same shape (the cost depends only
on the shape). The machine's load (``os.getloadavg``) is printed before and after; peak memory is
the process's resident peak after each case.

    python benchmarks/bench_visual.py                   # 8 masks x 16 canvases, 3 repeats
    python benchmarks/bench_visual.py --quick           # smoke run
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def load() -> str:
    a, b, c = os.getloadavg()
    return f"{a:.2f}, {b:.2f}, {c:.2f}"


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def model_of(tmp: Path):
    import tvlens
    from tvlens.organisms import organism_path

    if (organism_path("organism-visual") / "model.safetensors").exists():
        return tvlens.load_model("organism-visual", device="cpu"), "organism-visual"
    from tvlens.organisms.visual.train import TrainConfig, build_model, build_tokenizer

    torch.manual_seed(0)
    build_model(TrainConfig()).save_pretrained(tmp)
    build_tokenizer().save_pretrained(tmp)
    return tvlens.load_model(tmp, device="cpu"), "random model of organism-visual's shape"


def naive_rewards(model, batch, means, masks, per_sample: bool) -> torch.Tensor:
    """Mean target log-prob per mask, one run_with_hooks per (mask, canvas) or per mask."""
    q, tgt = batch.layout.query_positions, batch.targets
    rows = [[i] for i in range(len(batch))] if per_sample else [list(range(len(batch)))]
    out = []
    for m in masks:
        def hook(layer):
            w = m[layer].T[None, :, :, None]
            v = means[layer].permute(1, 0, 2)[None]

            def fn(z, hook):
                return z + w * (v - z)
            return fn
        hooks = [(f"blocks.{l}.attn.hook_z", hook(l)) for l in range(m.shape[0]) if bool(m[l].any())]
        vals = []
        for r in rows:
            with torch.no_grad():
                lg = model.run_with_hooks(batch.tokens[r], fwd_hooks=hooks)[:, q].log_softmax(-1)
            vals.append(lg.gather(-1, tgt[r][..., None])[..., 0].mean(-1))
        out.append(torch.cat(vals).mean())
    return torch.stack(out)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--samples", type=int, default=8, help="masks per REINFORCE step")
    ap.add_argument("--canvases", type=int, default=16, help="no-example canvases the masks are scored on")
    ap.add_argument("--p", type=float, default=0.27, help="Bernoulli probability of each pair (sigmoid(-1))")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    if args.quick:
        args.samples, args.canvases, args.repeats = 4, 4, 1
    torch.set_num_threads(args.threads)
    from tvlens.analyses import visual as V
    from tvlens.inputs import canvas as C

    print(f"load before: {load()}  (threads {args.threads}, {os.cpu_count()} cores)")
    with tempfile.TemporaryDirectory() as tmp:
        model, what = model_of(Path(tmp))
        tasks = list(V.VISUAL_TASKS)[:2]
        stats = V.canvas_means(model, tasks, n=8, seed=0)
        batch = C.canvases(tasks[0], args.canvases, examples="masked", seed=1)
        obj = V.CanvasPatch(model, batch, stats)
        one = V.CanvasPatch(model, batch, stats, rows_per_forward=args.samples * args.canvases)
        means = stats.mean(tasks[0]).float()  # [layer, head, pos, d_head]
        gen = torch.Generator().manual_seed(0)
        masks = (torch.rand(args.samples, *obj.shape, generator=gen) < args.p).float()
        obj.reward(masks[:1])  # warm-up: the engine's capability check runs once per model
        times, results = {"per-sample loop": [], "per-mask loop": [], "tvlens": [], "tvlens, 1 forward": []}, {}
        peaks = {}
        for _ in range(args.repeats):
            for case in times:
                t = time.perf_counter()
                if case.startswith("tvlens"):
                    r = (obj if case == "tvlens" else one).reward(masks)
                else:
                    r = naive_rewards(model, batch, means, masks, per_sample=case == "per-sample loop")
                times[case].append(time.perf_counter() - t)
                results[case] = r
                peaks[case] = peak_mib()
        for case, r in results.items():
            torch.testing.assert_close(r.float(), results["tvlens"].float(), atol=1e-4, rtol=1e-4)
    tv = min(times["tvlens"])
    print(f"\nmodel: {what}; one REINFORCE step = {args.samples} masks x {args.canvases} canvases (p={args.p} per pair); "
          f"best of {args.repeats}")
    print(f"{'case':<18}{'seconds':>10}{'tvlens s':>10}{'ratio':>8}{'peak MiB':>10}")
    for case, ts in times.items():
        print(f"{case:<18}{min(ts):>10.3f}{tv:>10.3f}{min(ts) / tv:>8.1f}{peaks[case]:>10.0f}")
    print(f"\nload after: {load()}")


if __name__ == "__main__":
    main()
