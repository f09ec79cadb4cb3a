"""``organism-vlm``: a LLaVA-shaped VLM on the frozen text organism (Luo, Darrell & Bar 2024).

* :mod:`.images` — the synthetic 16×16 pictures of the concept domains (flags, 7-segment numbers,
  letter glyphs), pure numpy;
* :mod:`.build` — the HF ``LlavaForConditionalGeneration`` + ``TinyLlavaProcessor`` assembly;
  importing this package registers the processor so that ``AutoProcessor.from_pretrained`` (and so
  the TransformerLens bridge) loads it without PIL, torchvision or network;
* :mod:`.prompts` — token-level image / text ICL prompts in the text organism's format;
* :mod:`.train` / :mod:`.check` — the training script and the cross-modal measurements;
* ``checkpoint/`` — the shipped weights (model card: ``README.md``).
"""

from .build import register_image_processor

register_image_processor()

__all__ = ["register_image_processor"]
