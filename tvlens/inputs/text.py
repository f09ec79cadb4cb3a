"""In-context-learning prompts: construction, token classes, alignment, and ICL accuracy.

A prompt is the text ::

    [instruction "\\n"]  x1 " → " y1 example_sep  x2 " → " y2 example_sep ...  q " →"

i.e. demonstrations ``"x → y"`` joined by ``example_sep`` (default ``"\\n"``), then the query and
the final separator, after which the model should produce the answer (Hendel et al. 2023, §2:
``x → y`` prompts; Todd et al. 2024, §2: the same structure with ``Q:/A:``).

**Tokenization.** The whole text of each prompt is tokenized at once by the model's own
tokenizer, without special tokens (the tokenizer's BOS is prepended when the model prepends one,
``model.cfg.default_prepend_bos``), so the model sees exactly the tokens of the text a user would
type — on GPT-2's byte-level BPE, SentencePiece (Llama-2 / Mistral), Llama-3, Qwen and the
organism's word-level tokenizer alike. Token classes (:class:`TokenClass`, after Todd et al. 2024,
§2 and App. F) come from each token's character offsets: a token belongs to the part of the text
its characters are in (a token of spaces only, to the part after it). A token that straddles two
parts of different classes — a separator merged with a word, an output merged with the example
separator — is refused with the tokens seen in context, and so is a separator or example
separator that is not one token of its own *in context* (``"\n"`` alone is two SentencePiece
tokens, inside text one). ``answer_tokens`` are the tokens that follow the prompt when
``" " + answer`` is appended to its text — what the model must emit after ``" →"``.

**Several accepted answers.** A task may list several outputs for one input (Todd et al.'s
``next_item``, ``national_parks``, ...). ``answers`` / ``answer_ids`` / ``answer_tokens`` hold the
first one listed; ``other_answers`` / ``other_answer_tokens`` hold the rest (``accepted_answers``
gives all). Every score counts any of them: ICL accuracy (:func:`evaluate_prompts`,
:func:`first_token_accuracy`) when a prediction matches any, and the metrics of
:mod:`tvlens.metrics` (patching, sweeps, selection: the first token of the *best* accepted answer,
:func:`tvlens.metrics.accepted_metric`, and :func:`answer_logprob` alike). Demonstrations show the
first listed output.

**Alignment.** Batches are LEFT-padded (``pad_token_id``, else ``eos``, else 0) with
``attention_mask`` 0 on pads, so the final separator is position ``-1`` of *every* row
(:attr:`PromptBatch.separator_index`).

**Sampling.** Queries come from ``task.split(split)`` (default ``"test"``) in a seeded permutation,
cycling through it again when ``n_prompts`` exceeds its size; demonstrations come from the train
split, with the query's input removed and duplicate inputs collapsed, in a seeded per-prompt
permutation: the demos of ``n_shots=k`` are the first ``k`` of those of ``n_shots=n > k`` with
the same seed, and prompt ``i`` does not depend on ``n_prompts``, ``dummy_query`` or
``shuffle_labels``. Every draw uses its own ``numpy.random.Generator`` seeded from ``seed``; no
global RNG is touched.

**Variants** (see :func:`icl_prompts`): zero-shot (``n_shots=0``), instruction prefix or
instruction only (Luo et al.), shuffled labels (Todd et al. 2024), dummy query (Hendel et al.
2023). With a dummy query, ``queries``/``answers`` describe the dummy in the prompt and
``real_queries``/``real_answers`` the query it stands for; Hendel's evaluation pairs them as ::

    ctx = icl_prompts(model, task, n_prompts=50, n_shots=5, dummy_query=True)       # extract theta here
    zs = icl_prompts(model, task, n_shots=0, queries=list(zip(ctx.real_queries, ctx.real_answers)))
    # patch theta into zs at the final separator and score zs.answer_ids
"""

from __future__ import annotations

import bisect
import dataclasses
import difflib
import functools
import re
import warnings
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

from ..checks import check_int as _check_int
from ..engine.batch import RowSlicing, row_index
from ..engine.plan import rows_per_forward
from ..vocabulary import BATCH_SIZE, N_PROMPTS

__all__ = [
    "TokenClass",
    "PromptRows",
    "PromptBatch",
    "ContextPrompts",
    "context_prompts",
    "TokenCollisionWarning",
    "PROMPT_OPTIONS",
    "prompt_options",
    "prompts_from_text",
    "answer_first_tokens",
    "answer_token_stats",
    "IclAccuracy",
    "icl_prompts",
    "evaluate_icl",
    "evaluate_prompts",
    "final_logits",
    "first_token_accuracy",
    "answer_logprob",
    "full_answer_match",
]

Pair = tuple[str, str]

#: separators tried when the requested one is not a single token, to suggest one that is
_SEPARATOR_CANDIDATES = ("→", ":", "->", "=", "|", "=>", "is", ">")
_SPLITS = ("train", "dev", "test")


class TokenClass(IntEnum):
    """Role of each token in an ICL prompt (Todd et al. 2024, §2: token classes of a prompt)."""

    PAD = 0
    BOS = 1
    #: the instruction sentence and the newline that ends it
    INSTRUCTION = 2
    DEMO_INPUT = 3
    #: the separator inside a demonstration ("x → y")
    DEMO_SEP = 4
    DEMO_OUTPUT = 5
    #: the example separator after a demonstration (default "\n")
    DEMO_NEWLINE = 6
    QUERY_INPUT = 7
    #: the last token of every prompt: the position the answer is read from
    FINAL_SEP = 8


# ----------------------------------------------------------------------------------------------
# PromptBatch


@dataclass(frozen=True, eq=False)
class PromptRows(RowSlicing):
    """The fields every batch of ICL prompts has, text or multimodal: left-padded ``tokens``, their
    ``attention_mask`` and ``token_class`` (:class:`TokenClass`), and per row the answer's first token,
    all its tokens, the query and the answer (Hendel et al. 2023, §2; Luo et al. 2024, §3)."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    token_class: Int[Tensor, "batch pos"]
    #: first token of each answer (as it follows the final separator)
    answer_ids: Int[Tensor, " batch"]
    answer_tokens: tuple[tuple[int, ...], ...]
    queries: tuple[str, ...]
    answers: tuple[str, ...]

    # -- shape and positions (subclasses hold other_answers / other_answer_tokens) -------------

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    @property
    def separator_index(self) -> int:
        """Position of the final separator in every row: always -1 (batches are left-padded)."""
        return -1

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real (non-pad) tokens per row."""
        return self.attention_mask.sum(-1)

    def positions_of(self, *classes: TokenClass | int) -> Bool[Tensor, "batch pos"]:
        """Boolean mask of the positions whose class is any of ``classes``."""
        if not classes:
            raise ValueError("positions_of needs at least one TokenClass, e.g. batch.positions_of(TokenClass.DEMO_SEP)")
        mask = torch.zeros_like(self.token_class, dtype=torch.bool)
        for c in classes:
            mask |= self.token_class == int(TokenClass(c))
        return mask

    @property
    def accepted_answers(self) -> tuple[tuple[str, ...], ...]:
        """Every accepted answer of each row: ``answers[i]`` first, then ``other_answers[i]``."""
        return tuple((a, *o) for a, o in zip(self.answers, self.other_answers))  # type: ignore[attr-defined]

    @property
    def accepted_answer_tokens(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """Their tokens, as they follow each prompt: ``answer_tokens[i]`` first."""
        return tuple((tuple(a), *o) for a, o in zip(self.answer_tokens, self.other_answer_tokens))  # type: ignore[attr-defined]


@dataclass(frozen=True, eq=False)
class PromptBatch(PromptRows):
    """A batch of left-padded ICL prompts for one task.

    Tensors live on the CPU unless :meth:`to` moved them. Per-row string fields are tuples aligned
    with the batch dimension.

    ``queries`` / ``answers`` / ``answer_ids`` / ``answer_tokens`` describe the query *actually in
    the prompt*: with ``dummy_query=True`` that is the dummy (Hendel et al. 2023, §3.1), and the
    real query the prompt stands for is in ``real_queries`` / ``real_answers`` /
    ``real_answer_tokens`` (equal to the former when there is no dummy). ``demos`` holds the
    (input, output) pairs shown in each prompt (with ``shuffle_labels`` the shown, permuted,
    outputs).
    """

    #: the prompt text of each row, without BOS and padding: its whole-text tokenization is the row's tokens
    texts: tuple[str, ...]
    task: str
    n_shots: int
    seed: int
    #: build options (separator, example_sep, split, dummy_query, shuffle_labels, instruction, prepend_bos)
    options: Mapping[str, Any] = field(default_factory=dict)
    demos: tuple[tuple[Pair, ...], ...] = ()
    real_queries: tuple[str, ...] = ()
    real_answers: tuple[str, ...] = ()
    real_answer_tokens: tuple[tuple[int, ...], ...] = ()
    #: the other accepted answers of each row, besides ``answers[i]`` (empty for most tasks), and their tokens
    other_answers: tuple[tuple[str, ...], ...] = ()
    other_answer_tokens: tuple[tuple[tuple[int, ...], ...], ...] = ()

    def __post_init__(self) -> None:
        b = self.tokens.shape[0]
        if self.tokens.ndim != 2 or self.attention_mask.shape != self.tokens.shape or self.token_class.shape != self.tokens.shape:
            raise ValueError(
                f"tokens, attention_mask and token_class must be [batch, pos] of one shape, got "
                f"{tuple(self.tokens.shape)}, {tuple(self.attention_mask.shape)}, {tuple(self.token_class.shape)}"
            )
        per_row = {
            "answer_ids": self.answer_ids.shape[0] if self.answer_ids.ndim == 1 else -1,
            "answer_tokens": len(self.answer_tokens),
            "queries": len(self.queries),
            "answers": len(self.answers),
            "texts": len(self.texts),
        }
        bad = {k: v for k, v in per_row.items() if v != b}
        if bad:
            raise ValueError(f"per-row fields must have batch size {b}, got {bad}")
        # the real_* and demos fields default to the in-prompt ones / empty
        if not self.real_queries:
            object.__setattr__(self, "real_queries", self.queries)
        if not self.real_answers:
            object.__setattr__(self, "real_answers", self.answers)
        if not self.real_answer_tokens:
            object.__setattr__(self, "real_answer_tokens", self.answer_tokens)
        if not self.other_answers:
            object.__setattr__(self, "other_answers", ((),) * b)
        if not self.other_answer_tokens:
            object.__setattr__(self, "other_answer_tokens", ((),) * b)
        for name in ("demos", "real_queries", "real_answers", "real_answer_tokens", "other_answers",
                     "other_answer_tokens"):
            n = len(getattr(self, name))
            allowed = (0, b) if name == "demos" else (b,)  # demos may be left out by hand-made batches
            if n not in allowed:
                raise ValueError(f"{name} must have {b} rows, got {n}")

    # -- copies ---------------------------------------------------------------------------------

    def to(self, device: str | torch.device) -> "PromptBatch":
        """A copy with the tensors on ``device``."""
        return dataclasses.replace(
            self,
            tokens=self.tokens.to(device),
            attention_mask=self.attention_mask.to(device),
            token_class=self.token_class.to(device),
            answer_ids=self.answer_ids.to(device),
        )

    def select(self, index: Sequence[int] | Tensor) -> "PromptBatch":
        """The rows ``index`` (row numbers or a boolean mask), padding width unchanged."""
        return dataclasses.replace(self, **self._row_fields(row_index(index, len(self))))

    def trimmed(self) -> "PromptBatch":
        """The same prompts without the leading columns that are padding in every row."""
        real = self.attention_mask.bool().any(0)
        if bool(real.all()):
            return self
        first = int(real.nonzero()[0]) if bool(real.any()) else self.tokens.shape[1]
        return dataclasses.replace(
            self,
            tokens=self.tokens[:, first:],
            attention_mask=self.attention_mask[:, first:],
            token_class=self.token_class[:, first:],
        )

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items()
                         if v is not False and v is not None and k != "pad_token_id")
        return (
            f"PromptBatch(task={self.task!r}, n_prompts={len(self)}, n_shots={self.n_shots}, seed={self.seed}, "
            f"pos={self.tokens.shape[1]}{', ' + opts if opts else ''})"
        )


