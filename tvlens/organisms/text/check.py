"""Check script for a trained organism: the measurements the model card reports.

    python -m tvlens.organisms.text.check --model DIR_OR_NAME [--out metrics.json] [--figures figures/]

Everything is measured through the tvlens path (``load_model`` → TransformerLens bridge,
``icl_prompts`` / ``evaluate_prompts``), on fresh prompts whose queries come from the *test*
split (demonstrations from the train split):

* per-task and per-family first-token accuracy at 0, 1, 2, 3, 5 and 8 shots (and instruction-only);
* the zero-shot *chance* baseline: for each test query, the fraction of suite tasks having that
  input whose answer starts like the true answer (guessing the task among those that share the query);
* Hendel et al. 2023 task vectors, layer by layer: the final-separator residual
  ``blocks.L.hook_resid_pre`` **averaged over 50 five-shot prompts with dummy queries** replaces
  the last-position residual of zero-shot prompts of the same task at the same layer;
* the cross-task control: task A's vector on the zero-shot queries of another task B (a task of
  the same input domain when there is one), scored against B's answers (low = the vector
  carries task A) and against A's answers where A is defined on B's queries;
* Todd et al. 2024-style *add* vectors: (task mean − mean over all tasks) of the same states,
  added to the zero-shot residual at layer L.

The same Hendel and add curves are also measured through the task-vector API,
:func:`tvlens.vectors.activation.layer_sweep` (best layer chosen on the dev split, accuracy reported on the test
split, with its own zero-shot and ICL baselines); the script's own loop above, written with only the
public prompt/hook helpers, is kept as an independent check of that API: the two must agree.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

SHOTS = (0, 1, 2, 3, 5, 8)


def _last_pos_hook(store: dict, name: str):
    def fn(resid, hook):
        store[name] = resid[:, -1].detach().float().cpu()
        return resid

    return fn


def _replace_hook(vec: torch.Tensor):
    def fn(resid, hook):
        resid = resid.clone()
        resid[:, -1] = vec.to(resid.dtype).to(resid.device)
        return resid

    return fn


def _add_hook(vec: torch.Tensor):
    def fn(resid, hook):
        resid = resid.clone()
        resid[:, -1] = resid[:, -1] + vec.to(resid.dtype).to(resid.device)
        return resid

    return fn


def _first_token_acc(model, batch, fwd_hooks=(), answer_ids=None) -> float:
    from tvlens.hooks import run

    correct = []
    with torch.no_grad():
        for i in range(0, len(batch), 64):
            chunk = batch.slice(i, i + 64)
            logits = run(model, chunk.tokens, attention_mask=chunk.attention_mask, fwd_hooks=list(fwd_hooks))
            pred = logits[:, -1].argmax(-1).cpu()
            tgt = (answer_ids if answer_ids is not None else batch.answer_ids)[i : i + 64].cpu()
            correct.append(pred == tgt)
    return torch.cat(correct).float().mean().item()


def _separator_states(model, batch) -> torch.Tensor:
    """[layer, batch, d_model] final-separator resid_pre at every layer."""
    from tvlens.hooks import act_name, run

    n_layers = model.cfg.n_layers
    names = [act_name("resid_pre", l) for l in range(n_layers)]
    outs = []
    with torch.no_grad():
        for i in range(0, len(batch), 64):
            chunk = batch.slice(i, i + 64)
            store: dict = {}
            run(model, chunk.tokens, attention_mask=chunk.attention_mask, fwd_hooks=[(n, _last_pos_hook(store, n)) for n in names])
            outs.append(torch.stack([store[n] for n in names]))
    return torch.cat(outs, dim=1)


def _first_word_answer_ids(tokenizer, answers) -> torch.Tensor:
    ids = []
    for a in answers:
        t = tokenizer(a, add_special_tokens=False)["input_ids"]
        ids.append(t[0])
    return torch.tensor(ids)


def check(model_name: str, *, n_prompts: int = 50, seed: int = 0, verbose: bool = True) -> dict[str, Any]:
    from tvlens.hooks import act_name
    from tvlens.models import load_model
    from tvlens.inputs.text import evaluate_prompts, icl_prompts
    from tvlens.tasks import list_tasks, load_task

    t0 = time.time()
    torch.manual_seed(0)
    model = load_model(model_name, device="cpu")
    tok = model.tokenizer
    n_layers = model.cfg.n_layers
    tasks = [load_task(n) for n in list_tasks()]
    by_name = {t.name: t for t in tasks}

    def say(msg):
        if verbose:
            print(f"[{time.time() - t0:6.1f}s] {msg}", flush=True)

    # ---- accuracy vs shots ---------------------------------------------------------------------
    acc: dict[str, dict[str, float]] = {}
    full: dict[str, dict[str, float]] = {}
    for t in tasks:
        acc[t.name], full[t.name] = {}, {}
        for k in SHOTS:
            r = evaluate_prompts(model, icl_prompts(model, t, n_prompts=n_prompts, n_shots=k, seed=seed), batch_size=64)
            acc[t.name][str(k)] = r.first_token
            full[t.name][str(k)] = r.full_answer
        r = evaluate_prompts(model, icl_prompts(model, t, n_prompts=n_prompts, n_shots=0, seed=seed, instruction="only"), batch_size=64)
        acc[t.name]["instruction_only"] = r.first_token
    say("accuracy vs shots done")

    # ---- zero-shot chance among tasks sharing the query ---------------------------------------
    inputs_to: dict[str, list[tuple[str, str]]] = defaultdict(list)
    for t in tasks:
        for x, y in t.pairs:
            inputs_to[x].append((t.name, y))
    chance: dict[str, float] = {}
    for t in tasks:
        vals = []
        for x, y in t.split("test"):
            cands = {}
            for name, yy in inputs_to[x]:
                cands.setdefault(name, yy)
            first = y.split()[0]
            vals.append(sum(yy.split()[0] == first for yy in cands.values()) / len(cands))
        chance[t.name] = sum(vals) / len(vals)

    # ---- task vectors: Hendel replace, Todd-style add, cross-task -------------------------------
    tv = {}
    zs = {}
    icl5 = {}
    for i, t in enumerate(tasks):
        dummy = icl_prompts(model, t, n_prompts=n_prompts, n_shots=5, seed=seed + 1, dummy_query=True)
        tv[t.name] = _separator_states(model, dummy).mean(dim=1)  # [layer, d_model]
        zs[t.name] = icl_prompts(model, t, n_prompts=n_prompts, n_shots=0, seed=seed + 2)
        icl5[t.name] = evaluate_prompts(model, icl_prompts(model, t, n_prompts=n_prompts, n_shots=5, seed=seed + 2), batch_size=64).first_token
    say("task-vector means done")
    all_mean = torch.stack(list(tv.values())).mean(0)  # [layer, d_model]
    hendel = {t.name: [] for t in tasks}
    add = {t.name: [] for t in tasks}
    for t in tasks:
        for l in range(n_layers):
            name = act_name("resid_pre", l)
            hendel[t.name].append(_first_token_acc(model, zs[t.name], [(name, _replace_hook(tv[t.name][l]))]))
            add[t.name].append(_first_token_acc(model, zs[t.name], [(name, _add_hook(tv[t.name][l] - all_mean[l]))]))
    say("Hendel and add curves done")

    # cross-task: for task B, the vector of task A (same domain if possible, else the next task)
    names = [t.name for t in tasks]
    partner = {}
    for j, b in enumerate(tasks):
        same = [a.name for a in tasks if a.domain == b.domain and a.name != b.name]
        partner[b.name] = same[0] if same else names[(j + 1) % len(names)]
    cross_vs_b = {b: [] for b in names}
    cross_vs_a = {b: [] for b in names}
    cross_vs_b_diff = {b: [] for b in names}  # only queries where A's and B's answers start differently
    for b in names:
        a = partner[b]
        zb = zs[b]
        a_pairs = dict(by_name[a].pairs)
        # A's answers on B's queries, where A is defined on them
        rows = [i for i, q in enumerate(zb.queries) if q in a_pairs]
        a_ids = _first_word_answer_ids(tok, [a_pairs[zb.queries[i]] for i in rows]) if rows else None
        diff = [i for i, r in enumerate(rows) if int(a_ids[i]) != int(zb.answer_ids[r])] if rows else []
        diff_rows = [rows[i] for i in diff]
        for l in range(n_layers):
            name = act_name("resid_pre", l)
            hooks = [(name, _replace_hook(tv[a][l]))]
            cross_vs_b[b].append(_first_token_acc(model, zb, hooks))
            if rows:
                sub = zb.select(rows)
                cross_vs_a[b].append(_first_token_acc(model, sub, hooks, answer_ids=a_ids))
            if diff_rows:
                cross_vs_b_diff[b].append(_first_token_acc(model, zb.select(diff_rows), hooks))
    say("cross-task control done")

    # the same curves through the task-vector API (Hendel's protocol: dev selects, test reports)
    from tvlens.vectors.activation import layer_sweep

    api = {}
    for key, kw in (("replace", {}), ("add_centered", {"mode": "add", "center": True})):
        sw = layer_sweep(model, tasks, n_prompts=n_prompts, n_shots=5, seed=seed, **kw)
        summ = sw.summary()["all"]
        api[key] = {"best_layer_dev": sw.best_layer, "test_by_layer": [float(v) for v in sw.curve("test")],
                    "at_best_layer_test": float(sw.curve("test")[sw.layers.index(sw.best_layer)]),
                    "icl_test": summ["icl"], "zero_shot_test": summ["zero_shot"],
                    "fraction_of_icl": float(sw.curve("test")[sw.layers.index(sw.best_layer)]) / summ["icl"]}
    say("task-vector API sweeps done")

    def mean(xs):
        xs = list(xs)
        return sum(xs) / len(xs) if xs else float("nan")

    families = sorted({t.family for t in tasks})
    fam_of = {t.name: t.family for t in tasks}
    per_family = {
        f: {k: mean(acc[n][k] for n in names if fam_of[n] == f) for k in [*map(str, SHOTS), "instruction_only"]}
        | {"chance_0shot": mean(chance[n] for n in names if fam_of[n] == f), "n_tasks": sum(fam_of[n] == f for n in names)}
        for f in families
    }
    hendel_mean = [mean(hendel[n][l] for n in names) for l in range(n_layers)]
    add_mean = [mean(add[n][l] for n in names) for l in range(n_layers)]
    cross_b_mean = [mean(cross_vs_b[n][l] for n in names) for l in range(n_layers)]
    cross_a_mean = [mean(cross_vs_a[n][l] for n in names if cross_vs_a[n]) for l in range(n_layers)]
    cross_bd_mean = [mean(cross_vs_b_diff[n][l] for n in names if cross_vs_b_diff[n]) for l in range(n_layers)]
    icl5_mean = mean(icl5.values())
    zs_mean_tv = mean(_first_token_acc(model, zs[n]) for n in names)
    # layer 0 is excluded: there the final-separator state is the embedding of "→", the same in every
    # prompt, so replacing it by its mean (or adding task mean − all mean = 0) changes nothing.
    cand = range(1, n_layers) if n_layers > 1 else range(n_layers)
    best = max(cand, key=lambda l: hendel_mean[l])
    best_add = max(cand, key=lambda l: add_mean[l])
    result = {
        "model": str(model_name),
        "n_prompts": n_prompts,
        "seed": seed,
        "n_tasks": len(names),
        "shots": list(SHOTS),
        "mean_by_shots": {str(k): mean(acc[n][str(k)] for n in names) for k in SHOTS},
        "mean_full_answer_by_shots": {str(k): mean(full[n][str(k)] for n in names) for k in SHOTS},
        "mean_instruction_only": mean(acc[n]["instruction_only"] for n in names),
        "mean_chance_0shot": mean(chance.values()),
        "min_5shot": min(acc[n]["5"] for n in names),
        "min_5shot_task": min(names, key=lambda n: acc[n]["5"]),
        "per_family": per_family,
        "per_task": {n: {**acc[n], "chance_0shot": chance[n], "family": fam_of[n]} for n in names},
        "task_vectors": {
            "icl_5shot_mean": icl5_mean,
            "zero_shot_mean": zs_mean_tv,
            "hendel_by_layer": hendel_mean,
            "hendel_best_layer": best,
            "hendel_best": hendel_mean[best],
            "hendel_best_fraction_of_icl": hendel_mean[best] / icl5_mean if icl5_mean else float("nan"),
            "add_by_layer": add_mean,
            "add_best_layer": best_add,
            "add_best": add_mean[best_add],
            "add_best_fraction_of_icl": add_mean[best_add] / icl5_mean if icl5_mean else float("nan"),
            "cross_task_vs_own_answers_by_layer": cross_b_mean,
            "cross_task_vs_vector_task_answers_by_layer": cross_a_mean,
            "cross_task_vs_own_answers_where_answers_differ_by_layer": cross_bd_mean,
            "cross_partner": partner,
            "hendel_per_task_by_layer": hendel,
            "add_per_task_by_layer": add,
            "icl_5shot_per_task": icl5,
            "api_layer_sweep": api,
        },
        "seconds": round(time.time() - t0, 1),
    }
    say(f"done: 5-shot {result['mean_by_shots']['5']:.3f}, 0-shot {result['mean_by_shots']['0']:.3f}, "
        f"Hendel best L{best} {hendel_mean[best]:.3f} ({result['task_vectors']['hendel_best_fraction_of_icl']:.2f} of ICL), "
        f"add best L{best_add} {add_mean[best_add]:.3f}, cross {cross_b_mean[best]:.3f}")
    return result


def markdown(results: dict[str, dict]) -> str:
    """Model-card tables for one or more organisms' check results ({label: result})."""
    lines = []
    labels = list(results)
    lines.append("| metric | " + " | ".join(labels) + " |")
    lines.append("|---|" + "---|" * len(labels))

    def row(name, f):
        lines.append(f"| {name} | " + " | ".join(f(results[l]) for l in labels) + " |")

    for k in SHOTS:
        row(f"{k}-shot first-token accuracy (mean over tasks)", lambda r, k=k: f"{r['mean_by_shots'][str(k)]:.3f}")
    row("5-shot full-answer accuracy", lambda r: f"{r['mean_full_answer_by_shots']['5']:.3f}")
    row("worst task at 5 shots", lambda r: f"{r['min_5shot']:.2f} ({r['min_5shot_task']})")
    row("instruction only (0 shots)", lambda r: f"{r['mean_instruction_only']:.3f}")
    row("zero-shot chance (guess among tasks sharing the query)", lambda r: f"{r['mean_chance_0shot']:.3f}")
    row("Hendel task vector, best layer", lambda r: f"{r['task_vectors']['hendel_best']:.3f} at L{r['task_vectors']['hendel_best_layer']} "
        f"({100 * r['task_vectors']['hendel_best_fraction_of_icl']:.0f}% of ICL)")
    row("add (task mean − all mean), best layer", lambda r: f"{r['task_vectors']['add_best']:.3f} at L{r['task_vectors']['add_best_layer']} "
        f"({100 * r['task_vectors']['add_best_fraction_of_icl']:.0f}% of ICL)")
    row("cross-task: A's vector on B's queries, scored vs B's answers, at Hendel best layer",
        lambda r: f"{r['task_vectors']['cross_task_vs_own_answers_by_layer'][r['task_vectors']['hendel_best_layer']]:.3f}")
    row("  … only queries where A's and B's answers differ",
        lambda r: f"{r['task_vectors'].get('cross_task_vs_own_answers_where_answers_differ_by_layer', [float('nan')] * 99)[r['task_vectors']['hendel_best_layer']]:.3f}")
    row("  … scored vs A's answers (the vector carries A)",
        lambda r: f"{r['task_vectors']['cross_task_vs_vector_task_answers_by_layer'][r['task_vectors']['hendel_best_layer']]:.3f}")
    if all("api_layer_sweep" in results[l]["task_vectors"] for l in labels):
        for key, what in (("replace", "Hendel replace"), ("add_centered", "add (task − all mean)")):
            row(f"`tvlens.layer_sweep`, {what}: best layer on dev → test accuracy",
                lambda r, key=key: (lambda a: f"{a['at_best_layer_test']:.3f} at L{a['best_layer_dev']} "
                                              f"({100 * a['fraction_of_icl']:.0f}% of ICL {a['icl_test']:.3f})")(
                    r["task_vectors"]["api_layer_sweep"][key]))
    lines.append("")
    # layer curves
    for l in labels:
        tvr = results[l]["task_vectors"]
        n = len(tvr["hendel_by_layer"])
        lines.append(f"**{l}** layer curves (zero-shot prompts, first-token accuracy; 5-shot ICL {tvr['icl_5shot_mean']:.3f}, zero-shot {tvr['zero_shot_mean']:.3f}):")
        lines.append("")
        lines.append("| layer L (`blocks.L.hook_resid_pre`) | " + " | ".join(str(i) for i in range(n)) + " |")
        lines.append("|---|" + "---|" * n)
        lines.append("| Hendel replace | " + " | ".join(f"{v:.3f}" for v in tvr["hendel_by_layer"]) + " |")
        lines.append("| add (task − all mean) | " + " | ".join(f"{v:.3f}" for v in tvr["add_by_layer"]) + " |")
        for key, what in (("replace", "Hendel replace"), ("add_centered", "add (task − all mean)")):
            if key in tvr.get("api_layer_sweep", {}):
                lines.append(f"| {what} via `tvlens.layer_sweep` (test split) | "
                             + " | ".join(f"{v:.3f}" for v in tvr["api_layer_sweep"][key]["test_by_layer"]) + " |")
        lines.append("| cross-task, scored vs B's answers | " + " | ".join(f"{v:.3f}" for v in tvr["cross_task_vs_own_answers_by_layer"]) + " |")
        lines.append("| cross-task, scored vs B's answers, queries where A's and B's answers differ | " + " | ".join(f"{v:.3f}" for v in tvr.get("cross_task_vs_own_answers_where_answers_differ_by_layer", [])) + " |")
        lines.append("| cross-task, scored vs A's answers (A defined on B's query) | " + " | ".join(f"{v:.3f}" for v in tvr["cross_task_vs_vector_task_answers_by_layer"]) + " |")
        lines.append("")
    # per family
    for l in labels:
        r = results[l]
        lines.append(f"**{l}** per family (first-token accuracy, mean over the family's tasks):")
        lines.append("")
        lines.append("| family | tasks | " + " | ".join(f"{k}-shot" for k in SHOTS) + " | instruction only | 0-shot chance |")
        lines.append("|---|---|" + "---|" * (len(SHOTS) + 2))
        for f, v in r["per_family"].items():
            lines.append(f"| {f} | {v['n_tasks']} | " + " | ".join(f"{v[str(k)]:.2f}" for k in SHOTS)
                         + f" | {v['instruction_only']:.2f} | {v['chance_0shot']:.2f} |")
        lines.append("")
    return "\n".join(lines)


