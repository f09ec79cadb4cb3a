"""Multimodal ICL prompts: text and image inputs in one left-padded batch (Luo, Darrell & Bar 2024).

Luo et al. 2024 (§3–4, Table 2) pose one task four ways to a vision-language model:

==========================  ==============================================================
image ICL                   ``<image> → y1 \\n <image> → y2 \\n ... <image> →``
no context                  ``<image> →``
text ICL, image query       ``france → paris \\n ... <image> →`` (their *xBase*)
instruction, image query    ``Give the capital city of the country. \\n <image> →``
==========================  ==============================================================

A :class:`MultimodalBatch` is one such batch: the tokens with every image already expanded into the
model's image placeholder tokens, the attention mask (LEFT padding, so the final separator is
position -1 of every row, as in :class:`~tvlens.inputs.text.PromptBatch`), the token classes (an
image's placeholder tokens take the class of the input they stand for: ``DEMO_INPUT`` or
``QUERY_INPUT``), the answers, and the image tensors the model's forward needs
(:meth:`MultimodalBatch.model_inputs`: ``pixel_values``, plus ``image_grid_thw`` for Qwen2.5-VL and
``token_type_ids`` for Gemma 3). It implements the engine's inputs protocol
(:mod:`tvlens.engine.batch`), so every engine path runs it; :meth:`~MultimodalBatch.select` slices
the images of the chosen rows, also where the model flattens them over the batch (Qwen2.5-VL's
patches, found through ``image_grid_thw``).

**How a prompt is built.** The prompt text is written with the model's image marker (``<image>`` for
LLaVA, ``<|image_pad|>`` for Qwen2.5-VL, ``<image_soft_token>`` for Gemma 3) where an image input
goes, tokenized as a whole exactly as text prompts are (:func:`tvlens.icl_prompts`: token classes
and answer tokens from character offsets), and each marker is then expanded to the model's run of
image tokens — the placeholder expansion the model's processor performs (LLaVA's
``image_seq_length`` copies; Qwen's ``<|vision_start|>`` + ``(h·w / merge²)`` pads + ``<|vision_end|>``;
Gemma 3's ``<start_of_image>`` + ``mm_tokens_per_image`` soft tokens + ``<end_of_image>``, without
the blank lines its chat template adds). For ``organism-vlm`` the result equals what its processor
gives for the same text and images (tested). Images become ``pixel_values`` through the processor's
own image processor when the model has one, else through the documented numpy equivalent of
:func:`vision_spec` (rescale, normalise, and Qwen's patch flattening).

**Images** default to the synthetic pictures of ``organism-vlm`` (:mod:`tvlens.organisms.vlm.images`:
flags, 7-segment numbers, letter glyphs) for the 13 tasks whose inputs are drawn there; queries and
demonstrations use held-out renderings (variants ``>= 10**6``, never seen in training). Pass
``picture=`` (``(item, variant) -> uint8 [H, W, 3]``) for other images.

Every check runs before any forward, and errors say what was wrong and how to fix it: an image batch
without images, an image of the wrong size or channel count, more images than image placeholders, a
text-only model given images.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Int, UInt8
from torch import Tensor

from ..engine.batch import row_index
from .text import PromptBatch, PromptRows, TokenClass, _build, _Layout, icl_prompts

__all__ = [
    "VisionSpec",
    "vision_spec",
    "is_vlm",
    "MultimodalBatch",
    "multimodal_prompts",
    "image_icl_prompts",
    "image_query_prompts",
    "text_icl_image_query_prompts",
    "instruction_image_query_prompts",
    "image_icl_text_query_prompts",
    "prompts_from_images",
    "check_inputs",
    "EVAL_VARIANT0",
]

#: held-out renderings start here (``organism-vlm`` trains on variants below it)
EVAL_VARIANT0 = 10**6
_SPLIT_OFFSET = {"test": 0, "dev": 500_000, "train": 250_000}
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_QWEN_KINDS = ("qwen2_vl", "qwen2_5_vl")

Picture = Callable[[str, int], np.ndarray]


# ----------------------------------------------------------------------------------------------
# what the model expects of images


@dataclass(frozen=True)
class VisionSpec:
    """How a VLM takes images: its placeholder tokens, image size, and the extra forward inputs.

    ``run(h, w)`` is the token run one image of ``h×w`` pixels becomes; ``marker`` the text written
    where an image goes before expansion. ``image_size`` is ``None`` where any multiple of
    ``size_multiple`` works (Qwen2.5-VL).
    """

    kind: str
    image_token_id: int
    marker: str
    image_size: int | None
    channels: int
    size_multiple: int = 1
    before: tuple[int, ...] = ()
    after: tuple[int, ...] = ()
    fixed_tokens: int | None = None
    patch_size: int = 1
    merge_size: int = 1
    temporal_patch_size: int = 1
    mean: tuple[float, ...] = _CLIP_MEAN
    std: tuple[float, ...] = _CLIP_STD
    processor: Any = None

    def n_tokens(self, h: int, w: int) -> int:
        """Image tokens for one ``h×w`` image (Luo et al. 2024, §3: the image enters as a run of tokens)."""
        if self.fixed_tokens is not None:
            return self.fixed_tokens
        return (h // self.patch_size) * (w // self.patch_size) // (self.merge_size**2)

    def run(self, h: int, w: int) -> list[int]:
        return [*self.before, *([self.image_token_id] * self.n_tokens(h, w)), *self.after]

    @property
    def uses_grid(self) -> bool:
        return self.kind in _QWEN_KINDS

    def check_image(self, image: Any, what: str) -> UInt8[np.ndarray, "h w c"]:
        """One image as ``uint8 [height, width, channels]``, refused with the fix when it does not fit the model."""
        arr = image.numpy() if isinstance(image, Tensor) else np.asarray(image)
        if arr.ndim != 3:
            raise ValueError(f"{what} has shape {arr.shape}; images are uint8 arrays [height, width, {self.channels}] "
                             "(channels last): pass one such array per image")
        h, w, c = arr.shape
        if c != self.channels:
            raise ValueError(f"{what} has {c} channels (shape {arr.shape}) but this model's vision tower takes "
                             f"{self.channels}: give [height, width, {self.channels}] arrays (e.g. RGB, channels last)")
        if self.image_size is not None and (h, w) != (self.image_size, self.image_size):
            raise ValueError(f"{what} is {h}×{w} pixels but this model's vision tower takes {self.image_size}×"
                             f"{self.image_size}: resize the images to {self.image_size}×{self.image_size} first")
        m = self.size_multiple
        if self.image_size is None and (h % m or w % m or h == 0 or w == 0):
            raise ValueError(f"{what} is {h}×{w} pixels but this model cuts images into {m}×{m} blocks (patch × merge); "
                             f"resize to a multiple of {m} on each side")
        if arr.dtype != np.uint8:
            raise ValueError(f"{what} has dtype {arr.dtype}; images are uint8 in 0–255 (convert with .astype(np.uint8))")
        return arr

    def pixel_inputs(self, images: Sequence[np.ndarray]) -> dict[str, Tensor]:
        """``pixel_values`` (and ``image_grid_thw``) for checked images, in order (Luo §3: the model's own preprocessing)."""
        proc = getattr(self.processor, "image_processor", None)
        if proc is not None:
            out = proc(list(images), return_tensors="pt")
            keep = ("pixel_values", "image_grid_thw")
            return {k: torch.as_tensor(out[k]) for k in keep if k in out}
        mean, std = np.asarray(self.mean[: self.channels], np.float32), np.asarray(self.std[: self.channels], np.float32)
        x = [((im.astype(np.float32) / 255.0 - mean) / std).transpose(2, 0, 1) for im in images]  # [channel, h, w] each
        if not self.uses_grid:
            return {"pixel_values": torch.from_numpy(np.ascontiguousarray(np.stack(x)))}
        flat, grids = zip(*(_qwen_patches(im, self.patch_size, self.merge_size, self.temporal_patch_size) for im in x))
        return {"pixel_values": torch.from_numpy(np.concatenate(flat)), "image_grid_thw": torch.tensor(grids, dtype=torch.long)}


def _qwen_patches(image: np.ndarray, p: int, m: int, t: int) -> tuple[np.ndarray, list[int]]:
    """Qwen2-VL's patch flattening of one ``[channel, h, w]`` image (``Qwen2VLImageProcessor.patchify``)."""
    c, h, w = image.shape
    gh, gw = h // p, w // p
    x = image.reshape(c, gh // m, m, p, gw // m, m, p).transpose(1, 4, 2, 5, 0, 3, 6)
    x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], t, *x.shape[5:]))
    return np.ascontiguousarray(x.reshape(gh * gw, c * t * p * p)), [1, gh, gw]


