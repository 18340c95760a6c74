"""ProtoPNet benchmark: accuracy and wall time of the shipped experiments, training-step throughput against
the plain baseline on the same backbone, and push time of the batched bank push against a prototype loop.

    PYTHONPATH=. python benchmarks/protopnet.py           # full: experiment=protopnet_digits and _parts
    PYTHONPATH=. python benchmarks/protopnet.py --quick   # smoke size (about a minute on 2 cores)

Prints tables and writes JSON atomically to benchmarks/results/protopnet.json (protopnet_quick.json with
--quick). --quick shrinks the schedules to a few batches, so its accuracies mean nothing; only the full run
measures the >= 0.95 digits target. The push comparison runs both searches on the same precomputed
embeddings: the loop is written like the reference code's push.py (per batch, per prototype, numpy argmin
over the images of the prototype's class), the batched push is ``PrototypeBank.nearest_per_prototype``.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from protolib.bank import PrototypeBank
from protolib.cli.train import CONFIG_DIR, run
from protolib.lit.classifier import ClassifierModule
from protolib.lit.protopnet import ProtoPNetModule
from protolib.models.baseline import BaselineNet
from protolib.models.protopnet import ProtoPNet
from protolib.nn.similarity import squared_l2_distances
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
QUICK_SCHEDULE = [
    "model.schedule.train_epochs=2",
    "model.schedule.warm_epochs=1",
    "model.schedule.push_start=1",
    "model.schedule.last_layer_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.limit_test_batches=2",
]
FULL = {
    "experiments": [("protopnet_digits", []), ("protopnet_parts", [])],
    "throughput": [("small_cnn", 1, 16, 64), ("small_cnn", 3, 32, 64), ("resnet18", 3, 64, 32)],
    "steps": 20,
    "push": {"images": 5994, "prototypes": 2000, "classes": 200, "dim": 128, "side": 7, "batch": 75},
}
QUICK = {
    "experiments": [("protopnet_digits", QUICK_SCHEDULE), ("protopnet_parts", QUICK_SCHEDULE)],
    "throughput": [("small_cnn", 1, 16, 64)],
    "steps": 3,
    "push": {"images": 400, "prototypes": 200, "classes": 20, "dim": 128, "side": 7, "batch": 75},
}


def run_experiment(name: str, overrides: list[str]) -> dict[str, Any]:
    """Train and test ``experiment=name`` through train.py's ``run``; test accuracy and wall time."""
    fixed = ["trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]
    with tempfile.TemporaryDirectory() as out, initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={name}", f"output_dir={out}", *fixed, *overrides])
        start = time.perf_counter()
        metrics = run(cfg)
        seconds = time.perf_counter() - start
    return {"experiment": name, "test_acc": metrics["test/acc"], "seconds": seconds}


def images_per_second(module: Any, in_chans: int, size: int, batch: int, steps: int) -> float:
    """Training-step throughput (forward, loss, backward, Adam step) on random images, after 2 warm-ups."""
    module.train()
    optimizer = torch.optim.Adam(p for p in module.parameters() if p.requires_grad)
    images = torch.randn(batch, in_chans, size, size)
    labels = torch.randint(0, module.num_classes, (batch,))
    data = {"image": images, "label": labels, "index": torch.arange(batch)}
    for step in range(steps + 2):
        if step == 2:
            start = time.perf_counter()
        loss, _ = module.compute_loss(data, module.extract(images))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * batch / (time.perf_counter() - start)


def throughput(backbone: str, in_chans: int, size: int, batch: int, steps: int) -> dict[str, Any]:
    """Images/s of one training step of ProtoPNet (joint phase: every part trained) and of the baseline."""
    torch.manual_seed(0)
    protopnet = ProtoPNetModule(ProtoPNet(10, in_channels=in_chans, image_size=size, backbone=backbone))
    baseline = ClassifierModule(BaselineNet(num_classes=10, in_channels=in_chans, backbone=backbone))
    proto_ips = images_per_second(protopnet, in_chans, size, batch, steps)
    base_ips = images_per_second(baseline, in_chans, size, batch, steps)
    return {
        "backbone": backbone,
        "image_size": size,
        "batch": batch,
        "protopnet_ips": proto_ips,
        "baseline_ips": base_ips,
        "ratio": proto_ips / base_ips,
    }


def loop_push(
    batches: list[tuple[torch.Tensor, torch.Tensor]], prototypes: torch.Tensor, owners: torch.Tensor
) -> tuple[np.ndarray, np.ndarray]:
    """The reference's push search: per batch, distance maps, then a Python loop over prototypes with a numpy
    argmin over the images of the prototype's class. Returns best distances (P,) and flat patch ids (P,)."""
    p = len(prototypes)
    best = np.full(p, np.inf)
    best_patch = np.full(p, -1)
    owners_np = owners.numpy()
    offset = 0
    for embeddings, labels in batches:
        distances = squared_l2_distances(embeddings, prototypes).numpy()  # (B, P, h, w)
        by_class: dict[int, list[int]] = {}
        for i, label in enumerate(labels.tolist()):
            by_class.setdefault(label, []).append(i)
        h, w = distances.shape[2:]
        for j in range(p):
            images = by_class.get(int(owners_np[j]))
            if not images:
                continue
            maps = distances[images, j]  # (n, h, w)
            value = maps.min()
            if value < best[j]:
                image, row, col = np.unravel_index(np.argmin(maps), maps.shape)
                best[j] = value
                best_patch[j] = offset + (images[image] * h + row) * w + col
        offset += len(labels) * h * w
    return best, best_patch


def push_comparison(
    images: int, prototypes: int, classes: int, dim: int, side: int, batch: int
) -> dict[str, Any]:
    """Batched bank push vs the prototype loop on the same synthetic sigmoid embeddings (CUB-sized)."""
    generator = torch.Generator().manual_seed(0)
    embeddings = torch.sigmoid(torch.randn(images, dim, side, side, generator=generator))
    labels = torch.arange(images) % classes
    owners = torch.arange(classes).repeat_interleave(prototypes // classes)
    bank = PrototypeBank(len(owners), dim, owners=owners)
    with torch.no_grad():
        bank.vectors.uniform_(0, 1, generator=generator)
    batches = [(embeddings[s : s + batch], labels[s : s + batch]) for s in range(0, images, batch)]
    stream = [
        (e, y, torch.arange(s, s + len(y)))
        for s, (e, y) in zip(range(0, images, batch), batches, strict=True)
    ]
    bank.nearest_per_prototype(stream[:2])  # warm-up: first calls pay for kernel selection
    loop_push(batches[:2], bank.vectors.detach(), owners)
    start = time.perf_counter()
    result = bank.nearest_per_prototype(stream)
    batched = time.perf_counter() - start
    start = time.perf_counter()
    loop_dist, loop_patch = loop_push(batches, bank.vectors.detach(), owners)
    looped = time.perf_counter() - start
    patch = (result.sample_ids * side + result.locations[:, 0]) * side + result.locations[:, 1]
    agree = bool(np.allclose(result.distances.numpy(), loop_dist, rtol=1e-4, atol=1e-4))
    return {
        "images": images,
        "prototypes": len(owners),
        "batched_s": batched,
        "loop_s": looped,
        "speedup": looped / batched,
        "same_distances": agree,
        "same_patches": float((patch.numpy() == loop_patch).mean()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke size")
    args = parser.parse_args()
    sizes = QUICK if args.quick else FULL
    report: dict[str, Any] = {
        "quick": args.quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
    }

    report["experiments"] = [run_experiment(name, overrides) for name, overrides in sizes["experiments"]]
    print("\nexperiment            test acc   wall time")
    for row in report["experiments"]:
        print(f"{row['experiment']:<20} {row['test_acc']:>9.4f} {row['seconds']:>10.1f} s")

    report["throughput"] = [throughput(*case, steps=sizes["steps"]) for case in sizes["throughput"]]
    print("\nbackbone    size batch  ProtoPNet img/s  baseline img/s  ratio")
    for row in report["throughput"]:
        print(
            f"{row['backbone']:<10} {row['image_size']:>5} {row['batch']:>5} {row['protopnet_ips']:>16.1f} "
            f"{row['baseline_ips']:>15.1f} {row['ratio']:>6.2f}"
        )

    report["push"] = push_comparison(**sizes["push"])
    row = report["push"]
    print("\npush search: images prototypes  batched    loop     speed-up  same distances  same patches")
    print(
        f"             {row['images']:>6} {row['prototypes']:>10} {row['batched_s']:>7.2f} s "
        f"{row['loop_s']:>6.2f} s {row['speedup']:>8.1f}x  {row['same_distances']!s:>14} "
        f"{row['same_patches']:>13.3f}"
    )

    path = RESULTS / ("protopnet_quick.json" if args.quick else "protopnet.json")
    atomic_write_json(path, report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
