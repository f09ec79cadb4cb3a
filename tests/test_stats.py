"""tvlens.analyses.taskness: streaming head statistics and ρ_token, against the slow reference in reference_stats.py.

Exactness tests run the tiny models in float64 so that batch composition cannot move a number
by more than rounding (1e-5 relative is then a strict bound, not a float32 noise allowance).
"""

from __future__ import annotations

import math
import re

import pytest
import torch

import tvlens
from tvlens import hooks
from tvlens.hooks import act_name
from tvlens.models import ModelInfo
from tvlens.inputs.text import TokenClass, icl_prompts
from tvlens.analyses.taskness import HeadStats, Taskness, head_means, rho_token, taskness, validate_taskness

from reference_stats import moments, rho_from_samples, z_samples

TASKS = ("country_capital", "antonym", "first_letter")
RTOL = 1e-5


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model64(request, tiny_dirs):
    return tvlens.load_model(tiny_dirs[request.param], device="cpu", dtype="float64")


@pytest.fixture(scope="module")
def llama64(tiny_dirs):
    return tvlens.load_model(tiny_dirs["llama"], device="cpu", dtype="float64")


def close(a, b, rtol=RTOL):
    """Elementwise 1e-5 relative; entries near zero get an absolute floor of 1e-8 x the tensor's
    largest magnitude (a float64 model still differs at ~1e-9 between padded and unpadded rows)."""
    a, b = a.to(torch.float64), b.to(torch.float64)
    torch.testing.assert_close(a, b, rtol=rtol, atol=1e-8 * float(b.abs().max()) + 1e-300)


def prompts(model, n=9, shots=3, seed=0, tasks=TASKS):
    return {t: icl_prompts(model, t, n_prompts=n, n_shots=shots, seed=seed) for t in tasks}


# ---------------------------------------------------------------- means / variances vs reference


@pytest.mark.parametrize("positions", ["separator", "all", "demo_sep"])
def test_moments_match_run_with_cache(model64, positions):
    batches = prompts(model64)
    stats = head_means(model64, list(batches.values()), positions=positions, batch_size=4, include_output=True)
    cls = None if positions in ("separator", "all") else int(TokenClass[positions.upper()])
    w_o = model64.W_O.detach().to(torch.float64)
    for ti, (task, batch) in enumerate(batches.items()):
        ref = z_samples(model64, batch, positions=positions, token_class=cls)
        if positions == "separator":
            mean, var, n = moments(ref[0])
            close(stats.z_mean[ti], mean)
            close(stats.z_var[ti], var)
            assert int(stats.count[ti]) == n == len(batch)
            out = torch.einsum("nlhd,lhdm->nlhm", ref[0], w_o)
            close(stats.out_mean[ti], out.mean(0))
            close(stats.out_var[ti], out.var(0, unbiased=False))
            continue
        p = stats.n_positions
        assert p >= max(ref) + 1
        for rank, samples in ref.items():
            mean, var, n = moments(samples)
            close(stats.z_mean[ti, :, :, p - 1 - rank], mean)
            close(stats.z_var[ti, :, :, p - 1 - rank], var)
            assert int(stats.count[ti, p - 1 - rank]) == n
        for rank in range(max(ref) + 1, p):  # positions this task's prompts never reach
            assert int(stats.count[ti, p - 1 - rank]) == 0
        out = torch.einsum("nlhd,lhdm->nlhm", ref[0], w_o)
        close(stats.out_mean[ti, :, :, -1], out.mean(0))
        close(stats.out_var[ti, :, :, -1], out.var(0, unbiased=False))


def test_out_mean_is_mean_z_times_w_o(llama64):
    stats = head_means(llama64, list(TASKS[:2]), n_prompts=6, n_shots=2, include_output=True)
    w_o = llama64.W_O.detach().to(torch.float64)
    close(stats.out_mean, torch.einsum("tlhd,lhdm->tlhm", stats.z_mean, w_o))


