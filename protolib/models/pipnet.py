"""PIP-Net ("Patch-based Intuitive Prototypes", Nauta et al., CVPR 2023): backbone -> softmax over prototype
channels -> max-pooled presence -> sparse non-negative linear head.

Prototypes are channels of the latent map, so in the space where the model compares patches with them -
the presence vectors (one softmax over P per patch) - prototype p is the one-hot vector e_p. The bank holds
exactly those (metric ``ip``: the nearest patch of e_p is the patch where p is most present), so the
visualisation of every prototype is one batched reverse search of the bank over the training set; it moves
no vector, it records where each prototype is most present (source image, patch, boxes, score = -presence).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from protolib.bank import PrototypeBank
from protolib.models.protopnet import check_push_loader
from protolib.models.provenance import source_activation_boxes, source_labels
from protolib.nn.backbones import build_backbone
from protolib.nn.presence import NonNegativeLinear, PresenceMaps
from protolib.nn.receptive_field import ReceptiveField, receptive_field
from protolib.utils.modes import evaluating


@dataclass
class PIPNetOutput:
    """One forward pass: the head's output, presence maps, max-pooled presence and what the head read."""

    logits: torch.Tensor  # (B, C) non-negative scores
    presence_maps: torch.Tensor  # (B, P, H, W) softmax over P at every patch
    pooled: torch.Tensor  # (B, P) max-pooled presence
    similarities: torch.Tensor  # (B, P) the head's input: pooled, below the threshold zeroed in eval mode

    @property
    def similarity_maps(self) -> torch.Tensor:
        """(B, P, H, W) presence of every prototype at every patch."""
        return self.presence_maps


@dataclass
class VisualizationReport:
    """Outcome of one visualisation search: each prototype's highest presence in the training set."""

    presence: torch.Tensor  # (P,) max presence of every prototype over all training patches
    seconds: float


