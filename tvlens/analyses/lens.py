"""Logit lens at the separator token, and decoding of vectors into words.

What does the model "think" at the final separator (``→``), layer by layer? The *logit lens*
(nostalgebraist 2020) reads a residual-stream vector as if it were the last one: apply the
model's own final normalisation to it and unembed. Luo, Darrell & Bar 2024 ("Task Vectors are
Cross-Modal", §4) find three phases in the separator's residual stream of ICL prompts: early
layers decode to the **input**, middle layers to words **describing the task**
("capital", "cities" for country→capital), late layers to the **answer**.

* :func:`logit_lens` — per layer (``resid_pre`` of every block, then the final ``resid_post``),
  the prompt-averaged distribution's top-k tokens, and the rank and probability of the query's
  answer, the query's input token and chosen task words. Returns a :class:`LensResult`
  (``.phases()``, ``.table()``, ``.plot()``, ``.to_html()``).
* :func:`decode` — the same read-out for any vector: a task vector, a function vector,
  a head's mean output ``z @ W_O``.
* :func:`lens_summary` — one standalone HTML page for many tasks (phase layers, the top words at
  the task phase, one figure per task) plus a short markdown summary.

**Normalisation.** Models are loaded with ``no_processing=True`` (see :mod:`tvlens.models`), so the
residual stream is the model's raw one and the final norm is *not* folded into ``W_U``. Each
residual is normalised with statistics recomputed from *that* residual (mean / RMS, the model's
own ``eps``, weight and bias) — never with the scale of the final layer's residual, the pitfall of
TransformerLens issue #1076. For the last row (final ``resid_post``) the lens therefore equals the
model's own output distribution exactly.

**Decoders.** ``lens="logit"`` is the only built-in decoder; :func:`register_lens` adds others
(a tuned lens, Belrose et al. 2023, is a per-layer affine translator followed by the logit lens:
its decoder receives the layer index for that reason).
"""

from __future__ import annotations

import html as _html
import math
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

import torch
from jaxtyping import Float, Int
from torch import Tensor

from ..engine.plan import rows_per_forward
from ..results import ResultMeta, Tabular
from ..vocabulary import BATCH_SIZE, FINAL, N_PROMPTS

__all__ = [
    "LensResult",
    "LensSummary",
    "Phases",
    "Decoder",
    "LogitLens",
    "logit_lens",
    "decode",
    "lens_summary",
    "register_lens",
    "available_lenses",
    "get_decoder",
    "instruction_words",
]

CATEGORIES = ("input", "task", "answer")
_COLOURS = {"answer": "#d62728", "input": "#1f77b4", "task": "#2ca02c"}

# ----------------------------------------------------------------------------------------------
# decoders (the ``lens=`` registry)
# ----------------------------------------------------------------------------------------------


class Decoder(Protocol):
    """Maps residual-stream vectors to logits.

    ``layer`` is the residual index the vectors were read at (``l`` = ``blocks.l.hook_resid_pre``,
    ``n_layers`` = the final ``resid_post``) or ``None`` for a free vector (:func:`decode`).
    A layer-specific decoder (tuned lens) uses it; the logit lens ignores it.
    """

    name: str

    def __call__(self, resid: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, "n d_vocab"]: ...


class LogitLens:
    """The model's own final norm (recomputed on each input vector) followed by ``@ W_U + b_U``.

    LayerNorm (GPT-2): ``(x - mean) / sqrt(var + eps) * w + b``; RMSNorm (Llama):
    ``x / sqrt(mean(x²) + eps) * w``; the statistics always come from ``x`` itself. Norm classes
    other than these two (e.g. Gemma's ``1 + w`` RMSNorm) are applied by calling the model's own
    module, which also computes its statistics from its input. Norm math runs in float32.
    """

    name = "logit"

    def __init__(self, model: Any, *, apply_norm: bool = True) -> None:
        self.apply_norm = bool(apply_norm)
        self.W_U = model.W_U.detach()
        b_U = getattr(model, "b_U", None)
        self.b_U = None if b_U is None else b_U.detach()
        self._norm = _final_norm(model) if apply_norm else None

    def normalize(self, x: Float[Tensor, "n d_model"]) -> Float[Tensor, "n d_model"]:
        x = x.to(torch.float32)
        return x if self._norm is None else self._norm(x)

    def __call__(self, resid: Float[Tensor, "n d_model"], layer: int | None = None) -> Float[Tensor, "n d_vocab"]:
        x = self.normalize(resid.to(self.W_U.device))
        logits = (x.to(self.W_U.dtype) @ self.W_U).to(torch.float32)
        if self.b_U is not None:
            logits = logits + self.b_U.to(torch.float32)
        return logits


def _final_norm(model: Any) -> Callable[[Tensor], Tensor] | None:
    """The model's final normalisation as a float32 function of the residual, or None (no final norm)."""
    ln = getattr(model, "ln_final", None)
    norm_type = getattr(getattr(model, "cfg", None), "normalization_type", None)
    if ln is None or norm_type is None:
        return None
    module = getattr(ln, "original_component", None) or ln
    cls = type(module).__name__
    cfg_eps = float(getattr(model.cfg, "eps", 1e-5))

    def param(*names: str) -> Tensor | None:
        for name in names:  # HF modules: weight/bias; TransformerLens 3 modules: w/b
            p = getattr(module, name, None)
            if isinstance(p, Tensor):
                return p.detach().to(torch.float32)
        return None

    w, b = param("weight", "w"), param("bias", "b")
    if isinstance(module, torch.nn.LayerNorm) or cls in ("LayerNorm", "LayerNormPre"):
        eps = float(getattr(module, "eps", cfg_eps))

        def layer_norm(x: Tensor) -> Tensor:
            x = x - x.mean(-1, keepdim=True)
            x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            if w is not None:
                x = x * w.to(x.device)
            if b is not None:
                x = x + b.to(x.device)
            return x

        return layer_norm
    if cls.endswith("RMSNorm") and "Gemma" not in cls:
        eps = float(getattr(module, "variance_epsilon", getattr(module, "eps", cfg_eps)))

        def rms_norm(x: Tensor) -> Tensor:
            x = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
            return x if w is None else x * w.to(x.device)

        return rms_norm
    # any other norm (Gemma's 1 + w RMSNorm, ...): the model's own module, which computes its
    # statistics from its input just the same
    params = list(module.parameters())
    dtype = params[0].dtype if params else torch.float32

    def own_module(x: Tensor) -> Tensor:
        return module(x.to(dtype)).to(torch.float32)

    return own_module


_LENSES: dict[str, Callable[..., Decoder]] = {"logit": LogitLens}


def register_lens(name: str, factory: Callable[..., Decoder]) -> None:
    """Add a decoder usable as ``lens=name``: ``factory(model, apply_norm=...)`` returns a :class:`Decoder`."""
    if not isinstance(name, str) or not name:
        raise ValueError("lens name must be a non-empty string, e.g. register_lens('tuned', TunedLens)")
    _LENSES[name] = factory


def available_lenses() -> list[str]:
    return sorted(_LENSES)


def _check_lens(lens: Any) -> None:
    if isinstance(lens, str):
        if lens not in _LENSES:
            raise ValueError(f"unknown lens {lens!r}; use one of {', '.join(available_lenses())} (or register one with tvlens.analyses.lens.register_lens)")
    elif not callable(lens):
        raise TypeError(f"lens must be a name ({', '.join(available_lenses())}) or a Decoder, got {type(lens).__name__}")


def get_decoder(model: Any, lens: str | Decoder = "logit", *, apply_norm: bool = True) -> Decoder:
    """The decoder for ``lens`` (a registered name, or a :class:`Decoder` instance returned as is)."""
    _check_lens(lens)
    if isinstance(lens, str):
        return _LENSES[lens](model, apply_norm=apply_norm)
    return lens


