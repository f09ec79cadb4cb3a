"""Real vocabularies on tiny random models of their real architectures.

GPT-2 byte-level BPE (GPT-2), SentencePiece 32k with byte fallback (Llama-2 / Mistral family, on a
Llama), Llama-3 (on a Llama) and Qwen3 (on a Qwen3), each a random 2-layer, ``d_model`` 64 model
of the real vocabulary size saved with ``save_pretrained`` and loaded with ``tvlens.load_model``
(see ``real_vocab.py``). On each: prompts are the whole text's tokens and every part is what the
same text gives in context; answers carry the vocabulary's leading-space form; every CLI command
and the README's notebook calls run.
"""

from __future__ import annotations

import re
import warnings

import pytest
import torch

import tvlens
from tvlens.cli import build_parser, main
from tvlens.inputs.text import TokenClass, TokenCollisionWarning, answer_token_stats, icl_prompts

from real_vocab import DATA, SPACE_MARK, VOCABULARIES, session_models

pytestmark = pytest.mark.skipif(not DATA.is_dir(), reason="tests/data/tokenizers (the real vocabularies) is absent")

NAMES = tuple(VOCABULARIES)
#: knowledge with multi-token proper nouns, numbers, letters, accented translations, a word list
TASKS = ("country_capital", "add_ten", "swap_case", "english_german", "list_last", "state_capital")
VARIANTS = (dict(n_shots=3), dict(n_shots=2, instruction=True), dict(n_shots=0, instruction="only"),
            dict(n_shots=2, dummy_query=True))


@pytest.fixture(scope="session")
def tokenizers(tmp_path_factory):
    return session_models(tmp_path_factory)[0]


@pytest.fixture(scope="session")
def vocab_dirs(tmp_path_factory):
    return session_models(tmp_path_factory)[1]


@pytest.fixture(scope="session")
def vocab_models(tmp_path_factory):
    return session_models(tmp_path_factory)[2]


def _row(batch, r: int) -> list[int]:
    keep = batch.attention_mask[r].bool() & (batch.token_class[r] != TokenClass.BOS)
    return batch.tokens[r][keep].tolist()


def _parts(batch, r: int) -> list[tuple[int, str]]:
    """The prompt's parts in order, as (class, text) with the space in front of each, from the batch's own fields."""
    sep = batch.options["separator"]
    parts = []
    if batch.options["instruction"]:
        parts.append((TokenClass.INSTRUCTION, batch.texts[r].split("\n", 1)[0] + "\n"))
    for x, y in batch.demos[r]:
        parts += [(TokenClass.DEMO_INPUT, x), (TokenClass.DEMO_SEP, " " + sep), (TokenClass.DEMO_OUTPUT, " " + y),
                  (TokenClass.DEMO_NEWLINE, batch.options["example_sep"])]
    parts += [(TokenClass.QUERY_INPUT, batch.queries[r]), (TokenClass.FINAL_SEP, " " + sep)]
    return parts


@pytest.mark.parametrize("name", NAMES)
def test_prompts_are_the_whole_text_and_each_part_tokenizes_in_context(name, tokenizers):
    """Row tokens == tokenizer(whole text); and growing the text part by part, each part adds exactly
    the tokens its class marks (per-piece in context == whole text)."""
    tok = tokenizers[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenCollisionWarning)
        for task in TASKS:
            for kw in VARIANTS:
                batch = icl_prompts(tok, task, n_prompts=3, seed=1, **kw)
                for r in range(len(batch)):
                    ids = _row(batch, r)
                    text = batch.texts[r]
                    assert tok(text, add_special_tokens=False)["input_ids"] == ids, (task, kw, r)
                    parts = _parts(batch, r)
                    assert "".join(p for _, p in parts) == text
                    prefixes = ["".join(p for _, p in parts[: k + 1]) for k in range(len(parts))]
                    enc = tok(prefixes, add_special_tokens=False)["input_ids"]
                    cls = batch.token_class[r][batch.attention_mask[r].bool()].tolist()
                    cls = cls[1:] if cls[0] == TokenClass.BOS else cls
                    done = 0
                    for (c, _), e in zip(parts, enc):
                        assert e[:done] == ids[:done], (task, kw, r, c)  # the prefix tokenizes as in the whole text
                        assert set(cls[done:len(e)]) == {c}, (task, kw, r, c, tok.convert_ids_to_tokens(e[done:]))
                        done = len(e)
                    assert done == len(ids)
                    # the final separator is one token, the last
                    assert cls[-1] == TokenClass.FINAL_SEP and cls.count(TokenClass.FINAL_SEP) == 1


