"""Training-time OOD monitoring: held-out-class detection logged as validation metrics, for any classifier."""

from __future__ import annotations

import lightning as L

from protolib.ood.features import extract_features
from protolib.ood.metrics import ood_metrics
from protolib.ood.postprocessors.base import Postprocessor
from protolib.ood.postprocessors.gaussian import Mahalanobis


class HeldOutOODMetrics(L.Callback):
    """Log OOD detection of the held-out classes as validation metrics: ``val/ood_auroc``, ``val/ood_fpr95``.

    ID data is the datamodule's validation split, OOD data its ``held_out_dataloader(split)`` (the classes
    left out of ``data.classes``). The postprocessor is fitted on ``push_dataloader()`` (training images, eval
    transform) when it needs a fit; the default is PALM's test-time score, Mahalanobis distance on
    L2-normalised, standardised backbone features under one Gaussian. A monitoring signal: selecting
    checkpoints by it would tune on the OOD data.
    """

    def __init__(
        self, postprocessor: Postprocessor | None = None, split: str = "val", every_n_epochs: int = 1
    ) -> None:
        if every_n_epochs < 1:
            raise ValueError(f"every_n_epochs must be at least 1, got {every_n_epochs}")
        self.postprocessor = postprocessor or Mahalanobis(
            normalize=True, standardize=True, class_conditional=False
        )
        if self.postprocessor.fit_split not in (None, "train"):
            raise ValueError(
                f"{self.postprocessor.name} fits on the {self.postprocessor.fit_split!r} split, which is the "
                "ID data this callback scores; use a postprocessor fitted on 'train' or needing no fit"
            )
        self.split = split
        self.every_n_epochs = every_n_epochs

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        datamodule = trainer.datamodule
        if datamodule is None or not hasattr(datamodule, "held_out_dataloader"):
            raise ValueError(
                "HeldOutOODMetrics needs a VisionDataModule with held-out classes (data.classes)"
            )
        if self.postprocessor.fit_split == "train":
            self.postprocessor.fit(pl_module, datamodule.push_dataloader())
        id_features = extract_features(pl_module, datamodule.val_dataloader())
        ood_features = extract_features(pl_module, datamodule.held_out_dataloader(self.split))
        metrics = ood_metrics(
            self.postprocessor.score(pl_module, id_features),
            self.postprocessor.score(pl_module, ood_features),
        )
        pl_module.log("val/ood_auroc", metrics["auroc"])
        pl_module.log("val/ood_fpr95", metrics["fpr95"])
