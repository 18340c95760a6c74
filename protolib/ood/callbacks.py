"""Training-time OOD monitoring: held-out-class detection logged as validation metrics, for any classifier."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import Dataset

from protolib.ood.features import extract_split_across_ranks, map_split_across_ranks
from protolib.ood.metrics import ood_metrics
from protolib.ood.postprocessors.base import Postprocessor
from protolib.ood.postprocessors.gaussian import Mahalanobis
from protolib.utils.modes import evaluating


class HeldOutOODMetrics(L.Callback):
    """Log OOD detection of the held-out classes: ``val/ood_auroc``, ``val/ood_fpr95`` each validation, and
    ``test/ood_auroc``, ``test/ood_fpr95`` when the model is tested.

    ID data is the datamodule's validation split, OOD data its ``held_out_dataloader(split)`` (the classes
    left out of ``data.classes``). The postprocessor is fitted on ``push_dataloader()`` (training images, eval
    transform) when it needs a fit; the default is PALM's test-time score, Mahalanobis distance on
    L2-normalised, standardised backbone features under one Gaussian. A monitoring signal: selecting
    checkpoints by it would tune on the OOD data. Under DDP every rank extracts its share of each dataset
    (``DistributedSampler(shuffle=False)``) and the shares are gathered, so all ranks log the same numbers.
    """

    def __init__(
        self, postprocessor: Postprocessor | None = None, split: str = "val", every_n_epochs: int = 1
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.postprocessor = postprocessor or Mahalanobis(
            normalize=True, standardize=True, class_conditional=False, center="raw"
        )
        if self.postprocessor.fit_split not in (None, "train"):
            raise ValueError(
                f"{self.postprocessor.name} fits on the {self.postprocessor.fit_split!r} split, which is the "
                "ID data this callback scores; use a postprocessor fitted on 'train' or needing no fit"
            )
        self.split = split
        self.every_n_epochs = every_n_epochs

    def scores(self, pl_module: L.LightningModule, dataset: Dataset, batch_size: int) -> np.ndarray:
        """Scores (N,) of ``dataset`` in order, each rank scoring its share; from images for ODIN."""
        postprocessor = self.postprocessor
        if postprocessor.needs_images:

            def compute(loader: Iterable[Any]) -> dict[str, torch.Tensor]:
                with evaluating(pl_module):
                    parts = [postprocessor.score(pl_module, batch).detach().float().cpu() for batch in loader]
                return {"score": torch.cat(parts)}

            return map_split_across_ranks(pl_module, dataset, batch_size, compute)["score"].numpy()
        features = extract_split_across_ranks(pl_module, dataset, batch_size)
        return postprocessor.score(pl_module, features).detach().float().cpu().numpy()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """Fail before training when there is nothing to score: no datamodule or no held-out class."""
        if stage != "fit":
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "held_out_dataset"):
            raise ValueError(
                "HeldOutOODMetrics needs a VisionDataModule with held-out classes (data.classes); "
                "or drop the callback with callbacks.ood=null"
            )
        datamodule.setup("fit")
        if not datamodule.held_out_class_names:
            raise ValueError(
                f"the held-out OOD callback scores the classes left out of data.classes, but "
                f"{type(datamodule).__name__} keeps every class (data.classes={datamodule.classes}); set "
                "data.classes to a subset (e.g. data.classes=[0,1,2,3,4,5]) or drop the callback with "
                "callbacks.ood=null"
            )

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        datamodule = trainer.datamodule
        self.evaluate(pl_module, datamodule, datamodule.val_dataset, self.split, "val")

    def on_test_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        """``test/ood_auroc`` and ``test/ood_fpr95`` of the tested model: test split vs held-out test images
        (train.py puts them in metrics.json and the printed summary)."""
        datamodule = trainer.datamodule
        if datamodule is None or not getattr(datamodule, "held_out_class_names", None):
            return
        self.evaluate(pl_module, datamodule, datamodule.test_dataset, "test", "test")

    def evaluate(
        self, pl_module: L.LightningModule, datamodule: Any, id_dataset: Dataset, ood_split: str, stage: str
    ) -> None:
        """Fit the postprocessor if needed, score ``id_dataset`` and the held-out ``ood_split``, log them."""
        if getattr(self.postprocessor, "input_std", ()) is None:  # ODIN: a step in pixel units of this data
            self.postprocessor.input_std = datamodule.std.flatten().tolist()
        batch = datamodule.batch_size
        # validation runs under inference mode; ODIN needs input gradients
        with torch.inference_mode(False), torch.enable_grad():
            if self.postprocessor.fit_split == "train":
                train = extract_split_across_ranks(pl_module, datamodule.train_dataset.eval_view(), batch)
                self.postprocessor.fit(pl_module, train)
            id_scores = self.scores(pl_module, id_dataset, batch)
            ood_scores = self.scores(pl_module, datamodule.held_out_dataset(ood_split), batch)
        metrics = ood_metrics(id_scores, ood_scores)
        pl_module.log(f"{stage}/ood_auroc", metrics["auroc"])
        pl_module.log(f"{stage}/ood_fpr95", metrics["fpr95"])
