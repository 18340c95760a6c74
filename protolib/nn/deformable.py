"""Deformable prototypes (Donnelly et al., "Deformable ProtoPNet", CVPR 2022): parts that move.

A prototype of ``kh x kw`` parts is compared, at every feature-map location, with the feature vectors its
parts land on: part ``(a, b)`` sits at ``(i - pad + a * dilation, j - pad + b * dilation)`` plus a learned
offset ``(dy, dx)`` predicted from the input by a small convolution. Features are sampled at fractional
positions by
*norm-preserving* bilinear interpolation, ``sqrt(bilinear(x ** 2))`` per channel (the reference's CUDA kernel
``norm_preserve_deform_conv``), which keeps unit-length feature vectors unit length between grid points.
Everything here is plain PyTorch (``grid_sample``): no compiled extension, exact autograd gradients (the
reference's hand-written backward approximates the weight and offset gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def part_grid(parts: tuple[int, int], dilation: int) -> tuple[torch.Tensor, int]:
    """Undeformed part positions relative to a location, (n, 2) (row, col), and the padding that centres them.

    ``dilation * (k - 1)`` must be even on both axes so that the parts sit symmetrically around the location
    (the reference's 2 x 2 parts at dilation 2 and padding 1: rows/cols -1 and +1).
    """
    kh, kw = parts
    if kh < 1 or kw < 1 or dilation < 1:
        raise ValueError(f"deformable parts {parts} and dilation {dilation} must be >= 1")
    if (
        (dilation * (kh - 1)) % 2
        or (dilation * (kw - 1)) % 2
        or (dilation * (kh - 1)) != (dilation * (kw - 1))
    ):
        raise ValueError(
            f"deformable parts {parts} at dilation {dilation}: dilation * (parts - 1) must be even and "
            "equal on both axes so the parts are centred on their location (paper: parts 2 x 2, dilation 2)"
        )
    padding = dilation * (kh - 1) // 2
    rows = torch.arange(kh).repeat_interleave(kw) * dilation - padding
    cols = torch.arange(kw).repeat(kh) * dilation - padding
    return torch.stack([rows, cols], dim=1).float(), padding


def part_positions(offsets: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """Fractional (row, col) of every part at every location, (B, n, H, W, 2), from offsets (B, 2n, H, W).

    Offsets follow the DCN layout of the reference: channel ``2k`` is part k's row offset, ``2k + 1`` its
    column offset; ``grid`` (n, 2) holds the undeformed relative positions (:func:`part_grid`).
    """
    b, _, h, w = offsets.shape
    n = grid.shape[0]
    if offsets.shape[1] != 2 * n:
        raise ValueError(f"offsets have {offsets.shape[1]} channels, expected 2 x {n} parts")
    rows = torch.arange(h, device=offsets.device, dtype=offsets.dtype)[:, None].expand(h, w)
    cols = torch.arange(w, device=offsets.device, dtype=offsets.dtype)[None, :].expand(h, w)
    base = torch.stack([rows, cols], dim=-1)  # (H, W, 2)
    grid = grid.to(offsets)[:, None, None, :]  # (n, 1, 1, 2)
    return base[None, None] + grid[None] + offsets.view(b, n, 2, h, w).permute(0, 1, 3, 4, 2)


def norm_preserving_sample(features: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """``sqrt(bilinear(features ** 2))`` at fractional positions.

    Shapes: features (B, D, H, W), positions (B, n, h, w, 2) -> (B, D, n, h, w).

    Positions are (row, col) in feature-map pixels; corners outside the map count as zero (the reference's
    ``zero_padding``), so a part off the map contributes a zero vector. Values below 1e-12 are set to zero
    without gradient, which keeps the square root's gradient finite where every corner is zero.
    """
    b, d, height, width = features.shape
    _, n, h, w, _ = positions.shape
    # grid_sample (align_corners=False) maps pixel p to (2p + 1) / size - 1; x is the column, y the row.
    x = (2 * positions[..., 1] + 1) / width - 1
    y = (2 * positions[..., 0] + 1) / height - 1
    grid = torch.stack([x, y], dim=-1).view(b, n * h, w, 2)
    squared = F.grid_sample(
        features.pow(2), grid.to(features.dtype), mode="bilinear", padding_mode="zeros", align_corners=False
    )  # (B, D, n*h, w)
    floor = 1e-12
    root = torch.where(squared > floor, squared.clamp_min(floor).sqrt(), torch.zeros_like(squared))
    return root.view(b, d, n, h, w)


class OffsetPredictor(nn.Module):
    """The reference's ``conv_offset``: the (normalised) feature map -> (dy, dx) of every part, (B, 2n, H, W).

    With ``hidden > 0`` (paper: 128) a ``(kh + 2) x (kw + 2)`` conv, ReLU, ``kh x kw`` conv; otherwise one
    conv without bias. Output keeps the input's spatial size. The reference zero-initialises it and
    re-initialises it with N(0, 2e-5) when joint training starts (offsets are frozen before); here it starts
    at N(0, 2e-5) directly, which gives offsets of ~1e-6 px during the frozen warm-up: the same model.
    """

    def __init__(
        self, in_channels: int, parts: tuple[int, int], hidden: int = 128, init_std: float = 2e-5
    ) -> None:
        super().__init__()
        kh, kw = parts
        out = 2 * kh * kw
        if hidden > 0:
            layers: list[nn.Module] = [
                nn.Conv2d(in_channels, hidden, (kh + 2, kw + 2), padding=((kh + 1) // 2, (kw + 1) // 2)),
                nn.ReLU(),
                nn.Conv2d(hidden, out, (kh, kw), padding=(kh // 2, kw // 2)),
            ]
        else:
            kernel = (kh + 1 - kh % 2, kw + 1 - kw % 2)  # odd kernel: the reference's (k + 1) for k = 2
            layers = [
                nn.Conv2d(in_channels, out, kernel, padding=(kernel[0] // 2, kernel[1] // 2), bias=False)
            ]
        self.net = nn.Sequential(*layers)
        for conv in self.net:
            if isinstance(conv, nn.Conv2d):
                nn.init.normal_(conv.weight, std=init_std)
                if conv.bias is not None:
                    nn.init.zeros_(conv.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        offsets = self.net(features)  # (B, 2n, H', W')
        h, w = features.shape[-2:]
        if offsets.shape[-2:] != (h, w):
            raise ValueError(f"offset predictor changed the map size {(h, w)} to {tuple(offsets.shape[-2:])}")
        return offsets
