"""``python train.py``: build everything from the Hydra config, fit, test, and write the run's outputs."""

from __future__ import annotations

import logging
import shutil
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities import rank_zero_only
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from protolib.lit.checkpoint import AtomicCheckpointIO, build_module, build_record, check_resumable
from protolib.utils.io import atomic_write_json, atomic_write_text
from protolib.utils.modes import evaluating
from protolib.utils.plots import plot_confusion_matrix
from protolib.utils.threads import configure_threads

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
HYDRA_BOOKKEEPING = (".hydra", "*.log")  # what Hydra writes into a run folder before train.py runs


def resumed_run_dir(resume: str | None, fresh: str) -> str:
    """The run folder: the one holding ``resume`` (``<run>/checkpoints/last.ckpt`` -> ``<run>``) or ``fresh``.

    conf/config.yaml sets ``hydra.run.dir`` through this, so a resumed run continues in its own folder.
    """
    if not resume or not Path(str(resume)).expanduser().is_file():
        return fresh  # no (readable) checkpoint: the run fails with its message and leaves no folder
    folder = Path(str(resume)).expanduser().resolve().parent
    return str(folder.parent if folder.name == "checkpoints" else folder)


def hydra_subdir(resume: str | None) -> str:
    """Where Hydra keeps the job's configs: ``.hydra``, or ``.hydra/resume-<time>`` so a resume keeps the
    original run's."""
    return f".hydra/resume-{datetime.now():%Y-%m-%d_%H-%M-%S}" if resume else ".hydra"


OmegaConf.register_new_resolver("protolib_run_dir", resumed_run_dir, replace=True)
OmegaConf.register_new_resolver("protolib_hydra_subdir", hydra_subdir, replace=True)


@contextmanager
def no_leftovers_on_failure(output_dir: Path) -> Iterator[None]:
    """If the body fails, remove what it added to ``output_dir``, and the folder itself when only Hydra's
    bookkeeping is left: a run that fails before training leaves no run folder behind."""
    before = set(output_dir.iterdir()) if output_dir.is_dir() else set()
    try:
        yield
    except BaseException:
        if rank_zero_only.rank == 0 and output_dir.is_dir():
            for path in set(output_dir.iterdir()) - before:
                shutil.rmtree(path) if path.is_dir() else path.unlink()
            left = list(output_dir.iterdir())
            if all(any(path.match(pattern) for pattern in HYDRA_BOOKKEEPING) for path in left):
                shutil.rmtree(output_dir)
                log.info("the run failed before training; removed its folder %s", output_dir)
        raise


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
    """Run one validation batch through the model so shape mismatches fail now, with names, not mid-epoch.

    A category-discovery split (``num_known_classes``) lets the model choose K, the number of clusters."""
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
    known = getattr(datamodule, "num_known_classes", None)
    if known is not None:  # category discovery: the logits are K clusters, any K that holds the known classes
        if logits.shape[-1] < known:
            raise ValueError(
                f"model.net.num_classes={logits.shape[-1]} (K clusters) is below the {known} known classes "
                f"of data.known_classes; set it to at least {known} plus the new classes expected (null: "
                f"the data's {datamodule.num_classes})"
            )
    elif logits.shape[-1] != datamodule.num_classes:
        raise ValueError(
            f"model outputs {logits.shape[-1]} logits but the data has {datamodule.num_classes} classes"
        )


def build_callbacks(cfg: DictConfig) -> list[L.Callback]:
    """Every non-null entry of ``cfg.callbacks``, in config order."""
    return [instantiate(c) for c in (cfg.get("callbacks") or {}).values() if c is not None]


def run(cfg: DictConfig) -> dict[str, float]:
    """Seed, build, fit, test; write metrics.json, config.yaml and pictures into ``cfg.output_dir``.

    With ``resume=<checkpoint>`` training continues from it (the run folder is the checkpoint's, see
    :func:`resumed_run_dir`); a failure before training removes the run folder.
    """
    output_dir = Path(cfg.output_dir)
    with no_leftovers_on_failure(output_dir):
        validate_trainer_config(cfg)
        configure_threads(cfg.get("threads"))
        if cfg.get("resume"):
            check_resumable(cfg.resume, cfg.model, cfg.get("task_name"))
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
        module.build_config = build_record(cfg.model, cfg.data, build_args, cfg.get("task_name"))
        check_model_accepts_data(module, datamodule)

        logger = instantiate(cfg.logger) if cfg.get("logger") else False
        trainer: L.Trainer = instantiate(
            cfg.trainer, callbacks=build_callbacks(cfg), logger=logger, plugins=[AtomicCheckpointIO()]
        )
        if rank_zero_only.rank == 0:  # under DDP every rank runs this function; one writes the files
            atomic_write_text(output_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.get("resume"))
    except SIGTERMException as stop:  # Lightning's is a SystemExit with status 0; a killed run is no success
        raise SystemExit(128 + signal.SIGTERM) from stop

    best_tracker = next((c for c in trainer.checkpoint_callbacks if isinstance(c, ModelCheckpoint)), None)
    best = best_tracker.best_model_path if best_tracker is not None else ""
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
