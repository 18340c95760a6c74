"""Soft sample-to-prototype assignment: Sinkhorn-Knopp, class masking and top-k pruning (PALM, SwAV).

Sinkhorn-Knopp turns similarities into an assignment that is balanced both ways (every prototype receives
the same total mass over the batch, every sample hands out mass 1), so that no prototype of a class is
starved or takes all its samples: PALM's "reciprocal neighbour" weights. Everything runs in the log
domain, so ``exp(similarity / epsilon)`` never overflows (the reference code falls back on re-normalising
when it hits ``inf`` under fp16) and the weights of far prototypes never underflow to an all-zero row.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def _sample_logsumexp(log_q: torch.Tensor, distributed: bool) -> torch.Tensor:
    """Per-prototype log of the total mass over the samples, (N, P) -> (1, P); over all ranks if asked."""
    if not distributed:
        return torch.logsumexp(log_q, dim=0, keepdim=True)
    peak = log_q.detach().amax(dim=0, keepdim=True)  # (1, P)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = torch.exp(log_q - peak).sum(dim=0, keepdim=True)
    dist.all_reduce(total)
    return peak + torch.log(total)


def log_sinkhorn_knopp(
    similarity: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, distributed: bool = False
) -> torch.Tensor:
    """Log of the Sinkhorn-Knopp assignment of N samples to P prototypes, (N, P) -> (N, P).

    Starts from ``exp(similarity / epsilon)`` and alternates ``iterations`` times: each prototype's column
    scaled to total 1/P, then each sample's row scaled to total 1/N; the result is multiplied by N so
    each sample's row sums to one. With ``distributed`` the prototype totals and N are taken over every
    rank's batch (all-reduced), as if the global batch were on one device.
    """
    if similarity.ndim != 2:
        raise ValueError(f"similarity must be (N, P), got shape {tuple(similarity.shape)}")
    if epsilon <= 0 or iterations < 1:
        raise ValueError(f"Sinkhorn needs epsilon > 0 and iterations >= 1, got {epsilon} and {iterations}")
    distributed = distributed and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    num_samples = torch.tensor(float(similarity.shape[0]), device=similarity.device)
    if distributed:
        dist.all_reduce(num_samples)
    log_n, log_p = torch.log(num_samples), math.log(similarity.shape[1])
    log_q = similarity.detach().float() / epsilon  # (N, P); constant scalings cancel in the first step
    for _ in range(iterations):
        log_q = log_q - _sample_logsumexp(log_q, distributed) - log_p  # each prototype: total 1/P
        log_q = log_q - torch.logsumexp(log_q, dim=1, keepdim=True) - log_n  # each sample: total 1/N
    return log_q + log_n  # (N, P), rows sum to 1


def sinkhorn_knopp(
    similarity: torch.Tensor, epsilon: float = 0.05, iterations: int = 3, distributed: bool = False
) -> torch.Tensor:
    """Sinkhorn-Knopp assignment (N, P) whose rows sum to one; see :func:`log_sinkhorn_knopp`."""
    return log_sinkhorn_knopp(similarity, epsilon, iterations, distributed).exp()


def prototype_assignment(
    similarity: torch.Tensor,
    labels: torch.Tensor,
    owners: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    topk: int | None = None,
    distributed: bool = False,
) -> torch.Tensor:
    """PALM assignment weights (N, P): Sinkhorn over all prototypes, kept only for the sample's class.

    ``similarity`` (N, P) is cosine similarity to every prototype, ``labels`` (N,) the sample classes and
    ``owners`` (P,) each prototype's class. Of the prototypes owned by the sample's class the ``topk``
    with the largest Sinkhorn weight are kept (all when ``None``) and their weights renormalised to sum to
    one; every other entry is exactly zero. No gradient flows through the weights.
    """
    if labels.ndim != 1 or labels.shape[0] != similarity.shape[0]:
        raise ValueError(f"labels must be (N,) with N = {similarity.shape[0]}, got {tuple(labels.shape)}")
    if owners.ndim != 1 or owners.shape[0] != similarity.shape[1]:
        raise ValueError(f"owners must be (P,) with P = {similarity.shape[1]}, got {tuple(owners.shape)}")
    if topk is not None and topk < 1:
        raise ValueError(f"topk must be a positive number of prototypes (or None for all), got {topk}")
    in_class = labels[:, None] == owners[None, :]  # (N, P)
    orphans = ~in_class.any(dim=1)
    if orphans.any():
        missing = sorted(set(labels[orphans].tolist()))
        raise ValueError(f"classes {missing} own no prototype: give every training class its prototypes")
    log_q = log_sinkhorn_knopp(similarity, epsilon, iterations, distributed)
    log_q = log_q.masked_fill(~in_class, float("-inf"))  # (N, P)
    if topk is not None and topk < similarity.shape[1]:
        kept = torch.zeros_like(in_class).scatter_(1, log_q.topk(topk, dim=1).indices, True) & in_class
        log_q = log_q.masked_fill(~kept, float("-inf"))
    return torch.softmax(log_q, dim=1)  # renormalised over the kept prototypes: rows sum to 1
