"""The engine: the one place tvlens runs forwards with hooks for speed.

Analyses say *what* to read or change; the engine decides *how* to run it exactly and fast:

* :mod:`~tvlens.engine.batch` — the inputs protocol: what a batch must offer (tokens, mask,
  answers, extra model inputs such as ``pixel_values``), checked once before any forward;
* :mod:`~tvlens.engine.plan` — the batching plan: one memory budget per device, length buckets,
  left padding;
* :mod:`~tvlens.engine.sites` — intervention sites as data (:class:`Edit`: hook, layer, units,
  positions, columns);
* :mod:`~tvlens.engine.readout` — the read-out path (final-position residuals and logits, packed
  shared-prefix pairs, whole activations);
* :mod:`~tvlens.engine.runner` — the intervention path (:class:`PatchRunner`): one cached target
  run, then last-token recompute, suffix recompute, or whole forwards with columns along the batch
  axis, chosen by what the model supports;
* :mod:`~tvlens.engine.capabilities` — the one cache of per-model capability checks;
* :mod:`~tvlens.engine.kv` — the hand-off of cached keys / values to the bridge's attention;
* :mod:`~tvlens.engine.attention` — read-outs that read nothing inside attention run it as the
  wrapped Hugging Face module computes it (checked against the bridge's own once per model).

Metrics live in :mod:`tvlens.metrics`, hooks and hook names in :mod:`tvlens.hooks`.
"""

from .batch import EngineBatch, Inputs, as_batch
from .runner import PatchRunner, final_position_logits
from .sites import Edit, add_resid, blend_heads, replace_heads, replace_resid

__all__ = ["Inputs", "EngineBatch", "as_batch", "PatchRunner", "final_position_logits", "Edit", "replace_resid",
           "add_resid", "replace_heads", "blend_heads"]
