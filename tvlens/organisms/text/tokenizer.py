"""Word-level tokenizer for the tvlens model organism (and the tiny test models).

Every whitespace-separated word is one token; the separator ``→`` and the newline are
always single tokens of their own, even without surrounding spaces.  The tokenizer is a
plain ``transformers.PreTrainedTokenizerFast`` (saved as ``tokenizer.json``), so anything
that loads an HF tokenizer loads it, offline.

**Case.** The task data is written in natural case (``France → Paris``), as the anchors' data
is (Hendel et al. 2023; Todd et al. 2024); the organism was trained on a lowercase vocabulary.
The tokenizer's normaliser therefore lowercases every word *except the words its vocabulary
holds with capitals* (the letters of ``swap_case``, element symbols, the first word of each
instruction): a word is looked up as written when the vocabulary has it so, lowercased
otherwise. ``France``, ``FRANCE`` and ``france`` are one token; ``Fe`` and ``A`` keep their own.
The organism's token ids are those it was trained on, for the natural-case data.

Design notes (why, not what):

* ``WhitespaceSplit`` silently drops ``\\n``; the pre-tokenizer therefore keeps ``\\n`` and ``→``
  as pieces of their own and removes only the other white space (:func:`pre_tokenizer`).
* The normaliser is built from stock ``tokenizers`` pieces, so ``tokenizer.json`` stays loadable
  everywhere: each capital of a cased vocabulary word, *inside that whole word*, is first
  replaced by a private-use character, then ``Lowercase`` runs, then the private-use characters
  are turned back into their capitals. Every step replaces one character by one character, so
  the offsets of every token still point at the original text.
* WordLevel has no decoder that knows about newlines, so ``decode`` is built from stock
  decoders: words are joined with one space, and a newline glues to its neighbours, so
  ``decode(encode("France → Paris\\nJapan →"))`` gives ``"france → paris\\njapan →"``.
* Like Llama tokenizers, encoding adds ``<bos>`` (``add_special_tokens=False`` turns it off).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from typing import Any

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = [
    "SPECIAL_TOKENS",
    "SEPARATOR",
    "NEWLINE",
    "CASED_TASKS",
    "build_tokenizer",
    "case_normalizer",
    "default_organism_tokenizer",
    "organism_lower_phrases",
    "organism_vocabulary",
    "pre_tokenizer",
    "words_of",
]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
SEPARATOR = "→"
NEWLINE = "\n"
#: Tasks whose answers depend on letter case: the organism's vocabulary keeps their words as written.
CASED_TASKS = ("element_symbol", "next_letter", "previous_letter", "swap_case")
# Placeholder glued around the newline while decoding; never part of a word (words have no '\x00').
_GLUE = "\x00"
# Capitals of protected words are parked on this plane while Lowercase runs (one character each).
_PARK = 0xF0000


def words_of(text: str) -> list[str]:
    """Split ``text`` the way the tokenizer does (newline and ``→`` isolated, spaces removed)."""
    out: list[str] = []
    for line_i, line in enumerate(text.split(NEWLINE)):
        if line_i:
            out.append(NEWLINE)
        for chunk_i, chunk in enumerate(line.split(SEPARATOR)):
            if chunk_i:
                out.append(SEPARATOR)
            out.extend(chunk.split())
    return out


def _parked(c: str) -> str:
    return chr(_PARK + ord(c))


def _phrase_steps(words: Sequence[str], lower_phrases: Iterable[str]) -> list[Any]:
    """The first steps of :func:`case_normalizer`: the capitals of protected ``words`` inside
    ``lower_phrases`` lowercased, before any capital is parked."""
    steps: list[Any] = []
    protected = set(words)
    for phrase in sorted(set(lower_phrases)):
        ws = words_of(phrase)
        for j, w in enumerate(ws):
            if w not in protected or len(ws) < 2:
                continue
            before, after = " ".join(ws[:j]) + (" " if j else ""), (" " if j < len(ws) - 1 else "") + " ".join(ws[j + 1:])
            for i, c in enumerate(w):
                if c == c.lower():
                    continue
                pre, post = re.escape(before + w[:i]), re.escape(w[i + 1:] + after)
                behind = f"(?<=^{pre}|\\s{pre}|{SEPARATOR}{pre})"
                ahead = f"(?={post}(?:$|\\s|{SEPARATOR}))"
                steps.append(normalizers.Replace(Regex(behind + re.escape(c) + ahead), c.lower()))
    return steps


def case_normalizer(cased_words: Iterable[str], lower_phrases: Iterable[str] = ()) -> normalizers.Normalizer:
    """Lowercase everything except the whole words ``cased_words`` (see the module docstring).

    ``lower_phrases``: several-word strings in which a cased word is an ordinary word and is
    lowercased all the same (``"Santa Fe"``: ``fe``, not the symbol of iron ``Fe``).
    """
    words = sorted({w for w in cased_words if w != w.lower()})
    bad = [w for w in words if any(ord(c) >= 0x10000 for c in w) or not words_of(w) == [w]]
    if bad:
        raise ValueError(f"cannot keep the case of {bad[:3]!r}: a protected word must be one word of the Basic "
                         "Multilingual Plane; remove it from the vocabulary or build the tokenizer with case_fold=False")
    steps: list[Any] = _phrase_steps(words, lower_phrases)
    # One step per capital: the alternation of that capital's place in every protected word. Parking is
    # order-free (a pattern reads a capital of its word parked or not, and each match is that one
    # character), so one pass per capital parks what the word-by-word steps would.
    park: dict[str, list[str]] = {}
    for w in words:
        def lit(s: str) -> str:  # a capital may already be parked by an earlier step
            return "".join(f"[{re.escape(c)}{_parked(c)}]" if c != c.lower() else re.escape(c) for c in s)

        for i, c in enumerate(w):
            if c == c.lower():
                continue
            pre, post = lit(w[:i]), lit(w[i + 1:])
            behind = f"(?<=^{pre}|\\s{pre}|{SEPARATOR}{pre})"
            ahead = f"(?={post}(?:$|\\s|{SEPARATOR}))"
            park.setdefault(c, []).append(behind + re.escape(c) + ahead)
    for c, patterns in park.items():
        steps.append(normalizers.Replace(Regex("|".join(f"(?:{x})" for x in patterns)), _parked(c)))
    steps.append(normalizers.Lowercase())
    for c in sorted({c for w in words for c in w if c != c.lower()}):
        steps.append(normalizers.Replace(_parked(c), c))
    return normalizers.Sequence(steps)


def pre_tokenizer() -> pre_tokenizers.PreTokenizer:
    """Words, with every ``\\n`` and ``→`` a piece of its own, and the other white space removed.

    One ``Split`` that keeps its matches (``invert``): each ``\\n``, each ``→``, and each run of
    characters that are neither white space nor ``→``; what lies between (white space) is dropped.
    This pieces every text as isolating ``\\n`` and ``→`` and then splitting on ``[^\\S\\n]+`` would,
    in one pass instead of two.
    """
    return pre_tokenizers.Split(Regex(f"{NEWLINE}|{SEPARATOR}|[^\\s{SEPARATOR}]+"), behavior="removed", invert=True)


def build_tokenizer(words: Iterable[str], *, add_bos: bool = True, case_fold: bool = True,
                    lower_phrases: Iterable[str] = ()) -> PreTrainedTokenizerFast:
    """Build a word-level ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens,
    ``→``, ``\\n`` and every word of ``words`` (strings are split into words first, so whole
    sentences such as task instructions may be passed).  Token ids are deterministic: specials
    first, then ``→`` and ``\\n``, then the words in sorted order.

    With ``case_fold`` (default) a word of the text is looked up as written when the vocabulary
    holds it with the same capitals, and lowercased otherwise (:func:`case_normalizer`, which
    also takes ``lower_phrases``).
    """
    vocab: dict[str, int] = {}
    for tok in (*SPECIAL_TOKENS, SEPARATOR, NEWLINE):
        vocab[tok] = len(vocab)
    extra: set[str] = set()
    for w in words:
        extra.update(words_of(str(w)))
    for w in sorted(extra):
        if w not in vocab:
            vocab[w] = len(vocab)

    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    if case_fold:
        tok.normalizer = case_normalizer((w for w in vocab if w not in SPECIAL_TOKENS), lower_phrases)
    tok.pre_tokenizer = pre_tokenizer()
    # Decoding: WordPiece joins tokens with " " except those starting with the prefix; the
    # newline is rewritten to prefix+"\n"+glue so that no space precedes it, and the space the
    # next word gets is removed with the glue after fusing.
    tok.decoder = decoders.Sequence(
        [
            decoders.Replace(NEWLINE, "##" + NEWLINE + _GLUE),
            decoders.WordPiece(prefix="##", cleanup=False),
            decoders.Fuse(),
            decoders.Replace(_GLUE + " ", ""),
            decoders.Replace(_GLUE, ""),
            # WordPiece keeps the prefix on the very first token.
            decoders.Replace("##" + NEWLINE, NEWLINE),
        ]
    )
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
        )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        padding_side="left",
        clean_up_tokenization_spaces=False,
        model_max_length=512,
    )
    return fast


def organism_vocabulary(tasks: Iterable[Any] | None = None) -> list[str]:
    """The organism's words: those of ``tasks`` (default: the shipped suite), lowercased except the
    pairs of :data:`CASED_TASKS` and the first word of each instruction, which keep their case."""
    tasks = _suite_tasks() if tasks is None else tasks
    words: set[str] = set()
    for t in tasks:
        first, *rest = words_of(str(getattr(t, "instruction", "") or "")) or [""]
        words.update(w for w in [first] if w)
        words.update(w.lower() for w in rest)
        keep = t.name in CASED_TASKS
        for x, y in t.pairs:
            for w in (*words_of(x), *words_of(y)):
                words.add(w if keep else w.lower())
    return sorted(words)


def organism_lower_phrases(tasks: Iterable[Any] | None = None) -> list[str]:
    """Several-word inputs and outputs of ``tasks`` outside :data:`CASED_TASKS` that contain a word the
    organism's vocabulary keeps cased (``"Santa Fe"``): the normaliser lowercases those words there."""
    tasks = _suite_tasks() if tasks is None else list(tasks)
    cased = {w for w in organism_vocabulary(tasks) if w != w.lower()}
    return sorted({s for t in tasks if t.name not in CASED_TASKS for p in t.pairs for s in p
                   if len(words_of(s)) > 1 and cased.intersection(words_of(s))})


def _suite_tasks() -> list[Any]:
    from tvlens.tasks import list_tasks, load_task

    return [load_task(n) for n in list_tasks()]


def default_organism_tokenizer() -> PreTrainedTokenizerFast:
    """The organism's tokenizer: every word of every task pair and instruction of the suite, with the
    case rule of the module docstring (the ``tokenizer.json`` shipped with both text organisms)."""
    tasks = _suite_tasks()
    return build_tokenizer(organism_vocabulary(tasks), lower_phrases=organism_lower_phrases(tasks))
