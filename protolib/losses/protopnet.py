"""ProtoPNet's training objective: cross-entropy + cluster + separation + L1 on wrong-class connections.

Written as in the paper's code: cluster and separation are the distance to the nearest own-class (resp.
other-class) prototype, computed through the "max similarity" ``max_dist - max((max_dist - d) * mask)`` with
``max_dist = D`` (the largest squared distance between sigmoid features and prototypes in [0, 1]^D).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn


def class_identity(owners: torch.Tensor, num_classes: int) -> torch.Tensor:
    """One-hot prototype -> class matrix (P, C) from the bank's owners (P,)."""
    return F.one_hot(owners.long(), num_classes).to(torch.float32)


def _masked_min_distance(min_distances: torch.Tensor, mask: torch.Tensor, max_dist: float) -> torch.Tensor:
    """Per image, ``max_dist - max_p((max_dist - d_p) * mask_p)``: the masked nearest-prototype distance."""
    inverted, _ = torch.max((max_dist - min_distances) * mask, dim=1)  # (B,)
    return max_dist - inverted


def cluster_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor, max_dist: float
) -> torch.Tensor:
    """Mean over images of the distance to the nearest prototype of the image's own class.

    ``min_distances`` (B, P) are each prototype's smallest patch distance; ``identity`` (P, C) one-hot.
    """
    own = identity[:, labels].T  # (B, P): 1 where the prototype belongs to the image's class
    return _masked_min_distance(min_distances, own, max_dist).mean()


def separation_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor, max_dist: float
) -> torch.Tensor:
    """Mean over images of the distance to the nearest prototype of any other class (to be pushed up)."""
    other = 1 - identity[:, labels].T  # (B, P)
    return _masked_min_distance(min_distances, other, max_dist).mean()


def prototype_cluster_cost(
    min_distances: torch.Tensor, labels: torch.Tensor, identity: torch.Tensor
) -> torch.Tensor:
    """Mean over prototypes of the distance to their nearest patch among the batch's images of their class.

    The paper's cluster cost pulls only each image's *nearest* own-class prototype, so prototypes that are
    nobody's nearest get no pull toward their class's patches; they drift away from the data and push then
    lands them on whatever patch happens to be nearest (often background, or one patch shared by several of
    them). This term gives every prototype that pull. Prototypes of classes absent from the batch are skipped.
    """
    own = identity[:, labels].T.bool()  # (B, P)
    nearest = min_distances.masked_fill(~own, float("inf")).min(dim=0).values  # (P,)
    present = torch.isfinite(nearest)
    if not present.any():
        return min_distances.sum() * 0.0
    return nearest[present].mean()


def wrong_class_l1(last_layer_weight: torch.Tensor, identity: torch.Tensor) -> torch.Tensor:
    """L1 norm of the last-layer weights (C, P) that connect prototypes to classes they do not belong to."""
    return (last_layer_weight * (1 - identity.T)).abs().sum()


class ProtoPNetLoss(nn.Module):
    """Weighted sum ``ce * CE + cluster * Clst + separation * Sep + l1 * L1`` (paper: 1, 0.8, -0.08, 1e-4).

    The separation weight is negative: larger distances to other classes' prototypes lower the loss.
    ``prototype_cluster`` (not in the paper; 0 = the paper's loss) adds :func:`prototype_cluster_cost`.
    """

    def __init__(
        self,
        cross_entropy: float = 1.0,
        cluster: float = 0.8,
        separation: float = -0.08,
        l1: float = 1e-4,
        prototype_cluster: float = 0.0,
    ) -> None:
        super().__init__()
        self.weights = {"ce": cross_entropy, "cluster": cluster, "separation": separation, "l1": l1}
        if prototype_cluster:
            self.weights["prototype_cluster"] = prototype_cluster

    def forward(
        self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, net: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted terms from the network's ``extract`` outputs (``logits`` (B, C),
        ``min_distances`` (B, P)), labels (B,) and the network (prototype owners (P,), last-layer weight
        (C, P), ``max_distance``)."""
        logits, min_distances = outputs["logits"], outputs["min_distances"]
        identity = class_identity(net.owners, logits.shape[1]).to(min_distances.dtype)  # (P, C)
        max_dist = net.max_distance
        terms = {
            "ce": F.cross_entropy(logits, labels),
            "cluster": cluster_cost(min_distances, labels, identity, max_dist),
            "separation": separation_cost(min_distances, labels, identity, max_dist),
            "l1": wrong_class_l1(net.last_layer.weight, identity),
        }
        if "prototype_cluster" in self.weights:
            terms["prototype_cluster"] = prototype_cluster_cost(min_distances, labels, identity)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
