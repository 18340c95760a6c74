"""Classification heads that map pooled features to class logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CosineLinear(nn.Module):
    """Cosine classifier: ``scale * cos(feature, class weight)``; ``weight`` is (C, F) like ``nn.Linear``."""

    def __init__(self, in_features: int, out_features: int, scale: float = 16.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(self.weight, std=0.01)
        self.bias = None
        self.scale = scale

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.scale * F.normalize(features, dim=-1) @ F.normalize(self.weight, dim=-1).T  # (B, C)


def build_head(kind: str, in_features: int, num_classes: int, scale: float = 16.0) -> nn.Module:
    """``linear`` or ``cosine`` classifier head."""
    if kind == "linear":
        return nn.Linear(in_features, num_classes)
    if kind == "cosine":
        return CosineLinear(in_features, num_classes, scale=scale)
    raise ValueError(f"classifier head {kind!r} is unknown: use 'linear' or 'cosine'")


class CBCHead(nn.Module):
    """Classification-by-components head (Saralajew et al., AAAI 2025; si-cim/cbc-aaai-2025 ``SlimCBC``).

    Detection probabilities d (B, K) of K components give class probabilities
    ``p_c = sum_k d_k r+_kc + (1 - d_k) r-_kc``: component k detected is evidence for c with positive
    reasoning ``r+``, component k absent with negative reasoning ``r-``. ``(r+, r-)`` are one softmax over all
    2K entries of each class's column (so each class's reasoning sums to 1 and ``p_c`` lies in [0, 1]),
    initialised as the reference: ``0.6 - 0.2 N(0, 1)`` before the softmax. ``weight`` (C, K) = ``r+ - r-``
    shows, per class, which components speak for (> 0) or against (< 0) it.
    """

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.reasoning = nn.Parameter(0.6 - 0.2 * torch.randn(2 * in_features, out_features))  # (2K, C)
        self.in_features, self.out_features = in_features, out_features

    def reasoning_probabilities(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positive and negative reasoning (K, C) each."""
        r = torch.softmax(self.reasoning, dim=0).view(2, self.in_features, self.out_features)
        return r[0], r[1]

    @property
    def weight(self) -> torch.Tensor:
        """(C, K) ``r+ - r-``: the linear part of the head (class probability = d @ weight.T + bias)."""
        positive, negative = self.reasoning_probabilities()
        return (positive - negative).T

    def forward(self, detections: torch.Tensor) -> torch.Tensor:
        positive, negative = self.reasoning_probabilities()
        return detections @ (positive - negative) + negative.sum(dim=0)  # (B, C) probabilities


class RBFHead(nn.Module):
    """The deep RBF network's head (same paper, ``NonNegLinear(softmax_pool=True)``): every class score is a
    convex combination of the component detections, ``d @ softmax(W, dim=1).T`` with W (C, K) initialised
    N(1, 0.1) as the reference; ``normalization`` (fixed 2, the reference's frozen multiplier) is the exponent
    the loss applies, ``log1p(score ** 2)``, before the softmax cross-entropy."""

    def __init__(self, in_features: int, out_features: int, normalization: float = 2.0) -> None:
        super().__init__()
        self.raw_weight = nn.Parameter(1.0 + 0.1 * torch.randn(out_features, in_features))  # (C, K)
        self.normalization = normalization

    @property
    def weight(self) -> torch.Tensor:
        """(C, K) the convex weights of every class over the components."""
        return torch.softmax(self.raw_weight, dim=1)

    def forward(self, detections: torch.Tensor) -> torch.Tensor:
        return detections @ self.weight.T  # (B, C) in [0, 1]
