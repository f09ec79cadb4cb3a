"""ICL prompt builder and ICL accuracy.

Two tokenizer kinds: the word-level organism tokenizer (spaces vanish, "\\n" and "→" are tokens)
on a tiny GQA Llama, and a byte-level BPE trained offline here (GPT-2 style: spaces belong to the
following word, most words are several tokens) on a tiny GPT-2. The real vocabularies (GPT-2,
SentencePiece, Llama-3, Qwen3) are in ``test_vocabularies.py``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import re
import warnings

import numpy as np
import pytest
import torch

import tvlens
from tvlens.inputs.text import (
    IclAccuracy,
    PromptBatch,
    TokenClass,
    TokenCollisionWarning,
    answer_logprob,
    evaluate_icl,
    evaluate_prompts,
    final_logits,
    first_token_accuracy,
    icl_prompts,
)
from tvlens.tasks import Task, load_task

TASKS = ("country_capital", "country_continent", "antonym")
# a hand-made task: 5 pairs -> 3 train / 1 dev / 1 test (Task.split is 60/20/20)
HAND = Task(
    name="hand",
    family="custom",
    instruction="Say the animal sound.",
    pairs=(("dog", "woof"), ("cat", "meow"), ("cow", "moo"), ("duck", "quack"), ("sheep", "baa")),
)
LLAMA_N_CTX = 64


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny forwards on a shared 2-core machine: one intra-op thread is several times faster."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _all_tasks() -> list[Task]:
    return [load_task(n) for n in TASKS] + [HAND]


def _bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    lines = []
    for t in _all_tasks():
        lines.append(t.instruction)
        lines += [f"{x} → {y}" for x, y in t.pairs]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=["<|endoftext|>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(lines * 3, trainer)
    # GPT-2 convention: BOS = EOS = <|endoftext|>, no pad token (padding falls back to EOS)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)


def _word_tokenizer():
    from tvlens.organisms.text.tokenizer import build_tokenizer

    words = set()
    for t in _all_tasks():
        words |= t.vocabulary()
    return build_tokenizer(sorted(words))


def build_tiny(kind: str, out) -> object:
    """Save a tiny random checkpoint (``llama`` word-level GQA, or ``gpt2`` byte-level BPE) and load it."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        tok = _word_tokenizer()
        cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=LLAMA_N_CTX,
                          bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        hf = LlamaForCausalLM(cfg)
    else:
        tok = _bpe_tokenizer()
        cfg = GPT2Config(vocab_size=len(tok), n_embd=64, n_layer=2, n_head=4, n_positions=256,
                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id)
        hf = GPT2LMHeadModel(cfg)
    hf.save_pretrained(out)
    tok.save_pretrained(out)
    return tvlens.load_model(out, device="cpu")


@pytest.fixture(scope="module")
def word_model(tmp_path_factory):
    return build_tiny("llama", tmp_path_factory.mktemp("prompts_llama"))


@pytest.fixture(scope="module")
def bpe_model(tmp_path_factory):
    model = build_tiny("gpt2", tmp_path_factory.mktemp("prompts_gpt2"))
    assert len(model.tokenizer.encode(" →", add_special_tokens=False)) == 1, "BPE did not learn ' →' as one token"
    return model


@pytest.fixture(scope="module", params=["word", "bpe"])
def model(request, word_model, bpe_model):
    return {"word": word_model, "bpe": bpe_model}[request.param]


@contextlib.contextmanager
def _no_collision_warnings():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenCollisionWarning)
        yield


def _is_bpe(model) -> bool:
    return model.tokenizer.unk_token_id is None


def _row_ids(batch: PromptBatch, r: int, *, bos: bool = False) -> list[int]:
    keep = batch.attention_mask[r].bool()
    if not bos:
        keep &= ~batch.positions_of(TokenClass.BOS)[r]
    return batch.tokens[r][keep].tolist()


def _runs(batch: PromptBatch, r: int, tokenizer) -> list[tuple[TokenClass, str]]:
    """Consecutive same-class runs of row r, decoded: [(class, text), ...] (pads dropped)."""
    out: list[tuple[TokenClass, list[int]]] = []
    for t, c in zip(batch.tokens[r].tolist(), batch.token_class[r].tolist()):
        if c == TokenClass.PAD:
            continue
        if out and out[-1][0] == c:  # same-class segments are never adjacent, except instruction + "\n"
            out[-1][1].append(t)
        else:
            out.append((TokenClass(c), [t]))
    return [(c, tokenizer.decode(ids)) for c, ids in out]


def _expected_runs(batch: PromptBatch, r: int, *, instruction: str | None, spaces: bool):
    sp = (lambda s: s) if spaces else (lambda s: s.strip(" "))
    sep = sp(" " + batch.options["separator"])
    runs = []
    if instruction is not None:
        runs.append((TokenClass.INSTRUCTION, instruction + "\n"))
    for x, y in batch.demos[r]:
        runs += [(TokenClass.DEMO_INPUT, x), (TokenClass.DEMO_SEP, sep), (TokenClass.DEMO_OUTPUT, sp(" " + y)),
                 (TokenClass.DEMO_NEWLINE, "\n")]
    runs += [(TokenClass.QUERY_INPUT, batch.queries[r]), (TokenClass.FINAL_SEP, sep)]
    return runs


