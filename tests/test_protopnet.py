"""ProtoPNet model, push, pruning, phases and resuming, checked against brute-force recomputations."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from protopnet_helpers import PER_CLASS, make_module, make_trainer, tiny_digits
from torch import nn
from torch.utils.data import DataLoader, Dataset

from protolib.data.digits import DigitsDataModule
from protolib.lit.callbacks.protopnet import EpochPlan, ProtoPNetSchedule, PushEarlyStopping
from protolib.lit.protopnet import ProtoPNetModule
from protolib.models.protopnet import ProtoPNet, fetch_images


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    return tiny_digits()


@torch.no_grad()
def all_embeddings(model: ProtoPNet, loader: DataLoader) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force: embeddings (N, D, h, w), labels (N,), indices (N,) of the whole push set, eval mode."""
    model.eval()
    batches = [(model.embed(b["image"]), b["label"], b["index"]) for b in loader]
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- model contract
def test_extract_contract_contributions_and_last_layer_init(datamodule: DigitsDataModule) -> None:
    module = make_module().eval()
    images = next(iter(datamodule.val_dataloader()))["image"][:5]
    out = module.extract(images)
    assert out["features"].shape == (5, 3 * PER_CLASS)
    torch.testing.assert_close(module.last_layer(out["features"]), out["logits"])
    torch.testing.assert_close(out["prototype_similarity"], out["features"])
    full = module.net(images)
    assert full.similarity_maps.shape == (5, 3 * PER_CLASS, 4, 4)
    torch.testing.assert_close(full.similarity_maps.amax(dim=(2, 3)), out["features"])
    contributions = module.net.contributions(full.similarities)  # (B, P, C)
    assert contributions.shape == (5, 3 * PER_CLASS, 3)
    torch.testing.assert_close(contributions.sum(dim=1), out["logits"])
    weight = module.last_layer.weight  # (C, P): +1 to the prototype's own class, -0.5 elsewhere
    for p, owner in enumerate(module.net.owners.tolist()):
        assert weight[owner, p] == 1.0
        assert all(weight[c, p] == -0.5 for c in range(3) if c != owner)
    assert module.prototype_bank is module.net.bank


# -------------------------------------------------------------------------------------- push
def test_push_projects_each_prototype_onto_its_nearest_own_class_patch(datamodule: DigitsDataModule) -> None:
    model = make_module().net
    loader = datamodule.push_dataloader()
    before = model.bank.vectors.detach().clone()
    embeddings, labels, indices = all_embeddings(model, loader)
    report = model.push(loader, step=7)
    provenance = model.provenance()
    n, d, h, w = embeddings.shape
    patches = embeddings.permute(0, 2, 3, 1).reshape(n, h * w, d)  # (N, h*w, D)
    for p in range(model.bank.num_prototypes):
        owner = int(provenance["owner"][p])
        sample, (row, col) = int(provenance["source_sample"][p]), provenance["location"][p].tolist()
        position = (indices == sample).nonzero().item()
        assert labels[position] == owner  # a patch of its own class
        assert torch.equal(model.bank.vectors[p], embeddings[position, :, row, col])  # exactly that patch
        own = patches[labels == owner].reshape(-1, d)
        nearest = ((own - before[p]) ** 2).sum(dim=1).min()
        chosen = ((embeddings[position, :, row, col] - before[p]) ** 2).sum()
        assert chosen.item() == pytest.approx(nearest.item(), rel=1e-5, abs=1e-6)  # the nearest one
        assert report.distances[p].item() == pytest.approx(nearest.item(), rel=1e-4, abs=1e-5)
    torch.testing.assert_close(provenance["rf_box"], model.receptive_field.boxes(provenance["location"]))
    assert (provenance["step"] == 7).all() and int(model.revision) == 1
    boxes = provenance["activation_box"]
    assert ((boxes[:, :2] >= 0) & (boxes[:, 2:] <= 16) & (boxes[:, 2:] > boxes[:, :2])).all()
    assert report.images_per_class.tolist() == torch.bincount(labels, minlength=3).tolist()
    # after the push, each prototype's similarity map on its source image peaks at the recorded patch
    sources = fetch_images(loader.dataset, provenance["source_sample"].tolist())
    with torch.no_grad():
        maps = model.paired_similarity_maps(sources, torch.arange(len(sources)))  # (P, h, w)
    rows, cols = provenance["location"].unbind(dim=1)
    torch.testing.assert_close(maps[torch.arange(len(maps)), rows, cols], maps.amax(dim=(1, 2)))


