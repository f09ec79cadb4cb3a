"""organism-vlm: image generators, the shipped checkpoint through the TransformerLens bridge, padding, bad input.

The references here are the raw Hugging Face model (eager attention, as the bridge runs it) and
single-row forwards; nothing goes through tvlens's own engine.
"""

from __future__ import annotations

import importlib.metadata as md
import os

import numpy as np
import pytest
import torch

from tvlens.organisms.vlm import images as vim
from tvlens.organisms.vlm.build import N_IMAGE_TOKENS, TinyImageProcessor
from tvlens.organisms.vlm.prompts import Image, PromptCodec, collate

CHECKPOINT = os.path.join(os.path.dirname(vim.__file__), "checkpoint")


def _installed() -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.version for d in md.distributions()}


# ----------------------------------------------------------------------------------------------
# generators


@pytest.mark.parametrize("domain", vim.DOMAINS)
def test_render_is_deterministic_and_items_distinct(domain):
    items = vim.domain_items(domain)
    a = vim.render_batch(domain, items)
    b = vim.render_batch(domain, items)
    assert a.shape == (len(items), 16, 16, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    flat = a.reshape(len(items), -1).astype(np.float64)
    dist = np.sqrt(((flat[:, None] - flat[None]) ** 2).sum(-1))
    np.fill_diagonal(dist, np.inf)
    v1 = vim.render(domain, items[0], 7)
    assert np.array_equal(v1, vim.render(domain, items[0], 7))
    assert not np.array_equal(v1, a[0]) and not np.array_equal(v1, vim.render(domain, items[0], 8))
    assert dist.min() > 100, f"two {domain} items are nearly the same picture"
    # every held-out rendering is nearest (L2) to its own item's canonical picture
    for v in (7, 1000001):
        b = vim.render_batch(domain, items, v).reshape(len(items), -1).astype(np.float64)
        nearest = ((b[:, None] - flat[None]) ** 2).sum(-1).argmin(1)
        assert np.array_equal(nearest, np.arange(len(items)))


def test_every_task_input_has_a_picture_and_is_in_a_training_pool():
    from tvlens.organisms.vlm.train import task_pools
    from tvlens.tasks import load_task

    tasks = [t for ts in vim.DOMAIN_TASKS.values() for t in ts]
    pools, orphans = task_pools(tasks)
    for domain, dtasks in vim.DOMAIN_TASKS.items():
        items = set(vim.domain_items(domain))
        assert {x for t in dtasks for x, _ in load_task(t).pairs} == items
        assert {x for t in dtasks for x, _ in pools[t]} == items
    assert all(o["split"] in ("dev", "test") for o in orphans)


def test_render_bad_input_raises():
    with pytest.raises(ValueError, match="unknown image domain"):
        vim.render("animals", "dog")
    with pytest.raises(ValueError, match="not an item"):
        vim.render("flag", "atlantis")
    with pytest.raises(ValueError, match="variant"):
        vim.render("digits", "7", -1)
    with pytest.raises(ValueError, match="no image domain"):
        vim.domain_of_task("antonym")


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.zeros((16, 16, 4), np.uint8), "3 colour channels"),
        (np.zeros((16, 16), np.uint8), "shape"),
        (np.zeros((32, 32, 3), np.uint8), "16×16"),
        (np.zeros((16, 16, 3), np.float32), "uint8"),
    ],
)
def test_image_processor_rejects_bad_images(bad, match):
    proc = TinyImageProcessor()
    with pytest.raises(ValueError, match=match):
        proc(bad)
    with pytest.raises(ValueError, match=match):
        proc([vim.render("flag", "france"), bad])
    out = proc([vim.render("flag", "france")] * 2)["pixel_values"]
    assert tuple(out.shape) == (2, 3, 16, 16)


# ----------------------------------------------------------------------------------------------
# the shipped checkpoint through the bridge


