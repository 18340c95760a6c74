"""Category-discovery training recipes; SimGCD (Wen et al., ICCV 2023; github.com/CVMI-Lab/SimGCD).

Each step sees two views of a batch drawn half labelled / half unlabelled (`protolib.data.gcd`) and
minimises, as the reference ``train.py``::

    (1 - w) * (self-distillation + memax_weight * mean-entropy) + w * CE(labelled)
  + (1 - w) * SimCLR(all)                                      + w * SupCon(labelled),    w = sup_weight

Evaluation: every image goes to its argmax prototype (cluster); clustering accuracy v2 (one Hungarian
matching, Old / New by true class) is logged as ``val/*`` each epoch and, at test time, ``test/all_acc``,
``test/old_acc``, ``test/new_acc`` on the unlabelled training images (transductive, what the papers report),
``test/inductive_*`` on the test split, the v2b forms, and ``test/k`` (clusters in use).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchmetrics.classification import MulticlassConfusionMatrix

from protolib.gcd.clustering import estimate_num_clusters
from protolib.gcd.metrics import hungarian_match, split_cluster_accuracy
from protolib.lit.classifier import ClassifierModule, OptimizerFactory, SchedulerFactory, check_finite_loss
from protolib.losses.gcd import (
    contrastive_loss,
    mean_entropy_regulariser,
    self_distillation_loss,
    teacher_temperature,
)
from protolib.utils.modes import evaluating


def view_major(images: torch.Tensor) -> tuple[torch.Tensor, int]:
    """(B, V, C, H, W) -> (V * B, C, H, W) with all first views first, as the reference ``torch.cat``."""
    if images.ndim != 5:
        raise ValueError(
            f"GCD training needs two views per image (B, V, C, H, W), got {tuple(images.shape)}; set "
            "data.base.num_views=2 with data.base.train_transforms"
        )
    return images.transpose(0, 1).reshape(-1, *images.shape[2:]), images.shape[1]


class GCDEvaluation:
    """Collects (prediction, true label) pairs of one evaluation set and scores them (v2, v2b, K used)."""

    def __init__(self) -> None:
        self.preds: list[torch.Tensor] = []
        self.labels: list[torch.Tensor] = []

    def update(self, preds: torch.Tensor, labels: torch.Tensor) -> None:
        self.preds.append(preds.detach().cpu())
        self.labels.append(labels.detach().cpu())

    def compute(self, num_known: int, prefix: str) -> tuple[dict[str, float], np.ndarray, np.ndarray]:
        """Metrics named ``{prefix}all_acc`` ...; also returns (predictions, labels) and then resets."""
        preds, labels = torch.cat(self.preds).numpy(), torch.cat(self.labels).numpy()
        self.preds, self.labels = [], []
        old = labels < num_known
        out = {}
        for mode, tag in (("v2", ""), ("v2b", "v2b_")):
            all_acc, old_acc, new_acc = split_cluster_accuracy(labels, preds, old, mode)
            out.update({f"{prefix}{tag}all_acc": all_acc, f"{prefix}{tag}old_acc": old_acc})
            out[f"{prefix}{tag}new_acc"] = new_acc
        return out, preds, labels


class SimGCDModule(ClassifierModule):
    """SimGCD on ``net`` (e.g. `protolib.models.simgcd.SimGCDNet`: ``projection``, ``prototype_similarity``,
    ``logits`` = cosine / 0.1); the K prototypes live in the network's bank, owner = cluster id.

    The labelled classes are clusters ``0..k-1`` (the datamodule relabels them first); their number is read
    from the datamodule (``num_known_classes``) when training starts. With ``estimate_k_max`` the test also
    runs Vaze et al.'s K estimate on the backbone features of all training images, over
    [known classes, estimate_k_max], logged as ``test/estimated_k``.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        sup_weight: float = 0.35,
        memax_weight: float = 2.0,
        warmup_teacher_temp: float = 0.07,
        teacher_temp: float = 0.04,
        warmup_teacher_temp_epochs: int = 30,
        supcon_temperature: float = 0.07,
        simclr_temperature: float = 1.0,
        estimate_k_max: int | None = None,
    ) -> None:
        super().__init__(net, optimizer=optimizer, scheduler=scheduler)
        if not 0.0 <= sup_weight <= 1.0:
            raise ValueError(f"sup_weight must be in [0, 1], got {sup_weight}")
        self.sup_weight = sup_weight
        self.memax_weight = memax_weight
        self.warmup_teacher_temp = warmup_teacher_temp
        self.teacher_temp = teacher_temp
        self.warmup_teacher_temp_epochs = warmup_teacher_temp_epochs
        self.supcon_temperature = supcon_temperature
        self.simclr_temperature = simclr_temperature
        self.estimate_k_max = estimate_k_max
        self.num_known: int | None = None
        self.evaluations = {"val": GCDEvaluation(), "trans": GCDEvaluation(), "ind": GCDEvaluation()}

    def setup(self, stage: str) -> None:
        datamodule = getattr(self.trainer, "datamodule", None) if self._trainer is not None else None
        known = getattr(datamodule, "num_known_classes", None)
        if known is None:
            raise ValueError(
                f"{type(self).__name__} needs a GCD datamodule "
                "(data._target_: protolib.data.gcd.GCDDataModule) "
                "that says how many classes are known"
            )
        if self.num_classes < known:
            raise ValueError(
                f"model.net.num_classes={self.num_classes} (K clusters) is below the {known} known classes; "
                f"set it to at least {known} plus the number of new classes expected"
            )
        self.num_known = int(known)
        classes = int(getattr(datamodule, "num_classes", None) or self.num_classes)
        if self.test_confusion.num_classes != classes:  # true class x matched class, whatever K is
            self.test_confusion = MulticlassConfusionMatrix(classes).to(self.device)

    def parameter_groups(self) -> list[dict[str, Any]]:
        """The reference's groups: weight decay on weights, none on biases and 1-D (norm) parameters."""
        decay, no_decay = [], []
        for name, p in self.named_parameters():
            if p.requires_grad:
                (no_decay if name.endswith(".bias") or p.ndim == 1 else decay).append(p)
        return [{"params": decay}, {"params": no_decay, "weight_decay": 0.0}]

    def contrastive_terms(
        self, proj: torch.Tensor, batch: dict[str, torch.Tensor], views: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(SimCLR on every image, SupCon on the labelled ones) of the view-major projections (V*B, E)."""
        b = batch["image"].shape[0]
        proj_views = proj.reshape(views, b, -1).transpose(0, 1)  # (B, V, E)
        simclr = contrastive_loss(proj_views, None, self.simclr_temperature)
        lab = batch["labelled"].bool()
        if not lab.any():  # a batch without labelled images (the reference would produce NaN)
            return simclr, proj.sum() * 0.0
        return simclr, contrastive_loss(proj_views[lab], batch["label"][lab], self.supcon_temperature)

    def clustering_losses(
        self, logits: torch.Tensor, cosine: torch.Tensor, views: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The unsupervised clustering objective on all images (V*B, K): SimGCD's self-distillation with the
        teacher-temperature schedule plus ``memax_weight`` x mean-entropy. Recipes built on SimGCD's override
        this (ProtoGCD)."""
        temp = teacher_temperature(
            self.current_epoch, self.warmup_teacher_temp_epochs, self.warmup_teacher_temp, self.teacher_temp
        )
        distill = self_distillation_loss(logits, cosine, views, temp)
        memax = mean_entropy_regulariser(logits)
        return distill + self.memax_weight * memax, {"distill": distill, "memax": memax}

    def gcd_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The total loss and its named terms for a two-view batch: ``(1 - w)`` x (clustering + SimCLR) +
        ``w`` x (CE + SupCon) on the labelled images."""
        images, views = view_major(batch["image"])
        out = self.net.extract(images)
        logits, cosine, proj = out["logits"].float(), out["prototype_similarity"], out["projection"]
        labelled = batch["labelled"].bool().repeat(views)  # (V*B,)
        labels = batch["label"].repeat(views)
        w = self.sup_weight
        cluster, terms = self.clustering_losses(logits, cosine, views)
        simclr, supcon = self.contrastive_terms(proj, batch, views)
        # a batch without labelled images: no CE (the reference would produce NaN)
        ce = F.cross_entropy(logits[labelled], labels[labelled]) if labelled.any() else logits.sum() * 0.0
        total = (1 - w) * cluster + w * ce + (1 - w) * simclr + w * supcon
        terms.update(ce=ce, simclr=simclr, supcon=supcon)
        return total, {name: value.detach() for name, value in terms.items()}

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, terms = self.gcd_losses(batch)
        check_finite_loss(loss, terms, self.global_step)
        batch_size = batch["label"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        return loss

    def predict_clusters(self, images: torch.Tensor) -> torch.Tensor:
        """The cluster (argmax prototype) of each image (B,)."""
        return self.net.extract(images)["logits"].argmax(dim=1)

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> None:
        self.evaluations["val"].update(self.predict_clusters(batch["image"]), batch["label"])

    def on_validation_epoch_end(self) -> None:
        if not self.evaluations["val"].preds:
            return
        metrics, _, _ = self.evaluations["val"].compute(self.num_known or 0, "val/")
        self.log("val/all_acc", metrics.pop("val/all_acc"), prog_bar=True)
        self.log_dict(metrics)

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int, dataloader_idx: int = 0) -> None:
        key = "trans" if dataloader_idx == 0 else "ind"
        self.evaluations[key].update(self.predict_clusters(batch["image"]), batch["label"])

    def on_test_epoch_end(self) -> None:
        known = self.num_known or 0
        metrics: dict[str, float] = {}
        if self.evaluations["trans"].preds:
            trans, preds, labels = self.evaluations["trans"].compute(known, "test/")
            metrics.update(trans)
            metrics["test/acc"] = trans["test/all_acc"]  # accuracy after matching, for train.py's summary
            metrics["test/k"] = float(len(np.unique(preds)))
            # class x cluster confusion after matching (train.py draws test_confusion)
            to_class = {cluster: cls for cls, cluster in hungarian_match(labels, preds).items()}
            matched = torch.as_tensor([to_class.get(int(p), -1) for p in preds])
            keep = (matched >= 0) & (matched < self.test_confusion.num_classes)  # clusters matched to a class
            self.test_confusion.update(
                matched[keep].to(self.device), torch.as_tensor(labels)[keep].to(self.device)
            )
        if self.evaluations["ind"].preds:
            ind, _, _ = self.evaluations["ind"].compute(known, "test/inductive_")
            metrics.update(ind)
        if self.estimate_k_max is not None:
            metrics["test/estimated_k"] = float(self.estimate_k())
        self.log_dict(metrics)

    @torch.no_grad()
    def training_features(self) -> tuple[torch.Tensor, np.ndarray]:
        """Backbone features (N, F) of every training image in dataset order (eval view, eval mode) and
        their labels (N,), -1 where unlabelled (only the labelled images' classes are known)."""
        datamodule = self.trainer.datamodule
        feats, labels = [], []
        with evaluating(self):
            for batch in datamodule.features_dataloader():
                feats.append(self.net.extract(batch["image"].to(self.device))["features"].float().cpu())
                labels.append(batch["label"])
        y = np.where(datamodule.labelled_mask, torch.cat(labels).numpy(), -1)
        return torch.cat(feats), y

    def estimate_k(self) -> int:
        """Vaze et al.'s K estimate (Brent search of labelled cluster accuracy) on the training features."""
        feats, y = self.training_features()
        return estimate_num_clusters(feats, y, k_min=self.num_known, k_max=self.estimate_k_max).k
