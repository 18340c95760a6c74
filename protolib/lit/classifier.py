"""The classifier training recipe every protolib family builds on: steps, accuracy, optimiser, contract."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassAccuracy, MulticlassConfusionMatrix

OptimizerFactory = Callable[[Iterable[Any]], torch.optim.Optimizer]
SchedulerFactory = Callable[[torch.optim.Optimizer], Any]


class ClassifierModule(L.LightningModule):
    """The classifier training recipe: a network from config, cross-entropy, accuracy, optimiser, scheduler.

    Batches are dicts ``{"image", "label", "index"}``. ``net`` (built by ``train.py`` from the model
    config's ``net:`` node) provides the contract the OOD postprocessors and explanations read:
    ``num_classes``, ``extract(images)`` (``"logits"`` and ``"features"`` at least), ``last_layer`` (maps
    ``features`` to ``logits``, or ``None``) and ``prototype_bank`` (or ``None``). Recipes with another
    objective override :meth:`compute_loss` (and :meth:`parameter_groups`); they never take the network's
    own arguments.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__()
        num_classes = getattr(net, "num_classes", None)
        if not isinstance(net, nn.Module) or not isinstance(num_classes, int):
            raise ValueError(
                f"{type(self).__name__} needs a network (nn.Module with an int num_classes and extract()), "
                f"got {type(net).__name__}; set model.net._target_ to a protolib.models network"
            )
        if num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {num_classes}")
        self.net = net
        self.num_classes = num_classes
        self.optimizer_factory = optimizer
        self.scheduler_factory = scheduler
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_confusion = MulticlassConfusionMatrix(num_classes)
        # Set by train.py so that protolib.lit.checkpoint.load_module can rebuild the module.
        self.build_config: dict[str, Any] | None = None

    # --- the OOD / explanation contract, forwarded from the network ----------------------------------
    @property
    def last_layer(self) -> nn.Module | None:
        return getattr(self.net, "last_layer", None)

    @property
    def prototype_bank(self) -> nn.Module | None:
        return getattr(self.net, "prototype_bank", None)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """At least ``"logits"`` (B, C) and ``"features"`` (B, F) for a batch of images."""
        return self.net.extract(images)

    # --- what recipes may change ---------------------------------------------------------------------
    def compute_loss(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its named terms (logged as ``train/<name>``); cross-entropy by default."""
        loss = F.cross_entropy(outputs["logits"], batch["label"])
        return loss, {"ce": loss.detach()}

    def parameter_groups(self) -> list[dict[str, Any]] | Iterable[nn.Parameter]:
        """What the optimiser updates: every trainable parameter by default."""
        return [p for p in self.parameters() if p.requires_grad]

    # --- Lightning hooks -----------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)["logits"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        outputs = self.extract(batch["image"])
        loss, terms = self.compute_loss(batch, outputs)
        check_finite_loss(loss, terms, self.global_step)
        self.train_acc(outputs["logits"].detach(), batch["label"])
        batch_size = batch["label"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    def _evaluate(self, batch: dict[str, torch.Tensor], stage: str, accuracy: MulticlassAccuracy) -> None:
        logits = self(batch["image"])
        labels = batch["label"]
        accuracy(logits, labels)
        batch_size = labels.shape[0]
        self.log(f"{stage}/loss", F.cross_entropy(logits, labels), batch_size=batch_size, sync_dist=True)
        self.log(f"{stage}/acc", accuracy, prog_bar=True, batch_size=batch_size)
        if stage == "test":
            self.test_confusion.update(logits.argmax(dim=1), labels)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def on_test_epoch_start(self) -> None:
        self.test_confusion.reset()

    def configure_optimizers(self) -> Any:
        if self.optimizer_factory is None:
            raise ValueError(f"{type(self).__name__} has no optimizer: set model.optimizer in the config")
        optimizer = self.optimizer_factory(self.parameter_groups())
        if self.scheduler_factory is None:
            return optimizer
        scheduler = {"scheduler": self.build_scheduler(optimizer), "interval": self.scheduler_interval}
        return {"optimizer": optimizer, "lr_scheduler": scheduler}

    scheduler_interval = "epoch"  # when Lightning steps the scheduler: "epoch" or "step"

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        """The learning-rate scheduler from the configured factory; subclasses may pass more arguments."""
        return self.scheduler_factory(optimizer)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.build_config is not None:
            checkpoint["protolib"] = self.build_config


DIVERGENCE_HINT = (
    "lower the learning rate, check the input normalisation, or enable gradient clipping "
    "(trainer.gradient_clip_val)"
)


def divergence_error(what: str, step: int) -> FloatingPointError:
    """The one error every family stops with when training diverges: what went wrong, where, and the fix."""
    return FloatingPointError(f"{what} at step {step}; training has diverged: {DIVERGENCE_HINT}")


def check_finite_loss(loss: torch.Tensor, terms: dict[str, torch.Tensor], step: int) -> None:
    """Stop with the names of the non-finite loss terms instead of training on NaN."""
    if torch.isfinite(loss):
        return
    bad = [name for name, value in terms.items() if not torch.isfinite(value).all()]
    raise divergence_error(f"loss is {loss.item()} (non-finite terms: {bad or 'none; the total'})", step)


def train_only_groups(
    groups: dict[str, list[nn.Parameter]], learning_rates: dict[str, float], optimizer: torch.optim.Optimizer
) -> None:
    """Train exactly the parameter ``groups`` named in ``learning_rates``, at those rates; freeze the others.

    The optimiser's param groups carry the same names (recipes with phase schedules build them so).
    """
    for name, params in groups.items():
        for param in params:
            param.requires_grad_(name in learning_rates)
    for group in optimizer.param_groups:
        if group.get("name") not in groups:
            raise ValueError(
                f"optimizer group {group.get('name')!r} is not a part of the network {sorted(groups)}"
            )
        group["lr"] = learning_rates.get(group["name"], 0.0)
