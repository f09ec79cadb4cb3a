"""Shared plumbing for result objects: metadata, atomic files, safetensors + JSON storage.

Every tvlens result is a frozen dataclass of CPU tensors plus a :class:`ResultMeta`. Results worth
keeping are saved as a ``.safetensors`` file holding the tensors and a ``.json`` sidecar holding the
metadata; both are written atomically (temporary file in the same folder, then ``os.replace``), so an
interrupted write never leaves a half-written file under the final name.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ResultMeta",
    "LayerHeadGrid",
    "Tabular",
    "Saved",
    "Plotted",
    "WithMeta",
    "atomic_write_text",
    "atomic_write_bytes",
    "save_tensors",
    "tensor_digest",
    "load_tensors",
    "check_same_model",
    "load_result",
    "check_writable",
    "version",
]


def version() -> str:
    from . import __version__

    return __version__


@dataclass(frozen=True)
class ResultMeta(Mapping):
    """Where a result came from: enough to refuse mixing results of different models.

    Read-only and a :class:`~collections.abc.Mapping`: ``meta["executor"]``, ``meta.get(...)``,
    ``dict(meta)`` and ``{**meta}`` read a field first, then ``extra`` (where each analysis records
    how it was run), so every result's ``meta`` reads the same way.
    """

    model: str = "unknown"
    config_hash: str = ""
    tasks: tuple[str, ...] = ()
    seed: int | None = None
    tvlens_version: str = field(default_factory=version)
    extra: Mapping[str, Any] = field(default_factory=dict)

    @classmethod
    def for_model(cls, model: Any, *, tasks: tuple[str, ...] | list[str] = (), seed: int | None = None, **extra: Any) -> "ResultMeta":
        from .models import ModelInfo

        info = ModelInfo.of(model)
        return cls(model=info.name, config_hash=info.config_hash, tasks=tuple(tasks), seed=seed, extra=dict(extra))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        d["extra"] = dict(self.extra)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ResultMeta":
        """Read :meth:`to_dict`'s form; keys that are not fields (older flat files) land in ``extra``."""
        rest = {k: v for k, v in d.items() if k not in _META_FIELDS and k != "extra"}
        return cls(
            model=d.get("model", "unknown"),
            config_hash=d.get("config_hash", ""),
            tasks=tuple(d.get("tasks", ())),
            seed=d.get("seed"),
            tvlens_version=d.get("tvlens_version", "unknown"),
            extra={**rest, **dict(d.get("extra", {}))},
        )

    @classmethod
    def of(cls, meta: "ResultMeta | Mapping[str, Any] | None") -> "ResultMeta":
        """``meta`` as a ResultMeta: itself, or a mapping read as :meth:`from_dict` reads it."""
        if isinstance(meta, ResultMeta):
            return meta
        return cls.from_dict(meta or {})

    def replace(self, **kw: Any) -> "ResultMeta":
        """A copy with fields or ``extra`` keys set (a ``None`` value keeps the key, as ``None``)."""
        own = {k: v for k, v in kw.items() if k in _META_FIELDS}
        rest = {k: v for k, v in kw.items() if k not in _META_FIELDS}
        return dataclasses.replace(self, **own, extra={**self.extra, **rest})

    def __getitem__(self, key: str) -> Any:
        if key in _META_FIELDS:
            return getattr(self, key)
        return self.extra[key]

    def __iter__(self) -> Iterator[str]:
        yield from _META_FIELDS
        yield from (k for k in self.extra if k not in _META_FIELDS)

    def __len__(self) -> int:
        return len(_META_FIELDS) + sum(k not in _META_FIELDS for k in self.extra)

    def __contains__(self, key: object) -> bool:
        return key in _META_FIELDS or key in self.extra


_META_FIELDS = tuple(f.name for f in fields(ResultMeta) if f.name != "extra")


class WithMeta:
    """Base of result dataclasses with a ``meta`` field: it is always a :class:`ResultMeta` (a plain
    mapping, from an older file or a hand-made result, is read as one), so every result's meta reads
    the same way."""

    def __post_init__(self) -> None:
        object.__setattr__(self, "meta", ResultMeta.of(getattr(self, "meta", None)))

    @property
    def model(self) -> str:
        """The name of the model the result was computed on."""
        return self.meta.model

    @property
    def config_hash(self) -> str:
        """The fingerprint of that model's config (results of other models are refused)."""
        return self.meta.config_hash


