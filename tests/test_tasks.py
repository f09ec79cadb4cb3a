"""Tests for tvlens.tasks: the shipped suite (size, families, shared domains, facts) and the loaders."""

from __future__ import annotations

import json
import string
from collections import Counter

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
    assert len(set(inputs)) == len(inputs), "inputs must be unique"
    assert t.instruction.endswith(".") and len(t.instruction.split()) >= 3 and "\n" not in t.instruction
    for x, y in t.pairs:
        for s in (x, y):
            assert s == s.strip() and s and "  " not in s
            assert "\n" not in s and "→" not in s
    # lowercase everywhere except where case is the point (letters, chemical symbols)
    if name not in {"next_letter", "previous_letter", "swap_case", "element_symbol"}:
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
    ("country_capital", "france", "paris"),
    ("country_capital", "japan", "tokyo"),
    ("country_capital", "australia", "canberra"),
    ("country_capital", "india", "new delhi"),
    ("country_capital", "argentina", "buenos aires"),
    ("country_capital", "egypt", "cairo"),
    ("country_currency", "japan", "yen"),
    ("country_currency", "germany", "euro"),
    ("country_currency", "united kingdom", "pound"),
    ("country_currency", "poland", "zloty"),
    ("country_currency", "mexico", "peso"),
    ("country_continent", "brazil", "south america"),
    ("country_continent", "kenya", "africa"),
    ("country_continent", "thailand", "asia"),
    ("country_language", "brazil", "portuguese"),
    ("country_language", "austria", "german"),
    ("country_adjective", "netherlands", "dutch"),
    ("capital_country", "lima", "peru"),
    ("city_country", "barcelona", "spain"),
    ("city_country", "osaka", "japan"),
    ("state_capital", "california", "sacramento"),
    ("state_capital", "new york", "albany"),
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
    ("english_german", "book", "buch"),
    ("english_german", "bread", "brot"),
    ("english_italian", "water", "acqua"),
    ("english_italian", "dog", "cane"),
    ("french_english", "pomme", "apple"),
    ("spanish_english", "perro", "dog"),
    ("german_english", "hund", "dog"),
    ("italian_english", "libro", "book"),
    ("city_continent", "toronto", "north america"),
    ("city_continent", "cape town", "africa"),
    ("city_continent", "zurich", "europe"),
    ("state_abbreviation", "california", "ca"),
    ("state_abbreviation", "maine", "me"),
    ("state_abbreviation", "new york", "ny"),
    ("state_abbreviation", "alaska", "ak"),
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
    assert {"france", "paris", "new", "delhi", "Give", "capital"} <= v
    suite = T.suite_vocabulary()
    assert suite == sorted(set(suite))
    union = set().union(*(T.load_task(n).vocabulary() for n in ALL))
    assert set(suite) == union
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
    p.write_text(json.dumps([{"input": "a", "output": "b"}, {"input": "a", "output": "c"}]))
    with pytest.raises(ValueError, match="conflict.json.*two outputs"):
        Task.from_json(p)
    p = tmp_path / "scalar.json"
    p.write_text("42")
    with pytest.raises(ValueError, match="expected a list"):
        Task.from_json(p)
    p = tmp_path / "items.json"
    p.write_text(json.dumps([{"question": "a", "answer": "b"}]))
    with pytest.raises(ValueError, match="Todd"):
        Task.from_json(p)
    p = tmp_path / "arrow.json"
    p.write_text(json.dumps({"a → b": "c"}))
    with pytest.raises(ValueError, match="separator"):
        Task.from_json(p)
    p = tmp_path / "empty.json"
    p.write_text("[]")
    with pytest.raises(ValueError, match="no pairs"):
        Task.from_json(p)
