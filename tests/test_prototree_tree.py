"""ProtoTree's soft tree against independent computations: routing probabilities enumerated path by path,
greedy and max-path leaves found by walking the tree, the derivative-free leaf update written out sample by
sample, and pruning on hand-made trees whose result is worked out by hand."""

from __future__ import annotations

import math

import pytest
import torch

from protolib.nn.tree import ExpL2Similarity, PrototypeTree, complete_children


def brute_force_paths(tree: PrototypeTree, similarities: torch.Tensor) -> dict[int, torch.Tensor]:
    """Probability (B,) of reaching every leaf node, by recursion from the root."""
    children = tree.node_children.tolist()
    prototype = tree.node_prototype.tolist()
    reached: dict[int, torch.Tensor] = {}

    def visit(node: int, probability: torch.Tensor) -> None:
        left, right = children[node]
        if left < 0:
            reached[node] = probability
            return
        s = similarities[:, prototype[node]]
        visit(left, probability * (1 - s))
        visit(right, probability * s)

    visit(0, torch.ones(similarities.shape[0], dtype=similarities.dtype))
    return reached


def test_complete_tree_numbers_nodes_in_pre_order() -> None:
    children = complete_children(2)
    # root 0 -> (1, 4); 1 -> leaves (2, 3); 4 -> leaves (5, 6)
    assert children.tolist() == [[1, 4], [2, 3], [-1, -1], [-1, -1], [5, 6], [-1, -1], [-1, -1]]
    tree = PrototypeTree(2, num_classes=3)
    assert (tree.num_prototypes, tree.num_leaves, tree.depth) == (3, 4, 2)
    assert tree.prototype_nodes.tolist() == [0, 1, 4] and tree.leaf_nodes.tolist() == [2, 3, 5, 6]
    assert tree.path_to(5) == [0, 4, 5]
    with pytest.raises(ValueError, match="depth"):
        PrototypeTree(0, num_classes=3)


def test_soft_routing_matches_enumerated_paths() -> None:
    generator = torch.Generator().manual_seed(0)
    tree = PrototypeTree(3, num_classes=4).double()
    tree.leaf_logits.copy_(torch.randn(8, 4, generator=generator, dtype=torch.float64) * 2)
    s = torch.rand(5, 7, generator=generator, dtype=torch.float64)
    out = tree(s)
    reached = brute_force_paths(tree, s)
    expected_paths = torch.stack([reached[n] for n in tree.leaf_nodes.tolist()], dim=1)  # (B, L)
    torch.testing.assert_close(out.path_probabilities, expected_paths)
    torch.testing.assert_close(out.path_probabilities.sum(dim=1), torch.ones(5, dtype=torch.float64))
    leaves = torch.softmax(tree.leaf_logits, dim=1)
    expected = sum(expected_paths[:, i, None] * leaves[i] for i in range(8))
    torch.testing.assert_close(out.probabilities, expected)


def test_greedy_and_max_path_pick_the_walked_and_the_most_probable_leaf() -> None:
    generator = torch.Generator().manual_seed(1)
    tree = PrototypeTree(3, num_classes=4)
    tree.leaf_logits.copy_(torch.randn(8, 4, generator=generator))
    s = torch.rand(16, 7, generator=generator)
    s[0] = 0.5  # exactly 0.5 goes left, as the reference's "> 0.5 goes right"
    children, prototype = tree.node_children.tolist(), tree.node_prototype.tolist()
    walked = []
    for row in s:
        node = 0
        while children[node][0] >= 0:
            node = children[node][1] if row[prototype[node]] > 0.5 else children[node][0]
        walked.append(node)
    assert walked[0] == 3  # left, left, left
    greedy = tree(s, "greedy")
    assert tree.leaf_nodes[greedy.leaves].tolist() == walked
    leaves = torch.softmax(tree.leaf_logits, dim=1)
    torch.testing.assert_close(greedy.probabilities, leaves[greedy.leaves])
    reached = brute_force_paths(tree, s)
    best = [max(reached, key=lambda n: float(reached[n][b])) for b in range(16)]
    max_path = tree(s, "max_path")
    assert tree.leaf_nodes[max_path.leaves].tolist() == best
    with pytest.raises(ValueError, match="strategy"):
        tree(s, "sample")
    with pytest.raises(ValueError, match=r"\(B, 7\)"):
        tree(s[:, :5])


