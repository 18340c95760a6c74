"""PrototypeBank and its FAISS index factory, checked against brute force in float64."""

from __future__ import annotations

import copy
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from protolib.bank import PrototypeBank, PushResult, build_index, exact_search
from protolib.bank import bank as bank_module
from protolib.bank import push as push_module
from protolib.bank.index import DEFAULT_OPTIONS

METRICS = ["l2", "cosine", "ip"]


def brute_force(queries: torch.Tensor, base: torch.Tensor, metric: str) -> torch.Tensor:
    """Reference distances (Q, N) in float64 with the bank's convention (smaller = nearer)."""
    q, x = torch.as_tensor(queries).double(), torch.as_tensor(base).double()
    if metric == "l2":
        return torch.cdist(q, x).pow(2)
    if metric == "cosine":
        return 1 - torch.nn.functional.normalize(q, dim=1) @ torch.nn.functional.normalize(x, dim=1).T
    return -(q @ x.T)


def brute_topk(queries: torch.Tensor, base: torch.Tensor, k: int, metric: str) -> torch.return_types.topk:
    """Reference k nearest (values, indices) in float64."""
    return brute_force(queries, base, metric).topk(k, dim=1, largest=False)


def clustered(n: int, dim: int, centres: int, seed: int) -> torch.Tensor:
    """Points drawn around random centres, like real embeddings (approximate search's realistic case)."""
    g = torch.Generator().manual_seed(seed)
    c = torch.randn(centres, dim, generator=g) * 3
    return c[torch.randint(centres, (n,), generator=g)] + torch.randn(n, dim, generator=g)


def recall(found: torch.Tensor, truth: torch.Tensor) -> float:
    hits = sum(len(set(f.tolist()) & set(t.tolist())) for f, t in zip(found, truth, strict=True))
    return hits / truth.numel()


def bank_state(bank: PrototypeBank) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in bank.state_dict().items()}


def assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, equal_nan=True, msg=key)


def make_bank(metric: str = "l2", p: int = 24, d: int = 8, classes: int = 4, **kwargs) -> PrototypeBank:
    torch.manual_seed(0)
    return PrototypeBank(p, d, owners=torch.arange(p) % classes, metric=metric, **kwargs)


# ---------------------------------------------------------------- index factory


@pytest.mark.parametrize("metric", METRICS)
def test_flat_index_equals_brute_force(metric: str) -> None:
    x, q = torch.randn(500, 16), torch.randn(40, 16)
    index = build_index(16, metric, "flat")
    index.add(x.numpy())
    dist, ids = index.search(q, 7)
    ref_dist, ref_ids = brute_topk(q, x, 7, metric)
    assert index.ntotal == 500 and dist.shape == ids.shape == (40, 7)
    np.testing.assert_array_equal(ids, ref_ids.numpy())
    np.testing.assert_allclose(dist, ref_dist.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("kind, options", [("ivf", {"nlist": 16, "nprobe": 4}), ("hnsw", {"M": 16})])
def test_approximate_indexes_recall(metric: str, kind: str, options: dict) -> None:
    x, q = clustered(4000, 16, 40, seed=1), clustered(100, 16, 40, seed=1)
    index = build_index(16, metric, kind, **options)
    index.add(x)
    _, ids = index.search(q, 10)
    assert recall(torch.from_numpy(ids), brute_topk(q, x, 10, metric).indices) >= 0.9


def test_index_subset_search_is_exact_for_flat() -> None:
    x, q = torch.randn(300, 8), torch.randn(20, 8)
    subset = np.arange(0, 300, 7)
    index = build_index(8, "l2", "flat")
    index.add(x)
    _, ids = index.search(q, 5, subset=subset)
    ref = brute_topk(q, x[subset], 5, "l2").indices
    np.testing.assert_array_equal(ids, subset[ref.numpy()])


def test_ivf_reduces_nlist_with_warning_and_reports_missing_hits() -> None:
    x = torch.randn(400, 8)
    index = build_index(8, "l2", "ivf", nlist=1024, nprobe=1)
    with pytest.warns(UserWarning, match="nlist=10"):
        index.add(x)
    assert index._index.nlist == 400 // 39
    dist, ids = index.search(x[:5], 300)  # one probed list holds fewer than 300 vectors
    assert (ids == -1).any() and np.isinf(dist[ids == -1]).all() and np.isfinite(dist[ids >= 0]).all()


def test_index_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="Unknown option"):
        build_index(8, "l2", "flat", nlist=4)
    with pytest.raises(ValueError, match="metric"):
        build_index(8, "euclid", "flat")
    with pytest.raises(ValueError, match="kind"):
        build_index(8, "l2", "lsh")
    index = build_index(8, "l2", "flat")
    with pytest.raises(ValueError, match=r"\(N, 8\)"):
        index.add(torch.randn(3, 9))
    with pytest.raises(ValueError, match="NaN"):
        index.add(torch.tensor([[float("nan")] * 8]))
    with pytest.raises(ValueError, match="empty"):
        index.search(torch.randn(1, 8), 1)
    assert index.ntotal == 0


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_flat_index_matches_cpu() -> None:
    from protolib.bank.index import gpu_available

    if not gpu_available():
        pytest.skip("faiss has no GPU support in this environment")
    x, q = torch.randn(2000, 32), torch.randn(50, 32)
    gpu, cpu = build_index(32, "l2", "flat", use_gpu=True), build_index(32, "l2", "flat", use_gpu=False)
    gpu.add(x)
    cpu.add(x)
    assert gpu.on_gpu
    np.testing.assert_array_equal(gpu.search(q, 5)[1], cpu.search(q, 5)[1])