def reference_activation_box(embedding: np.ndarray, vector: np.ndarray, size: int) -> list[int]:
    """push.py + find_high_activation_crop, written out: log similarity of ``vector`` (D,) to every patch of
    ``embedding`` (D, h, w), upsampled bicubic to the image, box of the pixels >= its 95th percentile."""
    distances = ((embedding - vector[:, None, None]) ** 2).sum(axis=0)  # (h, w)
    activation = np.log((distances + 1) / (distances + 1e-4))
    upsampled = torch.nn.functional.interpolate(
        torch.from_numpy(activation)[None, None].float(),
        size=(size, size),
        mode="bicubic",
        align_corners=False,
    )[0, 0].numpy()
    rows, cols = np.nonzero(upsampled >= np.percentile(upsampled, 95))
    return [int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1]  # x0, y0, x1, y1


@pytest.mark.parametrize("which", ["before_push", "after_push"])
def test_high_activation_boxes_from_the_prototype_before_or_after_the_push(
    datamodule: DigitsDataModule, which: str
) -> None:
    model = make_module().net
    model.activation_boxes = which
    loader = datamodule.push_dataloader()
    before = model.bank.vectors.detach().clone().numpy()
    model.push(loader, warn=False)
    provenance = model.provenance()
    vectors = before if which == "before_push" else model.bank.vectors.detach().numpy()
    sources = fetch_images(loader.dataset, provenance["source_sample"].tolist())
    with torch.no_grad():
        embeddings = model.eval().embed(sources).numpy()  # (P, D, h, w)
    expected = [reference_activation_box(embeddings[p], vectors[p], 16) for p in range(len(vectors))]
    assert provenance["activation_box"].tolist() == expected
    other = ProtoPNet(3, 1, 16, "small_cnn", prototypes_per_class=PER_CLASS, prototype_dim=8)
    assert other.activation_boxes == "before_push"  # the reference's choice is the default
    with pytest.raises(ValueError, match="choose one of"):
        ProtoPNet(3, 1, 16, "small_cnn", activation_boxes="pushed")


def test_prototype_identity_comes_from_the_bank_owners_not_the_order(datamodule: DigitsDataModule) -> None:
    model = make_module().net
    owners = torch.tensor([2, 0, 1, 2, 0, 1])  # interleaved instead of grouped by class
    model.bank.owners.copy_(owners)
    model.set_class_connections(-0.5)
    assert model.last_layer.weight[owners, torch.arange(6)].eq(1.0).all()
    model.push(datamodule.push_dataloader())
    provenance = model.provenance()
    labels = torch.tensor([datamodule.train_dataset[int(i)]["label"] for i in provenance["source_sample"]])
    assert torch.equal(labels, owners) and torch.equal(provenance["owner"], owners)


def test_push_warns_with_the_duplicate_count_when_prototypes_collapse(datamodule: DigitsDataModule) -> None:
    model = make_module().net
    with torch.no_grad():
        model.bank.vectors[1] = model.bank.vectors[0]  # both class-0 prototypes: same start, same patch
    with pytest.warns(UserWarning, match=r"collapse, \d+ prototypes") as record:
        report = model.push(datamodule.push_dataloader())
    assert report.duplicates[0] == 1
    assert "0: 1" in str(record[0].message)
    assert torch.equal(model.duplicate_counts(), report.duplicates)


