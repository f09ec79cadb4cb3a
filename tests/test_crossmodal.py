"""Cross-modal task vectors (Luo, Darrell & Bar 2024): multimodal batches, the cross-modal table, bad input.

References are independent of tvlens's engine: the raw Hugging Face model with plain PyTorch forward
(pre-)hooks on its decoder layers, the bridge's own ``run_with_hooks`` one row at a time, and the
checkpoint's processor for token ids.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata as md
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

os.environ.setdefault("PIP_NO_INDEX", "1")  # a VLM's bridge may shell out to pip: never let it reach an index
os.environ.setdefault("UV_OFFLINE", "1")

import tvlens  # noqa: E402
from tvlens.analyses import crossmodal as xm  # noqa: E402
from tvlens.inputs import multimodal as mm  # noqa: E402
from tvlens.inputs.text import TokenClass  # noqa: E402
from conftest import Forwards, build_tiny_vlm, padded_image_batch  # noqa: E402

TASKS = ["country_capital", "country_currency"]


def _installed() -> dict[str, str]:
    return {d.metadata["Name"].lower(): d.version for d in md.distributions()}




def _left_padded(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token rows of different lengths left-padded with 0 into one batch, and their attention mask."""
    width = max(map(len, rows))
    tokens = torch.zeros((len(rows), width), dtype=torch.long)
    mask = torch.zeros_like(tokens)
    for r, t in enumerate(rows):
        tokens[r, width - len(t):] = torch.tensor(t)
        mask[r, width - len(t):] = 1
    return tokens, mask


# ----------------------------------------------------------------------------------------------
# models


@pytest.fixture(scope="module")
def vlm():
    from tvlens.models import organism_path

    if not (organism_path("organism-vlm") / "config.json").exists():
        pytest.skip("organism-vlm checkpoint not shipped")
    return tvlens.load_model("organism-vlm", device="cpu")


@pytest.fixture(scope="module")
def hf_vlm():
    from transformers import LlavaForConditionalGeneration

    from tvlens.models import organism_path

    return LlavaForConditionalGeneration.from_pretrained(organism_path("organism-vlm"), attn_implementation="eager").eval()




@pytest.fixture(scope="module")
def tiny_vlm_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_vlm")
    return {k: build_tiny_vlm(k, root / k) for k in ("llava", "gemma3", "qwen2_5_vl")}


def _torchvision() -> bool:
    try:
        import torchvision  # noqa: F401

        return True
    except ImportError:
        return False


_loaded: dict = {}


@pytest.fixture(scope="module", params=["llava", "gemma3", "qwen2_5_vl"])
def tiny_vlm(request, tiny_vlm_dirs):
    kind = request.param
    if kind == "qwen2_5_vl" and not _torchvision():
        pytest.skip("TransformerLens's Qwen2.5-VL adapter needs torchvision, which is not installed here (and tvlens never "
                    "installs it); with torchvision, this runs the table and the fast-path check on Qwen2.5-VL too")
    if kind not in _loaded:
        _loaded[kind] = tvlens.load_model(tiny_vlm_dirs[kind], device="cpu", require_processor=False)
    return kind, _loaded[kind]


# ----------------------------------------------------------------------------------------------
# batches


def test_organism_batches_equal_the_processor_and_slice_images_by_row(vlm):
    b = mm.image_icl_prompts(vlm, "country_capital", n_prompts=4, n_shots=2, seed=3)
    assert b.pixel_values.shape == (12, 3, 16, 16) and b.n_images.tolist() == [3, 3, 3, 3]
    assert bool(b.attention_mask[:, -1].all()) and (b.token_class[:, -1] == int(TokenClass.FINAL_SEP)).all()
    img = b.image_positions
    assert set(b.token_class[img].tolist()) == {int(TokenClass.DEMO_INPUT), int(TokenClass.QUERY_INPUT)}
    for r in range(len(b)):  # the checkpoint's own processor on the same text and images
        out = vlm.processor(text=[b.texts[r]], images=[b.row_images(r)], return_tensors="pt")
        real = b.attention_mask[r].bool()
        assert torch.equal(out["input_ids"][0][1:], b.tokens[r][real][1:])  # the processor's text has no <bos>
        assert torch.allclose(out["pixel_values"], b.pixel_values[3 * r: 3 * r + 3])
    s = b.select([2, 0])
    assert torch.equal(s.pixel_values, torch.cat([b.pixel_values[6:9], b.pixel_values[0:3]]))
    assert s.queries == (b.queries[2], b.queries[0]) and torch.equal(s.tokens, b.tokens[[2, 0]])
    nc = mm.image_query_prompts(vlm, "country_capital", n_prompts=4, seed=3)
    assert nc.queries == b.queries and nc.tokens.shape[1] == 1 + 4 + 1  # <bos> <image>×4 →
    assert nc.image_items[0][1] == b.image_items[2][1]  # the same held-out rendering of the same query


