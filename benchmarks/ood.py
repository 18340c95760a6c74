"""OOD-suite benchmark: feature-extraction and scoring throughput, KNN at scale (exact vs approximate), and
Mahalanobis fit memory at 1,000 classes x 2,048 dims.

    PYTHONPATH=. python benchmarks/ood.py           # full: KNN on 100k and 1M training features (512-d)
    PYTHONPATH=. python benchmarks/ood.py --quick   # smoke size (about a minute on 2 cores)

Prints tables and writes JSON atomically to benchmarks/results/ood.json (ood_quick.json with --quick).
Features are synthetic and clustered: ID points around shared centres, OOD points around other centres, so
AUROC is meaningful and the exact/approximate comparison shows what an approximate index costs in detection
quality. KNN times are the whole postprocessor: fit = L2-normalise + index build, score = normalise + search.
"""

from __future__ import annotations

import argparse
import platform
import resource
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import faiss
import torch
from torch import nn

from protolib.lit.classifier import ClassifierModule
from protolib.models.baseline import BaselineNet
from protolib.ood.features import extract_features
from protolib.ood.metrics import ood_metrics
from protolib.ood.postprocessors import (
    ASH,
    GEN,
    KNN,
    MSP,
    RMDS,
    Energy,
    Mahalanobis,
    MaxLogit,
    Postprocessor,
    ReAct,
    ViM,
)
from protolib.utils.io import atomic_write_json

FULL = {
    "extract_images": 16_384,
    "score_train": 50_000,
    "score_test": 10_000,
    "score_dim": 512,
    "score_classes": 100,
    "knn_sizes": [100_000, 1_000_000],
    "knn_queries": 10_000,
    "knn_dim": 512,
    "knn_centres": 1000,
    "maha_classes": 1000,
    "maha_dim": 2048,
    "maha_train": 50_000,
}
QUICK = {
    "extract_images": 1024,
    "score_train": 5000,
    "score_test": 2000,
    "score_dim": 128,
    "score_classes": 10,
    "knn_sizes": [10_000, 20_000],
    "knn_queries": 1000,
    "knn_dim": 512,
    "knn_centres": 100,
    "maha_classes": 100,
    "maha_dim": 512,
    "maha_train": 5000,
}
KNN_INDEXES = {
    "flat (exact)": ("flat", {}),
    "ivf": ("ivf", {"nlist": 1024, "nprobe": 16}),
    "hnsw": ("hnsw", {"M": 32, "efSearch": 64}),
}