def _lens_name(lens: Any) -> str:
    return lens if isinstance(lens, str) else str(getattr(lens, "name", type(lens).__name__))


# ----------------------------------------------------------------------------------------------
# tokens and words
# ----------------------------------------------------------------------------------------------

# Function words dropped from a task's instruction when it supplies the default task words: they
# say nothing about the task, and they are frequent tokens that rank high at every layer.
_STOPWORDS = frozenset(
    """a an the of to in on at by for from with into onto as and or but nor not no is are was were be been being
    this that these those it its it's their there here each every any some all given give write say name
    what which who whom whose how when where why your you yours my me i we our us he she his her him they them
    than then so such same one word words output input return answer following below above please just only
    must should would could can may might will shall do does did has have had""".split()
)


def instruction_words(instruction: str) -> list[str]:
    """Content words of a task instruction (lower-cased, punctuation and function words removed, in order)."""
    seen: list[str] = []
    for raw in re.findall(r"[^\W\d_][\w'\-]*", instruction.lower()):
        w = raw.strip("'-")
        if len(w) > 1 and w not in _STOPWORDS and w not in seen:
            seen.append(w)
    return seen


def _tokenizer(model: Any) -> Any:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        raise ValueError("this model has no tokenizer (model.tokenizer is None); load it with tvlens.load_model so words can be tokenized")
    return tok


def _word_token_ids(tok: Any, word: str) -> list[int]:
    """Token ids a word may be decoded as: each single-token spelling among
    ``word``, ``" word"``, ``"Word"``, ``" Word"``; if none is a single token, the first token of ``" word"``."""
    unk = getattr(tok, "unk_token_id", None)
    ids: list[int] = []
    first: list[int] = []
    for variant in (word, " " + word, word.capitalize(), " " + word.capitalize()):
        enc = tok(variant, add_special_tokens=False)["input_ids"]
        if not enc or enc[0] == unk:
            continue
        if len(enc) == 1 and enc[0] not in ids:
            ids.append(enc[0])
        elif not first:
            first = [enc[0]]
    return ids or first


def _show(token: str) -> str:
    """A token as shown in tables and plots (newlines and blank tokens made visible)."""
    if token.strip() == "":
        return repr(token)
    return token.replace("\n", "\\n")


def _token_strings(model: Any, ids: Sequence[int]) -> list[str]:
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return [f"<{i}>" for i in ids]
    return [tok.decode([int(i)]) for i in ids]


def _special_ids(model: Any) -> list[int]:
    """Ids of the tokenizer's special tokens (bos, eos, pad, and added ones such as Llama-3's
    ``<|reserved_special_token_N|>``): never words, so left out of the "top words"."""
    tok = getattr(model, "tokenizer", None)
    if tok is None:
        return []
    ids = {int(i) for i in (getattr(tok, "all_special_ids", None) or []) if i is not None}
    for i, added in (getattr(tok, "added_tokens_decoder", None) or {}).items():
        if getattr(added, "special", False):
            ids.add(int(i))
    return sorted(i for i in ids if i >= 0)


def _fmt_prob(p: float) -> str:
    """A probability for tables: two decimals, or two significant digits below 0.01 (large vocabularies)."""
    if not math.isfinite(p):
        return "—"
    return f"{p:.2f}" if p >= 0.01 or p == 0 else f"{p:.1e}"


# ----------------------------------------------------------------------------------------------
# result objects
# ----------------------------------------------------------------------------------------------

PHASE_RULE = (
    "At every layer each category scores the geometric-mean rank (over prompts) of its token — the answer's first "
    "token, the query input's first token, the best-ranked task word (rank 1 = top); the category with the best "
    "score leads that layer (ties go to the later stage: answer > task > input). A category's phase is its longest "
    "contiguous run of leading layers (the earliest if tied); None if it never leads."
)
PHASE_RULE_PROB = PHASE_RULE.replace("geometric-mean rank (over prompts)", "mean probability (over prompts)").replace(
    " (rank 1 = top)", ""
)


@dataclass(frozen=True)
class Phases:
    """Where the input, the task words and the answer lead the logit lens (see ``rule``).

    Ranges are inclusive ``(first, last)`` residual indices (``l`` = ``resid_pre`` of block ``l``,
    ``n_layers`` = final ``resid_post``), or ``None`` where the category never leads.
    """

    input: tuple[int, int] | None
    task: tuple[int, int] | None
    answer: tuple[int, int] | None
    leader: tuple[str, ...]
    layers: tuple[int, ...]
    metric: str
    rule: str

    @property
    def ordered(self) -> bool:
        """True when all three phases exist and follow each other: input, then task, then answer."""
        if self.input is None or self.task is None or self.answer is None:
            return False
        return self.input[1] < self.task[0] and self.task[1] < self.answer[0]

    def get(self, category: str) -> tuple[int, int] | None:
        return getattr(self, category)

    def to_dict(self) -> dict[str, Any]:
        return {c: self.get(c) for c in CATEGORIES} | {"ordered": self.ordered, "metric": self.metric, "rule": self.rule}

    def __str__(self) -> str:
        def fmt(r: tuple[int, int] | None) -> str:
            if r is None:
                return "—"
            return f"L{r[0]}" if r[0] == r[1] else f"L{r[0]}–{r[1]}"

        return " · ".join(f"{c} {fmt(self.get(c))}" for c in CATEGORIES)


def _runs(leader: Sequence[str], layers: Sequence[int], category: str) -> tuple[int, int] | None:
    best: tuple[int, int] | None = None
    best_len = 0
    i = 0
    while i < len(leader):
        if leader[i] != category:
            i += 1
            continue
        j = i
        while j + 1 < len(leader) and leader[j + 1] == category:
            j += 1
        if j - i + 1 > best_len:
            best, best_len = (layers[i], layers[j]), j - i + 1
        i = j + 1
    return best


