"""Generate the tvlens notebooks (``notebooks/0*.ipynb``) from the cell lists below.

    python notebooks/make_notebooks.py          # rewrite every notebook, outputs stripped

Edit the cells here, not in the ``.ipynb`` files, so the notebooks stay reviewable and can be
regenerated. Every notebook runs top to bottom on the shipped model organism on a CPU in well
under a minute (small prompt counts); ``tests/test_notebooks.py`` executes them all.
The notebooks only call the public tvlens API: no analysis logic lives here.
"""

from __future__ import annotations

from pathlib import Path

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

HERE = Path(__file__).resolve().parent

SETUP = """\
import torch
import tvlens

torch.set_num_threads(2)  # small model, small batches: more threads only add overhead
model = tvlens.load_model("organism", device="cpu")  # the shipped model organism (offline)
tvlens.ModelInfo.of(model)"""

REFERENCES = {
    "hendel": "Hendel, Geva & Globerson 2023, *In-Context Learning Creates Task Vectors* (Findings of EMNLP 2023)",
    "todd": "Todd, Li, Sen Sharma, Mueller, Wallace & Bau 2024, *Function Vectors in Large Language Models* (ICLR 2024)",
    "hojel": "Hojel, Bai, Darrell, Globerson & Bar 2024, *Finding Visual Task Vectors* (ECCV 2024)",
    "luo": "Luo, Darrell & Bar 2024, *Task Vectors are Cross-Modal*",
    "logit_lens": "nostalgebraist 2020, *interpreting GPT: the logit lens* (LessWrong)",
    "nanda": "Nanda 2023, *Attribution Patching: Activation Patching At Industrial Scale*",
    "syed": "Syed, Rager & Conmy 2023, *Attribution Patching Outperforms Automated Circuit Discovery*",
    "ilharco": "Ilharco et al. 2023, *Editing Models with Task Arithmetic* (ICLR 2023)",
    "newsom": "J. Newsom, the `task_vectors` package (soft per-head task weights)",
}


def cite(*keys: str) -> str:
    return "\n".join(f"- {REFERENCES[k]}" for k in keys)


NOTEBOOKS: dict[str, list[tuple[str, str]]] = {}

# ----------------------------------------------------------------------------------------------
NOTEBOOKS["01_quickstart"] = [
    ("md", f"""\
# tvlens quickstart

When a transformer reads in-context examples (`france → paris`, `japan → tokyo`, …) it forms a compact
internal representation of the task — a **task vector** — at the final separator token. Patch that vector into a
zero-shot prompt and the model performs the task without any examples (Hendel et al. 2023); sum the outputs of a
few attention heads and you get a **function vector** (Todd et al. 2024); score every head by how much its output
varies *between* tasks compared with *within* a task and you find where the task lives (ρ_token, Hojel et al. 2024).

This notebook loads the shipped **model organism** (a small Llama-shaped transformer trained on the tvlens task
suite, so everything runs offline on a CPU), measures its in-context-learning accuracy and draws the
layers × heads taskness heatmap.

{cite("hendel", "todd", "hojel", "luo")}"""),
    ("code", SETUP),
    ("md", "## Tasks and prompts\n\nThe suite has four families (as in Hendel et al. §4.1). `resolve_tasks` accepts names, `family:<name>` or `all`."),
    ("code", """\
for family in ("knowledge", "linguistic", "translation", "algorithmic"):
    print(f"{family:>12}: {', '.join(tvlens.list_tasks(family))}")
task = tvlens.load_task("country_capital")
task, task.instruction, task.pairs[:4]"""),
    ("code", """\
batch = tvlens.icl_prompts(model, task, n_prompts=4, n_shots=3, seed=0)
print(batch.texts[0])
print("answer:", batch.answers[0])"""),
    ("md", "## In-context learning accuracy\n\nFirst-token accuracy with 0 and 5 demonstrations: the gap is what a task vector has to carry."),
    ("code", """\
for name in ["country_capital", "antonym", "english_french", "next_letter"]:
    zero = tvlens.evaluate_icl(model, name, 0, n_prompts=24)
    five = tvlens.evaluate_icl(model, name, 5, n_prompts=24)
    print(f"{name:>16}: zero-shot {zero.first_token:.2f}   5-shot {five.first_token:.2f}")"""),
    ("md", """\
## Which heads know the task? (ρ_token)

For each head, ρ = (variance of its output pooled over all tasks) / (mean within-task variance), at the final
separator (Hojel et al. 2024, §3). ρ ≈ 1: the head does not tell the tasks apart; large ρ: it encodes the task.
Hover over a cell for layer, head and value."""),
    ("code", """\
tasks = tvlens.resolve_tasks("country_capital,country_language,antonym,past_tense,english_french,next_letter")
rho = tvlens.taskness(model, tasks, n_prompts=24, n_shots=5)
print(rho.top(5))
rho.plot()"""),
    ("md", """\
## The same code on a real model

Every function takes any model loaded by `tvlens.load_model` — `"gpt2"`, `"EleutherAI/pythia-70m"`, a Llama or
Qwen checkpoint by hub name or local folder. This cell needs the internet (or the model in the Hugging Face
cache); offline it prints why it was skipped. The prompts need no change: `" →"` is one token of GPT-2's
vocabulary (id 15168), so the separator is a token of its own there as in the organism."""),
    ("code", """\
try:
    gpt2 = tvlens.load_model("gpt2", device="cpu")
except (ValueError, OSError) as err:  # offline: no network and not in the Hugging Face cache
    gpt2 = None
    print(f"Skipped the gpt2 section (it needs the internet or a cached copy): {err}")

if gpt2 is not None:
    print(tvlens.ModelInfo.of(gpt2))
    print("' →' is", gpt2.tokenizer(" →")["input_ids"], "in GPT-2's vocabulary")
    acc = tvlens.evaluate_icl(gpt2, "country_capital", 5, n_prompts=16)
    print(f"gpt2 country_capital 5-shot accuracy: {acc.first_token:.2f}")
    gpt2_rho = tvlens.taskness(gpt2, ["country_capital", "country_language", "antonym"], n_prompts=8)
    display(gpt2_rho.plot())"""),
    ("md", "Next: `02_taskness` (per-position scores and a causal check), `03_logit_lens`, `04_task_and_function_vectors`, `05_patching`, `06_selection`."),
]

