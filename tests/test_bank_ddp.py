"""Two CPU processes on gloo, each fed different data, must end with identical banks."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from ddp_helpers import run_ranks

from protolib.bank import PrototypeBank

WORLD, P, D, CLASSES = 2, 9, 6, 3


def initial_bank() -> PrototypeBank:
    torch.manual_seed(0)
    return PrototypeBank(P, D, owners=torch.arange(P) % CLASSES, metric="cosine")


def ema_inputs(rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(100 + rank)
    ids = torch.tensor([0, 4, 4]) if rank == 0 else torch.tensor([4, 7])
    return ids, torch.randn(len(ids), D, generator=g)


def push_batches(rank: int) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rank 0 sees classes {0, 1}, rank 1 classes {1, 2}: only the gathered push covers every class."""
    g = torch.Generator().manual_seed(200 + rank)
    labels = torch.tensor([0, 1, 1, 0, 1]) if rank == 0 else torch.tensor([2, 1, 2, 2])
    emb = torch.randn(len(labels), D, 3, 3, generator=g)
    ids = torch.arange(len(labels)) + 10 * rank  # dataset indices, disjoint between ranks
    return [(emb[i : i + 2], labels[i : i + 2], ids[i : i + 2]) for i in range(0, len(labels), 2)]


def structure_edits(bank: PrototypeBank, rank: int) -> None:
    """Edits whose arguments differ per rank (random split direction, added vectors): rank 0's must win."""
    bank.split(2, generator=torch.Generator().manual_seed(rank))
    bank.merge([0, 3])
    bank.add(torch.randn(2, D, generator=torch.Generator().manual_seed(300 + rank)), owners=[1, 2])
    bank.remove([5])


def state(bank: PrototypeBank) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bank.state_dict().items()}


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        record = {}
        bank = initial_bank()
        bank.ema_update(*ema_inputs(rank), momentum=0.8)
        record["ema"] = state(bank)
        distinct = bank.nearest_per_prototype(push_batches(rank), distinct=True)
        record["distinct_push_result"] = dataclasses.asdict(distinct)
        result = bank.nearest_per_prototype(push_batches(rank))
        record["push_result"] = dataclasses.asdict(result)
        bank.project(result, step=1)
        record["push"] = state(bank)
        lone = bank.nearest_per_prototype(push_batches(0) if rank == 0 else [], restrict_to_owner=False)
        record["lone_push_result"] = dataclasses.asdict(lone)
        try:
            bank.nearest_per_prototype([])
        except ValueError as error:
            record["empty_error"] = str(error)
        structure_edits(bank, rank)
        record["structure"] = state(bank)
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def assert_equal_tensors(a: dict, b: dict, exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for key in a:
        tol = {"rtol": 0, "atol": 0} if exact else {}
        torch.testing.assert_close(a[key], b[key], equal_nan=True, msg=key, **tol)


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    out_dir = tmp_path_factory.mktemp("ddp")
    return run_ranks(worker, WORLD, out_dir)


def test_ranks_hold_identical_banks(records: list[dict]) -> None:
    for key in ("ema", "push", "push_result", "distinct_push_result", "lone_push_result", "structure"):
        assert_equal_tensors(records[0][key], records[1][key])


def test_ema_update_averages_over_all_ranks(records: list[dict]) -> None:
    bank = initial_bank()
    ids, vectors = zip(*(ema_inputs(r) for r in range(WORLD)), strict=True)
    bank.ema_update(torch.cat(ids), torch.cat(vectors), momentum=0.8)  # one process, all the data
    assert_equal_tensors(records[0]["ema"], state(bank), exact=False)


def test_push_gathers_the_best_patch_across_ranks(records: list[dict]) -> None:
    bank = initial_bank()
    bank.load_state_dict(records[0]["ema"])
    everything = [batch for r in range(WORLD) for batch in push_batches(r)]
    expected = dataclasses.asdict(bank.nearest_per_prototype(everything))
    got = records[0]["push_result"]
    for key in ("sample_ids", "locations", "vectors"):
        assert torch.equal(got[key], expected[key]), key
    torch.testing.assert_close(got["distances"], expected["distances"])
    assert set(got["sample_ids"].tolist()) & {10, 11, 12, 13}, "rank 1's samples must win some prototypes"
    distinct = dataclasses.asdict(bank.nearest_per_prototype(everything, distinct=True))
    assert_equal_tensors(records[0]["distinct_push_result"], distinct, exact=False)
    bank.load_state_dict(records[0]["push"])
    lone = dataclasses.asdict(bank.nearest_per_prototype(push_batches(0), restrict_to_owner=False))
    assert_equal_tensors(records[1]["lone_push_result"], lone, exact=False)
    assert "empty dataloader" in records[0]["empty_error"] and "empty dataloader" in records[1]["empty_error"]


def test_structure_edits_follow_rank_zero(records: list[dict]) -> None:
    bank = initial_bank()
    bank.load_state_dict(records[0]["push"])
    structure_edits(bank, rank=0)
    assert_equal_tensors(records[1]["structure"], state(bank))