def _hf_config(model: Any) -> Any:
    hf = getattr(model, "original_model", None)
    return getattr(hf, "config", None)


def is_vlm(model: Any) -> bool:
    """Does ``model`` have a vision tower (a ``vision_config``)?"""
    cfg = _hf_config(model)
    return cfg is not None and getattr(cfg, "vision_config", None) is not None


def vision_spec(model: Any) -> VisionSpec:
    """What ``model`` expects of images (LLaVA, Qwen2-VL / Qwen2.5-VL, Gemma 3), read from its config.

    Raises:
        ValueError: a text-only model, or a VLM family tvlens does not know, with the fix.
    """
    cfg = _hf_config(model)
    name = getattr(getattr(model, "cfg", None), "model_name", "?")
    if cfg is None or getattr(cfg, "vision_config", None) is None:
        raise ValueError(f"model {name!r} is text-only (its config has no vision tower), so it cannot take images; "
                         "give it text prompts (tvlens.icl_prompts), or load a vision-language model such as 'organism-vlm'")
    cached = getattr(model, "_tvlens_vision_spec", None)
    if cached is not None:
        return cached
    kind, vc = str(cfg.model_type), cfg.vision_config
    proc = getattr(model, "processor", None)
    tok = getattr(proc, "tokenizer", None) or getattr(model, "tokenizer", None)
    to_str = (lambda i: tok.convert_ids_to_tokens(int(i))) if tok is not None else str  # noqa: E731
    channels = int(getattr(vc, "num_channels", None) or getattr(vc, "in_channels", None) or 3)
    if kind == "llava":
        img = int(getattr(cfg, "image_token_id", None) or getattr(cfg, "image_token_index"))
        n = (int(vc.image_size) // int(vc.patch_size)) ** 2 + (cfg.vision_feature_select_strategy == "full")
        spec = VisionSpec(kind, img, to_str(img), int(vc.image_size), channels, fixed_tokens=n, processor=proc)
    elif kind == "gemma3":
        img = int(cfg.image_token_index)
        spec = VisionSpec(kind, img, to_str(img), int(vc.image_size), channels, before=(int(cfg.boi_token_index),),
                          after=(int(cfg.eoi_token_index),), fixed_tokens=int(cfg.mm_tokens_per_image),
                          mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), processor=proc)
    elif kind in _QWEN_KINDS:
        img, p, m = int(cfg.image_token_id), int(vc.patch_size), int(vc.spatial_merge_size)
        spec = VisionSpec(kind, img, to_str(img), None, channels, size_multiple=p * m, before=(int(cfg.vision_start_token_id),),
                          after=(int(cfg.vision_end_token_id),), patch_size=p, merge_size=m,
                          temporal_patch_size=int(vc.temporal_patch_size), processor=proc)
    else:
        raise ValueError(f"model {name!r} is a {kind!r} vision-language model, which tvlens does not know how to give "
                         "images yet; supported: llava, qwen2_vl, qwen2_5_vl, gemma3")
    try:
        object.__setattr__(model, "_tvlens_vision_spec", spec)
    except Exception:  # a model that takes no attributes: read the config each time
        pass
    return spec


