"""Rebuild any protolib LightningModule from a checkpoint written by train.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

from protolib.utils.config import instantiate_accepting
from protolib.utils.io import atomic_torch_save


def build_module(model_config: Any, build_args: dict[str, Any]) -> L.LightningModule:
    """Instantiate ``model_config`` passing the data-dependent ``build_args`` its constructor accepts."""
    return instantiate_accepting(model_config, **build_args)


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Load a module saved by ``train.py``; its config in the checkpoint says which class to build.

    ``module.build_config["data"]`` is the data config it was trained with.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train.py writes them to <run dir>/checkpoints/"
        )
    checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    config = checkpoint.get("protolib")
    if config is None:
        raise ValueError(
            f"checkpoint {path} has no 'protolib' entry: it was not written by protolib's train.py; "
            "load it with YourModule.load_from_checkpoint instead"
        )
    module = build_module(config["model"], config["build"])
    module.load_state_dict(checkpoint["state_dict"])
    module.build_config = config
    return module.eval()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning checkpoint I/O that writes to a temporary file and renames: no half-written checkpoints."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None
    ) -> None:
        atomic_torch_save(path, checkpoint)