def figures(results: dict[str, dict], outdir: str | Path) -> list[Path]:
    from tvlens.plot import line_plot, save_figure

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    series = {}
    for l, r in results.items():
        series[f"{l}: mean"] = [r["mean_by_shots"][str(k)] for k in SHOTS]
        for f, v in r["per_family"].items():
            series[f"{l}: {f}"] = [v[str(k)] for k in SHOTS]
    fig = line_plot(list(SHOTS), series, title="Organism ICL accuracy vs number of shots (test-split queries)",
                    xlabel="shots", ylabel="first-token accuracy")
    paths += save_figure(fig, outdir / "organism_shots")
    series = {}
    hl = {}
    for l, r in results.items():
        tvr = r["task_vectors"]
        series[f"{l}: Hendel replace"] = tvr["hendel_by_layer"]
        series[f"{l}: add (task − all mean)"] = tvr["add_by_layer"]
        series[f"{l}: cross-task"] = tvr["cross_task_vs_own_answers_by_layer"]
        hl[f"{l} 5-shot ICL"] = tvr["icl_5shot_mean"]
    first = next(iter(results.values()))
    hl["zero-shot"] = first["task_vectors"]["zero_shot_mean"]
    n = len(first["task_vectors"]["hendel_by_layer"])
    fig = line_plot(list(range(n)), series, title="Task vectors by layer (zero-shot prompts patched at the final separator)",
                    xlabel="layer L (blocks.L.hook_resid_pre)", ylabel="first-token accuracy", hlines=hl)
    paths += save_figure(fig, outdir / "organism_task_vector_layers")
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m tvlens.organisms.text.check", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="organism name or checkpoint dir (repeatable)")
    p.add_argument("--out", default=None, help="JSON file for the metrics (default: <checkpoint>/metrics.json)")
    p.add_argument("--figures", default=None, help="directory for organism_shots / organism_task_vector_layers figures")
    p.add_argument("--markdown", default=None, help="write the model-card tables here")
    p.add_argument("--n-prompts", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    results = {}
    for m in a.model:
        label = Path(m).name if Path(m).exists() else m
        results[label] = r = check(m, n_prompts=a.n_prompts, seed=a.seed)
        out = Path(a.out) if a.out and len(a.model) == 1 else None
        if out is None:
            from tvlens.models import organism_path

            d = Path(m) if Path(m).is_dir() else organism_path(m)
            out = d / "metrics.json"
        out.write_text(json.dumps(r, indent=1))
        print(f"wrote {out}")
    if a.markdown:
        Path(a.markdown).write_text(markdown(results))
    if a.figures:
        for pth in figures(results, a.figures):
            print(f"wrote {pth}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
