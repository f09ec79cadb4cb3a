"""tvlens: find, measure and use task vectors in TransformerLens models.

The short public API, one concept per module (see DESIGN in the repository)::

    import tvlens
    model = tvlens.load_model()                      # the shipped model organism
    tasks = tvlens.resolve_tasks("family:knowledge")
    rho = tvlens.taskness(model, tasks)              # Hojel et al. 2024, rho_token per head
    rho.plot()

Names are imported lazily so ``import tvlens`` stays fast and a notebook only pays for what it uses.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

#: public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # models / hooks
    "load_model": "models",
    "ModelInfo": "models",
    "hooked": "hooks",
    "act_name": "hooks",
    # tasks / prompts
    "Task": "tasks",
    "list_tasks": "tasks",
    "load_task": "tasks",
    "resolve_tasks": "tasks",
    "PromptBatch": "prompts",
    "TokenClass": "prompts",
    "icl_prompts": "prompts",
    "evaluate_icl": "prompts",
    "evaluate_prompts": "prompts",
    "IclAccuracy": "prompts",
    # stats
    "HeadStats": "stats",
    "head_means": "stats",
    "Taskness": "stats",
    "taskness": "stats",
    # lens
    "LensResult": "lens",
    "logit_lens": "lens",
    "decode": "lens",
    "lens_summary": "lens",
    # vectors
    "TaskVector": "vectors",
    "FunctionVector": "vectors",
    "SweepResult": "vectors",
    "task_vector": "vectors",
    "instruction_vector": "vectors",
    "apply_vector": "vectors",
    "layer_sweep": "vectors",
    "function_vector": "vectors",
    "task_vectors_all_layers": "vectors",
    "evaluate_vector": "vectors",
    "vector_applied": "vectors",
    "ensemble": "vectors",
    # patching
    "PatchResult": "patching",
    "patch_heads": "patching",
    "patch_positions": "patching",
    "attribution_patch_heads": "patching",
    # selection
    "Selection": "selection",
    "reinforce_select": "selection",
    "soft_select": "selection",
    "compare_selections": "selection",
    "Comparison": "selection",
    "SweepCheckpoint": "checkpoint",
    "LensSummary": "lens",
    # plot / report
    "layer_head_heatmap": "plot",
    "layer_position_heatmap": "plot",
    "line_plot": "plot",
    "save_figure": "plot",
    "bar_plot": "plot",
    "build_report": "report",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'tvlens' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # let type checkers and IDEs see the real names
    from .hooks import act_name, hooked
    from .models import ModelInfo, load_model
