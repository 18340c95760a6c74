"""Routing explanations: patch labels, routing purity and usage on constructed cases; galleries; pictures."""

from __future__ import annotations

import functools
import json

import numpy as np
import pytest
import torch
from PIL import Image

from explain.routing import collect_routing, patch_labels, render_routing, routing_purity, usage_matrix
from protolib.models.moe_vit import MoEViT
from protolib.nn.moe import MoEMLP, SoftmaxRouter

TINY = {"embed_dim": 16, "depth": 2, "num_heads": 2}


def test_patch_labels_take_the_majority_pixel_label() -> None:
    mask = torch.zeros(1, 4, 4, dtype=torch.long)
    mask[0, :2, :2] = torch.tensor([[3, 3], [3, 0]])  # patch 0: 3 pixels of part 3
    mask[0, :2, 2:] = torch.tensor([[1, 0], [0, 0]])  # patch 1: background majority
    mask[0, 2:, :2] = torch.tensor([[2, 2], [1, 1]])  # patch 2: a 2-2 tie goes to the smaller label
    assert patch_labels(mask, (2, 2)).tolist() == [[3, 0, 1, 0]]
    with pytest.raises(ValueError, match="3x3 patch grid"):
        patch_labels(mask, (3, 3))


def test_routing_purity_known_answers() -> None:
    parts = torch.tensor([1, 1, 2, 2, 3, 3, 0, 0])
    assert routing_purity(torch.tensor([0, 0, 1, 1, 2, 2, 5, 6]), parts) == 1.0  # one part type per expert
    # everything to one expert: the commonest part type's share (2 of 6 part patches)
    assert routing_purity(torch.zeros(8, dtype=torch.long), parts) == pytest.approx(2 / 6)
    # expert 0 takes parts 1, 1, 2 (max 2), expert 1 takes 2, 3, 3 (max 2): 4 / 6; background ignored
    assert routing_purity(torch.tensor([0, 0, 0, 1, 1, 1, 0, 1]), parts) == pytest.approx(4 / 6)
    with pytest.raises(ValueError, match="all background"):
        routing_purity(torch.tensor([0, 1]), torch.tensor([0, 0]))


def test_usage_matrix_columns_are_class_distributions() -> None:
    experts = torch.tensor([[0, 0, 1], [2, 2, 2], [1, 1, 1]])
    labels = torch.tensor([0, 1, 0])
    matrix = usage_matrix(experts, labels, num_experts=3, num_classes=2)
    expected = np.array([[2 / 6, 0], [4 / 6, 0], [0, 1]])
    np.testing.assert_allclose(matrix.numpy(), expected, atol=1e-7)


def fake_parts(n: int = 6, side: int = 16) -> list[dict]:
    torch.manual_seed(0)
    items = []
    for i in range(n):
        mask = torch.zeros(side, side, dtype=torch.long)
        mask[: side // 2, : side // 2] = 1 + i % 2
        items.append({"image": torch.rand(3, side, side), "label": i % 2, "index": i, "part_mask": mask})
    return items


def tiny_net(router=None) -> MoEViT:
    moe = (
        functools.partial(MoEMLP, num_experts=3)
        if router is None
        else functools.partial(MoEMLP, num_experts=3, router=router)
    )
    return MoEViT(2, 3, 16, backbone_options=TINY, moe=moe).eval()


def test_galleries_are_each_experts_nearest_routed_patches() -> None:
    torch.manual_seed(1)
    net, data = tiny_net(), fake_parts()
    summary = collect_routing(net, data, per_expert=2, batch_size=4)
    assert summary.experts.shape == (6, 16) and summary.parts.shape == (6, 16)
    with torch.no_grad():  # brute force over every patch of every image
        out = net.extract(torch.stack([d["image"] for d in data]))
    tokens = torch.nn.functional.normalize(out["patch_tokens"].reshape(-1, 16), dim=1)
    cos = tokens @ torch.nn.functional.normalize(net.prototype_bank.vectors.detach(), dim=1).T  # (96, E)
    best = cos.argmax(1)
    for e in range(3):
        rows = (best == e).nonzero().flatten()
        want = rows[(1 - cos[rows, e]).argsort()[:2]]
        got = summary.gallery_ids[e] * 16 + summary.gallery_patches[e]
        assert got[got >= 0].tolist() == want.tolist()
        np.testing.assert_allclose(
            summary.gallery_scores[e][: len(want)], (1 - cos[want, e]).numpy(), atol=1e-5
        )


def test_render_routing_writes_pictures_and_report(tmp_path) -> None:
    data = fake_parts()
    for router in (None, SoftmaxRouter):
        out = tmp_path / ("proto" if router is None else "softmax")
        written = render_routing(tiny_net(router), data, data, out, lambda x: x, ["a", "b"], num_maps=4)
        assert {p.name for p in written} == {"routing_maps.png", "galleries.png", "usage.png", "routing.json"}
        report = json.loads((out / "routing.json").read_text())
        assert 0 <= report["routing_purity"] <= 1 and 0 <= report["usage_entropy"] <= 1
        assert np.isclose(sum(report["expert_share"]), 1) and Image.open(out / "routing_maps.png").width > 0
    with pytest.raises(ValueError, match="no MoE layer"):
        render_routing(MoEViT(2, 3, 16, backbone_options=TINY, moe=None), data, data, tmp_path, lambda x: x)
