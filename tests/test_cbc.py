"""Deep CBC / RBF networks: the detection probabilities, the visualisation push, configs and train.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config
from hydra.utils import instantiate
from omegaconf import OmegaConf
from protopnet_helpers import tiny_digits

from explain.__main__ import main as explain_cli
from protolib.cli.train import CONFIG_DIR, run
from protolib.lit.checkpoint import build_module, load_module
from protolib.models.cbc import CBCNet


def make_net(head: str = "cbc", **options: object) -> CBCNet:
    torch.manual_seed(0)
    return CBCNet(num_classes=3, in_channels=1, image_size=16, backbone="small_cnn", head=head, **options)


@pytest.mark.parametrize("head", ["cbc", "rbf"])
def test_detection_probabilities_and_head(head: str) -> None:
    net = make_net(head).eval()
    images = torch.rand(4, 1, 16, 16)
    out = net.extract(images)
    z = net.embed(images)  # (B, 64, 4, 4); components start as the backbone's channels
    presence = torch.softmax(z, dim=1).amax(dim=(2, 3))  # the reference's Softmax(dim=1) + AdaptiveMaxPool
    torch.testing.assert_close(out["prototype_similarity"], presence)
    torch.testing.assert_close(out["logits"], net.last_layer(presence))
    assert set(net.parameter_groups()) == {"backbone", "add_on", "prototypes", "last_layer"}
    with pytest.raises(ValueError, match="not pruned"):
        net.prune(None)


@torch.no_grad()
def test_push_records_each_components_most_present_patch_and_keeps_the_network() -> None:
    datamodule = tiny_digits()
    net = make_net(num_components=10)
    before = net.bank.vectors.detach().clone()
    loader = datamodule.push_dataloader()
    net.push(loader, step=4)
    torch.testing.assert_close(net.bank.vectors, before)  # visualisation only
    net.eval()
    images = torch.cat([b["image"] for b in loader])
    presence = net.prototype_layer.presence(net.embed(images))  # (N, K, h, w) brute force
    provenance = net.provenance()
    for k in range(10):
        row, col = provenance["location"][k].tolist()
        best = presence[:, k].max()
        assert presence[provenance["source_sample"][k], k, row, col] == pytest.approx(best.item())
        assert provenance["score"][k] == pytest.approx(1 - best.item(), abs=1e-6)
    assert (provenance["step"] == 4).all() and (provenance["activation_box"] >= 0).all()
    labels = torch.cat([b["label"] for b in loader])
    assert torch.equal(provenance["owner"], labels[provenance["source_sample"]])  # the source image's class


def test_configs_compose(tmp_path: Path) -> None:
    paper = OmegaConf.load(Path(CONFIG_DIR) / "model" / "cbc.yaml")
    assert (paper.net.head, paper.net.backbone, paper.loss.margin) == ("cbc", "resnet50", 0.025)
    assert paper.schedule.warm_epochs == 14 and paper.schedule.last_layer_epochs == 96
    for name, channels in (("digits", 1), ("parts", 3)):
        cfg = compose_config(tmp_path, f"experiment=cbc_{name}")
        module = build_module(cfg.model, {"num_classes": 10, "in_channels": channels, "image_size": 16})
        assert isinstance(module.net, CBCNet) and len(module.schedule.plan()) == cfg.trainer.max_epochs
    cub = compose_config(tmp_path, "experiment=cbc_cub")  # the reference's cub_resnet_config_base.yaml
    assert (cub.model.net.backbone, cub.model.net.pretrained, cub.data.batch_size) == ("resnet50", True, 40)
    assert (cub.data.crop, cub.data.image_size, cub.model.schedule.train_epochs) == (True, 224, 158)
    schedule = instantiate(cub.model.schedule)
    assert len(schedule.plan()) == cub.trainer.max_epochs == 158 + 96


def test_train_py_runs_cbc_and_rbf_with_pictures_and_explain(tmp_path: Path) -> None:
    short = (
        "model.schedule.train_epochs=2",
        "model.schedule.warm_epochs=1",
        "model.schedule.push_start=1",
        "model.schedule.last_layer_epochs=1",
        "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1",
    )
    for head in ("cbc", "rbf"):
        out = tmp_path / head
        metrics = run(compose_config(out, "experiment=cbc_digits", f"model.net.head={head}", *short))
        assert 0.0 <= metrics["test/acc"] <= 1.0
        (checkpoint,) = (out / "checkpoints").glob("best-*.ckpt")
        assert isinstance(load_module(checkpoint).net, CBCNet)
        assert len(json.loads((out / "prototypes" / "epoch-002" / "prototypes.json").read_text())) == 64
    explain_cli(
        ["local", "--checkpoint", str(checkpoint), "--index", "0", "--out", str(tmp_path / "local.png")]
    )
    assert (tmp_path / "local.png").stat().st_size > 0


@pytest.mark.slow
def test_short_training_on_parts_raises_accuracy(tmp_path: Path) -> None:
    overrides = (
        "experiment=cbc_parts",
        "model.schedule.train_epochs=5",
        "model.schedule.warm_epochs=1",
        "model.schedule.push_start=4",
        "model.schedule.last_layer_epochs=1",
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
            (untrained.extract(b["image"])["logits"].argmax(1) == b["label"]).float()
            for b in datamodule.test_dataloader()
        ]
    before = torch.cat(hits).mean().item()
    after = run(cfg)["test/acc"]
    assert after > before + 0.2 and after > 0.35, (before, after)  # chance is 0.1 on 10 classes


def test_pipnet_objective_with_the_cbc_class_loss() -> None:
    """model=cbc_pipnet: PIP-Net's loss on a CBC network's two views, its class term the margin loss."""
    net = make_net().train()
    views = torch.rand(6, 1, 16, 16)  # 3 images x 2 views, first views first
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    out = net.extract(views)
    presence = torch.softmax(net.embed(views), dim=1)  # (6, K, h, w): components = the channels at init
    torch.testing.assert_close(out["presence_maps"], presence)
    loss = instantiate(OmegaConf.load(Path(CONFIG_DIR) / "model" / "cbc_pipnet.yaml").loss)
    loss.set_weights({"align": 1.0, "tanh": 5.0, "classification": 1.0})
    total, terms = loss(out, labels, net)
    p = out["logits"]  # (6, C) class probabilities
    own = p[torch.arange(6), labels]
    wrong = p.masked_fill(torch.nn.functional.one_hot(labels, 3).bool(), -1.0).max(dim=1).values
    torch.testing.assert_close(terms["classification"], torch.relu(wrong - own + 0.025).mean())
    z1, z2 = (m.flatten(2).transpose(1, 2).reshape(-1, m.shape[1]) for m in presence.chunk(2))
    align = -(torch.log((z1 * z2).sum(1)).mean())  # both directions equal in value
    tanh = (
        -torch.log(torch.tanh(out["pooled"][:3].sum(0))).mean()
        - torch.log(torch.tanh(out["pooled"][3:].sum(0))).mean()
    )
    torch.testing.assert_close(terms["align"], align)
    torch.testing.assert_close(terms["tanh"], tanh / 2, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(total, align + 5 * tanh / 2 + terms["classification"], rtol=1e-4, atol=1e-6)


def test_train_py_pretrains_cbc_by_the_pipnet_recipe(tmp_path: Path) -> None:
    short = ("model.schedule.pretrain_epochs=1", "model.schedule.epochs=2", "trainer.limit_train_batches=2")
    cfg = compose_config(tmp_path, "experiment=cbc_pipnet_digits", *short, "trainer.limit_val_batches=1")
    torch.manual_seed(0)
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 1, "image_size": 16})
    schedule = module.schedule
    assert [schedule.phase(e) for e in range(3)] == ["pretrain", "finetune", "joint"]
    assert schedule.loss_weights(0) == {"align": 1.0, "tanh": 5.0}  # no class loss in pre-training
    assert schedule.trained_groups("pretrain") == ["backbone", "prototypes"]  # the head is frozen
    metrics = run(cfg)
    (checkpoint,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    trained = load_module(checkpoint)
    assert isinstance(trained.net, CBCNet) and int(trained.net.revision) == 1  # visualised after training
    assert 0.0 <= metrics["test/acc"] <= 1.0 and (trained.net.provenance()["source_sample"] >= 0).all()
