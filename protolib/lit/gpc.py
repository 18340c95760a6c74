"""GPC's training recipe (Zhao, Wen, Han, ICCV 2023; github.com/DTennant/GPC ``gmm_sm.py``).

EM over a network with a fixed (E-step-set) prototype bank, e.g. `protolib.models.simgcd.SimGCDNet` with
``learnable_prototypes: false``:

- **E-step** (:meth:`GPCModule.gpc_e_step`, called by `protolib.lit.callbacks.gpc.GPCSchedule` at the start
  of an epoch): the semi-supervised Gaussian mixture with split and merge (`protolib.gcd.gmm.GPCEStep`) on
  the L2-normalised backbone features of every training image; the bank's prototypes become the new
  clusters (K = the bank's size, changed by its split / merge / remove), every image gets its cluster and
  every cluster its concentration;
- **M-step** (each training step)::

      (1 - w) * SimCLR(all) + w * SupCon(labelled) + pcl_weight * PCL(both views -> their cluster)

  with ``w = sup_weight`` (0.35) on the projection head's outputs, and PCL on the normalised backbone
  features, prototype logits divided by each cluster's concentration; before the first E-step, only the
  contrastive terms (the reference's warm-up epochs).

Evaluation is SimGCD's (`protolib.lit.gcd.SimGCDModule`): each image goes to its nearest prototype
(cosine), v2 / v2b All / Old / New; ``test/estimated_k`` is the number of clusters GPC ended with.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from protolib.gcd.gmm import EStepResult, GPCEStep
from protolib.lit.classifier import OptimizerFactory, SchedulerFactory
from protolib.lit.gcd import SimGCDModule, view_major
from protolib.losses.gpc import prototypical_contrastive_loss


class GPCModule(SimGCDModule):
    """GPC on ``net`` (``extract`` -> ``features``, ``projection``, cosine ``logits`` to its bank).

    ``e_step`` holds the E-step's hyper-parameters (`protolib.gcd.gmm.GPCEStep`); ``pcl_weight`` weighs
    the prototypical contrastive term (reference ``--pcl_weight`` 1.0); the contrastive temperatures are
    SimGCD's (SupCon 0.07, SimCLR 1.0, as GCD / GPC's code).
    """

    def __init__(
        self,
        net: nn.Module,
        e_step: GPCEStep | None = None,
        optimizer: OptimizerFactory | None = None,
        scheduler: SchedulerFactory | None = None,
        sup_weight: float = 0.35,
        pcl_weight: float = 1.0,
        supcon_temperature: float = 0.07,
        simclr_temperature: float = 1.0,
    ) -> None:
        super().__init__(
            net,
            optimizer=optimizer,
            scheduler=scheduler,
            sup_weight=sup_weight,
            supcon_temperature=supcon_temperature,
            simclr_temperature=simclr_temperature,
        )
        if self.prototype_bank is None or self.prototype_bank.learnable:
            raise ValueError(
                "GPC sets its prototypes in the E-step: the network's bank must not be learned by gradient "
                "(model.net.learnable_prototypes: false)"
            )
        self.e_step = e_step if e_step is not None else GPCEStep()
        self.pcl_weight = pcl_weight
        self.assignments: torch.Tensor | None = None  # (N,) cluster of each training image
        self.concentration: torch.Tensor | None = None  # (K,) phi of each cluster
        self.k_history: list[tuple[int, int]] = []  # (epoch, K) after each epoch's E-step

    @property
    def num_clusters(self) -> int:
        """K, the current number of clusters (prototypes in the bank)."""
        return self.prototype_bank.num_prototypes

    @torch.no_grad()
    def gpc_e_step(self, generator: torch.Generator | None = None, moves: bool = True) -> EStepResult:
        """Run the E-step on the current features; updates the bank, assignments and concentrations
        (``moves=False``: refit the clusters without split / merge)."""
        features, labels = self.training_features()
        result = self.e_step(
            features, torch.from_numpy(labels), self.prototype_bank, self.num_known or 0,
            step=self.global_step, generator=generator, moves=moves,
        )  # fmt: skip
        self.assignments = result.assignments.to(self.device)
        self.concentration = result.concentration.to(self.device)
        return result

    def gcd_losses(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """GPC's M-step loss and its named terms for a two-view batch."""
        images, views = view_major(batch["image"])
        out = self.net.extract(images)
        simclr, supcon = self.contrastive_terms(out["projection"], batch, views)
        w = self.sup_weight
        total = (1 - w) * simclr + w * supcon
        terms = {"simclr": simclr, "supcon": supcon}
        if self.assignments is not None and self.concentration is not None:
            device = out["features"].device  # (a restored checkpoint holds them on the CPU)
            targets = self.assignments.to(device)[batch["index"].to(device)]
            phi = self.concentration.to(device)
            views_list = list(out["features"].chunk(views))
            pcl = prototypical_contrastive_loss(views_list, self.prototype_bank.vectors, phi, targets)
            total = total + self.pcl_weight * pcl
            terms["pcl"] = pcl
        return total, {name: value.detach() for name, value in terms.items()}

    def on_test_epoch_end(self) -> None:
        if self.assignments is None:
            rank_zero_warn(
                "GPC ran no E-step, so its prototypes are untrained: add the callback "
                "protolib.lit.callbacks.gpc.GPCSchedule (see conf/experiment/gpc_digits.yaml)"
            )
        super().on_test_epoch_end()
        self.log("test/estimated_k", float(self.num_clusters))

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        checkpoint["gpc"] = {
            "assignments": self.assignments,
            "concentration": self.concentration,
            "k_history": self.k_history,
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        state = checkpoint.get("gpc") or {}
        self.assignments = state.get("assignments")
        self.concentration = state.get("concentration")
        self.k_history = list(state.get("k_history", []))