# ----------------------------------------------------------------------------------------------
# the batch


@dataclass(frozen=True, eq=False)
class MultimodalBatch(PromptRows):
    """A left-padded batch of ICL prompts whose inputs may be images (Luo, Darrell & Bar 2024, §3).

    The fields of :class:`~tvlens.inputs.text.PromptRows` come first and mean what they mean in
    :class:`~tvlens.inputs.text.PromptBatch` (``queries`` are
    the items the query image shows, ``answers`` what the model should say). ``pixel_values`` holds
    the images of all rows in row-major order of their placeholders (``[image, channel, height,
    width]``; Qwen2.5-VL: its flattened patches ``[patch, patch_dim]`` with ``image_grid_thw``
    ``[image, 3]``); ``n_images[i]`` images belong to row ``i``. ``token_type_ids`` (Gemma 3) is 1 on
    image tokens. ``context`` / ``query_modality`` name the condition (``"image"``, ``"text"``,
    ``"instruction"``, ``"none"``).
    """

    task: str
    n_shots: int
    seed: int
    image_token_id: int
    n_images: Int[Tensor, " batch"]
    pixel_values: Tensor | None = None
    image_grid_thw: Int[Tensor, "image 3"] | None = None
    token_type_ids: Int[Tensor, "batch pos"] | None = None
    context: str = "image"
    query_modality: str = "image"
    texts: tuple[str, ...] = ()
    demos: tuple[tuple[tuple[str, str], ...], ...] = ()
    other_answers: tuple[tuple[str, ...], ...] = ()
    other_answer_tokens: tuple[tuple[tuple[int, ...], ...], ...] = ()
    #: the raw uint8 images ``[image, h, w, c]`` (for figures) and (item, variant) of each
    images: UInt8[Tensor, "image h w c"] | None = None
    image_items: tuple[tuple[str, int], ...] = ()
    options: Mapping[str, Any] = field(default_factory=dict)

    #: one entry per image (a row may hold several) or, for ``pixel_values``, per patch: taken by :meth:`select`
    _NOT_PER_ROW: ClassVar[tuple[str, ...]] = ("pixel_values", "image_grid_thw", "images", "image_items")

    def __post_init__(self) -> None:
        b, p = self.tokens.shape
        if self.attention_mask.shape != (b, p) or self.token_class.shape != (b, p):
            raise ValueError(f"tokens, attention_mask and token_class must share one [batch, pos] shape, got "
                             f"{tuple(self.tokens.shape)}, {tuple(self.attention_mask.shape)}, {tuple(self.token_class.shape)}")
        for name in ("answer_ids", "n_images"):
            if getattr(self, name).shape != (b,):
                raise ValueError(f"{name} must have one entry per row ({b}), got shape {tuple(getattr(self, name).shape)}")
        for name in ("answer_tokens", "queries", "answers"):
            if len(getattr(self, name)) != b:
                raise ValueError(f"{name} must have {b} rows, got {len(getattr(self, name))}")
        if not self.other_answers:
            object.__setattr__(self, "other_answers", ((),) * b)
        if not self.other_answer_tokens:
            object.__setattr__(self, "other_answer_tokens", ((),) * b)
        if self.token_type_ids is not None and self.token_type_ids.shape != (b, p):
            raise ValueError(f"token_type_ids must be [batch, pos] = {[b, p]}, got {tuple(self.token_type_ids.shape)}")
        self._check_images()

    def _check_images(self) -> None:
        placeholders = (self.tokens == self.image_token_id) & self.attention_mask.bool()
        n_img = int(self.n_images.sum())
        if n_img and self.pixel_values is None:
            raise ValueError(f"the batch says it holds {n_img} images but has no pixel_values; build it with "
                             "tvlens.inputs.multimodal.image_icl_prompts / prompts_from_images, which render the images")
        if bool(placeholders.any()) and self.pixel_values is None:
            raise ValueError(f"the batch has {int(placeholders.sum())} image placeholder tokens (id {self.image_token_id}) "
                             "but no images, so the model would run on placeholder embeddings; pass the images "
                             "(prompts_from_images(model, texts, images, answers)) or use text prompts without image tokens")
        if self.pixel_values is None:
            return
        runs = _runs_per_row(placeholders)
        bad = (runs != self.n_images).nonzero().flatten().tolist()
        if bad:
            r = bad[0]
            raise ValueError(f"row {r} has {int(self.n_images[r])} images but {int(runs[r])} runs of image tokens; every "
                             "image needs one run of placeholders (more images than image tokens, or the reverse): give "
                             "each row as many images as it has image markers")
        n_pix = self.pixel_values.shape[0]
        want = n_img if self.image_grid_thw is None else int(self.image_grid_thw.prod(-1).sum())
        if self.image_grid_thw is not None and self.image_grid_thw.shape != (n_img, 3):
            raise ValueError(f"image_grid_thw must be [image, 3] = [{n_img}, 3], got {tuple(self.image_grid_thw.shape)}")
        if n_pix != want:
            raise ValueError(f"pixel_values has {n_pix} entries along its first axis but the batch's rows hold {n_img} images "
                             f"({want} expected): build the batch with the prompt builders, which keep them aligned")

    # -- protocol --------------------------------------------------------------------------------

    @property
    def real_queries(self) -> tuple[str, ...]:
        return self.queries

    @property
    def real_answers(self) -> tuple[str, ...]:
        return self.answers

    @property
    def image_positions(self) -> Bool[Tensor, "batch pos"]:
        """Where image tokens are (the placeholders the vision features replace)."""
        return (self.tokens == self.image_token_id) & self.attention_mask.bool()

    def model_inputs(self) -> dict[str, Tensor]:
        """The forward's extra inputs: ``pixel_values`` (+ ``image_grid_thw`` / ``token_type_ids``)."""
        out: dict[str, Tensor] = {}
        if self.pixel_values is not None:
            out["pixel_values"] = self.pixel_values
        if self.image_grid_thw is not None:
            out["image_grid_thw"] = self.image_grid_thw
        if self.token_type_ids is not None:
            out["token_type_ids"] = self.token_type_ids
        return out

    def _image_rows(self, idx: list[int]) -> tuple[list[int], list[int]]:
        """The images of rows ``idx`` (in that order) and the ``pixel_values`` rows they occupy."""
        start = torch.cat([torch.zeros(1, dtype=torch.long), self.n_images.cumsum(0)]).tolist()
        imgs = [k for i in idx for k in range(start[i], start[i + 1])]
        if self.image_grid_thw is None:
            return imgs, imgs
        per = self.image_grid_thw.prod(-1)
        pstart = torch.cat([torch.zeros(1, dtype=torch.long), per.cumsum(0)]).tolist()
        return imgs, [q for k in imgs for q in range(pstart[k], pstart[k + 1])]

    def select(self, index: Sequence[int] | Tensor) -> "MultimodalBatch":
        """Rows ``index`` (row numbers or a boolean mask) with their own images; padding width unchanged."""
        idx = row_index(index, len(self))
        imgs, pix = self._image_rows(idx)
        it, pt = torch.as_tensor(imgs, dtype=torch.long), torch.as_tensor(pix, dtype=torch.long)
        return dataclasses.replace(
            self, **self._row_fields(idx),
            pixel_values=None if self.pixel_values is None else self.pixel_values[pt.to(self.pixel_values.device)],
            image_grid_thw=None if self.image_grid_thw is None else self.image_grid_thw[it],
            images=None if self.images is None else self.images[it],
            image_items=tuple(self.image_items[k] for k in imgs) if self.image_items else (),
        )

    def to(self, device: str | torch.device) -> "MultimodalBatch":
        mv = lambda t: None if t is None else t.to(device)  # noqa: E731
        return dataclasses.replace(self, tokens=self.tokens.to(device), attention_mask=self.attention_mask.to(device),
                                   token_class=self.token_class.to(device), answer_ids=self.answer_ids.to(device),
                                   pixel_values=mv(self.pixel_values), image_grid_thw=mv(self.image_grid_thw),
                                   token_type_ids=mv(self.token_type_ids))

    def row_images(self, row: int) -> list[np.ndarray]:
        """The raw images of one row, in order (for figures)."""
        if self.images is None:
            return []
        imgs, _ = self._image_rows([row % len(self)])
        return [self.images[k].numpy() for k in imgs]

    def __repr__(self) -> str:
        return (f"MultimodalBatch(task={self.task!r}, context={self.context!r}, query={self.query_modality!r}, "
                f"n_prompts={len(self)}, n_shots={self.n_shots}, images={int(self.n_images.sum())}, pos={self.tokens.shape[1]})")


