"""The per-family table of issue 9: zero-shot, task vector, function vector, instruction vector,
ensemble and ICL accuracy — Hendel et al. 2023's Table / Luo et al. 2024's results — on each model.

    python benchmarks/vectors_table.py [--models organism,organism-natural] [--tasks all]
                                       [--n-prompts 50] [--n-shots 5] [--fv-heads 10] [--out DIR]

Everything comes from tvlens.vectors.activation.layer_sweep (one sweep per vector kind; each measures the
zero-shot and ICL baselines of the same run on the same test queries):

* TV    — Hendel: mean final-separator residual of n-shot prompts with dummy queries, REPLACING the
          zero-shot prompt's state at the layer;
* FV    — Todd: sum of the top-k heads' (by CIE on shuffled-label prompts) task-mean outputs, ADDED;
* IV    — Luo: mean final-separator residual of instruction-only prompts, replacing;
* TV+IV — Luo's ensemble: the mean of TV and IV at the layer, replacing;
* also the add-style (Todd) curve of the centred task vector (task mean minus the mean over tasks).

Protocol (Hendel): for each task the layer is chosen on the dev split, accuracy is reported on the
test split (first-token accuracy). The layer curves (mean over tasks, test split) are printed too,
with the best layer by mean dev accuracy. Writes the table to stdout; ``--out`` also saves every
SweepResult (.safetensors/.json) and its HTML plot.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

COLUMNS = [("TV", "task", "replace"), ("FV", "function", "add"), ("IV", "instruction", "replace"),
           ("TV+IV", "ensemble", "replace")]


def tvp_layer(name: str) -> str:
    """The organism's documented TVP layer L*, if its checkpoint says."""
    try:
        from tvlens.models import organism_path

        d = organism_path(name)
    except Exception:
        return "?"
    for f in sorted(d.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except Exception:
            continue
        if isinstance(data, dict):
            for key in ("tvp_layer", "L_star", "l_star"):
                if key in data:
                    return str(data[key])
            for v in data.values():
                if isinstance(v, dict) and "tvp_layer" in v:
                    return str(v["tvp_layer"])
    return "?"


def run_model(name: str, args: argparse.Namespace) -> None:
    import torch

    import tvlens
    from tvlens.vectors import activation as V

    model = tvlens.load_model(name, device=args.device)
    common = dict(n_prompts=args.n_prompts, n_shots=args.n_shots, seed=args.seed, batch_size=args.batch_size)
    sweeps = {}
    t0 = time.perf_counter()
    for label, kind, mode in COLUMNS:
        t = time.perf_counter()
        sweeps[label] = V.layer_sweep(model, args.tasks, kind=kind, mode=mode,
                                      function_kw=dict(k=args.fv_heads, n_prompts=args.fv_prompts,
                                                       n_cie_prompts=args.cie_prompts), **common)
        print(f"  [{name}: {label} sweep {time.perf_counter() - t:.1f}s]", file=sys.stderr, flush=True)
    t = time.perf_counter()
    add = V.layer_sweep(model, args.tasks, kind="task", mode="add", center=True, **common)
    print(f"  [{name}: centred TV add sweep {time.perf_counter() - t:.1f}s]", file=sys.stderr, flush=True)

    tv = sweeps["TV"]
    fams = list(dict.fromkeys(tv.families)) + ["all"]
    s = tv.splits.index(tv.report_split)
    print(f"\n=== {name}: {len(tv.tasks)} tasks, {args.n_shots}-shot, n_prompts={args.n_prompts}, seed={args.seed}; "
          f"TVP layer L* = {tvp_layer(name)}; layer chosen per task on '{tv.select_split}', accuracy on "
          f"'{tv.report_split}' (first token) ===")
    head = f"{'family':<13}{'tasks':>6}{'zero-shot':>11}" + "".join(f"{c:>8}" for c, _, _ in COLUMNS) + \
        f"{'TVadd':>8}{'ICL':>7}{'TV/ICL':>8}"
    print(head)
    best = {c: r.at_best(True) for c, r in sweeps.items()}
    best_add = add.at_best(True)
    for fam in fams:
        idx = torch.as_tensor([i for i, f in enumerate(tv.families) if fam == "all" or f == fam])
        icl = float(tv.icl[idx].mean())
        row = f"{fam:<13}{idx.numel():>6}{float(tv.zero_shot[idx, s].mean()):>11.3f}"
        row += "".join(f"{float(best[c][idx].mean()):>8.3f}" for c, _, _ in COLUMNS)
        row += f"{float(best_add[idx].mean()):>8.3f}{icl:>7.3f}{float(best['TV'][idx].mean()) / icl if icl else float('nan'):>8.2f}"
        print(row)
    print("(TVadd: centred task vector, added — Todd-style; ICL and zero-shot from the TV sweep's run; "
          "each sweep re-measures them on the same queries: "
          + ", ".join(f"{c} ICL {float(r.icl.mean()):.3f}" for c, r in sweeps.items()) + ")")
    print(f"\nmean test accuracy by layer (best layer by mean dev accuracy in brackets; last column: tasks whose "
          "dev-best layer is 0, where a replaced state is the embedding of '→' itself, i.e. the zero-shot run):")
    print(f"{'vector':<22}" + "".join(f"{'L' + str(l):>8}" for l in tv.layers) + f"{'best':>7}{'L0-best':>9}")
    for c, r in [*sweeps.items(), ("TV add (centred)", add)]:
        n0 = sum(1 for v in r.best_layers.values() if v == 0)
        print(f"{c + ' (' + r.mode + ')':<22}" + "".join(f"{v:>8.3f}" for v in r.curve().tolist())
              + f"{'[' + str(r.best_layer) + ']':>7}{f'{n0}/{len(r.tasks)}':>9}")
    fv = sweeps["FV"]
    print(f"(FV: top {args.fv_heads} heads by CIE, mean head outputs over {args.fv_prompts} {args.n_shots}-shot prompts, "
          f"CIE on {args.cie_prompts} shuffled-label prompts; FV best layer on dev: {fv.best_layer})")
    print(f"[{name}: all sweeps {time.perf_counter() - t0:.1f}s]")
    if args.out:
        out = Path(args.out) / name
        out.mkdir(parents=True, exist_ok=True)
        for c, r in [*sweeps.items(), ("TVadd", add)]:
            stem = c.replace("+", "_plus_").lower()
            r.save(out / f"sweep_{stem}")
            r.to_html(out / f"sweep_{stem}.html")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="organism,organism-natural")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--n-prompts", type=int, default=50)
    ap.add_argument("--n-shots", type=int, default=5)
    ap.add_argument("--fv-heads", type=int, default=10)
    ap.add_argument("--fv-prompts", type=int, default=50, help="prompts for the FV's mean head outputs")
    ap.add_argument("--cie-prompts", type=int, default=25, help="shuffled-label prompts for the CIE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    for name in [m.strip() for m in args.models.split(",") if m.strip()]:
        run_model(name, args)


if __name__ == "__main__":
    main()