@dataclass(frozen=True, eq=False)
class ContextPrompts(RowSlicing):
    """ICL prompts that are read and never scored (:func:`context_prompts`): Hendel et al. 2023's
    context prompts (§3.1), whose final-position residual is the task vector. ``tokens``,
    ``attention_mask``, ``token_class``, ``texts``, ``demos`` and ``queries`` (the query in each prompt)
    are what :class:`PromptBatch` would hold for the same arguments; there are no answer tokens."""

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    token_class: Int[Tensor, "batch pos"]
    texts: tuple[str, ...]
    queries: tuple[str, ...]
    task: str
    n_shots: int
    seed: int
    options: Mapping[str, Any] = field(default_factory=dict)
    demos: tuple[tuple[Pair, ...], ...] = ()

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def select(self, index: Sequence[int] | Tensor) -> "ContextPrompts":
        """The rows ``index`` (row numbers or a boolean mask), padding width unchanged."""
        return dataclasses.replace(self, **self._row_fields(row_index(index, len(self))))

    def __repr__(self) -> str:
        return (f"ContextPrompts(task={self.task!r}, n_prompts={len(self)}, n_shots={self.n_shots}, seed={self.seed}, "
                f"pos={self.tokens.shape[1]})")

# ----------------------------------------------------------------------------------------------
# building prompts


def _resolve_task(task: Any) -> Any:
    if isinstance(task, str):
        from ..tasks import load_task  # unknown names raise there, with close matches

        return load_task(task)
    if all(hasattr(task, a) for a in ("name", "pairs", "split")):
        return task
    raise TypeError(
        f"task must be a task name or a tvlens Task, got {type(task).__name__}; "
        "list names with tvlens.list_tasks() or build one with tvlens.Task.from_json(path)"
    )


