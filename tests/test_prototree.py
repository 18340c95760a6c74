"""ProtoTree network and recipe: the extract contract against brute-force distances, the push's class
constraint against a brute-force nearest-patch search, pruning through the bank, the schedule's phases and
learning rates, resuming, configs, and a short training on parts that must learn."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from config_helpers import compose_config
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.strategies import DDPStrategy
from protopnet_helpers import make_trainer
from torchvision import tv_tensors
from torchvision.transforms import v2

from protolib.cli.train import run
from protolib.data.digits import DigitsDataModule
from protolib.lit.callbacks.prototree import ProtoTreeSchedule
from protolib.lit.checkpoint import build_module, load_module
from protolib.lit.prototree import ProtoTreeModule
from protolib.models.prototree import ProtoTree

TINY = {
    "epochs": 3,
    "freeze_epochs": 1,
    "lr": {"backbone": 2e-3, "add_on": 1e-3, "prototypes": 4e-3},
    "milestones": [2],
    "gamma": 0.5,
    "prune_threshold": 0.0,
}
# epochs: 0 frozen, 1 joint, 2 joint (lr x 0.5), then prune + push after epoch 2's last step


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    dm = DigitsDataModule(image_size=16, batch_size=32, classes=[0, 1, 2], seed=0)
    dm.setup("fit")
    return dm


def make_net(push_constraint: str = "subtree") -> ProtoTree:
    """A seeded depth-2 tree (3 prototypes of 8 channels, 4 leaves) on the small CNN, 3 classes at 16 px."""
    torch.manual_seed(0)
    return ProtoTree(
        3,
        in_channels=1,
        image_size=16,
        backbone="small_cnn",
        depth=2,
        prototype_dim=8,
        push_constraint=push_constraint,
    )


def make_module(**schedule: Any) -> ProtoTreeModule:
    return ProtoTreeModule(make_net(), schedule=ProtoTreeSchedule(**{**TINY, **schedule}))


def all_embeddings(net: ProtoTree, loader: Any) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Brute force: embeddings (N, D, h, w), labels (N,), indices (N,) of the whole push set, eval mode."""
    net.eval()
    with torch.no_grad():
        batches = [(net.embed(b["image"]), b["label"], b["index"]) for b in loader]
    return tuple(torch.cat(parts) for parts in zip(*batches, strict=True))  # type: ignore[return-value]


# ---------------------------------------------------------------------------- network
def test_extract_contract_matches_brute_force_routing(datamodule: DigitsDataModule) -> None:
    net = make_net().eval()
    with torch.no_grad():
        net.tree.leaf_logits.copy_(torch.randn(4, 3))
        images = next(iter(datamodule.val_dataloader()))["image"][:5]
        out = net.extract(images)
        z = net.embed(images)  # (5, 8, 4, 4)
    prototypes = net.bank.vectors.detach()
    distances = (
        ((z[:, None] - prototypes[None, :, :, None, None]) ** 2).sum(2).add(1e-14).sqrt()
    )  # (5, 3, 4, 4)
    nearest = distances.flatten(2).min(dim=2).values
    torch.testing.assert_close(out["min_distances"], nearest, rtol=1e-4, atol=1e-5)
    s = torch.exp(-nearest)
    torch.testing.assert_close(out["prototype_similarity"], s, rtol=1e-4, atol=1e-6)
    assert torch.equal(out["features"], out["prototype_similarity"])
    # depth 2: root (prototype 0) -> node 1 (prototype 1) | node 4 (prototype 2); right = similarity
    paths = torch.stack(
        [(1 - s[:, 0]) * (1 - s[:, 1]), (1 - s[:, 0]) * s[:, 1], s[:, 0] * (1 - s[:, 2]), s[:, 0] * s[:, 2]],
        dim=1,
    )
    torch.testing.assert_close(out["path_probabilities"], paths, rtol=1e-4, atol=1e-6)
    expected = paths @ torch.softmax(net.tree.leaf_logits, dim=1)
    torch.testing.assert_close(out["probabilities"], expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out["logits"].exp(), expected, rtol=1e-4, atol=1e-6)
    assert net.last_layer is None and net.prototype_bank is net.bank
    assert set(net.parameter_groups()) == {"backbone", "add_on", "prototypes"}
    assert net.bank.owners.tolist() == [0, 1, 4]  # a prototype's owner is its node
    with pytest.raises(ValueError, match="block prefixes"):
        ProtoTree(3, in_channels=1, image_size=16, backbone="small_cnn", depth=2, block=["layer9"])


