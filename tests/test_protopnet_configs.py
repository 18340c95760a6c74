"""The ProtoPNet experiment configs compose, build what they promise and train end to end via train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from torchvision import tv_tensors
from torchvision.transforms import v2

from explain.__main__ import main as explain_cli
from protolib.cli.train import CONFIG_DIR, run
from protolib.lit.checkpoint import build_module, load_module
from protolib.lit.protopnet import ProtoPNetModule

SHORT = [
    "model.schedule.train_epochs=2",
    "model.schedule.warm_epochs=1",
    "model.schedule.push_start=1",
    "model.schedule.last_layer_epochs=1",
    "model.schedule.prune_last_layer_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.accelerator=cpu",
]


def test_digits_experiment_builds_the_documented_model(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=protopnet_digits")
    assert cfg.monitor == "val/pushed_acc" and cfg.callbacks.checkpoint.monitor == "val/pushed_acc"
    assert cfg.callbacks.prototype_pictures is not None and cfg.callbacks.early_stopping is not None
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 1, "image_size": cfg.data.image_size})
    assert isinstance(module, ProtoPNetModule)
    assert module.net.bank.num_prototypes == 100 and module.net.prototype_dim == 128
    assert len(module.schedule.plan()) == cfg.trainer.max_epochs == 36
    assert module.schedule.prune and module.schedule.prune_k == 6 and module.schedule.prune_threshold == 3
    paper = {"ce": 1.0, "cluster": 0.8, "separation": -0.08, "l1": 1e-4}
    assert module.loss.weights == {**paper, "prototype_cluster": 0.8}  # the paper's terms + one switch
    assert module.net.distinct_push and cfg.data.image_size == 32
    padding = {m.padding_mode for m in module.net.backbone.modules() if isinstance(m, torch.nn.Conv2d)}
    assert padding == {"replicate"} and module.net.backbone.coordinates
    model = OmegaConf.load(Path(CONFIG_DIR) / "model" / "protopnet.yaml")  # the paper's switches stay off
    assert model.loss.prototype_cluster == 0.0 and model.net.distinct_push is False
    assert model.net.backbone_options is None


def test_cub_experiment_has_the_paper_recipe_and_augmentation(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=protopnet_cub", "model.net.pretrained=false")
    assert cfg.data.crop and cfg.data.image_size == 224 and cfg.model.net.backbone == "resnet34"
    assert cfg.model.schedule.train_epochs == 51 and cfg.model.schedule.last_layer_epochs == 20
    augment = v2.Compose(list(instantiate(cfg.data.train_transforms)))
    image = tv_tensors.Image(torch.rand(3, 224, 224))
    out = augment({"image": image})["image"]
    assert out.shape == image.shape and not torch.equal(out, image)
    module = build_module(cfg.model, {"num_classes": 200, "in_channels": 3, "image_size": 224})
    assert module.net.bank.num_prototypes == 2000
    rf = module.net.receptive_field
    assert rf.stride == (32.0, 32.0) and rf.feature_size == (7, 7)
    assert len(module.schedule.plan()) == cfg.trainer.max_epochs == 151


@pytest.mark.parametrize("experiment", ["protopnet_digits", "st_protopnet_digits", "cbc_digits"])
def test_digits_experiments_share_protopnet_digits_small_cnn(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, f"experiment={experiment}")
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 1, "image_size": cfg.data.image_size})
    # 32 px: the 16 px receptive field is half the image, so where a box sits says what it looks at
    rf, first_conv = module.net.receptive_field, module.net.backbone.body[0]
    assert cfg.data.image_size == 32 and rf.size == (16.0, 16.0) and rf.feature_size == (8, 8)
    assert module.net.backbone.coordinates and first_conv.in_channels == 1 + 2
    padding = {m.padding_mode for m in module.net.backbone.modules() if isinstance(m, torch.nn.Conv2d)}
    assert padding == {"replicate"} and module.net.distinct_push == (experiment != "cbc_digits")


def test_tesnet_digits_keeps_16_px_with_distinct_push(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=tesnet_digits")
    assert (
        cfg.data.image_size == 16 and cfg.model.net.distinct_push and "backbone_options" not in cfg.model.net
    )


@pytest.mark.parametrize(
    "experiment", ["protopnet_parts", "tesnet_parts", "st_protopnet_parts", "cbc_parts", "protopool_parts"]
)
def test_parts_experiments_share_protopnet_parts_small_cnn(experiment: str, tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, f"experiment={experiment}")
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 3, "image_size": cfg.data.image_size})
    # positions for every location, a map fine enough to centre a box on a part (16 x 16 at 32 px) and
    # receptive fields of 8 px, about a part's size (9-14 px), with no zero padding at the border
    rf, first_conv = module.net.receptive_field, module.net.backbone.body[0]
    assert module.net.backbone.coordinates and rf.feature_size == (16, 16) and rf.size == (8.0, 8.0)
    assert first_conv.padding_mode == "replicate" and first_conv.in_channels == 3 + 2
    # the class-owned pushes take distinct patches (CBC's components and ProtoPool's pool belong to no class)
    shared = experiment in ("cbc_parts", "protopool_parts")
    assert getattr(module.net, "distinct_push", False) == (not shared)


def test_deformable_parts_takes_padding_coordinates_and_distinct_push_but_keeps_stride_4(
    tmp_path: Path,
) -> None:
    cfg = compose_config(tmp_path, "experiment=deformable_protopnet_parts")
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 3, "image_size": cfg.data.image_size})
    net = module.net
    assert net.backbone.coordinates and net.backbone.body[0].padding_mode == "replicate" and net.distinct_push
    # the upsampling add-on doubles the stride-4 map: 16 x 16 at 32 px, as protopnet_parts's
    assert net.receptive_field.stride == (2.0, 2.0) and net.receptive_field.feature_size == (16, 16)


def test_parts_experiment_composes(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=protopnet_parts")
    assert cfg.data._target_.endswith("PartsDataModule") and cfg.model.net.backbone == "small_cnn"
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 3, "image_size": cfg.data.image_size})
    assert len(module.schedule.plan()) == cfg.trainer.max_epochs
    assert module.loss.weights["cluster"] == 0.8 and module.loss.weights["separation"] == -0.24
    assert module.net.distinct_push and module.schedule.prune and cfg.trainer.max_epochs == 36


def test_train_py_runs_protopnet_and_keeps_the_best_pushed_model(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=protopnet_digits", *SHORT)
    metrics = run(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    assert json.loads((tmp_path / "metrics.json").read_text()) == pytest.approx(metrics)
    (checkpoint,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    # 0 warm, 1 joint, 2 push + last layer, 3 prune + last layer: only the pruned model is kept
    assert checkpoint.name == "best-epoch03.ckpt"
    module = load_module(checkpoint)
    assert int(module.net.revision) == 2 and (module.net.provenance()["source_sample"] >= 0).all()
    kept = module.net.bank.num_prototypes
    assert 0 < kept <= 100 and metrics["test/push_distinct_sources_min"] >= 1
    pictures = tmp_path / "prototypes" / "epoch-003"
    assert len(list(pictures.glob("prototype-*.png"))) == kept
    assert (pictures / "gallery-01.png").stat().st_size > 0
    assert len(json.loads((pictures / "prototypes.json").read_text())) == kept
    quality = json.loads((pictures / "quality.json").read_text())
    assert 0.0 <= quality["background_share"] <= 1.0 and quality["distinct_sources_min"] >= 1
    assert metrics["test/push_background_share"] == pytest.approx(quality["background_share"])
    # the same pictures from the checkpoint alone, through the command line
    explain_cli(["prototypes", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "again")])
    assert len(list((tmp_path / "again").glob("prototype-*.png"))) == kept
    assert (tmp_path / "again" / "prototypes.json").read_text() == (pictures / "prototypes.json").read_text()
