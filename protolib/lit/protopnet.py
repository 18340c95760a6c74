"""ProtoPNet LightningModule: the paper's loss, phase-aware parameter groups, push and prune hooks.

The schedule (warm-up, joint, push + last layer, pruning) is applied by
:class:`~protolib.lit.callbacks.protopnet.ProtoPNetTraining`, which the module adds to the trainer itself
(``configure_callbacks``), so every number lives in ``conf/model/protopnet.yaml``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from protolib.bank import PrototypeBank
from protolib.lit.callbacks.protopnet import GROUPS, ProtoPNetSchedule, ProtoPNetTraining
from protolib.lit.classifier import ClassifierModule, OptimizerFactory
from protolib.losses.protopnet import ProtoPNetLoss
from protolib.models.protopnet import ProtoPNet, PushReport
from protolib.nn.similarity import L2Similarity

log = logging.getLogger(__name__)


class ProtoPNetModule(ClassifierModule):
    """ProtoPNet trained with cross-entropy + cluster + separation + wrong-class L1, phase by phase.

    ``extract`` gives ``"logits"``, ``"features"`` = ``"prototype_similarity"`` = max similarity of every
    prototype (B, P) (the last layer's input, so ``last_layer(features) == logits``) and ``"min_distances"``.
    ``self.model`` (a :class:`ProtoPNet`) exposes similarity maps, per-prototype contributions and provenance.
    The optimiser (Adam by default, as the paper) gets one parameter group per part: backbone, add_on,
    prototypes, last_layer; the schedule sets which are trained and at which learning rate.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "resnet34",
        pretrained: bool = False,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        similarity: L2Similarity | None = None,
        incorrect_class_connection: float = -0.5,
        loss: ProtoPNetLoss | None = None,
        schedule: ProtoPNetSchedule | None = None,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__(num_classes, optimizer=optimizer or partial(torch.optim.Adam), scheduler=None)
        self.model = ProtoPNet(
            num_classes,
            in_channels=in_channels,
            image_size=image_size,
            backbone=backbone,
            pretrained=pretrained,
            prototypes_per_class=prototypes_per_class,
            prototype_dim=prototype_dim,
            similarity=similarity,
            incorrect_class_connection=incorrect_class_connection,
            bank=bank,
        )
        self.loss = loss or ProtoPNetLoss()
        self.schedule = schedule or ProtoPNetSchedule()
        self.phase: str | None = None  # set by ProtoPNetTraining at every epoch start

    # --- the OOD / explanation contract -------------------------------------------------------------
    @property
    def last_layer(self) -> nn.Linear:  # type: ignore[override]
        return self.model.last_layer

    @property
    def prototype_bank(self) -> PrototypeBank:  # type: ignore[override]
        return self.model.bank

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        output = self.model(images)
        similarities = output.similarities  # (B, P)
        return {
            "logits": output.logits,
            "features": similarities,
            "prototype_similarity": similarities,
            "min_distances": output.min_distances,
        }

    def compute_loss(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = self.loss(
            outputs["logits"],
            outputs["min_distances"],
            batch["label"],
            self.model.owners,
            self.model.last_layer.weight,
            self.model.max_distance,
        )
        return total, {name: value.detach() for name, value in terms.items()}

    # --- phases ---------------------------------------------------------------------------------------
    def _group_parameters(self) -> dict[str, list[nn.Parameter]]:
        return {
            "backbone": list(self.model.backbone.parameters()),
            "add_on": list(self.model.add_on.parameters()),
            "prototypes": [self.model.bank.vectors],
            "last_layer": list(self.model.last_layer.parameters()),
        }

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One named group per part, learning rates of the first planned epoch (the schedule resets them)."""
        lrs = self.schedule.learning_rates(self.schedule.plan()[0])
        return [
            {
                "name": name,
                "params": params,
                "lr": lrs.get(name, 0.0),
                "weight_decay": self.schedule.weight_decay.get(name, 0.0),
            }
            for name, params in self._group_parameters().items()
        ]

    def set_phase(
        self, phase: str, learning_rates: dict[str, float], optimizer: torch.optim.Optimizer
    ) -> None:
        """Train exactly the groups in ``learning_rates`` (at those rates); freeze the others."""
        for name, params in self._group_parameters().items():
            for param in params:
                param.requires_grad_(name in learning_rates)
        for group in optimizer.param_groups:
            if group.get("name") not in GROUPS:
                raise ValueError(f"optimizer group {group.get('name')!r} is not a ProtoPNet part {GROUPS}")
            group["lr"] = learning_rates.get(group["name"], 0.0)
        self.phase = phase
        self.train(self.training)

    def train(self, mode: bool = True) -> ProtoPNetModule:
        """In the last-layer phase the frozen feature layers also keep their batch-norm statistics, so pushed
        prototypes stay exactly equal to training-patch embeddings (the reference let them drift)."""
        super().train(mode)
        if mode and self.phase == "last":
            self.model.backbone.eval()
            self.model.add_on.eval()
        return self

    def configure_callbacks(self) -> list[L.Callback]:
        return [ProtoPNetTraining(self.schedule)]

    def on_validation_epoch_end(self) -> None:
        # Accuracy of the pushed (interpretable) model; NaN while prototypes are not training patches, so a
        # checkpoint monitoring it only ever keeps a pushed model.
        pushed = self.phase == "last" and not self.trainer.sanity_checking
        self.log("val/pushed_acc", self.val_acc.compute() if pushed else math.nan, sync_dist=True)

    # --- push and prune (called by the schedule) --------------------------------------------------------
    def push_prototypes(self, loader: DataLoader) -> PushReport:
        """Push every prototype onto its nearest training patch of its class and log how it went."""
        report = self.model.push(loader, step=self.global_step, percentile=self.schedule.push_percentile)
        duplicates = int(report.duplicates.sum())
        mean_distance = report.distances.mean().item()
        self.log_dict(
            {
                "push/seconds": report.seconds,
                "push/duplicates": float(duplicates),
                "push/mean_distance": mean_distance,
            },
            sync_dist=True,
        )
        log.info(
            "push at epoch %d: %d prototypes in %.2f s, mean distance %.4f, %d duplicates",
            self.current_epoch,
            len(report.distances),
            report.seconds,
            mean_distance,
            duplicates,
        )
        return report

    def prune_prototypes(self, loader: DataLoader) -> torch.Tensor:
        """The paper's pruning with the schedule's k and threshold; returns the removed prototypes' ids."""
        removed = self.model.prune(loader, k=self.schedule.prune_k, threshold=self.schedule.prune_threshold)
        self.log("prune/removed", float(len(removed)), sync_dist=True)
        log.info(
            "pruning at epoch %d removed %d prototypes: %s",
            self.current_epoch,
            len(removed),
            removed.tolist()[:50],
        )
        return removed