@pytest.mark.parametrize("name", NAMES)
def test_batch_tokenization_and_class_assignment_equal_the_row_by_row_path(name, tokenizers):
    """The Rust tokenizer called directly == the HF call (ids and offsets), and the numpy assignment of
    token classes over a whole batch == the row-by-row one, on every prompt variant."""
    from tvlens.inputs import text as T

    tok = tokenizers[name]
    for task in TASKS:
        for kw in VARIANTS:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TokenCollisionWarning)
                batch = icl_prompts(tok, task, n_prompts=4, seed=2, **kw)
            texts = list(batch.texts)
            ids, offs = T._encode_texts(tok, texts)
            enc = tok(texts, add_special_tokens=False, return_offsets_mapping=True)
            assert ids == enc["input_ids"] and [list(map(tuple, o)) for o in enc["offset_mapping"]] == [list(o) for o in offs]
            layouts = [_layout_of(batch, r) for r in range(len(batch))]
            fast = T._assign_all(layouts, offs)
            slow = T._assign_each(tok, layouts, ids, offs, "test", batch.options["separator"],
                                  {"separator": str, "example_sep": str, "": ""})
            assert fast == slow, (task, kw)



@pytest.mark.parametrize("name", NAMES)
def test_context_prompts_are_the_icl_prompts_without_their_answers(name, tokenizers):
    """What task vectors read (context_prompts) is exactly what icl_prompts builds for the same
    arguments: tokens, mask, classes, texts, demos, the query shown and the options."""
    from tvlens.inputs.text import context_prompts

    tok = tokenizers[name]
    for task in TASKS:
        for dummy in (True, False):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", TokenCollisionWarning)
                full = icl_prompts(tok, task, n_prompts=5, n_shots=2, seed=4, dummy_query=dummy)
            ctx = context_prompts(tok, task, n_prompts=5, n_shots=2, seed=4, dummy_query=dummy)
            for f in ("tokens", "attention_mask", "token_class"):
                assert torch.equal(getattr(ctx, f), getattr(full, f)), (task, dummy, f)
            assert (ctx.texts, ctx.demos, ctx.queries, dict(ctx.options)) == (
                full.texts, full.demos, full.queries, dict(full.options)), (task, dummy)
            assert len(ctx) == len(full) == 5 and not hasattr(ctx, "answer_ids")
            # rows taken as from the full batch: the same rows, fields aligned
            part, ref = ctx.select([3, 1]), full.select([3, 1])
            assert torch.equal(part.tokens, ref.tokens) and (part.texts, part.queries, part.demos) == (
                ref.texts, ref.queries, ref.demos)
            assert torch.equal(ctx[1:4].token_class, full[1:4].token_class) and repr(ctx).startswith("ContextPrompts(")

def _layout_of(batch, r: int):
    """Row ``r``'s text as parts of their classes (a space before a separator or an output is a gap)."""
    from tvlens.inputs import text as T

    parts = []
    for c, p in _parts(batch, r):
        if p.startswith(" ") and c in (TokenClass.DEMO_SEP, TokenClass.DEMO_OUTPUT, TokenClass.FINAL_SEP):
            parts += [(" ", None, -1), (p[1:], c, -1)]
        else:
            parts.append((p, c, -1))
    return T._Layout.of(parts)


@pytest.mark.parametrize("name", NAMES)
def test_answers_carry_the_leading_space_form(name, tokenizers):
    tok = tokenizers[name]
    mark = SPACE_MARK[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenCollisionWarning)
        for task in TASKS:
            batch = icl_prompts(tok, task, n_prompts=6, n_shots=2, seed=0)
            for r in range(len(batch)):
                first = tok.convert_ids_to_tokens([batch.answer_tokens[r][0]])[0]
                assert first.startswith(mark), (task, batch.answers[r], first)
                full = tok(batch.texts[r] + " " + batch.answers[r], add_special_tokens=False)["input_ids"]
                assert tuple(full[len(_row(batch, r)):]) == batch.answer_tokens[r]
                assert batch.answer_ids[r] == batch.answer_tokens[r][0]


