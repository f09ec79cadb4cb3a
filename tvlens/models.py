"""Loading models through the TransformerLens 4 bridge, and reading what they are.

Every model tvlens analyses — the shipped model organisms, a local Hugging Face checkpoint,
or a hub name such as ``gpt2`` — is loaded by one path::

    TransformerBridge.boot_transformers(name_or_dir) -> enable_compatibility_mode(no_processing=True)

Compatibility mode exposes the HookedTransformer hook names (``blocks.{l}.attn.hook_z`` ...),
which are the only contract the rest of tvlens relies on (see :func:`check_hook_contract`).

**No weight processing.** We call ``enable_compatibility_mode(no_processing=True)``: the
logits are then identical to the raw ``transformers`` model (tested to 1e-5), and the
residual stream ``blocks.{l}.hook_resid_pre`` is the model's own residual stream — layer norms
are *not* folded into the following weights and the unembedding is *not* centred. Code that
decodes a residual (the logit lens) therefore applies the model's own final norm by hand.
The default processing would shift every logit by a per-position constant (≈0.02 measured on a
tiny GPT-2), which breaks exact comparisons with the original model for no analytic gain here.

Any model offering the same hook contract works with every tvlens function, including one the
user loaded themselves (a TL 4 bridge in compatibility mode, or a TL 3 ``HookedTransformer``); a
bridge *without* compatibility mode is refused by :meth:`ModelInfo.of` with the call that fixes it.

**Names.** Besides hub names and local folders, ``load_model`` takes TransformerLens's official
aliases (``gpt2-small``, ``pythia-70m``, ...), resolved through TransformerLens's own table
(``transformer_lens.supported_models``) to the hub name they stand for.

**Nothing is installed.** When the bridge cannot load a model's processor it runs
``pip install torchvision`` (``_ensure_torchvision`` in TransformerLens's transformers source),
which can replace the installed torch. ``load_model`` blocks every install attempt for the duration
of the load — that helper and any ``pip`` / ``uv`` / ``conda`` subprocess — and raises an error that
names what is missing instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import subprocess
import weakref
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator

import torch

__all__ = ["ModelInfo", "load_model", "model_id", "organism_path", "check_hook_contract", "resolve_alias",
           "require_compatible", "InstallBlocked", "ORGANISMS"]

from .organisms import REGISTRY as _ORGANISM_REGISTRY
from .organisms import organism_path

#: Names of the model organisms shipped inside the package (see :mod:`tvlens.organisms`).
ORGANISMS = tuple(_ORGANISM_REGISTRY)

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float64": torch.float64,
    "fp64": torch.float64,
}


@dataclass(frozen=True)
class ModelInfo:
    """What tvlens needs to know about a model, read once from its config.

    Use :meth:`ModelInfo.of` rather than digging in ``model.cfg``: it works for a TL 4
    ``TransformerBridge`` and a TL 3 ``HookedTransformer`` alike.
    """

    name: str
    n_layers: int
    n_heads: int
    n_kv_heads: int
    d_model: int
    d_head: int
    d_vocab: int
    n_ctx: int
    normalization: str
    positional: str
    #: Hash of the architecture config *and* a sample of the weights: two models with the same
    #: shape but different weights (``organism`` vs ``organism-natural``) differ here.
    config_hash: str

    @classmethod
    def of(cls, model: Any) -> "ModelInfo":
        """Read the info of ``model`` (cached per model object)."""
        try:
            return _INFO_CACHE[model]
        except (KeyError, TypeError):
            pass
        cfg = getattr(model, "cfg", None)
        if cfg is None:
            raise TypeError(
                f"expected a TransformerLens model (TransformerBridge or HookedTransformer), got {type(model).__name__}; "
                "load one with tvlens.load_model(name_or_path)"
            )
        require_compatible(model)
        n_heads = int(cfg.n_heads)
        n_kv = getattr(cfg, "n_key_value_heads", None) or n_heads
        fields = dict(
            name=str(getattr(cfg, "model_name", "") or "unknown"),
            n_layers=int(cfg.n_layers),
            n_heads=n_heads,
            n_kv_heads=int(n_kv),
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
            normalization=str(getattr(cfg, "normalization_type", None) or "none"),
            positional=str(getattr(cfg, "positional_embedding_type", None) or "unknown"),
        )
        info = cls(**fields, config_hash=_fingerprint(model, fields))
        try:
            _INFO_CACHE[model] = info
        except TypeError:
            pass
        return info

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


_INFO_CACHE: "weakref.WeakKeyDictionary[Any, ModelInfo]" = weakref.WeakKeyDictionary()


def require_compatible(model: Any) -> None:
    """Refuse a TransformerLens 4 bridge booted without ``enable_compatibility_mode``.

    Such a bridge runs, and even answers to some HookedTransformer hook names, but tvlens's hook
    contract and its exactness checks assume compatibility mode without weight processing.
    """
    if getattr(model, "compatibility_mode", None) is False:
        name = getattr(getattr(model, "cfg", None), "model_name", "?")
        raise ValueError(
            f"this TransformerBridge ({name!r}) was loaded without compatibility mode, so its hook points are not the "
            "HookedTransformer ones tvlens reads (blocks.{l}.attn.hook_z, ...); call "
            "model.enable_compatibility_mode(no_processing=True) first, or load it with tvlens.load_model(name)"
        )


def _fingerprint(model: Any, fields: dict[str, Any]) -> str:
    """A short hash of the architecture plus a few weight values.

    The config alone cannot tell two trainings of one architecture apart; hashing every weight
    would cost seconds on a large model. A strided sample of the unembedding does the job.
    """
    h = hashlib.sha256(json.dumps({k: v for k, v in fields.items() if k != "name"}, sort_keys=True).encode())
    try:
        w_u = model.W_U.detach()
        sample = w_u.reshape(-1)[:: max(1, w_u.numel() // 4096)][:4096].to("cpu", torch.float32)
        h.update(sample.numpy().tobytes())
    except Exception:  # a model without W_U: architecture hash only
        pass
    return h.hexdigest()[:16]


def model_id(model: Any) -> dict[str, str]:
    """The identity stored with every saved tvlens file, checked when a file is loaded."""
    info = ModelInfo.of(model)
    return {"model": info.name, "config_hash": info.config_hash}


def _resolve_dtype(dtype: Any) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"unsupported dtype {dtype}: models run in a floating-point dtype; use torch.float32, torch.bfloat16 or torch.float16")
        return dtype
    if isinstance(dtype, str) and dtype.lower().replace("torch.", "") in _DTYPES:
        return _DTYPES[dtype.lower().replace("torch.", "")]
    raise ValueError(f"unsupported dtype {dtype!r}: use one of {', '.join(sorted(_DTYPES))} or a torch floating dtype")


def _resolve_device(device: Any) -> str:
    if device is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    device = str(device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} requested but CUDA is not available here; use device='cpu'")
    return device


#: A hub repository id: ``name`` or ``owner/name``.
_HUB_NAME = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _looks_like_path(name: str) -> bool:
    return name.startswith((".", "/", "~")) or name.endswith((".json", ".safetensors", ".bin", ".pt"))


def _hub_reachable(timeout: float = 2.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("", "0", "false", "False") or os.environ.get("TRANSFORMERS_OFFLINE", "0") not in ("", "0"):
        return False
    endpoint = os.environ.get("HF_ENDPOINT", "https://huggingface.co")
    host = endpoint.split("://", 1)[-1].split("/", 1)[0].split(":")[0]
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _in_hf_cache(name: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(name, "config.json"), str)
    except Exception:
        return False


def _resolve_source(name_or_path: str | os.PathLike) -> tuple[str, bool]:
    """Return (what to pass to boot_transformers, is_local). Raises before any loading work."""
    if isinstance(name_or_path, os.PathLike):
        name_or_path = os.fspath(name_or_path)
    if not isinstance(name_or_path, str) or not name_or_path:
        raise TypeError(f"model must be a name or a path string, got {name_or_path!r}; e.g. tvlens.load_model('organism')")
    if name_or_path in ORGANISMS:
        path = organism_path(name_or_path)
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"the {name_or_path!r} checkpoint is not shipped in this installation ({path} has no config.json); "
                f"train it with `python -m tvlens.organisms.{_ORGANISM_REGISTRY[name_or_path].split('/')[0]}.train --out {path}` "
                "or reinstall tvlens"
            )
        return str(path), True
    path = Path(name_or_path).expanduser()
    if path.exists():
        if path.is_file():
            raise ValueError(
                f"{name_or_path!r} is a file; load_model needs a checkpoint directory (with config.json and weights), "
                f"e.g. load_model({str(path.parent)!r})"
            )
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"{name_or_path!r} is a directory without config.json, so it is not a Hugging Face checkpoint; "
                "save one with model.save_pretrained(dir) and tokenizer.save_pretrained(dir), or pass 'organism'"
            )
        return str(path), True
    if _looks_like_path(name_or_path) or not _HUB_NAME.fullmatch(name_or_path):
        raise FileNotFoundError(
            f"no checkpoint directory at {name_or_path!r}; pass an existing directory, a hub name such as 'gpt2', or 'organism'"
        )
    hub = resolve_alias(name_or_path)
    alias = f" (TransformerLens's alias of the hub model {hub!r})" if hub != name_or_path else ""
    if not _in_hf_cache(hub) and not _hub_reachable():
        raise ValueError(
            f"cannot load {name_or_path!r}{alias}: it is not a local directory, not in the Hugging Face cache, and the hub "
            "is not reachable (no network, or HF_HUB_OFFLINE is set); pass a local checkpoint directory, or use the "
            "shipped model organism with load_model('organism')"
        )
    return hub, False


def resolve_alias(name: str) -> str:
    """The hub name a TransformerLens alias stands for (``"gpt2-small"`` -> ``"gpt2"``,
    ``"pythia-70m"`` -> ``"EleutherAI/pythia-70m"``), from TransformerLens's own table; other names unchanged."""
    try:
        from transformer_lens.supported_models import get_official_model_name
    except ImportError:  # an older TransformerLens without the table: nothing to resolve
        return name
    try:
        return get_official_model_name(name)
    except Exception:  # not an alias: a hub name or a user's own repository
        return name


