"""Scores from the logits alone: MSP, MaxLogit, Energy, GEN, top-2 gap, uniform CE (no fit, no images)."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from protolib.ood.postprocessors.base import Postprocessor


class MSP(Postprocessor):
    """Maximum softmax probability (Hendrycks & Gimpel, 2017); OpenOOD ``msp``."""

    name = "msp"

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return outputs["logits"].float().softmax(dim=1).amax(dim=1)


class MaxLogit(Postprocessor):
    """Maximum logit (Hendrycks et al., 2022); OpenOOD ``mls``."""

    name = "maxlogit"

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return outputs["logits"].float().amax(dim=1)


def energy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Negative free energy ``T * logsumexp(logits / T)`` (B,) of logits (B, C)."""
    return temperature * torch.logsumexp(logits / temperature, dim=1)


class Energy(Postprocessor):
    """Energy score (Liu et al., 2020): ``T logsumexp(logits / T)``, T = 1 as OpenOOD's ``ebo``."""

    name = "energy"

    def __init__(self, temperature: float = 1.0) -> None:
        if temperature <= 0:
            raise ValueError(f"energy temperature must be positive, got {temperature}")
        self.temperature = float(temperature)

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return energy(outputs["logits"].float(), self.temperature)


class GEN(Postprocessor):
    """Generalized entropy (Liu et al., 2023): ``-sum_top-M p^g (1-p)^g`` over the M largest probabilities."""

    name = "gen"

    def __init__(self, gamma: float = 0.1, M: int = 100) -> None:
        if gamma <= 0 or M < 1:
            raise ValueError(f"GEN needs gamma > 0 and M >= 1, got gamma={gamma}, M={M}")
        self.gamma, self.M = float(gamma), int(M)

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        probs = outputs["logits"].float().softmax(dim=1)  # (B, C)
        top = probs.topk(min(self.M, probs.shape[1]), dim=1).values  # (B, M)
        return -(top.pow(self.gamma) * (1.0 - top).pow(self.gamma)).sum(dim=1)


class TopTwo(Postprocessor):
    """The gap between the two largest softmax probabilities: ``p1 / (p2 + 1e-6)`` (``mode="ratio"``, the
    confidence ProtoGCD ranks pseudo-labels by and its ``proto`` OOD score) or ``p1 - p2`` (``"margin"``)."""

    name = "top2"

    def __init__(self, mode: str = "ratio") -> None:
        if mode not in ("ratio", "margin"):
            raise ValueError(f"top2 mode must be 'ratio' or 'margin', got {mode!r}")
        self.mode = mode

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs["logits"].float()
        if logits.shape[1] < 2:
            raise ValueError(f"top2 needs at least 2 classes, got logits of shape {tuple(logits.shape)}")
        top = logits.softmax(dim=1).topk(2, dim=1).values  # (B, 2)
        return top[:, 0] / (top[:, 1] + 1e-6) if self.mode == "ratio" else top[:, 0] - top[:, 1]


class UniformCrossEntropy(Postprocessor):
    """Cross-entropy of the softmax against the uniform distribution, ``logsumexp(z) - mean(z)``: large when
    the prediction is peaked (ProtoGCD's ``xent`` score, sign flipped so that higher = more ID)."""

    name = "xent"

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        logits = outputs["logits"].float()
        return torch.logsumexp(logits, dim=1) - logits.mean(dim=1)
