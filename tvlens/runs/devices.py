"""Models larger than one device: device maps through ``accelerate``, checked before anything loads.

A model whose weights do not fit one device is split by layers: blocks ``0..k`` on the first
device, the next blocks on the second, ... (pipeline placement, as ``transformers`` /
``accelerate`` ``device_map`` do; the TransformerLens bridge passes ``device_map`` and
``max_memory`` through to ``from_pretrained``). Each block then runs where its weights are;
``accelerate``'s hooks move a block's inputs to its device, and tvlens reads results back to the
CPU. This module

* checks a device map before any weight is read (:func:`check_device_map`): a device that does
  not exist here (``cuda:3`` on a one-GPU machine), ``meta`` (no values to compute with), a
  module name the model does not have — each refused with the fix;
* writes hand-made maps (:func:`layer_map`: the layers in contiguous blocks over given devices,
  embeddings with the first block, the final norm and unembedding with the last, tied weights
  kept together) and plans ``"auto"`` maps on an empty (meta) copy of the model
  (:func:`plan_device_map`: which layers go where, and the bytes per device), so a layout for a
  70 B model can be worked out on a laptop;
* loads (:func:`load_model`): the check, then :func:`tvlens.models.load_model` with the map,
  recording how the model was loaded so that Ray workers (:mod:`tvlens.runs.executors`) load
  their replicas the same way.

``disk`` entries offload weights to ``offload_folder`` (read back at each forward); TransformerLens
cannot read ``W_O`` / ``W_U`` of offloaded layers, so analyses that use the weights themselves
(``function_vector``, ``head_means(include_output=True)``) need the layers they read in memory.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch

__all__ = ["available_devices", "check_device_map", "layer_map", "plan_device_map", "DevicePlan", "load_model",
           "layer_devices", "AUTO_MAPS"]

#: the device-map strategies ``accelerate`` understands
AUTO_MAPS = ("auto", "balanced", "balanced_low_0", "sequential")


def available_devices() -> list[str]:
    """The devices weights can be placed on here: ``cpu``, ``disk`` and each visible GPU."""
    out = ["cpu", "disk"]
    if torch.cuda.is_available():
        out += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        out.append("mps")
    return out


def _device_name(value: Any, where: str) -> str:
    """A map value as a canonical device name, refused when it does not exist here."""
    have = available_devices()
    if isinstance(value, bool):
        raise TypeError(f"{where} is {value!r}; name a device: an int GPU index, 'cuda:i', 'cpu' or 'disk'")
    if isinstance(value, int):
        name = f"cuda:{value}"
    elif isinstance(value, torch.device):
        name = str(value) if value.index is not None or value.type != "cuda" else "cuda:0"
    elif isinstance(value, str):
        name = value.strip().lower()
        if name == "cuda":
            name = "cuda:0"
        if name.isdigit():
            name = f"cuda:{name}"
    else:
        raise TypeError(f"{where} is a {type(value).__name__} ({value!r}); name a device: an int GPU index, 'cuda:i', "
                        "'cpu' or 'disk'")
    if name == "meta":
        raise ValueError(f"{where} is 'meta', which holds no values to compute with; place those modules on a GPU, "
                         "'cpu' or 'disk' (plan_device_map works out a layout without loading anything)")
    if name not in have:
        n_gpu = torch.cuda.device_count() if torch.cuda.is_available() else 0
        raise ValueError(f"{where} names device {value!r}, which does not exist here (this machine has "
                         f"{n_gpu} GPU{'s' if n_gpu != 1 else ''}: {', '.join(have)}); use one of those, or "
                         "device_map='auto' to let accelerate place the layers")
    return name


def _module_names(source: Any) -> tuple[set[str], Any]:
    """Every module name of the model at ``source`` (a checkpoint folder, organism or config), built on meta."""
    hf = _empty_model(source)
    return {n for n, _ in hf.named_modules() if n}, hf


def check_device_map(device_map: Any, max_memory: Mapping[Any, Any] | None = None, *,
                     model: Any = None) -> tuple[Any, dict | None]:
    """Validate a device map (and ``max_memory``) before any loading; returns them canonical.

    ``device_map``: one of :data:`AUTO_MAPS`, or a dict ``{module name: device}`` (device: GPU
    index, ``"cuda:i"``, ``"cpu"``, ``"disk"``). ``model``: a checkpoint folder or organism name;
    with it, the dict's module names are checked against the model's (on an empty meta copy).
    """
    if isinstance(device_map, str):
        if device_map not in AUTO_MAPS:
            raise ValueError(f"device_map={device_map!r} is not a strategy accelerate knows; use one of "
                             f"{', '.join(map(repr, AUTO_MAPS))} or a dict {{module name: device}}")
        out: Any = device_map
    elif isinstance(device_map, Mapping):
        if not device_map:
            raise ValueError("device_map is an empty dict; map every module (e.g. layer_map(model, devices)) or use 'auto'")
        out = {}
        for name, dev in device_map.items():
            if not isinstance(name, str):
                raise TypeError(f"device_map keys are module names (str), got {name!r}; e.g. {{'model.layers.0': 0}}")
            canon = _device_name(dev, f"device_map[{name!r}]")
            out[name] = canon if not canon.startswith("cuda:") else int(canon.split(":")[1])
        if model is not None:
            names, _ = _module_names(model)
            unknown = [n for n in out if n and n not in names]
            if unknown:
                top = sorted({n.split(".")[0] for n in names if n})
                raise ValueError(f"device_map names module(s) {', '.join(map(repr, unknown[:4]))} that the model does "
                                 f"not have (its top-level modules: {', '.join(top)}); use the names of "
                                 "model.named_modules(), e.g. from tvlens.runs.devices.layer_map(model, devices)")
    else:
        raise TypeError(f"device_map must be a strategy name or a dict, got {type(device_map).__name__}; e.g. 'auto'")
    mem = None
    if max_memory is not None:
        if not isinstance(max_memory, Mapping) or not max_memory:
            raise TypeError("max_memory must be a dict {device: bytes or '20GiB'}, e.g. {0: '70GiB', 'cpu': '200GiB'}")
        mem = {}
        for dev, amount in max_memory.items():
            canon = _device_name(dev, f"max_memory[{dev!r}]")
            if not isinstance(amount, (int, str)) or isinstance(amount, bool):
                raise TypeError(f"max_memory[{dev!r}] = {amount!r}; give bytes (int) or a size such as '40GiB'")
            mem[canon if not canon.startswith("cuda:") else int(canon.split(":")[1])] = amount
    return out, mem


# ----------------------------------------------------------------------------------------------
# maps and plans on an empty model


def _config(source: Any) -> Any:
    from transformers import AutoConfig, PretrainedConfig

    if isinstance(source, PretrainedConfig):
        return source
    from ..models import ORGANISMS, organism_path

    path = organism_path(source) if isinstance(source, str) and source in ORGANISMS else Path(os.fspath(source)).expanduser()
    if not (Path(path) / "config.json").exists():
        raise FileNotFoundError(f"no config.json at {str(path)!r}; pass a checkpoint folder, an organism name or a "
                                "transformers config")
    return AutoConfig.from_pretrained(path)


def _empty_model(source: Any) -> Any:
    """The Hugging Face model of ``source`` with every weight on ``meta`` (no memory, no loading)."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    cfg = _config(source)
    with init_empty_weights():
        return AutoModelForCausalLM.from_config(cfg)


