"""Patch-to-prototype distances and the distance -> similarity activations of ProtoPNet.

A similarity function turns a feature map ``(B, D, H, W)`` and prototypes ``(P, D)`` into a distance map
``(B, P, H, W)`` and maps distances to similarities; prototype layers and losses only use this interface, so
a variant swaps the metric (or the activation) by swapping this object.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank.distances import squared_l2


class Similarity(Protocol):
    """What a prototype layer needs of a similarity: its bank metric, distance maps, the distance ->
    similarity map, and the distances the cluster / separation costs use."""

    metric: str

    def distances(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor: ...

    def similarity(self, distances: torch.Tensor) -> torch.Tensor: ...

    def cost_distances(
        self, features: torch.Tensor, prototypes: torch.Tensor, distances: torch.Tensor
    ) -> torch.Tensor: ...


def squared_l2_distances(features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distance of every spatial patch to every prototype: (B, D, H, W), (P, D) -> (B, P, H, W).

    The bank's kernel (:func:`protolib.bank.distances.squared_l2`) on the patches, so training and push
    measure the same distance.
    """
    if features.dim() != 4 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"expected features (B, D, H, W) and prototypes (P, D) with the same D, got "
            f"{tuple(features.shape)} and {tuple(prototypes.shape)}"
        )
    b, d, h, w = features.shape
    patches = features.permute(0, 2, 3, 1).reshape(-1, d)  # (B*H*W, D)
    distances = squared_l2(patches, prototypes)  # (B*H*W, P)
    return distances.view(b, h, w, -1).permute(0, 3, 1, 2)  # (B, P, H, W)


