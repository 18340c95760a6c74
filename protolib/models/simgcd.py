"""SimGCD's network (Wen et al., ICCV 2023): backbone, DINO projection head, cosine prototype classifier.

The classifier is the reference ``DINOHead.last_layer``: a weight-normalised linear layer with the gain fixed
to 1 on L2-normalised backbone features, i.e. the cosine between a feature and each of K prototypes. The
prototypes are the rows of a learnable cosine :class:`~protolib.bank.PrototypeBank` (owner = cluster id), so
the clusters are searchable (galleries, nearest images) like every other family's prototypes.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank import PrototypeBank
from protolib.nn.backbones import build_backbone


class DINOHead(nn.Module):
    """DINO's projection MLP (Linear-GELU x (nlayers-1), Linear to the bottleneck), truncated-normal init."""

    def __init__(
        self, in_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, nlayers: int = 3
    ) -> None:
        super().__init__()
        if nlayers < 1:
            raise ValueError(f"nlayers must be >= 1, got {nlayers}")
        dims = [in_dim] + [hidden_dim] * (nlayers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(itertools.pairwise(dims)):
            layers.append(nn.Linear(a, b))
            if i < nlayers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.mlp(features)  # (B, bottleneck_dim)


class TimmPooled(nn.Module):
    """A timm model's pooled output (a ViT's class token), with only its last ``trainable_blocks`` trained."""

    def __init__(self, name: str, pretrained: bool, in_chans: int, trainable_blocks: int | None) -> None:
        super().__init__()
        import timm

        self.body = timm.create_model(name, pretrained=pretrained, num_classes=0, in_chans=in_chans)
        self.out_channels = int(self.body.num_features)
        blocks = getattr(self.body, "blocks", None)
        if trainable_blocks is not None:
            if blocks is None:
                raise ValueError(f"trainable_blocks needs a ViT-style backbone with .blocks; {name} has none")
            self.body.requires_grad_(False)
            first = len(blocks) - trainable_blocks
            for block in list(blocks)[first:]:  # the reference's grad_from_block = 12 - trainable_blocks;
                block.requires_grad_(True)  # like it, the final norm stays frozen

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images)  # (B, F)


class SimGCDNet(nn.Module):
    """Backbone features (B, F) -> DINO head projection (B, E) and cosine logits / temperature (B, K).

    ``num_classes`` is K, the number of clusters (known + new classes): the bank's prototypes, learned by
    gradient or, with ``learnable_prototypes=False``, set by an E-step (GPC, whose split / merge then
    change K from this start). Backbones: ``small_cnn``,
    ``cifar_resnet*`` (pooled), or a timm name; ``trainable_blocks`` (timm ViTs) freezes all but the last
    blocks, as SimGCD fine-tunes only block 11 of DINO ViT-B/16; ``backbone_options`` go to ``small_cnn``
    (e.g. ``{width: 16}``); ``feature_norm="layernorm"`` ends the backbone with a LayerNorm (signed features).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        backbone: str = "small_cnn",
        pretrained: bool = False,
        trainable_blocks: int | None = None,
        backbone_options: dict[str, int] | None = None,
        head_hidden_dim: int = 2048,
        head_bottleneck_dim: int = 256,
        head_layers: int = 3,
        temperature: float = 0.1,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        learnable_prototypes: bool = True,
        feature_norm: str | None = None,
    ) -> None:
        super().__init__()
        if feature_norm not in (None, "layernorm"):
            raise ValueError(f"model.net.feature_norm must be null or 'layernorm', got {feature_norm!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes (K, the number of clusters) must be >= 2, got {num_classes}")
        if temperature <= 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if backbone == "small_cnn" or backbone.startswith("cifar_resnet"):
            self.backbone = build_backbone(
                backbone, pretrained=pretrained, in_chans=in_channels, pooled=True, **(backbone_options or {})
            )
        else:
            self.backbone = TimmPooled(backbone, pretrained, in_channels, trainable_blocks)
        dim = self.backbone.out_channels
        # Pooled ReLU maps are >= 0, so their cosines to each other are too: K prototypes spread on the sphere
        # (the separation regulariser makes a simplex) cannot all be nearest to some feature. A final
        # LayerNorm, as on a ViT's class token, makes them signed ("layernorm"; CNNs trained from scratch).
        self.feature_norm = nn.LayerNorm(dim) if feature_norm == "layernorm" else nn.Identity()
        self.head = DINOHead(dim, head_hidden_dim, head_bottleneck_dim, head_layers)
        self.bank = bank(num_prototypes=num_classes, dim=dim, metric="cosine", learnable=learnable_prototypes)
        with torch.no_grad():  # nn.Linear's default init, as the reference's weight-normed layer
            bound = 1.0 / dim**0.5
            self.bank.vectors.uniform_(-bound, bound)
        self.num_classes = num_classes
        self.temperature = temperature

    @property
    def prototype_bank(self) -> PrototypeBank:
        return self.bank

    @property
    def last_layer(self) -> None:
        return None  # logits are cosines to the bank's prototypes, not a linear layer of the features

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """``features`` (B, F), ``projection`` (B, E), ``prototype_similarity`` cosines (B, K), ``logits``."""
        features = self.feature_norm(self.backbone(images))  # (B, F)
        cosine = F.normalize(features, dim=-1) @ F.normalize(self.bank.vectors, dim=-1).T  # (B, K)
        return {
            "features": features,
            "projection": self.head(features),
            "prototype_similarity": cosine,
            "logits": cosine / self.temperature,
        }