def _layers_of(hf: Any) -> list[str]:
    """Names of the decoder blocks, in order (the module list holding the no-split block class)."""
    block_classes = set(getattr(hf, "_no_split_modules", None) or ())
    names = [n for n, m in hf.named_modules() if type(m).__name__ in block_classes]
    if not names:
        raise ValueError(f"cannot find the decoder blocks of {type(hf).__name__} (no _no_split_modules); write the "
                         "device map by hand, or use device_map='auto'")
    return names


def layer_map(source: Any, devices: Sequence[Any], *, weights: Sequence[float] | None = None) -> dict[str, Any]:
    """A hand-written device map: the layers in contiguous blocks over ``devices`` (in proportion
    to ``weights``, default equal), the embeddings with the first block, the final norm and the
    unembedding with the last (with the first when they are tied to the embedding).

    ``source``: a checkpoint folder, an organism name, or a ``transformers`` config. Devices are
    checked (:func:`check_device_map`). Example: ``layer_map("organism", ["cpu", "disk"])``.
    """
    if not devices:
        raise ValueError("devices is empty; give at least one, e.g. [0, 1] or ['cuda:0', 'cuda:1']")
    devs = [_device_name(d, f"devices[{i}]") for i, d in enumerate(devices)]
    w = [1.0] * len(devs) if weights is None else [float(x) for x in weights]
    if len(w) != len(devs) or any(x <= 0 for x in w):
        raise ValueError(f"weights must be {len(devs)} positive numbers (one per device), got {weights!r}")
    hf = _empty_model(source)
    blocks = _layers_of(hf)
    n = len(blocks)
    bounds, acc = [], 0.0
    for x in w:
        acc += x
        bounds.append(round(n * acc / sum(w)))
    owner = [next(i for i, b in enumerate(bounds) if j < b) for j in range(n)]
    out: dict[str, Any] = {}
    for j, name in enumerate(blocks):
        out[name] = devs[owner[j]]
    tied = bool(getattr(hf.config, "tie_word_embeddings", False))
    emb = hf.get_input_embeddings()
    head = hf.get_output_embeddings()
    container = blocks[0].rsplit(".", 1)[0]
    for nm, m in hf.named_modules():  # every other leaf-level module, not inside a block
        if not nm or nm == container or any(nm == b or nm.startswith(b + ".") or b.startswith(nm + ".") for b in blocks):
            continue
        if any(nm.startswith(k + ".") for k in out):
            continue
        if head is not None and id(m) == id(head):
            out[nm] = devs[0] if tied else devs[-1]
        elif emb is not None and id(m) == id(emb):
            out[nm] = devs[0]
        elif not list(m.children()):  # a final norm goes last; parameter-free helpers (rotary) go first
            has_weights = any(True for _ in m.parameters(recurse=False))
            out[nm] = devs[-1] if has_weights and _after_blocks(hf, nm, blocks) else devs[0]
    return {k: (int(v.split(":")[1]) if isinstance(v, str) and v.startswith("cuda:") else v) for k, v in out.items()}