class InstallBlocked(RuntimeError):
    """Loading a model tried to install a package; tvlens blocked it (nothing was installed)."""


_INSTALLERS = ("pip", "pip3", "uv", "conda", "mamba", "micromamba", "ensurepip", "easy_install")


def _is_install(args: Any) -> bool:
    words = args.split() if isinstance(args, (str, bytes)) else [str(a) for a in (args if isinstance(args, (list, tuple)) else [args])]
    words = [os.path.basename(w.decode() if isinstance(w, bytes) else w) for w in words]
    return any(w in _INSTALLERS or w.startswith(("pip3.", "python -m pip")) for w in words) and (
        "install" in words or "ensurepip" in words)


@contextmanager
def _no_installs(attempts: list[str]) -> Iterator[None]:
    """For the duration of the block, every attempt to install a package fails and is recorded.

    TransformerLens's ``_ensure_torchvision`` (which runs ``pip install torchvision`` when a
    processor does not load) is replaced by one that records ``torchvision`` and reports it
    unavailable; any subprocess or ``os.system`` call running an installer raises
    :class:`InstallBlocked` before it starts.
    """
    real_popen, real_system = subprocess.Popen, os.system

    class _GuardedPopen(real_popen):  # type: ignore[misc, valid-type]
        def __init__(self, args: Any, *a: Any, **kw: Any) -> None:
            if _is_install(args):
                attempts.append(" ".join(map(str, args)) if isinstance(args, (list, tuple)) else str(args))
                raise InstallBlocked(f"tvlens blocked a package install while loading a model: {attempts[-1]}")
            super().__init__(args, *a, **kw)

    def guarded_system(command: Any) -> int:
        if _is_install(command):
            attempts.append(str(command))
            raise InstallBlocked(f"tvlens blocked a package install while loading a model: {command}")
        return real_system(command)

    def no_torchvision() -> bool:
        try:
            import torchvision  # noqa: F401

            return True
        except Exception:
            attempts.append("pip install torchvision")
            return False

    helpers = None
    try:
        from transformer_lens.model_bridge.sources.transformers import helpers
    except ImportError:  # another TransformerLens layout: the subprocess guard still holds
        pass
    saved = getattr(helpers, "_ensure_torchvision", None) if helpers is not None else None
    subprocess.Popen = _GuardedPopen  # type: ignore[misc]
    os.system = guarded_system
    if saved is not None:
        helpers._ensure_torchvision = no_torchvision
    try:
        yield
    finally:
        subprocess.Popen = real_popen  # type: ignore[misc]
        os.system = real_system
        if saved is not None:
            helpers._ensure_torchvision = saved


