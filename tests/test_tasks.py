"""Tests for tvlens.tasks: the shipped suite (size, families, shared domains, facts) and the loaders."""

from __future__ import annotations

import json
import string
from collections import Counter
from pathlib import Path

import pytest

from tvlens import tasks as T
from tvlens.tasks import Task

ALL = T.list_tasks()


# ---------------------------------------------------------------- suite shape


def test_suite_size_and_families():
    assert len(ALL) >= 40
    fams = Counter(T.load_task(n).family for n in ALL)
    assert set(fams) == set(T.FAMILIES) == set(T.families())
    assert all(c >= 5 for c in fams.values()), fams
    assert sorted(T.list_tasks(family="knowledge") + T.list_tasks(family="linguistic")
                  + T.list_tasks(family="translation") + T.list_tasks(family="algorithmic")) == sorted(ALL)


@pytest.mark.parametrize("name", ALL)
def test_each_task_well_formed(name):
    t = T.load_task(name)
    assert t.name == name and t.family in T.FAMILIES and t.domain
    assert len(t.pairs) >= 50
    assert isinstance(t.pairs, tuple) and all(isinstance(p, tuple) and len(p) == 2 for p in t.pairs)
    inputs = [x for x, _ in t.pairs]
    assert len(set(inputs)) == len(inputs), "the shipped tasks have one answer per input"
    assert t.instruction.endswith(".") and len(t.instruction.split()) >= 3 and "\n" not in t.instruction
    for x, y in t.pairs:
        for s in (x, y):
            assert s == s.strip() and s and "  " not in s
            assert "\n" not in s and "→" not in s
    # natural case, as the anchors' data: proper nouns and German nouns capitalised, other words lowercase
    if t.domain in ("country", "capital_city", "city", "us_state"):
        assert all(x[0].isupper() for x, _ in t.pairs), name
        if name not in ("country_currency",):
            assert all(y[0].isupper() for _, y in t.pairs), name
    elif "german" in name:
        assert all((y if name.endswith("german") else x)[0].isupper() for x, y in t.pairs), name
    elif name not in {"next_letter", "previous_letter", "swap_case", "element_symbol"}:
        assert all(x == x.lower() and y == y.lower() for x, y in t.pairs), name


def test_task_is_frozen():
    t = T.load_task("antonym")
    with pytest.raises(Exception):
        t.name = "x"  # type: ignore[misc]
    assert T.load_task("antonym") is t  # cached


def test_shared_domains():
    by_domain: dict[str, list[str]] = {}
    for n in ALL:
        by_domain.setdefault(T.load_task(n).domain, []).append(n)
    shared = {d: ns for d, ns in by_domain.items() if len(ns) >= 2}
    assert len(shared) >= 6, shared
    assert {"country_capital", "country_currency", "country_continent", "country_language"} <= set(by_domain["country"])
    assert {"english_french", "english_spanish", "singular_plural", "first_letter"} <= set(by_domain["english_noun"])
    assert {"next_letter", "previous_letter", "swap_case"} <= set(by_domain["letter"])
    assert {"successor", "predecessor", "double"} <= set(by_domain["number"])
    # the shared tasks really use the same queries, so the query alone does not reveal the task
    cap, cur = T.load_task("country_capital"), T.load_task("country_currency")
    assert set(cap.inputs) == set(cur.inputs)
    fr, pl = T.load_task("english_french"), T.load_task("singular_plural")
    assert len(set(fr.inputs) & set(pl.inputs)) >= 50


# ---------------------------------------------------------------- facts

