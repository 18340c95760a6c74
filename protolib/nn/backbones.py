"""Backbones: a small CNN for the tiny built-in datasets, CIFAR ResNets, and any timm model."""

from __future__ import annotations

import torch
from torch import nn


class SmallCNN(nn.Module):
    """Two stages of ``blocks_per_stage`` 3x3 conv blocks, each followed by a 2x2 pooling (the second dropped
    with ``stride`` 2): stride 4, ``width * 2`` channels.

    Sized for 16-64 px images (digits, parts), where a timm ImageNet model would be mostly padding.
    ``padding_mode`` "zeros" (default) marks the border: a corner location sees padding no interior one does;
    "replicate" / "reflect" pad with image content instead. ``blocks_per_stage`` (convs per pooling
    stage) 2 (default) gives each output location a 16 px receptive field, 1 a 10 px one, 3 a 22 px one (at
    16 px images, 2 sees the whole image). ``stride`` 2 drops the last pooling: a feature map twice as fine
    (receptive fields 14, 8 and 20 px), so a prototype's high-activation box can be centred on a part to 2 px
    instead of 4 (four times the compute).
    ``coordinates`` appends two input channels holding each pixel's x and y in [-1, 1] (CoordConv, Liu et
    al. 2018): every location then knows where it is, not only those whose receptive field reaches the
    padding, for data whose classes depend on where a part is.
    """

    def __init__(
        self,
        in_chans: int = 3,
        width: int = 32,
        padding_mode: str = "zeros",
        blocks_per_stage: int = 2,
        coordinates: bool = False,
        stride: int = 4,
    ) -> None:
        super().__init__()
        if padding_mode not in {"zeros", "reflect", "replicate"}:
            raise ValueError(
                f"small_cnn padding_mode {padding_mode!r} is unknown: use zeros, reflect or replicate"
            )

        def block(cin: int, cout: int) -> list[nn.Module]:
            return [
                nn.Conv2d(cin, cout, 3, padding=1, bias=False, padding_mode=padding_mode),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ]

        if blocks_per_stage not in (1, 2, 3):
            raise ValueError(f"small_cnn blocks_per_stage must be 1, 2 or 3, got {blocks_per_stage}")
        if stride not in (2, 4):
            raise ValueError(f"small_cnn stride must be 2 or 4, got {stride}")
        repeats = blocks_per_stage - 1
        self.coordinates = coordinates
        self.body = nn.Sequential(
            *block(in_chans + 2 * coordinates, width),
            *(layer for _ in range(repeats) for layer in block(width, width)),
            nn.MaxPool2d(2),
            *block(width, 2 * width),
            *(layer for _ in range(repeats) for layer in block(2 * width, 2 * width)),
            *([nn.MaxPool2d(2)] if stride == 4 else []),
        )
        self.out_channels = 2 * width

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if self.coordinates:
            b, _, h, w = images.shape
            ys = torch.linspace(-1.0, 1.0, h, device=images.device, dtype=images.dtype)
            xs = torch.linspace(-1.0, 1.0, w, device=images.device, dtype=images.dtype)
            grid = torch.stack(torch.meshgrid(xs, ys, indexing="xy"))  # (2, H, W): x, y
            images = torch.cat([images, grid.expand(b, -1, -1, -1)], dim=1)  # (B, C + 2, H, W)
        return self.body(images)  # (B, 2*width, H/stride, W/stride)


class TimmFeatureMap(nn.Module):
    """The last feature map of a timm model, (B, C, h, w), whatever the architecture family."""

    def __init__(self, name: str, pretrained: bool, in_chans: int) -> None:
        super().__init__()
        import timm

        try:
            self.body = timm.create_model(
                name, pretrained=pretrained, features_only=True, out_indices=(-1,), in_chans=in_chans
            )
        except RuntimeError as error:
            if "Unknown model" in str(error):
                raise ValueError(
                    f"backbone {name!r} is neither 'small_cnn', 'cifar_resnet18/34' nor a timm model; "
                    "list timm names with timm.list_models()"
                ) from error
            raise
        self.out_channels = int(self.body.feature_info.channels()[-1])

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)[-1]


class Pooled(nn.Module):
    """Global average pooling on top of a feature-map backbone: (B, C, h, w) -> (B, C)."""

    def __init__(self, feature_map: nn.Module) -> None:
        super().__init__()
        self.feature_map = feature_map
        self.out_channels = feature_map.out_channels

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.feature_map(images).mean(dim=(2, 3))


def build_backbone(
    name: str, pretrained: bool = False, in_chans: int = 3, pooled: bool = False, **kwargs: int
) -> nn.Module:
    """Build a backbone by name; it has ``out_channels`` and returns (B, C, h, w), or (B, C) if ``pooled``.

    ``small_cnn`` and ``cifar_resnet18``/``cifar_resnet34`` are built here (``kwargs`` go to them);
    any other name is a timm model (weights only when ``pretrained`` and a network are available).
    """
    if name == "small_cnn":
        net: nn.Module = SmallCNN(in_chans=in_chans, **kwargs)
    elif name.startswith("cifar_resnet"):
        from protolib.nn.cifar_resnet import cifar_resnet

        depth = name.removeprefix("cifar_resnet")
        if not depth.isdigit():
            raise ValueError(f"backbone {name!r}: expected cifar_resnet18 or cifar_resnet34")
        net = cifar_resnet(int(depth), in_chans=in_chans)
    else:
        net = TimmFeatureMap(name, pretrained=pretrained, in_chans=in_chans)
    return Pooled(net) if pooled else net
