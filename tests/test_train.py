"""The training entry point end to end: config composition, outputs, checkpoints, clear failures."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config
from hydra.errors import ConfigCompositionException

from protolib.cli.train import run
from protolib.lit.checkpoint import load_module

REPO = Path(__file__).resolve().parents[1]
FAST = [
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=4",
    "trainer.limit_val_batches=2",
    "trainer.accelerator=cpu",
]


def test_baseline_run_writes_metrics_config_checkpoint_and_picture(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=baseline_digits", *FAST)
    metrics = run(cfg)

    written = json.loads((tmp_path / "metrics.json").read_text())
    assert written == pytest.approx(metrics)
    assert 0.0 <= written["test/acc"] <= 1.0
    assert "${" not in (tmp_path / "config.yaml").read_text()  # resolved
    assert (tmp_path / "confusion_matrix.png").stat().st_size > 0
    assert list((tmp_path / "csv").glob("metrics.csv"))

    checkpoints = sorted((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert len(checkpoints) == 1
    module = load_module(checkpoints[0])
    images = torch.randn(3, 1, 32, 32)
    again = load_module(checkpoints[0])
    torch.testing.assert_close(module(images), again(images))
    assert module.build_config["data"]["_target_"].endswith("DigitsDataModule")


def test_unknown_config_key_fails_before_training(tmp_path: Path) -> None:
    with pytest.raises(ConfigCompositionException, match="learning_rat"):
        compose_config(tmp_path, "model.learning_rat=0.1")


def test_gpu_trainer_without_cuda_fails_clearly(tmp_path: Path) -> None:
    if torch.cuda.is_available():
        pytest.skip("GPU present: the CPU-only failure cannot happen")
    cfg = compose_config(tmp_path, "trainer=gpu")
    with pytest.raises(ValueError, match="CUDA is not available"):
        run(cfg)


def test_image_size_too_small_for_backbone_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, *FAST, "data.image_size=2")
    with pytest.raises(ValueError, match="image_size"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()


@pytest.mark.slow
def test_multirun_sweep_from_the_command_line(tmp_path: Path) -> None:
    command = [
        sys.executable,
        "train.py",
        "--multirun",
        "seed=1,2",
        *FAST,
        f"hydra.sweep.dir={tmp_path}",
        "output_dir=${hydra:runtime.output_dir}",
    ]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    for job in ("0", "1"):
        assert "test/acc" in json.loads((tmp_path / job / "metrics.json").read_text())
    assert "test metrics:" in done.stdout


@pytest.mark.parametrize(
    ("logger", "written"),
    [("tensorboard", "tensorboard/events.out.tfevents.*"), ("wandb", "wandb/offline-run-*")],
)
def test_alternative_loggers_work_offline(tmp_path: Path, logger: str, written: str) -> None:
    cfg = compose_config(tmp_path, "experiment=baseline_digits", f"logger={logger}", *FAST)
    run(cfg)
    assert list(tmp_path.glob(written)), sorted(p.name for p in tmp_path.rglob("*"))[:30]