def test_qwen_patches_slice_by_image_grid_offsets():
    """Qwen2.5-VL flattens patches over the batch: a row's patches are found through image_grid_thw."""
    spec = mm.VisionSpec("qwen2_5_vl", 9, "<|image_pad|>", None, 3, size_multiple=8, before=(7,), after=(8,),
                         patch_size=4, merge_size=2, temporal_patch_size=2)
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (h, w, 3), dtype=np.uint8) for h, w in ((16, 16), (8, 16), (16, 8), (8, 8))]
    pix = spec.pixel_inputs(images)
    assert pix["image_grid_thw"].tolist() == [[1, 4, 4], [1, 2, 4], [1, 4, 2], [1, 2, 2]]
    assert pix["pixel_values"].shape == (16 + 8 + 8 + 4, 3 * 2 * 4 * 4)
    try:
        from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

        proc = Qwen2VLImageProcessorPil(patch_size=4, merge_size=2, temporal_patch_size=2, do_resize=False)
        ref = proc(images, return_tensors="pt")
        assert torch.allclose(ref["pixel_values"], pix["pixel_values"], atol=1e-5)
        assert torch.equal(ref["image_grid_thw"], pix["image_grid_thw"])
    except ImportError:
        pass  # the numpy patchify is still checked against the layout by the slicing below
    runs = [spec.run(h, w) for h, w in ((16, 16), (8, 16), (16, 8), (8, 8))]
    rows = [[1, *runs[0], 5, *runs[1], 6], [1, *runs[2], 6], [1, *runs[3], 6]]
    tokens, mask = _left_padded(rows)
    b = mm.MultimodalBatch(tokens=tokens, attention_mask=mask, token_class=mask.clone(), answer_ids=torch.zeros(3, dtype=torch.long),
                           answer_tokens=((0,),) * 3, queries=("a", "b", "c"), answers=("x",) * 3, task="t", n_shots=0, seed=0,
                           image_token_id=9, n_images=torch.tensor([2, 1, 1]), pixel_values=pix["pixel_values"],
                           image_grid_thw=pix["image_grid_thw"])
    s = b.select([2, 0])
    assert torch.equal(s.image_grid_thw, pix["image_grid_thw"][[3, 0, 1]])
    assert torch.equal(s.pixel_values, torch.cat([pix["pixel_values"][32:36], pix["pixel_values"][0:24]]))
    assert torch.equal(b.select([1]).pixel_values, pix["pixel_values"][24:32])


@torch.no_grad()
def _hf_last(hf, tokens, pixel_values, layer=None, value=None):
    """Final-position logits of the raw HF model; ``value`` replaces the last position entering decoder layer ``layer``."""
    handles = []
    if value is not None:
        def pre(module, args, kwargs):
            h = (args[0] if args else kwargs["hidden_states"]).clone()
            h[:, -1] = value
            if args:
                return (h, *args[1:]), kwargs
            kwargs["hidden_states"] = h
            return args, kwargs
        handles.append(hf.model.language_model.layers[layer].register_forward_pre_hook(pre, with_kwargs=True))
    try:
        return hf(input_ids=tokens, pixel_values=pixel_values).logits[:, -1]
    finally:
        for h in handles:
            h.remove()




