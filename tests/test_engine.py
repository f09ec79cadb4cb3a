"""The engine: every strategy gives the numbers of one plain ``run_with_hooks`` per column.

Also the parts the analyses build on: sites as data (a set or a mask of positions), the inputs
protocol (extra model inputs reach every forward, rows can be taken), row subsets of a cached run,
the one capability cache and the one memory budget.  References are TransformerLens's own
``run_with_hooks`` with plain hook functions (``tests/reference_patching.py``), nothing of tvlens.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

import tvlens
from reference_patching import HOOK, forward
from tvlens.engine import Edit, PatchRunner, as_batch, capabilities, replace_heads
from tvlens.engine.plan import length_buckets, memory_budget

TASK = "antonym"


@pytest.fixture(scope="module")
def batch(tiny_llama):
    return tvlens.icl_prompts(tiny_llama, TASK, n_prompts=3, n_shots=2, seed=4)


def _means(model, seed=0):
    info = tvlens.ModelInfo.of(model)
    return torch.randn(info.n_layers, info.n_heads, info.d_head, generator=torch.Generator().manual_seed(seed))


def _set_heads(layer_means, heads, positions):
    """A plain hook: z[:, positions, heads] <- the given means."""
    def fn(z, hook):
        z = z.clone()
        for p in positions:
            z[:, p, heads] = layer_means[heads].to(z.dtype)
        return z
    return fn


def test_a_set_of_positions_equals_a_hooked_forward(tiny_model):
    b = tvlens.icl_prompts(tiny_model, TASK, n_prompts=3, n_shots=2, seed=4)
    P = b.tokens.shape[1]
    means = _means(tiny_model)
    heads = torch.tensor([0, 2])
    positions = [P - 4, P - 2]
    # layer 0: earlier positions' heads reach the final logits only through later layers
    ref = forward(tiny_model, b, [(HOOK["z"].format(0), _set_heads(means[0], heads, positions))])
    runner = PatchRunner(tiny_model, b)
    weight = torch.zeros(tvlens.ModelInfo.of(tiny_model).n_heads, 1)
    weight[heads] = 1.0
    as_list = runner.logits([Edit(0, "z", weight=weight, value=means[0], pos=positions)], 1, start_pos=P - 4)[:, 0]
    mask = torch.zeros(P, dtype=torch.bool)
    mask[positions] = True
    as_mask = runner.logits([Edit(0, "z", weight=weight, value=means[0], pos=mask)], 1, start_pos=P - 4)[:, 0]
    unpatched = runner.clean_logits
    assert (ref - unpatched).abs().max() > 1e-3  # the patch changes the answer logits
    torch.testing.assert_close(as_list, ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(as_mask, as_list, atol=0, rtol=0)


def test_a_weight_with_a_position_axis_is_a_mask_per_column(batch, tiny_llama):
    """Hojel et al. 2024's (head x position) masks: column c patches its own heads at its own positions."""
    P = batch.tokens.shape[1]
    means = _means(tiny_llama, 1)
    n_heads = tvlens.ModelInfo.of(tiny_llama).n_heads
    start = P - 3
    masks = torch.zeros(2, P - start, n_heads, 1)  # [column, pos, head, 1]
    masks[0, 0, 1] = 1.0  # column 0: head 1 at position P-3
    masks[1, 2, [0, 3]] = 1.0  # column 1: heads 0 and 3 at the final position
    got = PatchRunner(tiny_llama, batch).logits([Edit(0, "z", weight=masks, value=means[0])], 2, start_pos=start)
    refs = [forward(tiny_llama, batch, [(HOOK["z"].format(0), _set_heads(means[0], torch.tensor([1]), [P - 3]))]),
            forward(tiny_llama, batch, [(HOOK["z"].format(0), _set_heads(means[0], torch.tensor([0, 3]), [P - 1]))])]
    for c in range(2):
        torch.testing.assert_close(got[:, c], refs[c], atol=1e-4, rtol=1e-4)