def _runs_per_row(hit: Tensor) -> Tensor:
    """Number of maximal runs of True per row."""
    starts = hit & ~torch.cat([torch.zeros_like(hit[:, :1]), hit[:, :-1]], dim=1)
    return starts.sum(-1)


# ----------------------------------------------------------------------------------------------
# checks an analysis runs before any forward


def check_inputs(model: Any, batch: Any, what: str = "prompts") -> None:
    """Refuse, before any forward, a batch this model cannot run as intended.

    * images given to a text-only model;
    * image placeholder tokens without images (the model would run on placeholder embeddings);
    * images whose pixel tensor does not fit the model's vision tower.
    """
    extra = batch.model_inputs() if callable(getattr(batch, "model_inputs", None)) else {}
    has_images = "pixel_values" in extra
    if not is_vlm(model):
        if has_images:
            name = getattr(getattr(model, "cfg", None), "model_name", "?")
            raise ValueError(f"{what} carry images but model {name!r} is text-only (no vision tower); give it text "
                             "prompts (tvlens.icl_prompts), or load the vision-language model the batch was built for")
        return
    spec = vision_spec(model)
    tokens = torch.as_tensor(batch.tokens)
    mask = getattr(batch, "attention_mask", None)
    hit = tokens == spec.image_token_id
    if mask is not None:
        hit &= torch.as_tensor(mask).bool()
    if bool(hit.any()) and not has_images:
        raise ValueError(f"{what} contain {int(hit.sum())} image placeholder tokens but no images, so the model would run "
                         "on placeholder embeddings; build them with tvlens.inputs.multimodal (image_query_prompts, "
                         "prompts_from_images), which render and pass the images")
    if has_images and not isinstance(batch, MultimodalBatch):
        raise ValueError(f"{what} carry pixel_values but are a {type(batch).__name__}; build image prompts with "
                         "tvlens.inputs.multimodal so that images are sliced with their rows")
    if has_images and batch.image_token_id != spec.image_token_id:
        raise ValueError(f"{what} were built for a model whose image token is id {batch.image_token_id}, but this "
                         f"model's is {spec.image_token_id}; rebuild the prompts for this model")
    pv = extra.get("pixel_values")
    if pv is not None and not spec.uses_grid and pv.ndim == 4:
        c, h, w = pv.shape[1:]
        if c != spec.channels or (spec.image_size is not None and (h, w) != (spec.image_size, spec.image_size)):
            raise ValueError(f"{what} carry images of shape [{c}, {h}, {w}] but this model's vision tower takes "
                             f"[{spec.channels}, {spec.image_size}, {spec.image_size}]; rebuild the prompts for this model")


