"""ProtoTree (Nauta et al., CVPR 2021; code github.com/M-Nauta/ProtoTree): a soft decision tree of prototypes.

Backbone -> add-on (1x1 conv to D channels, sigmoid) -> one D x 1 x 1 prototype per internal node, held in a
:class:`PrototypeBank` -> routing by ``exp(-distance)`` of each prototype's nearest patch -> leaves' class
distributions (see :mod:`protolib.nn.tree`). The network also carries the two operations that change the
tree outside gradient descent: ``prune`` (drop uninformative subtrees) and ``push`` (project every prototype
onto its nearest training patch through the bank's batched reverse search, recording provenance).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from protolib.bank import PrototypeBank
from protolib.models.protopnet import check_push_loader, fetch_images, high_activation_boxes, upsample_maps
from protolib.nn.backbones import build_backbone
from protolib.nn.prototype_layer import PrototypeActivations, PrototypeLayer
from protolib.nn.receptive_field import ReceptiveField, receptive_field
from protolib.nn.tree import ExpL2Similarity, PrototypeTree, TreeOutput
from protolib.utils.modes import evaluating

PUSH_CONSTRAINTS = ("subtree", "none")


@dataclass
class ProtoTreeOutput:
    """One forward pass: the tree's routing and prediction, and the prototype activations behind them."""

    route: TreeOutput  # probabilities (B, C), path_probabilities (B, L), leaves (B,) when deterministic
    embeddings: torch.Tensor  # (B, D, h, w) add-on output
    activations: PrototypeActivations  # distances (B, K, h, w) (L2, not squared), min_distances (B, K)

    @property
    def similarities(self) -> torch.Tensor:
        """(B, K) probability of going right at every internal node: ``exp(-min distance)``."""
        return self.activations.similarities

    @property
    def similarity_maps(self) -> torch.Tensor:
        """(B, K, h, w) ``exp(-distance)`` of every patch to every node's prototype."""
        return self.activations.similarity_maps

    @property
    def logits(self) -> torch.Tensor:
        """(B, C) log of the predicted class distribution (its softmax is the distribution itself)."""
        probabilities = self.route.probabilities
        return probabilities.clamp_min(torch.finfo(probabilities.dtype).tiny).log()


@dataclass
class TreePushReport:
    """Outcome of one push: how far prototypes moved, and how many share a patch."""

    distances: torch.Tensor  # (K,) prototype -> chosen patch squared distance before projection
    duplicates: torch.Tensor  # (1,) prototypes pushed onto a patch another prototype already took
    seconds: float