FACTS = [
    # knowledge
    ("country_capital", "France", "Paris"),
    ("country_capital", "Japan", "Tokyo"),
    ("country_capital", "Australia", "Canberra"),
    ("country_capital", "India", "New Delhi"),
    ("country_capital", "Argentina", "Buenos Aires"),
    ("country_capital", "Egypt", "Cairo"),
    ("country_currency", "Japan", "yen"),
    ("country_currency", "Germany", "euro"),
    ("country_currency", "United Kingdom", "pound"),
    ("country_currency", "Poland", "zloty"),
    ("country_currency", "Mexico", "peso"),
    ("country_continent", "Brazil", "South America"),
    ("country_continent", "Kenya", "Africa"),
    ("country_continent", "Thailand", "Asia"),
    ("country_language", "Brazil", "Portuguese"),
    ("country_language", "Austria", "German"),
    ("country_adjective", "Netherlands", "Dutch"),
    ("capital_country", "Lima", "Peru"),
    ("city_country", "Barcelona", "Spain"),
    ("city_country", "Osaka", "Japan"),
    ("state_capital", "California", "Sacramento"),
    ("state_capital", "New York", "Albany"),
    ("element_symbol", "iron", "Fe"),
    ("element_symbol", "sodium", "Na"),
    ("element_symbol", "gold", "Au"),
    ("element_number", "oxygen", "8"),
    ("element_number", "carbon", "6"),
    ("animal_young", "cat", "kitten"),
    ("animal_young", "kangaroo", "joey"),
    ("animal_young", "swan", "cygnet"),
    ("animal_class", "whale", "mammal"),
    ("animal_class", "frog", "amphibian"),
    # linguistic
    ("antonym", "hot", "cold"),
    ("antonym", "rich", "poor"),
    ("comparative", "good", "better"),
    ("comparative", "big", "bigger"),
    ("superlative", "bad", "worst"),
    ("past_tense", "go", "went"),
    ("past_tense", "buy", "bought"),
    ("past_participle", "eat", "eaten"),
    ("present_participle", "swim", "swimming"),
    ("third_person", "fly", "flies"),
    ("past_to_present", "thought", "think"),
    ("singular_plural", "mouse", "mice"),
    ("singular_plural", "child", "children"),
    ("plural_singular", "teeth", "tooth"),
    ("masculine_feminine", "king", "queen"),
    ("masculine_feminine", "actor", "actress"),
    # translation
    ("english_french", "dog", "chien"),
    ("english_french", "water", "eau"),
    ("english_spanish", "cat", "gato"),
    ("english_spanish", "house", "casa"),
    ("english_german", "book", "Buch"),
    ("english_german", "bread", "Brot"),
    ("english_italian", "water", "acqua"),
    ("english_italian", "dog", "cane"),
    ("french_english", "pomme", "apple"),
    ("spanish_english", "perro", "dog"),
    ("german_english", "Hund", "dog"),
    ("italian_english", "libro", "book"),
    ("city_continent", "Toronto", "North America"),
    ("city_continent", "Cape Town", "Africa"),
    ("city_continent", "Zurich", "Europe"),
    ("state_abbreviation", "California", "CA"),
    ("state_abbreviation", "Maine", "ME"),
    ("state_abbreviation", "New York", "NY"),
    ("state_abbreviation", "Alaska", "AK"),
    ("masculine_plural", "policeman", "policemen"),
    ("masculine_plural", "hero", "heroes"),
    ("masculine_plural", "king", "kings"),
]


def test_facts_table():
    assert len(FACTS) >= 30
    for name, x, y in FACTS:
        d = T.load_task(name).as_dict()
        assert x in d, f"{name}: {x!r} missing"
        assert d[x] == y, f"{name}: {x!r} -> {d[x]!r}, expected {y!r}"


def test_reverse_tasks_agree():
    for lang in ("french", "spanish", "german", "italian"):
        fwd, back = T.load_task(f"english_{lang}").as_dict(), T.load_task(f"{lang}_english").as_dict()
        assert {(y, x) for x, y in fwd.items()} == set(back.items())
    cap, back = T.load_task("country_capital").as_dict(), T.load_task("capital_country").as_dict()
    assert {(y, x) for x, y in cap.items()} == set(back.items())
    sg, pl = T.load_task("singular_plural").as_dict(), T.load_task("plural_singular").as_dict()
    assert {(y, x) for x, y in sg.items()} == set(pl.items())


