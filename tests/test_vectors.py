"""tvlens.vectors.activation (issue 9): task / function / instruction vectors, sweeps, arithmetic, storage."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens.vectors import activation as V
from tvlens.hooks import act_name, hook_count
from tvlens.inputs.text import icl_prompts
from conftest import padded_image_batch

TASK = "country_capital"
TASKS = ["country_capital", "antonym"]


def _plain_last(model, batch):
    with torch.no_grad():
        return model(batch.tokens, attention_mask=batch.attention_mask)[:, -1].float()


def _cached_mean(model, batch, layer):
    with torch.no_grad():
        _, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask,
                                        names_filter=lambda n: n == act_name("resid_pre", layer))
    return cache[act_name("resid_pre", layer)][:, -1].double().mean(0).float()


# ---------------------------------------------------------------------------------------------
# extraction


def test_task_vector_is_mean_of_cached_separator_residuals(tiny_model):
    tvs = V.task_vectors_all_layers(tiny_model, TASK, n_prompts=9, n_shots=3, seed=2, batch_size=4)
    batch = icl_prompts(tiny_model, TASK, n_prompts=9, n_shots=3, seed=2, dummy_query=True, split="test")
    assert [tv.layer for tv in tvs] == list(range(tiny_model.cfg.n_layers))
    for tv in tvs:
        ref = _cached_mean(tiny_model, batch, tv.layer)
        assert (tv.vector - ref).abs().max().item() < 1e-5
        assert tv.kind == "task" and tv.task == TASK and tv.hook_name == act_name("resid_pre", tv.layer)
        assert tv.meta.extra["n_prompts"] == 9 and tv.meta.extra["n_shots"] == 3 and tv.meta.seed == 2
    single = V.task_vector(tiny_model, TASK, layer=1, n_prompts=9, n_shots=3, seed=2)
    assert torch.allclose(single.vector, tvs[1].vector, atol=1e-6)


def test_instruction_vector_is_mean_of_instruction_prompts(tiny_llama):
    iv = V.instruction_vector(tiny_llama, TASK, layer=1, n_prompts=6, seed=1)
    batch = icl_prompts(tiny_llama, TASK, n_prompts=6, n_shots=0, seed=1, instruction="only", split="train")
    assert (iv.vector - _cached_mean(tiny_llama, batch, 1)).abs().max().item() < 1e-5
    assert iv.kind == "instruction"


# ---------------------------------------------------------------------------------------------
# applying


def test_patching_identity_reproduces_the_prompt(tiny_model):
    """Extract from prompt p at layer L and patch it back into p at L: p's own few-shot logits."""
    batch = icl_prompts(tiny_model, TASK, n_prompts=1, n_shots=4, seed=5, dummy_query=True, split="test")
    ref = _plain_last(tiny_model, batch)
    for tv in V.task_vectors_all_layers(tiny_model, TASK, n_prompts=1, n_shots=4, seed=5):
        got = V.apply_vector(tiny_model, batch, tv, mode="replace")
        assert (got - ref).abs().max().item() < 1e-5, tv.layer


def test_replace_changes_only_through_the_vector(tiny_llama):
    zs = icl_prompts(tiny_llama, TASK, n_prompts=5, n_shots=0, seed=0)
    tv = V.task_vector(tiny_llama, TASK, layer=1, n_prompts=4, n_shots=2)  # (layer 0 holds only the embedding of →)
    got = V.apply_vector(tiny_llama, zs, tv)
    assert (got - _plain_last(tiny_llama, zs)).abs().max().item() > 1e-3  # it does something
    # same numbers through the context manager, on a user forward
    with V.vector_applied(tiny_llama, tv), torch.no_grad():
        again = tiny_llama(zs.tokens, attention_mask=zs.attention_mask)[:, -1]
    assert (again - got).abs().max().item() < 1e-5


def test_add_with_alpha_zero_is_a_no_op(tiny_model):
    zs = icl_prompts(tiny_model, "antonym", n_prompts=6, n_shots=0, seed=0)
    tv = V.task_vector(tiny_model, "antonym", layer=1, n_prompts=4, n_shots=2)
    ref = _plain_last(tiny_model, zs)
    got = V.apply_vector(tiny_model, zs, tv, mode="add", alpha=0.0)
    assert (got - ref).abs().max().item() < 1e-5
    with V.vector_applied(tiny_model, tv, mode="add", alpha=0.0), torch.no_grad():
        again = tiny_model(zs.tokens, attention_mask=zs.attention_mask)[:, -1]
    assert (again - ref).abs().max().item() < 1e-5
    # alpha = 2 adds twice the vector: equal to adding 2 * tv
    a = V.apply_vector(tiny_model, zs, tv, mode="add", alpha=2.0)
    b = V.apply_vector(tiny_model, zs, 2 * tv, mode="add")
    assert (a - b).abs().max().item() < 1e-5


