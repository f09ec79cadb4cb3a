"""Real tokenizer vocabularies and tiny random models of their real architectures, for the tests.

The vocabulary files in ``tests/data/tokenizers/`` are the real ones (see the README there for
where they come from and their licences), xz-compressed; :func:`tokenizer_dir` unpacks one into a
folder that ``transformers`` loads. :func:`build_tiny` saves a random 2-layer, ``d_model`` 64
model of the vocabulary's real architecture (GPT-2, Llama-2/Mistral with SentencePiece, Llama-3,
Qwen3) with its tokenizer, with ``save_pretrained``, so that ``tvlens.load_model(dir)`` loads it
the way it loads a real checkpoint.
"""

from __future__ import annotations

import lzma
import shutil
from pathlib import Path

import torch

DATA = Path(__file__).parent / "data" / "tokenizers"

#: vocabulary -> (architecture, config vocab_size of the real model)
VOCABULARIES = {
    "gpt2": ("gpt2", 50257),
    "sentencepiece-32k": ("llama", 32000),
    "llama3": ("llama3", 128256),
    "qwen3": ("qwen3", 151936),
}

#: how a word that follows a space starts, per vocabulary (GPT-2 byte-level "Ġ", SentencePiece "▁")
SPACE_MARK = {"gpt2": "Ġ", "sentencepiece-32k": "▁", "llama3": "Ġ", "qwen3": "Ġ"}


def tokenizer_dir(name: str, root: Path) -> Path:
    """Unpack vocabulary ``name`` into ``root/name`` (once) and return that folder."""
    src = DATA / name
    out = Path(root) / name
    if (out / ".complete").exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for f in sorted(src.iterdir()):
        if f.name.endswith(".xz"):
            (out / f.name[:-3]).write_bytes(lzma.decompress(f.read_bytes()))
        elif f.is_file():
            shutil.copy(f, out / f.name)
    (out / ".complete").write_text("")
    return out


def load_tokenizer(name: str, root: Path):
    from transformers import AutoTokenizer, GPT2TokenizerFast

    d = tokenizer_dir(name, root)
    if name == "gpt2":
        tok = GPT2TokenizerFast.from_pretrained(str(d))
        assert len(tok) == 50257, len(tok)  # transformers 5's GPT2TokenizerFast(vocab_file=...) builds a 1-token one
        return tok
    return AutoTokenizer.from_pretrained(str(d))


def build_tiny(name: str, out: Path, root: Path, *, seed: int = 0) -> Path:
    """Save a random 2-layer, d_model 64 model of vocabulary ``name``'s architecture, with its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

    arch, vocab_size = VOCABULARIES[name]
    tok = load_tokenizer(name, root)
    torch.manual_seed(seed)
    bos, eos = tok.bos_token_id, tok.eos_token_id
    if arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=bos,
                         eos_token_id=eos)
        model = GPT2LMHeadModel(cfg)
    elif arch in ("llama", "llama3"):
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                          rope_theta=10000.0 if arch == "llama" else 500000.0, bos_token_id=bos, eos_token_id=eos,
                          tie_word_embeddings=False)
        model = LlamaForCausalLM(cfg)
    else:
        cfg = Qwen3Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=512,
                          bos_token_id=bos, eos_token_id=eos, tie_word_embeddings=True)
        model = Qwen3ForCausalLM(cfg)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


_SESSION: dict[str, object] = {}


def session_models(tmp_path_factory) -> tuple[dict, dict, dict]:
    """(tokenizers, checkpoint dirs, loaded models) of every vocabulary, built once per test process."""
    if not _SESSION:
        import tvlens

        root = tmp_path_factory.mktemp("vocabularies")
        toks = {n: load_tokenizer(n, root / "tok") for n in VOCABULARIES}
        dirs = {n: build_tiny(n, root / "models" / n, root / "tok") for n in VOCABULARIES}
        _SESSION.update(tokenizers=toks, dirs=dirs, models={n: tvlens.load_model(d, device="cpu") for n, d in dirs.items()})
    return _SESSION["tokenizers"], _SESSION["dirs"], _SESSION["models"]  # type: ignore[return-value]
