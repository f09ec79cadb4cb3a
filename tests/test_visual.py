"""Visual task vectors (Hojel et al. 2024): canvases as engine inputs, ρ over (head, position), mask
patching, selection over pairs, and bad input refused before any forward.

References are independent of tvlens's machinery: ``run_with_cache`` with explicit variances for
ρ, one ``run_with_hooks`` per mask with a plain hook function for patching.  The model is a tiny
random ``BertForMaskedLM`` with the canvas vocabulary and 144 positions (organism-visual's shape,
untrained), loaded through ``tvlens.load_model`` like any other checkpoint.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

import tvlens
from tvlens.analyses import visual as V
from tvlens.inputs import canvas as C
from tvlens.organisms.visual import canvas as cv
from tvlens.organisms.visual import images as im

TASKS = ["invert", "gray", "hflip"]


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from transformers import BertConfig, BertForMaskedLM

    from tvlens.organisms.visual.train import build_tokenizer

    d = tmp_path_factory.mktemp("canvas_bert")
    cfg = BertConfig(vocab_size=len(cv.VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=cv.N_POSITIONS, type_vocab_size=1, pad_token_id=cv.PAD,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                     initializer_range=0.5)  # large weights: a patched position visibly moves the masked cell
    torch.manual_seed(0)
    BertForMaskedLM(cfg).save_pretrained(d)
    build_tokenizer().save_pretrained(d)
    return tvlens.load_model(d, device="cpu")


@pytest.fixture(scope="module")
def stats(bert):
    return V.canvas_means(bert, TASKS, n=5, seed=3)


# ------------------------------------------------------------------ canvases


def test_canvas_layout_is_the_organisms_and_round_trips_through_images():
    layout = C.CanvasLayout()
    cells = torch.randint(0, 24, (3, 4, 6, 6), generator=torch.Generator().manual_seed(0))
    assert torch.equal(layout.assemble(cells), cv.assemble(cells))
    assert torch.equal(layout.roles(), cv.cell_roles()) and torch.equal(layout.query_positions, cv.cell_positions(3))
    for shots, examples in ((1, "shown"), (3, "shown"), (1, "masked"), (1, "blank")):
        b = C.canvases("dilate", 4, shots=shots, examples=examples, seed=5, noise=2 if examples == "shown" else 0)
        assert b.layout.n_pos == 72 * (shots + 1) and (shots > 1 or torch.equal(layout.assemble(b.cells()), b.tokens))
        imgs = b.images()
        back = C.canvas_from_images("dilate", imgs["queries"], imgs["targets"], imgs.get("example_pairs"), examples=examples,
                                    shots=shots)
        assert torch.equal(back.tokens, b.tokens) and torch.equal(back.targets, b.targets)
        assert torch.equal(back.layout.disassemble(back.tokens), back.cells())
    b = C.canvases("hflip", 3, seed=1)
    q_out = b.tokens[:, b.layout.query_positions]
    assert (q_out == C.MASK).all() and (b.token_class[0] == cv.cell_roles()).all()
    truth = torch.stack([torch.from_numpy(im.hflip(c[2].numpy())).reshape(-1) for c in b.cells()])
    assert torch.equal(b.targets, truth)
    # the same seed: the same queries and targets with the examples shown, masked or blank
    m = C.canvases("hflip", 3, seed=1, examples="masked")
    assert torch.equal(m.targets, b.targets) and (m.tokens[:, :72].reshape(3, 6, 12)[:, :, :] == C.MASK).all()


def test_scores_code_accuracy_exact_cell_and_pixel_error():
    b = C.canvases("gray", 2, seed=0)
    pred = b.targets.clone()[:, None].repeat(1, 3, 1)  # [batch, column, query]
    pred[0, 1, 0] = (pred[0, 1, 0] + 1) % C.N_CODES
    pred[1, 2] = im.WHITE
    s = C.score_cells(pred, b.targets)
    assert s.code_acc.shape == (2, 3) and s.code_acc[0, 0] == 1 and s.exact[0, 0] == 1
    assert abs(float(s.code_acc[0, 1]) - 35 / 36) < 1e-6 and s.exact[0, 1] == 0
    ref = np.abs(im.codes_to_image(pred[0, 1].reshape(6, 6)).astype(float) - im.codes_to_image(b.targets[0].reshape(6, 6))) / 255
    assert abs(float(s.pixel_error[0, 1]) - ref.mean()) < 1e-6 and float(s.pixel_error[0, 0]) == 0.0
    assert s.changed is None
    # changed codes: only where the answer differs from the query-in cell; copying the query scores 0 there
    q = b.query_codes
    assert torch.equal(q, b.cells()[:, 2].reshape(2, -1)) and torch.equal(b.changed, b.targets != q)
    copy = q[:, None].repeat(1, 2, 1)
    copy[1, 1] = b.targets[1]
    sc = C.score_cells(copy, b.targets, q)
    moved = (b.targets != q).float()
    assert float(sc.changed[0, 0]) == 0.0 and float(sc.changed[1, 1]) == 1.0
    assert abs(float(sc.code_acc[0, 0]) - float(1 - moved[0].mean())) < 1e-6  # copying scores the unchanged share
    half = b.targets.clone()
    idx = moved[0].nonzero()[:, 0][::2]
    half[0, idx] = q[0, idx]  # half of the changed codes left as the query
    sc = C.score_cells(half[:, None], b.targets, q)
    assert abs(float(sc.changed[0, 0]) - (1 - len(idx) / float(moved[0].sum()))) < 1e-6
    with pytest.raises(ValueError, match="queries .* must match targets"):
        C.score_cells(pred, b.targets, q[:, :5])


def test_bad_images_cells_and_canvases_are_refused():
    b = C.canvases("gray", 2, seed=0)
    imgs = b.images()
    small = imgs["queries"][:, :10]
    with pytest.raises(ValueError, match=r"queries\[0\].*\(12, 12, 3\)"):
        C.canvas_from_images("gray", small, imgs["targets"], imgs["example_pairs"])
    odd = imgs["targets"].copy()
    odd[1, :2, :2] = (10, 200, 30)
    with pytest.raises(ValueError, match=r"targets\[1\].*not in the palette"):
        C.canvas_from_images("gray", imgs["queries"], odd, imgs["example_pairs"])
    with pytest.raises(ValueError, match="needs example_pairs"):
        C.canvas_from_images("gray", imgs["queries"], imgs["targets"])
    with pytest.raises(ValueError, match=r"needs \(\.\.\., 4, 6, 6\).*exactly that many cells"):
        C.CanvasLayout().assemble(torch.zeros(2, 3, 6, 6, dtype=torch.long))
    with pytest.raises(ValueError, match="unknown visual task 'rot90'"):
        C.canvases("rot90", 2)
    with pytest.raises(ValueError, match="different layouts"):
        C.concat([b, C.canvases("gray", 1, shots=2)])


# ------------------------------------------------------------------ ρ over (head, position)


def test_rho_per_head_and_position_equals_run_with_cache(bert, stats):
    rho = V.visual_taskness(stats)
    L, H = rho.scores.shape
    per_task = []
    for t in TASKS:
        b = C.canvases(t, 5, seed=3, split="train")
        with torch.no_grad():
            _, cache = bert.run_with_cache(b.tokens, names_filter=lambda n: n.endswith("attn.hook_z"))
        per_task.append(torch.stack([cache[f"blocks.{l}.attn.hook_z"] for l in range(L)], 1).double())  # [n, L, P, H, D]
    pooled = torch.cat(per_task)
    total = pooled.var(0, unbiased=False).sum(-1)  # [L, P, H]
    within = torch.stack([z.var(0, unbiased=False).sum(-1) for z in per_task]).mean(0)
    ref = (total / within).permute(0, 2, 1)  # [L, H, P]
    assert rho.per_position.shape == (L, H, cv.N_POSITIONS)
    torch.testing.assert_close(rho.per_position.double(), ref, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(rho.scores.double(), ref.mean(-1), rtol=1e-4, atol=1e-6)
    assert ref.std() > 0.05  # positions differ: the test sees a wrong position order
    grid = rho.canvas_map(layer=1, head=2)
    assert grid.shape == (12, 12) and torch.equal(grid.reshape(-1), rho.per_position[1, 2])


# ------------------------------------------------------------------ mask patching


def _reference(model, batch, means, mask):
    """One run_with_hooks: hook_z of (layer, head) at pos set to its row's task mean where mask is 1."""
    rows = torch.tensor([TASKS.index(t) for t in batch.tasks])

    def hook(layer):
        def fn(z, hook):
            z = z.clone()
            w = mask[layer].T[None, :, :, None]  # [1, pos, head, 1]
            return z + w * (means[rows, layer].permute(0, 2, 1, 3).to(z.dtype) - z)
        return fn
    with torch.no_grad():
        logits = model.run_with_hooks(batch.tokens, fwd_hooks=[(f"blocks.{l}.attn.hook_z", hook(l)) for l in range(mask.shape[0])])
    return logits[:, batch.layout.query_positions]