# ----------------------------------------------------------------------------------------------
NOTEBOOKS["02_taskness"] = [
    ("md", f"""\
# Taskness: per head, per position, and does it mean anything?

Hojel et al. (2024) find task vectors by scoring each activation with

ρ(i) = Σ_e Var(h_all^i[e]) / ( (1/n) Σ_j Σ_e Var(h_task_j^i[e]) ),

the variance of activation *i* pooled over the prompts of all *n* tasks over its average within-task variance.
tvlens computes it from streaming per-task means and variances of every head's output (`hook_z`), the same
task-mean head outputs Todd et al. (2024) patch. Then we check the score causally: patching the **top-k ρ heads'**
task means into zero-shot prompts should restore more accuracy than patching k random heads.

{cite("hojel", "todd")}"""),
    ("code", SETUP),
    ("code", """\
tasks = tvlens.resolve_tasks("country_capital,country_language,country_currency,antonym,english_french,english_german")
stats = tvlens.head_means(model, tasks, n_prompts=24, n_shots=5, positions="final")
stats"""),
    ("code", """\
rho = tvlens.taskness(stats)
rho.top(8)"""),
    ("md", "Blocks on x and heads on y, the orientation of Hojel et al.'s figures:"),
    ("code", "rho.plot(transpose=True)"),
    ("md", "## Per position\n\nWith `positions=\"all\"` every token position (aligned from the right: −1 is the final separator) is scored; a head's score is the mean of its token scores."),
    ("code", """\
stats_all = tvlens.head_means(model, tasks[:4], n_prompts=12, n_shots=3, positions="all")
rho_all = tvlens.taskness(stats_all)
rho_all.plot_positions()"""),
    ("md", "## Validation: top-ρ heads vs random heads\n\nTask means of the top-k heads are patched into zero-shot prompts at the final position (random heads: mean of several draws)."),
    ("code", """\
from tvlens.analyses.taskness import validate_taskness

check = validate_taskness(model, rho, stats, ks=(2, 4, 8), n_random=4, n_prompts=16)
print(check.summary())
check.plot()"""),
    ("md", "Every result has `.to_frame()` (pandas): the scores per head, the statistics per task × head."),
    ("code", """\
display(rho.to_frame().sort_values("score", ascending=False).head(8))
stats.to_frame().head()"""),
]