def test_leaf_update_and_its_smoothing_follow_the_formula() -> None:
    generator = torch.Generator().manual_seed(2)
    c = 3
    tree = PrototypeTree(2, num_classes=c).double()
    tree.leaf_logits.copy_(torch.rand(4, c, generator=generator, dtype=torch.float64))
    start = tree.leaf_logits.clone()
    s = torch.rand(6, 3, generator=generator, dtype=torch.float64)
    labels = torch.tensor([0, 2, 1, 1, 0, 2])
    out = tree(s)
    update = tree.leaf_update(out.path_probabilities, out.probabilities, labels)
    leaves = torch.softmax(start, dim=1)
    expected = torch.zeros(4, c, dtype=torch.float64)
    for b, y in enumerate(labels.tolist()):  # sum_x pi_l(x) * softmax(c_l)_y / y_hat_y(x) at the true class
        for leaf in range(4):
            expected[leaf, y] += out.path_probabilities[b, leaf] * leaves[leaf, y] / out.probabilities[b, y]
    torch.testing.assert_close(update, expected)
    # Over one epoch of 3 batches the epoch-start values are subtracted a third at a time (clamped at 0).
    tree.apply_leaf_update(update, start, batches=3)
    torch.testing.assert_close(tree.leaf_logits, (start - start / 3).clamp_min(0) + expected)
    tree.apply_leaf_update(torch.zeros_like(update), start, batches=3)
    tree.apply_leaf_update(torch.zeros_like(update), start, batches=3)
    torch.testing.assert_close(tree.leaf_logits, expected, atol=1e-12, rtol=0)  # start fully replaced
    with pytest.raises(ValueError, match="batches"):
        tree.apply_leaf_update(update, start, batches=0)


def uniform_and_peaked(tree: PrototypeTree, uniform: list[int]) -> None:
    """Leaf logits: uniform (max prob 1/C) for the listed leaves, peaked at class leaf % C otherwise."""
    c = tree.num_classes
    logits = torch.zeros(tree.num_leaves, c)
    for leaf in range(tree.num_leaves):
        if leaf not in uniform:
            logits[leaf, leaf % c] = 5.0
    tree.leaf_logits.copy_(logits)


def test_prune_removes_uninformative_subtrees_with_their_parent() -> None:
    # Depth 3: root 0 -> (1, 8); 1 -> (2, 5); 2 -> leaves (3, 4); 5 -> (6, 7); 8 -> (9, 12); 9 -> (10, 11);
    # 12 -> (13, 14). Leaves in order: 3, 4, 6, 7, 10, 11, 13, 14 (ids 0..7).
    tree = PrototypeTree(3, num_classes=4)
    uniform_and_peaked(tree, uniform=[0, 1, 4])  # the subtree of node 2 (leaves 0, 1) and leaf node 10
    flags = tree.uninformative_nodes(threshold=0.25)
    assert flags.nonzero().flatten().tolist() == [2, 3, 4, 10]
    kept_prototypes, kept_leaves = tree.prune(threshold=0.25)
    # Node 2 goes with its parent 1 (node 5 takes 1's place under the root); leaf 10 goes with its parent 9
    # (leaf 11 takes 9's place under node 8). Remaining: 0 -> (5 -> (6, 7), 8 -> (11, 12 -> (13, 14))).
    assert kept_prototypes.tolist() == [0, 3, 4, 6]  # old prototypes of nodes 0, 5, 8, 12
    assert kept_leaves.tolist() == [2, 3, 5, 6, 7]  # old leaves of nodes 6, 7, 11, 13, 14
    assert tree.node_children.tolist() == [
        [1, 4],
        [2, 3],
        [-1, -1],
        [-1, -1],
        [5, 6],
        [-1, -1],
        [7, 8],
        [-1, -1],
        [-1, -1],
    ]
    assert (tree.num_prototypes, tree.num_leaves, tree.depth) == (4, 5, 3)
    s = torch.rand(3, 4)
    reached = brute_force_paths(tree, s)
    torch.testing.assert_close(
        tree(s).path_probabilities, torch.stack([reached[n] for n in tree.leaf_nodes.tolist()], 1)
    )
    # Pruned trees survive a checkpoint round trip into a fresh (complete) tree.
    fresh = PrototypeTree(3, num_classes=4)
    fresh.load_state_dict(tree.state_dict())
    torch.testing.assert_close(fresh(s).probabilities, tree(s).probabilities)
    assert fresh.leaf_paths.tolist() == tree.leaf_paths.tolist()


def test_prune_never_removes_the_roots_children_and_keeps_informative_trees() -> None:
    tree = PrototypeTree(2, num_classes=4)
    uniform_and_peaked(tree, uniform=[0, 1])  # node 1's whole subtree: its parent is the root
    assert tree.prune(threshold=0.25)[0].tolist() == [0, 1, 2]
    assert tree.num_leaves == 4
    uniform_and_peaked(tree, uniform=[])
    assert tree.prune(threshold=0.01)[1].tolist() == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="threshold"):
        tree.prune(threshold=1.5)


def test_exp_l2_similarity_is_exp_of_the_plain_distance() -> None:
    features = torch.rand(2, 3, 2, 2, dtype=torch.float64)
    prototypes = torch.rand(4, 3, dtype=torch.float64)
    prototypes[0] = features[1, :, 0, 1]
    similarity = ExpL2Similarity()
    distances = similarity.distances(features, prototypes)
    brute = ((features[:, None] - prototypes[None, :, :, None, None]) ** 2).sum(2).add(1e-14).sqrt()
    torch.testing.assert_close(distances, brute)
    assert distances[1, 0, 0, 1] == pytest.approx(1e-7)
    torch.testing.assert_close(
        similarity.similarity(torch.tensor([0.0, 1.0])), torch.tensor([1.0, 1 / math.e])
    )
