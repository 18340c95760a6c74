"""FAISS index factory: one small wrapper over flat / IVF / HNSW indexes, on GPU when FAISS has GPUs.

Every index speaks the bank's distance convention, *smaller is nearer*: ``l2`` is the squared Euclidean
distance, ``cosine`` is ``1 - cos`` (inner product on unit-normalised vectors), ``ip`` is ``-<q, x>``.
Missing results (an approximate index found fewer than ``k`` candidates) come back as id ``-1`` with
distance ``inf``.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import faiss
import numpy as np
import torch

METRICS = ("l2", "cosine", "ip")
INDEX_KINDS = ("flat", "ivf", "hnsw")
# k-means in FAISS wants about this many training points per IVF list; fewer gives poor lists.
MIN_POINTS_PER_LIST = 39
DEFAULT_OPTIONS: dict[str, dict[str, Any]] = {
    "flat": {},
    "ivf": {"nlist": 1024, "nprobe": 8},
    "hnsw": {"M": 32, "efConstruction": 80, "efSearch": 64},
}


def gpu_available() -> bool:
    """True when this FAISS build has GPU support, sees a GPU, and torch sees CUDA."""
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0 and torch.cuda.is_available()


@functools.cache
def _gpu_resources() -> Any:
    """One shared FAISS GPU resource object (scratch memory, streams) per process."""
    return faiss.StandardGpuResources()


def as_float32(x: torch.Tensor | np.ndarray, dim: int, name: str) -> np.ndarray:
    """Return ``x`` as a C-contiguous float32 (N, dim) numpy array, or raise ValueError."""
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float32).numpy()
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.ndim != 2 or x.shape[1] != dim:
        raise ValueError(
            f"{name} must have shape (N, {dim}), got {tuple(x.shape)}; reshape it to (N, {dim})."
        )
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf values; clean the vectors before indexing them.")
    return x


class FaissIndex:
    """A FAISS index with the bank's metric and distance convention; build with :func:`build_index`.

    The search-time knobs ``nprobe`` (ivf) and ``ef_search`` (hnsw) may be changed between searches.
    """

    def __init__(
        self,
        dim: int,
        metric: str = "l2",
        kind: str = "flat",
        *,
        nlist: int = DEFAULT_OPTIONS["ivf"]["nlist"],
        nprobe: int = DEFAULT_OPTIONS["ivf"]["nprobe"],
        M: int = DEFAULT_OPTIONS["hnsw"]["M"],  # FAISS's names for the HNSW knobs
        efConstruction: int = DEFAULT_OPTIONS["hnsw"]["efConstruction"],
        efSearch: int = DEFAULT_OPTIONS["hnsw"]["efSearch"],
        use_gpu: bool | None = None,
    ) -> None:
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS}.")
        if kind not in INDEX_KINDS:
            raise ValueError(f"Unknown index kind {kind!r}; choose one of {INDEX_KINDS}.")
        if dim < 1:
            raise ValueError(f"Index dimension must be >= 1, got {dim}.")
        for name, value in {
            "nlist": nlist,
            "nprobe": nprobe,
            "M": M,
            "efConstruction": efConstruction,
            "efSearch": efSearch,
        }.items():
            if int(value) < 1:
                raise ValueError(f"Index option {name} must be >= 1, got {value}.")
        self.dim, self.metric, self.kind = int(dim), metric, kind
        self.nlist, self.nprobe = int(nlist), int(nprobe)
        self.M, self.ef_construction, self.ef_search = int(M), int(efConstruction), int(efSearch)
        # FAISS has no GPU HNSW: that kind stays on the CPU.
        wants_gpu = gpu_available() if use_gpu is None else bool(use_gpu)
        if wants_gpu and not gpu_available():
            raise ValueError("use_gpu=True but FAISS sees no GPU; install faiss-gpu or pass use_gpu=None.")
        self.on_gpu = wants_gpu and kind != "hnsw"
        self._faiss_metric = faiss.METRIC_L2 if metric == "l2" else faiss.METRIC_INNER_PRODUCT
        self.reset()

    @property
    def ntotal(self) -> int:
        """Number of indexed vectors."""
        return 0 if self._index is None else int(self._index.ntotal)

    def reset(self) -> None:
        """Drop every vector (an IVF index is retrained on the next ``add``)."""
        if self.kind == "flat":
            flat = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
            self._index = self._maybe_gpu(flat)
        elif self.kind == "hnsw":
            self._index = faiss.IndexHNSWFlat(self.dim, self.M, self._faiss_metric)
            self._index.hnsw.efConstruction = self.ef_construction
            self._index.hnsw.efSearch = self.ef_search
        else:
            self._index = None  # IVF: built and trained on the first add, when the data size is known

    def _maybe_gpu(self, index: Any) -> Any:
        if not self.on_gpu:
            return index
        return faiss.index_cpu_to_gpu(_gpu_resources(), torch.cuda.current_device(), index)

    def _prepare(self, x: torch.Tensor | np.ndarray, name: str) -> np.ndarray:
        x = as_float32(x, self.dim, name)
        if self.metric == "cosine":
            x = x.copy()  # never normalise the caller's array in place
            faiss.normalize_L2(x)
        return x

    def _train_ivf(self, x: np.ndarray) -> None:
        nlist = self.nlist
        if len(x) < nlist * MIN_POINTS_PER_LIST:
            nlist = max(1, len(x) // MIN_POINTS_PER_LIST)
            warnings.warn(
                f"IVF index: {len(x)} vectors are too few for nlist={self.nlist} "
                f"({MIN_POINTS_PER_LIST} per list needed); using nlist={nlist}. Lower nlist in "
                "conf/bank/ivf.yaml or use the flat index for small banks.",
                stacklevel=3,
            )
        quantizer = faiss.IndexFlatL2(self.dim) if self.metric == "l2" else faiss.IndexFlatIP(self.dim)
        index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, self._faiss_metric)
        index.train(x)
        index.nprobe = min(self.nprobe, nlist)  # the FAISS wrapper keeps `quantizer` alive with `index`
        self._index = self._maybe_gpu(index)

    def add(self, x: torch.Tensor | np.ndarray) -> None:
        """Index the rows of ``x`` (N, dim), ids continuing from ``ntotal``; IVF trains on the first add."""
        x = self._prepare(x, "vectors")
        if len(x) == 0:
            return
        if self._index is None:
            self._train_ivf(x)
        self._index.add(x)

    def search(
        self, queries: torch.Tensor | np.ndarray, k: int, subset: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """The ``k`` nearest indexed vectors of each query: (dist (Q, k) float32, ids (Q, k) int64).

        ``subset`` (ids) restricts the candidates with a FAISS ID selector; CPU indexes only.
        """
        q = self._prepare(queries, "queries")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        if self.ntotal == 0:
            raise ValueError("The index is empty; add vectors before searching it.")
        if self.kind == "ivf":
            self._index.nprobe = min(self.nprobe, self._index.nlist)  # `nprobe` may change between searches
        params = self._search_params(k, subset)
        dist, ids = self._index.search(q, k) if params is None else self._index.search(q, k, params=params)
        return self._to_distance(dist, ids), ids.astype(np.int64, copy=False)

    def _search_params(self, k: int, subset: np.ndarray | None) -> Any:
        if subset is None and self.kind != "hnsw":
            return None  # flat needs none; IVF has nprobe set on the index
        if subset is not None and self.on_gpu:
            raise ValueError(
                "Candidate subsets are not supported by GPU FAISS indexes; search the subset exactly."
            )
        # A filter keeping a fraction f of the vectors leaves ~f of what the search visits: widen the
        # search by 1/f so filtered recall stays close to unfiltered recall.
        widen = 1 if subset is None else -(-self.ntotal // max(1, len(subset)))
        if self.kind == "hnsw":
            params = faiss.SearchParametersHNSW(efSearch=min(max(self.ef_search, k) * widen, self.ntotal))
        elif self.kind == "ivf":
            params = faiss.SearchParametersIVF(nprobe=min(self.nprobe * widen, self._index.nlist))
        else:
            params = faiss.SearchParameters()
        if subset is not None:
            selector = faiss.IDSelectorBatch(np.ascontiguousarray(subset, dtype=np.int64))
            params.sel = selector
            params.selector_ref = selector  # SWIG does not keep the selector alive on its own
        return params

    def _to_distance(self, raw: np.ndarray, ids: np.ndarray) -> np.ndarray:
        if self.metric == "ip":
            dist = -raw
        elif self.metric == "cosine":
            dist = 1.0 - raw
        else:
            dist = raw
        dist = dist.astype(np.float32, copy=False)
        dist[ids < 0] = np.inf
        return dist


def build_index(dim: int, metric: str = "l2", kind: str = "flat", **options: Any) -> FaissIndex:
    """Build an empty FAISS index of ``kind`` (flat | ivf | hnsw) for ``metric`` (l2 | cosine | ip).

    Options: ivf ``nlist``, ``nprobe``; hnsw ``M``, ``efConstruction``, ``efSearch``; any kind ``use_gpu``
    (None = GPU when FAISS has one and CUDA is present). Unknown options raise ValueError.
    """
    if kind not in INDEX_KINDS:
        raise ValueError(f"Unknown index kind {kind!r}; choose one of {INDEX_KINDS}.")
    allowed = set(DEFAULT_OPTIONS[kind]) | {"use_gpu"}
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Unknown option(s) {unknown} for a {kind} index; allowed: {sorted(allowed)}.")
    return FaissIndex(dim, metric, kind, **options)


def exact_search(
    queries: torch.Tensor | np.ndarray, base: torch.Tensor | np.ndarray, k: int, metric: str = "l2"
) -> tuple[np.ndarray, np.ndarray]:
    """Exact k-nearest rows of ``base`` (N, D) for each query, with the same kernel as a flat index."""
    base = as_float32(base, int(base.shape[-1]), "base vectors")
    index = build_index(base.shape[1], metric, "flat")
    index.add(base)
    return index.search(queries, k)
