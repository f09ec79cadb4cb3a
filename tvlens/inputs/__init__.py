"""What a batch is: the inputs the engine runs, and the prompt builders that make them.

:mod:`tvlens.inputs.text` builds in-context-learning prompts from text tasks (Hendel et al. 2023;
Todd et al. 2024).  Canvases (visual ICL) and multimodal prompts (image queries) are further
implementations of the same protocol, :class:`tvlens.inputs.base.Inputs`.
"""
