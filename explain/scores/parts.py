"""Interpretability scores against ground truth: do prototypes sit on the parts that define their class?

On the procedural ``parts`` data a class is defined by which parts appear (``datamodule.class_parts``) and
every image has a part mask, so a pushed prototype can be checked: the fraction of its high-activation box
(on the training image it was pushed onto) covered by its class's defining parts. 1 = the prototype is a
defining part; 0 = it is background or a distractor. ``image_fraction`` (the same fraction over the whole
source image) is the score a prototype would get by covering everything: the level to beat;
``framing_fraction`` (the fraction of a box exactly framing the defining part nearest the prototype's box) is
what a box outlining that whole part scores: below 1, since a part does not fill its bounding box (a disc
79 %, a ring 59 %, a triangle 50 %). It is a reference level, not a bound: a box smaller than the part and
inside it scores up to 1.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from explain.prototypes import pushed_provenance
from explain.scores.registry import ScoreSpec, register
from protolib.models.protopnet import ProtoPNet


def defining_masks(
    masks: torch.Tensor, owners: torch.Tensor, class_parts: Sequence[Sequence[int]]
) -> torch.Tensor:
    """(N, H, W) bool: which pixels of part masks (N, H, W) show a part defining class ``owners[i]`` (N,)."""
    if len(owners) != len(masks):
        raise ValueError(f"expected owners ({len(masks)},) for masks (N, H, W); got {tuple(owners.shape)}")
    if len(owners) and int(owners.max()) >= len(class_parts):
        raise ValueError(
            f"class {int(owners.max())} has no entry in class_parts ({len(class_parts)} classes given)"
        )
    table = torch.zeros(len(class_parts), int(masks.max()) + 1, dtype=torch.bool)  # (C, part ids)
    for c, parts in enumerate(class_parts):
        table[c, [p for p in parts if p < table.shape[1]]] = True
    return table[owners.long()[:, None, None], masks.long()]


def box_fractions(boxes: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
    """(N,) fraction of the pixels of each ``x0, y0, x1, y1`` box (N, 4) (exclusive ends) that are True in
    the boolean mask (N, H, W) of the same image."""
    if boxes.shape != (len(masks), 4) or masks.dim() != 3:
        raise ValueError(
            f"expected boxes (N, 4) and masks (N, H, W); got {tuple(boxes.shape)}, {tuple(masks.shape)}"
        )
    x0, y0, x1, y1 = (v[:, None, None] for v in boxes.long().unbind(1))  # each (N, 1, 1)
    if ((x1 <= x0) | (y1 <= y0)).any():
        raise ValueError("empty box (x1 <= x0 or y1 <= y0): boxes are x0, y0, x1, y1 with exclusive ends")
    rows = torch.arange(masks.shape[1])[None, :, None]  # (1, H, 1)
    cols = torch.arange(masks.shape[2])[None, None, :]  # (1, 1, W)
    inside = (rows >= y0) & (rows < y1) & (cols >= x0) & (cols < x1)  # (N, H, W)
    return (inside & masks.bool()).flatten(1).sum(1) / inside.flatten(1).sum(1)


def framing_boxes(boxes: torch.Tensor, defining: torch.Tensor) -> torch.Tensor:
    """(N, 4) ``x0, y0, x1, y1`` (exclusive ends) of the bounding box of the defining part (a connected
    region of the boolean masks (N, H, W), 8-connected) nearest the centre of each box (N, 4); the whole
    image where a mask holds no defining part."""
    if boxes.shape != (len(defining), 4) or defining.dim() != 3:
        raise ValueError(
            f"expected boxes (N, 4) and masks (N, H, W); got {tuple(boxes.shape)}, {tuple(defining.shape)}"
        )
    height, width = defining.shape[1:]
    framing = torch.tensor([[0, 0, width, height]]).repeat(len(boxes), 1)
    for n, (box, mask) in enumerate(zip(boxes.tolist(), defining.numpy(), strict=True)):
        regions, count = ndimage.label(mask, structure=np.ones((3, 3)))
        if count == 0:
            continue
        ys, xs = np.nonzero(regions)
        centre_y, centre_x = (box[1] + box[3]) / 2, (box[0] + box[2]) / 2  # pixel i spans [i, i + 1)
        nearest = regions[ys, xs][np.argmin((ys + 0.5 - centre_y) ** 2 + (xs + 0.5 - centre_x) ** 2)]
        ys, xs = np.nonzero(regions == nearest)
        framing[n] = torch.tensor([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
    return framing


@dataclass
class PartScore:
    """Per-prototype part scores of a pushed ProtoPNet and their mean (the interpretability score)."""

    per_prototype: torch.Tensor  # (P,) fraction of each high-activation box on its class's defining parts
    image_fraction: torch.Tensor  # (P,) the same fraction over the whole source image: the level to beat
    framing_fraction: torch.Tensor  # (P,) the same for a box exactly framing the nearest defining part

    @property
    def mean(self) -> float:
        """The interpretability score: mean over prototypes."""
        return float(self.per_prototype.mean())

    @property
    def image_mean(self) -> float:
        """Mean of ``image_fraction``: what boxes covering the whole image would score."""
        return float(self.image_fraction.mean())

    @property
    def framing_mean(self) -> float:
        """Mean of ``framing_fraction``: what boxes exactly framing each prototype's part would score."""
        return float(self.framing_fraction.mean())


