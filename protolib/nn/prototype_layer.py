"""The prototype layer: every spatial patch of a feature map scored against every prototype of a bank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from protolib.bank import PrototypeBank
from protolib.nn.similarity import Similarity


@dataclass
class PrototypeActivations:
    """What the prototype layer computes for a batch; similarities are derived on demand."""

    distances: torch.Tensor  # (B, P, H, W) distance of every patch to every prototype
    min_distances: torch.Tensor  # (B, P) distance of the nearest patch (min-pooled over locations)
    similarity: Similarity
    # (B, P) min-pooled distances the cluster / separation costs use; the same tensor as min_distances
    # unless the similarity's cost distances differ from its head distances (TesNet: cosine vs projection)
    cost_min_distances: torch.Tensor

    @property
    def similarities(self) -> torch.Tensor:
        """(B, P) similarity of each prototype's best patch: max-pooled similarity maps."""
        return self.similarity.similarity(self.min_distances)

    @property
    def similarity_maps(self) -> torch.Tensor:
        """(B, P, H, W) similarity of every patch to every prototype."""
        return self.similarity.similarity(self.distances)


class PrototypeLayer(nn.Module):
    """Prototypes of shape D x 1 x 1 held by a :class:`PrototypeBank`, compared with every patch.

    Min-pooling distances before the (monotonically decreasing) activation equals max-pooling similarity
    maps, and is cheaper: the activation is applied to (B, P) values instead of (B, P, H, W).
    """

    def __init__(self, bank: PrototypeBank, similarity: Similarity) -> None:
        super().__init__()
        if bank.metric != similarity.metric:
            raise ValueError(
                f"prototype bank metric {bank.metric!r} does not match the similarity's "
                f"{similarity.metric!r}: push would search with another distance than the model trains with"
            )
        self.bank = bank
        self.similarity = similarity

    @property
    def num_prototypes(self) -> int:
        return self.bank.num_prototypes

    def forward(self, features: torch.Tensor) -> PrototypeActivations:
        prototypes = self.bank.vectors  # (P, D)
        distances = self.similarity.distances(features, prototypes)  # (B, P, H, W)
        min_distances = distances.flatten(2).min(dim=2).values  # (B, P)
        cost = self.similarity.cost_distances(features, prototypes, distances)  # (B, P, H, W)
        cost_min = min_distances if cost is distances else cost.flatten(2).min(dim=2).values  # (B, P)
        return PrototypeActivations(distances, min_distances, self.similarity, cost_min)