def _after_blocks(hf: Any, name: str, blocks: list[str]) -> bool:
    """Is module ``name`` registered after the decoder blocks (a final norm), rather than before (embeddings, rotary)?"""
    order = [n for n, _ in hf.named_modules()]
    return order.index(name) > order.index(blocks[-1])


@dataclass(frozen=True)
class DevicePlan:
    """Where an ``accelerate`` map puts a model: per device, its layers and weight bytes."""

    device_map: dict[str, Any]
    layers: dict[str, list[int]] = field(default_factory=dict)
    weight_bytes: dict[str, int] = field(default_factory=dict)
    total_bytes: int = 0

    def table(self) -> str:
        rows = [f"{'device':>8} {'layers':>14} {'weights GiB':>12}"]
        for dev in self.weight_bytes:
            ls = self.layers.get(dev, [])
            span = f"{ls[0]}-{ls[-1]}" if ls else "-"
            rows.append(f"{dev:>8} {span:>14} {self.weight_bytes[dev] / 2**30:>12.1f}")
        return "\n".join(rows)


def plan_device_map(source: Any, max_memory: Mapping[Any, Any], *, dtype: Any = torch.bfloat16,
                    no_split: Sequence[str] | None = None) -> DevicePlan:
    """Plan ``device_map="auto"`` for ``source`` under ``max_memory`` on an empty (meta) copy: no
    weights are read and the devices need not exist here (a layout for a cluster, worked out on a
    laptop). Whole decoder blocks are never split. Returns a :class:`DevicePlan`."""
    from accelerate import infer_auto_device_map
    from accelerate.utils import compute_module_sizes

    hf = _empty_model(source)
    dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    hf = hf.to(dtype)
    import logging

    mem = {k: v for k, v in max_memory.items()}
    quiet = logging.getLogger("accelerate.utils.modeling")  # it warns that the planned GPUs are not here
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        dm = infer_auto_device_map(hf, max_memory=mem, dtype=dtype,
                                   no_split_module_classes=list(no_split or hf._no_split_modules or []))
    finally:
        quiet.setLevel(level)
    sizes = compute_module_sizes(hf, dtype=dtype)
    blocks = _layers_of(hf)
    layers: dict[str, list[int]] = {}
    nbytes: dict[str, int] = {}
    for name, dev in dm.items():
        key = f"cuda:{dev}" if isinstance(dev, int) else str(dev)
        nbytes[key] = nbytes.get(key, 0) + int(sizes.get(name, 0))
    for j, b in enumerate(blocks):
        owner = next((dm[k] for k in dm if b == k or b.startswith(k + ".")), None)
        if owner is not None:
            key = f"cuda:{owner}" if isinstance(owner, int) else str(owner)
            layers.setdefault(key, []).append(j)
    return DevicePlan(device_map=dict(dm), layers=layers, weight_bytes=nbytes, total_bytes=int(sizes.get("", 0)))