def load_model(
    name_or_path: str | os.PathLike = "organism",
    *,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    device_map: str | dict | None = None,
    n_devices: int | None = None,
    check: bool = True,
    require_processor: bool = True,
    **boot_kwargs: Any,
):
    """Load a model through the TransformerLens 4 bridge, ready for tvlens.

    Args:
        name_or_path: ``"organism"`` (default) or ``"organism-natural"`` — the model organisms
            shipped in the package —, a local Hugging Face checkpoint directory, or a hub name
            (``"gpt2"``, ``"EleutherAI/pythia-70m"``, ...) when online.
        device: defaults to CUDA when available, else CPU.
        dtype: ``torch.float32`` (default), ``"bfloat16"``, ``"float16"``, ...
        device_map, n_devices: passed to the bridge for models larger than one device.
        check: verify the hook contract tvlens relies on (:func:`check_hook_contract`).
        require_processor: for a multimodal model, refuse to return it when its processor did not
            load (the error names what is missing); ``False`` returns it without one (text only).
            Nothing is ever installed (see the module docstring).

    Returns:
        A ``TransformerBridge`` in compatibility mode (``no_processing=True``), in eval mode,
        with gradients off on every weight.
    """
    torch_dtype = _resolve_dtype(dtype)
    source, _ = _resolve_source(name_or_path)
    if _ORGANISM_REGISTRY.get(str(name_or_path), "").startswith("vlm/") or "TinyLlavaProcessor" in _processor_class(source):
        from .organisms import vlm  # noqa: F401  registers organism-vlm's PIL-free processor before the bridge looks for it
    dev = _resolve_device(device) if device_map is None else None

    import logging

    from transformer_lens.model_bridge import TransformerBridge

    attempts: list[str] = []
    kwargs: dict[str, Any] = dict(dtype=torch_dtype, **boot_kwargs)
    if dev is not None:
        kwargs["device"] = dev
    if device_map is not None:
        kwargs["device_map"] = device_map
    if n_devices is not None:
        kwargs["n_devices"] = n_devices
    # transformers logs progress bars and advice on every load; keep a notebook clean.
    previous = os.environ.get("HF_HUB_DISABLE_PROGRESS_BARS")
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    tf_logger = logging.getLogger("transformers")
    level = tf_logger.level
    tf_logger.setLevel(logging.ERROR)
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        with _no_installs(attempts):
            model = TransformerBridge.boot_transformers(source, **kwargs)
    except InstallBlocked as err:
        raise _missing_package_error(name_or_path, source, attempts) from err
    except OSError as err:
        raise ValueError(f"could not load {name_or_path!r}: {err}. Pass a local checkpoint directory or 'organism'") from err
    finally:
        tf_logger.setLevel(level)
        if previous is None:
            os.environ.pop("HF_HUB_DISABLE_PROGRESS_BARS", None)
        else:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = previous
        try:
            hf_logging.enable_progress_bar()
        except Exception:
            pass
    if attempts and (require_processor or any("torchvision" not in a for a in attempts)):
        raise _missing_package_error(name_or_path, source, attempts)
    model.enable_compatibility_mode(no_processing=True)
    if str(name_or_path) in ORGANISMS:
        model.cfg.model_name = str(name_or_path)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    if check:
        check_hook_contract(model)
    return model


