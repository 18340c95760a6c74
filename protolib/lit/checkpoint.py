"""Rebuild any protolib LightningModule from a checkpoint written by train.py."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
from omegaconf import DictConfig, OmegaConf

from protolib.utils.config import instantiate_accepting
from protolib.utils.io import atomic_torch_save

# Version of the checkpoint's "protolib" entry: 2 = the network is the model config's ``net`` node.
CHECKPOINT_FORMAT = 2


def build_module(model_config: Mapping[str, Any], build_args: dict[str, Any]) -> L.LightningModule:
    """Build the network from ``model_config["net"]`` with the data-dependent ``build_args`` it accepts
    (classes, channels, image size), then the training recipe (the rest of ``model_config``) around it."""
    model_config = _plain(model_config)  # interpolations (${bank}, ${trainer...}) resolved first
    if "net" not in model_config:
        raise ValueError(
            f"model config for {model_config.get('_target_')} has no 'net' node: the network is its own "
            "config node (model.net._target_: protolib.models...); see conf/model/*.yaml"
        )
    net = instantiate_accepting(model_config["net"], **build_args)
    recipe = {key: value for key, value in model_config.items() if key != "net"}
    return instantiate_accepting(recipe, net=net)


def build_record(
    model_config: Any, data_config: Any, build_args: dict[str, Any], task_name: str | None = None
) -> dict[str, Any]:
    """What a checkpoint stores to rebuild its module: the resolved model and data configs, build args, and
    the experiment (``task_name``) it belongs to, for messages."""
    return {
        "format": CHECKPOINT_FORMAT,
        "model": _plain(model_config),
        "data": _plain(data_config),
        "build": dict(build_args),
        "task_name": task_name,
    }


def describe(record: Mapping[str, Any]) -> str:
    """A checkpoint record in words: its recipe, network and experiment."""
    model = record.get("model") or {}
    recipe = str(model.get("_target_", "?")).rsplit(".", 1)[-1]
    net = str((model.get("net") or {}).get("_target_", "?")).rsplit(".", 1)[-1]
    return f"a {recipe} with a {net} network from experiment {record.get('task_name') or '(not recorded)'}"


def _plain(config: Any) -> Any:
    """A resolved plain-container copy of a config (DictConfig or mapping)."""
    if isinstance(config, DictConfig):
        return OmegaConf.to_container(config, resolve=True)
    return OmegaConf.to_container(OmegaConf.create(config), resolve=True)


def read_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The contents of a checkpoint written by ``train.py``, or an error in protolib's words naming the file.

    The one reader behind ``load_module`` (explain, evaluate_ood) and ``resume=``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"checkpoint {path} does not exist; train.py writes them to <run dir>/checkpoints/"
        )
    try:
        checkpoint = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as error:  # unpickling, zip-reader and end-of-file errors all mean: not readable
        raise ValueError(
            f"{path} is not a readable protolib checkpoint ({type(error).__name__}: {error}): either "
            "truncated (an interrupted copy or write) or not a checkpoint at all. Pass a .ckpt written by "
            "train.py: <run dir>/checkpoints/last.ckpt or best-*.ckpt"
        ) from error
    config = checkpoint.get("protolib") if isinstance(checkpoint, dict) else None
    if config is None:
        raise ValueError(
            f"checkpoint {path} has no 'protolib' entry: it was not written by protolib's train.py; "
            "load it with YourModule.load_from_checkpoint instead"
        )
    if config.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(
            f"checkpoint {path} was written by an older protolib (checkpoint format "
            f"{config.get('format', 1)}, this version reads {CHECKPOINT_FORMAT}: networks now come from the "
            "model config's net node); retrain it with this version"
        )
    return checkpoint


def check_resumable(path: str | Path, model_config: Any, task_name: str | None = None) -> dict[str, Any]:
    """The checkpoint at ``path`` if this run's model config builds the same recipe and network, else an error
    saying which family the checkpoint holds and which experiment it belongs to."""
    record = read_checkpoint(path)["protolib"]
    model = _plain(model_config)
    stored = record.get("model") or {}
    ours = (model.get("_target_"), (model.get("net") or {}).get("_target_"))
    theirs = (stored.get("_target_"), (stored.get("net") or {}).get("_target_"))
    if ours != theirs:
        experiment = record.get("task_name")
        hint = (
            f"resume it with experiment={experiment}" if experiment else "resume it with its own experiment"
        )
        raise ValueError(
            f"resume={path} holds {describe(record)}, but this run ({task_name or 'this experiment'}) builds "
            f"a {str(ours[0]).rsplit('.', 1)[-1]} with a {str(ours[1]).rsplit('.', 1)[-1]} network; {hint}"
        )
    return record


def load_module(path: str | Path, map_location: str | torch.device = "cpu") -> L.LightningModule:
    """Load a module saved by ``train.py``; its config in the checkpoint says which classes to build.

    ``module.build_config["data"]`` is the data config it was trained with.
    """
    checkpoint = read_checkpoint(path, map_location)
    config = checkpoint["protolib"]
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
