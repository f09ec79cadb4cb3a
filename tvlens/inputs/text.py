"""In-context-learning prompts: construction, token classes, alignment, and ICL accuracy.

A prompt is the text ::

    [instruction "\\n"]  x1 " → " y1 example_sep  x2 " → " y2 example_sep ...  q " →"

i.e. demonstrations ``"x → y"`` joined by ``example_sep`` (default ``"\\n"``), then the query and
the final separator, after which the model should produce the answer (Hendel et al. 2023, §2:
``x → y`` prompts; Todd et al. 2024, §2: the same structure with ``Q:/A:``).

**Tokenization.** The text is tokenized *segment by segment* (instruction, each demo input,
separator, output and example separator, the query, the final separator) with the model's own
tokenizer, without special tokens; the tokenizer's BOS is prepended when the model prepends one
(``model.cfg.default_prepend_bos``). Each segment is tokenized exactly as it appears in the text,
**including the space in front of it**: the demo separator and final separator are ``" →"``, an
output is ``" paris"``, an input at the start of a line is ``"france"``. For a byte-level BPE
tokenizer (GPT-2 style) this is what tokenizing the whole text would give (its pre-tokenizer
attaches a space to the following word); for the word-level organism tokenizer the spaces vanish
and ``"\\n"`` is a token of its own. Token classes (:class:`TokenClass`, after Todd et al. 2024,
§2 and App. F) are therefore exact per token, and ``answer_tokens`` are the tokens of
``" " + answer`` — what the model must emit after ``" →"``.

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

import dataclasses
import difflib
import re
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any, Iterable, Iterator, Mapping, Sequence

import numpy as np
import torch
from jaxtyping import Bool, Float, Int
from torch import Tensor

__all__ = [
    "TokenClass",
    "PromptBatch",
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
class PromptBatch:
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

    tokens: Int[Tensor, "batch pos"]
    attention_mask: Int[Tensor, "batch pos"]
    token_class: Int[Tensor, "batch pos"]
    #: first token of each answer (as it follows the final separator)
    answer_ids: Int[Tensor, " batch"]
    answer_tokens: tuple[tuple[int, ...], ...]
    queries: tuple[str, ...]
    answers: tuple[str, ...]
    #: the prompt text of each row, without BOS and padding (decode(tokens) gives it back)
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
        for name in ("demos", "real_queries", "real_answers", "real_answer_tokens"):
            n = len(getattr(self, name))
            allowed = (0, b) if name == "demos" else (b,)  # demos may be left out by hand-made batches
            if n not in allowed:
                raise ValueError(f"{name} must have {b} rows, got {n}")

    # -- shape and positions --------------------------------------------------------------------

    @property
    def separator_index(self) -> int:
        """Position of the final separator in every row: always -1 (batches are left-padded)."""
        return -1

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def device(self) -> torch.device:
        return self.tokens.device

    def positions_of(self, *classes: TokenClass | int) -> Bool[Tensor, "batch pos"]:
        """Boolean mask of the positions whose class is any of ``classes``."""
        if not classes:
            raise ValueError("positions_of needs at least one TokenClass, e.g. batch.positions_of(TokenClass.DEMO_SEP)")
        mask = torch.zeros_like(self.token_class, dtype=torch.bool)
        for c in classes:
            mask |= self.token_class == int(TokenClass(c))
        return mask

    @property
    def lengths(self) -> Int[Tensor, " batch"]:
        """Number of real (non-pad) tokens per row."""
        return self.attention_mask.sum(-1)

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
        """The rows ``index`` (a list of row numbers or a boolean mask), padding width unchanged."""
        if isinstance(index, Tensor):
            idx = index.nonzero().flatten().tolist() if index.dtype == torch.bool else index.flatten().tolist()
        else:
            idx = [int(i) for i in index]
        n = len(self)
        for i in idx:
            if not -n <= i < n:
                raise IndexError(f"row {i} out of range for a batch of {n} prompts")
        t = torch.as_tensor(idx, dtype=torch.long, device=self.tokens.device)

        def pick(xs: tuple) -> tuple:
            return tuple(xs[i] for i in idx) if xs else xs

        return dataclasses.replace(
            self,
            tokens=self.tokens[t],
            attention_mask=self.attention_mask[t],
            token_class=self.token_class[t],
            answer_ids=self.answer_ids[t],
            answer_tokens=pick(self.answer_tokens),
            queries=pick(self.queries),
            answers=pick(self.answers),
            texts=pick(self.texts),
            demos=pick(self.demos),
            real_queries=pick(self.real_queries),
            real_answers=pick(self.real_answers),
            real_answer_tokens=pick(self.real_answer_tokens),
        )

    def slice(self, start: int, stop: int | None = None) -> "PromptBatch":
        """Rows ``start:stop`` (padding width unchanged, so results of chunks concatenate along pos)."""
        return self.select(range(len(self))[start:stop])

    def __getitem__(self, item: slice) -> "PromptBatch":
        if not isinstance(item, slice):
            raise TypeError("index a PromptBatch with a slice (batch[2:5]) or use batch.select([...])")
        return self.select(range(len(self))[item])

    def chunks(self, batch_size: int) -> Iterator["PromptBatch"]:
        """Consecutive sub-batches of at most ``batch_size`` rows, in order."""
        _check_int("batch_size", batch_size, minimum=1)
        for i in range(0, len(self), batch_size):
            yield self.slice(i, i + batch_size)

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


# ----------------------------------------------------------------------------------------------
# building prompts


def _check_int(name: str, value: Any, *, minimum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if minimum is not None and value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


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
    """Tokenize every distinct segment once (one batched tokenizer call)."""
    uniq = sorted(set(pieces))
    if not uniq:
        return {}
    ids = tokenizer(uniq, add_special_tokens=False)["input_ids"]
    return {s: tuple(int(i) for i in t) for s, t in zip(uniq, ids)}


def _token_strs(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    return [str(t) for t in tokenizer.convert_ids_to_tokens(list(ids))]


def _check_single_token(tokenizer: Any, enc: Mapping[str, tuple[int, ...]], what: str, value: str, piece: str) -> None:
    ids = enc[piece]
    unk = getattr(tokenizer, "unk_token_id", None)
    is_unk = len(ids) == 1 and unk is not None and ids[0] == unk and unk != getattr(tokenizer, "bos_token_id", None)
    if len(ids) == 1 and not is_unk:
        return
    good = []
    if what == "separator":
        cand = {c: f" {c}" for c in _SEPARATOR_CANDIDATES}
        cand_ids = _encode_all(tokenizer, list(cand.values()))
        good = [c for c, p in cand.items() if len(cand_ids[p]) == 1 and c != value]
    elif what == "example_sep":
        cand_ids = _encode_all(tokenizer, ["\n", ";", "|"])
        good = [c for c in ("\n", ";", "|") if len(cand_ids[c]) == 1 and c != value]
    hint = (
        f"choose a single-token {what} such as {' or '.join(repr(g) for g in good[:3])}"
        if good
        else f"choose a {what} that this tokenizer encodes as one token"
    )
    if is_unk:
        raise ValueError(f"{what} {value!r} is not in this tokenizer's vocabulary (it becomes {tokenizer.unk_token!r}): {hint}")
    raise ValueError(
        f"{what} {value!r} is {len(ids)} tokens for this tokenizer ({_token_strs(tokenizer, ids)} as {piece!r} appears in "
        f"the prompt); the {what} must be exactly one token so that token classes and the final position are exact: {hint}"
    )


def _dedupe(pairs: Sequence[Pair]) -> list[Pair]:
    seen: set[str] = set()
    out = []
    for x, y in pairs:
        if x not in seen:
            seen.add(x)
            out.append((x, y))
    return out


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


def _normalise_queries(task: Any, queries: Any) -> list[Pair]:
    if isinstance(queries, (str, bytes)) or not isinstance(queries, Iterable):
        raise TypeError(
            f"queries must be a list of input strings or (input, output) pairs, got {type(queries).__name__}; "
            "e.g. queries=['france', 'japan']"
        )
    queries = list(queries)
    if not queries:
        raise ValueError("queries is empty: pass at least one query, or leave queries=None to draw them from the split")
    lookup: dict[str, str] = {}
    for x, y in task.pairs:
        lookup.setdefault(x, y)
    out: list[Pair] = []
    for q in queries:
        if isinstance(q, str):
            if q not in lookup:
                close = difflib.get_close_matches(q, list(lookup), n=3)
                hint = f"did you mean {', '.join(map(repr, close))}? " if close else ""
                raise ValueError(
                    f"query {q!r} is not an input of task {task.name!r}: {hint}"
                    "pass (input, output) pairs to use queries outside the task"
                )
            out.append((q, lookup[q]))
        elif isinstance(q, (tuple, list)) and len(q) == 2 and all(isinstance(s, str) for s in q):
            out.append((q[0], q[1]))
        else:
            raise TypeError(f"each query must be an input string or an (input, output) pair of strings, got {q!r}")
    return out


def _contains(text: str, mark: str) -> bool:
    """Whether ``mark`` occurs in ``text``; a word mark ("is") only as a whole word, not inside "paris"."""
    mark = mark.strip()
    if not mark:
        return False
    if re.fullmatch(r"\w+", mark):
        return re.search(rf"(?<!\w){re.escape(mark)}(?!\w)", text) is not None
    return mark in text


def _check_pair_text(task_name: str, pairs: Sequence[Pair], separator: str, example_sep: str) -> None:
    for x, y in pairs:
        for s in (x, y):
            if not s.strip():
                raise ValueError(f"task {task_name!r} has an empty input or output in pair {(x, y)!r}; remove it from the data")
            if "\n" in s or _contains(s, separator) or _contains(s, example_sep):
                raise ValueError(
                    f"pair {(x, y)!r} of task {task_name!r} contains the separator {separator!r}, the example "
                    f"separator {example_sep!r} or a newline, so the prompt would be ambiguous; "
                    "pick another separator / example_sep or clean the data"
                )


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
            ``cfg.default_prepend_bos`` are used) or a bare Hugging Face tokenizer.
        task: a :class:`tvlens.Task` or a task name (see ``tvlens.list_tasks()``).
        n_prompts: number of prompts; may be omitted when ``queries`` is given.
        n_shots: demonstrations per prompt, drawn from the train split; 0 gives zero-shot prompts.
        seed: seeds every random draw (queries, demos, dummy, label shuffle).
        separator: between input and output, written with one space on each side (``"x → y"``);
            must be a single token as ``" " + separator``.
        example_sep: between demonstrations and before the query (default newline); one token.
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

    Raises:
        KeyError / ValueError / TypeError before any tokenization, with the fix in the message.
    """
    # ---- argument checks (cheap, before touching the tokenizer) --------------------------------
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
    if split not in _SPLITS:
        raise ValueError(f"split must be one of {_SPLITS}, got {split!r}")
    if instruction == "only" and n_shots != 0:
        raise ValueError(f"instruction='only' means no demonstrations, but n_shots={n_shots}: pass n_shots=0 (or instruction=True)")

    task = _resolve_task(task)
    tokenizer = _tokenizer_of(model)

    if instruction and not str(getattr(task, "instruction", "") or "").strip():
        raise ValueError(f"task {task.name!r} has no instruction text; pass instruction=False or give the task an instruction")
    instr_text = str(task.instruction).strip() if instruction else None
    if instr_text is not None and "\n" in instr_text:
        raise ValueError(f"the instruction of task {task.name!r} contains a newline; keep it to one line")

    # ---- queries -----------------------------------------------------------------------------
    if queries is not None:
        qpairs = _normalise_queries(task, queries)
        if n_prompts is not None and n_prompts != len(qpairs):
            raise ValueError(f"n_prompts={n_prompts} but {len(qpairs)} queries were given: leave n_prompts out or make them agree")
        n_prompts = len(qpairs)
    else:
        if n_prompts is None:
            raise TypeError("icl_prompts needs n_prompts (or explicit queries=[...])")
        qsplit = list(task.split(split))
        if not qsplit:
            raise ValueError(f"the {split!r} split of task {task.name!r} is empty: use another split= or a task with more pairs")
        rng_q = np.random.default_rng([seed, 0])
        order: list[int] = []
        while len(order) < n_prompts:  # cycle through permutations: every query used equally often (+-1)
            order.extend(rng_q.permutation(len(qsplit)).tolist())
        qpairs = [qsplit[k] for k in order[:n_prompts]]

    # ---- demonstration pools -----------------------------------------------------------------
    train = _dedupe(task.split("train"))
    need = n_shots + (1 if dummy_query else 0)
    if need:
        train_inputs = {x for x, _ in train}
        smallest = len(train) - (1 if any(q in train_inputs for q, _ in qpairs) else 0)
        if smallest < need:
            extra = " (+1 for the dummy query)" if dummy_query else ""
            fit = max(0, smallest - (1 if dummy_query else 0))
            raise ValueError(
                f"task {task.name!r} has {len(train)} distinct inputs in its train split ({smallest} once the query is "
                f"excluded) but n_shots={n_shots}{extra} needs {need}: use n_shots <= {fit} or a task with more pairs"
            )
    _check_pair_text(task.name, [*qpairs, *train], separator, example_sep)

    rows: list[dict[str, Any]] = []
    for i, (q, a) in enumerate(qpairs):
        demos: list[Pair] = []
        real = (q, a)
        shown = (q, a)
        if need:
            pool = [p for p in train if p[0] != q]
            perm = np.random.default_rng([seed, 1, i]).permutation(len(pool))
            demos = [pool[k] for k in perm[:n_shots]]
            if dummy_query:
                shown = pool[perm[-1]]
        if shuffle_labels and len(demos) >= 2:
            outs = _derange([y for _, y in demos], np.random.default_rng([seed, 2, i]))
            demos = [(x, y) for (x, _), y in zip(demos, outs)]
        rows.append(dict(demos=demos, query=shown, real=real))

    # ---- segments ----------------------------------------------------------------------------
    sep_piece = " " + separator
    segs_per_row: list[list[tuple[str, TokenClass]]] = []
    for r in rows:
        segs: list[tuple[str, TokenClass]] = []
        if instr_text is not None:
            segs += [(instr_text, TokenClass.INSTRUCTION), ("\n", TokenClass.INSTRUCTION)]
        for x, y in r["demos"]:
            segs += [(x, TokenClass.DEMO_INPUT), (sep_piece, TokenClass.DEMO_SEP), (" " + y, TokenClass.DEMO_OUTPUT),
                     (example_sep, TokenClass.DEMO_NEWLINE)]
        segs += [(r["query"][0], TokenClass.QUERY_INPUT), (sep_piece, TokenClass.FINAL_SEP)]
        segs_per_row.append(segs)

    used = {s for segs in segs_per_row for s, _ in segs} | {" " + r[k][1] for r in rows for k in ("query", "real")}
    enc = _encode_all(tokenizer, [*used, sep_piece, example_sep])
    _check_single_token(tokenizer, enc, "separator", separator, sep_piece)
    if n_shots:
        _check_single_token(tokenizer, enc, "example_sep", example_sep, example_sep)
    empty = sorted(s for s in used if not enc[s])
    if empty:
        raise ValueError(f"these prompt segments tokenize to nothing: {empty[:5]!r}; clean the task data")
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and unk not in (getattr(tokenizer, "bos_token_id", None), getattr(tokenizer, "eos_token_id", None)):
        missing = sorted({s.strip() for s in used if unk in enc[s]})
        if missing:
            raise ValueError(
                f"{len(missing)} words of task {task.name!r} are not in this tokenizer's vocabulary (they would become "
                f"{tokenizer.unk_token!r}): {missing[:8]!r}; use a model whose tokenizer covers the task or drop those pairs"
            )

    bos_id = getattr(tokenizer, "bos_token_id", None)
    if prepend_bos is None:
        cfg = getattr(model, "cfg", None)
        prepend_bos = bool(getattr(cfg, "default_prepend_bos", True)) if cfg is not None else True
    use_bos = bool(prepend_bos) and bos_id is not None

    # ---- context length ----------------------------------------------------------------------
    n_ctx = _n_ctx_of(model, tokenizer)
    lengths = [int(use_bos) + sum(len(enc[s]) for s, _ in segs) for segs in segs_per_row]
    if n_ctx is not None and max(lengths) > n_ctx:
        fits = []
        for segs in segs_per_row:
            fixed = int(use_bos) + sum(len(enc[s]) for s, c in segs if c not in _DEMO_CLASSES)
            start = 2 if instr_text is not None else 0  # demos are 4 segments each, before query + separator
            demo_lens = [sum(len(enc[p]) for p, _ in segs[k:k + 4]) for k in range(start, len(segs) - 2, 4)]
            k, total = 0, fixed
            while k < len(demo_lens) and total + demo_lens[k] <= n_ctx:
                total += demo_lens[k]
                k += 1
            fits.append(k if fixed <= n_ctx else -1)
        k_fit = min(fits)
        how = (
            f"at most {k_fit} shots fit for these prompts: use n_shots <= {k_fit}"
            if k_fit >= 0
            else "even the prompt without demonstrations is too long: shorten the instruction or the query"
        )
        raise ValueError(
            f"the longest prompt is {max(lengths)} tokens but the model's context is n_ctx={n_ctx}; {how}"
        )

    # ---- tensors -----------------------------------------------------------------------------
    width = max(lengths)
    pad = _pad_id(tokenizer)
    tokens = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    classes = torch.full((len(rows), width), int(TokenClass.PAD), dtype=torch.long)
    for b, segs in enumerate(segs_per_row):
        ids: list[int] = [int(bos_id)] if use_bos else []
        cls: list[int] = [int(TokenClass.BOS)] if use_bos else []
        for s, c in segs:
            ids.extend(enc[s])
            cls.extend([int(c)] * len(enc[s]))
        n = len(ids)
        tokens[b, width - n:] = torch.tensor(ids, dtype=torch.long)
        classes[b, width - n:] = torch.tensor(cls, dtype=torch.long)
        mask[b, width - n:] = 1

    answer_tokens = tuple(enc[" " + r["query"][1]] for r in rows)
    options = dict(separator=separator, example_sep=example_sep, split=split, dummy_query=bool(dummy_query),
                   shuffle_labels=bool(shuffle_labels), instruction=instruction, prepend_bos=use_bos, pad_token_id=pad)
    return PromptBatch(
        tokens=tokens,
        attention_mask=mask,
        token_class=classes,
        answer_ids=torch.tensor([t[0] for t in answer_tokens], dtype=torch.long),
        answer_tokens=answer_tokens,
        queries=tuple(r["query"][0] for r in rows),
        answers=tuple(r["query"][1] for r in rows),
        texts=tuple("".join(s for s, _ in segs) for segs in segs_per_row),
        task=str(task.name),
        n_shots=n_shots,
        seed=seed,
        options=options,
        demos=tuple(tuple(r["demos"]) for r in rows),
        real_queries=tuple(r["real"][0] for r in rows),
        real_answers=tuple(r["real"][1] for r in rows),
        real_answer_tokens=tuple(enc[" " + r["real"][1]] for r in rows),
    )


