"""PIP-Net and ProtoPool as users run them: the experiment configs, train.py, the schedules (phases, learning
rates, Gumbel scale), resuming in the right phase, explanations from checkpoints, and training on parts."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from config_helpers import compose_config

from explain.__main__ import main as explain_cli
from protolib.cli.train import run
from protolib.lit.callbacks.pipnet import PIPNetSchedule, cosine
from protolib.lit.checkpoint import build_module, load_module
from protolib.lit.pipnet import PIPNetModule
from protolib.lit.protopnet import ProtoPNetModule
from protolib.nn.slots import gumbel_scale

PIP_SHORT = [
    "model.schedule.pretrain_epochs=1",
    "model.schedule.epochs=2",
    "model.schedule.finetune_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.accelerator=cpu",
]
POOL_SHORT = [
    "model.schedule.train_epochs=2",
    "model.schedule.warm_epochs=1",
    "model.schedule.push_start=1",
    "model.schedule.last_layer_epochs=1",
    "trainer.limit_train_batches=3",
    "trainer.limit_val_batches=2",
    "trainer.accelerator=cpu",
]


class Spy(L.Callback):
    """Records, per epoch, the module's phase, the learning rates of its first batch and the Gumbel scale."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, Any]] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, i: int
    ) -> None:
        if i == 1:  # after the schedule set batch 0's rates (callback order is not the schedule's business)
            rates = {g["name"]: g["lr"] for g in trainer.optimizers[0].param_groups}
            net = pl_module.net
            scale = float(net.assignment.scale) if hasattr(net, "assignment") else None
            self.epochs[trainer.current_epoch] = {"phase": pl_module.phase, "lr": rates, "scale": scale}


def test_experiments_build_the_documented_models(tmp_path: Path) -> None:
    for name, channels in [("pipnet_digits", 1), ("pipnet_parts", 3)]:
        cfg = compose_config(tmp_path, f"experiment={name}")
        assert cfg.data.num_views == 2 and cfg.data.train_transforms
        assert cfg.callbacks.checkpoint.monitor == "val/pushed_acc"  # NaN until the final visualisation
        module = build_module(cfg.model, {"num_classes": 10, "in_channels": channels, "image_size": 16})
        assert isinstance(module, PIPNetModule) and module.net.bank.num_prototypes == 64
        assert module.schedule.total_epochs == cfg.trainer.max_epochs
    for name, channels in [("protopool_digits", 1), ("protopool_parts", 3)]:
        cfg = compose_config(tmp_path, f"experiment={name}")
        module = build_module(cfg.model, {"num_classes": 10, "in_channels": channels, "image_size": 16})
        assert isinstance(module, ProtoPNetModule) and module.net.bank.num_prototypes == 20
        assert len(module.schedule.plan()) == cfg.trainer.max_epochs
        assert module.extra_callbacks[0].epochs == 10


def test_cub_experiments_hold_the_papers_recipes(tmp_path: Path) -> None:
    cfg = compose_config(tmp_path, "experiment=pipnet_cub", "model.net.pretrained=false")
    module = build_module(cfg.model, {"num_classes": 200, "in_channels": 3, "image_size": 224})
    assert module.net.bank.num_prototypes == 768  # ConvNeXt-tiny's channels are the prototypes
    assert module.schedule.total_epochs == 70 and module.schedule.lr["last_layer"] == 0.05
    assert cfg.data.batch_size == 64 and cfg.data.num_views == 2
    cfg = compose_config(tmp_path, "experiment=protopool_cub", "model.net.pretrained=false")
    module = build_module(cfg.model, {"num_classes": 200, "in_channels": 3, "image_size": 224})
    assert module.net.bank.num_prototypes == 202 and module.net.bank.dim == 256
    assert module.net.assignment.slots == 10 and module.loss.weights["orthogonality"] == 1.0
    assert len(module.schedule.plan()) == 125 and cfg.data.batch_size == 80


def test_pipnet_schedule_learning_rates_follow_the_reference_schedulers() -> None:
    s = PIPNetSchedule(pretrain_epochs=2, epochs=4, finetune_epochs=1, freeze_epochs=2, head_restart=2)
    assert [s.phase(e) for e in range(6)] == ["pretrain", "pretrain", "finetune", "frozen", "joint", "joint"]
    assert s.loss_weights(0) == {"align": 0.5, "tanh": 5.0} and s.loss_weights(1)["align"] == 1.0
    assert s.loss_weights(2) == {"classification": 2.0}
    pre = s.learning_rates(1, 5, 10)  # step 15 of 20 of the pre-training cosine
    assert set(pre) == {"backbone_top", "prototypes"}
    expected = 5e-6 + (5e-3 - 5e-6) * (1 + math.cos(math.pi * 15 / 20)) / 2
    assert pre["prototypes"] == pytest.approx(expected)
    assert set(s.learning_rates(2, 0, 10)) == {"last_layer"}
    joint = s.learning_rates(4, 5, 10)  # the network's cosine stood still during the head-only epoch
    assert joint["backbone"] == pytest.approx(cosine(5e-4, 5e-6, 15, 40))
    assert joint["last_layer"] == pytest.approx(cosine(0.05, 1e-3, (2 + 0.5) % 2, 2))