@pytest.mark.parametrize("constraint", ["subtree", "none"])
def test_push_projects_onto_the_nearest_patch_of_an_allowed_class(
    datamodule: DigitsDataModule, constraint: str
) -> None:
    net = make_net(constraint)
    logits = torch.zeros(4, 3)
    logits[[0, 1, 2, 3], [0, 0, 1, 2]] = 5.0  # leaves predict 0, 0 (below node 1) and 1, 2 (below node 4)
    net.tree.leaf_logits.copy_(logits)
    expected_allowed = [[1, 1, 1], [1, 0, 0], [0, 1, 1]] if constraint == "subtree" else [[1, 1, 1]] * 3
    assert net.allowed_classes().int().tolist() == expected_allowed
    loader = datamodule.push_dataloader()
    before = net.bank.vectors.detach().clone()
    embeddings, labels, indices = all_embeddings(net, loader)
    report = net.push(loader, step=5)
    provenance = net.provenance()
    d = embeddings.shape[1]
    for p, allowed in enumerate(expected_allowed):
        keep = torch.tensor(allowed, dtype=torch.bool)[labels]
        patches = embeddings[keep].permute(0, 2, 3, 1).reshape(-1, d)
        nearest = ((patches - before[p]) ** 2).sum(1).min()
        sample, (row, col) = int(provenance["source_sample"][p]), provenance["location"][p].tolist()
        position = (indices == sample).nonzero().item()
        assert allowed[int(labels[position])] and provenance["owner"][p] == labels[position]
        assert torch.equal(net.bank.vectors[p], embeddings[position, :, row, col])
        assert report.distances[p].item() == pytest.approx(nearest.item(), rel=1e-4, abs=1e-6)
    assert (provenance["step"] == 5).all() and int(net.revision) == 1
    torch.testing.assert_close(provenance["rf_box"], net.receptive_field.boxes(provenance["location"]))
    assert (provenance["activation_box"][:, 2:] > provenance["activation_box"][:, :2]).all()


def test_prune_shrinks_the_bank_with_the_tree_and_survives_a_checkpoint(datamodule: DigitsDataModule) -> None:
    net = make_net()
    logits = torch.zeros(4, 3)
    logits[[2, 3], [1, 2]] = 5.0  # leaves 0 and 1 (below node 1) uniform: node 1 goes with ... the root's
    logits[0, 0] = 5.0  # child is never removed, so make leaf 1 alone uninformative
    net.tree.leaf_logits.copy_(logits)
    net.push(datamodule.push_dataloader())
    sources = net.bank.source_sample.clone()
    removed = net.prune(threshold=0.5)
    # leaf node 3 (leaf 1) is uninformative: it and its parent node 1 (prototype 1) go, leaf node 2 moves up
    assert removed.tolist() == [1] and net.tree.num_prototypes == 2 and net.bank.num_prototypes == 2
    assert net.bank.source_sample.tolist() == sources[[0, 2]].tolist()
    assert net.bank.owners.tolist() == net.tree.prototype_nodes.tolist() == [0, 2]
    assert net.source_label.shape == (2,) and net.activation_box.shape == (2, 4) and int(net.revision) == 2
    fresh = make_net()
    fresh.load_state_dict(net.state_dict())
    images = next(iter(datamodule.val_dataloader()))["image"][:4]
    with torch.no_grad():
        torch.testing.assert_close(
            fresh.eval().extract(images)["logits"], net.eval().extract(images)["logits"]
        )
    assert fresh.provenance()["source_sample"].tolist() == net.provenance()["source_sample"].tolist()


# ---------------------------------------------------------------------------- schedule and recipe
def test_schedule_phases_and_multistep_learning_rates() -> None:
    schedule = ProtoTreeSchedule()  # the paper's CUB recipe
    assert schedule.total_epochs == 100
    assert [schedule.phase(e) for e in (0, 29, 30, 99)] == ["frozen", "frozen", "joint", "joint"]
    assert schedule.learning_rates(0) == {"block": 1e-3, "add_on": 1e-3, "prototypes": 1e-3}
    assert schedule.learning_rates(30)["backbone"] == 1e-5
    assert schedule.learning_rates(59)["prototypes"] == 1e-3  # MultiStepLR: decayed from epoch 60 on
    assert schedule.learning_rates(60)["prototypes"] == pytest.approx(5e-4)
    assert schedule.learning_rates(95)["backbone"] == pytest.approx(1e-5 * 0.5**4)
    with pytest.raises(ValueError, match="past the ProtoTree schedule"):
        schedule.phase(100)
    with pytest.raises(ValueError, match="unknown parameter groups"):
        ProtoTreeSchedule(lr={"leaves": 1.0})
    with pytest.raises(ValueError, match="freeze_epochs"):
        ProtoTreeSchedule(epochs=3, freeze_epochs=4)


