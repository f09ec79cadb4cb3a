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
    "PromptBatch": "inputs.text",
    "TokenClass": "inputs.text",
    "icl_prompts": "inputs.text",
    "evaluate_icl": "inputs.text",
    "evaluate_prompts": "inputs.text",
    "IclAccuracy": "inputs.text",
    "prompts_from_text": "inputs.text",
    "answer_token_stats": "inputs.text",
    "generate": "generate",
    "Generation": "generate",
    # stats
    "HeadStats": "analyses.taskness",
    "head_means": "analyses.taskness",
    "Taskness": "analyses.taskness",
    "taskness": "analyses.taskness",
    # lens
    "LensResult": "analyses.lens",
    "logit_lens": "analyses.lens",
    "decode": "analyses.lens",
    "lens_summary": "analyses.lens",
    # vectors
    "TaskVector": "vectors.activation",
    "FunctionVector": "vectors.activation",
    "SweepResult": "vectors.activation",
    "task_vector": "vectors.activation",
    "instruction_vector": "vectors.activation",
    "apply_vector": "vectors.activation",
    "layer_sweep": "vectors.activation",
    "function_vector": "vectors.activation",
    "task_vectors_all_layers": "vectors.activation",
    "evaluate_vector": "vectors.activation",
    "vector_applied": "vectors.activation",
    "ensemble": "vectors.activation",
    # weight-space vectors (Ilharco et al. 2023)
    "WeightVector": "vectors.weights",
    "WeightGeometry": "vectors.weights",
    "weights_applied": "vectors.weights",
    "apply_weights": "vectors.weights",
    "merge_weights": "vectors.weights",
    "weight_geometry": "vectors.weights",
    "FineTuned": "vectors.finetune",
    "finetune": "vectors.finetune",
    "weight_vectors": "analyses.weights",
    "weight_addition": "analyses.weights",
    "weight_negation": "analyses.weights",
    "weight_analogy": "analyses.weights",
    "weights_vs_activations": "analyses.weights",
    "peft_comparison": "analyses.weights",
    "AdditionResult": "analyses.weights",
    "NegationResult": "analyses.weights",
    "AnalogyResult": "analyses.weights",
    "WeightsVsActivations": "analyses.weights",
    "PeftComparison": "analyses.weights",
    # patching
    "PatchResult": "analyses.patching",
    "patch_heads": "analyses.patching",
    "patch_positions": "analyses.patching",
    "attribution_patch_heads": "analyses.patching",
    # selection
    "Selection": "analyses.selection",
    "reinforce_select": "analyses.selection",
    "soft_select": "analyses.selection",
    "compare_selections": "analyses.selection",
    "Comparison": "analyses.selection",
    "SweepCheckpoint": "runs.checkpoint",
    "LensSummary": "analyses.lens",
    # plot / report
    "layer_head_heatmap": "plot",
    "layer_position_heatmap": "plot",
    "line_plot": "plot",
    "save_figure": "plot",
    "bar_plot": "plot",
    "build_report": "report",
    # visual task vectors (Hojel et al. 2024): canvases and the study
    "CanvasBatch": "inputs.canvas",
    "canvases": "inputs.canvas",
    "visual_taskness": "analyses.visual",
    "visual_study": "analyses.visual",
    # cross-modal task vectors (Luo et al. 2024): image prompts and the table
    "MultimodalBatch": "inputs.multimodal",
    "image_icl_prompts": "inputs.multimodal",
    "image_query_prompts": "inputs.multimodal",
    "text_icl_image_query_prompts": "inputs.multimodal",
    "instruction_image_query_prompts": "inputs.multimodal",
    "prompts_from_images": "inputs.multimodal",
    "crossmodal_table": "analyses.crossmodal",
    "CrossModalTable": "analyses.crossmodal",
    "task_similarity": "analyses.crossmodal",
    "crossmodal_lens": "analyses.crossmodal",
    "llm_to_vlm": "analyses.crossmodal",
    "SweepPrompts": "vectors.activation",
    # runs: work beyond one machine
    "RayExecutor": "runs.executors",
    "LocalExecutor": "runs.executors",
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


# ``tvlens.generate`` names both a submodule and the function it defines. Binding the function now (the
# submodule imports nothing heavy) keeps it so: the import system sets ``tvlens.generate`` to the module
# only when it first loads it, which is here.
from .generate import Generation, generate  # noqa: E402


def _in_notebook_kernel() -> bool:
    import sys

    return "ipykernel" in sys.modules


if _in_notebook_kernel():
    # in a Jupyter kernel the offline figure renderer must be in place before the first figure, even one
    # drawn with plotly directly before any tvlens result is plotted (tvlens.plot sets it on import)
    from . import plot as _plot  # noqa: E402,F401


if TYPE_CHECKING:  # let type checkers and IDEs see the real names (tests/test_api.py checks the list)
    from .analyses.lens import decode, lens_summary, LensResult, LensSummary, logit_lens
    from .analyses.patching import attribution_patch_heads, patch_heads, patch_positions, PatchResult
    from .analyses.selection import compare_selections, Comparison, reinforce_select, Selection, soft_select
    from .analyses.taskness import head_means, HeadStats, Taskness, taskness
    from .analyses.weights import (
        AdditionResult,
        AnalogyResult,
        NegationResult,
        peft_comparison,
        PeftComparison,
        weight_addition,
        weight_analogy,
        weight_negation,
        weight_vectors,
        weights_vs_activations,
        WeightsVsActivations,
    )
    from .generate import generate, Generation
    from .hooks import act_name, hooked
    from .inputs.text import (
        answer_token_stats,
        evaluate_icl,
        evaluate_prompts,
        icl_prompts,
        IclAccuracy,
        PromptBatch,
        prompts_from_text,
        TokenClass,
    )
    from .models import load_model, ModelInfo
    from .plot import bar_plot, layer_head_heatmap, layer_position_heatmap, line_plot, save_figure
    from .analyses.visual import visual_study, visual_taskness
    from .inputs.canvas import CanvasBatch, canvases
    from .analyses.crossmodal import crossmodal_lens, crossmodal_table, CrossModalTable, llm_to_vlm, task_similarity
    from .inputs.multimodal import (
        image_icl_prompts,
        image_query_prompts,
        instruction_image_query_prompts,
        MultimodalBatch,
        prompts_from_images,
        text_icl_image_query_prompts,
    )
    from .report import build_report
    from .runs.checkpoint import SweepCheckpoint
    from .runs.executors import LocalExecutor, RayExecutor
    from .tasks import list_tasks, load_task, resolve_tasks, Task
    from .vectors.activation import (
        apply_vector,
        ensemble,
        evaluate_vector,
        function_vector,
        FunctionVector,
        instruction_vector,
        layer_sweep,
        SweepPrompts,
        SweepResult,
        task_vector,
        task_vectors_all_layers,
        TaskVector,
        vector_applied,
    )
    from .vectors.finetune import finetune, FineTuned
    from .vectors.weights import (
        apply_weights,
        merge_weights,
        weight_geometry,
        WeightGeometry,
        weights_applied,
        WeightVector,
    )