class Tabular:
    """A result that reads as a table: :meth:`records` gives it as plain dicts, one per row (pandas'
    ``orient="records"``), and :meth:`to_frame` as a pandas ``DataFrame`` of those rows."""

    def records(self) -> list[dict[str, Any]]:
        raise NotImplementedError

    def to_frame(self) -> Any:
        import pandas as pd

        return pd.DataFrame(self.records())


class Saved:
    """``save()`` / ``load()`` for a result dataclass of tensors, plain values and other results: its
    tensors (wherever they sit: in fields, mappings, tuples or a nested result such as a
    :class:`~tvlens.analyses.selection.Selection`) go to ``<path>.safetensors``, the rest to
    ``<path>.json`` as a tree that says what each value was, so ``load`` gives back every field as it
    was (tuples as tuples, nested results as their classes), refusing a file of another class or
    (with ``model``) of another model."""

    def save(self, path: str | os.PathLike) -> Path:
        tensors: dict[str, Tensor] = {}
        tree = {f.name: _encode(getattr(self, f.name), f.name, tensors)
                for f in fields(self) if f.name != "meta"}  # type: ignore[arg-type]
        return save_tensors(path, tensors, {"kind": type(self).__name__, "fields": tree,
                                            "meta": ResultMeta.of(getattr(self, "meta", None)).to_dict()})

    @classmethod
    def load(cls, path: str | os.PathLike, model: Any = None) -> Any:
        tensors, saved = load_result(path, cls.__name__, model=model)
        names = {f.name for f in fields(cls)}  # type: ignore[arg-type]
        kw = {k: _decode(v, tensors) for k, v in saved["fields"].items() if k in names}
        if "meta" in names:
            kw["meta"] = ResultMeta.of(saved.get("meta"))
        return cls(**kw)


def _encode(value: Any, key: str, tensors: dict[str, Tensor]) -> Any:
    """The JSON tree of ``value``; its tensors are put in ``tensors`` under ``key``-derived names."""
    if isinstance(value, Tensor):
        tensors[key] = value
        return {"tensor": key}
    if isinstance(value, ResultMeta):
        return {"meta": value.to_dict()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        cls = type(value)
        return {"class": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: _encode(getattr(value, f.name), f"{key}/{f.name}", tensors) for f in fields(value)}}
    if isinstance(value, Mapping):
        bad = [k for k in value if not isinstance(k, str) or "/" in k]
        if bad:
            raise ValueError(f"cannot save {key}: its keys must be strings without '/', got {bad[:3]!r}")
        return {"map": {k: _encode(v, f"{key}/{k}", tensors) for k, v in value.items()}}
    if isinstance(value, (tuple, list)):
        return {"tuple": [_encode(v, f"{key}/{i}", tensors) for i, v in enumerate(value)]}
    if value is None or isinstance(value, (str, bool, int, float)):
        return value
    if hasattr(value, "item"):  # a numpy scalar
        return value.item()
    raise TypeError(f"cannot save {key}: a {type(value).__name__} is neither a tensor, a plain value nor a result")


def _decode(tree: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The value :func:`_encode` wrote as ``tree``."""
    if not isinstance(tree, dict):
        return tree
    if "tensor" in tree:
        return tensors[tree["tensor"]]
    if "tuple" in tree:
        return tuple(_decode(v, tensors) for v in tree["tuple"])
    if "map" in tree:
        return {k: _decode(v, tensors) for k, v in tree["map"].items()}
    if "meta" in tree:
        return ResultMeta.of(tree["meta"])
    module, _, name = tree["class"].partition(":")
    if not module.startswith("tvlens."):
        raise ValueError(f"a saved result names the class {tree['class']!r}, which is not tvlens's; refusing to build it")
    import importlib

    cls = importlib.import_module(module)
    for part in name.split("."):
        cls = getattr(cls, part)
    return cls(**{k: _decode(v, tensors) for k, v in tree["fields"].items()})


class Plotted:
    """``to_html(path)`` for a result with a ``plot()``: that figure as a standalone page (plotly.js embedded)."""

    def to_html(self, path: str | os.PathLike, **plot_kw: Any) -> Path:
        from .plot import save_figure

        return save_figure(self.plot(**plot_kw), path, png=False)[0]  # type: ignore[attr-defined]


class LayerHeadGrid:
    """``n_layers`` / ``n_heads`` for a result whose :attr:`grid` tensor is laid out ``[layer, head, ...]``."""

    @property
    def grid(self) -> Tensor:
        raise NotImplementedError

    @property
    def n_layers(self) -> int:
        return int(self.grid.shape[0])

    @property
    def n_heads(self) -> int:
        return int(self.grid.shape[1])


def check_writable(path: str | os.PathLike) -> Path:
    """Fail early, before any expensive work, if ``path`` cannot be written."""
    path = Path(path)
    parent = path.parent if path.suffix else path
    probe = parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and not probe.is_dir():
        raise ValueError(f"cannot write to {str(path)!r}: {str(probe)!r} is a file, not a folder; choose another output path")
    if not os.access(probe, os.W_OK):
        raise PermissionError(f"cannot write to {str(path)!r}: {str(probe)!r} is not writable; choose another output path (e.g. --out ./figures)")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to ``path`` atomically (temporary file in the same folder, then rename)."""
    path = Path(path)
    probe = path.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise ValueError(f"cannot write to {str(path)!r}: {str(probe)!r} is a file, not a folder; choose another output path")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the mode a plain open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, Tensor):
        return obj.tolist()
    if isinstance(obj, (tuple, set, frozenset)):
        return list(obj)
    if hasattr(obj, "item"):
        return obj.item()
    return str(obj)


