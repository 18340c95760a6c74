"""Shared helpers of the prototype-network tests: a tiny ProtoPNet on three digit classes, a quiet trainer."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
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


def make_trainer(tmp_path: Path, callbacks: list[L.Callback], **kwargs: Any) -> L.Trainer:
    """A quiet CPU trainer of 2 train / 1 val batches per epoch, no logger, no checkpoints."""
    options = {
        "accelerator": "cpu",
        "limit_train_batches": 2,
        "limit_val_batches": 1,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "num_sanity_val_steps": 0,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
        "max_epochs": 1,
        **kwargs,
    }
    return L.Trainer(callbacks=callbacks, **options)
