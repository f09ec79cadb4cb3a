"""organism-visual: images ↔ codes, canvases ↔ images, the eight tasks, bad input, the shipped
checkpoint through the bridge, and deterministic training (Hojel et al. 2024's visual prompts)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tvlens.organisms.visual import canvas as cv
from tvlens.organisms.visual import images as im
from tvlens.organisms.visual.check import CHECKPOINT


def _images(n: int, seed: int = 0, split: im.Split = "any") -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [im.random_codes(rng, split=split) for _ in range(n)]


# ------------------------------------------------------------------ images ↔ codes


def test_image_code_round_trip_is_exact():
    rng = np.random.default_rng(1)
    grids = _images(50) + [rng.integers(im.N_COLORS, size=(im.GRID, im.GRID)) for _ in range(50)]
    for g in grids:
        img = im.codes_to_image(g)
        assert img.shape == (12, 12, 3) and img.dtype == np.uint8
        # each code is a solid 2×2 patch of its palette colour
        assert (img[::2, ::2] == im.PALETTE[g]).all() and (img[1::2, 1::2] == im.PALETTE[g]).all()
        np.testing.assert_array_equal(im.image_to_codes(img), g)
        np.testing.assert_array_equal(im.image_to_codes(torch.from_numpy(img)), g)


def test_generator_is_deterministic_and_splits_are_disjoint():
    a, b = _images(20, seed=3), _images(20, seed=3)
    assert all((x == y).all() for x, y in zip(a, b))
    assert any((x != y).any() for x, y in zip(a, _images(20, seed=4)))
    train, test = _images(100, split="train"), _images(100, split="test")
    assert not any(im.is_held_out(g) for g in train) and all(im.is_held_out(g) for g in test)
    for g in train + test:  # 1–3 objects, chromatic only, on black
        assert set(np.unique(g)) <= {im.BLACK, *im.CHROMATIC} and (g == im.BLACK).any() and (g != im.BLACK).any()


# ------------------------------------------------------------------ tasks


def test_transforms_deterministic_palette_preserving_and_distinct():
    for g in _images(40, seed=5):
        outs = {}
        for task in im.TASKS:
            out = im.apply_task(task, g)
            np.testing.assert_array_equal(out, im.apply_task(task, g.copy()))
            assert out.shape == (6, 6) and out.min() >= 0 and out.max() < im.N_COLORS
            assert (out != g).any(), f"{task} left the image unchanged"
            outs[task] = out.tobytes()
        assert len(set(outs.values())) == len(im.TASKS)


def test_transforms_on_a_known_image():
    g = np.zeros((6, 6), dtype=np.int64)
    g[1:4, 1:4] = im.RED  # a 3×3 red square
    g[5, 5] = im.BLUE
    np.testing.assert_array_equal(im.hflip(g), g[:, ::-1])
    o = im.outline(g)
    assert o[2, 2] == im.BLACK and (o[1, 1:4] == im.RED).all() and o[5, 5] == im.BLUE
    d = im.dilate(g)
    assert d[0, 2] == im.RED and d[2, 0] == im.RED and d[0, 0] == im.BLACK and d[4, 5] == im.BLUE and d[5, 4] == im.BLUE
    assert im.recolor(g)[2, 2] == im.GREEN and im.recolor(g)[5, 5] == im.RED
    assert im.swapcolor(g)[2, 2] == im.YELLOW and im.swapcolor(g)[5, 5] == im.MAGENTA
    inv = im.invert(g)
    assert inv[0, 0] == im.WHITE and inv[2, 2] == im.CYAN and inv[5, 5] == im.YELLOW
    np.testing.assert_array_equal(im.invert(inv), g)
    assert set(np.unique(im.segment(g))) == {im.BLACK, im.WHITE}
    assert set(np.unique(im.gray(g))) == {im.BLACK, im.GRAY}


def test_corrupt_changes_exactly_n_cells():
    rng = np.random.default_rng(0)
    g = _images(1)[0]
    for n in (0, 1, 5, 36):
        assert int((im.corrupt(g, n, rng) != g).sum()) == n


# ------------------------------------------------------------------ canvases


def test_canvas_layout_and_round_trip_is_exact():
    cells = torch.stack([torch.from_numpy(x) for x in _images(4, seed=7)])
    tokens = cv.assemble(cells)
    assert tokens.shape == (144,)
    # raster order over the 12×12 grid: position 6 is the first code of the top-right cell
    assert tokens[6] == cells[1, 0, 0] and tokens[12 * 6] == cells[2, 0, 0] and tokens[-1] == cells[3, 5, 5]
    torch.testing.assert_close(cv.disassemble(tokens), cells, rtol=0, atol=0)
    batch = torch.stack([cells, cells.flip(0)])
    torch.testing.assert_close(cv.disassemble(cv.assemble(batch)), batch, rtol=0, atol=0)
    roles = cv.cell_roles()
    assert roles.shape == (144,) and [int((roles == r).sum()) for r in range(4)] == [36] * 4
    torch.testing.assert_close(cv.disassemble(roles), torch.arange(4)[:, None, None].expand(4, 6, 6), rtol=0, atol=0)
    for r in range(4):
        torch.testing.assert_close(tokens[cv.cell_positions(r)], cells[r].flatten(), rtol=0, atol=0)


def test_canvas_variants():
    ei, qi = _images(2, seed=8)
    eo, qo = im.invert(ei), im.invert(qi)
    shown = cv.disassemble(cv.make_canvas(ei, eo, qi))
    for k, g in enumerate((ei, eo, qi)):
        np.testing.assert_array_equal(shown[k].numpy(), g)
    assert (shown[cv.QUERY_OUT] == cv.MASK).all()
    # images drawn from the canvas cells are the images put in
    np.testing.assert_array_equal(im.codes_to_image(shown[cv.EXAMPLE_OUT]), im.codes_to_image(eo))
    masked = cv.disassemble(cv.make_canvas(None, None, qi, examples="masked"))
    assert (masked[:2] == cv.MASK).all() and (masked[3] == cv.MASK).all()
    blank = cv.disassemble(cv.make_canvas(None, None, qi, examples="blank"))
    assert (blank[:2] == im.BLACK).all()
    task = cv.disassemble(cv.make_canvas(None, None, qi, examples="task", task="invert"))
    assert (task[:2] == cv.MASK).all() and (task[3] == cv.TASK_TOKEN["invert"]).all()
    target = cv.make_target(qo)
    assert (target[cv.cell_roles() != cv.QUERY_OUT] == -100).all()
    np.testing.assert_array_equal(cv.disassemble(target)[cv.QUERY_OUT].numpy(), qo)
    assert len(cv.VOCAB) == len(set(cv.VOCAB)) and cv.VOCAB[: im.N_COLORS] == im.COLOR_NAMES
    assert max(cv.TASK_TOKEN.values()) == len(cv.VOCAB) - 1


def test_prediction_cells_reads_the_query_out_cell_over_palette_codes_only():
    qo = _images(1, seed=9)[0]
    logits = torch.zeros(1, 144, len(cv.VOCAB))
    logits[0, torch.arange(144), cv.MASK] = 10.0  # a special token never counts as an answer
    logits[0, torch.arange(144), cv.make_target(qo).clamp(min=0)] = 1.0
    np.testing.assert_array_equal(cv.prediction_cells(logits)[0].numpy(), qo)


# ------------------------------------------------------------------ bad input


def test_bad_input_raises_clear_errors():
    good = im.codes_to_image(_images(1)[0])
    with pytest.raises(ValueError, match=r"shape \(10, 12, 3\), expected \(12, 12, 3\).*Resize"):
        im.image_to_codes(good[:10])
    with pytest.raises(ValueError, match="dtype float64.*uint8"):
        im.image_to_codes(good.astype(float))
    off = good.copy()
    off[4:6, 2:4] = (10, 20, 30)
    with pytest.raises(ValueError, match=r"colour \(10, 20, 30\) at code \(2, 1\) is not in the palette.*Use only"):
        im.image_to_codes(off)
    patchy = good.copy()
    patchy[0, 0] = im.PALETTE[(im.image_to_codes(good)[0, 0] + 1) % im.N_COLORS]
    with pytest.raises(ValueError, match=r"patch at code \(0, 0\).*not one solid colour"):
        im.image_to_codes(patchy)
    with pytest.raises(ValueError, match=r"shape \(5, 6\), expected \(6, 6\)"):
        im.codes_to_image(np.zeros((5, 6), dtype=int))
    with pytest.raises(ValueError, match=r"codes\[0, 1\] = 9 is not a palette code.*0\.\.8"):
        im.hflip(np.array([[0, 9, 0, 0, 0, 0]] + [[0] * 6] * 5))
    with pytest.raises(ValueError, match="unknown task 'vflip'.*hflip"):
        im.apply_task("vflip", np.zeros((6, 6), dtype=int))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 4, 6, 6\).*exactly four"):
        cv.assemble(torch.zeros(3, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match=r"expected \(\.\.\., 144\)"):
        cv.disassemble(torch.zeros(2, 108, dtype=torch.long))
    with pytest.raises(ValueError, match="query_in has shape"):
        cv.make_canvas(None, None, np.zeros((12, 12), dtype=int), examples="masked")
    with pytest.raises(ValueError, match="examples='task' needs task"):
        cv.make_canvas(None, None, np.zeros((6, 6), dtype=int), examples="task")
    with pytest.raises(ValueError, match="needs example_in and example_out"):
        cv.make_canvas(None, None, np.zeros((6, 6), dtype=int))


# ------------------------------------------------------------------ the shipped checkpoint


@pytest.mark.skipif(not (CHECKPOINT / "model.safetensors").exists(), reason="checkpoint not shipped")
def test_checkpoint_loads_through_the_bridge_with_hook_z_at_every_position():
    from transformer_lens.model_bridge import TransformerBridge
    from transformers import BertForMaskedLM

    bridge = TransformerBridge.boot_transformers(str(CHECKPOINT), device="cpu")
    bridge.enable_compatibility_mode(no_processing=True)
    hf = BertForMaskedLM.from_pretrained(CHECKPOINT, attn_implementation="eager").eval()  # the bridge's attention
    hf_sdpa = BertForMaskedLM.from_pretrained(CHECKPOINT).eval()
    tokens, target = cv.random_canvases(["invert", "segment"], np.random.default_rng(0))
    with torch.no_grad():
        logits, cache = bridge.run_with_cache(tokens)
        torch.testing.assert_close(logits, hf(input_ids=tokens).logits, rtol=0, atol=1e-5)
        torch.testing.assert_close(logits, hf_sdpa(input_ids=tokens).logits, rtol=0, atol=1e-4)
    for layer in range(hf.config.num_hidden_layers):
        assert cache[f"blocks.{layer}.attn.hook_z"].shape == (2, 144, 8, 16)
    # the trained model does the two colour tasks from the example pair
    truth = cv.disassemble(target)[:, cv.QUERY_OUT]
    assert (cv.prediction_cells(logits) == truth).float().mean() > 0.9


# ------------------------------------------------------------------ training


def test_tiny_training_run_is_bit_for_bit_deterministic():
    from tvlens.organisms.visual.train import MICRO, train

    threads = torch.get_num_threads()
    try:
        (m1, log1), (m2, log2) = train(MICRO), train(MICRO)
        (m3, _) = train(dataclasses.replace(MICRO, seed=1))
    finally:
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
    s1, s2, s3 = m1.state_dict(), m2.state_dict(), m3.state_dict()
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not all(torch.equal(s1[k], s3[k]) for k in s1)
    strip = lambda log: [{k: v for k, v in e.items() if k != "seconds"} for e in log]  # noqa: E731
    assert strip(log1) == strip(log2) and log1[-1]["step"] == MICRO.steps
