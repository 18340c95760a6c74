"""Interpretability scores of every prototype family trained on ``parts``: a table no other library gives.

    python -m benchmarks.explain                          # train every <family>_parts, score
    python -m benchmarks.explain --short                  # about half of each schedule (the README's table)
    python -m benchmarks.explain --checkpoints a.ckpt b.ckpt   # score trained checkpoints instead
    python -m benchmarks.explain --quick                  # smoke size (its numbers mean nothing)

Run it as a module (``-m``) from the repository root: as a file, its folder would put this ``explain.py``
in place of the ``explain`` package.

Each family is trained through its shipped experiment ``<family>_parts`` (train.py's ``run``, CPU; the best
checkpoint is scored) or taken from ``--checkpoints``; ``explain.scores.score_model`` then computes every
registered score that applies on the first ``--max-images`` test images (the part score on the push data),
and the test accuracy on the whole test set. Prints the table and writes JSON atomically to
benchmarks/results/explain.json (explain_quick.json with --quick), rewritten after every family so that a
partial run keeps what it measured.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.protopnet import QUICK_SCHEDULE
from benchmarks.variants import QUICK, VARIANTS, compose_experiment
from explain.families import load
from explain.scores import SCORES, score_model
from protolib.cli.train import run
from protolib.utils.io import atomic_write_json
from protolib.utils.modes import evaluating

RESULTS = Path(__file__).resolve().parent / "results"
FAMILIES = VARIANTS  # ProtoPNet and every variant with a <name>_parts experiment
# --short: about half of each shipped schedule (a push and last-layer epochs kept), for a shared CPU
PROTOPNET_SHORT = [
    "model.schedule.train_epochs=11",
    "model.schedule.push_start=10",
    "model.schedule.push_every=10",
    "model.schedule.last_layer_epochs=3",
]
SHORT = {
    "prototree": ["model.schedule.epochs=12"],
    "pipnet": ["model.schedule.pretrain_epochs=2", "model.schedule.epochs=7"],
}
# the measures the table prints (score/measure), in order, with their column titles
COLUMNS = {
    "part_score/mean": "part",
    "consistency/consistency": "consist",
    "consistency/stability": "stabil",
    "deletion/prototype": "del P",
    "deletion/integrated_gradients": "del IG",
    "insertion/prototype": "ins P",
    "insertion/integrated_gradients": "ins IG",
    "pointing/prototype": "point P",
    "pointing/integrated_gradients": "point IG",
    "sparsity/local_size": "local",
    "sparsity/prototypes_for_90": "90%",
    "sparsity/global_size": "global",
}
# Nauta et al.'s global importance of each visual characteristic (explain.scores.because), a second table
BECAUSE = {f"because/{name}": name for name in ("hue", "shape", "texture", "contrast", "saturation")}


@torch.no_grad()
def test_accuracy(net: torch.nn.Module, datamodule: Any) -> float:
    """Accuracy of ``extract(...)["logits"]`` on the whole test split."""
    device = next(net.parameters()).device
    correct = total = 0
    with evaluating(net):
        for batch in datamodule.test_dataloader():
            predicted = net.extract(batch["image"].to(device))["logits"].argmax(dim=1).cpu()
            correct += int((predicted == batch["label"]).sum())
            total += len(predicted)
    return correct / total


def score_checkpoint(checkpoint: Path, names: list[str] | None, max_images: int) -> dict[str, Any]:
    """Test accuracy and every applicable score of one train.py checkpoint."""
    explained = load(checkpoint)
    net, datamodule = explained.net, explained.datamodule
    start = time.perf_counter()
    scores = score_model(net, datamodule, names=names, max_images=max_images)
    return {
        "network": type(net).__name__,
        "test_acc": test_accuracy(net, datamodule),
        "score_seconds": time.perf_counter() - start,
        **scores,
    }


def train_and_score(
    family: str,
    overrides: list[str],
    seed: int,
    names: list[str] | None,
    max_images: int,
    keep: Path | None = None,
) -> dict[str, Any]:
    """Train ``experiment=<family>_parts`` with ``overrides`` and score its best checkpoint (the run folder
    is ``keep/<family>`` when given, else a temporary one)."""
    with tempfile.TemporaryDirectory() as temporary:
        out = str(keep / family) if keep is not None else temporary
        cfg = compose_experiment(f"{family}_parts", [f"seed={seed}", *overrides], out)
        start = time.perf_counter()
        run(cfg)
        seconds = time.perf_counter() - start
        (checkpoint,) = Path(out, "checkpoints").glob("best-*.ckpt")
        row = {"family": family, "train_seconds": seconds, "overrides": overrides}
        return {**row, **score_checkpoint(checkpoint, names, max_images)}


def family_overrides(family: str, short: bool, quick: bool) -> list[str]:
    """The training overrides of a family for --quick, --short or the shipped experiment."""
    if quick:
        return QUICK.get(family, QUICK_SCHEDULE)
    if short:
        return SHORT.get(family, PROTOPNET_SHORT)
    return []


def print_table(rows: list[dict[str, Any]], columns: dict[str, str] = COLUMNS) -> None:
    """One line per model: accuracy, training time and the score ``columns`` (- where one does not apply)."""
    titles = "  ".join(f"{title:>8}" for title in columns.values())
    print(f"\nmodel                  acc    train s  {titles}")
    for row in rows:
        cells = [f"{row[key]:8.3f}" if key in row else f"{'-':>8}" for key in columns]
        name = row.get("family", row["network"])
        seconds = row.get("train_seconds", float("nan"))
        print(f"{name:<22} {row['test_acc']:.3f}  {seconds:7.0f}  " + "  ".join(cells))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--families", nargs="+", default=FAMILIES, help=f"subset of {FAMILIES}")
    parser.add_argument("--checkpoints", nargs="+", type=Path, help="score these instead of training")
    parser.add_argument("--scores", nargs="+", default=None, help=f"subset of {sorted(SCORES)}")
    parser.add_argument("--max-images", type=int, default=200, help="test images per score")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--short", action="store_true", help="about half of each shipped schedule")
    parser.add_argument("--quick", action="store_true", help="smoke size: a few batches")
    parser.add_argument("--keep", type=Path, help="keep every run folder (checkpoints) under this folder")
    parser.add_argument("--overrides", nargs="*", default=[], help="train.py overrides for every family")
    parser.add_argument("--output", default=None, help="JSON file name under benchmarks/results/")
    args = parser.parse_args()
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        raise SystemExit(f"unknown families {unknown}: choose from {FAMILIES}")
    report: dict[str, Any] = {
        "quick": args.quick,
        "short": args.short,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "max_images": args.max_images,
        "seed": args.seed,
        "overrides": args.overrides,
        "descriptions": {name: spec.description for name, spec in SCORES.items()},
        "rows": [],
    }
    path = RESULTS / (args.output or ("explain_quick.json" if args.quick else "explain.json"))
    jobs: list[Any] = args.checkpoints or args.families
    for job in jobs:
        if args.checkpoints:
            row = {"checkpoint": str(job), **score_checkpoint(job, args.scores, args.max_images)}
        else:
            overrides = [*family_overrides(job, args.short, args.quick), *args.overrides]
            row = train_and_score(job, overrides, args.seed, args.scores, args.max_images, args.keep)
        report["rows"].append(row)
        atomic_write_json(path, report)
        print_table(report["rows"][-1:])
    print_table(report["rows"])
    print_table(report["rows"], BECAUSE)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
