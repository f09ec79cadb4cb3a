"""The units of each analysis and their exact merge, for runs on an executor (:mod:`.executors`).

Every unit calls the analysis's own public function on a part of the run, on a worker's replica
of the model; the driver merges the parts:

============================  =====================================  ==========================================
analysis                      unit                                   merge
============================  =====================================  ==========================================
``head_means`` / ``taskness``  a block of one task's prompts          Chan, Golub & LeVeque 1979 (``HeadStats.merge``)
``patch_heads``               one layer's sites                      disjoint sites of ``per_prompt``
``patch_positions``           one layer                              disjoint layers of ``per_prompt``
``layer_sweep``               one task (then one centred grid)       stacked tasks (Hendel et al. 2023)
``function_vector``           head_means units, then patch units     as above (Todd et al. 2024)
selection restarts            one seed                               best final reward (Hojel et al. 2024)
============================  =====================================  ==========================================

The prompts a unit sees are exactly those of the single-process run (the same generator seeds,
the same rows), so the merged numbers equal the local run to float rounding (the batches of a
sweep are shaped differently when it is cut in parts: ~1e-7 in float32).
"""

from __future__ import annotations

import time
from typing import Any, Mapping, Sequence

import torch
from torch import Tensor

from .executors import Shared, Unit, executor_meta, pack_json, resolve_executor, unpack_json

#: a task's prompts are cut into at most this many units (at batch boundaries) so that one task
#: spreads over several workers; the cut does not depend on the number of workers, so a
#: checkpoint resumes with any number of them
PARTS_PER_CHUNK = 4


def _open_checkpoint(checkpoint: Any, model: Any, config: dict) -> Any:
    if checkpoint is None:
        return None
    from .checkpoint import SweepCheckpoint

    return SweepCheckpoint(checkpoint, model=model, config={**config, "units": "executor"})


# ----------------------------------------------------------------------------------------------
# head_means