def test_whole_forwards_with_columns_along_the_batch_equal_the_fast_path(tiny_model):
    b = tvlens.icl_prompts(tiny_model, TASK, n_prompts=4, n_shots=2, seed=1)
    info = tvlens.ModelInfo.of(tiny_model)
    means = _means(tiny_model, 2)
    masks = torch.rand(5, info.n_layers, info.n_heads, generator=torch.Generator().manual_seed(3)) < 0.4
    edits = [replace_heads(layer, masks[:, layer].float(), means[layer]) for layer in range(info.n_layers)]
    fast = PatchRunner(tiny_model, b).logits(edits, 5)
    full = PatchRunner(tiny_model, b, fast=False).logits(edits, 5)
    torch.testing.assert_close(full, fast, atol=1e-4, rtol=1e-4)
    for c in range(5):  # and both are one plain hooked forward per column
        hooks = [(HOOK["z"].format(layer), _set_heads(means[layer], masks[c, layer].nonzero().flatten(), [-1]))
                 for layer in range(info.n_layers) if masks[c, layer].any()]
        torch.testing.assert_close(full[:, c], forward(tiny_model, b, hooks), atol=1e-4, rtol=1e-4)


def test_whole_forwards_are_chunked_by_the_memory_budget(batch, tiny_llama, monkeypatch):
    import tvlens.engine.runner as R

    info = tvlens.ModelInfo.of(tiny_llama)
    means = _means(tiny_llama, 5)
    masks = torch.eye(info.n_heads)[None].expand(info.n_layers, -1, -1).transpose(0, 1).float()  # [column, layer, head]
    edits = [replace_heads(layer, masks[:, layer], means[layer]) for layer in range(info.n_layers)]
    whole = PatchRunner(tiny_llama, batch, fast=False).logits(edits, info.n_heads)
    calls = []
    real = R._hooks.run
    monkeypatch.setattr(R, "memory_budget", lambda device, max_memory=None: 1)  # one column per forward
    monkeypatch.setattr(R._hooks, "run", lambda *a, **k: calls.append(a[1].shape[0]) or real(*a, **k))
    chunked = PatchRunner(tiny_llama, batch, fast=False).logits(edits, info.n_heads)
    assert calls[1:] == [len(batch)] * info.n_heads  # after the target run: one forward per column
    torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)


def test_a_subset_of_a_cached_run_equals_a_fresh_run(tiny_model):
    b = tvlens.icl_prompts(tiny_model, TASK, n_prompts=5, n_shots=2, seed=2)
    info = tvlens.ModelInfo.of(tiny_model)
    means = _means(tiny_model, 4)
    edits = [replace_heads(1, torch.ones(2, info.n_heads), means[1]), Edit(0, "z", weight=0.5, value=means[0], columns=[1])]
    rows = torch.tensor([4, 1, 2])
    got = PatchRunner(tiny_model, b).subset(rows).logits(edits, 2)
    fresh = PatchRunner(tiny_model, b.select(rows)).logits(edits, 2)
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=1e-5)


class _WithPositions(SimpleNamespace):
    """A batch that brings its own extra forward input (as a multimodal batch brings pixel_values)."""

    def model_inputs(self):
        return {"position_ids": self.position_ids}


