"""Deformable ProtoPNet (Donnelly, Barnett and Chen, CVPR 2022; github.com/jdonnelly36/Deformable-ProtoPNet).

ProtoPNet with one part swapped: the prototype layer. Prototypes have ``kh x kw`` parts (2 x 2 by default)
that move by offsets predicted from the input, compared by part-wise cosine similarity
(:class:`~protolib.nn.prototype_layer.DeformablePrototypeLayer`). Everything else — backbone, last layer,
push through the bank, pruning, provenance, the ProtoPNet training recipe — is ProtoPNet's; this class only
builds the other layer (and the reference's upsampling add-on) and records where every part of a pushed
prototype landed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from protolib.bank import PrototypeBank
from protolib.models.protopnet import ProtoPNet, PushReport, fetch_images
from protolib.nn.prototype_layer import DeformablePrototypeLayer
from protolib.nn.similarity import PartCosineSimilarity
from protolib.utils.modes import evaluating


class DeformableProtoPNet(ProtoPNet):
    """ProtoPNet whose prototypes are deformable: see the module docstring.

    Args (beyond :class:`ProtoPNet`'s):
        parts: (kh, kw) parts per prototype (paper: 2 x 2).
        dilation: spacing of the undeformed parts in feature-map locations (paper: 2).
        offset_hidden: hidden channels of the offset predictor (paper: 128; 0 = one conv).
        upsample: the reference's add-on, a parameter-free 2x bilinear upsampling of the backbone's map
            (prototypes then have the backbone's channels, ``prototype_dim`` is ignored); ``False`` keeps
            ProtoPNet's 1x1-conv add-on to ``prototype_dim`` channels.
        similarity: :class:`PartCosineSimilarity` (the only one with parts).
        backbone_options, distinct_push: as :class:`ProtoPNet`'s.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "resnet50",
        pretrained: bool = False,
        prototypes_per_class: int = 6,
        prototype_dim: int = 512,
        similarity: PartCosineSimilarity | None = None,
        incorrect_class_connection: float = -0.5,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        parts: tuple[int, int] = (2, 2),
        dilation: int = 2,
        offset_hidden: int = 128,
        upsample: bool = True,
        backbone_options: Mapping[str, Any] | None = None,
        distinct_push: bool = False,
    ) -> None:
        super().__init__(
            num_classes,
            in_channels=in_channels,
            image_size=image_size,
            backbone=backbone,
            pretrained=pretrained,
            prototypes_per_class=prototypes_per_class,
            prototype_dim=prototype_dim,
            incorrect_class_connection=incorrect_class_connection,
            bank=bank,
            backbone_options=backbone_options,
            distinct_push=distinct_push,
        )
        similarity = similarity or PartCosineSimilarity()
        if upsample:
            # The reference's "upsample" add-on: the backbone's map at twice the resolution; a location u of
            # it sits at (u + 0.5) / 2 - 0.5 of the backbone's map (align_corners=False).
            self.add_on = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False)
            self.prototype_dim = self.backbone.out_channels
            rf = self.receptive_field
            self.receptive_field = dataclasses.replace(
                rf,
                stride=tuple(s / 2 for s in rf.stride),
                start=tuple(c - s / 4 for c, s in zip(rf.start, rf.stride, strict=True)),
                feature_size=tuple(2 * n for n in rf.feature_size),
            )
        n = int(parts[0]) * int(parts[1])
        owners = self.owners.clone()
        prototypes = bank(
            num_prototypes=len(owners),
            dim=self.prototype_dim * n,
            owners=owners,
            metric=similarity.metric,
            learnable=True,
        )
        with torch.no_grad():
            prototypes.vectors.uniform_(0.0, 1.0)  # the reference's torch.rand
        self.prototype_layer = DeformablePrototypeLayer(
            prototypes,
            channels=self.prototype_dim,
            similarity=similarity,
            parts=parts,
            dilation=dilation,
            offset_hidden=offset_hidden,
        )
        # Where every part of a pushed prototype landed on its source image: (row, col) in feature-map
        # locations and the pixel box of that feature-map cell; -1 before any push.
        self.register_buffer("part_location", torch.full((len(owners), n, 2), -1.0))
        self.register_buffer("part_box", torch.full((len(owners), n, 4), -1, dtype=torch.long))

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """ProtoPNet's groups plus ``offsets``, the offset predictor (trained in joint epochs only)."""
        return {
            **super().parameter_groups(),
            "offsets": list(self.prototype_layer.offset_predictor.parameters()),
        }

    @property
    def max_distance(self) -> float:
        """Largest distance ``1 - cosine``."""
        return 2.0

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """ProtoPNet's contract plus what the loss reads: ``prototype_cosine`` (B, P), the best location's
        cosine before the ReLU, and ``offsets`` (B, 2n, h, w)."""
        output = self(images)
        similarities = output.similarities  # (B, P)
        return {
            "logits": output.logits,
            "features": similarities,
            "prototype_similarity": similarities,
            "min_distances": output.min_distances,
            "prototype_cosine": 1 - output.min_distances,
            "offsets": output.activations.offsets,
        }

    def provenance(self) -> dict[str, torch.Tensor]:
        """ProtoPNet's provenance plus every part's ``part_location`` (P, n, 2) and ``part_box`` (P, n, 4)."""
        return {**super().provenance(), "part_location": self.part_location, "part_box": self.part_box}

    def _resize_for_state(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        super()._resize_for_state(module, state_dict, prefix, *args)
        for name in ("part_location", "part_box"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))

    @torch.no_grad()
    def push(
        self, loader: DataLoader, step: int | None = None, percentile: float = 95.0, warn: bool = True
    ) -> PushReport:
        """ProtoPNet's push (each prototype := its best deformed patch of its class, through the bank), then
        record where each of its parts landed on the source image."""
        report = super().push(loader, step=step, percentile=percentile, warn=warn)
        with evaluating(self):  # batch-norm statistics must not move on the source images
            locations, boxes = self._part_provenance(loader.dataset)
        self.part_location.copy_(locations)
        self.part_box.copy_(boxes)
        return report

    def _part_provenance(self, dataset: Dataset, chunk: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """(P, n, 2) part positions at each prototype's source location and their (P, n, 4) pixel boxes."""
        device = self.last_layer.weight.device
        sources, location = self.bank.source_sample.cpu(), self.bank.location.cpu()
        positions = []
        for ids in torch.arange(len(sources)).split(chunk):
            images = fetch_images(dataset, sources[ids].tolist()).to(device)
            _, _, where = self.prototype_layer.sample(self.embed(images))  # (N, n, h, w, 2)
            rows, cols = location[ids, 0].to(device), location[ids, 1].to(device)
            positions.append(where[torch.arange(len(ids), device=device), :, rows, cols].cpu())  # (N, n, 2)
        parts = torch.cat(positions)  # (P, n, 2)
        return parts.to(self.part_location), self.part_cells(parts).to(self.part_box.device)

    def part_cells(self, positions: torch.Tensor) -> torch.Tensor:
        """Pixel boxes (..., 4) ``x0, y0, x1, y1`` of one feature-map cell (a stride square) centred where
        each part lands, from (row, col) positions (..., 2): what the pictures draw for every part."""
        rf = self.receptive_field
        corners = []
        for axis in (1, 0):  # x from columns, y from rows
            centre = rf.start[axis] + positions[..., axis].double() * rf.stride[axis]
            low = torch.floor(centre - rf.stride[axis] / 2).clamp(0, rf.image_size[axis])
            high = torch.ceil(centre + rf.stride[axis] / 2).clamp(0, rf.image_size[axis])
            corners.append((low, high))
        (x0, x1), (y0, y1) = corners
        return torch.stack([x0, y0, x1, y1], dim=-1).long()

    @torch.no_grad()
    def prune(self, loader: DataLoader, k: int = 6, threshold: int = 3) -> torch.Tensor:
        """ProtoPNet's pruning, keeping the part provenance of the survivors."""
        before = self.bank.num_prototypes
        removed = super().prune(loader, k=k, threshold=threshold)
        if len(removed):
            kept = torch.ones(before, dtype=torch.bool)
            kept[removed.cpu()] = False
            self.part_location = self.part_location[kept.to(self.part_location.device)]
            self.part_box = self.part_box[kept.to(self.part_box.device)]
        return removed
