"""Task datasets for in-context learning: the shipped suite, splits, and loaders for the anchor formats.

A *task* is a function from inputs to outputs given by examples, ``("france", "paris")``, plus a family,
an input domain and a one-sentence instruction. Everything tvlens measures is measured on ICL prompts
built from these pairs (see :mod:`tvlens.inputs.text`).

The shipped suite (``tvlens/data/tasks/*.json``) has four families, as in Hendel et al. 2023 (*In-Context
Learning Creates Task Vectors*, §4.1: knowledge, linguistic, translation, algorithmic):

- knowledge: country -> capital / currency / continent / language / adjective, city -> country, ...
- linguistic: antonym, comparative, past tense, singular -> plural, masculine -> feminine, ...
- translation: english <-> french / spanish / german / italian words,
- algorithmic: next / previous letter, successor, double, first letter of a word, first item of a list, ...

Several tasks share an input *domain* (the same country list for capital, currency, continent, language;
the same english nouns for four translations, plural, first letter, ...), so that the query alone does not
reveal the task: zero-shot accuracy is low and a task vector has something to carry.

Three JSON formats are read by :meth:`Task.from_json`:

- Todd et al. 2024 (*Function Vectors in Large Language Models*, the ``function_vectors`` datasets):
  a list of ``{"input": ..., "output": ...}`` objects;
- Hendel et al. 2023 (``icl_task_vectors``): one ``{input: output}`` object;
- tvlens's own: ``{"name", "family", "domain", "instruction", "pairs": [[input, output], ...]}``.

The data is in natural case (``France → Paris``), as the anchors' is.

**Several accepted answers.** An input may have several outputs (Todd et al.'s ``next_item``:
``"Monday" → "Tuesday"`` and ``"monday" → "tuesday"``; ``national_parks``): every pair is kept, and
:meth:`Task.answers_of` gives all the outputs of an input. Prompts show the first listed output in
demonstrations and score the first listed one in log-prob / logit-difference metrics, while ICL
accuracy counts any accepted answer (see :mod:`tvlens.inputs.text`).

**Text that clashes with the prompt format.** Inputs may contain anything, newlines included (Todd
et al.'s ``commonsense_qa`` lists its choices on separate lines); :func:`tvlens.icl_prompts` refuses
a pair containing the separator or the example separator, with the fix: another ``example_sep``, or
``task.replace_text("\n", " ")``.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import re
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "FAMILIES",
    "Task",
    "UnknownTaskError",
    "families",
    "list_tasks",
    "load_task",
    "resolve_tasks",
    "suite_vocabulary",
]

#: The shipped families, in display order (Hendel et al. 2023, §4.1).
FAMILIES: tuple[str, ...] = ("knowledge", "linguistic", "translation", "algorithmic")

Split = Literal["train", "dev", "test"]
Pair = tuple[str, str]

#: Fractions of the seeded permutation given to train / dev; test gets the rest.
_SPLIT_FRACTIONS = (0.6, 0.2)


class UnknownTaskError(KeyError, ValueError):
    """A task name that is not in the suite. Both a ``KeyError`` and a ``ValueError`` so either catch works."""

    def __str__(self) -> str:  # KeyError would repr-quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True, repr=False)
class Task:
    """One ICL task: ``pairs`` of (input, output) strings defining a function, with its metadata.

    Attributes:
        name: snake_case identifier (``"country_capital"``).
        family: ``"knowledge" | "linguistic" | "translation" | "algorithmic"`` for the shipped suite,
            anything for user tasks (``"custom"`` by default).
        instruction: one sentence saying what the task is (used for instruction prompts, Luo et al.).
        pairs: ``((input, output), ...)``, each pair once; an input listed with several outputs has
            several accepted answers (:meth:`answers_of`).
        domain: input-domain id (``"country"``, ``"english_noun"``, ``"letter"``, ...); tasks sharing a
            domain cannot be told apart from the query alone.
    """

    name: str
    family: str
    instruction: str
    pairs: tuple[Pair, ...]
    domain: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name.strip():
            raise ValueError(f"task name must be a non-empty string, got {self.name!r}; pass name=...")
        pairs = tuple((p[0], p[1]) if isinstance(p, (tuple, list)) and len(p) == 2 else p for p in self.pairs)
        if not pairs:
            raise ValueError(f"task {self.name!r} has no pairs; give at least one (input, output) pair")
        seen: set[tuple[str, str]] = set()
        for i, p in enumerate(pairs):
            if not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p)):
                raise ValueError(f"task {self.name!r}: pair {i} is {p!r}, not an (input, output) pair of strings")
            for s in p:
                if not s.strip():
                    raise ValueError(f"task {self.name!r}: pair {i} {p!r} has an empty string; remove that pair")
            if p in seen:
                raise ValueError(f"task {self.name!r}: pair {p!r} appears twice; remove the duplicate")
            seen.add(p)
        object.__setattr__(self, "pairs", pairs)

    def __repr__(self) -> str:
        return (
            f"Task(name={self.name!r}, family={self.family!r}, domain={self.domain!r}, "
            f"n_pairs={len(self.pairs)}, instruction={self.instruction!r})"
        )

    def __len__(self) -> int:
        return len(self.pairs)

    @property
    def inputs(self) -> tuple[str, ...]:
        """The distinct inputs, in file order."""
        return tuple(dict.fromkeys(x for x, _ in self.pairs))

    @property
    def outputs(self) -> tuple[str, ...]:
        """The output of every pair, in file order (one per pair: an input with several answers has several)."""
        return tuple(y for _, y in self.pairs)

    @property
    def multi_answer(self) -> bool:
        """Whether some input has several accepted outputs."""
        return len(self.inputs) < len(self.pairs)

    def answers_of(self, x: str) -> tuple[str, ...]:
        """Every accepted output of input ``x``, in file order (the first is the one prompts show and score)."""
        ys = tuple(y for xx, y in self.pairs if xx == x)
        if not ys:
            raise KeyError(f"{x!r} is not an input of task {self.name!r}")
        return ys

    def as_dict(self) -> dict[str, str]:
        """``{input: output}`` (Hendel et al. 2023 format); an input with several outputs maps to the first."""
        out: dict[str, str] = {}
        for x, y in self.pairs:
            out.setdefault(x, y)
        return out

    def replace_text(self, old: str, new: str) -> "Task":
        """A copy with ``old`` replaced by ``new`` in every input and output (``task.replace_text("\\n", " ")``
        makes ``commonsense_qa``'s multi-line questions one line; ``"\\\\n"`` keeps a visible escape)."""
        if not isinstance(old, str) or not old or not isinstance(new, str):
            raise ValueError(f"replace_text needs a non-empty string to replace and a string to put instead, got {old!r}, {new!r}")
        pairs = list(dict.fromkeys((x.replace(old, new).strip(), y.replace(old, new).strip()) for x, y in self.pairs))
        return dataclasses.replace(self, pairs=tuple(pairs))

    def split(self, which: Split = "train", seed: int = 0) -> tuple[Pair, ...]:
        """The ``which`` part of a deterministic 60/20/20 train/dev/test split.

        The permutation (of the distinct inputs: all the answers of an input stay together) comes from
        ``numpy.random.default_rng([seed, crc32(name)])`` (no global RNG state is touched), so the same
        (task, seed) always gives the same split and different tasks are not split identically. The
        three parts are disjoint and together cover every pair; each keeps the data-file order. Demonstrations come from ``"train"`` and queries from ``"test"`` (Todd et al. 2024).
        """
        if which not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {which!r}; use 'train', 'dev' or 'test'")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return self._split_cached(which, int(seed))

    @lru_cache(maxsize=64)  # noqa: B019 - frozen, hashable instances; splits are tiny
    def _split_cached(self, which: str, seed: int) -> tuple[Pair, ...]:
        # split the distinct inputs, so that all the answers of an input land in the same part
        inputs = self.inputs
        n = len(inputs)
        perm = np.random.default_rng([seed, zlib.crc32(self.name.encode("utf-8"))]).permutation(n)
        n_train = int(round(_SPLIT_FRACTIONS[0] * n))
        n_dev = int(round(_SPLIT_FRACTIONS[1] * n))
        if n >= 3:  # keep every part non-empty when possible
            n_train = max(1, min(n_train, n - 2))
            n_dev = max(1, min(n_dev, n - n_train - 1))
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
        lo, hi = bounds[which]
        chosen = {inputs[i] for i in perm[lo:hi].tolist()}
        return tuple(p for p in self.pairs if p[0] in chosen)

    def vocabulary(self) -> set[str]:
        """Every whitespace-separated word of the inputs, outputs and instruction."""
        words: set[str] = set(self.instruction.split())
        for x, y in self.pairs:
            words.update(x.split())
            words.update(y.split())
        return words

    @classmethod
    def from_json(
        cls,
        path: str | Path,
        name: str | None = None,
        family: str | None = None,
        instruction: str | None = None,
        domain: str | None = None,
    ) -> Task:
        """Load a task from a JSON file in any of the three formats (see the module docstring).

        ``name`` defaults to the file's ``"name"`` or else the file stem; ``family`` to the file's or
        ``"custom"``; ``instruction`` to the file's or ``""``. Explicit arguments override the file.
        Exact duplicate pairs (common in scraped datasets) are dropped; an input with two different
        outputs is an error.

        Raises:
            FileNotFoundError: no such file.
            ValueError: malformed JSON (the message names the file and line) or an unknown layout.
        """
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"task file {str(p)!r} not found; check the path (a JSON file)")
        return _task_from_text(
            p.read_text(encoding="utf-8"), str(p), stem=p.stem, name=name, family=family,
            instruction=instruction, domain=domain,
        )


