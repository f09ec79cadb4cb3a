"""Logit lens and vector decoding (issue 8).

The lens is compared with an independent computation: the full ``run_with_cache`` cache, the
model's final norm written out by hand (``F.layer_norm`` / the RMSNorm formula) with the
weights and epsilon of the model's own module, ``@ W_U + b_U``. The tiny models of conftest
have ``ln_final`` weight 1 and bias 0 and near-uniform outputs, which would hide a lens that
ignores the norm's weights; the ``sharp`` models below give the final norm random weights and
bias and scale the unembedding so the distributions are peaked.
"""

from __future__ import annotations

import shutil

import re

import pytest
import torch
import torch.nn.functional as F

import tvlens
from tvlens import hooks
from tvlens.analyses.lens import LensResult, Phases, decode, instruction_words, lens_summary, logit_lens
from tvlens.models import ModelInfo
from tvlens.inputs.text import TokenClass, icl_prompts

TASK = "country_capital"


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def sharp(request, tiny_dirs, tmp_path_factory):
    """A tiny model whose final norm has non-trivial weight (and bias) and whose unembedding is scaled up."""
    from transformers import AutoModelForCausalLM

    kind = request.param
    out = tmp_path_factory.mktemp(f"sharp_{kind}")
    shutil.copytree(tiny_dirs[kind], out, dirs_exist_ok=True)
    hf = AutoModelForCausalLM.from_pretrained(out)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        norm = hf.transformer.ln_f if kind == "gpt2" else hf.model.norm
        norm.weight.copy_(0.5 + 1.5 * torch.rand(norm.weight.shape, generator=g))
        if getattr(norm, "bias", None) is not None:
            norm.bias.copy_(0.3 * torch.randn(norm.bias.shape, generator=g))
        head = hf.get_output_embeddings()
        if kind == "gpt2":  # tied to the input embedding: scale a copy instead
            hf.config.tie_word_embeddings = False
            head.weight = torch.nn.Parameter(head.weight.detach().clone() * 40)
        else:
            head.weight.mul_(40)
    hf.save_pretrained(out)
    model = tvlens.load_model(out, device="cpu")
    model.test_kind = kind
    return model


def _by_hand(model, kind, resid):
    """Final norm with the model's own weights and eps, written out; then the unembedding."""
    module = model.ln_final.original_component
    x = resid.float()
    if kind == "gpt2":
        x = F.layer_norm(x, (x.shape[-1],), module.weight.float(), module.bias.float(), module.eps)
    else:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon) * module.weight.float()
    return x @ model.W_U.float() + model.b_U.float()


def _reference(model, kind, batch):
    """[batch, layer, d_vocab] log-probs from run_with_cache at the final separator."""
    n = model.cfg.n_layers
    names = [f"blocks.{l}.hook_resid_pre" for l in range(n)] + [f"blocks.{n - 1}.hook_resid_post"]
    with torch.no_grad():
        logits, cache = model.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    resid = torch.stack([cache[name][:, -1] for name in names], 1)
    return _by_hand(model, kind, resid).log_softmax(-1), logits[:, -1].float().log_softmax(-1)


