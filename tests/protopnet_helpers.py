"""A tiny ProtoPNet on three digit classes, shared by the ProtoPNet and explanation tests."""

from __future__ import annotations

from typing import Any

import torch

from protolib.data.digits import DigitsDataModule
from protolib.lit.callbacks.protopnet import ProtoPNetSchedule
from protolib.lit.protopnet import ProtoPNetModule
from protolib.models.protopnet import ProtoPNet

PER_CLASS = 2
TINY = {"train_epochs": 3, "warm_epochs": 1, "push_start": 1, "push_every": 2, "last_layer_epochs": 1}
# epochs: 0 warm, 1 joint, 2 push + last layer, 3 joint


def tiny_digits() -> DigitsDataModule:
    """Digits 0-2 at 16 px, set up."""
    dm = DigitsDataModule(image_size=16, batch_size=32, classes=[0, 1, 2], seed=0)
    dm.setup("fit")
    return dm


def make_module(**schedule: Any) -> ProtoPNetModule:
    """A seeded small-CNN ProtoPNet with PER_CLASS 8-d prototypes per class and the TINY schedule."""
    torch.manual_seed(0)
    net = ProtoPNet(
        num_classes=3,
        in_channels=1,
        image_size=16,
        backbone="small_cnn",
        prototypes_per_class=PER_CLASS,
        prototype_dim=8,
    )
    return ProtoPNetModule(net, schedule=ProtoPNetSchedule(**{**TINY, **schedule}))
