"""Semi-supervised k-means on FAISS and Vaze et al.'s K estimate, against scikit-learn and known blobs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.cluster import KMeans
from sklearn.datasets import make_blobs

from protolib.gcd.clustering import estimate_num_clusters, kmeans_plus_plus, semi_supervised_kmeans
from protolib.gcd.metrics import cluster_accuracy


def blobs(n_classes: int, n: int = 600, dim: int = 16, std: float = 1.0, seed: int = 0):
    x, y = make_blobs(n, dim, centers=n_classes, cluster_std=std, center_box=(-10, 10), random_state=seed)
    return x.astype(np.float32), y


def test_plain_kmeans_matches_sklearn_from_the_same_init() -> None:
    x, _ = blobs(5, std=3.0)
    init = kmeans_plus_plus(x, 5, np.random.default_rng(0))  # the draw semi_supervised_kmeans makes first
    ours = semi_supervised_kmeans(x, 5, n_init=1, max_iter=100, tol=0.0, seed=0)
    ref = KMeans(5, init=init, n_init=1, max_iter=100, tol=0.0, algorithm="lloyd").fit(x)
    np.testing.assert_array_equal(ours.labels, ref.labels_)
    np.testing.assert_allclose(ours.centers, ref.cluster_centers_, atol=1e-4)
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-4)


def test_labelled_points_keep_their_class_and_centres_are_member_means() -> None:
    x, y = blobs(6, std=2.5)
    labels = np.where((y < 3) & (np.arange(len(y)) % 2 == 0), y, -1)  # half of classes 0-2 labelled
    result = semi_supervised_kmeans(x, 6, labels, n_init=3, seed=1)
    lab = labels >= 0
    np.testing.assert_array_equal(result.labels[lab], labels[lab])
    unl = ~lab
    assert cluster_accuracy(y[unl], result.labels[unl]) > 0.95
    # centres are the means of the final members (the reference's M-step), recomputed independently
    for k in range(6):
        members = x[result.labels == k]
        inertia_ok = np.allclose(result.centers[k], members.mean(axis=0), atol=1e-3)
        assert inertia_ok or result.n_iter == 10


def test_kmeans_plus_plus_keeps_initial_centres() -> None:
    x, _ = blobs(4)
    initial = x[:2] + 100.0
    centers = kmeans_plus_plus(x, 5, np.random.default_rng(0), initial=initial)
    assert centers.shape == (5, x.shape[1])
    np.testing.assert_array_equal(centers[:2], initial)
    assert all(any(np.array_equal(c, row) for row in x) for c in centers[2:])


def test_k_search_finds_the_peak_of_a_unimodal_accuracy() -> None:
    # 20 labelled points of 20 classes (then 40 unlabelled); the stub clustering puts 20 - |k - 27| of the
    # labelled ones in distinct clusters, so the labelled accuracy is (20 - |k - 27|) / 20, peaked at K = 27.
    x = np.random.default_rng(0).normal(size=(60, 4)).astype(np.float32)
    labels = np.concatenate([np.arange(20), np.full(40, -1)])

    def stub(_: np.ndarray, k: int) -> np.ndarray:
        distinct = 20 - abs(k - 27)
        return np.where(np.arange(60) < distinct, np.arange(60), 0)

    estimate = estimate_num_clusters(x, labels, k_max=40, cluster=stub)
    assert estimate.k == 27
    assert estimate.accuracy == pytest.approx(20 / 20)
    assert all(acc == pytest.approx((20 - abs(k - 27)) / 20) for k, acc in estimate.tried.items())


def test_k_estimate_on_blobs_lands_on_the_best_labelled_accuracy() -> None:
    x, y = blobs(8, n=800, std=0.8, seed=3)
    labels = np.where(y < 4, y, -1)
    estimate = estimate_num_clusters(x, labels, k_max=20, n_init=2)
    # merging *new* blobs costs no labelled accuracy, so K in 4..8 can all score 1: the search stops on
    # that plateau, never past the true 8 (splitting a labelled blob costs accuracy)
    assert estimate.accuracy == max(estimate.tried.values()) == 1.0
    assert 4 <= estimate.k <= 8 and min(estimate.tried) >= 4 and max(estimate.tried) <= 20


def test_bad_inputs_name_the_fix() -> None:
    x, y = blobs(4)
    with pytest.raises(ValueError, match="below the 3 labelled classes"):
        semi_supervised_kmeans(x, 2, np.where(y < 3, y, -1))
    x_nan = x.copy()
    x_nan[5, 0] = np.nan
    with pytest.raises(ValueError, match=r"NaN/inf in 1 of .* row 5"):
        semi_supervised_kmeans(x_nan, 4)
    with pytest.raises(ValueError, match="widen the range"):
        estimate_num_clusters(x, np.where(y < 3, y, -1), k_min=2, k_max=10)


def test_empty_cluster_restarts_like_sklearn() -> None:
    x, _ = blobs(3, n=300, std=0.5, seed=2)
    init = np.stack([x[0], x[0] + 1e-3, x[1], x[2]]).astype(np.float32)  # a duplicate start: one goes empty
    ours = semi_supervised_kmeans(x, 4, init=init, max_iter=30, tol=0.0)
    ref = KMeans(4, init=init, n_init=1, max_iter=30, tol=0.0, algorithm="lloyd").fit(x)
    assert np.bincount(ours.labels, minlength=4).min() > 0
    assert ours.inertia == pytest.approx(ref.inertia_, rel=1e-3)


def test_bounded_lloyd_is_brute_force_lloyd_with_labelled_points_fixed() -> None:
    """The bound-skipping assignment equals a full float64 Lloyd written out here, step by step."""
    x, y = blobs(8, n=500, dim=6, std=4.0, seed=5)  # overlapping: points keep changing cluster for a while
    labels = np.where((y < 3) & (np.arange(len(y)) % 3 == 0), y, -1)
    lab = labels >= 0
    init = np.concatenate([[x[lab & (y == c)].mean(0) for c in range(3)], x[~lab][:5]]).astype(np.float32)
    centres = init.astype(np.float64)
    for _ in range(15):
        d = ((x[:, None, :].astype(np.float64) - centres[None]) ** 2).sum(-1)  # (N, K)
        assign = np.where(lab, labels, d.argmin(1))
        centres = np.stack([x[assign == k].mean(0) for k in range(8)])
    final = np.where(lab, labels, ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(1))
    ours = semi_supervised_kmeans(x, 8, labels, init=init, max_iter=15, tol=0.0)
    np.testing.assert_array_equal(ours.labels, final)
    np.testing.assert_allclose(ours.centers, centres, atol=1e-4)
    expected_inertia = ((x - centres[final]) ** 2).sum()
    assert ours.inertia == pytest.approx(expected_inertia, rel=1e-5)