def test_every_domain_is_shared():
    """No query domain belongs to a single task: zero-shot is ambiguous for every task by construction, and
    the zero-shot chance of guessing the task among those sharing the query stays well below ICL."""
    by_domain: dict[str, list[str]] = {}
    for n in ALL:
        by_domain.setdefault(T.load_task(n).domain, []).append(n)
    assert all(len(ns) >= 2 for ns in by_domain.values()), {d: ns for d, ns in by_domain.items() if len(ns) < 2}


def _compose(first: str, second: str) -> dict[str, str]:
    b = T.load_task(second).as_dict()
    return {x: b[y] for x, y in T.load_task(first).as_dict().items() if y in b}


@pytest.mark.parametrize(
    "name, first, second",
    [
        ("capital_continent", "capital_country", "country_continent"),
        ("past_to_participle", "past_to_present", "present_participle"),
        ("french_spanish", "french_english", "english_spanish"),
        ("german_french", "german_english", "english_french"),
        ("italian_german", "italian_english", "english_german"),
        ("spanish_italian", "spanish_english", "english_italian"),
    ],
)
def test_composed_tasks_agree_with_their_parts(name, first, second):
    """Tasks derived by composing two shipped tasks give exactly the composition, on every input."""
    assert T.load_task(name).as_dict() == _compose(first, second)


def test_city_continent_agrees_with_country_continent():
    # cities whose country is in country_continent must agree with it (the rest are checked in FACTS)
    comp = _compose("city_country", "country_continent")
    got = T.load_task("city_continent").as_dict()
    assert len(comp) >= 40 and all(got[c] == v for c, v in comp.items() if c in got)
    assert set(got) <= set(T.load_task("city_country").inputs)
    assert T.load_task("state_abbreviation").inputs == T.load_task("state_capital").inputs


# ---------------------------------------------------------------- algorithmic tasks, recomputed

_ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
         "seventeen eighteen nineteen").split()
_TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()


def _words(n: int) -> str:
    if n < 20:
        return _ONES[n]
    t, o = divmod(n, 10)
    return _TENS[t] + ("" if o == 0 else " " + _ONES[o])


def _shift(c: str, k: int) -> str:
    alpha = string.ascii_lowercase if c.islower() else string.ascii_uppercase
    return alpha[alpha.index(c) + k]


ALGO = {
    "next_letter": lambda x: _shift(x, 1),
    "previous_letter": lambda x: _shift(x, -1),
    "swap_case": lambda x: x.swapcase(),
    "successor": lambda x: str(int(x) + 1),
    "predecessor": lambda x: str(int(x) - 1),
    "double": lambda x: str(2 * int(x)),
    "add_ten": lambda x: str(int(x) + 10),
    "number_to_word": lambda x: _words(int(x)),
    "word_to_number": lambda x: str(next(n for n in range(100) if _words(n) == x)),
    "first_letter": lambda x: x[0],
    "last_letter": lambda x: x[-1],
    "word_length": lambda x: str(len(x)),
    "list_first": lambda x: x.split()[0],
    "list_last": lambda x: x.split()[-1],
    "list_length": lambda x: str(len(x.split())),
    "plural_first_letter": lambda x: x[0],
    "next_number_word": lambda x: _words(next(n for n in range(100) if _words(n) == x) + 1),
}


def test_all_algorithmic_tasks_are_checked():
    assert set(T.list_tasks(family="algorithmic")) == set(ALGO)


@pytest.mark.parametrize("name", sorted(ALGO))
def test_algorithmic_tasks_computed(name):
    f = ALGO[name]
    for x, y in T.load_task(name).pairs:
        assert f(x) == y, (name, x, y)


# ---------------------------------------------------------------- splits


