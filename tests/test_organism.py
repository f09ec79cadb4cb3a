"""The model organism: tokenizer, training script (micro config, seconds) and shipped checkpoints."""

from __future__ import annotations

import json

import pytest
import torch

from tvlens.organisms.text import train as T
from tvlens.organisms.text.tokenizer import build_tokenizer, default_organism_tokenizer, words_of


# ---------------------------------------------------------------------------------------------
# tokenizer


def test_tokenizer_round_trip_keeps_newline_and_separator():
    tok = build_tokenizer(["france paris japan tokyo", "india new delhi", "Give the capital city of the country."])
    text = "france → paris\njapan →"
    ids = tok(text)["input_ids"]
    assert tok.convert_ids_to_tokens(ids) == ["<bos>", "france", "→", "paris", "\n", "japan", "→"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    # multi-word answers are several tokens; "→" and "\n" are split off even without spaces
    assert tok.convert_ids_to_tokens(tok("india→new delhi\n", add_special_tokens=False)["input_ids"]) == [
        "india", "→", "new", "delhi", "\n"]
    assert tok.decode(tok("\nfrance → paris\n\n", add_special_tokens=False)["input_ids"]) == "\nfrance → paris\n\n"
    assert tok.convert_ids_to_tokens(tok("narnia", add_special_tokens=False)["input_ids"]) == ["<unk>"]
    assert words_of("a b\nc→d") == ["a", "b", "\n", "c", "→", "d"]


def test_tokenizer_saves_and_reloads(tmp_path):
    from transformers import AutoTokenizer

    tok = build_tokenizer(["france paris"])
    tok.save_pretrained(tmp_path)
    tok2 = AutoTokenizer.from_pretrained(tmp_path)
    text = "france → paris\nfrance →"
    assert tok2(text)["input_ids"] == tok(text)["input_ids"]
    assert tok2.decode(tok2(text)["input_ids"], skip_special_tokens=True) == text
    assert tok2.padding_side == "left" and tok2.pad_token == "<pad>" and tok2.bos_token == "<bos>"


def test_default_tokenizer_covers_the_suite():
    from tvlens.tasks import list_tasks, load_task

    tok = default_organism_tokenizer()
    unk = tok.unk_token_id
    for name in list_tasks():
        t = load_task(name)
        text = "\n".join(f"{x} → {y}" for x, y in t.pairs) + "\n" + t.instruction
        assert unk not in tok(text, add_special_tokens=False)["input_ids"], name


def test_one_step_per_capital_normalizes_as_one_step_per_word():
    """The shipped case rule (one alternation per capital) gives every text what one Replace step per
    capital of each protected word, in word order, gives (an independent construction of the parking
    steps), on the suite's words in every case, glued to separators and newlines."""
    import random
    import re

    from tokenizers import Regex, normalizers

    from tvlens.models import organism_path
    from tvlens.organisms.text.tokenizer import (SEPARATOR, _parked, _phrase_steps, organism_lower_phrases,
                                                 organism_vocabulary)
    from tvlens.tasks import list_tasks, load_task

    tasks = [load_task(n) for n in list_tasks()]
    words = sorted({w for w in organism_vocabulary(tasks) if w != w.lower()})
    steps = _phrase_steps(words, organism_lower_phrases(tasks))
    for w in words:
        lit = lambda s: "".join(f"[{re.escape(c)}{_parked(c)}]" if c != c.lower() else re.escape(c) for c in s)  # noqa: E731
        for i, c in enumerate(w):
            if c != c.lower():
                pre, post = lit(w[:i]), lit(w[i + 1:])
                steps.append(normalizers.Replace(Regex(f"(?<=^{pre}|\\s{pre}|{SEPARATOR}{pre})" + re.escape(c)
                                                       + f"(?={post}(?:$|\\s|{SEPARATOR}))"), _parked(c)))
    steps.append(normalizers.Lowercase())
    steps += [normalizers.Replace(_parked(c), c) for c in sorted({c for w in words for c in w if c != c.lower()})]
    by_word = normalizers.Sequence(steps)
    built = default_organism_tokenizer()._tokenizer
    shipped = built.normalizer
    rule = json.loads(built.to_str())["normalizer"]
    for name in ("organism", "organism-natural", "organism-vlm"):  # the checkpoints carry the rule built here
        on_disk = json.loads((organism_path(name) / "tokenizer.json").read_text(encoding="utf-8"))["normalizer"]
        assert on_disk == rule, name
    rng = random.Random(0)
    vocab = sorted({w for t in tasks for x, y in t.pairs for w in (*x.split(), *y.split())})
    texts = list(organism_lower_phrases(tasks)) + [" ".join(vocab[i:i + 7]) for i in range(0, len(vocab), 7)]
    for _ in range(3000):
        ws = [rng.choice([w, w.upper(), w.lower(), w.capitalize()]) for w in rng.choices(vocab, k=rng.randint(1, 5))]
        texts.append("".join(w + rng.choice([" ", " → ", "\n", "→", "  "]) for w in ws))
    for text in texts:
        assert shipped.normalize_str(text) == by_word.normalize_str(text), text


def test_one_split_pieces_text_as_isolating_then_splitting():
    """The shipped pre-tokenizer (one Split that keeps newlines, arrows and words) pieces every text as
    the two-pass construction does (isolate ``\\n`` and ``→``, then remove runs of ``[^\\S\\n]``):
    every character below U+3100 and the other white space, alone and among words, arrows and
    newlines; and every shipped tokenizer.json carries the one-pass rule."""
    import random

    from tokenizers import Regex, pre_tokenizers

    from tvlens.models import organism_path
    from tvlens.organisms.text.tokenizer import pre_tokenizer

    two_pass = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex("\n|→"), behavior="isolated"),
                                        pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed")])
    one_pass = pre_tokenizer()
    chars = [chr(c) for c in (*range(0x3100), 0x3000, 0x205F, 0x202F, 0x180E, 0x200B, 0xFEFF, 0x1F600)]
    texts = [f"a{c}b {c}{c}\n{c}→{c}" for c in chars]
    rng = random.Random(0)
    pool = ["word", "Fe", "→", "\n", " ", "\t", "\u00a0", "\u2003", "\r\n", "é"]
    texts += ["".join(rng.choices(pool, k=rng.randint(0, 12))) for _ in range(3000)]
    for text in texts:
        assert one_pass.pre_tokenize_str(text) == two_pass.pre_tokenize_str(text), repr(text)
    rule = json.loads(default_organism_tokenizer()._tokenizer.to_str())["pre_tokenizer"]
    for name in ("organism", "organism-natural", "organism-vlm"):
        on_disk = json.loads((organism_path(name) / "tokenizer.json").read_text(encoding="utf-8"))["pre_tokenizer"]
        assert on_disk == rule, name


