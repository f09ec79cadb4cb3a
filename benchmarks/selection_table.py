"""Head-selection comparison on the model organism (issue 11): one table per family.

    python benchmarks/selection_table.py [--model organism] [--tasks all] [--per family] [--out figures/selection]

For every family of the task suite: held-out (test-split) first-token accuracy of zero-shot
prompts with the task-mean ``hook_z`` of a set of heads patched in at the final separator —
ρ top-k (Hojel et al. 2024), CIE top-k (Todd et al. 2024), REINFORCE (Hojel et al. 2024), soft α
(task_vectors package), k random heads (mean of draws) — next to zero-shot and ICL.
REINFORCE and soft α are trained per family on the train split; k defaults to the number of heads
REINFORCE kept for the family. Prints the family table, the per-task table and timings, and writes
``<out>/selection_comparison.html`` (bar plot, tables, every selection's heatmap),
``<out>/selection_table.md`` and ``<out>/selection_comparison.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch


def _no_nan(x):
    """JSON has no NaN: write null for a method that did not run."""
    if isinstance(x, float):
        return None if x != x else x
    if isinstance(x, dict):
        return {k: _no_nan(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_no_nan(v) for v in x]
    return x


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="organism")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--per", default="family", choices=["family", "task", "all"])
    ap.add_argument("--k", type=int, default=None, help="heads for the top-k / random rows (default: REINFORCE's count)")
    ap.add_argument("--n-shots", type=int, default=5)
    ap.add_argument("--n-mean-prompts", type=int, default=100)
    ap.add_argument("--n-icl-prompts", type=int, default=50)
    ap.add_argument("--n-random", type=int, default=10)
    ap.add_argument("--steps", type=int, default=200, help="REINFORCE steps")
    ap.add_argument("--samples", type=int, default=64, help="REINFORCE masks per step")
    ap.add_argument("--train-prompts", type=int, default=16, help="zero-shot train prompts per task for the optimisers")
    ap.add_argument("--soft-steps", type=int, default=100)
    ap.add_argument("--sparsity", type=float, default=0.0, help="REINFORCE penalty per expected selected head")
    ap.add_argument("--l1", type=float, default=1e-3, help="soft-α L1 penalty")
    ap.add_argument("--no-cie", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="figures/selection")
    ap.add_argument("--progress", action="store_true", help="tqdm bars on stderr even when it is not a terminal")
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    import tvlens
    from tvlens.analyses.selection import DEFAULT_METHODS, compare_selections

    t0 = time.time()
    model = tvlens.load_model(args.model)
    methods = tuple(m for m in DEFAULT_METHODS if not (args.no_cie and m == "cie_topk"))
    cmp = compare_selections(
        model, args.tasks, k=args.k, per=args.per, methods=methods, n_random=args.n_random, seed=args.seed,
        n_shots=args.n_shots, n_icl_prompts=args.n_icl_prompts, n_mean_prompts=args.n_mean_prompts,
        reinforce_kw=dict(steps=args.steps, samples_per_step=args.samples, n_prompts=args.train_prompts, sparsity=args.sparsity),
        soft_kw=dict(steps=args.soft_steps, n_prompts=args.train_prompts, l1=args.l1),
        cie_kw=dict(n_shots=max(args.n_shots, 5)),
        progress=args.progress or sys.stderr.isatty(),
    )
    elapsed = time.time() - t0

    print(f"# Head selection on {args.model} (per {args.per}; seed {args.seed}; {elapsed:.0f} s)\n")
    print(cmp.table())
    print("\nk per group:", dict(cmp.k))
    for method in ("reinforce", "soft"):
        for group, sel in cmp.selections.get(method, {}).items():
            extra = sel.meta.extra
            print(f"{method:9s} [{group}] {len(sel):2d} heads, {extra.get('steps_run')} steps, "
                  f"final train reward {extra.get('final_reward'):.3f}: {sel.heads()}")
    for group, sel in cmp.selections.get("rho_topk", {}).items():
        print(f"rho_topk  [{group}] {sel.heads()}")
    for group, sel in cmp.selections.get("cie_topk", {}).items():
        print(f"cie_topk  [{group}] {sel.heads()}")
    if cmp.notes:
        print("\nnotes:", *cmp.notes, sep="\n  ")
    print("\n## per task\n")
    print(cmp.table(by="task"))

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    from tvlens.results import atomic_write_text

    cmp.to_html(out / "selection_comparison.html")
    atomic_write_text(out / "selection_table.md", cmp.table() + "\n\n" + cmp.table(by="task") + "\n")
    record = {
        "model": args.model, "args": vars(args), "seconds": elapsed, "methods": list(cmp.methods), "tasks": list(cmp.tasks),
        "families": list(cmp.families), "accuracy": cmp.accuracy.tolist(), "random_std": cmp.random_std.tolist(),
        "family_names": list(cmp.family_names), "family_accuracy": cmp.family_accuracy().tolist(), "k": dict(cmp.k),
        "heads": {m: {g: s.heads() for g, s in groups.items()} for m, groups in cmp.selections.items()},
        "notes": list(cmp.notes),
    }
    atomic_write_text(out / "selection_comparison.json", json.dumps(_no_nan(record), indent=1))
    print(f"\nwrote {out}/selection_comparison.html, selection_table.md, selection_comparison.json")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
