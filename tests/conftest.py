"""Shared fixtures: tiny models built offline from configs, and the shipped organism.

The tiny models are random (untrained) but real Hugging Face checkpoints, saved with
``save_pretrained`` and loaded through ``tvlens.load_model(path)`` — the same path real models
take. Their tokenizer is the organism's word-level tokenizer over the whole task suite, so every
task's prompts can be built for them.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)  # tiny models: threads only add overhead, and CI shares 2 cores


def vocabulary() -> list[str]:
    try:
        from tvlens.tasks import suite_vocabulary
    except ImportError:  # the task suite is not there yet: a small stand-in vocabulary
        return [f"w{i}" for i in range(200)]
    return list(suite_vocabulary())


def build_tiny_checkpoint(kind: str, out: Path, *, seed: int = 0) -> Path:
    """Save a tiny random ``gpt2`` or GQA ``llama`` checkpoint with the suite tokenizer to ``out``."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from tvlens.organisms.text.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary())
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = GPT2LMHeadModel(cfg)
    elif kind == "llama":
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        model = LlamaForCausalLM(cfg)
    else:
        raise ValueError(kind)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {kind: build_tiny_checkpoint(kind, root / kind) for kind in ("gpt2", "llama")}


@pytest.fixture(scope="session")
def tiny_gpt2(tiny_dirs):
    import tvlens

    return tvlens.load_model(tiny_dirs["gpt2"], device="cpu")


@pytest.fixture(scope="session")
def tiny_llama(tiny_dirs):
    import tvlens

    return tvlens.load_model(tiny_dirs["llama"], device="cpu")


@pytest.fixture(scope="session", params=["gpt2", "llama"])
def tiny_model(request, tiny_gpt2, tiny_llama):
    """Both tiny architectures: LayerNorm + learned positions (GPT-2), RMSNorm + RoPE + GQA (Llama)."""
    return {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]


@pytest.fixture(scope="session")
def organism():
    from tvlens.models import organism_path

    if not (organism_path("organism") / "config.json").exists():
        pytest.skip("organism checkpoint not shipped yet")
    import tvlens

    return tvlens.load_model("organism", device="cpu")


# ----------------------------------------------------------------------------------------------
# vision-language models: tiny random configs of the supported architectures, and organism-vlm


def _tokenizer(specials):
    from tvlens.organisms.text.tokenizer import build_tokenizer

    tok = build_tokenizer(vocabulary())
    tok.add_special_tokens({"additional_special_tokens": specials})
    return tok, {s: tok.convert_tokens_to_ids(s) for s in specials}


def _text_config(tok, **kw):
    return dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=512, bos_token_id=tok.bos_token_id,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **kw)


def build_tiny_vlm(kind: str, out: Path) -> Path:
    """A tiny random VLM of ``kind`` saved with save_pretrained (no processor files: tvlens expands placeholders)."""
    torch.manual_seed(0)
    if kind == "llava":
        from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

        tok, ids = _tokenizer(["<image>"])
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=16, patch_size=8, projection_dim=32)
        model = LlavaForConditionalGeneration(LlavaConfig(vision_config=vision, text_config=LlamaConfig(**_text_config(tok)),
                                                          image_token_id=ids["<image>"], vision_feature_layer=-1,
                                                          image_seq_length=4))
    elif kind == "gemma3":
        from transformers import Gemma3Config, Gemma3ForConditionalGeneration

        tok, ids = _tokenizer(["<start_of_image>", "<end_of_image>", "<image_soft_token>"])
        model = Gemma3ForConditionalGeneration(Gemma3Config(
            text_config=_text_config(tok, head_dim=16, sliding_window=64),
            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                               image_size=16, patch_size=4),
            mm_tokens_per_image=4, boi_token_index=ids["<start_of_image>"], eoi_token_index=ids["<end_of_image>"],
            image_token_index=ids["<image_soft_token>"]))
    else:
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        names = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
        tok, ids = _tokenizer(names)
        rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
        model = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=_text_config(tok, rope_parameters=rope),
            vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=4,
                               spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, window_size=8,
                               fullatt_block_indexes=[1]),
            image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
            vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"]))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session", params=["organism-vlm", "tiny-llava", "tiny-gemma3"])
def vlm_model(request, tmp_path_factory):
    """The trained organism-vlm and two tiny random VLMs (Gemma 3: token_type_ids along the positions,
    bidirectional image attention), saved without processors."""
    import tvlens

    os.environ.setdefault("PIP_NO_INDEX", "1")  # a VLM's bridge may shell out to pip: never let it reach an index
    if request.param == "organism-vlm":
        from tvlens.models import organism_path

        if not (organism_path("organism-vlm") / "config.json").exists():
            pytest.skip("organism-vlm checkpoint not shipped")
        return tvlens.load_model("organism-vlm", device="cpu")
    kind = request.param.split("-")[1]
    return tvlens.load_model(build_tiny_vlm(kind, tmp_path_factory.mktemp(kind) / "m"), device="cpu",
                             require_processor=False)


def padded_image_batch(model, middle: tuple[str, str, str] = ("digits", "2", "3"), **kw):
    """Rows holding 3, 1 and 1 images, of different lengths, left-padded into one batch; ``middle`` is the
    second row's (domain, item, answer)."""
    from tvlens.inputs import multimodal as mm
    from tvlens.organisms.vlm.images import render

    mark = mm.vision_spec(model).marker
    texts = [f"{mark} → 5\n{mark} → 8\n{mark} →", f"{mark} →", f"three → four\n{mark} →"]
    images = [[render("digits", "4", 10**6), render("digits", "7", 10**6 + 1), render("digits", "12", 10**6 + 2)],
              [render(middle[0], middle[1], 10**6 + 3)], [render("digits", "9", 10**6 + 4)]]
    return mm.prompts_from_images(model, texts, images, ["13", middle[2], "10"], **kw)


class Forwards:
    """Counts forward passes of a model (to show that bad input is refused before any)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.register_forward_pre_hook(self._count)

    def _count(self, *_):
        self.n += 1

    def close(self):
        self.handle.remove()
