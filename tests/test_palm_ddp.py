"""PALM under DDP (two CPU processes on gloo, each with half the batch): identical prototype banks on both
ranks, and the same Sinkhorn assignment, EMA step and gradients as one process holding the whole batch."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_helpers import run_ranks

from protolib.losses.palm import prototype_contrastive_loss
from protolib.models.palm import PALMNet

WORLD, N = 2, 12  # N samples in the global batch, N / WORLD per rank


def make_net() -> PALMNet:
    torch.manual_seed(0)
    return PALMNet(
        3, in_channels=1, backbone="small_cnn", embedding_dim=5, prototypes_per_class=3, topk=2, momentum=0.7
    )


def global_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.nn.functional.normalize(torch.randn(N, 5, generator=g), dim=1), torch.arange(N) % 3


def step(net: PALMNet, z: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
    """One PALM prototype step; the contrastive loss's gradient on the embeddings, as DDP would average it."""
    z = z.clone().requires_grad_(True)
    weights = net.assign(z, labels)
    calls = []
    original = dist.all_reduce
    dist.all_reduce = lambda *args, **kwargs: (calls.append(1), original(*args, **kwargs))[1]
    try:
        prototypes = net.update_prototypes(z, weights)
    finally:
        dist.all_reduce = original
    prototype_contrastive_loss(prototypes, net.bank.owners).backward()
    return {"weights": weights, "bank": net.bank.vectors.clone(), "grad": z.grad, "reduces": len(calls)}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        z, labels = global_batch()
        mine = slice(rank * N // WORLD, (rank + 1) * N // WORLD)
        record = step(make_net(), z[mine], labels[mine])
        record["grad"] = record["grad"] / WORLD  # DDP averages the ranks' gradients
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict[str, torch.Tensor]]:
    out_dir = tmp_path_factory.mktemp("palm_ddp")
    return run_ranks(worker, WORLD, out_dir)


def test_the_ema_step_all_reduces_once(records: list[dict[str, torch.Tensor]]) -> None:
    assert [record["reduces"] for record in records] == [
        1,
        1,
    ]  # sums and mass together, not again in the bank


def test_ranks_hold_identical_prototypes(records: list[dict[str, torch.Tensor]]) -> None:
    assert torch.equal(records[0]["bank"], records[1]["bank"])
    assert not torch.equal(records[0]["bank"], make_net().bank.vectors)  # the step did move them


def test_ddp_step_equals_one_process_with_the_whole_batch(records: list[dict[str, torch.Tensor]]) -> None:
    z, labels = global_batch()
    single = step(make_net(), z, labels)
    torch.testing.assert_close(torch.cat([r["weights"] for r in records]), single["weights"])
    torch.testing.assert_close(records[0]["bank"], single["bank"])
    torch.testing.assert_close(torch.cat([r["grad"] for r in records]), single["grad"])
