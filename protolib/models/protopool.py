"""ProtoPool (Rymarczyk et al., ECCV 2022): a pool of M prototypes shared by all classes; each class has K
slots that choose their prototype from the pool by Gumbel-softmax, scored by the focal similarity.

backbone -> add-on (1x1 conv, sigmoid) -> squared L2 distances to the pool (B, M, H, W) -> per prototype the
min and mean distance (B, M) -> slot assignment (C, M, K) mixes them -> focal similarity (B, C, K) -> last
layer (C x C*K, slot (c, k) -> class c at 1, others 0). The push projects every pool prototype onto its
nearest training patch among the images of the classes whose slots chose it, through the bank's batched
reverse search (one search row per (prototype, choosing class) pair).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from protolib.bank import PrototypeBank, PushResult
from protolib.bank.push import nearest_patches
from protolib.models.protopnet import check_push_loader
from protolib.models.provenance import source_activation_boxes
from protolib.nn.backbones import build_backbone
from protolib.nn.receptive_field import ReceptiveField, receptive_field
from protolib.nn.similarity import L2Similarity
from protolib.nn.slots import SlotAssignment, focal_similarity
from protolib.utils.modes import evaluating


@dataclass
class ProtoPoolOutput:
    """One forward pass."""

    logits: torch.Tensor  # (B, C)
    distances: torch.Tensor  # (B, M, H, W) squared L2 of every patch to every pool prototype
    min_distances: torch.Tensor  # (B, M)
    mean_distances: torch.Tensor  # (B, M)
    assignment: torch.Tensor  # (C, M, K) slot distributions used for this pass
    slot_similarities: torch.Tensor  # (B, C*K) the last layer's input
    similarity: L2Similarity

    @property
    def similarities(self) -> torch.Tensor:
        """(B, M) focal similarity of every pool prototype: g(min distance) - g(mean distance)."""
        return self.similarity.similarity(self.min_distances) - self.similarity.similarity(
            self.mean_distances
        )

    @property
    def similarity_maps(self) -> torch.Tensor:
        """(B, M, H, W) log similarity of every patch to every pool prototype."""
        return self.similarity.similarity(self.distances)


@dataclass
class PoolPushReport:
    """Outcome of one push of the pool."""

    distances: torch.Tensor  # (M,) prototype -> chosen patch distance (NaN: chosen by no class, not moved)
    duplicates: torch.Tensor  # (C,) always zero (kept for the ProtoPNet recipe's log)
    seconds: float


class ProtoPool(nn.Module):
    """Backbone, add-on to D channels (conv 1x1 + sigmoid), M pool prototypes in a bank (l2, learnable),
    K slots per class (:class:`SlotAssignment`), focal similarity, last layer on the C*K slot similarities.

    Args:
        num_classes: C.
        in_channels, image_size: input images.
        backbone, pretrained: ``build_backbone`` name and timm weights.
        backbone_options: extra ``build_backbone`` arguments (``small_cnn``: as ProtoPNet's).
        pool_size: M (paper, CUB: 202).
        slots_per_class: K (paper: 10).
        prototype_dim: D (paper, CUB: 256).
        tau: Gumbel-softmax temperature (reference: 0.5).
        incorrect_class_connection: last-layer init to other classes' slots (reference: 0).
        bank: builds the bank (``conf/bank``); called with ``metric="l2", learnable=True``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "resnet50",
        pretrained: bool = False,
        pool_size: int = 202,
        slots_per_class: int = 10,
        prototype_dim: int = 256,
        tau: float = 0.5,
        incorrect_class_connection: float = 0.0,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        backbone_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.prototype_dim = prototype_dim
        self.image_size = image_size
        self.backbone = build_backbone(
            backbone, pretrained=pretrained, in_chans=in_channels, **dict(backbone_options or {})
        )
        self.receptive_field: ReceptiveField = receptive_field(self.backbone, image_size, in_channels)
        self.add_on = nn.Sequential(nn.Conv2d(self.backbone.out_channels, prototype_dim, 1), nn.Sigmoid())
        nn.init.kaiming_normal_(self.add_on[0].weight, mode="fan_out", nonlinearity="relu")
        nn.init.zeros_(self.add_on[0].bias)
        # owners: the class of the image a prototype was pushed onto (placeholders before any push)
        self.bank = bank(
            num_prototypes=pool_size,
            dim=prototype_dim,
            owners=torch.arange(pool_size) % num_classes,
            metric="l2",
            learnable=True,
        )
        with torch.no_grad():
            self.bank.vectors.uniform_(0.0, 1.0)  # the reference's torch.rand
        self.similarity = L2Similarity("log")
        self.assignment = SlotAssignment(num_classes, pool_size, slots_per_class, tau=tau)
        self.last_layer = nn.Linear(num_classes * slots_per_class, num_classes, bias=False)
        with torch.no_grad():
            own = F.one_hot(self.slot_classes(), num_classes).T.float()  # (C, C*K)
            self.last_layer.weight.copy_(own + incorrect_class_connection * (1 - own))
        self.register_buffer("activation_box", torch.full((pool_size, 4), -1, dtype=torch.long))
        self.register_buffer("revision", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ structure
    @property
    def prototype_bank(self) -> PrototypeBank:
        return self.bank

    @property
    def owners(self) -> torch.Tensor:
        """(M,) class of the image each prototype was pushed onto (placeholders before a push)."""
        return self.bank.owners

    @property
    def max_distance(self) -> float:
        """D: the largest squared distance between a sigmoid feature and a prototype in [0, 1]^D."""
        return float(self.prototype_dim)

    def slot_classes(self) -> torch.Tensor:
        """(C*K,) the class of every last-layer input (slot (c, k) at position c*K + k)."""
        return torch.arange(self.num_classes).repeat_interleave(self.assignment.slots)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """ProtoPNet's groups; ``prototypes`` holds the pool and the slot logits (the reference trains both
        at the same learning rate)."""
        return {
            "backbone": list(self.backbone.parameters()),
            "add_on": list(self.add_on.parameters()),
            "prototypes": [self.bank.vectors, self.assignment.logits],
            "last_layer": list(self.last_layer.parameters()),
        }

    def prototypes_in_use(self) -> int:
        """Pool prototypes chosen by at least one slot (the others do not reach any logit)."""
        return int(self.assignment.chosen().unique().numel())

    def prototype_weights(self) -> torch.Tensor:
        """(C, M) weight of every pool prototype to every class through the slots that chose it."""
        hard = self.assignment.hard()  # (C, M, K)
        per_slot = hard.permute(1, 0, 2).reshape(hard.shape[1], -1)  # (M, C*K): prototype m in slot (c, k)
        return self.last_layer.weight @ per_slot.T  # (C, M)

    # ------------------------------------------------------------------ forward
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> add-on feature map (B, D, h, w)."""
        return self.add_on(self.backbone(images))

    def forward(self, images: torch.Tensor) -> ProtoPoolOutput:
        distances = self.similarity.distances(self.embed(images), self.bank.vectors)  # (B, M, h, w)
        flat = distances.flatten(2)
        min_d, mean_d = flat.min(dim=2).values, flat.mean(dim=2)  # (B, M)
        assignment = self.assignment()  # (C, M, K)
        slots = focal_similarity(min_d, mean_d, assignment, self.similarity.epsilon).flatten(1)  # (B, C*K)
        logits = self.last_layer(slots)
        return ProtoPoolOutput(logits, distances, min_d, mean_d, assignment, slots, self.similarity)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits``, ``features`` (B, C*K) slot similarities (``last_layer(features) == logits``),
        ``prototype_similarity`` (B, M) focal similarity of the pool, and ``min_distances``/``assignment``
        for the loss."""
        output = self(images)
        return {
            "logits": output.logits,
            "features": output.slot_similarities,
            "prototype_similarity": output.similarities,
            "min_distances": output.min_distances,
            "assignment": output.assignment,
        }

    def contributions(self, similarities: torch.Tensor) -> torch.Tensor:
        """(B, M, C) focal similarity times :meth:`prototype_weights`; with every slot's choice final (hard
        assignment, the end of training) it sums over M to the logits."""
        return similarities[:, :, None] * self.prototype_weights().T[None]

    def paired_similarity_maps(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Similarity map (N, h, w) of prototype ``ids[i]`` on ``images[i]``."""
        embeddings = self.embed(images)  # (N, D, h, w)
        prototypes = self.bank.vectors[ids.to(self.bank.vectors.device)]  # (N, D)
        distances = self.similarity.distances(embeddings, prototypes)  # (N, N, h, w)
        own = torch.arange(len(ids), device=distances.device)
        return self.similarity.similarity(distances[own, own])

    def provenance(self) -> dict[str, torch.Tensor]:
        """As ProtoPNet's: owner (class of the source image), source_sample, location, rf_box,
        activation_box, score (push distance), step; -1 / NaN for prototypes never pushed."""
        return {"owner": self.owners, **self.bank.metadata, "activation_box": self.activation_box}

    # ------------------------------------------------------------------ push
    @torch.no_grad()
    def push(self, loader: DataLoader, step: int | None = None, percentile: float = 95.0) -> PoolPushReport:
        """Project every pool prototype chosen by some slot onto its nearest training patch among images of
        the classes that chose it (the reference's class-specific push); unchosen prototypes stay."""
        check_push_loader(loader)
        start = time.perf_counter()
        with evaluating(self):
            device = self.bank.vectors.device
            chosen = self.assignment.chosen()  # (C, K)
            pairs = torch.unique(
                torch.stack([chosen.flatten(), self.slot_classes().to(chosen.device)], dim=1), dim=0
            )  # (R, 2) (prototype, class) pairs
            rows = nearest_patches(
                self.bank.vectors.detach()[pairs[:, 0]],
                pairs[:, 1],
                "l2",
                (
                    (self.embed(b["image"].to(device)), b["label"].to(device), b["index"].to(device))
                    for b in loader
                ),
                restrict_to_owner=True,
            )
            m = self.bank.num_prototypes
            best = torch.full((m,), float("inf"), device=device)
            winner = torch.full((m,), -1, dtype=torch.long, device=device)
            for r, proto in enumerate(pairs[:, 0].tolist()):
                if rows.distances[r] < best[proto]:
                    best[proto], winner[proto] = rows.distances[r], r
            pushed = winner >= 0
            metadata = self.bank.metadata
            vectors = self.bank.vectors.detach().clone()
            vectors[pushed] = rows.vectors[winner[pushed]]
            sample_ids = metadata["source_sample"].clone()
            sample_ids[pushed] = rows.sample_ids[winner[pushed]].to(sample_ids.device)
            locations = metadata["location"].clone()
            locations[pushed] = rows.locations[winner[pushed]].to(locations.device)
            distances = metadata["score"].clone()
            distances[pushed] = best[pushed].to(distances.device)
            rf_boxes = metadata["rf_box"].clone()
            rf_boxes[pushed] = self.receptive_field.boxes(locations[pushed].cpu()).to(rf_boxes.device)
            self.bank.project(
                PushResult(vectors, distances, sample_ids, locations), rf_boxes=rf_boxes, step=step
            )
            self.bank.owners[pushed.to(self.bank.owners.device)] = pairs[winner[pushed], 1].to(
                self.bank.owners.device
            )
            boxes = source_activation_boxes(
                self.paired_similarity_maps, self.bank.source_sample.cpu(), loader.dataset, percentile, device
            )
            self.activation_box.copy_(boxes.to(self.activation_box.device))
            self.revision += 1
        report_distances = torch.where(pushed, best, torch.nan).cpu()
        return PoolPushReport(
            report_distances, torch.zeros(self.num_classes, dtype=torch.long), time.perf_counter() - start
        )

    def prune(self, loader: DataLoader, k: int = 6, threshold: int = 3) -> torch.Tensor:
        """ProtoPool has no pruning (a pool prototype may serve several classes)."""
        raise ValueError(
            "ProtoPool does not prune (its pool is shared between classes): set model.schedule.prune=false"
        )