class L2Similarity(nn.Module):
    """ProtoPNet's similarity: squared L2 distance, activated by ``log((d + 1) / (d + eps))`` or ``-d``.

    ``activation="log"`` is the paper's choice (large for small distances, bounded by ``log(1/eps)``);
    ``"linear"`` is the reference code's alternative.
    """

    metric = "l2"  # the PrototypeBank metric whose distances these are (push searches with it)

    def __init__(self, activation: str = "log", epsilon: float = 1e-4) -> None:
        super().__init__()
        if activation not in {"log", "linear"}:
            raise ValueError(f"similarity activation {activation!r} is unknown: use 'log' or 'linear'")
        if epsilon <= 0:
            raise ValueError(f"similarity epsilon must be positive, got {epsilon}")
        self.activation = activation
        self.epsilon = epsilon

    def distances(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W), (P, D) -> squared L2 distances (B, P, H, W)."""
        return squared_l2_distances(features, prototypes)

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """Distances of any shape -> similarities of the same shape (monotonically decreasing)."""
        if self.activation == "log":
            return torch.log((distances + 1) / (distances + self.epsilon))
        return -distances

    def cost_distances(
        self, features: torch.Tensor, prototypes: torch.Tensor, distances: torch.Tensor
    ) -> torch.Tensor:
        """The distances the cluster / separation costs are computed on: ProtoPNet's are the head's own."""
        return distances

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, epsilon={self.epsilon}"


def prototype_blocks(prototypes: torch.Tensor, blocks: int) -> torch.Tensor:
    """(P,) which of ``blocks`` equal channel blocks each prototype (P, D) lives in (its non-zero block)."""
    p, d = prototypes.shape
    return prototypes.detach().reshape(p, blocks, d // blocks).norm(dim=2).argmax(dim=1)


class ProjectionSimilarity(nn.Module):
    """TesNet's similarity: the projection ``z . p / ||p||`` of every patch onto the unit prototype direction,
    max-pooled, with no log activation (Wang et al., ICCV 2021, "basis concepts").

    As a distance (smaller is nearer) it is ``-z . p / ||p||``: the bank's ``ip`` metric on unit-norm
    prototypes, so push picks the patch of largest projection, as the reference's push. The cluster /
    separation costs use the cosine distance ``-cos(z, p)`` instead (:meth:`cost_distances`).

    ``blocks`` > 1 splits the D channels into equal blocks holding separate embedding spaces, each prototype
    non-zero in one block only (ST-ProtoPNet's support and trivial branches side by side): the projection is
    then the projection within the prototype's block, and the cosine uses that block's patch norm.
    """

    metric = "ip"

    def __init__(self, blocks: int = 1) -> None:
        super().__init__()
        if blocks < 1:
            raise ValueError(f"projection similarity blocks must be >= 1, got {blocks}")
        self.blocks = blocks

    def distances(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W), (P, D) -> minus the projection onto each unit prototype (B, P, H, W)."""
        if features.dim() != 4 or prototypes.dim() != 2 or features.shape[1] != prototypes.shape[1]:
            raise ValueError(
                f"expected features (B, D, H, W) and prototypes (P, D) with the same D, got "
                f"{tuple(features.shape)} and {tuple(prototypes.shape)}"
            )
        if features.shape[1] % self.blocks:
            raise ValueError(f"D={features.shape[1]} channels do not split into {self.blocks} equal blocks")
        return -torch.einsum("bdhw,pd->bphw", features, F.normalize(prototypes, dim=1))

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """Distances -> projections (no activation: TesNet feeds the projections to the last layer)."""
        return -distances

    def cost_distances(
        self, features: torch.Tensor, prototypes: torch.Tensor, distances: torch.Tensor
    ) -> torch.Tensor:
        """Cosine distances ``-cos(z, p)`` (B, P, H, W) from the projection distances: divided by the norm of
        each patch (within the prototype's block), with ``F.normalize``'s 1e-12 floor."""
        b, d, h, w = features.shape
        norms = features.reshape(b, self.blocks, d // self.blocks, h, w).norm(dim=2)  # (B, blocks, H, W)
        norms = norms[:, prototype_blocks(prototypes, self.blocks)]  # (B, P, H, W)
        return distances / norms.clamp_min(1e-12)

    def extra_repr(self) -> str:
        return f"blocks={self.blocks}"


class PartCosineSimilarity(nn.Module):
    """Deformable ProtoPNet's similarity: the mean over a prototype's parts of the cosine between each part
    and the feature vector it lands on, divided by 1.01 (keeps ``arccos`` of the margin finite), ReLU-ed.

    As in the reference, ``extra_channels`` channels of value ``epsilon`` are appended to features and
    prototype parts before normalising (no zero vector has an undefined direction), and lengths are
    ``sqrt(sum x^2 + epsilon)`` (prototypes: ``+ epsilon`` once more). ``distances`` are ``1 - cosine``; push
    ranks patches by the inner product with :meth:`normalize_prototypes`, which orders them the same way.
    """

    metric = "ip"  # push: nearest = largest <patch, normalised prototype>

    def __init__(self, epsilon: float = 1e-4, extra_channels: int = 2, scale: float = 1.01) -> None:
        super().__init__()
        if epsilon <= 0 or extra_channels < 0 or scale < 1:
            raise ValueError(
                f"part cosine similarity needs epsilon > 0, extra_channels >= 0, scale >= 1; got {epsilon}, "
                f"{extra_channels}, {scale}"
            )
        self.epsilon, self.extra_channels, self.scale = epsilon, extra_channels, scale

    def _append(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        shape = list(x.shape)
        shape[dim] = self.extra_channels
        return torch.cat([x, x.new_full(shape, self.epsilon)], dim=dim)

    def normalize_features(self, features: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W) -> (B, D + e, H, W), every location's vector of unit length."""
        x = self._append(features, 1)
        return x / torch.sqrt(x.pow(2).sum(dim=1, keepdim=True) + self.epsilon)

    def normalize_prototypes(self, prototypes: torch.Tensor) -> torch.Tensor:
        """Prototypes (P, D, n) -> (P, D + e, n), every part of unit length."""
        p = self._append(prototypes, 1)
        return p / (torch.sqrt(p.pow(2).sum(dim=1, keepdim=True) + self.epsilon) + self.epsilon)

    def cosines(self, parts: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """Sampled unit feature parts (B, D + e, n, H, W) and prototypes (P, D, n) -> cosines (B, P, H, W)."""
        protos = self.normalize_prototypes(prototypes)  # (P, D + e, n)
        return torch.einsum("bdnhw,pdn->bphw", parts, protos) / (parts.shape[2] * self.scale)

    def distances(self, parts: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """``1 - cosine`` (B, P, H, W) of sampled parts (B, D + e, n, H, W) and prototypes (P, D, n)."""
        return 1 - self.cosines(parts, prototypes)

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """Distances of any shape -> ``relu(1 - d)`` (the reference's ReLU on the cosine)."""
        return torch.relu(1 - distances)

    def cost_distances(
        self, features: torch.Tensor, prototypes: torch.Tensor, distances: torch.Tensor
    ) -> torch.Tensor:
        """The costs use the head's distances (the loss reads the cosines directly)."""
        return distances

    def extra_repr(self) -> str:
        return f"epsilon={self.epsilon}, extra_channels={self.extra_channels}, scale={self.scale}"
