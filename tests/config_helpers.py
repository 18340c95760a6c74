"""Compose protolib's training config in tests, with the run directory under the test's tmp_path."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from protolib.cli.train import CONFIG_DIR


def compose_config(tmp_path: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"output_dir={tmp_path}", *overrides])
