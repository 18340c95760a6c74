"""SimGCD's losses (Wen et al., ICCV 2023; github.com/CVMI-Lab/SimGCD): contrastive, distillation, entropy.

One contrastive function serves SupCon (labels given) and SimCLR (no labels: the positive of a view is the
other view of its image), as the reference's ``SupConLoss`` and ``info_nce_logits`` + cross-entropy agree.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def contrastive_loss(
    features: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 0.07,
    base_temperature: float | None = None,
) -> torch.Tensor:
    """SupCon / SimCLR on ``features`` (B, V, D), L2-normalised here; every view of every image is an anchor.

    Positives of an anchor: the other views of its image and (with ``labels`` (B,)) every view of the same
    class; the denominator runs over all other views in the batch. Scaled by ``temperature / base_temp``
    (SupCon's convention; ``base_temperature`` defaults to ``temperature``).
    """
    if features.ndim != 3 or features.shape[1] < 2:
        raise ValueError(f"contrastive_loss needs features (B, V>=2, D), got {tuple(features.shape)}.")
    b, v = features.shape[:2]
    z = F.normalize(features.float(), dim=-1).transpose(0, 1).reshape(b * v, -1)  # (V*B, D), view-major
    ids = torch.arange(b, device=z.device) if labels is None else labels.to(z.device)
    ids = ids.repeat(v)  # (V*B,)
    logits = z @ z.T / temperature  # (V*B, V*B)
    self_mask = torch.eye(b * v, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    positive = (ids[:, None] == ids[None, :]) & ~self_mask
    mean_pos = log_prob.masked_fill(~positive, 0.0).sum(1) / positive.sum(1)
    scale = temperature / (base_temperature or temperature)
    return -scale * mean_pos.mean()


def teacher_temperature(epoch: int, warmup_epochs: int = 30, start: float = 0.07, end: float = 0.04) -> float:
    """The teacher temperature of ``epoch``: ``np.linspace(start, end, warmup_epochs)``, then ``end``."""
    if warmup_epochs <= 1 or epoch >= warmup_epochs - 1:
        return end
    return start + (end - start) * epoch / (warmup_epochs - 1)


def self_distillation_loss(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, views: int, teacher_temp: float
) -> torch.Tensor:
    """Cross-view distillation: each view's sharpened teacher distribution supervises the other views.

    ``student_logits`` are already divided by the student temperature and ``teacher_logits`` are the raw
    cosines (both (V*B, K), view-major); the teacher is ``softmax(cos / teacher_temp)``, detached.
    """
    student = F.log_softmax(student_logits.float(), dim=-1).chunk(views)
    teacher = F.softmax(teacher_logits.detach().float() / teacher_temp, dim=-1).chunk(views)
    terms = [-(q * student[s]).sum(-1).mean() for t, q in enumerate(teacher) for s in range(views) if s != t]
    return torch.stack(terms).mean()


def mean_entropy_regulariser(logits: torch.Tensor) -> torch.Tensor:
    """``log K - H(mean softmax)``: zero when the batch's clusters are used uniformly (SimGCD's me-max)."""
    mean_prob = logits.float().softmax(dim=1).mean(dim=0)  # (K,)
    entropy = -(mean_prob * torch.log(mean_prob.clamp_min(1e-38))).sum()
    return math.log(float(mean_prob.numel())) - entropy
