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
