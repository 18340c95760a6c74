"""PIP-Net and ProtoPool layers and losses on fixed small tensors, against the papers' formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protolib.losses.pipnet import PIPNetLoss, align_loss, pipnet_class_loss, tanh_uniformity, view_alignment
from protolib.losses.protopool import ProtoPoolLoss, top_prototype_mask
from protolib.nn.presence import NonNegativeLinear, PresenceMaps
from protolib.nn.slots import SlotAssignment, focal_similarity, gumbel_scale, orthogonality_loss


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


# ---------------------------------------------------------------------------------------------- PIP-Net
def test_presence_maps_are_a_softmax_of_the_1x1_conv_over_prototypes() -> None:
    torch.manual_seed(0)
    layer = PresenceMaps(in_channels=3, prototypes=4)
    features = torch.randn(2, 3, 2, 5)
    maps = layer(features).detach().numpy()
    w = layer.conv.weight.detach().numpy()[:, :, 0, 0]  # (P, D)
    b = layer.conv.bias.detach().numpy()
    scores = np.einsum("pd,bdhw->bphw", w, features.numpy()) + b[None, :, None, None]
    np.testing.assert_allclose(maps, softmax(scores, axis=1), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(maps.sum(axis=1), 1.0, rtol=1e-5)
    identity = PresenceMaps(in_channels=3, prototypes=None)  # the paper: backbone channels are prototypes
    np.testing.assert_allclose(identity(features).numpy(), softmax(features.numpy(), 1), rtol=1e-5, atol=1e-6)


def test_non_negative_head_uses_relu_weights_and_clamps_small_weights_to_zero() -> None:
    head = NonNegativeLinear(3, 2, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[0.5, -1.0, 0.0005], [2.0, 0.002, -0.1]]))
        head.bias.copy_(torch.tensor([0.3, -0.2]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    w = np.maximum(head.weight.detach().numpy(), 0)
    np.testing.assert_allclose(head(x).detach().numpy(), x.numpy() @ w.T + [0.3, -0.2], rtol=1e-6)
    head.clamp_(1e-3)
    np.testing.assert_allclose(head.weight.detach().numpy(), [[0.499, 0, 0], [1.999, 0.001, 0]], atol=1e-7)
    np.testing.assert_allclose(head.bias.detach().numpy(), [0.3, 0.0])


def test_pipnet_losses_match_the_paper_formulas() -> None:
    torch.manual_seed(1)
    maps1 = torch.randn(2, 4, 2, 3).softmax(dim=1)
    maps2 = torch.randn(2, 4, 2, 3).softmax(dim=1)
    z1 = maps1.numpy().transpose(0, 2, 3, 1).reshape(-1, 4)  # one row per patch
    z2 = maps2.numpy().transpose(0, 2, 3, 1).reshape(-1, 4)
    expected_align = -np.log((z1 * z2).sum(1) + 1e-12).mean()
    aligned = align_loss(torch.from_numpy(z1), torch.from_numpy(z2)).item()
    assert aligned == pytest.approx(expected_align, rel=1e-5)
    assert view_alignment(maps1, maps2).item() == pytest.approx(expected_align, rel=1e-5)  # symmetric
    pooled = maps1.flatten(2).amax(2)  # (B, P)
    expected_tanh = -np.log(np.tanh(pooled.numpy().sum(0)) + 1e-8).mean()
    assert tanh_uniformity(pooled).item() == pytest.approx(expected_tanh, rel=1e-5)
    out = torch.tensor([[0.5, 2.0, 0.0], [3.0, 0.1, 1.0]])
    labels = torch.tensor([1, 2])
    inputs = np.log1p(out.numpy() ** 2)
    expected_class = -np.log(softmax(inputs, 1)[[0, 1], [1, 2]]).mean()
    assert pipnet_class_loss(out, labels, 2.0).item() == pytest.approx(expected_class, rel=1e-5)


def test_pipnet_loss_weighs_only_the_phase_terms() -> None:
    torch.manual_seed(2)

    class Net:
        last_layer = NonNegativeLinear(4, 3)

    maps = torch.randn(4, 4, 2, 2).softmax(dim=1)
    outputs = {"presence_maps": maps, "pooled": maps.flatten(2).amax(2), "logits": torch.rand(4, 3)}
    labels = torch.tensor([0, 2, 0, 2])
    loss = PIPNetLoss()
    total, terms = loss(outputs, labels, Net())
    assert total.item() == pytest.approx(5 * terms["align"] + 2 * terms["tanh"] + 2 * terms["classification"])
    loss.set_weights({"align": 0.5, "tanh": 5.0})  # pre-training: no class term
    total, terms = loss(outputs, labels, Net())
    assert set(terms) == {"align", "tanh"}
    assert total.item() == pytest.approx(0.5 * terms["align"] + 5 * terms["tanh"])
    with pytest.raises(ValueError, match="unknown PIP-Net loss terms"):
        loss.set_weights({"cluster": 1.0})


# ---------------------------------------------------------------------------------------------- ProtoPool
def test_focal_similarity_mixes_distances_then_activates() -> None:
    torch.manual_seed(3)
    dmin, dmean = torch.rand(2, 5), torch.rand(2, 5) + 1
    q = torch.randn(3, 5, 2).softmax(dim=1)  # (C, M, K)
    out = focal_similarity(dmin, dmean, q).numpy()

    def g(d: float) -> float:
        return math.log((d + 1) / (d + 1e-4))

    for b in range(2):
        for c in range(3):
            for k in range(2):
                mixed_min = sum(float(q[c, m, k] * dmin[b, m]) for m in range(5))
                mixed_mean = sum(float(q[c, m, k] * dmean[b, m]) for m in range(5))
                assert out[b, c, k] == pytest.approx(g(mixed_min) - g(mixed_mean), rel=1e-5)


def test_gumbel_scale_schedule() -> None:
    alpha = (1e3 / 1.3) ** 2 / 30
    assert gumbel_scale(0) == 0.0
    assert gumbel_scale(15) == pytest.approx(1.3 * math.sqrt(alpha * 15))
    assert gumbel_scale(15) == pytest.approx(1e3 / math.sqrt(2))
    assert gumbel_scale(30) == gumbel_scale(99) == 1e3


def test_slot_assignment_softmax_gumbel_and_hard_choice() -> None:
    torch.manual_seed(4)
    slots = SlotAssignment(num_classes=2, pool_size=4, slots=3)
    q = slots()  # scale 0: plain softmax over the pool
    np.testing.assert_allclose(q.detach().numpy(), softmax(slots.logits.detach().numpy(), 1), rtol=1e-5)
    slots.scale.fill_(1e4)
    sampled = slots()  # training: Gumbel-softmax at a large scale is one-hot on the argmax
    np.testing.assert_allclose(sampled.detach().numpy(), slots.hard().numpy(), atol=1e-4)
    slots.eval()
    np.testing.assert_allclose(slots().detach().numpy(), slots.hard().numpy(), atol=1e-4)
    assert torch.equal(slots.hard().argmax(1), slots.chosen())


def test_orthogonality_loss_is_the_mean_off_diagonal_cosine() -> None:
    torch.manual_seed(5)
    logits = torch.randn(3, 6, 4)  # (C, M, K)
    a = logits.numpy()
    total = 0.0
    for c in range(3):
        for i in range(4):
            for j in range(4):
                if i != j:
                    u, v = a[c, :, i], a[c, :, j]
                    total += u @ v / (np.linalg.norm(u) * np.linalg.norm(v))
    assert orthogonality_loss(logits).item() == pytest.approx(total / (3 * 4), rel=1e-4, abs=1e-6)


def test_protopool_loss_cluster_and_separation_use_the_class_top_k_prototypes() -> None:
    torch.manual_seed(6)
    c, m, k, b = 3, 6, 2, 4
    assignment = torch.randn(c, m, k).softmax(dim=1)
    min_d = torch.rand(b, m) * 4
    labels = torch.tensor([0, 1, 2, 1])
    mask = top_prototype_mask(assignment, labels, k).numpy()
    for i in range(b):
        weight = assignment[labels[i]].sum(-1).numpy()
        assert set(np.flatnonzero(mask[i])) == set(np.argsort(-weight)[:k])

    class Net:
        num_classes = c
        max_distance = 8.0
        last_layer = torch.nn.Linear(c * k, c, bias=False)
        assignment = SlotAssignment(c, m, k)

        def slot_classes(self) -> torch.Tensor:
            return torch.arange(c).repeat_interleave(k)

    net = Net()
    logits = torch.randn(b, c)
    outputs = {"logits": logits, "min_distances": min_d, "assignment": assignment}
    total, terms = ProtoPoolLoss()(outputs, labels, net)
    own = [min(min_d[i, j].item() for j in np.flatnonzero(mask[i])) for i in range(b)]
    others = [min(min_d[i, j].item() for j in np.flatnonzero(mask[i] == 0)) for i in range(b)]
    assert terms["cluster"].item() == pytest.approx(np.mean(own), rel=1e-5)
    assert terms["separation"].item() == pytest.approx(np.mean(others), rel=1e-5)
    w = net.last_layer.weight.detach().numpy()
    wrong = 1 - np.eye(c)[np.arange(c).repeat(k)].T
    assert terms["l1"].item() == pytest.approx(np.abs(w * wrong).sum(), rel=1e-5)
    ce = torch.nn.functional.cross_entropy(logits, labels).item()
    expected = ce + 0.8 * np.mean(own) - 0.08 * np.mean(others) + 1e-4 * terms["l1"].item()
    assert total.item() == pytest.approx(expected + terms["orthogonality"].item(), rel=1e-5)