# ----------------------------------------------------------------------------------------------
# building prompts


def _default_picture(task_name: str) -> Picture:
    from ..organisms.vlm.images import domain_of_task, render

    try:
        domain = domain_of_task(task_name)
    except ValueError as err:
        raise ValueError(f"{err}; pass picture=lambda item, variant: <uint8 [H, W, 3] array> to draw this task's "
                         "inputs yourself") from None
    return lambda item, variant: render(domain, item, variant)


def _tokenizer_of(model: Any, spec: VisionSpec) -> Any:
    tok = getattr(spec.processor, "tokenizer", None) or getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer; load it with tvlens.load_model(dir) from a directory with "
                         "tokenizer files")
    return tok


def _sample(model: Any, task: Any, *, n_prompts: int | None, n_shots: int, seed: int, split: str,
            queries: Any, instruction: bool | str) -> PromptBatch:
    """Queries and demonstrations as :func:`tvlens.icl_prompts` draws them (the same seeds, the same rules)."""
    return icl_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, split=split, queries=queries,
                       instruction=instruction)


def _check_modalities(context: str, query: str, n_shots: int) -> None:
    if context not in ("image", "text", "instruction", "none"):
        raise ValueError(f"context must be 'image', 'text', 'instruction' or 'none', got {context!r}")
    if query not in ("image", "text"):
        raise ValueError(f"query must be 'image' or 'text', got {query!r}")
    if context in ("image", "text") and n_shots < 1:
        raise ValueError(f"context={context!r} shows demonstrations, so n_shots must be >= 1 (got {n_shots}); use "
                         "context='none' for a query without context")


