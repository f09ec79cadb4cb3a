"""tvlens.analyses.patching: the fast sweeps equal the naive one-forward-per-site loop (tests/reference_patching.py)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import reference_patching as ref
from tvlens.hooks import hook_count
from tvlens.analyses.patching import PatchResult, attribution_patch_heads, patch_heads, patch_positions
from tvlens.engine import Edit, PatchRunner, add_resid, blend_heads, final_position_logits, replace_heads, replace_resid

ATOL = 1e-4


def make_batch(model, *, n: int = 3, n_pos: int = 7, seed: int = 0, pad: bool = True) -> SimpleNamespace:
    """Random left-padded prompts with random answers (a PromptBatch stand-in)."""
    g = torch.Generator().manual_seed(seed)
    vocab = model.cfg.d_vocab
    tokens = torch.randint(4, vocab, (n, n_pos), generator=g)
    mask = torch.ones_like(tokens)
    if pad:
        for i in range(n):
            mask[i, : (i * 2) % max(1, n_pos - 2)] = 0
    tokens = tokens * mask
    return SimpleNamespace(tokens=tokens, attention_mask=mask, answer_ids=torch.randint(4, vocab, (n,), generator=g))


def metric_fn(name, model, batch):
    if name == "logit_diff":
        return ref.logit_diff_against(ref.default_foil(model, batch))
    return getattr(ref, name)


@pytest.fixture(scope="module")
def pair_gpt2(tiny_gpt2):
    return make_batch(tiny_gpt2, seed=1), make_batch(tiny_gpt2, seed=2)


@pytest.fixture(scope="module")
def pair_llama(tiny_llama):
    return make_batch(tiny_llama, seed=1), make_batch(tiny_llama, seed=2)


@pytest.fixture
def pair(tiny_model, request):
    return make_batch(tiny_model, seed=1), make_batch(tiny_model, seed=2)


# ------------------------------------------------------------------------------------------------
# exactness against the naive loop


@pytest.mark.parametrize("positions", ["final", "all", "each"])
def test_patch_heads_equals_naive(tiny_model, pair, positions):
    target, source = pair
    metric = "logprob"
    before = hook_count(tiny_model)  # the bridge keeps a few module hooks of its own
    got = patch_heads(tiny_model, target, source, positions=positions, metric=metric, progress=False, fast=True)
    want = ref.naive_patch_heads(tiny_model, target, source, positions=positions, metric=ref.logprob)
    assert got.values.shape == want.shape
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)
    assert hook_count(tiny_model) == before


@pytest.mark.parametrize("component", ["k", "v", "q"])
@pytest.mark.parametrize("positions", ["final", "all"])
def test_patch_heads_kv_components(tiny_model, pair, component, positions):
    """k/v are per key-value head (2 on the GQA llama, TL #980), q per query head."""
    target, source = pair
    got = patch_heads(tiny_model, target, source, positions=positions, component=component, metric="prob",
                      progress=False, fast=True)
    want = ref.naive_patch_heads(tiny_model, target, source, positions=positions, metric=ref.prob, component=component)
    n_kv = tiny_model.cfg.n_key_value_heads or tiny_model.cfg.n_heads
    assert got.values.shape[1] == (n_kv if component in "kv" else tiny_model.cfg.n_heads)
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)


def test_patch_heads_each_kv_on_gqa(tiny_llama, pair_llama):
    target, source = pair_llama
    got = patch_heads(tiny_llama, target, source, positions="each", component="v", metric="logprob", progress=False)
    want = ref.naive_patch_heads(tiny_llama, target, source, positions="each", metric=ref.logprob, component="v")
    assert got.values.shape == (2, 2, target.tokens.shape[1])
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("metric", ["logit_diff", "prob", "accuracy", "custom"])
def test_metrics_equal_naive(tiny_gpt2, pair_gpt2, metric):
    target, source = pair_gpt2
    if metric == "custom":
        def custom(logits, batch):  # answer logit minus mean logit
            return logits[torch.arange(len(logits)), batch.answer_ids] - logits.mean(-1)
        m, want_fn = custom, custom
    else:
        m, want_fn = metric, metric_fn(metric, tiny_gpt2, target)
    got = patch_heads(tiny_gpt2, target, source, metric=m, progress=False)
    want = ref.naive_patch_heads(tiny_gpt2, target, source, positions="final", metric=want_fn)
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("hook", ["resid_pre", "attn_out", "mlp_out"])
def test_patch_positions_equals_naive(tiny_model, pair, hook):
    target, source = pair
    got = patch_positions(tiny_model, target, source, hook=hook, metric="logprob", progress=False, fast=True)
    want = ref.naive_patch_positions(tiny_model, target, source, hook=hook, metric=ref.logprob)
    assert got.dims == ("layer", "pos") and got.values.shape == want.shape
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)


