"""The MoE classifier recipe: configs compose, losses and routing statistics, train, checkpoint, explain."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from config_helpers import compose_config
from hydra.utils import instantiate

from explain.__main__ import main as explain_main
from protolib.cli.train import run
from protolib.lit.checkpoint import build_module, build_record, load_module
from protolib.lit.moe import MoEClassifierModule
from protolib.nn.moe import PrototypeRouter, SoftmaxRouter

BUILD = {"num_classes": 10, "in_channels": 1, "image_size": 32}
DENSE_TINY = [
    "model.net.backbone_options.embed_dim=16",
    "model.net.backbone_options.depth=2",
    "model.net.backbone_options.num_heads=2",
]
TINY = [*DENSE_TINY, "model.net.moe.num_experts=4"]


@pytest.mark.parametrize(
    ("experiment", "router"),
    [
        ("promoe_vit_digits", PrototypeRouter),
        ("softmax_moe_vit_digits", SoftmaxRouter),
        ("dense_vit_digits", None),
        ("promoe_vit_parts", PrototypeRouter),
        ("softmax_moe_vit_parts", SoftmaxRouter),
        ("dense_vit_parts", None),
        ("promoe_vit_cifar10", PrototypeRouter),
    ],
)
def test_experiments_compose_with_equal_active_width(
    tmp_path: Path, experiment: str, router: type | None
) -> None:
    cfg = compose_config(tmp_path, f"experiment={experiment}", *(TINY if router else DENSE_TINY))
    module = build_module(cfg.model, BUILD)
    assert isinstance(module, MoEClassifierModule)
    net = module.net
    dense_width = net.vit.blocks[0].mlp.fc1.out_features
    if router is None:
        assert net.moe_blocks == [] and module.prototype_bank is None
    else:
        assert net.moe_blocks == [1] and isinstance(net.moe_layers[0].router, router)
        assert net.moe_layers[0].active_hidden == dense_width  # same active parameters as the dense ViT
    assert (module.prototype_bank is not None) == (router is PrototypeRouter)


def test_imagenet_recipe_builds_an_upcycled_vit_s(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=promoe_vit_imagenet", "model.net.pretrained=false")
    assert cfg.model.net.backbone == "vit_small_patch16_224" and cfg.model.net.upcycle
    net = instantiate(cfg.model.net, num_classes=5, in_channels=3, image_size=224)
    assert net.moe_blocks == [1, 3, 5, 7, 9, 11] and net.moe_layers[0].num_experts == 12
    moe = net.moe_layers[0]
    torch.testing.assert_close(moe.w1[3], moe.w1[0])  # every routed expert starts from the same dense units
    assert net.vit.blocks[0].mlp.fc1.out_features == moe.active_hidden == 1536


def test_loss_adds_the_moe_losses_and_logs_routing_stats(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=promoe_vit_digits", *TINY)
    module = build_module(cfg.model, BUILD)
    batch = {"image": torch.randn(4, 1, 32, 32), "label": torch.tensor([0, 1, 2, 3])}
    outputs = module.extract(batch["image"])
    total, terms = module.compute_loss(batch, outputs)
    ce = torch.nn.functional.cross_entropy(outputs["logits"], batch["label"])
    torch.testing.assert_close(total, ce + outputs["loss_routing_contrastive"])
    assert {"ce", "routing_contrastive", "moe/block1/usage_entropy", "moe/confidence"} <= set(terms)
    shares = torch.stack([terms[f"moe/share/e{e}"] for e in range(4)])
    assert float(shares.sum()) == pytest.approx(1.0)
    routing = module.net.moe_layers[0].routing
    assert float(terms["moe/confidence"]) == pytest.approx(routing.gates[:, 0].mean().item())


@pytest.mark.slow
def test_parts_train_checkpoint_and_routing_explanations(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path,
        "experiment=promoe_vit_parts",
        *TINY,
        "data.image_size=16",
        "data.train_per_class=6",
        "data.val_per_class=2",
        "data.test_per_class=2",
        "trainer.max_epochs=1",
        "trainer.log_every_n_steps=1",
        "trainer.accelerator=cpu",
    )
    metrics = run(cfg)
    assert 0 <= metrics["test/acc"] <= 1
    logged = (next((tmp_path / "csv").glob("**/metrics.csv"))).read_text().splitlines()[0]
    assert "val/moe/block1/usage_entropy" in logged and "train/routing_contrastive" in logged
    checkpoint = tmp_path / "checkpoints" / "last.ckpt"
    module = load_module(checkpoint)
    images = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(module(images), load_module(checkpoint)(images))
    explain_main(["routing", "--checkpoint", str(checkpoint), "--images", "4", "--per-expert", "3"])
    report = json.loads((tmp_path / "routing" / "routing.json").read_text())
    assert 0 <= report["routing_purity"] <= 1 and len(report["expert_share"]) == 4
    assert (tmp_path / "routing" / "galleries.png").stat().st_size > 0
    dense = compose_config(tmp_path / "d", "experiment=dense_vit_parts", *DENSE_TINY, "data.image_size=16")
    build = {"num_classes": 10, "in_channels": 3, "image_size": 16}
    path = tmp_path / "dense.ckpt"
    record = build_record(dense.model, dense.data, build)
    torch.save({"protolib": record, "state_dict": build_module(dense.model, build).state_dict()}, path)
    with pytest.raises(ValueError, match="without MoE layers"):
        explain_main(["routing", "--checkpoint", str(path)])
