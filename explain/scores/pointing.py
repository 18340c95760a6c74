"""The pointing game (Zhang et al., "Top-down Neural Attention by Excitation Backprop", ECCV 2016).

A saliency map for the image's ground-truth class "points" at its maximum; the point is a hit when it lies
on the object, with a tolerance of 15 pixels at 224 px (here scaled to the image: ``15 / 224`` of its side),
and accuracy = hits / (hits + misses) per class, averaged over classes. On the ``parts`` data the object is
the image's *defining* parts (``datamodule.class_parts``), so pointing at a distractor or the background
misses. Scored for the top prototype's similarity map and for integrated gradients, as deletion / insertion.
"""

from __future__ import annotations

from collections.abc import Sequence

import lightning as L
import torch
from torch import nn

from explain.scores.evidence import (
    SALIENCIES,
    data_unavailable,
    device_of,
    require,
    saliency_maps,
    spatial_unavailable,
    test_batches,
)
from explain.scores.parts import defining_masks
from explain.scores.registry import ScoreSpec, register

TOLERANCE = 15 / 224  # the paper's 15-pixel tolerance at 224 px, as a fraction of the image side


def pointing_hits(saliency: torch.Tensor, objects: torch.Tensor, tolerance: float) -> torch.Tensor:
    """(B,) bool: whether the maximum of each saliency map (B, H, W) (the first in row-major order) lies
    within ``tolerance`` pixels (Euclidean) of a True pixel of the object mask (B, H, W)."""
    h, w = saliency.shape[-2:]
    peak = saliency.flatten(1).argmax(dim=1)  # (B,)
    py, px = (peak // w).float(), (peak % w).float()
    ys = torch.arange(h, device=saliency.device).float()[None, :, None]
    xs = torch.arange(w, device=saliency.device).float()[None, None, :]
    near = (ys - py[:, None, None]) ** 2 + (xs - px[:, None, None]) ** 2 <= tolerance**2  # (B, H, W)
    return (near & objects.bool()).flatten(1).any(dim=1)


def class_mean_accuracy(hits: torch.Tensor, labels: torch.Tensor) -> float:
    """Mean over the classes present in ``labels`` (N,) of the hit rate of ``hits`` (N,)."""
    rates = [hits[labels == c].float().mean() for c in labels.unique()]
    return float(torch.stack(rates).mean()) if rates else float("nan")


def pointing_game(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    max_images: int = 200,
    progress: bool = True,
    tolerance: float | None = None,
    class_parts: Sequence[Sequence[int]] | None = None,
    ig_steps: int = 32,
) -> dict[str, float]:
    """Pointing-game accuracy of each saliency on the first ``max_images`` test images against the defining
    parts of their true class. ``tolerance`` in pixels (default ``15 / 224`` of the image side)."""
    class_parts = class_parts if class_parts is not None else datamodule.class_parts
    device = device_of(net)
    hits: dict[str, list[torch.Tensor]] = {kind: [] for kind in SALIENCIES}
    labels = []
    for batch in test_batches(datamodule, max_images, progress, "pointing game"):
        require(batch, ("part_mask",), "the pointing game")
        images, label = batch["image"].to(device), batch["label"]
        objects = defining_masks(batch["part_mask"], label, class_parts).to(device)  # (B, H, W)
        radius = tolerance if tolerance is not None else TOLERANCE * images.shape[-1]
        for kind in SALIENCIES:
            saliency, _ = saliency_maps(net, images, kind, classes=label, ig_steps=ig_steps)
            hits[kind].append(pointing_hits(saliency, objects, radius).cpu())
        labels.append(label)
    every = torch.cat(labels)
    return {kind: class_mean_accuracy(torch.cat(h), every) for kind, h in hits.items()}


register(
    "pointing",
    ScoreSpec(
        compute=pointing_game,
        unavailable=lambda net, dm: spatial_unavailable(net) or data_unavailable(dm, ("part_mask",)),
        higher_is_better=True,
        description=(
            "pointing-game accuracy (class mean): the saliency maximum on the true class's defining parts, "
            "for the top prototype's map (prototype) and integrated gradients (integrated_gradients)"
        ),
    ),
)
