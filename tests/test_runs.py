"""Training runs that lose nothing: last.ckpt, interruption, resuming in place, divergence, bad checkpoints,
corrupt images, and no leftovers from runs that fail before training."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config

from protolib.cli.train import run

REPO = Path(__file__).resolve().parents[1]
TINY = ["trainer.limit_train_batches=3", "trainer.limit_val_batches=1", "trainer.accelerator=cpu"]


def epoch_of(path: Path) -> int:
    return int(torch.load(path, map_location="cpu", weights_only=False)["epoch"])


def test_last_checkpoint_is_the_latest_epoch_even_when_the_metric_does_not_improve(tmp_path: Path) -> None:
    # monitor=epoch in mode min improves only once (epoch 0): ModelCheckpoint(save_last) kept last.ckpt there
    cfg = compose_config(
        tmp_path,
        "experiment=baseline_digits",
        "trainer.max_epochs=3",
        "monitor=epoch",
        "callbacks.checkpoint.mode=min",
        *TINY,
    )
    run(cfg)
    assert epoch_of(tmp_path / "checkpoints" / "last.ckpt") == 2
    assert [p.name for p in (tmp_path / "checkpoints").glob("best-*.ckpt")] == ["best-epoch00.ckpt"]


@pytest.mark.slow
def test_sigterm_mid_training_saves_the_state_at_the_stop(tmp_path: Path) -> None:
    last = tmp_path / "checkpoints" / "last.ckpt"
    command = [
        sys.executable,
        "train.py",
        "experiment=baseline_digits",
        "trainer.max_epochs=1000",
        "trainer.accelerator=cpu",
        f"hydra.run.dir={tmp_path}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        deadline = time.monotonic() + 300
        while not last.exists() and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.2)
        assert last.exists(), "no last.ckpt after the first epoch"
        time.sleep(1.5)  # into the next epoch
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=120)
    finally:
        process.kill()
    assert process.returncode == 128 + signal.SIGTERM, output[-3000:]
    stop = re.search(r"interrupted \(SIGTERMException\) at epoch (\d+), step (\d+)", output)
    assert stop, output[-3000:]
    checkpoint = torch.load(last, map_location="cpu", weights_only=False)
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (int(stop[1]), int(stop[2]))
    assert checkpoint["global_step"] > 0 and "protolib" in checkpoint


def test_diverging_protopnet_stops_with_the_divergence_message(tmp_path: Path) -> None:
    # every learning rate 1e6: the losses stay finite (the add-on's sigmoid saturates); the push lands ~1e13
    # per dimension away (with more joint epochs the last layer's loss explodes to ~1e9)
    huge = "{backbone: 1e6, add_on: 1e6, prototypes: 1e6}"
    cfg = compose_config(
        tmp_path,
        "experiment=protopnet_digits",
        "trainer.limit_train_batches=5",
        "trainer.limit_val_batches=1",
        "trainer.accelerator=cpu",
        "model.schedule.train_epochs=4",
        "model.schedule.warm_epochs=2",
        "model.schedule.push_start=3",
        "model.schedule.last_layer_epochs=1",
        f"model.schedule.joint_lr={huge}",
        "model.schedule.warm_lr={add_on: 1e6, prototypes: 1e6}",
        "model.schedule.last_layer_lr={last_layer: 1e6}",
    )
    with pytest.raises(FloatingPointError, match=r"(loss is|push: mean) .* training has diverged"):
        run(cfg)
    assert not (tmp_path / "metrics.json").exists()


def test_divergence_check_judges_losses_against_their_start_and_pushes_per_dimension() -> None:
    from types import SimpleNamespace

    from protolib.lit.callbacks.runs import DivergenceCheck

    check = DivergenceCheck(loss_factor=10.0, reference_steps=2, push_factor=5.0)
    trainer = SimpleNamespace(global_step=7)
    for value in (3.0, -5.0, 39.0, -39.0):  # reference |3|, |-5| -> 4; 39 < 10 x 4
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(value)}, None, 0)
    assert check.reference == 4.0
    with pytest.raises(FloatingPointError, match=r"loss is 41.*4 at step 7; training has diverged"):
        check.on_train_batch_end(trainer, None, {"loss": torch.tensor(41.0)}, None, 0)
    with pytest.raises(FloatingPointError, match="loss is nan at step 7; training has diverged"):
        DivergenceCheck().on_train_batch_end(trainer, None, torch.tensor(float("nan")), None, 0)

    bank = SimpleNamespace(dim=4)
    fine = SimpleNamespace(
        last_push=SimpleNamespace(distances=torch.tensor([19.0, 21.0])), prototype_bank=bank
    )
    check.on_train_batch_start(trainer, fine, None, 0)  # 20 / D=4 = 5 per dimension: at the limit
    absurd = SimpleNamespace(
        last_push=SimpleNamespace(distances=torch.tensor([20.0, 22.0])), prototype_bank=bank
    )
    with pytest.raises(FloatingPointError, match=r"push: mean .* 21 \(5.25 per dimension of D=4"):
        check.on_train_batch_start(trainer, absurd, None, 0)
    broken = SimpleNamespace(
        last_push=SimpleNamespace(distances=torch.tensor([float("inf")])), prototype_bank=bank
    )
    with pytest.raises(FloatingPointError, match="push: mean prototype-to-patch distance is inf"):
        check.on_train_batch_start(trainer, broken, None, 0)


def test_resume_continues_the_run_in_its_own_folder(tmp_path: Path) -> None:
    import csv
    import json

    from protolib.cli.train import resumed_run_dir

    first = compose_config(tmp_path, "experiment=baseline_digits", "trainer.max_epochs=2", *TINY)
    run(first)
    last = tmp_path / "checkpoints" / "last.ckpt"
    best_before = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]
    assert resumed_run_dir(str(last), "outputs/new") == str(tmp_path.resolve())  # hydra.run.dir on resume
    assert resumed_run_dir(None, "outputs/new") == "outputs/new"

    again = compose_config(
        tmp_path, "experiment=baseline_digits", "trainer.max_epochs=4", f"resume={last}", *TINY
    )
    metrics = run(again)
    with open(tmp_path / "csv" / "metrics.csv", newline="") as file:
        epochs = {int(row["epoch"]) for row in csv.DictReader(file) if row["val/acc"]}
    assert epochs == {0, 1, 2, 3}  # one log holds the whole run
    assert epoch_of(last) == 3
    tracker = next(v for k, v in best_before.items() if k.startswith("ModelCheckpoint"))
    after = torch.load(last, map_location="cpu", weights_only=False)["callbacks"]
    resumed = next(v for k, v in after.items() if k.startswith("ModelCheckpoint"))
    assert float(resumed["best_model_score"]) >= float(tracker["best_model_score"])  # carried over, not reset
    best = sorted((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert len(best) == 1 and Path(resumed["best_model_path"]) == best[0]
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == {"checkpoints", "csv"}  # nothing elsewhere


def test_bad_checkpoints_get_protolib_messages_naming_the_file(tmp_path: Path) -> None:
    from protolib.lit.checkpoint import build_record, load_module

    with pytest.raises(ValueError, match=r"README.md is not a readable protolib checkpoint"):
        load_module(REPO / "README.md")
    whole = tmp_path / "whole.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, whole)
    cut = tmp_path / "cut.ckpt"
    cut.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    with pytest.raises(ValueError, match=r"cut.ckpt is not a readable protolib checkpoint.*truncated"):
        load_module(cut)

    palm = compose_config(tmp_path, "experiment=palm_digits")
    build = {"num_classes": 6, "in_channels": 1, "image_size": 32}
    other = tmp_path / "palm.ckpt"
    torch.save(
        {"protolib": build_record(palm.model, palm.data, build, "palm_digits"), "state_dict": {}}, other
    )
    for bad, message in [
        (
            other,
            r"palm.ckpt holds a PALMModule with a PALMNet network from experiment palm_digits.*"
            r"builds a ClassifierModule with a BaselineNet network; resume it with experiment=palm_digits",
        ),
        (cut, r"cut.ckpt is not a readable protolib checkpoint"),
    ]:
        out = tmp_path / f"run-{bad.stem}"
        cfg = compose_config(out, "experiment=baseline_digits", f"resume={bad}", *TINY)
        with pytest.raises(ValueError, match=message):
            run(cfg)
        assert not out.exists()


def test_a_run_that_fails_before_training_leaves_no_folder(tmp_path: Path) -> None:
    out = tmp_path / "run"
    (out / ".hydra").mkdir(parents=True)  # what Hydra writes before train.py runs
    (out / ".hydra" / "config.yaml").write_text("seed: 42\n")
    (out / "train.log").write_text("")
    cfg = compose_config(out, "experiment=baseline_digits", "data.image_size=2", *TINY)
    with pytest.raises(ValueError, match="image_size"):
        run(cfg)
    assert not out.exists()

    mine = tmp_path / "mine"  # a folder the user named, holding their own files: only what the run added goes
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="image_size"):
        run(compose_config(mine, "experiment=baseline_digits", "data.image_size=2", *TINY))
    assert sorted(p.name for p in mine.iterdir()) == ["notes.txt"]


def write_truncated_jpeg(path: Path) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (48, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, quality=95)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])  # an interrupted copy


def test_verify_reports_every_bad_image_of_an_image_folder_before_training(tmp_path: Path) -> None:
    from test_data_imagefolder import make, write_tree

    write_tree(tmp_path / "train", per_class=4)
    write_tree(tmp_path / "test", per_class=2)
    write_truncated_jpeg(tmp_path / "train" / "sky" / "2.jpg")
    write_truncated_jpeg(tmp_path / "test" / "apple" / "5.jpg")
    with pytest.raises(ValueError, match=r"2 of 20 image files cannot be decoded") as error:
        make(tmp_path, verify=True)
    assert "sky/2.jpg" in str(error.value) and "apple/5.jpg" in str(error.value)
    with pytest.raises(ValueError, match="cannot be decoded"):
        make(tmp_path)  # verify="auto": 20 files are verified
    dm = make(tmp_path, verify=False)  # not verified: found only when its batch loads
    assert len(dm.train_dataset) > 0


def test_verify_reports_bad_cub_images(tmp_path: Path) -> None:
    from test_data_cub import CLASSES, make, write_cub

    folder = write_cub(tmp_path)
    write_truncated_jpeg(folder / "images" / CLASSES[2] / "bird_8.jpg")
    with pytest.raises(ValueError, match=r"(?s)1 of 9 image files cannot be decoded.*bird_8\.jpg"):
        make(folder, verify=True)
    make(folder, verify=False)


@pytest.mark.slow
def test_train_py_failing_before_training_leaves_no_run_folder(tmp_path: Path) -> None:
    run_dir = tmp_path / "outputs" / "run"
    command = [
        sys.executable,
        "train.py",
        "experiment=baseline_digits",
        "data=imagefolder",
        f"data.root={tmp_path / 'no_such_folder'}",
        f"hydra.run.dir={run_dir}",
    ]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0 and "no_such_folder" in done.stderr
    assert not run_dir.exists(), sorted(p.name for p in run_dir.rglob("*"))