def _members(text: str, start: int) -> list[tuple[int, Any, Any]]:
    """The items of the JSON array (or the key/value members of the object) opening at ``text[start]``:
    ``[(line, key or None, value), ...]`` — the line each item starts on, for error messages."""
    dec = json.JSONDecoder()
    ws = re.compile(r"\s*")
    out: list[tuple[int, Any, Any]] = []
    is_obj = text[start] == "{"
    i = ws.match(text, start + 1).end()
    if text[i:i + 1] in ("]", "}"):
        return out
    line, last = text.count("\n", 0, i) + 1, i
    while True:
        line, last = line + text.count("\n", last, i), i
        key = None
        if is_obj:
            key, i = dec.raw_decode(text, i)
            i = ws.match(text, i).end() + 1  # the ':'
            i = ws.match(text, i).end()
        value, i = dec.raw_decode(text, i)
        out.append((line, key, value))
        i = ws.match(text, i).end()
        if text[i] != ",":
            return out
        i = ws.match(text, i + 1).end()


def _task_from_text(
    text: str,
    source: str,
    *,
    stem: str,
    name: str | None = None,
    family: str | None = None,
    instruction: str | None = None,
    domain: str | None = None,
) -> Task:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(
            f"malformed JSON in {source}, line {e.lineno} column {e.colno}: {e.msg}; fix the file "
            "(expected a list of {\"input\", \"output\"} objects, an {input: output} object, or tvlens's "
            "{\"name\", \"family\", \"instruction\", \"pairs\"})"
        ) from None
    meta: dict[str, Any] = {}
    pairs: list[Pair] = []
    lines: list[int] = []  # the line of each pair, for errors
    if isinstance(data, dict) and "pairs" in data:  # tvlens format
        meta = data
        raw = data["pairs"]
        if not isinstance(raw, list):
            raise ValueError(f"{source}: \"pairs\" must be a list of [input, output] lists, got a {type(raw).__name__}; "
                             "write \"pairs\": [[\"France\", \"Paris\"], ...]")
        at = re.search(r'"pairs"\s*:\s*\[', text)
        for line, _, item in _members(text, at.end() - 1):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ValueError(
                    f"{source}, line {line}: pair {item!r} is not [input, output]; this file is in tvlens's format "
                    "(it has \"pairs\"), so write every pair as a two-item list [\"France\", \"Paris\"]"
                )
            x = _as_str(item[0], source, line, "the input")
            for y in _as_strs(item[1], source, line):
                pairs.append((x, y))
                lines.append(line)
    elif isinstance(data, list):  # Todd et al. 2024
        for line, _, item in _members(text, text.index("[")):
            if not (isinstance(item, dict) and "input" in item and "output" in item):
                raise ValueError(
                    f"{source}, line {line}: item {item!r} is not an {{\"input\": ..., \"output\": ...}} object; a file "
                    "whose top level is a list is read in Todd et al.'s format, so write every item as "
                    "{\"input\": \"France\", \"output\": \"Paris\"} (or use tvlens's {\"pairs\": [[input, output], ...]})"
                )
            x = _as_str(item["input"], source, line, "the input")
            for y in _as_strs(item["output"], source, line):
                pairs.append((x, y))
                lines.append(line)
    elif isinstance(data, dict):  # Hendel et al. 2023
        for line, k, v in _members(text, text.index("{")):
            for y in _as_strs(v, source, line):
                pairs.append((k.strip(), y))
                lines.append(line)
    else:
        raise ValueError(
            f"{source}: top-level JSON is a {type(data).__name__}; expected a list of {{\"input\", \"output\"}} "
            "objects, an {input: output} object, or tvlens's {\"name\", \"pairs\", ...} object"
        )
    for (x, y), line in zip(pairs, lines):
        if not x or not y:
            raise ValueError(f"{source}, line {line}: the pair ({x!r}, {y!r}) has an empty input or output; remove it "
                             "from the file (or fill it in)")
    unique = list(dict.fromkeys(pairs))  # drop exact duplicates, keep order
    try:
        return Task(
            name=name if name is not None else str(meta.get("name") or stem),
            family=family if family is not None else str(meta.get("family") or "custom"),
            instruction=instruction if instruction is not None else str(meta.get("instruction") or ""),
            pairs=tuple(unique),
            domain=domain if domain is not None else str(meta.get("domain") or ""),
        )
    except ValueError as e:
        raise ValueError(f"{source}: {e}") from None


