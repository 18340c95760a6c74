"""The plain baseline: backbone, global pooling, linear or cosine classifier."""

from __future__ import annotations

import torch
from torch import nn

from protolib.nn.backbones import build_backbone
from protolib.nn.heads import build_head


class BaselineNet(nn.Module):
    """Backbone + pooled features + classifier; the reference point every prototype family is compared to."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "small_cnn",
        pretrained: bool = False,
        head: str = "linear",
        dropout: float = 0.0,
        cosine_scale: float = 16.0,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.prototype_bank = None  # no prototypes: the reference point
        self.backbone = build_backbone(backbone, pretrained=pretrained, in_chans=in_channels, pooled=True)
        self.dropout = nn.Dropout(dropout)
        self.last_layer = build_head(head, self.backbone.out_channels, num_classes, scale=cosine_scale)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` (B, F) pooled backbone output and ``logits`` (B, C)."""
        features = self.backbone(images)  # (B, F)
        return {"features": features, "logits": self.last_layer(self.dropout(features))}
