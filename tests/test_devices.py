"""Cross-device agreement: every analysis gives the same numbers on CUDA as on the CPU.

Skipped where no GPU is present (CI has none). Each case runs one public entry point on the shipped
organism twice, on the CPU and on CUDA, with the same seed, and compares the results: float tensors to
a tolerance that allows for different kernels (fp32), discrete outputs (argmax tokens, accuracies over a
few prompts, selected heads) exactly or within one prompt. It also checks that results come back as
CPU tensors or plain numbers whatever the model's device (a notebook can mix results from both), and that
nothing is left on the model.
"""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

TASKS = ["country_capital", "antonym", "successor", "english_french"]


@pytest.fixture(scope="module")
def models():
    from tvlens.hooks import hook_count
    from tvlens.models import load_model

    pair = load_model("organism", device="cpu"), load_model("organism", device="cuda")
    _BASELINE.update(cpu=hook_count(pair[0]), cuda=hook_count(pair[1]))
    return pair


_BASELINE: dict[str, int] = {}


def _close(a, b, atol=2e-4, rtol=2e-4, what=""):
    a = torch.as_tensor(a).detach().cpu().double()
    b = torch.as_tensor(b).detach().cpu().double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    assert torch.allclose(a, b, atol=atol, rtol=rtol, equal_nan=True), (what, (a - b).abs().max().item())


def test_load_defaults_to_cuda_and_logits_agree(models):
    from tvlens.models import load_model

    cpu, gpu = models
    assert next(gpu.parameters()).device.type == "cuda"
    assert next(load_model("organism").parameters()).device.type == "cuda"  # the default where CUDA exists
    toks = cpu.to_tokens("france → paris\njapan →")
    _close(cpu(toks), gpu(toks.cuda()), atol=1e-4, what="logits")


def test_icl_accuracy_agrees(models):
    from tvlens.inputs.text import evaluate_icl

    for t in TASKS:
        a, b = (evaluate_icl(m, t, 5, n_prompts=24, seed=0) for m in models)
        assert abs(a.first_token - b.first_token) <= 1 / 24 + 1e-9, (t, a.first_token, b.first_token)


def test_head_means_and_taskness_agree(models):
    from tvlens.analyses.taskness import head_means, taskness

    s_cpu, s_gpu = (head_means(m, TASKS, n_prompts=16, seed=0) for m in models)
    assert s_gpu.z_mean.device.type == "cpu"
    _close(s_cpu.z_mean, s_gpu.z_mean, atol=1e-4, what="z_mean")
    _close(s_cpu.z_var, s_gpu.z_var, atol=1e-4, rtol=1e-3, what="z_var")
    r_cpu, r_gpu = taskness(s_cpu), taskness(s_gpu)
    _close(r_cpu.scores, r_gpu.scores, atol=1e-3, rtol=1e-3, what="rho")


def test_logit_lens_agrees(models):
    from tvlens.analyses.lens import logit_lens

    a, b = (logit_lens(m, "country_capital", n_prompts=8, seed=0) for m in models)
    _close(a.answer_prob, b.answer_prob, atol=1e-4, what="answer_prob")
    _close(a.top_probs, b.top_probs, atol=1e-4, what="top_probs")


def test_layer_sweep_and_task_vector_agree(models):
    from tvlens.vectors.activation import layer_sweep, task_vector

    a, b = (layer_sweep(m, TASKS, n_prompts=16, seed=0) for m in models)
    assert a.best_layer == b.best_layer
    _close(a.accuracy, b.accuracy, atol=1 / 16 + 1e-6, rtol=0, what="sweep accuracy")
    va, vb = (task_vector(m, "antonym", layer=2, n_prompts=16, seed=0) for m in models)
    assert vb.vector.device.type == "cpu"
    _close(va.vector, vb.vector, atol=1e-4, what="task vector")


def test_patch_heads_and_positions_agree(models):
    from tvlens.analyses.patching import patch_heads, patch_positions
    from tvlens.inputs.text import icl_prompts
    from tvlens.analyses.taskness import head_means

    res = []
    for m in models:
        zero = icl_prompts(m, "antonym", n_prompts=8, n_shots=0, seed=0)
        clean = icl_prompts(m, "antonym", n_prompts=8, n_shots=5, seed=0)
        shuffled = icl_prompts(m, "antonym", n_prompts=8, n_shots=5, seed=0, shuffle_labels=True)  # same length
        means = head_means(m, ["antonym", "country_capital"], n_prompts=8, seed=0).select(["antonym"])
        res.append((patch_heads(m, zero, means, positions="final"), patch_positions(m, shuffled, clean)))
    (h_cpu, p_cpu), (h_gpu, p_gpu) = res
    _close(h_cpu.values, h_gpu.values, atol=2e-3, rtol=1e-3, what="patch_heads")
    _close(p_cpu.values, p_gpu.values, atol=2e-3, rtol=1e-3, what="patch_positions")


def test_function_vector_agrees(models):
    from tvlens.vectors.activation import function_vector

    a, b = (function_vector(m, "antonym", k=4, n_prompts=8, n_cie_prompts=8, seed=0) for m in models)
    _close(a.cie, b.cie, atol=2e-3, rtol=1e-3, what="cie")
    assert a.top_heads == b.top_heads


def test_selection_runs_on_cuda_and_agrees(models):
    from tvlens.analyses.selection import reinforce_select, soft_select

    a, b = (reinforce_select(m, ["antonym", "country_capital"], steps=3, n_prompts=8, seed=0) for m in models)
    assert b.probabilities.device.type == "cpu"
    _close(a.probabilities, b.probabilities, atol=0.05, rtol=0, what="reinforce probabilities")
    a, b = (soft_select(m, ["antonym", "country_capital"], steps=3, n_prompts=8, seed=0) for m in models)
    _close(a.probabilities, b.probabilities, atol=1e-3, rtol=0, what="soft weights")


def test_no_hooks_or_grad_left_on_the_cuda_model(models):
    from tvlens.hooks import hook_count

    _, gpu = models
    assert hook_count(gpu) == _BASELINE["cuda"]  # the bridge's own hooks only
    assert not any(p.requires_grad for p in gpu.parameters())
