"""Run a test worker on several CPU processes (gloo) and collect what each rank saved."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_ranks(
    worker: Callable[[int, int, str], None], world: int, out_dir: Path, timeout: float = 120
) -> list:
    """Spawn ``worker(rank, port, out_dir)`` on ``world`` processes; each saves ``rank{r}.pt``."""
    context = mp.spawn(worker, args=(free_port(), str(out_dir)), nprocs=world, join=False)
    deadline = time.monotonic() + timeout
    while not context.join(timeout=1):
        if time.monotonic() > deadline:
            for process in context.processes:
                process.terminate()
            pytest.fail(
                f"DDP workers did not finish within {timeout} s (a collective is probably mismatched)"
            )
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
