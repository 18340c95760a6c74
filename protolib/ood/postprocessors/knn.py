"""Deep nearest neighbours (Sun et al., 2022): distance to the k-th nearest L2-normalised training feature."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank.index import build_index
from protolib.ood.features import FeatureSource
from protolib.ood.postprocessors.base import Postprocessor


class KNN(Postprocessor):
    """Score = -(Euclidean distance to the k-th nearest L2-normalised training feature), k = 50 (OpenOOD knn).

    OpenOOD negates FAISS's *squared* distance; the square root changes no metric (it is monotone) and keeps
    the score a distance. The index comes from the prototype bank's factory: ``index="flat"`` is exact, "ivf"
    and "hnsw" are approximate for millions of training features; ``index_options`` go to ``build_index``.
    """

    name = "knn"
    fit_split = "train"

    def __init__(
        self,
        k: int = 50,
        index: str = "flat",
        index_options: Mapping[str, Any] | None = None,
        feature_key: str = "features",
    ) -> None:
        if k < 1:
            raise ValueError(f"knn k must be >= 1, got {k}")
        self.k, self.index, self.feature_key = int(k), index, feature_key
        self.index_options = dict(index_options or {})
        self.requires = (feature_key,)
        self._index: Any = None
        self._k_used: int | None = None

    def _fit(self, model: nn.Module, source: FeatureSource) -> None:
        # one add with every training vector: an IVF index trains its lists on the first add
        chunks = [F.normalize(chunk[self.feature_key].float(), dim=1, eps=1e-10) for chunk in source]
        if not chunks or sum(len(c) for c in chunks) == 0:
            raise ValueError("knn fit data is empty: it needs in-distribution training features")
        train = torch.cat(chunks)  # (N, D) unit vectors
        del chunks
        self._index = build_index(train.shape[1], metric="l2", kind=self.index, **self.index_options)
        self._index.add(train)
        self._k_used = min(self.k, self._index.ntotal)
        if self._k_used < self.k:
            warnings.warn(
                f"knn: k={self.k} but only {self._index.ntotal} training features; using k={self._k_used}",
                stacklevel=2,
            )

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        index = self._require_fitted("_index")
        x = F.normalize(outputs[self.feature_key].float(), dim=1, eps=1e-10)
        squared, _ = index.search(x, self._k_used)  # (B, k), ascending; inf where fewer than k were found
        kth = torch.from_numpy(squared[:, -1])
        if not torch.isfinite(kth).all():
            raise ValueError(
                f"the {self.index} index found fewer than k={self._k_used} neighbours for some queries; "
                f"raise "
                "index_options.nprobe (ivf) or efSearch (hnsw), or use index=flat"
            )
        return -kth.clamp_min(0.0).sqrt()