def multimodal_prompts(
    model: Any,
    task: Any,
    *,
    context: str = "image",
    query: str = "image",
    n_prompts: int | None = None,
    n_shots: int = 5,
    seed: int = 0,
    split: str = "test",
    queries: Sequence[str] | Sequence[tuple[str, str]] | None = None,
    renderings: int = 1,
    picture: Picture | None = None,
    separator: str = "→",
    example_sep: str = "\n",
) -> MultimodalBatch:
    """Prompts of one task with image or text inputs (Luo, Darrell & Bar 2024, §3–4).

    Args:
        context: ``"image"`` (image → word demonstrations), ``"text"`` (word → word demonstrations),
            ``"instruction"`` (the task's instruction line) or ``"none"``.
        query: ``"image"`` (the query is a picture of the item) or ``"text"`` (the word).
        n_prompts, queries, n_shots, seed, split: as :func:`tvlens.icl_prompts` (same draws);
            ``n_shots`` is ignored for ``context="instruction"`` / ``"none"``.
        renderings: each query appears this many times, in distinct held-out renderings.
        picture: ``(item, variant) -> uint8 [H, W, C]``; default: ``organism-vlm``'s pictures.

    Returns:
        A left-padded :class:`MultimodalBatch`; raises before any forward on bad input.
    """
    spec = vision_spec(model)
    _check_modalities(context, query, n_shots)
    if not isinstance(renderings, int) or isinstance(renderings, bool) or renderings < 1:
        raise ValueError(f"renderings must be a positive int, got {renderings!r}")
    shots = n_shots if context in ("image", "text") else 0
    instr = "only" if context == "instruction" else False
    base = _sample(model, task, n_prompts=n_prompts, n_shots=shots, seed=seed, split=split, queries=queries, instruction=instr)
    picture = picture or _default_picture(base.task)
    rows = [(i, r) for i in range(len(base)) for r in range(renderings)]
    variant0 = EVAL_VARIANT0 + _SPLIT_OFFSET[split]
    instruction_text = _task_instruction(base.task) if context == "instruction" else ""
    layouts, row_images, answers = [], [], []
    for k, (i, r) in enumerate(rows):
        lay, imgs = _Layout(), []
        if context == "instruction":
            lay.add(instruction_text + "\n", TokenClass.INSTRUCTION)
        for j, (x, y) in enumerate(base.demos[i] if shots else ()):
            if context == "image":
                imgs.append((x, variant0 + 400_000 + 10 * k + j))
            lay.add(spec.marker if context == "image" else x, TokenClass.DEMO_INPUT, j)
            lay.add(" ")
            lay.add(separator, TokenClass.DEMO_SEP, j)
            lay.add(" ")
            lay.add(y, TokenClass.DEMO_OUTPUT, j)
            lay.add(example_sep, TokenClass.DEMO_NEWLINE, j)
        q = base.queries[i]
        if query == "image":
            imgs.append((q, variant0 + 1000 * i + r))
        lay.add(spec.marker if query == "image" else q, TokenClass.QUERY_INPUT)
        lay.add(" ")
        lay.add(separator, TokenClass.FINAL_SEP)
        layouts.append(lay)
        row_images.append(imgs)
        answers.append(base.accepted_answers[i])
    pics = [[(spec.check_image(picture(x, v), f"the picture of {x!r} (variant {v})"), (x, v)) for x, v in imgs]
            for imgs in row_images]
    return _assemble(model, spec, layouts, answers, pics, task=base.task, n_shots=shots, seed=seed,
                     context=context, query=query, queries=[base.queries[i] for i, _ in rows],
                     demos=[base.demos[i] if shots else () for i, _ in rows], separator=separator,
                     example_sep=example_sep, options=dict(split=split, renderings=renderings, separator=separator,
                                                           example_sep=example_sep))


