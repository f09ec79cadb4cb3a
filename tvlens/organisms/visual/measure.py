"""Measure organism-visual's task-vector tables through tvlens's API (Hojel et al. 2024, §4–5).

Parts (``--parts``, comma-separated), each written as Markdown (``measured_<part>.md``) and JSON
(``measured_<part>.json``) beside this file:

- ``topk``  — mean-patching the top-k ρ (layer, head, position) pairs into no-example canvases vs
  k random pairs vs the top-k with another task's means, per task and k, scored by code, exact-cell
  and changed-code accuracy, with the share of the ICL − baseline gap each recovers (§4.2); and
  patched no-example canvases against 1-shot ICL with noisy examples (§5);
- ``multi`` — selection at a limited budget inside the top ``--candidates`` pairs by ρ, one mask for
  all tasks (each canvas patched with its own task's means): REINFORCE with a size penalty, CMA-ES
  and greedy random search at equal budgets of mask evaluations, each beside the top-k by ρ of the
  k it chose (§3.2, the paper's comparison table);
- ``tasks`` — the same per task (one mask per task);
- ``floor`` — no model: what a no-example prediction can score at best on the held-out images,
  per task (copying the query; the per-cell majority of the 8 tasks' outputs, the Bayes-optimal
  code accuracy without knowing the task), beside the model's no-example baseline;
- ``figures`` — from the files the other parts wrote (``--masks`` of ``multi``): ρ maps, the top-k
  curves, ρ per head beside its effect, canvases as each method fills them (Figs. 3–4), vector
  arithmetic, and the study page ``visual.html``, into ``--figures``.

Means come from training-split images, selection from training-split canvases, every score from
held-out canvases.  ``torch.set_num_threads(--threads)``.

    python -m tvlens.organisms.visual.measure --parts topk,multi
    python -m tvlens.organisms.visual.measure --parts tasks
    python -m tvlens.organisms.visual.measure --parts figures --masks masks.pt --figures figures
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
METHODS = ("reinforce", "cma", "grs")
LABEL = {"reinforce": "REINFORCE", "cma": "CMA-ES", "grs": "GRS"}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _md(head: list[str], rows: list[list[str]]) -> str:
    return "\n".join(["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(r) + " |" for r in rows])


def _select(V, obj, space, method: str, budget: int, args) -> object:
    if method == "reinforce":
        return V.reinforce_pairs(obj, candidates=space, steps=budget // args.samples, samples=args.samples,
                                 sparsity=args.sparsity, seed=args.seed, init_logit=0.0, lr=args.lr)
    if method == "cma":
        return V.cma_pairs(obj, candidates=space, budget=budget, popsize=args.samples, sparsity=args.sparsity, seed=args.seed)
    return V.grs_pairs(obj, candidates=space, budget=budget, samples=args.samples, sparsity=args.sparsity, seed=args.seed,
                       init_p=0.5)


def no_example_floor(n: int, seed: int) -> dict[str, dict[str, float]]:
    """Per task, over ``n`` held-out images: the code accuracy of copying the query and of the per-cell
    majority of all tasks' outputs (ties: the lowest code) — the best any prediction can do on
    average when the task is not shown (uniform prior over the tasks)."""
    import numpy as np

    from .images import TASKS, apply_task, random_codes

    rng = np.random.default_rng(seed)
    copy = {t: 0.0 for t in TASKS}
    bayes = {t: 0.0 for t in TASKS}
    for _ in range(n):
        x = random_codes(rng, split="test")
        outs = np.stack([apply_task(t, x) for t in TASKS])  # [task, 6, 6]
        votes = np.stack([(outs == c).sum(0) for c in range(int(outs.max()) + 1)])  # [code, 6, 6]
        guess = votes.argmax(0)
        for t, o in zip(TASKS, outs):
            copy[t] += float((o == x).mean()) / n
            bayes[t] += float((o == guess).mean()) / n
    return {t: {"copy_query": copy[t], "majority": bayes[t]} for t in TASKS}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--parts", default="topk,multi,tasks")
    ap.add_argument("--n-means", type=int, default=32, help="1-shot training canvases per task for the means")
    ap.add_argument("--n-eval", type=int, default=32, help="held-out canvases per task for every score")
    ap.add_argument("--ks", default="64,128,256,512,768,1024,1536,2048,4608")
    ap.add_argument("--n-random", type=int, default=3, help="random draws per k")
    ap.add_argument("--candidates", type=int, default=1024, help="selection searches the top pairs by rho")
    ap.add_argument("--budget", type=int, default=800, help="mask evaluations per method, multi-task")
    ap.add_argument("--task-budget", type=int, default=320, help="mask evaluations per method and task")
    ap.add_argument("--n-select", type=int, default=2, help="training canvases per task for the multi-task selection")
    ap.add_argument("--task-select", type=int, default=8, help="training canvases for a per-task selection")
    ap.add_argument("--samples", type=int, default=8)
    ap.add_argument("--lr", type=float, default=0.3)
    ap.add_argument("--sparsity", type=float, default=1e-3)
    ap.add_argument("--gap-metric", default="changed", choices=("accuracy", "exact", "changed"),
                    help="the metric whose gap picks k* (the card: code accuracy is floored by the background)")
    ap.add_argument("--noise", type=int, default=4, help="corrupted codes per example output for the harder ICL")
    ap.add_argument("--floor-images", type=int, default=2000, help="held-out images for the floor part")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(HERE))
    ap.add_argument("--masks", default=None, metavar="FILE", help="save the selected masks here (torch.save)")
    ap.add_argument("--methods", default=",".join(METHODS), help="selectors to run (reinforce, cma, grs)")
    ap.add_argument("--tag", default="", help="suffix of the selection parts' file names (measured_multi_<tag>.md)")
    ap.add_argument("--figures", default="figures", metavar="DIR", help="where the figures part writes")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import tvlens
    from tvlens.analyses import visual as V
    from tvlens.inputs.canvas import canvases, concat

    parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if not methods or set(methods) - set(METHODS):
        raise SystemExit(f"--methods {args.methods!r}: use some of {', '.join(METHODS)}")
    t0 = time.perf_counter()
    load0 = os.getloadavg()
    say = lambda m: print(f"[measure {time.perf_counter() - t0:.0f}s] {m}", flush=True)  # noqa: E731
    command = "python -m tvlens.organisms.visual.measure " + " ".join(argv if argv is not None else os.sys.argv[1:])

    def finish(part: str, md: list[str], data: dict) -> None:
        secs = time.perf_counter() - t0
        load1 = os.getloadavg()
        foot = (f"\n`{command}` — {secs / 60:.1f} min on {args.threads} thread(s); load average "
                f"{load0[0]:.2f} at the start, {load1[0]:.2f} at the end ({os.cpu_count()} cores).\n")
        Path(args.out, f"measured_{part}.md").write_text("\n\n".join(md) + "\n" + foot)
        Path(args.out, f"measured_{part}.json").write_text(json.dumps({**data, "command": command, "seconds": secs,
                                                                       "settings": vars(args)}, indent=1))
        say(f"wrote measured_{part}.md")

    if "floor" in parts:
        floor = no_example_floor(args.floor_images, args.seed + 2000)
        base = json.loads((HERE / "checkpoint" / "metrics.json").read_text())["per_task"]
        rows = [[t, f"{f['copy_query']:.3f}", f"{f['majority']:.3f}", f"{base[t]['masked_acc']:.3f}",
                 f"{base[t]['blank_acc']:.3f}"] for t, f in floor.items()]
        mean = lambda key: sum(f[key] for f in floor.values()) / len(floor)  # noqa: E731
        bmean = lambda key: sum(base[t][key] for t in floor) / len(floor)  # noqa: E731
        rows.append(["**mean**", f"{mean('copy_query'):.3f}", f"{mean('majority'):.3f}", f"{bmean('masked_acc'):.3f}",
                     f"{bmean('blank_acc'):.3f}"])
        md = ["### How low can a no-example baseline be? (no model)",
              f"Code accuracy on {args.floor_images} held-out images per task of two predictions that do not know the "
              "task: copying the query, and the per-cell majority of the 8 tasks' outputs (the best code accuracy "
              "on average over a uniform task prior); beside them organism-visual's no-example baselines "
              "(`checkpoint/metrics.json`: example row `[MASK]` / drawn black).",
              _md(["task", "copy the query", "majority of the 8 outputs", "model, masked row", "model, black row"], rows)]
        finish("floor", md, {"floor": floor})

    if not set(parts) - {"floor"}:  # the floor needs no model
        return
    model = tvlens.load_model("organism-visual", device="cpu")
    names = list(V.VISUAL_TASKS)
    stats = V.canvas_means(model, names, n=args.n_means, seed=args.seed)
    rho = V.visual_taskness(stats)
    ev = {v: concat([canvases(t, args.n_eval, examples=v, seed=args.seed + 1000) for t in names]) for v in ("shown", "masked")}
    obj_ev = V.CanvasPatch(model, ev["masked"], stats)
    say("means, rho, held-out canvases")
    space = rho.top_pairs(args.candidates)

    if "topk" in parts:
        ks = [int(k) for k in args.ks.split(",")]
        wrong_map = {t: names[(i + 1) % len(names)] for i, t in enumerate(names)}
        obj_wrong = V.CanvasPatch(model, ev["masked"], stats, task_map=wrong_map)
        curve = V.topk_curve(obj_ev, obj_wrong, rho, ks, icl=ev["shown"], n_random=args.n_random, seed=args.seed)
        say("top-k curve\n" + "\n".join(curve.table(m) for m in V.SCORES))
        T = list(curve.tasks)
        M = {"accuracy": "code", "exact": "exact", "changed": "changed"}
        g = {(kind, m): curve.gap(kind, m) for kind in ("top", "random", "wrong") for m in V.SCORES}
        v = curve.values
        md = ["### Top-k ρ pairs vs k random pairs vs wrong-task means (mean over the 8 tasks)",
              f"No-example canvases (example row `[MASK]`), {args.n_eval} held-out canvases per task; baseline "
              + ", ".join(f"{M[m]} {float(curve.base[m][-1]):.3f}" for m in V.SCORES) + "; 1-shot ICL "
              + ", ".join(f"{M[m]} {float(curve.icl_scores[m][-1]):.3f}" for m in V.SCORES)
              + ". *gap* = (patched − baseline) / (ICL − baseline), of the task means; random: mean of "
              f"{args.n_random} draws; wrong-task: canvases of task i patched with task i+1's means.",
              _md(["k", "top-k code", "exact", "changed", "gap code", "gap exact", "gap changed",
                   "random code", "exact", "changed", "gap exact", "gap changed", "wrong code", "exact", "changed", "gap exact"],
                  [[str(k)] + [f"{float(v['top'][m][-1, j]):.3f}" for m in V.SCORES]
                   + [_pct(float(g['top', m][-1, j])) for m in V.SCORES]
                   + [f"{float(v['random'][m][-1, j]):.3f}" for m in V.SCORES]
                   + [_pct(float(g['random', m][-1, j])) for m in ("exact", "changed")]
                   + [f"{float(v['wrong'][m][-1, j]):.3f}" for m in V.SCORES] + [_pct(float(g['wrong', 'exact'][-1, j]))]
                   for j, k in enumerate(ks)])]
        gm = args.gap_metric
        kstar = curve.best_k(0.9, gm) or ks[int(curve.gap("top", gm)[-1].argmax())]
        j = ks.index(kstar)
        md += [f"### Per task at k = {kstar} (the smallest k recovering ≥ 90% of the {M[gm]} gap on average, else the "
               "k recovering most)",
               _md(["task", "ICL code / exact / changed", "baseline code / exact / changed",
                    f"top-{kstar} code / exact / changed", "gap exact / changed", f"random {kstar} exact / changed",
                    "gap exact / changed", "wrong-task code / exact / changed"],
                   [[t, " / ".join(f"{float(curve.icl_scores[m][i]):.3f}" for m in V.SCORES),
                     " / ".join(f"{float(curve.base[m][i]):.3f}" for m in V.SCORES),
                     " / ".join(f"{float(v['top'][m][i, j]):.3f}" for m in V.SCORES),
                     " / ".join(_pct(float(g['top', m][i, j])) for m in ("exact", "changed")),
                     " / ".join(f"{float(v['random'][m][i, j]):.3f}" for m in ("exact", "changed")),
                     " / ".join(_pct(float(g['random', m][i, j])) for m in ("exact", "changed")),
                     " / ".join(f"{float(v['wrong'][m][i, j]):.3f}" for m in V.SCORES)] for i, t in enumerate(T)])]
        for m in ("exact", "changed"):
            md += [f"### Share of the {M[m]} gap per task and k (top-k ρ)",
                   _md(["task", "baseline", "ICL", *map(str, ks)],
                       [[t, f"{float(curve.base[m][i]):.3f}", f"{float(curve.icl_scores[m][i]):.3f}"]
                        + [_pct(float(x)) for x in g['top', m][i]] for i, t in enumerate(T)])]
        # patched no-example canvases vs 1-shot ICL with noisy examples (§5)
        noisy_ev = concat([canvases(t, args.n_eval, seed=args.seed + 1000, noise=args.noise) for t in names])
        _, sc = V._icl_scores(model, noisy_ev)
        icl_noisy = {"accuracy": V._by_task(noisy_ev, sc.code_acc), "exact": V._by_task(noisy_ev, sc.exact),
                     "changed": V._by_task(noisy_ev, sc.changed)}
        noisy_stats = V.canvas_means(model, names, n=args.n_means, seed=args.seed, noise=args.noise)
        obj_noisy = V.CanvasPatch(model, ev["masked"], noisy_stats)
        n_all = rho.per_position.numel()
        masks = torch.stack([V.topk_pairs(rho, kstar), V.topk_pairs(rho, n_all)])
        clean_sc = obj_ev.scores(masks)
        noisy_sc = obj_noisy.scores(masks)
        cols = [(f"1-shot ICL, noise {args.noise}", {m: icl_noisy[m] for m in V.SCORES}),
                (f"top-{kstar}, clean means", {m: {t: float(clean_sc[m][t][0]) for t in T} for m in V.SCORES}),
                (f"top-{kstar}, noise-{args.noise} means", {m: {t: float(noisy_sc[m][t][0]) for t in T} for m in V.SCORES}),
                (f"all {n_all}, noise-{args.noise} means", {m: {t: float(noisy_sc[m][t][1]) for t in T} for m in V.SCORES})]
        md += [f"### Patched no-example canvases vs 1-shot ICL with noisy examples (noise {args.noise})",
               f"ICL: {args.n_eval} held-out 1-shot canvases per task whose example output has {args.noise} of 36 codes "
               f"replaced; patched: the {args.n_eval} no-example canvases above, with means of clean 1-shot canvases or "
               f"of noise-{args.noise} canvases ({args.n_means} per task, training images). code / exact / changed.",
               _md(["task", *[c for c, _ in cols]],
                   [[t, *[" / ".join(f"{d[m][t]:.3f}" for m in V.SCORES) for _, d in cols]] for t in T])]
        data = {"ks": ks, "tasks": T, "k_star": kstar,
                "values": {kind: {m: x.tolist() for m, x in d.items()} for kind, d in v.items()},
                "baseline": {m: x.tolist() for m, x in curve.base.items()},
                "icl": {m: x.tolist() for m, x in curve.icl_scores.items()},
                "patched_vs_icl": {c: d for c, d in cols}}
        finish("topk", md, data)

    groups = []
    if "multi" in parts:
        groups.append(("multi", names, args.n_select, args.budget))
    if "tasks" in parts:
        groups += [(t, [t], args.task_select, args.task_budget) for t in names]
    if groups:
        rows, found_all = [], {}
        for group, g_tasks, n_sel, budget in groups:
            sel = concat([canvases(t, n_sel, examples="masked", seed=args.seed + 2000, split="train") for t in g_tasks])
            obj = V.CanvasPatch(model, sel, stats)
            found = {m: _select(V, obj, space, m, budget, args) for m in methods}
            found_all[group] = found
            sub = obj_ev if group == "multi" else V.CanvasPatch(
                model, ev["masked"].select([i for i, t in enumerate(ev["masked"].tasks) if t in g_tasks]), stats)
            w = torch.stack([s.weights for s in found.values()] + [V.topk_pairs(rho, max(1, s.k)) for s in found.values()])
            sc = sub.scores(w)
            for j, (m, s) in enumerate(found.items()):
                for label, col in ((LABEL[m], j), (f"top-k ρ (k of {LABEL[m]})", len(found) + j)):
                    rows.append({"group": group, "method": label, "k": s.k, "evaluations": s.evaluations if col == j else 0,
                                 "seconds": s.seconds if col == j else 0.0,
                                 "scores": {met: {t: float(x[col]) for t, x in d.items()} for met, d in sc.items()}})
            say(f"selection [{group}] " + ", ".join(f"{m} k={s.k} {float(sc['accuracy']['mean'][j]):.3f} "
                                                   f"(top-k {float(sc['accuracy']['mean'][len(found) + j]):.3f})"
                                                   for j, (m, s) in enumerate(found.items())))
        md = []
        multi = [r for r in rows if r["group"] == "multi"]
        if multi:
            md += [f"### Selection at a limited budget, multi-task (one mask for all 8 tasks)",
                   f"Inside the top {args.candidates} pairs by ρ; {args.budget} mask evaluations per method (each one forward "
                   f"of {args.n_select} training canvases per task, {args.samples} masks per step / CMA-ES population); size "
                   f"penalty {args.sparsity} per pair (reward: mean log-likelihood of the cell's codes); REINFORCE lr "
                   f"{args.lr} from p = 0.5, GRS from a random half, CMA-ES from x = 0 (σ0 0.5). Held-out code accuracy "
                   f"({args.n_eval} no-example canvases per task), and the task means of exact and changed.",
                   _md(["method", "k", "evals", *names, "mean code", "mean exact", "mean changed"],
                       [[r["method"], str(r["k"]), str(r["evaluations"]), *[f"{r['scores']['accuracy'][t]:.3f}" for t in names],
                         f"**{r['scores']['accuracy']['mean']:.3f}**", f"{r['scores']['exact']['mean']:.3f}",
                         f"{r['scores']['changed']['mean']:.3f}"] for r in multi])]
        per = [r for r in rows if r["group"] != "multi"]
        if per:
            by = {(r["group"], r["method"]): r for r in per}
            head = ["task"]
            for m in methods:
                head += [f"{LABEL[m]} k", f"{LABEL[m]} code", "top-k ρ code", "Δ"]
            body = []
            for t in names:
                line = [t]
                for m in methods:
                    a, b = by[t, LABEL[m]], by[t, f"top-k ρ (k of {LABEL[m]})"]
                    x, y = a["scores"]["accuracy"][t], b["scores"]["accuracy"][t]
                    line += [str(a["k"]), f"{x:.3f}", f"{y:.3f}", f"{100 * (x - y):+.1f}"]
                body.append(line)
            mean = ["**mean**"]
            for m in methods:
                ks_ = [by[t, LABEL[m]]["k"] for t in names]
                x = sum(by[t, LABEL[m]]["scores"]["accuracy"][t] for t in names) / len(names)
                y = sum(by[t, f"top-k ρ (k of {LABEL[m]})"]["scores"]["accuracy"][t] for t in names) / len(names)
                mean += [f"{sum(ks_) / len(ks_):.0f}", f"**{x:.3f}**", f"{y:.3f}", f"{100 * (x - y):+.1f}"]
            body.append(mean)
            md += [f"### Selection at a limited budget, per task (one mask per task)",
                   f"As above, {args.task_budget} evaluations per method and task, each one forward of {args.task_select} "
                   f"training canvases of the task; held-out code accuracy ({args.n_eval} canvases); Δ = method − top-k ρ "
                   "of the same k, in points.", _md(head, body)]
            md += ["Exact-cell and changed-code accuracy of the same per-task selections:",
                   _md(["task", *[f"{LABEL[m]} exact / changed" for m in methods],
                        *[f"top-k ({LABEL[m]}) exact / changed" for m in methods]],
                       [[t, *[" / ".join(f"{by[t, LABEL[m]]['scores'][met][t]:.3f}" for met in ("exact", "changed"))
                              for m in methods],
                         *[" / ".join(f"{by[t, f'top-k ρ (k of {LABEL[m]})']['scores'][met][t]:.3f}" for met in ("exact", "changed"))
                           for m in methods]] for t in names])]
        part = "+".join(p for p in ("multi", "tasks") if p in parts) + (f"_{args.tag}" if args.tag else "")
        if args.masks:  # the selected masks, e.g. for pictures
            torch.save({g: {m: s.weights.bool() for m, s in f.items()} for g, f in found_all.items()}, args.masks)
        finish(part, md, {"rows": rows})

    if "figures" in parts:
        figures(model, V, stats, rho, ev, obj_ev, args, t0)


def figures(model, V, stats, rho, ev, obj_ev, args, t0) -> None:
    """The visual figures and the study page, from the measured tables (no selection is re-run)."""
    from tvlens.inputs.canvas import canvases, concat

    top = json.loads(Path(args.out, "measured_topk.json").read_text())
    multi = json.loads(Path(args.out, "measured_multi.json").read_text())
    masks = torch.load(args.masks)["multi"]
    names = list(V.VISUAL_TASKS)
    T = top["tasks"]
    ten = lambda d: {m: torch.tensor(v) for m, v in d.items()}  # noqa: E731
    curve = V.TopkCurve(tuple(top["ks"]), tuple(T), {k: ten(d) for k, d in top["values"].items()}, ten(top["baseline"]),
                        ten(top["icl"]), {"n_random": top["settings"]["n_random"], "n_canvases": len(obj_ev)})
    small = V.CanvasPatch(model, concat([canvases(t, 4, examples="masked", seed=args.seed + 1000) for t in names]), stats)
    heads = V.head_effects(small, rho)
    kstar = int(top["k_star"])
    arith = [V.task_arithmetic(model, stats, a, b, c, V.topk_pairs(rho, kstar)) for a, b, c in
             (("hflip", "invert", "gray"), ("recolor", "segment", "gray"))]
    # one canvas per task: ICL (clean and noisy), patched by each method, no example, truth
    pick = [i for t in names for i in [j for j, tt in enumerate(ev["masked"].tasks) if tt == t][:1]]
    blank = ev["masked"].select(pick)
    shown = ev["shown"].select(pick)
    noisy = concat([canvases(t, 1, seed=args.seed + 1000, noise=args.noise) for t in names])
    pic = V.CanvasPatch(model, blank, stats)
    order = [m for m in METHODS if m in masks]
    w = torch.stack([torch.zeros(pic.shape), V.topk_pairs(rho, kstar)] + [masks[m].float() for m in order])
    pred = pic.predictions(w)
    cols = {"1-shot ICL": (shown, V._icl_scores(model, shown)[0]),
            f"ICL, noise {args.noise}": (noisy, V._icl_scores(model, noisy)[0]),
            "no example": (blank, pred[:, 0]), f"top-{kstar} ρ": (blank, pred[:, 1]),
            **{f"{LABEL[m]} k={int(masks[m].sum())}": (blank, pred[:, 2 + j]) for j, m in enumerate(order)},
            "truth": (shown, None)}
    figs = {"visual_rho_heads": rho.plot(), "visual_rho_canvas": rho.plot_canvas(), "visual_rho_layers": rho.plot_layers(),
            "visual_topk": curve.plot("accuracy"), "visual_topk_exact": curve.plot("exact"),
            "visual_topk_changed": curve.plot("changed"), "visual_heads": heads.plot(),
            "visual_canvases": V.canvas_pictures(cols, rows=1, title="Held-out canvases: ICL, patched without examples "
                                                 "(multi-task masks), no example, truth")}
    for i, a in enumerate(arith):
        figs[f"visual_arithmetic_{i}"] = a.plot(rows=2)
    scores = lambda d: {m: dict(zip(T, d[m])) for m in V.SCORES}  # noqa: E731
    icl, base = scores(top["icl"]), scores(top["baseline"])
    noisy_icl = next(v for c, v in top["patched_vs_icl"].items() if c.startswith("1-shot ICL"))
    baselines = {"1-shot ICL": icl["accuracy"], "masked example": base["accuracy"], f"ICL noise {args.noise}": noisy_icl["accuracy"]}
    exact = {"1-shot ICL": icl["exact"], "masked example": base["exact"], f"ICL noise {args.noise}": noisy_icl["exact"]}
    changed = {"1-shot ICL": icl["changed"], "masked example": base["changed"], f"ICL noise {args.noise}": noisy_icl["changed"]}
    comparison = [{"method": r["method"], "group": r["group"], "k": r["k"], "evaluations": r["evaluations"],
                   "acc": r["scores"]["accuracy"]} for r in multi["rows"]]
    st = multi["settings"]
    from tvlens.models import ModelInfo

    mi = ModelInfo.of(model)
    settings = {"model": mi.name, "config_hash": mi.config_hash, "shape": f"{mi.n_layers} layers × {mi.n_heads} heads, "
                f"d_model {mi.d_model}", "n_means": st["n_means"], "n_select": st["n_select"], "n_eval": st["n_eval"],
                "ks": top["ks"], "candidates": st["candidates"], "budget": st["budget"], "task_budget": st["task_budget"],
                "samples": st["samples"], "lr": st["lr"], "sparsity": st["sparsity"], "noise": args.noise, "seed": args.seed,
                "best_k": kstar, "command": f"{top['command']}; {multi['command']}"}
    study = V.VisualStudy(tuple(names), baselines, exact, changed, rho, curve, heads, comparison, {}, arith, figs, settings,
                          top["seconds"] + multi["seconds"])
    out = Path(args.figures)
    written = [study.to_html(out / "visual.html"), *study.save_figures(out)]
    for p in written:
        print(f"{p}  {p.stat().st_size / 1e3:.0f} kB")


if __name__ == "__main__":
    main()
