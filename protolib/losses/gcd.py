"""SimGCD's losses (Wen et al., ICCV 2023; github.com/CVMI-Lab/SimGCD): contrastive, distillation, entropy;
ProtoGCD's additions (Ma et al., TPAMI 2025; github.com/mashijie1028/ProtoGCD): dual-level adaptive
pseudo-labels with their confidence ramp, and the prototype-separation regulariser.

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
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    views: int,
    teacher_temp: float,
    hard_ratio: float = 0.0,
) -> torch.Tensor:
    """Cross-view distillation: each view's sharpened teacher distribution supervises the other views.

    ``student_logits`` are already divided by the student temperature and ``teacher_logits`` are the raw
    cosines (both (V*B, K), view-major); the teacher is ``softmax(cos / teacher_temp)``, detached. With
    ``hard_ratio`` > 0 (ProtoGCD) each view's most confident share becomes one-hot
    (:func:`adaptive_pseudo_labels`); 0 is SimGCD's all-soft teacher.
    """
    student = F.log_softmax(student_logits.float(), dim=-1).chunk(views)
    teacher = F.softmax(teacher_logits.detach().float() / teacher_temp, dim=-1).chunk(views)
    if hard_ratio > 0:
        teacher = tuple(adaptive_pseudo_labels(q, hard_ratio) for q in teacher)
    terms = [-(q * student[s]).sum(-1).mean() for t, q in enumerate(teacher) for s in range(views) if s != t]
    return torch.stack(terms).mean()


def mean_entropy_regulariser(logits: torch.Tensor) -> torch.Tensor:
    """``log K - H(mean softmax)``: zero when the batch's clusters are used uniformly (SimGCD's me-max)."""
    mean_prob = logits.float().softmax(dim=1).mean(dim=0)  # (K,)
    entropy = -(mean_prob * torch.log(mean_prob.clamp_min(1e-38))).sum()
    return math.log(float(mean_prob.numel())) - entropy


def confidence_ratio(
    epoch: int,
    wait_epochs: int = 0,
    ramp_epochs: int = 100,
    init_ratio: float = 0.0,
    final_ratio: float = 1.0,
) -> float:
    """ProtoGCD's share of each view's batch given hard pseudo-labels at ``epoch``.

    The reference's ``ratio_schedule``: 0 for ``wait_epochs``, then ``np.linspace(init_ratio, final_ratio,
    ramp_epochs)``, then ``final_ratio``.
    """
    if epoch < wait_epochs:
        return 0.0
    step = epoch - wait_epochs
    if step >= ramp_epochs:
        return final_ratio
    if ramp_epochs == 1:
        return init_ratio
    return init_ratio + (final_ratio - init_ratio) * step / (ramp_epochs - 1)


def adaptive_pseudo_labels(probs: torch.Tensor, hard_ratio: float) -> torch.Tensor:
    """ProtoGCD's dual-level adaptive pseudo-labels of one view's teacher probabilities (B, K).

    The ``floor(B * hard_ratio)`` rows whose top-1 / top-2 probability ratio is largest become one-hot at
    their argmax (hard labels); the others keep their sharpened soft distribution.
    """
    if not 0.0 <= hard_ratio <= 1.0:
        raise ValueError(f"hard_ratio (share of hard pseudo-labels) must be in [0, 1], got {hard_ratio}")
    count = int(probs.shape[0] * hard_ratio)
    if count == 0 or probs.shape[1] < 2:
        return probs
    top2 = probs.topk(2, dim=1).values  # (B, 2)
    confident = (top2[:, 0] / (top2[:, 1] + 1e-6)).topk(count).indices  # (count,)
    hard = F.one_hot(probs.argmax(dim=1), probs.shape[1]).to(probs.dtype)  # (B, K)
    return probs.index_copy(0, confident, hard[confident])


def prototype_separation_loss(
    prototypes: torch.Tensor, temperature: float = 0.1, base_temperature: float = 0.1
) -> torch.Tensor:
    """ProtoGCD's inter-class separation: mean over prototypes of ``log mean_{j != i} exp(p_i . p_j / t)``.

    ``prototypes`` (K, D) are L2-normalised here; lower = prototypes further apart. Scaled by ``t / base_t``.
    """
    if prototypes.ndim != 2 or prototypes.shape[0] < 2:
        raise ValueError(
            f"prototype_separation_loss needs (K>=2, D) prototypes, got {tuple(prototypes.shape)}"
        )
    p = F.normalize(prototypes.float(), dim=1)
    k = p.shape[0]
    self_pairs = torch.eye(k, dtype=torch.bool, device=p.device)
    logits = (p @ p.T / temperature).masked_fill(self_pairs, float("-inf"))  # (K, K), j != i only
    log_mean_neg = torch.logsumexp(logits, dim=1) - math.log(k - 1)  # (K,)
    return temperature / base_temperature * log_mean_neg.mean()
