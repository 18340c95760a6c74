"""``python train.py``: build everything from the Hydra config, fit, test, and write the run's outputs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.utilities import rank_zero_only
from omegaconf import DictConfig, OmegaConf

from protolib.lit.checkpoint import AtomicCheckpointIO, build_module, build_record
from protolib.utils.io import atomic_write_json, atomic_write_text
from protolib.utils.modes import evaluating
from protolib.utils.plots import plot_confusion_matrix
from protolib.utils.threads import configure_threads

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


def validate_trainer_config(cfg: DictConfig) -> None:
    """Reject trainer settings this machine cannot run, before any data is loaded."""
    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in {"gpu", "cuda"} and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator} but CUDA is not available here; "
            "use trainer=default (CPU) or run on a machine with a GPU"
        )
    devices = cfg.trainer.get("devices", 1)
    if accelerator in {"gpu", "cuda"} and isinstance(devices, int) and devices > torch.cuda.device_count():
        raise ValueError(
            f"trainer.devices={devices} but only {torch.cuda.device_count()} GPU(s) are visible; "
            "lower trainer.devices or set it to auto"
        )


def check_model_accepts_data(module: L.LightningModule, datamodule: L.LightningDataModule) -> None:
    """Run one validation batch through the model so shape mismatches fail now, with names, not mid-epoch."""
    batch = next(iter(datamodule.val_dataloader()))
    try:
        with evaluating(module), torch.no_grad():
            logits = module.extract(batch["image"])["logits"]
    except RuntimeError as error:  # torch's shape errors; anything else is not a data mismatch
        raise ValueError(
            f"model {type(module).__name__} cannot process a batch of {type(datamodule).__name__} "
            f"(images {tuple(batch['image'].shape)}): {error}. Check data.image_size against the backbone's "
            "stride and the model's in_channels"
        ) from error
    if logits.shape[-1] != datamodule.num_classes:
        raise ValueError(
            f"model outputs {logits.shape[-1]} logits but the data has {datamodule.num_classes} classes"
        )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every non-null entry of ``cfg.callbacks``, in config order."""
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build, fit, test; write metrics.json, config.yaml and pictures into ``cfg.output_dir``."""
    validate_trainer_config(cfg)
    configure_threads(cfg.get("threads"))
    output_dir = Path(cfg.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    L.seed_everything(cfg.seed, workers=True)

    datamodule = instantiate(cfg.data)
    datamodule.prepare_data()
    datamodule.setup("fit")
    build_args = {
        "num_classes": datamodule.num_classes,
        "in_channels": datamodule.in_channels,
        "image_size": datamodule.image_size,
    }
    module = build_module(cfg.model, build_args)
    module.build_config = build_record(cfg.model, cfg.data, build_args)
    check_model_accepts_data(module, datamodule)

    if rank_zero_only.rank == 0:  # under DDP every rank runs this function; one writes the files
        atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: L.Trainer = instantiate(
        cfg.trainer, callbacks=build_callbacks(cfg), logger=logger, plugins=[AtomicCheckpointIO()]
    )
    trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume"))

    best = trainer.checkpoint_callback.best_model_path if trainer.checkpoint_callback else ""
    results = trainer.test(module, datamodule=datamodule, ckpt_path=best or None, verbose=False)
    metrics = {key: float(value) for key, value in results[0].items()}
    confusion = module.test_confusion.compute().cpu().numpy()  # a collective under DDP: every rank calls it
    if trainer.is_global_zero:
        atomic_write_json(output_dir / "metrics.json", metrics)
        plot_confusion_matrix(
            confusion,
            list(datamodule.class_names),
            output_dir / "confusion_matrix.png",
            title=f"{cfg.task_name}: test accuracy {metrics.get('test/acc', float('nan')):.3f}",
        )
        print_summary(metrics, output_dir, best)
    return metrics


def print_summary(metrics: dict[str, float], output_dir: Path, checkpoint: str) -> None:
    """Tell the user what came out and where it went."""
    lines = ["", "test metrics:"]
    lines += [f"  {key:<24} {value:.4f}" for key, value in sorted(metrics.items())]
    lines += [
        f"checkpoint:  {checkpoint or '(none saved)'}",
        f"config:      {output_dir / 'config.yaml'}",
        f"metrics:     {output_dir / 'metrics.json'}",
    ]
    pictures: dict[Path, int] = {}
    for picture in output_dir.rglob("*.png"):
        pictures[picture.parent] = pictures.get(picture.parent, 0) + 1
    for folder, count in sorted(pictures.items()):
        lines.append(f"pictures:    {folder} ({count} png)")
    print("\n".join(lines), flush=True)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> Any:
    """Console entry point (protolib-train, python train.py); returns the test accuracy for sweeps."""
    return run(cfg).get(cfg.get("optimized_metric", "test/acc"))
