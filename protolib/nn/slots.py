"""ProtoPool's parts: classes choosing their prototypes from a shared pool, and the focal similarity.

ProtoPool (Rymarczyk et al., ECCV 2022) gives each of C classes K slots; slot (c, k) holds a distribution
``q_ck`` over the M prototypes of a shared pool, learned through Gumbel-softmax with a scale that grows
during training until every slot picks one prototype. A slot's distance is the ``q``-weighted mix of the
pool's distances; its similarity is *focal*: the log activation of the mixed minimum distance minus that of
the mixed mean distance, so a prototype counts when it is present in one place, not everywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def log_activation(distances: torch.Tensor, epsilon: float = 1e-4) -> torch.Tensor:
    """ProtoPNet's ``log((d + 1) / (d + epsilon))`` of distances of any shape."""
    return torch.log((distances + 1) / (distances + epsilon))


def focal_similarity(
    min_distances: torch.Tensor, mean_distances: torch.Tensor, assignment: torch.Tensor, epsilon: float = 1e-4
) -> torch.Tensor:
    """Slot similarities (B, C, K) from each pool prototype's min and mean patch distance (B, M) and the slot
    assignment (C, M, K): ``g(sum_m q d_min) - g(sum_m q d_mean)`` with the log activation ``g``."""
    mixed_min = torch.einsum("bm,cmk->bck", min_distances, assignment)
    mixed_mean = torch.einsum("bm,cmk->bck", mean_distances, assignment)
    return log_activation(mixed_min, epsilon) - log_activation(mixed_mean, epsilon)


def gumbel_scale(epoch: int, epochs: int = 30, start: float = 1.3, end: float = 1e3) -> float:
    """The paper's schedule of the Gumbel-softmax logit scale at (reference-numbered) ``epoch``:
    ``start * sqrt(alpha * epoch)`` with ``alpha = (end / start)^2 / epochs``, reaching ``end`` at ``epochs``
    and staying there; 0 means a plain softmax."""
    if epoch >= epochs:
        return float(end)
    alpha = (end / start) ** 2 / epochs
    return float(start * (alpha * max(epoch, 0)) ** 0.5)


class SlotAssignment(nn.Module):
    """The (C, M, K) logits of every class slot over the pool, and their (Gumbel-)softmax over M.

    ``scale`` multiplies the logits before a Gumbel-softmax of temperature ``tau`` (reference: 0.5) in
    training; 0 gives a plain softmax (the reference's first epochs). Evaluation uses the same scaled softmax
    without Gumbel noise (the reference also sampled at test time), so predictions are deterministic.
    """

    def __init__(self, num_classes: int, pool_size: int, slots: int, tau: float = 0.5) -> None:
        super().__init__()
        if slots < 1 or slots > pool_size:
            raise ValueError(f"slots per class must be in [1, pool_size={pool_size}], got {slots}")
        self.logits = nn.Parameter(torch.empty(num_classes, pool_size, slots))  # (C, M, K)
        nn.init.xavier_normal_(self.logits, gain=1.0)
        self.tau = tau
        self.register_buffer("scale", torch.zeros(()))  # set by the schedule (GumbelScaleSchedule)

    @property
    def slots(self) -> int:
        return self.logits.shape[2]

    def forward(self) -> torch.Tensor:
        """(C, M, K) assignment, each slot a distribution over the M pool prototypes."""
        scale = float(self.scale)
        if scale == 0:
            return self.logits.softmax(dim=1)
        if self.training:
            return F.gumbel_softmax(self.logits * scale, tau=self.tau, dim=1)
        return (self.logits * scale / self.tau).softmax(dim=1)

    def chosen(self) -> torch.Tensor:
        """(C, K) the pool prototype each slot has chosen (its most probable one)."""
        return self.logits.argmax(dim=1)

    def hard(self) -> torch.Tensor:
        """(C, M, K) one-hot of :meth:`chosen`."""
        return F.one_hot(self.chosen(), self.logits.shape[1]).permute(0, 2, 1).to(self.logits.dtype)


def orthogonality_loss(logits: torch.Tensor) -> torch.Tensor:
    """Mean over classes and slots of the summed cosine similarities between a class's different slot
    logits (C, M, K): ``sum_c sum_{i != j} cos(q_ci, q_cj) / (C K)``, pushing a class's slots to choose
    different prototypes (the reference's ``sum cos / (K C) - 1``; the diagonal sums to C K)."""
    c, _, k = logits.shape
    cos = F.cosine_similarity(logits.unsqueeze(2), logits.unsqueeze(3), dim=1)  # (C, K, K)
    return cos.sum() / (k * c) - 1
