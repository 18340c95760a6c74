"""The prototype layer: every spatial patch of a feature map scored against every prototype of a bank."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from protolib.bank import PrototypeBank
from protolib.nn.deformable import OffsetPredictor, norm_preserving_sample, part_grid, part_positions
from protolib.nn.similarity import PartCosineSimilarity, Similarity


@dataclass
class PrototypeActivations:
    """What the prototype layer computes for a batch; similarities are derived on demand."""

    distances: torch.Tensor  # (B, P, H, W) distance of every patch to every prototype
    min_distances: torch.Tensor  # (B, P) distance of the nearest patch (min-pooled over locations)
    similarity: Similarity
    # (B, P) min-pooled distances the cluster / separation costs use; the same tensor as min_distances
    # unless the similarity's cost distances differ from its head distances (TesNet: cosine vs projection)
    cost_min_distances: torch.Tensor
    offsets: torch.Tensor | None = None  # (B, 2n, H, W) deformable layers: (dy, dx) of every part

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

    def distance_maps(
        self, features: torch.Tensor, ids: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distances (B, N, H, W) of every patch to the prototypes ``ids`` (N,) only, of the bank or of
        ``vectors`` (P, D) given in its place."""
        vectors = self.bank.vectors if vectors is None else vectors
        return self.similarity.distances(features, vectors[ids.to(vectors.device)])

    def push_patches(self, features: torch.Tensor) -> torch.Tensor:
        """The candidate patches push projects prototypes onto: here the feature map itself (B, D, H, W)."""
        return features

    def push_queries(self) -> torch.Tensor:
        """The prototypes as push compares them with :meth:`push_patches`: the bank's vectors (P, D)."""
        return self.bank.vectors