class ProtoTree(nn.Module):
    """A complete binary tree of ``depth`` decisions (2^depth - 1 prototypes, 2^depth leaves) on a backbone.

    Args:
        num_classes: C.
        in_channels, image_size: input images (the receptive field of feature locations depends on both).
        backbone, pretrained: ``build_backbone`` name and whether to load its (timm) weights.
        depth: decisions from root to leaf (paper: 9 on CUB, 11 on Cars).
        prototype_dim: D, the add-on's output channels (paper: 256).
        block: backbone modules (dotted paths) put in their own ``block`` group, trained from the first
            epoch at the add-on's rate (the reference: ``layer4.2`` of ResNet50); the rest is ``backbone``.
        push_constraint: ``subtree`` (the reference's training script: a node's patch comes from an image of
            a class that some leaf below it predicts) or ``none`` (nearest patch of any training image).
        bank: builds the prototype bank (``conf/bank``); called with ``metric="l2", learnable=True``.
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "resnet50",
        pretrained: bool = False,
        depth: int = 9,
        prototype_dim: int = 256,
        block: Sequence[str] = (),
        push_constraint: str = "subtree",
        bank: Callable[..., PrototypeBank] = PrototypeBank,
    ) -> None:
        super().__init__()
        if prototype_dim < 1:
            raise ValueError(f"prototype_dim must be >= 1, got {prototype_dim}")
        if push_constraint not in PUSH_CONSTRAINTS:
            raise ValueError(f"push_constraint {push_constraint!r} is unknown: use one of {PUSH_CONSTRAINTS}")
        self.num_classes = num_classes
        self.prototype_dim = prototype_dim
        self.image_size = image_size
        self.push_constraint = push_constraint
        self.block = tuple(block)
        self.backbone = build_backbone(backbone, pretrained=pretrained, in_chans=in_channels)
        names = [name for name, _ in self.backbone.named_parameters()]
        unmatched = [prefix for prefix in self.block if not any(self._in_block(n, (prefix,)) for n in names)]
        if unmatched:
            raise ValueError(
                f"block prefixes {unmatched} match no parameter of backbone {backbone!r} (its parameters "
                f"start {sorted({n.rsplit('.', 2)[0] for n in names})[:8]}...)"
            )
        self.receptive_field: ReceptiveField = receptive_field(self.backbone, image_size, in_channels)
        self.add_on = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels, prototype_dim, kernel_size=1, bias=False), nn.Sigmoid()
        )
        nn.init.xavier_normal_(self.add_on[0].weight, gain=nn.init.calculate_gain("sigmoid"))
        self.tree = PrototypeTree(depth, num_classes)
        k = self.tree.num_prototypes
        # Owner of a prototype: its internal node (prototypes serve every class).
        prototypes = bank(
            num_prototypes=k,
            dim=prototype_dim,
            owners=self.tree.prototype_nodes.clone(),
            metric="l2",
            learnable=True,
        )
        with torch.no_grad():
            prototypes.vectors.normal_(0.5, 0.1)  # the reference's init, inside the sigmoid's range
        self.prototype_layer = PrototypeLayer(prototypes, ExpL2Similarity())
        # Per prototype: class of the image it was pushed from, and its high-activation box there; -1 before.
        self.register_buffer("source_label", torch.full((k,), -1, dtype=torch.long))
        self.register_buffer("activation_box", torch.full((k, 4), -1, dtype=torch.long))
        # Bumped by every push and prune, so that pictures can be re-rendered when the tree changes.
        self.register_buffer("revision", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(self._resize_for_state)

    # ------------------------------------------------------------------ structure and contract
    @property
    def bank(self) -> PrototypeBank:
        return self.prototype_layer.bank

    @property
    def prototype_bank(self) -> PrototypeBank:
        """The bank, under the name the explanation / OOD contract reads."""
        return self.prototype_layer.bank

    @property
    def last_layer(self) -> None:
        """No linear layer maps features to logits: the tree does."""
        return None

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """Named parts with their own learning rate: backbone, block (if configured), add_on, prototypes.
        The leaves are buffers, updated without gradients."""
        backbone, block = [], []
        for name, param in self.backbone.named_parameters():
            (block if self._in_block(name, self.block) else backbone).append(param)
        groups = {"backbone": backbone, "block": block, "add_on": list(self.add_on.parameters())}
        groups["prototypes"] = [self.bank.vectors]
        return {name: params for name, params in groups.items() if params}

    @staticmethod
    def _in_block(name: str, block: Sequence[str]) -> bool:
        """Whether parameter ``name`` lies in one of the modules named by ``block`` (a dotted path such as
        ``layer4.2`` anywhere in the name, as the reference's ``'layer4.2' in name``)."""
        return any(f".{prefix}." in f".{name}" for prefix in block)

    def _resize_for_state(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """Checkpoints written after pruning hold fewer prototypes: resize per-prototype buffers first (the
        bank and the tree resize themselves)."""
        for name in ("source_label", "activation_box"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))

    # ------------------------------------------------------------------ forward
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> prototype-space feature map (B, D, h, w)."""
        return self.add_on(self.backbone(images))

    def forward(self, images: torch.Tensor, strategy: str = "soft") -> ProtoTreeOutput:
        """Route a batch: ``soft`` (training, the paper's default), ``greedy`` or ``max_path``."""
        embeddings = self.embed(images)  # (B, D, h, w)
        activations = self.prototype_layer(embeddings)
        return ProtoTreeOutput(self.tree(activations.similarities, strategy), embeddings, activations)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The contract ``explain`` and the OOD suite read: ``logits`` = log of the soft prediction (B, C),
        ``features`` = ``prototype_similarity`` (B, K) (the tree's input), ``min_distances`` (B, K), and
        ``path_probabilities`` (B, L) / ``probabilities`` (B, C) for the leaf update."""
        output = self(images)
        return {
            "logits": output.logits,
            "features": output.similarities,
            "prototype_similarity": output.similarities,
            "min_distances": output.activations.min_distances,
            "path_probabilities": output.route.path_probabilities,
            "probabilities": output.route.probabilities,
        }

    def provenance(self) -> dict[str, torch.Tensor]:
        """Where every node's prototype comes from: owner (K,) the class of its source image, source_sample
        (K,), location (K, 2), rf_box and activation_box (K, 4) x0, y0, x1, y1, score (K,) squared distance
        at push time, step (K,), node (K,) its node in the tree; -1 / NaN before any push."""
        metadata = self.bank.metadata
        return {
            "owner": self.source_label,
            **metadata,
            "activation_box": self.activation_box,
            "node": self.tree.prototype_nodes,
        }

    def paired_similarity_maps(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Similarity map (N, h, w) of prototype ``ids[i]`` on ``images[i]`` (N, C, H, W)."""
        embeddings = self.embed(images)  # (N, D, h, w)
        prototypes = self.bank.vectors[ids.to(self.bank.vectors.device)]  # (N, D)
        similarity = self.prototype_layer.similarity
        distances = similarity.distances(embeddings, prototypes)  # (N, N, h, w)
        own = torch.arange(len(ids), device=distances.device)
        return similarity.similarity(distances[own, own])  # (N, h, w)

    # ------------------------------------------------------------------ prune and push
    @torch.no_grad()
    def prune(self, threshold: float = 0.01) -> torch.Tensor:
        """Remove the subtrees whose leaves all have a largest class probability <= ``threshold`` (paper:
        0.01), each with its parent; returns the removed prototypes' former ids."""
        kept, _ = self.tree.prune(threshold)  # old prototype ids, in the new (pre-order) order
        device = self.bank.vectors.device
        removed = torch.ones(self.bank.num_prototypes, dtype=torch.bool)
        removed[kept] = False
        removed = removed.nonzero().flatten()
        if len(removed) == 0:
            return removed
        survivors = self.bank.remove(removed.to(self.bank.owners.device), allow_empty_owners=True)
        if not torch.equal(survivors.cpu(), kept):  # pre-order keeps the survivors' relative order
            raise RuntimeError("pruning reordered the prototypes; the tree and the bank disagree")
        self.bank.owners.copy_(self.tree.prototype_nodes.to(self.bank.owners.device))
        self.source_label = self.source_label[kept.to(device)]
        self.activation_box = self.activation_box[kept.to(device)]
        self.revision += 1
        return removed

    def allowed_classes(self) -> torch.Tensor:
        """(K, C) bool: the classes whose images a node's prototype may be pushed onto. ``subtree``: the
        classes predicted (argmax) by the leaves below the node, as the reference's training script."""
        k, c = self.tree.num_prototypes, self.num_classes
        if self.push_constraint == "none":
            return torch.ones(k, c, dtype=torch.bool)
        predicted = self.tree.leaf_distributions().argmax(dim=1).cpu()  # (L,)
        children, node_leaf = self.tree.node_children.cpu(), self.tree.node_leaf.cpu()
        below = torch.zeros(self.tree.num_nodes, c, dtype=torch.bool)
        for node in reversed(range(self.tree.num_nodes)):  # children after their parent in pre-order
            if children[node, 0] < 0:
                below[node, predicted[node_leaf[node]]] = True
            else:
                below[node] = below[children[node, 0]] | below[children[node, 1]]
        return below[self.tree.prototype_nodes.cpu()]

    def _embed_batches(self, loader: DataLoader) -> Iterator[tuple[torch.Tensor, ...]]:
        device = self.bank.vectors.device
        for batch in loader:
            yield self.embed(batch["image"].to(device)), batch["label"].to(device), batch["index"].to(device)

    @torch.no_grad()
    def push(self, loader: DataLoader, step: int | None = None, percentile: float = 95.0) -> TreePushReport:
        """Replace every node's prototype by its nearest training patch (of an allowed class, see
        :meth:`allowed_classes`), through one batched reverse search of the bank; records provenance."""
        check_push_loader(loader)
        with evaluating(self):
            start = time.perf_counter()
            allowed = self.allowed_classes().to(self.bank.vectors.device)
            result = self.bank.nearest_per_prototype(self._embed_batches(loader), allowed=allowed)
            rf_boxes = self.receptive_field.boxes(result.locations.cpu())
            self.bank.project(result, rf_boxes=rf_boxes, step=step)
            dataset = loader.dataset
            labels = [int(dataset[int(i)]["label"]) for i in result.sample_ids.tolist()]
            self.source_label.copy_(torch.tensor(labels))
            self.activation_box.copy_(self._activation_boxes(dataset, percentile))
            self.revision += 1
        keys = torch.stack([self.bank.source_sample, self.bank.location[:, 0], self.bank.location[:, 1]], 1)
        duplicates = torch.tensor([len(keys) - len(torch.unique(keys, dim=0))])
        return TreePushReport(result.distances.cpu(), duplicates, time.perf_counter() - start)

    def _activation_boxes(self, dataset: Dataset, percentile: float, chunk: int = 64) -> torch.Tensor:
        """(K, 4) high-activation box of every prototype on its (just recorded) source image."""
        device = self.bank.vectors.device
        sources = self.bank.source_sample.cpu()
        boxes = []
        for ids in torch.arange(len(sources)).split(chunk):
            images = fetch_images(dataset, sources[ids].tolist()).to(device)
            maps = upsample_maps(self.paired_similarity_maps(images, ids), tuple(images.shape[-2:]))
            boxes.append(high_activation_boxes(maps, percentile).to(self.activation_box.device))
        return torch.cat(boxes)

    @torch.no_grad()
    def explain_path(self, image: torch.Tensor, strategy: str = "greedy") -> list[dict[str, Any]]:
        """The decisions one image (C, H, W) takes down the tree (ProtoTree's local explanation): for every
        node on its ``greedy`` (or ``max_path``) path, the prototype, its similarity, whether the prototype
        counts as present (``s > 0.5``: go right), and the location of its nearest patch."""
        with evaluating(self):
            output = self(image[None], strategy)
        leaf_node = int(self.tree.leaf_nodes[output.route.leaves[0]])
        path = self.tree.path_to(leaf_node)
        distances = output.activations.distances[0]  # (K, h, w)
        w = distances.shape[-1]
        steps = []
        for node, child in itertools.pairwise(path):
            p = int(self.tree.node_prototype[node])
            where = int(distances[p].flatten().argmin())
            steps.append(
                {
                    "node": node,
                    "prototype": p,
                    "similarity": float(output.similarities[0, p]),
                    "present": child == int(self.tree.node_children[node, 1]),
                    "location": (where // w, where % w),
                }
            )
        probabilities = output.route.probabilities[0]
        steps.append({"node": leaf_node, "leaf": int(output.route.leaves[0]), "distribution": probabilities})
        return steps
