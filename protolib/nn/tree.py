"""A soft binary decision tree over prototype similarities: ProtoTree's routing, leaves and pruning.

ProtoTree (Nauta et al., CVPR 2021) puts one prototype in every internal node. An image goes right at a node
with probability ``s = exp(-d)``, ``d`` the L2 distance of the prototype's nearest patch, left with ``1 - s``;
the probability of reaching a leaf is the product along its path, and the prediction mixes the leaves' class
distributions ``softmax(c)`` by those probabilities. Leaves are not trained by gradient: ``c`` is updated from
each batch in closed form (the paper's derivative-free update). Deterministic routes (greedy, max path) turn
the soft tree into a hard one, and pruning drops subtrees whose leaves are all uninformative.

The structure is kept in tensors (buffers), so checkpoints carry pruned trees and every batch is routed
with one gather and one product, whatever the shape of the tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank import distributed
from protolib.nn.similarity import L2Similarity

STRATEGIES = ("soft", "greedy", "max_path")


class ExpL2Similarity(L2Similarity):
    """ProtoTree's routing similarity ``exp(-||z - p||)`` (the L2 distance, not its square).

    The distance is ``sqrt(d^2 + 1e-14)`` as in the reference's ``L2Conv2D``, which keeps its gradient finite
    at a pushed prototype (``d = 0``). The bank searches with squared L2, which has the same nearest patch.
    """

    def __init__(self, epsilon: float = 1e-14) -> None:
        super().__init__(activation="linear", epsilon=epsilon)

    def distances(self, features: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
        """(B, D, H, W), (P, D) -> L2 distances (B, P, H, W)."""
        return (super().distances(features, prototypes) + self.epsilon).sqrt()

    def similarity(self, distances: torch.Tensor) -> torch.Tensor:
        """Distances -> routing probabilities ``exp(-d)`` in (0, 1]."""
        return torch.exp(-distances)

    def extra_repr(self) -> str:
        return f"exp(-sqrt(d^2 + {self.epsilon}))"


@dataclass
class TreeOutput:
    """One routing of a batch through the tree."""

    probabilities: torch.Tensor  # (B, C) predicted class distribution (soft: mixture of the leaves)
    path_probabilities: torch.Tensor  # (B, L) probability of reaching every leaf (soft routing)
    leaves: torch.Tensor | None = None  # (B,) the leaf a deterministic strategy chose; None for soft


def complete_children(depth: int) -> torch.Tensor:
    """Children (N, 2) ``(left, right)`` of a complete tree of ``depth`` levels of decisions, nodes numbered
    in pre-order (root 0, then the left subtree, then the right), -1 for the leaves' children."""
    if depth < 1:
        raise ValueError(f"a ProtoTree needs depth >= 1 (one decision at least), got {depth}")
    children: list[list[int]] = []

    def build(level: int) -> int:
        node = len(children)
        children.append([-1, -1])
        if level < depth:
            left = build(level + 1)
            children[node] = [left, build(level + 1)]
        return node

    build(0)
    return torch.tensor(children, dtype=torch.long)


