"""Semi-supervised k-means on FAISS and the class-number estimate of Vaze et al. (CVPR 2022).

``semi_supervised_kmeans`` follows ``K_Means.fit_mix`` of github.com/sgvaze/generalized-category-discovery:
labelled points stay assigned to their class's cluster, those clusters start at the class means, the other
centres come from k-means++ on the unlabelled points, Lloyd iterations update every centre from all its
members, and the best of ``n_init`` runs (lowest inertia) is kept; an empty cluster restarts at the farthest
unlabelled point, as in scikit-learn (the reference's centre would become NaN). The nearest-centre search runs
on a FAISS flat index (on the GPU when FAISS has one), and after the first step only for the points whose
Hamerly bounds (distance to the own centre vs. to any other, moved by the centre shifts) no longer prove the
assignment: the same labels as a full Lloyd step at a fraction of the cost once few points move. The run ends,
as scikit-learn's, with an assignment step, so ``labels`` and ``inertia`` belong to the returned centres
(Lloyd's inertia never rises, so this is the reference's best-of-iterations). ``estimate_num_clusters`` is the
paper's Brent search over K of the clustering accuracy on the labelled subset (scipy
`minimize_scalar(method="bounded")`).
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
    if np.isfinite(x.sum(dtype=np.float64)):  # one pass; a NaN / inf anywhere makes the sum non-finite
        return x
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


def _nearest_two(x: np.ndarray, centers: np.ndarray, use_gpu: bool | None) -> tuple[np.ndarray, ...]:
    """(index, distance, second-nearest distance), each (N,), of the centres, through a FAISS flat L2 index.

    Distances are Euclidean (not squared), as the bounds of `_Assignment` need; inf without a second centre.
    """
    if len(x) == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros(0, np.float32)
    index = build_index(centers.shape[1], "l2", "flat", use_gpu=use_gpu)
    index.add(centers)
    dist, ids = index.search(x, min(2, len(centers)))  # (N, 2) squared distances
    dist = np.sqrt(np.maximum(dist, 0.0))
    second = dist[:, 1] if dist.shape[1] > 1 else np.full(len(x), np.inf, dtype=dist.dtype)
    return ids[:, 0].astype(np.int64), dist[:, 0], second


def _dist_to(
    x: np.ndarray, centers: np.ndarray, labels: np.ndarray, rows: np.ndarray | None = None, chunk: int = 4096
) -> np.ndarray:
    """Euclidean distance of rows ``rows`` (default: all) of ``x`` to their centres ``centers[labels[rows]]``.

    Chunks of a few thousand rows keep the gathered rows in cache.
    """
    rows = np.arange(len(x)) if rows is None else rows
    out = np.empty(len(rows), dtype=np.float32)
    for i in range(0, len(rows), chunk):
        part = rows[i : i + chunk]
        diff = x[part] - centers[labels[part]]
        out[i : i + chunk] = np.sqrt(np.einsum("nd,nd->n", diff, diff))
    return out


@dataclass
class _Problem:
    """The data of one semi-supervised k-means fit: unlabelled rows, labelled rows and their cluster ids."""

    unlabelled: np.ndarray  # (U, D)
    labelled: np.ndarray  # (L, D)
    labelled_cluster: np.ndarray  # (L,) in 0..k0-1
    class_means: np.ndarray  # (k0, D)
    order: np.ndarray  # (N,) original row of each labelled-then-unlabelled row


class _Assignment:
    """Nearest-centre assignment of the unlabelled rows, kept by Hamerly's bounds (J. Hamerly, SDM 2010).

    Each row keeps an upper bound on the distance to its centre and a lower bound on the distance to every
    other centre; after the centres move by ``shift`` the bounds move by the shifts, and only the rows whose
    bounds no longer prove the assignment are searched again (FAISS). The assignment is Lloyd's exactly: a
    skipped row provably keeps its nearest centre. Per-cluster sums follow the rows that changed cluster.
    """

    def __init__(self, x: np.ndarray, centers: np.ndarray, use_gpu: bool | None) -> None:
        self.x, self.use_gpu = x, use_gpu
        self.labels, self.upper, self.lower = _nearest_two(x, centers, use_gpu)
        k = len(centers)
        sums = torch.zeros(k, x.shape[1]).index_add_(0, torch.from_numpy(self.labels), torch.from_numpy(x))
        self.sums = sums.double()  # (K, D); float64 from here on, as rows move in and out
        self.counts = np.bincount(self.labels, minlength=k)

    def move(self, rows: np.ndarray, to: np.ndarray) -> None:
        """Reassign ``rows`` to clusters ``to``, updating the per-cluster sums and counts."""
        changed = to != self.labels[rows]
        rows, to = rows[changed], to[changed]
        if rows.size == 0:
            return
        points = torch.from_numpy(self.x[rows]).double()
        self.sums.index_add_(0, torch.from_numpy(self.labels[rows]), points, alpha=-1.0)
        self.sums.index_add_(0, torch.from_numpy(to), points)
        np.subtract.at(self.counts, self.labels[rows], 1)
        np.add.at(self.counts, to, 1)
        self.labels[rows] = to

    def update(self, centers: np.ndarray, shift: np.ndarray) -> None:
        """Re-assign after the centres moved by ``shift`` (K,) (Euclidean) to ``centers`` (K, D)."""
        self.upper += shift[self.labels]
        if len(shift) > 1:
            top = np.argsort(shift)[-2:]  # the largest shift of another centre bounds the lower bound's loss
            other = np.where(self.labels == top[1], shift[top[0]], shift[top[1]])
            self.lower -= other
        between = _pairwise_sq(centers)
        np.fill_diagonal(between, np.inf)
        half = 0.5 * np.sqrt(between.min(axis=1))  # (K,) a row this close to its centre stays there
        rows = np.flatnonzero(self.upper > np.maximum(half[self.labels], self.lower))
        if rows.size:
            self.upper[rows] = _dist_to(self.x, centers, self.labels, rows)  # tighten, then test again
            rows = rows[self.upper[rows] > np.maximum(half[self.labels[rows]], self.lower[rows])]
        if rows.size:
            labels, self.upper[rows], self.lower[rows] = _nearest_two(self.x[rows], centers, self.use_gpu)
            self.move(rows, labels)

    def relocate_empty(self, centers: np.ndarray, extra_counts: np.ndarray) -> None:
        """Restart empty clusters at the unlabelled rows farthest from their centres, as scikit-learn does.

        The reference leaves an empty cluster's centre NaN; scikit-learn moves it to a far point, taken from
        a donor cluster that keeps at least one member. ``extra_counts`` (K,) are the labelled members.
        """
        empty = np.flatnonzero(self.counts + extra_counts == 0)
        if empty.size == 0 or len(self.x) == 0:
            return
        dist = _dist_to(self.x, centers, self.labels)
        for cluster, row in zip(empty, np.argsort(-dist, kind="stable")[: empty.size], strict=False):
            if self.counts[self.labels[row]] + extra_counts[self.labels[row]] <= 1:
                continue  # never empty a cluster to fill another
            self.move(np.array([row]), np.array([cluster]))
            self.upper[row], self.lower[row] = 0.0, 0.0  # it is its cluster's centre; search it next time


def _pairwise_sq(a: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (K, K) between the rows of ``a``."""
    sq = np.einsum("kd,kd->k", a, a)
    return np.maximum(sq[:, None] - 2.0 * (a @ a.T) + sq[None, :], 0.0)