def test_apply_accepts_padded_token_tensors(tiny_llama):
    zs = icl_prompts(tiny_llama, "city_country", n_prompts=8, n_shots=0, seed=0)  # multi-word inputs: padding
    assert not bool(zs.attention_mask.all())
    tv = V.task_vector(tiny_llama, "city_country", layer=1, n_prompts=3, n_shots=2)
    a = V.apply_vector(tiny_llama, zs, tv)
    b = V.apply_vector(tiny_llama, zs.tokens, tv, attention_mask=zs.attention_mask)
    assert (a - b).abs().max().item() < 1e-6
    with V.vector_applied(tiny_llama, tv), torch.no_grad():
        c = tiny_llama(zs.tokens, attention_mask=zs.attention_mask)[:, -1]
    assert (a - c).abs().max().item() < 1e-4


def test_evaluate_vector_and_decode(tiny_gpt2):
    tv = V.task_vector(tiny_gpt2, TASK, layer=1, n_prompts=4, n_shots=2)
    acc = V.evaluate_vector(tiny_gpt2, TASK, tv, n_prompts=5)
    assert isinstance(acc, float) and 0.0 <= acc <= 1.0
    top = tv.decode(tiny_gpt2, 5)
    assert len(top) == 5 and all(isinstance(t, str) and 0.0 <= p <= 1.0 for t, p in top)


# ---------------------------------------------------------------------------------------------
# the sweep


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_fast_sweep_equals_naive_sweep(tiny_model, mode):
    from reference_vectors import naive_layer_sweep

    kw = dict(n_prompts=6, n_shots=3, mode=mode, seed=1, splits=("dev", "test"))
    fast = V.layer_sweep(tiny_model, TASKS, batch_size=5, **kw)
    ref = naive_layer_sweep(tiny_model, TASKS, batch_size=5, **kw)
    assert fast.tasks == tuple(TASKS) and fast.layers == tuple(range(tiny_model.cfg.n_layers))
    for name in ("accuracy", "logprob", "zero_shot", "zero_shot_logprob", "icl", "icl_logprob", "vectors"):
        got = getattr(fast, name)
        assert got.shape == ref[name].shape, name
        assert (got - ref[name]).abs().max().item() < 1e-4, name
    # the patched log-probs are not the unpatched ones (a non-trivial comparison)
    assert (fast.logprob - fast.zero_shot_logprob[..., None]).abs().max().item() > 1e-3


def test_speedups_are_exact_and_can_be_off(tiny_llama, monkeypatch):
    """The packed (shared-prefix) ICL pass and the final-position-only last block change no number."""
    fast = V.layer_sweep(tiny_llama, TASKS, n_prompts=5, n_shots=3, seed=2)
    from tvlens.engine import capabilities

    capabilities.remember(tiny_llama, "tree_mask", False)
    capabilities.remember(tiny_llama, "final_only_mlp", False)
    try:
        plain = V.layer_sweep(tiny_llama, TASKS, n_prompts=5, n_shots=3, seed=2)
    finally:
        capabilities.forget(tiny_llama)
    for name in ("accuracy", "logprob", "zero_shot", "icl", "icl_logprob", "vectors"):
        assert (getattr(fast, name) - getattr(plain, name)).abs().max().item() < 1e-5, name


@pytest.mark.parametrize("kind", ["instruction", "ensemble", "function"])
def test_sweep_of_other_vector_kinds(tiny_llama, kind):
    kw = dict(n_prompts=4, n_shots=2, seed=3)
    res = V.layer_sweep(tiny_llama, TASKS, kind=kind, function_kw=dict(k=2, n_prompts=4, n_cie_prompts=2), **kw)
    assert res.kind == kind and res.mode == ("add" if kind == "function" else "replace")
    for t, task in enumerate(TASKS):
        if kind == "function":
            fv = V.function_vector(tiny_llama, task, k=2, n_prompts=4, n_cie_prompts=2, n_shots=2, seed=3)
            want = [fv.vector] * tiny_llama.cfg.n_layers
        else:
            iv = [V.instruction_vector(tiny_llama, task, layer=l, n_prompts=4, seed=3).vector for l in res.layers]
            tv = [v.vector for v in V.task_vectors_all_layers(tiny_llama, task, n_prompts=4, n_shots=2, seed=3)]
            want = iv if kind == "instruction" else [(a + b) / 2 for a, b in zip(tv, iv)]
        for j in range(len(res.layers)):
            assert (res.vectors[t, j] - want[j]).abs().max().item() < 1e-5
        # the sweep's cells are what apply_vector gives with that vector at that layer
        n = min(4, len({x for x, _ in V._task_obj(task).split("test")}))  # as the sweep: <= n_prompts distinct queries
        zs = icl_prompts(tiny_llama, task, n_prompts=n, n_shots=0, seed=3, split="test")
        for j, layer in enumerate(res.layers):
            logits = V.apply_vector(tiny_llama, zs, res.vector(task, layer), layer=layer)
            lp = logits.log_softmax(-1)[torch.arange(len(zs)), zs.answer_ids].mean()
            assert abs(float(lp) - float(res.logprob[t, 1, j])) < 1e-4