@pytest.fixture(scope="module")
def loaded():
    from transformer_lens.model_bridge import TransformerBridge
    from transformer_lens.model_bridge.sources.transformers import helpers
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    assert os.path.isdir(CHECKPOINT), "the organism-vlm checkpoint is not shipped"
    before = _installed()
    calls = []
    mp = pytest.MonkeyPatch()
    mp.setenv("PIP_NO_INDEX", "1")
    mp.setenv("UV_OFFLINE", "1")
    # the bridge falls back to `pip install torchvision` when the processor does not load: record it
    mp.setattr(helpers, "_ensure_torchvision", lambda: calls.append(1) or False)
    try:
        bridge = TransformerBridge.boot_transformers(CHECKPOINT, device="cpu")
        bridge.enable_compatibility_mode(no_processing=True)
    finally:
        mp.undo()
    hf = LlavaForConditionalGeneration.from_pretrained(CHECKPOINT, attn_implementation="eager").eval()
    processor = AutoProcessor.from_pretrained(CHECKPOINT)
    return {"bridge": bridge, "hf": hf, "processor": processor, "installs": calls, "before": before}


def test_checkpoint_boots_without_installing_anything(loaded):
    from tvlens.organisms.vlm.build import TinyLlavaProcessor

    assert loaded["installs"] == [], "the bridge could not load the processor and tried to install torchvision"
    assert isinstance(loaded["bridge"].processor, TinyLlavaProcessor)
    assert _installed() == loaded["before"]
    size = sum(os.path.getsize(os.path.join(CHECKPOINT, f)) for f in os.listdir(CHECKPOINT))
    assert size < 15 * 2**20


def _prompts(codec):
    return [
        codec.prompt([(Image("flag", "france", 1000001), "paris"), (Image("flag", "italy", 1000002), "rome")], Image("flag", "spain", 1000003)),
        codec.prompt([("france", "paris")], Image("flag", "japan", 1000004)),
        codec.prompt([], Image("digits", "37", 1000005)),
        codec.prompt([(Image("glyph", "b", 1000006), "c")], Image("glyph", "Q", 1000007)),
    ]


def test_bridge_logits_equal_hf_with_and_without_image(loaded):
    bridge, hf, proc = loaded["bridge"], loaded["hf"], loaded["processor"]
    codec = PromptCodec(proc.tokenizer)
    tokens, mask, pv, _, _ = collate(_prompts(codec), codec.pad, proc, left=True)
    real = mask.bool()
    with torch.no_grad():
        ref = hf(input_ids=tokens, pixel_values=pv, attention_mask=mask).logits
        got = bridge(tokens, pixel_values=pv, attention_mask=mask)
        assert (ref - got).abs()[real].max().item() < 1e-5
        text = proc.tokenizer(["france → paris\nitaly →"], return_tensors="pt")["input_ids"]
        assert (hf(input_ids=text).logits - bridge(text)).abs().max().item() < 1e-5
        _, cache = bridge.run_with_cache(tokens, pixel_values=pv, attention_mask=mask)
    n, T = tokens.shape
    assert tuple(cache["blocks.2.hook_resid_pre"].shape) == (n, T, 128)
    assert tuple(cache["blocks.2.attn.hook_z"].shape) == (n, T, 8, 16)
    # the image features enter the residual stream at the <image> positions
    img = tokens == codec.image
    assert img.sum().item() == N_IMAGE_TOKENS * pv.shape[0]
    emb = hf.get_input_embeddings()(tokens.clamp(max=hf.config.text_config.vocab_size - 1))
    assert not torch.allclose(cache["blocks.0.hook_resid_pre"][img], emb[img])


def test_codec_matches_processor_tokens(loaded):
    proc = loaded["processor"]
    codec = PromptCodec(proc.tokenizer)
    p = codec.prompt([(Image("flag", "france"), "paris"), ("italy", "rome")], Image("flag", "spain"), instruction="Give the capital city of the country.")
    out = proc(text=["Give the capital city of the country.\n<image> → paris\nitaly → rome\n<image> →"],
               images=[[im.pixels() for im in p.images]], return_tensors="pt")
    assert out["input_ids"][0].tolist() == p.tokens
    assert p.tokens[p.final_sep] == codec.sep and p.final_sep == len(p.tokens) - 1


def test_left_padded_batch_equals_single_rows(loaded):
    import tvlens

    proc = loaded["processor"]
    # in float64, so the 1e-5 bound measures padding alone (float32 rounding of logits up to ~20 reaches 1e-5)
    bridge = tvlens.load_model("organism-vlm", device="cpu", dtype="float64")
    codec = PromptCodec(proc.tokenizer)
    prompts = _prompts(codec)
    tokens, mask, pv, _, _ = collate(prompts, codec.pad, proc, left=True)
    assert len({len(p.tokens) for p in prompts}) > 1, "the rows must differ in length to test padding"
    with torch.no_grad():
        batch = bridge(tokens, pixel_values=pv.double(), attention_mask=mask)[:, -1]
        for i, p in enumerate(prompts):
            t1, m1, pv1, _, _ = collate([p], codec.pad, proc, left=True)
            single = bridge(t1, pixel_values=pv1.double(), attention_mask=m1)[:, -1]
            assert (batch[i] - single[0]).abs().max().item() < 1e-5


