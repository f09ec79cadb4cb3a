"""The analyses: thin callers of :mod:`tvlens.engine`, one concept per module.

* :mod:`~tvlens.analyses.taskness` — per-head mean activations and ρ_token (Hojel et al. 2024, §3)
* :mod:`~tvlens.analyses.lens` — the logit lens at the separator (Luo, Darrell & Bar 2024, §4)
* :mod:`~tvlens.analyses.patching` — activation-patching sweeps over heads and positions
* :mod:`~tvlens.analyses.selection` — head selection by REINFORCE and soft weights (Hojel et al. 2024, §3.2)
* :mod:`~tvlens.analyses.visual` — visual task vectors on canvases: ρ over heads × positions, (head,
  position) masks and their selection (Hojel et al. 2024)
* :mod:`~tvlens.analyses.crossmodal` — text-ICL vectors patched into image queries (Luo et al. 2024)
* :mod:`~tvlens.analyses.weights` — weight-space task-vector experiments (Ilharco et al. 2023)
"""