def test_extra_model_inputs_reach_every_forward(tiny_gpt2):
    b = tvlens.icl_prompts(tiny_gpt2, TASK, n_prompts=3, n_shots=1, seed=0)
    shifted = torch.arange(b.tokens.shape[1]).expand_as(b.tokens) + 5
    ours = _WithPositions(tokens=b.tokens, attention_mask=b.attention_mask, answer_ids=b.answer_ids, position_ids=shifted)
    with torch.no_grad():
        ref = tiny_gpt2.run_with_hooks(b.tokens, attention_mask=b.attention_mask, position_ids=shifted)[:, -1]
    plain = PatchRunner(tiny_gpt2, b).clean_logits
    assert (ref - plain).abs().max() > 1e-4  # the extra input matters
    for fast in ("auto", False):
        runner = PatchRunner(tiny_gpt2, ours, fast=fast)
        torch.testing.assert_close(runner.clean_logits, ref, atol=1e-5, rtol=1e-5)
    means, n_heads = _means(tiny_gpt2), tvlens.ModelInfo.of(tiny_gpt2).n_heads
    edit = [replace_heads(0, torch.ones(1, n_heads), means[0])]
    with torch.no_grad():
        want = tiny_gpt2.run_with_hooks(b.tokens, attention_mask=b.attention_mask, position_ids=shifted, fwd_hooks=[
            (HOOK["z"].format(0), _set_heads(means[0], torch.arange(n_heads), [-1]))])[:, -1]
    got = PatchRunner(tiny_gpt2, ours, fast=False).logits(edit, 1)[:, 0]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_extra_inputs_slice_and_repeat_with_the_rows():
    tokens = torch.arange(12).reshape(3, 4)
    extra = torch.arange(30.0).reshape(3, 10)
    eb = as_batch(_WithPositions(tokens=tokens, position_ids=extra), "target")
    assert torch.equal(eb.take(torch.tensor([2, 0])).extra["position_ids"], extra[[2, 0]])
    rep = eb.repeat_inputs(2)["position_ids"]
    assert torch.equal(rep, torch.cat([extra, extra]))  # the order of tokens.repeat(2, 1)
    flat = as_batch(_WithPositions(tokens=tokens, position_ids=torch.zeros(7, 2)), "target")
    with pytest.raises(ValueError, match="not row-aligned"):
        flat.take(torch.tensor([0]))


def test_bad_positions_are_refused_before_any_forward(batch, tiny_llama):
    runner = PatchRunner(tiny_llama, batch)
    P = batch.tokens.shape[1]
    value = _means(tiny_llama)[0]
    with pytest.raises(ValueError, match="before the recomputed suffix"):
        runner.logits([Edit(0, "z", value=value, pos=[P - 5, P - 1])], 1, start_pos=P - 2)
    with pytest.raises(ValueError, match="one entry per position"):
        runner.logits([Edit(0, "z", value=value, pos=torch.ones(P + 1, dtype=torch.bool))], 1, start_pos=0)
    with pytest.raises(ValueError, match="empty set"):
        runner.logits([Edit(0, "z", value=value, pos=[])], 1, start_pos=0)


def test_capabilities_are_checked_once_and_can_be_forgotten():
    model = torch.nn.Linear(1, 1)
    calls = []
    check = lambda: calls.append(1) or True  # noqa: E731
    assert capabilities.cached(model, "x", check) and capabilities.cached(model, "x", check)
    assert len(calls) == 1
    capabilities.remember(model, "x", False)
    assert capabilities.cached(model, "x", check) is False
    capabilities.forget(model)
    assert capabilities.known(model, "x") is None


def test_one_memory_budget():
    assert memory_budget(torch.device("cpu")) == 512 << 20
    assert memory_budget(torch.device("cpu"), 1234) == 1234
    with pytest.raises(ValueError, match="positive"):
        memory_budget(torch.device("cpu"), 0)


def test_length_buckets_keep_similar_lengths_together():
    buckets = length_buckets([5, 9, 5, 9, 7], batch_size=2, exact=True)
    assert buckets == [[0, 2], [4], [1, 3]]
    assert sorted(i for b in length_buckets([3] * 7, batch_size=3) for i in b) == list(range(7))


# ---------------------------------------------------------------------------------------------
# a bidirectional masked-token model read at several positions (the canvas setting of Hojel et al. 2024)


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory):
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import BertConfig, BertForMaskedLM

    d = tmp_path_factory.mktemp("bert")
    cfg = BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                     max_position_embeddings=40, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.5)  # large weights: an edit visibly moves every position
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(d)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(24)}, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "t0",
                                                         "pad_token": "t0"}))
    return tvlens.load_model(d, device="cpu")