# ---------------------------------------------------------------- search


@pytest.mark.parametrize("metric", METRICS)
def test_bank_search_equals_brute_force(metric: str) -> None:
    bank = make_bank(metric, p=200, d=16)
    q = torch.randn(30, 16)
    dist, ids = bank.search(q, 5)
    ref_dist, ref_ids = brute_topk(q, bank.vectors.detach(), 5, metric)
    assert ids.dtype == torch.long and torch.equal(ids, ref_ids)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)
    owner, proto = bank.assign(q)
    assert torch.equal(proto, ref_ids[:, 0]) and torch.equal(owner, bank.owners[ref_ids[:, 0]])


@pytest.mark.parametrize("metric", METRICS)
def test_owner_restricted_search_is_exact_for_flat(metric: str) -> None:
    bank = make_bank(metric, p=200, d=16, classes=10)
    q = torch.randn(30, 16)
    dist, ids = bank.search(q, 4, owners=[2, 7])
    subset = torch.isin(bank.owners, torch.tensor([2, 7])).nonzero().flatten()
    ref_dist, ref_sub = brute_topk(q, bank.vectors.detach()[subset], 4, metric)
    assert torch.equal(ids, subset[ref_sub])
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)
    assert torch.equal(bank.assign(q, owners=7)[0], torch.full((30,), 7))


@pytest.mark.parametrize("kind, options", [("ivf", {"nlist": 32, "nprobe": 8}), ("hnsw", {"M": 16})])
def test_owner_restricted_search_on_approximate_index(monkeypatch, kind: str, options: dict) -> None:
    monkeypatch.setattr(bank_module, "EXACT_SUBSET_MAX", 10)  # force the ID-selector path on a small bank
    x = clustered(3000, 16, 30, seed=2)
    bank = PrototypeBank(3000, 16, owners=torch.arange(3000) % 50, index=kind, index_options=options)
    with torch.no_grad():
        bank.vectors.copy_(x)
    q = clustered(40, 16, 30, seed=3)
    _, ids = bank.search(q, 10, owners=[0, 1, 2])  # 180 candidates: a very selective filter
    assert (ids >= 0).all() and torch.isin(bank.owners[ids], torch.tensor([0, 1, 2])).all()
    subset = torch.isin(bank.owners, torch.tensor([0, 1, 2])).nonzero().flatten()
    assert recall(ids, subset[brute_topk(q, x[subset], 10, "l2").indices]) >= 0.9


