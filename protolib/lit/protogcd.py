"""ProtoGCD (Ma et al., TPAMI 2025; github.com/mashijie1028/ProtoGCD): SimGCD's recipe, unbiased labels.

Old and new classes share one set of K learnable cosine prototypes (the network's bank, owner = cluster id)
and one objective, the reference ``train.py``::

    (1 - w) * (distill_DAPL + entropy_weight * entropy + proto_sep_weight * separation) + w * CE(labelled)
  + (1 - w) * SimCLR(all)                                                              + w * SupCon(labelled)

``distill_DAPL`` is the cross-view self-distillation whose teacher, ``softmax(cos / 0.05)``, is turned into
dual-level adaptive pseudo-labels: in each view the share ``r`` of the batch with the largest top-1 / top-2
probability ratio gets one-hot labels, the rest keeps soft ones, and ``r`` ramps linearly from
``init_ratio`` to ``final_ratio`` over ``ramp_ratio_epochs`` after ``wait_ratio_epochs``. ``entropy`` is
SimGCD's mean-entropy regulariser, ``separation`` pushes the prototypes apart. Evaluation, test metrics, K
estimation and pictures are SimGCD's (`protolib.lit.gcd.SimGCDModule`).
"""

from __future__ import annotations

import torch
from torch import nn

from protolib.lit.classifier import OptimizerFactory, SchedulerFactory
from protolib.lit.gcd import SimGCDModule
from protolib.losses.gcd import (
    confidence_ratio,
    mean_entropy_regulariser,
    prototype_separation_loss,
    self_distillation_loss,
    teacher_temperature,
)


class ProtoGCDModule(SimGCDModule):
    """ProtoGCD on a SimGCD-shaped ``net`` (`protolib.models.simgcd.SimGCDNet`: ``projection``,
    ``prototype_similarity``, ``logits`` = cosine / temperature, K prototypes in ``prototype_bank``).

    ``teacher_temp`` is the reference's fixed teacher temperature; ``warmup_teacher_temp`` (with
    ``warmup_teacher_temp_epochs``) ramps it as the reference's ``DistillLoss_ratio_ramp`` does.
    ``separation_temperature`` defaults to the network's logit temperature (the reference passes
    ``temp_logits``); the separation is scaled by ``separation_temperature / 0.1`` as there.
    """

    def __init__(
        self,
        net: nn.Module,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        sup_weight: float = 0.35,
        entropy_weight: float = 2.0,
        proto_sep_weight: float = 0.1,
        teacher_temp: float = 0.05,
        warmup_teacher_temp: float | None = None,
        warmup_teacher_temp_epochs: int = 0,
        wait_ratio_epochs: int = 0,
        ramp_ratio_epochs: int = 100,
        init_ratio: float = 0.0,
        final_ratio: float = 1.0,
        separation_temperature: float | None = None,
        supcon_temperature: float = 0.07,
        simclr_temperature: float = 1.0,
        estimate_k_max: int | None = None,
    ) -> None:
        super().__init__(
            net,
            optimizer=optimizer,
            scheduler=scheduler,
            sup_weight=sup_weight,
            memax_weight=entropy_weight,
            warmup_teacher_temp=teacher_temp if warmup_teacher_temp is None else warmup_teacher_temp,
            teacher_temp=teacher_temp,
            warmup_teacher_temp_epochs=warmup_teacher_temp_epochs,
            supcon_temperature=supcon_temperature,
            simclr_temperature=simclr_temperature,
            estimate_k_max=estimate_k_max,
        )
        for name, value in (("init_ratio", init_ratio), ("final_ratio", final_ratio)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"model.{name}={value} (share of hard pseudo-labels) must be in [0, 1]")
        if wait_ratio_epochs < 0 or ramp_ratio_epochs < 0:
            raise ValueError(
                f"model.wait_ratio_epochs={wait_ratio_epochs} and "
                f"model.ramp_ratio_epochs={ramp_ratio_epochs} must be >= 0"
            )
        if teacher_temp <= 0 or (separation_temperature is not None and separation_temperature <= 0):
            raise ValueError(
                f"temperatures must be positive: model.teacher_temp={teacher_temp}, "
                f"model.separation_temperature={separation_temperature}"
            )
        self.proto_sep_weight = proto_sep_weight
        self.wait_ratio_epochs, self.ramp_ratio_epochs = wait_ratio_epochs, ramp_ratio_epochs
        self.init_ratio, self.final_ratio = init_ratio, final_ratio
        self.separation_temperature = separation_temperature or float(getattr(net, "temperature", 0.1))

    def hard_ratio(self) -> float:
        """This epoch's share of hard pseudo-labels (the confidence ramp)."""
        epoch, wait, ramp = self.current_epoch, self.wait_ratio_epochs, self.ramp_ratio_epochs
        return confidence_ratio(epoch, wait, ramp, self.init_ratio, self.final_ratio)

    def clustering_losses(
        self, logits: torch.Tensor, cosine: torch.Tensor, views: int
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Adaptive-pseudo-label distillation + entropy + prototype separation on all images (V*B, K)."""
        temp = teacher_temperature(
            self.current_epoch, self.warmup_teacher_temp_epochs, self.warmup_teacher_temp, self.teacher_temp
        )
        ratio = self.hard_ratio()
        distill = self_distillation_loss(logits, cosine, views, temp, hard_ratio=ratio)
        entropy = mean_entropy_regulariser(logits)
        separation = prototype_separation_loss(self.net.prototype_bank.vectors, self.separation_temperature)
        total = distill + self.memax_weight * entropy + self.proto_sep_weight * separation
        terms = {
            "distill": distill,
            "entropy": entropy,
            "separation": separation,
            "hard_ratio": torch.tensor(ratio),
        }
        return total, terms
