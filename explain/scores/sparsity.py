"""How many prototypes a decision uses: the size of the explanation a person has to read.

Counted as the papers do: PIP-Net's (Nauta et al., CVPR 2023) *local explanation size*, the prototypes with
a non-zero contribution (similarity x weight) to the predicted class, and *global explanation size*, the
prototypes with a non-zero weight to some class; for ProtoTree (Nauta et al., CVPR 2021) a decision uses the
prototypes on its greedy root-to-leaf path (local size = path length) and every node's prototype is part of
the global explanation. Beside them, ``prototypes_for_90``: the fewest top contributions (largest first)
whose sum reaches 90% of the predicted class's positive evidence — how many a reader needs for most of the
decision when, as in ProtoPNet's dense head, every contribution is non-zero.
"""

from __future__ import annotations

import lightning as L
import torch
from torch import nn

from explain.scores.evidence import device_of, is_tree, prototype_weights, relevance, test_batches
from explain.scores.registry import ScoreSpec, register
from protolib.utils.modes import evaluating


def prototypes_for_share(relevance: torch.Tensor, share: float = 0.9) -> torch.Tensor:
    """(B,) the fewest of the largest positive entries of each row of ``relevance`` (B, P) whose sum reaches
    ``share`` of the row's positive sum (0 for a row without positive evidence)."""
    positive = relevance.clamp_min(0).sort(dim=1, descending=True).values  # (B, P)
    reached = positive.cumsum(dim=1) >= share * positive.sum(dim=1, keepdim=True) - 1e-12  # (B, P)
    needed = reached.float().argmax(dim=1) + 1  # first position reaching the share
    return torch.where(positive[:, 0] > 0, needed, torch.zeros_like(needed))


@torch.no_grad()
def explanation_size(
    net: nn.Module,
    datamodule: L.LightningDataModule,
    max_images: int = 200,
    progress: bool = True,
    share: float = 0.9,
) -> dict[str, float]:
    """Mean local explanation size and ``prototypes_for_90`` over the first ``max_images`` test images, and
    the global explanation size."""
    device = device_of(net)
    local, needed, count = 0.0, 0.0, 0
    with evaluating(net):
        for batch in test_batches(datamodule, max_images, progress, "explanation size"):
            extract = net.extract(batch["image"].to(device))
            evidence = relevance(net, extract, extract["logits"].argmax(dim=1))  # (B, P)
            local += float((evidence != 0).sum())
            needed += float(prototypes_for_share(evidence, share).sum())
            count += len(evidence)
    weights = prototype_weights(net)
    total = net.prototype_bank.num_prototypes if weights is None else int((weights != 0).any(dim=1).sum())
    key = f"prototypes_for_{round(100 * share)}"
    return {"local_size": local / max(count, 1), key: needed / max(count, 1), "global_size": float(total)}


register(
    "sparsity",
    ScoreSpec(
        compute=explanation_size,
        unavailable=lambda net, datamodule: (
            None
            if is_tree(net) or hasattr(net, "contributions")
            else f"{type(net).__name__} has no per-prototype contributions (a ProtoPNet-style family)"
        ),
        higher_is_better=False,
        description=(
            "prototypes per decision: non-zero contributions to the predicted class (local_size; ProtoTree: "
            "its path), the fewest reaching 90% of the positive evidence, and prototypes with a weight "
            "(global_size)"
        ),
    ),
)
