"""SimGCD losses against written-out formulas, the GCD datamodule's split and errors, a tiny training run."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import entropy
from torchvision.transforms import v2

from protolib.bank import PrototypeBank
from protolib.data.digits import DigitsDataModule
from protolib.data.gcd import GCDDataModule
from protolib.lit.callbacks.gcd import ClusterGallery
from protolib.lit.gcd import SimGCDModule
from protolib.losses.gcd import (
    contrastive_loss,
    mean_entropy_regulariser,
    self_distillation_loss,
    teacher_temperature,
)
from protolib.models.simgcd import SimGCDNet


def supcon_by_loops(features: torch.Tensor, labels: torch.Tensor | None, t: float, base: float) -> float:
    """SupCon (Khosla et al.) written out anchor by anchor; SimCLR when labels is None."""
    b, v, _ = features.shape
    z = F.normalize(features.double(), dim=-1)
    items = [(i, a) for a in range(v) for i in range(b)]
    total = 0.0
    for i, a in items:
        others = [(j, c) for j, c in items if (j, c) != (i, a)]
        denom = sum(math.exp(float(z[i, a] @ z[j, c]) / t) for j, c in others)
        pos = [(j, c) for j, c in others if (j == i if labels is None else labels[j] == labels[i])]
        total += -sum(float(z[i, a] @ z[j, c]) / t - math.log(denom) for j, c in pos) / len(pos)
    return (t / base) * total / len(items)


def test_contrastive_loss_matches_the_written_out_formula() -> None:
    g = torch.Generator().manual_seed(0)
    features = torch.randn(5, 2, 6, generator=g)
    labels = torch.tensor([0, 1, 0, 2, 1])
    got = contrastive_loss(features, labels, temperature=0.07, base_temperature=0.07)
    assert float(got) == pytest.approx(supcon_by_loops(features, labels, 0.07, 0.07), rel=1e-5)
    simclr = contrastive_loss(features, None, temperature=1.0)
    assert float(simclr) == pytest.approx(supcon_by_loops(features, None, 1.0, 1.0), rel=1e-5)
    # SimCLR = cross-entropy of the info-NCE logits whose target is the other view (the reference's form)
    z = F.normalize(features.transpose(0, 1).reshape(10, 6), dim=-1)
    sim = (z @ z.T).masked_fill(torch.eye(10, dtype=torch.bool), float("-inf"))
    target = torch.arange(10).roll(5)
    assert float(simclr) == pytest.approx(float(F.cross_entropy(sim, target)), rel=1e-5)


def test_teacher_temperature_schedule_is_the_reference_linspace() -> None:
    expected = np.concatenate([np.linspace(0.07, 0.04, 30), np.full(170, 0.04)])
    got = [teacher_temperature(e, 30, 0.07, 0.04) for e in range(200)]
    np.testing.assert_allclose(got, expected, atol=1e-12)


def test_self_distillation_and_mean_entropy() -> None:
    g = torch.Generator().manual_seed(1)
    cos = torch.rand(8, 4, generator=g) * 2 - 1  # (V*B, K) view-major, B=4
    student = cos / 0.1
    got = self_distillation_loss(student, cos, views=2, teacher_temp=0.05)
    q = F.softmax(cos / 0.05, dim=-1)
    logp = F.log_softmax(student, dim=-1)
    cross = [-(q[:4] * logp[4:]).sum(-1).mean(), -(q[4:] * logp[:4]).sum(-1).mean()]
    assert float(got) == pytest.approx(float(sum(cross) / 2), rel=1e-6)
    mean_prob = F.softmax(student, dim=1).mean(0).numpy()
    assert float(mean_entropy_regulariser(student)) == pytest.approx(
        math.log(4) - entropy(mean_prob), rel=1e-5
    )


def digits_base(**overrides) -> DigitsDataModule:
    options = dict(
        image_size=8,
        batch_size=64,
        num_views=2,
        train_transforms=[v2.RandomResizedCrop(8, scale=(0.6, 1.0), antialias=True)],
    )
    return DigitsDataModule(**{**options, **overrides})


def test_gcd_datamodule_split_relabel_and_sampler() -> None:
    dm = GCDDataModule(digits_base(), known_classes=["7", 2, 4], labelled_fraction=0.5, seed=3)
    dm.setup("fit")
    assert dm.num_classes == 10 and dm.num_known_classes == 3
    assert dm.class_names[:3] == ["7", "2", "4"]  # known first, in the given order
    true = dm.mapping[dm.base.train_dataset.targets.numpy()]
    lab = dm.labelled_mask
    assert set(true[lab]) == {0, 1, 2}
    for c in range(3):  # half of each known class labelled
        assert abs(lab[true == c].sum() - 0.5 * (true == c).sum()) <= 0.5
    item = dm.train_dataset[int(np.flatnonzero(~lab)[0])]
    assert item["label"] == -1 and not item["labelled"] and item["image"].shape == (2, 1, 8, 8)
    sampler = dm.train_dataloader().sampler
    weights = sampler.weights.numpy()
    assert weights[lab].sum() == pytest.approx(weights[~lab].sum())  # labelled and unlabelled equally drawn
    unl_labels = [dm.unlabelled_dataset[i]["label"] for i in range(len(dm.unlabelled_dataset))]
    assert len(unl_labels) == (~lab).sum() and min(unl_labels) >= 0  # eval sets carry the true labels


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"labelled_fraction": 0.0}, "labelled_fraction=0.0"),
        ({"labelled_fraction": 1.0}, "labelled_fraction=1.0"),
        ({"known_classes": list(range(10))}, "names every class"),
        ({"known_classes": ["0", "eleven"]}, "data.known_classes: unknown class 'eleven'"),
    ],
)
def test_gcd_datamodule_bad_inputs(kwargs: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        dm = GCDDataModule(digits_base(), **{"known_classes": [0, 1], **kwargs})
        dm.setup("fit")


class DigitsWithoutTrainingImagesOf(DigitsDataModule):
    """Digits whose training split lacks some classes (they keep their names): a data set with gaps."""

    def __init__(self, missing: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.missing = missing

    def load_splits(self):
        splits = super().load_splits()
        train = splits.train
        keep = ~torch.isin(torch.as_tensor(train.targets), torch.tensor(self.missing))
        source = type(train)(train.images[keep], train.targets[keep], train.image_size, train.interpolation)
        return splits._replace(train=source)


@pytest.mark.parametrize(
    ("missing", "kwargs", "match"),
    [
        # the base datamodule refuses classes without training images (new or known) before the split
        ([5, 6, 7, 8, 9], {}, r"classes \['5', '6', '7', '8', '9'\] have no training samples"),
        ([1], {}, r"classes \['1'\] have no training samples"),
        ([], {"labelled_fraction": 0.001}, "labelled_fraction=0.001 labels no image of some known class"),
    ],
)
def test_gcd_datamodule_data_without_new_or_known_images(missing: list, kwargs: dict, match: str) -> None:
    options = dict(image_size=8, num_views=2, train_transforms=[v2.RandomResizedCrop(8, antialias=True)])
    base = DigitsWithoutTrainingImagesOf(missing, **options)
    dm = GCDDataModule(base, known_classes=[0, 1, 2, 3, 4], **kwargs)
    with pytest.raises(ValueError, match=match):
        dm.setup("fit")


def test_gcd_datamodule_needs_two_views() -> None:
    with pytest.raises(ValueError, match="num_views must be 2"):
        GCDDataModule(DigitsDataModule(image_size=8), known_classes=[0])


def tiny_module(k: int = 10) -> SimGCDModule:
    net = SimGCDNet(k, in_channels=1, head_hidden_dim=32, head_bottleneck_dim=16, bank=PrototypeBank)
    return SimGCDModule(net, optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))


def test_simgcd_trains_and_logs_gcd_metrics(tmp_path) -> None:
    dm = GCDDataModule(digits_base(), known_classes=[0, 1, 2, 3, 4], seed=0)
    module = tiny_module()
    module.estimate_k_max = 12
    assert module.prototype_bank.num_prototypes == 10 and module.prototype_bank.metric == "cosine"
    trainer = L.Trainer(
        max_epochs=1, limit_train_batches=3, limit_val_batches=1, limit_test_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[ClusterGallery(num_images=3)],
    )  # fmt: skip
    before = module.prototype_bank.vectors.detach().clone()
    trainer.fit(module, datamodule=dm)
    assert not torch.equal(before, module.prototype_bank.vectors.detach())  # the prototypes are trained
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    for key in ("test/all_acc", "test/old_acc", "test/new_acc", "test/k", "test/inductive_all_acc"):
        assert key in metrics and 0.0 <= metrics[key] <= 10.0
    assert 5 <= metrics["test/estimated_k"] <= 12
    assert (tmp_path / "clusters.png").stat().st_size > 0  # the gallery of discovered clusters


def test_k_below_known_classes_fails_before_training(tmp_path) -> None:
    dm = GCDDataModule(digits_base(), known_classes=[0, 1, 2, 3, 4])
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, default_root_dir=tmp_path)
    with pytest.raises(ValueError, match=r"num_classes=3 \(K clusters\) is below the 5 known classes"):
        trainer.fit(tiny_module(k=3), datamodule=dm)


@pytest.mark.parametrize("name", ["simgcd_digits", "simgcd_cifar100", "simgcd_cub"])
def test_experiments_compose(tmp_path, name: str) -> None:
    from protolib.lit.checkpoint import build_module
    from tests.config_helpers import compose_config

    cfg = compose_config(tmp_path, f"experiment={name}")
    assert cfg.model._target_ == "protolib.lit.gcd.SimGCDModule" and cfg.model.sup_weight == 0.35
    assert cfg.data._target_ == "protolib.data.gcd.GCDDataModule" and cfg.data.labelled_fraction == 0.5
    if name == "simgcd_digits":
        module = build_module(cfg.model, {"num_classes": 10, "in_channels": 1, "image_size": 16})
        assert module.prototype_bank.num_prototypes == 10
    else:
        assert cfg.model.net.trainable_blocks == 1 and cfg.model.net.pretrained


GCD_SHORT = (
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.limit_test_batches=2",
    "model.estimate_k_max=null",
    "model.net.head_hidden_dim=32",
    "model.net.head_bottleneck_dim=16",
    "callbacks.cluster_gallery=null",
)


def test_train_py_accepts_a_k_other_than_the_class_count(tmp_path) -> None:
    """Unknown K: 14 clusters for 10 true classes trains through train.py; metrics.json has All/Old/New, K."""
    import json

    from protolib.cli.train import run
    from protolib.lit.checkpoint import load_module
    from tests.config_helpers import compose_config

    cfg = compose_config(tmp_path, "experiment=simgcd_digits", "model.net.num_classes=14", *GCD_SHORT)
    metrics = run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/all_acc", "test/old_acc", "test/new_acc", "test/k"):
        assert key in saved and saved[key] == pytest.approx(metrics[key])
    checkpoint = next((tmp_path / "checkpoints").glob("best-*.ckpt"))
    assert load_module(checkpoint).prototype_bank.num_prototypes == 14  # K kept, not the 10 data classes


def test_train_py_rejects_k_below_the_known_classes_before_training(tmp_path) -> None:
    from protolib.cli.train import run
    from tests.config_helpers import compose_config

    cfg = compose_config(tmp_path, "experiment=simgcd_digits", "model.net.num_classes=3", *GCD_SHORT)
    with pytest.raises(ValueError, match=r"model.net.num_classes=3 \(K clusters\) is below the 5 known"):
        run(cfg)
    assert not (tmp_path / "checkpoints").exists()  # nothing trained