@dataclass(frozen=True, eq=False, repr=False)
class LensResult(Tabular):
    """The logit lens at one position of a batch of ICL prompts (Luo et al. 2024, §4).

    Rows are residual indices ``layers`` (``l`` = ``blocks.l.hook_resid_pre``, so ``0`` is the
    embedding; ``n_layers`` = the final ``resid_post``, whose decoding is the model's output).
    Ranks are 1-based (1 = the top token); per-prompt values are NaN where not defined (no task word).
    """

    layers: tuple[int, ...]
    n_layers: int
    top_ids: Int[Tensor, "layer k"]
    top_probs: Float[Tensor, "layer k"]
    top_tokens: tuple[tuple[str, ...], ...]
    answer_rank: Float[Tensor, "batch layer"]
    answer_prob: Float[Tensor, "batch layer"]
    input_rank: Float[Tensor, "batch layer"]
    input_prob: Float[Tensor, "batch layer"]
    task_rank: Float[Tensor, "batch layer"]
    task_prob: Float[Tensor, "batch layer"]
    task_words: tuple[str, ...]
    task_word_rank: Float[Tensor, "layer word"]
    task_word_prob: Float[Tensor, "layer word"]
    answer_ids: Int[Tensor, " batch"]
    input_ids: Int[Tensor, " batch"]
    position: str
    lens: str
    task: str
    family: str = ""
    mean_probs: Float[Tensor, "layer d_vocab"] | None = None
    #: decoded strings of the tokens near the top of any layer (id -> string), for task_phase_words
    token_strings: Mapping[int, str] = field(default_factory=dict)
    meta: ResultMeta = field(default_factory=ResultMeta)

    # -- summaries ------------------------------------------------------------------------------
    @property
    def layer_labels(self) -> list[str]:
        return [f"L{l}" + (" (final)" if l == self.n_layers else "") for l in self.layers]

    @property
    def n_prompts(self) -> int:
        return int(self.answer_rank.shape[0])

    @property
    def has_task_words(self) -> bool:
        return bool(self.task_words) and bool(torch.isfinite(self.task_rank).any())

    def _per_prompt(self, category: str, metric: str) -> Tensor:
        if category not in CATEGORIES:
            raise ValueError(f"unknown category {category!r}; use one of {', '.join(CATEGORIES)}")
        if metric not in ("rank", "prob"):
            raise ValueError(f"unknown metric {metric!r}; use 'rank' or 'prob'")
        return getattr(self, f"{category}_{metric}")

    def curve(self, category: str, metric: str = "prob") -> Float[Tensor, " layer"]:
        """Per-layer summary over prompts: mean probability (``metric="prob"``), mean rank
        (``"rank"``) or geometric-mean rank (``"geo_rank"``, the phase score). NaN where undefined."""
        if metric == "geo_rank":
            r = self._per_prompt(category, "rank")
            return _nanmean(r.log(), 0).exp()
        return _nanmean(self._per_prompt(category, metric), 0)

    def phases(self, metric: str = "rank") -> Phases:
        """Layer ranges where the input, the task words and the answer lead (rule in ``Phases.rule``).

        ``metric="rank"`` (default) compares geometric-mean ranks, robust where all probabilities are
        tiny (middle layers); ``metric="prob"`` compares mean probabilities, as Luo et al.'s Fig. 4.
        Without task words only input and answer compete.
        """
        if metric not in ("rank", "prob"):
            raise ValueError(f"unknown metric {metric!r}; use 'rank' (geometric-mean rank) or 'prob' (mean probability)")
        cats = [c for c in CATEGORIES if c != "task" or self.has_task_words]
        if metric == "rank":
            scores = {c: -self.curve(c, "geo_rank") for c in cats}
        else:
            scores = {c: self.curve(c, "prob") for c in cats}
        stage = {c: i for i, c in enumerate(CATEGORIES)}
        leader: list[str] = []
        for li in range(len(self.layers)):
            vals = [(float(scores[c][li]), stage[c], c) for c in cats if math.isfinite(float(scores[c][li]))]
            leader.append(max(vals)[2] if vals else "")
        return Phases(
            **{c: _runs(leader, self.layers, c) for c in CATEGORIES},
            leader=tuple(leader),
            layers=tuple(self.layers),
            metric=metric,
            rule=PHASE_RULE if metric == "rank" else PHASE_RULE_PROB,
        )

    def task_phase_words(self, k: int = 5, *, metric: str = "rank") -> tuple[tuple[int, ...], list[tuple[str, float]], str]:
        """Top-k tokens of the mean distribution averaged over the task phase's layers.

        Returns ``(layers used, [(token, prob)], how)``; ``how`` says which layers were used: the task
        phase; else the layers between the input and answer phases; else the middle residual.
        """
        ph = self.phases(metric)
        idx = list(range(len(self.layers)))
        if ph.task is not None:
            sel, how = [i for i in idx if ph.task[0] <= self.layers[i] <= ph.task[1]], "task phase"
        else:
            lo = ph.input[1] if ph.input is not None else -1
            hi = ph.answer[0] if ph.answer is not None else self.n_layers + 1
            sel, how = [i for i in idx if lo < self.layers[i] < hi], "between input and answer phases"
            if not sel:
                sel, how = [len(idx) // 2], "middle layer (no task phase)"
        used = tuple(self.layers[i] for i in sel)
        special = [i for i in (self.meta.extra.get("special_ids", ()) if hasattr(self.meta, "extra") else ())]
        if self.mean_probs is not None:
            p = self.mean_probs[sel].mean(0)
            if special:  # special / reserved tokens are not words
                p = p.clone()
                p[torch.tensor([i for i in special if i < p.shape[-1]], dtype=torch.long)] = -1.0
            top = p.topk(min(k, p.shape[-1]))
            ids, probs = top.indices.tolist(), top.values.tolist()
            return used, list(zip(self._strings(ids), probs)), how
        # without the full distribution: sum the per-layer top-k lists (a lower bound per token)
        acc: dict[int, float] = {}
        for i in sel:
            for t, p in zip(self.top_ids[i].tolist(), self.top_probs[i].tolist()):
                if t not in special:
                    acc[t] = acc.get(t, 0.0) + p / len(sel)
        best = sorted(acc.items(), key=lambda kv: -kv[1])[:k]
        return used, [(self._string(t), p) for t, p in best], how

    def _string(self, tid: int) -> str:
        for row_ids, row_toks in zip(self.top_ids.tolist(), self.top_tokens):
            if tid in row_ids:
                return row_toks[row_ids.index(tid)]
        return self.token_strings.get(tid, f"<{tid}>")

    def _strings(self, ids: Sequence[int]) -> list[str]:
        return [self._string(i) for i in ids]

    # -- tables ---------------------------------------------------------------------------------
    def table(self, *, with_probs: bool = False, k: int | None = None) -> list[tuple[str, ...]]:
        """Layers × top-k tokens of the prompt-averaged distribution, one row per layer:
        ``(layer_label, token_1, ..., token_k)`` — tokens as ``"tok (0.123)"`` with ``with_probs``.
        The form of Luo et al.'s "top-5 decodings" table (use ``k=5``)."""
        k = self.top_ids.shape[1] if k is None else max(1, min(int(k), self.top_ids.shape[1]))
        rows = []
        for label, toks, probs in zip(self.layer_labels, self.top_tokens, self.top_probs.tolist()):
            cells = [_show(t) + (f" ({p:.3f})" if with_probs else "") for t, p in zip(toks[:k], probs[:k])]
            rows.append((label, *cells))
        return rows

    def to_markdown(self, k: int | None = 5) -> str:
        """The table as markdown, with the answer/input/task mean probabilities per layer."""
        rows = self.table(with_probs=True, k=k)
        kk = len(rows[0]) - 1
        cols = ["layer", *[f"top {i + 1}" for i in range(kk)], "p(answer)", "p(input)", "p(task word)"]
        curves = [self.curve(c, "prob").tolist() for c in ("answer", "input", "task")]
        lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for li, row in enumerate(rows):
            extra = [_fmt(c[li]) for c in curves]
            lines.append("| " + " | ".join([*(s.replace("|", "\\|") for s in row), *extra]) + " |")
        return "\n".join(lines)

    def records(self) -> list[dict[str, Any]]:
        """One row per layer: label, top-k tokens and probabilities, answer/input/task mean prob and rank."""
        k = self.top_ids.shape[1]
        data: dict[str, Any] = {"layer": list(self.layers), "label": self.layer_labels}
        for i in range(k):
            data[f"top{i + 1}"] = [row[i] for row in self.top_tokens]
            data[f"p{i + 1}"] = self.top_probs[:, i].tolist()
        for c in CATEGORIES:
            data[f"{c}_prob"] = self.curve(c, "prob").tolist()
            data[f"{c}_rank"] = self.curve(c, "rank").tolist()
            data[f"{c}_geo_rank"] = self.curve(c, "geo_rank").tolist()
        return [dict(zip(data, row)) for row in zip(*data.values())]

    def __str__(self) -> str:
        head = f"LensResult(task={self.task!r}, position={self.position}, lens={self.lens}, prompts={self.n_prompts})"
        body = "\n".join("  " + " | ".join(r) for r in self.table(k=5))
        return f"{head}\nphases: {self.phases()}\n{body}"

    def __repr__(self) -> str:
        return (
            f"LensResult(task={self.task!r}, position={self.position!r}, lens={self.lens!r}, layers={len(self.layers)}, "
            f"k={self.top_ids.shape[1]}, prompts={self.n_prompts}, task_words={list(self.task_words)[:6]})"
        )

    # -- figures --------------------------------------------------------------------------------
    def plot(self, metric: str = "prob", *, title: str | None = None):
        """Plotly figure: left, layers × top-k heatmap of mean probabilities with the decoded tokens
        as cell text (layer 0 at the top); right, answer / input / best task word per layer —
        mean probability (``metric="prob"``) or geometric-mean rank on a log axis (``"rank"``)."""
        import plotly.graph_objects as go
        from plotly.subplots import make_subplots

        from ..plot import SEQUENTIAL_SCALE, TEMPLATE

        if metric not in ("prob", "rank"):
            raise ValueError(f"unknown metric {metric!r}; use 'prob' or 'rank'")
        k = self.top_ids.shape[1]
        labels = self.layer_labels
        fig = make_subplots(
            rows=1, cols=2, shared_yaxes=True, column_widths=[0.7, 0.3], horizontal_spacing=0.02,
            subplot_titles=(f"top-{k} tokens at {_shown(self.position)} (mean probability)",
                            "answer / input / task word" + (" (geo-mean rank)" if metric == "rank" else "")),
        )
        # plotly renders cell text as HTML: escape "<bos>"-like tokens
        text = [[_html.escape(_show(t), quote=False) for t in row] for row in self.top_tokens]
        fig.add_trace(
            go.Heatmap(
                z=self.top_probs.numpy(), x=[f"#{i + 1}" for i in range(k)], y=labels, text=text,
                texttemplate="%{text}", textfont=dict(size=10), colorscale=SEQUENTIAL_SCALE, zmin=0,
                colorbar=dict(title=dict(text="probability", side="right"), x=1.0, len=0.8),
                hovertemplate="%{y}, %{x}: %{text}<br>p = %{z:.4g}<extra></extra>", xgap=1, ygap=1,
            ),
            row=1, col=2 - 1,
        )
        for c in CATEGORIES:
            if c == "task" and not self.has_task_words:
                continue
            ys = self.curve(c, "geo_rank" if metric == "rank" else "prob")
            name = {"answer": "answer", "input": "query input", "task": "task word"}[c]
            fig.add_trace(
                go.Scatter(x=ys.numpy(), y=labels, mode="lines+markers", name=name, line=dict(color=_COLOURS[c]),
                           hovertemplate=f"{name}<br>%{{y}}: %{{x:.4g}}<extra></extra>"),
                row=1, col=2,
            )
        fig.update_yaxes(type="category", autorange="reversed", showgrid=False, title_text="layer (resid_pre; final = resid_post)", row=1, col=1)
        fig.update_xaxes(type="category", showgrid=False, row=1, col=1)
        if metric == "rank":
            # log axis, reversed so that better (lower) ranks sit to the right, like higher probabilities
            fig.update_xaxes(type="log", autorange="reversed", title_text="rank (log; right = better)", row=1, col=2)
        else:
            fig.update_xaxes(rangemode="tozero", title_text="probability", row=1, col=2)
        words = ", ".join(self.task_words[:8]) + (" …" if len(self.task_words) > 8 else "")
        height = int(min(1400, max(400, 28 * len(labels) + 230)))
        margin = dict(l=90, r=40, t=90, b=130)
        plot_h = height - margin["t"] - margin["b"]
        fig.update_layout(
            template=TEMPLATE,
            title=dict(text=title if title is not None else f"logit lens — {_html.escape(self.task)} (phases: {self.phases()})",
                       x=0.5, xanchor="center"),
            width=int(min(1320, max(900, 80 * k + 520))), height=height,  # fits a 1400 px window
            legend=dict(orientation="h", x=1.0, xanchor="right", y=-62 / plot_h, yanchor="top"),
            margin=margin,
            font=dict(size=12),
        )
        if words:
            fig.add_annotation(text=f"task words: {_html.escape(words)}", xref="paper", yref="paper", x=1.0, y=-95 / plot_h,
                               yanchor="top", showarrow=False, font=dict(size=10, color="#555"), xanchor="right")
        return fig

    def to_html(self, path: str | Path, *, metric: str = "prob") -> Path:
        """Write ``.plot()`` as an HTML file (loading ``plotly.min.js`` from its folder); returns its path."""
        from ..plot import save_figure

        return save_figure(self.plot(metric), path, png=False)[0]

    # -- storage --------------------------------------------------------------------------------
    _TENSORS = ("top_ids", "top_probs", "answer_rank", "answer_prob", "input_rank", "input_prob", "task_rank",
                "task_prob", "task_word_rank", "task_word_prob", "answer_ids", "input_ids")

    def save(self, path: str | Path) -> Path:
        """Save as ``<path>.safetensors`` + ``<path>.json`` (the full distribution too, when kept)."""
        from ..results import ResultMeta, save_tensors

        tensors = {name: getattr(self, name).contiguous() for name in self._TENSORS}
        if self.mean_probs is not None:
            tensors["mean_probs"] = self.mean_probs.contiguous()
        meta = self.meta if isinstance(self.meta, ResultMeta) else ResultMeta()
        info = dict(
            kind="LensResult", layers=list(self.layers), n_layers=self.n_layers, top_tokens=[list(r) for r in self.top_tokens],
            task_words=list(self.task_words), position=self.position, lens=self.lens, task=self.task, family=self.family,
            token_strings={str(k): v for k, v in self.token_strings.items()}, meta=meta.to_dict(),
        )
        return save_tensors(path, tensors, info)

    @classmethod
    def load(cls, path: str | Path, model: Any = None) -> "LensResult":
        """Load what :meth:`save` wrote; with ``model``, refuse a file made with another model."""
        from ..results import ResultMeta, load_result

        tensors, info = load_result(path, "LensResult", model=model, what="lens result")
        return cls(
            layers=tuple(info["layers"]), n_layers=int(info["n_layers"]), top_tokens=tuple(tuple(r) for r in info["top_tokens"]),
            task_words=tuple(info["task_words"]), position=info["position"], lens=info["lens"], task=info["task"],
            family=info.get("family", ""), mean_probs=tensors.get("mean_probs"),
            token_strings={int(k): v for k, v in info.get("token_strings", {}).items()},
            meta=ResultMeta.from_dict(info.get("meta", {})), **{n: tensors[n] for n in cls._TENSORS},
        )


def _nanmean(x: Tensor, dim: int) -> Tensor:
    finite = torch.isfinite(x)
    n = finite.sum(dim)
    s = torch.where(finite, x, torch.zeros_like(x)).sum(dim)
    return torch.where(n > 0, s / n.clamp(min=1), torch.full_like(s, float("nan")))


def _fmt(x: float) -> str:
    if not math.isfinite(x):
        return "—"
    return f"{x:.3g}"


# ----------------------------------------------------------------------------------------------
# the lens
# ----------------------------------------------------------------------------------------------


def _resolve_layers(model: Any, layers: Sequence[int] | int | None, n_layers: int) -> list[int]:
    from ..hooks import check_layer

    if layers is None:
        return list(range(n_layers + 1))
    if isinstance(layers, int) or (isinstance(layers, Tensor) and layers.ndim == 0):
        layers = [int(layers)]
    layers = list(layers)
    if not layers:
        raise ValueError(f"layers is empty; pass residual indices in 0..{n_layers} (0 = embeddings, {n_layers} = final resid_post) or None for all")
    out = []
    for layer in layers:
        try:
            out.append(check_layer(model, layer, allow_end=True, what="layer"))
        except ValueError as err:
            raise ValueError(
                f"{err}. The logit lens reads resid_pre of blocks 0..{n_layers - 1} and the final resid_post as layer {n_layers}"
            ) from None
    return sorted(set(out))


def _check_top_k(top_k: Any, d_vocab: int) -> int:
    if isinstance(top_k, bool) or not isinstance(top_k, int):
        raise TypeError(f"top_k must be an int, got {type(top_k).__name__}")
    if not 1 <= top_k <= d_vocab:
        raise ValueError(f"top_k={top_k} is out of range: the vocabulary has {d_vocab} tokens, so use 1..{d_vocab}")
    return top_k


def _shown(position: str) -> str:
    """How a result names its position in a sentence ("the final position", "the query_input")."""
    return "final position" if position == FINAL else position


def _positions(batch: Any, position: Any) -> tuple[Tensor, str]:
    """Per-row position index [batch] (non-negative) and a label; raises before any forward."""
    from ..inputs.text import TokenClass

    n_rows, n_pos = batch.tokens.shape
    tc = torch.as_tensor(batch.token_class).cpu()
    mask = torch.as_tensor(batch.attention_mask).cpu()
    names = {c.name.lower(): c for c in TokenClass}
    aliases = {"separator": TokenClass.FINAL_SEP, "sep": TokenClass.FINAL_SEP, "final_separator": TokenClass.FINAL_SEP,
               "final": TokenClass.FINAL_SEP, "last": TokenClass.FINAL_SEP,
               "query": TokenClass.QUERY_INPUT, "input": TokenClass.QUERY_INPUT}
    if isinstance(position, (TokenClass, str)):
        if isinstance(position, str):
            key = position.lower().replace("-", "_").replace(" ", "_")
            cls = aliases.get(key, names.get(key))
            if cls is None:
                raise ValueError(
                    f"unknown position {position!r}; use 'final' (the final separator; 'separator' says the same), a token class ({', '.join(names)}) or an int index "
                    "(negative counts from the final separator at -1)"
                )
        else:
            cls = position
        hit = tc == int(cls)
        missing = (~hit.any(1)).nonzero().flatten().tolist()
        if missing:
            present = sorted({TokenClass(int(v)).name.lower() for v in tc[mask.bool()].unique().tolist()})
            raise ValueError(
                f"position class {cls.name.lower()!r} is not in {len(missing)} of {n_rows} prompts (e.g. row {missing[0]}); "
                f"these prompts contain {', '.join(present)}; choose one of those (e.g. position='final', the final separator)"
                + (" or build prompts with instruction=True" if cls == TokenClass.INSTRUCTION else "")
            )
        # the last occurrence in each row: the one closest to the separator (the query's own, for query classes)
        ar = torch.arange(n_pos).expand(n_rows, n_pos)
        idx = torch.where(hit, ar, torch.full_like(ar, -1)).max(1).values
        return idx, FINAL if cls == TokenClass.FINAL_SEP else cls.name.lower()
    if isinstance(position, (int,)) and not isinstance(position, bool):
        if not -n_pos <= position < n_pos:
            raise ValueError(f"position {position} is out of range for prompts of {n_pos} tokens; use -{n_pos}..{n_pos - 1} (-1 = final separator)")
        p = position % n_pos
        pad_rows = (mask[:, p] == 0).nonzero().flatten().tolist()
        if pad_rows:
            raise ValueError(
                f"position {position} is padding in {len(pad_rows)} prompts (e.g. row {pad_rows[0]}): batches are left-padded, "
                "so count from the end (-1 = final separator, -2 = the token before it) or use a token class name"
            )
        return torch.full((n_rows,), p, dtype=torch.long), f"pos {position}"
    raise TypeError(f"position must be 'final' (the final separator), a token class name or an int, got {type(position).__name__}")


def _task_word_ids(model: Any, words: Sequence[str], *, user: bool) -> tuple[list[str], list[int], list[int]]:
    """Kept words, candidate token ids, and the word index of each candidate."""
    tok = _tokenizer(model)
    kept: list[str] = []
    cand: list[int] = []
    owner: list[int] = []
    dropped: list[str] = []
    for w in words:
        w = str(w).strip()
        if not w:
            continue
        ids = _word_token_ids(tok, w)
        if not ids:
            dropped.append(w)
            continue
        for t in ids:
            cand.append(t)
            owner.append(len(kept))
        kept.append(w)
    if user and not kept:
        raise ValueError(
            f"none of the task words {list(words)!r} is a token of this model's vocabulary; pass words the tokenizer knows "
            "(check with model.tokenizer.tokenize(word)) or task_words=None for the instruction's words"
        )
    if user and dropped:
        warnings.warn(f"task words not in the vocabulary, ignored: {dropped}", stacklevel=3)
    return kept, cand, owner


def _word_list(words: str | Sequence[str]) -> list[str]:
    """A list of words; a string is one word or a comma-separated list ("capital,city")."""
    if isinstance(words, str):
        return [w.strip() for w in words.split(",")]
    return [str(w) for w in words]


def _default_task_words(task: Any) -> list[str]:
    instruction = getattr(task, "instruction", "") or ""
    return instruction_words(instruction)


def _resolve_task(task_or_name: Any) -> Any:
    from ..tasks import Task, resolve_tasks

    if isinstance(task_or_name, Task):
        return task_or_name
    texts = [task_or_name] if isinstance(task_or_name, str) else task_or_name
    if isinstance(texts, (list, tuple)) and texts and all(isinstance(t, str) for t in texts) \
            and (not isinstance(task_or_name, str) or any(c in task_or_name for c in "→\n")):
        raise TypeError(
            f"task got prompt text ({texts[0][:40]!r}{' ...' if len(texts) > 1 else ''}), not a task name; to "
            "read your own prompts build a batch first: logit_lens(model, tvlens.prompts_from_text(model, texts, answers)), "
            "e.g. prompts_from_text(model, ['France → Paris\\nJapan →'], ['Tokyo'])"
        )
    if not isinstance(task_or_name, str):
        raise TypeError(
            f"task must be a task name, a Task or a PromptBatch, got {type(task_or_name).__name__}; "
            "e.g. logit_lens(model, 'country_capital') or logit_lens(model, icl_prompts(model, task, n_shots=5))"
        )
    found = resolve_tasks(task_or_name)
    if len(found) != 1:
        raise ValueError(f"{task_or_name!r} names {len(found)} tasks; logit_lens takes one (use lens_summary for several)")
    return found[0]


def _ranks(logits: Tensor, ids: Tensor) -> Tensor:
    """1-based rank of ``ids`` [b, m] in ``logits`` [b, V]: 1 + number of strictly larger logits."""
    from ..engine.plan import memory_budget

    budget = memory_budget(logits.device)  # bytes of the [b, chunk, V] boolean comparison
    b, v = logits.shape
    m = ids.shape[1]
    target = logits.gather(1, ids)
    out = torch.empty((b, m), dtype=torch.float32, device=logits.device)
    step = max(1, budget // max(1, b * v))
    for j in range(0, m, step):
        t = target[:, j:j + step]
        out[:, j:j + step] = (logits.unsqueeze(1) > t.unsqueeze(-1)).sum(-1).to(torch.float32) + 1
    return out


def _first_index(hit: Tensor) -> Tensor:
    n_rows, n_pos = hit.shape
    ar = torch.arange(n_pos).expand(n_rows, n_pos)
    idx = torch.where(hit, ar, torch.full_like(ar, n_pos)).min(1).values
    return torch.where(idx == n_pos, torch.full_like(idx, -1), idx)


def _prepare(model: Any, prompts_or_task: Any, *, n_prompts: int, n_shots: int, seed: int, prompt_kw: Mapping[str, Any]):
    """(PromptBatch or MultimodalBatch, Task or None) without running the model."""
    from ..inputs.multimodal import MultimodalBatch
    from ..inputs.text import PromptBatch, icl_prompts

    if isinstance(prompts_or_task, (PromptBatch, MultimodalBatch)):
        if prompt_kw:
            raise ValueError(f"prompt options {sorted(prompt_kw)} only apply when a task is given; build the "
                             f"{type(prompts_or_task).__name__} with them instead")
        try:
            task = _resolve_task(prompts_or_task.task)
        except (KeyError, ValueError, ImportError, TypeError):
            task = None
        return prompts_or_task, task
    task = _resolve_task(prompts_or_task)
    batch = icl_prompts(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, **prompt_kw)
    return batch, task


@torch.no_grad()
def logit_lens(
    model: Any,
    task: Any,
    *,
    position: Any = FINAL,
    layers: Sequence[int] | int | None = None,
    top_k: int = 10,
    task_words: Sequence[str] | None = None,
    n_prompts: int = N_PROMPTS,
    n_shots: int = 5,
    seed: int = 0,
    lens: str | Decoder = "logit",
    batch_size: int | None = BATCH_SIZE,
    keep_distribution: bool = True,
    **prompt_kw: Any,
) -> LensResult:
    """Logit lens at one position of ICL prompts, layer by layer (nostalgebraist 2020; Luo et al. 2024, §4).

    On a vision-language model the prompts may be a :class:`~tvlens.inputs.multimodal.MultimodalBatch`
    (image ICL, image query with text examples, ...; Luo et al. 2024, §4.1, Fig. 4 read the lens at
    the separator of image-ICL and text-ICL prompts): its images go to every forward with their rows.
    An image query has no input token, so its *input* category is the word naming what the image shows
    (the query item, ``batch.queries``), as a text prompt would have it.

    Args:
        task: a task name or :class:`~tvlens.tasks.Task` (then ``icl_prompts(model, task, n_prompts=,
            n_shots=, seed=, **prompt_kw)``), or a ready batch — a :class:`~tvlens.inputs.text.PromptBatch`
            or a :class:`~tvlens.inputs.multimodal.MultimodalBatch` — read as it is.
        position: ``"final"`` (the final separator ``→``, index -1; ``"separator"`` says the same), a token class name (``"query_input"``,
            ``"demo_sep"``, ... — its last occurrence in each prompt) or an int index (negative from
            the end; prompts are left-padded).
        layers: residual indices to read (``l`` = ``blocks.l.hook_resid_pre``, ``n_layers`` = final
            ``resid_post``); default all ``n_layers + 1``.
        top_k: tokens kept per layer of the prompt-averaged distribution.
        task_words: words whose rank/probability is tracked as the "task" category; default: the
            content words of the task's instruction. A word counts through its best-ranked
            single-token spelling (``w``, ``" w"``, ``"W"``, ``" W"``); the task category per prompt
            is the best-ranked word, ignoring a word whose token is that prompt's answer or input.
        lens: ``"logit"`` or a registered / custom :class:`Decoder`.
        keep_distribution: keep the mean distribution ``[layer, d_vocab]`` (``mean_probs``).

    Only the residual at the chosen position of each prompt is captured (no full cache).
    """
    from ..inputs.multimodal import check_inputs
    from ..models import ModelInfo
    from ..results import ResultMeta

    info = ModelInfo.of(model)
    top_k = _check_top_k(top_k, info.d_vocab)
    _check_lens(lens)
    sel_layers = _resolve_layers(model, layers, info.n_layers)
    if task_words is not None:
        task_words = _word_list(task_words)
        if len(task_words) == 0 or not any(str(w).strip() for w in task_words):
            raise ValueError("task_words is empty; pass at least one word (e.g. task_words=['capital', 'city']) or None for the instruction's words")
    batch_size = rows_per_forward(batch_size)
    batch, task = _prepare(model, task, n_prompts=n_prompts, n_shots=n_shots, seed=seed, prompt_kw=prompt_kw)
    check_inputs(model, batch, "the logit lens's prompts")  # images and model agree, before any forward
    pos_idx, pos_label = _positions(batch, position)
    if task_words is not None:
        words, cand, owner = _task_word_ids(model, list(task_words), user=True)
    else:
        words, cand, owner = _task_word_ids(model, _default_task_words(task) if task is not None else [], user=False)
    decoder = get_decoder(model, lens)
    return _run_lens(
        model, batch, pos_idx, pos_label, sel_layers, top_k, decoder, words, cand, owner, task,
        batch_size=batch_size, keep_distribution=keep_distribution, info=info, meta_cls=ResultMeta, seed=seed,
    )


def _query_input_ids(model: Any, batch: Any) -> Int[Tensor, " batch"]:
    """The token the *input* category tracks, per row (-1 = none): the query input's first token; for an
    image query (its query-input positions are image tokens), the first token of the word naming the
    image (``batch.queries[row]``, spelt as :func:`_word_token_ids` finds it)."""
    from ..inputs.text import TokenClass

    tokens = torch.as_tensor(batch.tokens).cpu()
    query = torch.as_tensor(batch.token_class).cpu() == int(TokenClass.QUERY_INPUT)
    q_first = _first_index(query)
    ids = torch.where(q_first >= 0, tokens.gather(1, q_first.clamp(min=0)[:, None])[:, 0], torch.full_like(q_first, -1))
    image_id = getattr(batch, "image_token_id", None)
    if image_id is None:
        return ids
    tok = getattr(model, "tokenizer", None)
    for row in (query & (tokens == int(image_id))).any(1).nonzero().flatten().tolist():
        word = _word_token_ids(tok, batch.queries[row]) if tok is not None else []
        ids[row] = int(word[0]) if word else -1
    return ids


@torch.no_grad()
def _run_lens(model, batch, pos_idx, pos_label, sel_layers, top_k, decoder, words, cand, owner, task, *,
              batch_size, keep_distribution, info, meta_cls, seed) -> LensResult:
    from ..engine.batch import rows_inputs
    from ..engine.readout import read
    from ..hooks import act_name, device_of

    device = device_of(model)
    n_rows = batch.tokens.shape[0]
    L = len(sel_layers)
    hook_names = [act_name("resid_pre", l) if l < info.n_layers else act_name("resid_post", info.n_layers - 1) for l in sel_layers]
    answer_ids = torch.as_tensor(batch.answer_ids, dtype=torch.long).reshape(-1).cpu()
    tokens = torch.as_tensor(batch.tokens).cpu()
    attention_mask = torch.as_tensor(batch.attention_mask).cpu()
    input_ids = _query_input_ids(model, batch)
    cand_t = torch.tensor(cand, dtype=torch.long, device=device)
    owner_t = torch.tensor(owner, dtype=torch.long, device=device)
    n_words = len(words)

    prob_sum = torch.zeros((L, info.d_vocab), dtype=torch.float32, device=device)  # (no float64 on MPS)
    out = {k: torch.full((n_rows, L), float("nan")) for k in ("answer_rank", "answer_prob", "input_rank", "input_prob", "task_rank", "task_prob")}
    word = {k: torch.full((n_rows, L, n_words), float("nan")) for k in ("word_rank", "word_prob")}
    # stop the forward after the last block we read from, when the final residual is not needed
    stop = {} if sel_layers[-1] == info.n_layers else {"stop_at_layer": sel_layers[-1] + 1}
    lens_name = _lens_name(decoder)

    for start in range(0, n_rows, batch_size):
        end = min(n_rows, start + batch_size)
        rows = torch.arange(end - start, device=device)
        cols = pos_idx[start:end].to(device)
        acts, _ = read(model, tokens[start:end], attention_mask[start:end], hook_names, at=(rows, cols), **stop,
                       **rows_inputs(batch, start, end))
        ans = answer_ids[start:end].to(device)
        inp = input_ids[start:end].to(device)
        for li, (layer, name) in enumerate(zip(sel_layers, hook_names)):
            logits = decoder(acts[name], layer).to(device)
            logp = logits.log_softmax(-1)
            prob_sum[li] += logp.exp().sum(0)
            for key, v in _layer_scores(logits, logp, ans, inp, cand_t, owner_t, n_words).items():
                (word if key.startswith("word_") else out)[key][start:end, li] = v.cpu()

    mean = (prob_sum / n_rows).cpu()
    top = mean.topk(top_k, dim=-1)
    strings = dict(zip(top.indices.flatten().tolist(), _token_strings(model, top.indices.flatten().tolist())))
    top_tokens = tuple(tuple(strings[t] for t in row) for row in top.indices.tolist())
    task_name = getattr(task, "name", None) or str(getattr(batch, "task", ""))
    family = getattr(task, "family", "") or ""
    # token strings beyond the per-layer top-k, for task_phase_words (looked up lazily by id)
    extra_ids = mean.topk(min(info.d_vocab, max(top_k, 50)), dim=-1).indices.flatten().unique().tolist() if keep_distribution else []
    extra_tokens = dict(zip(extra_ids, _token_strings(model, extra_ids)))
    meta = meta_cls.for_model(
        model, tasks=(task_name,), seed=getattr(batch, "seed", seed), position=pos_label, lens=lens_name, top_k=top_k,
        n_prompts=n_rows, n_shots=getattr(batch, "n_shots", None), special_ids=_special_ids(model),
        context=getattr(batch, "context", "text"), query_modality=getattr(batch, "query_modality", "text"),
    )
    return LensResult(
        layers=tuple(sel_layers), n_layers=info.n_layers, top_ids=top.indices, top_probs=top.values, top_tokens=top_tokens,
        **out, task_words=tuple(words), task_word_rank=_nanmean(word["word_rank"], 0), task_word_prob=_nanmean(word["word_prob"], 0),
        answer_ids=answer_ids.cpu(), input_ids=input_ids.cpu(), position=pos_label, lens=lens_name, task=task_name,
        family=family, mean_probs=mean if keep_distribution else None, token_strings=extra_tokens, meta=meta,
    )


def _layer_scores(logits: Float[Tensor, "batch d_vocab"], logp: Float[Tensor, "batch d_vocab"], ans: Int[Tensor, " batch"],
                  inp: Int[Tensor, " batch"], cand: Int[Tensor, " cand"], owner: Int[Tensor, " cand"],
                  n_words: int) -> dict[str, Tensor]:
    """One layer's lens read-out of a chunk (Luo et al. 2024, §4): rank (1 = top, among the logits) and probability of
    each row's answer, its input (NaN where there is none: ``inp < 0``) and, with task words, the best
    ranked of them (``task_*``) and each word's best token (``word_*``, ``[batch, word]``; a word whose
    tokens are only this row's answer or input says nothing about the task: NaN)."""
    a_rank = _ranks(logits, ans[:, None])[:, 0]
    ok = inp >= 0
    i_rank = _ranks(logits, inp.clamp(min=0)[:, None])[:, 0]
    i_prob = logp.gather(1, inp.clamp(min=0)[:, None])[:, 0].exp()
    nan = torch.full_like(i_rank, float("nan"))
    out = dict(answer_rank=a_rank, answer_prob=logp.gather(1, ans[:, None])[:, 0].exp(),
               input_rank=torch.where(ok, i_rank, nan), input_prob=torch.where(ok, i_prob, nan))
    if not n_words:
        return out
    b = logp.shape[0]
    ids = cand.expand(b, -1)
    c_rank = _ranks(logits, ids)
    c_prob = logp.gather(1, ids).exp()
    excluded = (ids == ans[:, None]) | (ids == inp[:, None])
    c_rank = torch.where(excluded, torch.full_like(c_rank, float("inf")), c_rank)
    c_prob = torch.where(excluded, torch.full_like(c_prob, -1.0), c_prob)
    w_rank = torch.full((b, n_words), float("inf"), device=logp.device).scatter_reduce(1, owner.expand(b, -1), c_rank, "amin")
    w_prob = torch.full((b, n_words), -1.0, device=logp.device).scatter_reduce(1, owner.expand(b, -1), c_prob, "amax")
    undefined = torch.isinf(w_rank)
    out["word_rank"] = torch.where(undefined, torch.full_like(w_rank, float("nan")), w_rank)
    out["word_prob"] = torch.where(undefined, torch.full_like(w_prob, float("nan")), w_prob)
    best = w_rank.min(1)  # undefined words are +inf already
    has = torch.isfinite(best.values)
    bp = out["word_prob"].gather(1, best.indices[:, None])[:, 0]
    out["task_rank"] = torch.where(has, best.values, torch.full_like(best.values, float("nan")))
    out["task_prob"] = torch.where(has, bp, torch.full_like(bp, float("nan")))
    return out


# ----------------------------------------------------------------------------------------------
# decoding a vector
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def decode(
    model: Any,
    vector: Float[Tensor, "d_model"] | Float[Tensor, "n d_model"],
    top_k: int = 10,
    *,
    apply_norm: bool = True,
    lens: str | Decoder = "logit",
    layer: int | None = None,
) -> list[tuple[str, float]] | list[list[tuple[str, float]]]:
    """Decode a residual-stream vector into its top-k tokens with probabilities.

    Works for a task vector (Hendel et al. 2023), a function vector (Todd et al. 2024) or a head's
    mean output ``z @ W_O``: the model's final norm is recomputed on the vector itself
    (``apply_norm=False`` skips it: plain ``vector @ W_U + b_U``), then softmax.
    A ``[d_model]`` vector gives one list of ``(token, prob)``; ``[n, d_model]`` gives one list per row.
    ``layer`` is passed to layer-specific decoders (a tuned lens); the logit lens ignores it.
    """
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    v = torch.as_tensor(vector)
    if not v.is_floating_point():
        v = v.to(torch.float32)
    if v.ndim not in (1, 2) or v.shape[-1] != info.d_model:
        raise ValueError(
            f"vector has shape {tuple(v.shape)} but this model's residual stream has width d_model={info.d_model}; "
            f"pass [{info.d_model}] or [n, {info.d_model}] (a head's output must be mapped through W_O first: z @ W_O[layer, head])"
        )
    if not bool(torch.isfinite(v).all()):  # NaN in -> NaN probabilities out, silently: refuse
        raise ValueError(f"vector has {int((~torch.isfinite(v)).sum())} NaN/inf entries; decode a finite vector (recompute it, or check the model's dtype)")
    top_k = _check_top_k(top_k, info.d_vocab)
    single = v.ndim == 1
    decoder = get_decoder(model, lens, apply_norm=apply_norm)
    logits = decoder(v.reshape(-1, info.d_model).detach(), layer)
    probs = logits.softmax(-1)
    top = probs.topk(top_k, dim=-1)
    ids = top.indices.cpu()
    strings = dict(zip(ids.flatten().tolist(), _token_strings(model, ids.flatten().tolist())))
    rows = [[(strings[t], float(p)) for t, p in zip(r_ids, r_p)] for r_ids, r_p in zip(ids.tolist(), top.values.cpu().tolist())]
    return rows[0] if single else rows


# ----------------------------------------------------------------------------------------------
# many tasks: one page
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False, repr=False)
class LensSummary:
    """Logit-lens results for several tasks, with the page :func:`lens_summary` wrote."""

    results: tuple[LensResult, ...]
    metric: str = "rank"
    path: Path | None = None
    k: int = 5

    @property
    def phases(self) -> dict[str, Phases]:
        return {r.task: r.phases(self.metric) for r in self.results}

    def rows(self) -> list[dict[str, Any]]:
        """One dict per task: task, family, phases, ordered, the task-phase layers and top words."""
        out = []
        for r in self.results:
            ph = r.phases(self.metric)
            used, words, how = r.task_phase_words(self.k, metric=self.metric)
            out.append(dict(task=r.task, family=r.family, input=ph.input, task_phase=ph.task, answer=ph.answer,
                            ordered=ph.ordered, phase_words_layers=used, phase_words_from=how, phase_words=words,
                            final_answer_prob=float(r.curve("answer", "prob")[-1]) if r.layers[-1] == r.n_layers else float("nan")))
        return out

    def text(self) -> str:
        """Compact markdown summary (for the CLI report)."""
        def rng(x):
            return "—" if x is None else (f"L{x[0]}" if x[0] == x[1] else f"L{x[0]}–{x[1]}")

        lines = [
            f"Logit lens at the {_shown(self.results[0].position)} ({len(self.results)} tasks, {self.results[0].n_prompts} prompts each):",
            "",
            "| task | family | input | task words | answer | 3 phases in order | top words (task phase) |",
            "|---|---|---|---|---|---|---|",
        ]
        for row in self.rows():
            words = ", ".join(_show(t).strip() for t, _ in row["phase_words"])
            where = rng((row["phase_words_layers"][0], row["phase_words_layers"][-1])) if row["phase_words_layers"] else "—"
            if row["phase_words_from"] != "task phase":
                where += "*"
            lines.append(
                f"| {row['task']} | {row['family']} | {rng(row['input'])} | {rng(row['task_phase'])} | {rng(row['answer'])} | "
                f"{'yes' if row['ordered'] else 'no'} | {words.replace('|', '/')} ({where}) |"
            )
        lines.append("")
        lines.append("\\* no task phase found: words from the layers between the input and answer phases (or the middle layer).")
        lines.append(f"Phase rule: {PHASE_RULE if self.metric == 'rank' else PHASE_RULE_PROB}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def __repr__(self) -> str:
        return f"LensSummary(tasks={[r.task for r in self.results]}, path={str(self.path) if self.path else None!r})"

    def to_html(self, path: str | Path, *, title: str = "tvlens — logit-lens task summary") -> Path:
        """One HTML page (it loads ``plotly.min.js`` from its folder, written there once: offline):
        summary table, then per task the phases, the top words at the task phase and the figure."""
        from ..plot import figure_div, html_page

        esc = _html.escape
        css = ("body{font-family:system-ui,sans-serif;margin:24px;max-width:1340px}table{border-collapse:collapse;margin:8px 0}"
               "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}th{background:#f3f3f3}"
               ".rule{color:#555;font-size:13px;max-width:1100px}")
        parts = [
            f"<h1>{esc(title)}</h1>",
            f"<p class='rule'><b>Phase rule.</b> {esc(PHASE_RULE if self.metric == 'rank' else PHASE_RULE_PROB)} "
            "Layers are residual indices: L<i>l</i> = resid_pre of block <i>l</i> (L0 = embeddings), the last = final resid_post.</p>",
            "<table><tr><th>task</th><th>family</th><th>input</th><th>task words</th><th>answer</th><th>ordered</th>"
            "<th>top words at the task phase</th><th>layers used</th></tr>",
        ]

        def rng(x):
            return "—" if x is None else (f"L{x[0]}" if x[0] == x[1] else f"L{x[0]}–{x[1]}")

        rows = self.rows()
        for row in rows:
            words = ", ".join(f"{esc(_show(t))} ({_fmt_prob(p)})" for t, p in row["phase_words"])
            used = row["phase_words_layers"]
            parts.append(
                f"<tr><td><a href='#{esc(row['task'])}'>{esc(row['task'])}</a></td><td>{esc(row['family'])}</td>"
                f"<td>{rng(row['input'])}</td><td>{rng(row['task_phase'])}</td><td>{rng(row['answer'])}</td>"
                f"<td>{'yes' if row['ordered'] else 'no'}</td><td>{words}</td>"
                f"<td>{rng((used[0], used[-1])) if used else '—'} <small>({esc(row['phase_words_from'])})</small></td></tr>"
            )
        parts.append("</table>")
        for i, (r, row) in enumerate(zip(self.results, rows)):
            parts.append(f"<h2 id='{esc(r.task)}'>{esc(r.task)} <small>({esc(r.family)})</small></h2>")
            parts.append(f"<p>phases: {esc(str(r.phases(self.metric)))}; task words: {esc(', '.join(r.task_words) or '(none)')}; "
                         f"{r.n_prompts} prompts, position {esc(r.position)}</p>")
            parts.append(figure_div(r.plot("prob")))
        return html_page(path, parts, title=title, css=css)


def lens_summary(
    model: Any,
    tasks: Any,
    *,
    out: str | Path | None = None,
    position: Any = FINAL,
    top_k: int = 10,
    task_words: Sequence[str] | Mapping[str, Sequence[str]] | None = None,
    n_prompts: int = N_PROMPTS,
    n_shots: int = 5,
    seed: int = 0,
    lens: str | Decoder = "logit",
    metric: str = "rank",
    k_words: int = 5,
    batch_size: int | None = BATCH_SIZE,
    **prompt_kw: Any,
) -> LensSummary:
    """Logit lens for each task and one standalone HTML page (the "logit-lens task summary").

    ``tasks``: a spec for :func:`tvlens.tasks.resolve_tasks` (``"all"``, ``"family:knowledge"``, a comma
    list) or a list of names / Tasks. ``task_words``: one list for all tasks or ``{task_name: [...]}``.
    ``out``: the HTML path (written when given). ``.text()`` of the result is a markdown summary.
    Every task's prompts and positions are validated before the first forward pass.
    """
    from ..models import ModelInfo
    from ..results import ResultMeta, check_writable
    from ..tasks import resolve_tasks

    if metric not in ("rank", "prob"):
        raise ValueError(f"unknown metric {metric!r}; use 'rank' or 'prob'")
    info = ModelInfo.of(model)
    top_k = _check_top_k(top_k, info.d_vocab)
    _check_lens(lens)
    batch_size = rows_per_forward(batch_size)
    if out is not None:
        check_writable(out)
    task_list = resolve_tasks(tasks)
    if not task_list:
        raise ValueError("no tasks given; pass a task spec such as 'all' or 'family:knowledge', or a list of task names")
    per_task_words: dict[str, Sequence[str] | None] = {}
    for t in task_list:
        words = task_words.get(t.name) if isinstance(task_words, Mapping) else task_words
        words = None if words is None else _word_list(words)
        if words is not None and (len(list(words)) == 0 or not any(str(w).strip() for w in words)):
            raise ValueError(f"task_words for {t.name!r} is empty; pass at least one word or None for the instruction's words")
        per_task_words[t.name] = words
    # validate everything first, then run
    plans = []
    for t in task_list:
        batch = _prepare(model, t, n_prompts=n_prompts, n_shots=n_shots, seed=seed, prompt_kw=prompt_kw)[0]
        pos_idx, pos_label = _positions(batch, position)
        words = per_task_words[t.name]
        kept, cand, owner = _task_word_ids(model, list(words) if words is not None else _default_task_words(t), user=words is not None)
        plans.append((t, batch, pos_idx, pos_label, kept, cand, owner))
    decoder = get_decoder(model, lens)
    sel_layers = list(range(info.n_layers + 1))
    results = tuple(
        _run_lens(model, batch, pos_idx, pos_label, sel_layers, top_k, decoder, kept, cand, owner, t,
                  batch_size=batch_size, keep_distribution=True, info=info, meta_cls=ResultMeta, seed=seed)
        for t, batch, pos_idx, pos_label, kept, cand, owner in plans
    )
    summary = LensSummary(results=results, metric=metric, k=k_words)
    if out is not None:
        path = summary.to_html(out)
        summary = replace(summary, path=path)
    return summary
