"""Weight-space task vectors: fine-tuning, arithmetic, application, storage, merging, bad input.

References are plain per-parameter torch computations (loops over ``named_parameters``), and for
LoRA peft's own ``merge_adapter`` — independent of tvlens's WeightVector code.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

import tvlens
from tvlens.tasks import Task
from tvlens.vectors import finetune as FT
from tvlens.vectors import weights as W

TINY = dict(steps=3, n_prompts=8, batch_size=8, n_eval_prompts=4, progress=False)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return tvlens.load_model("organism", device="cpu")


@pytest.fixture(scope="module")
def taus(model):
    a = FT.finetune(model, "country_capital", **TINY)
    b = FT.finetune(model, "antonym", **TINY)
    return a, b


@pytest.fixture(scope="module")
def loras(model):
    return (FT.finetune(model, "country_capital", method="lora", rank=2, **TINY),
            FT.finetune(model, "antonym", method="lora", rank=2, **TINY))


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _same(model, snap) -> bool:
    return all(torch.equal(p, snap[n]) for n, p in model.named_parameters())


# ------------------------------------------------------------------------------ fine-tuning


def test_finetune_leaves_caller_untouched_and_is_deterministic(model, taus):
    snap = _snapshot(model)
    again = FT.finetune(model, "country_capital", **TINY)
    assert _same(model, snap)  # the caller's weights never change
    first = taus[0].vector
    assert first.names == again.vector.names
    assert all(torch.equal(first.deltas[n], again.vector.deltas[n]) for n in first.names)
    other = FT.finetune(model, "country_capital", **{**TINY, "seed": 1})
    assert any(not torch.equal(first.deltas[n], other.vector.deltas[n]) for n in first.names)
    # the returned model is theta_ft, and tau = theta_ft - theta per parameter
    ft_params = dict(taus[0].model.named_parameters())
    for n, p in model.named_parameters():
        assert torch.equal(first.deltas[n], ft_params[n] - p) or not bool((ft_params[n] - p).any())
    assert taus[0].zero_shot.shape == (2, 1) and len(taus[0].loss) == TINY["steps"]


def test_answer_loss_teacher_forces_every_answer_token():
    rows = [([1, 5, 6], (7, 8)), ([1, 9], (4,))]
    tokens, mask, targets = FT._collate(rows, "answer", pad=0)
    assert tokens.tolist() == [[1, 5, 6, 7], [0, 0, 1, 9]]
    assert targets.tolist() == [[-100, -100, 7, 8], [-100, -100, -100, 4]]
    tokens, _, targets = FT._collate(rows, "first_token", pad=0)
    assert tokens.tolist() == [[1, 5, 6], [0, 1, 9]] and targets[:, -1].tolist() == [7, 4]


# ------------------------------------------------------------------------------ applying


def test_applied_is_theta_plus_lambda_tau_and_restores_bit_for_bit(model, taus):
    tau = taus[0].vector
    snap = _snapshot(model)
    with W.applied(model, tau, 0.7):
        for n, p in model.named_parameters():
            want = snap[n] + 0.7 * tau.deltas[n] if n in tau.deltas else snap[n]
            assert torch.allclose(p, want, rtol=0, atol=1e-6)
        assert not _same(model, snap)
    assert _same(model, snap)


def test_applied_restores_when_the_body_raises(model, taus):
    snap = _snapshot(model)
    with pytest.raises(RuntimeError, match="boom"):
        with W.applied(model, taus[0].vector, 2.0):
            assert not _same(model, snap)
            raise RuntimeError("boom")
    assert _same(model, snap)


def test_apply_returns_a_new_model(model, taus):
    snap = _snapshot(model)
    new = W.apply(model, taus[0].vector, 0.5)
    assert new is not model and _same(model, snap)
    with W.applied(model, taus[0].vector, 0.5):
        assert _same(new, _snapshot(model))


# ------------------------------------------------------------------------------ arithmetic and geometry


def test_arithmetic_equals_the_per_parameter_computation(taus):
    a, b = taus[0].vector, taus[1].vector
    c = a * 0.3
    cases = {
        "add": (a + b, lambda n: a.deltas[n] + b.deltas[n]),
        "sub": (a - b, lambda n: a.deltas[n] - b.deltas[n]),
        "neg": (-a, lambda n: -a.deltas[n]),
        "scale": (2.5 * a, lambda n: 2.5 * a.deltas[n]),
        "div": (a / 4, lambda n: a.deltas[n] * 0.25),
        "mean": (W.mean([a, b]), lambda n: (a.deltas[n] + b.deltas[n]) / 2),
        "analogy": (W.analogy(a, b, c), lambda n: a.deltas[n] + (b.deltas[n] - c.deltas[n])),
        "weighted": (W.weighted_sum([a, b], [0.5, -2.0]), lambda n: 0.5 * a.deltas[n] - 2.0 * b.deltas[n]),
    }
    for name, (got, ref) in cases.items():
        assert got.names == a.names, name
        for n in a.names:
            assert torch.allclose(got.deltas[n], ref(n), rtol=0, atol=1e-6), (name, n)


def test_norms_and_cosines_match_flattened_vectors(taus):
    a, b = taus[0].vector, taus[1].vector
    fa = torch.cat([a.deltas[n].reshape(-1) for n in a.names]).double()
    fb = torch.cat([b.deltas[n].reshape(-1) for n in a.names]).double()
    assert a.norm() == pytest.approx(float(fa.norm()), rel=1e-9)
    assert a.cosine(b) == pytest.approx(float(torch.nn.functional.cosine_similarity(fa, fb, dim=0)), abs=1e-9)
    for by in ("layer", "module", "layer_module"):
        g = W.geometry([a, b], by=by)
        assert float(g.norms[:, 0].double().pow(2).sum()) == pytest.approx(a.norm() ** 2, rel=1e-5)
        assert torch.allclose(g.cosines[:, 0, 0], torch.ones(len(g.groups)))
    g = W.geometry([a, b], by="layer")
    assert g.groups[0] == "embed" and g.groups[-1] == "final" and "0" in g.groups
    q = [n for n in a.names if ".0." in n and "q_proj" in n][0]
    row = g.groups.index("0")
    per_layer = sum(float(a.deltas[n].double().pow(2).sum()) for n in a.names if W.parameter_group(n, "layer") == "0")
    assert float(g.norms[row, 0]) == pytest.approx(math.sqrt(per_layer), rel=1e-5)
    assert W.parameter_group(q, "module") == "q_proj"
    assert len(g.to_frame()) == 2 * len(g.groups)
    g.plot()


# ------------------------------------------------------------------------------ storage


def test_save_load_round_trip_and_refusal_on_another_base(model, taus, loras, tmp_path):
    for ft in (taus[0], loras[0]):
        v = ft.vector
        path = v.save(tmp_path / v.kind)
        back = W.WeightVector.load(path, model=model)
        assert back.names == v.names and back.kind == v.kind and back.config_hash == v.config_hash
        assert all(torch.equal(back.deltas[n], v.deltas[n]) for n in v.names)
        if v.lora:
            assert all(torch.equal(back.lora[n][0], v.lora[n][0]) and back.lora[n][2] == v.lora[n][2] for n in v.lora)
    other = taus[1].model  # fine-tuned everywhere, unembedding included: another base model
    assert tvlens.ModelInfo.of(other).config_hash != tvlens.ModelInfo.of(model).config_hash
    with pytest.raises(ValueError, match="made with model"):
        W.WeightVector.load(tmp_path / "full", model=other)


# ------------------------------------------------------------------------------ LoRA and merging


def test_lora_delta_equals_peft_merged_weights_minus_base(model, loras):
    v = loras[0].vector
    assert v.kind == "lora" and v.n_trained < v.n_params
    work = copy.deepcopy(model)
    a0, _, s0 = next(iter(v.lora.values()))
    pm = FT.peft_model(work, rank=a0.shape[0], lora_alpha=s0 * a0.shape[0], target_modules=[n[:-7] for n in v.lora])
    layers = FT.lora_layers(pm)
    with torch.no_grad():
        for mod, layer in layers.items():
            a, b, _ = v.lora[f"{mod}.weight"]
            layer.lora_A["default"].weight.copy_(a)
            layer.lora_B["default"].weight.copy_(b)
    pm.merge_adapter()  # peft writes W + scaling * B @ A into the base layer
    base = dict(model.named_parameters())
    for mod, layer in layers.items():
        name = f"{mod}.weight"
        merged = layer.get_base_layer().weight
        assert torch.allclose(merged - base[name], v.deltas[name], rtol=0, atol=1e-6), name
        a, b, s = v.lora[name]
        assert torch.allclose(s * b @ a, v.deltas[name], rtol=0, atol=1e-6)


def test_merging_through_peft(model, taus, loras):
    a, b = loras[0].vector, loras[1].vector
    cat = W.merge([a, b], "cat", model=model)  # exact concatenation of the adapters: the plain sum
    for n in a.names:
        assert torch.allclose(cat.deltas[n], a.deltas[n] + b.deltas[n], rtol=0, atol=1e-6)
    ties = W.merge([a, b], "ties_svd", model=model, density=0.5)
    assert ties.kind == "merge" and ties.names == a.names and ties.lora
    fa, fb = taus[0].vector, taus[1].vector
    ta = W.merge([fa, fb], "task_arithmetic", weights=[1.0, 0.5])
    for n in fa.names:
        assert torch.allclose(ta.deltas[n], fa.deltas[n] + 0.5 * fb.deltas[n], rtol=0, atol=1e-6)
    d1, d2 = W.merge([fa, fb], "dare_ties", seed=3), W.merge([fa, fb], "dare_ties", seed=3)
    assert all(torch.equal(d1.deltas[n], d2.deltas[n]) for n in fa.names)  # DARE is seeded
    t = W.merge([fa, fa], "ties", density=1.0)  # agreeing signs, nothing trimmed: the mean of equal vectors
    assert all(torch.allclose(t.deltas[n], fa.deltas[n], atol=1e-6) for n in fa.names)


# ------------------------------------------------------------------------------ bad input


def test_bad_lambda_and_foreign_vectors_fail_before_any_change(model, taus, loras):
    tau = taus[0].vector
    snap = _snapshot(model)
    for lam in (float("nan"), float("inf"), "1"):
        with pytest.raises((ValueError, TypeError), match="lam"):
            with W.applied(model, tau, lam):
                pass
    foreign = W.WeightVector(deltas=dict(tau.deltas), task="x", meta=tvlens.results.ResultMeta(model="other", config_hash="0" * 16))
    with pytest.raises(ValueError, match="made with model 'other'"):
        with W.applied(model, foreign):
            pass
    arch = W.WeightVector(deltas={"blocks.9.nope.weight": torch.ones(2)}, task="x", meta=tau.meta)
    with pytest.raises(ValueError, match="does not have"):
        W.apply(model, arch)
    name = tau.names[0]
    shape = W.WeightVector(deltas={name: torch.ones(3)}, task="x", meta=tau.meta)
    with pytest.raises(ValueError, match="shape"):
        with W.applied(model, shape):
            pass
    with W.applied(model, tau):
        with pytest.raises(ValueError, match="another vector is applied"):
            with W.applied(model, taus[1].vector):
                pass
    assert _same(model, snap)
    with pytest.raises(ValueError, match="different parameter sets"):
        tau + loras[0].vector
    assert (tau + loras[0].vector.padded_like(tau)).names == tau.names
    with pytest.raises(ValueError, match="finite"):
        tau * float("nan")
    with pytest.raises(ValueError, match="LoRA vectors"):
        W.merge([tau, taus[1].vector], "ties_svd", model=model)
    with pytest.raises(ValueError, match="unknown merge"):
        W.merge([tau, taus[1].vector], "average")


def test_finetune_refuses_bad_input_before_any_work(model, monkeypatch):
    def no_copy(*a, **k):
        raise AssertionError("the model was copied before the arguments were checked")

    monkeypatch.setattr(FT.copy, "deepcopy", no_copy)
    small = Task(name="tiny", family="custom", instruction="", pairs=tuple((f"{w}", f"{w}") for w in
                                                                          ("france", "japan", "spain", "italy", "china")))
    with pytest.raises(ValueError, match="fewer than the 8"):
        FT.finetune(model, small, **TINY)
    with pytest.raises(ValueError, match="too few for 60-shot"):
        FT.finetune(model, "antonym", n_shots=60, **TINY)
    for kw, match in ((dict(method="qlora"), "unknown method"), (dict(loss="all"), "unknown loss"),
                      (dict(lr=float("nan")), "finite"), (dict(steps=0), ">= 1")):
        with pytest.raises((ValueError, TypeError), match=match):
            FT.finetune(model, "antonym", **{**TINY, **kw})


def test_experiments_run_and_round_trip(model, taus, tmp_path):
    vecs = {"country_capital": taus[0].vector, "antonym": taus[1].vector}
    neg = tvlens.weight_negation(model, list(vecs), vectors=vecs, lams=(1.0,), n_prompts=4)
    assert neg.controls == (("antonym",), ("country_capital",)) and neg.lams[0] in (0.0, 1.0)
    back = type(neg).load(neg.save(tmp_path / "neg"), model=model)
    assert torch.equal(back.target_after, neg.target_after) and back.controls == neg.controls
    add = tvlens.weight_addition(model, list(vecs), vectors=vecs, methods=("task_arithmetic", "ties"), lams=(0.5, 1.0),
                                 n_prompts=4)
    assert add.normalized.shape == (2, 2) and add.lams[0] in (0.5, 1.0)
    assert torch.allclose(add.normalized, add.merged / add.finetuned)
    assert len(add.to_frame()) == 6
    # the table without pandas: one dict per row, the frame's rows; a task's row holds its values
    rows, frame = add.records(), add.to_frame()
    assert len(rows) == len(frame) and list(frame.columns) == list(dict.fromkeys(k for r in rows for k in r))
    first = next(r for r in rows if r["task"] == "antonym")
    assert first["method"] == "task_arithmetic" and first["merged"] == float(add.merged[0, 1])
    # which task's answer the merged model gives: its own answer's share is its accuracy on the same queries
    assert add.answer_tasks[:2] == ("country_capital", "antonym") and "country_currency" in add.answer_tasks
    assert torch.allclose(add.answered_as[:, [0, 1], [0, 1]], add.merged)
    with pytest.raises(ValueError, match="finite"):
        tvlens.weight_addition(model, list(vecs), vectors=vecs, lams=(float("inf"),))


def test_cli_refuses_bad_weights_arguments_before_loading(capsys):
    from tvlens.cli import main

    assert main(["weights", "addition", "--tasks", "antonym"]) == 2
    assert "at least 2" in capsys.readouterr().err
    assert main(["weights", "analogy", "--tasks", "antonym"]) == 2
    assert "not composed tasks" in capsys.readouterr().err


def test_answered_as_counts_every_accepted_answer(organism):
    """Which task's answer the model gave counts any answer the task accepts (the rule of every metric)."""
    import dataclasses

    from tvlens.analyses.weights import _answer_ids, _answered_as
    from tvlens.inputs.text import final_logits, icl_prompts
    from tvlens.tasks import load_task

    task = load_task("antonym")
    b = icl_prompts(organism, task, n_prompts=6, n_shots=0, split="test", seed=0)
    pred = final_logits(organism, b).argmax(-1).tolist()
    words = [organism.tokenizer.decode([p]).strip() or "x" for p in pred]
    # a second accepted output per test query: the word the model says (when it is not already the answer)
    extra = tuple((q, w) for q, w in zip(b.queries, words) if (q, w) not in set(task.pairs))
    both = dataclasses.replace(task, name="antonym_or_said", pairs=task.pairs + extra)
    ids = _answer_ids(organism, both, list(b.queries))
    assert all(ids[i] >= {pred[i]} for i in range(len(pred)))
    got = _answered_as(organism, [task], [task, both], seed=0, n_prompts=6)
    assert float(got[0, 1]) == 1.0 and float(got[0, 0]) < 1.0  # the first answer alone would not score 1


def test_a_weight_vector_reads_as_a_table_and_a_figure(tmp_path):
    """records(): one row per parameter with the norm of its delta; plot(): the norm per layer, whose
    squares add up to the vector's squared norm."""
    import numpy as np
    import torch

    from tvlens.vectors.weights import WeightVector

    g = torch.Generator().manual_seed(0)
    deltas = {"model.layers.0.self_attn.q_proj.weight": torch.randn(4, 4, generator=g),
              "model.layers.0.mlp.up_proj.weight": torch.randn(8, 4, generator=g),
              "model.layers.1.mlp.down_proj.weight": torch.randn(4, 8, generator=g)}
    wv = WeightVector(deltas, task="t")
    rows = wv.records()
    assert {r["parameter"]: r["norm"] for r in rows} == pytest.approx({n: float(d.norm()) for n, d in deltas.items()}, rel=1e-6)
    assert {r["parameter"]: r["layer"] for r in rows} == {n: n.split(".")[2] for n in deltas}
    ys = np.concatenate([np.asarray(tr.y, dtype=float) for tr in wv.plot().data])
    assert float((ys ** 2).sum()) == pytest.approx(wv.norm() ** 2, rel=1e-5)
    assert wv.to_html(tmp_path / "wv.html").exists()