def _fit_once(
    p: _Problem,
    k: int,
    max_iter: int,
    tol: float,
    rng: np.random.Generator,
    use_gpu: bool | None,
    init: np.ndarray | None = None,
) -> KMeansResult:
    """One Lloyd run from k-means++ (or ``init``); labels and inertia are those of the final centres."""
    pool = p.unlabelled if len(p.unlabelled) else p.labelled
    centers = kmeans_plus_plus(pool, k, rng, initial=p.class_means) if init is None else init.copy()
    lab_cluster = torch.from_numpy(p.labelled_cluster)
    lab_sums = torch.zeros(k, p.labelled.shape[1], dtype=torch.float64)
    lab_sums.index_add_(0, lab_cluster, torch.from_numpy(p.labelled).double())  # fixed members: fixed sums
    lab_counts = np.bincount(p.labelled_cluster, minlength=k)
    unl = _Assignment(p.unlabelled, centers, use_gpu)
    shift = np.zeros(k, dtype=np.float32)  # (K,) how far each centre moved in the last update
    for it in range(1, max_iter + 1):
        if it > 1:
            unl.update(centers, shift)
        unl.relocate_empty(centers, lab_counts)
        counts = unl.counts + lab_counts
        filled = counts > 0
        new_centers = centers.copy()
        new_centers[filled] = ((unl.sums + lab_sums)[filled].numpy() / counts[filled, None]).astype(
            np.float32
        )
        shift = np.sqrt(((new_centers - centers) ** 2).sum(axis=1))  # (K,)
        centers = new_centers
        if float(shift.sum()) ** 2 < tol:
            break
    unl.update(centers, shift)  # the final assignment step, as scikit-learn's: labels of the final centres
    u_dist = _dist_to(p.unlabelled, centers, unl.labels)
    l_dist = _dist_to(p.labelled, centers, p.labelled_cluster)
    inertia = float((u_dist.astype(np.float64) ** 2).sum() + (l_dist.astype(np.float64) ** 2).sum())
    labels = np.concatenate([p.labelled_cluster, unl.labels]).astype(np.int64)  # labelled first
    out = np.empty_like(labels)
    out[p.order] = labels  # back to the caller's row order
    return KMeansResult(out, centers, inertia, it)


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
        unlabelled=x if len(lab) == 0 else x[unl],  # no copy without labels
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
    n_init: int = 10,
    max_iter: int = 300,
    xatol: float = 1e-5,
    seed: int = 0,
) -> KEstimate:
    """Vaze et al.'s class-number estimate: the K in [k_min, k_max] that maximises labelled cluster accuracy.

    Every row (labelled and unlabelled) is clustered with plain k-means (L2-normalised features, as the
    reference), and the clustering is scored on the labelled rows only (``labels`` >= 0) with the Hungarian
    accuracy; Brent's bounded method searches K, rounding each trial down as the reference's ``int(K)``, and
    its answer is ``int(res.x)``. ``k_min`` defaults to the number of labelled classes. The defaults are the
    reference's: scikit-learn ``KMeans(K, random_state=0)`` (10 k-means++ starts, 300 iterations, the same
    seed for every K; here on FAISS) and scipy's ``xatol`` (1e-5). On a plateau of equal accuracy Brent
    moves to the newest point (``fu <= fx``), as in the reference. ``cluster(x, k) -> labels`` replaces the
    k-means.
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
