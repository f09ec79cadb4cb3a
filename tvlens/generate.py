"""Text generation on TransformerLens models: greedy or sampled, batched, left-padded, with an optional vector.

:func:`generate` decodes by recomputing the whole sequence at every step (no key/value cache), so
it is right on every architecture the hook contract covers: under TransformerLens 4.3 with
transformers 5 the bridge's own ``generate()`` reads ``past_key_values`` where transformers passes
``cache=``, its cache stays empty, and every token after the first is computed without the
context. A full recompute costs ``O(new tokens × length²)`` attention, which is nothing for the
short answers of ICL tasks; it is the same computation as the Hugging Face model's cached
decoding (tested token for token against ``generate(do_sample=False, use_cache=True)`` on GPT-2,
Llama and Qwen3 models with their real vocabularies).

**With a vector** (a :class:`tvlens.TaskVector`; Hendel et al. 2023 replace the residual at the
final separator, Todd et al. 2024 add a function vector there) the patch is applied at the
prompt's last position only (``vector_at="final"``, the default): the prompt is patched as in
:func:`tvlens.apply_vector`, and every token generated after it attends to the patched prompt
without being patched itself — what a key/value-cached decoder gives when the prompt is patched
once. ``vector_at="every"`` also patches each generated token's position (what
``with vector_applied(...): model.generate(...)`` does), ``"prompt"`` every real prompt position.

**Batches** are left-padded, so every row's last prompt token is at the same position and new
tokens are appended on the right; the bridge derives positions from the attention mask. A row
that has emitted the end-of-sequence token is padded from then on, as Hugging Face does.
**Sampling** uses its own ``torch.Generator`` seeded from ``seed`` on the CPU, so a seed gives
the same text on every device.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .vocabulary import BATCH_SIZE

if TYPE_CHECKING:  # imported inside the functions: ``import tvlens`` binds this module's function eagerly
    import torch
    from jaxtyping import Bool, Int
    from torch import Tensor

__all__ = ["Generation", "generate"]

_VECTOR_AT = ("final", "prompt", "every")


@dataclass(frozen=True, eq=False)
class Generation:
    """What :func:`generate` produced: new tokens per row (``pad_id`` after a row ended), their texts."""

    #: generated token ids, ``[batch, steps]``; after a row's end-of-sequence token, ``pad_id``
    tokens: Int[Tensor, "batch new"]
    #: number of generated tokens of each row, its end-of-sequence token included
    lengths: Int[Tensor, " batch"]
    #: whether each row emitted the end-of-sequence token
    finished: Bool[Tensor, " batch"]
    #: decoded new tokens of each row (special tokens skipped)
    texts: tuple[str, ...]
    #: the left-padded prompts the generation started from, and their attention mask
    prompt_tokens: Int[Tensor, "batch pos"]
    prompt_mask: Int[Tensor, "batch pos"]
    pad_id: int
    options: dict

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    def row(self, i: int) -> list[int]:
        """The generated ids of row ``i`` (up to and including its end-of-sequence token)."""
        return self.tokens[i, : int(self.lengths[i])].tolist()

    def __repr__(self) -> str:
        return (f"Generation(n={len(self)}, steps={self.tokens.shape[1]}, finished={int(self.finished.sum())}, "
                f"do_sample={self.options.get('do_sample')}, vector={self.options.get('vector')!r})")


def _prompts(model: Any, prompts: Any, attention_mask: Tensor | None, prepend_bos: bool | None) -> tuple[Tensor, Tensor]:
    import torch
    from torch import Tensor

    from .inputs.text import PromptBatch, _pad_id, _tokenizer_of

    if isinstance(prompts, PromptBatch):
        return prompts.tokens.cpu(), prompts.attention_mask.cpu().long()
    if isinstance(prompts, Tensor):
        if prompts.is_floating_point() or prompts.ndim not in (1, 2):
            raise ValueError(f"token prompts must be an integer [batch, pos] tensor, got {prompts.dtype} {tuple(prompts.shape)}")
        tokens = prompts[None] if prompts.ndim == 1 else prompts
        mask = torch.ones_like(tokens) if attention_mask is None else attention_mask.long()
        if mask.shape != tokens.shape:
            raise ValueError(f"attention_mask has shape {tuple(mask.shape)} but the tokens have {tuple(tokens.shape)}")
        if not bool(mask[:, -1].all()):
            raise ValueError("the last position of some row is padding; generate appends on the right, so pad the "
                             "prompts on the LEFT (tvlens.icl_prompts and tokenizer(..., padding_side='left') do)")
        return tokens.cpu().long(), mask.cpu()
    if isinstance(prompts, str):
        prompts = [prompts]
    if isinstance(prompts, (list, tuple)) and prompts and all(isinstance(p, str) for p in prompts):
        if attention_mask is not None:
            raise ValueError("attention_mask only goes with token prompts; text prompts are tokenized and padded here")
        tok = _tokenizer_of(model)
        if prepend_bos is None:
            prepend_bos = bool(getattr(getattr(model, "cfg", None), "default_prepend_bos", True))
        bos = getattr(tok, "bos_token_id", None)
        rows = [([int(bos)] if prepend_bos and bos is not None else []) + list(ids)
                for ids in tok(list(prompts), add_special_tokens=False)["input_ids"]]
        if any(not r for r in rows):
            raise ValueError("a prompt tokenizes to nothing; give non-empty prompt texts")
        width = max(len(r) for r in rows)
        tokens = torch.full((len(rows), width), _pad_id(tok), dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            tokens[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        return tokens, mask
    raise TypeError(f"prompts must be a PromptBatch, a [batch, pos] token tensor, a string or a list of strings, "
                    f"got {type(prompts).__name__}")


def _site(model: Any, layer: int) -> str:
    """The hook holding the residual stream entering block ``layer`` (``n_layers``: after the last block)."""
    from .hooks import act_name
    from .models import ModelInfo

    n = ModelInfo.of(model).n_layers
    return act_name("resid_pre", layer) if layer < n else act_name("resid_post", n - 1)


def _check_number(name: str, value: Any, *, minimum: float | None = None, integer: bool = False,
                  strict: bool = False) -> Any:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok:
        raise TypeError(f"{name} must be {'an int' if integer else 'a number'}, got {value!r}")
    if minimum is not None and (value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be {'>' if strict else '>='} {minimum}, got {value}")
    return value


def generate(
    model: Any,
    prompts: Any,
    *,
    max_new_tokens: int = 16,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
    eos_token_id: int | None = None,
    vector: Any = None,
    mode: str | None = None,
    alpha: float = 1.0,
    layer: int | None = None,
    vector_at: str = "final",
    attention_mask: Tensor | None = None,
    prepend_bos: bool | None = None,
    batch_size: int | None = BATCH_SIZE,
) -> Generation:
    """Continue each prompt by up to ``max_new_tokens`` tokens (see the module docstring).

    Args:
        model: a TransformerLens model (``tvlens.load_model``).
        prompts: a :class:`tvlens.PromptBatch`, left-padded ``[batch, pos]`` tokens (with
            ``attention_mask``), or prompt strings (tokenized whole, BOS as ``model.cfg`` says).
        max_new_tokens: tokens generated at most per row.
        do_sample: ``False``: greedy (argmax); ``True``: sample from the softmax of
            ``logits / temperature``, restricted to the ``top_k`` most likely tokens and to the
            smallest set of probability ``>= top_p`` when given.
        seed: seeds the sampling generator.
        stop_at_eos, eos_token_id: a row ends at the end-of-sequence token (default: the
            tokenizer's); generation stops when every row has ended.
        vector, mode, alpha, layer: a :class:`tvlens.TaskVector` applied as in
            :func:`tvlens.apply_vector` (``mode`` ``"replace"`` — Hendel et al. 2023 — or ``"add"``
            ``alpha × vector`` — Todd et al. 2024; default by the vector's kind).
        vector_at: ``"final"`` (the prompt's last position), ``"prompt"`` (every real prompt
            position) or ``"every"`` (those and every generated position).
        batch_size: rows per forward (``None``: the engine's plan decides).

    Returns:
        A :class:`Generation` (CPU tensors).
    """
    import torch

    from .engine.plan import DEFAULT_BATCH
    from .inputs.text import _pad_id, _tokenizer_of
    from .models import require_compatible

    require_compatible(model)
    max_new_tokens = _check_number("max_new_tokens", max_new_tokens, minimum=1, integer=True)
    batch_size = DEFAULT_BATCH if batch_size is None else _check_number("batch_size", batch_size, minimum=1, integer=True)
    seed = _check_number("seed", seed, minimum=0, integer=True)
    _check_decoding(do_sample, stop_at_eos, temperature, top_k, top_p, vector_at)
    tokens, mask = _prompts(model, prompts, attention_mask, prepend_bos)
    tok = _tokenizer_of(model) if getattr(model, "tokenizer", None) is not None else None
    if eos_token_id is None and tok is not None:
        eos_token_id = getattr(tok, "eos_token_id", None)
    pad = _pad_id(tok) if tok is not None else 0
    d_vocab = int(model.cfg.d_vocab)
    if int(tokens.max()) >= d_vocab or int(tokens.min()) < 0:
        raise ValueError(f"prompt token ids must be in 0..{d_vocab - 1} for this model; got {int(tokens.min())}..{int(tokens.max())}")
    mode, site, value = _vector_site(model, vector, mode, alpha, layer)

    step = _Decoding(model=model, site=site, value=value, mode=mode, vector_at=vector_at, n_prompt=int(tokens.shape[1]),
                     do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p, pad=pad,
                     eos=eos_token_id if stop_at_eos else None)
    gen = torch.Generator().manual_seed(seed)
    outs, lens, fins = zip(*[step.run(tokens[i:i + batch_size], mask[i:i + batch_size], max_new_tokens, gen)
                             for i in range(0, tokens.shape[0], batch_size)])
    steps = max(o.shape[1] for o in outs)
    out = torch.cat([torch.nn.functional.pad(o, (0, steps - o.shape[1]), value=pad) for o in outs])
    lengths = torch.cat(lens)
    texts = tuple(tok.decode(out[i, : int(lengths[i])].tolist(), skip_special_tokens=True) if tok is not None else ""
                  for i in range(out.shape[0]))
    options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                   top_p=top_p, seed=seed, vector=None if vector is None else vector.describe(), mode=mode,
                   vector_at=vector_at if vector is not None else None)
    return Generation(tokens=out, lengths=lengths, finished=torch.cat(fins), texts=texts, prompt_tokens=tokens,
                      prompt_mask=mask, pad_id=pad, options=options)


def _check_decoding(do_sample: Any, stop_at_eos: Any, temperature: Any, top_k: Any, top_p: Any, vector_at: Any) -> None:
    """Refuse decoding options that are malformed or that greedy decoding would ignore."""
    if not isinstance(do_sample, bool) or not isinstance(stop_at_eos, bool):
        raise TypeError("do_sample and stop_at_eos must be True or False")
    _check_number("temperature", temperature, minimum=0, strict=True)
    if top_k is not None:
        _check_number("top_k", top_k, minimum=1, integer=True)
    if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if not do_sample and (top_k is not None or top_p is not None or temperature != 1.0):
        raise ValueError("temperature, top_k and top_p only apply when sampling: pass do_sample=True, or leave them out "
                         "for greedy decoding")
    if vector_at not in _VECTOR_AT:
        raise ValueError(f"vector_at must be one of {_VECTOR_AT}, got {vector_at!r}")


def _vector_site(model: Any, vector: Any, mode: str | None, alpha: float,
                 layer: int | None) -> tuple[str | None, str | None, Tensor | None]:
    """The vector's mode, the hook it is applied at and the value written there (``alpha`` folded in
    for ``"add"``); all ``None`` without a vector."""
    if vector is None:
        if mode is not None or layer is not None or alpha != 1.0:
            raise ValueError("mode, alpha and layer describe how a vector is applied: pass vector=... or leave them out")
        return None, None, None
    from .vectors.activation import TaskVector, _check_mode

    if not isinstance(vector, TaskVector):
        raise TypeError(f"vector must be a tvlens.TaskVector (tvlens.task_vector, function_vector, ...), got {type(vector).__name__}")
    mode = _check_mode(mode, vector, alpha)
    site = _site(model, vector.check_model(model, layer=layer))
    return mode, site, vector.vector * float(alpha) if mode == "add" else vector.vector


@dataclass(frozen=True)
class _Decoding:
    """How one chunk of left-padded prompts is continued: the model, the vector's hook (if any) and
    where it applies, the choice of the next token, the end-of-sequence token (``None``: never stop)."""

    model: Any
    site: str | None
    value: Tensor | None
    mode: str | None
    vector_at: str
    n_prompt: int
    do_sample: bool
    temperature: float
    top_k: int | None
    top_p: float | None
    pad: int
    eos: int | None

    def where(self, real: Bool[Tensor, "batch pos"], width: int) -> Bool[Tensor, "batch pos"]:
        """The positions the vector is written at in a sequence of ``width`` (prompt and new tokens)."""
        import torch

        rows, device = real.shape[0], real.device
        if self.vector_at == "final":
            where = torch.zeros(width, dtype=torch.bool, device=device)
            where[self.n_prompt - 1] = True
            return where.expand(rows, -1)
        new = (torch.zeros if self.vector_at == "prompt" else torch.ones)(rows, width - self.n_prompt, dtype=torch.bool,
                                                                           device=device)
        return torch.cat([real, new], 1)

    def hooks(self, real: Tensor, width: int) -> list:
        if self.value is None:
            return []
        where, value, mode = self.where(real, width), self.value, self.mode

        def patch(act: Tensor, hook: Any = None) -> Tensor:
            act = act.clone()
            v = value.to(act.device, act.dtype)
            act[where] = v if mode == "replace" else act[where] + v
            return act
        return [(self.site, patch)]

    def run(self, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"], max_new_tokens: int,
            gen: torch.Generator) -> tuple[Int[Tensor, "batch new"], Int[Tensor, " batch"], Bool[Tensor, " batch"]]:
        """Up to ``max_new_tokens`` new tokens per row (``pad`` after a row ended), their counts, which rows ended."""
        import torch

        from . import hooks as _hooks

        device = _hooks.device_of(self.model)
        t, m = tokens.to(device), mask.to(device)
        real = m.bool()
        done = torch.zeros(t.shape[0], dtype=torch.bool)
        n_gen = torch.zeros(t.shape[0], dtype=torch.long)
        new: list[Tensor] = []
        with torch.no_grad():
            for _ in range(max_new_tokens):
                logits = _hooks.run(self.model, t, attention_mask=m, fwd_hooks=self.hooks(real, t.shape[1]))[:, -1].float().cpu()
                nxt = _sample(logits, self.temperature, self.top_k, self.top_p, gen) if self.do_sample else logits.argmax(-1)
                nxt = torch.where(done, torch.full_like(nxt, self.pad), nxt)
                n_gen += (~done).long()
                new.append(nxt)
                if self.eos is not None:
                    done |= nxt == int(self.eos)
                t = torch.cat([t, nxt[:, None].to(device)], 1)
                m = torch.cat([m, torch.ones_like(m[:, :1])], 1)
                if bool(done.all()):
                    break
        return torch.stack(new, 1), n_gen, done


def _sample(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None, gen: torch.Generator) -> Tensor:
    """One token per row from softmax(logits / temperature), top-k then top-p filtered (as Hugging Face orders them)."""
    import torch
    scores = logits / float(temperature)
    if top_k is not None and top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_scores, order = scores.sort(dim=-1, descending=False)
        cum = sorted_scores.softmax(-1).cumsum(-1)
        drop = cum <= (1 - top_p)
        drop[:, -1] = False  # keep at least the most likely token
        scores = scores.masked_fill(drop.scatter(1, order, drop), float("-inf"))
    return torch.multinomial(scores.softmax(-1), 1, generator=gen)[:, 0]

