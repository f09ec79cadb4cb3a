"""The model organisms: small models trained by scripts in this package and shipped with it.

Each is an ordinary Hugging Face checkpoint directory, loaded by :func:`tvlens.load_model` through
the same TransformerLens 4 bridge as any real model, so nothing in tvlens special-cases them.

| name | folder | what it is |
|---|---|---|
| ``organism`` | ``text/checkpoints/organism`` | 4-layer GQA Llama, text ICL, task vector planted at L2 by TVP-loss |
| ``organism-natural`` | ``text/checkpoints/organism-natural`` | the same recipe without TVP-loss |
| ``organism-visual`` | ``visual/checkpoint`` | bidirectional BERT over palette codes, 2×2 canvas inpainting (Hojel et al. 2024) |
| ``organism-vlm`` | ``vlm/checkpoint`` | LLaVA-shaped: a CLIP tower on the frozen text organism (Luo et al. 2024) |
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["REGISTRY", "organism_path"]

_HERE = Path(__file__).parent

#: organism name -> checkpoint directory, relative to this package
REGISTRY: dict[str, str] = {
    "organism": "text/checkpoints/organism",
    "organism-natural": "text/checkpoints/organism-natural",
    "organism-visual": "visual/checkpoint",
    "organism-vlm": "vlm/checkpoint",
}


def organism_path(name: str = "organism") -> Path:
    """Directory of a shipped model organism checkpoint."""
    if name not in REGISTRY:
        raise ValueError(f"unknown organism {name!r}: the shipped organisms are {', '.join(REGISTRY)}")
    return _HERE / REGISTRY[name]