@pytest.mark.parametrize("positions", ["separator", "all"])
def test_rho_matches_reference(model64, positions):
    batches = prompts(model64)
    stats = head_means(model64, list(batches.values()), positions=positions, batch_size=5)
    rho = taskness(stats)
    refs = [z_samples(model64, b, positions=positions) for b in batches.values()]
    if positions == "separator":
        ref_rho, total, within = rho_from_samples([r[0] for r in refs])
        close(rho.scores, ref_rho)
        close(rho.total_var, total)
        close(rho.within_var, within)
        assert rho.per_position is None
        return
    # per position: ranks where every task has >= 2 samples; head score = mean of token scores
    ranks = [r for r in range(max(max(x) for x in refs) + 1) if all(r in x and x[r].shape[0] >= 2 for x in refs)]
    assert len(rho.pos_index) == len(ranks)
    assert sorted(-1 - r for r in ranks) == list(rho.pos_index)
    # eps floor is relative to the mean total variance over every scored cell: compute it over all ranks
    per_rank = [rho_from_samples([x[r] for x in refs], eps=1e300) for r in ranks]  # huge eps: just get totals
    scale = torch.stack([t for _, t, _ in per_rank]).mean()
    floor = 1e-6 * float(scale)
    token_scores = []
    for r, (_, total, within) in zip(ranks, per_rank):
        token_scores.append(total / within.clamp_min(floor))
        i = rho.pos_index.index(-1 - r)
        close(rho.per_position[:, :, i], token_scores[-1])
    close(rho.scores, torch.stack(token_scores).mean(0))


# ---------------------------------------------------------------- invariances


def test_batch_size_invariance(llama64):
    batches = list(prompts(llama64, n=7).values())
    ref = head_means(llama64, batches, positions="all", batch_size=7)
    for bs in (1, 3):
        got = head_means(llama64, batches, positions="all", batch_size=bs)
        close(got.z_mean, ref.z_mean)
        close(got.z_var, ref.z_var)
        assert torch.equal(got.count, ref.count)


@pytest.mark.parametrize("positions", ["separator", "all"])
def test_streaming_merge_equals_one_shot(llama64, positions):
    batches = prompts(llama64, n=10)
    full = head_means(llama64, list(batches.values()), positions=positions, batch_size=4, include_output=True)
    a = head_means(llama64, [b.slice(0, 3) for b in batches.values()], positions=positions, include_output=True)
    b = head_means(llama64, [b.slice(3, 10) for b in batches.values()], positions=positions, include_output=True)
    merged = a.merge(b)
    assert merged.tasks == full.tasks
    close(merged.z_mean, full.z_mean)
    close(merged.z_var, full.z_var)
    close(merged.out_var, full.out_var)
    assert torch.equal(merged.count, full.count)
    close(taskness(merged).scores, taskness(full).scores)


def test_merge_carries_disjoint_tasks(llama64):
    a = head_means(llama64, ["antonym", "country_capital"], n_prompts=4, n_shots=2)
    b = head_means(llama64, ["first_letter"], n_prompts=4, n_shots=2)
    m = a.merge(b)
    assert m.tasks == ("antonym", "country_capital", "first_letter")
    close(m.z_mean[2], b.z_mean[0])
    with pytest.raises(ValueError, match="positions"):
        a.merge(head_means(llama64, ["first_letter"], n_prompts=4, n_shots=2, positions="all"))


def test_prompt_chunking_is_merge_of_seeded_chunks(llama64, monkeypatch):
    import tvlens.analyses.taskness as st

    monkeypatch.setattr(st, "_PROMPT_CHUNK", 4)
    got = head_means(llama64, ["antonym", "first_letter"], n_prompts=10, n_shots=2, seed=3)
    parts = None
    for i, n in enumerate((4, 4, 2)):
        batch = [icl_prompts(llama64, t, n_prompts=n, n_shots=2, seed=3 + i * st._SEED_STRIDE) for t in ("antonym", "first_letter")]
        s = head_means(llama64, batch)
        parts = s if parts is None else parts.merge(s)
    close(got.z_mean, parts.z_mean)
    close(got.z_var, parts.z_var)
    assert got.count.tolist() == [10, 10]