class PrototypeTree(nn.Module):
    """Structure, leaf parameters and routing of a soft binary prototype tree.

    Nodes are numbered in pre-order; ``node_children`` (N, 2) holds each node's (left, right) child or -1 for
    leaves. Internal nodes use prototypes ``0..K-1`` and leaves distributions ``0..L-1``, both in pre-order.
    ``leaf_logits`` (L, C) is the paper's ``c``; the leaf distributions are ``softmax(c)``, uniform at the
    start (``c = 0``, as the reference). The right child is taken with the similarity ``s``, the left with
    ``1 - s``.
    """

    node_children: torch.Tensor  # (N, 2)
    leaf_logits: torch.Tensor  # (L, C)

    def __init__(self, depth: int, num_classes: int) -> None:
        super().__init__()
        if num_classes < 2:
            raise ValueError(f"a tree classifier needs num_classes >= 2, got {num_classes}")
        self.num_classes = num_classes
        self.register_buffer("node_children", complete_children(depth))
        self.register_buffer("leaf_logits", torch.zeros(2**depth, num_classes))
        self._index()

    # ------------------------------------------------------------------ structure
    def _index(self) -> None:
        """Derive prototype / leaf ids and the leaves' paths from ``node_children`` (after init, prune, load).

        The derived tensors are non-persistent buffers: they follow the module's device, not its checkpoint.
        """
        children = self.node_children.cpu()
        internal = children[:, 0] >= 0
        if ((children[:, 0] >= 0) != (children[:, 1] >= 0)).any() or not internal[0]:
            raise ValueError(
                "children must describe a binary tree: the root and every internal node need two"
            )
        node_prototype = torch.where(internal, internal.long().cumsum(0) - 1, -1)  # (N,)
        node_leaf = torch.where(~internal, (~internal).long().cumsum(0) - 1, -1)  # (N,)
        k = int(internal.sum())
        parent = torch.full((len(children),), -1, dtype=torch.long)
        paths: list[list[tuple[int, int]]] = []  # per leaf, in pre-order: (node, 0 left / 1 right)
        stack: list[tuple[int, list[tuple[int, int]]]] = [(0, [])]
        visited: list[int] = []
        while stack:
            node, path = stack.pop()
            visited.append(node)
            if not internal[node]:
                paths.append(path)
                continue
            left, right = children[node].tolist()
            parent[left] = parent[right] = node
            stack += [(right, [*path, (node, 1)]), (left, [*path, (node, 0)])]  # left popped first
        if visited != list(range(len(children))):
            raise ValueError(
                "children must number the nodes of one tree in pre-order (root 0, left subtree first)"
            )
        # Index into the factor table [1 - s (K), s (K), 1]: prototype + K * direction, or 2K to pad.
        table = torch.full((len(paths), max(map(len, paths))), 2 * k, dtype=torch.long)
        for leaf, path in enumerate(paths):
            for step, (node, direction) in enumerate(path):
                table[leaf, step] = int(node_prototype[node]) + k * direction
        device = self.node_children.device
        derived = {
            "node_prototype": node_prototype,  # (N,) prototype of each internal node, -1 for leaves
            "node_leaf": node_leaf,  # (N,) leaf id of each leaf, -1 for internal nodes
            "parent": parent,  # (N,) -1 for the root
            "leaf_paths": table,  # (L, T) factor-table index of every decision on a leaf's path
            "leaf_nodes": (~internal).nonzero().flatten(),  # (L,) node id of every leaf
            "prototype_nodes": internal.nonzero().flatten(),  # (K,) node id of every prototype
        }
        for name, tensor in derived.items():
            self.register_buffer(name, tensor.to(device), persistent=False)

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # A pruned tree is smaller than a fresh one: take the saved shapes, then re-derive the index.
        for name in ("node_children", "leaf_logits"):
            saved = state_dict.get(prefix + name)
            if saved is not None and saved.shape != getattr(self, name).shape:
                setattr(self, name, torch.empty_like(saved, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._index()

    @property
    def num_nodes(self) -> int:
        return self.node_children.shape[0]

    @property
    def num_prototypes(self) -> int:
        """K, the internal (decision) nodes, one prototype each."""
        return self.prototype_nodes.numel()

    @property
    def num_leaves(self) -> int:
        return self.leaf_nodes.numel()

    @property
    def depth(self) -> int:
        """Decisions on the longest root-to-leaf path."""
        return self.leaf_paths.shape[1]

    def path_to(self, node: int) -> list[int]:
        """Node ids from the root to ``node`` (inclusive)."""
        path = [int(node)]
        while int(self.parent[path[0]]) >= 0:
            path.insert(0, int(self.parent[path[0]]))
        return path

    def leaf_distributions(self) -> torch.Tensor:
        """(L, C) class distribution of every leaf, ``softmax(c)``."""
        return F.softmax(self.leaf_logits, dim=1)

    # ------------------------------------------------------------------ routing
    def _check(self, similarities: torch.Tensor) -> None:
        if similarities.dim() != 2 or similarities.shape[1] != self.num_prototypes:
            raise ValueError(
                f"tree routing expects similarities (B, {self.num_prototypes}) for its {self.num_prototypes} "
                f"internal nodes, got {tuple(similarities.shape)}"
            )

    def _path_product(self, left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
        """(B, L) product over each leaf's path of ``left`` or ``right`` (B, K) factors of its decisions."""
        ones = torch.ones_like(left[:, :1])
        factors = torch.cat([left, right, ones], dim=1)  # (B, 2K + 1)
        return factors[:, self.leaf_paths].prod(dim=2)  # (B, L, T) -> (B, L)

    def path_probabilities(self, similarities: torch.Tensor) -> torch.Tensor:
        """(B, K) probabilities of going right -> (B, L) probabilities of reaching the leaves (sum to 1)."""
        self._check(similarities)
        return self._path_product(1 - similarities, similarities)

    def greedy_leaves(self, similarities: torch.Tensor) -> torch.Tensor:
        """(B,) leaf reached by taking, at every node, the more probable child (right when ``s > 0.5``)."""
        self._check(similarities)
        right = (similarities > 0.5).to(similarities.dtype)
        return self._path_product(1 - right, right).argmax(dim=1)

    def forward(self, similarities: torch.Tensor, strategy: str = "soft") -> TreeOutput:
        """Route (B, K) similarities: ``soft`` mixes all leaves; ``greedy`` and ``max_path`` (the leaf with
        the largest path probability, the reference's "sample_max") output one leaf's distribution."""
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown routing strategy {strategy!r}; choose one of {STRATEGIES}")
        path = self.path_probabilities(similarities)  # (B, L)
        leaves = self.leaf_distributions().to(path.dtype)  # (L, C)
        if strategy == "soft":
            return TreeOutput(path @ leaves, path)
        chosen = self.greedy_leaves(similarities) if strategy == "greedy" else path.argmax(dim=1)
        return TreeOutput(leaves[chosen], path, chosen)

    # ------------------------------------------------------------------ derivative-free leaves
    @torch.no_grad()
    def leaf_update(
        self, path_probabilities: torch.Tensor, probabilities: torch.Tensor, labels: torch.Tensor
    ) -> torch.Tensor:
        """The paper's closed-form leaf step for one batch: (L, C) ``sum_x softmax(c) * y * pi / y_hat``.

        ``path_probabilities`` (B, L) and ``probabilities`` (B, C) are the soft routing of the batch,
        ``labels`` (B,); summed over all ranks under DDP, so every rank's leaves stay identical.
        """
        dtype = self.leaf_logits.dtype  # full precision even under autocast
        probabilities, path_probabilities = probabilities.to(dtype), path_probabilities.to(dtype)
        target = F.one_hot(labels.long(), self.num_classes).to(dtype)  # (B, C)
        ratio = target / probabilities.clamp_min(torch.finfo(dtype).tiny)  # (B, C)
        update = self.leaf_distributions() * (path_probabilities.T @ ratio)  # (L, C)
        return distributed.all_reduce_sum_(update)

    @torch.no_grad()
    def apply_leaf_update(self, update: torch.Tensor, epoch_start: torch.Tensor, batches: int) -> None:
        """``c <- relu(c - c_epoch_start / batches) + update``: the reference's smoothing, which replaces last
        epoch's accumulated values by this epoch's over the ``batches`` steps of an epoch."""
        if batches < 1:
            raise ValueError(f"leaf update needs the number of batches per epoch (>= 1), got {batches}")
        self.leaf_logits.sub_(epoch_start / batches).clamp_min_(0).add_(update)

    # ------------------------------------------------------------------ pruning
    def uninformative_nodes(self, threshold: float) -> torch.Tensor:
        """(N,) bool: nodes all of whose leaves have a largest class probability <= ``threshold``."""
        top = self.leaf_distributions().max(dim=1).values <= threshold  # (L,)
        flags = torch.zeros(self.num_nodes, dtype=torch.bool)
        children = self.node_children.cpu()
        for node in reversed(range(self.num_nodes)):  # children come after their parent in pre-order
            if children[node, 0] < 0:
                flags[node] = bool(top[int(self.node_leaf[node])])
            else:
                flags[node] = bool(flags[children[node, 0]] and flags[children[node, 1]])
        return flags

    @torch.no_grad()
    def prune(self, threshold: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove every uninformative subtree (all leaves' largest probability <= ``threshold``; paper:
        0.01) together with its parent, whose other child takes the parent's place, as the reference does;
        the root's own children are never removed. Returns the kept prototype ids and leaf ids (old numbering,
        in the new order) so that owners of per-prototype state can follow."""
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"pruning threshold must be a probability in [0, 1], got {threshold}")
        flags = self.uninformative_nodes(threshold)
        children = self.node_children.cpu().tolist()
        parent = self.parent.cpu().tolist()
        for node in range(1, self.num_nodes):
            up = parent[node]
            # A flagged node whose parent is flagged too goes with it (the reference drops it from its list).
            if not flags[node] or flags[up] or up <= 0:
                continue
            sibling = children[up][1 - children[up].index(node)]
            grand = parent[up]
            children[grand][children[grand].index(up)] = sibling
            parent[sibling] = grand
        # Keep the nodes still reachable from the root, renumbered in pre-order.
        order: list[int] = []

        def walk(node: int) -> None:
            order.append(node)
            if children[node][0] >= 0:
                walk(children[node][0])
                walk(children[node][1])

        walk(0)
        new_id = {old: new for new, old in enumerate(order)}
        new_children = [[new_id[c] if c >= 0 else -1 for c in children[old]] for old in order]
        kept = torch.tensor(order)
        kept_prototypes = self.node_prototype.cpu()[kept]
        kept_leaves = self.node_leaf.cpu()[kept]
        kept_prototypes, kept_leaves = kept_prototypes[kept_prototypes >= 0], kept_leaves[kept_leaves >= 0]
        device = self.node_children.device
        self.node_children = torch.tensor(new_children, dtype=torch.long, device=device)
        self.leaf_logits = self.leaf_logits[kept_leaves.to(device)].contiguous()
        self._index()
        return kept_prototypes, kept_leaves