# ----------------------------------------------------------------------------------------------
NOTEBOOKS["03_logit_lens"] = [
    ("md", f"""\
# The logit lens at the separator

Decode the residual stream at the final separator with the model's own final norm and unembedding, layer by
layer. Luo, Darrell & Bar (2024) see three phases in ICL prompts: early layers decode to the **input**, middle
layers to words **describing the task** (for country → capital: "capital", "city"), late layers to the
**answer**. tvlens recomputes the final norm on each layer's residual (not the final layer's scale) and reports the
phases with the rule it used. The organism may or may not show a task-word phase: look, don't assume.

{cite("luo", "logit_lens")}"""),
    ("code", SETUP),
    ("code", """\
lens = tvlens.logit_lens(model, "country_capital", n_prompts=24, n_shots=5, top_k=8)
print(lens.phases())
print(lens.to_markdown(k=5))"""),
    ("code", "lens.plot()"),
    ("md", "Track your own task words instead of the instruction's words:"),
    ("code", """\
custom = tvlens.logit_lens(model, "country_capital", n_prompts=24, task_words=["capital", "city", "country"])
custom.phases(), custom.curve("task", "prob")"""),
    ("md", "## One summary for several tasks\n\n`lens_summary` runs the lens on each task and (with `out=`) writes one HTML page; `.text()` is the table."),
    ("code", """\
summary = tvlens.lens_summary(model, ["country_capital", "antonym", "english_french", "next_letter"], n_prompts=16)
print(summary.text())"""),
    ("md", "## Decoding a vector\n\n`decode` reads any residual-stream vector the same way — here the mean output `z̄ @ W_O` of the head with the highest ρ_token."),
    ("code", """\
tasks = ["country_capital", "country_language", "antonym", "english_french"]
stats = tvlens.head_means(model, tasks, n_prompts=24)
layer, head, score = tvlens.taskness(stats).top(1)[0]
z_mean = stats.mean("country_capital")[layer, head].float()     # [d_head] (stats are kept in float64)
out = z_mean @ model.W_O[layer, head].detach()                   # [d_model]: the head's contribution
print(f"L{layer}H{head} (rho {score:.2f}) decodes to:", [(t, round(p, 4)) for t, p in tvlens.decode(model, out, top_k=8)])"""),
]

# ----------------------------------------------------------------------------------------------
NOTEBOOKS["04_task_and_function_vectors"] = [
    ("md", f"""\
# Task vectors and function vectors

- **Task vector** (Hendel et al. 2023): average the residual stream entering block L at the final separator of
  few-shot prompts (with a *dummy* query), then *replace* that state in zero-shot prompts. A sweep over L, with the
  best layer chosen on a dev split and reported on a test split, shows where the task is formed.
- **Function vector** (Todd et al. 2024): the causal indirect effect (CIE) of each head — how much patching its
  task-mean output into shuffled-label prompts raises the answer's probability — picks the top heads; the sum of
  their mean outputs is *added* to the residual stream.
- **Instruction vectors and ensembles** (Luo et al. 2024): the same read-out from prompts holding only the task's
  instruction, alone or averaged with exemplar vectors.
- **Arithmetic**: vectors of one model and layer add, subtract and average (the activation-space analogue of
  Ilharco et al.'s task arithmetic).

{cite("hendel", "todd", "luo", "ilharco")}"""),
    ("code", SETUP),
    ("md", "## Layer sweep"),
    ("code", """\
tasks = ["country_capital", "antonym", "english_french", "next_letter"]
sweep = tvlens.layer_sweep(model, tasks, n_prompts=24, n_shots=5)
print(sweep.table("task"))
sweep.plot()"""),
    ("code", """\
from tvlens.vectors.activation import evaluate_vector

L = sweep.best_layer
tv = tvlens.task_vector(model, "country_capital", layer=L, n_prompts=24)
print(tv)
print("zero-shot accuracy with the task vector:", evaluate_vector(model, "country_capital", tv, n_prompts=24))
tvlens.decode(model, tv.vector, top_k=8)"""),
    ("md", "Apply a vector to your own prompts and read the logits:"),
    ("code", """\
batch = tvlens.icl_prompts(model, "country_capital", n_prompts=4, n_shots=0, seed=3)
logits = tvlens.apply_vector(model, batch, tv)          # replace mode at tv.layer
for query, answer, pred in zip(batch.queries, batch.answers, logits.argmax(-1)):
    print(f"{query:>12} -> {model.tokenizer.decode([int(pred)]).strip():<12} (answer: {answer})")"""),
    ("md", "## Function vector"),
    ("code", """\
fv = tvlens.function_vector(model, "country_capital", k=6, n_prompts=24, n_cie_prompts=12, n_shots=5)
print("top heads:", fv.top_heads)
fv.plot()"""),
    ("code", """\
info = tvlens.ModelInfo.of(model)
for layer in range(info.n_layers):
    acc = evaluate_vector(model, "country_capital", fv, n_prompts=24, layer=layer)
    print(f"function vector added at layer {layer}: accuracy {acc:.2f}")"""),
    ("md", "## Instruction vectors and ensembles"),
    ("code", """\
from tvlens.vectors.activation import ensemble

iv = tvlens.instruction_vector(model, "country_capital", layer=L, n_prompts=24)
both = ensemble([tv, iv])
for name, vec in [("exemplar (task) vector", tv), ("instruction vector", iv), ("ensemble", both)]:
    print(f"{name:>24}: {evaluate_vector(model, 'country_capital', vec, n_prompts=24):.2f}")"""),
    ("md", "## Arithmetic, and the checks that keep it honest"),
    ("code", """\
from tvlens.vectors.activation import mean

tv_lang = tvlens.task_vector(model, "country_language", layer=L, n_prompts=24)
mixed = mean([tv, tv_lang])
for task in ["country_capital", "country_language"]:
    print(f"{task:>17}: own vector {evaluate_vector(model, task, tv if task == 'country_capital' else tv_lang, n_prompts=24):.2f}"
          f"   mean of both {evaluate_vector(model, task, mixed, n_prompts=24):.2f}")
other_layer = tvlens.task_vector(model, "country_language", layer=(L + 1) % info.n_layers, n_prompts=8)
try:
    tv + other_layer
except ValueError as err:
    print("refused:", err)"""),
    ("md", "Vectors save to safetensors + JSON and refuse to load into another model:"),
    ("code", """\
import tempfile
from pathlib import Path

with tempfile.TemporaryDirectory() as tmp:
    path = tv.save(Path(tmp) / "country_capital_tv")
    again = tvlens.TaskVector.load(path, model)
    print(again, torch.equal(again.vector, tv.vector))"""),
]