def test_pooled_equals_reference(llama64):
    batches = prompts(llama64, n=6)
    stats = head_means(llama64, list(batches.values()), positions="demo_sep").pooled()
    for ti, b in enumerate(batches.values()):
        ref = z_samples(llama64, b, positions="demo_sep", token_class=int(TokenClass.DEMO_SEP))
        allv = torch.cat(list(ref.values()))
        close(stats.z_mean[ti], allv.mean(0))
        close(stats.z_var[ti], allv.var(0, unbiased=False))
        assert int(stats.count[ti]) == allv.shape[0] == 6 * 3


def test_layers_subset_and_stop_early(llama64):
    batches = list(prompts(llama64, n=5).values())
    full = head_means(llama64, batches)
    part = head_means(llama64, batches, layers=[0])
    assert part.layers == (0,) and part.z_mean.shape[1] == 1
    close(part.z_mean[:, 0], full.z_mean[:, 0])


# ---------------------------------------------------------------- shapes (float32 fixtures)


def test_shapes_follow_model_info(tiny_model):
    info = ModelInfo.of(tiny_model)
    s = head_means(tiny_model, ["antonym", "first_letter"], n_prompts=4, n_shots=2, include_output=True)
    assert s.z_mean.shape == (2, info.n_layers, info.n_heads, info.d_head)
    assert s.z_var.shape == s.z_mean.shape and s.z_mean.dtype == torch.float64
    assert s.out_mean.shape == (2, info.n_layers, info.n_heads, info.d_model)
    assert s.count.tolist() == [4, 4]
    a = head_means(tiny_model, ["antonym", "first_letter"], n_prompts=4, n_shots=2, positions="all")
    assert a.z_mean.shape[:3] == (2, info.n_layers, info.n_heads) and a.z_mean.shape[-1] == info.d_head
    assert a.count.shape == (2, a.n_positions)
    r = taskness(s)
    assert r.scores.shape == (info.n_layers, info.n_heads)
    assert torch.isfinite(r.scores).all() and (r.scores > 0).all()


def test_gqa_llama_has_query_heads(tiny_llama):
    info = ModelInfo.of(tiny_llama)
    assert info.n_kv_heads < info.n_heads
    s = head_means(tiny_llama, ["antonym", "first_letter"], n_prompts=3, n_shots=1)
    assert s.n_heads == info.n_heads


# ---------------------------------------------------------------- ρ: synthetic cases and the zero-variance rule


def test_rho_synthetic_deterministic_head_ranks_first():
    g = torch.Generator().manual_seed(0)
    n_tasks, n, cells, d = 4, 50, 6, 8
    samples = []
    for j in range(n_tasks):
        x = torch.randn(n, cells, d, generator=g, dtype=torch.float64)
        x[:, 2] = float(j) * 0.3  # cell 2: a deterministic function of the task
        x[:, 4] = 0.0  # cell 4: constant everywhere (dead head)
        x[:, 5] += 2.0 * j  # cell 5: task-dependent mean plus noise
        samples.append(x)
    means = torch.stack([s.mean(0) for s in samples])
    var = torch.stack([s.var(0, unbiased=False) for s in samples])
    rho, total, within, degen = rho_token(means, var, torch.full((n_tasks,), n))
    ref, _, _ = rho_from_samples(samples)
    close(rho, ref)
    assert torch.isfinite(rho).all()
    assert int(rho.argmax()) == 2 and degen[2] and degen[4] and degen.sum() == 2
    assert float(rho[4]) == 0.0  # constant head: no task information
    assert int(rho[[0, 1, 3, 5]].argmax()) == 3  # index 3 of the list = cell 5
    assert all(0.5 < float(rho[c]) < 1.5 for c in (0, 1, 3))  # pure noise: ρ ≈ 1


