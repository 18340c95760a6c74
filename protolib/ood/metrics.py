"""OOD-detection metrics, *higher score = more in-distribution*, computed as OpenOOD v1.5 computes them.

Every value is a fraction in [0, 1]. Tied scores are never broken at random: a group of equal scores is
accepted or rejected together (the curves step diagonally across a tie, as scikit-learn's do), so constant
scores give AUROC 0.5 and both FPR@95 values 1.0.

Two FPR@95 conventions are in use and tables must say which one they report:

- ``fpr95`` (classic; KNN, Energy and PALM papers): ID is the positive class; the fraction of OOD samples
  *accepted* at the highest threshold that still accepts at least 95% of ID samples.
- ``fpr95_ood_positive`` (OpenOOD v1.5, ``openood/evaluators/metrics.py``): OOD is the positive class; the
  fraction of ID samples *rejected* at the highest OOD-score threshold catching at least 95% of OOD samples.
  OpenOOD reads it off scikit-learn's ``roc_curve``, which drops operating points lying on a straight line
  between their neighbours; with tied scores that can move the reported point to the end of a run of tie
  groups of equal slope. That is reproduced so the numbers match OpenOOD's; without ties it changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

RECALL_LEVEL = 0.95
METRIC_NAMES = ("auroc", "aupr_in", "aupr_out", "fpr95", "fpr95_ood_positive")
FPR95_CONVENTION = "% of OOD accepted when 95% of ID is accepted (ID positive; KNN/Energy/PALM papers)"
FPR95_OOD_POSITIVE_CONVENTION = (
    "% of ID rejected when 95% of OOD is caught (OOD positive; OpenOOD v1.5 tables)"
)

ScoreLike = np.ndarray | torch.Tensor | Sequence[float]


class Curve(NamedTuple):
    """Operating points of a ranking, one per distinct threshold, from the strictest to the loosest.

    ``tps``/``fps`` count positives/negatives scoring >= ``thresholds`` (descending); ``num_pos``/``num_neg``
    are the class sizes.
    """

    tps: np.ndarray  # (T,)
    fps: np.ndarray  # (T,)
    thresholds: np.ndarray  # (T,)
    num_pos: int
    num_neg: int


def as_scores(scores: ScoreLike, name: str) -> np.ndarray:
    """Validate one score vector: 1-D, non-empty, finite; returned as float64 numpy."""
    if isinstance(scores, torch.Tensor):
        scores = scores.detach().to("cpu", torch.float64).numpy()
    array = np.asarray(scores, dtype=np.float64)
    if array.ndim != 1:
        array = array.reshape(-1) if array.ndim == 2 and 1 in array.shape else array
    if array.ndim != 1:
        raise ValueError(f"{name} must be a 1-D vector of scores, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} is empty: OOD metrics need at least one ID and one OOD score")
    bad = ~np.isfinite(array)
    if bad.any():
        raise ValueError(
            f"{name} has {int(np.isnan(array).sum())} NaN and {int(np.isinf(array).sum())} infinite values "
            f"(first at position {int(np.flatnonzero(bad)[0])}); the postprocessor or the features produced "
            "them: check the model's outputs and the postprocessor's fitted statistics"
        )
    return array


def binary_curve(positive: np.ndarray, negative: np.ndarray) -> Curve:
    """Cumulative positives/negatives above each distinct threshold (higher score = predicted positive)."""
    scores = np.concatenate([positive, negative])
    is_pos = np.concatenate([np.ones(positive.size, dtype=np.int64), np.zeros(negative.size, dtype=np.int64)])
    order = np.argsort(-scores, kind="mergesort")
    scores, is_pos = scores[order], is_pos[order]
    # the last position of each run of equal scores: a tie group crosses a threshold as one block
    last = np.r_[np.flatnonzero(np.diff(scores)), scores.size - 1]
    tps = np.cumsum(is_pos)[last]
    fps = (last + 1) - tps
    return Curve(tps, fps, scores[last], positive.size, negative.size)


def roc_points(curve: Curve) -> tuple[np.ndarray, np.ndarray]:
    """(fpr, tpr) of the ROC curve, starting at (0, 0)."""
    fpr = np.r_[0.0, curve.fps / curve.num_neg]
    tpr = np.r_[0.0, curve.tps / curve.num_pos]
    return fpr, tpr


def auroc_from(curve: Curve) -> float:
    """Area under the ROC curve (trapezoids: a tie contributes half credit)."""
    fpr, tpr = roc_points(curve)
    return float(np.trapezoid(tpr, fpr))


def aupr_from(curve: Curve) -> float:
    """Area under the precision-recall curve by trapezoids, as OpenOOD's ``metrics.auc(recall, precision)``.

    The curve has one point per distinct threshold plus scikit-learn's end point (recall 0, precision 1).
    """
    precision = curve.tps / (curve.tps + curve.fps)
    recall = curve.tps / curve.num_pos
    return float(np.trapezoid(np.r_[1.0, precision], np.r_[0.0, recall]))


def drop_collinear(curve: Curve) -> Curve:
    """Keep the first, last and every corner point (scikit-learn's ``roc_curve(drop_intermediate=True)``)."""
    if curve.tps.size <= 2:
        return curve
    corner = np.r_[True, (np.diff(curve.fps, 2) != 0) | (np.diff(curve.tps, 2) != 0), True]
    return Curve(curve.tps[corner], curve.fps[corner], curve.thresholds[corner], curve.num_pos, curve.num_neg)


def fpr_at_recall(curve: Curve, level: float = RECALL_LEVEL) -> float:
    """FPR at the first point of ``curve`` with TPR >= ``level`` (OpenOOD's ``argmax(tpr >= level)``)."""
    first = int(np.argmax(curve.tps / curve.num_pos >= level))
    return float(curve.fps[first] / curve.num_neg)


def ood_metrics(id_scores: ScoreLike, ood_scores: ScoreLike) -> dict[str, float]:
    """AUROC, AUPR-In, AUPR-Out, FPR@95 (both conventions) of ID vs OOD scores; fractions in [0, 1].

    Higher score = more in-distribution. Raises ValueError on empty, non-1-D, NaN or infinite input.
    """
    id_s = as_scores(id_scores, "id_scores")
    ood_s = as_scores(ood_scores, "ood_scores")
    id_positive = binary_curve(id_s, ood_s)
    ood_positive = binary_curve(-ood_s, -id_s)
    return {
        "auroc": auroc_from(id_positive),
        "aupr_in": aupr_from(id_positive),
        "aupr_out": aupr_from(ood_positive),
        "fpr95": fpr_at_recall(id_positive),
        "fpr95_ood_positive": fpr_at_recall(drop_collinear(ood_positive)),
    }


def roc_curve(id_scores: ScoreLike, ood_scores: ScoreLike) -> tuple[np.ndarray, np.ndarray]:
    """ROC curve with ID as positive: (fraction of OOD accepted, fraction of ID accepted) per threshold."""
    return roc_points(binary_curve(as_scores(id_scores, "id_scores"), as_scores(ood_scores, "ood_scores")))
