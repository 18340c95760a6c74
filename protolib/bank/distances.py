"""The distance kernels of the prototype bank, shared by its push search and the prototype layers.

One squared-L2 kernel serves both: the push's reverse search (no gradient, patch blocks against
prototypes) and the similarity layers of the ProtoPNet family (with gradient, every patch of a feature map),
so the prototypes are pushed onto exactly the patches the model scores as nearest.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def squared_l2(x: torch.Tensor, prototypes: torch.Tensor) -> torch.Tensor:
    """Squared L2 distances (N, P) between rows of ``x`` (N, D) and ``prototypes`` (P, D).

    Expanded as ``||x||^2 - 2 x.p + ||p||^2`` (one matrix product instead of an (N, P, D) difference) and
    clamped at 0, since rounding can make the expansion slightly negative. Computed in float32 at least,
    also under mixed precision: the log activation of ProtoPNet magnifies half-precision cancellation.
    """
    if x.dim() != 2 or prototypes.dim() != 2 or x.shape[1] != prototypes.shape[1]:
        raise ValueError(
            f"expected rows (N, D) and prototypes (P, D) with the same D, got {tuple(x.shape)} and "
            f"{tuple(prototypes.shape)}"
        )
    dtype = torch.promote_types(torch.promote_types(x.dtype, prototypes.dtype), torch.float32)
    with torch.autocast(x.device.type, enabled=False):
        x, prototypes = x.to(dtype), prototypes.to(dtype)
        cross = torch.addmm(prototypes.pow(2).sum(1), x, prototypes.T, alpha=-2)  # ||p||^2 - 2 x.p
        return (cross + x.pow(2).sum(1, keepdim=True)).clamp_min(0)


def pairwise_distances(x: torch.Tensor, prototypes: torch.Tensor, metric: str) -> torch.Tensor:
    """Distances (N, P) between rows of ``x`` (N, D) and ``prototypes`` (P, D) under a bank metric;
    smaller is nearer (``l2``: squared L2; ``cosine``: 1 - cosine; ``ip``: minus the inner product)."""
    if metric == "l2":
        return squared_l2(x, prototypes)
    if metric == "cosine":
        return 1 - F.normalize(x, dim=1) @ F.normalize(prototypes, dim=1).T
    if metric == "ip":
        return -(x @ prototypes.T)
    raise ValueError(f"Unknown metric {metric!r}; choose l2, cosine or ip.")