_DEMO_CLASSES = (TokenClass.DEMO_INPUT, TokenClass.DEMO_SEP, TokenClass.DEMO_OUTPUT, TokenClass.DEMO_NEWLINE)


# ----------------------------------------------------------------------------------------------
# evaluation


@dataclass(frozen=True, eq=False)
class IclAccuracy:
    """ICL accuracy of a model on a batch of prompts.

    ``first_token``: fraction of prompts whose argmax next token at the final separator is the
    answer's first token. ``full_answer``: fraction whose greedy continuation reproduces every
    token of the answer (equal to ``first_token`` when all answers are one token).
    """

    first_token: float
    full_answer: float
    n: int
    first_token_correct: Bool[Tensor, " batch"] = field(repr=False, default=None)  # type: ignore[assignment]
    full_answer_correct: Bool[Tensor, " batch"] = field(repr=False, default=None)  # type: ignore[assignment]

    def __str__(self) -> str:
        return f"ICL accuracy: first token {self.first_token:.3f}, full answer {self.full_answer:.3f} (n={self.n})"


def _forward(model: Any, tokens: Tensor, attention_mask: Tensor) -> Tensor:
    try:
        from ..hooks import run
    except ImportError:  # pragma: no cover - hooks is part of the package
        return model(tokens, attention_mask=attention_mask)
    return run(model, tokens, attention_mask=attention_mask)


