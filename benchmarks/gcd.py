"""Category discovery: FAISS semi-supervised k-means vs scikit-learn, Vaze K estimation, digits baselines.

    python -m benchmarks.gcd                 # all parts
    python -m benchmarks.gcd --parts kmeans  # one part: kmeans | kest | digits
    python -m benchmarks.gcd --methods simgcd  # also train methods on digits (3 seeds)

``kmeans``: 100k x 256 Gaussian-mixture points, K = 100; the same k-means++ start goes to protolib's
FAISS k-means and to scikit-learn's Lloyd KMeans (tol 0, the same number of iterations); wall time of the
Lloyd iterations and the final inertia of each. ``kest``: Vaze et al.'s Brent search over K in [10, 50] on
20k x 256 points of 30 classes, 8 of them half labelled; time and K found. ``digits``: the GCD split of
``conf/data/gcd_digits.yaml`` (0-4 known, half labelled, 5-9 new), v2 All / Old / New on the unlabelled
training images (transductive) for k-means on raw pixels, semi-supervised k-means on raw pixels and on the
untrained backbone, and, with ``--methods``, each method's ``experiment=<method>_digits`` (3 seeds).
Prints tables and writes JSON atomically to benchmarks/results/gcd.json; the thread count is recorded.
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sklearn.cluster import KMeans

from protolib.cli.train import CONFIG_DIR, run
from protolib.gcd.clustering import estimate_num_clusters, kmeans_plus_plus, semi_supervised_kmeans
from protolib.gcd.metrics import split_cluster_accuracy
from protolib.lit.checkpoint import build_module
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
SEEDS = (0, 1, 2)


def mixture(n: int, dim: int, classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Unit-variance Gaussian clusters around centres of norm ~2 (overlapping, like deep features)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(classes, dim)) * (2.0 / np.sqrt(dim)) * 3
    y = rng.integers(0, classes, n)
    return (centres[y] + rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32), y


def inertia(x: np.ndarray, centres: np.ndarray) -> float:
    """Sum of squared distances to the nearest centre, computed the same way for both implementations."""
    d = (x**2).sum(1)[:, None] - 2 * x @ centres.T + (centres**2).sum(1)[None]
    return float(np.maximum(d.min(1), 0).sum())


def bench_kmeans(threads: int, iters: int = 20, repeats: int = 3) -> dict[str, Any]:
    """protolib's k-means vs scikit-learn's Lloyd and Elkan from one k-means++ start, ``threads`` each.

    Each is timed ``repeats`` times, interleaved, and the fastest kept (the machine is shared).
    """
    from threadpoolctl import threadpool_limits

    x, _ = mixture(100_000, 256, 100, seed=0)
    init = kmeans_plus_plus(x, 100, np.random.default_rng(0))
    fits = {
        "protolib": lambda: semi_supervised_kmeans(x, 100, init=init, max_iter=iters, tol=0.0).centers,
        "sklearn lloyd": lambda: (
            KMeans(100, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="lloyd")
            .fit(x)
            .cluster_centers_
        ),
        "sklearn elkan": lambda: (
            KMeans(100, init=init, n_init=1, max_iter=iters, tol=0.0, algorithm="elkan")
            .fit(x)
            .cluster_centers_
        ),
    }
    seconds: dict[str, list[float]] = {name: [] for name in fits}
    centres: dict[str, np.ndarray] = {}
    with threadpool_limits(threads):  # scikit-learn's OpenMP / BLAS pools: the same count as FAISS and torch
        for _ in range(repeats):
            for name, fit in fits.items():
                t = time.perf_counter()
                centres[name] = fit()
                seconds[name].append(time.perf_counter() - t)
    out: dict[str, Any] = {"n": 100_000, "dim": 256, "k": 100, "iterations": iters, "repeats": repeats}
    print(
        f"\nk-means 100k x 256, K=100, {iters} iterations from the same k-means++ start, {threads} thread(s)"
    )
    print(f"  {'impl':<16}{'seconds (best)':>16}{'inertia':>16}{'speed-up':>10}")
    ours = min(seconds["protolib"])
    for name in fits:
        best, value = min(seconds[name]), inertia(x, centres[name])
        out[name] = {"seconds": best, "all_seconds": seconds[name], "inertia": value, "speedup": best / ours}
        print(f"  {name:<16}{best:>16.2f}{value:>16.1f}{best / ours:>9.1f}x")
    out["inertia_rel_diff"] = out["protolib"]["inertia"] / out["sklearn lloyd"]["inertia"] - 1
    print(f"  inertia difference to Lloyd {100 * out['inertia_rel_diff']:+.4f} %")
    return out


def bench_kest() -> dict[str, Any]:
    x, y = mixture(20_000, 256, 30, seed=1)
    labels = np.where((y < 8) & (np.random.default_rng(1).random(len(y)) < 0.5), y, -1)
    t = time.perf_counter()
    est = estimate_num_clusters(x, labels, k_min=10, k_max=50)
    out = {"n": 20_000, "dim": 256, "true_k": 30, "k": est.k, "seconds": time.perf_counter() - t}
    out["tried"] = {str(k): v for k, v in est.tried.items()}
    print(
        f"\nK estimation (Brent over [10, 50]) on 20k x 256, 30 classes: K = {est.k} "
        f"in {out['seconds']:.1f} s"
    )
    print(f"  tried: {', '.join(f'{k}:{v:.3f}' for k, v in est.tried.items())}")
    return out


def digits_features(seed: int) -> tuple[Any, dict[str, np.ndarray]]:
    """The digits GCD split (seeded) and raw pixels / untrained-backbone features of every training image."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["experiment=simgcd_digits", f"data.seed={seed}", "output_dir=."])
    dm = instantiate(cfg.data)
    dm.setup("fit")
    torch.manual_seed(seed)
    net = build_module(
        cfg.model, {"num_classes": 10, "in_channels": 1, "image_size": dm.image_size}
    ).net.eval()
    pixels, feats, labels = [], [], []
    with torch.no_grad():
        for batch in dm.features_dataloader():
            pixels.append(batch["image"].flatten(1).numpy())
            feats.append(net.extract(batch["image"])["features"].numpy())
            labels.append(batch["label"].numpy())
    return dm, {
        "pixels": np.concatenate(pixels),
        "backbone": np.concatenate(feats),
        "y": np.concatenate(labels),
    }


