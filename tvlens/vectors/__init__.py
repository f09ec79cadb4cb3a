"""Task vectors in both spaces, side by side on the same model and tasks.

* :mod:`~tvlens.vectors.activation` — activation vectors: Hendel et al. 2023 task vectors, Todd et
  al. 2024 function vectors, Luo et al. 2024 instruction vectors, arithmetic, layer sweeps.
* :mod:`~tvlens.vectors.weights` — weight-space task vectors τ = θ_ft − θ_base (Ilharco et al. 2023):
  arithmetic, geometry, bit-exact application, TIES / DARE merging.
* :mod:`~tvlens.vectors.finetune` — the fine-tunes they come from (full or LoRA through peft).
"""
