"""PIP-Net's prototype parts: presence maps (a softmax over prototype channels) and the non-negative head.

In PIP-Net (Nauta et al., CVPR 2023) a prototype is a channel of the latent map: every patch's scores over
the P channels go through a softmax, so each patch is (softly) one prototype, and a prototype's presence in
an image is its max-pooled score. The head is a linear layer with non-negative weights, so every logit is a
sum of presence scores of its class's prototypes (positive reasoning only).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class PresenceMaps(nn.Module):
    """Feature map (B, D, H, W) -> presence of each of P prototypes at every patch (B, P, H, W), summing
    to 1 over P: ``softmax_p(W_p . z + b_p)`` with a 1x1 conv (``prototypes`` P), or the softmax of the
    features themselves when ``prototypes`` is None (the paper: the backbone's D channels are the prototypes).
    """

    def __init__(self, in_channels: int, prototypes: int | None = None) -> None:
        super().__init__()
        if prototypes is not None and prototypes < 2:
            raise ValueError(f"PIP-Net needs at least 2 prototypes (softmax over them), got {prototypes}")
        self.num_prototypes = in_channels if prototypes is None else prototypes
        self.conv = None if prototypes is None else nn.Conv2d(in_channels, prototypes, kernel_size=1)
        if self.conv is not None:
            # The reference's init_weights_xavier: Xavier-uniform weights, sigmoid gain (1).
            nn.init.xavier_uniform_(self.conv.weight, gain=nn.init.calculate_gain("sigmoid"))

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        scores = features if self.conv is None else self.conv(features)  # (B, P, H, W)
        return scores.softmax(dim=1)


class NonNegativeLinear(nn.Module):
    """``y = x relu(W)^T (+ b)``: PIP-Net's sparse, positive-only scoring sheet, ``weight`` (C, P).

    ``normalization_multiplier`` is the exponent of the loss's ``log(1 + y^m)`` (fixed at 2 in the paper's
    code); :meth:`clamp_` is the reference's step after every optimiser update that drives small weights to
    exactly zero (the source of the sparsity).
    """

    def __init__(
        self, in_features: int, out_features: int, bias: bool = False, multiplier: float = 2.0
    ) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        nn.init.normal_(
            self.weight, mean=1.0, std=0.1
        )  # the reference's init: every prototype votes at first
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        self.register_buffer("normalization_multiplier", torch.tensor(float(multiplier)))

    @property
    def effective_weight(self) -> torch.Tensor:
        """(C, P) the weights actually used: relu(weight)."""
        return torch.relu(self.weight)

    def forward(self, presence: torch.Tensor) -> torch.Tensor:
        return F.linear(presence, self.effective_weight, self.bias)  # (B, C)

    @torch.no_grad()
    def clamp_(self, shrink: float = 1e-3) -> None:
        """``W <- max(W - shrink, 0)``, bias ``>= 0``: weights below ``shrink`` become exactly zero."""
        self.weight.copy_((self.weight - shrink).clamp_min(0.0))
        if self.bias is not None:
            self.bias.clamp_(min=0.0)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"
        )