def test_layers_equal_independent_computation(sharp):
    kind = sharp.test_kind
    batch = icl_prompts(sharp, TASK, n_prompts=6, n_shots=3, seed=1)
    words = ["capital", "city", "country"]
    res = logit_lens(sharp, batch, top_k=7, task_words=words, batch_size=4)  # 2 chunks
    ref_logp, out_logp = _reference(sharp, kind, batch)
    n = sharp.cfg.n_layers
    assert res.layers == tuple(range(n + 1))
    ref_mean = ref_logp.exp().mean(0)
    # the distributions are peaked (the test is not trivially met by near-uniform ones)
    assert ref_mean.max() > 0.05
    assert torch.allclose(res.mean_probs, ref_mean, atol=1e-5, rtol=0)
    assert torch.allclose(res.mean_probs.clamp_min(1e-30).log(), ref_mean.clamp_min(1e-30).log(), atol=1e-4)
    top = ref_mean.topk(7, -1)
    assert torch.allclose(res.top_probs, top.values, atol=1e-5)
    assert torch.equal(res.top_ids, top.indices)
    # per-prompt answer probability and rank
    ans = batch.answer_ids
    ref_ans_logp = ref_logp.gather(2, ans[:, None, None].expand(-1, n + 1, 1))[..., 0]
    assert torch.allclose(res.answer_prob.log(), ref_ans_logp, atol=1e-4)
    ref_rank = (ref_logp > ref_ans_logp[..., None]).sum(-1).float() + 1
    assert torch.equal(res.answer_rank, ref_rank)
    # the query input's first token
    q = batch.positions_of(TokenClass.QUERY_INPUT).float().argmax(1)
    inp = batch.tokens.gather(1, q[:, None])[:, 0]
    assert torch.equal(res.input_ids, inp)
    ref_inp = ref_logp.gather(2, inp[:, None, None].expand(-1, n + 1, 1))[..., 0]
    assert torch.allclose(res.input_prob.log(), ref_inp, atol=1e-4)
    # task words: each word through its token; the category is the best-ranked word of each prompt
    tok = sharp.tokenizer
    wid = torch.tensor([tok(w, add_special_tokens=False)["input_ids"][0] for w in words])
    w_logp = ref_logp[..., wid]  # [batch, layer, word]
    w_rank = (ref_logp[..., None, :] > w_logp[..., None]).sum(-1).float() + 1
    excluded = (wid == ans[:, None]) | (wid == inp[:, None])
    w_rank = torch.where(excluded[:, None, :], torch.inf, w_rank)
    assert torch.equal(res.task_rank, w_rank.min(-1).values)
    best = w_rank.argmin(-1, keepdim=True)
    assert torch.allclose(res.task_prob.log(), w_logp.gather(2, best)[..., 0], atol=1e-4)
    assert res.task_words == tuple(words)
    assert logit_lens(sharp, batch, top_k=2, layers=[0], task_words="capital, city").task_words == ("capital", "city")
    assert torch.allclose(res.task_word_prob, w_logp.exp().mean(0), atol=1e-6)
    # last layer = the model's real output distribution at the separator
    assert torch.allclose(res.mean_probs[-1], out_logp.exp().mean(0), atol=1e-5, rtol=0)
    assert torch.allclose(res.answer_prob[:, -1].log(), out_logp.gather(1, ans[:, None])[:, 0], atol=1e-4)


def test_final_norm_is_recomputed_per_layer(sharp):
    """TL issue #1076: reusing the final residual's norm scale for earlier layers is wrong; the lens must not."""
    kind = sharp.test_kind
    batch = icl_prompts(sharp, TASK, n_prompts=3, n_shots=2, seed=0)
    res = logit_lens(sharp, batch, layers=[0], top_k=3)
    with torch.no_grad():
        _, cache = sharp.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    scale_final = cache["ln_final.hook_scale"][:, -1].float() if "ln_final.hook_scale" in cache else None
    r0 = cache["blocks.0.hook_resid_pre"][:, -1].float()
    good = _by_hand(sharp, kind, r0).softmax(-1).mean(0)
    assert torch.allclose(res.mean_probs[0], good, atol=1e-5)
    if scale_final is not None and scale_final.numel() == r0.shape[0]:
        module = sharp.ln_final.original_component
        x = r0 - r0.mean(-1, keepdim=True) if kind == "gpt2" else r0
        wrong = x / scale_final * module.weight.float() + (module.bias.float() if kind == "gpt2" else 0)
        wrong = (wrong @ sharp.W_U + sharp.b_U).log_softmax(-1)
        right = _by_hand(sharp, kind, r0).log_softmax(-1)
        assert (wrong - right).abs().max() > 0.1  # the pitfall is visible on these models ...
        assert torch.allclose(res.mean_probs[0].log(), right.exp().mean(0).log(), atol=1e-4)  # ... and avoided


def test_layer_subset_and_positions(sharp):
    batch = icl_prompts(sharp, TASK, n_prompts=4, n_shots=3, seed=2)
    full = logit_lens(sharp, batch, top_k=5)
    n = sharp.cfg.n_layers
    part = logit_lens(sharp, batch, layers=[0, 1], top_k=5)  # stops the forward early
    assert part.layers == (0, 1)
    assert torch.allclose(part.mean_probs, full.mean_probs[:2], atol=1e-6)
    last = logit_lens(sharp, batch, layers=-1, top_k=5)
    assert last.layers == (n,)
    assert torch.allclose(last.mean_probs[0], full.mean_probs[-1], atol=1e-6)
    # -1 and "separator" are the same position; a class name reads its last occurrence
    assert torch.allclose(logit_lens(sharp, batch, position=-1, top_k=5).mean_probs, full.mean_probs, atol=1e-7)
    res = logit_lens(sharp, batch, position="query_input", top_k=5)
    assert res.position == "query_input"
    with torch.no_grad():
        _, cache = sharp.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    q = batch.positions_of(TokenClass.QUERY_INPUT)
    last_q = torch.where(q, torch.arange(q.shape[1]), -1).max(1).values
    r = cache["blocks.1.hook_resid_pre"][torch.arange(4), last_q]
    ref = _by_hand(sharp, sharp.test_kind, r).softmax(-1).mean(0)
    assert torch.allclose(res.mean_probs[1], ref, atol=1e-5)


