"""The public vocabulary: one word and one default for each parameter the analyses share.

Every public function that takes one of these parameters takes it under this name with this
default (``tests/test_api.py`` walks the exports to hold that), so a call written for one
analysis reads the same for the next:

- ``positions`` / ``position``: :data:`FINAL`, the last position of every prompt: a text ICL
  prompt's final separator (Hendel et al. 2023, §2; Todd et al. 2024, §2), a canvas's query cell, a
  VLM prompt's last token. :data:`FINAL_POSITION` lists the words accepted for it.
- ``n_prompts``: :data:`N_PROMPTS` prompts an estimate averages over (a mean activation, a task
  vector, an accuracy). Pass Todd et al.'s 100 or Hojel et al.'s own counts to reproduce a paper.
- ``batch_size``: :data:`BATCH_SIZE` (``None``): the engine's plan sizes every forward
  (:data:`tvlens.engine.plan.DEFAULT_BATCH` prompts at most, within the one memory budget); an
  int caps the prompts per forward. Results do not depend on it beyond float rounding.
- ``progress``: :data:`PROGRESS`, a tqdm bar on every loop that takes a while.

Where a parameter of the same name means something else (a training minibatch, the prompts one
optimisation step draws), its function says so and the test lists it with that reason.
"""

from __future__ import annotations

from typing import Any

__all__ = ["FINAL", "FINAL_POSITION", "N_PROMPTS", "BATCH_SIZE", "PROGRESS", "final_alias"]

#: the last position of every prompt
FINAL = "final"
#: the words accepted for :data:`FINAL` (a text prompt's last token is its final separator)
FINAL_POSITION = (FINAL, "separator", "last")
#: prompts an estimate averages over
N_PROMPTS = 50
#: prompts per forward: ``None`` lets the engine's plan decide
BATCH_SIZE: int | None = None
#: show progress bars
PROGRESS = True


def final_alias(positions: Any) -> Any:
    """:data:`FINAL` for any word of :data:`FINAL_POSITION` (any case); anything else unchanged."""
    if isinstance(positions, str) and positions.lower() in FINAL_POSITION:
        return FINAL
    return positions