def _task_instruction(name: str) -> str:
    from ..tasks import load_task

    return str(load_task(name).instruction).strip()


def _assemble(model: Any, spec: VisionSpec, layouts: Sequence[_Layout], answers: Sequence[Sequence[str]],
              pics: Sequence[Sequence[tuple[np.ndarray, tuple[str, int]]]], *, task: str, n_shots: int, seed: int,
              context: str, query: str, queries: Sequence[str], demos: Sequence[Any], separator: str,
              example_sep: str, options: Mapping[str, Any]) -> MultimodalBatch:
    """Tokenize whole texts with image markers, expand each marker into the model's image run, left-pad."""
    tok = _tokenizer_of(model, spec)
    cfg = getattr(model, "cfg", None)
    use_bos = bool(getattr(cfg, "default_prepend_bos", True)) and getattr(tok, "bos_token_id", None) is not None
    built = _build(tok, layouts, answers, names=f"task {task!r}", separator=separator, example_sep=example_sep,
                   use_bos=use_bos, n_ctx=None)
    mask = built["mask"].bool()
    rows_t, rows_c = [], []
    for r, row_pics in enumerate(pics):
        ids, cls = built["tokens"][r][mask[r]].tolist(), built["classes"][r][mask[r]].tolist()
        out_t, out_c, k = [], [], 0
        for t, c in zip(ids, cls):
            if t != spec.image_token_id:
                out_t.append(t)
                out_c.append(c)
                continue
            if k >= len(row_pics):
                raise ValueError(f"prompt {r} of task {task!r} has more image markers than images; give one image per "
                                 f"{spec.marker!r} marker")
            h, w = row_pics[k][0].shape[:2]
            run = spec.run(h, w)
            out_t += run
            out_c += [c] * len(run)
            k += 1
        if k != len(row_pics):
            raise ValueError(f"prompt {r} of task {task!r} has {len(row_pics)} images but {k} image markers "
                             f"({spec.marker!r}): more images than image tokens; give one marker per image")
        rows_t.append(out_t)
        rows_c.append(out_c)
    n_ctx = getattr(cfg, "n_ctx", None)
    longest = max(len(t) for t in rows_t)
    if n_ctx is not None and longest > int(n_ctx):
        raise ValueError(f"the longest prompt is {longest} tokens (images expanded) but the model's context is "
                         f"n_ctx={n_ctx}; use fewer shots or smaller images")
    pad = int(built["pad"])
    width = longest
    b = len(rows_t)
    tokens = torch.full((b, width), pad, dtype=torch.long)
    amask = torch.zeros((b, width), dtype=torch.long)
    classes = torch.full((b, width), int(TokenClass.PAD), dtype=torch.long)
    for r, (t, c) in enumerate(zip(rows_t, rows_c)):
        tokens[r, width - len(t):] = torch.tensor(t, dtype=torch.long)
        classes[r, width - len(t):] = torch.tensor(c, dtype=torch.long)
        amask[r, width - len(t):] = 1
    flat = [p for row in pics for p, _ in row]
    pix = spec.pixel_inputs(flat) if flat else {}
    ttype = None
    if spec.kind == "gemma3":
        ttype = ((tokens == spec.image_token_id) & amask.bool()).long()
    acc = built["answer_tokens"]
    return MultimodalBatch(
        tokens=tokens, attention_mask=amask, token_class=classes,
        answer_ids=torch.tensor([a[0][0] for a in acc], dtype=torch.long), answer_tokens=tuple(a[0] for a in acc),
        queries=tuple(queries), answers=tuple(a[0] for a in answers), task=task, n_shots=n_shots, seed=seed,
        image_token_id=spec.image_token_id, n_images=torch.tensor([len(r) for r in pics], dtype=torch.long),
        pixel_values=pix.get("pixel_values"), image_grid_thw=pix.get("image_grid_thw"), token_type_ids=ttype,
        context=context, query_modality=query, texts=tuple(lay.text for lay in layouts),
        demos=tuple(tuple(d) for d in demos), other_answers=tuple(tuple(a[1:]) for a in answers),
        other_answer_tokens=tuple(tuple(a[1:]) for a in acc),
        images=torch.from_numpy(np.stack(flat)) if flat and len({p.shape for p in flat}) == 1 else None,
        image_items=tuple(it for row in pics for _, it in row), options=dict(options),
    )


