"""What a TransformerLens user reaches for first: ``.to_frame()`` on results, raw patched values next
to their effects, the attention of the heads a sweep found, and errors that point to the right call."""

from __future__ import annotations

import math

import pytest
import torch

import tvlens
from tvlens.analyses.attention import AttentionPatterns, attention_patterns

pd = pytest.importorskip("pandas")

TASKS = ["country_capital", "antonym"]


@pytest.fixture(scope="module")
def stats(tiny_llama):
    return tvlens.head_means(tiny_llama, TASKS, n_prompts=4, n_shots=2)


@pytest.fixture(scope="module")
def patched(tiny_llama, stats):
    zs = tvlens.icl_prompts(tiny_llama, "antonym", n_prompts=4, n_shots=0)
    return tvlens.patch_heads(tiny_llama, zs, stats.select(["antonym"]), metric="logprob", progress=False)


def test_head_stats_to_frame(tiny_llama, stats):
    df = stats.to_frame()
    info = tvlens.ModelInfo.of(tiny_llama)
    assert len(df) == len(TASKS) * info.n_layers * info.n_heads
    assert {"task", "layer", "head", "count", "mean_norm", "var"} <= set(df.columns)
    row = df[(df["task"] == "antonym") & (df["layer"] == 1) & (df["head"] == 2)].iloc[0]
    assert row["mean_norm"] == pytest.approx(float(stats.mean("antonym")[1, 2].norm()), rel=1e-6)
    assert row["count"] == 4


def test_task_and_function_vector_to_frame(tiny_llama):
    tv = tvlens.task_vector(tiny_llama, "antonym", layer=1, n_prompts=4, n_shots=2)
    df = tv.to_frame()
    assert len(df) == 1 and df.iloc[0]["layer"] == 1 and df.iloc[0]["norm"] == pytest.approx(tv.norm)
    fv = tvlens.function_vector(tiny_llama, "antonym", k=2, n_prompts=4, n_cie_prompts=2, n_shots=2)
    frame = fv.to_frame()
    info = tvlens.ModelInfo.of(tiny_llama)
    assert len(frame) == info.n_layers * info.n_heads
    ranked = frame.dropna(subset=["rank"]).sort_values("rank")
    assert [tuple(x) for x in ranked[["layer", "head"]].to_numpy()] == [tuple(h) for h in fv.top_heads]
    assert (ranked["out_norm"] > 0).all()


def test_patch_result_offers_values_and_effects(patched):
    df = patched.to_frame()
    assert {"value", "effect"} <= set(df.columns)
    assert (df["value"] - df["effect"]).round(5).eq(round(patched.target_value, 5)).all()  # values are raw, effects deltas
    l, h, v = patched.top(1)[0]
    assert v - patched.target_value == pytest.approx(float(patched.effect[l, h]))


def test_attention_patterns_of_the_heads_a_sweep_found(tiny_llama, patched):
    batch = tvlens.icl_prompts(tiny_llama, "antonym", n_prompts=2, n_shots=2)
    ap = attention_patterns(tiny_llama, batch, patched, k=3, prompt=1)
    assert isinstance(ap, AttentionPatterns) and len(ap.heads) == 3
    assert list(ap.heads) == [(l, h) for l, h, _ in patched.top(3)]
    n = int(batch.attention_mask[1].sum())
    assert ap.patterns.shape == (3, n, n) and len(ap.tokens) == n  # padding removed
    assert torch.allclose(ap.patterns.sum(-1), torch.ones(3, n), atol=1e-4)
    assert float(ap.patterns.triu(1).abs().max()) < 1e-6  # causal
    assert len(ap.plot().data) == 3
    cv = pytest.importorskip("circuitsvis")
    assert cv is not None and "AttentionHeads" in str(ap.show())
    with pytest.raises(ValueError, match="out of range"):
        attention_patterns(tiny_llama, batch, [(9, 0)])


def test_a_prompt_batch_as_tasks_says_to_pass_one_per_task(tiny_llama):
    batch = tvlens.icl_prompts(tiny_llama, "antonym", n_prompts=4, n_shots=2)
    with pytest.raises(ValueError, match="one PromptBatch per task"):
        tvlens.taskness(tiny_llama, batch)


def test_patch_heads_reads_a_token_tensor_as_prompts_not_means(tiny_llama):
    clean = tvlens.icl_prompts(tiny_llama, "antonym", n_prompts=3, n_shots=2, seed=1)
    corrupt = tvlens.icl_prompts(tiny_llama, "antonym", n_prompts=3, n_shots=2, seed=1, shuffle_labels=True)
    by_batch = tvlens.patch_heads(tiny_llama, corrupt, clean, metric="logprob", progress=False)
    by_tokens = tvlens.patch_heads(tiny_llama, corrupt, clean.tokens, metric="logprob", progress=False)
    assert torch.allclose(by_batch.values, by_tokens.values, atol=1e-5)

    class ActivationCache:  # what run_with_cache returns
        cache_dict: dict = {}

    with pytest.raises(TypeError, match="runs the source itself"):
        tvlens.patch_heads(tiny_llama, corrupt, ActivationCache(), progress=False)


def test_logit_lens_with_prompt_text_points_to_prompts_from_text(tiny_llama):
    for given in (["France → Paris\nGermany →"], "France → Paris\nGermany →"):
        with pytest.raises(TypeError, match="prompts_from_text"):
            tvlens.logit_lens(tiny_llama, given)
    assert not math.isnan(tvlens.logit_lens(tiny_llama, "antonym", n_prompts=2, n_shots=2).curve("answer", "prob")[-1])


def _readme_block(starts: str) -> str:
    """The README's ```python block whose first line is ``starts``, as written."""
    import re
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    found = [b for b in blocks if b.startswith(starts)]
    assert len(found) == 1, f"README has {len(found)} python blocks starting with {starts!r}"
    return found[0]


def test_readme_prompts_answers_and_modalities_block_runs(organism):
    """The README's block on prompt options, weight, visual and cross-modal vectors runs as written
    (on the organism, as ``tvlens.load_model()`` gives), and what it builds is what it says."""
    code = _readme_block("# how prompts are written")
    ns: dict = {"tvlens": tvlens, "model": organism}
    exec(compile(code, "README.md", "exec"), ns)
    assert ns["tv"].layer == 2 and ns["batch"].n_shots == 5
    assert ns["ft"].vector.task == "country_capital"
    assert ns["vrho"].tasks == ("hflip", "invert", "gray")
    frame = ns["table"].to_frame()
    assert {"No Context", "Text ICL xPatch"} <= set(map(str, frame.columns)) | set(map(str, frame.get("condition", [])))
