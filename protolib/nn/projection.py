"""Projection head onto the unit hypersphere (SimCLR, SupCon, CIDER, PALM)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ProjectionHead(nn.Module):
    """Linear-ReLU-Linear from pooled features (B, F) to an L2-normalised embedding (B, E).

    Contrastive OOD methods train the loss on this embedding and score OOD on the features below it or on
    the embedding itself; ``hidden_dim`` defaults to ``in_features`` as in the SupCon/PALM reference code.
    """

    def __init__(self, in_features: int, out_features: int = 128, hidden_dim: int | None = None) -> None:
        super().__init__()
        if in_features < 1 or out_features < 1:
            raise ValueError(f"projection sizes must be positive, got {in_features} -> {out_features}")
        hidden_dim = hidden_dim or in_features
        self.mlp = nn.Sequential(
            nn.Linear(in_features, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_features)
        )
        self.out_features = out_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(features), dim=-1)  # (B, E), unit norm
