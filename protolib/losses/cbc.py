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


def head_class_loss(
    scores: torch.Tensor, labels: torch.Tensor, head: torch.nn.Module, margin: float = 0.025
) -> torch.Tensor:
    """The class loss of a CBC / RBF head's scores (B, C): the RBF head (it has ``normalization``) its log1p
    cross-entropy, the CBC head the margin loss."""
    if hasattr(head, "normalization"):
        return rbf_cross_entropy(scores, labels, head.normalization)
    return margin_loss(scores, labels, margin)


class HeadClassLoss(torch.nn.Module):
    """:func:`head_class_loss` as the class term of PIP-Net's objective
    (``protolib.losses.pipnet.PIPNetLoss(class_loss=...)``): deep CBC / RBF networks pre-trained and trained
    by PIP-Net's recipe, as the reference trains them."""

    def __init__(self, margin: float = 0.025) -> None:
        super().__init__()
        self.margin = margin

    def forward(self, outputs: dict, labels: torch.Tensor, net: torch.nn.Module) -> torch.Tensor:
        return head_class_loss(outputs["logits"], labels, net.last_layer, self.margin)


class CBCLoss(torch.nn.Module):
    """The class loss of the network's head (margin loss for ``CBCHead``, log1p cross-entropy for ``RBFHead``)
    plus ``tanh`` x PIP-Net's tanh loss ``-mean_k log(tanh(sum_b presence_bk) + 1e-8)`` on the max-pooled
    detection probabilities (B, K), which keeps every component present somewhere in the batch (the reference
    uses it with the RBF head, weight 2, next to class loss weight 2)."""

    def __init__(self, classification: float = 1.0, tanh: float = 0.0, margin: float = 0.025) -> None:
        super().__init__()
        self.weights = {"class": classification, "tanh": tanh}
        self.margin = margin

    def forward(self, outputs: dict, labels: torch.Tensor, net: torch.nn.Module) -> tuple[torch.Tensor, dict]:
        class_loss = head_class_loss(outputs["logits"], labels, net.last_layer, self.margin)
        presence = outputs["prototype_similarity"]  # (B, K)
        terms = {"class": class_loss, "tanh": -torch.log(torch.tanh(presence.sum(dim=0)) + 1e-8).mean()}
        return sum(self.weights[n] * v for n, v in terms.items()), terms