def test_left_padded_batch_equals_single_rows_and_last_position_patch_is_local(vlm, hf_vlm):
    from tvlens.engine import PatchRunner, replace_resid
    from tvlens.hooks import act_name, run

    both = padded_image_batch(vlm, middle=("glyph", "b", "c"))
    assert bool((both.attention_mask == 0).any())
    runner = PatchRunner(vlm, both)
    # realistic patches: means of the prompts' final-position states (as a task vector is), no row's own state
    vecs = torch.stack([runner.clean_resid(2)[:, -1].mean(0), runner.clean_resid(1)[:, -1].mean(0)])
    got = runner.logits([replace_resid(2, vecs[0], columns=0), replace_resid(1, vecs[1], columns=1)], n_columns=2)
    edits = [replace_resid(2, vecs[0], columns=0), replace_resid(1, vecs[1], columns=1)]
    for r in range(len(both)):
        row = both.select([r])
        real = row.attention_mask[0].bool()
        tokens = row.tokens[:, real]
        single = dataclasses.replace(row, tokens=tokens, attention_mask=row.attention_mask[:, real],
                                     token_class=row.token_class[:, real])
        alone = PatchRunner(vlm, single)  # the same row run alone, unpadded
        scale = max(1.0, float(got[r].abs().max()))  # 1e-5 of the logits' scale: float32 rounding of other shapes
        assert (alone.clean_logits[0] - runner.clean_logits[r]).abs().max() < 1e-5 * scale
        assert (alone.logits(edits, n_columns=2)[0] - got[r]).abs().max() < 1e-5 * scale
        # the raw HF model (eager attention) with a plain pre-hook: agreement to float rounding at the logits' scale
        ref = _hf_last(hf_vlm, tokens, row.pixel_values)
        assert (runner.clean_logits[r] - ref[0]).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
        for c, layer in enumerate((2, 1)):
            ref = _hf_last(hf_vlm, tokens, row.pixel_values, layer, vecs[c])
            assert (got[r, c] - ref[0]).abs().max() < 1e-5 * max(1.0, float(ref.abs().max()))
    # a patch at the last position changes the logits of the last position only
    def patch(act, hook=None):
        act = act.clone()
        act[:, -1] = vecs[0]
        return act
    with torch.no_grad():
        clean = run(vlm, both.tokens, attention_mask=both.attention_mask, pixel_values=both.pixel_values)
        patched = run(vlm, both.tokens, attention_mask=both.attention_mask, pixel_values=both.pixel_values,
                      fwd_hooks=[(act_name("resid_pre", 2), patch)])
    real = both.attention_mask.bool()
    real[:, -1] = False
    assert (clean - patched).abs()[real].max() == 0
    assert (clean[:, -1] - patched[:, -1]).abs().amax(-1).min() > 1e-2
    assert (patched[:, -1] - got[:, 0]).abs().max() < 1e-5


class _FlatPatchModel(torch.nn.Module):
    """Qwen2.5-VL's input contract without its weights: ``pixel_values`` are the patches of all images
    flattened over the batch, ``image_grid_thw`` says how many each image has, and images go to the
    rows' image-token runs in order. Like Qwen, it refuses runs and patches that do not match; the
    last position's logits are the mean of the row's patches (each patch is one row of a code book)."""

    def __init__(self, image_token_id: int, merge: int = 4, vocab: int = 8):
        super().__init__()
        self.image_token_id, self.merge = image_token_id, merge
        self.code = torch.nn.Parameter(torch.randn(48, vocab, generator=torch.Generator().manual_seed(0)))

    def forward(self, tokens, attention_mask=None, pixel_values=None, image_grid_thw=None, logits_to_keep=None):
        per = image_grid_thw.prod(-1).tolist()
        patches = list(pixel_values.split(per))
        out = torch.zeros(tokens.shape[0], tokens.shape[1], self.code.shape[1])
        for r in range(tokens.shape[0]):
            hit = tokens[r] == self.image_token_id
            starts = (hit & ~torch.cat([hit.new_zeros(1), hit[:-1]])).nonzero().flatten().tolist()
            mine = []
            for s in starts:
                n = 0
                while s + n < tokens.shape[1] and bool(hit[s + n]):
                    n += 1
                if not patches or patches[0].shape[0] != n * self.merge:
                    raise ValueError("Image features and image tokens do not match")
                mine.append(patches.pop(0))
            out[r, -1] = torch.cat(mine).mean(0) @ self.code
        if patches:
            raise ValueError("Image features and image tokens do not match: patches left over")
        return out


