"""MoE block: routing, gates, dispatch and losses against naive per-token computations written out here."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protolib.bank import PrototypeBank
from protolib.nn.moe import (
    MoEMLP,
    PrototypeRouter,
    SoftmaxRouter,
    expert_share,
    load_balancing_loss,
    normalized_entropy,
    routing_contrastive_loss,
    sort_by_expert,
)


def naive_moe(block: MoEMLP, tokens: torch.Tensor) -> torch.Tensor:
    """Token by token, choice by choice: sum_j gate_j * expert_j(x) (unless dropped) + shared(x)."""
    routing = block.routing
    gelu = torch.nn.GELU()
    rows = []
    for i in range(tokens.shape[0]):
        out = torch.zeros(block.dim)
        for j in range(block.top_k):
            if not routing.kept[i, j]:
                continue
            e = int(routing.experts[i, j])
            h = gelu(tokens[i] @ block.w1[e] + block.b1[e])
            out = out + routing.gates[i, j] * (h @ block.w2[e] + block.b2[e])
        if block.shared is not None:
            out = out + block.shared.fc2(gelu(block.shared.fc1(tokens[i])))
        rows.append(out)
    return torch.stack(rows)


def test_prototype_router_scores_gates_and_init() -> None:
    torch.manual_seed(0)
    router = PrototypeRouter(dim=6, num_experts=4, top_k=2, alpha=3.0)
    assert router.bank.owners.tolist() == [0, 1, 2, 3] and router.bank.metric == "cosine"
    big = PrototypeRouter(dim=256, num_experts=64)
    assert abs(float(big.bank.vectors.detach().std()) - 0.02) < 0.002  # N(0, 0.02) init, not unit vectors
    x = torch.randn(5, 6)
    routing = router(x)
    p = router.bank.vectors.detach().numpy()
    cos = (x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)) @ (
        p / np.linalg.norm(p, axis=1, keepdims=True)
    ).T
    expected_experts = np.argsort(-cos, axis=1)[:, :2]
    assert np.array_equal(routing.experts.numpy(), expected_experts)
    # identity gating: the gate is alpha * cosine of the chosen prototype itself
    np.testing.assert_allclose(
        routing.gates.detach().numpy(), 3.0 * np.take_along_axis(cos, expected_experts, 1), atol=1e-6
    )
    assert set(routing.losses) == {"routing_contrastive"}  # no load-balancing loss by default


def test_softmax_router_gates_and_balance_loss() -> None:
    torch.manual_seed(1)
    router = SoftmaxRouter(dim=4, num_experts=3, top_k=2)
    x = torch.randn(6, 4)
    routing = router(x)
    logits = x.numpy() @ router.linear.weight.detach().numpy().T
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    top = np.argsort(-probs, axis=1)[:, :2]
    chosen = np.take_along_axis(probs, top, 1)
    np.testing.assert_allclose(
        routing.gates.detach().numpy(), chosen / chosen.sum(1, keepdims=True), atol=1e-6
    )
    share = np.bincount(top.ravel(), minlength=3) / top.size
    expected = 0.01 * 3 * (share * probs.mean(0)).sum()
    np.testing.assert_allclose(routing.losses["load_balance"].item(), expected, rtol=1e-5)
    top1 = SoftmaxRouter(dim=4, num_experts=3, top_k=1)(x)  # Switch: the gate is the probability itself
    np.testing.assert_allclose(
        top1.gates.detach().numpy()[:, 0], top1.scores.max(1).values.detach(), atol=1e-7
    )


def test_load_balancing_loss_bounds() -> None:
    uniform = torch.full((8, 4), 0.25)
    balanced = torch.arange(8).remainder(4)[:, None]
    assert float(load_balancing_loss(uniform, balanced)) == pytest.approx(1.0)
    collapsed_probs = torch.tensor([[1.0, 0.0, 0.0, 0.0]]).expand(8, 4)
    assert float(load_balancing_loss(collapsed_probs, torch.zeros(8, 1, dtype=torch.long))) == pytest.approx(
        4.0
    )


def test_routing_contrastive_loss_matches_reference_formula() -> None:
    torch.manual_seed(2)
    tokens, prototypes = torch.randn(10, 5), torch.randn(4, 5)
    experts = torch.tensor([[0], [0], [2], [2], [2], [3], [0], [3], [2], [0]])  # expert 1 unused
    loss = routing_contrastive_loss(tokens, experts, prototypes, temperature=0.07)
    used = [0, 2, 3]
    means = np.stack([tokens.numpy()[experts.numpy()[:, 0] == e].mean(0) for e in used])
    p = prototypes.numpy()[used]
    sim = (p / np.linalg.norm(p, axis=1, keepdims=True)) @ (
        means / np.linalg.norm(means, axis=1, keepdims=True)
    ).T
    logits = sim / 0.07
    log_softmax = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    assert float(loss) == pytest.approx(-np.mean(np.diag(log_softmax)), rel=1e-5)
    # top-k: a token counts towards every expert it chose
    two = torch.tensor([[0, 1], [1, 0], [1, 2]])
    m0, m1, m2 = tokens[:2].mean(0), tokens[:3].mean(0), tokens[2]
    means2 = F.normalize(torch.stack([m0, m1, m2]), dim=1)
    logits2 = F.normalize(prototypes[:3], dim=1) @ means2.T / 0.5
    expected2 = F.cross_entropy(logits2, torch.arange(3))
    assert float(routing_contrastive_loss(tokens[:3], two, prototypes, 0.5)) == pytest.approx(
        float(expected2)
    )
    one_expert = routing_contrastive_loss(tokens, torch.zeros(10, 1, dtype=torch.long), prototypes, 0.07)
    assert float(one_expert) == 0.0


def test_sort_by_expert_groups_and_caps() -> None:
    experts = torch.tensor([[1, 0], [1, 2], [1, 0], [0, 1]])  # N=4, k=2
    order, counts, kept = sort_by_expert(experts, 3)
    flat = experts.T.reshape(-1)
    assert flat[order].tolist() == sorted(flat.tolist()) and counts.tolist() == [3, 4, 1]
    assert kept.all()
    order, counts, kept = sort_by_expert(experts, 3, capacity=2)
    # expert 1: first choices of tokens 0, 1 win; token 2's first choice and token 3's second are dropped;
    # expert 0: token 3's first choice, then token 0's second choice (first choices come first)
    assert counts.tolist() == [2, 2, 1]
    assert kept.tolist() == [[True, True], [True, True], [False, False], [True, False]]


@pytest.mark.parametrize(
    "router",
    [
        functools.partial(PrototypeRouter, top_k=1),
        functools.partial(PrototypeRouter, top_k=2, alpha=2.0),
        functools.partial(SoftmaxRouter, top_k=2, capacity_factor=0.5),
        functools.partial(SoftmaxRouter, top_k=1, capacity_factor=None),
    ],
)
def test_moe_forward_and_backward_match_naive(router: functools.partial) -> None:
    torch.manual_seed(3)
    block = MoEMLP(dim=8, num_experts=4, expert_hidden=6, num_shared=2, shared_hidden=3, router=router)
    with torch.no_grad():  # non-zero biases so that they are checked too
        block.b1.normal_()
        block.b2.normal_()
    x = torch.randn(2, 5, 8, requires_grad=True)
    out = block(x)
    assert out.shape == x.shape
    expected = naive_moe(block, x.reshape(-1, 8)).view_as(x)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    if router.func is SoftmaxRouter and router.keywords["capacity_factor"] == 0.5:
        cap = math.ceil(0.5 * 10 * 2 / 4)
        assert not block.routing.kept.all()
        kept_experts = block.routing.experts[block.routing.kept]
        assert torch.bincount(kept_experts, minlength=4).max() <= cap
    grads = torch.autograd.grad(out.square().sum(), [block.w1, block.w2, x], retain_graph=True)
    naive_grads = torch.autograd.grad(expected.square().sum(), [block.w1, block.w2, x])
    for got, want in zip(grads, naive_grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)


def test_prototype_gradients_reach_the_bank() -> None:
    torch.manual_seed(4)
    block = MoEMLP(dim=8, num_experts=3, num_shared=0)
    out = block(torch.randn(12, 8))
    total = out.sum() + sum(block.routing.losses.values())
    total.backward()
    assert block.router.bank.vectors.grad is not None and block.router.bank.vectors.grad.abs().sum() > 0
    assert block.active_hidden == 16


def test_bad_input_errors() -> None:
    with pytest.raises(ValueError, match="top_k=3 must be between 1 and num_experts=2"):
        MoEMLP(dim=4, num_experts=2, router=functools.partial(PrototypeRouter, top_k=3))
    with pytest.raises(ValueError, match="at least one expert"):
        MoEMLP(dim=4, num_experts=0)
    with pytest.raises(ValueError, match="at least one expert"):
        SoftmaxRouter(dim=4, num_experts=0)
    block = MoEMLP(dim=4, num_experts=2)
    with pytest.raises(ValueError, match=r"dimension 4.*embed_dim"):
        block(torch.randn(3, 5))
    with pytest.raises(ValueError, match="learnable=True"):
        PrototypeRouter(dim=4, num_experts=2, bank=functools.partial(PrototypeBank, learnable=False))
    with pytest.raises(ValueError, match="capacity_factor"):
        SoftmaxRouter(dim=4, num_experts=2, capacity_factor=0)


def test_expert_share_and_normalized_entropy() -> None:
    share = expert_share(torch.tensor([[0, 0], [1, 3]]), 4)
    assert share.tolist() == [0.5, 0.25, 0.0, 0.25]
    expected = -(0.5 * np.log(0.5) + 2 * 0.25 * np.log(0.25)) / np.log(4)
    assert float(normalized_entropy(share)) == pytest.approx(expected)
    assert float(normalized_entropy(torch.full((8,), 1 / 8))) == pytest.approx(1.0)
    assert float(normalized_entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0