def test_pipnet_train_py_phases_resume_and_explanations(tmp_path: Path) -> None:
    cfg = compose_config(
        tmp_path / "run", "experiment=pipnet_digits", *PIP_SHORT, "+callbacks.checkpoint.save_top_k=-1"
    )
    metrics = run(cfg)
    assert 0.0 <= metrics["test/acc"] <= 1.0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    module = load_module(last)
    provenance = module.net.provenance()
    assert int(module.net.revision) == 1 and (provenance["source_sample"] >= 0).all()
    weights = module.net.last_layer.weight
    assert (weights >= 0).all()  # clamped after every step: non-negative and sparse
    explain_cli(["prototypes", "--checkpoint", str(last), "--out", str(tmp_path / "pictures")])
    assert len(list((tmp_path / "pictures").glob("prototype-*.png"))) == 64
    records = json.loads((tmp_path / "pictures" / "prototypes.json").read_text())
    assert [r["source_index"] for r in records] == provenance["source_sample"].tolist()
    explain_cli(["local", "--checkpoint", str(last), "--index", "0", "--out", str(tmp_path / "local.png")])
    assert (tmp_path / "local.png").stat().st_size > 0
    # resume after the head-only epoch: the joint phase continues, the visualisation comes at the end
    (after_finetune,) = (tmp_path / "run" / "checkpoints").glob("best-epoch01*.ckpt")
    spy = Spy()
    cfg = compose_config(
        tmp_path / "resumed", "experiment=pipnet_digits", *PIP_SHORT, f"resume={after_finetune}"
    )
    from protolib.cli import train as train_cli

    original = train_cli.build_callbacks
    train_cli.build_callbacks = lambda c: [*original(c), spy]
    try:
        run(cfg)
    finally:
        train_cli.build_callbacks = original
    assert {e: r["phase"] for e, r in spy.epochs.items()} == {2: "joint"}
    assert set(spy.epochs[2]["lr"]) == {"backbone", "last_layer"} and spy.epochs[2]["lr"]["backbone"] > 0
    assert int(load_module(tmp_path / "resumed" / "checkpoints" / "last.ckpt").net.revision) == 1


def test_protopool_train_py_gumbel_schedule_push_and_explanations(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy()
    from protolib.cli import train as train_cli

    original = train_cli.build_callbacks
    monkeypatch.setattr(train_cli, "build_callbacks", lambda c: [*original(c), spy])
    cfg = compose_config(tmp_path, "experiment=protopool_digits", *POOL_SHORT)
    run(cfg)
    # epoch 0 warm, 1 joint, 2 push + last layer (hard choices)
    assert [spy.epochs[e]["scale"] for e in range(3)] == [
        pytest.approx(gumbel_scale(1, 10)),
        pytest.approx(gumbel_scale(2, 10)),
        1e4,
    ]
    assert [spy.epochs[e]["phase"] for e in range(3)] == ["warm", "joint", "last"]
    (checkpoint,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    net = load_module(checkpoint).net
    chosen = net.assignment.chosen().unique()
    pushed = (net.provenance()["source_sample"] >= 0).nonzero().flatten()
    assert torch.equal(pushed, chosen)  # exactly the prototypes some slot chose were pushed
    explain_cli(["prototypes", "--checkpoint", str(checkpoint), "--out", str(tmp_path / "pictures")])
    assert len(list((tmp_path / "pictures").glob("prototype-*.png"))) == len(chosen)
    explain_cli(
        ["local", "--checkpoint", str(checkpoint), "--index", "3", "--out", str(tmp_path / "local.png")]
    )
    assert (tmp_path / "local.png").stat().st_size > 0


@pytest.mark.slow
@pytest.mark.parametrize(
    "experiment, overrides, floor",
    [
        ("pipnet_parts", ["model.schedule.pretrain_epochs=1", "model.schedule.epochs=3"], 0.5),
        (
            "protopool_parts",
            [
                "model.schedule.train_epochs=5",
                "model.schedule.push_start=4",
                "model.schedule.last_layer_epochs=1",
                "model.callbacks.0.epochs=3",
            ],
            0.25,  # the slot choices settle first: ProtoPool reaches 0.93 only after its 26 epochs
        ),
    ],
)
def test_short_training_on_parts_raises_accuracy(
    tmp_path: Path, experiment: str, overrides: list[str], floor: float
) -> None:
    cfg = compose_config(
        tmp_path, f"experiment={experiment}", *overrides, "trainer.accelerator=cpu", "data.train_per_class=60"
    )
    metrics = run(cfg)
    assert metrics["test/acc"] > floor  # chance is 0.1
    net = load_module(tmp_path / "checkpoints" / "last.ckpt").net
    assert (net.provenance()["activation_box"][net.provenance()["source_sample"] >= 0] >= 0).all()