def _flat_batch():
    """Three rows holding 2, 1 and 1 images of 16, 8, 8 and 4 patches, Qwen-style."""
    runs = {16: [9] * 4, 8: [9] * 2, 4: [9]}
    rows = [[1, *runs[16], 5, *runs[8], 6], [1, *runs[8], 6], [1, *runs[4], 6]]
    tokens, mask = _left_padded(rows)
    grid = torch.tensor([[1, 4, 4], [1, 2, 4], [1, 4, 2], [1, 2, 2]])
    pix = torch.arange(36 * 48, dtype=torch.float32).reshape(36, 48).remainder(7) + torch.arange(36.0)[:, None]
    return mm.MultimodalBatch(tokens=tokens, attention_mask=mask, token_class=mask.clone(), answer_ids=torch.zeros(3, dtype=torch.long),
                              answer_tokens=((0,),) * 3, queries=("a", "b", "c"), answers=("x",) * 3, task="t", n_shots=0, seed=0,
                              image_token_id=9, n_images=torch.tensor([2, 1, 1]), pixel_values=pix, image_grid_thw=grid)


def test_final_logits_cuts_chunks_by_the_batchs_own_rows(vlm, hf_vlm):
    """Chunks of final_logits carry their own rows' images: several LLaVA images per row, and Qwen-style
    patches flattened over the batch (located through image_grid_thw), where slicing v[rows] is wrong."""
    from tvlens.engine.readout import final_logits

    flat = _flat_batch()
    model = _FlatPatchModel(9)
    whole = final_logits(model, flat, batch_size=8)  # one forward: nothing is cut
    by_hand = torch.stack([model(flat.tokens[[r]], image_grid_thw=flat.select([r]).image_grid_thw,
                                 pixel_values=flat.select([r]).pixel_values)[0, -1] for r in range(3)])
    assert torch.allclose(whole, by_hand.detach()) and (whole[0] - whole[1]).abs().max() > 1e-3
    for bs in (1, 2):
        assert torch.allclose(final_logits(model, flat, batch_size=bs), whole, atol=1e-6)
    # the loose tensors cannot be cut by rows: refused before any forward (v[rows] would pair rows with others' images)
    counter = Forwards(model)
    try:
        with pytest.raises(ValueError, match="not row-aligned"):
            final_logits(model, flat.tokens, flat.attention_mask, batch_size=2, **flat.model_inputs())
        with pytest.raises(TypeError, match="batch object alone"):
            final_logits(model, flat, flat.attention_mask)
        assert counter.n == 0
    finally:
        counter.close()
    # the organism: rows of 3, 1 and 1 images, left-padded, against the raw HF model one unpadded row at a time
    b = padded_image_batch(vlm, middle=("glyph", "b", "c"))
    refs = []
    for r in range(len(b)):
        row = b.select([r])
        real = row.attention_mask[0].bool()
        refs.append(_hf_last(hf_vlm, row.tokens[:, real], row.pixel_values)[0])
    ref = torch.stack(refs)
    for bs in (1, 2, 3):
        got = final_logits(vlm, b, batch_size=bs)
        assert (got - ref).abs().max() < 1e-5 * max(1.0, float(ref.abs().max())), bs


# ----------------------------------------------------------------------------------------------
# the table on the organism, checked against plain hooks on the HF model


@pytest.fixture(scope="module")
def table(vlm):
    return xm.crossmodal_table(vlm, TASKS, renderings=1, n_contexts=6, n_shots=3)


def test_table_numbers_match_plain_hooks_on_the_hf_model(vlm, hf_vlm, table):
    L = table.layers["Text ICL xPatch"]
    assert table.conditions == xm.CONDITIONS and table.accuracy.shape == (8, 2)
    for t, task in enumerate(TASKS):
        ctx = xm._context_batches(vlm, task, 6, 3, 0, None)
        # the text vector: mean state entering decoder layer L at the last position, by a plain pre-hook
        store = []
        h = hf_vlm.model.language_model.layers[L].register_forward_pre_hook(
            lambda m, args, kw: store.append((args[0] if args else kw["hidden_states"])[:, -1].clone()), with_kwargs=True)
        try:
            for r in range(len(ctx["text"])):
                row = ctx["text"].select([r])
                with torch.no_grad():
                    hf_vlm(input_ids=row.tokens[:, row.attention_mask[0].bool()])
        finally:
            h.remove()
        vec = torch.cat(store).mean(0)
        nc = mm.image_query_prompts(vlm, task, queries=xm._split_items(task, "test"), split="test")
        xb = mm.text_icl_image_query_prompts(vlm, task, queries=xm._split_items(task, "test"), split="test", n_shots=3)
        hits = {"No Context": [], "Text ICL xPatch": [], "Text ICL xBase": []}
        for r in range(len(nc)):
            row = nc.select([r])
            ok = {int(row.answer_ids[0])}
            hits["No Context"].append(int(_hf_last(hf_vlm, row.tokens, row.pixel_values).argmax()) in ok)
            hits["Text ICL xPatch"].append(int(_hf_last(hf_vlm, row.tokens, row.pixel_values, L, vec).argmax()) in ok)
            xr = xb.select([r])
            hits["Text ICL xBase"].append(int(_hf_last(hf_vlm, xr.tokens[:, xr.attention_mask[0].bool()], xr.pixel_values).argmax()) in ok)
        for cond, hs in hits.items():
            assert table.cell(cond, task)[0] == pytest.approx(sum(hs) / len(hs)), (cond, task)
    p = table.pair("Text ICL xPatch", "Text ICL xBase")
    assert p["mean"] == pytest.approx(float(table.mean[4] - table.mean[3]), abs=1e-6)