@pytest.mark.parametrize("name", ["country_capital", "next_letter", "english_german", "state_capital"])
def test_splits_disjoint_cover_deterministic(name):
    t = T.load_task(name)
    parts = {w: t.split(w, seed=0) for w in ("train", "dev", "test")}
    sets = {w: set(p) for w, p in parts.items()}
    assert not (sets["train"] & sets["dev"]) and not (sets["train"] & sets["test"]) and not (sets["dev"] & sets["test"])
    assert sets["train"] | sets["dev"] | sets["test"] == set(t.pairs)
    n = len(t)
    assert abs(len(parts["train"]) - 0.6 * n) <= 1 and abs(len(parts["dev"]) - 0.2 * n) <= 1
    # deterministic, independent of global RNG state, and seed-dependent
    import random

    import numpy as np
    import torch

    random.seed(123)
    np.random.seed(123)
    torch.manual_seed(123)
    assert t.split("test", seed=0) == parts["test"]
    fresh = Task(t.name, t.family, t.instruction, t.pairs, t.domain)
    assert fresh.split("train", seed=0) == parts["train"]
    assert t.split("train", seed=1) != parts["train"]
    assert set(t.split("train", seed=1)) | set(t.split("dev", seed=1)) | set(t.split("test", seed=1)) == set(t.pairs)


def test_split_bad_arguments():
    t = T.load_task("antonym")
    with pytest.raises(ValueError, match="split"):
        t.split("validation")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="seed"):
        t.split("train", seed=-1)


# ---------------------------------------------------------------- registry and vocabulary


def test_unknown_task_suggests_close_match():
    with pytest.raises(KeyError) as ei:
        T.load_task("capitol")
    msg = str(ei.value)
    assert "unknown task 'capitol'" in msg and "country_capital" in msg and "tvlens.list_tasks()" in msg
    with pytest.raises(ValueError, match="did you mean 'antonym'"):
        T.load_task("antonyms")
    with pytest.raises(ValueError, match="unknown task 'zzzzqqq'"):
        T.load_task("zzzzqqq")


def test_resolve_tasks():
    assert [t.name for t in T.resolve_tasks("all")] == ALL
    kn = T.resolve_tasks("family:knowledge")
    assert kn and all(t.family == "knowledge" for t in kn)
    got = T.resolve_tasks("antonym, next_letter,antonym")
    assert [t.name for t in got] == ["antonym", "next_letter"]
    custom = Task("mine", "custom", "", (("a", "b"),))
    assert [t.name for t in T.resolve_tasks(["antonym", custom, "family:translation"])][:2] == ["antonym", "mine"]
    with pytest.raises(ValueError, match="unknown family"):
        T.resolve_tasks("family:nope")
    with pytest.raises(ValueError, match="did you mean"):
        T.resolve_tasks("antonym,capitol")
    with pytest.raises(ValueError, match="no tasks"):
        T.resolve_tasks([])


def test_vocabulary():
    t = T.load_task("country_capital")
    v = t.vocabulary()
    assert {"France", "Paris", "New", "Delhi", "Give", "capital"} <= v
    suite = T.suite_vocabulary()
    assert suite == sorted(set(suite))
    # the organism's vocabulary: the suite's words, lowercased except where case is the answer
    union = set().union(*(T.load_task(n).vocabulary() for n in ALL))
    assert {w.lower() for w in union} == {w.lower() for w in suite}
    assert {"france", "paris", "Fe", "A", "a", "Give"} <= set(suite) and "France" not in suite
    assert all(w and not any(c.isspace() for c in w) for w in suite)


# ---------------------------------------------------------------- anchor formats and bad files


def test_from_json_todd_format(tmp_path):
    p = tmp_path / "todd_antonym.json"
    p.write_text(json.dumps([{"input": "up", "output": "down"}, {"input": " hot", "output": "cold"},
                             {"input": "up", "output": "down"}, {"input": "one", "output": 1}]))
    t = Task.from_json(p)
    assert t.name == "todd_antonym" and t.family == "custom" and t.instruction == ""
    assert t.pairs == (("up", "down"), ("hot", "cold"), ("one", "1"))  # stripped, exact duplicate dropped


