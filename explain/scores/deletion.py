"""Deletion and insertion curves (Petsiuk et al., "RISE", BMVC 2018; github.com/eclique/RISE).

An explanation ranks pixels; if it is faithful, removing the top-ranked pixels first should make the class
probability fall fast (deletion: low area under the curve is good), and adding them first to a blurred
image should make it rise fast (insertion: high area is good). The reference protocol: the class is the
one predicted on the intact image; ``step`` pixels (all channels) change per step, in order of decreasing
saliency, until all have changed; deletion replaces pixels by zeros (in normalised space: the dataset's
mean colour), insertion starts from the image blurred by an 11 x 11 Gaussian of std 5 (the reference's
224-pixel settings; give smaller ones for small images); the curve is the softmax probability of the class
at every step (for the CBC head, its own class probability), ``step`` defaults to one image row (the
reference's 224 at 224 px), the area is the trapezoid rule on [0, 1]. Scored for the prototype similarity
map of the decision's top prototype and for integrated gradients of the logit
(``explain.scores.evidence.saliency_maps``).
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import nn

from explain.scores.evidence import (
    SALIENCIES,
    blur,
    class_probabilities,
    device_of,
    saliency_maps,
    spatial_unavailable,
    test_batches,
)
from explain.scores.registry import ScoreSpec, register
from protolib.utils.modes import evaluating

MODES = ("deletion", "insertion")


def curve_auc(curves: torch.Tensor) -> torch.Tensor:
    """(N,) area under curves (N, T + 1) sampled at T + 1 evenly spaced points of [0, 1] (trapezoid rule:
    the reference's ``(sum - first / 2 - last / 2) / T``)."""
    return (curves.sum(dim=1) - curves[:, 0] / 2 - curves[:, -1] / 2) / (curves.shape[1] - 1)


@torch.no_grad()
def causal_curves(
    net: nn.Module,
    images: torch.Tensor,
    saliency: torch.Tensor,
    classes: torch.Tensor,
    mode: str,
    step: int | None = None,
    blur_size: int = 11,
    blur_sigma: float = 5.0,
    chunk: int = 256,
) -> torch.Tensor:
    """Deletion or insertion curves (B, T + 1) of images (B, C, H, W) ranked by ``saliency`` (B, H, W): the
    softmax probability of ``classes`` (B,) after 0, step, 2 step, ... of the most salient pixels changed."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {list(MODES)}, got {mode!r}")
    b, h, w = images.shape[0], *images.shape[-2:]
    if saliency.shape != (b, h, w):
        raise ValueError(f"saliency must be (B, H, W) = {(b, h, w)}, got {tuple(saliency.shape)}")
    step = step or w
    steps = -(-h * w // step)  # T = ceil(HW / step)
    substrate = torch.zeros_like(images) if mode == "deletion" else blur(images, blur_size, blur_sigma)
    start, finish = (images, substrate) if mode == "deletion" else (substrate, images)
    order = torch.argsort(saliency.flatten(1), dim=1, descending=True, stable=True)  # (B, HW)
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=order.device).expand(b, -1))
    thresholds = torch.arange(steps + 1, device=rank.device) * step  # (T + 1,) pixels changed after each step
    curves = torch.empty(b, steps + 1, device=images.device)
    with evaluating(net):
        for i in range(b):
            mask = (rank[i][None] < thresholds[:, None]).view(steps + 1, 1, h, w)  # (T + 1, 1, H, W)
            versions = torch.where(mask, finish[i], start[i])  # (T + 1, C, H, W)
            probabilities = torch.cat(
                [class_probabilities(net, net.extract(part)["logits"]) for part in versions.split(chunk)]
            )
            curves[i] = probabilities[:, classes[i]]
    return curves


def deletion_insertion(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    mode: str,
    max_images: int = 200,
    progress: bool = True,
    step: int | None = None,
    blur_size: int = 11,
    blur_sigma: float = 5.0,
    ig_steps: int = 32,
) -> dict[str, float]:
    """Mean deletion or insertion AUC over the first ``max_images`` test images, for every saliency
    (``prototype``, ``integrated_gradients``)."""
    device = device_of(net)
    totals = dict.fromkeys(SALIENCIES, 0.0)
    count = 0
    for batch in test_batches(datamodule, max_images, progress, f"{mode} curves"):
        images = batch["image"].to(device)
        for kind in SALIENCIES:
            saliency, predicted = saliency_maps(net, images, kind, ig_steps=ig_steps)
            curves = causal_curves(net, images, saliency, predicted, mode, step, blur_size, blur_sigma)
            totals[kind] += float(curve_auc(curves).sum())
        count += len(images)
    return {kind: total / max(count, 1) for kind, total in totals.items()}


def _register(mode: str) -> None:
    def compute(net: nn.Module, datamodule: L.LightningDataModule, **options: Any) -> dict[str, float]:
        return deletion_insertion(net, datamodule, mode, **options)

    register(
        mode,
        ScoreSpec(
            compute=compute,
            unavailable=lambda net, datamodule: spatial_unavailable(net),
            higher_is_better=mode == "insertion",
            description=(
                f"RISE {mode} AUC of the class probability, pixels ranked by the top prototype's similarity "
                "map (prototype) and by integrated gradients (integrated_gradients)"
            ),
        ),
    )


for _mode in MODES:
    _register(_mode)
