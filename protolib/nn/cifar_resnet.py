"""CIFAR-style ResNets (3x3 stem, stride 1, no max-pool): full resolution for 32 px images.

The ImageNet ResNet stem (7x7 stride 2 + max-pool) shrinks a 32 px image to 8 px before the first block;
the CIFAR variant keeps 32 px there, so the last stage is 4x4 with 512 channels. This is the backbone of
SupCon, CIDER and PALM's CIFAR experiments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Blocks per stage (all BasicBlock, expansion 1, so the last stage always has 512 channels).
STAGE_DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with batch norm and an identity (or 1x1 projection) shortcut."""

    def __init__(self, in_channels: int, channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, channels, 1, stride=stride, bias=False), nn.BatchNorm2d(channels)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    """3x3 stride-1 stem, four stages (64, 128, 256, 512 channels; strides 1, 2, 2, 2): stride 8 overall."""

    def __init__(self, stage_depths: tuple[int, int, int, int], in_chans: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, 64, 3, stride=1, padding=1, bias=False),
            nn.BatchNorm2d(64),
            nn.ReLU(inplace=True),
        )
        stages: list[nn.Module] = []
        in_channels = 64
        for channels, depth, stride in zip((64, 128, 256, 512), stage_depths, (1, 2, 2, 2), strict=True):
            blocks = [BasicBlock(in_channels, channels, stride)]
            blocks += [BasicBlock(channels, channels) for _ in range(depth - 1)]
            stages.append(nn.Sequential(*blocks))
            in_channels = channels
        self.stages = nn.Sequential(*stages)
        self.out_channels = in_channels
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.stages(self.stem(images))  # (B, 512, H/8, W/8)


def cifar_resnet(depth: int, in_chans: int = 3) -> nn.Module:
    """CIFAR ResNet-18 or -34 returning the (B, 512, H/8, W/8) feature map; ``out_channels`` is 512."""
    if depth not in STAGE_DEPTHS:
        raise ValueError(f"cifar_resnet depth {depth} is not supported: use one of {sorted(STAGE_DEPTHS)}")
    if in_chans < 1:
        raise ValueError(f"cifar_resnet in_chans must be positive, got {in_chans}")
    return CifarResNet(STAGE_DEPTHS[depth], in_chans=in_chans)