class PIPNet(nn.Module):
    """Backbone, presence maps over P prototypes (:class:`PresenceMaps`), max-pool, non-negative head.

    Args:
        num_classes: C.
        in_channels, image_size: input images (the receptive field of a patch depends on both).
        backbone, pretrained: ``build_backbone`` name and whether to load its timm weights.
        backbone_options: extra ``build_backbone`` arguments (``small_cnn``: as ProtoPNet's).
        num_prototypes: P; None uses the backbone's channels as prototypes (the paper), an integer adds the
            1x1 conv the reference code offers (``--num_features``).
        bias: a (non-negative) bias in the head (paper: no).
        multiplier: m of the class loss ``log(1 + o^m)`` (reference: 2, fixed).
        inference_threshold: in eval mode presence scores below it count as absent (reference: 0.1).
        backbone_top: parameter-name prefixes of the backbone's last layers, trained in pre-training and
            before ``freeze_epochs`` as the reference's ``params_to_train``/``params_to_freeze`` (ConvNeXt:
            the last two stages); the rest is the ``backbone`` group.
        bank: builds the prototype bank (``conf/bank``); called with ``metric="ip", learnable=False``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "convnext_tiny",
        pretrained: bool = False,
        num_prototypes: int | None = None,
        bias: bool = False,
        multiplier: float = 2.0,
        inference_threshold: float = 0.1,
        backbone_top: Sequence[str] = (),
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        backbone_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.image_size = image_size
        self.inference_threshold = inference_threshold
        self.backbone = build_backbone(
            backbone, pretrained=pretrained, in_chans=in_channels, **dict(backbone_options or {})
        )
        self.receptive_field: ReceptiveField = receptive_field(self.backbone, image_size, in_channels)
        self.presence = PresenceMaps(self.backbone.out_channels, num_prototypes)
        p = self.presence.num_prototypes
        self.backbone_top = tuple(backbone_top)
        names = [name for name, _ in self.backbone.named_parameters()]
        unmatched = [prefix for prefix in self.backbone_top if not any(n.startswith(prefix) for n in names)]
        if unmatched:
            raise ValueError(
                f"backbone_top prefixes {unmatched} match no parameter of backbone {backbone!r}; its "
                f"parameters start with e.g. {names[:3]} ... {names[-3:]}"
            )
        owners = torch.arange(p) % num_classes  # placeholder; the visualisation sets the source image's class
        self.bank = bank(num_prototypes=p, dim=p, owners=owners, metric="ip", learnable=False)
        with torch.no_grad():
            self.bank.vectors.copy_(torch.eye(p))  # prototype p = channel p of the presence space
        self.last_layer = NonNegativeLinear(p, num_classes, bias=bias, multiplier=multiplier)
        self.register_buffer("activation_box", torch.full((p, 4), -1, dtype=torch.long))
        self.register_buffer("revision", torch.zeros((), dtype=torch.long))

    # ------------------------------------------------------------------ structure
    @property
    def prototype_bank(self) -> PrototypeBank:
        return self.bank

    @property
    def owners(self) -> torch.Tensor:
        """(P,) class of each prototype's source image (after a visualisation; placeholders before)."""
        return self.bank.owners

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """``backbone`` (early layers), ``backbone_top`` (the last layers), ``prototypes`` (the 1x1 conv, if
        any), ``last_layer`` (head weights and bias; the multiplier is a fixed buffer)."""
        top, rest = [], []
        for name, param in self.backbone.named_parameters():
            (top if name.startswith(self.backbone_top) and self.backbone_top else rest).append(param)
        return {
            "backbone": rest,
            "backbone_top": top,
            "prototypes": list(self.presence.parameters()),
            "last_layer": list(self.last_layer.parameters()),
        }

    def prototype_weights(self) -> torch.Tensor:
        """(C, P) the head's weights as used (relu)."""
        return self.last_layer.effective_weight

    def prototypes_in_use(self, threshold: float = 1e-3) -> int:
        """Prototypes with a head weight above ``threshold`` to some class (the paper's count)."""
        return int((self.last_layer.weight > threshold).any(dim=0).sum())

    # ------------------------------------------------------------------ forward
    def presence_maps(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> presence maps (B, P, h, w)."""
        return self.presence(self.backbone(images))

    def forward(self, images: torch.Tensor) -> PIPNetOutput:
        maps = self.presence_maps(images)  # (B, P, h, w)
        pooled = maps.flatten(2).amax(dim=2)  # (B, P)
        scores = pooled if self.training else torch.where(pooled < self.inference_threshold, 0.0, pooled)
        return PIPNetOutput(self.last_layer(scores), maps, pooled, scores)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``logits`` (B, C), ``features`` = ``prototype_similarity`` (B, P) (the head's input, so
        ``last_layer(features) == logits``), and ``presence_maps``/``pooled`` for the loss."""
        output = self(images)
        return {
            "logits": output.logits,
            "features": output.similarities,
            "prototype_similarity": output.similarities,
            "presence_maps": output.presence_maps,
            "pooled": output.pooled,
        }

    def contributions(self, similarities: torch.Tensor) -> torch.Tensor:
        """(B, P, C) presence times weight; summed over P it gives the logits (without a bias)."""
        return similarities[:, :, None] * self.last_layer.effective_weight.T[None]

    def paired_similarity_maps(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Presence map (N, h, w) of prototype ``ids[i]`` on ``images[i]``."""
        maps = self.presence_maps(images)  # (N, P, h, w)
        return maps[torch.arange(len(ids), device=maps.device), ids.to(maps.device)]

    def provenance(self) -> dict[str, torch.Tensor]:
        """Where every prototype is most present in the training set: owner (the class of that image),
        source_sample, location, rf_box, activation_box, score (minus the presence), step; -1 before."""
        return {"owner": self.owners, **self.bank.metadata, "activation_box": self.activation_box}

    # ------------------------------------------------------------------ visualisation
    def _presence_batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
        device = self.last_layer.weight.device
        for batch in loader:
            images = batch["image"].to(device)
            yield self.presence_maps(images), batch["label"].to(device), batch["index"].to(device)

    @torch.no_grad()
    def push(
        self, loader: DataLoader, step: int | None = None, percentile: float = 95.0
    ) -> VisualizationReport:
        """Find, for every prototype, the training patch where it is most present (the bank's reverse search
        over the presence maps of ``loader``: eval transform, no shuffling, checked) and record it."""
        check_push_loader(loader)
        start = time.perf_counter()
        with evaluating(self):
            result = self.bank.nearest_per_prototype(self._presence_batches(loader), restrict_to_owner=False)
            rf_boxes = self.receptive_field.boxes(result.locations.cpu())
            self.bank.project(
                replace(result, vectors=self.bank.vectors.detach()), rf_boxes=rf_boxes, step=step
            )
            sources = self.bank.source_sample.cpu()
            self.bank.owners.copy_(source_labels(loader.dataset, sources).to(self.bank.owners.device))
            boxes = source_activation_boxes(
                self.paired_similarity_maps,
                sources,
                loader.dataset,
                percentile,
                self.last_layer.weight.device,
            )
            self.activation_box.copy_(boxes.to(self.activation_box.device))
            self.revision += 1
        return VisualizationReport(-result.distances.cpu(), time.perf_counter() - start)

    @torch.no_grad()
    def drop_absent(self, presence: torch.Tensor, threshold: float | None = None) -> torch.Tensor:
        """Zero the head weights of prototypes whose highest training-set presence (P,) is at most
        ``threshold`` (default: the inference threshold), as the reference does after training; returns
        their ids."""
        threshold = self.inference_threshold if threshold is None else threshold
        absent = (presence <= threshold).nonzero().flatten()
        self.last_layer.weight[:, absent.to(self.last_layer.weight.device)] = 0.0
        return absent
