"""The intervention path: one cached target run, then exact recomputation of what edits change.

The obvious implementation (TransformerLens ``get_act_patch_*``, Todd's CIE loop) runs one full
forward per site.  This module computes **the same numbers** (to float rounding; tested against
the naive loop to 1e-4) from much less work, using only what causal attention guarantees:

* **Final-position patching** changes nothing upstream of the patched layer and nothing at
  earlier positions.  So the target is run **once**, keeping every layer's residual and the keys /
  values each attention layer used; then for every site only the *last token* is recomputed, from
  the patched layer upwards, attending to the cached keys / values.  Many sites ride in one forward:
  they are laid out along the *sequence* axis as extra "final tokens" that share the cached prefix
  and see only their own key (a block-diagonal mask), so the prefix is never copied per site.
  Sites join the stream at their own layer (the stream grows as layers go up): a site at layer
  ``l`` costs ``n_layers - l`` single-token block evaluations.
* **Patching from position ``p`` on** (``positions="all"`` / ``"each"``, :func:`patch_positions`)
  changes only positions ``>= p`` from the patched layer on.  Those suffixes are recomputed from
  the cached residual at the patched layer (not from the embedding), sites along the batch axis,
  attending to the cached keys / values of positions ``< p``.
* Sites are processed in chunks sized to a memory budget, with a progress bar, and the metric is
  reduced on the device per chunk: there is no per-site host synchronisation.

The machinery is one generic engine, :class:`PatchRunner`, driven by a list of :class:`Edit` s —
``act <- act + weight * (value - act) + add`` at one hook of one layer for a set of *columns*
(one column = one patched configuration, e.g. one site, one head mask, one layer of a
task-vector sweep).  :func:`patch_heads`, :func:`patch_positions`, ``vectors.layer_sweep`` (replace / add a
residual at each layer) and ``selection`` (many head masks, REINFORCE samples as columns; soft
``alpha`` blends with gradients) are small specialisations of it, in the spirit of TransformerLens'
``patching.py`` (one generic function, small partials) without its per-site Python loop.

The engine drives the bridge's own blocks (``model.blocks[l]``), so every architecture detail
(LayerNorm / RMSNorm, learned positions / RoPE, grouped-query attention, soft-capping ...) is the
model's own code; it hands the attention its cached keys / values through the ``past_key_values``
protocol and gives the recomputed tokens their true position ids and rotary embeddings.  The first
time a model is used (per layout), the runner checks that recomputing an *unpatched* column
reproduces the target's logits; on a model where that fails (or that is not a TransformerLens 4
bridge) it falls back to the naive loop with a warning, so results are always exact.

Reusing the engine (one target pass, then any number of edited columns)::

    runner = PatchRunner(model, zero_shot_batch)                 # runs the batch once
    # Hendel's layer sweep: column l replaces the final residual at layer l by the task vector
    logits = runner.logits([replace_resid(l, tv[l], columns=l) for l in range(L)], n_columns=L)
    # REINFORCE: column s patches the task means of the heads in masks[s] ([sample, layer, head])
    edits = [replace_heads(l, masks[:, l], mean_z[l]) for l in range(L)]
    reward = runner.map(edits, lambda lg: lg.log_softmax(-1)[..., 0], n_columns=len(masks))
    # soft selection: alpha [layer, head] with requires_grad; logits are differentiable in it
    logits = runner.logits([blend_heads(l, alpha[l], mean_z[l]) for l in range(L)], n_columns=1)

How exact: a patched column computes the same arithmetic as the full patched forward on the
positions that can differ, with the cached (bit-identical) activations elsewhere; the remaining
differences are float rounding from different batch shapes (≈1e-6 on logits in float32).
"""

from __future__ import annotations

import copy
import inspect
import math
import warnings
from contextlib import contextmanager
from typing import Any, Callable, Iterable, Literal, Sequence

import torch
from einops import rearrange
from jaxtyping import Float
from torch import Tensor

from .. import hooks as _hooks
from ..hooks import act_name
from . import capabilities
from .batch import as_batch
from .kv import CACHE_KWARGS, PrefixKV, RecordKV, Unsupported, bool_mask, inject_cache
from .plan import bytes_per_row, memory_budget
from .sites import Edit, NormEdit, normalize_edits, restrict_columns

__all__ = ["PatchRunner", "final_position_logits"]