def _as_strs(v: Any, source: str, line: int) -> list[str]:
    """An output, or a list of accepted outputs."""
    if isinstance(v, list):
        if not v:
            raise ValueError(f"{source}, line {line}: the output is an empty list; give at least one accepted answer")
        return [_as_str(y, source, line, "an output") for y in v]
    return [_as_str(v, source, line, "the output")]


def _as_str(v: Any, source: str, line: int, what: str) -> str:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise ValueError(f"{source}, line {line}: {what} is {v!r}; inputs and outputs must be strings (or numbers), "
                     "and an output may be a list of accepted answers")


# ---------------------------------------------------------------------------------------------------------
# The shipped suite


def _data_dir():  # a Traversable: works from a source tree, a wheel or a zip
    return resources.files("tvlens").joinpath("data", "tasks")


@lru_cache(maxsize=1)
def _suite() -> dict[str, Task]:
    tasks: dict[str, Task] = {}
    for entry in sorted(_data_dir().iterdir(), key=lambda e: e.name):
        if not entry.name.endswith(".json"):
            continue
        stem = entry.name[: -len(".json")]
        task = _task_from_text(entry.read_text(encoding="utf-8"), f"tvlens/data/tasks/{entry.name}", stem=stem)
        tasks[task.name] = task
    order = {f: i for i, f in enumerate(FAMILIES)}
    return dict(sorted(tasks.items(), key=lambda kv: (order.get(kv[1].family, len(order)), kv[0])))


