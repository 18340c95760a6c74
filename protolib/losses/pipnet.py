"""PIP-Net's objective: patch alignment between two views, tanh uniformity of presence, and the class loss.

Written after the paper (eqs. 1-3) and its code (``pipnet/train.py``): the alignment ``-log(z1 . z2)`` of
every patch's presence vector with the other view's (stop-gradient on the target, both directions), the
tanh-loss ``-mean_p log(tanh(sum_b pool_bp) + eps)`` that asks every prototype to be present somewhere in
the batch, and the negative log-likelihood of ``softmax(log(1 + o^m))`` on the non-negative head's output o.
Which terms count, with which weight, is the schedule's business (pre-training / fine-tuning / joint).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import nn


def align_loss(inputs: torch.Tensor, targets: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """``-mean_n log(<inputs_n, targets_n> + eps)`` over rows (N, P) of unit-sum presence vectors."""
    return -torch.log((inputs * targets).sum(dim=1) + eps).mean()


def patch_rows(maps: torch.Tensor) -> torch.Tensor:
    """Presence maps (B, P, H, W) -> one row per patch (B*H*W, P)."""
    return maps.flatten(2).permute(0, 2, 1).flatten(0, 1)


def view_alignment(maps1: torch.Tensor, maps2: torch.Tensor) -> torch.Tensor:
    """Symmetric patch alignment of two views' presence maps (B, P, H, W), each against the other's detached
    copy (the reference's ``(align(z1, z2.detach()) + align(z2, z1.detach())) / 2``)."""
    z1, z2 = patch_rows(maps1), patch_rows(maps2)
    return (align_loss(z1, z2.detach()) + align_loss(z2, z1.detach())) / 2


def tanh_uniformity(pooled: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """``-mean_p log(tanh(sum_b pooled_bp) + eps)`` of a view's presence scores (B, P)."""
    return -torch.log(torch.tanh(pooled.sum(dim=0)) + eps).mean()


def pipnet_class_loss(
    out: torch.Tensor, labels: torch.Tensor, multiplier: float | torch.Tensor
) -> torch.Tensor:
    """NLL of ``log_softmax(log(1 + out^m))`` for the head's non-negative output (B, C)."""
    return F.nll_loss(F.log_softmax(torch.log1p(out**multiplier), dim=1), labels)


class PIPNetLoss(nn.Module):
    """``align * L_A + tanh * L_T + classification * L_C`` on a batch of two views.

    ``weights`` (set by the schedule every epoch; a term with weight 0 is not computed) start as the joint
    training phase's (paper: 5, 2, 2). ``outputs`` come from :meth:`PIPNet.extract` on the two views stacked
    along the batch (first half view 1): ``presence_maps`` (2B, P, H, W), ``pooled`` (2B, P), ``logits``.
    ``class_loss(outputs, labels, net)`` replaces the class term ``L_C`` for networks with another head
    (deep CBC / RBF: ``protolib.losses.cbc.HeadClassLoss``); None is PIP-Net's.
    """

    def __init__(
        self,
        align: float = 5.0,
        tanh: float = 2.0,
        classification: float = 2.0,
        class_loss: Callable[[Mapping[str, torch.Tensor], torch.Tensor, nn.Module], torch.Tensor]
        | None = None,
    ) -> None:
        super().__init__()
        self.weights = {"align": align, "tanh": tanh, "classification": classification}
        self.class_loss = class_loss

    def set_weights(self, weights: Mapping[str, float]) -> None:
        """Replace the term weights (keys: align, tanh, classification)."""
        unknown = set(weights) - set(self.weights)
        if unknown:
            raise ValueError(f"unknown PIP-Net loss terms {sorted(unknown)}: use {sorted(self.weights)}")
        self.weights = {name: float(weights.get(name, 0.0)) for name in self.weights}

    def forward(
        self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, net: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total and unweighted terms; ``labels`` (2B,) of both views."""
        maps1, maps2 = outputs["presence_maps"].chunk(2)
        pooled1, pooled2 = outputs["pooled"].chunk(2)
        terms: dict[str, torch.Tensor] = {}
        if self.weights["align"]:
            terms["align"] = view_alignment(maps1, maps2)
        if self.weights["tanh"]:
            terms["tanh"] = (tanh_uniformity(pooled1) + tanh_uniformity(pooled2)) / 2
        if self.weights["classification"] and self.class_loss is not None:
            terms["classification"] = self.class_loss(outputs, labels, net)
        elif self.weights["classification"]:
            multiplier = net.last_layer.normalization_multiplier
            terms["classification"] = pipnet_class_loss(outputs["logits"], labels, multiplier)
        if not terms:
            raise ValueError("every PIP-Net loss weight is 0: nothing to train")
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
