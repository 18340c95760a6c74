"""The PIP-Net training recipe: two augmented views per image, phase-dependent loss and parameter groups.

Everything that changes over training (which groups learn, at which rate, which loss terms count) is set by
:class:`~protolib.lit.callbacks.pipnet.PIPNetTraining`, which the module adds to the trainer itself.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from protolib.lit.callbacks.pipnet import PIPNetSchedule, PIPNetTraining
from protolib.lit.classifier import ClassifierModule, OptimizerFactory
from protolib.losses.pipnet import PIPNetLoss

log = logging.getLogger(__name__)


def stack_views(images: torch.Tensor) -> torch.Tensor:
    """Training images (B, 2, C, H, W) -> (2B, C, H, W), all first views then all second views."""
    if images.dim() != 5 or images.shape[1] != 2:
        raise ValueError(
            "PIP-Net trains on two augmented views of every image, got a batch of shape "
            f"{tuple(images.shape)}; "
            "set data.num_views=2 and data.train_transforms (see conf/experiment/pipnet_digits.yaml)"
        )
    return torch.cat([images[:, 0], images[:, 1]])


class PIPNetModule(ClassifierModule):
    """A :class:`~protolib.models.pipnet.PIPNet` trained with its loss by the PIP-Net schedule.

    The optimiser (AdamW, weight decay 0 as the paper) gets one group per part of ``net.parameter_groups()``;
    the reference's two optimisers (network, head) are these groups with their own rates.
    """

    def __init__(
        self,
        net: nn.Module,
        loss: PIPNetLoss | None = None,
        schedule: PIPNetSchedule | None = None,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        super().__init__(
            net, optimizer=optimizer or partial(torch.optim.AdamW, weight_decay=0.0), scheduler=None
        )
        self.loss = loss or PIPNetLoss()
        self.schedule = schedule or PIPNetSchedule()
        unknown = sorted(set(self.schedule.lr) - set(net.parameter_groups()))
        if unknown:
            raise ValueError(
                f"model.schedule.lr names groups {unknown} that {type(net).__name__} does not have; its "
                f"groups are {sorted(net.parameter_groups())}"
            )
        self.phase: str | None = None

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        views = {**batch, "image": stack_views(batch["image"]), "label": batch["label"].repeat(2)}
        return super().training_step(views, batch_idx)

    def compute_loss(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = self.loss(outputs, batch["label"], self.net)
        return total, {name: value.detach() for name, value in terms.items()}

    def parameter_groups(self) -> list[dict[str, Any]]:
        """One named group per network part at its base rate (the schedule sets the rate every step)."""
        return [
            {"name": name, "params": params, "lr": self.schedule.lr.get(name, 0.0)}
            for name, params in self.net.parameter_groups().items()
            if params
        ]

    # --- driven by PIPNetTraining ------------------------------------------------------------------------
    def set_phase(self, phase: str, trained: list[str], loss_weights: dict[str, float]) -> None:
        """Train exactly the groups ``trained``; weigh the loss terms as the phase says."""
        for name, params in self.net.parameter_groups().items():
            for param in params:
                param.requires_grad_(name in trained)
        self.loss.set_weights(loss_weights)
        self.phase = phase

    def set_learning_rates(self, learning_rates: dict[str, float], optimizer: torch.optim.Optimizer) -> None:
        for group in optimizer.param_groups:
            group["lr"] = learning_rates.get(group["name"], 0.0)

    def clamp_head(self) -> None:
        """PIP-Net's sparsity step on the head; off with ``schedule.shrink: 0`` (heads without it: CBC)."""
        if self.schedule.shrink:
            self.net.last_layer.clamp_(self.schedule.shrink)

    def visualize_prototypes(self, loader: DataLoader) -> torch.Tensor:
        """Record where every prototype is most present in the training set; zero the weights of those never
        present above the inference threshold (the reference, after training; networks without a sparse head,
        deep CBC, keep them all). Returns their ids."""
        report = self.net.push(loader, step=self.global_step, percentile=self.schedule.push_percentile)
        if not hasattr(self.net, "drop_absent"):
            kept = self.net.prototypes_in_use()
            log.info("visualisation in %.2f s: all %d prototypes kept", report.seconds, kept)
            return torch.empty(0, dtype=torch.long)
        absent = self.net.drop_absent(report.presence)
        log.info(
            "PIP-Net visualisation in %.2f s: %d prototypes never present above %.2f lose their weights; "
            "%d in use",
            report.seconds,
            len(absent),
            self.net.inference_threshold,
            self.net.prototypes_in_use(),
        )
        return absent

    def on_validation_epoch_end(self) -> None:
        self.log("val/prototypes_in_use", float(self.net.prototypes_in_use()), sync_dist=True)
        # Accuracy of the final model, whose prototypes have been visualised (they have sources, unused ones
        # have lost their weights); NaN before, so a checkpoint monitoring it keeps an explainable model.
        final = int(self.net.revision) > 0 and not self.trainer.sanity_checking
        self.log("val/pushed_acc", self.val_acc.compute() if final else math.nan, sync_dist=True)

    def configure_callbacks(self) -> list[L.Callback]:
        return [PIPNetTraining(self.schedule)]