def _processor_class(source: str) -> str:
    """The processor class a local checkpoint names in ``processor_config.json`` ("" when none)."""
    try:
        return str(json.loads((Path(source) / "processor_config.json").read_text()).get("processor_class", ""))
    except (OSError, ValueError):
        return ""


def _missing_package_error(name: Any, source: str, attempts: list[str]) -> ImportError:
    """What the load needed, why nothing was installed, and how to go on."""
    import importlib.util

    why = ""
    try:  # the processor's own error, which the bridge swallows
        import transformers

        transformers.AutoProcessor.from_pretrained(source)
    except Exception as err:  # the reason is the message
        why = f" (AutoProcessor.from_pretrained failed: {type(err).__name__}: {' '.join(str(err).split())[:300]})"
    missing = [m for m in ("torchvision", "PIL") if importlib.util.find_spec(m) is None]
    tried = "; ".join(dict.fromkeys(attempts))
    return ImportError(
        f"loading {str(name)!r}: its processor did not load{why}, and TransformerLens then tried to install packages "
        f"({tried}); tvlens blocks every install, so nothing in this environment was changed. Missing here: "
        f"{', '.join(missing) or 'nothing tvlens can name'}. Fix: install them yourself with builds that match the "
        f"installed torch {torch.__version__} (e.g. the torchvision release made for it, from the same index as "
        "torch), or save the processor files with the checkpoint; or pass require_processor=False to use the "
        "model without a processor (text inputs only)"
    )