def test_sentencepiece_newline_is_checked_in_context(tokenizers):
    """'\\n' alone is ['▁', '<0x0A>'] in SentencePiece, inside text it is one token: no false refusal."""
    tok = tokenizers["sentencepiece-32k"]
    assert tok.convert_ids_to_tokens(tok("\n", add_special_tokens=False)["input_ids"]) == ["▁", "<0x0A>"]
    batch = icl_prompts(tok, "antonym", n_prompts=4, n_shots=3, seed=0)
    nl = batch.positions_of(TokenClass.DEMO_NEWLINE)
    assert int(nl.sum()) == 4 * 3
    assert set(tok.convert_ids_to_tokens(batch.tokens[nl].tolist())) == {"<0x0A>"}
    # and no '▁' is glued to a piece: ';' written without spaces stays ';' (the per-piece bug)
    semi = icl_prompts(tok, "antonym", n_prompts=2, n_shots=2, seed=0, example_sep=";")
    assert set(tok.convert_ids_to_tokens(semi.tokens[semi.positions_of(TokenClass.DEMO_NEWLINE)].tolist())) == {";"}
    for r in range(2):
        assert tok(semi.texts[r], add_special_tokens=False)["input_ids"] == _row(semi, r)


def test_separator_that_splits_in_context_is_refused_with_the_tokens_seen(tokenizers):
    tok = tokenizers["llama3"]
    # Llama-3 glues punctuation to the newline after it: an output ending in '.' merges with example_sep
    from tvlens.tasks import Task

    t = Task("abbrev", "custom", "", (("United States", "U.S."), ("United Kingdom", "U.K."), ("Soviet Union", "U.S.S.R."),
                                      ("European Union", "E.U."), ("Ivory Coast", "C.I.")))
    with pytest.raises(ValueError, match=r"spans a demonstration output and the example separator.*tokens seen: .*'\.Ċ'.*"
                                         r"example_sep that stays apart from the words around it in this context, such as") as e:
        icl_prompts(tok, t, n_prompts=1, n_shots=1, seed=0, split="train")
    # the suggested fix works
    fix = re.search(r"such as '([^']*)'", str(e.value)).group(1).encode().decode("unicode_escape")
    assert icl_prompts(tok, t, n_prompts=1, n_shots=1, seed=0, split="train", example_sep=fix).n_shots == 1
    # a separator that is several tokens in context names them
    with pytest.raises(ValueError, match=r"the separator '⇏' is \d+ tokens \[.*\] in context \(tokens seen:"):
        icl_prompts(tokenizers["gpt2"], "antonym", n_prompts=1, n_shots=1, separator="⇏")


def test_single_token_answers_and_collisions_per_vocabulary(tokenizers, monkeypatch):
    """Natural case: most proper-noun answers are one token (issue measured 9-27% lowercase), and the
    collision warning names the colliding answers."""
    stats = {n: {r["task"]: r for r in answer_token_stats(tokenizers[n], ["country_capital", "country_continent"])}
             for n in NAMES}
    for n in ("gpt2", "llama3", "qwen3"):
        assert stats[n]["country_capital"]["single_token"] >= 0.5, (n, stats[n]["country_capital"])
    assert stats["gpt2"]["country_capital"]["colliding"] < 13  # lowercase data: 13 of 69 collided on GPT-2
    monkeypatch.setattr("tvlens.inputs.text._WARNED", set())  # warned once per process: forget earlier tests
    with pytest.warns(TokenCollisionWarning, match=r"task 'country_capital': \d+ of its 69 answers share their first "
                                                   r"token with another answer on this tokenizer \('▁C': Cairo, Copenhagen"):
        icl_prompts(tokenizers["sentencepiece-32k"], "country_capital", n_prompts=2, n_shots=1)


# ----------------------------------------------------------------------------------------------
# every CLI command and the README's calls, on each tiny model


@pytest.fixture()
def cached_load(monkeypatch, vocab_models, vocab_dirs):
    """The CLI loads by path; hand it the session's models (load_model itself is tested once per vocabulary)."""
    import tvlens.models as M

    by_path = {str(d): vocab_models[n] for n, d in vocab_dirs.items()}
    real = M.load_model

    def load(name, **kw):
        return by_path.get(str(name)) or real(name, **kw)

    monkeypatch.setattr(M, "load_model", load)
    return vocab_dirs