class Spy(L.Callback):
    """Per epoch: phase, groups with gradients and their learning rates, leaves and revision at the start."""

    def __init__(self) -> None:
        self.epochs: dict[int, dict[str, Any]] = {}

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: ProtoTreeModule) -> None:
        net = pl_module.net
        self.epochs[trainer.current_epoch] = {
            "leaves": net.tree.leaf_logits.clone(),
            "grads": set(),
            "prototypes": net.tree.num_prototypes,
        }

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: ProtoTreeModule, batch: Any, i: int
    ) -> None:
        record = self.epochs[trainer.current_epoch]
        record.update(phase=pl_module.phase, revision=int(pl_module.net.revision))

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: ProtoTreeModule, optimizer: Any
    ) -> None:
        groups = {g["name"]: g for g in optimizer.param_groups}
        record = self.epochs[trainer.current_epoch]
        record["grads"] = {n for n, g in groups.items() if any(p.grad is not None for p in g["params"])}
        record["lrs"] = {n: g["lr"] for n, g in groups.items() if g["lr"] > 0}


def test_recipe_trains_its_phases_updates_leaves_and_ends_pruned_and_pushed(
    datamodule: DigitsDataModule, tmp_path: Path
) -> None:
    module, spy = make_module(prune_threshold=0.34), Spy()
    checkpoints = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_top_k=-1, every_n_epochs=1)
    trainer = make_trainer(tmp_path, [spy, checkpoints], enable_checkpointing=True)
    trainer.fit(module, datamodule=datamodule)
    assert trainer.max_epochs == 3
    assert {e: r["phase"] for e, r in spy.epochs.items()} == {0: "frozen", 1: "joint", 2: "joint"}
    assert spy.epochs[0]["grads"] == {"add_on", "prototypes"}
    assert spy.epochs[0]["lrs"] == {"add_on": 1e-3, "prototypes": 4e-3}
    assert spy.epochs[1]["grads"] == {"backbone", "add_on", "prototypes"}
    assert spy.epochs[2]["lrs"] == {"backbone": 1e-3, "add_on": 5e-4, "prototypes": 2e-3}
    assert not torch.equal(spy.epochs[0]["leaves"], spy.epochs[1]["leaves"])  # leaves learn without gradient
    assert torch.equal(spy.epochs[0]["leaves"], torch.zeros(4, 3))  # uniform at the start, as the reference
    pruned = int(module.net.tree.num_prototypes < 3)
    assert [spy.epochs[e]["revision"] for e in range(3)] == [0, 0, 0]
    assert module.phase == "project" and int(module.net.revision) == 1 + pruned  # pruned, pushed after 2
    assert trainer.global_step == 3 * 2  # every epoch trains (2 batches each); the push follows the last step
    assert math.isfinite(float(trainer.callback_metrics["val/pushed_acc"]))  # the last validation: pushed
    assert (module.net.provenance()["source_sample"] >= 0).all()
    # Resuming before the end prunes and pushes once; a checkpoint of the pushed tree loads as it is.
    (path,) = (tmp_path / "ckpt").glob("epoch=1-*.ckpt")
    resumed, again = make_module(prune_threshold=0.34), Spy()
    make_trainer(tmp_path, [again]).fit(resumed, datamodule=datamodule, ckpt_path=path)
    assert {e: r["phase"] for e, r in again.epochs.items()} == {2: "joint"}
    assert resumed.phase == "project" and int(resumed.net.revision) == 1 + pruned
    (last,) = (tmp_path / "ckpt").glob("epoch=2-*.ckpt")
    loaded = make_module()
    loaded.load_state_dict(torch.load(last, weights_only=False)["state_dict"])
    assert loaded.net.tree.num_prototypes == module.net.tree.num_prototypes
    assert torch.equal(loaded.net.bank.vectors, module.net.bank.vectors)
    assert (loaded.net.provenance()["source_sample"] >= 0).all()  # the last epoch's checkpoint: pushed
    results = make_trainer(tmp_path, []).test(module, datamodule=datamodule, verbose=False)[0]
    assert {"test/acc", "test/acc_greedy", "test/acc_max_path", "test/prototypes"} <= set(results)
    assert 1 <= results["test/mean_path_length"] <= 2