def families() -> tuple[str, ...]:
    """The families present in the shipped suite, in display order."""
    present = {t.family for t in _suite().values()}
    return tuple(f for f in FAMILIES if f in present) + tuple(sorted(present - set(FAMILIES)))


def task_name(task: Any) -> str:
    """The name of a task given as a name, a :class:`Task`, or a prompt batch built from one."""
    if isinstance(task, str):
        return task
    name = getattr(task, "name", None)
    if isinstance(name, str):
        return name
    name = getattr(task, "task", None)  # a PromptBatch
    if isinstance(name, str):
        return name
    raise TypeError(f"expected a task name, Task or PromptBatch, got {type(task).__name__}; pass task names or tvlens Task objects")


def list_tasks(family: str | None = None) -> list[str]:
    """Names of the shipped tasks, grouped by family (then alphabetical); only ``family`` if given."""
    if family is not None and family not in families():
        raise ValueError(f"unknown family {family!r}; use one of {', '.join(families())}")
    return [n for n, t in _suite().items() if family is None or t.family == family]


def load_task(name: str) -> Task:
    """The shipped task called ``name``, or a user task from a path ending in ``.json`` (see :meth:`Task.from_json`).

    Raises:
        UnknownTaskError (a ``KeyError`` and ``ValueError``): no such task; the message suggests close names.
    """
    if isinstance(name, Task):
        return name
    if not isinstance(name, str):
        raise TypeError(f"task name must be a string, got {type(name).__name__}")
    if name.endswith(".json"):
        return Task.from_json(name)
    suite = _suite()
    if name in suite:
        return suite[name]
    key = name.strip().lower().replace("-", "_").replace(" ", "_")
    if key in suite:
        return suite[key]
    close = _close_matches(key, list(suite))
    hint = f": did you mean {_quote_list(close)}?" if close else ""
    raise UnknownTaskError(f"unknown task {name!r}{hint} list them with tvlens.list_tasks()")


