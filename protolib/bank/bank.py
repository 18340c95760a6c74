"""PrototypeBank: prototype vectors, their owners and provenance, with a lazily synced FAISS index.

Shared by every model family (ProtoPNet, PALM, GCD, the MoE router); see DESIGN.md, "The prototype bank".
State (vectors, owners, metadata) lives in parameters/buffers so Lightning checkpoints restore it exactly;
the FAISS index is derived state, rebuilt on the next search only when the vectors changed.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from protolib.bank import distributed
from protolib.bank.index import INDEX_KINDS, METRICS, FaissIndex, build_index, exact_search
from protolib.bank.push import PushResult, nearest_patches, nearest_samples

# Per-prototype metadata buffers: name -> (trailing shape, dtype, fill value meaning "unknown").
METADATA: dict[str, tuple[tuple[int, ...], torch.dtype, float]] = {
    "source_sample": ((), torch.long, -1),  # dataset "index" of the sample the prototype was projected from
    "location": ((2,), torch.long, -1),  # (row, col) of that patch in the feature map
    "rf_box": ((4,), torch.long, -1),  # receptive field of that patch in input pixels: x0, y0, x1, y1
    "step": ((), torch.long, -1),  # training step of the last projection / EMA update / split / merge
    "score": ((), torch.float32, float("nan")),  # distance to the projected patch at projection time
}
# Restricted searches over at most this many candidates scan them exactly instead of filtering an
# approximate index (as fast at that size, and exact).
EXACT_SUBSET_MAX = 16384


class PrototypeBank(nn.Module):
    """P prototype vectors of dimension D, each owned by a class / cluster / expert, searchable with FAISS.

    Distances follow one convention everywhere, smaller is nearer: ``l2`` squared Euclidean, ``cosine``
    ``1 - cos``, ``ip`` ``-<q, p>``. Cosine banks keep unit vectors after every bank operation. Under
    torch.distributed, call every operation on every rank with the same arguments: EMA updates are averaged
    and pushes gathered across ranks, and structural edits are broadcast from rank 0, so ranks stay identical.
    Structural edits (add / remove / split / merge) change P but keep the ``vectors`` Parameter object: an
    optimizer holding per-parameter state (Adam) must be rebuilt after them.
    """

    vectors: torch.Tensor  # (P, D)
    owners: torch.Tensor  # (P,)

    def __init__(
        self,
        num_prototypes: int,
        dim: int,
        owners: Sequence[int] | torch.Tensor | None = None,
        metric: str = "l2",
        index: str = "flat",
        learnable: bool = True,
        index_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if metric not in METRICS:
            raise ValueError(f"Unknown metric {metric!r}; choose one of {METRICS}.")
        if index not in INDEX_KINDS:
            raise ValueError(f"Unknown index {index!r}; choose one of {INDEX_KINDS}.")
        if num_prototypes < 1 or dim < 1:
            raise ValueError(
                f"A bank needs num_prototypes >= 1 and dim >= 1, got {num_prototypes} and {dim}."
            )
        self.dim, self.metric, self.index_kind, self.learnable = int(dim), metric, index, learnable
        self.index_options = dict(index_options or {})
        build_index(self.dim, metric, index, **self.index_options)  # fail now on unknown / bad options
        owners = (
            torch.arange(num_prototypes) if owners is None else self._check_owners(owners, num_prototypes)
        )
        vectors = torch.randn(num_prototypes, self.dim)
        if metric == "cosine":
            vectors = F.normalize(vectors, dim=1)
        if learnable:
            self.vectors = nn.Parameter(vectors)
        else:
            self.register_buffer("vectors", vectors)
        self.register_buffer("owners", owners)
        for name, tensor in self._unknown_metadata(num_prototypes).items():
            self.register_buffer(name, tensor)
        self._index: FaissIndex | None = None
        self._indexed: torch.Tensor | None = None  # copy of the vectors the index was built from
        self.index_builds = 0

    # ------------------------------------------------------------------ state
    @property
    def num_prototypes(self) -> int:
        """P, the current number of prototypes."""
        return self.vectors.shape[0]

    @property
    def metadata(self) -> dict[str, torch.Tensor]:
        """Per-prototype provenance buffers: source_sample, location (P, 2), rf_box (P, 4), step, score."""
        return {name: getattr(self, name) for name in METADATA}

    def extra_repr(self) -> str:
        return f"P={self.num_prototypes}, D={self.dim}, metric={self.metric}, index={self.index_kind}"

    def _unknown_metadata(self, n: int) -> dict[str, torch.Tensor]:
        device = self.owners.device if hasattr(self, "owners") else None
        return {
            name: torch.full((n, *shape), fill, dtype=dtype, device=device)
            for name, (shape, dtype, fill) in METADATA.items()
        }

    def _rows(self) -> dict[str, torch.Tensor]:
        """Every per-prototype tensor (vectors, owners, metadata), detached."""
        return {"vectors": self.vectors.detach(), "owners": self.owners, **self.metadata}

    def _commit(self, rows: dict[str, torch.Tensor]) -> None:
        """Replace every per-prototype tensor at once (P may change); the Parameter object is kept."""
        with torch.no_grad():
            for name, tensor in rows.items():
                if name == "vectors" and self.learnable:
                    self.vectors.data = tensor.contiguous()
                else:
                    setattr(self, name, tensor.contiguous())

    def _resize(self, n: int) -> None:
        """Reallocate every per-prototype tensor for ``n`` prototypes (contents to be overwritten)."""
        rows = {"vectors": self.vectors.new_empty(n, self.dim), "owners": self.owners.new_zeros(n)}
        self._commit({**rows, **self._unknown_metadata(n)})

    def _load_from_state_dict(
        self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any
    ) -> None:
        # Checkpoints saved after add/remove/split/merge hold a different P: resize before loading.
        saved = state_dict.get(prefix + "vectors")
        if saved is not None and saved.shape[1:] == (self.dim,) and saved.shape[0] != self.num_prototypes:
            self._resize(saved.shape[0])  # (a different D is left for the size-mismatch error below)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def __getstate__(self) -> dict[str, Any]:
        # FAISS indexes do not pickle/deepcopy; they are derived state and rebuilt on demand.
        state = dict(super().__getstate__())
        state.update(_index=None, _indexed=None)
        return state

    # ------------------------------------------------------------------ validation
    def _check_owners(self, owners: Sequence[int] | torch.Tensor, n: int) -> torch.Tensor:
        owners = torch.as_tensor(owners)
        if owners.shape != (n,) or owners.is_floating_point() or owners.is_complex():
            raise ValueError(
                f"owners must be {n} integer ids (one per prototype), got shape {tuple(owners.shape)}."
            )
        if n and owners.min() < 0:
            raise ValueError("owners must be non-negative class / cluster / expert ids.")
        return owners.to(torch.long, copy=True)

    def _check_vectors(self, vectors: torch.Tensor, name: str, rows: int | None = None) -> torch.Tensor:
        vectors = torch.as_tensor(vectors)
        expected = f"({'N' if rows is None else rows}, {self.dim})"
        if (
            vectors.ndim != 2
            or vectors.shape[1] != self.dim
            or (rows is not None and vectors.shape[0] != rows)
        ):
            raise ValueError(
                f"{name} must have shape {expected} to match the bank, got {tuple(vectors.shape)}."
            )
        if not vectors.is_floating_point() or not torch.isfinite(vectors).all():
            raise ValueError(f"{name} must be finite floats; found NaN/inf or a non-float dtype.")
        return vectors.detach().to(self.vectors.device, self.vectors.dtype)

    def _check_ids(
        self, ids: Sequence[int] | torch.Tensor | int, name: str, unique: bool = True
    ) -> torch.Tensor:
        ids = torch.as_tensor(ids).reshape(-1)
        if ids.is_floating_point() or ids.is_complex():
            raise ValueError(f"{name} must be integer prototype ids.")
        ids = ids.to(self.owners.device, torch.long)
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.num_prototypes):
            raise ValueError(f"{name} out of range: the bank has prototypes 0..{self.num_prototypes - 1}.")
        if unique and ids.unique().numel() != ids.numel():
            raise ValueError(f"{name} contains duplicate prototype ids.")
        return ids

    def _check_queries(self, queries: torch.Tensor) -> torch.Tensor:
        return self._check_vectors(queries, "queries")

    def _normalized_if_cosine(self, vectors: torch.Tensor) -> torch.Tensor:
        return F.normalize(vectors, dim=1) if self.metric == "cosine" else vectors

    # ------------------------------------------------------------------ index and search
    @property
    def index(self) -> FaissIndex:
        """The FAISS index over the current vectors, rebuilt first if they changed since the last build."""
        current = self.vectors.detach()
        indexed = self._indexed
        stale = (
            self._index is None
            or indexed is None
            or indexed.shape != current.shape
            or indexed.device != current.device
            or indexed.dtype != current.dtype
            or not torch.equal(indexed, current)
        )
        if stale:
            # A content check rather than a version counter: fused optimizers and `.data` writes change the
            # vectors without bumping `Tensor._version`.
            index = build_index(self.dim, self.metric, self.index_kind, **self.index_options)
            index.add(current)
            self._index, self._indexed = index, current.clone()
            self.index_builds += 1
        return self._index

    def _candidates(self, owners: Sequence[int] | torch.Tensor | int) -> torch.Tensor:
        wanted = torch.as_tensor(owners).reshape(-1).to(self.owners.device, torch.long)
        present = torch.isin(wanted, self.owners)
        if wanted.numel() == 0 or not present.all():
            raise ValueError(
                f"search(owners=...) names owner(s) {wanted[~present].tolist()} with no prototypes; "
                f"owners in this bank: {self.owners.unique().tolist()[:20]}."
            )
        return torch.isin(self.owners, wanted).nonzero().flatten()

    @torch.no_grad()
    def search(
        self, queries: torch.Tensor, k: int, owners: Sequence[int] | torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``k`` nearest prototypes of each query (Q, D): dist (Q, k) (smaller = nearer), ids (Q, k).

        ``owners`` restricts the candidates to prototypes owned by those ids; exact for the flat index.
        """
        q = self._check_queries(queries)
        candidates = None if owners is None else self._candidates(owners)
        if candidates is not None and candidates.numel() == self.num_prototypes:
            candidates = None  # every prototype qualifies: the unrestricted index search is the same
        available = self.num_prototypes if candidates is None else candidates.numel()
        if not 1 <= int(k) <= available:
            raise ValueError(f"k={k} must be between 1 and the number of candidate prototypes ({available}).")
        k = int(k)
        q_np = q.cpu().numpy()
        if candidates is None:
            dist, ids = self.index.search(q_np, k)
        else:
            cand_np = candidates.cpu().numpy()
            if self.index_kind == "flat" or available <= EXACT_SUBSET_MAX or self.index.on_gpu:
                dist, sub = exact_search(q_np, self.vectors.detach()[candidates], k, self.metric)
                ids = cand_np[sub]
            else:
                dist, ids = self.index.search(q_np, k, subset=cand_np)
        self._fill_missing(q_np, k, dist, ids, candidates)
        device = queries.device if isinstance(queries, torch.Tensor) else torch.device("cpu")
        return torch.from_numpy(dist).to(device), torch.from_numpy(ids).to(device)

    def _fill_missing(
        self, q: np.ndarray, k: int, dist: np.ndarray, ids: np.ndarray, candidates: torch.Tensor | None
    ) -> None:
        """Approximate indexes can return fewer than k hits (id -1); redo those queries exactly, in place."""
        rows = np.flatnonzero((ids < 0).any(axis=1))
        if rows.size == 0:
            return
        base = self.vectors.detach() if candidates is None else self.vectors.detach()[candidates]
        d_exact, sub = exact_search(q[rows], base, k, self.metric)
        dist[rows] = d_exact
        ids[rows] = sub if candidates is None else candidates.cpu().numpy()[sub]

    def assign(
        self, queries: torch.Tensor, owners: Sequence[int] | torch.Tensor | int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Nearest prototype of each query (Q, D): (owner ids (Q,), prototype ids (Q,))."""
        _, ids = self.search(queries, 1, owners=owners)
        ids = ids[:, 0]
        return self.owners[ids.to(self.owners.device)].to(ids.device), ids

    # ------------------------------------------------------------------ push / projection
    def nearest_per_prototype(
        self,
        batches: Iterable[Sequence[torch.Tensor]],
        restrict_to_owner: bool = True,
        distinct: bool = False,
        allowed: torch.Tensor | None = None,
        queries: torch.Tensor | None = None,
    ) -> PushResult:
        """For every prototype, the nearest patch in ``batches`` (of its owner class if restricted; of the
        classes ``allowed`` (P, C) bool marks for it, if given; with ``distinct``, the nearest one no other
        prototype of its owner took).

        ``batches`` yields ``(embeddings (B, D, H, W) or (B, D), labels (B,), sample_ids (B,))``; memory is
        bounded by one batch. The bank is not modified (see :meth:`project`). Gathered across DDP ranks.
        ``queries`` (P, D) replace the vectors in the comparison, for models that score a transform of their
        prototypes (Deformable ProtoPNet normalises every part).
        """
        if queries is not None and queries.shape != self.vectors.shape:
            raise ValueError(
                f"push queries must have the bank's shape {tuple(self.vectors.shape)}, got "
                f"{tuple(queries.shape)}"
            )
        vectors = self.vectors if queries is None else queries
        return nearest_patches(
            vectors, self.owners, self.metric, batches, restrict_to_owner, distinct=distinct, allowed=allowed
        )

    @torch.no_grad()
    def nearest_samples(
        self, batches: Iterable[Sequence[torch.Tensor]], k: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The reverse search for pooled embeddings: each prototype's ``k`` nearest samples in ``batches``
        of ``(embeddings (B, D), labels, sample_ids)``, whatever their class: distances (P, k) in the bank's
        metric, smaller = nearer, and sample ids (P, k), -1 where fewer than ``k`` exist."""
        return nearest_samples(self.vectors, self.metric, batches, k)

    @torch.no_grad()
    def project(
        self, result: PushResult, rf_boxes: torch.Tensor | None = None, step: int | None = None
    ) -> None:
        """Copy the pushed patches into the bank and record where they came from (cosine: re-normalised)."""
        p = self.num_prototypes
        vectors = self._check_vectors(result.vectors, "PushResult.vectors", rows=p)
        checks = {
            "distances": (result.distances, (p,)),
            "sample_ids": (result.sample_ids, (p,)),
            "locations": (result.locations, (p, 2)),
        }
        if rf_boxes is not None:
            checks["rf_boxes"] = (rf_boxes, (p, 4))
        for name, (tensor, shape) in checks.items():
            if torch.as_tensor(tensor).shape != shape:
                got = tuple(torch.as_tensor(tensor).shape)
                raise ValueError(f"{name} must have shape {shape} for this bank, got {got}.")
        boxes = torch.full((p, 4), -1) if rf_boxes is None else torch.as_tensor(rf_boxes)
        if boxes.is_floating_point():
            boxes = boxes.round()
        rows = self._rows()
        rows.update(
            vectors=self._normalized_if_cosine(vectors),
            source_sample=torch.as_tensor(result.sample_ids).to(self.owners.device, torch.long),
            location=torch.as_tensor(result.locations).to(self.owners.device, torch.long),
            rf_box=boxes.to(self.owners.device, torch.long),
            step=torch.full((p,), -1 if step is None else int(step), device=self.owners.device),
            score=torch.as_tensor(result.distances).to(self.owners.device, torch.float32),
        )
        self._commit(rows)

    # ------------------------------------------------------------------ updates
    @torch.no_grad()
    def ema_update(
        self,
        ids: Sequence[int] | torch.Tensor,
        vectors: torch.Tensor,
        momentum: float,
        step: int | None = None,
    ) -> None:
        """``p <- momentum * p + (1 - momentum) * mean(vectors assigned to p)`` for each prototype in ``ids``.

        Repeated ids are averaged first; under DDP the per-prototype sums and counts are all-reduced, so every
        rank applies the same global mean. Cosine banks are re-normalised.
        """
        ids = self._check_ids(ids, "ema_update ids", unique=False)
        vectors = self._check_vectors(vectors, "ema_update vectors", rows=ids.numel())
        sums = torch.zeros_like(self.vectors.detach()).index_add_(
            0, ids.to(vectors.device), vectors
        )  # (P, D)
        counts = torch.zeros(self.num_prototypes, device=vectors.device).index_add_(
            0, ids.to(vectors.device), torch.ones(ids.numel(), device=vectors.device)
        )  # (P,)
        self.ema_update_from_sums(sums, counts, momentum, step)

    @torch.no_grad()
    def ema_update_from_sums(
        self,
        sums: torch.Tensor,
        weights: torch.Tensor,
        momentum: float,
        step: int | None = None,
        reduce: bool = True,
    ) -> None:
        """``p <- momentum * p + (1 - momentum) * sums_p / weights_p`` for every prototype with weight > 0.

        ``sums`` (P, D) are weighted sums of the vectors assigned to each prototype, ``weights`` (P,) their
        total weights (counts, or soft assignment mass). Under DDP they are summed over ranks in one
        all-reduce (``reduce=False``: the caller already holds the global sums). Cosine banks re-normalise.
        """
        if not 0.0 <= float(momentum) <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}.")
        sums = self._check_vectors(sums, "ema_update_from_sums sums", rows=self.num_prototypes).detach()
        if weights.shape != (self.num_prototypes,):
            raise ValueError(f"weights must have shape ({self.num_prototypes},), got {tuple(weights.shape)}")
        if reduce and distributed.world_size() > 1:
            packed = torch.cat([sums.float(), weights.detach().float()[:, None].to(sums.device)], dim=1)
            distributed.all_reduce_sum_(packed)  # one collective for sums and weights, (P, D + 1)
            sums, weights = packed[:, :-1], packed[:, -1]
        counts = weights.detach().to(sums.device)
        hit = counts > 0
        rows = self._rows()
        new = rows["vectors"].clone()
        mean = sums[hit] / counts[hit, None]
        new[hit] = self._normalized_if_cosine(momentum * new[hit] + (1 - momentum) * mean)
        rows["vectors"] = new
        if step is not None:
            rows["step"] = torch.where(hit.to(self.owners.device), int(step), rows["step"])
        self._commit(rows)

    @torch.no_grad()
    def normalize_(self) -> PrototypeBank:
        """Scale every prototype to unit L2 norm, in place."""
        self._commit({"vectors": F.normalize(self.vectors.detach(), dim=1)})
        return self

    # ------------------------------------------------------------------ structure edits
    def _sync_from_rank0(self) -> None:
        """Make every rank's bank identical to rank 0's (edits may differ per rank, e.g. random splits)."""
        if distributed.world_size() == 1:
            return
        size = distributed.broadcast_(torch.tensor([self.num_prototypes], device=self.owners.device))
        if int(size.item()) != self.num_prototypes:
            self._resize(int(size.item()))
        for tensor in self._rows().values():
            distributed.broadcast_(tensor)

    @torch.no_grad()
    def add(self, vectors: torch.Tensor, owners: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Append prototypes (N, D) owned by ``owners`` (N,); returns their new ids (N,)."""
        vectors = self._check_vectors(vectors, "add vectors")
        owners = self._check_owners(owners, vectors.shape[0]).to(self.owners.device)
        old = self.num_prototypes
        rows = self._rows()
        new_rows = {
            "vectors": self._normalized_if_cosine(vectors),
            "owners": owners,
            **self._unknown_metadata(vectors.shape[0]),
        }
        self._commit({name: torch.cat([rows[name], new_rows[name]]) for name in rows})
        self._sync_from_rank0()
        return torch.arange(old, self.num_prototypes, device=self.owners.device)

    def _keep_rows(self, removed: torch.Tensor, allow_empty_owners: bool) -> torch.Tensor:
        keep = torch.ones(self.num_prototypes, dtype=torch.bool, device=self.owners.device)
        keep[removed] = False
        if not keep.any():
            raise ValueError("Cannot remove every prototype; a bank needs at least one.")
        lost = set(self.owners.tolist()) - set(self.owners[keep].tolist())
        if lost and not allow_empty_owners:
            raise ValueError(
                f"Removing these prototypes leaves owner(s) {sorted(lost)} with no prototypes; pass "
                "allow_empty_owners=True if that is intended."
            )
        return keep.nonzero().flatten()

    @torch.no_grad()
    def remove(self, ids: Sequence[int] | torch.Tensor, allow_empty_owners: bool = False) -> torch.Tensor:
        """Delete prototypes; returns the survivors' old ids in their new order (to remap e.g. a head)."""
        kept = self._keep_rows(self._check_ids(ids, "remove ids"), allow_empty_owners)
        self._commit({name: tensor[kept] for name, tensor in self._rows().items()})
        self._sync_from_rank0()
        return kept

    @torch.no_grad()
    def split(
        self,
        id: int,  # the interface name (shadows the builtin)
        direction: torch.Tensor | None = None,
        scale: float = 0.05,
        step: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Split prototype ``id`` into children ``p + delta`` (kept at ``id``) and ``p - delta`` (appended).

        ``delta`` is ``direction`` as given (e.g. sqrt(eigenvalue) * eigenvector of a cluster), or a random
        direction of length ``scale * |p|``. Children share the parent's owner and metadata. Returns both ids.
        """
        (pid,) = self._check_ids([id], "split id").tolist()
        parent = self.vectors.detach()[pid]
        if direction is None:
            noise = torch.randn(self.dim, generator=generator).to(parent)
            delta = F.normalize(noise, dim=0) * scale * parent.norm().clamp_min(1e-12)
        else:
            direction = torch.as_tensor(direction).reshape(1, -1)
            delta = self._check_vectors(direction, "split direction", rows=1)[0]
        children = self._normalized_if_cosine(torch.stack([parent + delta, parent - delta]))
        if torch.equal(children[0], children[1]):
            raise ValueError(
                "split direction is zero (or parallel to a cosine prototype): the children coincide."
            )
        rows = self._rows()
        rows = {name: torch.cat([tensor, tensor[pid : pid + 1]]) for name, tensor in rows.items()}
        rows["vectors"][pid] = children[0]
        rows["vectors"][-1] = children[1]
        if step is not None:
            rows["step"][[pid, -1]] = int(step)
        self._commit(rows)
        self._sync_from_rank0()
        return torch.tensor([pid, self.num_prototypes - 1], device=self.owners.device)

    @torch.no_grad()
    def merge(
        self,
        ids: Sequence[int] | torch.Tensor,
        weights: Sequence[float] | torch.Tensor | None = None,
        step: int | None = None,
    ) -> torch.Tensor:
        """Merge prototypes ``ids`` (>= 2) into their (weighted) mean, kept at ``ids[0]`` with its owner.

        The others are removed; returns the old ids of the survivors in their new order, like :meth:`remove`.
        """
        ids = self._check_ids(ids, "merge ids")
        if ids.numel() < 2:
            raise ValueError(f"merge needs at least two prototype ids, got {ids.tolist()}.")
        w = torch.ones(ids.numel()) if weights is None else torch.as_tensor(weights, dtype=torch.float32)
        if w.shape != ids.shape or not torch.isfinite(w).all() or (w < 0).any() or w.sum() <= 0:
            raise ValueError(
                f"merge weights must be {ids.numel()} finite non-negative numbers with a positive sum."
            )
        w = w.to(self.vectors.device, self.vectors.dtype)
        mean = (w[:, None] * self.vectors.detach()[ids]).sum(0) / w.sum()
        if self.metric == "cosine" and mean.norm() < 1e-6:
            raise ValueError("merge of opposite cosine prototypes: their mean is ~0 and has no direction.")
        kept = self._keep_rows(ids[1:], allow_empty_owners=True)
        rows = self._rows()
        rows["vectors"] = rows["vectors"].clone()
        rows["vectors"][ids[0]] = self._normalized_if_cosine(mean[None])[0]
        if step is not None:
            rows["step"] = rows["step"].clone()
            rows["step"][ids[0]] = int(step)
        self._commit({name: tensor[kept] for name, tensor in rows.items()})
        self._sync_from_rank0()
        return kept