class Items(Dataset):
    """Contract items from tensors; ``noise`` > 0 makes every read different (an augmenting dataset)."""

    def __init__(self, images: torch.Tensor, labels: list[int], noise: float = 0.0) -> None:
        self.images, self.labels, self.noise = images, labels, noise

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict[str, Any]:
        image = self.images[i] + self.noise * torch.randn_like(self.images[i])
        return {"image": image, "label": self.labels[i], "index": i}


def test_push_rejects_shuffling_or_augmenting_loaders_and_empty_classes() -> None:
    model = make_module().net
    images = torch.rand(6, 1, 16, 16)
    with pytest.raises(ValueError, match="must not shuffle"):
        model.push(DataLoader(Items(images, [0, 0, 1, 1, 2, 2]), batch_size=2, shuffle=True))
    with pytest.raises(ValueError, match="augments"):
        model.push(DataLoader(Items(images, [0, 0, 1, 1, 2, 2], noise=0.1), batch_size=2))
    with pytest.raises(ValueError, match=r"classes \[2\]"):
        model.push(DataLoader(Items(images, [0, 0, 1, 1, 1, 0]), batch_size=2))
    fewer = r"classes \[2\] have fewer images \(\[1\]\) than prototypes \(\[2\]\)"
    with pytest.warns(UserWarning, match=fewer):
        model.push(DataLoader(Items(images, [0, 0, 1, 1, 0, 2]), batch_size=2))


def test_nan_loss_names_the_terms(datamodule: DigitsDataModule) -> None:
    module = make_module()
    batch = next(iter(datamodule.train_dataloader()))
    batch["image"][0] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite terms: .*'ce'"):
        module.training_step(batch, 0)


# ------------------------------------------------------------------------------------- prune
@pytest.mark.filterwarnings("ignore:pruning removes every prototype")
def test_prune_removes_prototypes_whose_nearest_images_are_mostly_other_classes(
    datamodule: DigitsDataModule,
) -> None:
    model = make_module().net
    loader = datamodule.push_dataloader()
    model.push(loader)
    weight = model.last_layer.weight.detach().clone()  # (C, P)
    k = 6
    with torch.no_grad():  # brute force: every image's nearest-patch distance to every prototype
        model.eval()
        distances = torch.cat([model(b["image"]).min_distances for b in loader])  # (N, P)
        labels = torch.cat([b["label"] for b in loader])
        images = next(iter(datamodule.val_dataloader()))["image"][:4]
        original = model(images)
    nearest = labels[distances.argsort(dim=0)[:k]].T  # (P, k)
    own = (nearest == model.owners[:, None]).sum(dim=1)
    threshold = int(own.max())  # prunes every prototype below the best one: a non-trivial split
    expected = (own < threshold).nonzero().flatten()
    assert 0 < len(expected) < len(own)
    removed = model.prune(loader, k=k, threshold=threshold)
    assert removed.tolist() == expected.tolist()
    kept = [p for p in range(len(own)) if p not in set(expected.tolist())]
    assert model.bank.num_prototypes == len(kept) == model.last_layer.weight.shape[1]
    with torch.no_grad():
        pruned = model(images)
    # same values up to float rounding (near-zero distances are amplified by the log activation)
    torch.testing.assert_close(pruned.similarities, original.similarities[:, kept], rtol=1e-3, atol=1e-4)
    expected_logits = original.similarities[:, kept] @ weight[:, kept].T
    torch.testing.assert_close(pruned.logits, expected_logits, rtol=1e-3, atol=1e-4)

    fresh = make_module().net  # a checkpoint of a pruned model loads into a freshly built one
    fresh.load_state_dict(model.state_dict())
    assert fresh.bank.num_prototypes == len(kept) and fresh.activation_box.shape == (len(kept), 4)
    with torch.no_grad():
        torch.testing.assert_close(fresh.eval()(images).logits, pruned.logits, rtol=1e-3, atol=1e-4)
    with pytest.raises(ValueError, match="threshold"):
        model.prune(loader, k=3, threshold=4)