def bench_digits(methods: list[str]) -> dict[str, Any]:
    rows: dict[str, list[tuple[float, float, float]]] = {}
    k_found: list[int] = []
    k_trained: dict[str, list[int]] = {}
    for seed in SEEDS:
        dm, data = digits_features(seed)
        y, lab = data["y"], dm.labelled_mask
        unl, known = ~lab, dm.num_known_classes
        sup = np.where(lab, y, -1)

        def score(pred: np.ndarray, y=y, unl=unl, known=known) -> tuple[float, float, float]:
            return split_cluster_accuracy(y[unl], pred[unl], y[unl] < known, "v2")

        rows.setdefault("k-means, raw pixels", []).append(
            score(semi_supervised_kmeans(data["pixels"], 10, n_init=10, max_iter=100, seed=seed).labels)
        )
        rows.setdefault("ss-k-means, raw pixels", []).append(
            score(semi_supervised_kmeans(data["pixels"], 10, sup, n_init=10, max_iter=100, seed=seed).labels)
        )
        normed = data["backbone"] / np.linalg.norm(data["backbone"], axis=1, keepdims=True)
        rows.setdefault("ss-k-means, untrained backbone", []).append(
            score(semi_supervised_kmeans(normed, 10, sup, n_init=10, max_iter=100, seed=seed).labels)
        )
        k_found.append(estimate_num_clusters(data["pixels"], sup, k_min=5, k_max=30, seed=seed).k)
        for method in methods:
            with tempfile.TemporaryDirectory() as tmp, initialize_config_dir(CONFIG_DIR, version_base="1.3"):
                cfg = compose("config", overrides=[
                    f"experiment={method}_digits", f"seed={seed}", f"data.seed={seed}", f"output_dir={tmp}",
                    "~logger", "+trainer.enable_progress_bar=false",
                ])  # fmt: skip
                metrics = run(cfg)
            rows.setdefault(method, []).append(
                (metrics["test/all_acc"], metrics["test/old_acc"], metrics["test/new_acc"])
            )
            if "test/estimated_k" in metrics:  # Vaze's estimate on the method's trained features
                k_trained.setdefault(method, []).append(int(metrics["test/estimated_k"]))
    print("\ndigits GCD (0-4 known, 50 % labelled, 5-9 new), v2 on the unlabelled training images, 3 seeds")
    print(f"  {'method':<34}{'All':>14}{'Old':>14}{'New':>14}")
    table = {}
    for name, values in rows.items():
        v = np.array(values)
        table[name] = {"mean": v.mean(0).tolist(), "std": v.std(0).tolist(), "per_seed": v.tolist()}
        cells = "".join(f"{m:>8.3f}±{s:.3f}" for m, s in zip(v.mean(0), v.std(0), strict=True))
        print(f"  {name:<34}{cells}")
    print(f"  Vaze K estimate (raw pixels, Brent over [5, 30]): {k_found}")
    for method, ks in k_trained.items():
        print(f"  Vaze K estimate ({method}'s trained features): {ks}")
    return {"table": table, "vaze_k_raw_pixels": k_found, "vaze_k_trained": k_trained}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--parts", nargs="+", default=["kmeans", "kest", "digits"])
    parser.add_argument("--methods", nargs="*", default=[], help="train these <method>_digits experiments")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import faiss

    faiss.omp_set_num_threads(args.threads)
    results: dict[str, Any] = {
        "threads": args.threads, "machine": platform.processor() or platform.machine(),
        "torch": torch.__version__, "faiss": faiss.__version__,
    }  # fmt: skip
    print(f"threads: {args.threads}")
    parts = {
        "kmeans": lambda: bench_kmeans(args.threads),
        "kest": bench_kest,
        "digits": lambda: bench_digits(args.methods),
    }
    for part in args.parts:
        results[part] = parts[part]()
    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / "gcd.json"
    previous = json.loads(path.read_text()) if path.exists() else {}
    previous.update({k: v for k, v in results.items() if k in args.parts})  # keep the other parts' numbers
    previous.setdefault("runs", {}).update(
        {part: {k: results[k] for k in ("threads", "torch", "faiss")} for part in args.parts}
    )
    atomic_write_json(path, previous)
    print(f"\nwritten: {RESULTS / 'gcd.json'}")


if __name__ == "__main__":
    main()
