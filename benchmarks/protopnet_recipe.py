"""Where do ProtoPNet's prototypes look, and what does push cost? Each step of the recipe study, 3 seeds.

    PYTHONPATH=. python benchmarks/protopnet_recipe.py                  # every step of STEPS
    PYTHONPATH=. python benchmarks/protopnet_recipe.py --steps paper_digits,digits --seeds 0

For every step (an experiment plus config overrides) and seed, trains through train.py's ``run`` and records
test accuracy, the push-quality measures of the tested model (``test/push_*``: background share, distinct
source images, duplicates, part score on ``parts``), and the push cost: validation accuracy at the end of
the last joint epoch before the final push minus the pushed model's at the end of that push's last-layer
epochs (from the run's CSV log). Prints a table (mean and spread over seeds) and writes JSON atomically to
benchmarks/results/protopnet_recipe.json, with the thread count it ran with.
"""

from __future__ import annotations

import argparse
import csv
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from protolib.cli.train import CONFIG_DIR, run
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def switches(
    experiment: str, cluster: bool, replicate: bool, distinct: bool, *extra: str
) -> tuple[str, list[str]]:
    """``experiment`` with the three recipe switches of conf/model/protopnet.yaml set explicitly."""
    padding = "{padding_mode:replicate}" if replicate else "null"
    return experiment, [
        f"model.loss.prototype_cluster={0.8 if cluster else 0.0}",
        f"model.net.backbone_options={padding}",
        f"model.net.distinct_push={str(distinct).lower()}",
        *extra,
    ]


# name -> (experiment, overrides): the steps compared in benchmarks/README.md ("Where prototypes look").
STEPS: dict[str, tuple[str, list[str]]] = {
    "digits_paper": switches("protopnet_digits", False, False, False),
    "digits_replicate": switches("protopnet_digits", False, True, False),
    "digits_pcluster": switches("protopnet_digits", True, False, False),
    "digits_pcluster_replicate": switches("protopnet_digits", True, True, False),
    "digits_default": switches("protopnet_digits", True, True, True),
    "digits_shallow": switches(
        "protopnet_digits", True, True, False, "+model.net.backbone_options.blocks_per_stage=1"
    ),
    "digits32_pcluster_replicate": switches("protopnet_digits", True, True, False, "data.image_size=32"),
    "digits32_default": switches("protopnet_digits", True, True, True, "data.image_size=32"),
    "parts_paper": switches("protopnet_parts", False, False, False),
    "parts_switches": switches("protopnet_parts", True, True, True),
}
COLUMNS = ("test_acc", "push_cost", "background_share", "part_score", "zero_part_share", "duplicates")


def push_accuracies(log: Path) -> tuple[float, float]:
    """Val accuracy at the end of the last joint epoch before the final push, and the pushed model's at the
    end of that push's last-layer epochs, from the CSV log (NaN, NaN without a push)."""
    rows = [row for row in csv.DictReader(log.open()) if row.get("val/acc")]
    pushed = [i for i, row in enumerate(rows) if row.get("val/pushed_acc") not in ("", "nan", None)]
    if not pushed:
        return float("nan"), float("nan")
    last = pushed[-1]
    start = last
    while start > 0 and rows[start - 1].get("val/pushed_acc") not in ("", "nan", None):
        start -= 1  # first last-layer epoch of the final cycle
    if not start:
        return float("nan"), float("nan")
    return float(rows[start - 1]["val/acc"]), float(rows[last]["val/pushed_acc"])


def train(
    experiment: str, overrides: list[str], seed: int, output_dir: Path | None = None
) -> dict[str, float]:
    """One run: test metrics, push measures and push cost. The run's files go to ``output_dir`` (kept) or,
    without one, to a temporary folder (removed)."""
    fixed = ["trainer.accelerator=cpu", "+trainer.enable_progress_bar=false", f"seed={seed}"]
    with tempfile.TemporaryDirectory() as temporary, initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        out = Path(output_dir or temporary)
        cfg = compose(
            "config", overrides=[f"experiment={experiment}", f"output_dir={out}", *fixed, *overrides]
        )
        start = time.perf_counter()
        metrics = run(cfg)
        result = {"seconds": time.perf_counter() - start, "test_acc": metrics["test/acc"]}
        result |= {
            key.removeprefix("test/push_"): v for key, v in metrics.items() if key.startswith("test/push_")
        }
        before, after = push_accuracies(out / "csv" / "metrics.csv")
        result |= {"val_before_push": before, "val_after_push": after, "push_cost": before - after}
    return result


def summarize(runs: list[dict[str, float]]) -> dict[str, str]:
    """'mean +- sd' of every column over seeds (blank where a measure does not apply)."""
    cells = {}
    for column in (*COLUMNS, "seconds"):
        values = [r[column] for r in runs if column in r and r[column] == r[column]]
        if values:
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            cells[column] = f"{statistics.mean(values):.3f} +- {spread:.3f}"
        else:
            cells[column] = ""
    return cells


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated names of STEPS")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", default="protopnet_recipe.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    results: dict[str, Any] = {
        "threads": torch.get_num_threads(),
        "machine": platform.processor(),
        "steps": {},
    }
    for name in args.steps.split(","):
        if name not in STEPS:
            raise SystemExit(f"unknown step {name!r}; steps: {', '.join(STEPS)}")
        experiment, overrides = STEPS[name]
        runs = [train(experiment, overrides, seed) for seed in seeds]
        results["steps"][name] = {"experiment": experiment, "overrides": overrides, "runs": runs}
        atomic_write_json(RESULTS / args.out, results)
    header = ["step", *COLUMNS, "seconds"]
    print(" | ".join(header))
    for name, step in results["steps"].items():
        cells = summarize(step["runs"])
        print(" | ".join([name, *(cells[c] for c in header[1:])]))
    print(f"threads: {results['threads']}")


if __name__ == "__main__":
    main()