# ---------------------------------------------------------------------------------------------
# training script (micro config: seconds)


def _state(model):
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}  # train() uses CUDA when present


def test_sampler_builds_the_tvlens_prompt_format():
    import random

    from tvlens.tasks import load_task

    tok = default_organism_tokenizer()
    task = load_task("country_capital")
    s = T.EpisodeSampler([task], tok, T.TrainConfig(p_instruction=0.0, p_instruction_only=0.0))
    b = s.batch(random.Random(0), 4)
    facts = {x.lower(): y.lower() for x, y in task.pairs}  # the organism's vocabulary is lowercase here
    for r in range(4):
        row = b.tokens[r][b.tokens[r] != tok.pad_token_id].tolist()
        text = tok.decode(row, skip_special_tokens=True)
        lines = text.split("\n")
        assert row[0] == tok.bos_token_id
        assert len(lines) == b.n_shots[r] + 1
        for line in lines:
            x, y = line.split(" → ")
            assert facts[x] == y
        # the final separator is the query's →, and it predicts the answer's first token
        assert b.tokens[r, b.final_sep[r]].item() == tok.convert_tokens_to_ids("→")
        assert b.targets[r, b.final_sep[r]].item() == tok.convert_tokens_to_ids(lines[-1].split(" → ")[1].split()[0])
        # loss on every answer token of every shot, nothing else
        n_answer_tokens = sum(len(line.split(" → ")[1].split()) for line in lines)
        assert int((b.targets[r] != -100).sum()) == n_answer_tokens


def test_micro_training_runs_and_is_deterministic(tmp_path):
    out = tmp_path / "micro"
    assert T.main(["--out", str(out), "--micro", "--quiet", "--seed", "3"]) == 0
    assert (out / "model.safetensors").exists() and (out / "tokenizer.json").exists()
    log = json.loads((out / "training_log.json").read_text())
    assert log["final_step"] == T.MICRO.icl_steps + T.MICRO.extra_steps
    assert any("tvp_loss" in s for s in log["steps"])  # the TVP phase ran
    cfg = T.MICRO.__class__(**{**T.MICRO.__dict__, "seed": 3})
    m1, _ = T.train(cfg, None, micro=True, verbose=False)
    m2, _ = T.train(cfg, None, micro=True, verbose=False)
    s1, s2 = _state(m1), _state(m2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    # the saved checkpoint is the same run
    from safetensors.torch import load_file

    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], s1[k]) for k in saved)
    m3, _ = T.train(T.MICRO.__class__(**{**T.MICRO.__dict__, "seed": 4}), None, micro=True, verbose=False)
    assert not torch.equal(_state(m3)["model.embed_tokens.weight"], s1["model.embed_tokens.weight"])