def test_sweep_result_selection_and_outputs(tiny_llama, tmp_path):
    res = V.layer_sweep(tiny_llama, TASKS, n_prompts=4, n_shots=2)
    # plant a known curve to check the Hendel protocol: choose on dev, report on test
    acc = torch.zeros_like(res.accuracy)
    acc[:, 0, 1] = 0.9  # dev prefers layer 1
    acc[:, 1, 0] = 0.7  # test would prefer layer 0
    acc[:, 1, 1] = 0.5
    planted = V.SweepResult(**{**{f: getattr(res, f) for f in res.__dataclass_fields__}, "accuracy": acc})
    assert planted.best_layer == 1
    assert planted.best_layers == {t: 1 for t in TASKS}
    assert torch.allclose(planted.at_best(), torch.full((2,), 0.5))
    assert "TV@best" in planted.table() and "antonym" in planted.table("task")
    fig = res.plot()
    assert len(fig.data) == 2  # dev and test curves (+ baseline lines as shapes)
    html = res.to_html(tmp_path / "sweep.html")
    assert html.exists() and "plotly" in html.read_text()[:200000].lower()
    tv = res.vector("antonym", layer=1)
    assert torch.equal(tv.vector, res.vectors[1, 1]) and tv.layer == 1
    res.save(tmp_path / "sweep")
    back = V.SweepResult.load(tmp_path / "sweep", model=tiny_llama)
    assert torch.equal(back.accuracy, res.accuracy) and back.tasks == res.tasks and back.best_layer == res.best_layer


# ---------------------------------------------------------------------------------------------
# function vectors


def test_function_vector_cie_matches_naive_loop(tiny_llama):
    from tvlens.analyses.taskness import head_means

    fv = V.function_vector(tiny_llama, "antonym", k=3, n_prompts=6, n_cie_prompts=4, n_shots=3, seed=0)
    info_l, info_h = tiny_llama.cfg.n_layers, tiny_llama.cfg.n_heads
    assert fv.cie.shape == (info_l, info_h) and len(fv.top_heads) == 3 and fv.kind == "function"
    assert fv.layer == tiny_llama.cfg.n_layers // 3
    mean_z = head_means(tiny_llama, ["antonym"], n_prompts=6, n_shots=3, seed=0, split="train").mean("antonym")
    corrupted = icl_prompts(tiny_llama, "antonym", n_prompts=4, n_shots=3, seed=1, shuffle_labels=True, split="train")
    with torch.no_grad():
        p0 = _plain_last(tiny_llama, corrupted).softmax(-1)[torch.arange(4), corrupted.answer_ids]
        for l in range(info_l):
            for h in range(info_h):
                def patch(z, hook, h=h, l=l):
                    z = z.clone()
                    z[:, -1, h] = mean_z[l, h]
                    return z
                logits = tiny_llama.run_with_hooks(corrupted.tokens, attention_mask=corrupted.attention_mask,
                                                   fwd_hooks=[(act_name("z", l), patch)])[:, -1]
                p = logits.softmax(-1)[torch.arange(4), corrupted.answer_ids]
                assert abs(float((p - p0).mean()) - float(fv.cie[l, h])) < 1e-5
    order = sorted(((float(fv.cie[l, h]), l, h) for l in range(info_l) for h in range(info_h)), reverse=True)
    assert {(l, h) for _, l, h in order[:3]} == set(fv.top_heads)
    W_O = tiny_llama.W_O.detach()
    ref = sum(mean_z[l, h].float() @ W_O[l, h] for l, h in fv.top_heads)
    assert (fv.vector - ref).abs().max().item() < 1e-5
    assert fv.plot() is not None


def test_function_vector_from_given_heads_applies_at_any_layer(tiny_gpt2):
    fv = V.function_vector(tiny_gpt2, TASK, heads=[(0, 1), (1, 2)], n_prompts=4, n_shots=2, layer=1)
    assert fv.cie is None and fv.top_heads == ((0, 1), (1, 2)) and fv.layer == 1
    zs = icl_prompts(tiny_gpt2, TASK, n_prompts=3, n_shots=0)
    a = V.apply_vector(tiny_gpt2, zs, fv, layer=0)  # mode defaults to "add"; any layer allowed
    b = V.apply_vector(tiny_gpt2, zs, fv, mode="add", layer=0)
    assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# arithmetic, ensembles