def _tokenizer_of(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is not None:
        from ..models import require_compatible

        require_compatible(model)  # every prompt builder and evaluation starts here
        return tok
    if callable(getattr(model, "encode", None)) and hasattr(model, "convert_ids_to_tokens"):
        return model  # a bare Hugging Face tokenizer
    raise TypeError(
        f"expected a TransformerLens model with a tokenizer (or a Hugging Face tokenizer), got {type(model).__name__}; "
        "load one with tvlens.load_model(name_or_path)"
    )


def _n_ctx_of(model: Any, tokenizer: Any) -> int | None:
    cfg = getattr(model, "cfg", None)
    if cfg is not None and getattr(cfg, "n_ctx", None):
        return int(cfg.n_ctx)
    m = getattr(tokenizer, "model_max_length", None)
    return int(m) if isinstance(m, int) and 0 < m < 10**8 else None


def _pad_id(tokenizer: Any) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if v is not None:
            return int(v)
    return 0


def _encode_all(tokenizer: Any, pieces: Sequence[str]) -> dict[str, tuple[int, ...]]:
    """Tokenize every distinct string once (one batched tokenizer call), without special tokens."""
    uniq = sorted(set(pieces))
    if not uniq:
        return {}
    ids = _encode_texts(tokenizer, uniq)[0] if getattr(tokenizer, "is_fast", False) else \
        tokenizer(uniq, add_special_tokens=False)["input_ids"]
    return {s: tuple(int(i) for i in t) for s, t in zip(uniq, ids)}


def _token_strs(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [str(t) for t in tokenizer.convert_ids_to_tokens([int(i) for i in ids])]


def _dedupe(pairs: Sequence[Pair]) -> list[Pair]:
    """One pair per input, the first listed (a task with several accepted answers lists them all)."""
    seen: set[str] = set()
    out = []
    for x, y in pairs:
        if x not in seen:
            seen.add(x)
            out.append((x, y))
    return out


def _accepted_of(task: Any) -> dict[str, tuple[str, ...]]:
    """input -> every accepted output, in file order."""
    acc: dict[str, list[str]] = {}
    for x, y in task.pairs:
        ys = acc.setdefault(x, [])
        if y not in ys:
            ys.append(y)
    return {x: tuple(ys) for x, ys in acc.items()}


def _derange(outputs: list[str], rng: np.random.Generator) -> list[str]:
    """Permute outputs so that no demo keeps its own output (Todd et al. 2024, §3: shuffled labels).

    Prefer a permutation under which no demo shows its *true output string* (outputs may repeat,
    e.g. continents); if none is found quickly, settle for no demo keeping its own position.
    """
    n = len(outputs)
    if n < 2:
        return list(outputs)
    for _ in range(200):
        p = rng.permutation(n)
        if all(outputs[p[j]] != outputs[j] for j in range(n)):
            return [outputs[k] for k in p]
    for _ in range(1000):
        p = rng.permutation(n)
        if all(p[j] != j for j in range(n)):
            return [outputs[k] for k in p]
    return outputs[1:] + outputs[:1]  # a cyclic shift is always a derangement


def _normalise_queries(task: Any, queries: Any) -> list[tuple[str, tuple[str, ...]]]:
    """-> (input, accepted answers) per query; the first accepted answer is the one scored by metrics."""
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Iterable):
        raise TypeError(
            f"queries must be a list of input strings or (input, output) pairs, got {type(queries).__name__}; "
            "e.g. queries=['France', 'Japan']"
        )
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty: pass at least one query, or leave queries=None to draw them from the split")
    accepted = _accepted_of(task)
    folded = {x.casefold(): x for x in accepted}
    out: list[tuple[str, tuple[str, ...]]] = []
    for q in queries:
        if isinstance(q, str):
            if q not in accepted:
                same_case = folded.get(q.casefold())
                close = [same_case] if same_case else difflib.get_close_matches(q, list(accepted), n=3)
                hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
                raise ValueError(
                    f"query {q!r} is not an input of task {task.name!r}: {hint}"
                    "pass (input, output) pairs to use queries outside the task"
                )
            out.append((q, accepted[q]))
        elif isinstance(q, (tuple, list)) and len(q) == 2 and all(isinstance(s, str) for s in q):
            x, y = q
            others = accepted.get(x, ())
            out.append((x, (y, *[o for o in others if o != y]) if y in others else (y,)))
        else:
            raise TypeError(f"each query must be an input string or an (input, output) pair of strings, got {q!r}")
    return out


def _contains(text: str, mark: str) -> bool:
    """Whether ``mark`` occurs in ``text``; a word mark ("is") only as a whole word, not inside "paris"."""
    if not mark.strip():
        return bool(mark) and mark in text and mark not in (" ", "\t")
    if mark != mark.strip() and mark in text:
        return True
    mark = mark.strip()
    if re.fullmatch(r"\w+", mark):
        return re.search(rf"(?<!\w){re.escape(mark)}(?!\w)", text) is not None
    return mark in text


@functools.lru_cache(maxsize=1 << 16)
def _marks(text: str, separator: str, example_sep: str) -> tuple[bool, bool]:
    """Whether one input/output contains the separator, the example separator (cached: every prompt
    build of a task checks the same train pairs)."""
    return _contains(text, separator), _contains(text, example_sep)


def _check_pair_text(task_name: str, pairs: Sequence[Pair], separator: str, example_sep: str) -> None:
    """Refuse pairs that would make the prompt ambiguous, with the fix (checked on every pair used)."""
    hits_sep: list[str] = []
    hits_ex: list[str] = []
    for x, y in pairs:
        for s in (x, y):
            if not s.strip():
                raise ValueError(f"task {task_name!r} has an empty input or output in pair {(x, y)!r}; remove it from the data")
            has_sep, has_ex = _marks(s, separator, example_sep)
            if has_sep:
                hits_sep.append(s)
            elif has_ex:
                hits_ex.append(s)
    if hits_sep:
        raise ValueError(
            f"{len(hits_sep)} inputs/outputs of task {task_name!r} contain the separator {separator!r} (first: "
            f"{hits_sep[0]!r}), so the prompt would be ambiguous; pass another separator (e.g. separator=':') or "
            f"replace it in the data: task = task.replace_text({separator!r}, ...)"
        )
    if hits_ex:
        texts = [s for p in pairs for s in p]
        free = [c for c in ("\n\n", " | ", " ; ") if c != example_sep and not any(_contains(s, c) for s in texts)]
        alt = f"pass an example_sep none of them contains (example_sep={free[0]!r}), or " if free else ""
        raise ValueError(
            f"{len(hits_ex)} inputs/outputs of task {task_name!r} contain the example separator {example_sep!r} "
            f"(first: {hits_ex[0]!r}), so demonstrations could not be told apart; {alt}replace it in the data "
            f"(task = task.replace_text({example_sep!r}, ' '), or {example_sep.encode('unicode_escape').decode()!r} "
            "to keep it visible as an escape)"
        )


# ----------------------------------------------------------------------------------------------
# whole-text tokenization


@dataclass
class _Layout:
    """One prompt's text and the character spans of its parts (class, demo index; gaps have none)."""

    text: str = ""
    spans: list[tuple[int, int, int, int]] = field(default_factory=list)

    def add(self, s: str, cls: TokenClass | None = None, demo: int = -1) -> None:
        if cls is not None and s:
            self.spans.append((len(self.text), len(self.text) + len(s), int(cls), demo))
        self.text += s

    @classmethod
    def of(cls, parts: Sequence[tuple[str, int | None, int]]) -> "_Layout":
        """The layout of ``(text, class or None for a gap, demo index)`` parts, in order (what
        :meth:`add` does part by part, with one join)."""
        spans, at = [], 0
        for s, c, demo in parts:
            if c is not None and s:
                spans.append((at, at + len(s), int(c), demo))
            at += len(s)
        return cls("".join([p[0] for p in parts]), spans)


_CLASS_WORDS = {
    TokenClass.INSTRUCTION: "the instruction",
    TokenClass.DEMO_INPUT: "a demonstration input",
    TokenClass.DEMO_SEP: "the separator",
    TokenClass.DEMO_OUTPUT: "a demonstration output",
    TokenClass.DEMO_NEWLINE: "the example separator",
    TokenClass.QUERY_INPUT: "the query",
    TokenClass.FINAL_SEP: "the final separator",
}


def _encode_texts(tokenizer: Any, texts: Sequence[str]) -> tuple[list[list[int]], list[list[tuple[int, int]]]]:
    """Token ids and character offsets of each whole text (no special tokens)."""
    if not getattr(tokenizer, "is_fast", True):
        raise ValueError(
            f"{type(tokenizer).__name__} is a slow (Python) tokenizer, which gives no character offsets; tvlens finds "
            "token classes and answer tokens from offsets: load the model's fast tokenizer (use_fast=True, the default)"
        )
    backend = getattr(tokenizer, "_tokenizer", None)
    if _backend_as_called(tokenizer, backend):  # what the call below computes, without its per-text wrapping
        encs = backend.encode_batch(list(texts), add_special_tokens=False)
        return [e.ids for e in encs], [e.offsets for e in encs]
    enc = tokenizer(list(texts), add_special_tokens=False, return_offsets_mapping=True)
    ids = [[int(i) for i in row] for row in enc["input_ids"]]
    offs = [[(int(a), int(b)) for a, b in row] for row in enc["offset_mapping"]]
    return ids, offs


def _backend_as_called(tokenizer: Any, backend: Any) -> bool:
    """Whether the Rust tokenizer under a fast HF tokenizer, called directly, encodes as
    ``tokenizer(texts, add_special_tokens=False)`` does: no truncation or padding left set on it and
    special tokens treated as the wrapper would (the wrapper sets these before every call)."""
    try:
        return (backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None
                and backend.padding is None
                and bool(backend.encode_special_tokens) == bool(getattr(tokenizer, "split_special_tokens", False)))
    except AttributeError:
        return False


def _context(tokenizer: Any, ids: Sequence[int], at: int, width: int = 4) -> str:
    lo, hi = max(0, at - width), min(len(ids), at + width + 1)
    toks = _token_strs(tokenizer, ids[lo:hi])
    return ("[..., " if lo else "[") + ", ".join(repr(t) for t in toks) + (", ...]" if hi < len(ids) else "]")


def _assign(tokenizer: Any, lay: _Layout, ids: Sequence[int], offsets: Sequence[tuple[int, int]], where: str,
            fix: Mapping[str, Any]) -> tuple[list[int], list[int]]:
    """Class and span index of every token, from its character offsets.

    A token made only of gap characters (a space) or of no characters belongs to the part after it.
    A token that covers characters of two parts of different classes means the parts are not
    separate tokens in this text: refused, with the tokens seen in context.
    """
    n = len(lay.text)
    # parts are added in text order and never overlap, so the parts a token touches are a run found by bisection
    starts = [sp[0] for sp in lay.spans]
    ends = [sp[1] for sp in lay.spans]
    span_of: list[int] = []
    for t, (s, e) in enumerate(offsets):
        lo, hi = max(0, s), min(e, n)
        ks: list[int] = []
        k = bisect.bisect_right(ends, lo)
        while lo < hi and k < len(starts) and starts[k] < hi:
            ks.append(k)
            k += 1
        classes = list(dict.fromkeys(lay.spans[k][2] for k in ks))
        if len(classes) > 1:
            classes = [TokenClass(c) for c in classes]
            key = ("example_sep" if TokenClass.DEMO_NEWLINE in classes else
                   "separator" if {TokenClass.DEMO_SEP, TokenClass.FINAL_SEP} & set(classes) else "")
            hint = fix.get(key) or fix.get("")
            hint = hint(lay) if callable(hint) else str(hint or "put spaces around that part, or change the data")
            named = [_CLASS_WORDS.get(c, c.name) for c in classes]
            raise ValueError(
                f"{where}: the token {_token_strs(tokenizer, [ids[t]])[0]!r} (text {lay.text[s:e]!r}) spans "
                f"{', '.join(named[:-1])} and {named[-1]}, so they are not separate tokens in context (tokens seen: "
                f"{_context(tokenizer, ids, t)}) and token classes would not be exact; {hint}"
            )
        span_of.append(ks[0] if ks else -1)
    # tokens of gaps only (or empty) join the next part; a trailing one the part before it
    nxt = -1
    for t in range(len(span_of) - 1, -1, -1):
        if span_of[t] >= 0:
            nxt = span_of[t]
        elif nxt >= 0:
            span_of[t] = nxt
    prev = -1
    for t in range(len(span_of)):
        if span_of[t] >= 0:
            prev = span_of[t]
        else:
            span_of[t] = prev
    return [lay.spans[k][2] if k >= 0 else int(TokenClass.PAD) for k in span_of], span_of


def _assign_each(tokenizer: Any, layouts: Sequence[_Layout], ids_all: Sequence[Sequence[int]],
                 offs_all: Sequence[Sequence[tuple[int, int]]], names: str, separator: str,
                 fix: Mapping[str, Any]) -> tuple[list[list[int]], list[list[int]]]:
    """Classes and part indices of every row's tokens, row by row; raises on the first row whose parts
    are not exact tokens, with the tokens seen in context."""
    sep_fix, ex_fix = fix["separator"], fix["example_sep"]
    classes_all, spans_all = [], []
    for r, (lay, ids, offs) in enumerate(zip(layouts, ids_all, offs_all)):
        where = f"prompt {r} of {names}"
        if not ids:
            raise ValueError(f"{where} tokenizes to nothing ({lay.text!r}); clean the data")
        cls, span_of = _assign(tokenizer, lay, ids, offs, where, fix)
        counts = [0] * len(lay.spans)
        for k in span_of:
            if k >= 0:
                counts[k] += 1
        for k, (s, e, c, _) in enumerate(lay.spans):
            c = TokenClass(c)
            if counts[k] == 0:
                raise ValueError(f"{where}: {_CLASS_WORDS.get(c, c.name)} {lay.text[s:e]!r} has no token of its own in "
                                 f"context ({lay.text!r}); clean the data")
            if counts[k] > 1 and c in (TokenClass.FINAL_SEP, TokenClass.DEMO_SEP):
                first = span_of.index(k)
                toks = _token_strs(tokenizer, [i for i, kk in zip(ids, span_of) if kk == k])
                what = "example_sep" if c == TokenClass.DEMO_NEWLINE else "separator"
                hint = (ex_fix if c == TokenClass.DEMO_NEWLINE else sep_fix)(lay)
                raise ValueError(
                    f"{where}: the {what} {lay.text[s:e]!r} is {counts[k]} tokens {toks} in context (tokens seen: "
                    f"{_context(tokenizer, ids, first)}); it must be one token so that token classes and the final "
                    f"position are exact; {hint}"
                )
        if cls[-1] != int(TokenClass.FINAL_SEP):
            raise ValueError(f"{where}: the last token is not the final separator (tokens seen: "
                             f"{_context(tokenizer, ids, len(ids) - 1)}); end each prompt with the separator {separator!r}")
        classes_all.append(cls)
        spans_all.append(span_of)
    return classes_all, spans_all


def _assign_all(layouts: Sequence[_Layout],
                offs_all: Sequence[Sequence[tuple[int, int]]]) -> tuple[list[list[int]], list[list[int]]] | None:
    """What :func:`_assign_each` computes, for every row at once (numpy over the batch's tokens), or
    ``None`` when some row has a problem (a token over two parts, a part without a token of its own,
    a separator of several tokens, a last token that is not the final separator): then the
    row-by-row path raises, naming it."""
    R = len(layouts)
    n_tok = np.fromiter((len(o) for o in offs_all), np.int64, R)
    n_sp = np.fromiter((len(lay.spans) for lay in layouts), np.int64, R)
    if R == 0 or int(n_tok.min()) == 0 or int(n_sp.sum()) == 0:
        return None
    # rows laid end to end (one character apart), so one sorted array of part bounds serves them all
    lens = np.fromiter((len(lay.text) for lay in layouts), np.int64, R)
    base = np.concatenate([[0], np.cumsum(lens + 1)[:-1]])
    sp = np.array([x for lay in layouts for span in lay.spans for x in span], dtype=np.int64).reshape(-1, 4)
    sp_row = np.repeat(np.arange(R), n_sp)
    starts, ends, cls = sp[:, 0] + base[sp_row], sp[:, 1] + base[sp_row], sp[:, 2]
    off = np.array([x for row in offs_all for pair in row for x in pair], dtype=np.int64).reshape(-1, 2)
    tok_row = np.repeat(np.arange(R), n_tok)
    lo = np.maximum(off[:, 0], 0)
    hi = np.minimum(off[:, 1], lens[tok_row])
    lo_g, hi_g = lo + base[tok_row], hi + base[tok_row]
    n_parts = len(starts)
    k = np.searchsorted(ends, lo_g, side="right")  # the first part ending after the token starts
    kk = np.minimum(k, n_parts - 1)
    touch = (lo < hi) & (k < n_parts) & (starts[kk] < hi_g)
    j, more = k + 1, touch.copy()
    while more.any():  # the further parts a token covers: any of another class is a problem
        jj = np.minimum(j, n_parts - 1)
        more &= (j < n_parts) & (starts[jj] < hi_g)
        if (more & (cls[jj] != cls[kk])).any():
            return None
        j += 1
    # a token of gap characters only joins the next part of its row, a trailing one the part before it
    pos = np.arange(len(off))
    big = len(off)
    nxt = np.minimum.accumulate(np.where(touch, pos, big)[::-1])[::-1]
    prv = np.maximum.accumulate(np.where(touch, pos, -1))
    nxt_ok = (nxt < big) & (tok_row[np.minimum(nxt, big - 1)] == tok_row)
    prv_ok = (prv >= 0) & (tok_row[np.maximum(prv, 0)] == tok_row)
    part = np.where(touch, kk, np.where(nxt_ok, kk[np.minimum(nxt, big - 1)], np.where(prv_ok, kk[np.maximum(prv, 0)], -1)))
    counts = np.bincount(part[part >= 0], minlength=n_parts)
    seps = (cls == int(TokenClass.FINAL_SEP)) | (cls == int(TokenClass.DEMO_SEP))
    tok_cls = np.where(part >= 0, cls[np.maximum(part, 0)], int(TokenClass.PAD))
    last = np.cumsum(n_tok) - 1
    if (counts == 0).any() or (seps & (counts > 1)).any() or (tok_cls[last] != int(TokenClass.FINAL_SEP)).any():
        return None
    local = np.where(part >= 0, part - (np.cumsum(n_sp) - n_sp)[tok_row], -1)
    cuts = np.cumsum(n_tok)[:-1]
    return ([c.tolist() for c in np.split(tok_cls, cuts)], [c.tolist() for c in np.split(local, cuts)])


def _build(
    tokenizer: Any,
    layouts: Sequence[_Layout],
    answers: Sequence[Sequence[str]] | None,
    *,
    names: str,
    separator: str,
    example_sep: str,
    use_bos: bool,
    n_ctx: int | None,
    real: Sequence[tuple[str, Sequence[str]]] | None = None,
) -> dict[str, Any]:
    """Tokenize whole prompt texts; classes from offsets; answers as they follow each prompt.

    ``answers[i]``: accepted answers of row ``i`` (the first one is scored by the metrics); None for
    prompts that are only read (no answer tokens). Returns the tensors and the per-row answer tokens,
    or raises before any forward.
    """
    texts = [lay.text for lay in layouts]
    ids_all, offs_all = _encode_texts(tokenizer, texts)
    def sep_fix(lay: _Layout) -> str:  # computed only for an error, in that prompt's context
        return _separator_hint(tokenizer, separator, lay)

    def ex_fix(lay: _Layout) -> str:
        return _example_sep_hint(tokenizer, example_sep, lay)

    fix = {"separator": sep_fix, "example_sep": ex_fix, "": "put spaces around that part, or change the data"}
    # every row at once; only a batch with a problem takes the row-by-row path, which names it exactly
    checked = _assign_all(layouts, offs_all)
    if checked is None:
        checked = _assign_each(tokenizer, layouts, ids_all, offs_all, names, separator, fix)
    classes_all, spans_all = checked

    # ---- unknown words (word-level vocabularies) -------------------------------------------------
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk not in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        missing: list[str] = []
        for lay, ids, span_of in zip(layouts, ids_all, spans_all):
            if unk not in ids:  # most rows: no unknown word, nothing to look up
                continue
            for i, k in zip(ids, span_of):
                if i == unk and k >= 0:
                    s, e, c, _ = lay.spans[k]
                    if c in (TokenClass.FINAL_SEP, TokenClass.DEMO_SEP, TokenClass.DEMO_NEWLINE):
                        what, hint = ("example_sep", ex_fix(lay)) if c == TokenClass.DEMO_NEWLINE else ("separator", sep_fix(lay))
                        raise ValueError(f"the {what} {lay.text[s:e]!r} is not in this tokenizer's vocabulary (it becomes "
                                         f"{tokenizer.unk_token!r}); {hint}")
                    if lay.text[s:e] not in missing:
                        missing.append(lay.text[s:e])
        ans_words = sorted({a for acc in answers or () for a in acc})
        ans_ids = _encode_all(tokenizer, [" " + a for a in ans_words])
        missing += [a for a in ans_words if unk in ans_ids[" " + a] and a not in missing]
        if missing:
            raise ValueError(
                f"{len(missing)} words of {names} are not in this tokenizer's vocabulary (they would become "
                f"{tokenizer.unk_token!r}): {missing[:8]!r}; use a model whose tokenizer covers the task or drop those pairs"
            )

    # ---- answers, as the model must emit them after each prompt ----------------------------------
    def continuations(prefixes: Sequence[str], prefix_ids: Sequence[Sequence[int]], accs: Sequence[Sequence[str]],
                      rows: Sequence[int]) -> list[tuple[tuple[int, ...], ...]]:
        flat = [(r, j, prefixes[r] + " " + a) for r in rows for j, a in enumerate(accs[r])]
        full, _ = _encode_texts(tokenizer, [t for _, _, t in flat]) if flat else ([], [])
        out: list[list[tuple[int, ...]]] = [[] for _ in prefixes]
        for (r, j, t), ids in zip(flat, full):
            p = list(prefix_ids[r])
            if ids[: len(p)] != p or len(ids) == len(p):
                at = next((k for k, (x, y) in enumerate(zip(ids, p)) if x != y), min(len(p), len(ids)) - 1)
                raise ValueError(
                    f"prompt {r} of {names}: the answer {accs[r][j]!r} does not follow the prompt as separate tokens: "
                    f"'<prompt> {accs[r][j]}' tokenizes as {_context(tokenizer, ids, max(0, at))}, the prompt alone ends "
                    f"{_context(tokenizer, p, len(p) - 1)}; {sep_fix(layouts[r]) if r < len(layouts) else ''}"
                )
            out[r].append(tuple(ids[len(p):]))
        return [tuple(o) for o in out]

    answer_tokens = None if answers is None else continuations(texts, ids_all, answers, range(len(layouts)))
    real_tokens = None
    if real is not None:
        rtexts = [f"{q} {separator}" for q, _ in real]
        rids, _ = _encode_texts(tokenizer, rtexts)
        real_tokens = continuations(rtexts, rids, [acc for _, acc in real], range(len(real)))

    # ---- context length --------------------------------------------------------------------------
    lengths = [int(use_bos) + len(ids) for ids in ids_all]
    if n_ctx is not None and max(lengths) > n_ctx:
        fits = []
        for lay, span_of in zip(layouts, spans_all):
            demo_of = [lay.spans[k][3] if k >= 0 else -1 for k in span_of]
            n_demos = 1 + max([d for d in demo_of] + [-1])
            fixed = int(use_bos) + sum(1 for d in demo_of if d < 0)
            k, total = 0, fixed
            while k < n_demos and total + demo_of.count(k) <= n_ctx:
                total += demo_of.count(k)
                k += 1
            fits.append(k if fixed <= n_ctx else -1)
        k_fit = min(fits)
        how = (
            f"at most {k_fit} shots fit for these prompts: use n_shots <= {k_fit}"
            if k_fit >= 0
            else "even the prompt without demonstrations is too long: shorten the instruction or the query"
        )
        raise ValueError(f"the longest prompt is {max(lengths)} tokens but the model's context is n_ctx={n_ctx}; {how}")

    # ---- tensors (left-padded: the final separator is position -1 of every row) -------------------
    bos_id = getattr(tokenizer, "bos_token_id", None)
    width = max(lengths)
    pad = _pad_id(tokenizer)
    head_id, head_cls = ([int(bos_id)], [int(TokenClass.BOS)]) if use_bos else ([], [])
    # one tensor per field from padded Python rows (a copy per row would cost more than the rows)
    tokens = torch.tensor([[pad] * (width - n) + head_id + list(ids) for ids, n in zip(ids_all, lengths)], dtype=torch.long)
    classes = torch.tensor([[int(TokenClass.PAD)] * (width - n) + head_cls + list(c) for c, n in zip(classes_all, lengths)],
                           dtype=torch.long)
    mask = torch.tensor([[0] * (width - n) + [1] * n for n in lengths], dtype=torch.long)
    return dict(tokens=tokens, mask=mask, classes=classes, answer_tokens=answer_tokens, real_tokens=real_tokens, pad=pad)


def _swap(lay: _Layout, classes: Sequence[TokenClass], new: str) -> _Layout:
    """The same prompt with the text of every part of ``classes`` replaced by ``new``."""
    out = _Layout()
    pos = 0
    for s, e, c, d in lay.spans:
        out.add(lay.text[pos:s])
        out.add(new if c in classes else lay.text[s:e], TokenClass(c), d)
        pos = e
    out.add(lay.text[pos:])
    return out


def _layout_ok(tokenizer: Any, lay: _Layout) -> bool:
    """Whether this prompt's parts are exact tokens: no token spans two classes, separators one known token."""
    ids, offs = _encode_texts(tokenizer, [lay.text])
    try:
        cls, span_of = _assign(tokenizer, lay, ids[0], offs[0], "", {})
    except ValueError:
        return False
    unk = getattr(tokenizer, "unk_token_id", None)
    for k, (_, _, c, _) in enumerate(lay.spans):
        mine = [i for i, kk in zip(ids[0], span_of) if kk == k]
        if not mine or c in (TokenClass.FINAL_SEP, TokenClass.DEMO_SEP) and len(mine) != 1 or (
                c in (TokenClass.FINAL_SEP, TokenClass.DEMO_SEP, TokenClass.DEMO_NEWLINE) and unk in mine):
            return False
    return bool(cls) and cls[-1] == int(TokenClass.FINAL_SEP)


def _separator_hint(tokenizer: Any, separator: str, lay: _Layout) -> str:
    """Separators that would be one token of their own in this very prompt, to suggest."""
    good = []
    for c in _SEPARATOR_CANDIDATES:
        if c != separator and c not in lay.text and len(good) < 3:
            try:
                if _layout_ok(tokenizer, _swap(lay, (TokenClass.DEMO_SEP, TokenClass.FINAL_SEP), c)):
                    good.append(c)
            except Exception:  # a hint only
                pass
    return (f"choose a single-token separator, one token of its own in this context, such as {' or '.join(map(repr, good))}"
            if good else "choose a single-token separator, one this tokenizer keeps as a token of its own after a word")


def _example_sep_hint(tokenizer: Any, example_sep: str, lay: _Layout) -> str:
    good = []
    for c in ("\n", "\n\n", " \n", ";", " |", " ;"):
        if c != example_sep and len(good) < 3:
            try:
                if _layout_ok(tokenizer, _swap(lay, (TokenClass.DEMO_NEWLINE,), c)):
                    good.append(c)
            except Exception:
                pass
    return (f"pass an example_sep that stays apart from the words around it in this context, such as {' or '.join(map(repr, good))}"
            if good else "pass an example_sep that this tokenizer keeps apart from the words around it")


def _first_token_collisions(tokenizer: Any, task: Any, separator: str) -> list[tuple[str, tuple[str, ...]]]:
    """Distinct answers of ``task`` that share their first token after ``" " + separator``:
    ``[(first token, (answer, ...)), ...]``, largest groups first."""
    key = (id(tokenizer), getattr(tokenizer, "name_or_path", ""), len(tokenizer), task.name, hash(task.pairs), separator)
    hit = _COLLISIONS.get(key)
    if hit is not None:
        return hit
    firsts = answer_first_tokens(tokenizer, task, separator=separator)
    groups: dict[int, list[str]] = {}
    for a, toks in firsts.items():
        groups.setdefault(toks[0], []).append(a)
    out = [(_token_strs(tokenizer, [t])[0], tuple(sorted(v))) for t, v in groups.items() if len(v) > 1]
    out.sort(key=lambda g: (-len(g[1]), g[1]))
    if len(_COLLISIONS) > 256:
        _COLLISIONS.clear()
    _COLLISIONS[key] = out
    return out


_COLLISIONS: dict[tuple, list[tuple[str, tuple[str, ...]]]] = {}
_WARNED: set[tuple] = set()


def answer_first_tokens(model: Any, task: Any, *, separator: str = "→") -> dict[str, tuple[int, ...]]:
    """Every distinct answer of ``task`` -> its tokens as they follow ``"<input> <separator>"`` in a prompt."""
    tokenizer = _tokenizer_of(model)
    task = _resolve_task(task)
    first_input: dict[str, str] = {}
    for x, y in task.pairs:
        first_input.setdefault(y, x)
    ys = list(first_input)
    heads = [f"{first_input[y]} {separator}" for y in ys]
    hid, _ = _encode_texts(tokenizer, heads)
    fid, _ = _encode_texts(tokenizer, [h + " " + y for h, y in zip(heads, ys)])
    out = {}
    for y, h, f in zip(ys, hid, fid):
        out[y] = tuple(f[len(h):]) if f[: len(h)] == h and len(f) > len(h) else tuple(f[-1:])
    return out


def answer_token_stats(model: Any, tasks: Any, *, separator: str = "→") -> list[dict[str, Any]]:
    """Per task: how many distinct answers are one token, and how many share a first token with another.

    First-token accuracy (Hendel et al. 2023; Todd et al. 2024 score the first answer token) credits
    a wrong answer that starts with the same token as the right one; the share of colliding answers
    says how much that matters for this tokenizer. Rows: ``task``, ``family``, ``n_answers``,
    ``single_token`` (share), ``colliding`` (number of answers in a collision group) and
    ``collisions`` (``[(first token, answers), ...]``).
    """
    from ..tasks import resolve_tasks

    tokenizer = _tokenizer_of(model)
    rows = []
    for t in resolve_tasks(tasks):
        firsts = answer_first_tokens(tokenizer, t, separator=separator)
        coll = _first_token_collisions(tokenizer, t, separator)
        rows.append(dict(task=t.name, family=t.family, n_answers=len(firsts),
                         single_token=sum(len(v) == 1 for v in firsts.values()) / max(1, len(firsts)),
                         colliding=sum(len(g) for _, g in coll), collisions=coll))
    return rows


def _warn_collisions(tokenizer: Any, task: Any, separator: str) -> None:
    """Warn once per tokenizer, task and separator (a sweep builds the same task's prompts many times)."""
    coll = _first_token_collisions(tokenizer, task, separator)
    key = (id(tokenizer), task.name, hash(task.pairs), separator)
    if not coll or key in _WARNED:
        return
    _WARNED.add(key)
    n = sum(len(g) for _, g in coll)
    shown = "; ".join(f"{tok!r}: {', '.join(g[:4])}{', ...' if len(g) > 4 else ''}" for tok, g in coll[:4])
    warnings.warn(
        f"task {task.name!r}: {n} of its {len({y for _, y in task.pairs})} answers share their first token with "
        f"another answer on this tokenizer ({shown}{'; ...' if len(coll) > 4 else ''}), so first-token accuracy "
        "credits a wrong answer that starts like the right one; IclAccuracy.full_answer (every answer token) does not",
        TokenCollisionWarning,
        stacklevel=3,
    )


class TokenCollisionWarning(UserWarning):
    """Answers of a task share their first token on the model's tokenizer (first-token accuracy is lenient)."""


def icl_prompts(
    model: Any,
    task: Any,
    *,
    n_prompts: int | None = None,
    n_shots: int,
    seed: int = 0,
    separator: str = "→",
    example_sep: str = "\n",
    queries: Sequence[str] | Sequence[Pair] | None = None,
    dummy_query: bool = False,
    shuffle_labels: bool = False,
    instruction: bool | str = False,
    split: str = "test",
    prepend_bos: bool | None = None,
) -> PromptBatch:
    """Build ``n_prompts`` ICL prompts of ``n_shots`` demonstrations each for ``task``.

    Args:
        model: a TransformerLens model (its ``tokenizer``, ``cfg.n_ctx`` and
            ``cfg.default_prepend_bos`` are used) or a bare Hugging Face (fast) tokenizer.
        task: a :class:`tvlens.Task` or a task name (see ``tvlens.list_tasks()``).
        n_prompts: number of prompts; may be omitted when ``queries`` is given.
        n_shots: demonstrations per prompt, drawn from the train split; 0 gives zero-shot prompts.
        seed: seeds every random draw (queries, demos, dummy, label shuffle).
        separator: between input and output, written with one space on each side (``"x → y"``);
            must be one token of its own in the prompt.
        example_sep: between demonstrations and before the query (default newline). Its tokens
            (one or more: GPT-2 writes ``"\\n\\n"`` before a word as two) must be its own, not merged
            with the output before or the input after it — checked in context, where SentencePiece
            encodes ``"\\n"`` as one token although alone it gives two.
        queries: explicit queries (inputs of the task, or ``(input, output)`` pairs) instead of
            drawing them from ``split``.
        dummy_query: Hendel et al. 2023 (§3.1): the query in the prompt is replaced by another
            input of the task (from the train split, not among the demos and not the real query).
            ``queries``/``answers``/``answer_*`` then describe the dummy in the prompt; the real
            ones are in ``real_queries``/``real_answers``/``real_answer_tokens``.
        shuffle_labels: Todd et al. 2024 (§3): the demos' outputs are permuted among the demos (a
            derangement when ``n_shots >= 2``; a no-op below); the query's answer is unchanged.
        instruction: ``True`` puts ``task.instruction`` on a line before the demos; ``"only"``
            gives the instruction and the query without demos (needs ``n_shots=0``).
        split: where queries are drawn from: ``"test"`` (default), ``"dev"`` or ``"train"``.
        prepend_bos: override ``model.cfg.default_prepend_bos``.

    Returns:
        A left-padded :class:`PromptBatch` (CPU tensors); the final separator is position -1.
        Warns (:class:`TokenCollisionWarning`) when answers of the task share a first token.

    Raises:
        KeyError / ValueError / TypeError before any forward, with the fix in the message.
    """
    d = _drawn(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, separator=separator, example_sep=example_sep,
               queries=queries, dummy_query=dummy_query, shuffle_labels=shuffle_labels, instruction=instruction,
               split=split, prepend_bos=prepend_bos)
    real = [r["real"] for r in d.rows] if dummy_query else None
    built = d.tokenized([r["query"][1] for r in d.rows], real=real)
    _warn_collisions(d.tokenizer, d.task, separator)
    return _prompt_batch(built, d.layouts, [r["query"] for r in d.rows], task=str(d.task.name), n_shots=d.n_shots,
                         seed=d.seed, options=d.options, demos=[r["demos"] for r in d.rows], real=real)


def context_prompts(
    model: Any,
    task: Any,
    *,
    n_prompts: int,
    n_shots: int,
    seed: int = 0,
    dummy_query: bool = True,
    split: str = "test",
    separator: str = "→",
    example_sep: str = "\n",
    prepend_bos: bool | None = None,
) -> ContextPrompts:
    """The prompts :func:`icl_prompts` builds with these arguments, for reading only: Hendel et al.
    2023's context prompts (§3.1, a dummy query by default), whose final-position residual is the
    task vector. Tokens, mask and token classes are those of ``icl_prompts``; the answers are not
    tokenized (nothing here is scored), which is most of the tokenizer's work for these prompts."""
    d = _drawn(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, separator=separator, example_sep=example_sep,
               queries=None, dummy_query=dummy_query, shuffle_labels=False, instruction=False, split=split,
               prepend_bos=prepend_bos)
    built = d.tokenized(None)
    return ContextPrompts(tokens=built["tokens"], attention_mask=built["mask"], token_class=built["classes"],
                          texts=tuple(lay.text for lay in d.layouts), queries=tuple(r["query"][0] for r in d.rows),
                          task=str(d.task.name), n_shots=d.n_shots, seed=d.seed, options=d.options,
                          demos=tuple(tuple(r["demos"]) for r in d.rows))


@dataclass(frozen=True)
class _Drawn:
    """A prompt build's checked arguments, drawn rows (demos, query shown, real query) and their layouts."""

    task: Any
    tokenizer: Any
    n_shots: int
    seed: int
    rows: list[dict[str, Any]]
    layouts: list[_Layout]
    use_bos: bool
    n_ctx: int | None
    #: the build options a batch records (separator, example_sep, ..., prepend_bos, pad_token_id)
    options: dict[str, Any]

    def tokenized(self, answers: Sequence[Sequence[str]] | None,
                  real: Sequence[tuple[str, Sequence[str]]] | None = None) -> dict[str, Any]:
        """:func:`_build` over these layouts: ``answers`` per row (None: no answer tokens), ``real`` the
        queries dummy queries stand for."""
        return _build(self.tokenizer, self.layouts, answers, names=f"task {self.task.name!r}",
                      separator=self.options["separator"], example_sep=self.options["example_sep"],
                      use_bos=self.use_bos, n_ctx=self.n_ctx, real=real)


def _drawn(model: Any, task: Any, *, n_prompts: Any, n_shots: Any, seed: Any, separator: Any, example_sep: Any,
           queries: Any, dummy_query: Any, shuffle_labels: Any, instruction: Any, split: Any, prepend_bos: Any) -> _Drawn:
    """Every step of a prompt build before tokenization (argument checks first, cheap, before the tokenizer)."""
    n_prompts, n_shots, seed = _check_icl_args(n_prompts=n_prompts, n_shots=n_shots, seed=seed, separator=separator,
                                               example_sep=example_sep, dummy_query=dummy_query,
                                               shuffle_labels=shuffle_labels, instruction=instruction, split=split,
                                               prepend_bos=prepend_bos)
    task = _resolve_task(task)
    tokenizer = _tokenizer_of(model)
    instr_text = _instruction_text(task, instruction)
    accepted = _accepted_of(task)
    qrows = _draw_queries(task, accepted, queries=queries, n_prompts=n_prompts, split=split, seed=seed)
    rows = _draw_demos(task, accepted, qrows, n_shots=n_shots, seed=seed, dummy_query=dummy_query,
                       shuffle_labels=shuffle_labels, separator=separator, example_sep=example_sep)
    layouts = [_icl_layout(r["demos"], r["query"][0], instr_text, separator, example_sep) for r in rows]
    use_bos = _use_bos(model, tokenizer, prepend_bos)
    options = dict(separator=separator, example_sep=example_sep, split=split, dummy_query=bool(dummy_query),
                   shuffle_labels=bool(shuffle_labels), instruction=instruction, prepend_bos=use_bos,
                   pad_token_id=_pad_id(tokenizer))  # the padding _build pads with
    return _Drawn(task, tokenizer, n_shots, seed, rows, layouts, use_bos, _n_ctx_of(model, tokenizer), options)


def _check_icl_args(*, n_prompts: Any, n_shots: Any, seed: Any, separator: Any, example_sep: Any, dummy_query: Any,
                    shuffle_labels: Any, instruction: Any, split: Any, prepend_bos: Any) -> tuple[int | None, int, int]:
    """:func:`icl_prompts`'s argument checks, before the tokenizer is touched: ``(n_prompts, n_shots, seed)``."""
    n_shots = _check_int("n_shots", n_shots, minimum=0)
    seed = _check_int("seed", seed, minimum=0)
    if n_prompts is not None:
        n_prompts = _check_int("n_prompts", n_prompts, minimum=1)
    for name, v in (("dummy_query", dummy_query), ("shuffle_labels", shuffle_labels)):
        if not isinstance(v, (bool, np.bool_)):
            raise TypeError(f"{name} must be True or False, got {v!r}")
    if instruction not in (False, True, "only") or not isinstance(instruction, (bool, str)):
        raise ValueError(f"instruction must be False, True or 'only', got {instruction!r}")
    if prepend_bos is not None and not isinstance(prepend_bos, bool):
        raise TypeError(f"prepend_bos must be None, True or False, got {prepend_bos!r}")
    _check_separators(separator, example_sep)
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if instruction == "only" and n_shots != 0:
        raise ValueError(f"instruction='only' means no demonstrations, but n_shots={n_shots}: pass n_shots=0 (or instruction=True)")
    return n_prompts, n_shots, seed


def _instruction_text(task: Any, instruction: bool | str) -> str | None:
    """The task's instruction line (Luo et al. 2024, §4.2), or None without ``instruction``."""
    if instruction and not str(getattr(task, "instruction", "") or "").strip():
        raise ValueError(f"task {task.name!r} has no instruction text; pass instruction=False or give the task an instruction")
    instr_text = str(task.instruction).strip() if instruction else None
    if instr_text is not None and "\n" in instr_text:
        raise ValueError(f"the instruction of task {task.name!r} contains a newline; keep it to one line")
    return instr_text


def _draw_queries(task: Any, accepted: Mapping[str, tuple[str, ...]], *, queries: Any, n_prompts: int | None, split: str,
                  seed: int) -> list[tuple[str, tuple[str, ...]]]:
    """(input, accepted answers) per prompt: the given ``queries``, or a seeded cycle through ``split``'s
    distinct inputs (every query used equally often, +-1)."""
    if queries is not None:
        qrows = _normalise_queries(task, queries)
        if n_prompts is not None and n_prompts != len(qrows):
            raise ValueError(f"n_prompts={n_prompts} but {len(qrows)} queries were given: leave n_prompts out or make them agree")
        return qrows
    if n_prompts is None:
        raise TypeError("icl_prompts needs n_prompts (or explicit queries=[...])")
    qsplit = _dedupe(task.split(split))
    if not qsplit:
        raise ValueError(f"the {split!r} split of task {task.name!r} is empty: use another split= or a task with more pairs")
    rng_q = np.random.default_rng([seed, 0])
    order: list[int] = []
    while len(order) < n_prompts:
        order.extend(rng_q.permutation(len(qsplit)).tolist())
    return [(qsplit[k][0], accepted[qsplit[k][0]]) for k in order[:n_prompts]]


@functools.lru_cache(maxsize=1 << 16)
def _demo_order(seed: int, i: int, n: int) -> np.ndarray:
    """The seeded order of a pool of ``n`` demonstrations for prompt ``i`` (read-only; cached, since the
    context and ICL prompts of a sweep draw the same demos)."""
    perm = np.random.default_rng([seed, 1, i]).permutation(n)
    perm.setflags(write=False)
    return perm


def _draw_demos(task: Any, accepted: Mapping[str, tuple[str, ...]], qrows: Sequence[tuple[str, tuple[str, ...]]], *,
                n_shots: int, seed: int, dummy_query: bool, shuffle_labels: bool, separator: str,
                example_sep: str) -> list[dict[str, Any]]:
    """Per prompt: its demonstrations (train split, the query's input excluded, seeded per prompt), the
    query shown (a dummy with ``dummy_query``, Hendel et al. 2023 §3.1) and the real one; labels
    deranged with ``shuffle_labels`` (Todd et al. 2024, §3). Refuses too few train inputs and pair
    text that would make the prompt ambiguous."""
    train = _dedupe(task.split("train"))
    need = n_shots + (1 if dummy_query else 0)
    if need:
        train_inputs = {x for x, _ in train}
        smallest = len(train) - (1 if any(q in train_inputs for q, _ in qrows) else 0)
        if smallest < need:
            extra = " (+1 for the dummy query)" if dummy_query else ""
            fit = max(0, smallest - (1 if dummy_query else 0))
            raise ValueError(
                f"task {task.name!r} has {len(train)} distinct inputs in its train split ({smallest} once the query is "
                f"excluded) but n_shots={n_shots}{extra} needs {need}: use n_shots <= {fit} or a task with more pairs"
            )
    used_pairs = [(q, a) for q, acc in qrows for a in acc] + (list(train) if need else [])
    _check_pair_text(task.name, used_pairs, separator, example_sep)
    rows: list[dict[str, Any]] = []
    where = {x: k for k, (x, _) in enumerate(train)}  # train is one pair per input
    for i, (q, acc) in enumerate(qrows):
        demos: list[Pair] = []
        real = (q, acc)
        shown = (q, acc)
        if need:
            k = where.get(q)
            pool = train if k is None else train[:k] + train[k + 1:]
            perm = _demo_order(seed, i, len(pool))
            demos = [pool[k] for k in perm[:n_shots]]
            if dummy_query:
                d = pool[perm[-1]][0]
                shown = (d, accepted.get(d, (pool[perm[-1]][1],)))
        if shuffle_labels and len(demos) >= 2:
            outs = _derange([y for _, y in demos], np.random.default_rng([seed, 2, i]))
            demos = [(x, y) for (x, _), y in zip(demos, outs)]
        rows.append(dict(demos=demos, query=shown, real=real))
    return rows


def _icl_layout(demos: Sequence[Pair], query: str, instr_text: str | None, separator: str, example_sep: str) -> _Layout:
    """The text of one prompt and where its parts are (the format of Hendel et al. 2023, §2)."""
    parts: list[tuple[str, int | None, int]] = []
    if instr_text is not None:
        parts.append((instr_text + "\n", TokenClass.INSTRUCTION, -1))  # its newline may merge with its last word
    for k, (x, y) in enumerate(demos):
        parts += [(x, TokenClass.DEMO_INPUT, k), (" ", None, -1), (separator, TokenClass.DEMO_SEP, k), (" ", None, -1),
                  (y, TokenClass.DEMO_OUTPUT, k), (example_sep, TokenClass.DEMO_NEWLINE, k)]
    parts += [(query, TokenClass.QUERY_INPUT, -1), (" ", None, -1), (separator, TokenClass.FINAL_SEP, -1)]
    return _Layout.of(parts)


def _use_bos(model: Any, tokenizer: Any, prepend_bos: bool | None) -> bool:
    """Whether prompts start with BOS: ``prepend_bos``, else the model's ``cfg.default_prepend_bos``, and only
    when the tokenizer has a BOS token."""
    if prepend_bos is None:
        cfg = getattr(model, "cfg", None)
        prepend_bos = bool(getattr(cfg, "default_prepend_bos", True)) if cfg is not None else True
    return bool(prepend_bos) and getattr(tokenizer, "bos_token_id", None) is not None


def _prompt_batch(built: Mapping[str, Any], layouts: Sequence[_Layout], shown: Sequence[tuple[str, Sequence[str]]], *,
                  task: str, n_shots: int, seed: int, options: Mapping[str, Any], demos: Sequence[Sequence[Pair]],
                  real: Sequence[tuple[str, Sequence[str]]] | None = None) -> PromptBatch:
    """The :class:`PromptBatch` of built prompts: ``shown[i]`` is row ``i``'s (query, accepted answers) in the
    prompt, ``real[i]`` the one a dummy query stands for (None: the same)."""
    acc_tokens = built["answer_tokens"]
    kw: dict[str, Any] = {}
    if real is not None:
        kw = dict(real_queries=tuple(q for q, _ in real), real_answers=tuple(a[0] for _, a in real),
                  real_answer_tokens=tuple(t[0] for t in built["real_tokens"]))
    return PromptBatch(
        tokens=built["tokens"],
        attention_mask=built["mask"],
        token_class=built["classes"],
        answer_ids=torch.tensor([t[0][0] for t in acc_tokens], dtype=torch.long),
        answer_tokens=tuple(t[0] for t in acc_tokens),
        queries=tuple(q for q, _ in shown),
        answers=tuple(a[0] for _, a in shown),
        texts=tuple(lay.text for lay in layouts),
        task=task,
        n_shots=n_shots,
        seed=seed,
        options=dict(options),
        demos=tuple(tuple(d) for d in demos),
        other_answers=tuple(tuple(a[1:]) for _, a in shown),
        other_answer_tokens=tuple(tuple(t[1:]) for t in acc_tokens),
        **kw,
    )


def _check_separators(separator: Any, example_sep: Any) -> None:
    if not isinstance(separator, str) or not isinstance(example_sep, str):
        raise TypeError("separator and example_sep must be strings, e.g. separator='→', example_sep='\\n'")
    if not separator or separator != separator.strip() or "\n" in separator:
        raise ValueError(
            f"separator {separator!r} must be non-empty, without newlines or surrounding spaces: the prompt writes "
            "one space on each side of it ('x → y'); pass e.g. separator='→' or separator=':'"
        )
    if not example_sep or example_sep != example_sep.rstrip(" \t"):
        raise ValueError(
            f"example_sep {example_sep!r} must be non-empty and must not end with a space (a space before the next "
            "input is tokenized with that input); pass e.g. example_sep='\\n'"
        )


#: The options of :func:`icl_prompts` that say how a prompt is *written* (not which examples it shows):
#: every function that builds prompts from a task takes them as keywords (``**prompt_kw``) and passes
#: them, checked by :func:`prompt_options`, to each prompt it builds.
PROMPT_OPTIONS = ("separator", "example_sep", "prepend_bos")


def prompt_options(where: str, prompt_kw: Mapping[str, Any]) -> dict[str, Any]:
    """Check the prompt options ``where`` passes on to :func:`icl_prompts` (``separator``,
    ``example_sep``, ``prepend_bos``) and return them; an unknown keyword or a bad value raises
    before any prompt is built or any forward runs.

    The prompt format is that of Hendel et al. 2023 (§2) and Todd et al. 2024 (§2): demonstrations
    ``x → y`` joined by ``example_sep``; these options change how it is written, the same way in
    every prompt a function builds (context, extraction, zero-shot and ICL prompts alike).
    """
    kw = dict(prompt_kw)
    unknown = [k for k in kw if k not in PROMPT_OPTIONS]
    if unknown:
        close = {k: difflib.get_close_matches(k, PROMPT_OPTIONS, n=1) for k in unknown}
        hint = "; ".join(f"did you mean {c[0]!r} for {k!r}?" for k, c in close.items() if c)
        raise TypeError(
            f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; the prompt options it "
            f"passes on to icl_prompts are {', '.join(PROMPT_OPTIONS)}{' (' + hint + ')' if hint else ''}"
        )
    _check_separators(kw.get("separator", "→"), kw.get("example_sep", "\n"))
    bos = kw.get("prepend_bos")
    if bos is not None and not isinstance(bos, bool):
        raise TypeError(f"prepend_bos must be None, True or False, got {bos!r}")
    return kw


def non_default_options(prompt_kw: Mapping[str, Any]) -> dict[str, Any]:
    """The prompt options that differ from :func:`icl_prompts`'s defaults (what results record)."""
    default = {"separator": "→", "example_sep": "\n", "prepend_bos": None}
    return {k: v for k, v in prompt_kw.items() if k in default and v != default[k]}


def prompt_record(prompt_kw: Mapping[str, Any]) -> dict[str, Any]:
    """``{"prompt": {...}}``: what a result's meta or a checkpoint's config records of the prompt
    options, those that differ from the defaults (nothing when none do, so the records of runs with
    the default format are what they were)."""
    opts = non_default_options(prompt_kw)
    return {"prompt": opts} if opts else {}


def prompts_from_text(
    model: Any,
    texts: Sequence[str] | str,
    answers: Sequence[str | Sequence[str]] | str,
    *,
    separator: str = "→",
    example_sep: str = "\n",
    task: str = "custom",
    prepend_bos: bool | None = None,
) -> PromptBatch:
    """A :class:`PromptBatch` from a researcher's own prompt strings, without writing a :class:`~tvlens.Task`.

    >>> batch = prompts_from_text(model, ["France → Paris\\nJapan →", "Italy → Rome\\nSpain →"], ["Tokyo", "Madrid"])

    Each text is demonstrations ``"x → y"`` joined by ``example_sep``, then the query and the
    ``separator`` it ends with; it is tokenized exactly as written (whole text), and its token
    classes come from the same parse as :func:`icl_prompts`'s, so every tvlens analysis takes the
    batch. ``answers[i]`` is the answer of text ``i``, or a list of accepted answers (the first
    is the one metrics score; accuracy counts any).
    """
    if isinstance(texts, str):
        texts = [texts]
    if isinstance(answers, str):
        answers = [answers]
    texts, answers = list(texts), list(answers)
    if not texts:
        raise ValueError("texts is empty: pass at least one prompt string, e.g. ['France → Paris\\nJapan →']")
    if len(answers) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(answers)} answers: give one answer (or a list of accepted answers) per text")
    _check_separators(separator, example_sep)
    tokenizer = _tokenizer_of(model)
    accs: list[tuple[str, ...]] = []
    for i, a in enumerate(answers):
        acc = (a,) if isinstance(a, str) else tuple(a)
        if not acc or not all(isinstance(s, str) and s.strip() for s in acc):
            raise ValueError(f"answer {i} is {a!r}; give a non-empty string or a list of them")
        accs.append(tuple(s.strip() for s in acc))
    layouts, demos, queries = [], [], []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(f"text {i} is a {type(text).__name__}; pass strings")
        body = text.rstrip(" ")
        if not body.endswith(separator):
            raise ValueError(f"text {i} {text!r} does not end with the separator {separator!r}; end it with the query and "
                             f"the separator ('Japan {separator}'), or pass separator=...")
        lines = body.split(example_sep)
        lay = _Layout()
        shown = []
        for k, line in enumerate(lines):
            last = k == len(lines) - 1
            cut = line.rfind(separator) if last else line.find(separator)
            x_raw = line[:max(cut, 0)]
            x = x_raw.strip()
            if cut < 0 or not x or (not last and not line[cut + len(separator):].strip()):
                raise ValueError(f"text {i}, line {k + 1} ({line!r}) is not 'input {separator} output'; write each "
                                 f"demonstration as 'x {separator} y', joined by example_sep={example_sep!r}, and end "
                                 f"with the query and the separator ('Japan {separator}')")
            lead = x_raw[: len(x_raw) - len(x_raw.lstrip())]
            lay.add(lead)
            lay.add(x, TokenClass.QUERY_INPUT if last else TokenClass.DEMO_INPUT, -1 if last else k)
            lay.add(x_raw[len(lead) + len(x):])
            lay.add(separator, TokenClass.FINAL_SEP if last else TokenClass.DEMO_SEP, -1 if last else k)
            if last:
                queries.append(x)
                break
            rest = line[cut + len(separator):]
            y = rest.strip()
            ylead = rest[: len(rest) - len(rest.lstrip())]
            lay.add(ylead)
            lay.add(y, TokenClass.DEMO_OUTPUT, k)
            lay.add(rest[len(ylead) + len(y):])
            lay.add(example_sep, TokenClass.DEMO_NEWLINE, k)
            shown.append((x, y))
        if lay.text != body:
            raise ValueError(f"text {i} could not be parsed back exactly ({lay.text!r} != {body!r}); write demonstrations "
                             f"as 'x {separator} y' joined by {example_sep!r}")
        layouts.append(lay)
        demos.append(tuple(shown))
    use_bos = _use_bos(model, tokenizer, prepend_bos)
    n_shots = {len(d) for d in demos}
    built = _build(tokenizer, layouts, accs, names="these texts", separator=separator, example_sep=example_sep,
                   use_bos=use_bos, n_ctx=_n_ctx_of(model, tokenizer))
    options = dict(separator=separator, example_sep=example_sep, split=None, dummy_query=False, shuffle_labels=False,
                   instruction=False, prepend_bos=use_bos, pad_token_id=built["pad"], source="text")
    return _prompt_batch(built, layouts, list(zip(queries, accs)), task=str(task),
                         n_shots=n_shots.pop() if len(n_shots) == 1 else -1, seed=0, options=options, demos=demos)


