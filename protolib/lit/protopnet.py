"""The ProtoPNet training recipe: the paper's phases, push and prune, for ProtoPNet and its variants.

The schedule (warm-up, joint, push + last layer, pruning) is applied by
:class:`~protolib.lit.callbacks.protopnet.ProtoPNetTraining`, which the module adds to the trainer itself
(``configure_callbacks``), so every number lives in the model config. The network (``net``) and the loss
come from config: a variant is another network and loss, not another module.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader

from protolib.lit.callbacks.protopnet import ProtoPNetSchedule, ProtoPNetTraining
from protolib.lit.classifier import ClassifierModule, OptimizerFactory, train_only_groups
from protolib.losses.protopnet import ProtoPNetLoss
from protolib.models.protopnet import PushReport

log = logging.getLogger(__name__)

# What a network must offer to be trained by this recipe (ProtoPNet, and every variant).
PROTOTYPE_NETWORK_API = ("extract", "parameter_groups", "push", "prune", "prototype_bank", "last_layer")


class ProtoPNetModule(ClassifierModule):
    """A prototype network trained phase by phase with its loss (ProtoPNet's: CE + cluster + separation + L1).

    ``net`` offers ``extract`` (``"logits"``, ``"features"``, ``"prototype_similarity"`` (B, P) and whatever
    its loss reads), ``parameter_groups()`` (named parts: ProtoPNet's are backbone, add_on, prototypes,
    last_layer), ``push`` and ``prune``, and optionally ``constrain_prototypes_()`` (run after every step).
    ``loss(outputs, labels, net)`` returns the total and its terms.
    The optimiser (Adam by default, as the paper) gets one parameter group per part; the schedule sets which
    are trained and at which learning rate. ``callbacks`` are schedules a variant adds beside the phases
    (ProtoPool's Gumbel-softmax scale).
    """

    def __init__(
        self,
        net: nn.Module,
        loss: nn.Module | None = None,
        schedule: ProtoPNetSchedule | None = None,
        optimizer: OptimizerFactory | None = None,
        callbacks: Sequence[L.Callback] = (),
    ) -> None:
        super().__init__(net, optimizer=optimizer or partial(torch.optim.Adam), scheduler=None)
        self.extra_callbacks = list(callbacks)
        missing = [name for name in PROTOTYPE_NETWORK_API if not hasattr(net, name)]
        if missing:
            raise ValueError(
                f"{type(net).__name__} cannot be trained by ProtoPNetModule: it lacks {missing}; use a "
                "protolib.models.protopnet network (or a variant offering the same API)"
            )
        self.loss = loss or ProtoPNetLoss()
        self.schedule = schedule or ProtoPNetSchedule()
        groups = set(net.parameter_groups())
        unknown = {name: sorted(set(lrs) - groups) for name, lrs in self.schedule.group_settings().items()}
        unknown = {name: bad for name, bad in unknown.items() if bad}
        if unknown:
            raise ValueError(
                f"model.schedule names parameter groups {type(net).__name__} does not have: {unknown}; "
                f"its groups are {sorted(groups)}"
            )
        self.phase: str | None = None  # set by ProtoPNetTraining at every epoch start
        self.last_push: PushReport | None = None  # the latest push; DivergenceCheck judges it

    def compute_loss(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        total, terms = self.loss(outputs, batch["label"], self.net)
        return total, {name: value.detach() for name, value in terms.items()}

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        # Projected gradient descent: a network with constrained prototypes (TesNet's and ST-ProtoPNet's unit
        # norm) restores the constraint after every optimiser step, as their reference code does.
        constrain = getattr(self.net, "constrain_prototypes_", None)
        if constrain is not None:
            constrain()

    # --- phases ---------------------------------------------------------------------------------------
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
            for name, params in self.net.parameter_groups().items()
        ]

    def set_phase(
        self, phase: str, learning_rates: dict[str, float], optimizer: torch.optim.Optimizer
    ) -> None:
        """Train exactly the groups in ``learning_rates`` (at those rates); freeze the others."""
        train_only_groups(self.net.parameter_groups(), learning_rates, optimizer)
        self.phase = phase
        self.train(self.training)

    def train(self, mode: bool = True) -> ProtoPNetModule:
        """In the last-layer phase the frozen feature layers also keep their batch-norm statistics, so pushed
        prototypes stay exactly equal to training-patch embeddings (the reference let them drift)."""
        super().train(mode)
        if mode and self.phase == "last":
            self.net.eval()
            if self.net.last_layer is not None:
                self.net.last_layer.train()
        return self

    def configure_callbacks(self) -> list[L.Callback]:
        return [ProtoPNetTraining(self.schedule), *self.extra_callbacks]

    def on_validation_epoch_end(self) -> None:
        # Accuracy of the pushed (interpretable) model; NaN while prototypes are not training patches (or,
        # when pruning, before the prune), so a checkpoint monitoring it only keeps the final kind of model.
        pushed = self.schedule.final_model(self.current_epoch) and not self.trainer.sanity_checking
        self.log("val/pushed_acc", self.val_acc.compute() if pushed else math.nan, sync_dist=True)

    # --- push and prune (called by the schedule) --------------------------------------------------------
    def push_prototypes(self, loader: DataLoader) -> PushReport:
        """Push every prototype onto its nearest training patch of its class and log how it went."""
        report = self.net.push(loader, step=self.global_step, percentile=self.schedule.push_percentile)
        self.last_push = report
        duplicates = int(report.duplicates.sum())
        mean_distance = report.distances.nanmean().item()  # NaN: not pushed (ProtoPool)
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
        removed = self.net.prune(loader, k=self.schedule.prune_k, threshold=self.schedule.prune_threshold)
        self.log("prune/removed", float(len(removed)), sync_dist=True)
        log.info(
            "pruning at epoch %d removed %d prototypes: %s",
            self.current_epoch,
            len(removed),
            removed.tolist()[:50],
        )
        return removed