def test_table_result_saves_plots_and_refuses_another_model(vlm, table, organism, tmp_path):
    path = table.save(tmp_path / "table")
    back = xm.CrossModalTable.load(path, model=vlm)
    assert torch.equal(back.accuracy, table.accuracy) and back.layers == table.layers and back.control == table.control
    with pytest.raises(ValueError, match="made with model"):
        xm.CrossModalTable.load(path, model=organism)
    frame = table.to_frame()
    assert set(frame["condition"]) == set(xm.CONDITIONS) and len(frame) == 8 * 3
    assert len(table.plot().data) == 1 and "Text ICL xPatch" in table.markdown()
    assert 0 <= table.control["vs_B"] <= 1 and table.conflict["pairs"] == 2 and len(table.text_query["mean"]) == 5


def test_similarity_lens_and_llm_to_vlm_run_and_have_meaning(vlm, organism, tmp_path):
    sim = xm.task_similarity(vlm, TASKS + ["successor"], n_contexts=4, n_shots=3)
    assert sim.cosine.shape == (2, 2, 3, 3) and sim.points.shape == (24, 2)
    s = sim.summary["trained"]["centred"]
    assert s["same_task"] > s["other_tasks"] and "untrained vision" in sim.summary
    # the raw cosine matrix is the normalised dot product of the mean vectors (recomputed by hand)
    states = xm._modal_states(vlm, list(sim.tasks), sim.layer, 4, 3, 0, 64, None)
    a = torch.stack([states[t]["text"].mean(0) for t in sim.tasks])
    b = torch.stack([states[t]["image"].mean(0) for t in sim.tasks])
    ref = torch.nn.functional.normalize(a, dim=-1) @ torch.nn.functional.normalize(b, dim=-1).T
    assert torch.allclose(sim.cosine[0, 0], ref, atol=1e-5)
    lens = xm.crossmodal_lens(vlm, TASKS, n_prompts=4, n_shots=3)
    assert lens.prob.shape == (2, 2, 3, vlm.cfg.n_layers + 1)
    final = lens.prob[:, :, 2, -1]  # the last row of the lens is the model's own output: the answer is likely there
    assert bool((final > 0.3).all())
    lv = xm.llm_to_vlm(vlm, organism, TASKS, n_contexts=4, n_shots=3, renderings=1)
    # the cosine of the two models' mean text-ICL states, recomputed from each model's own run_with_cache
    for t, task in enumerate(lv.tasks):
        p = tvlens.icl_prompts(organism, task, n_prompts=4, n_shots=3, seed=0, split="train")
        means = []
        for m in (organism, vlm):
            with torch.no_grad():
                _, cache = m.run_with_cache(p.tokens, attention_mask=p.attention_mask)
            means.append(torch.stack([cache[f"blocks.{l}.hook_resid_pre"][:, -1].mean(0) for l in lv.layers]))
        ref = torch.nn.functional.cosine_similarity(means[0], means[1], dim=-1)
        assert torch.allclose(lv.cosine[:, t], ref, atol=1e-4), (task, lv.cosine[:, t], ref)
    assert float(lv.cosine.min()) > 0.5  # the VLM's language model started as the LLM and stays near it
    for r in (sim, lens, lv):
        back = type(r).load(r.save(tmp_path / type(r).__name__), model=vlm)
        assert back.tasks == r.tasks
        r.plot()
        r.to_frame()


# ----------------------------------------------------------------------------------------------
# real architectures


