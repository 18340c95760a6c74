"""Interpretability scores (explain.scores): each measure against an independent computation on fixed tiny
inputs (numpy / scipy / loops written out here), and every score through the registry on real networks."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from scipy import ndimage
from torch import nn

from explain.scores import SCORES, score_model
from explain.scores.consistency import (
    PartCoverage,
    consistency_score,
    covered_parts,
    mask_part_points,
    stability_score,
)
from explain.scores.deletion import causal_curves, curve_auc
from explain.scores.evidence import blur, relevance
from explain.scores.pointing import class_mean_accuracy, pointing_hits
from explain.scores.sparsity import prototypes_for_share
from protolib.cli.train import CONFIG_DIR
from protolib.data.digits import DigitsDataModule
from protolib.data.parts import PartsDataModule
from protolib.lit.checkpoint import build_module

FAMILIES = [
    "protopnet",
    "tesnet",
    "st_protopnet",
    "deformable_protopnet",
    "cbc",
    "protopool",
    "pipnet",
    "prototree",
]
OURS = ["consistency", "deletion", "insertion", "part_score", "pointing", "sparsity"]  # ("because": its own)


class LinearNet(nn.Module):
    """logits = <image, weight_k>: a model whose every output can be computed by hand."""

    def __init__(self, weights: torch.Tensor) -> None:
        super().__init__()
        self.weights = nn.Parameter(weights)  # (K, C, H, W)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"logits": torch.einsum("bchw,kchw->bk", images, self.weights)}


def softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max())
    return e / e.sum()


@pytest.mark.parametrize("mode", ["deletion", "insertion"])
def test_causal_curves_follow_the_rise_protocol_pixel_by_pixel(mode: str) -> None:
    rng = np.random.default_rng(0)
    weights = rng.normal(size=(3, 2, 5, 5)).astype(np.float32)
    images = rng.normal(size=(2, 2, 5, 5)).astype(np.float32)
    saliency = rng.random((2, 5, 5)).astype(np.float32)  # distinct values: one order
    net = LinearNet(torch.from_numpy(weights))
    classes = torch.tensor([0, 2])
    curves = causal_curves(
        net, torch.from_numpy(images), torch.from_numpy(saliency), classes, mode, step=7, blur_size=3
    )
    # expected: ceil(25 / 7) = 4 steps, 5 points; the substrate is zeros or the 3 x 3 blur (sigma 5) of the
    # image with zero padding, its kernel scipy's gaussian_filter of a delta
    delta = np.zeros((3, 3))
    delta[1, 1] = 1
    kernel = ndimage.gaussian_filter(delta, 5.0)
    for i in range(2):
        blurred = np.stack([ndimage.convolve(ch, kernel, mode="constant") for ch in images[i]])
        start, finish = (images[i], np.zeros_like(images[i])) if mode == "deletion" else (blurred, images[i])
        current = start.copy().reshape(2, 25)
        order = np.argsort(-saliency[i].reshape(25))
        expected = []
        for step in range(5):
            logits = np.einsum("chw,kchw->k", current.reshape(2, 5, 5), weights)
            expected.append(softmax(logits)[int(classes[i])])
            changed = order[7 * step : 7 * (step + 1)]
            current[:, changed] = finish.reshape(2, 25)[:, changed]
        np.testing.assert_allclose(curves[i].numpy(), expected, rtol=1e-5, atol=1e-6)
    area = (np.sum(expected) - expected[0] / 2 - expected[-1] / 2) / 4
    assert float(curve_auc(curves)[1]) == pytest.approx(area, rel=1e-5)


def test_blur_is_the_reference_gaussian_kernel_with_zero_padding() -> None:
    image = np.random.default_rng(1).normal(size=(1, 3, 9, 9)).astype(np.float32)
    delta = np.zeros((11, 11))
    delta[5, 5] = 1
    kernel = ndimage.gaussian_filter(delta, 5.0)
    expected = np.stack([ndimage.convolve(ch, kernel, mode="constant") for ch in image[0]])
    np.testing.assert_allclose(blur(torch.from_numpy(image))[0].numpy(), expected, rtol=1e-5, atol=1e-6)


def test_pointing_hits_use_the_first_maximum_and_a_euclidean_tolerance() -> None:
    saliency = torch.zeros(3, 6, 6)
    saliency[0, 1, 1] = 1.0  # on the object
    saliency[1, 4, 4] = 1.0  # 2 px right of it: a hit within tolerance 2, a miss within 1.5
    saliency[2, 0, 5] = saliency[2, 5, 5] = 1.0  # a tie: the first in row-major order (0, 5) counts
    objects = torch.zeros(3, 6, 6, dtype=torch.bool)
    objects[:, 4, 2] = objects[:, 0:2, 0:2] = True
    objects[2] = False
    objects[2, 5, 5] = True  # the second maximum is on it, the first is not
    for tolerance in (1.5, 2.0):
        hits = pointing_hits(saliency, objects, tolerance)
        expected = []
        for i in range(3):
            flat = int(np.argmax(saliency[i].numpy()))
            py, px = divmod(flat, 6)
            ys, xs = np.nonzero(objects[i].numpy())
            expected.append(bool((((ys - py) ** 2 + (xs - px) ** 2) <= tolerance**2).any()))
        assert hits.tolist() == expected
    assert pointing_hits(saliency, objects, 2.0).tolist() == [True, True, False]
    # per-class mean: class 0 hits 1 of 2, class 1 hits 1 of 1 -> (0.5 + 1) / 2
    assert class_mean_accuracy(torch.tensor([True, False, True]), torch.tensor([0, 0, 1])) == 0.75


def test_prototypes_for_share_counts_the_fewest_top_contributions() -> None:
    evidence = torch.tensor([[0.5, 3.0, -2.0, 1.0, 0.5], [1.0, 1.0, 1.0, 1.0, 0.0], [-1.0, 0.0, 0, 0, 0]])
    expected = []
    for row in evidence.numpy():
        positive = np.sort(np.clip(row, 0, None))[::-1]
        total = positive.sum()
        fewest = next((k for k in range(1, 6) if positive[:k].sum() >= 0.9 * total), 0)
        expected.append(fewest if total > 0 else 0)
    assert prototypes_for_share(evidence, 0.9).tolist() == expected == [3, 4, 0]


def test_tree_relevance_is_the_greedy_path() -> None:
    torch.manual_seed(0)
    net = family_net("prototree", 4)
    similarities = torch.rand(5, net.tree.num_prototypes)
    evidence = relevance(net, {"prototype_similarity": similarities}, torch.zeros(5, dtype=torch.long))
    children, prototype = net.tree.node_children, net.tree.node_prototype
    for i in range(5):
        node, expected = 0, torch.zeros(net.tree.num_prototypes)
        while children[node, 0] >= 0:  # walk down: right when the similarity exceeds 0.5
            p = int(prototype[node])
            expected[p] = similarities[i, p]
            node = int(children[node, 1] if similarities[i, p] > 0.5 else children[node, 0])
        torch.testing.assert_close(evidence[i], expected)


def test_mask_part_points_are_part_centroids() -> None:
    masks = torch.zeros(2, 5, 6, dtype=torch.long)
    masks[0, 1:3, 0:2] = 2
    masks[0, 4, 5] = 1
    masks[1, 0, 0:4] = 3
    points = mask_part_points(masks, 4)
    for i in range(2):
        for k in range(4):
            ys, xs = np.nonzero(masks[i].numpy() == k + 1)
            expected = [xs.mean(), ys.mean(), 1.0] if len(ys) else [0.0, 0.0, 0.0]
            np.testing.assert_allclose(points[i, k].numpy(), expected)


def reference_proto_to_part(
    maps: np.ndarray, parts: list[list[tuple[int, int, int]]], half: int, num_parts: int = 4
) -> np.ndarray:
    """EvalProtoPNet's loop, written out: box (y1, y2, x1, x2) around the first maximum, clipped, parts whose
    (x, y) is inside with inclusive edges."""
    n, size, _ = maps.shape
    out = np.zeros((n, num_parts))
    for i in range(n):
        where = np.where(maps[i] == maps[i].max())
        y, x = where[0][0], where[1][0]
        box = (max(0, y - half), min(size, y + half), max(0, x - half), min(size, x + half))
        for part_id, px, py in parts[i]:
            if box[0] <= py <= box[1] and box[2] <= px <= box[3]:
                out[i, part_id] = 1
    return out


def test_consistency_and_stability_match_the_reference_loops() -> None:
    rng = np.random.default_rng(2)
    n, size, half = 12, 16, 3
    maps = rng.random((n, size, size)).astype(np.float32)
    prototypes = np.array([0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2])
    parts = [
        [(k, int(rng.integers(0, size)), int(rng.integers(0, size))) for k in range(4) if rng.random() < 0.7]
        for _ in range(n)
    ]
    points = torch.zeros(n, 4, 3)
    for i, labels in enumerate(parts):
        for k, x, y in labels:
            points[i, k] = torch.tensor([x, y, 1.0])
    covered = covered_parts(torch.from_numpy(maps), points, half)
    expected = reference_proto_to_part(maps, parts, half)
    np.testing.assert_array_equal(covered.numpy(), expected)
    # consistency: the reference formula over each prototype's images (part hit rate among images showing it)
    coverage = PartCoverage(torch.from_numpy(prototypes), covered, points[:, :, 2] > 0)
    flags = []
    for p in range(3):
        rows = prototypes == p
        present = np.maximum((points[rows, :, 2] > 0).numpy().sum(0), 1)
        flags.append(((expected[rows].sum(0) / present) >= 0.8).any())
    assert consistency_score(coverage) == pytest.approx(np.mean(flags))
    noisy_covered = covered.clone()
    noisy_covered[0, 0] = ~noisy_covered[0, 0]  # prototype 0 changes on 1 of its 4 images
    noisy_covered[5] = ~noisy_covered[5]  # prototype 1 on 1 of 4
    noisy = PartCoverage(coverage.prototype, noisy_covered, coverage.visible)
    assert stability_score(coverage, noisy) == pytest.approx((0.75 + 0.75 + 1.0) / 3)


def tiny_parts(**kwargs: object) -> PartsDataModule:
    dm = PartsDataModule(
        num_classes=4, train_per_class=3, val_per_class=1, test_per_class=2, batch_size=8, **kwargs
    )
    dm.setup("fit")
    return dm


def family_net(family: str, num_classes: int) -> nn.Module:
    """The network of experiment=<family>_parts, untrained (seeded)."""
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"experiment={family}_parts"])
    torch.manual_seed(0)
    return build_module(cfg.model, {"num_classes": num_classes, "in_channels": 3, "image_size": 32}).net


def check_scores(family: str, names: list[str] | None = None) -> dict[str, float]:
    dm = tiny_parts()
    net = family_net(family, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # push on 3 images per class warns of sharing and collapse
        net.push(dm.push_dataloader())
    names = names or OURS
    scores = score_model(net, dm, names=names, max_images=4, progress=False)
    expected = {f"{name}/" for name in names}
    assert {key.split("/")[0] + "/" for key in scores} == expected
    assert all(np.isfinite(v) for v in scores.values()), scores
    for key, value in scores.items():
        if not key.startswith("sparsity"):
            assert 0.0 <= value <= 1.0, (key, value)
    return scores


def test_every_score_runs_on_protopnet_and_prototree() -> None:
    protopnet = check_scores("protopnet")
    assert protopnet["sparsity/local_size"] == protopnet["sparsity/global_size"] == 40  # dense head
    tree = check_scores("prototree", ["sparsity", "pointing"])
    assert tree["sparsity/local_size"] == 5  # depth-5 tree: five decisions per path


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
def test_every_score_runs_on_every_family(family: str) -> None:
    check_scores(family)


def test_scores_needing_part_masks_refuse_data_without_them() -> None:
    digits = DigitsDataModule(image_size=16, batch_size=8, classes=[0, 1, 2, 3], seed=0)
    digits.setup("fit")
    torch.manual_seed(0)
    net = family_net("protopnet", 4)
    assert SCORES["pointing"].unavailable(net, digits) is not None
    with pytest.raises(ValueError, match=r"does not apply.*part_mask"):
        score_model(net, digits, names=["pointing"], max_images=2, progress=False)
    with pytest.raises(ValueError, match=r"part_mask.*data=parts"):
        SCORES["consistency"].compute(net, digits, max_images=2, progress=False)


def test_networks_without_similarity_maps_are_told_why() -> None:
    net = nn.Linear(2, 2)
    net.prototype_bank = None
    reason = SCORES["deletion"].unavailable(net, tiny_parts())
    assert reason is not None and "no spatial prototype similarity maps" in reason


def test_consistency_on_cub_part_locations(tmp_path: Path) -> None:
    from test_data_cub import make, write_cub

    from explain.scores.consistency import consistency_and_stability, part_coverage
    from protolib.models.protopnet import ProtoPNet, upsample_maps

    dm = make(write_cub(tmp_path), batch_size=4)
    torch.manual_seed(0)
    net = ProtoPNet(3, image_size=20, backbone="small_cnn", prototypes_per_class=2, prototype_dim=4).eval()
    coverage = part_coverage(net, dm, max_images=10, progress=False, half_size=4)
    # brute force: every test image against the prototypes of its class, the reference loop on its part_locs
    expected_rows, expected_protos = [], []
    for i in range(len(dm.test_dataset)):
        item = dm.test_dataset[i]
        with torch.no_grad():
            maps = upsample_maps(net(item["image"][None]).similarity_maps[0], (20, 20)).numpy()  # (P, H, W)
        labels = [(k, x, y) for k, (x, y, v) in enumerate(item["part_locs"].tolist()) if v > 0]
        for p in (net.owners == item["label"]).nonzero().flatten().tolist():
            expected_rows.append(reference_proto_to_part(maps[p : p + 1], [labels], 4, num_parts=3)[0])
            expected_protos.append(p)
    assert coverage.prototype.tolist() == expected_protos
    np.testing.assert_array_equal(coverage.covered.numpy(), np.stack(expected_rows))
    scores = consistency_and_stability(net, dm, max_images=10, progress=False, half_size=4)
    assert scores["consistency"] == consistency_score(coverage)
    assert 0.0 <= scores["stability"] <= 1.0


def test_class_probabilities_are_the_cbc_heads_own() -> None:
    from explain.scores.evidence import class_probabilities

    logits = torch.tensor([[0.2, 0.9, 0.4]])
    torch.testing.assert_close(class_probabilities(family_net("cbc", 3), logits), logits)
    expected = torch.from_numpy(softmax(logits[0].numpy()))[None]
    torch.testing.assert_close(class_probabilities(family_net("protopnet", 3), logits), expected)
