"""Semi-supervised k-means on FAISS and the class-number estimate of Vaze et al. (CVPR 2022).

``semi_supervised_kmeans`` follows ``K_Means.fit_mix`` of github.com/sgvaze/generalized-category-discovery:
labelled points stay assigned to their class's cluster, those clusters start at the class means, the other
centres come from k-means++ on the unlabelled points, Lloyd iterations update every centre from all its
members, and the best of ``n_init`` runs (lowest inertia) is kept; an empty cluster restarts at the farthest
unlabelled point, as in scikit-learn (the reference's centre would become NaN). The nearest-centre search runs
on a FAISS flat index (on the GPU when FAISS has one). ``estimate_num_clusters`` is the paper's Brent search
over K of the clustering accuracy on the labelled subset (scipy `minimize_scalar(method="bounded")`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from scipy.optimize import minimize_scalar

from protolib.bank.index import build_index
from protolib.gcd.metrics import cluster_accuracy

log = logging.getLogger(__name__)
Array = np.ndarray | torch.Tensor


@dataclass
class KMeansResult:
    """``labels`` (N,) cluster of each point, ``centers`` (K, D), ``inertia``, ``n_iter`` of the best run."""

    labels: np.ndarray
    centers: np.ndarray
    inertia: float
    n_iter: int


def check_features(features: Array, name: str = "features") -> np.ndarray:
    """Features as a float32 C-contiguous (N, D) array; NaN / inf or a wrong shape raise with the fix."""
    x = features.detach().cpu().float().numpy() if isinstance(features, torch.Tensor) else features
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty (N, D) array, got shape {tuple(x.shape)}.")
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ValueError(
            f"{name} has NaN/inf in {int(bad.sum())} of {len(x)} rows "
            f"(first: row {int(np.flatnonzero(bad)[0])}); "
            "the network diverged or the input was not normalised: lower the learning rate or check the data."
        )
    return x


def _sq_dist_to(x: np.ndarray, x_sq: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Squared distances (N,) of the rows of ``x`` to one ``center`` (D,)."""
    return np.maximum(x_sq - 2.0 * (x @ center) + float(center @ center), 0.0)


def kmeans_plus_plus(
    x: np.ndarray, k: int, rng: np.random.Generator, initial: np.ndarray | None = None
) -> np.ndarray:
    """k-means++ seeding (one D^2-weighted draw per centre, as the reference ``kpp``) after ``initial``.

    Returns (k, D); ``initial`` (k0, D) are kept as the first centres (the labelled class means).
    """
    x_sq = np.einsum("nd,nd->n", x, x)
    centers = [x[rng.integers(len(x))]] if initial is None or len(initial) == 0 else list(initial)
    nearest = np.min([_sq_dist_to(x, x_sq, c) for c in centers], axis=0)  # (N,)
    while len(centers) < k:
        total = float(nearest.sum())
        # every point already sits on a centre: any point will do (the reference would keep drawing it)
        pick = int(rng.integers(len(x))) if total <= 0 else int(rng.choice(len(x), p=nearest / total))
        centers.append(x[pick])
        nearest = np.minimum(nearest, _sq_dist_to(x, x_sq, x[pick]))
    return np.stack(centers).astype(np.float32)


def _nearest(x: np.ndarray, centers: np.ndarray, use_gpu: bool | None) -> tuple[np.ndarray, np.ndarray]:
    """(squared distance (N,), index (N,)) of the nearest centre, through a FAISS flat L2 index."""
    index = build_index(centers.shape[1], "l2", "flat", use_gpu=use_gpu)
    index.add(centers)
    dist, ids = index.search(x, 1)
    return dist[:, 0], ids[:, 0]