def test_arithmetic_and_ensembles(tiny_llama):
    a = V.task_vector(tiny_llama, TASK, layer=1, n_prompts=3, n_shots=2)
    b = V.task_vector(tiny_llama, "antonym", layer=1, n_prompts=3, n_shots=2)
    i = V.instruction_vector(tiny_llama, TASK, layer=1, n_prompts=3)
    assert torch.allclose((a + b).vector, a.vector + b.vector)
    assert torch.allclose((a - b).vector, a.vector - b.vector)
    assert torch.allclose((2 * a).vector, 2 * a.vector) and torch.allclose((a * 2).vector, 2 * a.vector)
    assert torch.allclose((a / 4).vector, a.vector / 4) and torch.allclose((-a).vector, -a.vector)
    assert torch.allclose(V.mean([a, b, i]).vector, (a.vector + b.vector + i.vector) / 3, atol=1e-6)
    e = V.ensemble([a, i])
    assert e.kind == "ensemble" and torch.allclose(e.vector, (a.vector + i.vector) / 2, atol=1e-6)
    w = V.ensemble([a, i], weights=[3, 1])
    assert torch.allclose(w.vector, 0.75 * a.vector + 0.25 * i.vector, atol=1e-6)
    assert (a + b).kind == "arithmetic" and (a + b).layer == 1 and (a + b).config_hash == a.config_hash
    with pytest.raises(ValueError, match="weight"):
        V.ensemble([a, i], weights=[1])
    with pytest.raises(TypeError):
        a * b


def test_arithmetic_refuses_other_layer_or_model(tiny_llama, tiny_gpt2):
    a = V.task_vector(tiny_llama, TASK, layer=1, n_prompts=3, n_shots=2)
    a0 = V.task_vector(tiny_llama, TASK, layer=0, n_prompts=3, n_shots=2)
    g = V.task_vector(tiny_gpt2, TASK, layer=1, n_prompts=3, n_shots=2)
    with pytest.raises(ValueError, match=r"different layers.*") as err:
        a + a0
    assert "layer 1" in str(err.value) and "layer 0" in str(err.value)
    with pytest.raises(ValueError, match="different models") as err:
        V.ensemble([a, g])
    assert a.config_hash in str(err.value) and g.config_hash in str(err.value)


# ---------------------------------------------------------------------------------------------
# storage


def test_save_load_round_trip(tiny_llama, tmp_path):
    tv = V.task_vector(tiny_llama, TASK, layer=1, n_prompts=3, n_shots=2, seed=4)
    path = tv.save(tmp_path / "tv")
    assert path.suffix == ".safetensors" and (tmp_path / "tv.json").exists()
    back = V.TaskVector.load(tmp_path / "tv", model=tiny_llama)
    assert type(back) is V.TaskVector and torch.equal(back.vector, tv.vector)
    assert (back.layer, back.task, back.kind, back.config_hash, back.meta.seed) == (1, TASK, "task", tv.config_hash, 4)
    assert back.meta.extra["n_shots"] == 2
    fv = V.function_vector(tiny_llama, "antonym", k=2, n_prompts=3, n_cie_prompts=2, n_shots=2)
    fv.save(tmp_path / "fv")
    fback = V.TaskVector.load(tmp_path / "fv", model=tiny_llama)
    assert isinstance(fback, V.FunctionVector) and fback.top_heads == fv.top_heads
    assert torch.equal(fback.cie, fv.cie) and torch.equal(fback.vector, fv.vector)
    # no temporary files left behind (atomic writes)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fv.json", "fv.safetensors", "tv.json", "tv.safetensors"]


def test_mismatched_model_or_layer_refused(tiny_llama, tiny_gpt2, tmp_path):
    tv = V.task_vector(tiny_llama, TASK, layer=1, n_prompts=3, n_shots=2)
    tv.save(tmp_path / "tv")
    with pytest.raises(ValueError, match="config hash"):
        V.TaskVector.load(tmp_path / "tv", model=tiny_gpt2)
    zs = icl_prompts(tiny_gpt2, TASK, n_prompts=2, n_shots=0)
    with pytest.raises(ValueError, match="config hash"):
        V.apply_vector(tiny_gpt2, zs, tv)
    zl = icl_prompts(tiny_llama, TASK, n_prompts=2, n_shots=0)
    with pytest.raises(ValueError, match="extracted at layer 1"):
        V.apply_vector(tiny_llama, zl, tv, layer=0)
    with pytest.raises(ValueError, match="out of range"):
        V.apply_vector(tiny_llama, zl, V.FunctionVector(vector=tv.vector, layer=1, task="x", kind="function",
                                                        meta=tv.meta), layer=7)


