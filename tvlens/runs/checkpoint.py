"""No lost work: record the finished units of a long sweep so an interrupted run resumes.

A sweep (a ``patch_heads`` over layers, a ``layer_sweep`` over tasks, an optimisation over steps)
is a loop over *units* whose results are tensors. :class:`SweepCheckpoint` writes every finished
unit to one file, atomically (temporary file in the same folder, then rename; see
:func:`tvlens.results.atomic_write_bytes`), so the file under its final name is always a complete,
readable checkpoint — never half-written, whatever stops the process. Reopened with the same
model and the same configuration it hands back what is done, so the caller computes only the
rest; reopened with a different model or configuration it refuses, naming what differs::

    ckpt = SweepCheckpoint(path, model=model, config={"what": "patch_heads", "tasks": names, "seed": 0})
    for layer in range(n_layers):
        if layer in ckpt:
            continue                                  # finished by an earlier, interrupted run
        ckpt.record(layer, {"values": compute(layer)})
    values = torch.stack([ckpt[layer]["values"] for layer in range(n_layers)])

The file is a ``.safetensors`` file whose header metadata holds the checkpoint's identity (model
name and config hash, configuration, finished units in order), so one ``os.replace`` commits the
tensors and the bookkeeping together. ``path=None`` gives an in-memory checkpoint (same interface,
nothing written), so a caller can use one code path with and without ``checkpoint=``.

Rewriting the whole file per unit costs O(units x size); sweeps have tens to hundreds of small
units (a layer's ``[prompt, head]`` values), where this is negligible next to one forward pass.

**Several writers.** Any number of :class:`SweepCheckpoint` objects — in one process or in
several processes sharing a folder — may record into the same file. Each write takes an
exclusive lock on the file's folder (``flock``; no lock file is left behind), folds in the units
that other writers committed since this object last read the file, and then replaces the file
atomically; so the file always holds the union of every writer's finished units, and a unit
recorded by two writers is stored once. A distributed run (:mod:`tvlens.runs.executors`)
usually has one writer, the driver, fed by its workers; ``record(..., by=...)`` stores which
worker computed a unit (:meth:`by`).
"""

from __future__ import annotations

import json
import math
import os
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Hashable, Iterable, Iterator, Mapping

import torch
from torch import Tensor

__all__ = ["SweepCheckpoint", "CHECKPOINT_KIND"]

CHECKPOINT_KIND = "tvlens.sweep_checkpoint"
_FORMAT = 1

Unit = Hashable  # int, str, or a tuple of ints / strs (e.g. (layer, position))


def _canonical(obj: Any, where: str = "config") -> Any:
    """A JSON-stable form of ``obj`` (tuples -> lists, tensors -> lists); raise on what JSON cannot hold."""
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, int):
        return int(obj)
    if isinstance(obj, float):
        if not math.isfinite(obj):
            return repr(obj)  # JSON has no NaN/inf; compare them as text
        return obj
    if isinstance(obj, Tensor):
        return _canonical(obj.detach().cpu().tolist(), where)
    if isinstance(obj, Mapping):
        out = {}
        for k, v in obj.items():
            if not isinstance(k, str):
                raise TypeError(f"{where} keys must be strings, got {k!r}; use str keys")
            out[k] = _canonical(v, f"{where}[{k!r}]")
        return out
    if isinstance(obj, (list, tuple)):
        return [_canonical(v, where) for v in obj]
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy scalars
        return _canonical(obj.item(), where)
    raise TypeError(
        f"{where} holds a {type(obj).__name__} ({obj!r:.60}), which cannot be stored in a checkpoint; "
        "describe the run with strings, numbers, lists and dicts"
    )


def _unit_key(unit: Any) -> Any:
    """Validate a unit and return its hashable, JSON-round-trippable form."""
    if isinstance(unit, bool) or unit is None:
        raise TypeError(f"a checkpoint unit must be an int, a str or a tuple of them, got {unit!r}")
    if isinstance(unit, Tensor) and unit.numel() == 1 and not unit.is_floating_point():
        return int(unit)
    if isinstance(unit, (int, str)):
        return int(unit) if isinstance(unit, int) else unit
    if hasattr(unit, "item") and not isinstance(unit, (list, tuple)):  # numpy integer
        return _unit_key(unit.item())
    if isinstance(unit, (tuple, list)) and unit:
        return tuple(_unit_key(u) for u in unit)
    raise TypeError(f"a checkpoint unit must be an int, a str or a non-empty tuple of them, got {unit!r}")


