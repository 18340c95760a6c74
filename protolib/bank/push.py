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
    """Each prototype's ``k`` nearest patches so far, nearest first: distances, vectors, sample ids and
    locations. Among equal distances the earlier patch ranks first."""

    def __init__(self, prototypes: torch.Tensor, metric: str, k: int = 1) -> None:
        p, d = prototypes.shape
        device = prototypes.device
        self.prototypes, self.metric, self.k = prototypes, metric, k
        self.dist = torch.full((p, k), float("inf"), device=device)
        self.vectors = torch.zeros(p, k, d, dtype=prototypes.dtype, device=device)
        self.sample_ids = torch.full((p, k), -1, dtype=torch.long, device=device)
        self.locations = torch.full((p, k, 2), -1, dtype=torch.long, device=device)

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
            distances = pairwise_distances(patches[idx], protos, self.metric)  # (n, P')
            value, arg = distances.topk(min(self.k, len(idx)), dim=0, largest=False)  # (k', P')
            winners = idx[arg].T  # (P', k') patch rows
            merged = torch.cat([self.dist[proto_ids], value.T], dim=1)  # (P', k + k'), kept ones first
            merged, order = merged.sort(dim=1, stable=True)
            keep = order[:, : self.k]  # (P', k) positions in [kept | new]
            from_new = keep >= self.k
            new_rows = winners.gather(1, (keep - self.k).clamp_min(0))  # (P', k) patch rows (if new)
            old = (self.vectors[proto_ids], self.sample_ids[proto_ids], self.locations[proto_ids])
            slot = keep.clamp_max(self.k - 1)
            self.dist[proto_ids] = merged[:, : self.k]
            self.vectors[proto_ids] = torch.where(
                from_new[..., None], patches[new_rows], old[0].gather(1, slot[..., None].expand_as(old[0]))
            )
            self.sample_ids[proto_ids] = torch.where(from_new, sample_ids[new_rows], old[1].gather(1, slot))
            self.locations[proto_ids] = torch.where(
                from_new[..., None], locations[new_rows], old[2].gather(1, slot[..., None].expand_as(old[2]))
            )


