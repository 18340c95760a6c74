"""Every conf/data/*.yaml instantiates its datamodule; built-in ones load, file-based ones fail clearly."""

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from omegaconf.errors import MissingMandatoryValue

from protolib.data.base import Pipeline, VisionDataModule

CONF = Path(__file__).resolve().parents[1] / "conf" / "data"
BUILT_IN = {"digits", "parts", "gcd_digits"}
ON_DISK = {"cifar10", "cifar100", "svhn", "mnist", "fashion_mnist", "cub", "imagefolder"}
GCD_ON_DISK = {"gcd_cifar100"}  # a category-discovery split over an on-disk set


def test_every_dataset_has_a_config():
    assert {p.stem for p in CONF.glob("*.yaml")} == BUILT_IN | ON_DISK | GCD_ON_DISK


@pytest.mark.parametrize("name", sorted(BUILT_IN))
def test_built_in_configs_load_offline(name):
    dm = instantiate(OmegaConf.load(CONF / f"{name}.yaml"))
    dm.setup("fit")
    batch = next(iter(dm.val_dataloader()))
    assert batch["image"].shape[1:] == (dm.in_channels, dm.image_size, dm.image_size)
    assert dm.num_classes == 10 and len(dm.class_names) == 10


@pytest.mark.parametrize("name", sorted(ON_DISK))
def test_on_disk_configs_point_at_the_data_folder_and_fail_clearly(name, tmp_path, monkeypatch):
    monkeypatch.setenv("PROTOLIB_DATA", str(tmp_path / "datasets"))
    cfg = OmegaConf.load(CONF / f"{name}.yaml")
    if name == "imagefolder":
        with pytest.raises(MissingMandatoryValue):
            instantiate(cfg)
        cfg.root = str(tmp_path / "datasets" / "mine")
    assert str(cfg.root).startswith(str(tmp_path / "datasets"))
    dm = instantiate(cfg)
    assert isinstance(dm, VisionDataModule)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "datasets")):
        dm.setup("fit")
    if dm.train_transform is not None:  # the configured augmentations run and keep the image size
        pipeline = replace(Pipeline(dm.in_channels, dm.mean, dm.std), transform=dm.train_transform)
        image = torch.rand(dm.in_channels, dm.image_size, dm.image_size)
        assert pipeline({"image": image})["image"].shape == image.shape


def test_overrides_reach_the_datamodule():
    cfg = OmegaConf.merge(
        OmegaConf.load(CONF / "digits.yaml"),
        OmegaConf.from_dotlist(["classes=[0,1,2,3,4,5,6]", "image_size=16"]),
    )
    dm = instantiate(cfg)
    dm.setup()
    assert dm.num_classes == 7 and dm.image_size == 16 and dm.held_out_class_names == ["7", "8", "9"]