# ----------------------------------------------------------------------------------------------
NOTEBOOKS["05_patching"] = [
    ("md", f"""\
# Activation patching: heads, positions, and attribution

Replace one component's activation in a *target* run with its value from a *source* and measure the answer:
the result says how much that component carries. The source can be another prompt batch (ICL → shuffled labels,
ICL → zero-shot) or task-mean activations (means-patching, as Todd et al. 2024 use for function vectors).
tvlens computes the same numbers as one forward per site, but runs the target once and recomputes only what a
patch can change. Attribution patching (Nanda 2023; Syed et al. 2023) linearises every patch with one backward pass.

{cite("todd", "nanda", "syed")}"""),
    ("code", SETUP),
    ("md", "## Means-patching every head into zero-shot prompts"),
    ("code", """\
task = "antonym"
zero_shot = tvlens.icl_prompts(model, task, n_prompts=12, n_shots=0, seed=1)
means = tvlens.head_means(model, [task], n_prompts=16, n_shots=5, split="train")
heads = tvlens.patch_heads(model, zero_shot, means, positions="final", metric="logprob")
print("unpatched log p(answer):", round(heads.target_value, 3))
print("top heads (layer, head, change):", [(l, h, round(v - heads.target_value, 3)) for l, h, v in heads.top(5)])
heads.plot()"""),
    ("md", "## Clean ICL → shuffled labels, per head and per position\n\nThe same queries and demonstrations, the labels of the demonstrations permuted (Todd et al.'s corrupted prompts); normalised: 0 = corrupted, 1 = clean."),
    ("code", """\
clean = tvlens.icl_prompts(model, task, n_prompts=8, n_shots=3, seed=2)
corrupted = tvlens.icl_prompts(model, task, n_prompts=8, n_shots=3, seed=2, shuffle_labels=True)
by_head = tvlens.patch_heads(model, corrupted, clean, metric="logit_diff", normalize=True)
by_head.plot()"""),
    ("code", """\
by_pos = tvlens.patch_positions(model, corrupted, clean, hook="resid_pre", metric="logit_diff", normalize=True)
by_pos.plot()"""),
    ("md", "## Attribution vs exact\n\nOne forward + backward gives every head's linear estimate; `confirm_top=\"all\"` re-runs the exact patches and reports the correlation."),
    ("code", """\
import time

t0 = time.perf_counter()
attr = tvlens.attribution_patch_heads(model, corrupted, clean, metric="logprob")
t_attr = time.perf_counter() - t0
t0 = time.perf_counter()
exact = tvlens.patch_heads(model, corrupted, clean, metric="logprob")
t_exact = time.perf_counter() - t0
checked = tvlens.attribution_patch_heads(model, corrupted, clean, metric="logprob", confirm_top="all")
print(f"attribution {t_attr:.2f}s, exact {t_exact:.2f}s, correlation over all heads {checked.correlation:.3f}")
attr.plot()"""),
    ("md", """\
## What do the heads found attend to?

`values` of a `PatchResult` are the patched metric itself and `effect` the change it causes (what the heatmaps
show); `.to_frame()` has both. `attention_patterns` reads the attention of a sweep's top heads on one prompt:
`.plot()` draws them offline, `.show()` opens circuitsvis's interactive view (the `viz` extra; its viewer script
comes from a CDN, so that view needs the network)."""),
    ("code", """\
from tvlens.analyses.attention import attention_patterns

print(heads.to_frame().sort_values("effect", ascending=False).head(4))
patterns = attention_patterns(model, clean, heads, k=4)   # the 4 heads with the largest means-patching effect
patterns.plot()"""),
]