# ---------------------------------------------------------------------------------- schedule
@pytest.mark.parametrize("step", [5, 10, 1])
def test_joint_lr_of_every_joint_epoch_is_the_references(step: int) -> None:
    # the reference main.py: StepLR(joint_optimizer, step_size, gamma=0.1), stepped before each joint epoch
    schedule = ProtoPNetSchedule(joint_lr_step=step)
    names = list(schedule.joint_lr)
    optimizer = torch.optim.SGD(
        [{"params": [nn.Parameter(torch.zeros(1))], "lr": lr} for lr in schedule.joint_lr.values()]
    )
    reference = torch.optim.lr_scheduler.StepLR(optimizer, step_size=step, gamma=0.1)
    joint = [entry for entry in schedule.plan() if entry.phase == "joint"]
    assert len(joint) == schedule.train_epochs - schedule.warm_epochs
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # StepLR.step() before optimizer.step(), as the reference calls it
        for entry in joint:
            reference.step()
            expected = dict(zip(names, (group["lr"] for group in optimizer.param_groups), strict=True))
            assert schedule.learning_rates(entry) == pytest.approx(expected, rel=1e-12), entry.joint_epoch


def test_st_protopnet_decays_from_joint_epoch_two() -> None:
    # its reference steps StepLR(step_size=1, gamma=0.2) at epochs 7, 9, 11, 13 (5 warm-up epochs)
    schedule = ProtoPNetSchedule(warm_epochs=5, joint_lr_step=2, joint_lr_gamma=0.2, joint_lr_first_decay=2)
    backbone = [schedule.learning_rates(EpochPlan("joint", joint_epoch=e))["backbone"] for e in range(9)]
    assert backbone == pytest.approx([1e-4 * 0.2**k for k in (0, 0, 1, 1, 2, 2, 3, 3, 4)])