def _to_json_unit(unit: Any) -> Any:
    return [_to_json_unit(u) for u in unit] if isinstance(unit, tuple) else unit


def _from_json_unit(unit: Any) -> Any:
    return tuple(_from_json_unit(u) for u in unit) if isinstance(unit, list) else unit


def _read_header(path: Path) -> dict[str, Any]:
    """The JSON header of a safetensors file (tensor index + ``__metadata__``), without loading tensors."""
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) != 8:
            raise ValueError("too short to be a safetensors file")
        (n,) = struct.unpack("<Q", head)
        if n <= 0 or n > 100_000_000:
            raise ValueError("not a safetensors header")
        raw = f.read(n)
        if len(raw) != n:
            raise ValueError("truncated safetensors header")
    return json.loads(raw)


@contextmanager
def _folder_lock(folder: Path) -> Iterator[None]:
    """An exclusive advisory lock on ``folder`` (writers of checkpoints in it take turns)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock (Windows): single writer per file
        yield
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        try:
            fcntl.flock(fd, fcntl.LOCK_UN)
        finally:
            os.close(fd)


def _signature(path: Path) -> tuple[int, int, int] | None:
    """What changes when another writer replaces the file (inode, size, mtime); None if absent."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _diff(saved: Mapping[str, Any], now: Mapping[str, Any]) -> list[str]:
    keys = sorted(set(saved) | set(now))
    out = []
    for k in keys:
        if k not in saved:
            out.append(f"{k}: not in the checkpoint, now {now[k]!r}")
        elif k not in now:
            out.append(f"{k}: checkpoint {saved[k]!r}, not given now")
        elif saved[k] != now[k]:
            out.append(f"{k}: checkpoint {saved[k]!r} vs now {now[k]!r}")
    return out