# ----------------------------------------------------------------------------------------------
NOTEBOOKS["06_selection"] = [
    ("md", f"""\
# Finding the task heads: REINFORCE vs soft weights vs ρ

ρ_token ranks heads one at a time. Hojel et al. (2024) instead *search* for the set of heads whose task-mean
outputs, patched into zero-shot prompts, best perform the task: one Bernoulli variable per head (logits initialised
at −1), trained with REINFORCE. The `task_vectors` package (J. Newsom) relaxes the mask to soft per-head weights
α ∈ [0, 1] trained by gradient descent through the frozen model. Here both run for a few steps and are compared,
on held-out prompts, with ρ top-k, CIE top-k (Todd et al.), random heads, zero-shot and ICL.

{cite("hojel", "newsom", "todd")}"""),
    ("code", SETUP),
    ("code", """\
tasks = ["country_capital", "country_language", "antonym", "english_french"]
means = tvlens.head_means(model, tasks, n_prompts=16, n_shots=5, split="train")  # train-split queries only"""),
    ("md", "## REINFORCE (Hojel et al. 2024)"),
    ("code", """\
reinforce = tvlens.reinforce_select(model, tasks, head_means=means, steps=20, samples_per_step=16, n_prompts=8,
                                    progress=False)
print(reinforce)
reinforce.plot_rewards()"""),
    ("code", "reinforce.plot()"),
    ("md", "## Soft per-head weights"),
    ("code", """\
soft = tvlens.soft_select(model, tasks, head_means=means, steps=20, n_prompts=8, progress=False)
print(soft)
soft.plot()"""),
    ("md", "## Comparison on held-out prompts"),
    ("code", """\
comparison = tvlens.compare_selections(
    model, tasks, selections={"reinforce": reinforce, "soft": soft}, head_means=means, per="all",
    n_prompts=12, n_icl_prompts=12, n_random=4, cie_kw=dict(n_prompts=12, n_cie_prompts=6, n_shots=5), progress=False,
)
print(comparison.table(by="task"))
comparison.plot()"""),
    ("code", """\
# the weights of the model are never touched by a selection
print(reinforce.heads()[:8])
print(soft.alphas.round(decimals=2))"""),
]