VARIANTS = {
    "3shot": dict(n_shots=3),
    "zero_shot": dict(n_shots=0),
    "instruction": dict(n_shots=2, instruction=True),
    "instruction_only": dict(n_shots=0, instruction="only"),
    "dummy": dict(n_shots=3, dummy_query=True),
    "shuffled": dict(n_shots=4, shuffle_labels=True),
}


# ------------------------------------------------------------------------------------------------
# structure: text round trip, alignment, classes


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("task_name", ["country_capital", "country_continent"])
def test_roundtrip_alignment_and_classes(model, task_name, variant):
    kw = VARIANTS[variant]
    task = load_task(task_name)
    batch = icl_prompts(model, task_name, n_prompts=7, seed=3, **kw)
    tok = model.tokenizer
    assert len(batch) == 7 and batch.task == task_name and batch.n_shots == kw["n_shots"]
    assert batch.tokens.device.type == "cpu" and batch.tokens.dtype == torch.long
    sep_id = tok.encode(" →", add_special_tokens=False)
    assert len(sep_id) == 1
    instr = task.instruction if kw.get("instruction") else None
    for r in range(len(batch)):
        ids = _row_ids(batch, r)
        text = batch.texts[r]
        # the text is what the docs say it is
        demo_text = "".join(f"{x} → {y}\n" for x, y in batch.demos[r])
        assert text == (instr + "\n" if instr else "") + demo_text + f"{batch.queries[r]} →"
        # decode round-trips, and segment-wise tokenization equals tokenizing the whole text
        assert tok.decode(ids) == text
        assert tok(text, add_special_tokens=False)["input_ids"] == ids
        # left padding: pads first, then BOS, and the final separator is the last position
        m = batch.attention_mask[r]
        n = int(m.sum())
        assert m[: len(m) - n].sum() == 0 and bool(m[len(m) - n:].all())
        assert (batch.token_class[r] == TokenClass.PAD).tolist() == (m == 0).tolist()
        assert batch.token_class[r, len(m) - n] == TokenClass.BOS and batch.tokens[r, len(m) - n] == tok.bos_token_id
        assert batch.tokens[r, batch.separator_index].item() == sep_id[0]
        assert batch.token_class[r, -1] == TokenClass.FINAL_SEP
        assert int((batch.token_class[r] == TokenClass.FINAL_SEP).sum()) == 1
        # classes: every run decodes to the segment it labels
        assert _runs(batch, r, tok)[1:] == _expected_runs(batch, r, instruction=instr, spaces=_is_bpe(model))
        # answers: tokens of " answer", first token in answer_ids
        assert batch.answer_tokens[r] == tuple(tok.encode(" " + batch.answers[r], add_special_tokens=False))
        assert batch.answer_ids[r].item() == batch.answer_tokens[r][0]
    # the shortest row is padded, the longest is not
    assert int(batch.attention_mask.sum(-1).max()) == batch.tokens.shape[1]


def test_hand_checked_two_shot(word_model, bpe_model):
    """HAND has 3 training pairs; with the test query, n_shots=2 shows 2 of the 3 in a seeded order."""
    (q, a), = HAND.split("test")
    train = HAND.split("train")
    batch = icl_prompts(word_model, HAND, n_prompts=1, n_shots=2, seed=0)
    assert batch.queries == (q,) and batch.answers == (a,)
    (d1, d2) = batch.demos[0]
    assert {d1, d2} <= set(train) and d1 != d2 and q not in (d1[0], d2[0])
    tok = word_model.tokenizer
    assert batch.texts[0] == f"{d1[0]} → {d1[1]}\n{d2[0]} → {d2[1]}\n{q} →"
    words = ["<bos>", d1[0], "→", d1[1], "\n", d2[0], "→", d2[1], "\n", q, "→"]
    assert batch.tokens[0].tolist() == tok.convert_tokens_to_ids(words)
    C = TokenClass
    assert batch.token_class[0].tolist() == [C.BOS, C.DEMO_INPUT, C.DEMO_SEP, C.DEMO_OUTPUT, C.DEMO_NEWLINE,
                                             C.DEMO_INPUT, C.DEMO_SEP, C.DEMO_OUTPUT, C.DEMO_NEWLINE,
                                             C.QUERY_INPUT, C.FINAL_SEP]
    assert batch.positions_of(C.DEMO_SEP)[0].nonzero().flatten().tolist() == [2, 6]
    assert batch.positions_of(C.DEMO_SEP, C.FINAL_SEP)[0].nonzero().flatten().tolist() == [2, 6, 10]

    # the same prompt on the BPE tokenizer: same text and demos, classes follow the BPE pieces
    bb = icl_prompts(bpe_model, HAND, n_prompts=1, n_shots=2, seed=0)
    assert bb.texts == batch.texts and bb.demos == batch.demos
    btok = bpe_model.tokenizer
    expect_tokens, expect_cls = [btok.bos_token_id], [C.BOS]
    for seg, c in [(d1[0], C.DEMO_INPUT), (" →", C.DEMO_SEP), (" " + d1[1], C.DEMO_OUTPUT), ("\n", C.DEMO_NEWLINE),
                   (d2[0], C.DEMO_INPUT), (" →", C.DEMO_SEP), (" " + d2[1], C.DEMO_OUTPUT), ("\n", C.DEMO_NEWLINE),
                   (q, C.QUERY_INPUT), (" →", C.FINAL_SEP)]:
        ids = btok.encode(seg, add_special_tokens=False)
        expect_tokens += ids
        expect_cls += [c] * len(ids)
    assert bb.tokens[0].tolist() == expect_tokens and bb.token_class[0].tolist() == expect_cls
    # the BPE vocabulary is tiny, so some of these words really are several tokens
    assert len(expect_tokens) > len(words)