def tensor_digest(*tensors: Tensor) -> str:
    """Short content hash of tensors (shape, dtype, bytes): identifies a checkpointed run's inputs."""
    h = hashlib.sha256()
    for t in tensors:
        t = t.detach().to("cpu").contiguous()
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()[:16]


def save_tensors(path: str | os.PathLike, tensors: Mapping[str, Tensor], meta: Mapping[str, Any]) -> Path:
    """Save tensors to ``<path>.safetensors`` and metadata to ``<path>.json`` (both atomic).

    ``path`` may be given with or without the ``.safetensors`` suffix; the returned path is the tensor file.
    """
    from safetensors.torch import save

    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    data = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()})
    # Each file is written atomically but the pair is not: the digest lets load_tensors detect new tensors
    # paired with old metadata after an interrupted re-save.
    meta = {**dict(meta), "tensors_sha256": hashlib.sha256(data).hexdigest()}
    tensor_path = atomic_write_bytes(base.with_suffix(".safetensors"), data)
    atomic_write_text(base.with_suffix(".json"), json.dumps(meta, indent=2, default=_json_default))
    return tensor_path


def load_tensors(path: str | os.PathLike) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load what :func:`save_tensors` wrote. Raises ``FileNotFoundError`` naming the missing file."""
    from safetensors.torch import load

    base = Path(path)
    if base.suffix in (".safetensors", ".json"):
        base = base.with_suffix("")
    tensor_path, meta_path = base.with_suffix(".safetensors"), base.with_suffix(".json")
    for p in (tensor_path, meta_path):
        if not p.exists():
            raise FileNotFoundError(f"{str(p)!r} does not exist; tvlens files come in pairs (.safetensors + .json) written by .save()")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(meta_path)!r} is not valid JSON (line {err.lineno}): {err.msg}; re-save the result") from err
    raw = tensor_path.read_bytes()
    want = meta.get("tensors_sha256")
    if want and hashlib.sha256(raw).hexdigest() != want:
        raise ValueError(f"{str(tensor_path)!r} does not match {str(meta_path)!r} (an interrupted save?); re-save the result")
    return load(raw), meta


def load_result(path: str | os.PathLike, kind: str, *, model: Any = None, what: str | None = None) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Load a saved result of class ``kind``; with ``model``, refuse one made with another model.

    The one loader behind every result's ``.load``: the file's recorded ``kind`` must match, and the
    model fingerprint is read from the nested ``meta`` when there is one, else from the top level.
    """
    tensors, meta = load_tensors(path)
    # results record their class under "kind" (most) or "type" (vectors, whose "kind" says task/function/...)
    recorded = {meta.get("kind"), meta.get("type")}
    saved_kind = meta.get("type") or meta.get("kind") or "unknown"
    if not recorded & {kind, f"tvlens.{kind}"}:
        raise ValueError(f"{str(path)!r} holds a {saved_kind!r} result, not a {kind}; load it with the class that saved it")
    if model is not None:
        inner = meta.get("meta") if isinstance(meta.get("meta"), Mapping) else meta
        check_same_model(model, inner, what=what or kind)
    return tensors, meta


def check_same_model(model: Any, meta: Mapping[str, Any], *, what: str = "file") -> None:
    """Refuse to use a saved result with a different model than the one that produced it."""
    from .models import ModelInfo

    info = ModelInfo.of(model)
    saved_hash = meta.get("config_hash")
    if saved_hash and saved_hash != info.config_hash:
        raise ValueError(
            f"this {what} was made with model {meta.get('model', '?')!r} (config hash {saved_hash}), not with the loaded "
            f"model {info.name!r} (config hash {info.config_hash}); recompute it for this model or load the model it came from"
        )
