"""The ProtoTree training recipe: negative log-likelihood of the soft tree by gradient for the prototypes and
the network, the derivative-free leaf update after every batch, then pruning and the push.

The schedule (frozen epochs, multi-step learning rates, the prune + push after the last step) is applied by
:class:`~protolib.lit.callbacks.prototree.ProtoTreeTraining`, which the module adds to the trainer itself.
Test metrics report the soft tree (``test/acc``) beside its deterministic versions (``test/acc_greedy``,
``test/acc_max_path``), the prototypes in use and the mean length of the greedy paths.
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
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from protolib.lit.callbacks.prototree import ProtoTreeSchedule, ProtoTreeTraining
from protolib.lit.classifier import ClassifierModule, OptimizerFactory, train_only_groups

log = logging.getLogger(__name__)

# What a network must offer to be trained by this recipe.
TREE_NETWORK_API = ("extract", "parameter_groups", "push", "prune", "tree", "prototype_bank")


class ProtoTreeModule(ClassifierModule):
    """A :class:`~protolib.models.prototree.ProtoTree` trained as the paper: cross-entropy of the soft tree's
    prediction (``extract()["logits"]`` is its log, so cross-entropy is its NLL) for the backbone, add-on
    and prototypes, the leaves by the closed-form update. The optimiser (AdamW with eps 1e-7 and no weight
    decay, as the reference) gets one parameter group per part of the network."""

    def __init__(
        self,
        net: nn.Module,
        schedule: ProtoTreeSchedule | None = None,
        optimizer: OptimizerFactory | None = None,
    ) -> None:
        optimizer = optimizer or partial(torch.optim.AdamW, eps=1e-7, weight_decay=0.0)
        super().__init__(net, optimizer=optimizer, scheduler=None)
        missing = [name for name in TREE_NETWORK_API if not hasattr(net, name)]
        if missing:
            raise ValueError(
                f"{type(net).__name__} cannot be trained by ProtoTreeModule: it lacks {missing}; use "
                "protolib.models.prototree.ProtoTree"
            )
        self.schedule = schedule or ProtoTreeSchedule()
        self.phase: str | None = None  # set by ProtoTreeTraining at every epoch start
        self._epoch_start_leaves: torch.Tensor | None = None
        self._batches_per_epoch = 1
        self._leaf_batch: tuple[torch.Tensor, ...] | None = None
        self.test_acc_greedy = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_acc_max_path = MulticlassAccuracy(self.num_classes, average="micro")
        self.test_path_length = MeanMetric()

    # --- optimisation ---------------------------------------------------------------------------------
    def parameter_groups(self) -> list[dict[str, Any]]:
        """One named group per part of the network at the first epoch's learning rate."""
        lrs = self.schedule.learning_rates(0)
        return [
            {"name": name, "params": params, "lr": lrs.get(name, 0.0)}
            for name, params in self.net.parameter_groups().items()
        ]

    def set_phase(
        self, phase: str, learning_rates: dict[str, float], optimizer: torch.optim.Optimizer
    ) -> None:
        """Train exactly the groups in ``learning_rates`` (at those rates); freeze the others."""
        train_only_groups(self.net.parameter_groups(), learning_rates, optimizer)
        self.phase = phase
        self.train(self.training)

    def train(self, mode: bool = True) -> ProtoTreeModule:
        """After the push nothing trains: the network stays in eval mode, so batch-norm statistics (and with
        them the pushed prototypes' patches) do not move."""
        super().train(mode)
        if mode and self.phase == "project":
            self.net.eval()
        return self

    def configure_callbacks(self) -> list[L.Callback]:
        return [ProtoTreeTraining(self.schedule)]

    # --- steps ----------------------------------------------------------------------------------------
    def compute_loss(
        self, batch: dict[str, torch.Tensor], outputs: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        loss, terms = super().compute_loss(batch, outputs)  # cross-entropy of log y_hat: NLL of the tree
        # The leaves learn from this same forward pass once the optimiser has stepped (on_train_batch_end).
        self._leaf_batch = (
            outputs["path_probabilities"].detach(),
            outputs["probabilities"].detach(),
            batch["label"],
        )
        return loss, {"nll": terms["ce"]}

    def start_leaf_epoch(self, batches: int) -> None:
        """Remember the epoch-start leaves and the number of batches per epoch (the update's smoothing)."""
        self._epoch_start_leaves = self.net.tree.leaf_logits.clone()
        self._batches_per_epoch = max(1, batches)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.update_leaves()

    def update_leaves(self) -> None:
        """The derivative-free leaf step from the last training batch's forward pass (once the optimiser has
        stepped; a no-op when it was already applied)."""
        if self._leaf_batch is None:
            return
        tree = self.net.tree
        if self._epoch_start_leaves is None or self._epoch_start_leaves.shape != tree.leaf_logits.shape:
            self.start_leaf_epoch(self._batches_per_epoch)
        update = tree.leaf_update(*self._leaf_batch)
        tree.apply_leaf_update(update, self._epoch_start_leaves, self._batches_per_epoch)
        self._leaf_batch = None

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        super().test_step(batch, batch_idx)
        images, labels = batch["image"], batch["label"]
        output = self.net(images)
        tree = self.net.tree
        greedy = tree(output.similarities, "greedy")
        max_path = tree(output.similarities, "max_path")
        self.test_acc_greedy(greedy.probabilities, labels)
        self.test_acc_max_path(max_path.probabilities, labels)
        lengths = (tree.leaf_paths[greedy.leaves] < 2 * tree.num_prototypes).sum(dim=1)  # decisions taken
        self.test_path_length(lengths.float())
        batch_size = labels.shape[0]
        self.log("test/acc_greedy", self.test_acc_greedy, batch_size=batch_size)
        self.log("test/acc_max_path", self.test_acc_max_path, batch_size=batch_size)
        self.log("test/mean_path_length", self.test_path_length, batch_size=batch_size)

    def on_test_epoch_end(self) -> None:
        self.log("test/prototypes", float(self.net.tree.num_prototypes))
        self.log("test/leaves", float(self.net.tree.num_leaves))

    def on_validation_epoch_end(self) -> None:
        # Accuracy of the pruned, pushed (interpretable) tree; NaN before, so that a checkpoint monitoring it
        # only ever keeps a pushed tree.
        pushed = self.phase == "project" and not self.trainer.sanity_checking
        self.log("val/pushed_acc", self.val_acc.compute() if pushed else math.nan, sync_dist=True)

    # --- prune and push (called by the schedule) ---------------------------------------------------------
    def prune_and_push(self, loader: DataLoader) -> None:
        """The reference's end of training: prune uninformative subtrees, then push every prototype. The last
        batch's leaf update comes first (the schedule calls this before the module's own batch-end hook)."""
        self.update_leaves()
        before = self.net.tree.num_prototypes
        removed = self.net.prune(self.schedule.prune_threshold)
        report = self.net.push(loader, step=self.global_step, percentile=self.schedule.push_percentile)
        self.log_dict(
            {
                "prune/removed": float(len(removed)),
                "prune/prototypes": float(self.net.tree.num_prototypes),
                "push/seconds": report.seconds,
                "push/mean_distance": report.distances.mean().item(),
                "push/duplicates": float(report.duplicates.sum()),
            },
            sync_dist=True,
        )
        log.info(
            "pruning kept %d of %d prototypes (%d leaves); push in %.2f s, mean squared distance %.4f",
            self.net.tree.num_prototypes,
            before,
            self.net.tree.num_leaves,
            report.seconds,
            report.distances.mean().item(),
        )