def test_approximate_bank_fills_missing_hits_exactly() -> None:
    bank = PrototypeBank(400, 8, index="ivf", index_options={"nlist": 10, "nprobe": 1})
    q = torch.randn(5, 8)
    dist, ids = bank.search(q, 200)  # more than one IVF list holds
    ref_dist, _ = brute_topk(q, bank.vectors.detach(), 200, "l2")
    assert (ids >= 0).all() and all(row.unique().numel() == 200 for row in ids)
    torch.testing.assert_close(dist.double(), ref_dist, rtol=1e-4, atol=1e-4)


def test_exact_search_helper_matches_brute_force() -> None:
    x, q = torch.randn(100, 4), torch.randn(3, 4)
    _, ids = exact_search(q, x, 3, "ip")
    assert torch.equal(torch.from_numpy(ids), brute_topk(q, x, 3, "ip").indices)


# ---------------------------------------------------------------- lazy index


def test_index_rebuilt_only_when_vectors_change() -> None:
    bank = make_bank(p=50)
    q = torch.randn(4, 8)
    bank.search(q, 3)
    bank.search(q, 3)
    bank.assign(q)
    assert bank.index_builds == 1
    for optimizer in (torch.optim.SGD([bank.vectors], lr=0.1), torch.optim.Adam([bank.vectors], fused=True)):
        before = bank.index_builds
        bank.vectors.pow(2).sum().backward()
        optimizer.step()
        optimizer.zero_grad()
        _, ids = bank.search(q, 3)
        assert bank.index_builds == before + 1  # the fused step does not bump Tensor._version
        assert torch.equal(ids, brute_topk(q, bank.vectors.detach(), 3, "l2").indices)
    bank.vectors.data[0] = q[0]  # a `.data` write, invisible to autograd's version counter
    assert bank.search(q[:1], 1)[1].item() == 0 and bank.index_builds == 4
    bank.ema_update([1], q[1:2], momentum=0.0)
    assert bank.search(q[1:2], 1)[1].item() == 1 and bank.index_builds == 5
    bank.search(q, 3)
    assert bank.index_builds == 5


# ---------------------------------------------------------------- checkpoints


def test_state_dict_round_trip_after_structure_changes() -> None:
    bank = make_bank("cosine", p=12)
    bank.add(torch.randn(3, 8), owners=[0, 1, 9])
    bank.split(4, generator=torch.Generator().manual_seed(0), step=7)
    bank.merge([0, 5])
    bank.ema_update([2, 3], torch.randn(2, 8), momentum=0.5, step=8)
    buffer = io.BytesIO()
    torch.save(bank.state_dict(), buffer)
    buffer.seek(0)
    restored = PrototypeBank(12, 8, metric="cosine")
    restored.load_state_dict(torch.load(buffer))
    assert restored.num_prototypes == bank.num_prototypes == 15
    assert isinstance(restored.vectors, torch.nn.Parameter)
    assert_same_state(bank_state(bank), bank_state(restored))
    q = torch.randn(5, 8)
    assert torch.equal(bank.search(q, 4)[1], restored.search(q, 4)[1])
    with pytest.raises(RuntimeError, match="size mismatch"):
        PrototypeBank(12, 9).load_state_dict(bank.state_dict())


