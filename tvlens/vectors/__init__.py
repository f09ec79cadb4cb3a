"""Task vectors: activation vectors (task, function, instruction) and their sweeps.

* :mod:`~tvlens.vectors.activation` — Hendel et al. 2023 task vectors, Todd et al. 2024 function
  vectors, instruction vectors, arithmetic, layer sweeps.
"""
