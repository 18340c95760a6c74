"""The prototype bank shared by every model family, and its FAISS index factory."""

from protolib.bank.bank import METADATA, PrototypeBank
from protolib.bank.distances import pairwise_distances, squared_l2
from protolib.bank.index import INDEX_KINDS, METRICS, FaissIndex, build_index, exact_search
from protolib.bank.push import PushResult

__all__ = [
    "INDEX_KINDS",
    "METADATA",
    "METRICS",
    "FaissIndex",
    "PrototypeBank",
    "PushResult",
    "build_index",
    "exact_search",
    "pairwise_distances",
    "squared_l2",
]
