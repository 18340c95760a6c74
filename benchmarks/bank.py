"""Prototype-bank benchmark: FAISS search against torch brute force, and push time / peak memory.

    PYTHONPATH=. python benchmarks/bank.py           # full: 1,000,000 x 128 bank, 10,000 queries; 50k images
    PYTHONPATH=. python benchmarks/bank.py --quick   # small smoke size (seconds)

Prints tables and writes JSON atomically (benchmarks/results/bank.json, or bank_quick.json with --quick).
Timings are search-only (index build times are reported separately); speed-ups are against
``torch.cdist`` + ``topk`` on the same data and queries. Approximate indexes are scored by recall@k against
the exact neighbours, on clustered vectors (drawn around many centres, as real embeddings are).
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import time
from collections.abc import Iterator
from pathlib import Path

import faiss
import numpy as np
import torch

from protolib.bank import PrototypeBank, build_index
from protolib.bank.index import DEFAULT_OPTIONS
from protolib.utils.io import atomic_write_json

FULL = {
    "n": 1_000_000,
    "queries": 10_000,
    "centres": 1000,
    "prototypes": 2000,
    "classes": 200,
    "push_images": [12_500, 25_000, 50_000],
}
QUICK = {
    "n": 50_000,
    "queries": 1000,
    "centres": 100,
    "prototypes": 200,
    "classes": 20,
    "push_images": [500, 1000, 2000],
}
HNSW_EF_SWEEP = [16, 32, 64, 128]
IVF_NPROBE_SWEEP = [4, 8, 16, 32]


def clustered(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    """n points (drawn with ``seed``) around the same ``centres`` Gaussian centres (spread 1, scale 3)."""
    c = torch.randn(centres, dim, generator=torch.Generator().manual_seed(0)) * 3
    g = torch.Generator().manual_seed(seed)
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):  # fill in blocks to keep the temporary noise small
        stop = min(n, start + 100_000)
        out[start:stop] = c[torch.randint(centres, (stop - start,), generator=g)]
        out[start:stop] += torch.randn(stop - start, dim, generator=g)
    return out


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def torch_brute_force(x: torch.Tensor, q: torch.Tensor, k: int, chunk: int = 128) -> np.ndarray:
    """Exact k nearest ids with torch.cdist + topk, queries chunked to bound memory (chunk x N floats)."""
    out = torch.empty(len(q), k, dtype=torch.long)
    for start in range(0, len(q), chunk):
        out[start : start + chunk] = torch.cdist(q[start : start + chunk], x).topk(k, largest=False).indices
    return out.numpy()


def recall_at_k(found: np.ndarray, truth: np.ndarray) -> float:
    """Fraction of the true k nearest neighbours found (per query set overlap, averaged)."""
    hits = sum(len(set(f) & set(t)) for f, t in zip(found.tolist(), truth.tolist(), strict=True))
    return hits / truth.size


def bench_search(n: int, num_queries: int, centres: int, dim: int, k: int) -> list[dict]:
    print(f"search: {n:,} x {dim} clustered vectors ({centres} centres), {num_queries:,} queries, k={k}")
    x, q = clustered(n, dim, centres, seed=1), clustered(num_queries, dim, centres, seed=2)
    truth, brute_s = timed(torch_brute_force, x, q, k)
    rows = [
        {"method": "torch.cdist+topk", "build_s": 0.0, "search_s": brute_s, "recall": 1.0, "speedup": 1.0}
    ]
    x_np, q_np = x.numpy(), q.numpy()
    for kind, knob, values in (
        ("flat", None, [None]),
        ("ivf", "nprobe", IVF_NPROBE_SWEEP),
        ("hnsw", "efSearch", HNSW_EF_SWEEP),
    ):
        index = build_index(dim, "l2", kind)
        _, build_s = timed(index.add, x_np)
        for value in values:
            if kind == "ivf":
                index.nprobe = value
            elif kind == "hnsw":
                index.ef_search = value
            (_, ids), search_s = timed(index.search, q_np, k)
            default = value is None or DEFAULT_OPTIONS[kind][knob] == value
            rows.append(
                {
                    "method": kind
                    if value is None
                    else f"{kind} {knob}={value}" + (" (default)" if default else ""),
                    "build_s": build_s,
                    "search_s": search_s,
                    "recall": recall_at_k(ids, truth),
                    "speedup": brute_s / search_s,
                }
            )
            print(f"  {rows[-1]['method']}: recall {rows[-1]['recall']:.4f}, {rows[-1]['speedup']:.1f}x")
        del index
    return rows


def _push_batches(num_images: int, batch: int, dim: int, classes: int) -> Iterator[tuple]:
    """Streams (B, D, 7, 7) patch maps; a small pool of random maps is reused so data costs nothing."""
    g = torch.Generator().manual_seed(1)
    pool = [torch.randn(batch, dim, 7, 7, generator=g) for _ in range(4)]
    for number, start in enumerate(range(0, num_images, batch)):
        b = min(batch, num_images - start)
        ids = torch.arange(start, start + b)
        yield pool[number % len(pool)][:b], ids % classes, ids


def _memory_kib(field: str) -> int:
    """``VmRSS`` (now) or ``VmHWM`` (peak since the last reset) of this process, from /proc (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise ValueError(f"/proc/self/status has no {field} line; the push memory benchmark needs Linux.")


def _push_child(
    num_images: int, prototypes: int, classes: int, dim: int, batch: int, threads: int, queue
) -> None:
    """Run one push in a fresh process and report its time and the peak RSS it adds to the process."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    bank = PrototypeBank(prototypes, dim, owners=torch.arange(prototypes) % classes, learnable=False)
    base_kib = _memory_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    bank.nearest_per_prototype(_push_batches(batch, batch, dim, classes), restrict_to_owner=False)  # warm-up
    result, seconds = timed(bank.nearest_per_prototype, _push_batches(num_images, batch, dim, classes))
    peak_kib = _memory_kib("VmHWM")
    assert torch.isfinite(result.distances).all()
    queue.put(
        {
            "images": num_images,
            "patches": num_images * 49,
            "seconds": seconds,
            "images_per_s": num_images / seconds,
            "push_peak_rss_mib": (peak_kib - base_kib) / 1024,  # above the process before any push
            "peak_rss_mib": peak_kib / 1024,
        }
    )


def bench_push(
    sizes: list[int], prototypes: int, classes: int, dim: int, batch: int, threads: int
) -> list[dict]:
    print(f"push: {prototypes} prototypes x {dim}, 7x7 patch maps, batches of {batch} images")
    context = multiprocessing.get_context("spawn")
    rows = []
    for size in sizes:
        queue = context.Queue()
        process = context.Process(
            target=_push_child, args=(size, prototypes, classes, dim, batch, threads, queue)
        )
        process.start()
        rows.append(queue.get())
        process.join()
        row = rows[-1]
        print(f"  {size:,} images: {row['seconds']:.1f} s, push peak RSS {row['push_peak_rss_mib']:.0f} MiB")
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    cells = [
        [
            f"{r[c]:,.4g}" if isinstance(r[c], float) else f"{r[c]:,}" if isinstance(r[c], int) else str(r[c])
            for c in columns
        ]
        for r in rows
    ]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    lines += [" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="small smoke size instead of the full benchmark")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and FAISS threads")
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--push-batch", type=int, default=250, help="images per push batch")
    parser.add_argument("--skip", choices=["search", "push"], action="append", default=[])
    for key in ("n", "queries", "centres", "prototypes", "classes"):
        parser.add_argument(f"--{key}", type=int, default=None, help=f"override the preset's {key}")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/bank*.json)"
    )
    args = parser.parse_args(argv)
    size = dict(QUICK if args.quick else FULL)
    size.update({key: value for key in size if (value := getattr(args, key, None)) is not None})
    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    report = {
        "quick": args.quick,
        "threads": args.threads,
        "machine": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "faiss": faiss.__version__,
        "defaults": DEFAULT_OPTIONS,
        "sizes": size,
    }
    if "search" not in args.skip:
        report["search"] = bench_search(size["n"], size["queries"], size["centres"], args.dim, args.k)
    if "push" not in args.skip:
        report["push"] = bench_push(
            size["push_images"], size["prototypes"], size["classes"], args.dim, args.push_batch, args.threads
        )
    if "search" in report:
        print("\n" + table(report["search"], ["method", "build_s", "search_s", "recall", "speedup"]))
    if "push" in report:
        print(
            "\n"
            + table(
                report["push"],
                ["images", "patches", "seconds", "images_per_s", "push_peak_rss_mib", "peak_rss_mib"],
            )
        )
    out = args.out or Path(__file__).parent / "results" / ("bank_quick.json" if args.quick else "bank.json")
    atomic_write_json(out, report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