def _check_logits_last(logits_last: Tensor, batch: PromptBatch) -> None:
    if logits_last.ndim != 2 or logits_last.shape[0] != len(batch):
        raise ValueError(
            f"logits_last must be [batch, d_vocab] with batch={len(batch)}, got {tuple(logits_last.shape)}; "
            "take logits[:, batch.separator_index] of the full logits"
        )


def first_token_accuracy(logits_last: Float[Tensor, "batch d_vocab"], batch: PromptBatch) -> float:
    """Fraction of rows whose argmax at the final separator is the answer's first token."""
    _check_logits_last(logits_last, batch)
    return (logits_last.argmax(-1).cpu() == batch.answer_ids.cpu()).float().mean().item()


def answer_logprob(logits_last: Float[Tensor, "batch d_vocab"], batch: PromptBatch) -> Float[Tensor, " batch"]:
    """Log-probability of the answer's first token at the final separator, per row (float32)."""
    _check_logits_last(logits_last, batch)
    logp = logits_last.float().log_softmax(-1)
    return logp.gather(-1, batch.answer_ids.to(logp.device)[:, None])[:, 0]


def final_logits(model: Any, batch: PromptBatch, *, batch_size: int = 32) -> Float[Tensor, "batch d_vocab"]:
    """Logits at the final separator (position -1) of every prompt, on the CPU in float32."""
    _check_int("batch_size", batch_size, minimum=1)
    out = []
    with torch.no_grad():
        for chunk in batch.chunks(batch_size):
            chunk = chunk.trimmed()
            out.append(_forward(model, chunk.tokens, chunk.attention_mask)[:, -1].float().cpu())
    return torch.cat(out)