class SweepCheckpoint:
    """Finished units of a sweep and their result tensors, persisted atomically after each unit.

    Args:
        path: the checkpoint file (conventionally ``*.safetensors``; any name works). It is created
            on the first :meth:`record`; an existing checkpoint there is resumed. ``None``: keep the
            units in memory only.
        model: the model the sweep runs on; its :class:`~tvlens.models.ModelInfo` (name and
            ``config_hash``, which also fingerprints the weights) is stored and checked on reopen.
        config: everything else that determines the results (task names, seed, n_prompts, metric,
            ...): strings, numbers, lists, dicts. Reopening with a different config raises.

    Raises (in the constructor, before any work):
        ValueError: the file was written for another model or configuration, is not a tvlens
            sweep checkpoint, or cannot be read — the message names the difference and the fix
            (delete the file or pass a new path).
        ValueError / PermissionError: ``path`` cannot be written (under a regular file, read-only).
    """

    def __init__(self, path: str | os.PathLike | None, *, model: Any, config: Mapping[str, Any]) -> None:
        from ..models import ModelInfo

        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(f"checkpoint path must be a str or a path, got {type(path).__name__}; e.g. 'runs/sweep.safetensors'")
        if not isinstance(config, Mapping):
            raise TypeError(f"config must be a dict describing the run, got {type(config).__name__}")
        info = ModelInfo.of(model)
        self.path: Path | None = None if path is None else Path(path).expanduser()
        self.model_name = info.name
        self.config_hash = info.config_hash
        self.config: dict[str, Any] = _canonical(dict(config))
        self._units: list[Any] = []
        self._results: dict[Any, dict[str, Tensor]] = {}
        self._by: dict[Any, str] = {}
        self._seen: tuple[int, int, int] | None = None  # the file as this object last read or wrote it
        self.resumed = False
        if self.path is not None:
            self._check_path()
            if self.path.exists():
                self._load()

    # ---- opening -------------------------------------------------------------------------------

    def _check_path(self) -> None:
        from ..results import check_writable

        path = self.path
        assert path is not None
        if str(path) in ("", "."):
            raise ValueError("checkpoint path is empty; pass a file name such as 'runs/sweep.safetensors'")
        if path.is_dir():
            raise ValueError(f"checkpoint path {str(path)!r} is a folder; pass a file inside it, e.g. {str(path / 'sweep.safetensors')!r}")
        # probe the folder the file goes into (check_writable treats a suffix-less path as a folder)
        check_writable(path.parent / f".{path.name}.probe.tmp")

    def _fix(self) -> str:
        return f"delete {str(self.path)!r} to start afresh, or pass a new checkpoint path"

    def _load(self) -> None:
        for unit, res, by in self._read():
            self._units.append(unit)
            self._results[unit] = res
            if by is not None:
                self._by[unit] = by
        self.resumed = bool(self._units)

    def _read(self) -> list[tuple[Any, dict[str, Tensor], str | None]]:
        """Every unit in the file (checked to belong to this model and configuration), in order."""
        from safetensors.torch import load

        path = self.path
        assert path is not None
        seen = _signature(path)
        try:
            header = _read_header(path)
            meta = header.get("__metadata__") or {}
            ident = json.loads(meta.get("tvlens", "null"))
        except (OSError, ValueError, UnicodeDecodeError) as err:
            raise ValueError(f"{str(path)!r} exists but is not a tvlens sweep checkpoint ({err}); {self._fix()}") from err
        if not isinstance(ident, dict) or ident.get("kind") != CHECKPOINT_KIND:
            raise ValueError(f"{str(path)!r} exists but is not a tvlens sweep checkpoint; {self._fix()}")
        if ident.get("format") != _FORMAT:
            raise ValueError(f"checkpoint {str(path)!r} has format {ident.get('format')!r}, this tvlens reads {_FORMAT}; {self._fix()}")
        if ident.get("config_hash") != self.config_hash:
            raise ValueError(
                f"checkpoint {str(path)!r} was written for model {ident.get('model')!r} (config hash "
                f"{ident.get('config_hash')}), not for the loaded model {self.model_name!r} (config hash "
                f"{self.config_hash}); load the model it came from, or {self._fix()}"
            )
        saved = ident.get("config", {})
        diff = _diff(saved, self.config)
        if diff:
            raise ValueError(
                f"checkpoint {str(path)!r} was written with a different configuration ({'; '.join(diff[:5])}"
                f"{'; ...' if len(diff) > 5 else ''}); resume with the same settings, or {self._fix()}"
            )
        try:
            tensors = load(path.read_bytes())
        except Exception as err:  # a truncated file cannot come from us (atomic), but say what to do
            raise ValueError(f"checkpoint {str(path)!r} cannot be read ({type(err).__name__}: {err}); {self._fix()}") from err
        out = []
        for i, entry in enumerate(ident.get("units", [])):
            unit = _from_json_unit(entry["unit"])
            out.append((unit, {name: tensors[f"{i}/{name}"] for name in entry["names"]}, entry.get("by")))
        self._seen = seen
        return out

    # ---- reading -------------------------------------------------------------------------------

    @property
    def done(self) -> tuple[Any, ...]:
        """The finished units, in the order they were recorded."""
        return tuple(self._units)

    def __contains__(self, unit: Any) -> bool:
        return _unit_key(unit) in self._results

    def __len__(self) -> int:
        return len(self._units)

    def __iter__(self) -> Iterator[Any]:
        return iter(tuple(self._units))

    def __getitem__(self, unit: Any) -> dict[str, Tensor]:
        key = _unit_key(unit)
        if key not in self._results:
            raise KeyError(f"unit {unit!r} is not finished in this checkpoint (finished: {len(self._units)} units)")
        return dict(self._results[key])

    def get(self, unit: Any, default: Any = None) -> Any:
        key = _unit_key(unit)
        return dict(self._results[key]) if key in self._results else default

    def remaining(self, units: Iterable[Any]) -> list[Any]:
        """The units of ``units`` not finished yet, in the given order."""
        return [u for u in units if _unit_key(u) not in self._results]

    def by(self, unit: Any) -> str | None:
        """Who computed ``unit`` (the ``by`` given to :meth:`record`, e.g. a worker), or None."""
        return self._by.get(_unit_key(unit))

    def refresh(self) -> int:
        """Fold in the units other writers have committed to the file since it was last read; returns
        how many were new. (Recording does this too, under the lock, before every write.)"""
        if self.path is None or _signature(self.path) in (None, self._seen):
            return 0
        return self._absorb(self._read())

    def _absorb(self, entries: list[tuple[Any, dict[str, Tensor], str | None]]) -> int:
        new = 0
        for unit, res, by in entries:
            if unit in self._results:  # this writer's own result of a unit stands: a unit is stored once
                continue
            self._units.append(unit)
            self._results[unit] = res
            if by is not None:
                self._by[unit] = by
            new += 1
        return new

    # ---- writing -------------------------------------------------------------------------------

    def record(self, unit: Any, result: Tensor | Mapping[str, Tensor], *, by: str | None = None) -> None:
        """Mark ``unit`` finished with its result tensors and write the checkpoint (atomically).

        ``result``: a tensor (stored as ``"value"``) or a dict of tensors. Re-recording a finished
        unit replaces its result. ``by``: who computed it (a worker's name), kept with the unit.
        The file on disk after this call holds every unit recorded so far, by this object and by
        any other writer of the same file.
        """
        key = _unit_key(unit)
        if isinstance(result, Tensor):
            result = {"value": result}
        if not isinstance(result, Mapping) or not result:
            raise TypeError(f"result of unit {unit!r} must be a tensor or a non-empty dict of tensors, got {type(result).__name__}")
        clean: dict[str, Tensor] = {}
        for name, t in result.items():
            if not isinstance(name, str) or not name or "/" in name:
                raise ValueError(f"result names must be non-empty strings without '/', got {name!r}")
            if not isinstance(t, Tensor):
                raise TypeError(f"result {name!r} of unit {unit!r} must be a tensor, got {type(t).__name__}")
            clean[name] = t.detach().to("cpu").clone().contiguous()
        if by is not None and not isinstance(by, str):
            raise TypeError(f"by must be a str naming who computed the unit, got {type(by).__name__}")
        previous = self._results.get(key)
        previous_by = self._by.get(key)
        was_new = previous is None
        if was_new:
            self._units.append(key)
        self._results[key] = clean
        if by is not None:
            self._by[key] = by
        try:
            self._write()
        except BaseException:  # keep memory and disk in agreement
            if was_new:
                self._units.remove(key)
                del self._results[key]
                self._by.pop(key, None)
            else:
                self._results[key] = previous  # type: ignore[assignment]
                if previous_by is None:
                    self._by.pop(key, None)
                else:
                    self._by[key] = previous_by
            raise

    def _write(self) -> None:
        if self.path is None:
            return
        from ..results import atomic_write_bytes

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise ValueError(f"cannot write the checkpoint {str(self.path)!r} ({err}); pass a checkpoint path in a "
                             "writable folder") from err
        with _folder_lock(self.path.parent):
            if _signature(self.path) not in (None, self._seen):  # another writer committed units: keep them
                self._absorb(self._read())
            atomic_write_bytes(self.path, self._encode())
            self._seen = _signature(self.path)

    def _encode(self) -> bytes:
        from safetensors.torch import save

        from ..results import version

        tensors: dict[str, Tensor] = {}
        units = []
        for i, unit in enumerate(self._units):
            res = self._results[unit]
            entry = {"unit": _to_json_unit(unit), "names": list(res)}
            if unit in self._by:
                entry["by"] = self._by[unit]
            units.append(entry)
            for name, t in res.items():
                tensors[f"{i}/{name}"] = t
        ident = {
            "kind": CHECKPOINT_KIND,
            "format": _FORMAT,
            "model": self.model_name,
            "config_hash": self.config_hash,
            "config": self.config,
            "units": units,
            "tvlens_version": version(),
        }
        return save(tensors, metadata={"tvlens": json.dumps(ident)})

    def remove(self) -> None:
        """Delete the checkpoint file (e.g. once the final result is saved) and forget the units."""
        self._units.clear()
        self._results.clear()
        if self.path is not None and self.path.exists():
            self.path.unlink()

    def __repr__(self) -> str:
        where = str(self.path) if self.path is not None else "memory"
        return f"SweepCheckpoint({where!r}, model={self.model_name!r}, {len(self._units)} units done)"
