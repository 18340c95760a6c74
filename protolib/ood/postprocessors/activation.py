"""Activation shaping before the last layer, then energy: ReAct (Sun et al. 2021), ASH (Djurisic et al.)."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import numpy as np
import torch
from torch import nn

from protolib.ood.features import FeatureSource, module_device
from protolib.ood.postprocessors.base import Postprocessor, linear_layer
from protolib.ood.postprocessors.logit import energy


@torch.no_grad()
def logits_from_features(model: nn.Module, features: torch.Tensor, postprocessor: str) -> torch.Tensor:
    """``model.last_layer(features)`` on the layer's device, returned on the features' device."""
    layer = linear_layer(model, postprocessor)
    return layer(features.to(module_device(layer))).to(features.device).float()


class ReAct(Postprocessor):
    """Clip penultimate activations at the ``percentile``-th percentile of ID activations, then energy.

    As OpenOOD's ``react``: the threshold is the percentile (90 by default, linear interpolation) of every
    activation value of the ID *validation* features; the clipped features go through ``model.last_layer``.
    """

    name = "react"
    requires = ("features",)
    fit_split = "val"

    def __init__(self, percentile: float = 90.0) -> None:
        if not 0.0 <= percentile <= 100.0:
            raise ValueError(f"react percentile must be in [0, 100], got {percentile}")
        self.percentile = float(percentile)
        self.threshold: float | None = None

    def check(self, model: nn.Module, keys: Collection[str]) -> None:
        super().check(model, keys)
        linear_layer(model, self.name)

    def _fit(self, model: nn.Module, source: FeatureSource) -> None:
        values = [chunk["features"].float().reshape(-1).numpy() for chunk in source]
        if not values or sum(v.size for v in values) == 0:
            raise ValueError("react fit data is empty: it needs in-distribution validation features")
        self.threshold = float(np.percentile(np.concatenate(values), self.percentile))

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        threshold = self._require_fitted("threshold")
        clipped = outputs["features"].float().clamp(max=threshold)  # (B, F)
        return energy(logits_from_features(model, clipped, self.name))


def ash(features: torch.Tensor, percentile: float, variant: str = "b") -> torch.Tensor:
    """Activation shaping of (B, F) features: keep the top ``F - round(F p / 100)`` activations per sample.

    ``b``: kept positions all get (sum of all activations) / kept count, the rest 0 (OpenOOD v1.5's choice);
    ``p``: kept activations unchanged, the rest 0; ``s``: as ``p``, scaled by exp(sum before / sum after).
    """
    total = features.shape[1]
    keep = total - round(total * percentile / 100.0)
    if keep < 1:
        raise ValueError(f"ash percentile {percentile} keeps no activation of {total}; lower the percentile")
    values, positions = features.topk(keep, dim=1)  # (B, keep)
    sums = features.sum(dim=1, keepdim=True)  # (B, 1)
    if variant == "b":
        return torch.zeros_like(features).scatter_(1, positions, (sums / keep).expand(-1, keep))
    pruned = torch.zeros_like(features).scatter_(1, positions, values)
    if variant == "p":
        return pruned
    if variant == "s":
        return pruned * torch.exp(sums / pruned.sum(dim=1, keepdim=True))
    raise ValueError(f"unknown ash variant {variant!r}; choose b, p or s")


class ASH(Postprocessor):
    """Energy of the logits of ASH-shaped penultimate features (OpenOOD ``ash``: ASH-B at percentile 90).

    ``variant="s"`` gives ASH-S, the ASH paper's best ImageNet variant; OpenOOD v1.5 evaluates ASH-B.
    """

    name = "ash"
    requires = ("features",)

    def __init__(self, percentile: float = 90.0, variant: str = "b") -> None:
        if not 0.0 <= percentile < 100.0:
            raise ValueError(f"ash percentile must be in [0, 100), got {percentile}")
        if variant not in ("b", "p", "s"):
            raise ValueError(f"unknown ash variant {variant!r}; choose b, p or s")
        self.percentile, self.variant = float(percentile), variant

    def check(self, model: nn.Module, keys: Collection[str]) -> None:
        super().check(model, keys)
        linear_layer(model, self.name)

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        shaped = ash(outputs["features"].float(), self.percentile, self.variant)
        return energy(logits_from_features(model, shaped, self.name))