def test_image_count_must_match_placeholders(loaded):
    hf, proc = loaded["hf"], loaded["processor"]
    codec = PromptCodec(proc.tokenizer)
    tokens, mask, pv, _, _ = collate(_prompts(codec)[:1], codec.pad, proc, left=True)
    with pytest.raises(ValueError, match="(?i)image"):
        hf(input_ids=tokens, pixel_values=pv[:1], attention_mask=mask)


_NO_PIL = r'''
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("PIL", "torchvision"):
            raise ModuleNotFoundError(name)
        return None
sys.meta_path.insert(0, Block())
import transformers.utils.import_utils as iu
assert not iu.is_vision_available() and not iu.is_torchvision_available()
import tvlens.organisms.vlm
from transformers import AutoProcessor
from tvlens.organisms.vlm.images import render
p = AutoProcessor.from_pretrained(sys.argv[1])
out = p(text=["<image> →"], images=[[render("flag", "France")]], return_tensors="pt")
assert out["input_ids"].tolist() == [[1] + [2191] * 4 + [4]], out["input_ids"]
assert tuple(out["pixel_values"].shape) == (1, 3, 16, 16) and "PIL" not in sys.modules
print("ok")
'''


def test_processor_loads_without_pil_or_torchvision():
    import subprocess
    import sys

    env = {**os.environ, "PIP_NO_INDEX": "1", "UV_OFFLINE": "1"}
    res = subprocess.run([sys.executable, "-c", _NO_PIL, CHECKPOINT], capture_output=True, text=True, env=env, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-2000:]


@pytest.mark.parametrize("lm_losses", ["naming", "image"])
def test_training_puts_gradient_into_the_language_model_only_from_the_chosen_losses(lm_losses):
    """With ``lm_lr > 0`` the language model learns only from the no-context naming rows (``"naming"``) or
    from every stage-1 image-prompt row (``"image"``), never from the TVP partner forward; the vision side
    learns from all. The split loss equals the single-forward token mean (naming weight 1)."""
    import random

    from tvlens.organisms import organism_path
    from tvlens.organisms.vlm.build import build_vlm
    from tvlens.organisms.vlm.prompts import PromptCodec, collate
    from tvlens.organisms.vlm.train import ResidHook, Sampler, TrainConfig, answer_loss, lm_trainables, set_lm_grad, split_loss

    torch.manual_seed(0)
    model, processor = build_vlm(organism_path("organism"), seed=0)
    cfg = TrainConfig(lm_lr=1e-4, lm_losses=lm_losses)
    codec = PromptCodec(processor.tokenizer)
    sampler = Sampler(codec, cfg)
    rng = random.Random(0)
    rows = [sampler.row(rng) for _ in range(40)]
    naming = [r for r in rows if r[1]["kind"] == "naming"][:2]
    icl = [r for r in rows if r[1]["kind"] == "icl"][:3]
    assert len(naming) == 2 and len(icl) == 3
    lm = lm_trainables(model)
    vision = [p for p in model.parameters() if p.requires_grad]
    hook = ResidHook()

    def grads(batch):
        model.zero_grad(set_to_none=True)
        loss = split_loss(model, [p for p, _ in batch], [m for _, m in batch], codec, processor, cfg, lm, hook, [])
        set_lm_grad(lm, True)
        loss.backward()
        set_lm_grad(lm, False)
        hit = lambda ps: any(p.grad is not None and bool(p.grad.abs().sum() > 0) for p in ps)  # noqa: E731
        return loss, hit(lm), hit(vision)

    _, lm_hit, vision_hit = grads(icl)
    assert vision_hit and lm_hit == (lm_losses == "image")
    loss, lm_hit, _ = grads(icl + naming)
    assert lm_hit
    tokens, mask, pv, targets, _ = collate([p for p, _ in icl + naming], codec.pad, processor, left=False)
    with torch.no_grad():
        assert abs(float(loss) - float(answer_loss(model, tokens, mask, pv, targets))) < 1e-5
    assert not any(p.requires_grad for p in lm)  # frozen again between steps: other forwards never reach it