# ---------------------------------------------------------------------------------------------
# bad input, before any work


@pytest.fixture
def no_forward(monkeypatch, tiny_llama):
    """Fail the test if a forward pass starts."""
    def boom(*a, **k):
        raise AssertionError("a forward pass ran before the input was checked")
    monkeypatch.setattr(V, "run_rows", boom)
    monkeypatch.setattr(V, "run_shared", boom)
    monkeypatch.setattr(V, "_vectors_from_batches", boom)
    return tiny_llama


def test_bad_input_is_refused_before_any_work(no_forward):
    m = no_forward
    with pytest.raises(ValueError, match="out of range"):
        V.task_vector(m, TASK, layer=3)  # 2 layers: 0..2 (2 = after the last block)
    with pytest.raises(ValueError, match="out of range"):
        V.layer_sweep(m, TASKS, layers=[0, 5], n_prompts=2)
    with pytest.raises(ValueError, match="n_shots"):
        V.task_vector(m, "next_letter", layer=0, n_shots=40)
    with pytest.raises(ValueError, match="n_shots"):
        V.layer_sweep(m, ["antonym", "next_letter"], n_shots=40, n_prompts=2)
    with pytest.raises(ValueError, match="splits"):
        V.layer_sweep(m, TASKS, splits=("dev", "validation"), n_prompts=2)
    with pytest.raises(ValueError, match="mode"):
        V.layer_sweep(m, TASKS, mode="swap", n_prompts=2)
    with pytest.raises(KeyError):
        V.layer_sweep(m, ["country_capitol"], n_prompts=2)
    with pytest.raises(ValueError, match="NaN"):
        V.TaskVector(vector=torch.tensor([1.0, float("nan")]), layer=0, task="x")
    with pytest.raises(ValueError, match="d_model=64"):
        V.TaskVector.from_tensor(m, torch.zeros(10), layer=0)
    zs = icl_prompts(m, TASK, n_prompts=2, n_shots=0)
    narrow = V.TaskVector(vector=torch.zeros(10), layer=0, task="x")
    with pytest.raises(ValueError, match="width 10"):
        V.apply_vector(m, zs, narrow)
    ok = V.TaskVector.from_tensor(m, torch.zeros(64), layer=0)
    with pytest.raises(ValueError, match="alpha"):
        V.apply_vector(m, zs, ok, mode="replace", alpha=2.0)
    with pytest.raises(ValueError, match="LEFT"):
        bad = zs.attention_mask.clone()
        bad[0, -1] = 0
        V.apply_vector(m, zs.tokens, ok, attention_mask=bad)


# ---------------------------------------------------------------------------------------------
# hooks never leak