def test_lightning_checkpoint_round_trip(tmp_path) -> None:
    import lightning

    class Module(lightning.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.bank = make_bank(p=6, classes=3)

        def training_step(self, batch, batch_idx):
            return self.bank.vectors.pow(2).sum() + batch.sum() * 0

        def on_train_epoch_end(self) -> None:
            self.bank.split(1, step=self.global_step)
            self.bank.add(torch.randn(2, 8), owners=[0, 2])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    module = Module()
    trainer = lightning.Trainer(
        max_epochs=1,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
    )
    trainer.fit(module, torch.utils.data.DataLoader(torch.zeros(2, 1), batch_size=1))
    trainer.save_checkpoint(tmp_path / "bank.ckpt")
    restored = Module.load_from_checkpoint(tmp_path / "bank.ckpt")
    assert restored.bank.num_prototypes == 9
    assert_same_state(bank_state(module.bank), bank_state(restored.bank))


def test_deepcopy_drops_and_rebuilds_the_index() -> None:
    bank = make_bank()
    q = torch.randn(3, 8)
    ids = bank.search(q, 2)[1]
    clone = copy.deepcopy(bank)
    assert clone._index is None and torch.equal(clone.search(q, 2)[1], ids)


# ---------------------------------------------------------------- updates and structure


def test_ema_update_averages_repeated_ids_and_renormalises_cosine() -> None:
    for metric in ("l2", "cosine"):
        bank = make_bank(metric)
        before = bank.vectors.detach().clone()
        v = torch.randn(3, 8)
        bank.ema_update(torch.tensor([2, 5, 2]), v, momentum=0.9, step=11)
        expected = before.clone()
        expected[2] = 0.9 * before[2] + 0.1 * (v[0] + v[2]) / 2
        expected[5] = 0.9 * before[5] + 0.1 * v[1]
        if metric == "cosine":
            expected = torch.nn.functional.normalize(expected, dim=1)
        torch.testing.assert_close(bank.vectors.detach(), expected)
        assert bank.metadata["step"][[2, 5]].tolist() == [11, 11] and (bank.metadata["step"][:2] == -1).all()


def test_add_and_remove_keep_owners_and_metadata_aligned() -> None:
    bank = make_bank("cosine", p=8, classes=4)
    bank.metadata["source_sample"].copy_(torch.arange(8) + 100)
    new = bank.add(torch.randn(2, 8) * 5, owners=[3, 6])
    assert new.tolist() == [8, 9] and bank.owners[8:].tolist() == [3, 6]
    torch.testing.assert_close(bank.vectors.detach().norm(dim=1), torch.ones(10))
    assert bank.metadata["source_sample"][8:].tolist() == [-1, -1]
    vectors, owners = bank.vectors.detach().clone(), bank.owners.clone()
    sources = bank.metadata["source_sample"].clone()
    kept = bank.remove([0, 9, 3], allow_empty_owners=True)
    assert kept.tolist() == [1, 2, 4, 5, 6, 7, 8]
    assert torch.equal(bank.vectors.detach(), vectors[kept]) and torch.equal(bank.owners, owners[kept])
    assert torch.equal(bank.metadata["source_sample"], sources[kept])
    assert all(t.shape[0] == 7 for t in bank.state_dict().values())


def test_split_and_merge_invariants() -> None:
    bank = make_bank("l2", p=6, classes=3)
    bank.metadata["source_sample"].copy_(torch.arange(6))
    parent = bank.vectors.detach()[4].clone()
    others = bank.vectors.detach().clone()
    children = bank.split(4, generator=torch.Generator().manual_seed(1), scale=0.1)
    assert children.tolist() == [4, 6] and bank.num_prototypes == 7
    a, b = bank.vectors.detach()[children]
    torch.testing.assert_close((a + b) / 2, parent)
    torch.testing.assert_close((a - b).norm() / 2, 0.1 * parent.norm())
    assert bank.owners[6] == bank.owners[4] and bank.metadata["source_sample"][6] == 4
    assert torch.equal(bank.vectors.detach()[:4], others[:4])
    direction = torch.zeros(8)
    direction[0] = 0.5
    bank.split(0, direction=direction)
    expected = others[0] + torch.stack([direction, -direction])
    torch.testing.assert_close(bank.vectors.detach()[[0, 7]], expected)
    before = bank.vectors.detach().clone()
    owners = bank.owners.clone()
    kept = bank.merge([4, 6], weights=[3.0, 1.0], step=5)
    assert bank.num_prototypes == 7 and 6 not in kept.tolist()
    merged = kept.tolist().index(4)
    torch.testing.assert_close(bank.vectors.detach()[merged], (3 * before[4] + before[6]) / 4)
    assert bank.owners[merged] == owners[4] and bank.metadata["step"][merged] == 5
    rest = [i for i, old in enumerate(kept.tolist()) if old != 4]
    assert torch.equal(bank.vectors.detach()[rest], before[kept[rest]])


def test_cosine_split_merge_project_keep_unit_vectors() -> None:
    bank = make_bank("cosine", p=6, classes=3)
    bank.split(2)
    bank.merge([0, 3])
    locations = torch.zeros(6, 2, dtype=torch.long)
    result = PushResult(torch.randn(6, 8) * 3, torch.rand(6), torch.arange(6), locations)
    bank.project(result)
    torch.testing.assert_close(bank.vectors.detach().norm(dim=1), torch.ones(6))
    bank.vectors.data.mul_(4)
    torch.testing.assert_close(bank.normalize_().vectors.detach().norm(dim=1), torch.ones(6))


# ---------------------------------------------------------------- push / projection


def patch_batches(n: int, d: int, classes: int, batch: int, seed: int, hw: int | None = 3):
    """Deterministic (embeddings, labels, sample_ids) batches; hw=None gives (B, D) embeddings."""
    g = torch.Generator().manual_seed(seed)
    shape = (n, d) if hw is None else (n, d, hw, hw)
    emb, labels = torch.randn(*shape, generator=g), torch.randint(classes, (n,), generator=g)
    ids = torch.arange(n) + 1000
    batches = [(emb[i : i + batch], labels[i : i + batch], ids[i : i + batch]) for i in range(0, n, batch)]
    return emb, labels, ids, batches


@pytest.mark.parametrize("metric", METRICS)
def test_push_returns_each_prototypes_nearest_own_class_patch(monkeypatch, metric: str) -> None:
    monkeypatch.setattr(push_module, "MAX_BLOCK_ELEMENTS", 64)  # several chunks per batch
    bank = make_bank(metric, p=12, d=6, classes=4)
    emb, labels, ids, batches = patch_batches(40, 6, 4, batch=7, seed=3)
    result = bank.nearest_per_prototype(iter(batches))
    patches = emb.permute(0, 2, 3, 1).reshape(-1, 6)  # (N*3*3, D)
    patch_label = labels.repeat_interleave(9)
    dist = brute_force(bank.vectors.detach(), patches, metric)  # (P, N*9)
    dist[bank.owners[:, None] != patch_label[None, :]] = float("inf")
    best = dist.argmin(dim=1)
    sample, row, col = best // 9, (best % 9) // 3, best % 3
    assert torch.equal(result.sample_ids, ids[sample])
    assert torch.equal(result.locations, torch.stack([row, col], dim=1))
    for p in range(12):  # the winning vector is exactly that training patch, of the prototype's class
        s, (r, c) = result.sample_ids[p] - 1000, result.locations[p]
        assert torch.equal(result.vectors[p], emb[s, :, r, c]) and labels[s] == bank.owners[p]
    torch.testing.assert_close(result.distances.double(), dist.min(dim=1).values, rtol=1e-4, atol=1e-4)


def test_push_unrestricted_and_flat_embeddings() -> None:
    bank = make_bank(p=5, d=4, classes=5)
    emb, _, ids, batches = patch_batches(30, 4, 2, batch=8, seed=4, hw=None)  # only classes 0, 1 present
    result = bank.nearest_per_prototype(batches, restrict_to_owner=False)
    best = brute_force(bank.vectors.detach(), emb, "l2").argmin(dim=1)
    assert torch.equal(result.sample_ids, ids[best]) and torch.equal(result.vectors, emb[best])
    assert (result.locations == -1).all()


def test_project_records_provenance_and_rebuilds_index() -> None:
    bank = make_bank(p=8, d=6, classes=4)
    *_, batches = patch_batches(20, 6, 4, batch=5, seed=5)
    bank.search(torch.randn(1, 6), 1)
    result = bank.nearest_per_prototype(batches)
    boxes = torch.arange(32).reshape(8, 4)
    bank.project(result, rf_boxes=boxes, step=42)
    meta = bank.metadata
    assert torch.equal(bank.vectors.detach(), result.vectors)
    assert torch.equal(meta["source_sample"], result.sample_ids)
    assert torch.equal(meta["location"], result.locations)
    assert torch.equal(meta["rf_box"], boxes) and (meta["step"] == 42).all()
    torch.testing.assert_close(meta["score"], result.distances)
    _, nearest = bank.search(result.vectors, 1)
    assert torch.equal(nearest[:, 0], torch.arange(8)) and bank.index_builds == 2


# ---------------------------------------------------------------- bad input leaves the bank unchanged


def _nan_rows(n: int, d: int) -> torch.Tensor:
    x = torch.randn(n, d)
    x[0, 0] = float("nan")
    return x


def _push(bank: PrototypeBank, emb: torch.Tensor, labels: list[int]) -> PushResult:
    return bank.nearest_per_prototype([(emb, torch.tensor(labels), torch.arange(len(labels)))])


def _result(p: int) -> PushResult:
    return PushResult(torch.randn(p, 8), torch.rand(p), torch.arange(p), torch.zeros(p, 2, dtype=torch.long))


BAD_CALLS = {
    "add nan": (lambda b: b.add(_nan_rows(2, 8), [0, 1]), "NaN"),
    "add inf": (lambda b: b.add(torch.full((1, 8), float("inf")), [0]), "NaN/inf"),
    "add dim": (lambda b: b.add(torch.randn(2, 7), [0, 1]), r"\(N, 8\)"),
    "add owners": (lambda b: b.add(torch.randn(2, 8), [0]), "owners"),
    "ema nan": (lambda b: b.ema_update([0], _nan_rows(1, 8), 0.9), "NaN"),
    "ema ids": (lambda b: b.ema_update([99], torch.randn(1, 8), 0.9), "out of range"),
    "ema rows": (lambda b: b.ema_update([0, 1], torch.randn(1, 8), 0.9), r"\(2, 8\)"),
    "ema momentum": (lambda b: b.ema_update([0], torch.randn(1, 8), 1.5), "momentum"),
    "remove all": (lambda b: b.remove(list(range(24))), "every prototype"),
    "remove last of owner": (lambda b: b.remove([0, 4, 8, 12, 16, 20]), "owner"),
    "remove range": (lambda b: b.remove([24]), "out of range"),
    "split range": (lambda b: b.split(30), "out of range"),
    "split zero": (lambda b: b.split(0, direction=torch.zeros(8)), "zero"),
    "merge one": (lambda b: b.merge([3]), "at least two"),
    "merge dup": (lambda b: b.merge([3, 3]), "duplicate"),
    "merge weights": (lambda b: b.merge([1, 2], weights=[1.0, -1.0]), "weights"),
    "search k": (lambda b: b.search(torch.randn(2, 8), 25), "k=25"),
    "search k owners": (lambda b: b.search(torch.randn(2, 8), 7, owners=[1]), "k=7"),
    "search owner": (lambda b: b.search(torch.randn(2, 8), 1, owners=[9]), r"owner\(s\) \[9\]"),
    "search nan": (lambda b: b.search(_nan_rows(2, 8), 1), "NaN"),
    "search dim": (lambda b: b.search(torch.randn(2, 5), 1), r"\(N, 8\)"),
    "project shape": (lambda b: b.project(_result(3)), r"\(24, 8\)"),
    "project boxes": (lambda b: b.project(_result(24), rf_boxes=torch.zeros(24, 2)), "rf_boxes"),
    "push empty": (lambda b: b.project(b.nearest_per_prototype([])), "empty dataloader"),
    "push dim": (lambda b: _push(b, torch.randn(2, 5, 3, 3), [0, 1]), "dimension"),
    "push nan": (lambda b: _push(b, _nan_rows(2, 8), [0, 1]), "NaN"),
    "push missing class": (
        lambda b: b.project(_push(b, torch.randn(4, 8, 2, 2), [0, 1, 2, 0])),
        r"owner classes \[3\]",
    ),
}


@pytest.mark.parametrize("name", list(BAD_CALLS))
def test_bad_input_raises_and_leaves_bank_unchanged(name: str) -> None:
    call, message = BAD_CALLS[name]
    bank = make_bank("cosine", p=24, d=8, classes=4)
    before = bank_state(bank)
    with pytest.raises(ValueError, match=message):
        call(bank)
    assert_same_state(before, bank_state(bank))


def test_merging_opposite_cosine_prototypes_is_refused() -> None:
    bank = make_bank("cosine", p=4, classes=2)
    bank.add(-bank.vectors.detach()[:1], owners=[0])
    before = bank_state(bank)
    with pytest.raises(ValueError, match="opposite"):
        bank.merge([0, 4])
    assert_same_state(before, bank_state(bank))


@pytest.mark.parametrize("kind", ["flat", "ivf", "hnsw"])
def test_hydra_bank_configs_build_banks_with_the_default_knobs(kind: str) -> None:
    config = OmegaConf.load(Path(__file__).parents[1] / "conf" / "bank" / f"{kind}.yaml")
    bank = instantiate(config)(num_prototypes=5, dim=3, metric="cosine")
    assert isinstance(bank, PrototypeBank) and bank.index_kind == kind and bank.metric == "cosine"
    assert bank.index_options == DEFAULT_OPTIONS[kind]


def test_constructor_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="metric"):
        PrototypeBank(4, 2, metric="hamming")
    with pytest.raises(ValueError, match="index"):
        PrototypeBank(4, 2, index="lsh")
    with pytest.raises(ValueError, match="owners"):
        PrototypeBank(4, 2, owners=[0, 1])
    with pytest.raises(ValueError, match="Unknown option"):
        PrototypeBank(4, 2, index="hnsw", index_options={"nprobe": 3})
    buffer_bank = PrototypeBank(4, 2, learnable=False)
    assert "vectors" in dict(buffer_bank.named_buffers()) and not list(buffer_bank.parameters())


