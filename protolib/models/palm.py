"""PALM's network (Lu et al., ICLR 2024): backbone, projection to the unit sphere, prototypes per class.

The prototypes are entries of a cosine :class:`~protolib.bank.PrototypeBank` updated by EMA toward the
embeddings assigned to them (never by gradient), so every rank of a DDP run holds the same bank.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank import PrototypeBank
from protolib.bank.distributed import all_reduce_sum_, world_size
from protolib.nn.assignment import prototype_assignment
from protolib.nn.backbones import build_backbone
from protolib.nn.projection import ProjectionHead


class PALMNet(nn.Module):
    """Backbone -> pooled features (B, F) -> projection head -> unit embedding (B, E) vs prototypes (P, E).

    ``num_classes * prototypes_per_class`` prototypes, owned class by class (prototype ``c * K + k`` is the
    k-th of class c), initialised like the reference code: uniform in [0, 1)^E, then normalised. ``bank``
    builds the bank (a ``PrototypeBank`` partial from ``conf/bank`` chooses the FAISS index).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "cifar_resnet34",
        pretrained: bool = False,
        embedding_dim: int = 128,
        head_hidden_dim: int | None = None,
        prototypes_per_class: int = 6,
        temperature: float = 0.1,
        momentum: float = 0.999,
        epsilon: float = 0.05,
        sinkhorn_iterations: int = 3,
        topk: int | None = 5,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
    ) -> None:
        super().__init__()
        if prototypes_per_class < 1:
            raise ValueError(f"prototypes_per_class must be at least 1, got {prototypes_per_class}")
        if topk is not None and not 1 <= topk <= prototypes_per_class:
            raise ValueError(
                f"topk={topk} must be between 1 and prototypes_per_class={prototypes_per_class} "
                "(or null to keep all)"
            )
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"prototype EMA momentum must be in [0, 1), got {momentum}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        self.backbone = build_backbone(backbone, pretrained=pretrained, in_chans=in_channels, pooled=True)
        self.head = ProjectionHead(self.backbone.out_channels, embedding_dim, head_hidden_dim)
        owners = torch.arange(num_classes).repeat_interleave(prototypes_per_class)  # (P,)
        self.bank = bank(
            num_prototypes=len(owners), dim=embedding_dim, owners=owners, metric="cosine", learnable=False
        )
        with torch.no_grad():
            self.bank.vectors.copy_(F.normalize(torch.rand(len(owners), embedding_dim), dim=1))
        self.num_classes = num_classes
        self.temperature = temperature
        self.momentum = momentum
        self.epsilon = epsilon
        self.sinkhorn_iterations = sinkhorn_iterations
        self.topk = topk

    last_layer = None  # logits are prototype log-likelihoods, not a linear layer of the features

    @property
    def prototype_bank(self) -> PrototypeBank:
        """The bank, under the name the explanation / OOD contract reads."""
        return self.bank

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Pooled backbone features (B, F) and the L2-normalised embedding (B, E)."""
        features = self.backbone(images)  # (B, F)
        return features, self.head(features)

    def class_logits(self, similarity: torch.Tensor) -> torch.Tensor:
        """Per-class log-sum-exp of ``similarity / temperature`` over its prototypes: (B, P) -> (B, C).

        This is the log of the mixture likelihood with equal component weights (up to the constant log K),
        so its softmax is the class posterior and its argmax the ID prediction.
        """
        scaled = similarity.float() / self.temperature  # (B, P)
        peak = scaled.amax(dim=1, keepdim=True).detach()  # (B, 1)
        sums = scaled.new_zeros(scaled.shape[0], self.num_classes)
        sums.index_add_(1, self.bank.owners, torch.exp(scaled - peak))
        return torch.log(sums) + peak  # (B, C)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` (B, F), ``embedding`` (B, E), ``prototype_similarity`` (B, P), ``logits`` (B, C)."""
        features, embedding = self.embed(images)
        similarity = embedding @ self.bank.vectors.detach().transpose(0, 1)  # (B, P) cosine
        return {
            "features": features,
            "embedding": embedding,
            "prototype_similarity": similarity,
            "logits": self.class_logits(similarity),
        }

    @torch.no_grad()
    def assign(self, embedding: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Assignment weights (N, P) of embeddings (N, E) to their class's prototypes (Sinkhorn + top-k).

        Under DDP the Sinkhorn marginals are taken over the global batch, as on one device.
        """
        with torch.autocast(embedding.device.type, enabled=False):  # prototype math in float32 under AMP
            similarity = embedding.detach().float() @ self.bank.vectors.transpose(0, 1)  # (N, P)
        return prototype_assignment(
            similarity,
            labels,
            self.bank.owners,
            self.epsilon,
            self.sinkhorn_iterations,
            self.topk,
            distributed=world_size() > 1,
        )

    def update_prototypes(self, embedding: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """EMA step of the bank toward the assignment-weighted means; returns the new prototypes (P, E).

        ``p <- normalize(m p + (1 - m) sum_i w_ip z_i / sum_i w_ip)`` with the sums over the global batch
        (all-reduced under DDP, then applied by the bank's ``ema_update`` identically on every rank); a
        prototype with no weight keeps its vector. The returned tensor has the bank's new values and, like
        the reference code, a gradient path into ``embedding`` through the batch's ``(1 - m)`` share, which
        is what lets the prototype contrastive loss train the network.
        """
        with torch.autocast(embedding.device.type, enabled=False):  # float32 under AMP
            sums = weights.transpose(0, 1).float() @ embedding.float()  # (P, E), differentiable
        mass = weights.sum(dim=0).float()  # (P,)
        world = world_size()
        global_sums = sums.detach()
        if world > 1:  # one all-reduce for the sums and the mass, (P, E + 1)
            packed = all_reduce_sum_(torch.cat([sums.detach(), mass[:, None]], dim=1))
            global_sums, mass = packed[:, :-1], packed[:, -1]
            # value: the global sums; gradient: this rank's share times the world size, since DDP averages
            # the ranks' gradients (so the result matches one device holding the whole batch)
            sums = world * sums + (global_sums - world * sums).detach()
        means = sums / mass.clamp_min(torch.finfo(mass.dtype).tiny)[:, None]  # (P, E); zero where no mass
        old = self.bank.vectors.detach().clone()
        # the global sums are already here: the bank applies them without another collective
        # (bitwise the same reduced values on every rank, so the banks stay identical)
        self.bank.ema_update_from_sums(global_sums, mass, self.momentum, reduce=False)
        local = F.normalize(self.momentum * old + (1 - self.momentum) * means, dim=1)  # (P, E)
        return self.bank.vectors.detach() + (local - local.detach())
