"""PIP-Net's training schedule as a Lightning callback: self-supervised pre-training of the prototypes, then
training of the head (fine-tuning it alone, then jointly with the frozen, then the whole backbone).

One Lightning epoch per reference epoch: ``pretrain_epochs`` pre-training epochs, then ``epochs`` training
epochs, the first ``finetune_epochs`` of them head-only, up to ``freeze_epochs`` with the early backbone
frozen. A phase is a function of the epoch number, so resuming a checkpoint resumes the right phase. Learning
rates follow the reference's schedulers step by step (cosine annealing for the network, warm restarts for the
head); after every training step the head is clamped (small weights to zero: the sparsity); after the last
epoch every prototype is visualised and prototypes never present in the training set lose their weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
from torch.utils.data import DataLoader

from protolib.lit.callbacks.protopnet import push_loader

log = logging.getLogger(__name__)


class PIPNetRecipe(Protocol):
    """What the schedule drives (``protolib.lit.pipnet.PIPNetModule``)."""

    schedule: PIPNetSchedule

    def set_phase(self, phase: str, trained: list[str], loss_weights: dict[str, float]) -> None: ...

    def set_learning_rates(
        self, learning_rates: dict[str, float], optimizer: torch.optim.Optimizer
    ) -> None: ...

    def clamp_head(self) -> None: ...

    def visualize_prototypes(self, loader: DataLoader) -> Any: ...


def cosine(base: float, minimum: float, step: float, period: float) -> float:
    """``minimum + (base - minimum) (1 + cos(pi step / period)) / 2``: PyTorch's cosine annealing."""
    return minimum + (base - minimum) * (1 + math.cos(math.pi * min(step, period) / period)) / 2


@dataclass
class PIPNetSchedule:
    """The reference's schedule (defaults: ``used_arguments/CUB_arguments.txt`` and ``main.py``).

    ``lr`` is the base learning rate of every parameter group (reference: backbone ``lr_net``, backbone_top
    ``lr_block``, prototypes (the add-on) ``10 lr_block``, last_layer ``lr``); ``*_groups`` name the groups
    trained in pre-training and in the training epochs up to ``freeze_epochs`` (after it, all; in the first
    ``finetune_epochs``, the head only). The network's rates anneal by cosine to ``min_lr`` over each stage
    (``pretrain_min_lr`` = lr_block / 100, ``min_lr`` = lr_net / 100); the head's restart every
    ``head_restart`` epochs (reference: 5 if epochs <= 30 else 10) down to ``head_min_lr``. Loss weights per
    phase; the pre-training alignment weight ramps up as ``align * epoch / pretrain_epochs``.
    """

    pretrain_epochs: int = 10
    epochs: int = 60
    finetune_epochs: int = 3
    freeze_epochs: int = 10
    lr: dict[str, float] = field(
        default_factory=lambda: {
            "backbone": 5e-4,
            "backbone_top": 5e-4,
            "prototypes": 5e-3,
            "last_layer": 0.05,
        }
    )
    pretrain_groups: list[str] = field(default_factory=lambda: ["backbone_top", "prototypes"])
    frozen_groups: list[str] = field(default_factory=lambda: ["backbone_top", "prototypes", "last_layer"])
    pretrain_min_lr: float = 5e-6
    min_lr: float = 5e-6
    head_restart: int = 10
    head_min_lr: float = 1e-3
    pretrain_loss: dict[str, float] = field(default_factory=lambda: {"align": 1.0, "tanh": 5.0})
    finetune_loss: dict[str, float] = field(default_factory=lambda: {"classification": 2.0})
    train_loss: dict[str, float] = field(
        default_factory=lambda: {"align": 5.0, "tanh": 2.0, "classification": 2.0}
    )
    shrink: float = 1e-3
    shrink_every: int = 30
    push_percentile: float = 95.0

    def __post_init__(self) -> None:
        self.lr = {name: float(value) for name, value in dict(self.lr).items()}
        self.pretrain_groups, self.frozen_groups = list(self.pretrain_groups), list(self.frozen_groups)
        for name in ("pretrain_loss", "finetune_loss", "train_loss"):
            setattr(self, name, {k: float(v) for k, v in dict(getattr(self, name)).items()})
        unknown = sorted((set(self.pretrain_groups) | set(self.frozen_groups)) - set(self.lr))
        if unknown:
            raise ValueError(
                f"schedule groups {unknown} have no learning rate in schedule.lr {sorted(self.lr)}"
            )
        if self.pretrain_epochs < 0 or self.epochs < 1 or self.finetune_epochs < 0 or self.head_restart < 1:
            raise ValueError(
                "schedule needs pretrain_epochs >= 0, epochs >= 1, finetune_epochs >= 0, head_restart >= 1; "
                f"got "
                f"{self.pretrain_epochs}, {self.epochs}, {self.finetune_epochs}, {self.head_restart}"
            )
        if any(not (v >= 0 and math.isfinite(v)) for v in self.lr.values()):
            raise ValueError(f"schedule.lr values must be finite and >= 0, got {self.lr}")

    @property
    def total_epochs(self) -> int:
        return self.pretrain_epochs + self.epochs

    def phase(self, epoch: int) -> str:
        """``pretrain`` | ``finetune`` (head only) | ``frozen`` (early backbone frozen) | ``joint``."""
        if epoch < self.pretrain_epochs:
            return "pretrain"
        train_epoch = epoch - self.pretrain_epochs + 1  # the reference's 1-based epoch
        if train_epoch <= self.finetune_epochs and self.pretrain_epochs > 0:
            return "finetune"
        return "frozen" if train_epoch <= self.freeze_epochs else "joint"

    def trained_groups(self, phase: str) -> list[str]:
        return {
            "pretrain": self.pretrain_groups,
            "finetune": ["last_layer"],
            "frozen": self.frozen_groups,
            "joint": list(self.lr),
        }[phase]

    def loss_weights(self, epoch: int) -> dict[str, float]:
        phase = self.phase(epoch)
        if phase == "pretrain":
            weights = dict(self.pretrain_loss)
            if "align" in weights:
                weights["align"] *= (epoch + 1) / self.pretrain_epochs
            return weights
        return dict(self.finetune_loss if phase == "finetune" else self.train_loss)

    def learning_rates(self, epoch: int, batch: int, batches: int) -> dict[str, float]:
        """Learning rate of every trained group at ``batch`` of ``batches`` in ``epoch`` (others frozen)."""
        phase = self.phase(epoch)
        groups = self.trained_groups(phase)
        if phase == "pretrain":
            step, period = epoch * batches + batch, self.pretrain_epochs * batches
            return {g: cosine(self.lr[g], self.pretrain_min_lr, step, period) for g in groups}
        train_epoch = epoch - self.pretrain_epochs  # 0-based
        net_epochs = train_epoch - (self.finetune_epochs if self.pretrain_epochs > 0 else 0)
        net_step = max(net_epochs, 0) * batches + batch  # the network's scheduler stands still in fine-tuning
        rates = {g: cosine(self.lr[g], self.min_lr, net_step, self.epochs * batches) for g in groups}
        if "last_layer" in groups:
            cycle = (train_epoch + batch / batches) % self.head_restart
            rates["last_layer"] = cosine(self.lr["last_layer"], self.head_min_lr, cycle, self.head_restart)
        return rates