# ----------------------------------------------------------------------------------------------
# loading and inspecting


def load_model(name_or_path: Any = "organism", *, device_map: Any = "auto", max_memory: Mapping[Any, Any] | None = None,
               offload_folder: str | os.PathLike | None = None, dtype: Any = None, **kw: Any) -> Any:
    """:func:`tvlens.models.load_model` with the layers split over devices by ``device_map``.

    The map and ``max_memory`` are checked first (:func:`check_device_map`; a dict's module
    names against the model's), so a map naming a device that does not exist here fails before
    any weight is read. The returned model remembers how it was loaded, and a
    :class:`~tvlens.runs.executors.RayExecutor` loads its replicas the same way.
    """
    from ..models import load_model as load

    dm, mem = check_device_map(device_map, max_memory, model=name_or_path if not isinstance(device_map, str) else None)
    extra: dict[str, Any] = {}
    if mem is not None:
        extra["max_memory"] = mem
    if offload_folder is not None:
        extra["offload_folder"] = os.fspath(offload_folder)
    elif isinstance(dm, Mapping) and "disk" in dm.values():
        raise ValueError("the device map offloads modules to 'disk' but no offload_folder is given; pass "
                         "offload_folder='path/to/a/folder' for the offloaded weights")
    model = load(name_or_path, device_map=dm, dtype=dtype, **extra, **kw)
    model._tvlens_load = {"name_or_path": os.fspath(name_or_path), "device_map": dm, "dtype": dtype, **extra, **kw}
    return model


def layer_devices(model: Any) -> list[torch.device]:
    """The device each block computes on (its accelerate execution device, else its weights')."""
    out = []
    for block in model.blocks:
        dev = None
        for m in block.modules():
            hook = getattr(m, "_hf_hook", None)
            ex = getattr(hook, "execution_device", None)
            if ex is not None:
                dev = torch.device(ex) if not isinstance(ex, int) else torch.device("cuda", ex)
                break
        if dev is None:
            p = next((p for p in block.parameters() if p.device.type != "meta"), None)
            dev = p.device if p is not None else torch.device("cpu")
        out.append(dev)
    return out