def test_hooks_removed_after_exceptions(tiny_llama, monkeypatch):
    before = hook_count(tiny_llama)
    tv = V.task_vector(tiny_llama, TASK, layer=1, n_prompts=2, n_shots=2)
    zs = icl_prompts(tiny_llama, TASK, n_prompts=2, n_shots=0)
    with pytest.raises(RuntimeError, match="user code"):
        with V.vector_applied(tiny_llama, tv):
            assert hook_count(tiny_llama) > before
            raise RuntimeError("user code")
    assert hook_count(tiny_llama) == before
    # an exception inside the forward, while the patch hook is attached
    def boom(*a, **k):
        raise RuntimeError("inside the forward")
    mlp = tiny_llama.blocks[0].mlp
    object.__setattr__(mlp, "forward", boom)
    try:
        with pytest.raises(RuntimeError, match="inside the forward"):
            V.apply_vector(tiny_llama, zs, tv)
        assert hook_count(tiny_llama) == before
        with pytest.raises(RuntimeError, match="inside the forward"):
            V.task_vectors_all_layers(tiny_llama, TASK, n_prompts=2, n_shots=2)
        assert hook_count(tiny_llama) == before
    finally:
        vars(mlp).pop("forward", None)
    # an exception in the middle of a sweep (inside the patch runner)
    import tvlens.analyses.patching as P

    def fail(self, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(P.PatchRunner, "map", fail)
    with pytest.raises(KeyboardInterrupt):
        V.layer_sweep(tiny_llama, TASKS, n_prompts=2, n_shots=2)
    assert hook_count(tiny_llama) == before


# ---------------------------------------------------------------------------------------------
# the organism: the sweep must rediscover the TVP layer L*


def _tvp_layer(name: str) -> int:
    """L* as the shipped checkpoint documents it (training log), else the organism issue's 2."""
    import json

    from tvlens.models import organism_path

    for f in sorted(organism_path(name).glob("*.json")):
        data = json.loads(f.read_text())
        if isinstance(data, dict):
            for v in [data, *[x for x in data.values() if isinstance(x, dict)]]:
                if isinstance(v.get("tvp_layer"), int):
                    return v["tvp_layer"]
    return 2


def test_organism_sweep_finds_tvp_layer(organism):
    res = V.layer_sweep(organism, "country_capital,antonym,english_french,successor,past_tense,first_letter",
                        n_prompts=12, n_shots=5)
    assert res.best_layer == _tvp_layer("organism")
    d = res.summary()["all"]
    assert d["task_vector"] >= 0.8 * d["icl"]


def test_the_last_blocks_output_is_a_layer_too(tiny_llama):
    """Hendel et al.'s last layer is the output of the last block (tvlens layer n_layers): it can be
    extracted, swept and applied, and equals an independent read-out of hook_resid_post."""
    from tvlens.models import ModelInfo

    L = ModelInfo.of(tiny_llama).n_layers
    tv = V.task_vector(tiny_llama, TASKS[0], layer=L, n_prompts=4, n_shots=2, seed=1)
    ext = tvlens.icl_prompts(tiny_llama, TASKS[0], n_prompts=4, n_shots=2, seed=1, dummy_query=True, split="test")
    with torch.no_grad():
        _, cache = tiny_llama.run_with_cache(ext.tokens, attention_mask=ext.attention_mask)
    want = cache[f"blocks.{L - 1}.hook_resid_post"][:, -1].mean(0)
    torch.testing.assert_close(tv.vector, want, atol=1e-5, rtol=1e-5)
    assert tv.hook_name == f"blocks.{L - 1}.hook_resid_post"
    # replacing the stream after the last block fixes the final logits: ln_final + unembed of the vector
    zs = tvlens.icl_prompts(tiny_llama, TASKS[0], n_prompts=3, n_shots=0, seed=2)
    with torch.no_grad(), V.vector_applied(tiny_llama, tv):
        got = tiny_llama(zs.tokens, attention_mask=zs.attention_mask)[:, -1]
        fixed = tiny_llama.unembed(tiny_llama.ln_final(tv.vector[None, None]))[0, 0]
    torch.testing.assert_close(got, fixed.expand_as(got), atol=1e-4, rtol=1e-4)
    sweep = V.layer_sweep(tiny_llama, TASKS, n_prompts=3, n_shots=1, layers=[L - 1, L], seed=0)
    assert list(sweep.layers) == [L - 1, L]
    assert torch.isfinite(sweep.accuracy).all()


# ---------------------------------------------------------------------------------------------
# several accepted answers: a prompt counts when its top token starts any of them


def _row_logits(model, batch, r, layer=None, vector=None):
    """One prompt alone (no padding), plain TransformerLens forward, optionally with ``vector`` replacing the
    residual entering block ``layer`` at the last position: the final logits [d_vocab] (float64)."""
    toks = batch.tokens[r][batch.attention_mask[r].bool()][None]
    hooks = []
    if vector is not None:
        def put(act, hook):
            act = act.clone()
            act[:, -1] = vector.to(act.dtype)
            return act

        hooks = [(act_name("resid_pre", layer) if layer < model.cfg.n_layers else f"blocks.{layer - 1}.hook_resid_post", put)]
    with torch.no_grad():
        return model.run_with_hooks(toks, fwd_hooks=hooks)[0, -1].double()


def _first_ids(tok, answers):
    """Each accepted answer's first token as it follows ' →' (word-level vocabulary: the word's id)."""
    return {tok(" " + a, add_special_tokens=False)["input_ids"][0] for a in answers}


def _multi_answer_task(model, base, vectors, layers, splits=("dev", "test")):
    """``base`` with, for every input of ``splits``, the words the model predicts there (unpatched, and with
    each layer's vector) added as further accepted answers after the task's own (which stays first)."""
    from tvlens.tasks import Task

    tok = model.tokenizer
    extra = []
    for sp in splits:
        zs = icl_prompts(model, base, n_prompts=len({x for x, _ in base.split(sp)}), n_shots=0, split=sp)
        for r, x in enumerate(zs.queries):
            cands = [_row_logits(model, zs, r)] + [_row_logits(model, zs, r, l, vectors[j]) for j, l in enumerate(layers)]
            for lg in cands:
                w = tok.convert_ids_to_tokens([int(lg.argmax())])[0]
                if w.isalpha() and w not in base.answers_of(x) and (x, w) not in extra:
                    extra.append((x, w))
    return Task(base.name, base.family, base.instruction, tuple(base.pairs) + tuple(extra))


def test_sweep_counts_any_accepted_answer(tiny_model):
    """A sweep's accuracy (zero-shot, patched, ICL) counts a prompt when the top token starts ANY accepted
    answer, and its log-prob is the best accepted answer's: checked against one plain forward per prompt."""
    from tvlens.tasks import load_task

    kw = dict(n_prompts=6, n_shots=2, seed=0, layers=[0, 1, 2])
    base = load_task("antonym")
    first_only = V.layer_sweep(tiny_model, [base], **kw)
    multi = _multi_answer_task(tiny_model, base, first_only.vectors[0], kw["layers"])
    assert multi.multi_answer and multi.as_dict() == base.as_dict()  # the same first answers, the same splits
    got = V.layer_sweep(tiny_model, [multi], **kw)
    assert torch.equal(got.vectors, first_only.vectors)  # demos show the first answer: the same vectors
    tok = tiny_model.tokenizer
    for s, sp in enumerate(got.splits):
        zs = V._zero_shot_prompts(tiny_model, multi, sp, 6, 0)
        ok0, lp0 = [], []
        ok, lp = [[] for _ in kw["layers"]], [[] for _ in kw["layers"]]
        for r in range(len(zs)):
            ids = sorted(_first_ids(tok, multi.answers_of(zs.queries[r])))
            for j, (l, v) in enumerate([(None, None)] + list(zip(kw["layers"], got.vectors[0]))):
                lg = _row_logits(tiny_model, zs, r, l, v)
                (ok0 if j == 0 else ok[j - 1]).append(float(int(lg.argmax()) in ids))
                (lp0 if j == 0 else lp[j - 1]).append(float(lg.log_softmax(-1)[ids].max()))
        assert got.zero_shot[0, s].item() == pytest.approx(sum(ok0) / len(ok0), abs=1e-6)
        assert got.zero_shot_logprob[0, s].item() == pytest.approx(sum(lp0) / len(lp0), abs=1e-4)
        for j in range(len(kw["layers"])):
            assert got.accuracy[0, s, j].item() == pytest.approx(sum(ok[j]) / len(ok[j]), abs=1e-6), (sp, j)
            assert got.logprob[0, s, j].item() == pytest.approx(sum(lp[j]) / len(lp[j]), abs=1e-4), (sp, j)
    # the first answer alone scores less: the old behaviour fails this test
    assert (got.accuracy > first_only.accuracy).any()
    assert (got.accuracy >= first_only.accuracy).all() and (got.logprob >= first_only.logprob - 1e-6).all()
    # evaluate_vector scores the same prompts the same way
    for j, l in enumerate(kw["layers"]):
        assert V.evaluate_vector(tiny_model, multi, got.vector("antonym", l), n_prompts=6) == \
            pytest.approx(got.accuracy[0, -1, j].item(), abs=1e-6)


# ---------------------------------------------------------------------------------------------
# multimodal prompts (Luo et al. 2024): vectors from image-ICL prompts, patched into image queries


def _mm_row(model, batch, r, *, capture=None, layer=None, vector=None):
    """Row ``r`` alone through the bridge's own run_with_hooks, its images passed by hand: the final logits
    [d_vocab] and (``capture``) the final residual entering block ``capture``."""
    row = batch.select([r])
    real = row.attention_mask[0].bool()
    seen = {}
    hooks = []
    if capture is not None:
        def keep(act, hook):
            seen["x"] = act[0, -1].clone()  # returns None: the activation is left as it is

        hooks.append((act_name("resid_pre", capture), keep))
    if vector is not None:
        def put(act, hook):
            act = act.clone()
            act[:, -1] = vector.to(act.dtype)
            return act

        hooks.append((act_name("resid_pre", layer), put))
    extra = {k: v[:, real] if k == "token_type_ids" else v for k, v in row.model_inputs().items()}
    with torch.no_grad():
        logits = model.run_with_hooks(row.tokens[:, real], fwd_hooks=hooks, **extra)[0, -1]
    return logits.double(), seen.get("x")


def test_task_vector_from_image_prompts_equals_run_with_hooks_per_row(vlm_model):
    """task_vector / evaluate_vector / layer_sweep on multimodal batches: the vector is the mean of each image-ICL
    row's own final residual, and patching it into image queries without context gives, row by row, what the
    bridge's run_with_hooks gives with the row's images passed by hand."""
    from tvlens.inputs import multimodal as mm

    model = vlm_model
    task = mm_task()
    ctx = mm.image_icl_prompts(model, task, n_prompts=3, n_shots=2, seed=0)
    padded = padded_image_batch(model)
    assert bool((padded.attention_mask == 0).any())
    q = {sp: mm.image_query_prompts(model, task, n_prompts=3, seed=1, split=sp) for sp in ("dev", "test")}
    icl = mm.image_icl_prompts(model, task, n_shots=2, seed=0, queries=list(zip(q["test"].queries, q["test"].answers)))
    layers = [1, 2] if model.cfg.n_layers > 2 else [0, 1]
    for source in (ctx, padded):
        tvs = V.task_vectors_all_layers(model, source, layers=layers)
        for tv, l in zip(tvs, layers):
            ref = torch.stack([_mm_row(model, source, r, capture=l)[1] for r in range(len(source))]).double().mean(0)
            assert (tv.vector.double() - ref).abs().max().item() < 1e-4, (l, len(source))
            assert tv.task == source.task and tv.meta.extra["source"] == "prompts"
    tv = V.task_vector(model, ctx, layer=layers[0])
    ok, logits = [], []
    for r in range(len(q["test"])):
        lg, _ = _mm_row(model, q["test"], r, layer=layers[0], vector=tv.vector)
        logits.append(lg)
        ok.append(float(int(lg.argmax()) in {a[0] for a in q["test"].accepted_answer_tokens[r]}))
    got = V.apply_vector(model, q["test"], tv)
    assert (got.double() - torch.stack(logits)).abs().max().item() < 1e-4
    assert V.evaluate_vector(model, q["test"], tv) == pytest.approx(sum(ok) / len(ok), abs=1e-6)
    sweep = V.layer_sweep(model, [V.SweepPrompts(task, ctx, q, icl=icl)], layers=layers)
    assert torch.allclose(sweep.vectors[0], torch.stack([t.vector for t in V.task_vectors_all_layers(model, ctx, layers=layers)]),
                          atol=1e-5)
    for s, sp in enumerate(sweep.splits):
        for j, l in enumerate(layers):
            ref = [float(int(_mm_row(model, q[sp], r, layer=l, vector=sweep.vectors[0, j])[0].argmax()) in
                         {a[0] for a in q[sp].accepted_answer_tokens[r]}) for r in range(len(q[sp]))]
            assert sweep.accuracy[0, s, j].item() == pytest.approx(sum(ref) / len(ref), abs=1e-6), (sp, l)
        base = [float(int(_mm_row(model, q[sp], r)[0].argmax()) in {a[0] for a in q[sp].accepted_answer_tokens[r]})
                for r in range(len(q[sp]))]
        assert sweep.zero_shot[0, s].item() == pytest.approx(sum(base) / len(base), abs=1e-6)
    icl_ref = [float(int(_mm_row(model, icl, r)[0].argmax()) in {a[0] for a in icl.accepted_answer_tokens[r]})
               for r in range(len(icl))]
    assert sweep.icl[0].item() == pytest.approx(sum(icl_ref) / len(icl_ref), abs=1e-6)


def test_multimodal_vectors_refuse_bad_input_before_any_forward(vlm_model, tiny_llama, monkeypatch):
    from tvlens.inputs import multimodal as mm

    model = vlm_model
    q = mm.image_query_prompts(model, mm_task(), n_prompts=2, seed=1)
    tv = V.task_vector(model, q, layer=1)
    import tvlens.engine.readout as R

    def boom(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(V, "run_rows", boom)
    monkeypatch.setattr(R, "run_rows", boom)
    with pytest.raises(ValueError, match="carry images but model .* is text-only"):
        V.task_vector(tiny_llama, q, layer=1)
    with pytest.raises(ValueError, match="prompt options .* only apply when a task is given"):
        V.evaluate_vector(model, q, tv, example_sep="\n\n")
    with pytest.raises(ValueError, match="no queries for split"):
        V.layer_sweep(model, V.SweepPrompts("t", q, {"test": q}), splits=("dev", "test"))
    with pytest.raises(ValueError, match="kind='task' only"):
        V.layer_sweep(model, V.SweepPrompts("t", q, {"dev": q, "test": q}), kind="function")
    with pytest.raises(TypeError, match="SweepPrompts.context must be a prompt batch"):
        V.SweepPrompts("t", "antonym", {"test": q})


def mm_task():
    """A task with pictures (numbers: 7-segment digits)."""
    return "successor"


def test_function_vector_names_its_head_count_k(tiny_llama):
    """k is how many top-CIE heads are summed (n_heads is a model's head count everywhere else): the
    old keyword is refused with the new one named, before any prompt or forward."""
    with pytest.raises(TypeError, match=r"takes k="):
        V.function_vector(tiny_llama, "antonym", n_heads=2, n_prompts=3, n_cie_prompts=2, n_shots=2)
