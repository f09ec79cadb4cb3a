"""Benchmark: Hendel et al.'s all-layers task-vector sweep, tvlens vs the naive loop.

    python benchmarks/bench_vectors.py [--model organism|PATH] [--tasks all] [--n-prompts 50] [--n-shots 5] [--repeats 3]

(about 6 minutes with --repeats 2 on one idle CPU core for the whole suite on the organism)

naive  = tests/reference_vectors.naive_layer_sweep: for every task and layer, one ``run_with_hooks``
         per prompt batch to extract the vector (full forward), one per batch and split to
         evaluate it on zero-shot prompts; plain forwards for the baselines.
tvlens = tvlens.vectors.activation.layer_sweep: one extraction pass for all tasks and layers (stops after the
         last layer needed, length-bucketed batches), ICL baseline with last-position logits only,
         zero-shot prompts run once and only the final token recomputed per layer (PatchRunner).

Three stages are timed: the whole sweep (each side builds its prompts inside the timing: the naive
loop with tvlens.icl_prompts for every prompt, tvlens with the same call for the scored prompts and
tvlens.inputs.text.context_prompts, the same tokens without answer tokens, for the extraction
prompts), the sweep on ready prompts (every task's prompts built once before the timings and given
to both: ``naive_layer_sweep(prompts=...)``, ``layer_sweep(SweepPrompts...)``), so the ratio is that
of the sweeps themselves, and the evaluation stage alone. Each side's time of building its prompts
once is printed beside them.

Both compute the same SweepResult numbers (checked here to 1e-4, and each side's sweep on ready
prompts against its own sweep). Timings are interleaved in one
process (naive, tvlens, naive, tvlens, ...) and the fastest of ``--repeats`` is reported, as wall
time and as CPU time of the process (the latter is the robust one on a shared machine). Peak memory
(max RSS on CPU, max allocated on CUDA) is measured with each side alone in its own process.
Falls back to a random Llama of the organism's shape when the organism is not shipped. Ratios are
measured in the same run; absolute times mean little on a shared machine.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


#: three tasks per family: a quicker run (--tasks "$DEFAULT_TASKS"); the default is the whole suite
DEFAULT_TASKS = ("country_capital,animal_young,element_symbol,antonym,past_tense,singular_plural,"
                 "english_french,german_english,spanish_english,successor,first_letter,list_first")


def organism_shaped_checkpoint(out: Path) -> Path:
    """A random Llama with the organism's shape (d_model 128, 4 layers, 8 q / 4 kv heads, d_mlp 512)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tvlens.organisms.text.tokenizer import build_tokenizer
    from tvlens.tasks import suite_vocabulary

    if (out / "config.json").exists():
        return out
    tok = build_tokenizer(suite_vocabulary())
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=512, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def resolve_model(name: str) -> str:
    from tvlens.models import ORGANISMS, organism_path

    if name in ORGANISMS and not (organism_path(name) / "config.json").exists():
        path = organism_shaped_checkpoint(Path(tempfile.gettempdir()) / "tvlens_bench_organism_shape")
        print(f"[{name} not shipped yet: using a random Llama of its shape at {path}]")
        return str(path)
    return name


def _ready_prompts(model, args):
    """Every task's prompts, built once (the same tvlens code both sides call inside their sweeps)."""
    from reference_vectors import naive_sweep_prompts
    from tvlens.tasks import resolve_tasks

    return [naive_sweep_prompts(model, t, n_prompts=args.n_prompts, n_shots=args.n_shots, seed=0, splits=("dev", "test"))
            for t in resolve_tasks(args.tasks)]


def _fast_plan(model, args):
    """Every prompt of tvlens's sweep, as layer_sweep builds them (its first step)."""
    from tvlens.vectors import activation as V

    return V._sweep_plan(model, args.tasks, kind="task", splits=("dev", "test"), n_prompts=args.n_prompts,
                         n_shots=args.n_shots, seed=0, dummy_query=True, center=False, prompt_kw={}, checkpoint=None,
                         executor=None)


