"""The plain baseline LightningModule: proves the pipeline before the prototype families."""

from __future__ import annotations

import torch
from torch import nn

from protolib.lit.classifier import ClassifierModule, OptimizerFactory, SchedulerFactory
from protolib.models.baseline import BaselineNet


class BaselineClassifier(ClassifierModule):
    """Backbone + linear/cosine classifier trained with cross-entropy."""

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "small_cnn",
        pretrained: bool = False,
        head: str = "linear",
        dropout: float = 0.0,
        cosine_scale: float = 16.0,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer=optimizer, scheduler=scheduler)
        self.net = BaselineNet(num_classes, in_channels, backbone, pretrained, head, dropout, cosine_scale)
        self.prototype_bank = None

    @property
    def last_layer(self) -> nn.Module:
        return self.net.last_layer

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return self.net.extract(images)
