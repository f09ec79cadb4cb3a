"""Loading through the TransformerLens 4 bridge (issue 4)."""

from __future__ import annotations

import pytest
import torch

import tvlens
from tvlens.hooks import act_name, hook_count
from tvlens.models import ModelInfo, check_hook_contract, model_id


def _hf_model(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path).eval()


@pytest.mark.parametrize("kind,expect", [("gpt2", dict(n_layers=2, n_heads=4, n_kv_heads=4, d_model=64, d_head=16, normalization="LN")),
                                         ("llama", dict(n_layers=2, n_heads=4, n_kv_heads=2, d_model=64, d_head=16, normalization="RMS"))])
def test_model_info(kind, expect, tiny_dirs, tiny_gpt2, tiny_llama):
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind]
    info = ModelInfo.of(model)
    for k, v in expect.items():
        assert getattr(info, k) == v, k
    assert info.d_vocab == len(model.tokenizer)
    assert info.n_ctx == 256
    assert len(info.config_hash) == 16


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_logprobs_equal_raw_transformers(kind, tiny_dirs, tiny_gpt2, tiny_llama):
    model = {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind]
    hf = _hf_model(tiny_dirs[kind])
    tokens = torch.randint(5, model.cfg.d_vocab, (3, 17), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = model(tokens).log_softmax(-1)
        ref = hf(tokens).logits.log_softmax(-1)
    assert (ours - ref).abs().max().item() < 1e-5


def test_hook_shapes_follow_model_info(tiny_llama):
    info = ModelInfo.of(tiny_llama)
    tokens = torch.randint(5, info.d_vocab, (2, 7))
    names = [act_name("z", 1), act_name("resid_pre", 0), act_name("pattern", 1), act_name("k", 0)]
    _, cache = tiny_llama.run_with_cache(tokens, names_filter=lambda n: n in names)
    assert cache[names[0]].shape == (2, 7, info.n_heads, info.d_head)
    assert cache[names[1]].shape == (2, 7, info.d_model)
    assert cache[names[2]].shape == (2, info.n_heads, 7, 7)
    assert cache[names[3]].shape == (2, 7, info.n_kv_heads, info.d_head)


def test_weights_frozen_and_eval(tiny_gpt2):
    assert not tiny_gpt2.training
    assert all(not p.requires_grad for p in tiny_gpt2.parameters())


def test_model_id_distinguishes_weights(tiny_dirs, tmp_path):
    from conftest import build_tiny_checkpoint

    other = tvlens.load_model(build_tiny_checkpoint("llama", tmp_path / "other", seed=1), device="cpu")
    same = tvlens.load_model(tiny_dirs["llama"], device="cpu")
    first = tvlens.load_model(tiny_dirs["llama"], device="cpu")
    assert model_id(same) == model_id(first)
    assert model_id(other)["config_hash"] != model_id(first)["config_hash"]


def test_hooks_removed_after_exception(tiny_llama):
    tokens = torch.randint(5, tiny_llama.cfg.d_vocab, (1, 6))
    with torch.no_grad():
        before = tiny_llama(tokens)
    baseline = hook_count(tiny_llama)

    def boom(act, hook):
        raise RuntimeError("inside a hook")

    with pytest.raises(RuntimeError, match="inside a hook"):
        tvlens.hooks.run(tiny_llama, tokens, fwd_hooks=[(act_name("z", 0), boom)])
    assert hook_count(tiny_llama) == baseline
    with torch.no_grad():
        assert torch.equal(tiny_llama(tokens), before)


def test_hooks_removed_after_keyboard_interrupt(tiny_gpt2):
    tokens = torch.randint(5, tiny_gpt2.cfg.d_vocab, (1, 6))
    baseline = hook_count(tiny_gpt2)

    def interrupt(act, hook):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        tvlens.hooks.run(tiny_gpt2, tokens, fwd_hooks=[(act_name("resid_pre", 1), interrupt)])
    assert hook_count(tiny_gpt2) == baseline


def test_user_hooks_left_alone(tiny_gpt2):
    tokens = torch.randint(5, tiny_gpt2.cfg.d_vocab, (1, 6))
    calls = []
    tiny_gpt2.add_hook(act_name("resid_pre", 0), lambda act, hook: calls.append(1))
    try:
        tvlens.hooks.run(tiny_gpt2, tokens, fwd_hooks=[(act_name("z", 0), lambda act, hook: None)])
        tiny_gpt2(tokens)
        assert len(calls) == 2
    finally:
        tiny_gpt2.reset_hooks()


def test_contract_check_passes_and_names_missing_hook(tiny_gpt2, monkeypatch):
    check_hook_contract(tiny_gpt2)
    broken = dict(tiny_gpt2.hook_dict)
    del broken[act_name("z", 1)]
    monkeypatch.setattr(type(tiny_gpt2), "hook_dict", property(lambda self: broken))
    with pytest.raises(ValueError, match=r"blocks\.1\.attn\.hook_z"):
        check_hook_contract(tiny_gpt2)


def test_unknown_hook_name_is_refused(tiny_gpt2):
    with pytest.raises(ValueError, match="unknown hook point"):
        tvlens.hooks.run(tiny_gpt2, torch.zeros(1, 3, dtype=torch.long), fwd_hooks=[("blocks.9.attn.hook_z", lambda a, hook: a)])


def test_bad_inputs(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import time

    t = time.time()
    with pytest.raises(ValueError, match="organism"):
        tvlens.load_model("definitely-not-a-model-xyz")
    assert time.time() - t < 5, "an unknown hub name offline must fail fast"
    with pytest.raises(FileNotFoundError, match="config.json"):
        tvlens.load_model(tmp_path)
    f = tmp_path / "weights.safetensors"
    f.write_bytes(b"")
    with pytest.raises(ValueError, match="is a file"):
        tvlens.load_model(f)
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        tvlens.load_model("./no/such/dir")
    with pytest.raises(ValueError, match="unsupported dtype"):
        tvlens.load_model("organism", dtype="int8")
    with pytest.raises(ValueError, match="unsupported dtype"):
        tvlens.load_model("organism", dtype=torch.int32)


def test_check_layer_and_head(tiny_gpt2):
    from tvlens.hooks import check_head, check_layer

    assert check_layer(tiny_gpt2, -1) == 1
    assert check_layer(tiny_gpt2, 2, allow_end=True) == 2
    with pytest.raises(ValueError, match="out of range"):
        check_layer(tiny_gpt2, 2)
    with pytest.raises(ValueError, match="0..3"):
        check_head(tiny_gpt2, 4)