def test_rho_unequal_counts_match_pooled_samples():
    g = torch.Generator().manual_seed(1)
    samples = [torch.randn(n, 3, 5, generator=g, dtype=torch.float64) + k for k, n in enumerate((3, 11, 7))]
    means = torch.stack([s.mean(0) for s in samples])
    var = torch.stack([s.var(0, unbiased=False) for s in samples])
    rho, total, within, _ = rho_token(means, var, torch.tensor([3, 11, 7]))
    ref, rtotal, rwithin = rho_from_samples(samples)
    close(rho, ref)
    close(total, rtotal)
    close(within, rwithin)


def test_head_set_to_task_constant_gets_top_score(llama64):
    """Overwrite head (1, 2)'s z with a per-task constant while collecting each task's stats."""
    tasks = ["antonym", "country_capital", "first_letter"]
    before = hooks.hook_count(llama64)
    stats = None
    for j, t in enumerate(tasks):
        def set_head(z, hook, j=j):
            z[:, :, 2] = 0.1 * (j + 1)
            return z

        with hooks.hooked(llama64, [(act_name("z", 1), set_head)]):
            s = head_means(llama64, [t], n_prompts=6, n_shots=2)
        stats = s if stats is None else stats.merge(s)
    r = taskness(stats)
    assert r.top(1)[0][:2] == (1, 2)
    assert bool(r.degenerate[1, 2]) and int(r.degenerate.sum()) == 1
    assert torch.isfinite(r.scores).all()
    fig = r.plot()
    assert fig.data[0].zmax == pytest.approx(float(r.scores[~r.degenerate].max()))  # saturated head clipped
    assert hooks.hook_count(llama64) == before


# ---------------------------------------------------------------- Taskness object


