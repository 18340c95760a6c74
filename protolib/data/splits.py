"""Seeded splits: stratified sample splits, in-distribution vs held-out classes, labelled vs unlabelled.

All functions are deterministic in ``seed``. Sample splits draw each class with its own generator seeded by
(seed, class id), so the samples chosen for one class do not depend on which other classes are present.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

ArrayLike = Sequence[int] | np.ndarray | torch.Tensor


def _labels(targets: ArrayLike) -> np.ndarray:
    values = targets.cpu().numpy() if isinstance(targets, torch.Tensor) else targets
    return np.asarray(values, dtype=np.int64).reshape(-1)


def _check_seed(seed: int) -> int:
    if int(seed) < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed}")
    return int(seed)


def stratified_split(targets: ArrayLike, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Split sample positions into (rest, held): per class, round(fraction * n_class) random samples are held.

    Returns two sorted int64 arrays of positions into ``targets`` that partition ``range(len(targets))``.
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    seed = _check_seed(seed)
    labels = _labels(targets)
    held = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        count = int(np.floor(fraction * len(members) + 0.5))
        held.append(np.random.default_rng([seed, int(c)]).permutation(members)[:count])
    held_idx = np.sort(np.concatenate(held)) if held else np.zeros(0, dtype=np.int64)
    rest_idx = np.setdiff1d(np.arange(len(labels)), held_idx)
    return rest_idx.astype(np.int64), held_idx.astype(np.int64)


def split_classes(
    num_classes: int, num_held_out: int | None = None, held_out: Sequence[int] | None = None, seed: int = 0
) -> tuple[list[int], list[int]]:
    """In-distribution vs held-out classes: ``num_held_out`` drawn at random (seeded), or ``held_out`` given.

    Returns (id_classes, held_out_classes): sorted lists of class ids partitioning ``range(num_classes)``.
    """
    if (num_held_out is None) == (held_out is None):
        raise ValueError("give exactly one of num_held_out (a count drawn at random) or held_out (class ids)")
    if held_out is None:
        if not 0 < num_held_out < num_classes:
            raise ValueError(f"num_held_out must be in 1..{num_classes - 1}, got {num_held_out}")
        rng = np.random.default_rng(_check_seed(seed))
        chosen = {int(c) for c in rng.choice(num_classes, size=num_held_out, replace=False)}
    else:
        chosen = {int(c) for c in held_out}
        if len(chosen) != len(held_out):
            raise ValueError(f"held_out lists a class twice: {list(held_out)}")
        invalid = sorted(c for c in chosen if not 0 <= c < num_classes)
        if invalid:
            raise ValueError(f"held_out classes {invalid} do not exist; valid ids are 0..{num_classes - 1}")
        if not 0 < len(chosen) < num_classes:
            raise ValueError(f"held_out must leave at least one class on each side, got {sorted(chosen)}")
    id_classes = [c for c in range(num_classes) if c not in chosen]
    return id_classes, sorted(chosen)


def labelled_unlabelled_split(
    targets: ArrayLike, known_classes: Sequence[int], labelled_fraction: float, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Generalized-category-discovery split of sample positions into (labelled, unlabelled).

    Labelled: a seeded ``labelled_fraction`` of the samples of each known class. Unlabelled: the remaining
    samples of known classes plus every sample of the other (novel) classes. Sorted int64 arrays.
    """
    if not 0.0 < labelled_fraction <= 1.0:
        raise ValueError(f"labelled_fraction must be in (0, 1], got {labelled_fraction}")
    labels = _labels(targets)
    known = np.unique(np.asarray(list(known_classes), dtype=np.int64))
    missing = sorted(set(known.tolist()) - set(np.unique(labels).tolist()))
    if missing:
        raise ValueError(f"known classes {missing} have no samples in targets; check the class ids")
    known_pos = np.flatnonzero(np.isin(labels, known))
    _, held = stratified_split(labels[known_pos], labelled_fraction, seed)
    labelled = known_pos[held]
    unlabelled = np.setdiff1d(np.arange(len(labels)), labelled)
    return labelled.astype(np.int64), unlabelled.astype(np.int64)
