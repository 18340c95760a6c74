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
from hydra.utils import instantiate

from protolib.cli.train import CONFIG_DIR, run
from protolib.lit.callbacks.protopnet import EpochPlan
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"


def switches(
    experiment: str,
    cluster: bool = False,
    replicate: bool = False,
    distinct: bool = False,
    coordinates: bool = False,
    stride: int = 4,
    from_scratch: bool = False,
    prune: bool = False,
    separation: float = -0.08,
    cluster_weight: float = 0.8,
    blocks_per_stage: int = 2,
    width: int = 32,
    extra: tuple[str, ...] = (),
) -> tuple[str, list[str]]:
    """``experiment`` with every recipe switch set explicitly, so a step means the same whatever the shipped
    defaults: the prototype cluster cost and distinct push of conf/model/protopnet.yaml, the small_cnn's
    replicate padding, coordinate channels, stride, convs per stage and width, the paper's pruning after the
    last push (with 5 last-layer epochs after it), and the ``cluster_weight`` / ``separation`` weights (the
    paper's 0.8 / -0.08 by default) with the joint rates x0.1 at epoch 10, or (``from_scratch``) a tenth of
    those weights with constant joint rates."""
    padding = "replicate" if replicate else "zeros"
    scale, gamma = (0.1, 1.0) if from_scratch else (1.0, 0.1)
    return experiment, [
        f"model.loss.cluster={cluster_weight * scale:g}",
        f"model.loss.separation={separation * scale:g}",
        f"model.loss.prototype_cluster={0.8 * scale if cluster else 0.0:g}",
        "model.schedule.joint_lr_step=10",
        f"model.schedule.joint_lr_gamma={gamma}",
        f"++model.net.backbone_options.padding_mode={padding}",
        f"++model.net.backbone_options.coordinates={str(coordinates).lower()}",
        f"++model.net.backbone_options.stride={stride}",
        f"++model.net.backbone_options.blocks_per_stage={blocks_per_stage}",
        f"++model.net.backbone_options.width={width}",
        f"model.net.distinct_push={str(distinct).lower()}",
        f"model.schedule.prune={str(prune).lower()}",
        "model.schedule.prune_last_layer_epochs=5",
        *extra,
    ]


