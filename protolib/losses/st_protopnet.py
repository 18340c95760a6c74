"""ST-ProtoPNet's training objective (Wang et al., "Learning Support and Trivial Prototypes for
Interpretable Image Classification", ICCV 2023; reference github.com/cwangrun/ST-ProtoPNet,
``cropped/train_and_test.py``).

Two prototype sets with their own heads: *trivial* prototypes are pulled to their class's patches and kept
apart from other classes (ProtoPNet's idea), *support* prototypes are pulled towards the classification
boundary: a large separation weight and a closeness loss bring the support prototypes of different classes
together. Cluster / separation are written on max-pooled cosine *similarities* (hence the signs: cluster
weight -0.8, separation +0.08 trivial / +0.48 support), closeness and discrimination on the cosine
similarity between prototypes of different classes, and an orthogonality loss within each class per set.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from protolib.losses.protopnet import class_identity, wrong_class_l1
from protolib.losses.tesnet import orthonormality_cost

SETS = ("trivial", "support")


def masked_max_similarity(similarities: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over images of ``max_p similarities * mask`` (B, P) x (B, P): the reference's cluster (own-class
    mask) and separation (other-class mask) on max-pooled similarities. Masked-out entries count as 0, as
    in the reference (a product, not a masked max)."""
    return (similarities * mask).max(dim=1).values.mean()


def class_pair_similarities(
    vectors: torch.Tensor, owners: torch.Tensor, num_classes: int, reduce: str
) -> torch.Tensor:
    """(C, C) ``reduce`` ("amin" or "amax") of the dot products ``<p_k, p_l>`` over the prototypes k of
    class i and l of class j; classes without prototypes stay NaN."""
    dots = vectors @ vectors.T  # (P, P)
    p = len(owners)
    rows = torch.full((num_classes, p), torch.nan, dtype=dots.dtype, device=dots.device)
    index = owners.long()[:, None].expand(p, p)
    rows = rows.scatter_reduce(0, index, dots, reduce=reduce, include_self=False)  # (C, P): over k
    pairs = torch.full((num_classes, num_classes), torch.nan, dtype=dots.dtype, device=dots.device)
    index = owners.long()[None, :].expand(num_classes, p)
    return pairs.scatter_reduce(1, index, rows, reduce=reduce, include_self=False)  # (C, C): over l


def _mean_off_diagonal(pairs: torch.Tensor) -> torch.Tensor:
    """Mean of a (C, C) matrix over i != j, skipping NaN (absent classes)."""
    off = ~torch.eye(len(pairs), dtype=torch.bool, device=pairs.device) & ~pairs.isnan()
    return pairs[off].mean()


def closeness_cost(vectors: torch.Tensor, owners: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``-mean_{i != j} min_{k in i, l in j} <p_k, p_l>``: pulls every pair of classes' support prototypes
    together, through their least similar pair (the reference's ``closeness_cost``)."""
    return -_mean_off_diagonal(class_pair_similarities(vectors, owners, num_classes, "amin"))


def discrimination_cost(vectors: torch.Tensor, owners: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``mean_{i != j} max_{k in i, l in j} <p_k, p_l>``: pushes every pair of classes' trivial prototypes
    apart, through their most similar pair (the reference's ``discrimination_cost``)."""
    return _mean_off_diagonal(class_pair_similarities(vectors, owners, num_classes, "amax"))


class STProtoPNetLoss(nn.Module):
    """The sum of the trivial and the support objective, with the reference's ``settings_CUB_CAR.py`` weights:

    trivial: ``ce CE_t + cluster_trivial Clst_t + separation_trivial Sep_t + orth Orth_t + discrimination
    Discr`` (1, -0.8, 0.08, 1e-3, 1); support: ``ce CE_s + cluster_support Clst_s + separation_support Sep_s
    + orth Orth_s + closeness Close`` (1, -0.8, 0.48, 1e-3, 1); plus ``l1`` (1e-4) on both heads' wrong-class
    weights. ``CE_t``, ``CE_s`` are each head's own cross-entropy (the network's logits are their sum).

    The reference alternates batches between the two objectives (even: trivial, odd: support). Here both
    prototype sets live in one bank and one last layer, whose other set's rows would still receive Adam's
    momentum (and weight decay) on the alternate steps, so the alternation would not be the reference's
    either; both objectives are summed every step instead.
    """

    def __init__(
        self,
        cross_entropy: float = 1.0,
        cluster_trivial: float = -0.8,
        separation_trivial: float = 0.08,
        cluster_support: float = -0.8,
        separation_support: float = 0.48,
        orthogonality: float = 1e-3,
        discrimination: float = 1.0,
        closeness: float = 1.0,
        l1: float = 1e-4,
    ) -> None:
        super().__init__()
        self.weights = {
            "ce_trivial": cross_entropy,
            "cluster_trivial": cluster_trivial,
            "separation_trivial": separation_trivial,
            "orth_trivial": orthogonality,
            "discrimination": discrimination,
            "ce_support": cross_entropy,
            "cluster_support": cluster_support,
            "separation_support": separation_support,
            "orth_support": orthogonality,
            "closeness": closeness,
            "l1": l1,
        }

    def forward(
        self, outputs: Mapping[str, torch.Tensor], labels: torch.Tensor, net: nn.Module
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Total loss and its unweighted terms from the network's ``extract`` outputs
        (``prototype_similarity`` (B, P) projections, ``min_distances`` (B, P) cosine distances), labels (B,)
        and ``net`` (``prototype_sets()``: prototype ids of each set, the bank, the last layer (C, P))."""
        similarities = outputs["prototype_similarity"]  # (B, P) the heads' input
        cosine = -outputs["min_distances"]  # (B, P) max-pooled cosine similarity
        weight = net.last_layer.weight  # (C, P): both heads side by side
        vectors, owners = net.prototype_bank.vectors, net.prototype_bank.owners
        identity = class_identity(owners, net.num_classes).to(similarities.dtype)  # (P, C)
        own = identity[:, labels].T  # (B, P)
        terms: dict[str, torch.Tensor] = {}
        sets = net.prototype_sets()
        for name in SETS:
            ids = sets[name]
            logits = similarities[:, ids] @ weight[:, ids].T  # (B, C) this head's logits
            terms[f"ce_{name}"] = F.cross_entropy(logits, labels)
            terms[f"cluster_{name}"] = masked_max_similarity(cosine[:, ids], own[:, ids])
            terms[f"separation_{name}"] = masked_max_similarity(cosine[:, ids], 1 - own[:, ids])
            terms[f"orth_{name}"] = orthonormality_cost(vectors[ids], owners[ids])
        trivial, support = sets["trivial"], sets["support"]
        terms["discrimination"] = discrimination_cost(vectors[trivial], owners[trivial], net.num_classes)
        terms["closeness"] = closeness_cost(vectors[support], owners[support], net.num_classes)
        terms["l1"] = wrong_class_l1(weight, identity)
        total = sum(self.weights[name] * value for name, value in terms.items())
        return total, terms

    def extra_repr(self) -> str:
        return ", ".join(f"{name}={weight}" for name, weight in self.weights.items())
