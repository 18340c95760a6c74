"""Consistency and stability of prototypes (Huang et al., "Evaluation and Improvement of Interpretability for
Self-Explainable Part-Prototype Networks", ICCV 2023; github.com/hqhQAQ/EvalProtoPNet).

The reference protocol, per prototype, on the test images of its class: upsample its similarity map to the
image (bicubic), take the first maximum, and the box of half-side ``half_size`` around it (36 px at 224 px,
clipped to the image; here scaled to the image side by default); the parts whose annotated point lies in the
box (inclusive edges) are the parts the prototype covers on that image. A prototype is *consistent* when
some part is covered in at least ``threshold`` = 0.8 of the images where that part is annotated; the
consistency score is the fraction of consistent prototypes. *Stability*: the same part vectors after adding
noise ``clip(N(0, 0.2), -0.25, 0.25)`` to the normalised image; a prototype's stability is the fraction of
images whose vector is unchanged, the score their mean over prototypes. Both are reported in [0, 1] (the
paper prints percentages).

Part points: CUB's part locations ("part_locs", visible parts only), or on the ``parts`` data the centroid of
every part present in the part mask (each part type appears at most once per image). A prototype's class is
the class it speaks for (``evidence.prototype_classes``: ProtoPNet's owner; for shared prototypes the class
of their largest weight; ProtoTree: the class of its source image); prototypes without one are left out.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import lightning as L
import torch
from torch import nn

from explain.scores.evidence import (
    data_unavailable,
    device_of,
    prototype_classes,
    require,
    similarity_maps,
    spatial_unavailable,
    test_batches,
)
from explain.scores.registry import ScoreSpec, register
from protolib.models.protopnet import upsample_maps
from protolib.utils.modes import evaluating

PART_KEYS = ("part_locs", "part_mask")


def mask_part_points(masks: torch.Tensor, num_parts: int) -> torch.Tensor:
    """Part masks (B, H, W) (value k = part k, 0 background) -> (B, num_parts, 3) x, y, visible: the centroid
    (pixel indices) of every part k = 1..num_parts present in the mask, (0, 0, 0) when absent."""
    h, w = masks.shape[-2:]
    onehot = masks.long()[:, None] == torch.arange(1, num_parts + 1, device=masks.device)[None, :, None, None]
    area = onehot.flatten(2).sum(dim=2).float()  # (B, K)
    ys = torch.arange(h, device=masks.device).float()[None, None, :, None]
    xs = torch.arange(w, device=masks.device).float()[None, None, None, :]
    x = (onehot * xs).flatten(2).sum(dim=2) / area.clamp_min(1)
    y = (onehot * ys).flatten(2).sum(dim=2) / area.clamp_min(1)
    visible = (area > 0).float()
    return torch.stack([x * visible, y * visible, visible], dim=2)


def part_points(batch: dict[str, Any], num_parts: int) -> torch.Tensor:
    """(B, K, 3) x, y, visible of every annotated part of a batch: its "part_locs", else its masks' centroids
    (``num_parts`` part ids, 0 = the largest id in the batch)."""
    require(batch, PART_KEYS, "prototype consistency")
    if "part_locs" in batch:
        return batch["part_locs"].float()
    masks = batch["part_mask"]
    return mask_part_points(masks, num_parts or int(masks.max()))


def covered_parts(maps: torch.Tensor, points: torch.Tensor, half_size: int) -> torch.Tensor:
    """(N, K) bool: parts (N, K, 3) x, y, visible whose point lies in the box of half-side ``half_size``
    around the first maximum of each upsampled similarity map (N, H, W), edges inclusive, clipped to the
    image."""
    h, w = maps.shape[-2:]
    peak = maps.flatten(1).argmax(dim=1)
    py, px = peak // w, peak % w
    y0, y1 = (py - half_size).clamp_min(0), (py + half_size).clamp_max(h)
    x0, x1 = (px - half_size).clamp_min(0), (px + half_size).clamp_max(w)
    x, y, visible = points.unbind(dim=2)  # (N, K) each
    inside = (y >= y0[:, None]) & (y <= y1[:, None]) & (x >= x0[:, None]) & (x <= x1[:, None])
    return inside & (visible > 0)


@dataclass
class PartCoverage:
    """Which parts each prototype covers on each image of its class: the pairs (image, prototype) in order."""

    prototype: torch.Tensor  # (N,) prototype of each pair
    covered: torch.Tensor  # (N, K) bool: part k in the prototype's box on that image
    visible: torch.Tensor  # (N, K) bool: part k annotated on that image


@torch.no_grad()
def part_coverage(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    max_images: int,
    progress: bool,
    half_size: int | None = None,
    noise: tuple[float, float] | None = None,
    seed: int = 0,
) -> PartCoverage:
    """The parts every prototype covers on the first ``max_images`` test images of its class, optionally with
    the reference's noise ``(std, clip)`` added to the normalised images (generator seeded by ``seed``)."""
    device = device_of(net)
    classes = prototype_classes(net).to(device)  # (P,)
    num_parts = len(getattr(datamodule, "part_names", []) or [])
    generator = torch.Generator().manual_seed(seed)
    prototypes, covered, visible = [], [], []
    desc = "prototype stability (noisy)" if noise else "prototype consistency"
    with evaluating(net):
        for batch in test_batches(datamodule, max_images, progress, desc):
            images, labels = batch["image"], batch["label"].to(device)
            points = part_points(batch, num_parts).to(device)
            if noise is not None:
                std, clip = noise
                images = images + torch.randn(images.shape, generator=generator).mul(std).clamp(-clip, clip)
            images = images.to(device)
            maps, _ = similarity_maps(net, images)  # (B, P, h, w)
            image_ids, proto_ids = (labels[:, None] == classes[None, :]).nonzero(as_tuple=True)  # pairs
            size = tuple(images.shape[-2:])
            half = half_size if half_size is not None else round(36 * size[1] / 224)
            upsampled = upsample_maps(maps[image_ids, proto_ids], size)  # (N, H, W)
            prototypes.append(proto_ids.cpu())
            covered.append(covered_parts(upsampled, points[image_ids], half).cpu())
            visible.append((points[image_ids, :, 2] > 0).cpu())
    return PartCoverage(torch.cat(prototypes), torch.cat(covered), torch.cat(visible))