def _canvas_like(query):
    tokens = torch.randint(0, 24, (3, 10), generator=torch.Generator().manual_seed(1))
    return SimpleNamespace(tokens=tokens, query_positions=torch.tensor([query] * 3))


def test_bidirectional_model_is_detected_and_read_at_its_query_positions(tiny_bert):
    b = _canvas_like([2, 5, 9])
    with pytest.warns(RuntimeWarning, match="fast recompute unavailable"):
        runner = PatchRunner(tiny_bert, b)
        val = 5 * torch.randn(4, 8, generator=torch.Generator().manual_seed(0))
        w = torch.zeros(2, 10, 4, 1)  # [column, pos, head, 1]
        w[0, 3, 1] = 1.0
        w[1, 7, 2] = w[1, 0, 0] = 1.0
        got = runner.logits([Edit(0, "z", weight=w, value=val)], 2, start_pos=0)
    assert not runner.causal and runner.clean_logits.shape == (3, 3, 24)  # [batch, query, d_vocab]
    for c in range(2):
        pos, head = w[c, ..., 0].nonzero(as_tuple=True)

        def fn(z, hook, pos=pos, head=head):
            z = z.clone()
            z[:, pos, head] = val[head]
            return z
        with torch.no_grad():
            ref = tiny_bert.run_with_hooks(b.tokens, fwd_hooks=[("blocks.0.attn.hook_z", fn)])[:, [2, 5, 9]]
        assert (ref - runner.clean_logits).abs().max() > 1e-3  # position 0 and 3 reach every query position
        torch.testing.assert_close(got[:, c], ref, atol=1e-5, rtol=1e-5)


def test_bidirectional_edits_must_recompute_everything(tiny_bert):
    runner = PatchRunner(tiny_bert, _canvas_like([9]))
    with pytest.raises(ValueError, match="both directions"):  # refused before any recompute
        runner.logits([Edit(0, "z", value=torch.zeros(4, 8))], 1)  # start_pos=-1: the final position only
    with pytest.raises(ValueError, match=r"query_positions must lie in 0..9"):
        PatchRunner(tiny_bert, _canvas_like([3, 10]))


def test_one_word_for_the_last_position(tiny_llama, batch):
    """'final', 'separator' and 'last' name the same position in patching, statistics and the lens."""
    means = _means(tiny_llama, 7)
    a = tvlens.patch_heads(tiny_llama, batch, means, positions="final", metric="logprob", progress=False)
    b = tvlens.patch_heads(tiny_llama, batch, means, positions="separator", metric="logprob", progress=False)
    assert torch.equal(a.values, b.values)
    s1 = tvlens.head_means(tiny_llama, [TASK, "country_capital"], n_prompts=3, n_shots=1, positions="final")
    s2 = tvlens.head_means(tiny_llama, [TASK, "country_capital"], n_prompts=3, n_shots=1, positions="separator")
    assert torch.equal(s1.z_mean, s2.z_mean)
    l1 = tvlens.logit_lens(tiny_llama, batch, position="final")
    l2 = tvlens.logit_lens(tiny_llama, batch, position="separator")
    assert torch.equal(l1.answer_rank, l2.answer_rank)
    with pytest.raises(ValueError, match="final position"):
        tvlens.reinforce_select(tiny_llama, [TASK, "country_capital"], positions="all", steps=1, progress=False)


# ---------------------------------------------------------------------------------------------
# images ride with their rows through the row read-out (a VLM: Luo et al. 2024's image prompts)


class _ImageRows:
    """A minimal multimodal batch: left-padded image-ICL prompts of the VLM organism, images per row."""

    def __init__(self, prompts, processor, pad_id):
        from tvlens.organisms.vlm.prompts import collate

        self.prompts, self.processor, self.pad_id = list(prompts), processor, pad_id
        self.tokens, self.attention_mask, self.pixel_values, _, _ = collate(self.prompts, pad_id, processor)

    def model_inputs(self):
        return {"pixel_values": self.pixel_values}

    def select(self, index):
        return _ImageRows([self.prompts[int(i)] for i in index], self.processor, self.pad_id)