class SaveRank(L.Callback):
    """Each rank saves its network, its optimiser steps and the phase it ended in."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: ProtoTreeModule) -> None:
        record = {
            "state": {key: value.clone() for key, value in pl_module.net.state_dict().items()},
            "wrapper": type(trainer.strategy.model).__name__,
            "steps": trainer.global_step,
            "phase": pl_module.phase,
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_schedule_runs_to_the_pushed_tree_under_ddp(datamodule: DigitsDataModule, tmp_path: Path) -> None:
    """Under DDP (2 spawned CPU processes, gloo; trainer=ddp's find_unused_parameters, as the frozen epochs
    need) the whole schedule runs to the prune + push after the last step (no step is skipped: Lightning
    refuses that under DDP), and the ranks end with the same pruned, pushed tree, validated."""
    module = make_module(prune_threshold=0.34)
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True)
    trainer = make_trainer(tmp_path, [SaveRank(tmp_path)], strategy=strategy, devices=2)
    trainer.fit(module, datamodule=datamodule)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * 2
    assert [(r["phase"], r["steps"]) for r in ranks] == [("project", 3 * 2)] * 2  # 3 epochs of 2 steps
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)
    assert int(ranks[0]["state"]["revision"]) >= 1 and (ranks[0]["state"]["source_label"] >= 0).all()
    assert math.isfinite(float(trainer.callback_metrics["val/pushed_acc"]))


# ---------------------------------------------------------------------------- configs and training
@pytest.mark.parametrize("experiment", ["prototree_digits", "prototree_parts", "prototree_cub"])
def test_experiment_configs_build(tmp_path: Path, experiment: str) -> None:
    cfg = compose_config(tmp_path, f"experiment={experiment}", "model.net.pretrained=false")
    size = 32
    if experiment == "prototree_cub":  # the paper's recipe: ResNet50, depth 9; build a shallow one, small
        assert cfg.model.net.depth == 9 and cfg.model.schedule.freeze_epochs == 30
        cfg.model.net.depth, size = 2, 64
    module = build_module(cfg.model, {"num_classes": 10, "in_channels": 3, "image_size": size})
    assert isinstance(module, ProtoTreeModule) and isinstance(module.net, ProtoTree)
    groups = module.net.parameter_groups()
    if experiment == "prototree_cub":  # the reference trains ResNet50's last block (layer4.2) from the start
        assert len(groups["block"]) == 9 and groups["add_on"][0].shape == (256, 2048, 1, 1)
    if cfg.data.get("train_transforms"):  # the reference's augmentation runs as configured
        augment = v2.Compose(list(instantiate(cfg.data.train_transforms)))
        torch.manual_seed(0)
        image = tv_tensors.Image(torch.rand(3, size, size))
        assert augment(image).shape == (3, size, size)


@pytest.mark.slow
def test_short_training_on_parts_learns_and_reloads(tmp_path: Path) -> None:
    overrides = [
        "experiment=prototree_parts",
        "model.schedule.epochs=6",
        "model.schedule.milestones=[]",
        "data.train_per_class=100",
        "data.val_per_class=10",
        "data.test_per_class=20",
        "callbacks.lr_monitor=null",
    ]
    metrics = run(compose_config(tmp_path, *overrides))
    assert metrics["test/acc"] > 0.3  # chance is 0.1
    assert metrics["test/acc_greedy"] > 0.25 and metrics["test/prototypes"] >= 1
    (best,) = (tmp_path / "checkpoints").glob("best-*.ckpt")
    module = load_module(best)
    assert (module.net.provenance()["source_sample"] >= 0).all()  # the pushed tree was kept


def test_tree_picture_and_path_explanation(datamodule: DigitsDataModule, tmp_path: Path) -> None:
    from explain.tree import explain_path, render_tree, save_tree

    net = make_net()
    net.tree.leaf_logits.copy_(torch.eye(3)[[0, 1, 2, 0]] * 4)
    dataset = datamodule.push_dataloader().dataset
    net.push(datamodule.push_dataloader())
    picture = render_tree(net, dataset, datamodule.denormalize, datamodule.class_names)
    assert picture.width >= 4 * 56 and picture.height > 2 * 56  # four leaves side by side, two levels
    assert save_tree(net, dataset, datamodule.denormalize, tmp_path / "tree.png").stat().st_size > 0
    image = datamodule.test_dataset[0]["image"]
    picture, summary = explain_path(net, image, dataset, datamodule.denormalize)
    steps = net.explain_path(image)
    with torch.no_grad():
        walked = int(net.tree.leaf_nodes[net.eval()(image[None], "greedy").route.leaves[0]])
    assert [s["node"] for s in steps] == net.tree.path_to(walked)  # the greedy path, root to leaf
    for step in steps[:-1]:
        assert step["present"] == (step["similarity"] > 0.5)
    assert summary.count("node") == len(steps) and picture.height > 2 * 112
