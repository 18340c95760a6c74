"""Deformable ProtoPNet's pieces on fixed small tensors, against the paper's formulas written out here."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from protolib.bank import PrototypeBank
from protolib.losses.deformable import DeformableProtoPNetLoss, part_orthogonality, subtractive_margin
from protolib.nn.deformable import OffsetPredictor, norm_preserving_sample, part_grid, part_positions
from protolib.nn.prototype_layer import DeformablePrototypeLayer
from protolib.nn.similarity import PartCosineSimilarity


def bilinear_zero_padded(image: np.ndarray, row: float, col: float) -> np.ndarray:
    """Bilinear value of ``image`` (D, H, W) at a fractional (row, col); corners outside count as zero."""
    d, h, w = image.shape
    r0, c0 = math.floor(row), math.floor(col)
    value = np.zeros(d)
    for r, c in ((r0, c0), (r0, c0 + 1), (r0 + 1, c0), (r0 + 1, c0 + 1)):
        if 0 <= r < h and 0 <= c < w:
            value += (1 - abs(row - r)) * (1 - abs(col - c)) * image[:, r, c]
    return value


def test_part_grid_is_centred_on_the_location():
    grid, padding = part_grid((2, 2), dilation=2)
    assert padding == 1
    assert grid.tolist() == [[-1, -1], [-1, 1], [1, -1], [1, 1]]
    grid3, padding3 = part_grid((3, 3), dilation=1)
    assert padding3 == 1 and grid3[4].tolist() == [0, 0]
    with pytest.raises(ValueError, match="centred"):
        part_grid((2, 2), dilation=1)


def test_part_positions_add_offsets_in_dcn_layout():
    grid, _ = part_grid((2, 2), dilation=2)
    offsets = torch.zeros(1, 8, 3, 4)
    offsets[0, 2 * 3, 1, 2] = 0.25  # part 3 (bottom right), row offset at location (1, 2)
    offsets[0, 2 * 3 + 1, 1, 2] = -0.5  # its column offset
    positions = part_positions(offsets, grid)  # (1, 4, 3, 4, 2)
    assert positions[0, 0, 1, 2].tolist() == [0.0, 1.0]  # (1 - 1, 2 - 1)
    assert positions[0, 3, 1, 2].tolist() == [2.25, 2.5]  # (1 + 1 + 0.25, 2 + 1 - 0.5)


def test_norm_preserving_sample_matches_sqrt_of_bilinear_of_squares():
    torch.manual_seed(0)
    features = torch.rand(2, 3, 4, 5, dtype=torch.float64)
    positions = (
        torch.tensor(
            [[-0.7, 0.3], [1.25, 2.5], [3.9, 4.2], [0.0, 0.0], [2.0, -1.5], [3.0, 4.0]], dtype=torch.float64
        )
        .view(1, 2, 3, 1, 2)
        .expand(2, 2, 3, 1, 2)
    )  # (B, n=2, h=3, w=1, 2)
    sampled = norm_preserving_sample(features, positions)  # (B, D, n, h, w)
    for b in range(2):
        squared = features[b].numpy() ** 2
        for k in range(2):
            for i in range(3):
                row, col = positions[b, k, i, 0].tolist()
                expected = np.sqrt(bilinear_zero_padded(squared, row, col))
                np.testing.assert_allclose(sampled[b, :, k, i, 0].numpy(), expected, rtol=1e-10)
    # At grid points the sample is the pixel itself; between unit vectors the length stays one.
    np.testing.assert_allclose(sampled[0, :, 1, 0, 0], features[0, :, 0, 0], rtol=1e-10)
    unit = torch.nn.functional.normalize(features, dim=1)
    inside = torch.tensor([[[[[1.5, 2.25]]]]], dtype=torch.float64).expand(2, 1, 1, 1, 2)
    length = norm_preserving_sample(unit, inside).norm(dim=1)
    np.testing.assert_allclose(length.numpy(), 1.0, rtol=1e-10)


def reference_cosines(features: np.ndarray, prototypes: np.ndarray, eps: float = 1e-4) -> np.ndarray:
    """The reference's ``cos_activation`` at zero offsets (2 x 2 parts, dilation 2, padding 1), in numpy.

    Features get two eps channels and length ``64 / 2`` per location, prototype parts unit length / 2; the
    dot product over the four parts (parts off the map contribute zero) is divided by ``64 * 1.01``.
    """
    b, _d, h, w = features.shape
    x = np.concatenate([features, np.full((b, 2, h, w), eps)], axis=1)
    x = 64 * x / np.sqrt((x**2).sum(axis=1, keepdims=True) + eps) / 2
    p = np.concatenate([prototypes, np.full((prototypes.shape[0], 2, 2, 2), eps)], axis=1)
    p = p / (np.sqrt((p**2).sum(axis=1, keepdims=True) + eps) + eps) / 2
    out = np.zeros((b, prototypes.shape[0], h, w))
    for i in range(h):
        for j in range(w):
            for a in range(2):
                for c in range(2):
                    r, s = i - 1 + 2 * a, j - 1 + 2 * c
                    if 0 <= r < h and 0 <= s < w:
                        out[:, :, i, j] += x[:, :, r, s] @ p[:, :, a, c].T
    return out / (64 * 1.01)


def make_layer(prototypes: torch.Tensor, channels: int, hidden: int = 0) -> DeformablePrototypeLayer:
    bank = PrototypeBank(prototypes.shape[0], channels * 4, owners=[0, 0, 1], metric="ip")
    layer = DeformablePrototypeLayer(bank, channels=channels, offset_hidden=hidden).double()
    with torch.no_grad():
        # Bank layout (P, D * n) channel-major = the reference's (P, D, 2, 2) flattened.
        bank.vectors.copy_(prototypes.reshape(prototypes.shape[0], -1))
    return layer


def test_layer_at_zero_offsets_matches_the_reference_formula():
    torch.manual_seed(1)
    features = torch.rand(2, 5, 4, 4, dtype=torch.float64)
    features[0, :, 1, 1] = 0  # a dead location: the eps channels keep its direction defined
    prototypes = torch.rand(3, 5, 2, 2, dtype=torch.float64) - 0.2
    layer = make_layer(prototypes, channels=5)
    torch.nn.init.zeros_(layer.offset_predictor.net[0].weight)
    activations = layer(features)
    expected = reference_cosines(features.numpy(), prototypes.numpy())
    np.testing.assert_allclose((1 - activations.distances).detach().numpy(), expected, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(
        activations.similarities.detach().numpy(),
        np.maximum(expected.reshape(2, 3, -1).max(-1), 0),
        rtol=1e-9,
    )


def test_layer_with_offsets_samples_where_the_parts_land():
    torch.manual_seed(2)
    features = torch.rand(1, 3, 5, 5, dtype=torch.float64)
    prototypes = torch.rand(3, 3, 2, 2, dtype=torch.float64)
    layer = make_layer(prototypes, channels=3, hidden=4)
    with torch.no_grad():
        layer.offset_predictor.net[2].bias.copy_(torch.tensor([0.3, -0.6, 0.0, 0.5, -0.25, 0.1, 0.7, 0.2]))
    _parts, _offsets, positions = layer.sample(features)
    sim = layer.similarity
    unit = sim.normalize_features(features)[0].numpy()  # (D + 2, H, W)
    protos = sim.normalize_prototypes(prototypes.reshape(3, 3, 4)).numpy()  # (P, D + 2, 4)
    i, j = 2, 3
    cosine = np.zeros(3)
    for k in range(4):
        row, col = positions[0, k, i, j].tolist()
        part = np.sqrt(bilinear_zero_padded(unit**2, row, col))
        cosine += protos[:, :, k] @ part
    np.testing.assert_allclose(
        (1 - layer(features).distances)[0, :, i, j].detach(), cosine / (4 * 1.01), rtol=1e-9
    )
    # Push ranks patches by <patch, normalised prototype>: the similarity's order (eps channels aside).
    patches = layer.push_patches(features)  # (1, D * n, H, W)
    scores = torch.einsum("bchw,pc->bphw", patches, layer.push_queries())
    np.testing.assert_allclose(
        scores.detach() / (4 * 1.01), 1 - layer(features).distances.detach(), atol=1e-6
    )


def test_offset_predictor_keeps_the_map_size_and_gradients_reach_the_offsets():
    for hidden in (0, 16):
        predictor = OffsetPredictor(6, (2, 2), hidden=hidden)
        assert predictor(torch.rand(2, 6, 7, 5)).shape == (2, 8, 7, 5)
    torch.manual_seed(3)
    layer = make_layer(torch.rand(3, 4, 2, 2, dtype=torch.float64), channels=4, hidden=8)
    layer(torch.rand(2, 4, 6, 6, dtype=torch.float64)).similarities.sum().backward()
    grads = [p.grad for p in layer.offset_predictor.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


def test_subtractive_margin_formula():
    cosines = torch.tensor([[0.9, 0.2, -0.3], [0.05, 0.99, 0.5]])
    wrong = torch.tensor([[0.0, 1.0, 1.0], [1.0, 0.0, 1.0]])
    out = subtractive_margin(cosines, wrong, 0.1)
    expected = np.maximum(np.cos(np.maximum(np.arccos(cosines.numpy()) - 0.1 * wrong.numpy(), 0)), 0)
    np.testing.assert_allclose(out.numpy(), expected, rtol=1e-6)
    assert out[0, 1] > cosines[0, 1] and out[0, 0] == pytest.approx(0.9)


def orthogonality_numpy(prototypes: np.ndarray, owners: np.ndarray, eps: float = 1e-4) -> float:
    total = 0.0
    for c in np.unique(owners):
        parts = prototypes[owners == c]  # (K, D, n)
        unit = parts / (np.sqrt((parts**2).sum(axis=1, keepdims=True) + eps) + eps)
        w = unit.transpose(1, 0, 2).reshape(parts.shape[1], -1)  # (D, K n) columns = parts
        total += ((w.T @ w - np.eye(w.shape[1])) ** 2).sum()
    return float(np.sqrt(total))


def test_part_orthogonality_per_class_equal_and_unequal_counts():
    torch.manual_seed(4)
    prototypes = torch.randn(6, 7, 4, dtype=torch.float64)
    owners = torch.tensor([1, 0, 1, 0, 2, 2])
    assert part_orthogonality(prototypes, owners).item() == pytest.approx(
        orthogonality_numpy(prototypes.numpy(), owners.numpy()), rel=1e-9
    )
    uneven = torch.tensor([0, 0, 0, 1, 2, 2])
    assert part_orthogonality(prototypes, uneven).item() == pytest.approx(
        orthogonality_numpy(prototypes.numpy(), uneven.numpy()), rel=1e-9
    )
    # Orthonormal parts within every class cost (almost) nothing.
    basis = torch.eye(8, dtype=torch.float64)[:, :8].T.reshape(2, 4, 8).transpose(1, 2)  # (2, D=8, n=4)
    assert part_orthogonality(basis, torch.tensor([0, 0])).item() < 1e-3


class TinyNet(torch.nn.Module):
    """Just what the loss reads from a network."""

    def __init__(self, layer: DeformablePrototypeLayer, num_classes: int) -> None:
        super().__init__()
        self.prototype_layer = layer
        self.prototype_bank = layer.bank
        self.num_classes = num_classes
        self.last_layer = torch.nn.Linear(layer.num_prototypes, num_classes, bias=False).double()
        with torch.no_grad():
            own = torch.nn.functional.one_hot(layer.bank.owners, num_classes).T.double()
            self.last_layer.weight.copy_(own - 0.5 * (1 - own))


def test_loss_terms_and_weighted_total():
    torch.manual_seed(5)
    layer = make_layer(torch.rand(3, 4, 2, 2, dtype=torch.float64), channels=4, hidden=8)
    net = TinyNet(layer, num_classes=2)
    activations = layer(torch.rand(2, 4, 5, 5, dtype=torch.float64))
    outputs = {"prototype_cosine": 1 - activations.min_distances, "offsets": activations.offsets}
    labels = torch.tensor([0, 1])
    loss = DeformableProtoPNetLoss()
    total, terms = loss(outputs, labels, net)
    cos = outputs["prototype_cosine"].detach().numpy()
    owners = np.array([0, 0, 1])
    wrong = (owners[None, :] != labels.numpy()[:, None]).astype(float)
    act = np.maximum(np.cos(np.maximum(np.arccos(cos) - 0.1 * wrong, 0)), 0)
    logits = act @ net.last_layer.weight.detach().numpy().T
    ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[[0, 1], labels.numpy()])
    assert terms["ce"].item() == pytest.approx(ce, rel=1e-9)
    assert terms["cluster"].item() == pytest.approx(np.mean((act * (1 - wrong)).max(1)), rel=1e-9)
    assert terms["separation"].item() == pytest.approx(np.mean((act * wrong).max(1)), rel=1e-9)
    assert terms["offset"].item() == pytest.approx(np.sqrt((activations.offsets.detach().numpy() ** 2).sum()))
    assert terms["l1"].item() == pytest.approx(0.5 * 3)  # the -0.5 connections to the other class
    weights = {"ce": 1, "cluster": -0.8, "separation": 0.08, "l1": 1e-2, "offset": 0.8, "orthogonality": 0.1}
    assert total.item() == pytest.approx(sum(w * terms[k].item() for k, w in weights.items()), rel=1e-9)


def test_similarity_and_layer_reject_bad_configuration():
    with pytest.raises(ValueError, match="epsilon"):
        PartCosineSimilarity(epsilon=0)
    bank = PrototypeBank(3, 10, metric="ip")
    with pytest.raises(ValueError, match="channels x parts"):
        DeformablePrototypeLayer(bank, channels=4)