def _relocate_empty(
    sums: np.ndarray, counts: np.ndarray, u_labels: np.ndarray, u_dist: np.ndarray, unlabelled: np.ndarray
) -> None:
    """Restart empty clusters at the unlabelled points farthest from their centres, as scikit-learn does.

    The reference leaves an empty cluster's centre NaN; scikit-learn moves it to a far point and removes
    that point from its donor cluster's sums (in place on ``sums`` (K, D) and ``counts`` (K,)).
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size == 0 or len(u_dist) == 0:
        return
    far = np.argsort(-u_dist, kind="stable")[: empty.size]
    for cluster, point in zip(empty[: far.size], far, strict=True):
        donor = int(u_labels[point])
        if counts[donor] <= 1:
            continue  # never empty a cluster to fill another
        sums[donor] -= unlabelled[point]
        counts[donor] -= 1
        sums[cluster] = unlabelled[point]
        counts[cluster] = 1


@dataclass
class _Problem:
    """The data of one semi-supervised k-means fit: unlabelled rows, labelled rows and their cluster ids."""

    unlabelled: np.ndarray  # (U, D)
    labelled: np.ndarray  # (L, D)
    labelled_cluster: np.ndarray  # (L,) in 0..k0-1
    class_means: np.ndarray  # (k0, D)
    order: np.ndarray  # (N,) original row of each labelled-then-unlabelled row


def _fit_once(
    p: _Problem,
    k: int,
    max_iter: int,
    tol: float,
    rng: np.random.Generator,
    use_gpu: bool | None,
    init: np.ndarray | None = None,
) -> KMeansResult:
    pool = p.unlabelled if len(p.unlabelled) else p.labelled
    centers = kmeans_plus_plus(pool, k, rng, initial=p.class_means) if init is None else init.copy()
    all_x = torch.from_numpy(np.concatenate([p.labelled, p.unlabelled]))  # (N, D), labelled first
    best: KMeansResult | None = None
    for it in range(1, max_iter + 1):
        u_dist, u_labels = (
            _nearest(p.unlabelled, centers, use_gpu) if len(p.unlabelled) else (np.zeros(0), np.zeros(0, int))
        )
        l_dist = ((p.labelled - centers[p.labelled_cluster]) ** 2).sum(axis=1)
        inertia = float(u_dist.sum() + l_dist.sum())
        labels = np.concatenate([p.labelled_cluster, u_labels]).astype(np.int64)  # (N,)
        sums = torch.zeros(k, all_x.shape[1]).index_add_(0, torch.from_numpy(labels), all_x).numpy()  # (K, D)
        counts = np.bincount(labels, minlength=k)
        _relocate_empty(sums, counts, u_labels, u_dist, p.unlabelled)
        new_centers = centers.copy()
        filled = counts > 0
        new_centers[filled] = (sums[filled] / counts[filled, None]).astype(np.float32)
        if best is None or inertia < best.inertia:
            best = KMeansResult(labels, new_centers.copy(), inertia, it)
        shift = float(np.sqrt(((new_centers - centers) ** 2).sum(axis=1)).sum())
        centers = new_centers
        if shift**2 < tol:
            break
    assert best is not None
    out = np.empty_like(best.labels)
    out[p.order] = best.labels  # back to the caller's row order
    return KMeansResult(out, best.centers, best.inertia, it)


def semi_supervised_kmeans(
    features: Array,
    num_clusters: int,
    labels: Array | None = None,
    n_init: int = 10,
    max_iter: int = 10,
    tol: float = 1e-4,
    seed: int = 0,
    use_gpu: bool | None = None,
    init: Array | None = None,
) -> KMeansResult:
    """Cluster ``features`` (N, D) into ``num_clusters``; ``labels`` (N,): a labelled row's class, else -1.

    Labelled classes become clusters ``0..k0-1`` in sorted class order (a class id ``c`` keeps id ``c`` when
    the known classes are ``0..k0-1``); they are never reassigned. Without labels this is plain k-means with
    k-means++ seeding. Defaults are the reference's (10 inits, 10 iterations, tol 1e-4 on the squared shift).
    ``init`` (K, D) replaces the seeding (one run; e.g. to compare with another k-means from the same start).
    """
    x = check_features(features)
    y = np.full(len(x), -1, dtype=np.int64) if labels is None else _as_int(labels)
    if y.shape != (len(x),):
        raise ValueError(f"labels must have one entry per feature row ({len(x)}), got shape {y.shape}.")
    known = np.unique(y[y >= 0])
    if num_clusters < max(1, len(known)):
        raise ValueError(
            f"num_clusters={num_clusters} is below the {len(known)} labelled classes; set it to at least "
            f"{len(known)} (known + expected new classes)."
        )
    if num_clusters > len(x):
        raise ValueError(f"num_clusters={num_clusters} exceeds the {len(x)} points; lower it.")
    if n_init < 1 or max_iter < 1:
        raise ValueError(f"n_init and max_iter must be >= 1, got {n_init} and {max_iter}.")
    lab, unl = np.flatnonzero(y >= 0), np.flatnonzero(y < 0)
    cluster_of = np.searchsorted(known, y[lab])  # (L,) class -> 0..k0-1
    means = (
        np.stack([x[lab][cluster_of == i].mean(axis=0) for i in range(len(known))]) if len(known) else None
    )
    problem = _Problem(
        unlabelled=x[unl],
        labelled=x[lab],
        labelled_cluster=cluster_of,
        class_means=np.zeros((0, x.shape[1]), np.float32) if means is None else means.astype(np.float32),
        order=np.concatenate([lab, unl]),
    )
    rng = np.random.default_rng(seed)
    if init is not None:
        start = check_features(init, "init")
        if start.shape != (num_clusters, x.shape[1]):
            raise ValueError(f"init must have shape ({num_clusters}, {x.shape[1]}), got {start.shape}.")
        return _fit_once(problem, num_clusters, max_iter, tol, rng, use_gpu, init=start)
    runs = [_fit_once(problem, num_clusters, max_iter, tol, rng, use_gpu) for _ in range(n_init)]
    return min(runs, key=lambda r: r.inertia)


def _as_int(values: Array) -> np.ndarray:
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    return array.astype(np.int64).reshape(-1)


@dataclass
class KEstimate:
    """The estimated number of clusters and the labelled accuracy of every K the search tried."""

    k: int
    accuracy: float
    tried: dict[int, float]


def estimate_num_clusters(
    features: Array,
    labels: Array,
    k_min: int | None = None,
    k_max: int = 100,
    cluster: Callable[[np.ndarray, int], np.ndarray] | None = None,
    n_init: int = 3,
    max_iter: int = 100,
    xatol: float = 0.5,
    seed: int = 0,
) -> KEstimate:
    """Vaze et al.'s class-number estimate: the K in [k_min, k_max] that maximises labelled cluster accuracy.

    Every row (labelled and unlabelled) is clustered with plain k-means (L2-normalised features, as the
    reference), and the clustering is scored on the labelled rows only (``labels`` >= 0) with the Hungarian
    accuracy; Brent's bounded method searches K, rounding each trial down as the reference's ``int(K)``, and
    its answer is ``int(res.x)``. ``k_min`` defaults to the number of labelled classes. The k-means (FAISS,
    ``n_init`` k-means++ starts of ``max_iter`` Lloyd steps) can be replaced by ``cluster(x, k) -> labels``.
    """
    x = check_features(features)
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    y = _as_int(labels)
    if y.shape != (len(x),):
        raise ValueError(f"labels must have one entry per feature row ({len(x)}), got shape {y.shape}.")
    lab = y >= 0
    known = len(np.unique(y[lab]))
    if known < 1:
        raise ValueError("estimate_num_clusters needs labelled rows (labels >= 0) to score each K.")
    k_min = known if k_min is None else int(k_min)
    if not known <= k_min < k_max <= len(x):
        raise ValueError(
            f"need {known} (labelled classes) <= k_min={k_min} < k_max={k_max} <= {len(x)} (points); "
            "widen the range."
        )
    if cluster is None:

        def cluster(data: np.ndarray, k: int) -> np.ndarray:
            return semi_supervised_kmeans(data, k, n_init=n_init, max_iter=max_iter, seed=seed).labels

    tried: dict[int, float] = {}

    def negative_accuracy(k_float: float) -> float:
        k = int(k_float)
        if k not in tried:
            tried[k] = cluster_accuracy(y[lab], cluster(x, k)[lab])
            log.info("K estimation: K=%d labelled accuracy %.4f", k, tried[k])
        return -tried[k]

    res = minimize_scalar(
        negative_accuracy, bounds=(k_min, k_max), method="bounded", options={"xatol": xatol}
    )
    k = int(res.x)
    return KEstimate(k, tried.get(k, -negative_accuracy(k)), dict(sorted(tried.items())))
