"""tvlens.generate against the Hugging Face models' own cached decoding, on the real vocabularies.

References are independent of tvlens: ``AutoModelForCausalLM.generate(do_sample=False, use_cache=True)``
on the same checkpoint, and for a patched prompt the same cached decoding with a plain PyTorch
pre-hook that patches the prompt's last position during the prefill only.
"""

from __future__ import annotations

import warnings

import pytest
import torch

import tvlens
from tvlens.generate import Generation, generate
from tvlens.hooks import hook_count
from tvlens.inputs.text import TokenCollisionWarning, icl_prompts

from real_vocab import DATA, VOCABULARIES, session_models

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="tests/data/tokenizers (the real vocabularies) is absent")

#: the issue asks for GPT-2, Llama and Qwen; the SentencePiece Llama is a Llama too
NAMES = tuple(VOCABULARIES)
STEPS = 6


@pytest.fixture(scope="session")
def vocab(tmp_path_factory):
    return session_models(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_models(vocab):
    from transformers import AutoModelForCausalLM

    return {n: AutoModelForCausalLM.from_pretrained(d).eval() for n, d in vocab[1].items()}


def _prompts(model, n: int = 3):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenCollisionWarning)
        return icl_prompts(model, "country_capital", n_prompts=n, n_shots=2, seed=1)  # rows of different lengths


def _hf_generate(hf, batch, steps, **kw):
    with torch.no_grad():
        out = hf.generate(batch.tokens, attention_mask=batch.attention_mask, do_sample=False, use_cache=True,
                          max_new_tokens=steps, **kw)
    return out[:, batch.tokens.shape[1]:]


@pytest.mark.parametrize("name", NAMES)
def test_greedy_equals_hf_cached_decoding(name, vocab, hf_models):
    model, hf = vocab[2][name], hf_models[name]
    hooks = hook_count(model)  # the bridge's own module hooks
    batch = _prompts(model)
    assert int(batch.attention_mask.sum(-1).min()) < batch.tokens.shape[1]  # really left-padded
    got = generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False)
    ref = _hf_generate(hf, batch, STEPS, min_new_tokens=STEPS, pad_token_id=got.pad_id)
    assert isinstance(got, Generation) and torch.equal(got.tokens, ref), (got.tokens, ref)
    assert got.lengths.tolist() == [STEPS] * len(batch) and not got.finished.any()
    # rows do not depend on their batch-mates (padding, batch size)
    alone = torch.cat([generate(model, batch.select([r]), max_new_tokens=STEPS, stop_at_eos=False).tokens
                       for r in range(len(batch))])
    assert torch.equal(alone, got.tokens)
    assert torch.equal(generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False, batch_size=1).tokens, got.tokens)
    assert hook_count(model) == hooks


@pytest.mark.parametrize("name", ["gpt2", "qwen3"])
def test_end_of_sequence_like_hf(name, vocab, hf_models):
    """A row that emits EOS is padded afterwards, and the others go on, as in Hugging Face's generate."""
    model, hf = vocab[2][name], hf_models[name]
    batch = _prompts(model)
    free = generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False)
    eos = int(free.tokens[0, 2])  # make row 0's third token the end of sequence
    got = generate(model, batch, max_new_tokens=STEPS, eos_token_id=eos)
    ref = _hf_generate(hf, batch, STEPS, eos_token_id=eos, pad_token_id=got.pad_id)
    ref = torch.nn.functional.pad(ref, (0, got.tokens.shape[1] - ref.shape[1]), value=got.pad_id)
    assert torch.equal(got.tokens, ref)
    end = free.tokens[0].tolist().index(eos) + 1
    assert bool(got.finished[0]) and int(got.lengths[0]) == end and got.row(0)[-1] == eos
    assert (got.tokens[0, end:] == got.pad_id).all()


