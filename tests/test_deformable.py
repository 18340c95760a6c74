"""Deformable ProtoPNet as a network: push provenance of every part, the recipe's phases, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config
from hydra.utils import instantiate
from protopnet_helpers import TINY, tiny_digits

from explain.__main__ import main as explain_cli
from protolib.cli.train import run
from protolib.data.digits import DigitsDataModule
from protolib.lit.callbacks.protopnet import ProtoPNetSchedule
from protolib.lit.checkpoint import build_module, load_module
from protolib.lit.protopnet import ProtoPNetModule
from protolib.losses.deformable import DeformableProtoPNetLoss
from protolib.models.deformable import DeformableProtoPNet
from protolib.models.protopnet import fetch_images


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    return tiny_digits()


def make_net(**options: object) -> DeformableProtoPNet:
    torch.manual_seed(0)
    return DeformableProtoPNet(
        num_classes=3,
        in_channels=1,
        image_size=16,
        backbone="small_cnn",
        prototypes_per_class=2,
        offset_hidden=8,
        **options,
    )


def test_extract_contract_and_parameter_groups() -> None:
    net = make_net()
    out = net.extract(torch.rand(4, 1, 16, 16))
    assert out["logits"].shape == (4, 3) and out["prototype_similarity"].shape == (4, 6)
    assert out["offsets"].shape == (4, 8, 8, 8)  # 4 x 4 small-CNN map, upsampled x2; (dy, dx) of 4 parts
    torch.testing.assert_close(net.last_layer(out["features"]), out["logits"])
    torch.testing.assert_close(out["prototype_similarity"], out["prototype_cosine"].clamp_min(0))
    groups = net.parameter_groups()
    assert set(groups) == {"backbone", "add_on", "prototypes", "last_layer", "offsets"}
    assert groups["add_on"] == [] and net.bank.dim == 64 * 4  # the upsampling add-on has no weights
    assert net.receptive_field.stride == (2.0, 2.0) and net.receptive_field.feature_size == (8, 8)


@torch.no_grad()
def test_push_projects_onto_the_best_deformed_patch_and_records_every_part(
    datamodule: DigitsDataModule,
) -> None:
    net = make_net()
    with torch.no_grad():  # visible offsets, so parts land off the grid
        net.prototype_layer.offset_predictor.net[2].bias.copy_(torch.linspace(-0.6, 0.7, 8))
    loader = datamodule.push_dataloader()
    net.push(loader, step=7)
    net.eval()
    # Brute force: every patch of every own-class image, scored by the model's own similarity.
    images = torch.cat([b["image"] for b in loader])
    labels = torch.cat([b["label"] for b in loader])
    similarity = 1 - net.prototype_layer(net.embed(images)).distances  # (N, P, h, w); after push: new protos
    provenance = net.provenance()
    for p in range(net.bank.num_prototypes):
        owner = int(net.owners[p])
        assert int(labels[provenance["source_sample"][p]]) == owner
        row, col = provenance["location"][p].tolist()
        own = similarity[labels == owner, p]
        # The pushed prototype is its source patch: cosine 1 / 1.01 up to the eps channels.
        assert similarity[provenance["source_sample"][p], p, row, col] == pytest.approx(own.max().item())
        assert own.max().item() == pytest.approx(1 / 1.01, abs=3e-3)
        # Each part's recorded position is the undeformed grid position plus the predicted offset there.
        source = fetch_images(loader.dataset, [int(provenance["source_sample"][p])])
        offsets = net.extract(source)["offsets"][0, :, row, col].view(4, 2)
        grid = torch.tensor([[-1.0, -1.0], [-1.0, 1.0], [1.0, -1.0], [1.0, 1.0]])
        expected = torch.tensor([row, col]) + grid + offsets
        torch.testing.assert_close(provenance["part_location"][p], expected)
    assert (provenance["step"] == 7).all() and int(net.revision) == 1
    boxes = provenance["part_box"]  # one 2-px cell per part, inside the 16-px image
    assert boxes.shape == (6, 4, 4) and (boxes[..., 2] > boxes[..., 0]).all() and (boxes <= 16).all()


def test_the_recipe_trains_offsets_only_in_joint_epochs(datamodule: DigitsDataModule, tmp_path: Path) -> None:
    import lightning as L

    schedule = ProtoPNetSchedule(
        **{**TINY, "joint_lr": {"backbone": 1e-3, "prototypes": 3e-3, "offsets": 1e-3}}
    )
    module = ProtoPNetModule(make_net(), loss=DeformableProtoPNetLoss(), schedule=schedule)
    start = [p.detach().clone() for p in module.net.prototype_layer.offset_predictor.parameters()]
    moved = {}

    class Spy(L.Callback):
        def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ProtoPNetModule) -> None:
            now = [p.detach().clone() for p in pl_module.net.prototype_layer.offset_predictor.parameters()]
            moved[trainer.current_epoch] = any(not torch.equal(a, b) for a, b in zip(start, now, strict=True))
            start[:] = now

    trainer = L.Trainer(
        accelerator="cpu",
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[Spy()],
    )
    trainer.fit(module, datamodule=datamodule)
    assert moved == {0: False, 1: True, 2: False, 3: True}  # warm, joint, push + last layer, joint
    assert int(module.net.revision) == 1 and (module.net.part_location >= -2).all()


def test_configs_compose_with_the_paper_numbers(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=deformable_protopnet_cub")
    net = cfg.model.net
    assert (net.backbone, net.prototypes_per_class, list(net.parts), net.dilation, net.offset_hidden) == (
        "resnet50",
        6,
        [2, 2],
        2,
        128,
    )
    assert (
        cfg.model.loss.margin == 0.1
        and cfg.model.loss.cluster == -0.8
        and cfg.model.loss.orthogonality == 0.1
    )
    assert cfg.model.schedule.last_layer_lr.last_layer == 0.0  # the reference's fixed last layer
    for name in ("digits", "parts"):
        cfg = compose_config(tmp_path, f"experiment=deformable_protopnet_{name}")
        channels = 1 if name == "digits" else 3
        module = build_module(
            cfg.model, {"num_classes": 10, "in_channels": channels, "image_size": cfg.data.image_size}
        )
        assert isinstance(module.net, DeformableProtoPNet)
        assert len(module.schedule.plan()) == cfg.trainer.max_epochs


SHORT = (
    "model.schedule.train_epochs=2",
    "model.schedule.warm_epochs=1",
    "model.schedule.push_start=1",
    "model.schedule.last_layer_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "model.net.prototypes_per_class=2",
    "model.net.offset_hidden=8",
)


def test_train_py_pictures_every_part_and_explain_reads_the_checkpoint(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=deformable_protopnet_digits", *SHORT)
    run(cfg)
    (checkpoint,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    module = load_module(checkpoint)
    assert isinstance(module.net, DeformableProtoPNet) and (module.net.part_location >= -2).all()
    records = json.loads((tmp_path / "prototypes" / "epoch-002" / "prototypes.json").read_text())
    assert len(records) == 20 and all(len(r["part_box"]) == 4 for r in records)
    explain_cli(["prototypes", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "again")])
    assert len(list((tmp_path / "again").glob("prototype-*.png"))) == 20
    explain_cli(
        ["local", "--checkpoint", str(checkpoint), "--index", "0", "--out", str(tmp_path / "local.png")]
    )
    assert (tmp_path / "local.png").stat().st_size > 0


@pytest.mark.slow
def test_short_training_on_parts_raises_accuracy(tmp_path: Path) -> None:
    overrides = (
        "experiment=deformable_protopnet_parts",
        "model.schedule.train_epochs=5",
        "model.schedule.warm_epochs=1",
        "model.schedule.push_start=4",
        "model.schedule.last_layer_epochs=1",
        "model.net.prototypes_per_class=2",
        "model.net.offset_hidden=16",
        "data.train_per_class=40",
        "data.test_per_class=20",
        "seed=0",
    )
    cfg = compose_config(tmp_path, *overrides)
    datamodule = instantiate(cfg.data)
    datamodule.setup("test")
    torch.manual_seed(0)
    untrained = build_module(cfg.model, {"num_classes": 10, "in_channels": 3, "image_size": 32}).net.eval()
    with torch.no_grad():
        hits = [
            (untrained(b["image"]).logits.argmax(1) == b["label"]).float()
            for b in datamodule.test_dataloader()
        ]
    before = torch.cat(hits).mean().item()
    after = run(cfg)["test/acc"]
    assert after > before + 0.2 and after > 0.35, (before, after)  # chance is 0.1 on 10 classes