def test_final_position_allows_different_lengths(tiny_llama):
    target = make_batch(tiny_llama, n_pos=7, seed=3)
    source = make_batch(tiny_llama, n_pos=10, seed=4)
    got = patch_heads(tiny_llama, target, source, metric="logprob", progress=False)
    want = ref.naive_patch_heads(tiny_llama, target, source, positions="final", metric=ref.logprob)
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# identity, means, chunking, normalisation


@pytest.mark.parametrize("positions", ["final", "all", "each"])
def test_identity_patch_gives_target_metric(tiny_model, positions):
    target = make_batch(tiny_model, seed=5)
    res = patch_heads(tiny_model, target, target, positions=positions, metric="logprob", progress=False)
    clean = float(ref.logprob(ref.forward(tiny_model, target), target).mean())
    assert res.target_value == pytest.approx(clean, abs=1e-5)
    torch.testing.assert_close(res.values, torch.full_like(res.values, clean), atol=1e-5, rtol=0)
    pos = patch_positions(tiny_model, target, target, metric="logprob", progress=False)
    torch.testing.assert_close(pos.values, torch.full_like(pos.values, clean), atol=1e-5, rtol=0)


@pytest.mark.parametrize("positions", ["final", "all"])
def test_means_patching_equals_naive(tiny_model, positions):
    target = make_batch(tiny_model, n=4, seed=6)
    z = ref.cache_acts(tiny_model, target, "z")
    means = torch.stack([z[l][:, -1].mean(0) for l in range(tiny_model.cfg.n_layers)])  # [layer, head, d_head]
    got = patch_heads(tiny_model, target, means, positions=positions, metric="prob", progress=False)
    want = ref.naive_patch_heads(tiny_model, target, None, positions=positions, metric=ref.prob, means=means)
    torch.testing.assert_close(got.values, want, atol=ATOL, rtol=0)
    assert got.source_value is None and got.meta["source"] == "means"
    # a HeadStats-like object (z_mean [task, layer, head, d_head], float64 as tvlens.analyses.taskness stores it)
    stats = SimpleNamespace(z_mean=means[None].double(), tasks=("t",), layers=tuple(range(tiny_model.cfg.n_layers)))
    again = patch_heads(tiny_model, target, stats, positions=positions, metric="prob", progress=False)
    torch.testing.assert_close(again.values, got.values, atol=1e-5, rtol=0)


def test_chunked_equals_unchunked(tiny_llama):
    target, source = make_batch(tiny_llama, n=5, seed=7), make_batch(tiny_llama, n=5, seed=8)
    whole = patch_heads(tiny_llama, target, source, positions="all", metric="logprob", progress=False)
    rows = patch_heads(tiny_llama, target, source, positions="all", metric="logprob", batch_size=3, progress=False)
    tiny = patch_heads(tiny_llama, target, source, positions="all", metric="logprob", max_memory=1, progress=False)
    torch.testing.assert_close(rows.values, whole.values, atol=1e-5, rtol=0)
    torch.testing.assert_close(tiny.values, whole.values, atol=1e-5, rtol=0)
    final = patch_heads(tiny_llama, target, source, metric="logit_diff", progress=False)
    final_chunked = patch_heads(tiny_llama, target, source, metric="logit_diff", max_memory=1, progress=False)
    torch.testing.assert_close(final_chunked.values, final.values, atol=1e-5, rtol=0)


def test_normalize(tiny_gpt2, pair_gpt2):
    target, source = pair_gpt2
    raw = patch_heads(tiny_gpt2, target, source, metric="logit_diff", progress=False)
    norm = patch_heads(tiny_gpt2, target, source, metric="logit_diff", normalize=True, progress=False)
    expect = (raw.values - raw.target_value) / (raw.source_value - raw.target_value)
    torch.testing.assert_close(norm.values, expect, atol=1e-5, rtol=1e-5)
    assert norm.normalized and norm.source_value == pytest.approx(raw.source_value)


