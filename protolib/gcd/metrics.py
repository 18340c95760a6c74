"""Clustering accuracy for generalized category discovery: Hungarian matching in the v1 / v2 / v2b forms.

The semantics are those of ``split_cluster_acc_v1`` / ``split_cluster_acc_v2`` (Vaze et al., CVPR 2022,
github.com/sgvaze/generalized-category-discovery) and ``split_cluster_acc_v2_balanced`` (SimGCD,
github.com/CVMI-Lab/SimGCD): the contingency table is square, ``D = max(max(y_pred), max(y_true)) + 1``,
and the matching is ``linear_sum_assignment(w.max() - w)`` on it, so ties resolve as in the reference code.
*Old* and *New* are decided by each instance's **true** class being a known class (``old_mask``), not by
whether it was labelled. A subset with no instances scores NaN (there is nothing to be right about).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

ArrayLike = Sequence[int] | np.ndarray | torch.Tensor
MODES = ("v1", "v2", "v2b")


def _as_labels(values: ArrayLike, name: str) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    array = array.reshape(-1)
    if array.size and (not np.issubdtype(array.dtype, np.integer) and not np.all(array == np.round(array))):
        raise ValueError(f"{name} must hold integer class / cluster ids, got dtype {array.dtype}.")
    array = array.astype(np.int64)
    if array.size and array.min() < 0:
        raise ValueError(f"{name} must hold non-negative ids, found {int(array.min())}.")
    return array


def _check(y_true: ArrayLike, y_pred: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = _as_labels(y_true, "y_true"), _as_labels(y_pred, "y_pred")
    if y_true.shape != y_pred.shape:
        raise ValueError(f"y_true and y_pred need the same length, got {y_true.size} and {y_pred.size}.")
    return y_true, y_pred


def contingency(y_true: ArrayLike, y_pred: ArrayLike) -> np.ndarray:
    """Square count table ``w[cluster, class]`` (D, D) with ``D = max(max(y_pred), max(y_true)) + 1``."""
    y_true, y_pred = _check(y_true, y_pred)
    size = int(max(y_pred.max(initial=-1), y_true.max(initial=-1))) + 1
    w = np.zeros((size, size), dtype=np.int64)
    np.add.at(w, (y_pred, y_true), 1)
    return w


def hungarian_match(y_true: ArrayLike, y_pred: ArrayLike) -> dict[int, int]:
    """The reference matching as ``{class: cluster}`` over every id 0..D-1 (one-to-one, max total count)."""
    w = contingency(y_true, y_pred)
    clusters, classes = linear_sum_assignment(w.max(initial=0) - w)
    return {int(j): int(i) for i, j in zip(clusters, classes, strict=True)}


def cluster_accuracy(y_true: ArrayLike, y_pred: ArrayLike) -> float:
    """Fraction of instances whose cluster is matched to their class (one Hungarian matching), NaN if none."""
    y_true, y_pred = _check(y_true, y_pred)
    if y_true.size == 0:
        return float("nan")
    w = contingency(y_true, y_pred)
    class_to_cluster = hungarian_match(y_true, y_pred)
    return float(sum(w[i, j] for j, i in class_to_cluster.items()) / y_true.size)


def _per_class_hits(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For each class present: (class ids, correctly matched count, instance count) under one matching."""
    w = contingency(y_true, y_pred)
    class_to_cluster = hungarian_match(y_true, y_pred)
    classes = np.unique(y_true)
    hits = np.array([w[class_to_cluster[int(c)], c] for c in classes], dtype=np.int64)
    counts = w[:, classes].sum(axis=0)
    return classes, hits, counts


def _ratio(hits: np.ndarray, counts: np.ndarray) -> float:
    total = counts.sum()
    return float(hits.sum() / total) if total else float("nan")


def split_cluster_accuracy(
    y_true: ArrayLike, y_pred: ArrayLike, old_mask: ArrayLike, mode: str = "v2"
) -> tuple[float, float, float]:
    """(All, Old, New) clustering accuracy; ``old_mask`` (N,) is True where the *true* class is known.

    ``v2`` (what papers report): one matching over all instances, Old / New read off it. ``v1``: separate
    matchings on the Old and New subsets, All their instance-weighted mean. ``v2b``: the v2 matching, then
    the mean of per-class accuracies (All over every class present, Old / New over theirs).
    """
    if mode not in MODES:
        raise ValueError(f"mode {mode!r} is unknown; use one of {MODES}.")
    y_true, y_pred = _check(y_true, y_pred)
    mask = np.asarray(old_mask.cpu() if isinstance(old_mask, torch.Tensor) else old_mask).reshape(-1)
    if mask.shape != y_true.shape or mask.dtype != bool:
        raise ValueError(f"old_mask must be {y_true.size} booleans (True = true class is known).")
    if y_true.size == 0:
        raise ValueError("split_cluster_accuracy needs at least one instance.")
    mixed = np.intersect1d(y_true[mask], y_true[~mask])
    if mixed.size:
        raise ValueError(
            f"old_mask marks classes {mixed.tolist()[:10]} both known and new; it must be a function of the "
            "true class (np.isin(y_true, known_classes))."
        )
    if mode == "v1":
        old = cluster_accuracy(y_true[mask], y_pred[mask])
        new = cluster_accuracy(y_true[~mask], y_pred[~mask])
        weight = mask.mean()
        parts = [(weight, old), (1 - weight, new)]
        return float(sum(p * a for p, a in parts if p > 0)), old, new
    classes, hits, counts = _per_class_hits(y_true, y_pred)
    is_old = np.isin(classes, np.unique(y_true[mask]))
    if mode == "v2":
        return (
            _ratio(hits, counts),
            _ratio(hits[is_old], counts[is_old]),
            _ratio(hits[~is_old], counts[~is_old]),
        )
    per_class = hits / counts  # v2b: classes present always have counts > 0
    old = float(per_class[is_old].mean()) if is_old.any() else float("nan")
    new = float(per_class[~is_old].mean()) if (~is_old).any() else float("nan")
    return float(per_class.mean()), old, new


def gcd_accuracies(
    y_true: ArrayLike, y_pred: ArrayLike, known_classes: Sequence[int], modes: Sequence[str] = MODES
) -> dict[str, float]:
    """``{"<mode>/all", "<mode>/old", "<mode>/new"}`` for each mode; Old = true class in ``known_classes``."""
    y_true = _as_labels(y_true, "y_true")
    old_mask = np.isin(y_true, np.asarray(list(known_classes), dtype=np.int64))
    out: dict[str, float] = {}
    for mode in modes:
        all_acc, old_acc, new_acc = split_cluster_accuracy(y_true, y_pred, old_mask, mode)
        out.update({f"{mode}/all": all_acc, f"{mode}/old": old_acc, f"{mode}/new": new_acc})
    return out
