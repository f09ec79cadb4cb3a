"""Assemble ``organism-vlm``: a LLaVA-shaped model whose language model is the frozen text organism.

Luo, Darrell & Bar 2024 (*Task Vectors are Cross-Modal*, §3) study LLaVA-style VLMs: a CLIP vision
tower, a projector into the language model's embedding space, and image features spliced into the
token sequence in place of image placeholder tokens. This module builds the same shape at organism
scale, as an ordinary Hugging Face ``LlavaForConditionalGeneration`` directory that the
TransformerLens 4 bridge boots like any real VLM:

* language model: an exact copy of the shipped text ``organism`` (4-layer GQA Llama, TVP-planted task
  vector at layer 2), its vocabulary grown by one ``<image>`` token (embedding row unused: LLaVA
  overwrites it with image features; unembedding row copied from ``<pad>``, a token the organism was
  never trained to emit, so ``<image>`` is never the argmax);
* vision tower: CLIP, 3 layers of width 64, 16×16 images, 8×8 patches -> 4 patch tokens (+ CLS,
  dropped by ``vision_feature_select_strategy="default"``), features read after layer 2 of 3
  (``vision_feature_layer=-2``, as LLaVA-1.5 reads the penultimate layer);
* projector: LLaVA's two-layer GELU MLP 64 -> 128 -> 128;
* processor: :class:`TinyLlavaProcessor`, a ``LlavaProcessor`` of the organism's word-level tokenizer
  and :class:`TinyImageProcessor`, a numpy-only image processor (rescale and CLIP-normalise a
  16×16×3 ``uint8`` image). The stock CLIP image processors need PIL or torchvision, and without PIL
  ``AutoImageProcessor`` itself is a placeholder that raises; this pair needs neither and is found
  by the name saved in ``processor_config.json`` once :func:`register_image_processor` ran
  (importing this module runs it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from jaxtyping import Float

from .images import IMAGE_SIZE, check_image

__all__ = [
    "IMAGE_TOKEN",
    "N_IMAGE_TOKENS",
    "PATCH_SIZE",
    "TinyImageProcessor",
    "TinyLlavaProcessor",
    "register_image_processor",
    "build_vlm",
    "load_vlm",
    "save_vlm",
    "language_model",
    "decoder_layers",
    "pixel_values",
]

IMAGE_TOKEN = "<image>"
PATCH_SIZE = 8
#: image tokens per image: (16 / 8)² patches; the CLS token is dropped
N_IMAGE_TOKENS = (IMAGE_SIZE // PATCH_SIZE) ** 2

# CLIP's normalisation constants (OpenAI CLIP), kept so the tower sees the usual input statistics
_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

# ----------------------------------------------------------------------------------------------
# image processor

from transformers import BatchFeature, PretrainedConfig  # noqa: E402
from transformers.image_processing_utils import BaseImageProcessor  # noqa: E402


class TinyImageProcessor(BaseImageProcessor):
    """Image processor of ``organism-vlm``: ``16×16×3`` ``uint8`` RGB -> CLIP-normalised ``[n, 3, 16, 16]``.

    Pure numpy: no PIL, no torchvision, no resizing (pictures are drawn at the model's resolution by
    :mod:`tvlens.organisms.vlm.images`). Accepts one image, a list of images or an ``[n, 16, 16, 3]``
    array; anything else raises a ``ValueError`` naming the shape it got.
    """

    model_input_names = ["pixel_values"]

    def __init__(self, image_mean: Sequence[float] = _CLIP_MEAN, image_std: Sequence[float] = _CLIP_STD, **kwargs: Any):
        kwargs.pop("image_processor_type", None)
        super().__init__(**kwargs)
        self.image_mean = [float(x) for x in image_mean]
        self.image_std = [float(x) for x in image_std]
        self.size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}
        self.crop_size = {"height": IMAGE_SIZE, "width": IMAGE_SIZE}

    def preprocess(self, images: Any, return_tensors: str | None = "pt", **kwargs: Any) -> BatchFeature:
        arrays = _as_image_list(images)
        x = np.stack(arrays).astype(np.float32) / 255.0
        x = (x - np.asarray(self.image_mean, np.float32)) / np.asarray(self.image_std, np.float32)
        x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))  # [n, 3, 16, 16], channels first as CLIP expects
        return BatchFeature(data={"pixel_values": x}, tensor_type=return_tensors)

    def __call__(self, images: Any, *args: Any, **kwargs: Any) -> BatchFeature:
        return self.preprocess(images, *args, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        return {
            "image_processor_type": type(self).__name__,
            "image_mean": self.image_mean,
            "image_std": self.image_std,
            "size": self.size,
            "crop_size": self.crop_size,
        }


def _as_image_list(images: Any) -> list[np.ndarray]:
    if isinstance(images, torch.Tensor):
        images = images.numpy()
    if isinstance(images, np.ndarray):
        if images.ndim == 4:
            images = list(images)
        elif images.ndim == 3:
            images = [images]
        else:
            raise ValueError(
                f"images must be one (16, 16, 3) uint8 array, a list of them or an (n, 16, 16, 3) array; got shape {images.shape}"
            )
    if not isinstance(images, (list, tuple)):
        raise ValueError(f"images must be numpy arrays of shape (16, 16, 3), got {type(images).__name__}")
    flat: list[np.ndarray] = []
    for im in images:  # LlavaProcessor may nest images per prompt
        flat.extend(im if isinstance(im, (list, tuple)) else [im])
    if not flat:
        raise ValueError("no images given: pass at least one (16, 16, 3) uint8 array")
    return [check_image(np.asarray(im), f"image {i}") for i, im in enumerate(flat)]


class _TinyImageConfig(PretrainedConfig):
    """Registry key only: the auto classes resolve registered processor classes through a config class."""

    model_type = "tvlens_tiny_image"


from transformers import LlavaProcessor  # noqa: E402


class TinyLlavaProcessor(LlavaProcessor):
    """``LlavaProcessor`` whose image processor is :class:`TinyImageProcessor`.

    The stock ``LlavaProcessor.from_pretrained`` loads its image processor through
    ``AutoImageProcessor``, which without PIL is a placeholder that raises; this subclass loads the
    tokenizer the stock way and the image processor by its own class, so the checkpoint's processor
    loads with neither PIL, torchvision nor network.
    """

    @classmethod
    def _get_arguments_from_pretrained(cls, pretrained_model_name_or_path, processor_dict=None, **kwargs):
        subfolder = kwargs.pop("subfolder", "")
        tokenizer = cls._load_tokenizer_from_pretrained("tokenizer", pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        image_processor = TinyImageProcessor.from_pretrained(pretrained_model_name_or_path, subfolder=subfolder, **kwargs)
        by_name = {"tokenizer": tokenizer, "image_processor": image_processor}
        return [by_name[name] for name in cls.get_attributes()]

    def replace_image_token(self, image_inputs: dict, image_idx: int, **kwargs: Any) -> str:
        # the stock version measures the image with a helper that needs PIL; the shape says it all
        height, width = image_inputs["pixel_values"][image_idx].shape[-2:]
        n = (int(height) // self.patch_size) * (int(width) // self.patch_size) + self.num_additional_image_tokens
        if self.vision_feature_select_strategy == "default":
            n -= 1
        return self.image_token * n

    def check_argument_for_proper_class(self, argument_name, argument):
        # without PIL, transformers' ImageProcessingMixin is a placeholder class no real processor is
        # an instance of; check against our own class instead
        if argument_name == "image_processor":
            if not isinstance(argument, TinyImageProcessor):
                raise TypeError(f"image_processor must be a TinyImageProcessor, got {type(argument).__name__}")
            return TinyImageProcessor
        return super().check_argument_for_proper_class(argument_name, argument)


_REGISTERED = False


def register_image_processor() -> None:
    """Make ``AutoProcessor.from_pretrained(checkpoint)`` (what the TransformerLens bridge calls)
    find :class:`TinyLlavaProcessor` by the name saved in ``processor_config.json``, offline and
    without remote code. Idempotent; importing this module runs it."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers.models.auto.image_processing_auto import IMAGE_PROCESSOR_MAPPING
    from transformers.models.auto.processing_auto import PROCESSOR_MAPPING

    IMAGE_PROCESSOR_MAPPING.register(_TinyImageConfig, {"numpy": TinyImageProcessor}, exist_ok=True)
    PROCESSOR_MAPPING.register(_TinyImageConfig, TinyLlavaProcessor, exist_ok=True)
    _REGISTERED = True