def test_table_runs_on_tiny_vlms_and_fast_path_matches_run_with_hooks_per_row(tiny_vlm):
    import warnings

    from tvlens.engine import PatchRunner, replace_resid

    kind, model = tiny_vlm
    spec = mm.vision_spec(model)
    b = padded_image_batch(model, middle=("glyph", "b", "c"))
    assert bool((b.attention_mask == 0).any())
    if kind == "gemma3":
        assert torch.equal(b.token_type_ids.bool(), b.image_positions)
    assert int(b.image_positions.sum()) == int(b.n_images.sum()) * spec.n_tokens(16, 16)
    g = torch.Generator().manual_seed(0)
    vec = torch.randn((2, model.cfg.d_model), generator=g)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runner = PatchRunner(model, b)
        got = runner.logits([replace_resid(1, vec[0], columns=0), replace_resid(0, vec[1], columns=1)], n_columns=2)
    fell_back = any("fast recompute unavailable" in str(w.message) for w in caught)
    for r in range(len(b)):
        row = b.select([r])
        real = row.attention_mask[0].bool()
        kw = {"pixel_values": row.pixel_values}  # the reference's inputs written out by hand, not model_inputs()
        if kind == "gemma3":  # 1 on image tokens: Gemma 3's bidirectional attention among them
            kw["token_type_ids"] = (row.tokens[:, real] == spec.image_token_id).long()
        if kind == "qwen2_5_vl":
            kw["image_grid_thw"] = row.image_grid_thw
        for c, layer in enumerate((1, 0)):
            def hook(act, hook=None, v=vec[c]):
                act = act.clone()
                act[:, -1] = v
                return act
            with torch.no_grad():
                ref = model.run_with_hooks(row.tokens[:, real], fwd_hooks=[(f"blocks.{layer}.hook_resid_pre", hook)], **kw)[0, -1]
            assert (got[r, c] - ref).abs().max() < 1e-5, (kind, r, c, fell_back)
    if kind == "qwen2_5_vl":
        assert fell_back, "Qwen2.5-VL's recompute was expected to fail its self-check on a left-padded batch"
    tab = xm.crossmodal_table(model, ["swap_case", "next_letter"], renderings=1, n_contexts=2, n_shots=2)
    assert tab.accuracy.shape == (8, 2) and bool(((tab.accuracy >= 0) & (tab.accuracy <= 1)).all())
    assert set(tab.layers) == set(xm.PATCHED) and tab.curves.shape == (4, model.cfg.n_layers)


def test_load_model_on_a_vlm_without_processor_is_clear_and_installs_nothing(tiny_vlm_dirs):
    if _torchvision():
        pytest.skip("torchvision is installed here, so TransformerLens has nothing to install")
    before = _installed()
    with pytest.raises(ImportError, match=r"its processor did not load.*tvlens blocks every install.*Missing here: torchvision"):
        tvlens.load_model(tiny_vlm_dirs["gemma3"], device="cpu")
    assert _installed() == before