DIGITS, PARTS = "protopnet_digits", "protopnet_parts"
AT_16, AT_32 = ("data.image_size=16",), ("data.image_size=32",)
# name -> (experiment, overrides): the steps compared in benchmarks/README.md ("Where prototypes look").
STEPS: dict[str, tuple[str, list[str]]] = {
    "digits_paper": switches(DIGITS, extra=AT_16),
    "digits_replicate": switches(DIGITS, replicate=True, extra=AT_16),
    "digits_pcluster": switches(DIGITS, cluster=True, extra=AT_16),
    "digits_pcluster_replicate": switches(DIGITS, cluster=True, replicate=True, extra=AT_16),
    "digits_pcluster_replicate_distinct": switches(DIGITS, True, True, True, extra=AT_16),
    "digits_shallow": switches(DIGITS, True, True, blocks_per_stage=1, extra=AT_16),
    "digits_coordinates": switches(DIGITS, True, True, True, coordinates=True, extra=AT_16),
    "digits32_pcluster_replicate": switches(DIGITS, cluster=True, replicate=True, extra=AT_32),
    "digits32_pcluster_replicate_distinct": switches(DIGITS, True, True, True, extra=AT_32),
    "digits32_coordinates": switches(DIGITS, True, True, True, coordinates=True, extra=AT_32),
    "digits32_coordinates_from_scratch": switches(
        DIGITS, True, True, True, coordinates=True, from_scratch=True, extra=AT_32
    ),
    "digits32_coordinates_prune": switches(
        DIGITS, True, True, True, coordinates=True, prune=True, extra=AT_32
    ),
    "parts_paper": switches(PARTS),
    "parts_switches": switches(PARTS, cluster=True, replicate=True, distinct=True),
    "parts_coordinates": switches(PARTS, coordinates=True),
    "parts_coordinates_replicate": switches(PARTS, replicate=True, coordinates=True),
    "parts_coordinates_replicate_stride2": switches(PARTS, replicate=True, coordinates=True, stride=2),
    "parts_coordinates_replicate_from_scratch": switches(
        PARTS, replicate=True, coordinates=True, from_scratch=True
    ),
    "parts_coordinates_switches": switches(PARTS, True, True, True, coordinates=True),
    "parts_stride2_separation0": switches(PARTS, replicate=True, coordinates=True, stride=2, separation=0.0),
    "parts_stride2_separation016": switches(
        PARTS, replicate=True, coordinates=True, stride=2, separation=-0.16
    ),
    "parts_stride2_deeper": switches(
        PARTS,
        replicate=True,
        coordinates=True,
        stride=2,
        blocks_per_stage=3,
    ),
    "parts_stride2_prune": switches(PARTS, replicate=True, coordinates=True, stride=2, prune=True),
    "parts_stride2_prune_separation016": switches(
        PARTS, replicate=True, coordinates=True, stride=2, prune=True, separation=-0.16
    ),
    "parts_stride2_prune_separation024": switches(
        PARTS, replicate=True, coordinates=True, stride=2, prune=True, separation=-0.24
    ),
    "parts_stride2_prune_separation024_distinct": switches(
        PARTS, distinct=True, replicate=True, coordinates=True, stride=2, prune=True, separation=-0.24
    ),
    "parts_stride2_prune_separation03_distinct": switches(
        PARTS, distinct=True, replicate=True, coordinates=True, stride=2, prune=True, separation=-0.3
    ),
}
# The parts default of 2026-12-03 (stride 2, pruning, separation -0.24, distinct push) with one thing changed;
# "shallow": one conv per stage (8 px receptive field at stride 2), the default since.
PARTS_12_03 = {
    "distinct": True,
    "replicate": True,
    "coordinates": True,
    "stride": 2,
    "prune": True,
    "separation": -0.24,
}
SHALLOW = PARTS_12_03 | {"blocks_per_stage": 1}
STEPS |= {
    "parts_12_03_stride4": switches(PARTS, **PARTS_12_03 | {"stride": 4}),
    "parts_shallow": switches(PARTS, **SHALLOW),
    "parts_shallow_stride4": switches(PARTS, **SHALLOW | {"stride": 4}),
    "parts_shallow_separation008": switches(PARTS, **SHALLOW | {"separation": -0.08}),
    "parts_shallow_separation016": switches(PARTS, **SHALLOW | {"separation": -0.16}),
    "parts_shallow_separation032": switches(PARTS, **SHALLOW | {"separation": -0.32}),
    "parts_shallow_width64": switches(PARTS, **SHALLOW | {"width": 64}),
    "parts_shallow_width16": switches(PARTS, **SHALLOW | {"width": 16}),
    "parts_shallow_cluster16": switches(PARTS, **SHALLOW | {"cluster_weight": 1.6}),
    "parts_shallow_cluster32": switches(PARTS, **SHALLOW | {"cluster_weight": 3.2}),
    "parts_shallow_linear": switches(PARTS, **SHALLOW, extra=("model.net.similarity.activation=linear",)),
    "parts_shallow_dim32": switches(PARTS, **SHALLOW, extra=("model.net.prototype_dim=32",)),
    "parts_shallow_longer": switches(
        PARTS, **SHALLOW, extra=("model.schedule.train_epochs=31", "trainer.max_epochs=51")
    ),
}
COLUMNS = (
    "test_acc",
    "push_cost",
    "background_share",
    "part_score",
    "zero_part_share",
    "part_framing",
    "duplicates",
)


def push_accuracies(log: Path, plan: list[EpochPlan]) -> tuple[float, float]:
    """Val accuracy at the end of the last joint epoch before the final push, and the pushed model's at the
    end of that push's last-layer epochs (before any prune), from the CSV log and the schedule's ``plan``
    (NaN, NaN without a push or where the log lacks those epochs)."""
    val = {
        int(row["epoch"]): float(row["val/acc"]) for row in csv.DictReader(log.open()) if row.get("val/acc")
    }
    pushes = [epoch for epoch, entry in enumerate(plan) if entry.action == "push"]
    if not pushes or not pushes[-1]:
        return float("nan"), float("nan")
    start = end = pushes[-1]
    while end + 1 < len(plan) and plan[end + 1].phase == "last" and plan[end + 1].action is None:
        end += 1  # last last-layer epoch of the final push's cycle
    return val.get(start - 1, float("nan")), val.get(end, float("nan"))


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
        before, after = push_accuracies(out / "csv" / "metrics.csv", instantiate(cfg.model.schedule).plan())
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
