"""The training-time held-out OOD callback: fails before training without held-out classes, ODIN's input std,
and every rank extracting only its share of the data under DDP (two gloo processes)."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from config_helpers import compose_config
from ddp_helpers import run_ranks
from ood_ddp_worker import ITEMS, WORLD, Tiny, dataset, worker

from protolib.cli.train import run as train
from protolib.data.digits import DigitsDataModule
from protolib.ood.callbacks import HeldOutOODMetrics
from protolib.ood.features import extract_features
from protolib.ood.metrics import ood_metrics
from protolib.ood.postprocessors import ODIN


def digits(classes: list[int] | None) -> DigitsDataModule:
    dm = DigitsDataModule(image_size=16, batch_size=32, classes=classes, seed=0)
    dm.setup("fit")
    return dm


def test_palm_digits_without_held_out_classes_fails_before_training(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=palm_digits", "data.classes=null", "trainer.max_epochs=1")
    with pytest.raises(ValueError, match=r"keeps every class.*callbacks\.ood=null") as error:
        train(cfg)
    assert "data.classes to a subset" in str(error.value)
    assert not (tmp_path / "checkpoints").exists()  # no epoch ran


def test_odin_in_the_callback_steps_in_pixel_units_of_the_data() -> None:
    dm = digits([0, 1, 2])
    model, logged = Tiny(), {}
    model.log = lambda name, value: logged.__setitem__(name, value)  # what LightningModule.log records
    callback = HeldOutOODMetrics(ODIN(temperature=10.0, noise=0.01))
    trainer = SimpleNamespace(sanity_checking=False, current_epoch=0, datamodule=dm)
    with torch.inference_mode():  # as Lightning's validation loop runs the hook
        callback.on_validation_epoch_end(trainer, model)
    assert callback.postprocessor.input_std == pytest.approx(dm.std.flatten().tolist())
    expected_odin = ODIN(temperature=10.0, noise=0.01, input_std=dm.std.flatten().tolist())

    def scores(dataset) -> np.ndarray:
        batch = {"image": torch.stack([dataset[i]["image"] for i in range(len(dataset))])}
        return expected_odin.score(model, batch).numpy()

    expected = ood_metrics(scores(dm.val_dataset), scores(dm.held_out_dataset("val")))
    assert logged["val/ood_auroc"] == pytest.approx(expected["auroc"])
    assert logged["val/ood_fpr95"] == pytest.approx(expected["fpr95"])


@pytest.mark.slow
def test_each_rank_extracts_its_share_and_all_get_the_whole_in_order(tmp_path: Path) -> None:
    records = run_ranks(worker, WORLD, tmp_path)
    single = extract_features(Tiny(), torch.utils.data.DataLoader(dataset(), batch_size=4))
    for record in records:
        assert record["seen"] == (ITEMS + 1) // WORLD  # 6 of 11 items each (one padded), not all 11
        assert record["features"].keys() == single.keys()
        for key, value in single.items():
            torch.testing.assert_close(record["features"][key], value)