def prototype_part_score(
    model: ProtoPNet, push_dataset: Dataset, class_parts: Sequence[Sequence[int]]
) -> PartScore:
    """Score every pushed prototype's high-activation box against the part mask of its source image.

    ``push_dataset`` is the dataset push used (items carry "part_mask": the ``parts`` data); ``class_parts``
    the defining part ids of each class (``PartsDataModule.class_parts``).
    """
    provenance, known = pushed_provenance(model)
    provenance = {name: tensor[known] for name, tensor in provenance.items()}  # prototypes with a source
    masks = []
    for index in provenance["source_sample"].tolist():
        item = push_dataset[index]
        if "part_mask" not in item:
            raise ValueError(
                "push dataset items have no 'part_mask': part scores need the parts data "
                "(protolib.data.parts.PartsDataModule)"
            )
        masks.append(item["part_mask"])
    masks = torch.stack(masks)  # (P, H, W)
    return box_part_score(provenance["activation_box"], masks, provenance["owner"], class_parts)


def box_part_score(
    boxes: torch.Tensor, masks: torch.Tensor, owners: torch.Tensor, class_parts: Sequence[Sequence[int]]
) -> PartScore:
    """The part score of boxes (P, 4) ``x0, y0, x1, y1`` on part masks (P, H, W) of the images of prototypes
    owned by classes ``owners`` (P,), with its two reference levels (whole image, framing)."""
    defining = defining_masks(masks, owners, class_parts)  # (P, H, W)
    full = torch.tensor([[0, 0, masks.shape[2], masks.shape[1]]]).expand(len(masks), 4)  # whole image
    return PartScore(
        per_prototype=box_fractions(boxes, defining),
        image_fraction=box_fractions(full, defining),
        framing_fraction=box_fractions(framing_boxes(boxes, defining), defining),
    )


def part_score(
    net: torch.nn.Module, datamodule: Any, max_images: int = 200, progress: bool = True
) -> dict[str, float]:
    """The registered form of :func:`prototype_part_score` on the push data (``max_images`` and ``progress``
    do not apply: one source image per prototype)."""
    score = prototype_part_score(net, datamodule.push_dataloader().dataset, datamodule.class_parts)
    return {"mean": score.mean, "image_mean": score.image_mean, "framing_mean": score.framing_mean}


def part_score_unavailable(net: torch.nn.Module, datamodule: Any) -> str | None:
    """Why the part score does not apply: no prototype provenance, or data without part masks."""
    if not hasattr(net, "provenance") or getattr(net, "prototype_bank", None) is None:
        return f"{type(net).__name__} records no prototype source patches"
    if not hasattr(datamodule, "class_parts"):
        return f"{type(datamodule).__name__} has no part masks (class_parts): use the parts data"
    return None


register(
    "part_score",
    ScoreSpec(
        compute=part_score,
        unavailable=part_score_unavailable,
        higher_is_better=True,
        description=(
            "mean fraction of each prototype's high-activation box (on its source image) on its class's "
            "defining parts (image_mean: the same over whole images, the level to beat; framing_mean: boxes "
            "exactly framing each prototype's nearest defining part, what outlining the whole part scores)"
        ),
    ),
)
