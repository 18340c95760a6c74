"""TesNet and ST-ProtoPNet building blocks against independent computations on small fixed tensors: the
projection similarity and its cosine cost distances, the orthonormality, Grassmann subspace-separation,
closeness, discrimination and masked-max cluster / separation terms (numpy loops over the paper's formulas).
The same values were also checked against the two reference repositories' code run on CPU."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from protolib.bank import PrototypeBank
from protolib.losses.st_protopnet import closeness_cost, discrimination_cost, masked_max_similarity
from protolib.losses.tesnet import orthonormality_cost, subspace_separation_cost
from protolib.nn.prototype_layer import PrototypeLayer
from protolib.nn.similarity import L2Similarity, ProjectionSimilarity

GEN = np.random.default_rng(0)
FEATURES = GEN.random((2, 6, 3, 4))  # (B, D, H, W)
PROTOTYPES = GEN.random((5, 6)) - 0.3  # (P, D), not unit: the similarity normalises them
OWNERS = np.array([0, 0, 1, 2, 2])  # uneven classes, as after pruning


def members(c: int) -> np.ndarray:
    """Row ids of the prototypes of class c."""
    return np.flatnonzero(np.equal(OWNERS, c))


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def test_projection_similarity_is_the_projection_onto_unit_prototypes() -> None:
    sim = ProjectionSimilarity()
    features, prototypes = torch.tensor(FEATURES), torch.tensor(PROTOTYPES)
    distances = sim.distances(features, prototypes)
    cost = sim.cost_distances(features, prototypes, distances)
    projection = np.zeros((2, 5, 3, 4))
    cosine = np.zeros((2, 5, 3, 4))
    for b, p, h, w in itertools.product(range(2), range(5), range(3), range(4)):
        z = FEATURES[b, :, h, w]
        projection[b, p, h, w] = z @ unit(PROTOTYPES[p])
        cosine[b, p, h, w] = unit(z) @ unit(PROTOTYPES[p])
    np.testing.assert_allclose(sim.similarity(distances).numpy(), projection, rtol=1e-12)
    np.testing.assert_allclose(distances.numpy(), -projection, rtol=1e-12)
    np.testing.assert_allclose(cost.numpy(), -cosine, rtol=1e-12)
    assert sim.metric == "ip"


def test_projection_similarity_blocks_project_within_the_prototypes_block() -> None:
    sim = ProjectionSimilarity(blocks=2)  # D = 6: channels 0-2 and 3-5 are two embedding spaces
    prototypes = PROTOTYPES.copy()
    prototypes[:3, 3:] = 0  # prototypes 0-2 in block 0
    prototypes[3:, :3] = 0  # prototypes 3-4 in block 1
    features, protos = torch.tensor(FEATURES), torch.tensor(prototypes)
    distances = sim.distances(features, protos)
    cost = sim.cost_distances(features, protos, distances)
    for b, p, h, w in itertools.product(range(2), range(5), range(3), range(4)):
        block = slice(0, 3) if p < 3 else slice(3, 6)
        z, q = FEATURES[b, block, h, w], prototypes[p, block]
        assert -distances[b, p, h, w].item() == pytest.approx(z @ unit(q), rel=1e-12)
        assert -cost[b, p, h, w].item() == pytest.approx(unit(z) @ unit(q), rel=1e-12)
    with pytest.raises(ValueError, match="blocks"):
        ProjectionSimilarity(blocks=4).distances(features, protos)


def test_prototype_layer_pools_projections_for_the_head_and_cosines_for_the_costs() -> None:
    bank = PrototypeBank(5, 6, owners=OWNERS.tolist(), metric="ip")
    layer = PrototypeLayer(bank, ProjectionSimilarity())
    out = layer(torch.rand(3, 6, 4, 4))
    torch.testing.assert_close(out.similarities, out.similarity_maps.flatten(2).max(dim=2).values)
    assert (out.cost_min_distances >= -1 - 1e-6).all() and (out.cost_min_distances <= 1 + 1e-6).all()
    assert not torch.equal(out.cost_min_distances, out.min_distances)
    l2 = PrototypeLayer(PrototypeBank(5, 6, owners=OWNERS.tolist()), L2Similarity())(torch.rand(3, 6, 4, 4))
    assert l2.cost_min_distances is l2.min_distances  # ProtoPNet: the costs read the head's distances
    with pytest.raises(ValueError, match="metric"):
        PrototypeLayer(PrototypeBank(5, 6), ProjectionSimilarity())


def test_orthonormality_cost_by_class() -> None:
    expected = 0.0
    for c in np.unique(OWNERS):
        basis = PROTOTYPES[members(c)]  # (K_c, D)
        expected += np.abs(basis @ basis.T - np.eye(len(basis))).sum()
    value = orthonormality_cost(torch.tensor(PROTOTYPES), torch.tensor(OWNERS))
    assert value.item() == pytest.approx(expected, rel=1e-12)
    orthonormal = torch.eye(6, dtype=torch.float64)[:4]  # two classes of two orthonormal vectors
    assert orthonormality_cost(orthonormal, torch.tensor([0, 0, 1, 1])).item() == pytest.approx(0.0)


def test_subspace_separation_is_the_summed_projection_metric() -> None:
    vectors = unit(PROTOTYPES)
    num_classes = 4  # class 3 has no prototypes: left out
    expected = 0.0
    for i, j in itertools.combinations(range(3), 2):
        projection_i = vectors[members(i)].T @ vectors[members(i)]  # (D, D)
        projection_j = vectors[members(j)].T @ vectors[members(j)]
        expected += np.linalg.norm(projection_i - projection_j, "fro") / math.sqrt(2)
    value = subspace_separation_cost(torch.tensor(vectors), torch.tensor(OWNERS), num_classes)
    assert value.item() == pytest.approx(expected, rel=1e-9)
    same = torch.tensor(np.concatenate([vectors[:2], vectors[:2]]))  # two classes spanning one subspace
    assert subspace_separation_cost(same, torch.tensor([0, 0, 1, 1]), 2).item() < 1e-5


def test_closeness_and_discrimination_over_class_pairs() -> None:
    vectors = unit(PROTOTYPES)
    classes = range(3)
    lowest, highest = [], []
    for i, j in itertools.permutations(classes, 2):
        dots = [vectors[k] @ vectors[m] for k in members(i) for m in members(j)]
        lowest.append(min(dots))
        highest.append(max(dots))
    v, o = torch.tensor(vectors), torch.tensor(OWNERS)
    assert closeness_cost(v, o, 4).item() == pytest.approx(-np.mean(lowest), rel=1e-12)
    assert discrimination_cost(v, o, 4).item() == pytest.approx(np.mean(highest), rel=1e-12)


def test_masked_max_similarity_counts_masked_entries_as_zero() -> None:
    similarities = torch.tensor([[0.5, -0.2, 0.9], [-0.4, -0.3, 0.1]])
    own = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0]])
    # image 0: max(0.5, -0.2, 0) = 0.5; image 1: max(-0.4, -0.3, 0) = 0 (the reference's product mask)
    assert masked_max_similarity(similarities, own).item() == pytest.approx(0.25)
    assert masked_max_similarity(similarities, 1 - own).item() == pytest.approx((0.9 + 0.1) / 2)
