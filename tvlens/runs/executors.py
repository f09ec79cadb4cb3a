"""Executors: run a sweep's independent units here, or on Ray actors that each hold a model replica.

A long tvlens run is a set of independent **units** — a task, a chunk of one task's prompts, a
layer of a patching sweep, a selection restart — whose results are tensors and whose merge is
exact: moments by the parallel update of Chan, Golub & LeVeque (1979) (the one in
:meth:`tvlens.analyses.taskness.HeadStats.merge`), sweeps as disjoint sites. An executor takes
the units and hands back every unit's result once:

* :class:`LocalExecutor` — this process, one unit after the other. It is the default of every
  analysis (``executor=None``), which then runs its own loop exactly as without executors.
  ``LocalExecutor(split=True)`` runs the same units as a distributed run, in this process.
* :class:`RayExecutor` — `Ray <https://docs.ray.io>`_ actors, each holding a replica of the
  model loaded by :func:`tvlens.load_model` (one per GPU, or per CPU worker; ``gpus_per_worker``
  > 1 gives each replica several GPUs, with the layers split across them by ``device_map``).
  Each worker keeps two units in flight; results stream back to the driver, which is the one
  writer of the checkpoint (:class:`~tvlens.runs.checkpoint.SweepCheckpoint`, atomic).

**Faults.** A worker that dies (killed, out of memory, node lost) loses only its units in flight:
they go back in the queue, a replacement worker is started (up to ``max_restarts``), and the run
finishes with the same numbers. A unit's result is merged once, whoever computed it (a late
duplicate is dropped and counted). After the driver itself stops, re-running with the same
``checkpoint=`` computes only the units that are not in the file.

Before any unit runs, :meth:`RayExecutor.prepare` connects to the cluster (an address that
does not answer is refused at once, with the fix), checks that it has the CPUs / GPUs asked for,
starts the workers and has each load the model and prove it is the same model (its config hash)
— so an executor that cannot work fails before any work, and nothing is written.

Every result made through an executor records it in its meta: ``{"name": "ray", "workers": 2}``.
"""

from __future__ import annotations

import json
import os
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

__all__ = ["Unit", "Shared", "Executor", "LocalExecutor", "RayExecutor", "RunReport", "resolve_executor",
           "executor_meta", "splits", "pack_json", "unpack_json"]

#: units each worker holds at once: one computing, one queued behind it (hides the round trip)
_IN_FLIGHT = 2


@dataclass(frozen=True)
class Unit:
    """One independent piece of a run: ``fn(model, *args, **kwargs)`` on some worker's replica.

    ``key``: the unit's name in the checkpoint (an int, a str or a tuple of them). ``fn`` must be
    a module-level function (workers import it by name) returning a tensor or a dict of tensors.
    Arguments wrapped in :class:`Shared` are sent to the cluster once per run, not once per unit.
    """

    key: Any
    fn: Callable[..., Any]
    args: tuple = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Shared:
    """An argument several units share (prompts, means): shipped to the cluster once per run."""

    value: Any


@dataclass
class RunReport:
    """What the last :meth:`Executor.run` did: how many units, where, and what went wrong on the way."""

    executor: str
    workers: int
    units: int = 0
    from_checkpoint: int = 0
    computed: int = 0
    resubmitted: list = field(default_factory=list)
    duplicates_dropped: int = 0
    worker_deaths: int = 0
    per_worker: dict = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


def _keep(key: Any, res: dict[str, Tensor], who: str, *, results: dict, report: RunReport, checkpoint: Any,
          bar: Any, on_result: Callable[[Any, str], None] | None) -> None:
    """Keep one finished unit: in the checkpoint first (so a crash right after loses nothing), then
    in ``results``, counted for ``who``."""
    if checkpoint is not None:
        checkpoint.record(key, res, by=who)
    results[key] = res
    report.computed += 1
    report.per_worker[who] = report.per_worker.get(who, 0) + 1
    if bar is not None:
        bar.update(1)
    if on_result is not None:
        on_result(key, who)