def test_phase1_snapshot_resume_is_bit_identical(tmp_path):
    snap = tmp_path / "phase1.pt"
    natural = T.MICRO.__class__(**{**T.MICRO.__dict__, "tvp_layer": None})
    straight, _ = T.train(natural, None, micro=True, verbose=False, snapshot=snap)
    resumed, log = T.train(natural, None, micro=True, verbose=False, resume=snap)
    a, b = _state(straight), _state(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert log["resumed_from"] == str(snap)
    # a snapshot of another phase-1 configuration is refused
    other = T.MICRO.__class__(**{**T.MICRO.__dict__, "seed": 9})
    with pytest.raises(ValueError, match="different phase-1"):
        T.train(other, None, micro=True, verbose=False, resume=snap)


def test_bad_tvp_layer_is_refused():
    cfg = T.MICRO.__class__(**{**T.MICRO.__dict__, "tvp_layer": 7})
    with pytest.raises(ValueError, match="out of range"):
        T.train(cfg, None, micro=True, verbose=False)


# ---------------------------------------------------------------------------------------------
# shipped checkpoints

# A fixed sample across the four families, to catch a broken or untrained checkpoint. It includes the
# relation tasks that are hardest to tell apart from the demonstrations (successor vs predecessor, next vs
# previous letter, swap case) and tasks that share a domain with them.
SAMPLE_TASKS = ("country_capital", "country_currency", "english_french", "french_spanish", "antonym", "past_tense",
                "successor", "predecessor", "next_letter", "previous_letter", "swap_case", "first_letter")


@pytest.mark.parametrize("name", ["organism", "organism-natural"])
def test_shipped_organism_does_icl(name):
    from tvlens.models import load_model, organism_path
    from tvlens.inputs.text import evaluate_icl

    if not (organism_path(name) / "model.safetensors").exists():
        pytest.skip(f"{name} checkpoint not shipped yet")
    torch.set_num_threads(1)
    model = load_model(name, device="cpu")
    assert model.cfg.n_layers >= 4 and model.cfg.n_heads >= 8
    five = [evaluate_icl(model, t, 5, n_prompts=12, seed=0).first_token for t in SAMPLE_TASKS]
    zero = [evaluate_icl(model, t, 0, n_prompts=12, seed=0).first_token for t in SAMPLE_TASKS]
    mean5, mean0 = sum(five) / len(five), sum(zero) / len(zero)
    assert mean5 >= 0.9, dict(zip(SAMPLE_TASKS, five))
    assert min(five) >= 0.5, dict(zip(SAMPLE_TASKS, five))  # no sampled task is left unlearned
    assert mean0 < mean5 - 0.3, (mean0, mean5)


def test_shipped_organism_has_task_vectors_at_its_tvp_layer():
    """The ground truth `organism` was trained to have: Hendel task vectors at L* = 2 (mean over
    dummy-query five-shot prompts) that carry the task, not a generic 'answer now' signal."""
    from tvlens.hooks import act_name
    from tvlens.models import load_model, organism_path
    from tvlens.organisms.text.check import _first_token_acc, _replace_hook, _separator_states
    from tvlens.inputs.text import icl_prompts

    if not (organism_path("organism") / "model.safetensors").exists():
        pytest.skip("organism checkpoint not shipped yet")
    log = json.loads((organism_path("organism") / "training_log.json").read_text())
    layer = log["config"]["tvp_layer"]
    assert layer == 2
    torch.set_num_threads(1)
    model = load_model("organism", device="cpu")
    name = act_name("resid_pre", layer)

    def vector(task):
        dummy = icl_prompts(model, task, n_prompts=20, n_shots=5, seed=1, dummy_query=True)
        return _separator_states(model, dummy)[layer].mean(0)

    own = {}
    for task in ("country_capital", "english_french", "antonym"):
        zs = icl_prompts(model, task, n_prompts=12, n_shots=0, seed=2)
        own[task] = _first_token_acc(model, zs, [(name, _replace_hook(vector(task)))])
    assert sum(own.values()) / len(own) >= 0.8, own
    # country_capital's vector on country_currency's queries answers capitals, not currencies
    zs = icl_prompts(model, "country_currency", n_prompts=12, n_shots=0, seed=2)
    cross = _first_token_acc(model, zs, [(name, _replace_hook(vector("country_capital")))])
    assert cross <= 0.2, cross
