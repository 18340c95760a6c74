"""Mixture-of-experts benchmarks: the MoE block's speed, and dense vs softmax vs prototype MoE ViTs.

    PYTHONPATH=. python benchmarks/moe.py --part speed      # (b) block forward + backward timings
    PYTHONPATH=. python benchmarks/moe.py --part accuracy   # (a) digits and parts, 3 seeds each
    PYTHONPATH=. python benchmarks/moe.py --quick           # both, smoke sizes (about two minutes)

(b) Forward + backward of one MoE MLP (prototype router, top-1, experts of width 2·dim plus one shared expert
of width 2·dim) on 4,096 tokens of dim 192, against the dense MLP with the same active parameters (width
4·dim) and a naive masked loop (every expert on every token, masked by its gate): median of repeated runs.
(a) Trains ``experiment=promoe_vit_<data>``, ``softmax_moe_vit_<data>`` and ``dense_vit_<data>`` (same
active parameters) for 3 seeds and reports test accuracy, the normalised entropy of the explained (last)
MoE layer's expert usage on the test images and, on parts, routing purity (explain.routing.routing_purity).
To fit a shared 2-core CPU the ViT is shrunk from the shipped configs (``SMALL``: 64-d, 4 blocks, MoE in
blocks 1 and 3, 15 epochs); pass ``--as-shipped`` for the experiment configs unchanged (96-d, 6 blocks,
30 epochs). Prints tables and writes JSON atomically, with the thread count, to
benchmarks/results/moe[_speed|_accuracy][_gpu][_quick].json.
"""

from __future__ import annotations

import argparse
import functools
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from timm.layers import Mlp

from explain.routing import collect_routing, routing_purity
from protolib.cli.train import CONFIG_DIR
from protolib.lit.checkpoint import build_module
from protolib.nn.moe import MoEMLP, normalized_entropy
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = {"dense": "dense_vit_{}", "softmax": "softmax_moe_vit_{}", "prototype": "promoe_vit_{}"}
SMALL = [
    "model.net.backbone_options.embed_dim=64",
    "model.net.backbone_options.depth=4",
    "model.net.backbone_options.num_heads=2",
    "trainer.max_epochs=15",
]
QUICK = ["trainer.max_epochs=1", "trainer.limit_train_batches=3", "data.image_size=16"]


def naive_masked(block: MoEMLP, tokens: torch.Tensor) -> torch.Tensor:
    """The loop a first implementation writes: every expert on all N tokens, masked by its gates."""
    routing = block.router(tokens)
    out = block.shared(tokens) if block.shared is not None else torch.zeros_like(tokens)
    for e in range(block.num_experts):
        weight = (routing.gates * (routing.experts == e)).sum(1, keepdim=True)  # (N, 1), 0 if not chosen
        hidden = block.act(tokens @ block.w1[e] + block.b1[e])
        out = out + weight * (hidden @ block.w2[e] + block.b2[e])
    return out


def time_step(fn: Any, x: torch.Tensor, repeats: int) -> float:
    """Median seconds of ``fn(x).square().mean().backward()`` after one warm-up run."""
    times = []
    for i in range(repeats + 1):
        x.grad = None
        if x.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn(x).square().mean().backward()
        if x.is_cuda:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def bench_speed(tokens: int, dim: int, experts: list[int], repeats: int, device: str) -> list[dict]:
    """Rows of block timings: MoE (sorted dispatch), dense MLP of equal active width, naive masked loop."""
    torch.manual_seed(0)
    x = torch.randn(tokens, dim, device=device, requires_grad=True)
    dense = Mlp(dim, 4 * dim).to(device)
    dense_s = time_step(dense, x, repeats)
    rows = [{"model": "dense MLP", "experts": 0, "active_hidden": 4 * dim, "seconds": dense_s}]
    for count in experts:
        block = MoEMLP(dim, num_experts=count, expert_hidden=2 * dim, num_shared=1).to(device)
        moe_s = time_step(block, x, repeats)
        naive_s = time_step(functools.partial(naive_masked, block), x, repeats)
        rows.append(
            {
                "model": "MoE (sorted dispatch)",
                "experts": count,
                "active_hidden": block.active_hidden,
                "seconds": moe_s,
                "vs_dense": moe_s / dense_s,
            }
        )
        rows.append(
            {
                "model": "naive masked loop",
                "experts": count,
                "active_hidden": block.active_hidden,
                "seconds": naive_s,
                "vs_dense": naive_s / dense_s,
                "moe_speedup": naive_s / moe_s,
            }
        )
    return rows