def test_task_name_and_default_task_words(tiny_gpt2):
    res = logit_lens(tiny_gpt2, TASK, n_prompts=4, n_shots=2, top_k=3)
    task = tvlens.load_task(TASK)
    assert res.task == TASK and res.family == task.family
    assert res.n_prompts == 4
    assert set(res.task_words) <= set(instruction_words(task.instruction))
    assert "capital" in res.task_words and "the" not in res.task_words
    assert res.task_word_prob.shape == (ModelInfo.of(tiny_gpt2).n_layers + 1, len(res.task_words))
    assert instruction_words("Give the capital city of the country.") == ["capital", "city", "country"]


def test_decode_unembedding_direction(tiny_model):
    info = ModelInfo.of(tiny_model)
    tok = tiny_model.tokenizer
    module = tiny_model.ln_final.original_component
    assert torch.all(module.weight == 1) and (getattr(module, "bias", None) is None or torch.all(module.bias == 0))
    for t in (7, 42, info.d_vocab - 1):
        u = tiny_model.W_U[:, t].detach()
        top = decode(tiny_model, u, top_k=3, apply_norm=False)
        assert top[0][0] == tok.decode([t])
        assert len(top) == 3 and top[0][1] >= top[1][1] >= top[2][1]
        # with the norm: a centred direction is only rescaled by LayerNorm / RMSNorm with weight 1, bias 0
        centred = u - u.mean()
        ids = tiny_model.W_U.T @ centred
        assert int(ids.argmax()) == t
        top = decode(tiny_model, centred * 123.0, top_k=2)
        assert top[0][0] == tok.decode([t])
    # a batch of vectors gives one list per row, equal to decoding each row
    v = torch.randn(3, info.d_model, generator=torch.Generator().manual_seed(0))
    rows = decode(tiny_model, v, top_k=4)
    assert len(rows) == 3 and all(len(r) == 4 for r in rows)
    one = decode(tiny_model, v[1], top_k=4)
    assert [t for t, _ in rows[1]] == [t for t, _ in one]
    assert all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(rows[1], one))


def test_decode_matches_lens(sharp):
    """decode(resid) at a layer equals that layer's lens for one prompt, incl. the norm's weight and bias."""
    batch = icl_prompts(sharp, TASK, n_prompts=1, n_shots=2, seed=0)
    res = logit_lens(sharp, batch, top_k=5)
    with torch.no_grad():
        _, cache = sharp.run_with_cache(batch.tokens, attention_mask=batch.attention_mask)
    r = cache["blocks.1.hook_resid_pre"][0, -1]
    top = decode(sharp, r, top_k=5)
    assert [t for t, _ in top] == list(res.top_tokens[1])
    assert torch.allclose(torch.tensor([p for _, p in top]), res.top_probs[1], atol=1e-5)


def _synthetic(curves: dict[str, list[float]], task_words=("w",)) -> LensResult:
    """A LensResult whose geometric-mean ranks per layer are the given curves (1 prompt)."""
    n = len(curves["answer"])
    nan = torch.full((1, n), float("nan"))

    def t(xs):
        return torch.tensor([xs], dtype=torch.float32)

    return LensResult(
        layers=tuple(range(n)), n_layers=n - 1, top_ids=torch.arange(2).repeat(n, 1), top_probs=torch.tensor([[0.6, 0.4]]).repeat(n, 1),
        top_tokens=tuple(("a", "b") for _ in range(n)),
        answer_rank=t(curves["answer"]), answer_prob=1 / t(curves["answer"]),
        input_rank=t(curves["input"]), input_prob=1 / t(curves["input"]),
        task_rank=t(curves["task"]) if "task" in curves else nan, task_prob=1 / t(curves["task"]) if "task" in curves else nan,
        task_words=tuple(task_words), task_word_rank=torch.zeros(n, len(task_words)), task_word_prob=torch.zeros(n, len(task_words)),
        answer_ids=torch.zeros(1, dtype=torch.long), input_ids=torch.zeros(1, dtype=torch.long),
        position="separator", lens="logit", task="synthetic",
    )


