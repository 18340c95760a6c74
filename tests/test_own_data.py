"""The own-data recipe and its benchmark: the baseline matches ProtoPNet's backbone and epochs, and the push
accuracies are read from the right rows of a constructed CSV log."""

from __future__ import annotations

import csv
import math
from pathlib import Path

from config_helpers import compose_config
from hydra.utils import instantiate

from benchmarks.protopnet_own_data import run_dir, train_once
from benchmarks.protopnet_recipe import STEPS, push_accuracies
from protolib.lit.callbacks.protopnet import ProtoPNetSchedule

HEADER = ["epoch", "step", "train/loss", "val/acc", "val/pushed_acc"]


def write_log(path: Path, rows: list[dict[str, object]]) -> Path:
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=HEADER)
        writer.writeheader()
        writer.writerows(rows)
    return path


def epoch_rows(val: list[float], pushed: list[float]) -> list[dict[str, object]]:
    """A CSV log's rows: a training-step row and a validation row per epoch."""
    rows: list[dict[str, object]] = []
    for epoch, (acc, pushed_acc) in enumerate(zip(val, pushed, strict=True)):
        rows.append({"epoch": epoch, "step": 10 * epoch + 5, "train/loss": 1.0})
        rows.append({"epoch": epoch, "step": 10 * epoch + 9, "val/acc": acc, "val/pushed_acc": pushed_acc})
    return rows


def test_push_accuracies_reads_the_last_joint_epoch_and_the_end_of_the_final_cycle(tmp_path: Path) -> None:
    # Epochs 0-1 joint, 2-3 last layer (push 1), 4 joint, 5-6 last layer (push 2).
    schedule = ProtoPNetSchedule(
        train_epochs=3, warm_epochs=0, push_start=1, push_every=1, last_layer_epochs=2
    )
    val = [0.50, 0.60, 0.58, 0.62, 0.70, 0.66, 0.69]
    pushed = [math.nan, math.nan, 0.58, 0.62, math.nan, 0.66, 0.69]
    before, after = push_accuracies(
        write_log(tmp_path / "metrics.csv", epoch_rows(val, pushed)), schedule.plan()
    )
    assert (before, after) == (0.70, 0.69)  # epoch 4's val/acc, epoch 6's


def test_push_accuracies_stop_before_a_prune(tmp_path: Path) -> None:
    # The same, then a prune (epoch 7) with 2 last-layer epochs: the push's cycle still ends at epoch 6.
    schedule = ProtoPNetSchedule(
        train_epochs=3,
        warm_epochs=0,
        push_start=1,
        push_every=1,
        last_layer_epochs=2,
        prune=True,
        prune_last_layer_epochs=2,
    )
    val = [0.50, 0.60, 0.58, 0.62, 0.70, 0.66, 0.69, 0.60, 0.65]
    pushed = [math.nan] * 7 + [0.60, 0.65]  # only the pruned model counts as pushed
    before, after = push_accuracies(
        write_log(tmp_path / "metrics.csv", epoch_rows(val, pushed)), schedule.plan()
    )
    assert (before, after) == (0.70, 0.69)


def test_push_accuracies_are_nan_without_a_push(tmp_path: Path) -> None:
    rows: list[dict[str, object]] = [
        {"epoch": e, "step": e, "val/acc": 0.9, "val/pushed_acc": ""} for e in range(3)
    ]
    plan = ProtoPNetSchedule(train_epochs=3, warm_epochs=0, push_start=5).plan()
    before, after = push_accuracies(write_log(tmp_path / "metrics.csv", rows), plan)
    assert math.isnan(before) and math.isnan(after)


def test_baseline_own_data_has_protopnet_own_datas_backbone_and_epochs(tmp_path: Path) -> None:
    base = compose_config(tmp_path, "experiment=baseline_own_data")
    proto = compose_config(tmp_path, "experiment=protopnet_own_data")
    for key in ("backbone", "pretrained"):
        assert base.model.net[key] == proto.model.net[key], key
    assert proto.model.net.backbone == "small_cnn" and not proto.model.net.pretrained
    schedule = instantiate(proto.model.schedule)
    assert base.trainer.max_epochs == len(schedule.plan()) == proto.trainer.max_epochs


def test_kept_runs_are_reused_and_named_by_their_overrides(tmp_path: Path) -> None:
    probe = ["model.loss.cluster=0.1"]
    assert run_dir(tmp_path, "protopnet", "parts", [], 0) != run_dir(tmp_path, "protopnet", "parts", probe, 0)
    kept = run_dir(tmp_path, "protopnet", "parts", probe, 1)
    kept.mkdir()
    (kept / "benchmark.json").write_text('{"test_acc": 0.5}')
    assert train_once("protopnet", "parts", probe, 1, tmp_path) == {"test_acc": 0.5}  # read back, not trained


def test_every_recipe_step_composes_with_the_backbone_it_names(tmp_path: Path) -> None:
    """Each step sets every small_cnn option explicitly, so a step keeps its meaning when a default moves."""
    for name, (experiment, overrides) in STEPS.items():
        options = compose_config(tmp_path, f"experiment={experiment}", *overrides).model.net.backbone_options
        named = {o.split("=")[0].rsplit(".", 1)[1]: o.split("=")[1] for o in overrides if "backbone_opt" in o}
        assert {key: str(options[key]).lower() for key in named} == named, name
