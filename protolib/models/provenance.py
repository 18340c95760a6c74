"""Provenance helpers shared by the patch-prototype networks (ProtoPNet, ProtoPool, PIP-Net).

A network that can draw the similarity map of prototype ``ids[i]`` on ``images[i]``
(``paired_similarity_maps``) gets the high-activation box of every prototype on its recorded source image.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.data import Dataset

from protolib.models.protopnet import fetch_images, high_activation_boxes, upsample_maps


def source_activation_boxes(
    paired_similarity_maps: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    sources: torch.Tensor,
    dataset: Dataset,
    percentile: float,
    device: torch.device,
    chunk: int = 64,
) -> torch.Tensor:
    """(P, 4) high-activation box of every prototype on its source image ``sources`` (P,) of ``dataset``;
    prototypes without a source (-1) get -1 boxes."""
    boxes = torch.full((len(sources), 4), -1, dtype=torch.long)
    known = (sources >= 0).nonzero().flatten()
    for ids in known.split(chunk):
        images = fetch_images(dataset, sources[ids].tolist()).to(device)
        maps = upsample_maps(paired_similarity_maps(images, ids), tuple(images.shape[-2:]))
        boxes[ids] = high_activation_boxes(maps, percentile).cpu()
    return boxes


def source_labels(dataset: Dataset, sources: torch.Tensor) -> torch.Tensor:
    """(P,) label of every prototype's source sample (-1 where it has none)."""
    return torch.tensor([int(dataset[int(s)]["label"]) if s >= 0 else -1 for s in sources.tolist()])