def test_phase_rule():
    r = _synthetic({
        "input": [1, 2, 50, 60, 70, 80, 90],
        "task": [30, 30, 3, 2, 40, 50, 60],
        "answer": [90, 80, 70, 9, 5, 1, 1],
    })
    ph = r.phases()
    assert isinstance(ph, Phases)
    assert (ph.input, ph.task, ph.answer) == ((0, 1), (2, 3), (4, 6))
    assert ph.ordered
    assert ph.leader == ("input", "input", "task", "task", "answer", "answer", "answer")
    assert "geometric-mean rank" in ph.rule
    assert str(ph) == "input L0–1 · task L2–3 · answer L4–6"
    # probabilities 1/rank give the same phases under the probability rule
    assert (r.phases("prob").input, r.phases("prob").task, r.phases("prob").answer) == ((0, 1), (2, 3), (4, 6))
    # ties go to the later stage; the longest run wins; a category that never leads has no phase
    r = _synthetic({"input": [1, 5, 1, 1, 1], "task": [9, 9, 9, 9, 9], "answer": [1, 1, 9, 9, 9]})
    ph = r.phases()
    assert ph.leader == ("answer", "answer", "input", "input", "input")
    assert (ph.input, ph.task, ph.answer) == ((2, 4), None, (0, 1))
    assert not ph.ordered
    # without task words only input and answer compete
    r = _synthetic({"input": [1, 9], "answer": [9, 1]}, task_words=())
    assert (r.phases().input, r.phases().task, r.phases().answer) == ((0, 0), None, (1, 1))
    used, words, how = r.task_phase_words(2)
    assert how == "middle layer (no task phase)" and used == (1,)
    assert words == [("a", pytest.approx(0.6)), ("b", pytest.approx(0.4))]


def test_table_plot_html_and_save(sharp, tmp_path):
    batch = icl_prompts(sharp, TASK, n_prompts=3, n_shots=2, seed=0)
    res = logit_lens(sharp, batch, top_k=4, task_words=["capital", "city"])
    rows = res.table()
    n = sharp.cfg.n_layers
    assert len(rows) == n + 1 and all(len(r) == 5 for r in rows)
    assert rows[-1][0] == f"L{n} (final)"
    assert rows[0][1:] == tuple(t.replace("\n", "\\n") if t.strip() else repr(t) for t in res.top_tokens[0])
    assert "(" in res.table(with_probs=True)[0][1]
    md = res.to_markdown()
    assert md.count("\n") == n + 2
    pd = pytest.importorskip("pandas")
    df = res.to_frame()
    assert isinstance(df, pd.DataFrame) and len(df) == n + 1 and "answer_prob" in df and "top4" in df
    fig = res.plot()
    kinds = [tr.type for tr in fig.data]
    assert kinds.count("heatmap") == 1 and kinds.count("scatter") == 3
    heat = fig.data[kinds.index("heatmap")]
    import html

    assert [[html.unescape(c) for c in r] for r in heat.text] == [list(r[1:]) for r in rows]
    assert res.plot("rank").layout.xaxis2.type == "log"
    path = res.to_html(tmp_path / "lens.html")
    assert path.exists() and "plotly" in path.read_text()[:20000].lower()
    saved = res.save(tmp_path / "lens")
    back = LensResult.load(saved, sharp)
    assert back.layers == res.layers and back.top_tokens == res.top_tokens and back.task_words == res.task_words
    assert torch.equal(back.answer_rank, res.answer_rank) and torch.equal(back.mean_probs, res.mean_probs)
    assert back.phases().leader == res.phases().leader


def test_lens_summary_page(tiny_llama, tmp_path):
    out = tmp_path / "figures" / "lens_summary.html"
    s = lens_summary(tiny_llama, ["country_capital", "antonym"], out=out, n_prompts=3, n_shots=2, top_k=4)
    assert s.path == out and out.exists()
    html = out.read_text()
    assert html.count('class="plotly-graph-div"') == 2
    # plotly.js is not embedded per figure: the page loads the folder's one copy, written beside it
    assert html.count("* plotly.js v") == 0 and re.search(r"""src=["']plotly\.min\.js["']""", html)
    assert "* plotly.js v" in (out.parent / "plotly.min.js").read_text()
    assert "country_capital" in html and "antonym" in html and "Phase rule" in html
    text = s.text()
    assert text.count("\n| country_capital |") == 1 and "| antonym |" in text
    assert set(s.phases) == {"country_capital", "antonym"}
    rows = s.rows()
    assert all(len(r["phase_words"]) == 5 for r in rows)