def test_subset_of_sites_is_nan_elsewhere(tiny_gpt2, pair_gpt2):
    target, source = pair_gpt2
    full = patch_heads(tiny_gpt2, target, source, metric="logprob", progress=False)
    part = patch_heads(tiny_gpt2, target, source, metric="logprob", layers=[1], heads=[0, 2], progress=False)
    assert torch.isnan(part.values[0]).all() and torch.isnan(part.values[1, 1])
    torch.testing.assert_close(part.values[1, [0, 2]], full.values[1, [0, 2]], atol=1e-6, rtol=0)


# ------------------------------------------------------------------------------------------------
# hooks and caches are released


def test_no_hooks_left_after_sweeps(tiny_model, pair):
    target, source = pair
    before = hook_count(tiny_model)
    patch_heads(tiny_model, target, source, positions="each", metric="prob", progress=False)
    patch_positions(tiny_model, target, source, progress=False)
    attribution_patch_heads(tiny_model, target, source, metric="logprob")
    assert hook_count(tiny_model) == before
    for hp in tiny_model.hook_dict.values():
        assert len(hp.fwd_hooks) == 0 and len(hp.bwd_hooks) == 0


@pytest.mark.parametrize("positions", ["final", "all"])
def test_no_hooks_left_after_exception_in_metric(tiny_model, pair, positions):
    target, source = pair
    before = hook_count(tiny_model)
    calls = {"n": 0}

    def flaky(logits, batch):
        calls["n"] += 1
        if calls["n"] == 4:  # mid-sweep: after the shape check and a few sites
            raise RuntimeError("boom")
        return logits[:, 0]

    with pytest.raises(RuntimeError, match="boom"):
        patch_heads(tiny_model, target, source, positions=positions, metric=flaky, batch_size=len(target.tokens),
                    progress=False)
    assert calls["n"] == 4
    assert hook_count(tiny_model) == before
    for hp in tiny_model.hook_dict.values():
        assert len(hp.fwd_hooks) == 0
    # and the model still gives its clean logits
    torch.testing.assert_close(ref.forward(tiny_model, target), PatchRunner(tiny_model, target).clean_logits)


# ------------------------------------------------------------------------------------------------
# the reusable engine: resid edits (vectors.layer_sweep), head masks and soft weights (selection)


def test_runner_layer_sweep_columns(tiny_model):
    batch = make_batch(tiny_model, n=4, seed=9)
    L, d = tiny_model.cfg.n_layers, tiny_model.cfg.d_model
    g = torch.Generator().manual_seed(0)
    vec = torch.randn(L, d, generator=g)
    runner = PatchRunner(tiny_model, batch, fast=True)
    edits = [replace_resid(l, vec[l], columns=l) for l in range(L)]
    edits += [add_resid(l, vec[l], alpha=0.5, columns=L + l) for l in range(L)]
    got = runner.logits(edits, n_columns=2 * L)
    want = ref.naive_resid_columns(tiny_model, batch, [(l, vec[l], "replace") for l in range(L)]
                                   + [(l, 0.5 * vec[l], "add") for l in range(L)])
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)
    # chunked map with a reduction gives the same
    lp = runner.map(edits, lambda lg: lg.log_softmax(-1)[..., 0], n_columns=2 * L, batch_size=len(batch.tokens))
    torch.testing.assert_close(lp, want.log_softmax(-1)[..., 0], atol=ATOL, rtol=0)
    # identity: replacing with the clean residual, or adding zero, reproduces the clean logits
    same = runner.logits([replace_resid(l, runner.clean_resid(l)[:, -1][:, None], columns=l) for l in range(L)]
                         + [add_resid(0, torch.zeros(d), columns=L)], n_columns=L + 1)
    torch.testing.assert_close(same, runner.clean_logits[:, None].expand_as(same), atol=1e-5, rtol=0)
    torch.testing.assert_close(final_position_logits(tiny_model, batch, edits, 2 * L), got, atol=1e-6, rtol=0)