def image_icl_prompts(model: Any, task: Any, *, n_shots: int = 5, **kw: Any) -> MultimodalBatch:
    """Image ICL (Luo et al. 2024, §4 "Image ICL Base"): image → word demonstrations, then an image query."""
    return multimodal_prompts(model, task, context="image", query="image", n_shots=n_shots, **kw)


def image_query_prompts(model: Any, task: Any, **kw: Any) -> MultimodalBatch:
    """The image query alone, no context (Luo et al. 2024, §4 "No Context"); patch task vectors into these."""
    kw.pop("n_shots", None)
    return multimodal_prompts(model, task, context="none", query="image", n_shots=0, **kw)


def text_icl_image_query_prompts(model: Any, task: Any, *, n_shots: int = 5, **kw: Any) -> MultimodalBatch:
    """Text demonstrations in the image query's context (Luo et al. 2024, §4 "Text ICL xBase")."""
    return multimodal_prompts(model, task, context="text", query="image", n_shots=n_shots, **kw)


def instruction_image_query_prompts(model: Any, task: Any, **kw: Any) -> MultimodalBatch:
    """The task's instruction, then the image query (Luo et al. 2024, §4.2 "Instruction xBase")."""
    kw.pop("n_shots", None)
    return multimodal_prompts(model, task, context="instruction", query="image", n_shots=0, **kw)


def image_icl_text_query_prompts(model: Any, task: Any, *, n_shots: int = 5, **kw: Any) -> MultimodalBatch:
    """Image demonstrations, then a text query (Luo et al. 2024, §4.3 "Image ICL xBase", the other direction)."""
    return multimodal_prompts(model, task, context="image", query="text", n_shots=n_shots, **kw)


def prompts_from_images(
    model: Any,
    texts: Sequence[str],
    images: Sequence[Sequence[Any]],
    answers: Sequence[str],
    *,
    task: str = "custom",
    separator: str = "→",
) -> MultimodalBatch:
    """A batch from your own prompt texts and images (Luo et al. 2024, §3).

    Each text ends with the separator and writes the model's image marker (``vision_spec(model).marker``,
    ``<image>`` for LLaVA) once per image, in order; ``images[i]`` holds row ``i``'s images
    (``uint8 [H, W, C]``). Token classes: everything before the final separator is ``QUERY_INPUT``
    (the builder cannot tell demonstrations apart in free text), the separator ``FINAL_SEP``.
    """
    spec = vision_spec(model)
    if not (len(texts) == len(images) == len(answers)) or not texts:
        raise ValueError(f"texts, images and answers need one entry per prompt; got {len(texts)}, {len(images)}, "
                         f"{len(answers)}")
    layouts = []
    for r, t in enumerate(texts):
        t = str(t).rstrip()
        if not t.endswith(separator):
            raise ValueError(f"prompt {r} does not end with the separator {separator!r}: end every prompt with it")
        lay = _Layout()
        lay.add(t[: -len(separator)].rstrip(), TokenClass.QUERY_INPUT)
        lay.add(" ")
        lay.add(separator, TokenClass.FINAL_SEP)
        layouts.append(lay)
    pics = [[(spec.check_image(im, f"image {j} of prompt {r}"), ("custom", 0)) for j, im in enumerate(row)]
            for r, row in enumerate(images)]
    return _assemble(model, spec, layouts, [(a,) for a in answers], pics, task=task, n_shots=0, seed=0,
                     context="custom", query="image", queries=[""] * len(texts), demos=[()] * len(texts),
                     separator=separator, example_sep="\n", options=dict(separator=separator))
