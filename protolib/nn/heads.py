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