def test_load_model_organism_vlm_registers_its_processor_first():
    code = ("import sys, tvlens; m = tvlens.load_model('organism-vlm', device='cpu', check=False); "
            "print(type(m.processor).__name__, 'tvlens.organisms.vlm' in sys.modules)")
    env = {**os.environ, "PIP_NO_INDEX": "1", "UV_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split()[-2:] == ["TinyLlavaProcessor", "True"]


# ----------------------------------------------------------------------------------------------
# bad input: a clear error before any forward


def test_bad_input_is_refused_before_any_forward(vlm, organism, tmp_path):
    b = mm.image_query_prompts(vlm, "country_capital", n_prompts=2)
    counter = Forwards(vlm)
    try:
        with pytest.raises(ValueError, match="no pixel_values|no images"):
            dataclasses.replace(b, pixel_values=None)
        text_with_images = tvlens.prompts_from_text(vlm, ["<image> →"], ["paris"])
        with pytest.raises(ValueError, match="image placeholder tokens but no images"):
            mm.check_inputs(vlm, text_with_images)
        vec = tvlens.TaskVector.from_tensor(vlm, torch.zeros(vlm.cfg.d_model), layer=2)
        with pytest.raises(ValueError, match="image placeholder tokens but no images"):
            xm.patch_vector(vlm, text_with_images, vec)
        for bad, match in ((np.zeros((8, 8, 3), np.uint8), "8×8 pixels"), (np.zeros((16, 16, 4), np.uint8), "4 channels"),
                           (np.zeros((16, 16, 3), np.float32), "uint8")):
            with pytest.raises(ValueError, match=match):
                mm.image_query_prompts(vlm, "country_capital", n_prompts=1, picture=lambda item, v, bad=bad: bad)
        img = np.zeros((16, 16, 3), np.uint8)
        with pytest.raises(ValueError, match="more images than image tokens"):
            mm.prompts_from_images(vlm, ["<image> →"], [[img, img]], ["paris"])
        with pytest.raises(ValueError, match="more image markers than images"):
            mm.prompts_from_images(vlm, ["<image> <image> →"], [[img]], ["paris"])
        with pytest.raises(ValueError, match="does not end with the separator"):
            mm.prompts_from_images(vlm, ["<image>"], [[img]], ["paris"])
        with pytest.raises(ValueError, match="made with model"):  # a VLM vector applied to another model
            xm.patch_vector(organism, tvlens.icl_prompts(organism, "country_capital", n_prompts=2, n_shots=0), vec)
        other = xm.CrossModalVectors((2,), {"country_capital": {}}, 1, 1, 0, "0000")
        with pytest.raises(ValueError, match="made with another model"):
            xm.crossmodal_table(vlm, ["country_capital"], vectors=other)
        assert counter.n == 0
    finally:
        counter.close()
    tcount = Forwards(organism)
    try:
        with pytest.raises(ValueError, match="text-only"):
            mm.image_query_prompts(organism, "country_capital", n_prompts=1)
        with pytest.raises(ValueError, match="text-only"):
            mm.check_inputs(organism, b)
        with pytest.raises(ValueError, match="text-only"):
            xm.crossmodal_table(organism, ["country_capital"])
        with pytest.raises(ValueError, match="text-only"):
            xm.patch_vector(organism, b, tvlens.TaskVector.from_tensor(organism, torch.zeros(organism.cfg.d_model), layer=2))
        assert tcount.n == 0
    finally:
        tcount.close()
    out = tmp_path / "out"
    from tvlens.cli import main

    assert main(["xmodal", "--model", "organism", "--tasks", "country_capital", "--out", str(out), "--parts", "table"]) == 2
    assert not out.exists() or not any(out.iterdir())


def test_examples_and_the_report_section_of_a_vlm(vlm, tmp_path, monkeypatch):
    from tvlens import report

    ex = xm.crossmodal_examples(vlm, TASKS, n_shots=2, n_contexts=4)
    assert ex.demo_images.shape == (2, 2, 16, 16, 3) and ex.demo_images.dtype == torch.uint8
    assert set(ex.answers[0]) == {"No Context", "Image ICL Base", "Text ICL xBase", "Text ICL xPatch"}
    back = xm.CrossModalExamples.load(ex.save(tmp_path / "ex"), model=vlm)
    assert back.answers == ex.answers and torch.equal(back.query_images, ex.query_images)
    assert len(ex.plot().data) == 2
    # the report adds the cross-modal section by default for a VLM (the other sections stubbed: their own tests run them)
    ran = []
    for key in report.SECTIONS:
        monkeypatch.setitem(report._RUNNERS, key, lambda ctx, key=key: ran.append(key) or report.Section(key, key, ("stub",)))
    rep = report.build_report(vlm, tasks=["country_capital", "next_letter", "antonym"], out=tmp_path / "rep", n_prompts=4,
                              png=False, progress=False)
    assert ran == list(report.SECTIONS) and rep["crossmodal"].table[0] == ("condition", "accuracy ± SE", "layer")
    assert len(rep["crossmodal"].table) == 1 + len(xm.CONDITIONS) and "Cross-modal" in rep.path.read_text()


def test_task_vector_refuses_image_placeholders_without_images(vlm):
    """A ready text batch that holds the VLM's image tokens but no images is refused before any forward
    (it would run on placeholder embeddings)."""
    from tvlens.inputs.text import PromptBatch
    from tvlens.inputs.multimodal import image_icl_prompts

    b = image_icl_prompts(vlm, "country_capital", n_prompts=2, n_shots=1)
    text_only = PromptBatch(tokens=b.tokens, attention_mask=b.attention_mask, token_class=b.token_class,
                            answer_ids=b.answer_ids, answer_tokens=b.answer_tokens, queries=b.queries,
                            answers=b.answers, texts=b.texts, task=b.task, n_shots=b.n_shots, seed=b.seed)
    with pytest.raises(ValueError, match="image placeholder tokens but no images"):
        tvlens.task_vector(vlm, text_only, layer=2)