def test_multi_token_answers_bpe(bpe_model):
    batch = icl_prompts(bpe_model, "country_capital", n_prompts=14, n_shots=1, seed=0)
    assert max(len(a) for a in batch.answer_tokens) > 1
    for a, toks in zip(batch.answers, batch.answer_tokens):
        assert bpe_model.tokenizer.decode(list(toks)) == " " + a


# ------------------------------------------------------------------------------------------------
# variants


def test_zero_shot(model):
    batch = icl_prompts(model, "antonym", n_prompts=5, n_shots=0, seed=1)
    assert all(d == () for d in batch.demos)
    assert batch.texts == tuple(f"{q} →" for q in batch.queries)
    present = set(batch.token_class[batch.attention_mask.bool()].tolist())
    assert present == {TokenClass.BOS, TokenClass.QUERY_INPUT, TokenClass.FINAL_SEP}
    # same seed: same queries as the few-shot prompts
    assert icl_prompts(model, "antonym", n_prompts=5, n_shots=3, seed=1).queries == batch.queries


def test_instruction_variants(model):
    task = load_task("antonym")
    both = icl_prompts(model, task, n_prompts=4, n_shots=2, seed=0, instruction=True)
    plain = icl_prompts(model, task, n_prompts=4, n_shots=2, seed=0)
    only = icl_prompts(model, task, n_prompts=4, n_shots=0, seed=0, instruction="only")
    for r in range(4):
        assert both.texts[r] == task.instruction + "\n" + plain.texts[r]
        assert only.texts[r] == f"{task.instruction}\n{plain.queries[r]} →"
        ins = both.positions_of(TokenClass.INSTRUCTION)[r]
        assert model.tokenizer.decode(both.tokens[r][ins].tolist()) == task.instruction + "\n"
    assert only.demos == ((),) * 4 and both.demos == plain.demos


def test_dummy_query(model):
    task = load_task("country_capital")
    lookup = task.as_dict()
    train_inputs = {x for x, _ in task.split("train")}
    real = icl_prompts(model, task, n_prompts=10, n_shots=4, seed=2)
    dummy = icl_prompts(model, task, n_prompts=10, n_shots=4, seed=2, dummy_query=True)
    assert dummy.demos == real.demos
    assert dummy.real_queries == real.queries and dummy.real_answers == real.answers
    assert dummy.real_answer_tokens == real.answer_tokens
    assert real.real_queries == real.queries  # no dummy: the real query is the one in the prompt
    for r in range(len(dummy)):
        q = dummy.queries[r]
        assert q != dummy.real_queries[r]
        assert q not in {x for x, _ in dummy.demos[r]}
        assert q in train_inputs
        assert dummy.answers[r] == lookup[q]
        assert dummy.texts[r].endswith(f"\n{q} →")
        assert dummy.texts[r][: -len(f"{q} →")] == real.texts[r][: -len(f"{real.queries[r]} →")]
    assert dummy.options["dummy_query"] is True


