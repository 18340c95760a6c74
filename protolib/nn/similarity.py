"""Patch-to-prototype distances and the distance -> similarity activations of ProtoPNet.

A similarity function turns a feature map ``(B, D, H, W)`` and prototypes ``(P, D)`` into a distance map
``(B, P, H, W)`` and maps distances to similarities; prototype layers and losses only use this interface, so
a variant swaps the metric (or the activation) by swapping this object.
"""

from __future__ import annotations

import torch
from torch import nn

from protolib.bank.distances import squared_l2


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

    def extra_repr(self) -> str:
        return f"activation={self.activation!r}, epsilon={self.epsilon}"
