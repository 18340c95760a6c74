"""Why did ProtoPNet predict this? The local explanation of one image: "this looks like that".

A ProtoPNet logit is a sum over prototypes of (max similarity of the prototype on the image) x (last-layer
weight from the prototype to the class); the last layer has no bias, so these contributions add up to the
logit exactly. For the predicted (or a requested) class the explanation lists the prototypes with the largest
contributions and shows, for each, where on the test image it is most similar (upsampled similarity map and
its high-activation box, by the same percentile rule push uses) next to the training patch the prototype is
(push provenance).
"""

from __future__ import annotations

import textwrap
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from matplotlib.figure import Figure
from PIL import Image
from torch.utils.data import Dataset

from explain.prototypes import (
    ACTIVATION_COLOUR,
    PANEL,
    crop_box,
    draw_box,
    heatmap_overlay,
    prototype_weights,
    pushed_provenance,
    resize_panel,
    to_rgb_uint8,
)
from protolib.models.protopnet import ProtoPNet, fetch_images, high_activation_boxes, upsample_maps
from protolib.utils.io import atomic_savefig
from protolib.utils.modes import evaluating

if TYPE_CHECKING:
    from explain.families import Explained, Local


@dataclass
class PrototypeEvidence:
    """One prototype's part in a decision: similarity x class-connection weight = contribution."""

    prototype: int
    owner: int  # the class the prototype belongs to
    similarity: float  # max similarity of the prototype over the test image's patches
    weight: float  # last-layer weight from the prototype to the explained class
    contribution: float  # similarity * weight
    similarity_map: np.ndarray  # (H, W) similarity on the test image, upsampled to pixels
    box: tuple[int, int, int, int]  # high-activation box on the test image: x0, y0, x1, y1 (exclusive ends)
    source_index: int  # training-set index of the image the prototype was pushed onto
    source_image: np.ndarray  # (H, W, 3) uint8 that training image
    source_box: tuple[int, int, int, int]  # the prototype's high-activation box on it (push provenance)

    @property
    def source_patch(self) -> np.ndarray:
        """(h, w, 3) uint8: the training patch the prototype is."""
        return crop_box(self.source_image, self.source_box)


@dataclass
class LocalExplanation:
    """The explanation of one image: every prototype's contribution to the explained class, the top ones
    with their pictures."""

    image: np.ndarray  # (H, W, 3) uint8 test image
    logits: np.ndarray  # (C,)
    predicted: int
    target: int  # the explained class
    contributions: np.ndarray  # (P,) contribution of every prototype to the target logit; sums to it
    evidence: list[PrototypeEvidence]  # the top-k prototypes by contribution, largest first
    class_names: list[str]

    @property
    def logit(self) -> float:
        """The explained class's logit."""
        return float(self.logits[self.target])

    def summary(self) -> str:
        """A few lines of text: the decision and the top prototypes' numbers."""
        names = self.class_names
        lines = [
            f"predicted {self.predicted} ({names[self.predicted]}); explaining class {self.target} "
            f"({names[self.target]}): logit {self.logit:.3f} = sum of {len(self.contributions)} "
            "contributions",
            f"{'prototype':>9} {'class':>5} {'similarity':>10} {'weight':>7} {'contribution':>12}  source",
        ]
        lines += [
            f"{e.prototype:>9} {e.owner:>5} {e.similarity:>10.3f} {e.weight:>7.3f} {e.contribution:>12.3f}  "
            f"train image {e.source_index}"
            for e in self.evidence
        ]
        shown = sum(e.contribution for e in self.evidence)
        lines.append(
            f"top {len(self.evidence)} contribute {shown:.3f}, the other prototypes {self.logit - shown:.3f}"
        )
        return "\n".join(lines)