def test_from_json_hendel_format(tmp_path):
    p = tmp_path / "hendel.json"
    p.write_text(json.dumps({"a": "b", "b": "c", "c": "d"}))
    t = Task.from_json(p, name="letters", family="algorithmic", instruction="Next letter.")
    assert (t.name, t.family, t.instruction) == ("letters", "algorithmic", "Next letter.")
    assert t.as_dict() == {"a": "b", "b": "c", "c": "d"}


def test_from_json_tvlens_format_roundtrip(tmp_path):
    src = T.load_task("country_currency")
    p = tmp_path / "x.json"
    p.write_text(json.dumps({"name": src.name, "family": src.family, "domain": src.domain,
                             "instruction": src.instruction, "pairs": [list(q) for q in src.pairs]}))
    t = Task.from_json(p)
    assert t == src
    assert T.load_task(str(p)) == src  # load_task accepts a path to a .json file
    assert Task.from_json(p, name="renamed").name == "renamed"


def test_malformed_json_names_file_and_line(tmp_path):
    p = tmp_path / "broken.json"
    p.write_text('[\n  {"input": "a", "output": "b"},\n  {"input": "c" "output": "d"}\n]\n')
    with pytest.raises(ValueError) as ei:
        Task.from_json(p)
    msg = str(ei.value)
    assert "broken.json" in msg and "line 3" in msg


def test_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        Task.from_json(tmp_path / "nope.json")
    p = tmp_path / "conflict.json"
    p.write_text('[\n  {"input": "a", "output": "b"},\n  ["a", "c"]\n]')
    with pytest.raises(ValueError, match=r"conflict.json, line 3: item \['a', 'c'\] is not an \{\"input\".*"
                                         r"Todd et al.'s format, so write every item as"):
        Task.from_json(p)
    p.write_text('{\n  "a": "b",\n  "c": {"x": 1}\n}')
    with pytest.raises(ValueError, match=r"conflict.json, line 3: the output is \{'x': 1\}; .*list of accepted answers"):
        Task.from_json(p)
    p.write_text('{"name": "t", "pairs": [\n  ["a", "b"],\n  ["c"]\n]}')
    with pytest.raises(ValueError, match=r"conflict.json, line 3: pair \['c'\] is not \[input, output\].*two-item list"):
        Task.from_json(p)
    p.write_text('[\n {"input": "a", "output": "b"},\n {"input": "c", "output": "  "}\n]')
    with pytest.raises(ValueError, match=r"conflict.json, line 3: the pair \('c', ''\) has an empty input or output"):
        Task.from_json(p)
    p = tmp_path / "scalar.json"
    p.write_text("42")
    with pytest.raises(ValueError, match="expected a list"):
        Task.from_json(p)
    p = tmp_path / "items.json"
    p.write_text(json.dumps([{"question": "a", "answer": "b"}]))
    with pytest.raises(ValueError, match="Todd"):
        Task.from_json(p)
    p = tmp_path / "arrow.json"  # loads as written; icl_prompts refuses it with the fix (tests/test_prompts.py)
    p.write_text(json.dumps({"a → b": "c", "x\ny": "z"}))
    assert Task.from_json(p).pairs == (("a → b", "c"), ("x\ny", "z"))
    p = tmp_path / "empty.json"
    p.write_text("[]")
    with pytest.raises(ValueError, match="no pairs"):
        Task.from_json(p)


# ---------------------------------------------------------------- the anchors' own files

ANCHORS = Path(__file__).resolve().parents[2] / "shared" / "anchors"
COPIES = Path(__file__).parent / "data" / "anchors"


def _file_pairs(path: Path) -> list[tuple[str, str]]:
    """The (input, output) pairs as the file writes them, in order, exact duplicates once (an independent
    reading: json's object_pairs_hook keeps a repeated key's every value)."""
    raw = path.read_text(encoding="utf-8")
    data = json.loads(raw, object_pairs_hook=list)
    if raw.lstrip().startswith("["):
        items = [(dict(i)["input"], dict(i)["output"]) for i in data]
    else:
        items = list(data)
    return list(dict.fromkeys((str(x).strip(), str(y).strip()) for x, y in items))