# ----------------------------------------------------------------------------------------------
# bad input: clear errors before any forward pass


@pytest.fixture
def no_forward(monkeypatch):
    calls = []
    real = hooks.run

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(hooks, "run", spy)
    return calls


def test_bad_inputs(tiny_llama, no_forward):
    model = tiny_llama
    info = ModelInfo.of(model)
    batch = icl_prompts(model, TASK, n_prompts=3, n_shots=2, seed=0)
    with pytest.raises(ValueError, match="'instruction' is not in 3 of 3 prompts.*separator.*instruction=True"):
        logit_lens(model, batch, position="instruction")
    with pytest.raises(ValueError, match="unknown position 'sepp'"):
        logit_lens(model, batch, position="sepp")
    padded = icl_prompts(model, TASK, n_prompts=8, n_shots=2, seed=0)
    assert bool((padded.attention_mask[:, 0] == 0).any()), "expected prompts of different lengths"
    with pytest.raises(ValueError, match="position 0 is padding in .* count from the end"):
        logit_lens(model, padded, position=0)
    with pytest.raises(ValueError, match="out of range for prompts"):
        logit_lens(model, padded, position=-padded.tokens.shape[1] - 1)
    with pytest.raises(ValueError, match=rf"top_k={info.d_vocab + 1} is out of range.*1\.\.{info.d_vocab}"):
        logit_lens(model, batch, top_k=info.d_vocab + 1)
    with pytest.raises(ValueError, match="task_words is empty"):
        logit_lens(model, batch, task_words=[])
    with pytest.raises(ValueError, match="none of the task words"):
        logit_lens(model, batch, task_words=["zzzqqq"])
    with pytest.raises(ValueError, match="out of range.*final resid_post"):
        logit_lens(model, batch, layers=[info.n_layers + 1])
    with pytest.raises(ValueError, match="unknown lens 'tuned'"):
        logit_lens(model, batch, lens="tuned")
    with pytest.raises(ValueError, match="task_words for 'antonym' is empty"):
        lens_summary(model, ["country_capital", "antonym"], task_words={"antonym": []})
    with pytest.raises(ValueError, match="'demo_output' is not in 2 of 2 prompts.*contain bos, final_sep, query_input"):
        # zero-shot prompts have no demonstrations
        logit_lens(model, icl_prompts(model, TASK, n_prompts=2, n_shots=0), position="demo_output")
    assert no_forward == []
    with pytest.raises(ValueError, match=rf"width d_model={info.d_model}"):
        decode(model, torch.zeros(info.d_model + 1))
    with pytest.raises(ValueError, match="d_model"):
        decode(model, torch.zeros(2, 3, info.d_model))
    with pytest.raises(ValueError, match="top_k"):
        decode(model, torch.zeros(info.d_model), top_k=0)


# ----------------------------------------------------------------------------------------------
# vision-language models: the lens at the separator of image-ICL and text-ICL prompts (Luo et al. §4.1)


@pytest.fixture(scope="module", params=["organism-vlm", "tiny-llava"])
def vlm_and_hf(request, tmp_path_factory):
    """A VLM through tvlens (the bridge) and the same checkpoint as a plain Hugging Face model (eager attention)."""
    import os

    os.environ.setdefault("PIP_NO_INDEX", "1")  # a VLM's bridge may shell out to pip: never let it reach an index
    from transformers import LlavaForConditionalGeneration

    from tvlens.models import organism_path

    if request.param == "organism-vlm":
        path = organism_path("organism-vlm")
        if not (path / "config.json").exists():
            pytest.skip("organism-vlm checkpoint not shipped")
        model = tvlens.load_model("organism-vlm", device="cpu")
        task = "country_capital"
    else:
        from conftest import build_tiny_vlm

        path = build_tiny_vlm("llava", tmp_path_factory.mktemp("lens_llava"))
        model = tvlens.load_model(path, device="cpu", require_processor=False)
        task = "next_letter"
    hf = LlavaForConditionalGeneration.from_pretrained(path, attn_implementation="eager").eval()
    return request.param, model, hf, task


