"""Word-level tokenizer for the tvlens model organism (and the tiny test models).

Every whitespace-separated word is one token; the separator ``→`` and the newline are
always single tokens of their own, even without surrounding spaces.  The tokenizer is a
plain ``transformers.PreTrainedTokenizerFast`` (saved as ``tokenizer.json``), so anything
that loads an HF tokenizer loads it, offline.

Design notes (why, not what):

* ``WhitespaceSplit`` silently drops ``\\n``; the pre-tokenizer therefore isolates
  ``\\n`` and ``→`` first and only then splits on (and removes) spaces.
* WordLevel has no decoder that knows about newlines, so ``decode`` is built from stock
  decoders: words are joined with one space, and a newline glues to its neighbours, so
  ``decode(encode("france → paris\\njapan →"))`` round-trips exactly.
* Like Llama tokenizers, encoding adds ``<bos>`` (``add_special_tokens=False`` turns it off).
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "SEPARATOR", "NEWLINE", "build_tokenizer", "default_organism_tokenizer", "words_of"]

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
SEPARATOR = "→"
NEWLINE = "\n"
# Placeholder glued around the newline while decoding; never part of a word (words have no '\x00').
_GLUE = "\x00"


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


def build_tokenizer(words: Iterable[str], *, add_bos: bool = True) -> PreTrainedTokenizerFast:
    """Build a word-level ``PreTrainedTokenizerFast`` whose vocabulary is the special tokens,
    ``→``, ``\\n`` and every word of ``words`` (strings are split into words first, so whole
    sentences such as task instructions may be passed).  Token ids are deterministic: specials
    first, then ``→`` and ``\\n``, then the words in sorted order.
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
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(f"{NEWLINE}|{SEPARATOR}"), behavior="isolated"),
            pre_tokenizers.Split(Regex(r"[^\S\n]+"), behavior="removed"),
        ]
    )
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


def default_organism_tokenizer() -> PreTrainedTokenizerFast:
    """The organism's tokenizer: every word of every task pair and instruction of the suite."""
    from tvlens.tasks import suite_vocabulary

    return build_tokenizer(suite_vocabulary())