class DeformablePrototypeLayer(nn.Module):
    """Deformable ProtoPNet's prototype layer: prototypes of ``kh x kw`` parts (D channels each; the bank
    holds them flattened as (P, D * n), channel-major) whose parts move by offsets predicted from the input.

    At every location the parts are placed on the ``dilation``-spaced grid centred there plus their offsets,
    features are sampled there by norm-preserving interpolation (:mod:`protolib.nn.deformable`) and compared
    with :class:`PartCosineSimilarity`. Offsets are shared by all prototypes (the reference's one deformable
    group), so the sampled parts at a location are one candidate patch for every prototype: push ranks them
    through the bank like ProtoPNet's 1 x 1 patches.
    """

    def __init__(
        self,
        bank: PrototypeBank,
        channels: int,
        similarity: PartCosineSimilarity | None = None,
        parts: tuple[int, int] = (2, 2),
        dilation: int = 2,
        offset_hidden: int = 128,
        feature_length: float = 64.0,
    ) -> None:
        super().__init__()
        self.similarity = similarity or PartCosineSimilarity()
        self.parts = (int(parts[0]), int(parts[1]))
        grid, self.padding = part_grid(self.parts, dilation)
        self.register_buffer("grid", grid, persistent=False)  # (n, 2) undeformed part positions
        self.dilation, self.channels, self.feature_length = dilation, channels, feature_length
        if bank.metric != self.similarity.metric or bank.dim != channels * self.num_parts:
            raise ValueError(
                f"deformable prototype bank must have metric {self.similarity.metric!r} and dim channels x "
                f"parts = {channels} x {self.num_parts}, got {bank.metric!r} and {bank.dim}"
            )
        self.bank = bank
        self.offset_predictor = OffsetPredictor(
            channels + self.similarity.extra_channels, self.parts, hidden=offset_hidden
        )

    @property
    def num_parts(self) -> int:
        return self.parts[0] * self.parts[1]

    @property
    def num_prototypes(self) -> int:
        return self.bank.num_prototypes

    def prototype_parts(self) -> torch.Tensor:
        """The bank's vectors as (P, D, n)."""
        return self.bank.vectors.view(-1, self.channels, self.num_parts)

    def sample(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Feature map (B, D, H, W) -> unit-length sampled parts (B, D + e, n, H, W), offsets (B, 2n, H, W)
        and part positions (B, n, H, W, 2) (row, col) in feature-map pixels."""
        unit = self.similarity.normalize_features(features)  # (B, D + e, H, W)
        # The reference scales locations to length 64 / sqrt(n) before predicting offsets from them.
        offsets = self.offset_predictor(unit * (self.feature_length / self.num_parts**0.5))
        positions = part_positions(offsets, self.grid)
        return norm_preserving_sample(unit, positions), offsets, positions

    def forward(self, features: torch.Tensor) -> PrototypeActivations:
        parts, offsets, _ = self.sample(features)
        distances = self.similarity.distances(parts, self.prototype_parts())  # (B, P, H, W)
        min_distances = distances.flatten(2).min(dim=2).values  # (B, P)
        return PrototypeActivations(distances, min_distances, self.similarity, min_distances, offsets)

    def distance_maps(
        self, features: torch.Tensor, ids: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distances (B, N, H, W) of every location's deformed parts to the prototypes ``ids`` (N,) only, of
        the bank or of ``vectors`` (P, D * n) given in its place."""
        parts, _, _ = self.sample(features)
        vectors = self.bank.vectors if vectors is None else vectors
        prototypes = vectors.view(-1, self.channels, self.num_parts)[ids.to(vectors.device)]
        return self.similarity.distances(parts, prototypes)

    def push_patches(self, features: torch.Tensor) -> torch.Tensor:
        """Candidate patches for push (B, D * n, H, W): the sampled unit parts, extra channels dropped."""
        parts, _, _ = self.sample(features)
        b, _, n, h, w = parts.shape
        return parts[:, : self.channels].reshape(b, self.channels * n, h, w)

    def push_queries(self) -> torch.Tensor:
        """Prototypes as push compares them with :meth:`push_patches` (P, D * n): parts normalised."""
        normalised = self.similarity.normalize_prototypes(self.prototype_parts())[:, : self.channels]
        return normalised.reshape(self.num_prototypes, -1)


class PresenceSimilarity(nn.Module):
    """Distances ``1 - detection probability`` -> similarity ``1 - d`` (the detection probability itself)."""

    metric = "ip"

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        return 1 - distances

    def cost_distances(
        self, features: torch.Tensor, prototypes: torch.Tensor, distances: torch.Tensor
    ) -> torch.Tensor:
        return distances


class DetectionLayer(nn.Module):
    """Detection probabilities of K components at every location (deep CBC / PIP-Net): the softmax over the
    components of ``<z, w_k>`` (a 1 x 1 convolution whose K weight vectors live in the bank), so that every
    location's probabilities sum to one. Distances are ``1 - probability``."""

    def __init__(self, bank: PrototypeBank) -> None:
        super().__init__()
        self.bank = bank
        self.similarity = PresenceSimilarity()

    @property
    def num_prototypes(self) -> int:
        return self.bank.num_prototypes

    def presence(self, features: torch.Tensor, vectors: torch.Tensor | None = None) -> torch.Tensor:
        """(B, D, H, W) -> detection probabilities (B, K, H, W), softmax over K."""
        vectors = self.bank.vectors if vectors is None else vectors
        return torch.softmax(torch.einsum("bdhw,kd->bkhw", features, vectors), dim=1)

    def forward(self, features: torch.Tensor) -> PrototypeActivations:
        distances = 1 - self.presence(features)  # (B, K, H, W)
        min_distances = distances.flatten(2).min(dim=2).values  # (B, K): 1 - max-pooled presence
        return PrototypeActivations(distances, min_distances, self.similarity, min_distances)

    def distance_maps(
        self, features: torch.Tensor, ids: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Distances (B, N, H, W) to components ``ids``: the softmax still runs over all K components."""
        return 1 - self.presence(features, vectors)[:, ids.to(features.device)]

    def push_patches(self, features: torch.Tensor) -> torch.Tensor:
        return features

    def push_queries(self) -> torch.Tensor:
        return self.bank.vectors