register_image_processor()

# ----------------------------------------------------------------------------------------------
# model


def build_vlm(text_dir: str | Path, seed: int = 0) -> tuple[Any, Any]:
    """A fresh ``LlavaForConditionalGeneration`` on a copy of the text organism at ``text_dir``, and
    its ``LlavaProcessor``. The vision tower and projector are initialised from ``seed`` under a
    private generator (the global RNG is untouched); the language model is frozen
    (``requires_grad=False``) and equal to the text organism's weights.
    """
    from transformers import (
        AutoConfig,
        CLIPVisionConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        PreTrainedTokenizerFast,
    )
    from transformers import LlamaForCausalLM

    text_dir = Path(text_dir)
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(text_dir))
    n_text_vocab = len(tokenizer)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id != n_text_vocab:
        raise RuntimeError(f"{IMAGE_TOKEN} got id {image_token_id}, expected {n_text_vocab} (the first free id)")

    text_config = AutoConfig.from_pretrained(str(text_dir))
    text_config.vocab_size = n_text_vocab + 1
    vision_config = CLIPVisionConfig(
        hidden_size=64,
        intermediate_size=256,
        num_hidden_layers=3,
        num_attention_heads=4,
        image_size=IMAGE_SIZE,
        patch_size=PATCH_SIZE,
        num_channels=3,
        projection_dim=64,
    )
    config = LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_id=image_token_id,
        projector_hidden_act="gelu",
        vision_feature_select_strategy="default",
        vision_feature_layer=-2,
        image_seq_length=N_IMAGE_TOKENS,
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )
    config.pad_token_id = tokenizer.pad_token_id
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)
    _copy_text_organism(model, LlamaForCausalLM.from_pretrained(str(text_dir)), tokenizer.pad_token_id)
    for p in language_model(model).parameters():
        p.requires_grad_(False)
    model.lm_head.weight.requires_grad_(False)
    model.eval()

    processor = TinyLlavaProcessor(
        image_processor=TinyImageProcessor(),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        image_token=IMAGE_TOKEN,
        num_additional_image_tokens=1,
    )
    return model, processor


