"""The analyses: thin callers of :mod:`tvlens.engine`, one concept per module.

* :mod:`~tvlens.analyses.taskness` — per-head mean activations and ρ_token (Hojel et al. 2024, §3)
* :mod:`~tvlens.analyses.lens` — the logit lens at the separator (Luo, Darrell & Bar 2024, §4)
* :mod:`~tvlens.analyses.patching` — activation-patching sweeps over heads and positions
* :mod:`~tvlens.analyses.selection` — head selection by REINFORCE and soft weights (Hojel et al. 2024, §3.2)
"""
