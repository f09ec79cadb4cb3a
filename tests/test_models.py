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


# ----------------------------------------------------------------------------------------------
# names users type, bridges without compatibility mode, and nothing ever installed


def test_transformer_lens_aliases_resolve_to_hub_names(monkeypatch):
    from transformer_lens.supported_models import MODEL_ALIASES

    from tvlens.models import resolve_alias

    assert resolve_alias("gpt2-small") == "gpt2" and resolve_alias("pythia-70m") == "EleutherAI/pythia-70m"
    assert resolve_alias("GPT2-Small") == "gpt2"  # TransformerLens's table is case-insensitive
    assert resolve_alias("my-own/repo") == "my-own/repo"
    # every alias of TransformerLens's own table, not a hand-written copy
    official, aliases = next((o, a) for o, a in MODEL_ALIASES.items() if a)
    assert all(resolve_alias(a) == official for a in aliases)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"cannot load 'gpt2-small' \(TransformerLens's alias of the hub model 'gpt2'\): "
                                         r"it is not a local directory.*hub is not reachable"):
        tvlens.load_model("gpt2-small")


def test_bridge_without_compatibility_mode_is_refused(tiny_dirs):
    from transformer_lens.model_bridge import TransformerBridge

    raw = TransformerBridge.boot_transformers(str(tiny_dirs["gpt2"]), device="cpu")
    with pytest.raises(ValueError, match=r"loaded without compatibility mode.*model\.enable_compatibility_mode\("
                                         r"no_processing=True\)"):
        ModelInfo.of(raw)
    for call in (lambda: tvlens.icl_prompts(raw, "antonym", n_prompts=1, n_shots=1),
                 lambda: tvlens.evaluate_icl(raw, "antonym", 1, n_prompts=1),
                 lambda: tvlens.generate(raw, ["a →"], max_new_tokens=1)):
        with pytest.raises(ValueError, match="without compatibility mode"):
            call()
    raw.enable_compatibility_mode(no_processing=True)
    assert ModelInfo.of(raw).n_layers == 2


def _distributions() -> set[tuple[str, str, str]]:
    import importlib.metadata as md

    return {(d.metadata["Name"], d.version, str(getattr(d, "_path", ""))) for d in md.distributions()}


def test_load_model_never_installs_packages(tmp_path, monkeypatch):
    """A multimodal checkpoint whose processor cannot load makes TransformerLens run `pip install torchvision`;
    load_model blocks it, names what is missing, and leaves the environment's packages as they were."""
    import subprocess

    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    from tvlens.organisms.text.tokenizer import build_tokenizer

    monkeypatch.setenv("PIP_NO_INDEX", "1")  # belt and braces: even an unblocked pip could fetch nothing
    torch.manual_seed(0)
    text = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                       num_key_value_heads=1, max_position_embeddings=64)
    vision = CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                              image_size=16, patch_size=8, projection_dim=16)
    LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=text, image_token_index=63)).save_pretrained(tmp_path)
    build_tokenizer(["a b c"]).save_pretrained(tmp_path)  # no processor files: AutoProcessor fails

    started: list = []

    class Spy(subprocess.Popen):  # records any command that gets past tvlens's guard, and runs nothing
        def __init__(self, args, *a, **kw):
            started.append(args)
            raise OSError("no subprocess may start in this test")

    monkeypatch.setattr(subprocess, "Popen", Spy)
    before = _distributions()
    try:
        import torchvision  # noqa: F401

        pytest.skip("torchvision is installed here, so TransformerLens has nothing to install")
    except ImportError:
        pass
    with pytest.raises(ImportError, match=r"its processor did not load \(AutoProcessor.from_pretrained failed: .*\), and "
                                          r"TransformerLens then tried to install packages \(pip install torchvision\); "
                                          r"tvlens blocks every install.*Missing here: torchvision.*require_processor=False"):
        tvlens.load_model(tmp_path, device="cpu")
    assert started == [] and _distributions() == before
    assert subprocess.Popen is Spy  # the guard put back what it found
    model = tvlens.load_model(tmp_path, device="cpu", require_processor=False)
    assert getattr(model, "processor", None) is None and _distributions() == before and started == []


def test_install_guard_blocks_installer_subprocesses():
    import os
    import subprocess

    from tvlens.models import InstallBlocked, _no_installs

    attempts: list[str] = []
    with _no_installs(attempts):
        for cmd in (["uv", "pip", "install", "torchvision", "-q"], ["/usr/bin/python3", "-m", "pip", "install", "x"]):
            with pytest.raises(InstallBlocked, match="blocked a package install"):
                subprocess.check_call(cmd)
        with pytest.raises(InstallBlocked):
            os.system("pip install torchvision")
        assert subprocess.run(["true"]).returncode == 0  # other commands run
    assert len(attempts) == 3 and subprocess.Popen.__name__ == "Popen" and os.system.__name__ == "system"