_DEMO_CLASSES = (TokenClass.DEMO_INPUT, TokenClass.DEMO_SEP, TokenClass.DEMO_OUTPUT, TokenClass.DEMO_NEWLINE)


# ----------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True, eq=False)
class IclAccuracy:
    """ICL accuracy of a model on a batch of prompts.

    ``first_token``: fraction of prompts whose argmax next token at the final separator is the
    first token of an accepted answer. ``full_answer``: fraction whose greedy continuation
    reproduces every token of an accepted answer (equal to ``first_token`` when all answers are one
    token and no two share a first token).
    """

    first_token: float
    full_answer: float
    n: int
    first_token_correct: Bool[Tensor, " batch"] = field(repr=False, default=None)  # type: ignore[assignment]
    full_answer_correct: Bool[Tensor, " batch"] = field(repr=False, default=None)  # type: ignore[assignment]

    def __str__(self) -> str:
        return f"ICL accuracy: first token {self.first_token:.3f}, full answer {self.full_answer:.3f} (n={self.n})"


def _forward(model: Any, tokens: Tensor, attention_mask: Tensor) -> Tensor:
    from ..engine.readout import all_logits

    return all_logits(model, tokens, attention_mask)


def _check_logits_last(logits_last: Tensor, batch: PromptBatch) -> None:
    if logits_last.ndim != 2 or logits_last.shape[0] != len(batch):
        raise ValueError(
            f"logits_last must be [batch, d_vocab] with batch={len(batch)}, got {tuple(logits_last.shape)}; "
            "take logits[:, batch.separator_index] of the full logits"
        )


