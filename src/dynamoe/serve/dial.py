"""OpenAI's `reasoning_effort` as settings of the compute dial, relative to the model's trained routing.

An effort scales each MoE layer's trained threshold t, so that it means the same on any dialable
model (one threshold for every layer, or per-layer thresholds calibrated by `dynamoe retrofit`):

    minimal  0.3 t           (about k_min experts on most tokens)
    low      0.6 t
    medium   t               (as trained)
    high     t + (1 - t) / 2 (halfway from the trained threshold to 1, where k_max experts run)

For a model trained at threshold 0.5: 0.15, 0.3, 0.5 and 0.75.
"""

from __future__ import annotations

from typing import Literal, Sequence

from dynamoe.model import Dial

ReasoningEffort = Literal["minimal", "low", "medium", "high"]
EFFORT_SCALES = {"minimal": 0.3, "low": 0.6}  # of the trained threshold; medium and high are defined below


def effort_dial(effort: ReasoningEffort, trained: Sequence[float]) -> Dial:
    """The per-layer thresholds of a reasoning effort on a model with these trained thresholds (None: as trained)."""
    if effort == "medium":
        return None
    if effort == "high":
        return [t + (1 - t) / 2 for t in trained]
    return [t * EFFORT_SCALES[effort] for t in trained]