def test_shuffled_labels(model):
    task = load_task("country_capital")
    lookup = task.as_dict()
    clean = icl_prompts(model, task, n_prompts=8, n_shots=5, seed=4)
    shuf = icl_prompts(model, task, n_prompts=8, n_shots=5, seed=4, shuffle_labels=True)
    assert shuf.queries == clean.queries and shuf.answers == clean.answers
    assert torch.equal(shuf.answer_ids, clean.answer_ids)
    for r in range(len(shuf)):
        xs = [x for x, _ in shuf.demos[r]]
        assert xs == [x for x, _ in clean.demos[r]]
        shown = [y for _, y in shuf.demos[r]]
        assert sorted(shown) == sorted(y for _, y in clean.demos[r])
        assert all(y != lookup[x] for x, y in shuf.demos[r])  # a derangement: no demo is right
    # outputs repeat in country_continent: still no demo keeps its own position
    cont = icl_prompts(model, "country_continent", n_prompts=8, n_shots=4, seed=4, shuffle_labels=True)
    base = icl_prompts(model, "country_continent", n_prompts=8, n_shots=4, seed=4)
    for r in range(8):
        assert sorted(y for _, y in cont.demos[r]) == sorted(y for _, y in base.demos[r])
    one = icl_prompts(model, task, n_prompts=3, n_shots=1, seed=4, shuffle_labels=True)
    assert one.demos == icl_prompts(model, task, n_prompts=3, n_shots=1, seed=4).demos  # nothing to permute


# ------------------------------------------------------------------------------------------------
# splits and determinism


@pytest.mark.parametrize("split", ["test", "dev", "train"])
def test_splits_respected_and_query_never_a_demo(word_model, split):
    task = load_task("antonym")
    train = set(task.split("train"))
    where = set(task.split(split))
    batch = icl_prompts(word_model, task, n_prompts=30, n_shots=6, seed=5, split=split)
    for r in range(len(batch)):
        assert (batch.queries[r], batch.answers[r]) in where
        assert set(batch.demos[r]) <= train and len(set(batch.demos[r])) == 6
        assert batch.queries[r] not in {x for x, _ in batch.demos[r]}
    # queries cycle through the split evenly when n_prompts exceeds it
    counts = {q: batch.queries.count(q) for q in set(batch.queries)}
    assert len(counts) == min(30, len(where)) and max(counts.values()) - min(counts.values()) <= 1


def test_determinism_and_prefix_properties(word_model):
    torch_state, np_state = torch.get_rng_state(), np.random.get_state()
    a = icl_prompts(word_model, "antonym", n_prompts=9, n_shots=4, seed=7)
    b = icl_prompts(word_model, "antonym", n_prompts=9, n_shots=4, seed=7)
    assert torch.equal(torch.get_rng_state(), torch_state)
    assert all(np.array_equal(x, y) for x, y in zip(np.random.get_state(), np_state))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_class, b.token_class) and a.texts == b.texts
    c = icl_prompts(word_model, "antonym", n_prompts=9, n_shots=4, seed=8)
    assert c.texts != a.texts
    # prompt i does not depend on n_prompts; demos of k shots are a prefix of those of n > k shots
    short = icl_prompts(word_model, "antonym", n_prompts=4, n_shots=4, seed=7)
    assert short.texts == a.texts[:4]
    fewer = icl_prompts(word_model, "antonym", n_prompts=9, n_shots=2, seed=7)
    assert all(f == d[:2] for f, d in zip(fewer.demos, a.demos))


def test_explicit_queries(model):
    batch = icl_prompts(model, "country_capital", n_shots=2, queries=["France", ("Japan", "Tokyo")])
    assert batch.queries == ("France", "Japan") and batch.answers == ("Paris", "Tokyo")
    assert all(q not in {x for x, _ in d} for q, d in zip(batch.queries, batch.demos))
    with pytest.raises(ValueError, match=r"query 'france' is not an input of task 'country_capital': did you mean 'France'"):
        icl_prompts(model, "country_capital", n_shots=2, queries=["france"])


def test_word_separator(word_model):
    """A word separator is only refused when it is a whole word of the data ('paris' contains 'is')."""
    batch = icl_prompts(word_model, "country_capital", n_shots=1, seed=0, queries=["France"])
    other = icl_prompts(word_model, "country_capital", n_shots=1, seed=0, queries=["France"], separator="is")
    assert other.texts[0] == batch.texts[0].replace("→", "is")
    assert other.token_class[0].tolist() == batch.token_class[0].tolist()
    with pytest.raises(ValueError, match=r"contain the separator 'Paris' \(first: 'Paris'\).*another separator"):
        icl_prompts(word_model, "country_capital", n_shots=1, queries=[("France", "Paris")], separator="Paris")


def test_tokenizer_only(word_model):
    """The organism trainer builds prompts before a TransformerLens model exists."""
    a = icl_prompts(word_model.tokenizer, "antonym", n_prompts=3, n_shots=2, seed=0)
    b = icl_prompts(word_model, "antonym", n_prompts=3, n_shots=2, seed=0)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.token_class, b.token_class)


# ------------------------------------------------------------------------------------------------
# the PromptBatch container