def train_and_score(data: str, model: str, seed: int, overrides: list[str]) -> dict[str, Any]:
    """Train one experiment on CPU and score it on the test split: accuracy, usage entropy, purity."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"experiment={MODELS[model].format(data)}",
                f"seed={seed}",
                "trainer.accelerator=cpu",
                "output_dir=/tmp",
                *overrides,
            ],
        )
    L.seed_everything(seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    build = {"num_classes": datamodule.num_classes, "in_channels": datamodule.in_channels}
    module = build_module(cfg.model, build | {"image_size": datamodule.image_size})
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    accuracy = trainer.test(module, datamodule=datamodule, verbose=False)[0]["test/acc"]
    row = {"data": data, "model": model, "seed": seed, "accuracy": float(accuracy), "train_seconds": seconds}
    net = module.net
    row["parameters"] = sum(p.numel() for p in net.parameters())
    if net.moe_blocks:
        summary = collect_routing(net, datamodule.test_dataset)
        row["usage_entropy"] = float(normalized_entropy(summary.share(net.explained.num_experts)))
        if summary.parts is not None:
            row["routing_purity"] = routing_purity(summary.experts, summary.parts)
    print(row, flush=True)
    return row


def summarise(runs: list[dict]) -> list[dict]:
    """Mean ± std over seeds per (data, model)."""
    rows = []
    for data in dict.fromkeys(r["data"] for r in runs):
        for model in MODELS:
            group = [r for r in runs if r["data"] == data and r["model"] == model]
            if not group:
                continue
            row: dict[str, Any] = {"data": data, "model": model, "seeds": len(group)}
            for key in ("accuracy", "usage_entropy", "routing_purity", "train_seconds"):
                values = [r[key] for r in group if key in r]
                if values:
                    row[key] = f"{np.mean(values):.3f} ± {np.std(values):.3f}"
            row["parameters"] = group[0]["parameters"]
            rows.append(row)
    return rows


def table(rows: list[dict], columns: list[str]) -> str:
    """A markdown table of ``rows`` (floats with 3 significant digits)."""
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = [f"{row[c]:.3g}" if isinstance(row.get(c), float) else str(row.get(c, "")) for c in columns]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Run the chosen parts, print tables, write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["speed", "accuracy", "all"], default="all")
    parser.add_argument("--quick", action="store_true", help="smoke sizes")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (speed part)")
    parser.add_argument("--data", nargs="+", default=["digits", "parts"], help="accuracy part: datasets")
    parser.add_argument("--seeds", type=int, default=3, help="accuracy part: seeds per model")
    parser.add_argument(
        "--models", nargs="+", choices=list(MODELS), default=list(MODELS), help="accuracy part"
    )
    parser.add_argument("--as-shipped", action="store_true", help="accuracy part: experiment configs as is")
    parser.add_argument("--override", nargs="*", default=[], help="accuracy part: extra Hydra overrides")
    parser.add_argument("--out", type=Path, default=None, help="JSON path (default results/moe*.json)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report: dict[str, Any] = {
        "threads": args.threads,
        "device": args.device if args.device == "cpu" else torch.cuda.get_device_name(),
        "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__,
    }
    if args.part in ("speed", "all"):
        tokens = 1024 if args.quick else 4096
        rows = bench_speed(tokens, 192, [8, 16], repeats=3 if args.quick else 10, device=args.device)
        report["speed"] = {"tokens": tokens, "dim": 192, "rows": rows}
        print(f"MoE block forward + backward, {tokens} tokens x 192, {args.threads} thread(s), {args.device}")
        print(table(rows, ["model", "experts", "active_hidden", "seconds", "vs_dense", "moe_speedup"]))
    if args.part in ("accuracy", "all"):
        overrides = [*(QUICK if args.quick else ([] if args.as_shipped else SMALL)), *args.override]
        seeds = 1 if args.quick else args.seeds
        runs = [
            train_and_score(data, model, seed, overrides)
            for data in args.data
            for seed in range(seeds)  # seed-major: a run cut short still compares every model
            for model in args.models
        ]
        summary = summarise(runs)
        report["accuracy"] = {"overrides": overrides, "runs": runs, "summary": summary}
        print(f"Test accuracy, usage entropy, routing purity: mean ± std over {seeds} seed(s)")
        columns = [
            "data",
            "model",
            "parameters",
            "accuracy",
            "usage_entropy",
            "routing_purity",
            "train_seconds",
        ]
        print(table(summary, columns))
    name = "moe" + ("" if args.part == "all" else f"_{args.part}") + ("_gpu" if args.device != "cpu" else "")
    name += "_quick.json" if args.quick else ".json"
    out = args.out or RESULTS / name
    atomic_write_json(out, report)
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()
