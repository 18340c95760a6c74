"""ProtoGCD's losses and OOD scores against written-out formulas, its errors, and a tiny training run."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torchvision.transforms import v2

from protolib.bank import PrototypeBank
from protolib.data.digits import DigitsDataModule
from protolib.data.gcd import GCDDataModule
from protolib.lit.protogcd import ProtoGCDModule
from protolib.losses.gcd import (
    adaptive_pseudo_labels,
    confidence_ratio,
    prototype_separation_loss,
    self_distillation_loss,
)
from protolib.models.simgcd import SimGCDNet
from protolib.ood.postprocessors import TopTwo, UniformCrossEntropy


def test_confidence_ratio_is_the_reference_schedule() -> None:
    # the reference's ratio_schedule: zeros(wait), linspace(init, final, ramp), then final
    expected = np.concatenate([np.zeros(5), np.linspace(0.2, 1.0, 100), np.full(95, 1.0)])
    got = [confidence_ratio(e, 5, 100, 0.2, 1.0) for e in range(200)]
    np.testing.assert_allclose(got, expected, atol=1e-12)
    assert confidence_ratio(0, 0, 1, 0.3, 1.0) == 0.3 and confidence_ratio(1, 0, 1, 0.3, 1.0) == 1.0
    assert confidence_ratio(7, 0, 0, 0.0, 0.8) == 0.8  # no ramp: the final share at once


def pseudo_labels_by_sorting(probs: np.ndarray, ratio: float) -> np.ndarray:
    """Brute force: rank rows by p1 / (p2 + 1e-6), one-hot the first floor(B * ratio)."""
    ordered = np.sort(probs, axis=1)
    confidence = ordered[:, -1] / (ordered[:, -2] + 1e-6)
    out = probs.copy()
    for i in np.argsort(-confidence, kind="stable")[: int(len(probs) * ratio)]:
        out[i] = np.eye(probs.shape[1])[probs[i].argmax()]
    return out


@pytest.mark.parametrize("ratio", [0.0, 0.25, 0.5, 0.99, 1.0])
def test_adaptive_pseudo_labels_harden_the_most_confident_share(ratio: float) -> None:
    g = torch.Generator().manual_seed(0)
    probs = F.softmax(torch.randn(8, 5, generator=g) * 3, dim=1).double()
    got = adaptive_pseudo_labels(probs, ratio).numpy()
    np.testing.assert_allclose(got, pseudo_labels_by_sorting(probs.numpy(), ratio), atol=1e-12)
    assert (got.max(1) == 1.0).sum() >= int(8 * ratio)


def test_distillation_with_hard_labels_matches_the_written_out_cross_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(12, 4, generator=g) * 2 - 1  # (V*B, K) view-major, B = 6
    got = self_distillation_loss(cos / 0.1, cos, views=2, teacher_temp=0.5, hard_ratio=0.5)
    c = cos.double().numpy()
    teacher = np.exp(c / 0.5) / np.exp(c / 0.5).sum(1, keepdims=True)  # a soft teacher, to see the change
    q = [pseudo_labels_by_sorting(teacher[:6], 0.5), pseudo_labels_by_sorting(teacher[6:], 0.5)]
    log_student = c / 0.1 - np.log(np.exp(c / 0.1).sum(1, keepdims=True))
    cross = [-(q[0] * log_student[6:]).sum(1).mean(), -(q[1] * log_student[:6]).sum(1).mean()]
    assert float(got) == pytest.approx(sum(cross) / 2, rel=1e-5)
    soft = self_distillation_loss(cos / 0.1, cos, views=2, teacher_temp=0.5)
    assert float(soft) != pytest.approx(float(got), rel=1e-3)  # half of the labels were hardened


def test_prototype_separation_by_loops() -> None:
    g = torch.Generator().manual_seed(2)
    protos = torch.randn(5, 3, generator=g)
    p = protos.double().numpy()
    p /= np.linalg.norm(p, axis=1, keepdims=True)
    k, t = 5, 0.2
    per_row = [
        math.log(sum(math.exp(p[i] @ p[j] / t) for j in range(k) if j != i) / (k - 1)) for i in range(k)
    ]
    expected = (t / 0.1) * sum(per_row) / k  # the reference scales by temperature / base_temperature (0.1)
    assert float(prototype_separation_loss(protos, t)) == pytest.approx(expected, rel=1e-5)


def test_loss_pieces_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="hard_ratio"):
        adaptive_pseudo_labels(torch.rand(4, 3), 1.5)
    with pytest.raises(ValueError, match=r"\(K>=2, D\) prototypes"):
        prototype_separation_loss(torch.rand(1, 8))
    net = SimGCDNet(4, in_channels=1, head_hidden_dim=8, head_bottleneck_dim=4)
    with pytest.raises(ValueError, match=r"model\.final_ratio=1\.2"):
        ProtoGCDModule(net, final_ratio=1.2)
    with pytest.raises(ValueError, match=r"model\.ramp_ratio_epochs=-1"):
        ProtoGCDModule(net, ramp_ratio_epochs=-1)
    with pytest.raises(ValueError, match=r"model\.teacher_temp=0"):
        ProtoGCDModule(net, teacher_temp=0)
    with pytest.raises(ValueError, match="top2 mode"):
        TopTwo("gap")


def test_top2_and_xent_scores() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0], [0.0, 0.0, 3.0]])
    p = np.exp(logits.numpy()) / np.exp(logits.numpy()).sum(1, keepdims=True)
    s = np.sort(p, axis=1)
    out = {"logits": logits}
    np.testing.assert_allclose(TopTwo("ratio").score(None, out), s[:, -1] / (s[:, -2] + 1e-6), rtol=1e-5)
    np.testing.assert_allclose(TopTwo("margin").score(None, out), s[:, -1] - s[:, -2], rtol=1e-5)
    # cross-entropy of the softmax against the uniform distribution: -(1/C) sum_c log p_c
    np.testing.assert_allclose(UniformCrossEntropy().score(None, out), -np.log(p).mean(1), rtol=1e-5)


def test_protogcd_trains_one_epoch_and_reports_gcd_metrics(tmp_path) -> None:
    base = DigitsDataModule(
        image_size=8, batch_size=64, num_views=2,
        train_transforms=[v2.RandomResizedCrop(8, scale=(0.6, 1.0), antialias=True)],
    )  # fmt: skip
    dm = GCDDataModule(base, known_classes=[0, 1, 2, 3, 4], seed=0)
    net = SimGCDNet(10, in_channels=1, head_hidden_dim=32, head_bottleneck_dim=16, bank=PrototypeBank)
    sgd = lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9)  # noqa: E731
    module = ProtoGCDModule(net, optimizer=sgd, init_ratio=0.5, ramp_ratio_epochs=3)
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, limit_test_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
    )  # fmt: skip
    before = module.prototype_bank.vectors.detach().clone()
    trainer.fit(module, datamodule=dm)
    assert not torch.equal(before, module.prototype_bank.vectors.detach())  # the joint prototypes are trained
    logged = trainer.callback_metrics
    assert float(logged["train/hard_ratio"]) == 0.5  # epoch 0 of the ramp: init_ratio
    for name in ("distill", "entropy", "separation", "ce", "simclr", "supcon"):
        assert torch.isfinite(logged[f"train/{name}"])
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    for key in ("test/all_acc", "test/old_acc", "test/new_acc", "test/inductive_all_acc"):
        assert 0.0 <= metrics[key] <= 1.0


@pytest.mark.parametrize("name", ["protogcd_digits", "protogcd_cifar100"])
def test_experiments_compose(tmp_path, name: str) -> None:
    from protolib.lit.checkpoint import build_module
    from tests.config_helpers import compose_config

    cfg = compose_config(tmp_path, f"experiment={name}")
    assert cfg.model._target_ == "protolib.lit.protogcd.ProtoGCDModule"
    assert (cfg.model.sup_weight, cfg.model.entropy_weight, cfg.model.proto_sep_weight) == (0.35, 2.0, 0.1)
    assert cfg.data._target_ == "protolib.data.gcd.GCDDataModule" and cfg.data.labelled_fraction == 0.5
    if name == "protogcd_digits":
        module = build_module(cfg.model, {"num_classes": 10, "in_channels": 1, "image_size": 16})
        assert isinstance(module, ProtoGCDModule) and module.prototype_bank.num_prototypes == 10
    else:
        assert cfg.model.net.trainable_blocks == 1 and cfg.model.net.pretrained
        assert cfg.model.ramp_ratio_epochs == 100 and cfg.trainer.max_epochs == 200


def test_ood_benchmark_takes_a_gcd_checkpoints_base_data_with_one_view() -> None:
    from protolib.ood.benchmark import id_datamodule_config

    base = {"_target_": "protolib.data.digits.DigitsDataModule", "num_views": 2, "train_transforms": [{}]}
    gcd = {"_target_": "protolib.data.gcd.GCDDataModule", "known_classes": [0, 1], "base": base}
    got = id_datamodule_config({"overrides": {"batch_size": 7}}, gcd)
    assert got == {**base, "num_views": 1, "train_transforms": None, "batch_size": 7}


def test_layernorm_features_are_signed_and_bad_options_fail() -> None:
    net = SimGCDNet(4, in_channels=1, head_hidden_dim=8, head_bottleneck_dim=4, feature_norm="layernorm")
    images = torch.rand(6, 1, 8, 8)
    pooled = net.backbone(images)  # (6, F): a pooled ReLU map, never negative
    features = net.extract(images)["features"]
    assert pooled.min() >= 0 and features.min() < 0
    mean, var = pooled.mean(1, keepdim=True), pooled.var(1, unbiased=False, keepdim=True)
    torch.testing.assert_close(features, (pooled - mean) / torch.sqrt(var + 1e-5))  # LayerNorm at init
    with pytest.raises(ValueError, match=r"model\.net\.feature_norm must be null or 'layernorm'"):
        SimGCDNet(4, in_channels=1, feature_norm="batchnorm")