def consistency_score(coverage: PartCoverage, threshold: float = 0.8) -> float:
    """Fraction of prototypes covering some part in >= ``threshold`` of the images where it is annotated."""
    flags = []
    for p in coverage.prototype.unique():
        rows = coverage.prototype == p
        hits = coverage.covered[rows].float().sum(dim=0)  # (K,)
        present = coverage.visible[rows].float().sum(dim=0).clamp_min(1)  # the reference's 0 -> 1
        flags.append(bool(((hits / present) >= threshold).any()))
    return sum(flags) / len(flags) if flags else float("nan")


def stability_score(clean: PartCoverage, noisy: PartCoverage) -> float:
    """Mean over prototypes of the fraction of their images whose covered parts the noise left unchanged."""
    if not torch.equal(clean.prototype, noisy.prototype):
        raise ValueError("clean and noisy coverage must pair the same images and prototypes")
    same = (clean.covered == noisy.covered).all(dim=1).float()  # (N,)
    rates = [same[clean.prototype == p].mean() for p in clean.prototype.unique()]
    return float(torch.stack(rates).mean()) if rates else float("nan")


def consistency_and_stability(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    max_images: int = 200,
    progress: bool = True,
    half_size: int | None = None,
    threshold: float = 0.8,
    noise_std: float = 0.2,
    noise_clip: float = 0.25,
    seed: int = 0,
) -> dict[str, float]:
    """Huang et al.'s consistency and stability scores on the first ``max_images`` test images."""
    clean = part_coverage(net, datamodule, max_images, progress, half_size)
    if len(clean.prototype) == 0:
        raise ValueError(
            "no prototype has a class with test images among the first max_images: push the prototypes "
            "(ProtoTree takes its classes from its source images) or raise max_images"
        )
    noisy = part_coverage(net, datamodule, max_images, progress, half_size, (noise_std, noise_clip), seed)
    return {"consistency": consistency_score(clean, threshold), "stability": stability_score(clean, noisy)}


register(
    "consistency",
    ScoreSpec(
        compute=consistency_and_stability,
        unavailable=lambda net, dm: spatial_unavailable(net) or data_unavailable(dm, PART_KEYS),
        higher_is_better=True,
        description=(
            "Huang et al. (ICCV 2023): fraction of prototypes covering one part on >= 80% of their class's "
            "images (consistency), and of part assignments unchanged under noise (stability)"
        ),
    ),
)
