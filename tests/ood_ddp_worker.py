"""A DDP worker for the held-out OOD callback's split extraction, in a module with light imports (every
spawned process imports it)."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn

from protolib.ood.features import extract_split_across_ranks

WORLD, ITEMS = 2, 11  # an odd length: the DistributedSampler pads one rank


class Tiny(nn.Module):
    """extract(): logits and features of a fixed linear map of the flattened image."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.layer = nn.Linear(16 * 16, 3)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = images.flatten(1)
        return {"features": features, "logits": self.layer(features)}


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    return [{"image": torch.rand(1, 16, 16, generator=g), "label": i % 3} for i in range(ITEMS)]


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        seen = []
        model = Tiny()
        original = model.extract
        model.extract = lambda images: (seen.append(len(images)), original(images))[1]
        features = extract_split_across_ranks(model, dataset(), batch_size=4)
        torch.save({"features": features, "seen": sum(seen)}, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()
