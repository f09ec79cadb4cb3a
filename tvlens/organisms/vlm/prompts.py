"""Token-level ICL prompts with image or text inputs, in the text organism's prompt format.

The text organism reads ``<bos> [instruction \\n] x1 → y1 \\n ... xk → yk \\n q →`` (the format of
:func:`tvlens.prompts.icl_prompts`, Hendel et al. 2023, §2). Luo, Darrell & Bar 2024 (§3–4) pose
the same prompts with images: an image input takes the place of the input word ``x``, as its
``N_IMAGE_TOKENS = 4`` ``<image>`` placeholder tokens (LLaVA splices the projected patch features in
there). So an image-ICL prompt is ::

    <bos> <image>×4 → y1 \\n <image>×4 → y2 \\n <image>×4 →

and a Text-ICL-xBase prompt (text examples, image query) is ``<bos> france → paris \\n <image>×4 →``.

These prompts are assembled token by token (so token classes and positions are exact); tokenizing
the same text with the checkpoint's ``LlavaProcessor`` gives the same ids (tested).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, Union

import numpy as np
import torch
from jaxtyping import Float, Int

from .build import IMAGE_TOKEN, N_IMAGE_TOKENS
from .images import render

__all__ = ["Image", "Input", "Prompt", "PromptCodec", "collate"]


@dataclass(frozen=True)
class Image:
    """An image input: the picture of ``item`` in ``domain``, rendering ``variant``."""

    domain: str
    item: str
    variant: int = 0

    def pixels(self) -> np.ndarray:
        return render(self.domain, self.item, self.variant)


#: an input is a word (text modality) or an image
Input = Union[str, Image]


@dataclass
class Prompt:
    """One prompt: token ids (``<image>`` placeholders included), its images in order, the final
    separator position, and training targets (``targets[p]`` is the token predicted at ``p``)."""

    tokens: list[int]
    images: list[Image]
    final_sep: int
    targets: list[int]


class PromptCodec:
    """Builds :class:`Prompt` s from (input, output) examples with the checkpoint's tokenizer."""

    def __init__(self, tokenizer: Any, separator: str = "→", example_sep: str = "\n"):
        self.tok = tokenizer
        self.bos = tokenizer.bos_token_id
        self.pad = tokenizer.pad_token_id
        self.image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.sep = self._single(separator)
        self.nl = self._single(example_sep)
        self._cache: dict[str, list[int]] = {}

    def _single(self, text: str) -> int:
        ids = self.tok.encode(text, add_special_tokens=False)
        if len(ids) != 1:
            raise ValueError(f"{text!r} must be one token of the tokenizer, got {ids}")
        return ids[0]

    def words(self, text: str) -> list[int]:
        """Token ids of ``text`` (no special tokens); unknown words raise."""
        if text not in self._cache:
            ids = self.tok.encode(text, add_special_tokens=False)
            if not ids or self.tok.unk_token_id in ids:
                raise ValueError(f"{text!r} is not in the organism's vocabulary (got ids {ids})")
            self._cache[text] = ids
        return self._cache[text]

    def _input(self, x: Input, images: list[Image]) -> list[int]:
        if isinstance(x, Image):
            images.append(x)
            return [self.image] * N_IMAGE_TOKENS
        return self.words(x)

    def prompt(
        self,
        demos: Sequence[tuple[Input, str]],
        query: Input,
        answer: str | None = None,
        instruction: str | None = None,
        train_from: int = 0,
    ) -> Prompt:
        """``<bos> [instruction \\n] x1 → y1 \\n ... q → [answer]``.

        With ``answer`` the answer tokens are appended (teacher forcing). Targets are the answer
        tokens of every example ``i >= train_from`` (demos then the query) at the positions that
        predict them; everything else is -100.
        """
        toks, tg, images = [self.bos], [-100], []
        if instruction:
            seg = self.words(instruction) + [self.nl]
            toks += seg
            tg += [-100] * len(seg)
        examples = list(demos) + [(query, answer)]
        final_sep = -1
        for i, (x, y) in enumerate(examples):
            seg = self._input(x, images)
            toks += seg
            tg += [-100] * len(seg)
            final_sep = len(toks)
            toks.append(self.sep)
            tg.append(-100)
            if y is None:
                break
            ys = self.words(y)
            train = i >= train_from
            tg += (ys if train else [-100] * len(ys))
            toks += ys
            if i < len(examples) - 1:
                toks.append(self.nl)
                tg.append(-100)
        # targets[p] = token predicted at p: shift so that the separator predicts y[0]
        shifted = tg[1:] + [-100]
        if len(shifted) != len(toks):
            raise AssertionError("internal error: targets and tokens differ in length")
        return Prompt(tokens=toks, images=images, final_sep=final_sep, targets=shifted)


def collate(
    prompts: Sequence[Prompt], pad_id: int, processor: Any, left: bool = True
) -> tuple[Int[torch.Tensor, "batch pos"], Int[torch.Tensor, "batch pos"], Float[torch.Tensor, "n 3 16 16"] | None, Int[torch.Tensor, "batch pos"], Int[torch.Tensor, " batch"]]:
    """Pad a list of prompts into ``tokens, attention_mask, pixel_values, targets, final_sep``.

    Left padding (the tvlens convention: the final separator is position -1 of every row) or right
    padding (training). ``pixel_values`` holds the images in row-major order of their placeholders,
    the order LLaVA splices them in; ``None`` when no prompt has an image.
    """
    n, T = len(prompts), max(len(p.tokens) for p in prompts)
    tokens = torch.full((n, T), pad_id, dtype=torch.long)
    mask = torch.zeros((n, T), dtype=torch.long)
    targets = torch.full((n, T), -100, dtype=torch.long)
    seps = torch.empty(n, dtype=torch.long)
    images: list[np.ndarray] = []
    for b, p in enumerate(prompts):
        L = len(p.tokens)
        off = T - L if left else 0
        tokens[b, off : off + L] = torch.tensor(p.tokens)
        mask[b, off : off + L] = 1
        targets[b, off : off + L] = torch.tensor(p.targets)
        seps[b] = off + p.final_sep
        images.extend(im.pixels() for im in p.images)
    pv = processor.image_processor(images, return_tensors="pt")["pixel_values"] if images else None
    return tokens, mask, pv, targets, seps
