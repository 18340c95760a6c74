"""ProtoPNet's training schedule as Lightning callbacks: warm-up -> joint -> push + last layer (-> prune).

The schedule is unrolled into one plan entry per Lightning epoch: warm-up and joint epochs, and after every
push ``last_layer_epochs`` epochs that train only the last layer (the reference code's "iterations", each
one pass over the training set). An epoch's phase is therefore a function of its number alone, and the model
state (pushed / pruned prototypes) travels in the checkpoint: resuming mid-schedule resumes the right phase.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol

import lightning as L
import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

log = logging.getLogger(__name__)


class PhasedPrototypeModule(Protocol):
    """What the schedule drives (``protolib.lit.protopnet.ProtoPNetModule``); the module depends on this
    callback, never the reverse."""

    schedule: ProtoPNetSchedule

    def push_prototypes(self, loader: DataLoader) -> Any: ...

    def prune_prototypes(self, loader: DataLoader) -> Any: ...

    def set_phase(
        self, phase: str, learning_rates: dict[str, float], optimizer: torch.optim.Optimizer
    ) -> None: ...


@dataclass(frozen=True)
class EpochPlan:
    """What one Lightning epoch does: its phase, an action run before it, its index among joint epochs."""

    phase: str  # "warm" | "joint" | "last"
    action: str | None = None  # "push" | "prune" | None
    joint_epoch: int = -1


@dataclass
class ProtoPNetSchedule:
    """The paper's schedule, every number configurable (defaults: the reference code's settings.py).

    ``train_epochs`` warm-up + joint epochs (the first ``warm_epochs`` warm-up); a push after epoch
    ``push_start`` and every ``push_every`` epochs after it, each followed by ``last_layer_epochs`` epochs
    of last-layer-only optimisation. ``*_lr`` map the parameter groups a phase trains to their learning
    rate (groups not named are frozen); joint learning rates decay by ``joint_lr_gamma`` every
    ``joint_lr_step`` joint epochs, the first decay at joint epoch ``joint_lr_first_decay`` (0-based; None:
    ``joint_lr_step - 1``, as the reference, which steps its StepLR *before* each joint epoch, so joint epoch
    e trains at ``gamma ** ((e + 1) // step)``). ``prune`` removes prototypes after
    the last push (k nearest training
    images, fewer than ``prune_threshold`` of their class), followed by ``prune_last_layer_epochs``.
    """

    train_epochs: int = 51
    warm_epochs: int = 5
    push_start: int = 10
    push_every: int = 10
    last_layer_epochs: int = 20
    warm_lr: dict[str, float] = field(default_factory=lambda: {"add_on": 3e-3, "prototypes": 3e-3})
    joint_lr: dict[str, float] = field(
        default_factory=lambda: {"backbone": 1e-4, "add_on": 3e-3, "prototypes": 3e-3}
    )
    last_layer_lr: dict[str, float] = field(default_factory=lambda: {"last_layer": 1e-4})
    joint_lr_step: int = 5
    joint_lr_gamma: float = 0.1
    joint_lr_first_decay: int | None = None
    weight_decay: dict[str, float] = field(default_factory=lambda: {"backbone": 1e-3, "add_on": 1e-3})
    push_percentile: float = 95.0
    prune: bool = False
    prune_k: int = 6
    prune_threshold: int = 3
    prune_last_layer_epochs: int = 20

    def __post_init__(self) -> None:
        for name in ("warm_lr", "joint_lr", "last_layer_lr", "weight_decay"):
            value = dict(getattr(self, name))  # Hydra hands over DictConfigs
            if any(not (v >= 0 and math.isfinite(v)) for v in value.values()):
                raise ValueError(f"schedule.{name} values must be finite and >= 0, got {value}")
            setattr(self, name, value)
        checks = {
            "train_epochs": self.train_epochs >= 1,
            "warm_epochs": 0 <= self.warm_epochs <= self.train_epochs,
            "push_every": self.push_every >= 1,
            "last_layer_epochs": self.last_layer_epochs >= 1,
            "joint_lr_step": self.joint_lr_step >= 1,
            "joint_lr_first_decay": self.joint_lr_first_decay is None or self.joint_lr_first_decay >= 0,
            "prune_last_layer_epochs": not self.prune or self.prune_last_layer_epochs >= 1,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise ValueError(
                f"schedule values out of range: {bad} (train_epochs >= 1, 0 <= warm_epochs <= train_epochs, "
                "push_every, last_layer_epochs, joint_lr_step >= 1, prune_last_layer_epochs >= 1 if pruning)"
            )
        if not self.warm_lr or not self.joint_lr or not self.last_layer_lr:
            raise ValueError("schedule.warm_lr, joint_lr and last_layer_lr must each name at least one group")
        if self.prune and not self.push_epochs():
            raise ValueError(
                f"schedule.prune needs a pushed model but no push happens: push_start={self.push_start} is "
                f"not below train_epochs={self.train_epochs}"
            )

    def group_settings(self) -> dict[str, dict[str, float]]:
        """Every per-group setting by name; the module checks the groups exist in its network."""
        return {
            "warm_lr": self.warm_lr,
            "joint_lr": self.joint_lr,
            "last_layer_lr": self.last_layer_lr,
            "weight_decay": self.weight_decay,
        }

    def push_epochs(self) -> list[int]:
        """Warm-up/joint epochs after which prototypes are pushed."""
        start = max(self.push_start, 0)
        return list(range(start, self.train_epochs, self.push_every))

    def plan(self) -> list[EpochPlan]:
        """One entry per Lightning epoch, in order."""
        pushes = set(self.push_epochs())
        plan: list[EpochPlan] = []
        for epoch in range(self.train_epochs):
            if epoch < self.warm_epochs:
                plan.append(EpochPlan("warm"))
            else:
                plan.append(EpochPlan("joint", joint_epoch=epoch - self.warm_epochs))
            if epoch in pushes:
                plan += _last_layer_block("push", self.last_layer_epochs)
        if self.prune:
            plan += _last_layer_block("prune", self.prune_last_layer_epochs)
        return plan

    def learning_rates(self, entry: EpochPlan) -> dict[str, float]:
        """Learning rate of every group the epoch trains (absent groups are frozen)."""
        if entry.phase == "warm":
            return dict(self.warm_lr)
        if entry.phase == "joint":
            first = self.joint_lr_step - 1 if self.joint_lr_first_decay is None else self.joint_lr_first_decay
            decays = 0 if entry.joint_epoch < first else 1 + (entry.joint_epoch - first) // self.joint_lr_step
            decay = self.joint_lr_gamma**decays
            return {name: lr * decay for name, lr in self.joint_lr.items()}
        return dict(self.last_layer_lr)

    def final_model(self, epoch: int) -> bool:
        """Whether ``epoch`` trains the model the schedule ends with: a pushed one (last-layer epochs after a
        push), and once pruning is on, a pruned one (the pushed models before the prune are not kept)."""
        plan = self.plan()
        if not 0 <= epoch < len(plan) or plan[epoch].phase != "last":
            return False
        if not self.prune:
            return True
        return epoch >= len(plan) - self.prune_last_layer_epochs

    def ends_cycle(self, epoch: int) -> bool:
        """Whether ``epoch`` is the last last-layer epoch after a push or prune (a pushed model is final)."""
        plan = self.plan()
        if not 0 <= epoch < len(plan) or plan[epoch].phase != "last":
            return False
        return epoch + 1 == len(plan) or plan[epoch + 1].phase != "last" or plan[epoch + 1].action is not None


def _last_layer_block(action: str, epochs: int) -> list[EpochPlan]:
    """``epochs`` last-layer epochs, the first preceded by ``action``."""
    return [EpochPlan("last", action if i == 0 else None) for i in range(epochs)]


def push_loader(trainer: L.Trainer) -> DataLoader:
    """The datamodule's push loader (training images, eval transform, in order)."""
    datamodule = trainer.datamodule
    if datamodule is None or not hasattr(datamodule, "push_dataloader"):
        raise ValueError(
            "ProtoPNet push needs trainer.fit(..., datamodule=dm) with a datamodule that has "
            "push_dataloader() (every protolib VisionDataModule does)"
        )
    return datamodule.push_dataloader()


def rewrap_ddp(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
    """Wrap ``pl_module`` in a fresh DistributedDataParallel after pruning changed parameter shapes (the old
    wrapper's gradient buckets hold the old ones); every rank pruned the same prototypes (the prune's search
    is gathered), so the new wrapper's broadcast from rank 0 changes nothing. DDP reduces only the parameters
    that require gradients when it is built, so all of them do while it is (as at the first wrap; the phases
    freeze groups afterwards). A no-op without DDP."""
    strategy = trainer.strategy
    if isinstance(strategy.model, DistributedDataParallel):
        parameters = list(pl_module.parameters())
        trainable = [p.requires_grad for p in parameters]
        for parameter in parameters:
            parameter.requires_grad_(True)
        strategy.model = pl_module
        strategy.configure_ddp()
        for parameter, flag in zip(parameters, trainable, strict=True):
            parameter.requires_grad_(flag)


class ProtoPNetTraining(L.Callback):
    """Applies the :class:`ProtoPNetSchedule` epoch by epoch: phase (trainable groups and their learning
    rates), push before the first last-layer epoch of each cycle, and optional pruning.

    The module adds this callback itself (``configure_callbacks``); it sets ``trainer.max_epochs`` to the
    length of the schedule.
    """

    def __init__(self, schedule: ProtoPNetSchedule) -> None:
        self.schedule = schedule
        self.plan = schedule.plan()

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or trainer.fit_loop.max_epochs == len(self.plan):
            return
        pushes = self.schedule.push_epochs()
        log.info(
            "ProtoPNet schedule: %d epochs (%d warm-up, %d joint, pushes after epochs %s with %d last-layer "
            "epochs each%s); trainer.max_epochs=%s replaced by %d",
            len(self.plan),
            self.schedule.warm_epochs,
            self.schedule.train_epochs - self.schedule.warm_epochs,
            pushes,
            self.schedule.last_layer_epochs,
            ", then pruning" if self.schedule.prune else "",
            trainer.fit_loop.max_epochs,
            len(self.plan),
        )
        trainer.fit_loop.max_epochs = len(self.plan)

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: PhasedPrototypeModule) -> None:
        epoch = trainer.current_epoch
        if epoch >= len(self.plan):
            raise ValueError(f"epoch {epoch} is past the ProtoPNet schedule ({len(self.plan)} epochs)")
        entry = self.plan[epoch]
        if entry.action == "push":
            pl_module.push_prototypes(push_loader(trainer))
        elif entry.action == "prune":
            pl_module.prune_prototypes(push_loader(trainer))
            rewrap_ddp(trainer, pl_module)
            trainer.strategy.setup_optimizers(trainer)  # parameters changed shape: fresh optimiser state
        pl_module.set_phase(entry.phase, self.schedule.learning_rates(entry), trainer.optimizers[0])

    def state_dict(self) -> dict[str, Any]:
        return {"plan": [asdict(entry) for entry in self.plan]}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("plan") != [asdict(entry) for entry in self.plan]:
            log.warning(
                "the ProtoPNet schedule differs from the checkpoint's; continuing with the new schedule at "
                "the checkpoint's epoch"
            )


class PushEarlyStopping(L.Callback):
    """Stop training when ``monitor`` (validation accuracy), read at the end of each push's last-layer epochs,
    has not improved by ``min_delta`` for ``patience`` pushes; training therefore always ends on a pushed,
    interpretable model."""

    def __init__(self, monitor: str = "val/acc", patience: int = 2, min_delta: float = 0.0) -> None:
        if patience < 1:
            raise ValueError(f"patience must be >= 1 push, got {patience}")
        self.monitor, self.patience, self.min_delta = monitor, patience, min_delta
        self.best = -math.inf
        self.wait = 0

    def on_validation_end(self, trainer: L.Trainer, pl_module: PhasedPrototypeModule) -> None:
        if trainer.sanity_checking or not pl_module.schedule.ends_cycle(trainer.current_epoch):
            return
        if self.monitor not in trainer.callback_metrics:
            raise ValueError(
                f"PushEarlyStopping monitors {self.monitor!r}, which was not logged; logged: "
                f"{sorted(trainer.callback_metrics)}"
            )
        value = float(trainer.callback_metrics[self.monitor])
        if math.isnan(value):  # not the final kind of model yet (pushed before a prune): not a candidate
            return
        if value > self.best + self.min_delta:
            self.best, self.wait = value, 0
            return
        self.wait += 1
        if self.wait >= self.patience:
            log.info(
                "early stopping at epoch %d: %s has not improved on %.4f for %d pushes",
                trainer.current_epoch,
                self.monitor,
                self.best,
                self.wait,
            )
            trainer.should_stop = True

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "wait": self.wait}

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        self.best, self.wait = float(state_dict["best"]), int(state_dict["wait"])