CLI = [
    ["tasks", "--tasks", "family:algorithmic"],
    ["info", "--tasks", "country_capital", "--n-prompts", "2", "--n-shots", "2"],
    ["taskness", "--tasks", "country_capital,antonym", "--n-prompts", "2", "--n-shots", "2", "--example-sep", r"\n\n"],
    ["lens", "--tasks", "country_capital", "--n-prompts", "2", "--n-shots", "2"],
    ["sweep", "--tasks", "country_capital", "--n-prompts", "2", "--n-shots", "2"],
    ["fv", "--tasks", "antonym", "--k", "2", "--n-prompts", "2", "--n-shots", "2"],
    ["patch", "--tasks", "antonym", "--n-prompts", "2", "--n-shots", "2"],
    ["select", "--tasks", "country_capital,antonym", "--methods", "zero_shot,rho_topk,reinforce,soft", "--per", "all",
     "--steps", "1", "--samples", "2", "--k", "1", "--n-prompts", "2", "--n-shots", "2"],
    ["report", "--tasks", "country_capital,antonym", "--n-prompts", "2", "--n-shots", "2"],
    ["weights", "finetune", "--tasks", "antonym", "--steps", "1", "--n-prompts", "2", "--train-prompts", "4"],
]


@pytest.mark.parametrize("name", NAMES)
def test_every_cli_command_runs(name, cached_load, tmp_path, capsys):
    for argv in CLI:
        extra = [] if argv[0] == "tasks" else ["--model", str(cached_load[name])]
        extra += ["--out", str(tmp_path / argv[0]), "--no-png"] if argv[0] not in ("tasks", "info") else []
        if argv[0] == "weights" and "weights" not in build_parser()._subparsers._group_actions[0].choices:
            continue  # an installation without the weight-space command
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TokenCollisionWarning)
            code = main([*argv, *extra])
        cap = capsys.readouterr()
        assert code == 0, (name, argv[0], cap.err[-2000:])


@pytest.mark.parametrize("name", NAMES)
def test_readme_calls_run(name, vocab_models):
    """The README's notebook snippet, call for call, with small sizes (the defaults are sized for the organism)."""
    model = vocab_models[name]
    small = dict(n_prompts=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TokenCollisionWarning)
        tasks = tvlens.resolve_tasks(["antonym", "country_capital"])
        tvlens.evaluate_icl(model, "country_capital", n_shots=2, **small)
        rho = tvlens.taskness(model, tasks, n_shots=2, **small)
        rho.plot()
        lens = tvlens.logit_lens(model, "country_capital", n_shots=2, **small)
        lens.phases()
        lens.table()
        sweep = tvlens.layer_sweep(model, tasks, n_shots=2, **small)
        tv = tvlens.task_vector(model, "country_capital", layer=sweep.best_layer, n_shots=2, **small)
        fv = tvlens.function_vector(model, "country_capital", k=2, n_shots=2, n_prompts=2, n_cie_prompts=2)
        zero_shot = tvlens.icl_prompts(model, "antonym", n_prompts=2, n_shots=0)
        means = tvlens.head_means(model, ["antonym", "country_capital"], n_shots=2, **small).select(["antonym"])
        res = tvlens.patch_heads(model, zero_shot, means, positions="final", progress=False)
        tvlens.reinforce_select(model, tasks, steps=1, samples_per_step=2, n_prompts=2, n_mean_prompts=2, n_shots=2,
                                progress=False)
        assert torch.isfinite(torch.as_tensor(res.values)).all()
        gen = tvlens.generate(model, zero_shot, max_new_tokens=3, vector=tv)
        assert gen.tokens.shape == (2, 3) and fv.layer >= 0