def test_prompt_batch_container(word_model):
    batch = icl_prompts(word_model, "country_capital", n_prompts=7, n_shots=3, seed=0, dummy_query=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        batch.tokens = batch.tokens  # type: ignore[misc]
    moved = batch.to("cpu")
    assert moved is not batch and torch.equal(moved.tokens, batch.tokens)
    parts = list(batch.chunks(3))
    assert [len(p) for p in parts] == [3, 3, 1]
    assert [len(p) for p in batch.chunks(np.int64(4))] == [4, 3]  # a numpy int is an int
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(batch.chunks(0))
    with pytest.raises(TypeError, match="batch_size must be an int"):
        next(batch.chunks(2.5))
    assert torch.equal(torch.cat([p.tokens for p in parts]), batch.tokens)
    assert sum((p.real_queries for p in parts), ()) == batch.real_queries
    assert batch[2:4].texts == batch.texts[2:4] and batch.slice(2, 4).demos == batch.demos[2:4]
    sel = batch.select(torch.tensor([True, False, True, False, False, False, True]))
    assert sel.queries == tuple(batch.queries[i] for i in (0, 2, 6))
    assert sel.real_answers == tuple(batch.real_answers[i] for i in (0, 2, 6))
    t = batch.select([1]).trimmed()
    assert bool(t.attention_mask.all()) and t.token_class[0, -1] == TokenClass.FINAL_SEP
    assert batch.separator_index == -1 and "country_capital" in repr(batch)
    with pytest.raises(ValueError):
        dataclasses.replace(batch, queries=batch.queries[:2])


def test_every_batch_takes_rows_alike(word_model):
    """Text, context and canvas batches take rows by number, negative number or boolean mask alike, and slice
    every per-row field (tensors along their first axis, tuples) with them; a row out of range names the range."""
    from tvlens.inputs.canvas import canvases
    from tvlens.inputs.text import context_prompts

    batches = [icl_prompts(word_model, "country_capital", n_prompts=5, n_shots=2, seed=0, dummy_query=True),
               context_prompts(word_model, "country_capital", n_prompts=5, n_shots=2, seed=0),
               canvases("hflip", 5, seed=0)]
    for batch in batches:
        ways = [batch.select([0, 3, 4]), batch.select([0, -2, -1]), batch.select(torch.tensor([1, 0, 0, 1, 1], dtype=torch.bool)),
                batch.select([True, False, False, True, True]), batch.select(np.array([0, 3, 4]))]
        for got in ways:
            assert len(got) == 3
            for f in dataclasses.fields(batch):
                v, w = getattr(batch, f.name), getattr(got, f.name)
                if isinstance(v, torch.Tensor):
                    assert torch.equal(w, v[[0, 3, 4]]), (type(batch).__name__, f.name)
                elif isinstance(v, tuple) and v:
                    assert w == tuple(v[i] for i in (0, 3, 4)), (type(batch).__name__, f.name)
                else:
                    assert w == v, (type(batch).__name__, f.name)
        with pytest.raises(IndexError, match="takes rows -5..4"):
            batch.select([5])


# ------------------------------------------------------------------------------------------------
# bad input: clear errors before any work


@pytest.mark.parametrize(
    "kw,exc,pattern",
    [
        (dict(task="capitol_country"), (KeyError, ValueError), r"capital_country"),
        (dict(task=42), TypeError, r"task name or a tvlens Task"),
        (dict(n_prompts=0), ValueError, r"n_prompts must be >= 1"),
        (dict(n_prompts=2.5), TypeError, r"n_prompts must be an int"),
        (dict(n_shots=-1), ValueError, r"n_shots must be >= 0"),
        (dict(n_shots="3"), TypeError, r"n_shots must be an int"),
        (dict(seed=-1), ValueError, r"seed"),
        (dict(task=HAND, n_shots=4), ValueError, r"3 distinct inputs.*use n_shots <= 3"),
        (dict(task=HAND, n_shots=3, dummy_query=True), ValueError, r"\+1 for the dummy query.*use n_shots <= 2"),
        (dict(task=Task("one", "custom", "x.", (("a", "b"),)), n_shots=0), ValueError, r"'test' split .* is empty"),
        (dict(n_shots=40), ValueError, r"n_ctx=64; at most \d+ shots fit.*n_shots <="),
        (dict(separator="to be"), ValueError, r"the separator 'to be' is 2 tokens \[.*\] in context \(tokens "
                                             r"seen: .*\); it must be one token.*one token of its own in this context, such as '→'"),
        (dict(separator=" →"), ValueError, r"surrounding spaces"),
        (dict(separator="⇒"), ValueError, r"the separator '⇒' is not in this tokenizer's vocabulary.*such as '→'"),
        (dict(separator=None), TypeError, r"separator and example_sep must be strings"),
        (dict(example_sep="|"), ValueError, r"spans a demonstration output, the example separator and a demonstration "
                                            r"input.*tokens seen: .*such as '\\n'"),
        (dict(example_sep="\n "), ValueError, r"must not end with a space"),
        (dict(instruction="only"), ValueError, r"pass n_shots=0"),
        (dict(instruction="yes"), ValueError, r"False, True or 'only'"),
        (dict(split="val"), ValueError, r"'train', 'dev', 'test'"),
        (dict(queries=["atlantis"]), ValueError, r"not an input of task.*\(input, output\) pairs"),
        (dict(queries=[("zyzzyva", "qux")]), ValueError, r"not in this tokenizer's vocabulary.*zyzzyva"),
        (dict(queries="France"), TypeError, r"list of input strings"),
        (dict(queries=["France", "Spain"], n_prompts=3), ValueError, r"leave n_prompts out"),
        (dict(dummy_query=1), TypeError, r"dummy_query must be True or False"),
    ],
)
def test_bad_input(word_model, kw, exc, pattern):
    args = dict(task="country_capital", n_prompts=2, n_shots=2)
    args.update(kw)
    if "queries" in kw and "n_prompts" not in kw:
        args.pop("n_prompts")
    task = args.pop("task")
    with pytest.raises(exc, match=pattern):
        icl_prompts(word_model, task, **args)


def test_n_ctx_message_is_exact(word_model):
    with pytest.raises(ValueError, match=r"at most (\d+) shots fit") as e:
        icl_prompts(word_model, "antonym", n_prompts=5, n_shots=30, seed=0)
    k = int(re.search(r"at most (\d+) shots fit", str(e.value)).group(1))
    assert 0 < k < 30
    ok = icl_prompts(word_model, "antonym", n_prompts=5, n_shots=k, seed=0)
    assert ok.tokens.shape[1] <= LLAMA_N_CTX
    with pytest.raises(ValueError, match="shots fit"):
        icl_prompts(word_model, "antonym", n_prompts=5, n_shots=k + 1, seed=0)


def test_bad_separator_bpe_suggests_single_tokens(bpe_model):
    with pytest.raises(ValueError, match=r"the separator '⇒' is \d+ tokens \[.*\] in context \(tokens seen: \[") as e:
        icl_prompts(bpe_model, "antonym", n_prompts=2, n_shots=1, separator="⇒")
    assert "'→'" in str(e.value)  # the default, which this BPE learned as one token, is suggested


# ------------------------------------------------------------------------------------------------
# evaluation agrees with an independent one-prompt-at-a-time greedy loop


def _reference(model, batch: PromptBatch):
    """Unpadded, one prompt at a time, plain model(tokens), explicit greedy decoding."""
    first, full, last = [], [], []
    with torch.no_grad():
        for r in range(len(batch)):
            ids = torch.tensor([_row_ids(batch, r, bos=True)])
            gen = []
            for _ in range(len(batch.answer_tokens[r])):
                logits = model(ids)[0, -1]
                if not gen:
                    last.append(logits.float())
                nxt = int(logits.argmax())
                gen.append(nxt)
                ids = torch.cat([ids, torch.tensor([[nxt]])], 1)
            first.append(gen[0] == batch.answer_tokens[r][0])
            full.append(tuple(gen) == batch.answer_tokens[r])
    return torch.tensor(first), torch.tensor(full), torch.stack(last)


def _greedy_tokens(model, batch: PromptBatch, n_tokens: int) -> list[list[int]]:
    """The model's own greedy continuation of each prompt (unpadded, one at a time)."""
    out = []
    with torch.no_grad():
        for r in range(len(batch)):
            ids = torch.tensor([_row_ids(batch, r, bos=True)])
            gen = []
            for _ in range(n_tokens):
                gen.append(int(model(ids)[0, -1].argmax()))
                ids = torch.cat([ids, torch.tensor([[gen[-1]]])], 1)
            out.append(gen)
    return out


def test_evaluate_matches_reference_loop(model):
    base = icl_prompts(model, "country_capital", n_prompts=12, n_shots=3, seed=0)
    # A random model gets ~0 right, so make every outcome occur: row r % 4 expects 0: its greedy
    # first token; 1: its greedy two tokens; 2: the greedy first token then a wrong one; 3: the real answer.
    greedy = _greedy_tokens(model, base, 2)
    answers = []
    for r, (g1, g2) in enumerate(greedy):
        answers.append([(g1,), (g1, g2), (g1, (g2 + 1) % len(model.tokenizer)), base.answer_tokens[r]][r % 4])
    batch = dataclasses.replace(base, answer_tokens=tuple(answers),
                                answer_ids=torch.tensor([a[0] for a in answers]))
    first, full, last = _reference(model, batch)
    assert first[[0, 1, 2, 4, 5, 6]].all() and full[[0, 1, 4, 5]].all() and not full[[2, 6, 10]].any()
    acc = evaluate_prompts(model, batch, batch_size=5)
    assert isinstance(acc, IclAccuracy) and acc.n == 12
    assert acc.first_token_correct.tolist() == first.tolist()
    assert acc.full_answer_correct.tolist() == full.tolist()
    assert acc.first_token == first.float().mean().item() and acc.full_answer == full.float().mean().item()
    # lower-level pieces
    logits = final_logits(model, batch, batch_size=5)
    torch.testing.assert_close(logits, last, atol=1e-4, rtol=1e-4)
    assert first_token_accuracy(logits, batch) == acc.first_token
    lp = answer_logprob(logits, batch)
    ref = last.log_softmax(-1)[torch.arange(12), batch.answer_ids]
    torch.testing.assert_close(lp, ref, atol=1e-4, rtol=1e-4)
    # the real answers of the multi-token BPE task, straight from icl_prompts
    first, full, _ = _reference(model, base)
    acc = evaluate_prompts(model, base, batch_size=7)
    assert acc.first_token_correct.tolist() == first.tolist() and acc.full_answer_correct.tolist() == full.tolist()


def test_evaluate_icl_wrapper(word_model):
    acc = evaluate_icl(word_model, "antonym", 2, n_prompts=6, seed=1, batch_size=4)
    batch = icl_prompts(word_model, "antonym", n_prompts=6, n_shots=2, seed=1)
    first, full, _ = _reference(word_model, batch)
    assert acc.n == 6 and acc.first_token_correct.tolist() == first.tolist()
    assert acc.full_answer_correct.tolist() == full.tolist()
    with pytest.raises(ValueError, match="n_prompts must be >= 1"):
        evaluate_icl(word_model, "antonym", 2, n_prompts=0)


# ------------------------------------------------------------------------------------------------
# the whole shipped suite


def test_every_suite_task_builds(tiny_llama, bpe_model):
    """Every shipped task gives well-formed prompts, with and without the instruction, on the
    suite-wide word-level tokenizer (conftest's tiny_llama) and on the small BPE."""
    for model in (tiny_llama, bpe_model):
        tok = model.tokenizer
        sep = tok.encode(" →", add_special_tokens=False)[0]
        fold = (lambda s: s.lower()) if model is tiny_llama else (lambda s: s)  # the organism's vocabulary is lowercase
        for name in tvlens.list_tasks():
            with _no_collision_warnings():
                batch = icl_prompts(model, name, n_prompts=3, n_shots=3, seed=0, instruction=True)
            assert (batch.tokens[:, -1] == sep).all(), name
            for r in range(3):
                assert tok(batch.texts[r], add_special_tokens=False)["input_ids"] == _row_ids(batch, r), (name, r)
                assert fold(tok.decode(_row_ids(batch, r))) == fold(batch.texts[r]), (name, r)
                got = [(c, fold(t)) for c, t in _runs(batch, r, tok)[1:]]
                assert got == [(c, fold(t)) for c, t in _expected_runs(batch, r, instruction=load_task(name).instruction,
                                                                       spaces=_is_bpe(model))], (name, r)


# ------------------------------------------------------------------------------------------------
# several accepted answers, clashing text, collisions


MULTI = Task(name="multi", family="custom", instruction="Say what comes next.",
             pairs=(("a", "b"), ("a", "bee"), ("c", "d"), ("e", "f"), ("g", "h"), ("i", "j"), ("i", "ii"), ("k", "l")))


def test_several_accepted_answers(bpe_model):
    batch = icl_prompts(bpe_model, MULTI, n_shots=2, seed=0, queries=["a", "c", ("i", "ii")])
    assert batch.answers == ("b", "d", "ii")
    assert batch.accepted_answers == (("b", "bee"), ("d",), ("ii", "j"))  # a given pair of the task first, then the rest
    tok = bpe_model.tokenizer
    for r in range(3):
        for a, toks in zip(batch.accepted_answers[r], batch.accepted_answer_tokens[r]):
            assert toks == tuple(tok(batch.texts[r] + " " + a, add_special_tokens=False)["input_ids"][len(_row_ids(batch, r)):])
    # demonstrations show the first listed output
    assert all(dict(d).get("i", "j") == "j" and dict(d).get("a", "b") == "b" for d in batch.demos)
    # accuracy counts any accepted answer: make the model's greedy tokens the *second* answer of row 0
    greedy = _greedy_tokens(bpe_model, batch, 3)[0]
    other = dataclasses.replace(batch, other_answers=(("mine",), (), ()), other_answer_tokens=((tuple(greedy),), (), ()))
    acc = evaluate_prompts(bpe_model, other)
    assert bool(acc.full_answer_correct[0]) and bool(acc.first_token_correct[0])
    logits = final_logits(bpe_model, other)
    assert first_token_accuracy(logits, other) >= 1 / 3
    alone = dataclasses.replace(other, other_answers=((), (), ()), other_answer_tokens=((), (), ()))
    assert not bool(evaluate_prompts(bpe_model, alone).full_answer_correct[0]) or tuple(greedy) == batch.answer_tokens[0]
    # answer_ids is the first listed answer; answer_logprob scores the best accepted one
    assert torch.equal(batch.answer_ids, torch.tensor([a[0][0] for a in batch.accepted_answer_tokens]))
    logp = logits.log_softmax(-1)
    best = [max(float(logp[r, a[0]]) for a in alts) for r, alts in enumerate(other.accepted_answer_tokens)]
    assert answer_logprob(logits, other).tolist() == pytest.approx(best, abs=1e-5)
    if greedy[0] != batch.answer_ids[0]:  # the model's own top token is likelier than the first answer
        assert float(answer_logprob(logits, other)[0]) > float(answer_logprob(logits, alone)[0])


def test_input_with_the_example_separator_has_a_fix(bpe_model):
    from pathlib import Path

    qa = Task.from_json(Path(__file__).parent / "data" / "anchors" / "todd" / "commonsense_qa_first100.json")
    with pytest.raises(ValueError, match=r"\d+ inputs/outputs of task 'commonsense_qa_first100' contain the example "
                                         r"separator '\\n' \(first: .*pass an example_sep none of them contains "
                                         r"\(example_sep='\\n\\n'\), or replace it in the data \(task = task.replace_text"):
        icl_prompts(bpe_model, qa, n_prompts=2, n_shots=2)
    for fixed, sep in ((qa, "\n\n"), (qa.replace_text("\n", " "), "\n")):
        batch = icl_prompts(bpe_model, fixed, n_prompts=2, n_shots=1, seed=0, example_sep=sep)
        for r in range(2):
            assert bpe_model.tokenizer(batch.texts[r], add_special_tokens=False)["input_ids"] == _row_ids(batch, r)
    with pytest.raises(ValueError, match=r"contain the separator '→'.*replace_text\('→'"):
        icl_prompts(bpe_model, Task("arrow", "custom", "", (("a → b", "c"), ("d", "e"), ("f", "g"))), n_shots=0,
                    queries=["a → b"])


def test_multi_token_example_sep(bpe_model):
    batch = icl_prompts(bpe_model, "antonym", n_prompts=3, n_shots=2, seed=0, example_sep="\n\n")
    tok = bpe_model.tokenizer
    for r in range(3):
        assert tok(batch.texts[r], add_special_tokens=False)["input_ids"] == _row_ids(batch, r)
        assert "\n\n".join(f"{x} → {y}" for x, y in batch.demos[r]) + f"\n\n{batch.queries[r]} →" == batch.texts[r]
        nl = batch.tokens[r][batch.positions_of(TokenClass.DEMO_NEWLINE)[r]].tolist()
        assert tok.decode(nl) == "\n\n" * 2


def test_collision_warning_names_the_pairs(word_model):
    t = Task("cities", "custom", "", (("France", "Kuwait City"), ("Japan", "Kuwait"), ("Spain", "Paris"), ("Italy", "Lima"),
                                      ("Peru", "Rome")))
    with pytest.warns(TokenCollisionWarning, match=r"task 'cities': 2 of its 5 answers share their first token .*"
                                                   r"\('Kuwait': Kuwait, Kuwait City\)"):
        icl_prompts(word_model, t, n_prompts=1, n_shots=1, split="train")
    with warnings.catch_warnings():
        warnings.simplefilter("error", TokenCollisionWarning)
        icl_prompts(word_model, "antonym", n_prompts=1, n_shots=1)  # no two antonyms start alike
        icl_prompts(word_model, t, n_prompts=1, n_shots=1, split="train")  # warned once per tokenizer and task


# ------------------------------------------------------------------------------------------------
# bring your own prompts


def test_prompts_from_text_equals_icl_prompts(model):
    from tvlens.inputs.text import prompts_from_text

    ref = icl_prompts(model, "country_capital", n_shots=2, seed=0, queries=["Japan", "Spain"])
    own = prompts_from_text(model, list(ref.texts), list(ref.answers))
    assert torch.equal(own.tokens, ref.tokens) and torch.equal(own.token_class, ref.token_class)
    assert torch.equal(own.attention_mask, ref.attention_mask) and own.answer_tokens == ref.answer_tokens
    assert own.queries == ref.queries and own.demos == ref.demos and own.n_shots == 2
    one = tvlens.prompts_from_text(model, "France → Paris\nJapan →", "Tokyo")
    assert one.texts == ("France → Paris\nJapan →",) and one.answers == ("Tokyo",) and one.demos == ((("France", "Paris"),),)
    several = prompts_from_text(model, ["Japan →"], [["Tokyo", "Paris"]])
    assert several.accepted_answers == (("Tokyo", "Paris"),) and several.n_shots == 0


@pytest.mark.parametrize("texts,answers,pattern", [
    (["France → Paris\nJapan"], ["Tokyo"], r"does not end with the separator '→'"),
    (["France Paris\nJapan →"], ["Tokyo"], r"line 1 \('France Paris'\) is not 'input → output'"),
    (["Japan →"], ["Tokyo", "Rome"], r"1 texts but 2 answers"),
    ([], [], r"texts is empty"),
    (["Japan →"], [""], r"answer 0 is ''"),
])
def test_prompts_from_text_bad_input(word_model, texts, answers, pattern):
    from tvlens.inputs.text import prompts_from_text

    with pytest.raises(ValueError, match=pattern):
        prompts_from_text(word_model, texts, answers)