def test_runner_head_masks_match_naive(tiny_model):
    """REINFORCE-style columns: one random head mask per column, task means patched at the final position."""
    batch = make_batch(tiny_model, n=3, seed=10)
    L, H = tiny_model.cfg.n_layers, tiny_model.cfg.n_heads
    z = ref.cache_acts(tiny_model, batch, "z")
    means = torch.stack([z[l][:, -1].mean(0) for l in range(L)])
    masks = (torch.rand(5, L, H, generator=torch.Generator().manual_seed(1)) < 0.4).float()
    runner = PatchRunner(tiny_model, batch, fast=True)
    got = runner.logits([replace_heads(l, masks[:, l], means[l]) for l in range(L)], n_columns=5)
    for s in range(5):
        def patch(act, hook, s=s):
            l = int(hook.name.split(".")[1])
            act = act.clone()
            m = masks[s, l][None, :, None]
            act[:, -1] = act[:, -1] * (1 - m) + m * means[l]
            return act
        want = ref.forward(tiny_model, batch, [(ref.HOOK["z"].format(l), patch) for l in range(L)])
        torch.testing.assert_close(got[:, s], want, atol=ATOL, rtol=0)


def test_runner_soft_weights_gradient(tiny_llama):
    """Soft per-head alpha (selection): gradients of the fast path equal the full-forward path's."""
    batch = make_batch(tiny_llama, n=2, seed=11)
    L, H = tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads
    z = ref.cache_acts(tiny_llama, batch, "z")
    means = torch.stack([z[l][:, -1].mean(0) for l in range(L)]) + 0.5
    grads = []
    for fast in (True, False):
        alpha = torch.full((L, H), 0.3, requires_grad=True)
        runner = PatchRunner(tiny_llama, batch, fast=fast)
        logits = runner.logits([blend_heads(l, alpha[l], means[l]) for l in range(L)], n_columns=1)
        loss = -logits[:, 0].log_softmax(-1)[torch.arange(2), batch.answer_ids].mean()
        grads.append(torch.autograd.grad(loss, alpha)[0])
    assert grads[0].abs().sum() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-5, rtol=1e-4)


def test_runner_suffix_edits(tiny_model):
    """start_pos=p recomputes positions p.. ; Edit.pos patches one of them, pos=None all of them."""
    batch = make_batch(tiny_model, n=3, n_pos=8, seed=12)
    d = tiny_model.cfg.d_model
    vec = torch.randn(d, generator=torch.Generator().manual_seed(3))
    runner = PatchRunner(tiny_model, batch, fast=True)
    got = runner.logits([Edit(1, "resid_pre", value=vec, columns=0, pos=4), Edit(0, "mlp_out", add=vec, columns=1)],
                        n_columns=2, start_pos=3)

    def at4(act, hook):
        act = act.clone()
        act[:, 4] = vec
        return act

    def from3(act, hook):
        act = act.clone()
        act[:, 3:] = act[:, 3:] + vec
        return act

    torch.testing.assert_close(got[:, 0], ref.forward(tiny_model, batch, [(ref.HOOK["resid_pre"].format(1), at4)]), atol=ATOL, rtol=0)
    torch.testing.assert_close(got[:, 1], ref.forward(tiny_model, batch, [(ref.HOOK["mlp_out"].format(0), from3)]), atol=ATOL, rtol=0)


# ------------------------------------------------------------------------------------------------
# attribution patching


