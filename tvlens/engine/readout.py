"""The read-out path: forwards that read activations (and final logits) out of a model.

:func:`run_rows` runs prompts in length buckets and reads the final position (residuals entering
chosen blocks, and the logits), optionally with one residual replaced or added there;
:func:`run_shared` runs two prompts that share a prefix as one packed sequence with a tree-shaped
attention mask (Hendel et al. 2023's prefix trick, without a KV cache); :func:`capture_acts`
reads whole activations at chosen hooks.  Capabilities these rely on (``logits_to_keep``, the
last block's MLP on one position, 4D masks, attention run by the wrapped module) are checked once
per model in :mod:`tvlens.engine.capabilities`.  Every forward here that reads only real positions
goes through :func:`run_final`, which hands attention to the wrapped Hugging Face module when no
hook reads inside it (:mod:`tvlens.engine.attention`).
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
from jaxtyping import Float, Int
from torch import Tensor

from .. import hooks as _hooks
from ..hooks import act_name, resid_name
from . import capabilities
from .attention import delegated
from .batch import EngineBatch, as_batch
from .plan import gather_inputs, length_buckets, pad_id_of, pad_left, rows_per_forward

__all__ = ["read", "all_logits", "final_logits", "run_final", "forward_last", "run_rows", "run_shared", "capture_acts", "last_token_only", "pack", "packed_chunk",
           "common_prefix"]


def run_final(model: Any, tokens: Tensor, *, fwd_hooks: Sequence[tuple[Any, Any]] = (), **kw: Any) -> Tensor:
    """One hooked forward of which only real (not padding) positions are read: attention runs as the
    wrapped model computes it where that is exact and no hook reads inside it
    (:func:`tvlens.engine.attention.delegated`)."""
    with delegated(model, [name for name, _ in fwd_hooks]):
        return _hooks.run(model, tokens, fwd_hooks=fwd_hooks, **kw)


def forward_last(model: Any, tokens: Tensor, mask: Tensor, fwd_hooks: list, **kw: Any) -> Tensor:
    """Final-position logits; asks the model for the last position only when it supports it."""
    # learnt on the first call: a model whose forward does not take the keyword says so by TypeError
    if capabilities.known(model, "logits_to_keep", True):
        try:
            out = run_final(model, tokens, attention_mask=mask, fwd_hooks=fwd_hooks, logits_to_keep=1, **kw)
            capabilities.remember(model, "logits_to_keep", True)
            return out[:, -1]
        except TypeError as err:
            if "logits_to_keep" not in str(err):
                raise
            capabilities.remember(model, "logits_to_keep", False)
    return run_final(model, tokens, attention_mask=mask, fwd_hooks=fwd_hooks, **kw)[:, -1]


def last_token_only(act: Tensor, hook: Any = None) -> Tensor:
    return act[:, -1:]


def final_only_ok(model: Any) -> bool:
    """Can the MLP of a pass's last block run on the final position only?

    Only the final position of the last block a pass needs is ever read, so its MLP input
    (``blocks.{l}.ln2.hook_in``) is cut to that position (the residual add broadcasts). Checked
    once per model against the plain forward: where it does not reproduce the final logits (an
    architecture without that hook or with another block layout), it is not used.
    """
    return capabilities.cached(model, "final_only_mlp", lambda: _check_final_only(model))


@torch.no_grad()
def _check_final_only(model: Any) -> bool:
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    name = act_name("ln2_in", info.n_layers - 1)
    if name not in model.hook_dict:
        return False
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, info.d_vocab, (2, 6), generator=g).to(_hooks.device_of(model))
    try:
        ref = run_final(model, tokens)[:, -1]
        got = run_final(model, tokens, fwd_hooks=[(name, last_token_only)])[:, -1]
        return bool(torch.allclose(got.float(), ref.float(), atol=1e-4, rtol=1e-4))
    except Exception:
        return False


@torch.no_grad()
def run_rows(
    model: Any,
    rows: Sequence[Tensor],
    *,
    capture: Sequence[int] = (),
    logits: bool = True,
    patch_layer: int | None = None,
    patch_value: Tensor | None = None,
    patch_mode: str = "replace",
    batch_size: int | None = None,
    inputs: Sequence[dict[str, Tensor]] | None = None,
) -> tuple[Tensor | None, dict[int, Tensor]]:
    """Run prompts (unpadded rows) in length-sorted chunks; read the final position.

    Returns the final-position logits ``[rows, d_vocab]`` (float32 CPU, if ``logits``) and the
    residual entering each block in ``capture`` at the final position (``{layer: [rows, d_model]}``;
    ``n_layers`` is the stream after the last block).  ``patch_value`` (``[d_model]`` or
    ``[rows, d_model]``) replaces / is added to the final position of the residual entering block
    ``patch_layer``.  Without logits the pass stops at the last captured layer.  ``inputs`` are the
    rows' extra model inputs (:func:`tvlens.engine.plan.row_inputs`), batched with their rows.
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    n = len(rows)
    device = _hooks.device_of(model)
    pad = pad_id_of(model)
    caps = {int(l): torch.empty((n, info.d_model), dtype=torch.float32) for l in capture}
    out = torch.empty((n, info.d_vocab), dtype=torch.float32) if logits else None
    stop = None if logits or not caps or max(caps) >= info.n_layers else max(caps)
    # the last block the pass runs is needed at the final position only: its MLP runs there only
    last = info.n_layers - 1 if stop is None else stop - 1
    cut = [(act_name("ln2_in", last), last_token_only)] if last >= 0 and final_only_ok(model) else []
    for idx in length_buckets([int(r.shape[0]) for r in rows], rows_per_forward(batch_size)):
        tokens, mask = pad_left([rows[i] for i in idx], pad)
        it = torch.as_tensor(idx)
        fwd: list = []
        for layer in caps:
            def grab(act: Tensor, hook: Any = None, layer: int = layer, it: Tensor = it) -> None:
                caps[layer][it] = act[:, -1].detach().to("cpu", torch.float32)
            fwd.append((resid_name(layer, info.n_layers), grab))
        if patch_layer is not None and patch_value is not None:
            pv = patch_value if patch_value.ndim == 1 else patch_value[it]

            def patch(act: Tensor, hook: Any = None, pv: Tensor = pv) -> Tensor:
                act = act.clone()
                v = pv.to(act.device, act.dtype)
                act[:, -1] = v if patch_mode == "replace" else act[:, -1] + v
                return act
            # the patch must run before any capture at the same hook point
            fwd.insert(0, (resid_name(patch_layer, info.n_layers), patch))
        fwd.extend(cut)
        extra = {k: v.to(device) for k, v in gather_inputs(inputs, idx).items()}
        if logits:
            out[it] = forward_last(model, tokens.to(device), mask.to(device), fwd, **extra).detach().to("cpu", torch.float32)
        else:
            run_final(model, tokens.to(device), attention_mask=mask.to(device), fwd_hooks=fwd, stop_at_layer=stop, **extra)
    return out, caps