def first_token_accuracy(logits_last: Float[Tensor, "batch d_vocab"], batch: PromptBatch) -> float:
    """Fraction of rows whose argmax at the final separator is the first token of an accepted answer."""
    from ..metrics import accepted_ids, accepted_metric

    _check_logits_last(logits_last, batch)
    return accepted_metric(logits_last.cpu(), accepted_ids(batch), "accuracy").mean().item()


def answer_logprob(logits_last: Float[Tensor, "batch d_vocab"], batch: PromptBatch) -> Float[Tensor, " batch"]:
    """Log-probability of the answer's first token at the final separator, per row (float32).

    With several accepted answers this is the best one's (the largest first-token log-probability),
    as in the metrics of :mod:`tvlens.metrics`.
    """
    from ..metrics import accepted_ids, accepted_metric

    _check_logits_last(logits_last, batch)
    return accepted_metric(logits_last.float(), accepted_ids(batch).to(logits_last.device), "logprob")


def final_logits(model: Any, batch: PromptBatch, *, batch_size: int | None = BATCH_SIZE) -> Float[Tensor, "batch d_vocab"]:
    """Logits at the final separator (position -1) of every prompt, on the CPU in float32."""
    batch_size = rows_per_forward(batch_size)
    _tokenizer_of(model)
    out = []
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            chunk = chunk.trimmed()
            out.append(_forward(model, chunk.tokens, chunk.attention_mask)[:, -1].float().cpu())
    return torch.cat(out)