@torch.no_grad()
def explain_image(
    model: ProtoPNet,
    image: torch.Tensor,
    push_dataset: Dataset,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    target: int | None = None,
    k: int = 3,
    percentile: float = 95.0,
    class_names: Sequence[str] | None = None,
) -> LocalExplanation:
    """Explain the model's decision on one normalised ``image`` (C, H, W) for class ``target`` (default: the
    predicted class) by its ``k`` largest prototype contributions.

    ``push_dataset`` is the dataset the prototypes were pushed with
    (``datamodule.push_dataloader().dataset``): their source patches come from it; ``denormalize`` maps
    images back to [0, 1]; ``percentile`` is the high-activation rule (the schedule's ``push_percentile``).
    """
    if image.dim() != 3:
        raise ValueError(f"explain_image takes one image (C, H, W), got shape {tuple(image.shape)}")
    if k < 1:
        raise ValueError(f"k (prototypes to show) must be >= 1, got {k}")
    provenance, known = pushed_provenance(model)
    device = model.last_layer.weight.device
    with evaluating(model):
        output = model(image[None].to(device))
    logits = output.logits[0].cpu()  # (C,)
    predicted = int(logits.argmax())
    target = predicted if target is None else int(target)
    if not 0 <= target < len(logits):
        raise ValueError(f"target class {target} is out of range: the model has {len(logits)} classes")
    similarities = output.similarities.cpu()  # (1, P)
    contributions = model.contributions(similarities.to(device))[0, :, target].cpu()  # (P,)
    top = known[contributions[known].topk(min(k, len(known))).indices]  # (k,) among prototypes with a source
    maps = upsample_maps(output.similarity_maps[0, top.to(device)], tuple(image.shape[-2:]))  # (k, H, W)
    boxes = high_activation_boxes(maps, percentile).cpu()  # (k, 4)
    sources = to_rgb_uint8(denormalize(fetch_images(push_dataset, provenance["source_sample"][top].tolist())))
    weights = prototype_weights(model)[target].detach().cpu()  # (P,)
    evidence = [
        PrototypeEvidence(
            prototype=p,
            owner=int(provenance["owner"][p]),
            similarity=float(similarities[0, p]),
            weight=float(weights[p]),
            contribution=float(contributions[p]),
            similarity_map=similarity_map,
            box=tuple(box),
            source_index=int(provenance["source_sample"][p]),
            source_image=source,
            source_box=tuple(provenance["activation_box"][p].tolist()),
        )
        for p, similarity_map, box, source in zip(
            top.tolist(), maps.cpu().numpy(), boxes.tolist(), sources, strict=True
        )
    ]
    names = list(class_names) if class_names is not None else [str(c) for c in range(len(logits))]
    picture = to_rgb_uint8(denormalize(image[None].cpu()))[0]
    return LocalExplanation(
        picture, logits.numpy(), predicted, target, contributions.numpy(), evidence, names
    )


def boxed_panel(image: np.ndarray, box: Sequence[int], activation: np.ndarray | None = None) -> Image.Image:
    """A picture panel: ``image`` (H, W, 3) uint8, with the heat-map of ``activation`` (H, W) if given, and
    the high-activation ``box`` in cyan."""
    panel = resize_panel(image if activation is None else heatmap_overlay(image, activation), PANEL)
    draw_box(panel, box, image.shape[0], ACTIVATION_COLOUR)
    return panel


def plot_explanation(explanation: LocalExplanation) -> Figure:
    """One row per top prototype: where it looks on the test image | its source image | its patch, with the
    similarity x weight = contribution arithmetic in the row title."""
    rows = len(explanation.evidence)
    figure = Figure(figsize=(7.5, 2.6 * rows + 0.7), layout="constrained")
    axes = figure.subplots(rows, 3, squeeze=False)
    names = explanation.class_names
    for row, evidence in zip(axes, explanation.evidence, strict=True):
        row[0].imshow(boxed_panel(explanation.image, evidence.box, evidence.similarity_map))
        row[0].set_title("test image: this ...", fontsize=9)
        row[1].imshow(boxed_panel(evidence.source_image, evidence.source_box))
        row[1].set_title(
            f"... looks like prototype {evidence.prototype}\n(train image {evidence.source_index})",
            fontsize=9,
        )
        row[2].imshow(resize_panel(evidence.source_patch, PANEL))
        row[2].set_title(
            f"{textwrap.fill(f'class {evidence.owner} ({names[evidence.owner]})', 30)}\nsim "
            f"{evidence.similarity:.2f} x weight {evidence.weight:.2f} = {evidence.contribution:.2f}",
            fontsize=9,
        )
        for axis in row:
            axis.set_axis_off()
    figure.suptitle(
        textwrap.fill(
            f"predicted {names[explanation.predicted]}; class {names[explanation.target]}: logit "
            f"{explanation.logit:.2f} = sum of {len(explanation.contributions)} contributions",
            90,
        ),  # wrapped, so that long class names are not cut off
        fontsize=10,
    )
    return figure


def save_explanation(explanation: LocalExplanation, path: str | Path) -> Path:
    """Render the explanation (``plot_explanation``) into one PNG, written atomically."""
    return atomic_savefig(path, plot_explanation(explanation), dpi=100)


def patch_local(explained: Explained, item: dict[str, Any], out: Path) -> Local:
    """The ``local`` explanation of ProtoPNet and its variants: the top prototype contributions to the
    predicted class (or ``options["target"]``), where each looks on the image and which patch it is."""
    from explain.families import Local

    schedule = getattr(explained.module, "schedule", None)
    explanation = explain_image(
        explained.net,
        item["image"],
        explained.datamodule.push_dataloader().dataset,
        explained.datamodule.denormalize,
        target=explained.options.get("target"),
        k=explained.options.get("k", 3),
        percentile=getattr(schedule, "push_percentile", 95.0),
        class_names=explained.class_names,
    )
    path = save_explanation(explanation, out)
    evidence = [(e.prototype, e.contribution) for e in explanation.evidence]
    return Local(path, explanation.summary(), int(item["label"]), explanation.predicted, evidence)