def timed(fn: Callable[..., Any], *args: Any) -> tuple[Any, float]:
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def clustered(n: int, dim: int, centres: torch.Tensor, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """n points around ``centres`` (K, D) with unit noise, and their centre ids; filled in blocks."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(centres), (n,), generator=g)
    out = torch.empty(n, dim)
    for start in range(0, n, 100_000):
        stop = min(n, start + 100_000)
        out[start:stop] = centres[labels[start:stop]] + torch.randn(stop - start, dim, generator=g)
    return out, labels


class LinearHead(nn.Module):
    """A model that is only its last layer: postprocessors score precomputed features through it."""

    def __init__(self, dim: int, classes: int) -> None:
        super().__init__()
        self.last_layer = nn.Linear(dim, classes)
        self.prototype_bank = None

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = images.flatten(1)
        return {"features": features, "logits": self.last_layer(features)}


def bench_extraction(images: int, device: torch.device) -> list[dict]:
    print(f"extraction: {images:,} random 3x32x32 images, batches of 256, on {device}")
    rows = []
    for backbone in ("small_cnn", "resnet18"):
        net = BaselineNet(num_classes=10, in_channels=3, backbone=backbone)
        model = ClassifierModule(net).to(device).eval()
        data = torch.randn(images, 3, 32, 32)
        loader = [
            {"image": data[i : i + 256], "label": torch.zeros(min(256, images - i))}
            for i in range(0, images, 256)
        ]
        extract_features(model, loader[:1])  # warm-up (cuDNN autotuning, lazy init)
        _, seconds = timed(extract_features, model, loader)
        rows.append(
            {"backbone": backbone, "images": images, "seconds": seconds, "images_per_s": images / seconds}
        )
        print(f"  {backbone}: {images / seconds:,.0f} images/s")
    return rows


def bench_scoring(train: int, test: int, dim: int, classes: int) -> list[dict]:
    print(f"scoring: fit on {train:,} x {dim} features ({classes} classes), score {test:,}")
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 2
    x_train, y_train = clustered(train, dim, centres, seed=1)
    x_test, _ = clustered(test, dim, centres, seed=2)
    model = LinearHead(dim, classes).eval()
    with torch.no_grad():
        fit_data = {"features": x_train.relu(), "logits": model.last_layer(x_train.relu()), "label": y_train}
        test_data = {"features": x_test.relu(), "logits": model.last_layer(x_test.relu())}
    postprocessors: dict[str, Postprocessor] = {
        "msp": MSP(),
        "maxlogit": MaxLogit(),
        "energy": Energy(),
        "gen": GEN(),
        "react": ReAct(),
        "ash": ASH(),
        "mahalanobis": Mahalanobis(),
        "rmds": RMDS(),
        "knn": KNN(k=50),
        "vim": ViM(dim=dim // 2),
    }
    rows = []
    for name, postprocessor in postprocessors.items():
        _, fit_s = timed(postprocessor.fit, model, fit_data)
        _, score_s = timed(postprocessor.score, model, test_data)
        rows.append(
            {"postprocessor": name, "fit_s": fit_s, "score_s": score_s, "scores_per_s": test / score_s}
        )
        print(f"  {name}: fit {fit_s:.2f} s, {test / score_s:,.0f} scores/s")
    return rows


def bench_knn(sizes: list[int], queries: int, dim: int, centres_count: int) -> list[dict]:
    print(
        f"knn: {dim}-d clustered features ({centres_count} ID centres), "
        f"{queries:,} ID + {queries:,} OOD queries"
    )
    generator = torch.Generator().manual_seed(0)
    id_centres = torch.randn(centres_count, dim, generator=generator) * 0.35
    ood_centres = torch.randn(centres_count, dim, generator=generator) * 0.35
    id_test, _ = clustered(queries, dim, id_centres, seed=11)
    ood_test, _ = clustered(queries, dim, ood_centres, seed=12)
    model = LinearHead(dim, 2)
    rows = []
    for size in sizes:
        train, _ = clustered(size, dim, id_centres, seed=10)
        exact_auroc = None
        for label, (kind, options) in KNN_INDEXES.items():
            options = dict(options)
            if kind == "ivf":  # FAISS wants ~39 training points per list
                options["nlist"] = min(options["nlist"], max(1, size // 39))
            postprocessor = KNN(k=50, index=kind, index_options=options)
            _, fit_s = timed(postprocessor.fit, model, {"features": train})
            id_scores, id_s = timed(postprocessor.score, model, {"features": id_test})
            ood_scores, ood_s = timed(postprocessor.score, model, {"features": ood_test})
            metrics = ood_metrics(id_scores, ood_scores)
            exact_auroc = metrics["auroc"] if exact_auroc is None else exact_auroc
            rows.append(
                {
                    "train": size,
                    "index": label,
                    "options": options,
                    "fit_s": fit_s,
                    "score_s": id_s + ood_s,
                    "queries_per_s": 2 * queries / (id_s + ood_s),
                    "auroc": metrics["auroc"],
                    "fpr95": metrics["fpr95"],
                    "auroc_minus_exact": metrics["auroc"] - exact_auroc,
                }
            )
            print(
                f"  {size:,} {label}: fit {fit_s:.1f} s, score {id_s + ood_s:.2f} s, "
                f"AUROC {metrics['auroc']:.4f} ({metrics['auroc'] - exact_auroc:+.4f} vs exact)"
            )
        del train
    return rows


def tensor_bytes(obj: object) -> int:
    """Bytes of the tensors an object holds in its attributes, recursively (its fitted state)."""
    total = 0
    for value in vars(obj).values():
        if isinstance(value, torch.Tensor):
            total += value.numel() * value.element_size()
        elif hasattr(value, "__dict__") and not isinstance(value, type):
            total += tensor_bytes(value)
    return total


def bench_mahalanobis_memory(classes: int, dim: int, train: int) -> dict:
    print(f"mahalanobis: {classes} classes x {dim} dims, {train:,} training features streamed in chunks")
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0))
    x, y = clustered(train, dim, centres, seed=3)
    data = {"features": x, "label": y}
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    postprocessor, fit_s = timed(Mahalanobis().fit, LinearHead(dim, classes), data)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state = tensor_bytes(postprocessor)
    scores, score_s = timed(postprocessor.score, LinearHead(dim, classes), {"features": x[:2048]})
    row = {
        "classes": classes,
        "dim": dim,
        "train": train,
        "fit_s": fit_s,
        "score_s_per_2048": score_s,
        "fitted_state_mib": state / 2**20,
        "features_mib": x.numel() * 4 / 2**20,
        "fit_peak_rss_growth_mib": (peak - before) / 1024,
        "finite": bool(torch.isfinite(scores).all()),
    }
    print(
        f"  fit {fit_s:.1f} s, fitted state {row['fitted_state_mib']:.0f} MiB, "
        f"peak RSS growth {row['fit_peak_rss_growth_mib']:.0f} MiB "
        f"(features alone {row['features_mib']:.0f} MiB)"
    )
    return row


def table(rows: list[dict], columns: list[str]) -> str:
    def cell(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.4f}" if abs(value) < 10 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke-test sizes")
    parser.add_argument(
        "--out", type=Path, default=None, help="JSON path (default benchmarks/results/ood*.json)"
    )
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(0)
    report = {
        "sizes": sizes,
        "quick": args.quick,
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "faiss_gpus": faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0,
        "machine": platform.processor() or platform.machine(),
        "extraction": bench_extraction(sizes["extract_images"], device),
        "scoring": bench_scoring(
            sizes["score_train"], sizes["score_test"], sizes["score_dim"], sizes["score_classes"]
        ),
        "knn": bench_knn(sizes["knn_sizes"], sizes["knn_queries"], sizes["knn_dim"], sizes["knn_centres"]),
        "mahalanobis_memory": bench_mahalanobis_memory(
            sizes["maha_classes"], sizes["maha_dim"], sizes["maha_train"]
        ),
    }
    print("\n" + table(report["extraction"], ["backbone", "images", "seconds", "images_per_s"]))
    print("\n" + table(report["scoring"], ["postprocessor", "fit_s", "score_s", "scores_per_s"]))
    print(
        "\n"
        + table(
            report["knn"],
            ["train", "index", "fit_s", "score_s", "queries_per_s", "auroc", "auroc_minus_exact"],
        )
    )
    print("\n" + table([report["mahalanobis_memory"]], list(report["mahalanobis_memory"])))
    out = args.out or Path(__file__).parent / "results" / ("ood_quick.json" if args.quick else "ood.json")
    atomic_write_json(out, report)
    print(f"\nwrote {out}")
    return report


if __name__ == "__main__":
    main()