def _sides(model, args, ready=None):
    """The two implementations, as (name -> (full sweep, sweep on ready prompts, evaluation stage)) callables."""
    import torch

    from reference_vectors import naive_layer_sweep, naive_patched_scores
    from tvlens.vectors import activation as V
    from tvlens.tasks import resolve_tasks

    kw = dict(n_prompts=args.n_prompts, n_shots=args.n_shots, seed=0, splits=("dev", "test"), batch_size=args.batch_size)
    task_list = resolve_tasks(args.tasks)
    zs = ([z for _, z, _ in ready] if ready else  # the evaluation stage's zero-shot prompts, built once
          [[V._zero_shot_prompts(model, t, sp, args.n_prompts, 0) for sp in ("dev", "test")] for t in task_list])
    given = [V.SweepPrompts(task=t.name, context=ext, queries={"dev": z[0], "test": z[1]}, icl=icl)
             for t, (ext, z, icl) in zip(task_list, ready or [])]
    dev = next(model.parameters()).device

    def naive_eval(vecs):
        with torch.no_grad():
            for t, pair in enumerate(zs):
                for j in range(vecs.shape[1]):
                    for batch in pair:
                        naive_patched_scores(model, batch, j, vecs[t, j].to(dev), batch_size=args.batch_size)

    def fast_eval(vecs):
        flat = [b for pair in zs for b in pair]
        V._grid_eval(model, flat, vecs.repeat_interleave(2, dim=0), list(range(vecs.shape[1])), "replace", 1.0)

    return {
        "naive": (lambda: naive_layer_sweep(model, task_list, **kw),
                  lambda: naive_layer_sweep(model, task_list, **kw, prompts=ready), naive_eval),
        "fast": (lambda: V.layer_sweep(model, task_list, **kw),
                 lambda: V.layer_sweep(model, given, **kw), fast_eval),
    }


def _tables(res) -> dict:
    keys = ("accuracy", "logprob", "zero_shot", "zero_shot_logprob", "icl", "icl_logprob", "vectors")
    if isinstance(res, dict):
        return {k: res[k] for k in keys}
    return {k: getattr(res, k) for k in keys}


def _sync(model) -> None:
    import torch

    if next(model.parameters()).is_cuda:
        torch.cuda.synchronize()


def worker(args: argparse.Namespace) -> None:
    """One side, once, in its own process: its peak memory."""
    import torch

    torch.set_num_threads(args.threads)
    import tvlens

    model = tvlens.load_model(args.model, device=args.device)
    cuda = next(model.parameters()).is_cuda
    sweep = _sides(model, args)[args.which][0]
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    sweep()
    _sync(model)
    peak = (torch.cuda.max_memory_allocated() / 2**20) if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    Path(args.out).write_text(json.dumps({"peak_mb": peak, "base_mb": base, "cuda": cuda}))


def timed(fn, model):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    _sync(model)
    return out, time.perf_counter() - t0, time.process_time() - c0


