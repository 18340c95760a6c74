"""ProtoTree's training schedule as a Lightning callback: frozen backbone epochs, multi-step learning rates,
then pruning and the push.

As the reference's ``main_tree.py``: ``epochs`` epochs of joint training (prototypes, add-on and the optional
``block`` of the backbone from the start; the rest of the backbone frozen for the first ``freeze_epochs``),
every learning rate multiplied by ``gamma`` at each of the ``milestones`` (``MultiStepLR``), the leaves
updated without gradients after every batch; after training the tree is pruned and its prototypes pushed. The
prune + push happens right after the last training step, before the last epoch's validation, so that the
pushed tree is validated and checkpointed as that epoch, and no epoch runs that trains nothing (an epoch of
skipped steps is what Lightning refuses under DDP). Every epoch's phase is a function of its number and the
tree travels in the checkpoint, so resuming resumes the right phase.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import lightning as L

from protolib.lit.callbacks.protopnet import push_loader

if TYPE_CHECKING:
    from protolib.lit.prototree import ProtoTreeModule

log = logging.getLogger(__name__)

GROUPS = ("backbone", "block", "add_on", "prototypes")


@dataclass
class ProtoTreeSchedule:
    """The schedule's numbers (defaults: the reference's CUB command line, README of M-Nauta/ProtoTree).

    ``lr`` maps parameter groups to their learning rate (the reference's ``lr_net`` for the backbone,
    ``lr_block`` for the block and add-on, ``lr`` for the prototypes); groups the network lacks are ignored.
    """

    epochs: int = 100
    freeze_epochs: int = 30
    lr: dict[str, float] = field(
        default_factory=lambda: {"backbone": 1e-5, "block": 1e-3, "add_on": 1e-3, "prototypes": 1e-3}
    )
    milestones: list[int] = field(default_factory=lambda: [60, 70, 80, 90, 100])
    gamma: float = 0.5
    prune_threshold: float = 0.01
    push_percentile: float = 95.0

    def __post_init__(self) -> None:
        self.lr = dict(self.lr)  # Hydra hands over DictConfigs
        self.milestones = sorted(int(m) for m in self.milestones)
        unknown = set(self.lr) - set(GROUPS)
        if unknown:
            raise ValueError(f"schedule.lr: unknown parameter groups {sorted(unknown)}; use {GROUPS}")
        if any(not (v >= 0 and math.isfinite(v)) for v in self.lr.values()):
            raise ValueError(f"schedule.lr values must be finite and >= 0, got {self.lr}")
        if self.epochs < 1 or not 0 <= self.freeze_epochs <= self.epochs or not 0 < self.gamma <= 1:
            raise ValueError(
                f"schedule out of range: epochs={self.epochs} (>= 1), freeze_epochs={self.freeze_epochs} "
                f"(0..epochs), gamma={self.gamma} (0 < gamma <= 1)"
            )
        if not 0 <= self.prune_threshold <= 1:
            raise ValueError(f"schedule.prune_threshold must be a probability, got {self.prune_threshold}")

    @property
    def total_epochs(self) -> int:
        """The schedule's length: the training epochs (the prune + push ends the last one)."""
        return self.epochs

    def phase(self, epoch: int) -> str:
        """``frozen`` (backbone frozen) or ``joint``; the module's phase becomes ``project`` once the last
        epoch's last step has pruned and pushed the tree."""
        if not 0 <= epoch < self.total_epochs:
            raise ValueError(f"epoch {epoch} is past the ProtoTree schedule ({self.total_epochs} epochs)")
        return "frozen" if epoch < self.freeze_epochs else "joint"

    def learning_rates(self, epoch: int) -> dict[str, float]:
        """Learning rate of every group trained in ``epoch`` (absent groups are frozen): MultiStepLR's
        ``lr * gamma ** (milestones passed)``, the reference stepping it after every epoch."""
        phase = self.phase(epoch)
        decay = self.gamma ** sum(m <= epoch for m in self.milestones)
        return {name: lr * decay for name, lr in self.lr.items() if phase == "joint" or name != "backbone"}


class ProtoTreeTraining(L.Callback):
    """Applies :class:`ProtoTreeSchedule` epoch by epoch; the module adds it itself (``configure_callbacks``)
    and it sets ``trainer.max_epochs`` to the schedule's length."""

    def __init__(self, schedule: ProtoTreeSchedule) -> None:
        self.schedule = schedule

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.world_size > 1:
            log.info("ProtoTree under DDP: leaf updates are summed over ranks; pruning runs on every rank")
        if stage != "fit" or trainer.fit_loop.max_epochs == self.schedule.total_epochs:
            return
        log.info(
            "ProtoTree schedule: %d epochs (%d with the backbone frozen), lr x %.2f at epochs %s, then prune "
            "+ push; trainer.max_epochs=%s replaced by %d",
            self.schedule.epochs,
            self.schedule.freeze_epochs,
            self.schedule.gamma,
            self.schedule.milestones,
            trainer.fit_loop.max_epochs,
            self.schedule.total_epochs,
        )
        trainer.fit_loop.max_epochs = self.schedule.total_epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ProtoTreeModule) -> None:
        epoch = trainer.current_epoch
        learning_rates = self.schedule.learning_rates(epoch)
        pl_module.set_phase(self.schedule.phase(epoch), learning_rates, trainer.optimizers[0])
        pl_module.start_leaf_epoch(int(trainer.num_training_batches))

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: ProtoTreeModule, outputs: object, batch: object, batch_idx: int
    ) -> None:
        """After the last step of the last epoch (on every rank alike): prune and push, then freeze all, so
        that this epoch's validation and checkpoint are the pruned, pushed tree's."""
        if trainer.current_epoch != self.schedule.epochs - 1 or not trainer.is_last_batch:
            return
        pl_module.prune_and_push(push_loader(trainer))
        trainer.strategy.setup_optimizers(trainer)  # pruning changed parameter shapes: fresh state
        pl_module.set_phase("project", {}, trainer.optimizers[0])