# ----------------------------------------------------------------------------------------------
NOTEBOOKS["07_weight_vectors"] = [
    ("md", f"""\
# Weight-space task vectors beside activation task vectors

Ilharco et al. 2023 call a *task vector* the weight difference **τ = θ_ft − θ** between a model fine-tuned on a task
and the model it started from. Adding λτ teaches the task, subtracting it removes it, and sums of several τ give one
multi-task model. tvlens fine-tunes a copy of the organism on its own prompts (the caller's model is never changed),
applies τ inside a context manager that restores every weight bit for bit, and compares weight vectors with the
activation task vectors of the other notebooks on the same tasks.

{cite("ilharco", "hendel")}"""),
    ("code", SETUP + "\ntorch.set_num_threads(1)  # the fine-tunes below are many tiny forward + backward steps"),
    ("md", "## Fine-tune a copy on one task\n\nZero-shot `x →` prompts from the train split, first-answer-token loss; dev accuracy is logged."),
    ("code", """\
ft = tvlens.finetune(model, "country_capital", steps=60, n_prompts=32, progress=False)
tau = ft.vector
print(ft)
print(tau)
ft.plot()"""),
    ("code", """\
before = tvlens.evaluate_icl(model, "country_capital", 0, split="test", n_prompts=14).first_token
with tvlens.weights_applied(model, tau, lam=1.0):          # θ + τ inside the block only
    after = tvlens.evaluate_icl(model, "country_capital", 0, split="test", n_prompts=14).first_token
print(f"zero-shot country_capital: θ {before:.2f} -> θ + τ {after:.2f}")"""),
    ("md", "## Arithmetic and geometry\n\nVectors add, subtract and scale per parameter; norms and cosines per layer or module kind."),
    ("code", """\
vectors = tvlens.weight_vectors(model, ["country_capital", "antonym", "next_letter"], vectors={"country_capital": tau},
                                steps=60, n_prompts=32, progress=False)
geo = tvlens.weight_geometry(list(vectors.values()), by="module")
geo.to_frame().head(8)"""),
    ("code", "geo.plot()"),
    ("md", "## Addition: one model for three tasks (TIES beside plain addition, through peft)"),
    ("code", """\
add = tvlens.weight_addition(model, list(vectors), vectors=vectors, methods=("task_arithmetic", "ties"), n_prompts=20)
add.to_frame()"""),
    ("code", "add.plot()"),
    ("md", "## Negation: forget one task, keep the others (λ chosen on dev)"),
    ("code", """\
neg = tvlens.weight_negation(model, list(vectors), vectors=vectors, lams=(0.5, 1.0, 2.0), n_prompts=16)
neg.to_frame()"""),
    ("md", "## Weights vs activations\n\nθ + λτ against Hendel's task vector and Todd's function vector at their dev-best layers."),
    ("code", """\
wva = tvlens.weights_vs_activations(model, ["country_capital", "antonym"], vectors=vectors, n_prompts=16,
                                    function_kw=dict(n_prompts=16, n_cie_prompts=8))
wva.to_frame()"""),
    ("code", "wva.plot()"),
]


NOTEBOOKS["08_visual"] = [
    ("md", f"""\
# Visual task vectors on a canvas model

`organism-visual` inpaints a 2×2 canvas (example input | output, query | masked cell) of palette
images. Its task vectors are per-task mean outputs of heads at canvas positions: ρ_token scores every
(layer, head, position), the means are patched into canvases without examples, and REINFORCE picks
the pairs. Small counts here; `tvlens visual` runs the whole study.

{cite("hojel")}"""),
    ("code", """\
import torch
import tvlens
from tvlens.analyses import visual as V
from tvlens.inputs import canvas as C

torch.set_num_threads(2)
model = tvlens.load_model("organism-visual", device="cpu")
tasks = ["invert", "gray", "recolor"]
icl = C.concat([C.canvases(t, 4, seed=1) for t in tasks])             # 1-shot, held-out images
blank = C.concat([C.canvases(t, 4, seed=1, examples="masked") for t in tasks])  # same queries, no example
icl"""),
    ("md", "## Task means and ρ_token per (layer, head, position)"),
    ("code", """\
stats = V.canvas_means(model, tasks, n=8)
rho = V.visual_taskness(stats)
rho.plot()"""),
    ("code", "rho.plot_layers()  # ρ over the canvas, where each position sits (Hojel et al. Fig. 2)"),
    ("md", """\
## Patching the top-k pairs into canvases without examples

Code accuracy is floored by the black background most tasks keep (copying the query scores ≈ 0.6), so
the cell is also scored as *exact* (all 36 codes right) and *changed* (accuracy on the codes the task
changes; copying the query scores 0)."""),
    ("code", """\
patch = V.CanvasPatch(model, blank, stats)
masks = torch.stack([torch.zeros(patch.shape)] + [V.topk_pairs(rho, k) for k in (256, 1024)])
scores = patch.scores(masks)  # {metric: {task: [mask]}}: none, top-256, top-1024
{m: {t: [round(float(x), 3) for x in v] for t, v in d.items()} for m, d in scores.items()}"""),
    ("md", "## REINFORCE over (head, position) pairs, a few steps"),
    ("code", """\
sel = V.reinforce_pairs(patch, candidates=rho.top_pairs(1024), steps=4, samples=4, init_logit=0.0, sparsity=2e-4)
sel"""),
    ("code", """\
pred = patch.predictions(torch.stack([V.topk_pairs(rho, 1024), sel.weights]))
V.canvas_pictures({"no example": (blank, patch.predictions(torch.zeros(1, *patch.shape))[:, 0]),
                   "top-1024 ρ": (blank, pred[:, 0]), f"REINFORCE k={sel.k}": (blank, pred[:, 1]), "truth": (icl, None)},
                  rows=1)"""),
]