def test_paper_schedule_plan() -> None:
    schedule = ProtoPNetSchedule()
    plan = schedule.plan()
    assert len(plan) == 51 + 5 * 20
    assert schedule.push_epochs() == [10, 20, 30, 40, 50]
    assert [e.phase for e in plan[:11]] == ["warm"] * 5 + ["joint"] * 6
    assert plan[11] == EpochPlan("last", "push") and all(e == EpochPlan("last") for e in plan[12:31])
    assert plan[31] == EpochPlan("joint", joint_epoch=6)
    assert schedule.learning_rates(plan[0]) == {"add_on": 3e-3, "prototypes": 3e-3}
    lrs = schedule.learning_rates(EpochPlan("joint", joint_epoch=7))
    assert lrs == pytest.approx({"backbone": 1e-5, "add_on": 3e-4, "prototypes": 3e-4})
    assert schedule.learning_rates(plan[11]) == {"last_layer": 1e-4}
    assert schedule.ends_cycle(30) and not schedule.ends_cycle(29) and not schedule.ends_cycle(31)
    assert schedule.final_model(11) and schedule.final_model(30) and not schedule.final_model(10)
    pruning = ProtoPNetSchedule(prune=True, prune_last_layer_epochs=3)
    pruned = pruning.plan()
    assert pruned[-3:] == [EpochPlan("last", "prune"), EpochPlan("last"), EpochPlan("last")]
    # once pruning is on, only the pruned model is final: the pushed ones before it are not kept
    assert [e for e in range(len(pruned)) if pruning.final_model(e)] == [
        len(pruned) - 3,
        len(pruned) - 2,
        len(pruned) - 1,
    ]


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"last_layer_epochs": 0}, "out of range"),
        ({"push_start": 60, "prune": True}, "no push happens"),
        ({"joint_lr": {}}, "at least one group"),
    ],
)
def test_schedule_rejects_bad_values(options: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ProtoPNetSchedule(**options)


def test_module_rejects_schedule_groups_the_network_lacks() -> None:
    with pytest.raises(ValueError, match=r"does not have: \{'warm_lr': \['head'\]\}"):
        make_module(warm_lr={"head": 1.0})


def watched(module: ProtoPNetModule) -> dict[str, torch.Tensor]:
    """A backbone weight and a batch-norm running mean, to see whether an epoch changed them."""
    norm = next(m for m in module.net.backbone.modules() if isinstance(m, torch.nn.BatchNorm2d))
    return {
        "weight": next(module.net.backbone.parameters()).detach().clone(),
        "bn": norm.running_mean.clone(),
    }


class Spy(L.Callback):
    """Records, per epoch: phase, prototype revision, the groups with gradients and their learning rates,
    and whether the backbone's weights and batch-norm statistics moved."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, Any]] = {}
        self.at_start: dict[str, torch.Tensor] = {}

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: ProtoPNetModule, batch: Any, idx: int
    ) -> None:
        if idx == 0:
            self.epochs[trainer.current_epoch] = {
                "phase": pl_module.phase,
                "revision": int(pl_module.net.revision),
                "prototypes": pl_module.net.bank.vectors.detach().clone(),
            }
            self.at_start = watched(pl_module)

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: ProtoPNetModule, optimizer: Any
    ) -> None:
        groups = {g["name"]: g for g in optimizer.param_groups}
        record = self.epochs[trainer.current_epoch]
        record["grads"] = {n for n, g in groups.items() if any(p.grad is not None for p in g["params"])}
        record["lrs"] = {n: g["lr"] for n, g in groups.items() if g["lr"] > 0}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: ProtoPNetModule) -> None:
        now = watched(pl_module)
        moved = {name: not torch.equal(now[name], self.at_start[name]) for name in now}
        self.epochs[trainer.current_epoch]["moved"] = moved


def test_phases_train_exactly_their_parameter_groups(datamodule: DigitsDataModule, tmp_path: Path) -> None:
    module, spy = make_module(), Spy()
    trainer = make_trainer(tmp_path, [spy])
    trainer.fit(module, datamodule=datamodule)
    assert trainer.max_epochs == 4  # set by the schedule, not by the trainer's max_epochs=1
    phases = {e: r["phase"] for e, r in spy.epochs.items()}
    assert phases == {0: "warm", 1: "joint", 2: "last", 3: "joint"}
    assert spy.epochs[0]["grads"] == {"add_on", "prototypes"}
    assert spy.epochs[1]["grads"] == {"backbone", "add_on", "prototypes"}
    assert spy.epochs[2]["grads"] == {"last_layer"}
    assert spy.epochs[0]["lrs"] == {"add_on": 3e-3, "prototypes": 3e-3}
    assert spy.epochs[2]["lrs"] == {"last_layer": 1e-4}
    assert [spy.epochs[e]["moved"]["weight"] for e in range(4)] == [False, True, False, True]
    # warm-up keeps the reference's batch-norm updates; the last-layer phase freezes them (pushed
    # prototypes stay equal to training-patch embeddings)
    assert [spy.epochs[e]["moved"]["bn"] for e in range(4)] == [True, True, False, True]
    assert [spy.epochs[e]["revision"] for e in range(4)] == [0, 0, 1, 1]


def test_resume_mid_schedule_resumes_the_right_phase(datamodule: DigitsDataModule, tmp_path: Path) -> None:
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    straight = Spy()
    trainer = make_trainer(tmp_path, [straight, checkpoints], enable_checkpointing=True)
    trainer.fit(make_module(), datamodule=datamodule)

    def resume(epoch: int) -> Spy:
        (path,) = (tmp_path / "ckpt").glob(f"epoch={epoch}-*.ckpt")
        spy = Spy()
        make_trainer(tmp_path, [spy]).fit(make_module(), datamodule=datamodule, ckpt_path=path)
        return spy

    before_push = resume(1)  # the push planned before epoch 2 happens after resuming
    assert {e: (r["phase"], r["revision"]) for e, r in before_push.epochs.items()} == {
        2: ("last", 1),
        3: ("joint", 1),
    }
    torch.testing.assert_close(before_push.epochs[2]["prototypes"], straight.epochs[2]["prototypes"])
    after_push = resume(2)  # no second push: the pushed prototypes come from the checkpoint
    assert {e: (r["phase"], r["revision"]) for e, r in after_push.epochs.items()} == {3: ("joint", 1)}
    torch.testing.assert_close(after_push.epochs[3]["prototypes"], straight.epochs[3]["prototypes"])


def test_pruning_phase_and_resume_with_fewer_prototypes(
    datamodule: DigitsDataModule, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # which prototypes pruning removes is checked by brute force above; here prototypes 0 and 3 "have"
    # nearest images of another class, and the schedule, optimiser and checkpoints must follow
    def nearest_image_labels(model: ProtoPNet, loader: DataLoader, k: int) -> torch.Tensor:
        labels = model.owners[:, None].repeat(1, k)
        labels[[0, 3]] = (labels[[0, 3]] + 1) % 3
        return labels

    monkeypatch.setattr(ProtoPNet, "nearest_image_labels", nearest_image_labels)
    options = {"prune": True, "prune_k": 6, "prune_threshold": 3, "prune_last_layer_epochs": 2}
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    spy, module = Spy(), make_module(**options)
    make_trainer(tmp_path, [spy, checkpoints], enable_checkpointing=True).fit(module, datamodule=datamodule)
    remaining = module.net.bank.num_prototypes
    assert remaining == 3 * PER_CLASS - 2 and module.net.owners.tolist() == [0, 1, 2, 2]
    assert spy.epochs[4]["revision"] == 2
    assert spy.epochs[4]["grads"] == {"last_layer"} and spy.epochs[4]["phase"] == "last"
    (path,) = (tmp_path / "ckpt").glob("epoch=4-*.ckpt")
    resumed, again = make_module(**options), Spy()
    make_trainer(tmp_path, [again]).fit(resumed, datamodule=datamodule, ckpt_path=path)
    assert resumed.net.bank.num_prototypes == remaining and again.epochs[5]["phase"] == "last"
    assert again.epochs[5]["grads"] == {"last_layer"}


def test_push_early_stopping_counts_pushes_without_improvement() -> None:
    schedule = ProtoPNetSchedule(
        train_epochs=8, warm_epochs=1, push_start=1, push_every=2, last_layer_epochs=2
    )
    ends = [e for e in range(len(schedule.plan())) if schedule.ends_cycle(e)]
    assert len(ends) == 4
    stopper = PushEarlyStopping(monitor="val/pushed_acc", patience=2)
    module = SimpleNamespace(schedule=schedule)
    stopped = []
    for epoch, value in zip(ends, [0.5, 0.6, 0.55, 0.58], strict=True):
        trainer = SimpleNamespace(
            sanity_checking=False,
            current_epoch=epoch,
            should_stop=False,
            callback_metrics={"val/pushed_acc": torch.tensor(value)},
        )
        stopper.on_validation_end(trainer, module)
        stopped.append(trainer.should_stop)
    assert stopped == [False, False, False, True]
    assert stopper.state_dict() == {"best": pytest.approx(0.6), "wait": 2}
    not_end = SimpleNamespace(
        sanity_checking=False, current_epoch=ends[0] - 1, should_stop=False, callback_metrics={}
    )
    stopper.on_validation_end(not_end, module)  # mid-cycle epochs are ignored (and need no metric)
    assert not not_end.should_stop
    waiting = PushEarlyStopping(monitor="val/pushed_acc", patience=1)
    for epoch in ends:  # NaN: a pushed model a prune will replace, never a reason to stop
        nan = SimpleNamespace(
            sanity_checking=False,
            current_epoch=epoch,
            should_stop=False,
            callback_metrics={"val/pushed_acc": torch.tensor(math.nan)},
        )
        waiting.on_validation_end(nan, module)
        assert not nan.should_stop
    assert waiting.state_dict() == {"best": -math.inf, "wait": 0}
    assert math.isinf(PushEarlyStopping().best)