@runtime_checkable
class Executor(Protocol):
    """What an analysis needs from an executor (``executor=`` of head_means, patch_heads, ...)."""

    name: str
    n_workers: int
    #: False: the analysis runs its own (single-process) loop; True: it splits the run into units
    split: bool

    def prepare(self, model: Any) -> None:
        """Check that units can run for ``model`` (cluster, workers, replicas) before any work."""

    def run(self, model: Any, units: Sequence[Unit], *, checkpoint: Any = None, desc: str = "units",
            progress: bool = True) -> dict[Any, dict[str, Tensor]]:
        """Every unit's result (dict of CPU tensors) by key; finished units come from ``checkpoint``."""

    def describe(self) -> dict[str, Any]:
        """``{"name": ..., "workers": ...}`` for a result's meta."""


# ----------------------------------------------------------------------------------------------
# helpers shared by the executors


def _unit_key(key: Any) -> Any:
    from .checkpoint import _unit_key as key_of

    return key_of(key)


def _as_result(out: Any, key: Any) -> dict[str, Tensor]:
    if isinstance(out, Tensor):
        out = {"value": out}
    if not isinstance(out, Mapping) or not out or not all(isinstance(v, Tensor) for v in out.values()):
        raise TypeError(f"unit {key!r} returned {type(out).__name__}; a unit returns a tensor or a non-empty dict of "
                        "tensors (pack other values with tvlens.runs.executors.pack_json)")
    return {str(k): v.detach().to("cpu") for k, v in out.items()}


def _unwrap(x: Any) -> Any:
    return x.value if isinstance(x, Shared) else x


