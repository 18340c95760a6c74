"""Deformable ProtoPNet's objective (Donnelly et al., CVPR 2022; jdonnelly36/Deformable-ProtoPNet).

``CE_margin - 0.8 Clst + 0.08 Sep + 1e-2 L1 + 0.8 ||offsets|| + 0.1 L_orth`` (the reference's settings.py):
cross-entropy on logits whose wrong-class prototype similarities are raised by the subtractive margin
``cos(max(arccos(s) - m, 0))`` (m = 0.1); cluster / separation are the largest (margin-ed) similarity to
an own- / other-class prototype (similarities: cluster is maximised, hence its negative weight); L_orth asks
the parts of a class's prototypes to be orthonormal.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protolib.losses.protopnet import class_identity, wrong_class_l1


def subtractive_margin(cosines: torch.Tensor, wrong: torch.Tensor, margin: float) -> torch.Tensor:
    """``relu(cos(relu(arccos(c) - margin * wrong)))``: cosines (B, P) with the angle to wrong-class
    prototypes (``wrong`` (B, P) in {0, 1}) shrunk by ``margin`` radians: their similarity raised."""
    angles = torch.arccos(cosines.clamp(-1.0, 1.0))
    return torch.relu(torch.cos(torch.relu(angles - margin * wrong)))


def part_orthogonality(prototypes: torch.Tensor, owners: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    """``|| stack_c (W_c^T W_c - I) ||_F`` over classes c, where the columns of W_c (D, K_c n) are the unit
    parts of class c's prototypes (P, D, n): the parts of one class's prototypes should be orthonormal.

    The paper's per-class grouping; the reference code groups blocks of C consecutive prototypes instead
    (``view(K, C, ...)`` on class-major prototypes), which mixes classes: we follow the paper.
    """
    norms = torch.sqrt(prototypes.pow(2).sum(dim=1, keepdim=True) + epsilon) + epsilon
    unit = (prototypes / norms).transpose(1, 2)  # (P, n, D)
    counts = torch.bincount(owners)
    present = counts[counts > 0]
    if bool((present == present[0]).all()):  # equal counts: one batched product
        order = torch.argsort(owners, stable=True)
        groups = unit[order].reshape(len(present), -1, unit.shape[-1])  # (C, K n, D)
        gram = groups @ groups.transpose(1, 2)  # (C, K n, K n)
        eye = torch.eye(gram.shape[-1], device=gram.device, dtype=gram.dtype)
        return torch.linalg.norm((gram - eye).flatten())
    total = unit.new_zeros(())
    for owner in owners.unique():
        group = unit[owners == owner].reshape(-1, unit.shape[-1])  # (K_c n, D)
        eye = torch.eye(group.shape[0], device=group.device, dtype=group.dtype)
        total = total + (group @ group.T - eye).pow(2).sum()
    return total.sqrt()


class DeformableProtoPNetLoss(nn.Module):
    """Weighted sum of the terms above; defaults are the reference's coefficients and margin.

    Reads from ``outputs``: ``"prototype_cosine"`` (B, P) the best patch's cosine before the ReLU,
    ``"offsets"`` (B, 2n, H, W); from ``net``: ``last_layer``, ``prototype_bank.owners``, ``num_classes`` and
    ``prototype_layer.prototype_parts()``. The offset term is ``||offsets||_F`` of the batch, with gradient
    (the reference computes it under ``no_grad``, so there it is logged but never trained on).
    """

    def __init__(
        self,
        cross_entropy: float = 1.0,
        cluster: float = -0.8,
        separation: float = 0.08,
        l1: float = 1e-2,
        offset: float = 0.8,
        orthogonality: float = 0.1,
        margin: float = 0.1,
    ) -> None:
        super().__init__()
        if margin < 0:
            raise ValueError(f"subtractive margin must be >= 0 radians, got {margin}")
        self.margin = margin
        self.weights = {
            "ce": cross_entropy,
            "cluster": cluster,
            "separation": separation,
            "l1": l1,
            "offset": offset,
            "orthogonality": orthogonality,
        }

    def forward(
        self, outputs: dict[str, torch.Tensor], labels: torch.Tensor, net: Any
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted terms."""
        owners = net.prototype_bank.owners
        identity = class_identity(owners, net.num_classes).to(outputs["prototype_cosine"].dtype)  # (P, C)
        own = identity[:, labels].T  # (B, P)
        activations = subtractive_margin(outputs["prototype_cosine"], 1 - own, self.margin)  # (B, P)
        terms = {
            "ce": F.cross_entropy(net.last_layer(activations), labels),
            "cluster": (activations * own).max(dim=1).values.mean(),
            "separation": (activations * (1 - own)).max(dim=1).values.mean(),
            "l1": wrong_class_l1(net.last_layer.weight, identity),
            "offset": torch.linalg.norm(outputs["offsets"].flatten()),
            "orthogonality": part_orthogonality(net.prototype_layer.prototype_parts(), owners),
        }
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

    def extra_repr(self) -> str:
        return f"margin={self.margin}, " + ", ".join(f"{k}={v}" for k, v in self.weights.items())
