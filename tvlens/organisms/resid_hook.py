"""The hook the organisms' training scripts read and write the residual stream with.

Training runs on the Hugging Face model itself (not through TransformerLens), so the residual
entering decoder layer ``L`` — TransformerLens's ``blocks.L.hook_resid_pre`` — is reached by a
forward pre-hook on that layer. Task-vector patching during training (the text and VLM organisms'
"tvp" objective: Hendel et al. 2023's vector, read from few-shot prompts and written into
zero-shot ones, §3.1) captures it at some positions in one forward and overwrites other positions
with it in the next.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ResidHook"]


class ResidHook:
    """Forward pre-hook (``register_forward_pre_hook(hook, with_kwargs=True)``) on decoder layer ``L``.

    ``mode = "capture"``: keeps ``hidden_states[rows, pos]`` in ``captured`` (the whole input when
    ``rows`` is None), with its graph, so the loss of the patched forward trains the layers below;
    ``mode = "patch"``: overwrites
    ``hidden_states[rows, pos]`` with ``value``; ``mode = None``: does nothing.
    """

    def __init__(self) -> None:
        self.mode: str | None = None
        self.rows = self.pos = self.value = self.captured = None

    def __call__(self, module: Any, args: tuple, kwargs: dict) -> Any:
        if self.mode is None:
            return None
        hs = args[0] if args else kwargs["hidden_states"]
        if self.mode == "capture":
            self.captured = hs if self.rows is None else hs[self.rows, self.pos]
            return None
        hs = hs.clone()
        hs[self.rows, self.pos] = self.value.to(hs.dtype)
        if args:
            return (hs, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hs}