@pytest.mark.parametrize("name", ["sentencepiece-32k", "llama3"])
def test_vector_patches_the_prompt_only(name, vocab, hf_models):
    """With a task vector the prompt's last position is patched once: equal to HF cached decoding whose prefill
    had that position patched by a plain pre-hook, and different from the unpatched continuation."""
    model, hf = vocab[2][name], hf_models[name]
    hooks = hook_count(model)
    batch = _prompts(model)
    layer = 1
    torch.manual_seed(0)
    v = torch.randn(model.cfg.d_model) * 3
    tv = tvlens.TaskVector.from_tensor(model, v, layer=layer, task="custom")
    got = generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False, vector=tv)
    plain = generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False)
    n_prompt = batch.tokens.shape[1]

    def pre_hook(module, args, kwargs):
        hidden = args[0] if args else kwargs["hidden_states"]
        if hidden.shape[1] == n_prompt:  # the prefill; cached steps see one new position
            hidden = hidden.clone()
            hidden[:, -1] = v.to(hidden.dtype)
            if args:
                return (hidden, *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": hidden}
        return None

    handle = hf.model.layers[layer].register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        ref = _hf_generate(hf, batch, STEPS, min_new_tokens=STEPS, pad_token_id=got.pad_id)
    finally:
        handle.remove()
    assert torch.equal(got.tokens, ref)
    assert not torch.equal(got.tokens, plain.tokens)  # the vector changes what follows the prompt
    first = tvlens.apply_vector(model, batch, tv).argmax(-1)
    assert torch.equal(got.tokens[:, 0], first)
    # patching every generated position too is another computation
    every = generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False, vector=tv, vector_at="every")
    assert torch.equal(every.tokens[:, 0], got.tokens[:, 0]) and not torch.equal(every.tokens, got.tokens)
    assert hook_count(model) == hooks
    assert torch.equal(got.prompt_tokens, batch.tokens)


def test_sampling_is_seeded(vocab):
    model = vocab[2]["gpt2"]
    batch = _prompts(model, 2)
    a = generate(model, batch, max_new_tokens=STEPS, do_sample=True, seed=3, stop_at_eos=False)
    b = generate(model, batch, max_new_tokens=STEPS, do_sample=True, seed=3, stop_at_eos=False)
    c = generate(model, batch, max_new_tokens=STEPS, do_sample=True, seed=4, stop_at_eos=False)
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.tokens, c.tokens)
    greedy = generate(model, batch, max_new_tokens=STEPS, stop_at_eos=False)
    top1 = generate(model, batch, max_new_tokens=STEPS, do_sample=True, top_k=1, seed=5, stop_at_eos=False)
    assert torch.equal(top1.tokens, greedy.tokens)
    tiny_p = generate(model, batch, max_new_tokens=STEPS, do_sample=True, top_p=1e-6, seed=5, stop_at_eos=False)
    assert torch.equal(tiny_p.tokens, greedy.tokens)
    # the sampled first tokens are among the top-k of the logits
    k = generate(model, batch, max_new_tokens=1, do_sample=True, top_k=3, temperature=2.0, seed=6)
    logits = tvlens.inputs.text.final_logits(model, batch)
    assert all(int(t) in logits[r].topk(3).indices.tolist() for r, t in enumerate(k.tokens[:, 0]))


def test_text_and_token_prompts(vocab):
    model = vocab[2]["llama3"]
    texts = ["France → Paris\nJapan →", "Italy →"]
    g = generate(model, texts, max_new_tokens=3, stop_at_eos=False)
    own = tvlens.prompts_from_text(model, texts, ["Tokyo", "Rome"])
    assert torch.equal(g.tokens, generate(model, own, max_new_tokens=3, stop_at_eos=False).tokens)
    assert torch.equal(g.tokens, generate(model, own.tokens, attention_mask=own.attention_mask, max_new_tokens=3,
                                          stop_at_eos=False).tokens)
    assert g.texts[0] == model.tokenizer.decode(g.row(0), skip_special_tokens=True)
    assert callable(tvlens.generate) and "Generation(" in repr(g)


@pytest.mark.parametrize("kw,exc,pattern", [
    (dict(max_new_tokens=0), ValueError, r"max_new_tokens must be >= 1"),
    (dict(temperature=0.5), ValueError, r"only apply when sampling: pass do_sample=True"),
    (dict(do_sample=True, temperature=0), ValueError, r"temperature must be > 0"),
    (dict(do_sample=True, top_p=1.5), ValueError, r"top_p must be in \(0, 1\]"),
    (dict(vector_at="gen"), ValueError, r"vector_at must be one of"),
    (dict(vector=torch.zeros(64)), TypeError, r"vector must be a tvlens.TaskVector"),
    (dict(mode="add"), ValueError, r"pass vector=\.\.\. or leave them out"),
    (dict(prompts=torch.tensor([[5, 6, 7]]), attention_mask=torch.tensor([[1, 1, 0]])), ValueError, r"pad the prompts on the LEFT"),
    (dict(prompts=3.5), TypeError, r"prompts must be a PromptBatch"),
])
def test_bad_input(vocab, kw, exc, pattern):
    model = vocab[2]["gpt2"]
    hooks = hook_count(model)
    prompts = kw.pop("prompts", ["Japan →"])
    with pytest.raises(exc, match=pattern):
        generate(model, prompts, **kw)
    assert hook_count(model) == hooks