def _teacher_forced(chunk: PromptBatch) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Prompt + answer[:-1] per (row, accepted answer), left-padded; and for each answer token the
    position predicting it.

    Returns tokens, mask, ``pred_pos`` [n, max_len], ``targets`` [n, max_len] (-1 past an answer's
    end) and ``row`` [n] (the prompt each line belongs to).
    """
    lens_r = chunk.lengths.tolist()
    pairs = [(r, a) for r, alts in enumerate(chunk.accepted_answer_tokens) for a in alts]
    lens = [lens_r[r] for r, _ in pairs]
    ans = [a for _, a in pairs]
    src = [r for r, _ in pairs]
    m = max(len(a) for a in ans)
    width = max(n + len(a) - 1 for n, a in zip(lens, ans))
    b = len(pairs)
    tokens = torch.full((b, width), int(chunk.options.get("pad_token_id", 0)), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    pred_pos = torch.zeros((b, m), dtype=torch.long)
    targets = torch.full((b, m), -1, dtype=torch.long)
    pw = chunk.tokens.shape[1]
    for r, (n, a) in enumerate(zip(lens, ans)):
        seq = chunk.tokens[src[r], pw - n:].tolist() + list(a[:-1])
        tokens[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[r, width - len(seq):] = 1
        end = width - len(a)  # position of the final separator
        pred_pos[r, : len(a)] = torch.arange(end, end + len(a))
        targets[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    return tokens, mask, pred_pos, targets, torch.tensor(src, dtype=torch.long)


def _evaluate_chunk(model: Any, chunk: PromptBatch) -> tuple[Tensor, Tensor]:
    chunk = chunk.trimmed()
    tokens, mask, pred_pos, targets, src = _teacher_forced(chunk)
    logits = _forward(model, tokens, mask)
    rows = torch.arange(len(src))[:, None]
    pred = logits[rows.to(logits.device), pred_pos.to(logits.device)].argmax(-1).cpu()  # [lines, max_len]
    ok = (pred == targets) | (targets < 0)
    first = torch.zeros(len(chunk), dtype=torch.long).index_add_(0, src, ok[:, 0].long()) > 0  # any accepted answer
    full = torch.zeros(len(chunk), dtype=torch.long).index_add_(0, src, ok.all(-1).long()) > 0
    return first, full


def full_answer_match(model: Any, batch: PromptBatch, *, batch_size: int | None = BATCH_SIZE) -> Bool[Tensor, " batch"]:
    """Whether greedy decoding from each prompt emits exactly the answer's tokens.

    Computed with one teacher-forced forward per chunk: greedy decoding reproduces the answer iff
    at every answer position the argmax given the answer prefix is the next answer token, so
    feeding the prompt plus ``answer[:-1]`` and comparing argmaxes is the same test as decoding
    ``len(answer)`` tokens, at the cost of a single pass.
    """
    return evaluate_prompts(model, batch, batch_size=batch_size).full_answer_correct


def evaluate_prompts(model: Any, batch: PromptBatch, *, batch_size: int | None = BATCH_SIZE) -> IclAccuracy:
    """First-token and full-answer accuracy of ``model`` on ``batch`` (batched, left-padded, no grad).

    The answers compared against are ``batch.accepted_answer_tokens`` (those of the query in the
    prompt; for a dummy-query batch the dummy's): a prompt counts when any accepted answer matches.
    """
    if not isinstance(batch, PromptBatch):
        raise TypeError(f"batch must be a PromptBatch (from tvlens.icl_prompts), got {type(batch).__name__}")
    batch_size = rows_per_forward(batch_size)
    _tokenizer_of(model)
    firsts, fulls = [], []
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            f, full = _evaluate_chunk(model, chunk)
            firsts.append(f)
            fulls.append(full)
    first = torch.cat(firsts)
    full = torch.cat(fulls)
    return IclAccuracy(
        first_token=first.float().mean().item(),
        full_answer=full.float().mean().item(),
        n=len(batch),
        first_token_correct=first,
        full_answer_correct=full,
    )


def evaluate_icl(
    model: Any,
    task: Any,
    n_shots: int,
    *,
    n_prompts: int = N_PROMPTS,
    seed: int = 0,
    batch_size: int | None = BATCH_SIZE,
    **prompt_kw: Any,
) -> IclAccuracy:
    """ICL accuracy of ``model`` on ``task`` with ``n_shots`` demonstrations.

    Builds ``icl_prompts(model, task, n_prompts=..., n_shots=..., seed=..., **prompt_kw)`` and
    scores the first answer token (argmax at the final separator) and the full answer (greedy
    decoding reproduces every answer token) — the accuracy Hendel et al. 2023 and Todd et al.
    2024 report as the ICL baseline.
    """
    batch = icl_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, **prompt_kw)
    return evaluate_prompts(model, batch, batch_size=batch_size)