def _close_matches(key: str, names: Sequence[str], n: int = 3) -> list[str]:
    """Names close to ``key`` as a whole or by one ``_`` part ('capitol' -> 'country_capital')."""
    scored = []
    for cand in names:
        parts = [cand, *cand.split("_")]
        score = max(difflib.SequenceMatcher(None, key, p).ratio() for p in parts)
        if key in cand:
            score = max(score, 0.8)
        if score >= 0.6:  # ties broken by similarity of the whole name
            scored.append((-score, -difflib.SequenceMatcher(None, key, cand).ratio(), cand))
    return [c for _, _, c in sorted(scored)[:n]]


def _quote_list(names: Sequence[str]) -> str:
    q = [f"'{s}'" for s in names]
    return q[0] if len(q) == 1 else ", ".join(q[:-1]) + " or " + q[-1]


def resolve_tasks(spec: str | Task | Iterable[str | Task]) -> list[Task]:
    """Turn a task specification into a list of tasks (duplicates removed, order kept).

    ``spec`` is ``"all"``, ``"family:<family>"``, a task name, a path to a ``.json`` file, a comma-separated
    string of those, a :class:`Task`, or a sequence of any of these.
    """
    items: list[str | Task]
    if isinstance(spec, (str, Task)):
        items = [spec]
    else:
        items = list(spec)
    out: dict[str, Task] = {}
    for item in items:
        if isinstance(item, Task):
            out.setdefault(item.name, item)
            continue
        if not isinstance(item, str):
            raise TypeError(f"cannot resolve {item!r} to a task; give names, 'family:<name>', 'all' or Task objects")
        for part in (p.strip() for p in item.split(",")):
            if not part:
                continue
            if part == "all":
                names = list_tasks()
            elif part.startswith("family:"):
                names = list_tasks(family=part[len("family:"):].strip())
            else:
                t = load_task(part)
                out.setdefault(t.name, t)
                continue
            for n in names:
                out.setdefault(n, load_task(n))
    if not out:
        raise ValueError(f"task spec {spec!r} names no tasks; use 'all', 'family:knowledge' or task names")
    return list(out.values())


@lru_cache(maxsize=1)
def _suite_vocabulary() -> tuple[str, ...]:
    from .organisms.text.tokenizer import organism_vocabulary

    return tuple(organism_vocabulary(list(_suite().values())))


def suite_vocabulary() -> list[str]:
    """The organism's word-level vocabulary: every word of the shipped suite's pairs and instructions,
    lowercased except where case carries the answer (see :func:`tvlens.organisms.text.tokenizer.organism_vocabulary`)."""
    return list(_suite_vocabulary())