@torch.no_grad()
def _hf_lens(hf, tokens, pixel_values):
    """[layer, d_vocab] log-probs at the last position of one unpadded row, from the HF model's hidden states:
    layers 0..n-1 enter decoder layer l, normalised by hand (RMSNorm with the model's weight and eps) and
    unembedded; the last row is the model's own output."""
    out = hf(input_ids=tokens, pixel_values=pixel_values, output_hidden_states=True)
    norm = hf.model.language_model.norm
    n = hf.config.text_config.num_hidden_layers
    h = torch.stack([out.hidden_states[l][0, -1].float() for l in range(n)])
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon) * norm.weight.float()
    logits = torch.cat([h @ hf.lm_head.weight.float().T, out.logits[0, -1:].float()])
    return logits.log_softmax(-1)


def test_lens_on_image_icl_prompts_equals_the_hf_model_row_by_row(vlm_and_hf):
    from tvlens.analyses.lens import _word_token_ids
    from tvlens.inputs import multimodal as mm

    name, model, hf, task = vlm_and_hf
    batch = mm.image_icl_prompts(model, task, n_prompts=5, n_shots=3, seed=2, split="test")
    batch = batch.select([0, 1, 2, 3, 4])
    res = logit_lens(model, batch, top_k=5, batch_size=2)  # 3 chunks: the images must follow their rows
    n = model.cfg.n_layers
    refs, bare = [], []
    for r in range(len(batch)):
        row = batch.select([r])
        real = row.attention_mask[0].bool()
        refs.append(_hf_lens(hf, row.tokens[:, real], row.pixel_values))
        bare.append(_hf_lens(hf, row.tokens[:, real], None))  # the placeholders' own embeddings, no image
    ref = torch.stack(refs)  # [batch, layer, d_vocab]
    assert (ref - torch.stack(bare)).abs().max() > 1e-2, "the reference must depend on the images"
    assert res.layers == tuple(range(n + 1)) and res.meta.extra["context"] == "image"
    assert torch.allclose(res.mean_probs, ref.exp().mean(0), atol=2e-5, rtol=0)
    ans = batch.answer_ids
    ref_ans = ref.gather(2, ans[:, None, None].expand(-1, n + 1, 1))[..., 0]
    assert torch.allclose(res.answer_prob.clamp_min(1e-30).log(), ref_ans, atol=1e-3)
    # an image query has no input token: the input category is the word naming what the image shows
    words = torch.tensor([_word_token_ids(model.tokenizer, q)[0] for q in batch.queries])
    assert torch.equal(res.input_ids, words) and not bool((words == batch.image_token_id).any())
    ref_inp = ref.gather(2, words[:, None, None].expand(-1, n + 1, 1))[..., 0]
    assert torch.allclose(res.input_prob.clamp_min(1e-30).log(), ref_inp, atol=1e-3)
    ph = res.phases()
    assert ph.layers == res.layers and len(ph.leader) == n + 1
    # text ICL prompts through the same VLM: the input is the query's own token
    text = icl_prompts(model, task, n_prompts=4, n_shots=3, seed=2, split="test")
    tres = logit_lens(model, text, top_k=5)
    q = text.positions_of(TokenClass.QUERY_INPUT).float().argmax(1)
    assert torch.equal(tres.input_ids, text.tokens.gather(1, q[:, None])[:, 0])
    if name == "organism-vlm":
        # the trained organism does the task: its own output (the last row) puts the answer first on most prompts
        assert float((res.answer_rank[:, -1] == 1).float().mean()) >= 0.6
        assert float((tres.answer_rank[:, -1] == 1).float().mean()) >= 0.6


def test_lens_refuses_bad_image_prompts_before_any_forward(vlm_and_hf, organism, no_forward):
    from tvlens.inputs import multimodal as mm

    name, model, _, task = vlm_and_hf
    batch = mm.image_icl_prompts(model, task, n_prompts=2, n_shots=1, seed=0)
    with pytest.raises(ValueError, match="text-only"):
        logit_lens(organism, batch)
    text_with_images = tvlens.prompts_from_text(model, [f"{mm.vision_spec(model).marker} →"], ["b"])
    with pytest.raises(ValueError, match="image placeholder tokens but no images"):
        logit_lens(model, text_with_images)
    with pytest.raises(ValueError, match="prompt options .* only apply when a task is given"):
        logit_lens(model, batch, instruction=True)
    assert no_forward == []