#: bytes the widest transient tensor of one CPU recompute chunk may take (below glibc's 32 MiB mmap threshold)
CPU_WIDEST = 30 << 20


class PatchRunner:
    """A target batch run once and cached, plus exact recomputation of only what edits can change.

    ::

        runner = PatchRunner(model, batch)    # one forward of the target
        runner.clean_logits                   # [batch, d_vocab] at the final position
        logits = runner.logits([replace_resid(l, tv, columns=l) for l in range(L)], n_columns=L)
        logits.shape                          # [batch, L, d_vocab]: the task vector at every layer

    :meth:`logits` evaluates ``n_columns`` edited configurations side by side in one pass
    (``start_pos=-1``: only the final position is edited, only it is recomputed;
    ``start_pos=p``: positions ``p..`` are recomputed, sites along the batch axis).  Each column
    is recomputed from its lowest edited layer upwards, starting from the cached clean residual.
    :meth:`map` does the same in memory-bounded chunks and reduces each chunk with a function
    (a metric), so a sweep of thousands of columns never holds their logits at once.

    Gradients flow to ``Edit.weight`` / ``value`` / ``add`` when grad mode is on (the cached target
    activations are constants).  ``fast=False`` (or a model where the self-check fails) runs whole
    hooked forwards instead, the columns along the batch axis — same numbers, slower.
    :meth:`subset` restricts a runner to some prompts without running anything again.
    """

    def __init__(self, model: Any, target: Any, *, fast: bool | Literal["auto"] = "auto"):
        from ..models import ModelInfo

        self.model = model
        self.info = ModelInfo.of(model)
        self.prompts = as_batch(target, "target")
        self.device = _hooks.device_of(model)
        self.B, self.P = len(self.prompts), self.prompts.n_pos
        self.L = self.info.n_layers
        self._fast_setting = fast
        self._fast_ok: dict[str, bool] = {}
        self._kw_cache: dict = {}
        self.tokens = self.prompts.tokens.to(self.device)
        self.mask = self.prompts.mask.to(self.device)
        #: [batch, query] positions whose logits are read (None: the final position only)
        self.query = None if self.prompts.query is None else self.prompts.query.to(self.device)
        self.causal = capabilities.cached(model, "causal", lambda: _is_causal(model))
        self.bridge = fast is not False and hasattr(model, "blocks") and all(
            hasattr(b, "attn") and hasattr(b, "original_component") for b in model.blocks)
        if fast is True and not self.bridge:
            raise ValueError("fast=True needs a TransformerLens 4 TransformerBridge (tvlens.load_model); use fast='auto'")
        #: activation modules run by a bit-identical in-place twin during the engine's own forwards
        self._twins = _act_twins(model) if self.bridge else []
        with torch.no_grad():
            if self.bridge:
                self._capture()
            else:
                logits = _hooks.run(model, self.tokens, attention_mask=self.mask, **self.prompts.model_inputs(self.device))
                self.clean_logits = self._read_logits(logits).detach()
        self.dtype = self.clean_logits.dtype if self.clean_logits.is_floating_point() else torch.float32
        try:
            self.dtype = next(model.parameters()).dtype
        except StopIteration:
            pass

    # -- clean run -----------------------------------------------------------------------------

    def _capture(self) -> None:
        model = self.model
        blocks = list(model.blocks)
        self.block_kwargs: list[dict] = [None] * self.L  # type: ignore[list-item]
        self.resid: list[Tensor] = [None] * self.L  # type: ignore[list-item]
        kv: dict[int, tuple[Tensor, Tensor]] = {}
        self._hidden_name: list[str] = [None] * self.L  # type: ignore[list-item]
        handles = []

        def grab(layer: int):
            def pre(module: Any, args: tuple, kwargs: dict) -> None:
                fwd = module.original_component.forward
                params = inspect.signature(fwd).parameters
                bound = inspect.signature(fwd).bind_partial(*args, **kwargs).arguments
                flat: dict = {}
                for name, val in bound.items():
                    if params[name].kind is inspect.Parameter.VAR_KEYWORD:
                        flat.update(val)
                    elif params[name].kind is not inspect.Parameter.VAR_POSITIONAL:
                        flat[name] = val
                hidden_name = next(iter(params))
                self._hidden_name[layer] = hidden_name
                self.resid[layer] = flat.pop(hidden_name).detach()
                self.block_kwargs[layer] = flat
            return pre

        try:
            for layer, block in enumerate(blocks):
                handles.append(block.register_forward_pre_hook(grab(layer), with_kwargs=True))
                handles.append(inject_cache(block.attn, RecordKV(kv, layer)))
            keep = self.P - 1 if self.query is None else int(self.query.min())
            cut = [] if keep == 0 or not _unembed_cut_ok(model) else [(_UNEMBED_IN, lambda a, hook: a[:, keep:].contiguous())]
            keep = keep if cut else 0
            with _inplace_acts(self._twins):
                logits = _hooks.run(model, self.tokens, attention_mask=self.mask, fwd_hooks=cut,
                                    **self.prompts.model_inputs(self.device))
        finally:
            for h in handles:
                h.remove()
        self.clean_logits = self._read_logits(logits, keep).detach()
        self.keys = [kv[layer][0] if layer in kv else None for layer in range(self.L)]
        self.values = [kv[layer][1] if layer in kv else None for layer in range(self.L)]
        if any(k is None for k in self.keys) or any(r is None for r in self.resid):
            self.bridge = False  # some block did not go through the bridge's attention: use the naive path

    # -- public ---------------------------------------------------------------------------------

    def clean_resid(self, layer: int) -> Tensor:
        """The target's clean residual entering block ``layer`` (``hook_resid_pre``), ``[batch, pos, d_model]``."""
        if not self.bridge:
            raise RuntimeError("clean residuals are cached only on the fast path (a TransformerBridge)")
        return self.resid[layer]

    def logits(self, edits: Iterable[Edit], n_columns: int | None = None, *, start_pos: int = -1) -> Float[Tensor, "batch column d_vocab"]:
        """Final-position logits of ``n_columns`` edited configurations, in one pass.

        ``start_pos=-1`` (default): the edits act on the final position only (``Edit.pos`` is
        ignored) and only the final token is recomputed.  ``start_pos=p``: edits act on positions
        ``>= p`` (all of them, or ``Edit.pos``) and positions ``p..`` are recomputed.
        """
        start_pos = self._check_start(start_pos)
        nedits, n_columns = normalize_edits(edits, self.info, n_columns, self.P, start_pos, self.device, self.dtype,
                                             self.B)
        return self._logits(nedits, n_columns, start_pos)

    def map(self, edits: Iterable[Edit], fn: Callable[[Tensor], Tensor], n_columns: int | None = None, *,
            start_pos: int = -1, max_memory: int | None = None, batch_size: int | None = None,
            progress: bool = False, desc: str = "patching", pbar: Any = None) -> Tensor:
        """:meth:`logits` in column chunks, each reduced by ``fn(logits [batch, chunk, d_vocab]) -> [batch, chunk, ...]``.

        The chunk size keeps the transient activations under ``max_memory`` bytes (default: 512 MiB
        on CPU, 40% of free memory on a GPU), or holds ``batch_size`` (prompt, column) rows.
        ``progress`` shows a tqdm bar over columns when there are several chunks (``pbar``: advance
        an existing bar instead).  Returns the chunks' results concatenated along the column axis.
        """
        start_pos = self._check_start(start_pos)
        nedits, n_columns = normalize_edits(edits, self.info, n_columns, self.P, start_pos, self.device, self.dtype,
                                             self.B)
        size = self.columns_per_chunk(start_pos, max_memory=max_memory, batch_size=batch_size)
        bounds = [(c, min(c + size, n_columns)) for c in range(0, n_columns, size)]
        own = None
        if pbar is None and progress and len(bounds) > 1:
            from tqdm.auto import tqdm

            pbar = own = tqdm(total=n_columns, desc=desc, unit="site")
        outs = []
        try:
            for c0, c1 in bounds:
                outs.append(fn(self._logits(restrict_columns(nedits, c0, c1), c1 - c0, start_pos)))
                if pbar is not None:
                    pbar.update(c1 - c0)
        finally:
            if own is not None:
                own.close()
        return torch.cat(outs, dim=1)

    def columns_per_chunk(self, start_pos: int = -1, *, max_memory: int | None = None, batch_size: int | None = None) -> int:
        """How many columns fit in one pass of :meth:`map` for this batch."""
        if batch_size is not None:
            if batch_size < 1:
                raise ValueError(f"batch_size must be >= 1, got {batch_size}")
            return max(1, batch_size // self.B)
        budget = memory_budget(self.device, max_memory)
        size = max(1, min(1024, int(budget // max(1, self.B * self.bytes_per_row(start_pos)))))
        if max_memory is None and self.device.type == "cpu":
            size = min(size, self._cpu_widest_cap(start_pos))
        return size

    def _cpu_widest_cap(self, start_pos: int) -> int:
        """Columns whose widest activation (the MLP hidden, ``[rows·T, d_mlp]``) stays under :data:`CPU_WIDEST`.

        glibc serves allocations below its 32 MiB mmap threshold from memory it already holds;
        larger ones are fresh pages on every call (page faults, then a cold pass over them).
        """
        d_mlp = int(getattr(getattr(self.model, "cfg", None), "d_mlp", None) or 4 * self.info.d_model)
        elt = torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point else 4
        T = self.P - int(start_pos) % self.P
        return max(1, CPU_WIDEST // max(1, self.B * T * d_mlp * elt))

    def bytes_per_row(self, start_pos: int = -1) -> int:
        """Rough transient bytes per (prompt, column) row of a recompute pass (for chunk sizing)."""
        return bytes_per_row(self.model, self.info, self.P, int(start_pos) % self.P, self.dtype)

    # -- internals ------------------------------------------------------------------------------

    def _check_start(self, start_pos: int) -> int:
        """``start_pos`` made non-negative, refused where recomputing from it would not be exact."""
        start_pos = int(start_pos) % self.P
        if not self.causal and start_pos != 0:
            raise ValueError(
                "this model attends in both directions (a masked-token model such as BERT), so an edit at one position "
                f"changes every other: recompute from start_pos=0 (got {start_pos}) and name the edited positions with "
                "Edit.pos or a weight with a pos axis")
        if self.query is not None and start_pos > int(self.query.min()):
            raise ValueError(f"the batch reads logits at positions from {int(self.query.min())} on, but start_pos="
                             f"{start_pos} would recompute only from {start_pos}; use start_pos <= {int(self.query.min())}")
        return start_pos

    def _use_fast(self, layout: str, start_pos: int) -> bool:
        if not self.bridge or self._fast_setting is False:
            return False
        # padding changes which mask the blocks receive: verify padded and unpadded batches separately
        key = (layout if layout == "seq" else ("batch", start_pos > 0), bool((self.mask == 0).any()))
        if key not in self._fast_ok:  # a property of the architecture: checked once per model
            self._fast_ok[key] = capabilities.cached(self.model, ("recompute", *key), lambda: self._self_check(start_pos))
        return self._fast_ok[key]

    def _self_check(self, start_pos: int) -> bool:
        """Recompute one unedited column from layer 0; it must reproduce the target's logits."""
        problem = None
        try:
            with torch.no_grad():
                got = self._fast_logits([], 1, start_pos, force_start=0)[:, 0]
            ref = self.clean_logits
            tol = 1e-4 if self.dtype in (torch.float32, torch.float64) else 5e-2
            err = float((got.float() - ref.float()).abs().max())
            scale = float(ref.float().abs().max()) or 1.0
            if not err <= tol * max(1.0, scale):
                problem = f"recomputed logits differ from the target run by {err:.2e}"
        except Unsupported as exc:
            problem = f"unsupported block argument ({exc})"
        if problem is None:
            return True
        if self._fast_setting is True:
            raise RuntimeError(f"tvlens.engine: fast recompute unavailable for this model: {problem}")
        warnings.warn(f"tvlens.engine: fast recompute unavailable for this model ({problem}); running whole forwards "
                      "instead, the sites along the batch axis (exact, slower)", RuntimeWarning, stacklevel=4)
        return False

    def _logits(self, nedits: list[NormEdit], n_columns: int, start_pos: int) -> Tensor:
        layout = "seq" if start_pos == self.P - 1 else "batch"
        if self._use_fast(layout, start_pos):
            return self._fast_logits(nedits, n_columns, start_pos)
        return self._full_logits(nedits, n_columns, start_pos)

    def _layer_kwargs(self, layer: int, layout: str, S: int, start_pos: int) -> dict:
        """The block's keyword arguments for the recomputed tokens (positions, rotary, mask)."""
        P, B = self.P, self.B
        if self._kw_cache.get("start_pos") != start_pos:  # keep only one suffix start's tensors alive
            self._kw_cache = {"start_pos": start_pos}
        key = (layer, layout, S, start_pos)
        hit = self._kw_cache.get(key)
        if hit is not None:
            return hit
        dev = self.device
        out: dict = {}
        for name, val in self.block_kwargs[layer].items():
            if name in CACHE_KWARGS:
                continue
            if name == "use_cache":
                out[name] = False
            elif name == "attention_mask":
                ck = ("mask", id(val), layout, S, start_pos)
                m = self._kw_cache.get(ck)
                if m is None:
                    full = bool_mask(val, self.mask, P, causal=self.causal)
                    if layout == "seq":
                        pref = full[:, :, -1:, : P - 1]
                        pref = pref.expand(pref.shape[0], pref.shape[1], S, P - 1)
                        eye = torch.eye(S, dtype=torch.bool, device=dev).expand(pref.shape[0], pref.shape[1], S, S)
                        m = torch.cat([pref, eye], dim=-1)
                    else:
                        m = full[:, :, start_pos:, :]
                        m = m.repeat(S, 1, 1, 1) if m.shape[0] == B else m
                    self._kw_cache[ck] = m
                out[name] = m
            elif name == "position_embeddings" and isinstance(val, (tuple, list)):
                out[name] = tuple(self._pos_rows(t, layout, S, start_pos) for t in val)
            elif name in ("position_ids",) and isinstance(val, Tensor):
                out[name] = self._pos_rows(val, layout, S, start_pos)
            elif name == "cache_position" and isinstance(val, Tensor):
                out[name] = (torch.full((S,), P - 1, dtype=val.dtype, device=val.device) if layout == "seq"
                             else val[start_pos:])
            elif val is None or isinstance(val, (bool, int, float, str)):
                out[name] = val
            else:
                raise Unsupported(f"{name}={type(val).__name__}")
        self._kw_cache[key] = out
        return out

    def _pos_rows(self, t: Tensor, layout: str, S: int, start_pos: int) -> Tensor:
        """A ``[batch|1, pos, ...]`` tensor (position ids, rotary cos/sin) for the recomputed tokens."""
        if t.ndim < 2 or t.shape[1] != self.P or t.shape[0] not in (1, self.B):
            raise Unsupported(f"position tensor of shape {tuple(t.shape)}")
        ck = ("pos", id(t), layout, S, start_pos)  # layers share these tensors: build them once
        hit = self._kw_cache.get(ck)
        if hit is not None:
            return hit
        if layout == "seq":
            last = t[:, -1:]
            out = last.expand(last.shape[0], S, *last.shape[2:])
        else:
            suf = t[:, start_pos:]
            out = suf.repeat(S, *([1] * (suf.ndim - 1))) if suf.shape[0] == self.B else suf
        self._kw_cache[ck] = out
        return out

    def _edit_hooks(self, nedits: list[NormEdit], order_pos: dict[int, int] | None, layout: str,
                    start_pos: int) -> list:
        """One hook per (layer, kind) applying that hook's edits on the canonical view.

        ``layout`` is how the recomputed stream is laid out: ``"seq"`` (columns along the sequence
        axis, final position only: ``[B, S, *unit]``), ``"batch"`` (a recomputed suffix, columns along
        the batch axis: ``[S·B, T, *unit]``) or ``"full"`` (a whole hooked forward, columns along the
        batch axis: ``[S·B, P, *unit]``, of which positions ``start_pos..`` are edited).
        """
        groups: dict[tuple[int, str], list[NormEdit]] = {}
        for e in nedits:
            groups.setdefault((e.layer, e.hook), []).append(e)
        B, final_mode = self.B, start_pos == self.P - 1
        fwd = []
        for (layer, kind), es in groups.items():
            plans = []
            for e in es:
                cols = e.columns if order_pos is None else [order_pos[c] for c in e.columns]
                t = None if (e.pos is None or layout == "seq" or final_mode) else e.pos - start_pos
                plans.append((torch.as_tensor(cols, device=self.device), t, e))

            def fn(act: Tensor, hook: Any = None, plans=plans) -> Tensor:
                if layout == "seq":
                    return _apply_plans(act, plans)  # [B, S, *unit]
                region = act[:, start_pos:] if layout == "full" else act
                canon = rearrange(region, "(column batch) pos ... -> batch column pos ...", batch=B)
                canon = _apply_plans(canon[:, :, 0] if final_mode else canon, plans)
                new = rearrange(canon.unsqueeze(2) if final_mode else canon, "batch column pos ... -> (column batch) pos ...")
                return torch.cat([act[:, :start_pos], new], dim=1) if layout == "full" else new

            fwd.append((act_name(kind, layer), fn))
        return fwd

    def _fast_logits(self, nedits: list[NormEdit], n_columns: int, start_pos: int, force_start: int | None = None) -> Tensor:
        model, B, P, L = self.model, self.B, self.P, self.L
        layout = "seq" if start_pos == P - 1 else "batch"
        start = [L] * n_columns
        for e in nedits:
            for c in e.columns:
                start[c] = min(start[c], e.layer)
        if force_start is not None:
            start = [min(s, force_start) for s in start]
        order = sorted(range(n_columns), key=lambda c: start[c])
        active = [c for c in order if start[c] < L]
        order_pos = {c: i for i, c in enumerate(active)}
        out = self.clean_logits[:, None].expand(B, n_columns, *self.clean_logits.shape[1:])
        if not active:
            return out.clone()
        first = start[active[0]]
        n_at = {}
        for c in active:
            n_at[start[c]] = n_at.get(start[c], 0) + 1
        T = P - start_pos
        h: Tensor | None = None
        S = 0
        fwd = self._edit_hooks(nedits, order_pos, layout, start_pos) + self._last_mlp_cut(nedits, layout)
        with _hooks.hooked(model, fwd), _inplace_acts(self._twins):
            for layer in range(first, L):
                n_new = n_at.get(layer, 0)
                if n_new:
                    if layout == "seq":
                        new = self.resid[layer][:, -1:].expand(B, n_new, self.resid[layer].shape[-1])
                    else:
                        new = self.resid[layer][:, start_pos:].repeat(n_new, 1, 1)
                    h = new if h is None else torch.cat([h, new], dim=1 if layout == "seq" else 0)
                    S += n_new
                kwargs = self._layer_kwargs(layer, layout, S, start_pos)
                k, v = self.keys[layer], self.values[layer]
                if layout == "seq":
                    cache = PrefixKV(k[:, :, : P - 1], v[:, :, : P - 1])
                elif start_pos > 0:
                    cache = PrefixKV(k[:, :, :start_pos].repeat(S, 1, 1, 1), v[:, :, :start_pos].repeat(S, 1, 1, 1))
                else:
                    cache = None
                handle = inject_cache(model.blocks[layer].attn, cache) if cache is not None else None
                try:
                    res = model.blocks[layer](h, **kwargs)
                finally:
                    if handle is not None:
                        handle.remove()
                h = res[0] if isinstance(res, tuple) else res
            final = h if layout == "seq" else self._read_rows(h, S, start_pos)  # [B, S, (query,) d_model]
            logits = model.unembed(model.ln_final(final))
        if len(active) == n_columns and active == list(range(n_columns)):
            return logits
        res = out.clone() if not logits.requires_grad else out.to(logits.dtype).clone()
        res[:, torch.as_tensor(active, device=res.device)] = logits.to(res.dtype)
        return res

    def _last_mlp_cut(self, nedits: list[NormEdit], layout: str) -> list:
        """A hook running the last block's MLP on the final position only, where nothing else is read.

        In a suffix recompute only the final position of the last block reaches the logits, so its
        MLP input (``ln2.hook_in``) is cut to that position (the residual add broadcasts, the
        block's output is read at the final position only).  Not used where logits are read at other
        positions, where an edit acts inside that MLP, or where the model fails the check
        (:func:`tvlens.engine.readout.final_only_ok`).
        """
        from .readout import final_only_ok, last_token_only

        last = self.L - 1
        if layout != "batch" or self.query is not None:
            return []
        if any(e.layer == last and e.hook in ("resid_mid", "mlp_out") for e in nedits) or not final_only_ok(self.model):
            return []
        return [(act_name("ln2_in", last), last_token_only)]

    def _full_logits(self, nedits: list[NormEdit], n_columns: int, start_pos: int) -> Tensor:
        """Whole hooked forwards, the columns along the batch axis (any architecture: the fallback).

        As many columns ride in one forward as the memory budget holds; each column is the target
        batch again with that column's edits applied, so the numbers are those of one
        ``run_with_hooks`` per column.
        """
        per_row = bytes_per_row(self.model, self.info, self.P, 0, self.dtype)
        size = max(1, min(n_columns, memory_budget(self.device) // max(1, self.B * per_row)))
        outs = []
        for c0 in range(0, n_columns, size):
            c1 = min(c0 + size, n_columns)
            fwd = self._edit_hooks(restrict_columns(nedits, c0, c1), None, "full", start_pos)
            if not fwd:
                outs.append(self.clean_logits[:, None].expand(self.B, c1 - c0, *self.clean_logits.shape[1:]))
                continue
            S = c1 - c0
            extra = self.prompts.repeat_inputs(S, self.device)
            logits = _hooks.run(self.model, self.tokens.repeat(S, 1), attention_mask=self.mask.repeat(S, 1),
                                fwd_hooks=fwd, **extra)
            outs.append(self._read_rows(logits, S, 0))
        return torch.cat(outs, dim=1)

    def _read_logits(self, logits: Float[Tensor, "batch pos d_vocab"], first: int = 0) -> Tensor:
        """The target's logits at its query positions: ``[batch, d_vocab]`` (final) or ``[batch, query, d_vocab]``.

        ``first``: the logits hold positions ``first..`` only.
        """
        if self.query is None:
            return logits[:, -1]
        return logits.gather(1, (self.query - first)[..., None].expand(*self.query.shape, logits.shape[-1]))

    def _read_rows(self, h: Tensor, S: int, start_pos: int) -> Tensor:
        """``[S·B, T, ...]`` stream rows (positions ``start_pos..``) -> ``[B, S, (query,) ...]`` at the query positions."""
        h = rearrange(h, "(column batch) pos ... -> batch column pos ...", column=S)
        if self.query is None:
            return h[:, :, -1]
        idx = (self.query - start_pos)[:, None, :, None].expand(self.B, S, self.query.shape[1], h.shape[-1])
        return h.gather(2, idx)

    def subset(self, rows: Tensor | Sequence[int]) -> "PatchRunner":
        """The same runner restricted to some prompts (their cached state sliced, no forward run)."""
        idx = torch.as_tensor(rows, dtype=torch.long).reshape(-1).to(self.device)
        sub = copy.copy(self)
        cut = lambda t: t[idx] if isinstance(t, Tensor) and t.ndim >= 2 and t.shape[0] == self.B else t  # noqa: E731
        sub.prompts = self.prompts.take(idx.cpu())
        sub.tokens, sub.mask, sub.clean_logits = self.tokens[idx], self.mask[idx], self.clean_logits[idx]
        sub.query = None if self.query is None else self.query[idx]
        sub.B = int(idx.numel())
        sub._kw_cache, sub._fast_ok = {}, {}
        if self.bridge:
            sub.resid = [r[idx] for r in self.resid]
            sub.keys = [k[idx] for k in self.keys]
            sub.values = [v[idx] for v in self.values]
            sub.block_kwargs = [{n: (tuple(cut(t) for t in v) if isinstance(v, tuple) else cut(v)) for n, v in kw.items()}
                                for kw in self.block_kwargs]
        return sub


def final_position_logits(model: Any, batch: Any, edits: Iterable[Edit], n_columns: int | None = None) -> Tensor:
    """``[batch, column, d_vocab]`` final-position logits with ``edits`` applied at the final position.

    A one-shot :class:`PatchRunner`; keep the runner instead when evaluating several edit sets
    on the same batch (the target forward is then paid once).
    """
    return PatchRunner(model, batch).logits(edits, n_columns)


def _apply_plans(canon: Tensor, plans: list) -> Tensor:
    """Apply ``(columns, position | None, edit)`` plans to a ``[batch, column, ...]`` view (out of place)."""
    for idx, t, e in plans:
        sub = canon[:, idx] if t is None else canon[:, idx, t]
        new = e.apply(sub, *e.tensors())
        canon = canon.clone()
        if t is None:
            canon[:, idx] = new
        else:
            canon[:, idx, t] = new
    return canon


#: the unembedding's input: cut to the positions read, it multiplies only those
_UNEMBED_IN = "unembed.hook_in"


def _unembed_cut_ok(model: Any) -> bool:
    """Does cutting the unembedding's input to the last positions reproduce their logits? (checked once per model)"""
    return capabilities.cached(model, "unembed_cut", lambda: _check_unembed_cut(model))


@torch.no_grad()
def _check_unembed_cut(model: Any) -> bool:
    from ..models import ModelInfo

    if _UNEMBED_IN not in model.hook_dict:
        return False
    info = ModelInfo.of(model)
    tokens = torch.randint(0, info.d_vocab, (2, 6), generator=torch.Generator().manual_seed(1)).to(_hooks.device_of(model))
    try:
        ref = _hooks.run(model, tokens)[:, 3:]
        got = _hooks.run(model, tokens, fwd_hooks=[(_UNEMBED_IN, lambda a, hook: a[:, 3:])])
        return got.shape == ref.shape and bool(torch.allclose(got.float(), ref.float(), atol=1e-5, rtol=1e-5))
    except Exception:  # noqa: BLE001 - a model that does not take the cut keeps its whole unembedding
        return False


@torch.no_grad()
def _is_causal(model: Any) -> bool:
    """Does a later token leave the earlier positions' logits unchanged (causal attention)?"""
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    tokens = torch.randint(0, info.d_vocab, (1, 6), generator=torch.Generator().manual_seed(2)).to(_hooks.device_of(model))
    changed = tokens.clone()
    changed[0, -1] = (changed[0, -1] + 1) % info.d_vocab
    a, b = _hooks.run(model, tokens), _hooks.run(model, changed)
    return bool(torch.allclose(a[0, :-1].float(), b[0, :-1].float(), atol=1e-5, rtol=1e-5))


# -- exact activations with fewer temporaries -------------------------------------------------------

_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)


def _new_gelu_inplace(x: Tensor) -> Tensor:
    """``NewGELUActivation`` (GPT-2's tanh GELU), the same operations in the same order, in place.

    HF's expression allocates six full-size temporaries per call; on the CPU each is fresh memory
    (page faults) and a memory-bound pass.  Here two buffers hold every step, so the result is bit
    for bit the same tensor, ``x`` of any shape -> same shape.
    """
    t = torch.pow(x, 3.0)
    t.mul_(0.044715).add_(x).mul_(_SQRT_2_OVER_PI).tanh_().add_(1.0)
    return x.mul(0.5).mul_(t)


#: activation class name -> an in-place twin that must reproduce ``module(x)`` bit for bit
_INPLACE_ACTS: dict[str, Callable[[Tensor], Tensor]] = {"NewGELUActivation": _new_gelu_inplace}


def _act_twin(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> Callable[[Tensor], Tensor] | None:
    """The in-place twin of an activation module, if it reproduces the module bit for bit (checked on ``device``)."""
    fn = _INPLACE_ACTS.get(type(module).__name__)
    if fn is None or module._forward_hooks or module._forward_pre_hooks:
        return None
    g = torch.Generator().manual_seed(0)
    x = torch.cat([torch.randn(4096, generator=g) * s for s in (0.1, 1.0, 4.0, 30.0)])
    x = torch.cat([x, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e4, -1e4])])
    try:
        with torch.no_grad():
            x = x.to(device, dtype)
            return fn if torch.equal(fn(x), module(x)) else None
    except Exception:  # noqa: BLE001 - an activation that does not take a flat tensor keeps its own code
        return None


def _act_twins(model: Any) -> list[tuple[torch.nn.Module, Callable[[Tensor], Tensor]]]:
    """``(module, twin)`` for every activation of ``model`` with a bit-identical in-place twin."""
    out = []
    device = _hooks.device_of(model)
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for m in model.modules():
        name = type(m).__name__
        if name in _INPLACE_ACTS and capabilities.cached(model, ("inplace_act", name),
                                                          lambda m=m: _act_twin(m, device, dtype) is not None):
            out.append((m, _INPLACE_ACTS[name]))
    return out


@contextmanager
def _inplace_acts(twins: list[tuple[torch.nn.Module, Callable[[Tensor], Tensor]]]):
    """Run the activations as their in-place twins inside the block (no-grad tensors only; always restored)."""
    def wrap(orig: Callable, fn: Callable) -> Callable:
        return lambda x: orig(x) if torch.is_grad_enabled() and x.requires_grad else fn(x)

    swapped = []
    try:
        for m, fn in twins:
            if "forward" not in m.__dict__ and not m._forward_hooks and not m._forward_pre_hooks:
                m.forward = wrap(m.forward, fn)
                swapped.append(m)
        yield
    finally:
        for m in swapped:
            del m.forward
