"""evaluate_ood's defaults for any checkpoint: the postprocessors it supports, its own ID classes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from protolib.data.digits import DigitsDataModule
from protolib.lit.checkpoint import build_module, build_record
from protolib.ood.cli import (
    CONFIG_DIR,
    check_postprocessor_names,
    postprocessors_named,
    run,
    skip_unsupported,
)

QUICK = ["batch_size=128", "max_samples=60"]


def save_untrained(tmp_path: Path, name: str, *overrides: str) -> Path:
    """An untrained model of a training config, saved the way train.py saves checkpoints."""
    cfg = compose_config(tmp_path, *overrides)
    torch.manual_seed(0)
    data = OmegaConf.to_container(cfg.data, resolve=True)
    model = OmegaConf.to_container(cfg.model, resolve=True)
    classes = data.get("classes")
    build = {
        "num_classes": 10 if classes is None else len(classes),
        "in_channels": 1,
        "image_size": int(data["image_size"]),
    }
    module = build_module(model, build)
    path = tmp_path / f"{name}.ckpt"
    torch.save({"state_dict": module.state_dict(), "protolib": build_record(model, data, build)}, path)
    return path


def evaluate_config(tmp_path: Path, checkpoint: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "evaluate_ood",
            overrides=[
                f"checkpoint={checkpoint}",
                f"output_dir={tmp_path / 'out'}",
                "cache_dir=null",
                *overrides,
            ],
        )


@pytest.fixture(scope="module")
def palm_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_untrained(
        tmp_path_factory.mktemp("palm"),
        "palm",
        "experiment=palm_digits",
        "data.image_size=16",
        "model.net.embedding_dim=16",
        "model.net.prototypes_per_class=2",
        "model.net.topk=1",
    )


def test_default_list_leaves_out_what_a_palm_checkpoint_cannot_run(
    tmp_path: Path, palm_checkpoint: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = evaluate_config(tmp_path, palm_checkpoint, *QUICK, "postprocessors.knn.k=5")
    results = run(cfg)  # no postprocessors=[...] on the command line: the default list
    ran = {row["postprocessor"] for row in results.rows}
    assert {"palm", "palm_ssd", "palm_mds", "knn", "mahalanobis", "msp"} <= ran
    assert not ran & {"vim", "react", "ash"}  # they need a linear last layer, PALM has none
    assert set(results.meta["left_out"]) == {"vim", "react", "ash"}
    assert "last_layer" in results.meta["left_out"]["vim"]
    printed = capsys.readouterr().out
    assert "left out 3 postprocessor(s) this PALMModule checkpoint does not support" in printed
    report = json.loads((tmp_path / "out" / "ood_results.json").read_text())
    assert set(report["left_out"]) == {"vim", "react", "ash"}


def test_a_named_list_still_fails_before_any_work(tmp_path: Path, palm_checkpoint: Path) -> None:
    overrides = ["postprocessors=[msp,vim]"]
    cfg = evaluate_config(tmp_path, palm_checkpoint, *overrides, "cache_dir=" + str(tmp_path / "cache"))
    with pytest.raises(ValueError, match=r"postprocessor vim: vim needs model\.last_layer"):
        run(cfg, overrides)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="postprocessor vim"):  # unsupported=fail: the default list too
        run(evaluate_config(tmp_path, palm_checkpoint, "unsupported=fail"))


def test_unsupported_modes() -> None:
    assert postprocessors_named(["checkpoint=x", "postprocessors=[msp]"])
    assert not postprocessors_named(["postprocessors.knn.k=5", "benchmark=digits"])
    assert skip_unsupported("auto", ["postprocessors.knn.k=5"])
    assert not skip_unsupported("auto", ["postprocessors=[msp,vim]"])
    assert skip_unsupported("skip", ["postprocessors=[msp,vim]"]) and not skip_unsupported("fail")
    with pytest.raises(ValueError, match="choose one of"):
        skip_unsupported("sometimes")


def test_default_job_checkpoint_evaluates_with_no_other_argument(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # the default job: ProtoPNet on all ten digits, so no digit is held out for near-OOD
    checkpoint = save_untrained(tmp_path, "default_job")
    cfg = evaluate_config(tmp_path, checkpoint, *QUICK, "postprocessors.knn.k=5")
    results = run(cfg)
    assert results.groups == {"far": ["noise", "parts"]}
    assert "held_out_digits left out" in results.meta["benchmark_notes"][0]
    assert "note: near-OOD held_out_digits left out" in capsys.readouterr().out
    ran = {row["postprocessor"] for row in results.rows}
    assert {"prototype", "vim", "knn", "odin"} <= ran and "palm" not in ran  # palm needs an embedding
    assert set(results.meta["left_out"]) == {"palm"}


def test_held_out_classes_of_the_checkpoint_are_near_ood(tmp_path: Path) -> None:
    checkpoint = save_untrained(tmp_path, "six", "experiment=baseline_digits", "data.classes=[0,1,2,3,4,5]")
    cfg = evaluate_config(tmp_path, checkpoint, "postprocessors=[msp]")
    results = run(cfg)
    assert results.groups == {"near": ["held_out_digits"], "far": ["noise", "parts"]}
    near = next(row for row in results.rows if row["dataset"] == "held_out_digits")
    every = DigitsDataModule(image_size=16)  # the same seeded test split with all ten digits
    every.setup()
    assert near["num_id"] == int((every.test_dataset.targets < 6).sum())
    assert near["num_ood"] == int((every.test_dataset.targets >= 6).sum())


def test_misspelt_postprocessor_lists_the_valid_names() -> None:
    with pytest.raises(ValueError) as error:
        check_postprocessor_names(["checkpoint=x", "postprocessors=[msp,energi]"])
    message = str(error.value)
    assert "'energi' (did you mean 'energy'?)" in message
    assert "valid names: ash, ash_s, energy, gen, knn" in message
    check_postprocessor_names(["checkpoint=x", "postprocessors=[msp,energy]", "postprocessors.knn.k=3"])


def test_searchpath_override_keeps_protolibs_groups(tmp_path: Path) -> None:
    mine = tmp_path / "mine" / "postprocessors"
    mine.mkdir(parents=True)
    (mine / "my_score.yaml").write_text("my_score:\n  _target_: protolib.ood.postprocessors.MSP\n")
    searchpath = f"hydra.searchpath=[file://{tmp_path / 'mine'}]"
    check_postprocessor_names([searchpath, "postprocessors=[msp,my_score]"])  # the user's folder counts
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate_ood", overrides=[searchpath, "checkpoint=x", "postprocessors=[ash,my_score]"])
    assert set(cfg.postprocessors) == {"ash", "my_score"} and cfg.benchmark.name == "digits"


def test_feature_cache_is_under_the_users_cache_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("PROTOLIB_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate_ood", overrides=["checkpoint=x"])
    assert cfg.cache_dir == str(tmp_path / "xdg" / "protolib" / "ood_features")
    monkeypatch.setenv("PROTOLIB_CACHE", str(tmp_path / "mine"))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("evaluate_ood", overrides=["checkpoint=x"])
    assert cfg.cache_dir == str(tmp_path / "mine" / "ood_features")