def _row_parts(n: int, batch_size: int) -> list[tuple[int, int]]:
    """Rows ``0..n`` in at most PARTS_PER_CHUNK blocks of whole batches; no block of one row (a
    block of one prompt is folded into the one before it)."""
    n_batches = -(-n // batch_size)
    per = -(-n_batches // PARTS_PER_CHUNK) * batch_size
    parts = [(r, min(r + per, n)) for r in range(0, n, per)]
    if len(parts) > 1 and parts[-1][1] - parts[-1][0] < 2:
        parts[-2:] = [(parts[-2][0], n)]
    return parts


def _head_means_unit(model: Any, task: Any, n: int, n_shots: int, seed: int, r0: int, r1: int, opts: dict,
                     prompt_kw: dict) -> dict[str, Tensor]:
    """Moments of rows ``r0:r1`` of one prompt chunk of one task, by ``head_means`` itself."""
    from ..analyses import taskness as tk

    if tk._is_prompt_batch(task):
        batch = task.slice(r0, r1)
    else:
        from ..inputs.text import icl_prompts

        batch = icl_prompts(model, task, n_prompts=n, n_shots=n_shots, seed=seed, **prompt_kw).slice(r0, r1)
    if len(batch) >= 2:
        st = tk.head_means(model, [batch], **opts)
        out = {"z_mean": st.z_mean[0], "z_var": st.z_var[0], "count": st.count[0]}
        if st.out_mean is not None:
            out.update(out_mean=st.out_mean[0], out_var=st.out_var[0])
        return out
    # one prompt (a last chunk of n_prompts = 1024 k + 1): head_means asks for two, so use its batch step
    from ..hooks import device_of
    from ..models import ModelInfo

    info = ModelInfo.of(model)
    mode, cls = tk._resolve_positions(opts["positions"])
    layer_ids = list(opts["layers"])
    dev = device_of(model)
    acc_z = tk._Moments(len(layer_ids) * info.n_heads * info.d_head, dev)
    acc_o = w_o = None
    if opts["include_output"]:
        acc_o = tk._Moments(len(layer_ids) * info.n_heads * info.d_model, dev)
        w_o = model.W_O.detach()[layer_ids].to(device=dev, dtype=torch.float64)
    stop_at = layer_ids[-1] + 1 if layer_ids[-1] + 1 < info.n_layers else None
    tk._accumulate_batch(model, batch.tokens, batch.attention_mask, batch.token_class, mode=mode, cls=cls,
                         layer_ids=layer_ids, acc_z=acc_z, acc_o=acc_o, w_o=w_o, stop_at=stop_at)
    zm, zv, c = tk._finish(acc_z, (len(layer_ids), info.n_heads, info.d_head), per_position=mode != tk.FINAL)
    out = {"z_mean": zm, "z_var": zv, "count": c}
    if acc_o is not None:
        om, ov, _ = tk._finish(acc_o, (len(layer_ids), info.n_heads, info.d_model), per_position=mode != tk.FINAL)
        out.update(out_mean=om, out_var=ov)
    return out


def head_means(model: Any, task_list: Sequence[Any], *, executor: Any, n_prompts: int, n_shots: int, mode: str,
               positions: Any, batch_size: int, seed: int, include_output: bool, layer_ids: list[int],
               progress: bool, prompt_kw: dict) -> Any:
    """:func:`tvlens.analyses.taskness.head_means` on an executor: units are blocks of one task's prompts."""
    from ..analyses import taskness as tk
    from ..models import ModelInfo

    ex = resolve_executor(executor)
    info = ModelInfo.of(model)
    from ..inputs.text import icl_prompts

    for task in task_list:  # bad tasks or prompt options fail here, before the workers start
        if not tk._is_prompt_batch(task):
            icl_prompts(model, task, n_prompts=2, n_shots=n_shots, seed=seed, **prompt_kw)
    ex.prepare(model)
    opts = dict(positions=positions, batch_size=batch_size, include_output=include_output, layers=list(layer_ids),
                progress=False)
    units: list[Unit] = []
    for ti, task in enumerate(task_list):
        if tk._is_prompt_batch(task):
            shared = Shared(task)
            units += [Unit(("z", ti, 0, r0), _head_means_unit, (shared, len(task), n_shots, seed, r0, r1, opts, prompt_kw))
                      for r0, r1 in _row_parts(len(task), batch_size)]
            continue
        done, i = 0, 0
        while done < n_prompts:
            n = min(tk._PROMPT_CHUNK, n_prompts - done)
            s = seed + i * tk._SEED_STRIDE
            units += [Unit(("z", ti, i, r0), _head_means_unit, (task, n, n_shots, s, r0, r1, opts, prompt_kw))
                      for r0, r1 in _row_parts(n, batch_size)]
            done += n
            i += 1
    results = ex.run(model, units, desc="head_means", progress=progress)
    merged = None
    per = mode != tk.FINAL
    for u in units:  # in order: task by task, chunk by chunk, so tasks keep their order
        r = results[u.key if not isinstance(u.key, list) else tuple(u.key)]
        name = tk._task_name(task_list[u.key[1]])
        part = tk.HeadStats((name,), r["z_mean"][None], r["z_var"][None], r["count"][None], mode, tuple(layer_ids),
                            r["out_mean"][None] if "out_mean" in r else None,
                            r["out_var"][None] if "out_var" in r else None, {"config_hash": info.config_hash})
        merged = part if merged is None else merged.merge(part)
    if per and merged.n_positions == 0:
        raise ValueError(f"no token of class {positions!r} in any prompt; choose a class these prompts contain")
    meta = tk.stats_meta(info, task_list, n_prompts=n_prompts, n_shots=n_shots, seed=seed, batch_size=batch_size,
                         prompt_kw=prompt_kw, executor=executor_meta(ex))
    return tk.HeadStats(merged.tasks, merged.z_mean, merged.z_var, merged.count, mode, tuple(layer_ids),
                        merged.out_mean, merged.out_var, meta)


# ----------------------------------------------------------------------------------------------
# patching


def _patch_heads_unit(model: Any, target: Any, source: Any, sites: list, opts: dict) -> dict[str, Tensor]:
    """One layer's sites, by ``patch_heads`` itself: per-prompt values and the clean metrics."""
    from ..analyses.patching import patch_heads as ph

    res = ph(model, target, source, sites=sites, progress=False, **opts)
    layer = sites[0][0]
    src = float("nan") if res.source_value is None else res.source_value
    return {"per_prompt": res.per_prompt[:, layer], "target": torch.tensor(res.target_value, dtype=torch.float64),
            "source": torch.tensor(src, dtype=torch.float64)}


def patch_heads(model: Any, target: Any, source: Any, *, executor: Any, site_list: list, n_prompts: int, n_units: int,
                positions: str, metric: Any, component: str, normalize: bool, batch_size: Any, max_memory: Any,
                progress: bool, fast: Any, checkpoint: Any, ck_config: dict, has_source_batch: bool,
                pos_labels: Any) -> Any:
    """:func:`tvlens.analyses.patching.patch_heads` on an executor: one unit per layer of sites."""
    from ..analyses import patching as pt
    from ..models import ModelInfo

    t0 = time.perf_counter()
    ex = resolve_executor(executor)
    info = ModelInfo.of(model)
    ck = _open_checkpoint(checkpoint, model, ck_config)
    by_layer: dict[int, list] = {}
    for l, h in site_list:
        by_layer.setdefault(l, []).append((l, h))
    opts = dict(positions=positions, metric=metric, component=component, batch_size=batch_size, max_memory=max_memory,
                fast=fast)
    tgt, src = Shared(target), Shared(source)
    units = [Unit(("layer", l), _patch_heads_unit, (tgt, src, sites, opts)) for l, sites in by_layer.items()]
    results = ex.run(model, units, checkpoint=ck, desc=f"patch_heads[{positions}]", progress=progress)
    first = results[("layer", site_list[0][0])]
    shape = (info.n_layers, n_units) + tuple(first["per_prompt"].shape[2:])
    per_prompt = torch.full((n_prompts, *shape), float("nan"), dtype=first["per_prompt"].dtype)
    for l, sites in by_layer.items():
        heads = torch.as_tensor([h for _, h in sites])
        per_prompt[:, l, heads] = results[("layer", l)]["per_prompt"][:, heads]
    target_value = float(first["target"])
    source_value = float(first["source"]) if has_source_batch else None
    dims = ("layer", "head", "pos") if positions == "each" else ("layer", "head")
    meta = pt._meta(model, what=f"patch_heads ({component}, positions={positions})", positions=positions,
                    component=component, n_prompts=n_prompts, source="prompts" if has_source_batch else "means",
                    seconds=time.perf_counter() - t0, fast=fast, executor=executor_meta(ex))
    return pt._finish(per_prompt.mean(0), per_prompt, dims, metric, target_value, source_value, normalize, meta,
                      pos_labels=pos_labels)


def _patch_positions_unit(model: Any, target: Any, source: Any, layer: int, opts: dict) -> dict[str, Tensor]:
    from ..analyses.patching import patch_positions as pp

    res = pp(model, target, source, layers=[layer], progress=False, **opts)
    return {"per_prompt": res.per_prompt[:, layer], "target": torch.tensor(res.target_value, dtype=torch.float64),
            "source": torch.tensor(res.source_value, dtype=torch.float64)}


def patch_positions(model: Any, target: Any, source: Any, *, executor: Any, layers: list[int], n_prompts: int,
                    n_pos: int, hook: str, metric: Any, normalize: bool, batch_size: Any, max_memory: Any,
                    progress: bool, fast: Any, pos_labels: Any) -> Any:
    """:func:`tvlens.analyses.patching.patch_positions` on an executor: one unit per layer."""
    from ..analyses import patching as pt
    from ..models import ModelInfo

    t0 = time.perf_counter()
    ex = resolve_executor(executor)
    info = ModelInfo.of(model)
    opts = dict(hook=hook, metric=metric, batch_size=batch_size, max_memory=max_memory, fast=fast)
    tgt, src = Shared(target), Shared(source)
    uniq = list(dict.fromkeys(layers))
    units = [Unit(("layer", l), _patch_positions_unit, (tgt, src, l, opts)) for l in uniq]
    results = ex.run(model, units, desc=f"patch_positions[{hook}]", progress=progress)
    first = results[("layer", uniq[0])]
    per_prompt = torch.full((n_prompts, info.n_layers, n_pos), float("nan"), dtype=first["per_prompt"].dtype)
    for l in uniq:
        per_prompt[:, l] = results[("layer", l)]["per_prompt"]
    meta = pt._meta(model, what=f"patch_positions ({hook})", hook=hook, n_prompts=n_prompts,
                    seconds=time.perf_counter() - t0, fast=fast, executor=executor_meta(ex))
    return pt._finish(per_prompt.mean(0), per_prompt, ("layer", "pos"), metric, float(first["target"]),
                      float(first["source"]), normalize, meta, pos_labels=pos_labels)


# ----------------------------------------------------------------------------------------------
# layer sweep


def _sweep_task_unit(model: Any, task: Any, opts: dict) -> dict[str, Tensor]:
    """One task's sweep (uncentred), by ``layer_sweep`` itself."""
    from ..vectors.activation import layer_sweep as ls

    r = ls(model, [task], center=False, **opts)
    out = {"vectors": r.vectors[0], "accuracy": r.accuracy[0], "zero_shot": r.zero_shot[0], "icl": r.icl[0:1],
           "n_eval": r.n_eval[0]}
    for name in ("logprob", "zero_shot_logprob"):
        out[name] = getattr(r, name)[0]
    out["icl_logprob"] = r.icl_logprob[0:1]
    return out


def _sweep_grid_unit(model: Any, task: Any, vectors: Tensor, splits: list, n_prompts: int, seed: int,
                     layers: list, mode: str, alpha: float, prompt_kw: dict) -> dict[str, Tensor]:
    """One task's grid for given (centred) vectors, by the sweep's own evaluation."""
    from ..vectors import activation as av

    zs = [av._zero_shot_prompts(model, task, sp, n_prompts, seed, prompt_kw) for sp in splits]
    per_col, clean = av._grid_eval(model, zs, vectors[None].expand(len(splits), *vectors.shape).contiguous(),
                                   layers, mode, alpha)
    grid = torch.stack([c.mean(0) for c in per_col])  # [split, layer, 2]
    base = torch.stack([c.mean(0) for c in clean])  # [split, 2]
    return {"grid": grid, "base": base}


def layer_sweep(model: Any, task_list: Sequence[Any], *, executor: Any, n_prompts: int, n_shots: int, mode: str,
                alpha: float, seed: int, splits: tuple, layers: list, kind: str, dummy_query: bool, center: bool,
                function_kw: Any, batch_size: int, checkpoint: Any, ck_config: dict, t0: float,
                prompt_kw: Mapping[str, Any]) -> Any:
    """:func:`tvlens.vectors.activation.layer_sweep` on an executor: one unit per task (and, with
    ``center=True``, a second unit per task evaluating its centred vectors); ``prompt_kw`` (how the
    prompts are written) travels with every unit."""
    from ..inputs.text import prompt_record
    from ..vectors import activation as av

    ex = resolve_executor(executor)
    ck = _open_checkpoint(checkpoint, model, ck_config)
    opts = dict(n_prompts=n_prompts, n_shots=n_shots, mode=mode, alpha=alpha, seed=seed, splits=tuple(splits),
                layers=list(layers), kind=kind, dummy_query=dummy_query, function_kw=function_kw, batch_size=batch_size,
                **prompt_kw)
    units = [Unit(("task", t.name), _sweep_task_unit, (t, opts)) for t in task_list]
    res = ex.run(model, units, checkpoint=ck, desc="layer_sweep", progress=True)
    get = lambda name: torch.stack([res[("task", t.name)][name] for t in task_list])  # noqa: E731
    vecs = get("vectors")
    acc, base_acc, lp, base_lp = get("accuracy"), get("zero_shot"), get("logprob"), get("zero_shot_logprob")
    if center:  # the grid of the centred vectors: a second unit per task
        vecs = vecs - vecs.mean(0, keepdim=True)
        units = [Unit(("grid", t.name), _sweep_grid_unit, (t, vecs[i], list(splits), n_prompts, seed, list(layers), mode,
                                                         float(alpha), dict(prompt_kw))) for i, t in enumerate(task_list)]
        g = ex.run(model, units, checkpoint=ck, desc="layer_sweep (centred)", progress=True)
        grid = torch.stack([g[("grid", t.name)]["grid"] for t in task_list])
        base = torch.stack([g[("grid", t.name)]["base"] for t in task_list])
        acc, lp, base_acc, base_lp = grid[..., 0], grid[..., 1], base[..., 0], base[..., 1]
    meta = av._make_meta(model, [t.name for t in task_list], seed, n_prompts=n_prompts, n_shots=n_shots, kind=kind,
                         dummy_query=bool(dummy_query), center=bool(center), seconds=time.perf_counter() - t0,
                         hook=av.POSITION_RULE, **({"function_kw": dict(function_kw)} if function_kw else {}),
                         executor=executor_meta(ex), **prompt_record(prompt_kw))
    return av.SweepResult(tasks=tuple(t.name for t in task_list), families=tuple(t.family for t in task_list),
                          layers=tuple(layers), splits=tuple(splits), accuracy=acc, zero_shot=base_acc,
                          icl=get("icl")[:, 0], n_eval=get("n_eval"), vectors=vecs, logprob=lp,
                          zero_shot_logprob=base_lp, icl_logprob=get("icl_logprob")[:, 0], mode=mode,
                          alpha=float(alpha), kind=kind, meta=meta)


# ----------------------------------------------------------------------------------------------
# selection restarts


def _restart_unit(model: Any, method: str, tasks: Any, seed: int, kw: dict, means: Any) -> dict[str, Tensor]:
    """One restart, by ``reinforce_select`` / ``soft_select`` itself (``means``: shared head means)."""
    from ..analyses import selection as sel

    fn = sel.reinforce_select if method == "reinforce" else sel.soft_select
    s = fn(model, tasks, seed=seed, progress=False, **({**kw, "head_means": means} if means is not None else kw))
    out = {"probabilities": s.probabilities, "mask": s.mask.to(torch.uint8), "rewards": s.rewards,
           "meta": pack_json(s.meta.to_dict())}
    if isinstance(s.head_means, Tensor):
        out["head_means"] = s.head_means
    return out


def restarts(model: Any, tasks: Any, *, method: str, seeds: Sequence[int], executor: Any, head_means: Any,
             kw: dict, progress: bool) -> list[Any]:
    """One selection per seed, each a unit; returned in seed order."""
    from ..analyses import selection as sel
    from ..results import ResultMeta

    ex = resolve_executor(executor)
    means = Shared(head_means)
    units = [Unit(("restart", int(s)), _restart_unit, (method, tasks, int(s), kw, means)) for s in seeds]
    res = ex.run(model, units, desc=f"{method} restarts", progress=progress)
    out = []
    for s in seeds:
        r = res[("restart", int(s))]
        d = unpack_json(r["meta"])
        d["extra"] = {**d.get("extra", {}), "executor": executor_meta(ex)}
        meta = ResultMeta.from_dict(d)
        out.append(sel.Selection(probabilities=r["probabilities"], mask=r["mask"].bool(), rewards=r["rewards"],
                                 method=method, meta=meta, tasks=tuple(meta.tasks), head_means=r.get("head_means")))
    return out
