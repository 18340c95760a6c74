"""Losses of the deep CBC and RBF networks (Saralajew et al., AAAI 2025; si-cim/cbc-aaai-2025).

The CBC head is trained with the margin loss on class probabilities, ``relu(max_{c != y} p_c - p_y + m)``
(margin 0.025 in the reference executor); the RBF head with the cross-entropy of ``log1p(s ** 2)`` (the
reference's NLL of ``log_softmax(log1p(out ** normalization_multiplier))``, the multiplier frozen at 2).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def margin_loss(probabilities: torch.Tensor, labels: torch.Tensor, margin: float = 0.025) -> torch.Tensor:
    """Mean over the batch of ``relu(best wrong-class probability - own-class probability + margin)``,
    probabilities (B, C), labels (B,)."""
    own = probabilities.gather(1, labels[:, None])[:, 0]  # (B,)
    one_hot = F.one_hot(labels, probabilities.shape[1]).to(probabilities.dtype)
    wrong = (probabilities - one_hot).max(dim=1).values  # the own class is pushed below every other
    return torch.relu(wrong - own + margin).mean()


def rbf_cross_entropy(scores: torch.Tensor, labels: torch.Tensor, normalization: float = 2.0) -> torch.Tensor:
    """Cross-entropy of the logits ``log1p(scores ** normalization)``, scores (B, C) in [0, 1]."""
    return F.cross_entropy(torch.log1p(scores.pow(normalization)), labels)
