"""PALM vs the plain baseline on the built-in digits OOD benchmark: AUROC / FPR95 per OOD set, training time.

    PYTHONPATH=. python benchmarks/palm.py           # full: experiment configs as shipped (32 px), 3 seeds
    PYTHONPATH=. python benchmarks/palm.py --quick   # smoke: 16 px, 2 epochs, 1 seed (about a minute)

ID: digits 0-5 (``experiment=baseline_digits`` with ``data.classes=[0..5]``, and ``experiment=palm_digits``);
OOD sets from ``conf/ood/benchmark/digits.yaml``: near = the held-out digits 6-9, far = seeded noise and the
procedural parts images. Both models are scored with MSP, Energy and KNN (k = 50, normalised backbone
features); PALM also with its own scores: ``palm_ssd`` (the reference's Mahalanobis on normalised,
standardised features), ``palm_mds`` (OpenOOD's class-conditional Mahalanobis) and ``palm`` (the mixture
likelihood of the embedding). FPR95 is the classic convention (OOD accepted at 95% ID recall). Training time
is ``trainer.fit`` wall time (no OOD callback, no checkpointing; 1 CPU thread unless ``--threads``). Prints
a table and writes JSON atomically to benchmarks/results/palm.json (palm_quick.json with --quick): mean and
std over seeds.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from protolib.cli.train import CONFIG_DIR
from protolib.lit.checkpoint import build_module
from protolib.ood.benchmark import build_benchmark
from protolib.ood.evaluator import OODEvaluator
from protolib.utils.io import atomic_write_json

ID_CLASSES = "[0,1,2,3,4,5]"
METHODS = {  # name -> (experiment overrides, postprocessor configs in conf/ood/postprocessors)
    "baseline": (["experiment=baseline_digits", f"data.classes={ID_CLASSES}"], ["msp", "energy", "knn"]),
    "palm": (
        ["experiment=palm_digits", "callbacks.ood=null"],
        ["msp", "energy", "knn", "palm_ssd", "palm_mds", "palm"],
    ),
}
QUICK = ["trainer.max_epochs=2", "data.image_size=16"]
RESULTS = Path(__file__).resolve().parent / "results"


def postprocessor(name: str) -> Any:
    """Instantiate ``conf/ood/postprocessors/<name>.yaml`` (one entry named ``name``)."""
    return instantiate(OmegaConf.load(Path(CONFIG_DIR) / "ood" / "postprocessors" / f"{name}.yaml")[name])


def train_and_score(method: str, seed: int, quick: bool, accelerator: str, workdir: Path) -> dict[str, Any]:
    """Train one model with the experiment config, then run the digits OOD benchmark on it."""
    overrides, scores = METHODS[method]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                f"output_dir={workdir / f'{method}-{seed}'}",
                f"seed={seed}",
                f"trainer.accelerator={accelerator}",
                *overrides,
                *(QUICK if quick else []),
            ],
        )
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    module = build_module(
        cfg.model,
        {
            "num_classes": datamodule.num_classes,
            "in_channels": datamodule.in_channels,
            "image_size": datamodule.image_size,
        },
    )
    trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    start = time.perf_counter()
    trainer.fit(module, datamodule=datamodule)
    train_seconds = time.perf_counter() - start

    bench_cfg = OmegaConf.load(Path(CONFIG_DIR) / "ood" / "benchmark" / "digits.yaml")
    benchmark = build_benchmark(bench_cfg, OmegaConf.to_container(cfg.data, resolve=True))
    results = OODEvaluator(module.eval(), benchmark, {name: postprocessor(name) for name in scores}).run()
    rows = {
        f"{r['postprocessor']}/{r['dataset']}": {"auroc": r["auroc"], "fpr95": r["fpr95"]}
        for r in results.rows
    }
    return {
        "train_seconds": train_seconds,
        "epochs": int(cfg.trainer.max_epochs),
        "id_accuracy": results.id_accuracy,
        "image_size": int(cfg.data.image_size),
        "rows": rows,
    }


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean and std over seeds of every number of the runs."""

    def stats(values: list[float]) -> dict[str, float]:
        return {"mean": float(np.mean(values)), "std": float(np.std(values))}

    return {
        "train_seconds": stats([r["train_seconds"] for r in runs]),
        "id_accuracy": stats([r["id_accuracy"] for r in runs]),
        "epochs": runs[0]["epochs"],
        "image_size": runs[0]["image_size"],
        "rows": {
            key: {m: stats([r["rows"][key][m] for r in runs]) for m in ("auroc", "fpr95")}
            for key in runs[0]["rows"]
        },
    }


def table(summary: dict[str, Any]) -> str:
    """Markdown table: one line per method and score, AUROC / FPR95 (%) per OOD set and group."""
    sets = ["held_out_digits", "nearood", "noise", "parts", "farood"]
    head = "| method | score | " + " | ".join(f"{s} AUROC / FPR95" for s in sets) + " | ID acc | train s |"
    lines = [head, "|" + "---|" * (len(sets) + 4)]
    for method, result in summary.items():
        for score in METHODS[method][1]:
            cells = []
            for s in sets:
                row = result["rows"][f"{score}/{s}"]
                cells.append(f"{100 * row['auroc']['mean']:.1f} / {100 * row['fpr95']['mean']:.1f}")
            lines.append(
                f"| {method} | {score} | "
                + " | ".join(cells)
                + f" | {100 * result['id_accuracy']['mean']:.1f} | {result['train_seconds']['mean']:.1f} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke size: 16 px, 2 epochs, 1 seed")
    parser.add_argument("--seeds", type=int, default=None, help="number of seeds (default 3, 1 with --quick)")
    parser.add_argument(
        "--accelerator", default="cpu", help="trainer.accelerator (cpu keeps timings comparable)"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    seeds = range(args.seeds or (1 if args.quick else 3))
    summary = {}
    with tempfile.TemporaryDirectory() as workdir:
        for method in METHODS:
            runs = [
                train_and_score(method, seed, args.quick, args.accelerator, Path(workdir)) for seed in seeds
            ]
            summary[method] = summarise(runs)
    print(table(summary))
    out = RESULTS / ("palm_quick.json" if args.quick else "palm.json")
    atomic_write_json(
        out,
        {
            "benchmark": "digits (ID 0-5; near: held-out 6-9; far: noise, parts)",
            "fpr95": "OOD accepted at 95% ID recall (ID positive)",
            "seeds": len(seeds),
            "accelerator": args.accelerator,
            "threads": args.threads,
            "machine": {
                "platform": platform.platform(),
                "torch_threads": torch.get_num_threads(),
                "cuda": torch.cuda.is_available(),
            },
            "methods": summary,
        },
    )
    print(f"written: {out}")


if __name__ == "__main__":
    main()