def check_hook_contract(model: Any) -> None:
    """Raise a clear error if ``model`` lacks a hook point tvlens relies on, or has it in an unexpected shape.

    Runs one forward on a 3-token input and checks, for every layer,
    ``hook_resid_pre/mid/post`` ``[batch, pos, d_model]``, ``attn.hook_z`` ``[batch, pos, head, d_head]``,
    ``hook_attn_out`` / ``hook_mlp_out`` ``[batch, pos, d_model]``, ``attn.hook_pattern``
    ``[batch, head, pos, pos]``, and ``ln_final.hook_normalized``.
    """
    from .hooks import act_name, device_of, hooked

    info = ModelInfo.of(model)
    expected: dict[str, tuple[int, ...]] = {}
    b, p = 1, 3
    for layer in range(info.n_layers):
        for kind in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out"):
            expected[act_name(kind, layer)] = (b, p, info.d_model)
        expected[act_name("z", layer)] = (b, p, info.n_heads, info.d_head)
        expected[act_name("pattern", layer)] = (b, info.n_heads, p, p)
    expected["ln_final.hook_normalized"] = (b, p, info.d_model)
    available = set(model.hook_dict)
    missing = [name for name in expected if name not in available]
    if missing:
        raise ValueError(
            f"model {info.name!r} does not offer the hook points tvlens needs (missing: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}); load it with tvlens.load_model, or call "
            "model.enable_compatibility_mode() on a TransformerBridge"
        )
    seen: dict[str, tuple[int, ...]] = {}

    def recorder(name: str):
        # hook.name is the bridge's canonical name (an alias may differ), so key by the name asked for.
        def record(act: torch.Tensor, hook: Any) -> None:
            seen[name] = tuple(act.shape)

        return record

    tokens = torch.zeros((b, p), dtype=torch.long, device=device_of(model))
    with torch.no_grad(), hooked(model, [(name, recorder(name)) for name in expected]):
        model(tokens)
    for name, shape in expected.items():
        got = seen.get(name)
        if got != shape:
            raise ValueError(
                f"hook {name} of model {info.name!r} has shape {got} where tvlens expects {shape}; "
                "this architecture is not supported by the compatibility-mode hook contract"
            )
