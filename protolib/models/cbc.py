"""Deep CBC and RBF networks (Saralajew et al., "A Robust Prototype-Based Network with Interpretable RBF
Classifier Foundations", AAAI 2025; github.com/si-cim/cbc-aaai-2025).

A backbone, the detection-probability feature extractor (softmax over K components of a 1 x 1 convolution,
max-pooled over locations: how present each component is), and a classification-by-components head with
positive and negative reasoning (``head: cbc``) or the RBF head (``head: rbf``). Built on ProtoPNet's network
(backbone, receptive fields, provenance, pictures) and trained by ProtoPNet's recipe; components are not
projected: "push" records, for every component, the training patch where it is most present (the
reference's visualisation), leaving the network unchanged.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from protolib.bank import PrototypeBank
from protolib.bank.distributed import all_reduce_sum_, world_size
from protolib.bank.push import PushResult, gather_best
from protolib.models.protopnet import ProtoPNet, PushReport, check_push_loader
from protolib.models.provenance import source_labels
from protolib.nn.heads import CBCHead, RBFHead
from protolib.nn.prototype_layer import DetectionLayer
from protolib.utils.modes import evaluating

HEADS = {"cbc": CBCHead, "rbf": RBFHead}


class CBCNet(ProtoPNet):
    """Backbone -> detection probabilities of ``num_components`` components -> max-pool -> CBC / RBF head.

    Args (beyond the data's): ``num_components`` K (``None``: the backbone's channels, the reference's
    ``num_features: 0``, with the components initialised as those channels' unit vectors: the reference's
    softmax over the backbone's channels at the start); ``head``: ``cbc`` or ``rbf``; ``backbone_options`` as
    :class:`ProtoPNet`'s. ``bank`` holds the K component vectors (metric ``ip``); each is "owned" by component
    index modulo C until a push records the class of the image it is most present in (components serve every
    class).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "resnet50",
        pretrained: bool = False,
        num_components: int | None = None,
        head: str = "cbc",
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        backbone_options: Mapping[str, Any] | None = None,
    ) -> None:
        if head not in HEADS:
            raise ValueError(f"CBC head {head!r} is unknown: use one of {sorted(HEADS)}")
        super().__init__(
            num_classes,
            in_channels=in_channels,
            image_size=image_size,
            backbone=backbone,
            pretrained=pretrained,
            prototypes_per_class=1,
            prototype_dim=1,
            bank=bank,
            backbone_options=backbone_options,
        )
        channels = self.backbone.out_channels
        k = num_components or channels
        self.add_on = nn.Identity()
        self.prototype_dim = channels
        owners = torch.arange(k) % num_classes
        components = bank(num_prototypes=k, dim=channels, owners=owners, metric="ip", learnable=True)
        with torch.no_grad():
            if k == channels:
                components.vectors.copy_(torch.eye(k))
            else:  # the reference's Xavier initialisation of the extra 1 x 1 conv
                nn.init.xavier_normal_(components.vectors)
        self.prototype_layer = DetectionLayer(components)
        self.last_layer = HEADS[head](k, num_classes)
        self.activation_box = torch.full((k, 4), -1, dtype=torch.long)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """ProtoPNet's contract plus ``presence_maps`` (B, K, h, w), the detection probabilities, and
        ``pooled`` (B, K), their max over locations, which PIP-Net's pre-training losses read
        (``model=cbc_pipnet``)."""
        output = self(images)
        presence = 1 - output.activations.distances  # (B, K, h, w)
        return {**self.contract(output), "presence_maps": presence, "pooled": output.similarities}

    def prototypes_in_use(self) -> int:
        """Every component feeds the head (no sparsity, nothing pruned): K."""
        return self.bank.num_prototypes

    def set_class_connections(self, incorrect: float = -0.5) -> None:
        """Components have no class connections to set (the heads initialise themselves)."""
        if isinstance(self.last_layer, nn.Linear):  # ProtoPNet's constructor, before the head is in place
            super().set_class_connections(incorrect)

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """backbone, prototypes (the component vectors) and last_layer (the head); add_on is empty."""
        return {**super().parameter_groups(), "add_on": []}

    @torch.no_grad()
    def push(
        self, loader: DataLoader, step: int | None = None, percentile: float = 95.0, warn: bool = True
    ) -> PushReport:
        """Record, for every component, the training patch of highest detection probability (any class) and
        its boxes; the components themselves do not change."""
        check_push_loader(loader)
        with evaluating(self):
            start = time.perf_counter()
            k = self.bank.num_prototypes
            device = self.bank.vectors.device
            best = torch.full((k,), -1.0, device=device)
            sample = torch.full((k,), -1, dtype=torch.long, device=device)
            where = torch.full((k, 2), -1, dtype=torch.long, device=device)
            counts = torch.zeros(self.num_classes, dtype=torch.long)
            for batch in loader:
                counts += torch.bincount(batch["label"], minlength=self.num_classes)[: self.num_classes]
                presence = self.prototype_layer.presence(
                    self.embed(batch["image"].to(device))
                )  # (B, K, h, w)
                h, w = presence.shape[-2:]
                value, flat = presence.permute(1, 0, 2, 3).reshape(k, -1).max(dim=1)  # (K,)
                better = value > best
                best[better] = value[better]
                sample[better] = batch["index"].to(device)[flat[better] // (h * w)]
                cell = flat[better] % (h * w)
                where[better] = torch.stack([cell // w, cell % w], dim=1)
            counts = all_reduce_sum_(counts.to(device)).cpu()
            distance = 1 - best  # (K,)
            if world_size() > 1:  # every rank's best patch of its share -> the best over all ranks
                gathered, (sample, where) = gather_best(distance[:, None], (sample[:, None], where[:, None]))
                distance, sample, where = gathered[:, 0], sample[:, 0], where[:, 0]
            result = PushResult(self.bank.vectors.detach().clone(), distance, sample, where)
            self.bank.project(result, rf_boxes=self.receptive_field.boxes(where.cpu()), step=step)
            # owner = the class of the component's source image (as PIP-Net's), so that galleries, the push
            # quality and the part score read a real class rather than the placeholder k mod C
            self.bank.owners.copy_(source_labels(loader.dataset, sample.cpu()).to(self.bank.owners.device))
            self.activation_box.copy_(self._activation_boxes(loader.dataset, percentile))
            self.revision += 1
        return PushReport(
            result.distances.cpu(),
            torch.zeros(self.num_classes, dtype=torch.long),
            counts,
            time.perf_counter() - start,
        )

    def prune(self, loader: DataLoader, k: int = 6, threshold: int = 3) -> torch.Tensor:
        raise ValueError(
            "CBC components are shared by all classes and are not pruned: set schedule.prune=false"
        )
