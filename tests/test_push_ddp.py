"""Push and prune under DDP (two CPU processes on gloo): each rank streams only its share of the push
data (``push_dataloader()`` shards it), and both ranks end with the prototypes, provenance and pruning that
one process and a brute-force search over the whole training set give; the schedule's prune runs under a
DDP trainer."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
from ddp_helpers import run_ranks
from lightning.pytorch.strategies import DDPStrategy
from protopnet_helpers import make_module, make_trainer, tiny_digits

from protolib.models.cbc import CBCNet
from protolib.models.protopnet import ProtoPNet

WORLD, K, THRESHOLD = 2, 6, 4  # prune: a prototype needs 4 of its 6 nearest images in its own class


def make_cbc() -> CBCNet:
    torch.manual_seed(0)
    return CBCNet(num_classes=3, in_channels=1, image_size=16, backbone="small_cnn", num_components=6)


def worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD)
    try:
        loader = tiny_digits().push_dataloader()
        net = make_module().net
        pushed: list[torch.Tensor] = []
        stream = net._embed_batches
        net._embed_batches = lambda loader, counts: (  # the indices push streams on this rank
            (pushed.append(batch[2].clone()), batch)[1] for batch in stream(loader, counts)
        )
        report = net.push(loader, step=3, warn=False)
        record = {
            "pushed": torch.cat(pushed),
            "state": {key: value.clone() for key, value in net.state_dict().items()},
            "counts": report.images_per_class,
            "distances": report.distances,
            "labels": net.nearest_image_labels(loader, K),
        }
        pruned: list[int] = []
        hook = net.register_forward_hook(lambda module, args, output: pruned.append(len(args[0])))
        record["removed"] = net.prune(loader, k=K, threshold=THRESHOLD)
        hook.remove()
        record["pruned_images"] = sum(pruned)
        record["pruned_state"] = {key: value.clone() for key, value in net.state_dict().items()}
        cbc = make_cbc()
        cbc.push(loader, step=3)
        record["cbc"] = {key: value.clone() for key, value in cbc.state_dict().items()}
        torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def records(tmp_path_factory) -> list[dict]:
    return run_ranks(worker, WORLD, tmp_path_factory.mktemp("push_ddp"))


@torch.no_grad()
def brute_force(net: ProtoPNet) -> dict[str, torch.Tensor]:
    """Every training patch (N, h, w, D) of the eval-transformed push set, its labels and indices."""
    loader = tiny_digits().push_dataloader()
    net.eval()
    batches = [(net.embed(b["image"]).permute(0, 2, 3, 1), b["label"], b["index"]) for b in loader]
    patches, labels, indices = (torch.cat(parts) for parts in zip(*batches, strict=True))
    return {"patches": patches, "labels": labels, "indices": indices}


def test_each_rank_streams_only_its_share(records: list[dict]) -> None:
    n = len(tiny_digits().push_dataloader().dataset)
    for rank, record in enumerate(records):
        assert torch.equal(record["pushed"], torch.arange(rank, n, WORLD))  # items r, r + W, ..., once each
        assert record["pruned_images"] == len(range(rank, n, WORLD))


def test_ddp_push_equals_the_brute_force_search_over_all_data(records: list[dict]) -> None:
    net = make_module().net
    before = net.bank.vectors.detach().clone()  # (P, D)
    data = brute_force(net)
    patches, labels = data["patches"], data["labels"]  # (N, h, w, D), (N,)
    h, w = patches.shape[1:3]
    for record in records:
        state = record["state"]
        for p, owner in enumerate(net.owners.tolist()):
            own = (labels == owner).nonzero().flatten()
            distances = ((patches[own] - before[p]) ** 2).sum(dim=-1).flatten()  # (n_own * h * w,)
            best = int(distances.argmin())
            sample, cell = int(own[best // (h * w)]), best % (h * w)
            assert int(state["prototype_layer.bank.source_sample"][p]) == sample
            assert state["prototype_layer.bank.location"][p].tolist() == [cell // w, cell % w]
            torch.testing.assert_close(
                state["prototype_layer.bank.vectors"][p], patches[sample].flatten(0, 1)[cell]
            )
            assert float(record["distances"][p]) == pytest.approx(float(distances[best]), rel=1e-4, abs=1e-5)
        assert torch.equal(record["counts"], torch.bincount(labels, minlength=3))  # both shares counted


def test_ddp_push_and_prune_equal_one_process(records: list[dict]) -> None:
    net = make_module().net
    loader = tiny_digits().push_dataloader()
    net.push(loader, step=3, warn=False)
    single = {key: value.clone() for key, value in net.state_dict().items()}
    removed = net.prune(loader, k=K, threshold=THRESHOLD)
    cbc = make_cbc()
    cbc.push(loader, step=3)
    for record in records:
        for key, value in single.items():
            torch.testing.assert_close(record["state"][key], value, msg=key)
        assert torch.equal(record["removed"], removed)
        for key, value in net.state_dict().items():
            torch.testing.assert_close(record["pruned_state"][key], value, msg=key)
        for key, value in cbc.state_dict().items():
            torch.testing.assert_close(record["cbc"][key], value, msg=key)
    assert 0 < len(removed) < len(single["prototype_layer.bank.owners"])  # the prune did choose


def test_ddp_nearest_image_labels_equal_brute_force(records: list[dict]) -> None:
    """The k training images nearest to each pushed prototype (by their nearest patch), over all ranks."""
    net = make_module().net
    data = brute_force(net)
    for record in records:
        vectors = record["state"]["prototype_layer.bank.vectors"]  # (P, D) after the push
        per_image = ((data["patches"][..., None, :] - vectors) ** 2).sum(-1)  # (N, h, w, P)
        nearest = per_image.flatten(1, 2).amin(dim=1).T  # (P, N)
        order = nearest.argsort(dim=1, stable=True)[:, :K]
        assert torch.equal(record["labels"], data["labels"][order])


class SaveNet(L.Callback):
    """Each rank saves its network, its wrapper and the epochs run when training ends."""

    def __init__(self, out_dir: Path) -> None:
        self.out_dir = out_dir

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        record = {
            "state": {key: value.clone() for key, value in pl_module.net.state_dict().items()},
            "wrapper": type(trainer.strategy.model).__name__,
            "epochs": trainer.current_epoch,
        }
        torch.save(record, self.out_dir / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_training_with_pruning_under_ddp(tmp_path: Path) -> None:
    """The schedule's prune runs under DDP (2 spawned CPU processes): the ranks prune the same prototypes,
    the module is wrapped afresh for the new shapes, and the last-layer epochs after it train in step."""
    module = make_module(prune=True, prune_k=K, prune_threshold=THRESHOLD, prune_last_layer_epochs=1)
    strategy = DDPStrategy(start_method="spawn", find_unused_parameters=True)
    trainer = make_trainer(tmp_path, [SaveNet(tmp_path)], strategy=strategy, devices=2, limit_val_batches=0)
    trainer.fit(module, datamodule=tiny_digits())
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]
    assert [r["wrapper"] for r in ranks] == ["DistributedDataParallel"] * WORLD
    assert [r["epochs"] for r in ranks] == [len(module.schedule.plan())] * WORLD
    for key, value in ranks[0]["state"].items():
        torch.testing.assert_close(ranks[1]["state"][key], value, rtol=0, atol=0, msg=key)
    pruned = len(ranks[0]["state"]["prototype_layer.bank.owners"])
    assert 0 < pruned < len(make_module().net.owners)  # the prune removed some prototypes, not all
    assert ranks[0]["state"]["last_layer.weight"].shape == (3, pruned)
