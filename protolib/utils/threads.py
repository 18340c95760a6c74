"""One setting for the CPU threads of torch and FAISS, so their two OpenMP pools do not oversubscribe."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def available_cpus() -> int:
    """CPUs this process may run on (its affinity mask, e.g. a container's or SLURM's share)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def default_threads() -> int:
    """``$OMP_NUM_THREADS`` when set, else half the available CPUs (at least 1).

    Half, because torch's and FAISS's thread pools, the data loader and whatever else runs on the machine
    share the cores: on a 2-core machine with one other busy process the default job took 388 s with both
    pools at full size and 46 s with one thread each.
    """
    value = os.environ.get("OMP_NUM_THREADS", "").strip()
    if value:
        try:
            threads = int(value)
        except ValueError as err:
            raise ValueError(f"OMP_NUM_THREADS={value!r} is not a whole number of threads") from err
        if threads < 1:
            raise ValueError(f"OMP_NUM_THREADS={value!r} must be at least 1")
        return threads
    return max(1, available_cpus() // 2)


def configure_threads(threads: int | None = None) -> int:
    """Set torch's and FAISS's CPU threads to ``threads`` (None: :func:`default_threads`); returns it."""
    threads = default_threads() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be at least 1 (or null for the default), got {threads}")
    torch.set_num_threads(threads)
    try:
        import faiss

        faiss.omp_set_num_threads(threads)
    except ImportError:  # faiss is a dependency; without it there is no second pool to size
        pass
    log.info("CPU threads: %d for torch and FAISS", threads)
    return threads