@pytest.mark.skipif(not ANCHORS.is_dir(), reason="../shared/anchors (the anchors' published task files) is absent here")
def test_all_anchor_files_load_with_the_files_pairs():
    files = sorted(ANCHORS.glob("*/*/*.json"))
    assert len(files) == 76
    multi = {}
    for f in files:
        t = Task.from_json(f)
        assert list(t.pairs) == _file_pairs(f), f
        if t.multi_answer:
            multi[f.stem] = sum(len(t.answers_of(x)) > 1 for x in t.inputs)
    # the seven Todd files with several outputs for some inputs (counts from ../shared/anchors/README.md),
    # and Hendel's antonyms, whose object repeats keys
    assert {k: multi[k] for k in ("landmark-country", "national_parks", "next_item", "prev_item", "park-country",
                                  "person-instrument", "product-company")} == {
        "landmark-country": 1, "national_parks": 26, "next_item": 8, "prev_item": 8, "park-country": 1,
        "person-instrument": 5, "product-company": 6}


@pytest.mark.parametrize("path", sorted(COPIES.glob("*/*.json")), ids=lambda p: p.stem)
def test_copied_anchor_files_load_with_the_files_pairs(path):
    t = Task.from_json(path)
    assert list(t.pairs) == _file_pairs(path)


def test_several_accepted_answers():
    t = Task.from_json(COPIES / "todd" / "next_item.json")
    assert t.multi_answer and t.answers_of("i") == ("j", "ii")  # the letter after i, and the numeral after i
    assert t.as_dict()["i"] == "j" and len(t.inputs) < len(t.pairs)
    # every answer of an input lands in the same split
    for which in ("train", "dev", "test"):
        part = t.split(which)
        for x, _ in part:
            assert sum(p[0] == x for p in part) == len(t.answers_of(x))
    with pytest.raises(KeyError, match="not an input"):
        t.answers_of("zz")
    # tvlens's and Hendel's formats take a list of accepted answers too
    assert T._task_from_text('{"pairs": [["a", ["b", "c"]]]}', "x.json", stem="x").answers_of("a") == ("b", "c")
    assert T._task_from_text('{"a": ["b", "c"]}', "x.json", stem="x").answers_of("a") == ("b", "c")


def test_single_answer_splits_are_unchanged():
    """Splitting distinct inputs gives the same parts as splitting pairs did, when every input has one answer."""
    import zlib

    import numpy as np

    for name in ("country_capital", "antonym", "next_letter"):
        t = T.load_task(name)
        n = len(t.pairs)
        perm = np.random.default_rng([0, zlib.crc32(t.name.encode())]).permutation(n)
        n_train, n_dev = int(round(0.6 * n)), int(round(0.2 * n))
        assert t.split("train") == tuple(t.pairs[i] for i in sorted(perm[:n_train].tolist()))
        assert t.split("test") == tuple(t.pairs[i] for i in sorted(perm[n_train + n_dev:].tolist()))


def test_replace_text_makes_commonsense_qa_one_line():
    t = Task.from_json(COPIES / "todd" / "commonsense_qa_first100.json")
    assert any("\n" in x for x in t.inputs)
    one = t.replace_text("\n", " ")
    assert not any("\n" in x for x in one.inputs) and len(one) == len(t) and one.name == t.name
    assert one.inputs[0].endswith("a: ignore b: enforce c: authoritarian d: yell at e: avoid")
    esc = t.replace_text("\n", "\\n")
    assert "\\na: ignore" in esc.inputs[0]
    with pytest.raises(ValueError, match="non-empty string"):
        t.replace_text("", " ")


# ---------------------------------------------------------------- natural case, read by the organism