def _linear_toy(tmp_path_factory):
    """A GPT-2 whose every map is linear: linear MLP, LayerNorm ~ centring (huge eps, matching gain),
    zero queries (uniform attention).  Attribution patching is exact on it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    import tvlens
    from conftest import vocabulary
    from tvlens.organisms.text.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary())
    torch.manual_seed(0)
    eps = 1e10
    cfg = GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=64, activation_function="linear",
                     initializer_range=0.3,
                     layer_norm_epsilon=eps, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id)
    model = GPT2LMHeadModel(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "ln" in name and name.endswith("weight"):
                p.fill_(eps ** 0.5)
        for block in model.transformer.h:
            block.attn.c_attn.weight[:, : cfg.n_embd] = 0  # W_Q
            block.attn.c_attn.bias[: cfg.n_embd] = 0
    out = tmp_path_factory.mktemp("linear_toy")
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return tvlens.load_model(out, device="cpu")


@pytest.mark.parametrize("positions", ["final", "all", "each"])
def test_attribution_exact_on_linear_toy(tmp_path_factory, positions):
    model = _linear_toy(tmp_path_factory)
    target, source = make_batch(model, n=3, seed=13, pad=False), make_batch(model, n=3, seed=14, pad=False)
    target.foil_ids = torch.tensor([5, 6, 7])
    att = attribution_patch_heads(model, target, source, metric="logit_diff", positions=positions)
    exact = patch_heads(model, target, source, metric="logit_diff", positions=positions, progress=False)
    effect = exact.values - exact.target_value
    assert effect.abs().max() > 1e-3  # the patches do something
    torch.testing.assert_close(att.values, effect, atol=1e-4 * float(effect.abs().max()), rtol=0)


def test_attribution_confirm_top_reports_correlation(tiny_gpt2, pair_gpt2):
    target, source = pair_gpt2
    att = attribution_patch_heads(tiny_gpt2, target, source, metric="logprob", confirm_top=5)
    assert att.method == "attribution" and att.values.shape == (2, 4)
    assert int(torch.isfinite(att.exact).sum()) == 5
    assert att.correlation is not None and -1 <= att.correlation <= 1
    exact = patch_heads(tiny_gpt2, target, source, metric="logprob", progress=False)
    done = torch.isfinite(att.exact)
    torch.testing.assert_close(att.exact[done], (exact.values - exact.target_value)[done], atol=1e-5, rtol=0)
    # the estimates are the linearisation: close to exact effects for these small random patches
    every = attribution_patch_heads(tiny_gpt2, target, source, metric="logprob", confirm_top="all")
    assert every.correlation > 0.5


# ------------------------------------------------------------------------------------------------
# bad input: clear errors before any sweep work


def test_bad_inputs(tiny_gpt2):
    m = tiny_gpt2
    before = hook_count(m)
    t3, s2 = make_batch(m, n=3, seed=1), make_batch(m, n=2, seed=2)
    with pytest.raises(ValueError, match="target has 3 prompts but source has 2"):
        patch_heads(m, t3, s2, progress=False)
    short = make_batch(m, n=3, n_pos=5, seed=2)
    with pytest.raises(ValueError, match="target has 7 positions but source has 5"):
        patch_heads(m, t3, short, positions="all", progress=False)
    with pytest.raises(ValueError, match="positions"):
        patch_positions(m, t3, short, progress=False)
    with pytest.raises(ValueError, match="unknown hook 'resid_foo'"):
        patch_positions(m, t3, t3, hook="resid_foo", progress=False)
    with pytest.raises(ValueError, match="unknown hook"):
        PatchRunner(m, t3).logits([Edit(0, "hook_nope", value=torch.zeros(1))])
    with pytest.raises(ValueError, match="empty site list"):
        patch_heads(m, t3, t3, layers=[], progress=False)
    with pytest.raises(ValueError, match="empty site list"):
        patch_heads(m, t3, t3, sites=[], progress=False)
    with pytest.raises(ValueError, match="out of range"):
        patch_heads(m, t3, t3, layers=[7], progress=False)
    with pytest.raises(ValueError, match="unknown positions"):
        patch_heads(m, t3, t3, positions="middle", progress=False)
    with pytest.raises(ValueError, match="unknown metric"):
        patch_heads(m, t3, t3, metric="kl", progress=False)
    with pytest.raises(ValueError, match="shape"):
        patch_heads(m, t3, torch.zeros(2, 3, 16), progress=False)
    with pytest.raises(ValueError, match="normalize"):
        patch_heads(m, t3, torch.zeros(2, 4, 16), normalize=True, progress=False)
    with pytest.raises(ValueError, match="differentiable"):
        attribution_patch_heads(m, t3, t3, metric="accuracy")
    padded_end = make_batch(m, n=2, seed=3)
    padded_end.attention_mask[0, -1] = 0
    with pytest.raises(ValueError, match="LEFT-padded"):
        patch_heads(m, padded_end, padded_end, progress=False)
    no_answers = SimpleNamespace(tokens=t3.tokens, attention_mask=t3.attention_mask)
    with pytest.raises(ValueError, match="answer_ids"):
        patch_heads(m, no_answers, no_answers, metric="prob", progress=False)
    assert hook_count(m) == before


def test_metric_wrong_shape_fails_before_sweep(tiny_gpt2, pair_gpt2):
    target, source = pair_gpt2
    calls = {"n": 0}

    def scalar(logits, batch):
        calls["n"] += 1
        return logits.mean()

    with pytest.raises(ValueError, match=r"returned \(\) for 3 prompts"):
        patch_heads(tiny_gpt2, target, source, metric=scalar, progress=False)
    assert calls["n"] == 1  # checked on the clean run, no site was patched


# ------------------------------------------------------------------------------------------------
# results


def test_result_object(tiny_gpt2, pair_gpt2, tmp_path):
    target, source = pair_gpt2
    res = patch_heads(tiny_gpt2, target, source, metric="logprob", progress=False)
    assert isinstance(res, PatchResult) and res.dims == ("layer", "head")
    with pytest.raises(Exception):
        res.metric = "x"  # frozen
    top = res.top(3)
    assert len(top) == 3 and top[0][2] >= top[1][2] >= top[2][2]
    l, h, v = top[0]
    assert v == pytest.approx(float(res.values[l, h]))
    fig = res.plot()
    assert fig.data[0].zmid == 0 and fig.data[0].zmin == -fig.data[0].zmax  # diverging, centred at 0
    import numpy as np
    np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), (res.values - res.target_value).numpy(), atol=1e-6)
    path = res.to_html(tmp_path / "heads.html")
    assert path.exists() and path.stat().st_size > 1000
    res.save(tmp_path / "heads")
    back = PatchResult.load(tmp_path / "heads", model=tiny_gpt2)
    torch.testing.assert_close(back.values, res.values)
    assert back.dims == res.dims and back.target_value == res.target_value and back.metric == "logprob"
    assert back.meta == res.meta  # the whole provenance survives the file
    pos = patch_positions(tiny_gpt2, target, source, progress=False)
    pos.plot()
    each = patch_heads(tiny_gpt2, target, source, positions="each", metric="logprob", progress=False)
    assert each.dims == ("layer", "head", "pos") and len(each.pos_labels) == target.tokens.shape[1]
    each.plot(pos=-1)


def test_with_real_prompt_batch(tiny_gpt2):
    """PromptBatch from tvlens.inputs.text: ICL prompts patched into zero-shot prompts of another length."""
    prompts = pytest.importorskip("tvlens.inputs.text")
    icl = prompts.icl_prompts(tiny_gpt2, "country_capital", n_prompts=4, n_shots=3, seed=0)
    zero = prompts.icl_prompts(tiny_gpt2, "country_capital", n_prompts=4, n_shots=0, seed=0)
    res = patch_heads(tiny_gpt2, zero, icl, metric="logprob", progress=False)
    want = ref.naive_patch_heads(tiny_gpt2, zero, icl, positions="final", metric=ref.logprob)
    torch.testing.assert_close(res.values, want, atol=ATOL, rtol=0)


def test_edit_shape_errors_before_work(tiny_llama):
    batch = make_batch(tiny_llama, n=3, seed=15)
    runner = PatchRunner(tiny_llama, batch)
    with pytest.raises(ValueError, match=r"does not broadcast to the activation \[batch, column, head, d_head\]"):
        runner.logits([Edit(0, "z", value=torch.zeros(4, 8))], n_columns=2)  # d_head is 16
    with pytest.raises(ValueError, match="does not broadcast"):
        runner.logits([Edit(0, "k", value=torch.zeros(4, 16))])  # GQA: 2 key-value heads, not 4
    with pytest.raises(ValueError, match="does not broadcast"):
        runner.logits([replace_resid(1, torch.zeros(2, 1, 64))])  # 2 prompts for a batch of 3
    with pytest.raises(ValueError, match="names column 5"):
        runner.logits([replace_resid(1, torch.zeros(64), columns=5)], n_columns=2)
    with pytest.raises(ValueError, match="before the recomputed suffix"):
        runner.logits([Edit(0, "resid_pre", value=torch.zeros(64), pos=1)], start_pos=3)


def test_result_meta_is_one_type_read_by_key(tiny_gpt2, pair_gpt2):
    """Patching results carry the same ResultMeta as vectors and selections, readable by key."""
    from tvlens.models import ModelInfo
    from tvlens.results import ResultMeta

    target, source = pair_gpt2
    res = patch_heads(tiny_gpt2, target, source, metric="logprob", progress=False)
    info = ModelInfo.of(tiny_gpt2)
    assert type(res.meta) is ResultMeta
    assert (res.meta["model"], res.meta["config_hash"]) == (info.name, info.config_hash)
    assert res.meta["executor"] == res.meta.extra["executor"] and "executor" in res.meta
    assert res.meta.get("no such key", 7) == 7 and "no such key" not in res.meta
    with pytest.raises(KeyError):
        res.meta["no such key"]
    flat = ResultMeta.from_dict({"model": "m", "config_hash": "h", "what": "older flat file"})
    assert flat["what"] == "older flat file" and flat.model == "m"