def pack_json(obj: Any) -> Tensor:
    """A JSON-able value as a uint8 tensor, so that a unit can return it (and a checkpoint keep it)."""
    return torch.tensor(list(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def unpack_json(t: Tensor) -> Any:
    """The value :func:`pack_json` packed."""
    return json.loads(bytes(t.to(torch.uint8).tolist()).decode("utf-8"))


def resolve_executor(executor: Any) -> "Executor":
    """``None`` / ``"local"`` -> :class:`LocalExecutor`; an executor object as it is; anything else refused."""
    if executor is None or (isinstance(executor, str) and executor.lower() == "local"):
        return LocalExecutor()
    if isinstance(executor, str) and executor.lower() == "ray":
        return RayExecutor()
    if all(hasattr(executor, a) for a in ("name", "n_workers", "split", "prepare", "run", "describe")):
        return executor
    raise TypeError(f"executor must be None, 'local', 'ray' or an executor object (tvlens.runs.executors.LocalExecutor, "
                    f"RayExecutor), got {type(executor).__name__}; e.g. executor=RayExecutor(n_workers=2)")


def splits(executor: Any) -> bool:
    """Does ``executor`` want the run split into units (False for the default, local loop)?"""
    return executor is not None and bool(getattr(resolve_executor(executor), "split", False))


def executor_meta(executor: Any) -> dict[str, Any]:
    """The record a result keeps of who ran it: ``{"name": "local", "workers": 1}`` by default."""
    return dict(resolve_executor(executor).describe())


def _progress_bar(total: int, initial: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=desc, unit="unit")


def _open_units(units: Sequence[Unit], checkpoint: Any) -> tuple[list[Unit], dict[Any, dict[str, Tensor]]]:
    """Refuse repeated keys; split into the units still to compute and the results already on file."""
    seen: set = set()
    todo, done = [], {}
    for u in units:
        if not isinstance(u, Unit):
            raise TypeError(f"executors run Unit objects, got {type(u).__name__}")
        k = _unit_key(u.key)
        if k in seen:
            raise ValueError(f"unit {u.key!r} is listed twice; every unit of a run needs its own key")
        seen.add(k)
        if checkpoint is not None and k in checkpoint:
            done[k] = checkpoint[k]
        else:
            todo.append(u)
    return todo, done


class LocalExecutor:
    """Run units one after the other in this process, on the caller's model.

    As an analysis's ``executor=`` (the default), the analysis runs its own loop unchanged;
    ``split=True`` makes it run the same units a distributed run would (same numbers), here.
    """

    name = "local"

    def __init__(self, *, split: bool = False, on_result: Callable[[Any, str], None] | None = None) -> None:
        self.split = bool(split)
        self.n_workers = 1
        self.on_result = on_result
        self.last_run: RunReport | None = None

    def __repr__(self) -> str:
        return f"LocalExecutor(split={self.split})"

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": 1}

    def prepare(self, model: Any) -> None:
        return None

    def run(self, model: Any, units: Sequence[Unit], *, checkpoint: Any = None, desc: str = "units",
            progress: bool = True) -> dict[Any, dict[str, Tensor]]:
        t0 = time.perf_counter()
        todo, results = _open_units(units, checkpoint)
        report = RunReport(self.name, 1, units=len(units), from_checkpoint=len(results))
        bar = _progress_bar(len(units), len(results), f"{desc} [local]", progress and len(units) > 1)
        me = f"local:{os.getpid()}"
        try:
            for u in todo:
                k = _unit_key(u.key)
                res = _as_result(u.fn(model, *map(_unwrap, u.args), **{n: _unwrap(v) for n, v in u.kwargs.items()}), u.key)
                _keep(k, res, me, results=results, report=report, checkpoint=checkpoint, bar=bar,
                      on_result=self.on_result)
        finally:
            if bar is not None:
                bar.close()
            report.seconds = time.perf_counter() - t0
            self.last_run = report
        return results


# ----------------------------------------------------------------------------------------------
# Ray


class _Replica:
    """A Ray actor's state: one model replica, loaded by ``tvlens.load_model`` from ``spec``."""

    def __init__(self, spec: dict, threads: int | None) -> None:
        if threads:
            torch.set_num_threads(int(threads))
        self.error: str | None = None
        self.model = None
        try:
            from tvlens.models import load_model

            self.model = load_model(**spec)
        except BaseException as err:  # reported by ready(): the driver raises it before any work
            self.error = f"{type(err).__name__}: {err}"

    def ready(self) -> dict[str, Any]:
        if self.error is not None:
            raise RuntimeError(self.error)
        from tvlens.hooks import device_of
        from tvlens.models import ModelInfo

        return {"pid": os.getpid(), "host": socket.gethostname(), "config_hash": ModelInfo.of(self.model).config_hash,
                "device": str(device_of(self.model))}

    def run(self, fn: Callable[..., Any], key: Any, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        return _as_result(fn(self.model, *map(_unwrap, args), **{n: _unwrap(v) for n, v in kwargs.items()}), key)


def _load_spec(model: Any) -> dict[str, Any]:
    """How a worker loads the same model: what ``load_model`` recorded, else the model's name and dtype."""
    recorded = getattr(model, "_tvlens_load", None)
    if isinstance(recorded, Mapping):
        return dict(recorded)
    from ..models import ORGANISMS, ModelInfo

    name = ModelInfo.of(model).name
    try:
        dtype = str(next(model.parameters()).dtype).replace("torch.", "")
    except StopIteration:
        dtype = "float32"
    if name not in ORGANISMS and not os.path.isdir(name):
        raise ValueError(
            f"cannot tell the Ray workers how to load this model (its name {name!r} is neither a shipped organism nor a "
            "checkpoint folder); pass RayExecutor(load=dict(name_or_path=...)) with a name or path every worker can load")
    return {"name_or_path": name, "dtype": dtype}


def _probe(address: str, timeout: float = 3.0) -> None:
    """Refuse a cluster address that does not answer (``ray.init`` would wait a long time on it)."""
    target = address.split("://", 1)[-1]
    if address == "auto":
        env = os.environ.get("RAY_ADDRESS")
        if env and env != "auto":
            return _probe(env, timeout)
        if not os.path.exists("/tmp/ray/ray_current_cluster"):
            raise ConnectionError(
                "RayExecutor(address='auto') found no running Ray cluster on this machine; start one with `ray start "
                "--head`, pass its address (host:port), or use address=None to start a local cluster")
        return None
    host, _, port = target.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"Ray address {address!r} is not host:port; pass e.g. '127.0.0.1:6379', 'ray://host:10001' or 'auto'")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            return None
    except OSError as err:
        raise ConnectionError(
            f"no Ray cluster is reachable at {address!r} ({err}); start one there with `ray start --head --port "
            f"{port}`, check the address, or use RayExecutor(address=None) to start a local cluster") from err


class _RayRound:
    """The state of one :meth:`RayExecutor.run`: the units still queued, those in flight (by object
    ref: the unit and its worker's index), the dead workers, and what a finished or lost unit does.

    Units go one at a time to the least busy live worker, at most ``_IN_FLIGHT`` each, so a short
    queue spreads over the workers; a unit whose worker died goes back to the front of the queue.
    """

    def __init__(self, ex: "RayExecutor", ray: Any, todo: Sequence[Unit], results: dict, report: RunReport,
                 checkpoint: Any, bar: Any, *, n_units: int) -> None:
        self.ex, self.ray, self.results, self.report = ex, ray, results, report
        self.checkpoint, self.bar, self.n_units = checkpoint, bar, n_units
        self.queue = deque(todo)
        self.inflight: dict[Any, tuple[Unit, int]] = {}
        self.dead: set[int] = set()
        self.shared: dict[int, Any] = {}

    def put(self, x: Any) -> Any:
        """A :class:`Shared` argument as one object ref for the whole run; anything else as it is."""
        if isinstance(x, Shared):
            if id(x) not in self.shared:
                self.shared[id(x)] = (self.ray.put(x.value), x)  # keep x alive: ids stay unique
            return self.shared[id(x)][0]
        return x

    def submit(self, i: int) -> None:
        u = self.queue.popleft()
        ref = self.ex._actors[i].run.remote(u.fn, u.key, *map(self.put, u.args),
                                            **{n: self.put(v) for n, v in u.kwargs.items()})
        self.inflight[ref] = (u, i)

    def fill(self) -> None:
        load = {i: 0 for i in range(len(self.ex._actors)) if i not in self.dead}
        for _, i in self.inflight.values():
            if i in load:
                load[i] += 1
        while self.queue and load:
            i = min(load, key=lambda j: (load[j], j))
            if load[i] >= _IN_FLIGHT:
                break
            self.submit(i)
            load[i] += 1

    def lost(self, u: Unit, i: int) -> None:
        """Worker ``i`` died running ``u``: replace it (while restarts last) and queue ``u`` again first."""
        if i not in self.dead:
            self.dead.add(i)
            self.report.worker_deaths += 1
            self.ex._replace(self.ray, i, self.dead)
        self.queue.appendleft(u)
        self.report.resubmitted.append(_unit_key(u.key))
        if len(self.dead) >= len(self.ex._actors):
            resume = (" and kept in the checkpoint: re-run with the same checkpoint= to resume"
                      if self.checkpoint is not None else "")
            raise RuntimeError(
                f"every Ray worker died and max_restarts={self.ex.max_restarts} replacements are used up; "
                f"{len(self.results)} of {self.n_units} units are finished{resume}; "
                "check the workers' memory (a replica per worker) or raise max_restarts") from None
        self.fill()

    def done(self, u: Unit, i: int, res: dict[str, Tensor]) -> None:
        """Keep ``u``'s result once (a unit resubmitted after a fault may finish twice)."""
        k = _unit_key(u.key)
        who = f"ray:{self.ex._info[i].get('host', '?')}:{self.ex._info[i].get('pid', '?')}"
        if k in self.results:
            self.report.duplicates_dropped += 1
        else:
            if self.bar is not None:
                self.bar.set_postfix(workers=len(self.ex._actors) - len(self.dead))
            _keep(k, res, who, results=self.results, report=self.report, checkpoint=self.checkpoint, bar=self.bar,
                  on_result=self.ex.on_result)
        self.fill()

    def close(self) -> None:
        """Cancel what is still running (after an error), close the bar, forget the dead workers
        (the live ones are kept for the next run)."""
        for ref in list(self.inflight):
            try:
                self.ray.cancel(ref)
            except Exception:
                pass
        if self.bar is not None:
            self.bar.close()
        if self.dead:
            self.ex._actors = [a for j, a in enumerate(self.ex._actors) if j not in self.dead]
            self.ex._info = [x for j, x in enumerate(self.ex._info) if j not in self.dead]


class RayExecutor:
    """Run units on Ray actors, each holding a model replica loaded with :func:`tvlens.load_model`.

    Args:
        n_workers: replicas (actors) to start.
        address: ``None`` — use the Ray runtime this process already started (``ray.init``) or
            start a local one on the loopback interface, without the dashboard; ``"auto"`` or
            ``"host:port"`` / ``"ray://host:port"`` — connect to a running cluster.
        cpus_per_worker, gpus_per_worker: Ray resources per replica (``gpus_per_worker``
            defaults to 1 when the driver's model is on CUDA, else 0; with more than 1 the
            replica's layers are split over its GPUs: pass ``load=dict(..., device_map="auto")``).
        load: keyword arguments of ``tvlens.load_model`` for the replicas (default: how the
            driver's model was loaded — its organism name or checkpoint folder and dtype, on the
            worker's device).
        threads_per_worker: ``torch.set_num_threads`` in each replica (default ``cpus_per_worker``).
        max_restarts: replacement workers started, in all, for workers that die during runs.
        start_timeout: seconds to wait for the replicas to load.
        on_result: ``fn(unit_key, worker)`` called on the driver after each unit is merged.

    Keep one executor for several runs: the replicas stay loaded until :meth:`close` (or the
    end of a ``with`` block).
    """

    name = "ray"
    split = True

    def __init__(self, n_workers: int = 2, *, address: str | None = None, cpus_per_worker: float = 1,
                 gpus_per_worker: float | None = None, load: Mapping[str, Any] | None = None,
                 threads_per_worker: int | None = None, max_restarts: int = 2, start_timeout: float = 600.0,
                 on_result: Callable[[Any, str], None] | None = None) -> None:
        if isinstance(n_workers, bool) or not isinstance(n_workers, int) or n_workers < 1:
            raise ValueError(f"n_workers={n_workers!r} must be an int >= 1; e.g. RayExecutor(n_workers=2)")
        if not cpus_per_worker >= 0:
            raise ValueError(f"cpus_per_worker={cpus_per_worker!r} must be >= 0; e.g. 1")
        if gpus_per_worker is not None and gpus_per_worker < 0:
            raise ValueError(f"gpus_per_worker={gpus_per_worker!r} must be >= 0")
        if isinstance(max_restarts, bool) or not isinstance(max_restarts, int) or max_restarts < 0:
            raise ValueError(f"max_restarts={max_restarts!r} must be an int >= 0")
        self.n_workers = n_workers
        self.address = address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.load = None if load is None else dict(load)
        self.threads_per_worker = threads_per_worker
        self.max_restarts = max_restarts
        self.start_timeout = float(start_timeout)
        self.on_result = on_result
        self.last_run: RunReport | None = None
        self._actors: list[Any] = []
        self._info: list[dict] = []
        self._pool_key: Any = None
        self._restarts_used = 0
        self._started_ray = False

    def __repr__(self) -> str:
        return f"RayExecutor(n_workers={self.n_workers}, address={self.address!r}, alive={len(self._actors)})"

    def __enter__(self) -> "RayExecutor":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "workers": self.n_workers}

    @property
    def worker_pids(self) -> list[int]:
        """Process ids of the live replicas (for monitoring, or a fault test)."""
        return [i["pid"] for i in self._info]

    # -- set-up ----------------------------------------------------------------------------------

    def _ray(self) -> Any:
        try:
            import ray
        except ImportError as err:
            raise ImportError("RayExecutor needs Ray, which is not installed; install the extra with "
                              "`pip install \"tvlens[ray]\"` (or use the default local executor)") from err
        return ray

    def _connect(self, ray: Any) -> None:
        if self.address is not None:
            _probe(self.address)  # an address that does not answer: refused at once, whatever runs here
        if ray.is_initialized():
            return
        if self.address is None:
            need = self.n_workers * self.cpus_per_worker
            ray.init(num_cpus=max(1, int(-(-need // 1))), include_dashboard=False, _node_ip_address="127.0.0.1",
                     log_to_driver=False, configure_logging=False)
            self._started_ray = True
            return
        try:
            ray.init(address=self.address, log_to_driver=False, configure_logging=False)
        except Exception as err:
            raise ConnectionError(f"could not join the Ray cluster at {self.address!r} ({type(err).__name__}: {err}); "
                                  "check the address and that this machine runs the cluster's Ray version") from err

    def _gpus(self, model: Any) -> float:
        if self.gpus_per_worker is not None:
            return float(self.gpus_per_worker)
        from ..hooks import device_of

        return 1.0 if device_of(model).type == "cuda" else 0.0

    def _spec(self, model: Any) -> dict[str, Any]:
        spec = dict(self.load) if self.load is not None else _load_spec(model)
        if spec.get("device_map") is None:  # one device per replica: the one Ray gives the worker
            spec.pop("device_map", None)
            if self.load is None or "device" not in spec:
                spec["device"] = "cuda" if self._gpus(model) > 0 else "cpu"
        return spec

    def prepare(self, model: Any) -> None:
        """Connect, check resources, start the replicas and check they hold ``model``: all before any unit."""
        from ..models import ModelInfo

        ray = self._ray()
        expected = ModelInfo.of(model).config_hash
        spec = self._spec(model)
        key = (expected, json.dumps(spec, sort_keys=True, default=str))
        if self._actors and self._pool_key == key:
            return
        self.close(shutdown=False)
        self._connect(ray)
        gpus = self._gpus(model)
        need = {"CPU": self.cpus_per_worker * self.n_workers, "GPU": gpus * self.n_workers}
        deadline = time.monotonic() + 10.0  # resources of just-stopped workers come back after a moment
        free = ray.available_resources()
        while any(need[w] > free.get(w, 0.0) + 1e-9 for w in need) and time.monotonic() < deadline:
            if any(need[w] > ray.cluster_resources().get(w, 0.0) + 1e-9 for w in need):
                break  # more than the whole cluster: no point waiting
            time.sleep(0.2)
            free = ray.available_resources()
        for what, per in (("CPU", self.cpus_per_worker), ("GPU", gpus)):
            avail = free.get(what, 0.0)
            if per and per * self.n_workers > avail + 1e-9:
                raise ValueError(
                    f"the Ray cluster has {avail:g} free {what}s but {self.n_workers} workers x {per:g} {what} need "
                    f"{per * self.n_workers:g}; ask for fewer workers (n_workers={max(1, int(avail // per))}) or fewer "
                    f"{what}s per worker, close other executors, or add nodes to the cluster")
        self._actors, self._info = [], []
        try:
            for _ in range(self.n_workers):
                self._start_actor(ray, spec, gpus)
            self._await_ready(ray, list(range(self.n_workers)), expected, spec)
        except BaseException:
            self.close(shutdown=False)
            raise
        self._pool_key = key
        self._spec_now, self._gpus_now, self._expected = spec, gpus, expected
        self._restarts_used = 0

    def _start_actor(self, ray: Any, spec: dict, gpus: float) -> None:
        actor_cls = ray.remote(_Replica)
        threads = self.threads_per_worker or max(1, int(self.cpus_per_worker))
        self._actors.append(actor_cls.options(num_cpus=self.cpus_per_worker, num_gpus=gpus, max_restarts=0,
                                              max_concurrency=1).remote(spec, threads))
        self._info.append({})

    def _await_ready(self, ray: Any, idx: list[int], expected: str, spec: dict) -> None:
        refs = [self._actors[i].ready.remote() for i in idx]
        try:
            infos = ray.get(refs, timeout=self.start_timeout)
        except ray.exceptions.GetTimeoutError as err:
            raise TimeoutError(f"the Ray workers did not load the model within {self.start_timeout:.0f}s ({spec}); raise "
                               "start_timeout, or check that the cluster has free resources for them") from err
        except Exception as err:
            cause = getattr(err, "cause", None) or err
            raise RuntimeError(
                f"the Ray workers could not load the model with tvlens.load_model({', '.join(f'{k}={v!r}' for k, v in spec.items())}): "
                f"{type(cause).__name__}: {' '.join(str(cause).split())[:400]}; make the checkpoint loadable on every node "
                "(a shared path, or a hub name cached on each node) and pass it as RayExecutor(load=dict(name_or_path=...))"
            ) from None
        for i, info in zip(idx, infos):
            if info["config_hash"] != expected:
                raise ValueError(
                    f"a Ray worker loaded a different model (config hash {info['config_hash']}, the driver's model "
                    f"{expected}) from {spec}; point RayExecutor(load=...) at the checkpoint the driver's model came from")
            self._info[i] = info

    def close(self, shutdown: bool = True) -> None:
        """Stop the replicas (and the local Ray runtime, if this executor started it)."""
        try:
            import ray
        except ImportError:
            return
        for a in self._actors:
            try:
                ray.kill(a)
            except Exception:
                pass
        self._actors, self._info, self._pool_key = [], [], None
        if shutdown and self._started_ray and ray.is_initialized():
            ray.shutdown()
            self._started_ray = False

    # -- running ---------------------------------------------------------------------------------

    def run(self, model: Any, units: Sequence[Unit], *, checkpoint: Any = None, desc: str = "units",
            progress: bool = True) -> dict[Any, dict[str, Tensor]]:
        t0 = time.perf_counter()
        todo, results = _open_units(units, checkpoint)
        self.prepare(model)
        ray = self._ray()
        report = RunReport(self.name, len(self._actors), units=len(units), from_checkpoint=len(results))
        lost = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError, ray.exceptions.ObjectLostError)
        bar = _progress_bar(len(units), len(results), f"{desc} [ray x{len(self._actors)}]", progress and len(units) > 1)
        rnd = _RayRound(self, ray, todo, results, report, checkpoint, bar, n_units=len(units))
        try:
            rnd.fill()
            while rnd.inflight:
                ready, _ = ray.wait(list(rnd.inflight), num_returns=1)
                u, i = rnd.inflight.pop(ready[0])
                try:
                    res = ray.get(ready[0])
                except lost:
                    rnd.lost(u, i)
                    continue
                except ray.exceptions.RayTaskError as err:  # the unit itself failed: a real error, not a fault
                    cause = getattr(err, "cause", None)
                    if isinstance(cause, BaseException):
                        raise cause from None
                    raise
                rnd.done(u, i, res)
        finally:
            rnd.close()
            report.seconds = time.perf_counter() - t0
            self.last_run = report
        missing = [u.key for u in units if _unit_key(u.key) not in results]
        if missing:  # cannot happen unless a bug: refuse a partial merge
            raise RuntimeError(f"internal: {len(missing)} units have no result ({missing[:3]}); please report this")
        return results

    def _replace(self, ray: Any, i: int, dead: set[int]) -> None:
        """Start a replacement for dead worker ``i`` when restarts are left (it takes the next index)."""
        try:
            ray.kill(self._actors[i])
        except Exception:
            pass
        if self._restarts_used >= self.max_restarts:
            return
        self._restarts_used += 1
        self._start_actor(ray, self._spec_now, self._gpus_now)
        j = len(self._actors) - 1
        try:
            self._await_ready(ray, [j], self._expected, self._spec_now)
        except Exception:
            dead.add(j)
