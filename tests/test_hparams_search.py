"""Optuna searches (conf/hparams_search): each searched key exists in its family's config; two real trials."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from config_helpers import compose_config
from omegaconf import OmegaConf

from protolib.cli.train import CONFIG_DIR

SEARCHES = {  # search -> the experiment it is written for
    "baseline": "baseline_digits",
    "protopnet": "protopnet_digits",
    "tesnet": "tesnet_digits",
    "st_protopnet": "st_protopnet_digits",
    "deformable_protopnet": "deformable_protopnet_digits",
    "cbc": "cbc_digits",
    "prototree": "prototree_digits",
    "palm": "palm_digits",
    "moe_vit": "promoe_vit_digits",
    "pipnet": "pipnet_digits",
    "protopool": "protopool_digits",
    "simgcd": "simgcd_digits",
    "protogcd": "protogcd_digits",
}
ROOT = Path(CONFIG_DIR).parent


def test_one_search_per_family_over_keys_that_exist(tmp_path: Path) -> None:
    files = {p.stem for p in (Path(CONFIG_DIR) / "hparams_search").glob("*.yaml")}
    assert files == {f"{name}_optuna" for name in SEARCHES}
    for name, experiment in SEARCHES.items():
        search = yaml.safe_load((Path(CONFIG_DIR) / "hparams_search" / f"{name}_optuna.yaml").read_text())
        assert search["defaults"] == [{"override /hydra/sweeper": "optuna"}]
        assert search["hydra"]["sweeper"]["direction"] == "maximize"
        cfg = compose_config(tmp_path, f"experiment={experiment}", f"hparams_search={name}_optuna")
        for key in search["hydra"]["sweeper"]["params"]:
            assert OmegaConf.select(cfg, key, default="missing") != "missing", f"{name}: {key}"


@pytest.mark.slow
def test_two_trials_of_the_baseline_search(tmp_path: Path) -> None:
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    command = [
        sys.executable,
        "train.py",
        "-m",
        "hparams_search=baseline_optuna",
        "experiment=baseline_digits",
        "hydra.sweeper.n_trials=2",
        "trainer.max_epochs=1",
        "data.image_size=16",
        f"hydra.sweep.dir={tmp_path}",
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    accuracies = [json.loads((tmp_path / str(i) / "metrics.json").read_text())["test/acc"] for i in (0, 1)]
    best = yaml.safe_load((tmp_path / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(max(accuracies))
    assert 1e-4 <= best["best_params"]["model.optimizer.lr"] <= 1e-2
    configs = [yaml.safe_load((tmp_path / str(i) / "config.yaml").read_text()) for i in (0, 1)]
    assert configs[0]["model"]["optimizer"]["lr"] != configs[1]["model"]["optimizer"]["lr"]  # two samples
