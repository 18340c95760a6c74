"""PALM LightningModule: mixture-of-prototypes learning for OOD detection (Lu et al., ICLR 2024).

Each training step embeds the (two) augmented views, assigns every embedding softly to its class's
prototypes (Sinkhorn-Knopp, top-k pruning), moves the prototypes by EMA toward their assigned embeddings,
and minimises the mixture MLE loss plus the prototype contrastive loss. At test time ``extract`` gives the
pooled backbone features (the reference scores OOD by Mahalanobis distance on them), the embedding and its
similarity to every prototype; ``logits`` are per-class log-sum-exps of ``similarity / temperature``.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.optim.lr_scheduler import LambdaLR

from protolib.lit.classifier import ClassifierModule, OptimizerFactory, SchedulerFactory, check_finite_loss
from protolib.losses.palm import LOSS_FORMS, palm_mle_loss, prototype_contrastive_loss
from protolib.models.palm import PALMNet


def warmup_cosine(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_fraction: float = 0.02,
    final_lr_factor: float = 1e-3,
) -> LambdaLR:
    """The PALM reference's per-step schedule: linear warm-up from 0, cosine decay to ``final_lr_factor`` lr.

    ``warmup_fraction`` is the share of all steps spent warming up (10 of 500 epochs = 0.02).
    """
    if total_steps < 1 or not 0.0 <= warmup_fraction < 1.0:
        raise ValueError(
            f"warmup_cosine needs total_steps >= 1 and 0 <= warmup_fraction < 1, got {total_steps}, "
            f"{warmup_fraction}"
        )
    warmup_steps = round(warmup_fraction * total_steps)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        cosine = 0.5 * (1 + math.cos(math.pi * progress))
        return cosine + final_lr_factor * (1 - cosine)

    return LambdaLR(optimizer, factor)


class PALMModule(ClassifierModule):
    """The PALM training recipe for a :class:`~protolib.models.palm.PALMNet` (prototypes in ``net.bank``).

    ``loss_form="paper"`` uses the paper's equations, ``"reference"`` the authors' code (see
    :mod:`protolib.losses.palm`). The scheduler factory is called as ``scheduler(optimizer, total_steps=...)``
    and stepped every batch (e.g. :func:`warmup_cosine`).
    """

    def __init__(
        self,
        net: PALMNet,
        contrastive_temperature: float = 0.5,
        contrastive_weight: float = 1.0,
        loss_form: str = "paper",
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
    ) -> None:
        super().__init__(net, optimizer=optimizer, scheduler=scheduler)
        if loss_form not in LOSS_FORMS:
            raise ValueError(f"loss_form {loss_form!r} is unknown: use one of {LOSS_FORMS}")
        if not isinstance(net, PALMNet):
            raise ValueError(f"PALMModule trains a protolib.models.palm.PALMNet, got {type(net).__name__}")
        self.contrastive_temperature = contrastive_temperature
        self.contrastive_weight = contrastive_weight
        self.loss_form = loss_form

    @property
    def prototype_temperature(self) -> float:
        """The temperature of the similarity logits z.p / t, for the OOD suite's ``palm`` score."""
        return self.net.temperature

    def palm_losses(
        self, embedding: torch.Tensor, labels: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
        """Assign, update the prototypes, and return (total loss, named terms, new prototypes (P, E)).

        ``embedding`` (N, E) and ``labels`` (N,) hold every view of every sample; the EMA step happens here.
        Everything runs in float32, also under mixed precision (temperature-scaled logits, small sums).
        """
        with torch.autocast(embedding.device.type, enabled=False):
            embedding = embedding.float()
            weights = self.net.assign(embedding, labels)  # (N, P)
            prototypes = self.net.update_prototypes(embedding, weights)  # (P, E), new values
            mle = palm_mle_loss(embedding, prototypes.detach(), weights, self.net.temperature, self.loss_form)
            terms = {"mle": mle}
            loss = mle
            if self.contrastive_weight > 0:
                contrast = prototype_contrastive_loss(
                    prototypes, self.net.bank.owners, self.contrastive_temperature, self.loss_form
                )
                loss = loss + self.contrastive_weight * contrast
                terms["proto_contra"] = contrast
        return loss, {name: value.detach() for name, value in terms.items()}, prototypes

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch["image"], batch["label"]  # (B, V, C, H, W) for V views, or (B, C, H, W)
        if images.ndim == 5:  # view-major, as the reference concatenates its two crops
            views = images.shape[1]
            images = images.transpose(0, 1).reshape(-1, *images.shape[2:])  # (V * B, C, H, W)
        else:
            views = 1
        _, embedding = self.net.embed(images)
        all_labels = labels.repeat(views)  # (V * B,)
        loss, terms, prototypes = self.palm_losses(embedding, all_labels)
        check_finite_loss(loss, terms, self.global_step)
        logits = self.net.class_logits(embedding.detach().float() @ prototypes.detach().transpose(0, 1))
        self.train_acc(logits, all_labels)
        batch_size = labels.shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in terms.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True, batch_size=batch_size)
        return loss

    scheduler_interval = "step"  # the reference's warm-up + cosine schedule moves every batch

    def build_scheduler(self, optimizer: torch.optim.Optimizer) -> Any:
        return self.scheduler_factory(optimizer, total_steps=int(self.trainer.estimated_stepping_batches))