def test_taskness_api(llama64, tmp_path):
    stats = head_means(llama64, list(TASKS), n_prompts=5, n_shots=2)
    r = taskness(stats)
    top = r.top(3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    assert top[0][2] == float(r.scores.max())
    df = r.to_frame()
    assert len(df) == r.scores.numel() and set(df.columns) >= {"layer", "head", "score"}
    fig = r.plot()
    assert "antonym" in fig.layout.title.text and "layer" in fig.data[0].hovertemplate
    figt = r.plot(transpose=True)
    assert tuple(torch.tensor(figt.data[0].z).shape) == (r.n_heads, r.n_layers)
    html = r.to_html(tmp_path / "rho.html")
    # the page is small: it loads plotly.js from the one copy written beside it
    assert html.exists() and re.search(r"""src=["']plotly\.min\.js["']""", html.read_text())
    assert (html.parent / "plotly.min.js").stat().st_size > 100_000
    r.save(tmp_path / "rho")
    r2 = Taskness.load(tmp_path / "rho")
    assert torch.equal(r2.scores, r.scores) and r2.tasks == r.tasks
    stats.save(tmp_path / "stats")
    s2 = HeadStats.load(tmp_path / "stats", model=llama64)
    assert torch.equal(s2.z_mean, stats.z_mean) and torch.equal(s2.count, stats.count) and s2.tasks == stats.tasks
    sub = taskness(stats, ["antonym", "first_letter"])
    assert sub.tasks == ("antonym", "first_letter")
    # a model given directly
    direct = taskness(llama64, list(TASKS), n_prompts=5, n_shots=2)
    close(direct.scores, r.scores)


def test_taskness_per_position_plot(llama64):
    r = taskness(llama64, ["antonym", "first_letter"], n_prompts=4, n_shots=2, positions="all")
    assert r.per_position.shape[:2] == r.scores.shape and r.pos_index[-1] == -1
    fig = r.plot_positions()
    assert len(fig.data[0].x) == len(r.pos_index)


def test_validate_taskness_runs(llama64):
    stats = head_means(llama64, ["antonym", "first_letter"], n_prompts=4, n_shots=2)
    r = taskness(stats)
    before = hooks.hook_count(llama64)
    v = validate_taskness(llama64, r, stats, ks=(1, 2), n_random=2, n_prompts=4, seed=0)
    assert v.top_acc.shape == (2, 2) and v.random_acc.shape == (2, 2, 2)
    assert ((v.top_acc >= 0) & (v.top_acc <= 1)).all()
    assert "zero-shot" in v.summary()
    v.plot()
    assert hooks.hook_count(llama64) == before
    slow = validate_taskness(llama64, r, stats, ks=(1, 2), n_random=2, n_prompts=4, seed=0, fast=False)
    assert torch.equal(slow.top_acc, v.top_acc) and torch.equal(slow.random_acc, v.random_acc)


# ---------------------------------------------------------------- bad input: errors before any forward


@pytest.fixture
def no_forward(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("a forward pass ran before the input was validated")

    monkeypatch.setattr(hooks, "run", boom)


@pytest.mark.parametrize(
    "kwargs, err, match",
    [
        (dict(tasks=[]), ValueError, "no tasks"),
        (dict(tasks=["antonym"]), ValueError, "at least 2 tasks"),
        (dict(tasks=["antonym", "antonym"]), ValueError, "more than once"),
        (dict(tasks=["antonym", "not_a_task"]), KeyError, "not_a_task"),
        (dict(tasks=TASKS[:2], n_prompts=1), ValueError, "n_prompts"),
        (dict(tasks=TASKS[:2], positions="middle"), ValueError, "unknown positions"),
        (dict(tasks=TASKS[:2], positions="pad"), ValueError, "padding"),
        (dict(tasks=TASKS[:2], layers=[7]), ValueError, "out of range"),
        (dict(tasks=TASKS[:2], batch_size=0), ValueError, "batch_size"),
        (dict(tasks=TASKS[:2], eps=0.0), ValueError, "eps"),
    ],
)
def test_bad_input_fails_before_forward(tiny_llama, no_forward, kwargs, err, match):
    tasks = kwargs.pop("tasks")
    with pytest.raises(err, match=match):
        taskness(tiny_llama, tasks, **kwargs)


def test_head_means_bad_input(tiny_llama, no_forward):
    with pytest.raises(ValueError, match="no tasks"):
        head_means(tiny_llama, [])
    with pytest.raises(ValueError, match="n_prompts"):
        head_means(tiny_llama, ["antonym"], n_prompts=0)
    with pytest.raises(ValueError, match="out of range"):
        head_means(tiny_llama, ["antonym"], layers=[-9])


def test_rho_token_needs_two_tasks():
    with pytest.raises(ValueError, match="at least 2 tasks"):
        rho_token(torch.zeros(1, 2, 3), torch.ones(1, 2, 3), torch.tensor([5]))


# ---------------------------------------------------------------- several accepted answers


def _multi_answer(model, name, split="test"):
    """Task ``name`` with the word the model says after each zero-shot query of ``split`` added as a
    further accepted answer (after the task's own, which stays first)."""
    from tvlens.tasks import Task, load_task

    base = load_task(name)
    zs = icl_prompts(model, base, n_prompts=len({x for x, _ in base.split(split)}), n_shots=0, split=split)
    with torch.no_grad():
        pred = model(zs.tokens, attention_mask=zs.attention_mask)[:, -1].argmax(-1)
    words = model.tokenizer.convert_ids_to_tokens(pred.tolist())
    extra = tuple((x, w) for x, w in zip(zs.queries, words) if w.isalpha() and w not in base.answers_of(x))
    assert extra, "the model says none of the task's words: nothing to test"
    return base, Task(base.name, base.family, base.instruction, tuple(base.pairs) + extra)


def test_validate_taskness_counts_any_accepted_answer(organism):
    base, multi = _multi_answer(organism, "antonym")
    stats = head_means(organism, [multi, "country_capital"], n_prompts=4, n_shots=2)
    r = taskness(stats)
    got = validate_taskness(organism, r, stats, [multi], ks=(1,), n_random=1, n_prompts=12, seed=0)
    old = validate_taskness(organism, r, stats, [base], ks=(1,), n_random=1, n_prompts=12, seed=0)
    zs = icl_prompts(organism, multi, n_prompts=12, n_shots=0, seed=17)  # validate_taskness's prompts (seed + 17)
    tok = organism.tokenizer
    right = []
    for i in range(len(zs)):
        with torch.no_grad():
            lg = organism(zs.tokens[i][zs.attention_mask[i].bool()][None])[0, -1]
        ids = {tok(" " + a, add_special_tokens=False)["input_ids"][0] for a in multi.answers_of(zs.queries[i])}
        right.append(float(int(lg.argmax()) in ids))
    assert got.zero_shot[0].item() == pytest.approx(sum(right) / len(right), abs=1e-6)
    assert got.zero_shot[0] > old.zero_shot[0]  # first-answer-only scoring is lower
    assert (got.top_acc >= old.top_acc).all()


@pytest.mark.parametrize("metric", ["accuracy", "logprob", "prob", "logit_diff"])
def test_builtin_metrics_score_the_best_accepted_answer(tiny_model, metric):
    """resolve_metric (patching's metrics) on random logits against a by-hand computation: accuracy when the
    top token starts any accepted answer, log-prob / prob of the best one, logit_diff the best accepted logit
    minus the top token that starts none."""
    import dataclasses

    from tvlens.engine.batch import as_batch
    from tvlens.metrics import resolve_metric

    batch = icl_prompts(tiny_model, "antonym", n_prompts=6, n_shots=1, seed=0)
    V = tiny_model.cfg.d_vocab
    others = (((5,), (7, 1)), (), ((9,),), (), ((5,),), ())  # further accepted answers of some rows
    batch = dataclasses.replace(batch, other_answers=tuple(("x",) * len(o) for o in others), other_answer_tokens=others)
    gen = torch.Generator().manual_seed(0)
    clean, logits = torch.randn(6, V, generator=gen), torch.randn(6, V, generator=gen)
    logits[0, 7] = logits[2, 9] = 50.0  # the top token of rows 0 and 2 is a second accepted answer
    clean[4, 5] = 50.0  # row 4's clean top token is accepted: the foil must be another
    fn = resolve_metric(metric, as_batch(batch, "prompts"), clean)
    got = fn(logits[:, None])[:, 0]
    for r in range(6):
        ids = [int(batch.answer_ids[r]), *(a[0] for a in others[r])]
        lp = logits[r].log_softmax(-1)[ids].max().item()
        masked = clean[r].clone()
        masked[ids] = float("-inf")
        want = {"accuracy": float(int(logits[r].argmax()) in ids), "logprob": lp, "prob": math.exp(lp),
                "logit_diff": (logits[r, ids].max() - logits[r, int(masked.argmax())]).item()}[metric]
        assert got[r].item() == pytest.approx(want, rel=1e-5, abs=1e-6), r
    if metric == "accuracy":
        assert got[0] == 1 and got[2] == 1  # the first answer alone would score these 0


def test_accepted_ids_pad_by_repeating_and_concatenate_across_widths():
    from types import SimpleNamespace

    from tvlens.metrics import accepted_ids, accepted_metric, cat_accepted

    a = accepted_ids(SimpleNamespace(answer_ids=torch.tensor([3, 4]), accepted_answer_tokens=(((3, 8), (5,), (3, 1)), ((4,),))))
    assert a.tolist() == [[3, 5], [4, 4]]  # distinct first tokens, answer first; a repeat pads the short row
    b = accepted_ids(SimpleNamespace(answer_ids=torch.tensor([7])))  # no accepted_answer_tokens: one column
    both = cat_accepted([a, b])
    assert both.tolist() == [[3, 5], [4, 4], [7, 7]]
    logits = torch.zeros(3, 10)
    logits[0, 5] = logits[1, 5] = logits[2, 7] = 1.0
    assert accepted_metric(logits, both, "accuracy").tolist() == [1.0, 0.0, 1.0]
