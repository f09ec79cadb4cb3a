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
"""

from __future__ import annotations

import difflib
import json
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
#: Characters that would break prompt construction (the default separator and the example separator).
_FORBIDDEN = ("\n", "\r", "→")


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
        pairs: ``((input, output), ...)``; inputs are unique (a task is a function).
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
        seen: dict[str, str] = {}
        for i, p in enumerate(pairs):
            if not (isinstance(p, tuple) and len(p) == 2 and all(isinstance(s, str) for s in p)):
                raise ValueError(f"task {self.name!r}: pair {i} is {p!r}, not an (input, output) pair of strings")
            for s in p:
                if not s.strip():
                    raise ValueError(f"task {self.name!r}: pair {i} {p!r} has an empty string; remove that pair")
                bad = [c for c in _FORBIDDEN if c in s]
                if bad:
                    raise ValueError(
                        f"task {self.name!r}: pair {i} {p!r} contains {bad[0]!r}, which prompts use as a separator; "
                        "remove it from the data"
                    )
            x, y = p
            if x in seen and seen[x] != y:
                raise ValueError(
                    f"task {self.name!r}: input {x!r} has two outputs ({seen[x]!r} and {y!r}); a task must be a "
                    "function, keep one output per input"
                )
            if x in seen:
                raise ValueError(f"task {self.name!r}: pair {p!r} appears twice; remove the duplicate")
            seen[x] = y
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
        return tuple(x for x, _ in self.pairs)

    @property
    def outputs(self) -> tuple[str, ...]:
        return tuple(y for _, y in self.pairs)

    def as_dict(self) -> dict[str, str]:
        """``{input: output}`` (Hendel et al. 2023 format)."""
        return dict(self.pairs)

    def split(self, which: Split = "train", seed: int = 0) -> tuple[Pair, ...]:
        """The ``which`` part of a deterministic 60/20/20 train/dev/test split.

        The permutation comes from ``numpy.random.default_rng([seed, crc32(name)])`` (no global RNG state
        is touched), so the same (task, seed) always gives the same split and different tasks are not
        split identically. The three parts are disjoint and together cover every pair; each keeps the
        data-file order. Demonstrations come from ``"train"`` and queries from ``"test"`` (Todd et al. 2024).
        """
        if which not in ("train", "dev", "test"):
            raise ValueError(f"unknown split {which!r}; use 'train', 'dev' or 'test'")
        if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"seed must be a non-negative int, got {seed!r}")
        return self._split_cached(which, int(seed))

    @lru_cache(maxsize=64)  # noqa: B019 - frozen, hashable instances; splits are tiny
    def _split_cached(self, which: str, seed: int) -> tuple[Pair, ...]:
        n = len(self.pairs)
        perm = np.random.default_rng([seed, zlib.crc32(self.name.encode("utf-8"))]).permutation(n)
        n_train = int(round(_SPLIT_FRACTIONS[0] * n))
        n_dev = int(round(_SPLIT_FRACTIONS[1] * n))
        if n >= 3:  # keep every part non-empty when possible
            n_train = max(1, min(n_train, n - 2))
            n_dev = max(1, min(n_dev, n - n_train - 1))
        bounds = {"train": (0, n_train), "dev": (n_train, n_train + n_dev), "test": (n_train + n_dev, n)}
        lo, hi = bounds[which]
        return tuple(self.pairs[i] for i in sorted(perm[lo:hi].tolist()))

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
    if isinstance(data, dict) and "pairs" in data:  # tvlens format
        meta = data
        raw = data["pairs"]
        if not isinstance(raw, list):
            raise ValueError(f"{source}: \"pairs\" must be a list of [input, output] lists")
        pairs = []
        for i, item in enumerate(raw):
            if not (isinstance(item, (list, tuple)) and len(item) == 2):
                raise ValueError(f"{source}: pairs[{i}] is {item!r}; each pair must be [input, output]")
            pairs.append((_as_str(item[0], source, f"pairs[{i}][0]"), _as_str(item[1], source, f"pairs[{i}][1]")))
    elif isinstance(data, list):  # Todd et al. 2024
        pairs = []
        for i, item in enumerate(data):
            if not (isinstance(item, dict) and "input" in item and "output" in item):
                raise ValueError(
                    f"{source}: item {i} is {item!r}; a list file must hold {{\"input\": ..., \"output\": ...}} "
                    "objects (Todd et al. 2024 format)"
                )
            pairs.append((_as_str(item["input"], source, f"[{i}].input"), _as_str(item["output"], source, f"[{i}].output")))
    elif isinstance(data, dict):  # Hendel et al. 2023
        pairs = [(_as_str(k, source, "key"), _as_str(v, source, f"[{k!r}]")) for k, v in data.items()]
    else:
        raise ValueError(
            f"{source}: top-level JSON is a {type(data).__name__}; expected a list of {{\"input\", \"output\"}} "
            "objects, an {input: output} object, or tvlens's {\"name\", \"pairs\", ...} object"
        )
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


def _as_str(v: Any, source: str, where: str) -> str:
    if isinstance(v, str):
        return v.strip()
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(v)
    raise ValueError(f"{source}: {where} is {v!r}; inputs and outputs must be strings")


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
    words: set[str] = set()
    for t in _suite().values():
        words |= t.vocabulary()
    return tuple(sorted(words))


def suite_vocabulary() -> list[str]:
    """Sorted union of :meth:`Task.vocabulary` over the shipped suite (the organism's word-level vocabulary)."""
    return list(_suite_vocabulary())