def _organism_form(task: Task, text: str) -> str:
    """How the organism's training data wrote ``text``: lowercase, except in the tasks where case is the answer."""
    from tvlens.organisms.text.tokenizer import CASED_TASKS

    return text if task.name in CASED_TASKS else text.lower()


def test_organism_reads_natural_case_as_it_was_trained():
    """The shipped tokenizer maps every natural-case pair and instruction to the ids of the lowercase text the
    organism was trained on, and keeps the capitals that are answers (swap_case, element symbols)."""
    from transformers import AutoTokenizer

    from tvlens.organisms import organism_path

    for organism in ("organism", "organism-natural"):
        tok = AutoTokenizer.from_pretrained(str(organism_path(organism)))
        for name in ALL:
            t = T.load_task(name)
            texts = [s for p in t.pairs for s in p]
            ids = tok(texts, add_special_tokens=False)["input_ids"]
            old = tok([_organism_form(t, s) for s in texts], add_special_tokens=False)["input_ids"]
            assert ids == old, name
            assert all(tok.unk_token_id not in i for i in ids), name
            first, rest = t.instruction.split(" ", 1)
            assert tok(t.instruction)["input_ids"] == tok(first + " " + rest.lower())["input_ids"], name
    fe, a = tok.convert_tokens_to_ids(["Fe", "A"])
    assert tok("Santa Fe → iron Fe\nA", add_special_tokens=False)["input_ids"] == tok.convert_tokens_to_ids(
        ["santa", "fe", "→", "iron", "Fe", "\n", "A"])
    assert fe != tok.convert_tokens_to_ids("fe") and a != tok.convert_tokens_to_ids("a")


def test_case_normalizer_keeps_offsets_and_protected_words():
    from tvlens.organisms.text.tokenizer import build_tokenizer

    tok = build_tokenizer(["france paris Fe A a Give give McDonald"], lower_phrases=["Santa Fe"])
    text = "Give FRANCE → Paris\nFe McDonald mcdonald A a GIVE"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == [
        "Give", "france", "→", "paris", "\n", "Fe", "McDonald", "<unk>", "A", "a", "give"]
    assert [text[s:e] for s, e in enc["offset_mapping"]] == [
        "Give", "FRANCE", "→", "Paris", "\n", "Fe", "McDonald", "mcdonald", "A", "a", "GIVE"]
    plain = build_tokenizer(["france"], case_fold=False)
    assert plain.convert_ids_to_tokens(plain("France", add_special_tokens=False)["input_ids"]) == ["<unk>"]


@pytest.mark.parametrize("name", ["next_item", "person-instrument", "product-company"])
def test_anchor_inputs_with_several_outputs_are_scored_on_every_output(name, tmp_path):
    """Todd et al.'s files where one input has several outputs: every output is an accepted answer of the
    prompt (its first token as it follows the prompt on GPT-2's vocabulary), and the metrics' accepted ids
    hold exactly those first tokens, the first listed output's first."""
    import sys
    import warnings

    sys.path.insert(0, str(Path(__file__).parent))
    from real_vocab import DATA, load_tokenizer

    if not DATA.is_dir():
        pytest.skip("tests/data/tokenizers (the real vocabularies) is absent")
    from tvlens.inputs.text import icl_prompts
    from tvlens.metrics import accepted_ids

    tok = load_tokenizer("gpt2", tmp_path)
    task = Task.from_json(COPIES / "todd" / f"{name}.json")
    multi = [x for x in task.inputs if len(task.answers_of(x)) > 1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        batch = icl_prompts(tok, task, queries=multi, n_shots=2, seed=0, split="train")
    ids = accepted_ids(batch)
    for r, x in enumerate(multi):
        assert batch.accepted_answers[r] == task.answers_of(x)
        prompt = tok(batch.texts[r], add_special_tokens=False)["input_ids"]
        firsts = [tok(batch.texts[r] + " " + a, add_special_tokens=False)["input_ids"][len(prompt)] for a in task.answers_of(x)]
        assert ids[r, 0] == firsts[0] and set(ids[r].tolist()) == set(firsts)
