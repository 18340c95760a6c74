"""ProtoPNet on your own data vs the plain baseline: the same small CNN and epochs on every built-in data set.

    PYTHONPATH=. python -m benchmarks.protopnet_own_data                         # every data set, seeds 0-2
    PYTHONPATH=. python -m benchmarks.protopnet_own_data --datasets parts_hard --seeds 0 \\
        --overrides model.schedule.joint_lr_gamma=1.0 --out probe.json          # one change to the recipe

For every data set (the README's "your own data" experiments with data overrides) and seed, trains
``experiment=baseline_own_data`` and ``experiment=protopnet_own_data`` (plus ``--overrides``, ProtoPNet
only) through train.py's ``run`` and records test accuracy and, for ProtoPNet, validation accuracy at the
end of the last joint epoch before the final push and of the pushed model after that push's last-layer
epochs (from the run's CSV log). With ``--keep DIR`` every run's folder is kept there, named by model, data
set, overrides and seed, and a finished one is reused instead of trained again (the baseline is trained once
for any number of ProtoPNet probes). Prints a table (mean and spread over seeds) and writes JSON atomically
to benchmarks/results/ (``--out``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import statistics
from pathlib import Path
from typing import Any

import torch

from benchmarks.protopnet_recipe import RESULTS, train
from protolib.utils.io import atomic_write_json

# The harder parts settings: 9 cells, 3 defining parts, 3 distractors, more noise, 48 px.
PARTS_HARD = [
    "data=parts",
    "data.grid=3",
    "data.parts_per_class=3",
    "data.distractors=3",
    "data.noise=0.25",
    "data.image_size=48",
]
# name -> data overrides: every built-in data set (the on-disk ones need files this machine lacks).
DATASETS: dict[str, list[str]] = {
    "digits16": ["data=digits", "data.image_size=16"],
    "digits32": ["data=digits", "data.image_size=32"],
    "parts": ["data=parts"],
    "parts_hard": PARTS_HARD,
}
MODELS = {"baseline": "baseline_own_data", "protopnet": "protopnet_own_data"}
# Pictures change no number here and cost a few seconds per push.
PROTOPNET_FIXED = ["~callbacks.prototype_pictures"]
COLUMNS = ("baseline_acc", "protopnet_acc", "gap", "val_before_push", "val_after_push", "push_cost")


def run_dir(keep: Path, model: str, dataset: str, overrides: list[str], seed: int) -> Path:
    """Where ``--keep`` puts one run: <model>-<data set>-<overrides hash or 'recipe'>-s<seed>."""
    tag = hashlib.sha1(" ".join(overrides).encode()).hexdigest()[:8] if overrides else "recipe"
    return keep / f"{model}-{dataset}-{tag}-s{seed}"


def train_once(
    model: str, dataset: str, overrides: list[str], seed: int, keep: Path | None
) -> dict[str, float]:
    """One run's measures; with ``keep``, a run already finished there is read back, not trained again."""
    extra = [*PROTOPNET_FIXED, *overrides] if model == "protopnet" else []
    if keep is None:
        return train(MODELS[model], [*DATASETS[dataset], *extra], seed)
    out = run_dir(keep, model, dataset, overrides if model == "protopnet" else [], seed)
    record = out / "benchmark.json"
    if record.exists():
        return json.loads(record.read_text())
    result = train(MODELS[model], [*DATASETS[dataset], *extra], seed, output_dir=out)
    atomic_write_json(record, result)
    return result


def measure(dataset: str, seed: int, overrides: list[str], keep: Path | None) -> dict[str, float]:
    """Baseline and ProtoPNet on one data set and seed: the table's columns for this run pair."""
    base = train_once("baseline", dataset, [], seed, keep)
    proto = train_once("protopnet", dataset, overrides, seed, keep)
    return {
        "baseline_acc": base["test_acc"],
        "protopnet_acc": proto["test_acc"],
        "gap": base["test_acc"] - proto["test_acc"],
        "val_before_push": proto["val_before_push"],
        "val_after_push": proto["val_after_push"],
        "push_cost": proto["push_cost"],
        "baseline_seconds": base["seconds"],
        "protopnet_seconds": proto["seconds"],
    }


def cell(values: list[float]) -> str:
    """'mean +- sd' over seeds (sd 0 for one seed)."""
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} +- {spread:.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--datasets", default=",".join(DATASETS), help="comma-separated names of DATASETS")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--overrides", nargs="*", default=[], help="train.py overrides of the ProtoPNet runs")
    parser.add_argument("--keep", type=Path, default=None, help="keep (and reuse) every run's folder here")
    parser.add_argument("--out", default="protopnet_own_data.json", help="in benchmarks/results/")
    args = parser.parse_args()
    names = args.datasets.split(",")
    unknown = [name for name in names if name not in DATASETS]
    if unknown:
        raise SystemExit(f"unknown data sets {unknown}; known: {', '.join(DATASETS)}")
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "machine": platform.processor(),
        "overrides": args.overrides,
        "datasets": {},
    }
    for name in names:
        runs = []
        for seed in seeds:
            runs.append({"seed": seed, **measure(name, seed, args.overrides, args.keep)})
            results["datasets"][name] = {"data": DATASETS[name], "runs": runs}
            atomic_write_json(RESULTS / args.out, results)
    print(" | ".join(["data set", *COLUMNS]))
    for name, entry in results["datasets"].items():
        print(" | ".join([name, *(cell([run[c] for run in entry["runs"]]) for c in COLUMNS)]))
    print(f"threads: {results['threads']}")


if __name__ == "__main__":
    main()
