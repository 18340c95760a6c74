"""Mixture-of-experts vision transformers: any timm VisionTransformer with MoE MLPs, and a small ViT.

:func:`to_moe_vit` replaces the MLP of chosen blocks (every other one by default, as ProMoE interleaves)
with :class:`~protolib.nn.moe.MoEMLP`, optionally *upcycled* from the dense MLP's weights. :class:`MoEViT` is
the network the training recipe and ``explain/`` read: logits, features and the routing of every MoE layer.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from protolib.bank import PrototypeBank
from protolib.nn.moe import MoEMLP, PrototypeRouter


def small_vit(
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    patch_size: int = 4,
    embed_dim: int = 96,
    depth: int = 6,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    **options: Any,
) -> VisionTransformer:
    """A timm ViT sized for 16-32 px images: 4 px patches (an 8x8 token grid at 32 px), 96-d, 6 blocks."""
    if image_size % patch_size:
        raise ValueError(f"image_size={image_size} must be a multiple of patch_size={patch_size}")
    return VisionTransformer(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=in_channels,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        **options,
    )


def moe_block_indices(depth: int, blocks: str | Sequence[int]) -> list[int]:
    """Block indices to make MoE: ``"every_other"`` is 1, 3, 5, ... (ProMoE's interleaving), ``"all"``
    every block, or an explicit list (negative indices count from the end)."""
    if blocks == "every_other":
        return list(range(1, depth, 2))
    if blocks == "all":
        return list(range(depth))
    if isinstance(blocks, str):
        raise ValueError(f"moe_blocks={blocks!r}: use 'every_other', 'all' or a list of block indices")
    indices = []
    for index in blocks:
        if not -depth <= int(index) < depth:
            raise ValueError(
                f"MoE block index {index} is out of range: this ViT has {depth} blocks (0..{depth - 1})"
            )
        indices.append(int(index) % depth)
    if len(set(indices)) != len(indices):
        raise ValueError(f"moe_blocks {list(blocks)} names a block twice")
    return sorted(indices)


@torch.no_grad()
def upcycle_(moe: MoEMLP, dense: nn.Module) -> None:
    """Initialise ``moe``'s experts from a dense timm ``Mlp`` (fc1 -> act -> fc2) of hidden width Hd.

    The shared experts take the first ``Hs`` hidden units and every routed expert the next ``H`` ones
    (wrapping round), with the fc2 bias on the shared part: with ``Hs + H = Hd`` (ProMoE's half-width experts)
    or no shared expert and ``H = Hd`` (classic upcycling), a token with gate 1 gets exactly the dense output.
    """
    fc1, fc2 = getattr(dense, "fc1", None), getattr(dense, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)) or fc1.in_features != moe.dim:
        raise ValueError(
            f"upcycling needs a dense fc1 -> act -> fc2 MLP of input width {moe.dim}, "
            f"got {type(dense).__name__}"
        )
    full = fc1.out_features
    if moe.expert_hidden > full or moe.shared_hidden > full:
        raise ValueError(
            f"cannot upcycle experts of width {moe.expert_hidden} (shared {moe.shared_hidden}) from a dense "
            f"MLP of width {full}: use expert_hidden and shared width <= {full}"
        )
    shared = moe.shared_hidden
    if moe.shared is not None:
        moe.shared.fc1.weight.copy_(fc1.weight[:shared])
        moe.shared.fc1.bias.copy_(fc1.bias[:shared])
        moe.shared.fc2.weight.copy_(fc2.weight[:, :shared])
        moe.shared.fc2.bias.copy_(fc2.bias)
    units = (shared + torch.arange(moe.expert_hidden)) % full  # (H,) the dense hidden units of every expert
    moe.w1.copy_(fc1.weight[units].T.expand_as(moe.w1))
    moe.b1.copy_(fc1.bias[units].expand_as(moe.b1))
    moe.w2.copy_(fc2.weight[:, units].T.expand_as(moe.w2))
    moe.b2.copy_((torch.zeros_like(fc2.bias) if moe.shared is not None else fc2.bias).expand_as(moe.b2))


def to_moe_vit(
    vit: nn.Module,
    moe: Callable[..., MoEMLP],
    blocks: str | Sequence[int] = "every_other",
    upcycle: bool = False,
) -> list[int]:
    """Replace the MLP of ``blocks`` of a timm VisionTransformer by ``moe(dim=embed_dim)``, in place.

    Returns the indices of the MoE blocks. ``upcycle`` initialises the experts from the replaced MLP.
    """
    if not isinstance(vit, VisionTransformer):
        raise ValueError(
            f"to_moe_vit needs a timm VisionTransformer (e.g. timm.create_model('vit_small_patch16_224')), "
            f"got {type(vit).__name__}"
        )
    indices = moe_block_indices(len(vit.blocks), blocks)
    for index in indices:
        block = vit.blocks[index]
        layer = moe(dim=vit.embed_dim)
        if upcycle:
            upcycle_(layer, block.mlp)
        block.mlp = layer
    return indices


class MoEViT(nn.Module):
    """A ViT classifier whose chosen blocks are MoE; follows the extract contract with routing outputs.

    ``backbone`` is ``"small_vit"`` (options: :func:`small_vit`'s) or a timm ViT name (created with
    ``img_size=image_size``). ``moe`` builds one MoE MLP per MoE block (``None`` or ``moe_blocks=[]``: the
    dense ViT, the same network without experts). ``explain_layer`` picks the MoE layer (position among the
    MoE blocks, -1 = last) whose routing prototypes are ``prototype_bank`` and the explanations show.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 32,
        backbone: str = "small_vit",
        pretrained: bool = False,
        backbone_options: dict[str, Any] | None = None,
        moe: Callable[..., MoEMLP] | None = None,
        moe_blocks: str | Sequence[int] = "every_other",
        upcycle: bool = False,
        explain_layer: int = -1,
    ) -> None:
        super().__init__()
        options = dict(backbone_options or {})
        if backbone == "small_vit":
            self.vit = small_vit(num_classes, in_channels, image_size, **options)
        else:
            self.vit = timm.create_model(
                backbone,
                pretrained=pretrained,
                num_classes=num_classes,
                in_chans=in_channels,
                img_size=image_size,
                **options,
            )
        self.num_classes = num_classes
        self.moe_blocks = [] if moe is None else to_moe_vit(self.vit, moe, moe_blocks, upcycle)
        if self.moe_blocks and not -len(self.moe_blocks) <= explain_layer < len(self.moe_blocks):
            raise ValueError(
                f"explain_layer={explain_layer} is out of range for {len(self.moe_blocks)} MoE layers"
            )
        self.explain_layer = explain_layer

    @property
    def moe_layers(self) -> list[MoEMLP]:
        """The MoE MLPs, in block order."""
        return [self.vit.blocks[i].mlp for i in self.moe_blocks]

    @property
    def last_layer(self) -> nn.Module:
        return self.vit.head

    @property
    def explained(self) -> MoEMLP | None:
        """The MoE layer whose routing is explained (None for the dense ViT)."""
        return self.moe_layers[self.explain_layer] if self.moe_blocks else None

    @property
    def prototype_bank(self) -> PrototypeBank | None:
        """The explained layer's routing prototypes (owner = expert); None without a prototype router."""
        layer = self.explained
        return layer.router.bank if layer is not None and isinstance(layer.router, PrototypeRouter) else None

    @property
    def grid_size(self) -> tuple[int, int]:
        """(rows, cols) of the patch-token grid."""
        rows, cols = self.vit.patch_embed.grid_size
        return int(rows), int(cols)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extract(images)["logits"]

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits (B, C), features (B, F) and, with MoE layers, the routing of the patch tokens:

        ``expert_index`` / ``expert_gate`` (B, L, Np) top-1 expert and its gate in each of the L MoE layers,
        ``routing_scores`` (B, Np, E) and ``patch_tokens`` (B, Np, D) of the explained layer,
        ``prototype_similarity`` (B, E) the best patch's score per routing prototype (prototype router), and
        ``loss_<name>`` (0-dim) every weighted auxiliary MoE loss summed over the layers.
        """
        tokens = self.vit.forward_features(images)  # (B, T, D)
        features = self.vit.forward_head(tokens, pre_logits=True)  # (B, F)
        out = {"logits": self.vit.head(features), "features": features}
        if not self.moe_blocks:
            return out
        b, t = tokens.shape[:2]
        prefix = self.vit.num_prefix_tokens
        routings = [layer.routing for layer in self.moe_layers]
        out["expert_index"] = torch.stack([r.experts[:, 0].view(b, t)[:, prefix:] for r in routings], 1)
        out["expert_gate"] = torch.stack([r.gates[:, 0].view(b, t)[:, prefix:] for r in routings], 1)
        explained = routings[self.explain_layer]
        scores = explained.scores.view(b, t, -1)[:, prefix:]  # (B, Np, E)
        out["routing_scores"] = scores
        out["patch_tokens"] = explained.inputs.view(b, t, -1)[:, prefix:]
        if self.prototype_bank is not None:
            out["prototype_similarity"] = scores.max(dim=1).values
        for routing in routings:
            for name, value in routing.losses.items():
                key = f"loss_{name}"
                out[key] = out[key] + value if key in out else value
        return out