def test_a_mask_patch_equals_one_run_with_hooks_per_mask(bert, stats):
    target = C.concat([C.canvases(t, 2, examples="masked", seed=9) for t in TASKS])
    obj = V.CanvasPatch(bert, target, stats)
    L, H, P = obj.shape
    gen = torch.Generator().manual_seed(4)
    masks = (torch.rand(4, L, H, P, generator=gen) < 0.1).float()
    masks[1] = 0
    masks[1, 0, 2, 3] = 1.0  # one pair of layer 0: a single (head, position) moves the masked cell
    masks[2] = masks[2] * 0.4  # a soft α blends
    masks[3] = 0
    masks[3, 0, :, cv.cell_positions(cv.QUERY_OUT)] = 1.0  # a head × positions block
    got = obj.logits(masks)
    assert got.shape == (len(target), 4, 36, len(cv.VOCAB))
    for c in range(4):
        ref = _reference(bert, target, stats.z_mean, masks[c])
        assert (ref - obj.clean_logits).abs().max() > 1e-3
        torch.testing.assert_close(got[:, c], ref, atol=2e-5, rtol=1e-5)
    acc = obj.per_row(masks, "accuracy")
    refs = [_reference(bert, target, stats.z_mean, masks[c]) for c in range(4)]
    hits = torch.stack([(C.predicted_codes(r) == target.targets).float() for r in refs])  # [column, batch, query]
    torch.testing.assert_close(acc, hits.mean(-1))
    moved = (target.targets != target.cells()[:, 2].reshape(len(target), -1)).float()
    exact, changed = obj.per_row(masks, ["exact", "changed"])
    torch.testing.assert_close(exact, (hits.min(-1).values == 1).float())
    torch.testing.assert_close(changed, (hits * moved).sum(-1) / moved.sum(-1))
    # canvases split into groups of at most 4 rows per forward (each group its own runner, its rows' own means)
    grouped = V.CanvasPatch(bert, target, stats, rows_per_forward=4)
    assert [g.tolist() for g in grouped.groups] == [[0, 1, 2, 3], [4, 5]]
    torch.testing.assert_close(grouped.logits(masks), got, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(grouped.per_row(masks, "accuracy"), acc)
    assert torch.equal(grouped.predictions(masks), obj.predictions(masks))
    sc = grouped.scores(masks)
    for t in TASKS:
        rows = torch.tensor([tt == t for tt in target.tasks])
        torch.testing.assert_close(sc["changed"][t], changed[:, rows].mean(1))


def test_topk_curve_scores_every_metric_and_the_share_of_the_gap(bert, stats):
    rho = V.visual_taskness(stats)
    target = C.concat([C.canvases(t, 2, examples="masked", seed=9) for t in TASKS])
    icl = C.concat([C.canvases(t, 2, seed=9) for t in TASKS])
    assert torch.equal(icl.targets, target.targets)
    obj = V.CanvasPatch(bert, target, stats)
    wrong = V.CanvasPatch(bert, target, stats, task_map={"invert": "gray", "gray": "hflip", "hflip": "invert"})
    curve = V.topk_curve(obj, wrong, rho, [8, 200], icl=icl, n_random=2, seed=1)
    assert curve.tasks == (*TASKS, "mean")
    top = obj.scores(torch.stack([V.topk_pairs(rho, 8), V.topk_pairs(rho, 200)]))
    base = obj.scores(torch.zeros(1, *obj.shape))
    _, ref_icl = V._icl_scores(bert, icl)
    for m in V.SCORES:
        for i, t in enumerate(curve.tasks):
            torch.testing.assert_close(curve.values["top"][m][i], top[m][t])
            assert float(curve.base[m][i]) == float(base[m][t][0])
        ref = {"accuracy": ref_icl.code_acc, "exact": ref_icl.exact, "changed": ref_icl.changed}[m]
        assert abs(float(curve.icl_scores[m][0]) - float(ref[:2].mean())) < 1e-6
        gap = (curve.values["top"][m] - curve.base[m][:, None]) / (curve.icl_scores[m] - curve.base[m]).clamp_min(1e-9)[:, None]
        torch.testing.assert_close(curve.gap("top", m), gap)
    w = wrong.scores(V.topk_pairs(rho, 200)[None])
    assert float(curve.values["wrong"]["accuracy"][0, 1]) == float(w["accuracy"]["invert"][0])
    g = curve.gap("top", "changed")[-1].tolist()
    assert curve.best_k(g[1], "changed") == (8 if g[0] >= g[1] else 200) and curve.best_k(math.inf, "changed") is None


def test_another_tasks_means_are_patched_where_asked(bert, stats):
    target = C.canvases("invert", 2, examples="masked", seed=9)
    mask = torch.zeros(1, *V.CanvasPatch(bert, target, stats).shape)
    mask[0, 0, 1, :50] = 1.0
    wrong = V.CanvasPatch(bert, target, stats, task_map={"invert": "gray"})
    ref = _reference(bert, dataclasses.replace(target, tasks=("gray", "gray")), stats.z_mean, mask[0])
    torch.testing.assert_close(wrong.logits(mask)[:, 0], ref, atol=2e-5, rtol=1e-5)


def test_many_masks_ride_in_one_forward_and_budgets_count_evaluations(bert, stats):
    target = C.canvases("gray", 2, examples="masked", seed=2)
    obj = V.CanvasPatch(bert, target, stats)
    calls = []
    orig = bert.forward

    def counting(tokens, *a, **k):
        calls.append(int(tokens.shape[0]))
        return orig(tokens, *a, **k)
    bert.forward = counting
    try:
        obj.reward(torch.zeros(8, *obj.shape).index_fill_(3, torch.tensor([5]), 1.0))
        assert calls == [8 * len(target)]  # 8 masks × 2 canvases along the batch axis of one forward
        rho = V.visual_taskness(stats)
        space = rho.top_pairs(64)
        seen = []
        obj_reward = obj.reward
        obj.reward = lambda m, metric="logprob": seen.append(m.shape[0]) or obj_reward(m, metric)
        results = [V.reinforce_pairs(obj, candidates=space, steps=3, samples=4, init_logit=0.0),
                   V.cma_pairs(obj, candidates=space, budget=12, popsize=4),
                   V.grs_pairs(obj, candidates=space, budget=13, samples=4)]
        assert [r.evaluations for r in results] == [12, 12, 13] and sum(seen) == 37
        for r in results:  # nothing outside the candidate pairs is ever selected
            outside = torch.ones(rho.per_position.numel(), dtype=torch.bool)
            outside[space] = False
            assert not r.mask.reshape(-1)[outside].any()
    finally:
        bert.forward = orig


def test_reinforce_over_pairs_finds_planted_pairs():
    """With a reward of the mask itself (no model), REINFORCE keeps the planted pairs and drops the rest."""
    class Planted:
        shape = (2, 2, 6)
        target = C.canvases("gray", 1)
        info = dataclasses.make_dataclass("I", ["name", "config_hash"])("planted", "x")

        def reward(self, masks, metric="logprob"):
            m = masks.reshape(masks.shape[0], -1)
            return m[:, [1, 7, 20]].sum(1) - 0.5 * m.sum(1)
    sel = V.reinforce_pairs(Planted(), steps=150, samples=8, lr=0.1, init_logit=0.0)
    assert sorted(sel.mask.reshape(-1).nonzero().reshape(-1).tolist()) == [1, 7, 20]


# ------------------------------------------------------------------ bad input


def test_bad_masks_and_means_are_refused_before_any_forward(bert, stats, tmp_path):
    target = C.canvases("gray", 2, examples="masked", seed=2)
    obj = V.CanvasPatch(bert, target, stats)
    other = V.canvas_means(bert, ["gray", "invert"], n=2, seed=0)
    two_shot = dataclasses.replace(other, meta={**other.meta, "canvas_layout": C.CanvasLayout(rows=3).key})
    foreign = dataclasses.replace(other, meta={**other.meta, "config_hash": "another model"})
    from transformers import BertConfig, BertForMaskedLM

    small = BertConfig(vocab_size=24, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                       max_position_embeddings=100)
    BertForMaskedLM(small).save_pretrained(tmp_path / "short")
    from tvlens.organisms.visual.train import build_tokenizer

    build_tokenizer().save_pretrained(tmp_path / "short")
    short = tvlens.load_model(tmp_path / "short", device="cpu")

    def boom(*a, **k):
        raise AssertionError("a forward ran before the bad input was refused")
    bert.forward, short.forward = boom, boom
    try:
        with pytest.raises(ValueError, match=r"\[column, layer, head, pos\].*\[2, 4, 144\].*got \[3, 2, 4, 100\]"):
            obj.logits(torch.zeros(3, 2, 4, 100))
        with pytest.raises(ValueError, match="canvases '3x2 cells.*same layout"):
            V.CanvasPatch(bert, target, two_shot)
        with pytest.raises(ValueError, match="another model"):
            V.CanvasPatch(bert, target, foreign)
        with pytest.raises(ValueError, match="not hflip"):
            V.CanvasPatch(bert, C.canvases("hflip", 2, examples="masked"), other)
        with pytest.raises(ValueError, match="144 positions.*reads at most 100"):
            V.CanvasPatch(short, target, stats)
        with pytest.raises(ValueError, match="candidates must be distinct"):
            V.reinforce_pairs(obj, candidates=torch.tensor([3, 3]))
        with pytest.raises(ValueError, match="unknown visual task"):
            V.canvas_means(bert, ["gray", "rot90"])
    finally:
        del bert.forward, short.forward


def test_cli_refuses_bad_arguments_before_loading(capsys):
    from tvlens.cli import main

    assert main(["visual", "--tasks", "gray,rot90"]) == 2
    assert "unknown visual task" in capsys.readouterr().err
    assert main(["visual", "--budget", "3", "--samples", "8"]) == 2
    assert "--budget" in capsys.readouterr().err