@torch.no_grad()
def _copy_text_organism(model: Any, text_model: Any, pad_id: int) -> None:
    lm = language_model(model)
    src = text_model.model.state_dict()
    emb = src.pop("embed_tokens.weight")
    missing, unexpected = lm.load_state_dict(src, strict=False)
    if unexpected or set(missing) != {"embed_tokens.weight"}:
        raise RuntimeError(f"text organism does not fit the VLM's language model: missing {missing}, unexpected {unexpected}")
    n = emb.shape[0]
    lm.embed_tokens.weight[:n] = emb
    lm.embed_tokens.weight[n:] = 0.0  # LLaVA replaces <image> embeddings by image features
    head = text_model.lm_head.weight
    model.lm_head.weight[:n] = head
    model.lm_head.weight[n:] = head[pad_id]


def language_model(model: Any) -> Any:
    """The VLM's decoder stack (``LlamaModel``)."""
    return model.model.language_model


def decoder_layers(model: Any) -> Any:
    """The decoder layers; a forward pre-hook on layer ``L`` sees ``blocks.L.hook_resid_pre``."""
    return language_model(model).layers


def save_vlm(model: Any, processor: Any, out: str | Path) -> Path:
    """Write the checkpoint directory: config, safetensors weights, tokenizer and processor files."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    processor.save_pretrained(str(out))
    return out


def load_vlm(path: str | Path) -> tuple[Any, Any]:
    """The HF model (eval mode, float32, CPU) and processor of a checkpoint written by :func:`save_vlm`."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    register_image_processor()
    model = LlavaForConditionalGeneration.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    return model, AutoProcessor.from_pretrained(str(path))


def pixel_values(processor: Any, images: Any) -> Float[torch.Tensor, "n 3 16 16"]:
    """The model's ``pixel_values`` for ``images`` (see :class:`TinyImageProcessor`)."""
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]