def _load() -> str:
    """The 1/5/15-minute load averages: on a shared machine they say how far wall time is from CPU time."""
    return "/".join(f"{x:.1f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--tasks", default="all", help=f"task spec (default: the whole suite; a quicker one: {DEFAULT_TASKS!r})")
    ap.add_argument("--n-prompts", type=int, default=50)
    ap.add_argument("--n-shots", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=3, help="interleaved timings per side; the fastest is reported")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--worker", dest="which", choices=("naive", "fast"), help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model = resolve_model(args.model) if not args.which else args.model
    if args.which:
        return worker(args)

    import torch

    torch.set_num_threads(args.threads)
    import tvlens

    load0 = _load()
    model = tvlens.load_model(args.model, device=args.device)
    _ready_prompts(model, args)  # first-call costs (tokenizer, per-task answer tables), as the warm-up below
    _fast_plan(model, args)
    ready, t_prompts, c_prompts = timed(lambda: _ready_prompts(model, args), model)
    _, t_plan, c_plan = timed(lambda: _fast_plan(model, args), model)
    sides = _sides(model, args, ready)
    # warm-up (first-call costs: tokenizer caches, lazy imports), not timed
    for name in sides:
        sides[name][0]()
    stages = ("wall", "cpu", "ready_wall", "ready_cpu", "eval_wall", "eval_cpu")
    best = {name: dict.fromkeys(stages, float("inf")) for name in sides}
    tables, ready_tables = {}, {}
    for _ in range(args.repeats):  # interleaved, so both sides see the same machine load
        for name, (sweep, sweep_ready, evaluate) in sides.items():
            b = best[name]
            res, w, c = timed(sweep, model)
            tables[name] = _tables(res)
            res, rw, rc = timed(sweep_ready, model)
            ready_tables[name] = _tables(res)
            _, ew, ec = timed(lambda: evaluate(tables[name]["vectors"]), model)
            for key, v in zip(stages, (w, c, rw, rc, ew, ec)):
                b[key] = min(b[key], v)
    # the sweep on ready prompts computes the same tables as the sweep that builds them
    worst_ready = max(float((ready_tables[s][k] - tables[s][k]).abs().max()) for s in sides for k in tables[s])
    worst = max(float((tables["naive"][k] - tables["fast"][k]).abs().max()) for k in tables["naive"])
    mem = {}
    with tempfile.TemporaryDirectory() as tmp:
        for which in ("naive", "fast"):
            out = Path(tmp) / f"{which}.json"
            cmd = [sys.executable, __file__, "--worker", which, "--out", str(out), "--model", args.model, "--tasks", args.tasks,
                   "--n-prompts", str(args.n_prompts), "--n-shots", str(args.n_shots), "--batch-size", str(args.batch_size),
                   "--threads", str(args.threads), "--device", args.device]
            subprocess.run(cmd, check=True)
            mem[which] = json.loads(out.read_text())
    n, f = best["naive"], best["fast"]
    unit = "MiB allocated (CUDA)" if mem["fast"]["cuda"] else "MiB max RSS of the process"
    T, S, J = tables["fast"]["accuracy"].shape
    res = sides["fast"][0]()
    print(f"\nall-layers task-vector sweep: model {args.model} ({J} layers), {T} tasks, n_prompts={args.n_prompts}, "
          f"n_shots={args.n_shots}, splits dev+test, device {args.device}, {args.threads} thread(s), best of {args.repeats} "
          f"interleaved runs; load {load0} at the start, {_load()} at the end")
    print(f"{'case':<26}{'naive s':>9}{'tvlens s':>10}{'ratio':>7}{'naive cpu s':>13}{'tvlens cpu s':>14}{'cpu ratio':>11}"
          f"{'naive peak':>12}{'tvlens peak':>13}")
    print(f"{'layer_sweep, end to end':<26}{n['wall']:>9.2f}{f['wall']:>10.2f}{n['wall'] / f['wall']:>7.1f}"
          f"{n['cpu']:>13.2f}{f['cpu']:>14.2f}{n['cpu'] / f['cpu']:>11.1f}{mem['naive']['peak_mb']:>12.0f}{mem['fast']['peak_mb']:>13.0f}")
    print(f"{'  on ready prompts':<26}{n['ready_wall']:>9.2f}{f['ready_wall']:>10.2f}{n['ready_wall'] / f['ready_wall']:>7.1f}"
          f"{n['ready_cpu']:>13.2f}{f['ready_cpu']:>14.2f}{n['ready_cpu'] / f['ready_cpu']:>11.1f}")
    print(f"{'  evaluation stage only':<26}{n['eval_wall']:>9.2f}{f['eval_wall']:>10.2f}{n['eval_wall'] / f['eval_wall']:>7.1f}"
          f"{n['eval_cpu']:>13.2f}{f['eval_cpu']:>14.2f}{n['eval_cpu'] / f['eval_cpu']:>11.1f}")
    print(f"peak memory in {unit}; max |naive - tvlens| over every table (accuracy, log-prob, baselines, vectors): "
          f"{worst:.2e} (must be < 1e-4); on ready prompts vs built inside: {worst_ready:.2e}; best layer (dev): "
          f"{res.best_layer}")
    print(f"prompt construction, once per sweep: naive (icl_prompts for every prompt) {t_prompts:.2f} s wall, "
          f"{c_prompts:.2f} s CPU; tvlens (context prompts without answer tokens) {t_plan:.2f} s wall, {c_plan:.2f} s CPU")
    if worst >= 1e-4 or worst_ready >= 1e-4:
        sys.exit("MISMATCH between the naive and the fast sweep")


if __name__ == "__main__":
    main()