@pytest.fixture(scope="module")
def vlm_rows():
    import tvlens.organisms.vlm  # noqa: F401  (registers the organism's processor)
    from transformers import AutoProcessor
    from tvlens.organisms.vlm.images import domain_items
    from tvlens.organisms.vlm.prompts import Image, PromptCodec

    path = tvlens.organisms.organism_path("organism-vlm")
    model = tvlens.load_model(path, device="cpu")
    processor = AutoProcessor.from_pretrained(path)
    codec = PromptCodec(model.tokenizer)
    items = domain_items("digits")
    prompts = [codec.prompt([(Image("digits", items[j]), items[j]) for j in range(k)], Image("digits", items[k + 1]))
               for k in (1, 3, 2)]  # rows of different lengths and image counts
    return model, _ImageRows(prompts, processor, int(model.tokenizer.pad_token_id or 0))


def test_images_ride_with_their_rows_through_the_row_readout(vlm_rows):
    from tvlens.engine.plan import row_inputs, rows_of
    from tvlens.engine.readout import run_rows

    model, batch = vlm_rows
    rows = rows_of(batch)
    logits, caps = run_rows(model, rows, capture=[2], inputs=row_inputs(batch), batch_size=2)
    for i, p in enumerate(batch.prompts):  # independent: each prompt alone, with only its own images
        one = batch.select([i])
        with torch.no_grad():
            out, cache = model.run_with_cache(one.tokens, pixel_values=one.pixel_values)
        torch.testing.assert_close(logits[i], out[0, -1], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(caps[2][i], cache["blocks.2.hook_resid_pre"][0, -1], atol=1e-4, rtol=1e-4)
    without, _ = run_rows(model, rows, batch_size=2)  # the placeholders alone read differently
    assert (without - logits).abs().max() > 1e-3


def test_a_vector_applied_to_image_prompts_equals_a_hooked_forward(vlm_rows):
    model, batch = vlm_rows
    d = tvlens.ModelInfo.of(model).d_model
    tv = tvlens.TaskVector.from_tensor(model, torch.randn(d, generator=torch.Generator().manual_seed(0)), layer=2)
    got = tvlens.apply_vector(model, batch, tv)

    def put(act, hook):
        act = act.clone()
        act[:, -1] = tv.vector
        return act
    for i in range(len(batch.prompts)):
        one = batch.select([i])
        with torch.no_grad():
            ref = model.run_with_hooks(one.tokens, pixel_values=one.pixel_values,
                                       fwd_hooks=[("blocks.2.hook_resid_pre", put)])[0, -1]
        torch.testing.assert_close(got[i], ref, atol=1e-4, rtol=1e-4)


def test_the_in_place_gelu_twin_is_bit_identical_and_always_restored(tiny_gpt2):
    """GPT-2's tanh GELU runs as an in-place twin inside the engine only: same bits, nothing left behind."""
    from transformers.activations import NewGELUActivation

    from tvlens.engine.runner import _act_twins, _new_gelu_inplace

    x = torch.randn(3, 7, 64, generator=torch.Generator().manual_seed(0)) * 5
    assert torch.equal(_new_gelu_inplace(x), NewGELUActivation()(x))
    twins = _act_twins(tiny_gpt2)
    assert twins and all(isinstance(m, NewGELUActivation) for m, _ in twins)
    b = tvlens.icl_prompts(tiny_gpt2, TASK, n_prompts=2, n_shots=2, seed=1)
    runner = PatchRunner(tiny_gpt2, b)
    runner.logits([replace_heads(0, torch.ones(tvlens.ModelInfo.of(tiny_gpt2).n_heads), _means(tiny_gpt2)[0])], 1,
                  start_pos=0)
    assert all("forward" not in m.__dict__ for m, _ in twins)


@pytest.mark.parametrize("kind", ["mlp_out", "resid_mid", "resid_post", "z"])
def test_edits_in_the_last_block_of_a_suffix_recompute(tiny_model, kind):
    """The last block's MLP runs on the final position only, except where an edit acts inside it."""
    b = tvlens.icl_prompts(tiny_model, TASK, n_prompts=3, n_shots=2, seed=2)
    info = tvlens.ModelInfo.of(tiny_model)
    P, last = b.tokens.shape[1], info.n_layers - 1
    g = torch.Generator().manual_seed(5)
    add = torch.randn(info.n_heads, info.d_head, generator=g) if kind == "z" else torch.randn(info.d_model, generator=g)

    def hook(act, hook):
        act = act.clone()
        act[:, P - 2:] += add.to(act.dtype)
        return act

    ref = forward(tiny_model, b, [(HOOK[kind].format(last), hook)])
    runner = PatchRunner(tiny_model, b)
    got = runner.logits([Edit(last, kind, weight=0.0, add=add, pos=[P - 2, P - 1])], 1, start_pos=0)[:, 0]
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_rows_keep_their_own_extra_inputs():
    """Rows re-batched by the plan keep their own images (uneven image counts: pixel_values is not
    row-aligned) and their position-aligned inputs are cut and padded with their tokens."""
    from types import SimpleNamespace

    from tvlens.engine.plan import RowsBatch, gather_inputs, pad_inputs

    imgs = [torch.full((n, 3, 2, 2), float(i)) for i, n in enumerate((2, 0, 1))]
    rows = [{"pixel_values": imgs[0], "token_type_ids": torch.tensor([[1, 1, 0]])},
            {"pixel_values": imgs[1], "token_type_ids": torch.tensor([[0]])},
            {"pixel_values": imgs[2], "token_type_ids": torch.tensor([[0, 1]])}]
    tokens = torch.tensor([[5, 6, 7], [0, 0, 8], [0, 9, 10]])
    mask = (tokens != 0).long()
    b = RowsBatch(tokens, mask, torch.tensor([1, 2, 3]), rows=rows)
    assert b.inputs["pixel_values"].shape[0] == 3 and b.inputs["token_type_ids"].tolist() == [[1, 1, 0], [0, 0, 0], [0, 0, 1]]
    sub = b.select([2, 0])
    assert torch.equal(sub.inputs["pixel_values"], torch.cat([imgs[2], imgs[0]]))  # not pixel_values[[2, 0]]
    assert sub.answer_ids.tolist() == [3, 1] and sub.inputs["token_type_ids"].tolist() == [[0, 0, 1], [1, 1, 0]]
    assert torch.equal(gather_inputs(rows, [1, 2], width=4)["token_type_ids"], torch.tensor([[0, 0, 0, 0], [0, 0, 0, 1]]))
    assert pad_inputs(rows[1], 3)["pixel_values"] is rows[1]["pixel_values"]  # only position inputs are padded
    with pytest.raises(ValueError, match="not each row's own"):
        RowsBatch(tokens, mask, None, inputs={"pixel_values": torch.zeros(3, 3, 2, 2)}).select([0])


def _swapped_during(model, fn):
    """Run ``fn`` and say whether the attention modules ran the delegated forward during it."""
    from tvlens.engine.attention import _attention_modules

    seen = []

    def spy(act, hook):
        seen.append(all("forward" in vars(a) for a in _attention_modules(model)))
    model.blocks[0].hook_resid_pre.add_hook(spy)
    try:
        out = fn()
    finally:
        model.blocks[0].hook_resid_pre.remove_hooks()
    return out, seen


def test_delegated_attention_is_bit_identical_and_always_restored(tiny_model):
    """Final-position reads run attention as the wrapped HF module computes it: the same bits as the
    bridge's own attention (the reference: the same read with delegation off), nothing left behind."""
    from tvlens.engine.attention import _attention_modules, delegation_ok
    from tvlens.engine.readout import run_rows

    g = torch.Generator().manual_seed(3)
    rows = [torch.randint(1, 60, (int(n),), generator=g) for n in (5, 9, 3, 12, 7)]  # padded chunks
    info = tvlens.ModelInfo.of(tiny_model)
    layers = list(range(info.n_layers + 1))
    try:
        capabilities.remember(tiny_model, "delegated_attention", False)
        ref, ref_caps = run_rows(tiny_model, rows, capture=layers, batch_size=3)
        capabilities.forget(tiny_model)
        assert delegation_ok(tiny_model)
        (got, caps), seen = _swapped_during(tiny_model, lambda: run_rows(tiny_model, rows, capture=layers, batch_size=3))
        restored = not any("forward" in vars(a) for a in _attention_modules(tiny_model))

        def fail(act, hook):
            raise RuntimeError("a hook that fails mid-forward")
        tiny_model.blocks[0].hook_resid_pre.add_hook(fail)  # the checks above are cached: only the pass fails
        try:
            with pytest.raises(RuntimeError, match="fails mid-forward"):
                run_rows(tiny_model, rows, batch_size=3)
        finally:
            tiny_model.blocks[0].hook_resid_pre.remove_hooks()
        restored_after_error = not any("forward" in vars(a) for a in _attention_modules(tiny_model))
    finally:
        capabilities.forget(tiny_model)
    assert seen and all(seen)
    assert torch.equal(got, ref) and all(torch.equal(caps[l], ref_caps[l]) for l in layers)
    assert restored and restored_after_error


def test_delegation_steps_aside_for_hooks_inside_attention(tiny_llama, batch):
    """A pass that reads inside attention, or a model with a hook attached there, keeps the bridge's
    attention: pre-softmax scores are read as scores, and a user's edit of them still acts."""
    from tvlens.engine.readout import final_logits, read

    name = "blocks.0.attn.hook_attn_scores"
    (acts, _), seen = _swapped_during(tiny_llama, lambda: read(tiny_llama, batch.tokens, batch.attention_mask, [name], last=True))
    _, cache = tiny_llama.run_with_cache(batch.tokens, attention_mask=batch.attention_mask, names_filter=[name])
    assert seen == [False]
    torch.testing.assert_close(acts[name], cache[name][:, -1:], rtol=0, atol=0)  # read(last=True) takes [:, -1:]

    def boost(scores, hook):
        return scores + torch.where(torch.isfinite(scores), 3.0, 0.0) * (torch.arange(scores.shape[-1]) == 1)
    plain = final_logits(tiny_llama, batch)
    tiny_llama.blocks[0].attn.hook_attn_scores.add_hook(boost)
    try:
        got, seen = _swapped_during(tiny_llama, lambda: final_logits(tiny_llama, batch))
        ref = tiny_llama(batch.tokens, attention_mask=batch.attention_mask)[:, -1]
    finally:
        tiny_llama.blocks[0].attn.hook_attn_scores.remove_hooks()
    assert seen == [False] and not torch.allclose(got, plain)
    torch.testing.assert_close(got, ref)


def test_delegation_is_refused_where_it_would_change_a_number(tiny_llama, monkeypatch):
    """The per-model check compares the delegated attention with the bridge's: a delegate that is off
    by 1e-4 is never used, and the reads keep the bridge's numbers."""
    from tvlens.engine import attention
    from tvlens.engine.readout import run_rows

    real = attention._base_forward()

    def off(self, *args, **kwargs):
        out = real(self, *args, **kwargs)
        return (out[0] + 1e-4, *out[1:])
    rows = [torch.tensor([3, 4, 5, 6]), torch.tensor([7, 8])]
    ref, _ = run_rows(tiny_llama, rows)
    capabilities.forget(tiny_llama)
    monkeypatch.setattr(attention, "_base_forward", lambda: off)
    try:
        assert not attention.delegation_ok(tiny_llama)
        (got, _), seen = _swapped_during(tiny_llama, lambda: run_rows(tiny_llama, rows))
    finally:
        capabilities.forget(tiny_llama)
    assert seen and not any(seen) and torch.equal(got, ref)
