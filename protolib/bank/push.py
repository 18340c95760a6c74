"""The reverse search behind push/projection: for every prototype, its nearest patch in a stream of batches.

Memory is bounded by one batch (plus a chunk of the patch x prototype distance matrix), never by the dataset.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from protolib.bank import distributed
from protolib.bank.distances import pairwise_distances

# Largest patch x prototype distance block computed at once (4M floats = 16 MiB).
MAX_BLOCK_ELEMENTS = 1 << 22


@dataclass
class PushResult:
    """The winning patch of every prototype (rows follow the bank's prototype order)."""

    vectors: torch.Tensor  # (P, D) the patch embeddings themselves
    distances: torch.Tensor  # (P,) prototype -> patch distance, smaller is nearer
    sample_ids: torch.Tensor  # (P,) long, the "index" of the sample the patch came from
    locations: torch.Tensor  # (P, 2) long (row, col) in the feature map; -1 for (B, D) embeddings


def _flatten_batch(
    batch: Sequence[torch.Tensor], dim: int, number: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Validate one (embeddings, labels, sample_ids) batch and flatten it to patches.

    Returns patches (N, D), labels (N,), sample ids (N,), locations (N, 2).
    """
    if not isinstance(batch, Sequence) or len(batch) != 3:
        raise ValueError(f"Push batch {number} must be a tuple (embeddings, labels, sample_ids).")
    emb, labels, sample_ids = (torch.as_tensor(t) for t in batch)
    if emb.ndim not in (2, 4) or emb.shape[1] != dim:
        raise ValueError(
            f"Push batch {number}: embeddings must be (B, {dim}, H, W) or (B, {dim}) to match the bank's "
            f"dimension, got {tuple(emb.shape)}."
        )
    b = emb.shape[0]
    if labels.shape != (b,) or sample_ids.shape != (b,):
        raise ValueError(
            f"Push batch {number}: labels and sample_ids must be ({b},), got {tuple(labels.shape)} and "
            f"{tuple(sample_ids.shape)}."
        )
    if not emb.is_floating_point() or not torch.isfinite(emb).all():
        raise ValueError(
            f"Push batch {number}: embeddings must be finite floats (found NaN/inf or integers)."
        )
    emb = emb.detach().to(device)
    if emb.ndim == 4:
        _, _, h, w = emb.shape
        patches = emb.permute(0, 2, 3, 1).reshape(-1, dim)  # (B*H*W, D)
        rows = torch.arange(h, device=device).repeat_interleave(w).repeat(b)
        cols = torch.arange(w, device=device).repeat(b * h)
        locations = torch.stack([rows, cols], dim=1)  # (B*H*W, 2)
    else:
        h = w = 1
        patches = emb
        locations = torch.full((b, 2), -1, dtype=torch.long, device=device)
    per_sample = h * w
    labels = labels.to(device, torch.long).repeat_interleave(per_sample)
    sample_ids = sample_ids.to(device, torch.long).repeat_interleave(per_sample)
    return patches, labels, sample_ids, locations


class _RunningBest:
    """Each prototype's nearest patch so far: distance, vector, sample id and location."""

    def __init__(self, prototypes: torch.Tensor, metric: str) -> None:
        p, d = prototypes.shape
        device = prototypes.device
        self.prototypes, self.metric = prototypes, metric
        self.dist = torch.full((p,), float("inf"), device=device)
        self.vectors = torch.zeros(p, d, dtype=prototypes.dtype, device=device)
        self.sample_ids = torch.full((p,), -1, dtype=torch.long, device=device)
        self.locations = torch.full((p, 2), -1, dtype=torch.long, device=device)

    def update(
        self,
        proto_ids: torch.Tensor,
        patch_ids: torch.Tensor,
        patches: torch.Tensor,
        sample_ids: torch.Tensor,
        locations: torch.Tensor,
    ) -> None:
        """Offer the patches ``patch_ids`` of a batch to the prototypes ``proto_ids``, in bounded blocks."""
        protos = self.prototypes[proto_ids]  # (P', D)
        chunk = max(1, MAX_BLOCK_ELEMENTS // len(proto_ids))
        for start in range(0, len(patch_ids), chunk):
            idx = patch_ids[start : start + chunk]
            value, arg = pairwise_distances(patches[idx], protos, self.metric).min(dim=0)  # (P',)
            better = value < self.dist[proto_ids]  # strict: the earliest patch wins ties
            target, winner = proto_ids[better], idx[arg[better]]
            self.dist[target] = value[better]
            self.vectors[target] = patches[winner]
            self.sample_ids[target] = sample_ids[winner]
            self.locations[target] = locations[winner]


@torch.no_grad()
def nearest_patches(
    prototypes: torch.Tensor,
    owners: torch.Tensor,
    metric: str,
    batches: Iterable[Sequence[torch.Tensor]],
    restrict_to_owner: bool = True,
    allowed: torch.Tensor | None = None,
) -> PushResult:
    """For each prototype (P, D), the nearest patch over all ``batches`` (of its owner's class if restricted;
    of a class ``c`` with ``allowed[p, c]`` if an ``allowed`` (P, C) mask is given, e.g. ProtoTree's classes
    below a node).

    Restricted pushes compare each class's patches with that class's prototypes only (C times less work
    than masking a full distance matrix). Under DDP every rank streams its own batches and the best
    candidate is gathered across ranks, so all ranks return the same result. Raises ValueError (on every
    rank) for an empty stream or an owner class that never appears.
    """
    prototypes = prototypes.detach()
    p, d = prototypes.shape
    device = prototypes.device
    best = _RunningBest(prototypes, metric)
    all_ids = torch.arange(p, device=device)
    by_owner = {int(o): all_ids[owners == o] for o in owners.unique()}
    if allowed is not None and (allowed.shape[0] != p or allowed.dtype != torch.bool):
        raise ValueError(
            f"allowed must be a (P={p}, C) bool mask, got {tuple(allowed.shape)} {allowed.dtype}"
        )
    allowed = None if allowed is None else allowed.to(device)
    num_batches = 0
    for number, batch in enumerate(batches):
        num_batches += 1
        patches, labels, sample_ids, locations = _flatten_batch(batch, d, number, device)
        patches = patches.to(prototypes.dtype)
        if allowed is not None:
            for label in labels.unique().tolist():
                proto_ids = allowed[:, label].nonzero().flatten() if label < allowed.shape[1] else all_ids[:0]
                if len(proto_ids):
                    patch_ids = (labels == label).nonzero().flatten()
                    best.update(proto_ids, patch_ids, patches, sample_ids, locations)
            continue
        if not restrict_to_owner:
            best.update(all_ids, torch.arange(len(patches), device=device), patches, sample_ids, locations)
            continue
        for label in labels.unique().tolist():
            if label in by_owner:
                patch_ids = (labels == label).nonzero().flatten()
                best.update(by_owner[label], patch_ids, patches, sample_ids, locations)
    total_batches = distributed.all_reduce_sum_(torch.tensor([num_batches], device=device))
    best_dist, payload = best.dist, (best.vectors, best.sample_ids, best.locations)
    if distributed.world_size() > 1:
        best_dist, payload = _gather_best(best_dist, payload)
    if int(total_batches.item()) == 0:
        raise ValueError("Push got an empty dataloader: no batches of embeddings to project prototypes onto.")
    missing = ~torch.isfinite(best_dist)
    if missing.any():
        classes = sorted(set(owners[missing].tolist()))
        raise ValueError(
            f"Push found no patch for prototypes {missing.nonzero().flatten().tolist()[:10]} "
            f"(owner classes {classes[:10]}): those classes have no samples in the push data. Include them "
            "or push with restrict_to_owner=False."
        )
    return PushResult(payload[0], best_dist, payload[1], payload[2])


def _gather_best(
    best_dist: torch.Tensor, payload: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Pick each prototype's best candidate over all ranks (ties go to the lowest rank).

    Only the distances are gathered; the winner's payload rows reach every rank by a sum in which the
    other ranks contribute zeros, so memory stays (P, D) whatever the world size.
    """
    all_dist = distributed.all_gather(best_dist)  # (world, P)
    dist, winner_rank = all_dist.min(dim=0)
    mine = winner_rank == distributed.rank()
    out = []
    for tensor in payload:
        shape = (-1,) + (1,) * (tensor.ndim - 1)
        out.append(distributed.all_reduce_sum_(tensor * mine.view(shape).to(tensor.dtype)))
    return dist, tuple(out)
