"""TesNet's training objective (Wang et al., "Interpretable Image Recognition by Constructing Transparent
Embedding Space", ICCV 2021; reference code github.com/JackeyWang96/TesNet, ``train_and_test.py``).

ProtoPNet's cross-entropy, cluster, separation and L1 terms, with cluster / separation measured by the
cosine distance ``-cos(z, p)`` (the network's ``"min_distances"``), plus two terms on the prototypes
("basis concepts") themselves: each class's basis vectors orthonormal, and the class subspaces far apart on
the Grassmann manifold. Both are written through the Gram matrix of all prototypes, which gives the
reference's numbers without its (C, C, D, D) tensor of projection-matrix differences (655 MB on CUB).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from protolib.losses.protopnet import ProtoPNetLoss


def orthonormality_cost(vectors: torch.Tensor, owners: torch.Tensor) -> torch.Tensor:
    """``sum_c || B_c B_c^T - I ||_1`` (entrywise L1) over the prototypes B_c (K_c, D) of every class c.

    ``vectors`` (P, D), ``owners`` (P,): same-class entries of the Gram matrix should be the identity.
    """
    gram = vectors @ vectors.T  # (P, P)
    same = owners[:, None] == owners[None, :]  # (P, P)
    eye = torch.eye(len(owners), dtype=gram.dtype, device=gram.device)
    return ((gram - eye) * same).abs().sum()


def subspace_separation_cost(vectors: torch.Tensor, owners: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``sum_{i<j} ||P_i - P_j||_F / sqrt(2)``: the projection (Grassmann) metric between the class
    subspaces, ``P_c = B_c^T B_c`` (D, D), summed over class pairs (the reference's
    ``0.5 * sum_{i,j} ||P_i - P_j||_F / sqrt(2)``); to be maximised (negative weight).

    ``||P_i - P_j||_F^2 = S_ii + S_jj - 2 S_ij`` with ``S_ij = ||B_i B_j^T||_F^2``, read off the squared Gram
    matrix of all prototypes. Classes without prototypes (after pruning) are left out.
    """
    gram = vectors @ vectors.T  # (P, P)
    onehot = F.one_hot(owners.long(), num_classes).to(gram.dtype)  # (P, C)
    blocks = onehot.T @ gram.pow(2) @ onehot  # (C, C): S_ij
    squared = blocks.diagonal()[:, None] + blocks.diagonal()[None, :] - 2 * blocks  # (C, C)
    present = onehot.sum(dim=0) > 0  # (C,)
    i, j = torch.triu_indices(num_classes, num_classes, offset=1, device=gram.device)
    keep = present[i] & present[j]
    pairs = squared[i[keep], j[keep]]
    return pairs.clamp_min(1e-12).sqrt().sum() / math.sqrt(2)


class TesNetLoss(ProtoPNetLoss):
    """``ce CE + cluster Clst + separation Sep + l1 L1 + orth Orth + subspace_separation SubSep``; the
    reference's ``settings_CUB.py`` weights 1, 0.8, -0.08, 1e-4, 1e-4, -1e-7 (the separation of class
    subspaces is maximised). Cluster / separation are ProtoPNet's, on the cosine distances the network gives
    as ``"min_distances"`` (its ``max_distance`` D bounds them, as in the reference)."""

    def __init__(
        self,
        cross_entropy: float = 1.0,
        cluster: float = 0.8,
        separation: float = -0.08,
        l1: float = 1e-4,
        orthonormality: float = 1e-4,
        subspace_separation: float = -1e-7,
    ) -> None:
        super().__init__(cross_entropy, cluster, separation, l1)
        self.weights.update(orth=orthonormality, subspace_separation=subspace_separation)

    def forward(
        self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, net: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """ProtoPNet's terms from ``outputs`` plus the two basis terms on ``net``'s prototypes (P, D)."""
        _, terms = super().forward(outputs, labels, net)
        vectors, owners = net.prototype_bank.vectors, net.prototype_bank.owners
        terms["orth"] = orthonormality_cost(vectors, owners)
        terms["subspace_separation"] = subspace_separation_cost(vectors, owners, net.num_classes)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms
