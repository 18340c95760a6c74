"""GCD clustering accuracy against brute force over every cluster -> class matching and hand counts."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix

from protolib.gcd.metrics import cluster_accuracy, gcd_accuracies, hungarian_match, split_cluster_accuracy


def brute_force(y_true: np.ndarray, y_pred: np.ndarray, old: np.ndarray) -> dict[str, tuple]:
    """Try every one-to-one cluster -> class map (padded to a square table); keep all best ones."""
    size = max(y_true.max(), y_pred.max()) + 1
    table = confusion_matrix(y_pred, y_true, labels=range(size))  # [cluster, class], independent counts
    best, results = -1, set()
    for perm in itertools.permutations(range(size)):  # perm[cluster] = class
        mapped = np.array([perm[c] for c in y_pred])
        correct = mapped == y_true
        total = int(correct.sum())
        per_class = [correct[y_true == c].mean() for c in np.unique(y_true)]
        is_old = [c in set(y_true[old]) for c in np.unique(y_true)]
        v2 = (correct.mean(), correct[old].mean(), correct[~old].mean())
        v2b = (
            np.mean(per_class),
            np.mean([a for a, o in zip(per_class, is_old, strict=True) if o]),
            np.mean([a for a, o in zip(per_class, is_old, strict=True) if not o]),
        )
        if total > best:
            best, results = total, set()
        if total == best:
            results.add((tuple(np.round(v2, 12)), tuple(np.round(v2b, 12))))
    assert table.sum() == y_true.size
    return {"best": best / y_true.size, "results": results}


def subset_best(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Best one-to-one matching accuracy of one subset, by brute force."""
    size = max(y_true.max(), y_pred.max()) + 1
    return max(
        np.mean(np.array([perm[c] for c in y_pred]) == y_true) for perm in itertools.permutations(range(size))
    )


# Fixed inputs with a unique best matching: 4 true classes (0, 1 known), 5 or 3 clusters (K != C).
Y_TRUE = np.array([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 3, 3, 3])
PRED_K5 = np.array([1, 1, 1, 4, 0, 0, 2, 3, 3, 3, 2, 4, 2, 2, 4])
PRED_K3 = np.array([0, 0, 0, 0, 1, 1, 0, 2, 2, 2, 2, 1, 2, 2, 1])
OLD = np.isin(Y_TRUE, [0, 1])


@pytest.mark.parametrize("y_pred", [PRED_K5, PRED_K3], ids=["K5", "K3"])
def test_v2_and_v2b_match_brute_force(y_pred: np.ndarray) -> None:
    reference = brute_force(Y_TRUE, y_pred, OLD)
    assert len(reference["results"]) == 1  # the fixed input has one best answer
    (v2, v2b) = next(iter(reference["results"]))
    np.testing.assert_allclose(split_cluster_accuracy(Y_TRUE, y_pred, OLD, "v2"), v2, atol=1e-12)
    np.testing.assert_allclose(split_cluster_accuracy(Y_TRUE, y_pred, OLD, "v2b"), v2b, atol=1e-12)
    assert cluster_accuracy(Y_TRUE, y_pred) == pytest.approx(reference["best"])


def test_v2_by_hand_with_more_clusters_than_classes() -> None:
    # K=5: class 0 -> cluster 1 (3 of 4), 1 -> 0 (2 of 3), 2 -> 3 (3 of 5), 3 -> 2 (2 of 3); 4 unmatched
    all_acc, old_acc, new_acc = split_cluster_accuracy(Y_TRUE, PRED_K5, OLD, "v2")
    assert (all_acc, old_acc, new_acc) == pytest.approx((10 / 15, 5 / 7, 5 / 8))
    assert hungarian_match(Y_TRUE, PRED_K5)[0] == 1
    _, old_b, new_b = split_cluster_accuracy(Y_TRUE, PRED_K5, OLD, "v2b")
    assert (old_b, new_b) == pytest.approx(((3 / 4 + 2 / 3) / 2, (3 / 5 + 2 / 3) / 2))


def test_v1_matches_separately_per_subset() -> None:
    for y_pred in (PRED_K5, PRED_K3):
        all_acc, old_acc, new_acc = split_cluster_accuracy(Y_TRUE, y_pred, OLD, "v1")
        expect_old = subset_best(Y_TRUE[OLD], y_pred[OLD])
        expect_new = subset_best(Y_TRUE[~OLD], y_pred[~OLD])
        assert (old_acc, new_acc) == pytest.approx((expect_old, expect_new))
        assert all_acc == pytest.approx(OLD.mean() * expect_old + (1 - OLD.mean()) * expect_new)


def test_random_inputs_against_brute_force() -> None:
    rng = np.random.default_rng(0)
    checked = 0
    while checked < 25:
        y_true = rng.integers(0, 4, 14)
        y_pred = rng.integers(0, rng.integers(2, 6), 14)
        old = np.isin(y_true, [0, 1])
        if old.all() or not old.any():
            continue
        reference = brute_force(y_true, y_pred, old)
        v2 = tuple(np.round(split_cluster_accuracy(y_true, y_pred, old, "v2"), 12))
        v2b = tuple(np.round(split_cluster_accuracy(y_true, y_pred, old, "v2b"), 12))
        assert (v2, v2b) in reference["results"]
        checked += 1


def test_gcd_accuracies_keys_and_label_permutation_invariance() -> None:
    out = gcd_accuracies(Y_TRUE, PRED_K5, known_classes=[0, 1])
    assert set(out) == {f"{m}/{s}" for m in ("v1", "v2", "v2b") for s in ("all", "old", "new")}
    relabelled = np.array([7, 3, 9, 0, 5])[PRED_K5]  # cluster ids are arbitrary names
    assert gcd_accuracies(Y_TRUE, relabelled, [0, 1])["v2/all"] == pytest.approx(out["v2/all"])


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="same length"):
        split_cluster_accuracy([0, 1], [0], [True, False])
    with pytest.raises(ValueError, match="mode"):
        split_cluster_accuracy(Y_TRUE, PRED_K5, OLD, "v3")
    with pytest.raises(ValueError, match="both known and new"):
        split_cluster_accuracy([0, 0, 1], [0, 0, 1], np.array([True, False, False]))
    with pytest.raises(ValueError, match="non-negative"):
        cluster_accuracy([0, 1], [-1, 0])
    old, new = split_cluster_accuracy([0, 1], [0, 1], np.array([True, True]))[1:]
    assert old == 1.0 and np.isnan(new)  # no new instances: nothing to score
