"""Interpretability scores: explanations measured, not only drawn.

Each score is registered in :data:`SCORES` under its name with the check of whether it applies to a model
and its data; :func:`score_model` runs every score that applies (or the ones named) and returns one flat
``{"<score>/<measure>": value}`` dictionary, the form the HTML report and ``benchmarks/explain.py`` read.
"""

from __future__ import annotations

from explain.scores import because, consistency, deletion, parts, pointing, sparsity  # noqa: F401  (register)
from explain.scores.parts import (
    PartScore,
    box_fractions,
    box_part_score,
    defining_masks,
    framing_boxes,
    prototype_part_score,
)
from explain.scores.registry import SCORES, ScoreSpec, register, score_model

__all__ = [
    "SCORES",
    "PartScore",
    "ScoreSpec",
    "box_fractions",
    "box_part_score",
    "defining_masks",
    "framing_boxes",
    "prototype_part_score",
    "register",
    "score_model",
]
