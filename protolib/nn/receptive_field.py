"""Receptive fields of feature-map locations: which image pixels a prototype patch looks at.

Computed analytically (stride, field size, centre offset) by tracing the backbone with ``torch.fx`` and
applying the usual receptive-field arithmetic to every convolution and pooling on the way; parallel branches
(residual additions, dense concatenations) take the union of their fields. The result is checked against the
feature-map size of a real forward pass, so an unsupported layer fails loudly instead of drawing wrong boxes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import fx, nn

from protolib.utils.modes import evaluating

_Axis = tuple[float, float, float, int]  # (jump, size, start, n): per image axis, in input pixels


@dataclass(frozen=True)
class ReceptiveField:
    """Per axis (rows, cols): ``stride`` px between neighbouring locations, field ``size`` px, and ``start``,
    the centre of location 0 in pixel coordinates (pixel i spans [i, i + 1)); for ``image_size`` inputs."""

    stride: tuple[float, float]
    size: tuple[float, float]
    start: tuple[float, float]
    image_size: tuple[int, int]
    feature_size: tuple[int, int]

    def centres(self, locations: torch.Tensor) -> torch.Tensor:
        """Feature-map locations (N, 2) as (row, col) -> the centres (N, 2) (row, col) of their fields in
        pixel coordinates (float64; pixel i spans [i, i + 1))."""
        locations = locations.to(torch.float64)
        return torch.stack([self.start[axis] + locations[:, axis] * self.stride[axis] for axis in (0, 1)], 1)

    def boxes(self, locations: torch.Tensor) -> torch.Tensor:
        """Feature-map locations (N, 2) as (row, col) -> image boxes (N, 4) ``x0, y0, x1, y1`` (x1, y1
        exclusive), clipped to the image; the field of a location, as the reference code draws it."""
        centres = self.centres(locations)
        out = []
        for axis in (1, 0):  # x from columns, then y from rows
            centre = centres[:, axis]
            low = torch.floor(centre - self.size[axis] / 2).clamp(0, self.image_size[axis])
            high = torch.ceil(centre + self.size[axis] / 2).clamp(0, self.image_size[axis])
            out.append((low, high))
        (x0, x1), (y0, y1) = out
        return torch.stack([x0, y0, x1, y1], dim=1).long()  # (N, 4)


def _pair(value: Any) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def _apply_layer(
    axes: tuple[_Axis, _Axis],
    kernel: Any,
    stride: Any,
    padding: Any,
    dilation: Any = 1,
    ceil_mode: bool = False,
) -> tuple[_Axis, _Axis]:
    """Receptive field after one convolution or pooling window (per axis)."""
    kernel, stride, dilation = _pair(kernel), _pair(stride), _pair(dilation)
    out = []
    for axis, (jump, size, start, n) in enumerate(axes):
        k_eff = dilation[axis] * (kernel[axis] - 1) + 1
        if padding == "same":
            pad_total, pad_left = k_eff - 1, (k_eff - 1) // 2
        elif padding == "valid":
            pad_total, pad_left = 0, 0
        else:
            pad_left = _pair(padding)[axis]
            pad_total = 2 * pad_left
        rounding = math.ceil if ceil_mode else math.floor
        n_out = rounding((n + pad_total - k_eff) / stride[axis]) + 1
        out.append(
            (
                jump * stride[axis],
                size + (k_eff - 1) * jump,
                start + ((k_eff - 1) / 2 - pad_left) * jump,
                n_out,
            )
        )
    return out[0], out[1]


def _union(fields: list[tuple[_Axis, _Axis]], where: str) -> tuple[_Axis, _Axis]:
    """Field of an element-wise combination (add, concat) of branches: the union of their fields."""
    if len(fields) == 1:
        return fields[0]
    out = []
    for axis in range(2):
        jumps = {f[axis][0] for f in fields}
        sizes_n = {f[axis][3] for f in fields}
        if len(jumps) != 1 or len(sizes_n) != 1:
            raise ValueError(f"receptive field: branches with different strides meet at {where}")
        low = min(f[axis][2] - f[axis][1] / 2 for f in fields)
        high = max(f[axis][2] + f[axis][1] / 2 for f in fields)
        out.append((fields[0][axis][0], high - low, (low + high) / 2, fields[0][axis][3]))
    return out[0], out[1]


_SPATIAL_UNSUPPORTED = (
    nn.ConvTranspose2d,
    nn.Upsample,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
    nn.Unfold,
    nn.Fold,
    nn.PixelShuffle,
    nn.PixelUnshuffle,
)


def receptive_field(
    backbone: nn.Module, image_size: int | tuple[int, int], in_chans: int = 3
) -> ReceptiveField:
    """Receptive field of the locations of ``backbone``'s output feature map for ``image_size`` inputs.

    Raises ValueError naming the layer when the backbone has a layer whose geometry is not modelled here
    (transposed convolutions, upsampling, adaptive pooling, dynamic "same" padding).
    """
    height, width = _pair(image_size)
    try:
        graph = fx.symbolic_trace(backbone)
    except Exception as error:  # fx raises many types for untraceable control flow
        raise ValueError(
            f"cannot trace backbone {type(backbone).__name__} with torch.fx to compute its receptive field "
            f"({error}); use a backbone without data-dependent control flow"
        ) from error
    fields: dict[fx.Node, tuple[_Axis, _Axis]] = {}
    result: tuple[_Axis, _Axis] | None = None
    for node in graph.graph.nodes:
        used: list[fx.Node] = []
        fx.node.map_arg((node.args, node.kwargs), used.append)
        inputs = [fields[n] for n in used if n in fields]
        if node.op == "placeholder":
            if not fields:
                fields[node] = ((1.0, 1.0, 0.5, height), (1.0, 1.0, 0.5, width))
            continue
        if node.op == "output":
            result = _union(inputs, "the output")
            break
        if not inputs:
            continue
        field = _union(inputs, node.name)
        if node.op == "call_module":
            module = graph.get_submodule(node.target)
            if isinstance(module, _SPATIAL_UNSUPPORTED):
                kind = type(module).__name__
                raise ValueError(f"receptive field: layer {node.target} ({kind}) is not supported")
            if isinstance(module, nn.Conv2d):
                field = _apply_layer(
                    field, module.kernel_size, module.stride, module.padding, module.dilation
                )
            elif isinstance(module, nn.MaxPool2d | nn.AvgPool2d):
                field = _apply_layer(
                    field,
                    module.kernel_size,
                    module.stride or module.kernel_size,
                    module.padding,
                    getattr(module, "dilation", 1),  # average pooling has no dilation
                    module.ceil_mode,
                )
        elif node.op == "call_function" and node.target in (
            F.conv2d,
            F.max_pool2d,
            F.avg_pool2d,
            F.interpolate,
            F.adaptive_avg_pool2d,
        ):
            raise ValueError(f"receptive field: functional call {node.name} is not supported; use nn modules")
        fields[node] = field
    if result is None:
        raise ValueError(f"backbone {type(backbone).__name__} has no traced output depending on its input")

    probe = next(backbone.parameters(), torch.empty(0))
    probe_images = torch.zeros(1, in_chans, height, width, device=probe.device, dtype=probe.dtype)
    try:
        with evaluating(backbone), torch.no_grad():
            feature_map = backbone(probe_images)
    except RuntimeError as error:
        raise ValueError(
            f"backbone {type(backbone).__name__} cannot take {height}x{width} images ({error}); "
            "raise data.image_size or use a backbone with a smaller stride"
        ) from error
    feature_size = (int(feature_map.shape[-2]), int(feature_map.shape[-1]))
    if feature_size != (result[0][3], result[1][3]):
        raise ValueError(
            f"receptive field: traced geometry predicts a {result[0][3]}x{result[1][3]} feature map but the "
            f"backbone outputs {feature_size[0]}x{feature_size[1]} for {height}x{width} images (a layer with "
            "dynamic padding?)"
        )
    return ReceptiveField(
        stride=(result[0][0], result[1][0]),
        size=(result[0][1], result[1][1]),
        start=(result[0][2], result[1][2]),
        image_size=(height, width),
        feature_size=feature_size,
    )