NOTEBOOKS["09_crossmodal"] = [
    ("md", f"""\
# Cross-modal task vectors in a vision-language model

Luo, Darrell & Bar (2024) take a task vector from **text** examples (`france → paris`) in a VLM and patch it
into the last position of an **image** query (a flag, no context): the model does the task on the image —
better than with the same text examples in the image query's context (*xPatch* vs *xBase*). `organism-vlm` is a
LLaVA-shaped model (a CLIP tower on the text organism) trained only on image prompts, so every cross-modal
number below is a measurement. Small counts here; `tvlens xmodal` runs the whole study.

{cite("luo", "hendel")}"""),
    ("code", """\
import torch
import tvlens
from tvlens.analyses import crossmodal as xm
from tvlens.inputs import multimodal as mm

torch.set_num_threads(2)
model = tvlens.load_model("organism-vlm", device="cpu")  # LLaVA-shaped, offline; its processor needs no PIL
tasks = ["country_capital", "country_currency", "successor", "next_letter"]
batch = mm.text_icl_image_query_prompts(model, "country_capital", n_prompts=2, n_shots=3)
print(batch)
print(model.tokenizer.convert_ids_to_tokens(batch.tokens[0][batch.attention_mask[0].bool()].tolist()))"""),
    ("md", "The image the query shows (a synthetic flag; `batch.row_images(i)` gives a row's pictures):"),
    ("code", """\
import plotly.express as px

px.imshow(batch.row_images(0)[0], title=f"query: {batch.queries[0]} -> {batch.answers[0]}").update_layout(width=260, height=300)"""),
    ("md", "## The table (Luo et al. §4, Table 2)\n\nLayers chosen on dev, accuracy on held-out test renderings, SE per cell, paired tests."),
    ("code", """\
table = xm.crossmodal_table(model, tasks, renderings=1, n_contexts=8)
print(table.markdown())
table.plot()"""),
    ("md", "## Text vs image task vectors (§5)\n\nCentred cosine same task vs other tasks, beside an untrained vision tower; the 2-D picture."),
    ("code", """\
sim = xm.task_similarity(model, tasks, layer=table.layers["Text ICL xPatch"], n_contexts=8)
print(sim.markdown())
sim.plot()"""),
    ("md", "## LLM → VLM and the logit lens"),
    ("code", """\
llm = xm.llm_to_vlm(model, tvlens.load_model("organism", device="cpu"), tasks, n_contexts=8, renderings=1)
print(llm.markdown())
lens = xm.crossmodal_lens(model, tasks, n_prompts=8)
print(lens.markdown())
lens.plot()"""),
    ("md", "One task's image-ICL prompts through `logit_lens` itself (it takes a `MultimodalBatch`; an image query has no "
           "input token, so its *input* is the word naming the image):"),
    ("code", """\
res = tvlens.logit_lens(model, mm.image_icl_prompts(model, "country_currency", n_prompts=8, n_shots=5, split="test"))
print(res.phases())
print(res.to_markdown())
res.plot()"""),
]


def build(name: str, cells: list[tuple[str, str]]) -> nbformat.NotebookNode:
    nb = new_notebook()
    nb.cells = [new_markdown_cell(src) if kind == "md" else new_code_cell(src) for kind, src in cells]
    nb.metadata["kernelspec"] = {"display_name": "Python 3", "language": "python", "name": "python3"}
    nb.metadata["language_info"] = {"name": "python"}
    for i, cell in enumerate(nb.cells):  # stable ids: regenerating gives the same file
        cell["id"] = f"{name[:2]}-{i:02d}"
    return nb


def main() -> None:
    for name, cells in NOTEBOOKS.items():
        path = HERE / f"{name}.ipynb"
        nbformat.write(build(name, cells), path)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