def _teacher_forced(chunk: PromptBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Prompt + answer[:-1] per row, left-padded; and for each answer token the position predicting it.

    Returns tokens, mask, ``pred_pos`` [batch, max_len] and ``targets`` [batch, max_len] (-1 past an
    answer's end).
    """
    lens = chunk.lengths.tolist()
    ans = chunk.answer_tokens
    m = max(len(a) for a in ans)
    width = max(n + len(a) - 1 for n, a in zip(lens, ans))
    b = len(chunk)
    tokens = torch.full((b, width), int(chunk.options.get("pad_token_id", 0)), dtype=torch.long)
    mask = torch.zeros((b, width), dtype=torch.long)
    pred_pos = torch.zeros((b, m), dtype=torch.long)
    targets = torch.full((b, m), -1, dtype=torch.long)
    pw = chunk.tokens.shape[1]
    for r, (n, a) in enumerate(zip(lens, ans)):
        seq = chunk.tokens[r, pw - n:].tolist() + list(a[:-1])
        tokens[r, width - len(seq):] = torch.tensor(seq, dtype=torch.long)
        mask[r, width - len(seq):] = 1
        end = width - len(a)  # position of the final separator
        pred_pos[r, : len(a)] = torch.arange(end, end + len(a))
        targets[r, : len(a)] = torch.tensor(a, dtype=torch.long)
    return tokens, mask, pred_pos, targets


def _evaluate_chunk(model: Any, chunk: PromptBatch) -> tuple[Tensor, Tensor]:
    chunk = chunk.trimmed()
    tokens, mask, pred_pos, targets = _teacher_forced(chunk)
    logits = _forward(model, tokens, mask)
    rows = torch.arange(len(chunk))[:, None]
    pred = logits[rows.to(logits.device), pred_pos.to(logits.device)].argmax(-1).cpu()  # [batch, max_len]
    ok = (pred == targets) | (targets < 0)
    return ok[:, 0], ok.all(-1)


def full_answer_match(model: Any, batch: PromptBatch, *, batch_size: int = 32) -> Bool[Tensor, " batch"]:
    """Whether greedy decoding from each prompt emits exactly the answer's tokens.

    Computed with one teacher-forced forward per chunk: greedy decoding reproduces the answer iff
    at every answer position the argmax given the answer prefix is the next answer token, so
    feeding the prompt plus ``answer[:-1]`` and comparing argmaxes is the same test as decoding
    ``len(answer)`` tokens, at the cost of a single pass.
    """
    return evaluate_prompts(model, batch, batch_size=batch_size).full_answer_correct


def evaluate_prompts(model: Any, batch: PromptBatch, *, batch_size: int = 32) -> IclAccuracy:
    """First-token and full-answer accuracy of ``model`` on ``batch`` (batched, left-padded, no grad).

    The answers compared against are ``batch.answer_tokens`` (the query in the prompt; for a
    dummy-query batch that is the dummy's answer).
    """
    if not isinstance(batch, PromptBatch):
        raise TypeError(f"batch must be a PromptBatch (from tvlens.icl_prompts), got {type(batch).__name__}")
    _check_int("batch_size", batch_size, minimum=1)
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
    n_prompts: int = 50,
    seed: int = 0,
    batch_size: int = 32,
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
