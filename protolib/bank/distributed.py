"""The few torch.distributed collectives the bank needs; each is a no-op outside a multi-process run."""

from __future__ import annotations

from collections.abc import Iterator, Sized

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler


def world_size() -> int:
    """Number of processes in the default group, 1 when torch.distributed is not initialised."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    """This process's rank in the default group, 0 when torch.distributed is not initialised."""
    return dist.get_rank() if world_size() > 1 else 0


def all_reduce_sum_(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all ranks, in place."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Stack ``tensor`` from every rank: (world_size, *tensor.shape)."""
    if world_size() == 1:
        return tensor.unsqueeze(0)
    out = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(out, tensor.contiguous())
    return torch.stack(out)


def broadcast_(tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Overwrite ``tensor`` on every rank with rank ``src``'s, in place."""
    if world_size() > 1:
        dist.broadcast(tensor, src=src)
    return tensor


class RankShardSampler(DistributedSampler):
    """This rank's share of a dataset in order: rank r of W gets items r, r + W, r + 2W, ...

    A ``DistributedSampler(shuffle=False)`` without its padding: padded items would be seen twice (counted
    twice by a push, twice among a prototype's nearest images when pruning). Shares may differ by one item;
    what consumes them gathers once at the end (the bank's reverse search), never per batch.
    """

    def __init__(self, dataset: Sized) -> None:
        super().__init__(dataset, shuffle=False, drop_last=False)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))
