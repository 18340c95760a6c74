"""PALM end to end on the built-in digits: experiment=palm_digits trains, logs held-out OOD AUROC, and beats
the untrained model at telling ID digits 0-5 from held-out digits 6-9; the CIFAR-100 recipe composes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import lightning as L
import pytest
import torch
from config_helpers import compose_config
from hydra.utils import instantiate
from sklearn.metrics import roc_auc_score

from protolib.cli.train import run
from protolib.lit.checkpoint import build_module, load_module
from protolib.lit.palm import PALMModule
from protolib.ood.features import extract_features
from protolib.ood.postprocessors import Mahalanobis

FAST = ["trainer.max_epochs=4", "trainer.accelerator=cpu", "data.image_size=16"]


def held_out_auroc(
    module: L.LightningModule, datamodule: L.LightningDataModule, center: str = "standardized"
) -> float:
    """AUROC of PALM's reference score (Mahalanobis, normalised + standardised features), via scikit-learn."""
    score = Mahalanobis(normalize=True, standardize=True, class_conditional=False, center=center)
    score.fit(module, datamodule.push_dataloader())
    id_scores = score.score(module, extract_features(module, datamodule.test_dataloader()))
    ood_scores = score.score(module, extract_features(module, datamodule.held_out_dataloader("test")))
    labels = [1] * len(id_scores) + [0] * len(ood_scores)
    return float(roc_auc_score(labels, torch.cat([id_scores, ood_scores]).numpy()))


def test_palm_digits_training_raises_held_out_auroc(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=palm_digits", *FAST)
    metrics = run(cfg)
    assert metrics["test/acc"] > 0.8

    with open(tmp_path / "csv" / "metrics.csv") as f:
        logged = [float(row["val/ood_auroc"]) for row in csv.DictReader(f) if row.get("val/ood_auroc")]
    assert len(logged) == 4 and all(0.5 < value <= 1.0 for value in logged)

    trained = load_module(sorted((tmp_path / "checkpoints").glob("best-*.ckpt"))[0])
    assert isinstance(trained, PALMModule)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    L.seed_everything(cfg.seed)
    untrained = build_module(cfg.model, {"num_classes": 6, "in_channels": 1}).eval()
    before, after = held_out_auroc(untrained, datamodule), held_out_auroc(trained, datamodule)
    assert after > before + 0.03, (before, after)
    assert after > 0.9
    # the tested (best) model's held-out AUROC is in metrics.json and the summary, with the callback's score
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["test/ood_auroc"] == pytest.approx(held_out_auroc(trained, datamodule, "raw"), abs=1e-6)
    assert 0.0 <= saved["test/ood_fpr95"] <= 1.0 and metrics["test/ood_auroc"] == saved["test/ood_auroc"]


@pytest.mark.parametrize("loss_form", ["paper", "reference"])
def test_one_training_step_updates_the_bank_and_the_network(loss_form: str, tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path, "experiment=palm_digits", "data.image_size=16", f"model.loss_form={loss_form}"
    )
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    assert batch["image"].shape[1] == 2  # two views
    module = build_module(cfg.model, {"num_classes": 6, "in_channels": 1})
    bank_before = module.prototype_bank.vectors.clone()
    head_before = [p.detach().clone() for p in module.net.head.parameters()]
    trainer = L.Trainer(
        max_steps=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainer.fit(module, datamodule=datamodule)
    assert not torch.equal(module.prototype_bank.vectors, bank_before)
    assert torch.allclose(module.prototype_bank.vectors.norm(dim=1), torch.ones(36), atol=1e-5)
    assert any(not torch.equal(a, b) for a, b in zip(module.net.head.parameters(), head_before, strict=True))
    assert {"train/mle", "train/proto_contra"} <= set(trainer.callback_metrics)


def test_palm_cifar100_recipe_composes(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=palm_cifar100")
    assert cfg.data.batch_size == 512 and cfg.data.num_views == 2 and cfg.trainer.max_epochs == 500
    assert cfg.model.optimizer.lr == 0.5 and cfg.model.net.momentum == 0.999 and cfg.model.net.topk == 5
    module = build_module(cfg.model, {"num_classes": 100, "in_channels": 3, "image_size": 32})
    assert module.net.backbone.out_channels == 512
    assert module.prototype_bank.vectors.shape == (600, 128) and module.prototype_bank.metric == "cosine"
    transforms = instantiate(cfg.data.train_transforms)
    assert [type(t).__name__ for t in transforms] == [
        "RandomResizedCrop",
        "RandomHorizontalFlip",
        "RandomApply",
        "RandomGrayscale",
    ]