def common_prefix(a: Tensor, b: Tensor) -> int:
    n = min(int(a.shape[0]), int(b.shape[0])) - 1  # each branch keeps at least its last token
    if n <= 0:
        return 0
    diff = (a[:n] != b[:n]).nonzero()
    return int(diff[0]) if diff.numel() else n


def pack(prefix: Tensor, a: Tensor, b: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Tokens, position ids and the boolean [n, n] attention pattern of one packed sequence."""
    P, la, lb = int(prefix.shape[0]), int(a.shape[0]), int(b.shape[0])
    n = P + la + lb
    allow = torch.zeros((n, n), dtype=torch.bool)
    allow[: P + la, : P + la] = torch.ones((P + la, P + la), dtype=torch.bool).tril()
    allow[P + la:, :P] = True
    allow[P + la:, P + la:] = torch.ones((lb, lb), dtype=torch.bool).tril()
    pos = torch.cat([torch.arange(P + la), torch.arange(P, P + lb)])
    return torch.cat([prefix, a, b]), pos, allow


def packed_chunk(model: Any, packs: Sequence[tuple[Tensor, Tensor, Tensor, int]], pad: int, dtype: torch.dtype,
                  device: torch.device) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Left-padded tokens, position ids, additive 4D mask, and each row's branch-a end index."""
    width = max(int(t.shape[0]) for t, _, _, _ in packs)
    B = len(packs)
    tokens = torch.full((B, width), pad, dtype=torch.long)
    pos = torch.zeros((B, width), dtype=torch.long)
    allow = torch.eye(width, dtype=torch.bool).repeat(B, 1, 1)  # pads see themselves only (no empty softmax rows)
    a_end = torch.zeros(B, dtype=torch.long)
    for r, (t, p, al, la_end) in enumerate(packs):
        n = int(t.shape[0])
        tokens[r, width - n:] = t
        pos[r, width - n:] = p
        allow[r, width - n:, :] = False
        allow[r, width - n:, width - n:] = al
        a_end[r] = width - n + la_end
    mask = torch.zeros((B, 1, width, width), dtype=dtype).masked_fill(~allow[:, None], torch.finfo(dtype).min)
    return tokens.to(device), pos.to(device), mask.to(device), a_end


def tree_mask_ok(model: Any) -> bool:
    """Does this model take a 4D attention mask and position ids exactly (checked once per model)?"""
    return capabilities.cached(model, "tree_mask", lambda: _check_tree_mask(model))


@torch.no_grad()
def _check_tree_mask(model: Any) -> bool:
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    try:
        g = torch.Generator().manual_seed(1)
        prefix, a, b = (torch.randint(0, info.d_vocab, (k,), generator=g) for k in (5, 2, 3))
        store: dict[str, Tensor] = {}
        layer = info.n_layers - 1

        def grab(act: Tensor, hook: Any = None) -> None:
            store["r"] = act.detach().clone()

        dev = _hooks.device_of(model)
        run_final(model, torch.cat([prefix, a])[None].to(dev), fwd_hooks=[(act_name("resid_pre", layer), grab)])
        ref_a = store["r"][0, -1]
        ref_b = run_final(model, torch.cat([prefix, b])[None].to(dev))[0, -1]
        t, p, al = pack(prefix, a, b)
        dtype = next(model.parameters()).dtype
        tokens, pos, mask, a_end = packed_chunk(model, [(t, p, al, 5 + 2 - 1)], 0, dtype, dev)
        got_b = run_final(model, tokens, attention_mask=mask, position_ids=pos,
                           fwd_hooks=[(act_name("resid_pre", layer), grab)])[0, -1]
        got_a = store["r"][0, int(a_end[0])]
        tol = 1e-4 if dtype in (torch.float32, torch.float64) else 5e-2
        return bool(torch.allclose(got_a.float(), ref_a.float(), atol=tol, rtol=tol)
                    and torch.allclose(got_b.float(), ref_b.float(), atol=tol, rtol=tol))
    except Exception:
        return False


@torch.no_grad()
def run_shared(model: Any, pairs: Sequence[tuple[Tensor, Tensor]], layers: Sequence[int],
                batch_size: int) -> tuple[dict[int, Tensor], Tensor]:
    """For pairs of prompts (a, b) sharing a prefix: the residual entering each block in ``layers``
    at a's last token, and the final-position logits of b — one packed forward per chunk."""
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    device = _hooks.device_of(model)
    dtype = next(model.parameters()).dtype
    pad = pad_id_of(model)
    packs = []
    for a, b in pairs:
        P = common_prefix(a, b)
        t, p, al = pack(a[:P], a[P:], b[P:])
        packs.append((t, p, al, int(a.shape[0]) - 1))
    n = len(packs)
    caps = {int(l): torch.empty((n, info.d_model), dtype=torch.float32) for l in layers}
    logits = torch.empty((n, info.d_vocab), dtype=torch.float32)
    cut = [(act_name("ln2_in", info.n_layers - 1), last_token_only)] if final_only_ok(model) else []
    for idx in length_buckets([int(pk[0].shape[0]) for pk in packs], rows_per_forward(batch_size)):
        it = torch.as_tensor(idx)
        tokens, pos, mask, a_end = packed_chunk(model, [packs[i] for i in idx], pad, dtype, device)
        rows = torch.arange(len(idx))
        fwd: list = []
        for layer in caps:
            def grab(act: Tensor, hook: Any = None, layer: int = layer, it: Tensor = it) -> None:
                caps[layer][it] = act[rows.to(act.device), a_end.to(act.device)].detach().to("cpu", torch.float32)
            fwd.append((resid_name(layer, info.n_layers), grab))
        fwd.extend(cut)
        logits[it] = forward_last(model, tokens, mask, fwd, position_ids=pos).detach().to("cpu", torch.float32)
    return caps, logits


@torch.no_grad()
def all_logits(model: Any, tokens: Int[Tensor, "batch pos"], mask: Int[Tensor, "batch pos"] | None,
               **model_inputs: Tensor) -> Float[Tensor, "batch pos d_vocab"]:
    """The logits at every position of one plain forward (teacher-forced answers are read from them)."""
    device = _hooks.device_of(model)
    m = None if mask is None else mask.to(device)
    return _hooks.run(model, tokens.to(device), attention_mask=m, **{k: v.to(device) for k, v in model_inputs.items()})


@torch.no_grad()
def final_logits(model: Any, batch: Any, mask: Int[Tensor, "batch pos"] | None = None, *,
                 batch_size: int | None = None, **model_inputs: Tensor) -> Float[Tensor, "batch d_vocab"]:
    """Final-position logits of a left-padded batch, ``batch_size`` rows per forward (float32, CPU).

    ``batch`` is a prompt batch (:class:`tvlens.PromptBatch`, a multimodal batch, anything
    :func:`~tvlens.engine.batch.as_batch` takes) or a ``[batch, pos]`` token tensor with its ``mask``
    and extra ``model_inputs``. Chunks are cut by the batch's own row selection
    (:meth:`EngineBatch.take`, which defers to the batch's ``select``), so extra inputs that are not
    row-aligned — Qwen2.5-VL's ``pixel_values``, flattened over the batch and located by
    ``image_grid_thw``; a LLaVA row's several images — go with their rows. Extra tensors given loose
    can only be cut when they are row-aligned; otherwise this raises before any forward (pass the
    batch object instead).
    """
    if isinstance(batch, Tensor):
        tokens = batch if batch.ndim == 2 else batch[None]
        eb = EngineBatch(tokens.long(), torch.ones_like(tokens) if mask is None else mask.long(), None, None, None,
                         dict(model_inputs))
    else:
        if mask is not None or model_inputs:
            raise TypeError("final_logits takes either a batch object alone (its mask and model inputs are its own) or "
                            "tokens with mask= and model inputs; got a batch and extra arguments")
        eb = as_batch(batch, "prompts")
    batch_size = rows_per_forward(batch_size)
    n = len(eb)
    # every chunk is cut before the first forward, so a batch that cannot be cut is refused up front
    chunks = [eb] if n <= batch_size else [eb.slice(i, i + batch_size) for i in range(0, n, batch_size)]
    device = _hooks.device_of(model)
    keep_mask = not (isinstance(batch, Tensor) and mask is None)
    out = []
    for c in chunks:
        m = c.mask.to(device) if keep_mask else None
        out.append(forward_last(model, c.tokens.to(device), m, [], **c.model_inputs(device)).detach().to("cpu", torch.float32))
    return torch.cat(out)


@torch.no_grad()
def read(
    model: Any,
    tokens: Int[Tensor, "batch pos"],
    mask: Int[Tensor, "batch pos"] | None,
    names: Sequence[str],
    *,
    at: tuple[Int[Tensor, " n"], Int[Tensor, " n"]] | None = None,
    last: bool = False,
    stop_at_layer: int | None = None,
    cast: torch.dtype | None = None,
    **model_inputs: Any,
) -> tuple[dict[str, Tensor], Tensor | None]:
    """One forward that reads the activations at hook points ``names``.

    Each is read whole (``[batch, pos, ...]``), at the final position only (``last``:
    ``[batch, 1, ...]``), or at ``at = (rows, cols)`` pairs (``[n, ...]``) — the copy is taken
    inside the hook, so the full activation is freed as the forward goes on.  Returns the
    activations and the final-position logits (``None`` when ``stop_at_layer`` ends the pass
    early).  Extra ``model_inputs`` (``pixel_values`` ...) go to the model's forward.
    """
    store: dict[str, Tensor] = {}

    def grab(name: str):
        def fn(act: Tensor, hook: Any = None) -> None:
            got = act[at[0], at[1]] if at is not None else act[:, -1:] if last else act
            store[name] = got.detach().to(cast) if cast is not None else got.detach().clone()
        return fn

    # padding positions may differ between attention implementations: whole reads keep the bridge's own
    real = mask is None or bool((mask[at[0].to(mask.device), at[1].to(mask.device)] if at is not None else mask[:, -1]).all())
    run = run_final if (at is not None or last) and real else _hooks.run
    device = _hooks.device_of(model)
    if at is not None:
        at = (at[0].to(device), at[1].to(device))
    kw = {} if stop_at_layer is None else {"stop_at_layer": stop_at_layer}
    out = run(model, tokens.to(device), attention_mask=None if mask is None else mask.to(device),
              fwd_hooks=[(name, grab(name)) for name in names], **kw, **model_inputs)
    logits = out[:, -1].detach() if stop_at_layer is None and isinstance(out, Tensor) and out.ndim == 3 else None
    return store, logits


def capture_acts(model: Any, prompts: EngineBatch, kind: str, layers: Sequence[int], final_only: bool,
                 grad: bool = False) -> tuple[dict[int, Tensor], Tensor]:
    """Activations ``kind`` at ``layers`` (``{layer: [batch, pos|1, *unit]}``) and the final-position logits."""
    names = {layer: act_name(kind, layer) for layer in layers}
    acts, logits = read(model, prompts.tokens, prompts.mask, list(names.values()), last=final_only,
                        **prompts.model_inputs(_hooks.device_of(model)))
    return {layer: acts[name] for layer, name in names.items()}, logits
