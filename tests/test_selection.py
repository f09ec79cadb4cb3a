"""Tests of tvlens.analyses.selection: REINFORCE and soft head selection, the batched masked objective,
Selection storage and the comparison table.

Kept fast: tiny random models (2 layers x 4 heads), a handful of prompts and steps.
"""

from __future__ import annotations

import hashlib

import pytest
import torch

import tvlens
from tvlens.analyses import selection as sel_mod
from tvlens.hooks import act_name, hook_count, run
from tvlens.analyses.selection import PatchObjective, Selection, compare_selections, evaluate_heads, reinforce_select, soft_select
from conftest import Forwards, build_tiny_vlm, padded_image_batch

TASKS = ["antonym", "country_capital"]
SMALL = dict(n_prompts=4, n_mean_prompts=4, n_shots=2, progress=False)


def weights_checksum(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def llama_means(tiny_llama):
    tasks = tvlens.resolve_tasks(TASKS)
    return sel_mod._means_for(tiny_llama, tasks, None, n_prompts=4, n_shots=2, seed=0)


# ---------------------------------------------------------------------------------------------
# the batched objective equals the obvious one-mask-at-a-time loop


def naive_metric(model, obj: PatchObjective, mask: torch.Tensor) -> torch.Tensor:
    """One full forward of the underlying Hugging Face model for one mask, with plain PyTorch hooks
    (no tvlens and no TransformerLens hook machinery): the input of each attention output projection
    (``o_proj`` / ``c_proj``, i.e. the heads' z concatenated) has its masked heads at the final position
    replaced by the row's task mean; returns the answer log-prob."""
    hf = model.original_model
    attn_out = _out_projections(hf)
    n_heads, d_head = obj.row_means.shape[2], obj.row_means.shape[3]
    handles = []
    for layer in range(mask.shape[0]):
        heads = mask[layer].nonzero().flatten()
        if not len(heads):
            continue

        def pre(module, args, layer=layer, heads=heads):
            z = args[0].clone().view(*args[0].shape[:-1], n_heads, d_head)
            z[:, -1, heads] = obj.row_means[:, layer, heads].to(z.dtype)
            return (z.view(args[0].shape), *args[1:])

        handles.append(attn_out[layer].register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            logits = hf(input_ids=obj.tokens, attention_mask=obj.attention_mask).logits[:, -1]
    finally:
        for h in handles:
            h.remove()
    return logits.float().log_softmax(-1).gather(-1, obj.answer_ids[:, None])[:, 0]


def _out_projections(hf) -> list:
    """Each layer's attention output projection in a HF GPT-2 (``c_proj``) or Llama / Qwen (``o_proj``) model."""
    if hasattr(hf, "transformer"):
        return [block.attn.c_proj for block in hf.transformer.h]
    return [layer.self_attn.o_proj for layer in hf.model.layers]


@pytest.mark.parametrize("fast", ["auto", False])
def test_batched_objective_matches_naive_loop(tiny_model, fast):
    tasks = tvlens.resolve_tasks(TASKS)
    means = sel_mod._means_for(tiny_model, tasks, None, n_prompts=4, n_shots=2, seed=0)
    obj = PatchObjective.build(tiny_model, tasks, means, n_prompts=5, split="train", seed=0, fast=fast)
    g = torch.Generator().manual_seed(1)
    masks = torch.rand(6, *means.shape[1:3], generator=g) < 0.4
    masks[0] = False  # the unpatched model
    masks[1] = True  # every head
    got = obj.per_row(masks.float(), "logprob")
    for s in range(masks.shape[0]):
        ref = naive_metric(tiny_model, obj, masks[s])
        torch.testing.assert_close(got[s].float(), ref, atol=1e-4, rtol=1e-4)
    # patching changes something (the test is not vacuous)
    assert (got[1] - got[0]).abs().max() > 1e-4
    # reward = mean over prompts of the same numbers
    torch.testing.assert_close(obj.reward(masks), got.mean(1).float(), atol=1e-5, rtol=1e-5)
    # accuracy is the argmax test on the same logits
    acc = obj.per_row(masks.float(), "accuracy")
    assert set(acc.unique().tolist()) <= {0.0, 1.0}


@pytest.mark.parametrize("fast", ["auto", False])
def test_zero_weights_leave_metric_unchanged(tiny_gpt2, fast):
    tasks = tvlens.resolve_tasks(TASKS)
    means = sel_mod._means_for(tiny_gpt2, tasks, None, n_prompts=4, n_shots=2, seed=0)
    obj = PatchObjective.build(tiny_gpt2, tasks, means, n_prompts=3, split="train", seed=0, fast=fast)
    got = obj.per_row(torch.zeros(1, *means.shape[1:3]), "logprob")[0]
    with torch.no_grad():
        logits = run(tiny_gpt2, obj.tokens, attention_mask=obj.attention_mask)[:, -1]
    ref = logits.log_softmax(-1).gather(-1, obj.answer_ids[:, None])[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------------
# the optimisers


def test_reinforce_concentrates_on_the_rewarded_head(tiny_llama):
    target = (1, 2)

    def reward_fn(masks):  # depends only on one known head
        return masks[:, target[0], target[1]].float()

    sel = reinforce_select(tiny_llama, reward_fn=reward_fn, steps=200, samples_per_step=32, sparsity=0.02, seed=0,
                           patience=None, progress=False)
    p = sel.probabilities
    assert p[target] > 0.9
    others = torch.ones_like(p, dtype=torch.bool)
    others[target] = False
    assert p[others].max() < 0.3, p
    assert sel.heads() == [target]
    assert sel.rewards.shape == (200,)
    assert sel.rewards[-20:].mean() > sel.rewards[:20].mean()


def test_reinforce_early_stopping_on_plateau(tiny_llama):
    sel = reinforce_select(tiny_llama, reward_fn=lambda m: torch.zeros(m.shape[0]), steps=500, samples_per_step=4,
                           patience=10, progress=False)
    assert sel.rewards.numel() < 500
    assert sel.meta.extra["stopped_early"]


def test_weights_untouched_and_no_grads(tiny_llama):
    before = weights_checksum(tiny_llama)
    reinforce_select(tiny_llama, TASKS, steps=3, samples_per_step=4, **SMALL)
    soft_select(tiny_llama, TASKS, steps=3, **SMALL)
    assert weights_checksum(tiny_llama) == before
    assert all(not p.requires_grad for p in tiny_llama.parameters())
    assert all(p.grad is None for p in tiny_llama.parameters())


def test_soft_select_improves_its_objective(tiny_gpt2):
    sel = soft_select(tiny_gpt2, TASKS, steps=15, lr=0.2, l1=0.0, patience=None, **SMALL)
    assert sel.method == "soft"
    # alphas are sigmoid(theta): strictly inside (0, 1), and training moved them off the start sigmoid(-1)
    assert torch.all((sel.alphas > 0) & (sel.alphas < 1))
    assert (sel.alphas - torch.sigmoid(torch.tensor(-1.0))).abs().max() > 1e-2
    assert sel.rewards[-1] > sel.rewards[0]
    assert torch.equal(sel.mask, sel.alphas > 0.5)


def _fd_check(model, eps: float, rtol: float, atol: float, fast="auto") -> None:
    tasks = tvlens.resolve_tasks(TASKS)
    means = sel_mod._means_for(model, tasks, None, n_prompts=4, n_shots=2, seed=0)
    obj = PatchObjective.build(model, tasks, means, n_prompts=3, split="train", seed=0, fast=fast)
    theta = torch.randn(*means.shape[1:3], generator=torch.Generator().manual_seed(0), dtype=torch.float64,
                        requires_grad=True)
    loss, _ = obj.soft_loss(theta, l1=1e-2)
    loss.backward()
    fd = torch.zeros_like(theta)
    with torch.no_grad():
        for i in range(theta.shape[0]):
            for j in range(theta.shape[1]):
                up, down = theta.detach().clone(), theta.detach().clone()
                up[i, j] += eps
                down[i, j] -= eps
                fd[i, j] = (obj.soft_loss(up, l1=1e-2)[0] - obj.soft_loss(down, l1=1e-2)[0]) / (2 * eps)
    assert fd.abs().max() > 1e-4  # not a vacuous comparison
    torch.testing.assert_close(theta.grad, fd, rtol=rtol, atol=atol)


@pytest.mark.parametrize("fast", ["auto", False])
def test_soft_gradient_matches_finite_differences_float64(tiny_dirs, fast):
    """GPT-2 computes everything in float64 here, so central differences are tight."""
    model = tvlens.load_model(tiny_dirs["gpt2"], device="cpu", dtype="float64")
    _fd_check(model, eps=1e-6, rtol=1e-5, atol=1e-8, fast=fast)


def test_soft_gradient_matches_finite_differences_llama(tiny_dirs):
    """HF's LlamaRMSNorm upcasts to float32 and back, so a float64 Llama is only float32-accurate:
    larger steps and a looser tolerance (measured: FD noise dominates below eps ~1e-4)."""
    model = tvlens.load_model(tiny_dirs["llama"], device="cpu", dtype="float64")
    _fd_check(model, eps=1e-3, rtol=2e-2, atol=2e-5)


def test_deterministic_given_seed(tiny_llama, llama_means):
    kw = dict(head_means=llama_means, steps=4, samples_per_step=6, **SMALL)
    a = reinforce_select(tiny_llama, TASKS, seed=3, **kw)
    b = reinforce_select(tiny_llama, TASKS, seed=3, **kw)
    assert torch.equal(a.probabilities, b.probabilities) and torch.equal(a.rewards, b.rewards)
    c = reinforce_select(tiny_llama, TASKS, seed=4, **kw)
    assert not torch.equal(a.probabilities, c.probabilities)
    s1 = soft_select(tiny_llama, TASKS, head_means=llama_means, steps=3, batch_size=3, seed=1, **SMALL)
    s2 = soft_select(tiny_llama, TASKS, head_means=llama_means, steps=3, batch_size=3, seed=1, **SMALL)
    assert torch.equal(s1.alphas, s2.alphas) and torch.equal(s1.rewards, s2.rewards)


def test_global_rng_untouched(tiny_llama):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    reinforce_select(tiny_llama, reward_fn=lambda m: m.float().sum((1, 2)), steps=3, samples_per_step=4, progress=False)
    assert torch.equal(torch.rand(3), expected)


def test_hooks_removed_after_exception(tiny_llama, llama_means):
    def boom(module, args):
        raise RuntimeError("boom inside the forward")

    # fails mid-forward, while the selection's hooks are attached (whatever engine attached them)
    handle = tiny_llama.blocks[-1].mlp.register_forward_pre_hook(boom)
    try:
        before = hook_count(tiny_llama)
        with pytest.raises(RuntimeError, match="boom"):
            reinforce_select(tiny_llama, TASKS, head_means=llama_means, steps=2, samples_per_step=2, **SMALL)
        assert hook_count(tiny_llama) == before
        with pytest.raises(RuntimeError, match="boom"):
            soft_select(tiny_llama, TASKS, head_means=llama_means, steps=2, **SMALL)
        assert hook_count(tiny_llama) == before
    finally:
        handle.remove()


# ---------------------------------------------------------------------------------------------
# checkpoints


def test_checkpoint_resume_equals_uninterrupted_run(tiny_llama, tmp_path):
    calls = {"n": 0}

    def reward_fn(masks):
        return masks[:, 0, 1].float() - 0.1 * masks.float().sum((1, 2))

    def flaky(masks):
        calls["n"] += 1
        if calls["n"] == 6:
            raise KeyboardInterrupt
        return reward_fn(masks)

    kw = dict(steps=10, samples_per_step=8, seed=5, patience=None, progress=False)
    full = reinforce_select(tiny_llama, reward_fn=reward_fn, **kw)
    ckpt = tmp_path / "run.ckpt"
    with pytest.raises(KeyboardInterrupt):
        reinforce_select(tiny_llama, reward_fn=flaky, checkpoint=ckpt, checkpoint_every=1, **kw)
    assert ckpt.exists()
    resumed = reinforce_select(tiny_llama, reward_fn=reward_fn, checkpoint=ckpt, checkpoint_every=1, **kw)
    assert torch.equal(resumed.probabilities, full.probabilities)
    assert torch.equal(resumed.rewards, full.rewards)


def test_checkpoint_refuses_other_config_or_model(tiny_llama, tiny_gpt2, tmp_path):
    ckpt = tmp_path / "run.ckpt"
    rf = lambda m: m.float().sum((1, 2))  # noqa: E731
    reinforce_select(tiny_llama, reward_fn=rf, steps=2, samples_per_step=2, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="different configuration"):
        reinforce_select(tiny_llama, reward_fn=rf, steps=2, samples_per_step=2, lr=0.5, checkpoint=ckpt, progress=False)
    with pytest.raises(ValueError, match="another model"):
        reinforce_select(tiny_gpt2, reward_fn=rf, steps=2, samples_per_step=2, checkpoint=ckpt, progress=False)


# ---------------------------------------------------------------------------------------------
# the result object


def test_selection_save_load_and_model_check(tiny_llama, tiny_gpt2, llama_means, tmp_path):
    sel = reinforce_select(tiny_llama, TASKS, head_means=llama_means, steps=2, samples_per_step=2, **SMALL)
    path = sel.save(tmp_path / "sel")
    back = Selection.load(path, model=tiny_llama)
    assert torch.equal(back.probabilities, sel.probabilities) and torch.equal(back.mask, sel.mask)
    assert torch.equal(back.rewards, sel.rewards) and back.method == "reinforce" and back.tasks == sel.tasks
    torch.testing.assert_close(back.head_means, sel.head_means)
    with pytest.raises(ValueError, match="not with the loaded model"):
        Selection.load(path, model=tiny_gpt2)
    acc = back.evaluate(tiny_llama, n_prompts=3)
    assert acc.shape == (2,) and torch.all((acc >= 0) & (acc <= 1))
    fig = sel.plot()
    assert fig.data[0].z.shape == tuple(sel.probabilities.shape)
    assert sel.to_html(tmp_path / "sel.html").exists()


def test_selection_heads_order(tiny_llama):
    sel = Selection.from_heads(tiny_llama, [(1, 3), (0, 2)], method="manual")
    assert set(sel.heads()) == {(1, 3), (0, 2)} and len(sel) == 2
    with pytest.raises(ValueError, match="out of range"):
        Selection.from_heads(tiny_llama, [(5, 0)])


def test_bad_arguments_raise_before_work(tiny_llama):
    with pytest.raises(ValueError, match="baseline"):
        reinforce_select(tiny_llama, TASKS, baseline="median", progress=False)
    with pytest.raises(ValueError, match="metric"):
        reinforce_select(tiny_llama, TASKS, metric="f1", progress=False)
    with pytest.raises(ValueError, match="positions"):
        reinforce_select(tiny_llama, TASKS, positions="all", progress=False)
    with pytest.raises(ValueError, match="head means"):
        reinforce_select(tiny_llama, TASKS, head_means=torch.zeros(2, 3, 4, 16), progress=False)
    with pytest.raises(KeyError):
        soft_select(tiny_llama, ["no_such_task"], progress=False)


# ---------------------------------------------------------------------------------------------
# the comparison


def test_compare_selections_structure(tiny_llama, tmp_path):
    tasks = ["antonym", "country_capital", "english_french"]
    cmp = compare_selections(
        tiny_llama, tasks, n_mean_prompts=4, n_shots=2, n_icl_prompts=4, n_random=3, n_prompts=4, progress=False,
        methods=("zero_shot", "rho_topk", "reinforce", "soft", "random_k", "icl"),
        reinforce_kw=dict(steps=2, samples_per_step=2, n_prompts=3), soft_kw=dict(steps=2, n_prompts=3),
    )
    assert cmp.accuracy.shape == (3, 6)
    assert not torch.isnan(cmp.accuracy).any()
    assert cmp.family_accuracy().shape == (3, 6)
    assert set(cmp.selections) == {"reinforce", "soft", "rho_topk"}
    assert set(cmp.selections["reinforce"]) == {"linguistic", "knowledge", "translation"}
    text = cmp.table()
    assert "REINFORCE" in text and "linguistic" in text and "mean" in text
    assert len(cmp.plot().data) == 6
    assert cmp.to_html(tmp_path / "cmp.html").exists()
    # zero-shot column equals the plain model's first-token accuracy on the same test prompts
    from tvlens.inputs.text import first_token_accuracy, icl_prompts

    task = tvlens.load_task("antonym")
    batch = icl_prompts(tiny_llama, task, n_prompts=4, n_shots=0, seed=0, split="test")
    with torch.no_grad():
        logits = run(tiny_llama, batch.tokens, attention_mask=batch.attention_mask)[:, -1]
    assert cmp.accuracy[0, 0].item() == pytest.approx(first_token_accuracy(logits, batch))


def test_compare_selections_skips_cie_once_when_it_cannot_run(tiny_llama, monkeypatch):
    """When CIE top-k cannot be computed for the first group, it is tried once and the later groups skip it:
    one note, a NaN column, every other column scored."""
    calls = []

    def failing_cie(*args, **kw):
        calls.append(kw)
        raise ImportError("no CIE here")

    monkeypatch.setattr(sel_mod, "_cie_scores", failing_cie)
    cmp = compare_selections(tiny_llama, ["antonym", "country_capital", "english_french"], k=2, per="family",
                             methods=("zero_shot", "rho_topk", "cie_topk"), n_mean_prompts=4, n_shots=2,
                             n_prompts=4, progress=False)
    notes = [n for n in cmp.notes if n.startswith("CIE top-k skipped")]
    assert len(calls) == 1 and notes == ["CIE top-k skipped: ImportError: no CIE here"], (calls, cmp.notes)
    col = cmp.methods.index("cie_topk")
    assert torch.isnan(cmp.accuracy[:, col]).all() and not torch.isnan(cmp.accuracy[:, :col]).any()
    assert set(cmp.selections["rho_topk"]) == {"linguistic", "knowledge", "translation"}


def test_soft_selection_beats_zero_shot_on_organism(organism):
    """On the trained organism a few soft-α steps on one task already lift held-out accuracy well above zero-shot."""
    sel = soft_select(organism, ["country_capital"], steps=30, lr=0.1, n_prompts=8, n_mean_prompts=50, progress=False)
    acc = evaluate_heads(organism, ["country_capital"], torch.stack([torch.zeros_like(sel.weights), sel.weights]),
                         head_means=sel.head_means)[:, 0]
    assert acc[1] >= acc[0] + 0.3, acc


# ---------------------------------------------------------------------------------------------
# several accepted answers


def test_objective_scores_any_accepted_answer(organism):
    """(The organism: a random model's top token is not a word.) The objective's accuracy counts a prompt when its top token starts any accepted answer, its log-prob
    is the best accepted answer's; checked against one plain forward per prompt (heads' z replaced by hand)."""
    from tvlens.inputs.text import icl_prompts
    from tvlens.tasks import Task, load_task

    base = load_task("antonym")
    means = sel_mod._means_for(organism, [base], None, n_prompts=4, n_shots=2, seed=0)  # [1, layer, head, d_head]
    zs = icl_prompts(organism, base, n_prompts=len({x for x, _ in base.split("test")}), n_shots=0, split="test")
    tok = organism.tokenizer

    def row_logits(r, patched):
        def put(act, hook):
            act = act.clone()
            act[:, -1] = means[0, hook.layer()].to(act.dtype)
            return act

        hooks = [(act_name("z", l), put) for l in range(organism.cfg.n_layers)] if patched else []
        with torch.no_grad():
            return organism.run_with_hooks(zs.tokens[r][zs.attention_mask[r].bool()][None], fwd_hooks=hooks)[0, -1].double()

    ref = {(r, p): row_logits(r, p) for r in range(len(zs)) for p in (False, True)}
    extra = []
    for (r, _), lg in ref.items():  # the words the model says become further accepted answers
        w = tok.convert_ids_to_tokens([int(lg.argmax())])[0]
        if w.isalpha() and w not in base.answers_of(zs.queries[r]) and (zs.queries[r], w) not in extra:
            extra.append((zs.queries[r], w))
    multi = Task(base.name, base.family, base.instruction, tuple(base.pairs) + tuple(extra))
    weights = torch.stack([torch.zeros(4, 8), torch.ones(4, 8)])  # nothing patched / every head patched
    got = {m: PatchObjective.build(organism, [multi], means, n_prompts=None, split="test", seed=0).per_row(weights, m)
           for m in ("accuracy", "logprob")}
    first = PatchObjective.build(organism, [base], means, n_prompts=None, split="test", seed=0).per_row(weights, "accuracy")
    for r in range(len(zs)):
        ids = sorted({tok(" " + a, add_special_tokens=False)["input_ids"][0] for a in multi.answers_of(zs.queries[r])})
        for s, p in enumerate((False, True)):
            assert got["accuracy"][s, r].item() == float(int(ref[r, p].argmax()) in ids), (r, p)
            assert got["logprob"][s, r].item() == pytest.approx(float(ref[r, p].log_softmax(-1)[ids].max()), abs=1e-4)
    assert (got["accuracy"] > first).any() and (got["accuracy"] >= first).all()  # first-answer-only scoring fails
    # evaluate_heads (compare_selections's scorer) averages the same per task
    assert torch.allclose(evaluate_heads(organism, [multi], weights, head_means=means, n_prompts=None)[:, 0],
                          got["accuracy"].mean(1), atol=1e-6)


# ---------------------------------------------------------------------------------------------
# ready prompts: image queries of a VLM (Luo et al. 2024) with image-ICL head means


def _image_row(model, batch, r, layer_heads=None, mean=None, images=True):
    """Row ``r`` alone through the bridge's own run_with_hooks (its images passed by hand), the heads
    ``layer_heads[l]``' hook_z at the final position replaced by ``mean[l, h]``: (best accepted answer's
    log-prob, whether the top token starts an accepted answer)."""
    row = batch.select([r])
    real = row.attention_mask[0].bool()
    hooks = []
    for layer, heads in (layer_heads or {}).items():
        def put(act, hook, layer=layer, heads=heads):
            act = act.clone()
            act[:, -1, heads] = mean[layer, heads].to(act.dtype)
            return act

        hooks.append((act_name("z", layer), put))
    extra = {"pixel_values": row.pixel_values} if images else {}
    if images and row.token_type_ids is not None:
        extra["token_type_ids"] = row.token_type_ids[:, real]
    with torch.no_grad():
        logits = model.run_with_hooks(row.tokens[:, real], fwd_hooks=hooks, **extra)[0, -1].double()
    ids = sorted({a[0] for a in row.accepted_answer_tokens[0]})
    return float(logits.log_softmax(-1)[ids].max()), float(int(logits.argmax()) in ids)


def _reference(model, batches, means, masks, images=True):
    """[mask, row] (log-prob, accuracy) from one run_with_hooks per row and mask."""
    out = torch.zeros(masks.shape[0], sum(len(b) for b in batches), 2, dtype=torch.float64)
    for s in range(masks.shape[0]):
        heads = {l: masks[s, l].nonzero().flatten().tolist() for l in range(masks.shape[1]) if bool(masks[s, l].any())}
        rows = [_image_row(model, b, r, heads, means[t], images) for t, b in enumerate(batches) for r in range(len(b))]
        out[s] = torch.tensor(rows, dtype=torch.float64)
    return out


@pytest.mark.parametrize("fast", ["auto", False])
def test_objective_on_image_prompts_equals_run_with_hooks_per_row(vlm_model, fast):
    """Head selection's objective on image queries (one task's queries one image each, another's with 3, 1 and 1
    images and left padding), image-ICL head means patched at the final position: per row, per task and as the
    REINFORCE reward it equals one bridge run_with_hooks per row and mask with the row's images passed by hand."""
    from tvlens.inputs import multimodal as mm
    from tvlens.vectors.activation import SweepPrompts

    model = vlm_model
    L, H = model.cfg.n_layers, model.cfg.n_heads
    ctx = [mm.image_icl_prompts(model, t, n_prompts=3, n_shots=2, seed=0, split="train") for t in ("successor", "predecessor")]
    queries = [mm.image_query_prompts(model, "successor", n_prompts=3, seed=1, split="train"), padded_image_batch(model, task="custom")]
    assert bool((queries[1].attention_mask == 0).any()) and queries[1].n_images.tolist() == [3, 1, 1]
    stats = [tvlens.head_means(model, [c]) for c in ctx]
    means = torch.stack([st.mean(st.tasks[0]) for st in stats])  # [task, layer, head, d_head]
    prompts = [SweepPrompts("successor", ctx[0], {"train": queries[0]}), SweepPrompts("custom", ctx[1], {"train": queries[1]})]
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(4, L, H, generator=g) < 0.4
    masks[0], masks[1] = False, True
    ref = _reference(model, queries, means, masks)
    obj = PatchObjective.from_batches(model, queries, means, task_names=["successor", "custom"], fast=fast)
    got = torch.stack([obj.per_row(masks.float(), m) for m in ("logprob", "accuracy")], -1).double()
    assert (got - ref).abs().max().item() < 1e-5
    torch.testing.assert_close(obj.reward(masks).double(), ref[..., 0].mean(1), atol=1e-5, rtol=0)
    # the public scorer, means taken from the SweepPrompts' image-ICL context by head_means itself
    per_task = evaluate_heads(model, prompts, masks, metric="logprob", split="train", fast=fast).double()
    torch.testing.assert_close(per_task, torch.stack([ref[:, :3, 0].mean(1), ref[:, 3:, 0].mean(1)], 1), atol=1e-5, rtol=0)
    # soft selection's minibatches: a subset of rows across tasks keeps each row's own images
    rows = torch.tensor([4, 0, 3])
    sub = obj.per_row(masks.float(), "logprob", rows=rows).double()
    assert (sub - ref[:, rows, 0]).abs().max().item() < 1e-5
    # not vacuous: patching changes the scores, and so does running the rows without their images
    assert (ref[1, :, 0] - ref[0, :, 0]).abs().max() > 1e-3
    blind = _reference(model, queries, means, masks[:2], images=False)
    assert (blind[..., 0] - ref[:2, :, 0]).abs().max() > 1e-3


def test_image_prompts_bad_input_is_refused_before_any_forward(vlm_model, organism, tmp_path):
    import dataclasses

    from tvlens.inputs import multimodal as mm
    from tvlens.vectors.activation import SweepPrompts

    model = vlm_model
    L, H = model.cfg.n_layers, model.cfg.n_heads
    q = mm.image_query_prompts(model, "successor", n_prompts=2, seed=1, split="train")
    ctx = mm.image_icl_prompts(model, "successor", n_prompts=2, n_shots=2, seed=0, split="train")
    means = torch.zeros(1, L, H, model.cfg.d_head)
    w = torch.ones(1, L, H)
    counter = Forwards(model)
    try:
        with pytest.raises(ValueError, match="no head means for the ready prompts of successor"):
            evaluate_heads(model, [q], w)
        with pytest.raises(ValueError, match="prompt options .* only apply when a task is given"):
            reinforce_select(model, [q], head_means=means, example_sep="\n\n", progress=False)
        with pytest.raises(ValueError, match="no queries for split 'train'"):
            reinforce_select(model, [SweepPrompts("successor", ctx, {"test": q})], progress=False)
        with pytest.raises(TypeError, match="not a mix"):
            soft_select(model, ["successor", q], head_means=means, progress=False)
        with pytest.raises(ValueError, match="given more than once"):
            evaluate_heads(model, [q, q], w, head_means=torch.zeros(2, L, H, model.cfg.d_head))
        from types import SimpleNamespace

        no_answers = SimpleNamespace(tokens=q.tokens, attention_mask=q.attention_mask, task="successor")
        with pytest.raises(ValueError, match="carry no answers"):
            evaluate_heads(model, [no_answers], w, head_means=means)
        with pytest.raises(ValueError, match="no images"):  # an image-query batch whose images were dropped
            evaluate_heads(model, [SimpleNamespace(tokens=q.tokens, attention_mask=q.attention_mask,
                                                   answer_ids=q.answer_ids, task="successor")], w, head_means=means)
        big = dataclasses.replace(q, tokens=q.tokens.clone().index_fill_(1, torch.tensor([0]), model.cfg.d_vocab + 3))
        with pytest.raises(ValueError, match="built for another model"):
            evaluate_heads(model, [big], w, head_means=means)
        with pytest.raises(ValueError, match="select_restarts takes task names"):
            sel_mod.select_restarts(model, [SweepPrompts("successor", ctx, {"train": q})], n_restarts=2)
        with pytest.raises(ValueError, match="another model"):  # means from another model
            evaluate_heads(model, [q], w, head_means=tvlens.head_means(organism, ["successor"], n_prompts=2, n_shots=1))
        assert counter.n == 0
    finally:
        counter.close()
    text = Forwards(organism)
    try:
        with pytest.raises(ValueError, match="carry images but model .* is text-only"):
            reinforce_select(organism, [q], head_means=torch.zeros(1, 4, 8, organism.cfg.d_head), progress=False)
        assert text.n == 0
    finally:
        text.close()
    kind = "llava" if "gemma" in mm.vision_spec(model).kind else "gemma3"
    vlm2 = tvlens.load_model(build_tiny_vlm(kind, tmp_path / kind), device="cpu", require_processor=False)
    other = Forwards(vlm2)
    try:
        with pytest.raises(ValueError, match="image token is id"):  # an image batch built for another VLM
            evaluate_heads(vlm2, [q], torch.ones(1, vlm2.cfg.n_layers, vlm2.cfg.n_heads),
                           head_means=torch.zeros(1, vlm2.cfg.n_layers, vlm2.cfg.n_heads, vlm2.cfg.d_head))
        assert other.n == 0
    finally:
        other.close()


def test_reinforce_on_image_prompts_of_organism_vlm(vlm_model):
    """A short REINFORCE run on organism-vlm's no-context image queries with image-ICL head means (Hojel et al.
    2024 §3.2 on Luo et al. 2024's image prompts): it completes, and its heads' means raise held-out accuracy."""
    from tvlens.inputs import multimodal as mm
    from tvlens.vectors.activation import SweepPrompts

    model = vlm_model
    if model.cfg.n_layers != 4:
        pytest.skip("the trained organism-vlm only: a random tiny VLM has no task to find")
    tasks = ["country_capital", "successor", "next_letter"]
    prompts = [SweepPrompts(t, mm.image_icl_prompts(model, t, n_prompts=16, n_shots=5, seed=0, split="train"),
                            {sp: mm.image_query_prompts(model, t, n_prompts=16, seed=1, split=sp) for sp in ("train", "test")})
               for t in tasks]
    stats = tvlens.head_means(model, [p.context for p in prompts])
    sel = reinforce_select(model, prompts, head_means=stats, steps=30, samples_per_step=16, progress=False)
    assert sel.tasks == tuple(tasks) and sel.rewards.numel() == 30 and len(sel) >= 1
    acc = evaluate_heads(model, prompts, torch.stack([torch.zeros_like(sel.weights), sel.weights]), head_means=stats)
    print(f"\nno-context image queries (test), zero heads {acc[0].tolist()} vs {len(sel)} selected heads "
          f"{sel.heads()} {acc[1].tolist()}; reward {sel.rewards[0]:.3f} -> {sel.rewards[-1]:.3f}")
    assert acc[1].mean() > acc[0].mean() + 0.1
    torch.testing.assert_close(sel.evaluate(model, prompts), acc[1])  # the selection scores itself the same way


def test_compare_selections_on_image_prompts(vlm_model):
    """compare_selections over SweepPrompts of image queries: selections learnt on the train queries, every column
    scored on the test queries as evaluate_heads scores them, ICL from the given image-ICL prompts (checked against
    one run_with_hooks per row), CIE skipped with a note; bare batches are refused (no train/test split)."""
    from tvlens.inputs import multimodal as mm
    from tvlens.vectors.activation import SweepPrompts

    model = vlm_model
    prompts = []
    for t in ("country_capital", "successor"):
        q = {sp: mm.image_query_prompts(model, t, n_prompts=4, seed=1, split=sp) for sp in ("train", "test")}
        icl = mm.image_icl_prompts(model, t, n_shots=2, seed=0, queries=list(zip(q["test"].queries, q["test"].answers)))
        prompts.append(SweepPrompts(t, mm.image_icl_prompts(model, t, n_prompts=3, n_shots=2, seed=0, split="train"), q, icl=icl))
    cmp = compare_selections(model, prompts, per="all", n_random=2, progress=False, reinforce_kw=dict(steps=2, samples_per_step=4),
                             soft_kw=dict(steps=2))
    assert cmp.tasks == ("country_capital", "successor") and any("CIE top-k skipped" in n for n in cmp.notes)
    col = {m: j for j, m in enumerate(cmp.methods)}
    for method in ("reinforce", "soft", "rho_topk"):
        sel = cmp.selections[method]["all"]
        got = evaluate_heads(model, prompts, sel, split="test")[0].double()
        torch.testing.assert_close(cmp.accuracy[:, col[method]].double(), got, atol=1e-6, rtol=0)
    for i, p in enumerate(prompts):
        ref = [_image_row(model, p.icl, r)[1] for r in range(len(p.icl))]
        assert cmp.accuracy[i, col["icl"]].item() == pytest.approx(sum(ref) / len(ref), abs=1e-6)
        zs = [_image_row(model, p.queries["test"], r)[1] for r in range(len(p.queries["test"]))]
        assert cmp.accuracy[i, col["zero_shot"]].item() == pytest.approx(sum(zs) / len(zs), abs=1e-6)
    with pytest.raises(TypeError, match="not bare batches"):
        compare_selections(model, [p.queries["test"] for p in prompts], head_means=torch.zeros(2, model.cfg.n_layers,
                           model.cfg.n_heads, model.cfg.d_head), progress=False)


@pytest.mark.parametrize("fast", ["auto", False])
def test_ready_text_batches_score_as_the_task_path(tiny_llama, fast):
    """Ready text batches (one of zero-shot queries per task, head means from ready ICL batches) give the objective
    the task-name path builds from the same prompts, row for row; SweepPrompts take their means from the context."""
    from tvlens.inputs.text import icl_prompts
    from tvlens.vectors.activation import SweepPrompts

    m = tiny_llama
    tasks = tvlens.resolve_tasks(TASKS)
    ctx = [icl_prompts(m, t, n_prompts=4, n_shots=2, seed=0, split="train") for t in tasks]
    stats = tvlens.head_means(m, ctx)
    means = sel_mod._means_for(m, tasks, stats, n_prompts=4, n_shots=2, seed=0)
    by_name = PatchObjective.build(m, tasks, means, n_prompts=5, split="train", seed=0, fast=fast)
    zs = [icl_prompts(m, t, n_prompts=5, n_shots=0, seed=0, split="train") for t in tasks]
    ready = PatchObjective.from_batches(m, zs, means, task_names=TASKS, fast=fast)
    assert ready.inputs is None  # text rows: nothing extra travels with them
    masks = torch.rand(3, *means.shape[1:3], generator=torch.Generator().manual_seed(2)) < 0.5
    torch.testing.assert_close(ready.per_row(masks.float()), by_name.per_row(masks.float()), atol=1e-6, rtol=0)
    named = evaluate_heads(m, TASKS, masks, head_means=stats, split="train", n_prompts=5, metric="logprob", fast=fast)
    torch.testing.assert_close(evaluate_heads(m, zs, masks, head_means=stats, metric="logprob", fast=fast), named,
                               atol=1e-6, rtol=0)
    sweep = [SweepPrompts(t.name, c, {"train": z}) for t, c, z in zip(tasks, ctx, zs)]
    torch.testing.assert_close(evaluate_heads(m, sweep, masks, metric="logprob", split="train", fast=fast), named,
                               atol=1e-6, rtol=0)