class PIPNetTraining(L.Callback):
    """Applies :class:`PIPNetSchedule`; the module adds it itself and it sets ``trainer.max_epochs``."""

    def __init__(self, schedule: PIPNetSchedule) -> None:
        self.schedule = schedule
        self.visualized_epoch = -1

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit" and trainer.fit_loop.max_epochs != self.schedule.total_epochs:
            log.info(
                "PIP-Net schedule: %d pre-training + %d training epochs (%d head-only, early backbone "
                "frozen to %d); trainer.max_epochs=%s replaced",
                self.schedule.pretrain_epochs,
                self.schedule.epochs,
                self.schedule.finetune_epochs,
                self.schedule.freeze_epochs,
                trainer.fit_loop.max_epochs,
            )
            trainer.fit_loop.max_epochs = self.schedule.total_epochs

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: PIPNetRecipe) -> None:
        epoch = trainer.current_epoch
        if epoch >= self.schedule.total_epochs:
            raise ValueError(
                f"epoch {epoch} is past the PIP-Net schedule ({self.schedule.total_epochs} epochs)"
            )
        phase = self.schedule.phase(epoch)
        if epoch == self.schedule.pretrain_epochs and epoch > 0:
            trainer.strategy.setup_optimizers(
                trainer
            )  # the reference builds fresh optimisers after pre-training
        pl_module.set_phase(phase, self.schedule.trained_groups(phase), self.schedule.loss_weights(epoch))
        train_epoch = epoch - self.schedule.pretrain_epochs + 1
        shrink = train_epoch == self.schedule.epochs or train_epoch % self.schedule.shrink_every == 0
        if phase != "pretrain" and self.schedule.epochs > 1 and shrink:
            pl_module.clamp_head()  # the reference's extra shrink every 30 epochs and before the last

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: PIPNetRecipe, batch: Any, batch_idx: int
    ) -> None:
        batches = max(int(trainer.num_training_batches), 1)
        rates = self.schedule.learning_rates(trainer.current_epoch, batch_idx, batches)
        pl_module.set_learning_rates(rates, trainer.optimizers[0])

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: PIPNetRecipe, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.schedule.phase(trainer.current_epoch) != "pretrain":
            pl_module.clamp_head()

    def _visualize_after_last(self, trainer: L.Trainer, pl_module: PIPNetRecipe) -> None:
        epoch = trainer.current_epoch
        if (
            trainer.sanity_checking
            or epoch != self.schedule.total_epochs - 1
            or self.visualized_epoch == epoch
        ):
            return
        self.visualized_epoch = epoch
        pl_module.visualize_prototypes(push_loader(trainer))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: PIPNetRecipe) -> None:
        # Before the last validation, so that it and the checkpoint after it see the final model.
        self._visualize_after_last(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: PIPNetRecipe) -> None:
        self._visualize_after_last(trainer, pl_module)  # runs without validation