def test_distinct_push_gives_each_prototype_of_a_class_its_own_patch() -> None:
    """Two prototypes of class 0 are both nearest to patch A; distinct push gives the nearer one A and the
    other its next-nearest patch, by brute force over every patch."""
    bank = PrototypeBank(3, 2, owners=torch.tensor([0, 0, 1]), metric="l2")
    with torch.no_grad():
        bank.vectors.copy_(torch.tensor([[0.0, 0.0], [0.2, 0.0], [5.0, 5.0]]))
    patches = torch.tensor([[0.05, 0.0], [1.0, 0.0], [3.0, 0.0], [5.0, 5.1]])  # A, B, C: class 0; D: 1
    embeddings = patches[:, :, None, None]  # (4, D, 1, 1)
    batches = [(embeddings, torch.tensor([0, 0, 0, 1]), torch.arange(4))]
    plain = bank.nearest_per_prototype(batches)
    assert plain.sample_ids.tolist() == [0, 0, 3]  # both class-0 prototypes on patch A
    distinct = bank.nearest_per_prototype(batches, distinct=True)
    brute = ((bank.vectors.detach()[:, None] - patches[None]) ** 2).sum(-1)  # (P, patches)
    # prototype 0 is nearer to A (0.0025 vs 0.0225): it keeps A; prototype 1 takes B, its next-nearest
    assert distinct.sample_ids.tolist() == [0, 1, 3]
    torch.testing.assert_close(distinct.distances, brute[[0, 1, 2], [0, 1, 3]])
    torch.testing.assert_close(distinct.vectors, patches[[0, 1, 3]])


def test_ema_update_from_weighted_sums() -> None:
    bank = PrototypeBank(3, 4, owners=[0, 0, 1], metric="cosine", learnable=False)
    old = bank.vectors.detach().clone().numpy()
    sums = np.array([[1.0, 2.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.5, 0.0, 0.5, 1.0]])
    weights = np.array([2.0, 0.0, 0.5])  # soft assignment mass; prototype 1 got none
    bank.ema_update_from_sums(torch.tensor(sums).float(), torch.tensor(weights).float(), 0.9, step=4)
    expected = old.copy()
    for p in (0, 2):
        moved = 0.9 * old[p] + 0.1 * sums[p] / weights[p]
        expected[p] = moved / np.linalg.norm(moved)
    np.testing.assert_allclose(bank.vectors.detach().numpy(), expected, rtol=1e-5, atol=1e-6)
    assert bank.step.tolist() == [4, -1, 4]
    with pytest.raises(ValueError, match="weights must have shape"):
        bank.ema_update_from_sums(torch.zeros(3, 4), torch.ones(2), 0.9)
