"""Do pushed prototypes look at the object? Measures of a push, from its provenance and the data.

- ``background_share``: the share of prototypes whose high-activation box on their source image holds less
  than ``min_foreground`` (default 10 %) object pixels (``datamodule.foreground_mask``: part masks on
  ``parts``, pen strokes on digits). A prototype there explains a decision by empty background.
- ``distinct_sources``: per class, how many different training images its prototypes come from (the mean
  and the smallest over classes), and ``duplicates``: prototypes on a patch another prototype of their
  class already took (a collapse; the push warns about it).
- on ``parts``, the part score of :mod:`explain.scores` (mean share of each box on its class's defining
  parts), ``zero_part_share``, the share of prototypes scoring 0, and ``part_framing``, what boxes exactly
  framing each prototype's nearest defining part would score (below 1: parts do not fill their boxes; boxes
  inside a part score more).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import Dataset

from explain.scores import box_fractions, box_part_score

MIN_FOREGROUND = 0.1  # a box with less than 10 % object pixels is "on background"


@dataclass
class PushQuality:
    """Per-prototype and per-class measures of one push."""

    foreground: torch.Tensor | None  # (P,) object share of each high-activation box; None: mask unknown
    part_score: torch.Tensor | None  # (P,) share of each box on its class's defining parts (parts data)
    part_framing: torch.Tensor | None  # (P,) the same for a box exactly framing the nearest defining part
    distinct_sources: torch.Tensor  # (C,) distinct source images among each class's prototypes
    duplicates: torch.Tensor  # (C,) prototypes sharing a source patch with another of their class

    def summary(self, min_foreground: float = MIN_FOREGROUND) -> dict[str, float]:
        """Flat numbers for logs and metrics.json (keys without a prefix)."""
        present = self.distinct_sources[self.distinct_sources > 0]  # classes that still have prototypes
        out = {
            "distinct_sources_mean": float(present.float().mean()),
            "distinct_sources_min": float(present.min()),
            "duplicates": float(self.duplicates.sum()),
        }
        if self.foreground is not None:
            out["background_share"] = float((self.foreground < min_foreground).float().mean())
        if self.part_score is not None:
            out["part_score"] = float(self.part_score.mean())
            out["zero_part_share"] = float((self.part_score == 0).float().mean())
        if self.part_framing is not None:
            out["part_framing"] = float(self.part_framing.mean())
        return out


def push_quality(
    provenance: dict[str, torch.Tensor],
    dataset: Dataset,
    foreground_mask: Callable[[dict[str, Any]], torch.Tensor | None],
    num_classes: int,
    class_parts: Sequence[Sequence[int]] | None = None,
) -> PushQuality:
    """Measure a push from a model's ``provenance()`` (owner, source_sample, location, activation_box) and
    the push ``dataset`` its sources index (prototypes without a source are left out);
    ``foreground_mask(item)`` is the datamodule's."""
    provenance = {name: tensor.cpu() for name, tensor in provenance.items()}
    pushed = provenance["source_sample"] >= 0  # ProtoPool leaves prototypes no class chose unpushed
    if not pushed.any():
        raise ValueError("prototypes have no source patches yet: push them first")
    provenance = {name: tensor[pushed] for name, tensor in provenance.items()}
    sources, owners = provenance["source_sample"], provenance["owner"].long()
    items = [dataset[int(index)] for index in sources.tolist()]
    masks = [foreground_mask(item) for item in items]
    foreground = None
    if all(mask is not None for mask in masks):
        foreground = box_fractions(provenance["activation_box"], torch.stack(masks))
    part_score = part_framing = None
    if class_parts is not None and all("part_mask" in item for item in items):
        part_masks = torch.stack([item["part_mask"] for item in items])  # (P, H, W)
        score = box_part_score(provenance["activation_box"], part_masks, owners, class_parts)
        part_score, part_framing = score.per_prototype, score.framing_fraction
    keys = torch.stack([owners, sources, provenance["location"][:, 0], provenance["location"][:, 1]], dim=1)
    per_class = torch.bincount(owners, minlength=num_classes)
    distinct_patches = torch.bincount(torch.unique(keys, dim=0)[:, 0], minlength=num_classes)
    distinct_images = torch.bincount(torch.unique(keys[:, :2], dim=0)[:, 0], minlength=num_classes)
    return PushQuality(foreground, part_score, part_framing, distinct_images, per_class - distinct_patches)


def datamodule_push_quality(model: Any, datamodule: Any) -> PushQuality:
    """:func:`push_quality` of a pushed model on the push data of a protolib datamodule."""
    return push_quality(
        model.provenance(),
        datamodule.push_dataloader().dataset,
        datamodule.foreground_mask,
        model.num_classes,
        getattr(datamodule, "class_parts", None),
    )
