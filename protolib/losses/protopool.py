"""ProtoPool's objective: cross-entropy, cluster and separation over the prototypes a class has chosen, L1 on
the last layer's wrong-class weights, and the orthogonality of a class's slot assignments.

As the reference (``main.py``): the cluster cost of an image is the distance of its nearest prototype among
the K its class's slots weigh most (``dist_loss`` with the top-K of ``sum_k q_ck``), the separation cost
that among the other M - K, both through ProtoPNet's masked "max_dist - max((max_dist - d) * mask)".
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from protolib.losses.protopnet import _masked_min_distance
from protolib.nn.slots import orthogonality_loss


def top_prototype_mask(assignment: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """(B, M) 1 for the ``k`` pool prototypes the slots of each image's class weigh most (assignment
    (C, M, K) summed over slots, detached), 0 elsewhere."""
    weight = assignment[labels].sum(dim=-1).detach()  # (B, M)
    mask = torch.zeros_like(weight)
    return mask.scatter_(1, weight.topk(k, dim=1).indices, 1.0)


class ProtoPoolLoss(nn.Module):
    """``ce * CE + cluster * Clst + separation * Sep + l1 * L1 + orthogonality * L_orth``
    (reference: 1, 0.8, -0.08, 1e-4, 1)."""

    def __init__(
        self,
        cross_entropy: float = 1.0,
        cluster: float = 0.8,
        separation: float = -0.08,
        l1: float = 1e-4,
        orthogonality: float = 1.0,
    ) -> None:
        super().__init__()
        self.weights = {
            "ce": cross_entropy,
            "cluster": cluster,
            "separation": separation,
            "l1": l1,
            "orthogonality": orthogonality,
        }

    def forward(
        self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, net: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total and unweighted terms from :meth:`ProtoPool.extract` (``logits``, ``min_distances`` (B, M),
        ``assignment`` (C, M, K)) and the network (slot logits, last layer, ``max_distance``)."""
        assignment, min_distances = outputs["assignment"], outputs["min_distances"]
        m, k = assignment.shape[1], assignment.shape[2]
        own = top_prototype_mask(assignment, labels, k)  # (B, M)
        other = top_prototype_mask(1 - assignment, labels, m - k) if m > k else torch.zeros_like(own)
        slot_class = net.slot_classes()  # (C*K,) class of every last-layer input
        wrong = 1 - F.one_hot(slot_class, net.num_classes).T.to(net.last_layer.weight.dtype)  # (C, C*K)
        terms = {
            "ce": F.cross_entropy(outputs["logits"], labels),
            "cluster": _masked_min_distance(min_distances, own, net.max_distance).mean(),
            "separation": _masked_min_distance(min_distances, other, net.max_distance).mean(),
            "l1": (net.last_layer.weight * wrong).abs().sum(),
            "orthogonality": orthogonality_loss(net.assignment.logits),
        }
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