def _distinct_choice(owners: torch.Tensor, dist: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(P,) which of its k candidates (P, k) each prototype takes so that no two prototypes of one owner
    share a patch (``keys`` (P, k) identify patches): nearest pairs first, a prototype whose nearest
    patch is taken gets its next-nearest free one. k >= prototypes per owner always leaves one free."""
    choice = torch.zeros(len(owners), dtype=torch.long, device=dist.device)
    for owner in owners.unique().tolist():
        members = (owners == owner).nonzero().flatten().tolist()
        pairs = sorted(
            (float(dist[p, j]), p, j)
            for p in members
            for j in range(dist.shape[1])
            if dist[p, j] < float("inf")
        )
        taken: set[int] = set()
        free = set(members)
        for _, p, j in pairs:
            key = int(keys[p, j])
            if p in free and key not in taken:
                choice[p] = j
                taken.add(key)
                free.discard(p)
    return choice


@torch.no_grad()
def nearest_patches(
    prototypes: torch.Tensor,
    owners: torch.Tensor,
    metric: str,
    batches: Iterable[Sequence[torch.Tensor]],
    restrict_to_owner: bool = True,
    distinct: bool = False,
    allowed: torch.Tensor | None = None,
) -> PushResult:
    """For each prototype (P, D), the nearest patch over all ``batches`` (of its owner's class if restricted;
    of a class ``c`` with ``allowed[p, c]`` if an ``allowed`` (P, C) mask is given, e.g. ProtoTree's classes
    below a node).

    Restricted pushes compare each class's patches with that class's prototypes only (C times less work
    than masking a full distance matrix). ``distinct`` keeps each prototype's k nearest patches (k = the
    most prototypes an owner has) and then gives no two prototypes of an owner the same patch (nearest
    pairs first; see :func:`_distinct_choice`). Under DDP every rank streams its own batches and the best
    candidates are gathered across ranks, so all ranks return the same result. Raises ValueError (on every
    rank) for an empty stream or an owner class that never appears.
    """
    prototypes = prototypes.detach()
    p, d = prototypes.shape
    device = prototypes.device
    k = int(torch.bincount(owners.long()).max()) if distinct and p else 1
    best = _RunningBest(prototypes, metric, k)
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
    dist, payload = best.dist, (best.vectors, best.sample_ids, best.locations)  # (P, k), (P, k, ...)
    if distributed.world_size() > 1:
        dist, payload = gather_best(dist, payload)
    if int(total_batches.item()) == 0:
        raise ValueError("Push got an empty dataloader: no batches of embeddings to project prototypes onto.")
    missing = ~torch.isfinite(dist[:, 0])
    if missing.any():
        classes = sorted(set(owners[missing].tolist()))
        raise ValueError(
            f"Push found no patch for prototypes {missing.nonzero().flatten().tolist()[:10]} "
            f"(owner classes {classes[:10]}): those classes have no samples in the push data. Include them "
            "or push with restrict_to_owner=False."
        )
    choice = torch.zeros(p, dtype=torch.long, device=device)
    if k > 1:
        triples = torch.cat([payload[1][..., None], payload[2]], dim=2).reshape(-1, 3)  # sample, row, col
        keys = torch.unique(triples, dim=0, return_inverse=True)[1].view(p, k)
        choice = _distinct_choice(owners, dist, keys).to(device)
    rows = torch.arange(p, device=device)
    vectors, sample_ids, locations = (tensor[rows, choice] for tensor in payload)
    return PushResult(vectors, dist[rows, choice], sample_ids, locations)


def nearest_samples(
    prototypes: torch.Tensor, metric: str, batches: Iterable[Sequence[torch.Tensor]], k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prototype's ``k`` nearest embeddings over all ``batches`` (of any class), nearest first:
    distances (P, k) and the samples' ids (P, k), -1 where fewer than ``k`` were seen.

    ``batches`` yield ``(embeddings (B, D), labels (B,), sample_ids (B,))`` as for a push (labels unused);
    memory is bounded by one batch; gathered across DDP ranks. What explanations show as the training
    images a prototype stands for (PALM's class prototypes, GCD's clusters).
    """
    if k < 1:
        raise ValueError(f"k (nearest samples per prototype) must be >= 1, got {k}")
    prototypes = prototypes.detach()
    p, d = prototypes.shape
    device = prototypes.device
    best = _RunningBest(prototypes, metric, k)
    all_ids = torch.arange(p, device=device)
    for number, batch in enumerate(batches):
        patches, _, sample_ids, locations = _flatten_batch(batch, d, number, device)
        ids = torch.arange(len(patches), device=device)
        best.update(all_ids, ids, patches.to(prototypes.dtype), sample_ids, locations)
    dist, (sample_ids,) = best.dist, (best.sample_ids,)
    if distributed.world_size() > 1:
        dist, (sample_ids,) = gather_best(dist, (sample_ids,))
    return dist, sample_ids


def gather_best(
    best_dist: torch.Tensor, payload: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, tuple[torch.Tensor, ...]]:
    """Each prototype's k best candidates (P, k) over all ranks (ties go to the lower rank).

    Only the distances are gathered; the winners' payload rows reach every rank by a sum in which the
    other ranks contribute zeros, so memory stays (P, k, D) whatever the world size.
    """
    p, k = best_dist.shape
    all_dist = distributed.all_gather(best_dist)  # (world, P, k)
    flat = all_dist.permute(1, 0, 2).reshape(p, -1)  # (P, world * k), lower ranks first
    dist, order = flat.sort(dim=1, stable=True)
    dist, order = dist[:, :k], order[:, :k]
    mine, slot = order // k == distributed.rank(), order % k  # (P, k)
    out = []
    for tensor in payload:  # (P, k, ...)
        shape = (p, k) + (1,) * (tensor.ndim - 2)
        picked = tensor.gather(1, slot.view(shape).expand_as(tensor))
        out.append(distributed.all_reduce_sum_(picked * mine.view(shape).to(tensor.dtype)))
    return dist, tuple(out)