def test_example_sep_refused_where_it_cannot_be_passed_on(capsys, tmp_path):
    code = main(["weights", "finetune", "--example-sep", " | ", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and "--example-sep is not supported by `tvlens weights`" in err and "loading model" not in err


# ----------------------------------------------------------------------------------------------
# the prompt options reach every prompt a function builds from a task

#: a separator and an example separator unlike the defaults on every vocabulary (no newline in the text)
SEP, EX = "=", " ;"
OPTS = dict(separator=SEP, example_sep=EX)
TWO = ["antonym", "country_capital"]


@pytest.fixture()
def built(monkeypatch):
    """Every batch tvlens.icl_prompts and tvlens.inputs.text.context_prompts build during the test
    (functions import them when called)."""
    import tvlens.inputs.text as T

    seen: list = []

    def spy(real):
        def build(*a, **k):
            batch = real(*a, **k)
            seen.append(batch)
            return batch
        return build

    for name in ("icl_prompts", "context_prompts"):
        monkeypatch.setattr(T, name, spy(getattr(T, name)))
    return seen


def _check_written(seen, tok, *, separator=SEP, example_sep=EX, demos=True):
    """Every prompt built is the whole-text tokenization of a text written with these options: its final
    separator token is ``separator`` and, with demonstrations, its example-separator tokens ``example_sep``."""
    assert seen, "no prompt was built"
    assert not demos or any(b.n_shots > 0 for b in seen), "no prompt with demonstrations was built"
    for b in seen:
        assert (b.options["separator"], b.options["example_sep"]) == (separator, example_sep), b
        for r in range(len(b)):
            ids = _row(b, r)
            assert tok(b.texts[r], add_special_tokens=False)["input_ids"] == ids
            real = b.attention_mask[r].bool()
            cls = b.token_class[r][real]
            toks = b.tokens[r][real]
            assert tok.decode(toks[cls == TokenClass.FINAL_SEP].tolist()).strip() == separator
            shots = len(b.demos[r]) if b.demos else 0
            # (SentencePiece's decode drops a leading space: compare without spaces)
            assert tok.decode(toks[cls == TokenClass.DEMO_NEWLINE].tolist()).replace(" ", "") == \
                example_sep.replace(" ", "") * shots
            if example_sep != "\n":
                assert "\n" not in b.texts[r] or b.options["instruction"]


def _calls():
    """(name, call(model), builds demonstrations?) for every function that builds prompts from a task."""
    from tvlens.analyses import selection as S
    from tvlens.analyses.taskness import head_means, taskness, validate_taskness
    from tvlens.vectors import activation as A

    small = dict(n_prompts=2, n_shots=2)
    sel = dict(steps=1, n_prompts=2, n_mean_prompts=2, n_shots=2, progress=False)

    def validate(m):
        st = head_means(m, TWO, **small, **OPTS)
        return validate_taskness(m, taskness(st), st, ks=(1,), n_random=1, n_prompts=2, **OPTS)

    def evaluate_vector(m):
        tv = A.task_vector(m, "antonym", layer=1, **small, **OPTS)
        return A.evaluate_vector(m, "antonym", tv, n_prompts=2, **OPTS)

    def selection_evaluate(m):
        return S.reinforce_select(m, TWO, samples_per_step=2, **sel, **OPTS).evaluate(m, n_prompts=2, **OPTS)

    return [
        ("task_vector", lambda m: A.task_vector(m, "antonym", layer=1, **small, **OPTS), True),
        ("task_vectors_all_layers", lambda m: A.task_vectors_all_layers(m, "antonym", **small, **OPTS), True),
        ("instruction_vector", lambda m: A.instruction_vector(m, "antonym", layer=1, n_prompts=2, **OPTS), False),
        ("evaluate_vector", evaluate_vector, True),
        ("layer_sweep", lambda m: A.layer_sweep(m, TWO, **small, **OPTS), True),
        ("layer_sweep_ensemble", lambda m: A.layer_sweep(m, TWO, kind="ensemble", **small, **OPTS), True),
        ("layer_sweep_function", lambda m: A.layer_sweep(
            m, ["antonym"], kind="function", function_kw=dict(k=1, n_prompts=2, n_cie_prompts=2), **small, **OPTS), True),
        ("function_vector", lambda m: A.function_vector(m, "antonym", k=1, n_prompts=2, n_cie_prompts=2, n_shots=2,
                                                        **OPTS), True),
        ("head_means", lambda m: head_means(m, TWO, **small, **OPTS), True),
        ("taskness", lambda m: taskness(m, TWO, **small, **OPTS), True),
        ("validate_taskness", validate, True),
        ("reinforce_select", lambda m: S.reinforce_select(m, TWO, samples_per_step=2, **sel, **OPTS), True),
        ("soft_select", lambda m: S.soft_select(m, TWO, **sel, **OPTS), True),
        ("select_restarts", lambda m: S.select_restarts(m, TWO, n_restarts=1, samples_per_step=2, steps=1, n_prompts=2,
                                                        n_mean_prompts=2, n_shots=2, **OPTS), True),
        ("evaluate_heads", lambda m: S.evaluate_heads(m, TWO, torch.ones(1, 2, 4), n_prompts=2, n_mean_prompts=2, n_shots=2,
                                                      **OPTS), True),
        ("selection.evaluate", selection_evaluate, True),
        ("compare_selections", lambda m: S.compare_selections(
            m, TWO, k=1, methods=["zero_shot", "rho_topk", "cie_topk", "reinforce", "soft", "random_k", "icl"], per="all",
            n_random=1, n_prompts=2, n_shots=2, n_icl_prompts=2, n_mean_prompts=2, reinforce_kw=dict(steps=1,
            samples_per_step=2), soft_kw=dict(steps=1), cie_kw=dict(n_prompts=2, n_cie_prompts=2), progress=False, **OPTS), True),
    ]


CALLS = {name: (fn, demos) for name, fn, demos in _calls()}


@pytest.mark.parametrize("fn_name", list(CALLS))
def test_prompt_options_reach_every_prompt(fn_name, vocab_models, tokenizers, built):
    """separator / example_sep given to a function that builds prompts from a task are in the tokens
    of every prompt it builds (on SentencePiece, where the default newline is the issue's case)."""
    fn, demos = CALLS[fn_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fn(vocab_models["sentencepiece-32k"])
    _check_written(built, tokenizers["sentencepiece-32k"], demos=demos)


def test_report_and_cli_pass_the_example_separator_on(vocab_models, tokenizers, cached_load, built, tmp_path, capsys):
    from tvlens.report import build_report

    name = "gpt2"
    tok, model = tokenizers[name], vocab_models[name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = build_report(model, TWO, tmp_path / "report", n_prompts=2, n_shots=2, png=False, progress=False, **OPTS)
    assert rep.meta["prompt"] == OPTS
    _check_written(built, tok)
    for argv in (["sweep"], ["fv", "--k", "1"], ["report", "--sections", "taskness,sweep,patch"],
                 ["select", "--methods", "zero_shot,reinforce,icl", "--per", "all", "--steps", "1", "--samples", "2",
                  "--k", "1"], ["info"], ["taskness"], ["lens"], ["patch"]):
        built.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            code = main([*argv, "--tasks", ",".join(TWO), "--n-prompts", "2", "--n-shots", "2", "--example-sep", EX,
                         "--model", str(cached_load[name]), *(["--out", str(tmp_path / argv[0]), "--no-png"]
                                                              if argv[0] != "info" else [])])
        assert code == 0, (argv, capsys.readouterr().err[-2000:])
        _check_written(built, tok, separator="→")


def test_bad_prompt_options_are_refused_before_any_forward(vocab_models, monkeypatch, tmp_path):
    import tvlens.engine.readout as R
    from tvlens.vectors import activation as A

    def no_forward(*a, **k):
        raise AssertionError("a forward ran")

    monkeypatch.setattr(R, "run_rows", no_forward)
    monkeypatch.setattr(A, "run_rows", no_forward)
    m = vocab_models["gpt2"]
    with pytest.raises(TypeError, match=r"task_vector\(\) got unexpected keyword argument\(s\) 'exampel_sep'.*did you mean "
                                        r"'example_sep'"):
        A.task_vector(m, "antonym", layer=1, exampel_sep=" ;")
    with pytest.raises(ValueError, match=r"example_sep ' ; ' must be non-empty and must not end with a space"):
        A.layer_sweep(m, TWO, n_prompts=2, n_shots=2, example_sep=" ; ")
    with pytest.raises(TypeError, match=r"layer_sweep\(\) got unexpected keyword argument\(s\) 'split'"):
        A.layer_sweep(m, TWO, n_prompts=2, n_shots=2, split="dev")  # the sweep chooses its splits itself
    from tvlens.report import build_report

    with pytest.raises(ValueError, match=r"the report's visual section\(s\) build their own prompts and take no prompt options"):
        build_report(m, TWO, tmp_path, sections=["visual"], png=False, progress=False, **OPTS)


@pytest.mark.parametrize("center", [False, True])
def test_prompt_options_reach_an_executors_units(vocab_models, center):
    """A sweep split into units (what a RayExecutor does, here in this process) writes its prompts
    with the options given: the same numbers as the local sweep with them, not as the default format."""
    from tvlens.runs.executors import LocalExecutor
    from tvlens.vectors import activation as A

    m = vocab_models["gpt2"]
    kw = dict(n_prompts=3, n_shots=2, layers=[1, 2], center=center)
    here = A.layer_sweep(m, TWO, **kw, **OPTS)
    split = A.layer_sweep(m, TWO, **kw, executor=LocalExecutor(split=True), **OPTS)
    plain = A.layer_sweep(m, TWO, **kw)
    assert not torch.allclose(here.logprob, plain.logprob)  # the options change the prompts, so the numbers
    for name in ("accuracy", "logprob", "zero_shot_logprob", "icl_logprob", "vectors"):
        torch.testing.assert_close(getattr(split, name), getattr(here, name), atol=1e-5, rtol=0, msg=name)
    assert split.meta["prompt"] == here.meta["prompt"]
