"""The score registry: each score registers its ``ScoreSpec`` here; ``score_model`` runs them."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import lightning as L
import torch.nn as nn


@dataclass(frozen=True)
class ScoreSpec:
    """One registered score.

    ``compute(net, datamodule, max_images=..., progress=...)`` returns ``{measure: value}``;
    ``unavailable(net, datamodule)`` returns None when the score applies, else the reason it does not
    (e.g. "the data has no part masks"), which the report prints instead of a number.
    ``higher_is_better`` is None for a descriptive score (what a model relies on, neither good nor bad).
    """

    compute: Callable[..., dict[str, float]]
    unavailable: Callable[[nn.Module, L.LightningDataModule], str | None]
    higher_is_better: bool | None = True
    description: str = ""


SCORES: dict[str, ScoreSpec] = {}


def register(name: str, spec: ScoreSpec) -> None:
    """Add a score under ``name`` (a name is registered once)."""
    if name in SCORES:
        raise ValueError(f"score {name!r} is registered twice")
    SCORES[name] = spec


def score_model(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    names: Sequence[str] | None = None,
    max_images: int = 200,
    progress: bool = True,
) -> dict[str, float]:
    """Run the scores that apply to ``net`` on ``datamodule`` (or exactly ``names``) and merge their
    measures as ``{"<score>/<measure>": value}``. A named score that does not apply is an error; an
    unnamed one is left out."""
    unknown = sorted(set(names or ()) - set(SCORES))
    if unknown:
        raise ValueError(f"unknown score(s) {unknown}; the scores are {sorted(SCORES)}")
    results: dict[str, float] = {}
    for name in names or sorted(SCORES):
        spec = SCORES[name]
        reason = spec.unavailable(net, datamodule)
        if reason is not None:
            if names:
                raise ValueError(f"score {name!r} does not apply here: {reason}")
            continue
        measures = spec.compute(net, datamodule, max_images=max_images, progress=progress)
        results.update({f"{name}/{measure}": float(value) for measure, value in measures.items()})
    return results
