"""PALM pieces against independent computations: Sinkhorn, assignment, losses, EMA, CIFAR ResNet."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from protolib.lit.palm import PALMModule, warmup_cosine
from protolib.losses.palm import palm_mle_loss, prototype_contrastive_loss
from protolib.models.palm import PALMNet
from protolib.nn.assignment import prototype_assignment, sinkhorn_knopp
from protolib.nn.backbones import build_backbone
from protolib.nn.cifar_resnet import cifar_resnet


def numpy_sinkhorn(similarity: np.ndarray, epsilon: float, iterations: int) -> np.ndarray:
    """The reference code's linear-domain Sinkhorn-Knopp, in float64 numpy."""
    q = np.exp(similarity / epsilon).T  # (P, N)
    q /= q.sum()
    num_protos, num_samples = q.shape
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= num_protos
        q /= q.sum(axis=0, keepdims=True)
        q /= num_samples
    return (q * num_samples).T  # (N, P)


def unit(rows: int, dim: int, seed: int) -> torch.Tensor:
    return F.normalize(torch.randn(rows, dim, generator=torch.Generator().manual_seed(seed)), dim=1)


# --- Sinkhorn-Knopp -------------------------------------------------------------------------------
def test_sinkhorn_by_hand_balances_prototypes() -> None:
    # both samples prefer prototype 0, but one balanced iteration splits every sample's mass evenly
    similarity = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert torch.allclose(sinkhorn_knopp(similarity, epsilon=1.0, iterations=1), torch.full((2, 2), 0.5))
    # symmetric case: [[e, 1], [1, e]] / (1 + e) after one iteration
    e = math.e
    expected = torch.tensor([[e, 1.0], [1.0, e]]) / (1 + e)
    got = sinkhorn_knopp(torch.eye(2), epsilon=1.0, iterations=1)
    assert torch.allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize(("epsilon", "iterations"), [(0.05, 3), (0.5, 1), (0.1, 10)])
def test_sinkhorn_matches_numpy_reference(epsilon: float, iterations: int) -> None:
    similarity = unit(12, 8, 0) @ unit(9, 8, 1).T  # (N, P) cosine
    got = sinkhorn_knopp(similarity, epsilon=epsilon, iterations=iterations)
    expected = numpy_sinkhorn(similarity.double().numpy(), epsilon, iterations)
    np.testing.assert_allclose(got.numpy(), expected, rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(got.sum(dim=1).numpy(), np.ones(12), atol=1e-5)


def test_sinkhorn_does_not_overflow_where_exp_would() -> None:
    similarity = torch.tensor([[1.0, -1.0, 0.5], [0.9, 0.2, -0.3]])
    q = sinkhorn_knopp(similarity, epsilon=0.001, iterations=3)  # exp(1000) is inf in float32
    assert torch.isfinite(q).all()
    assert torch.allclose(q.sum(dim=1), torch.ones(2), atol=1e-5)


def test_sinkhorn_rejects_bad_arguments() -> None:
    with pytest.raises(ValueError, match="similarity must be"):
        sinkhorn_knopp(torch.zeros(3))
    with pytest.raises(ValueError, match="epsilon"):
        sinkhorn_knopp(torch.zeros(2, 2), epsilon=0.0)


# --- assignment -----------------------------------------------------------------------------------
def test_assignment_sums_to_one_over_own_class_and_zero_elsewhere() -> None:
    owners = torch.arange(3).repeat_interleave(4)  # 3 classes x 4 prototypes
    labels = torch.tensor([0, 1, 2, 2, 1, 0, 0])
    weights = prototype_assignment(unit(7, 5, 2) @ unit(12, 5, 3).T, labels, owners, topk=None)
    in_class = labels[:, None] == owners[None, :]
    assert torch.allclose(weights.sum(dim=1), torch.ones(7), atol=1e-6)
    assert (weights[~in_class] == 0).all()
    assert (weights[in_class] > 0).all()


@pytest.mark.parametrize("topk", [1, 3, 6])
def test_pruning_keeps_topk_of_the_sinkhorn_weights(topk: int) -> None:
    owners = torch.arange(2).repeat_interleave(6)  # 2 classes x 6 prototypes
    labels = torch.tensor([0, 1, 1, 0, 1])
    similarity = unit(5, 4, 4) @ unit(12, 4, 5).T
    weights = prototype_assignment(similarity, labels, owners, epsilon=0.05, iterations=3, topk=topk)
    assert ((weights > 0).sum(dim=1) == topk).all()
    # independent: numpy Sinkhorn, mask to class, keep the k largest, renormalise
    q = numpy_sinkhorn(similarity.double().numpy(), 0.05, 3)
    q[labels.numpy()[:, None] != owners.numpy()[None, :]] = 0
    for row in q:
        row[np.argsort(-row)[topk:]] = 0
    q /= q.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(weights.numpy(), q, rtol=1e-4, atol=1e-7)


def test_assignment_rejects_labels_without_prototypes() -> None:
    owners = torch.tensor([0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"classes \[2\] own no prototype"):
        prototype_assignment(torch.zeros(2, 4), torch.tensor([0, 2]), owners)
    with pytest.raises(ValueError, match="topk"):
        prototype_assignment(torch.zeros(2, 4), torch.tensor([0, 1]), owners, topk=0)


# --- losses ---------------------------------------------------------------------------------------
def test_mle_loss_by_hand() -> None:
    z = torch.tensor([[1.0, 0.0]])
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0]])  # logits at t=0.5: 2, 0, -2
    weights = torch.tensor([[0.75, 0.25, 0.0]])
    normaliser = math.log(math.exp(2) + 1 + math.exp(-2))
    paper = normaliser - math.log(0.75 * math.exp(2) + 0.25)
    reference = normaliser - (0.75 * 2 + 0.25 * 0)
    assert palm_mle_loss(z, prototypes, weights, 0.5, "paper").item() == pytest.approx(paper, rel=1e-6)
    assert palm_mle_loss(z, prototypes, weights, 0.5, "reference").item() == pytest.approx(
        reference, rel=1e-6
    )


def test_mle_loss_brute_force_and_jensen() -> None:
    z, prototypes = unit(4, 3, 6), unit(6, 3, 7)
    weights = torch.softmax(torch.randn(4, 6, generator=torch.Generator().manual_seed(8)), dim=1)
    weights[:, 3:] = 0
    weights /= weights.sum(dim=1, keepdim=True)
    t = 0.1
    paper, reference = 0.0, 0.0
    for i in range(4):
        logits = [float(z[i] @ prototypes[j]) / t for j in range(6)]
        log_norm = math.log(sum(math.exp(v) for v in logits))
        paper += log_norm - math.log(sum(float(weights[i, j]) * math.exp(logits[j]) for j in range(6)))
        reference += log_norm - sum(float(weights[i, j]) * logits[j] for j in range(6))
    got_paper = palm_mle_loss(z, prototypes, weights, t, "paper").item()
    got_reference = palm_mle_loss(z, prototypes, weights, t, "reference").item()
    assert got_paper == pytest.approx(paper / 4, rel=1e-5)
    assert got_reference == pytest.approx(reference / 4, rel=1e-5)
    assert got_reference >= got_paper  # Jensen: the reference form bounds the paper's loss from above


def test_prototype_contrastive_loss_by_hand() -> None:
    # four unit vectors at right angles; class 0 = {p0, p1}, class 1 = {p2, p3}; logits p.q / 0.5
    prototypes = torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, -1.0]])
    owners = torch.tensor([0, 0, 1, 1])
    # every prototype: positive logit 0, others {0, -2, 0} (its class mate, its opposite, the last one)
    expected = math.log(2 + math.exp(-2)) - 0.0
    for form in ("paper", "reference"):
        got = prototype_contrastive_loss(prototypes, owners, temperature=0.5, form=form)
        assert got.item() == pytest.approx(expected, rel=1e-6)


def test_prototype_contrastive_loss_brute_force_forms_differ() -> None:
    prototypes, owners, t = unit(6, 3, 9), torch.tensor([0, 0, 0, 1, 1, 1]), 0.5
    paper, reference = 0.0, 0.0
    for a in range(6):
        others = [b for b in range(6) if b != a]
        positives = [b for b in others if owners[b] == owners[a]]
        logit = {b: float(prototypes[a] @ prototypes[b]) / t for b in others}
        log_norm = math.log(sum(math.exp(logit[b]) for b in others))
        paper += log_norm - math.log(sum(math.exp(logit[b]) for b in positives))
        reference += log_norm - sum(logit[b] for b in positives) / len(positives)
    got_paper = prototype_contrastive_loss(prototypes, owners, t, "paper").item()
    got_reference = prototype_contrastive_loss(prototypes, owners, t, "reference").item()
    assert got_paper == pytest.approx(paper / 6, rel=1e-5)
    assert got_reference == pytest.approx(reference / 6, rel=1e-5)
    assert got_paper != pytest.approx(got_reference, rel=1e-3)


def test_single_prototype_classes_give_dispersion_with_finite_gradient() -> None:
    prototypes = unit(3, 4, 10).requires_grad_(True)
    owners = torch.tensor([0, 1, 2])  # no class has a second prototype: no positives
    loss = prototype_contrastive_loss(prototypes, owners, 0.5, "paper")
    logits = prototypes.detach() @ prototypes.detach().T / 0.5
    expected = torch.stack([torch.logsumexp(logits[i][torch.arange(3) != i], 0) for i in range(3)]).mean()
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    loss.backward()
    assert torch.isfinite(prototypes.grad).all()


def test_losses_reject_bad_input() -> None:
    with pytest.raises(ValueError, match="form"):
        palm_mle_loss(unit(2, 3, 0), unit(4, 3, 1), torch.full((2, 4), 0.25), form="nope")
    with pytest.raises(ValueError, match="weights must be"):
        palm_mle_loss(unit(2, 3, 0), unit(4, 3, 1), torch.full((2, 3), 0.25))
    with pytest.raises(ValueError, match="owners must be"):
        prototype_contrastive_loss(unit(4, 3, 1), torch.tensor([0, 1]))


# --- CIFAR ResNet ---------------------------------------------------------------------------------
@pytest.mark.parametrize(("depth", "parameters"), [(18, 11_168_832), (34, 21_276_992)])
def test_cifar_resnet_shapes_and_size(depth: int, parameters: int) -> None:
    # torchvision's ResNet minus its fc layer, with the 7x7 stem conv replaced by a 3x3 one
    net = cifar_resnet(depth)
    assert net.out_channels == 512
    assert sum(p.numel() for p in net.parameters()) == parameters
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 3, 32, 32)).shape == (2, 512, 4, 4)


def test_cifar_resnet_through_build_backbone() -> None:
    net = build_backbone("cifar_resnet18", in_chans=1, pooled=True)
    assert net.out_channels == 512
    with torch.no_grad():
        assert net.eval()(torch.randn(2, 1, 16, 16)).shape == (2, 512)
    with pytest.raises(ValueError, match="depth 50"):
        cifar_resnet(50)


# --- prototypes (EMA on the bank), the module's outputs, the schedule -----------------------------
def small_net(momentum: float = 0.5, **kwargs: Any) -> PALMNet:
    torch.manual_seed(0)
    defaults = {"prototypes_per_class": 3, "topk": 2, "embedding_dim": 4, "momentum": momentum}
    return PALMNet(2, in_channels=1, backbone="small_cnn", **{**defaults, **kwargs})


def test_ema_keeps_unit_norm_and_moves_toward_assigned_samples() -> None:
    net = small_net(momentum=0.5)
    z, labels = unit(10, 4, 11), torch.tensor([0, 1] * 5)
    old = net.bank.vectors.clone()
    weights = net.assign(z, labels)
    new = net.update_prototypes(z, weights)
    assert torch.equal(new.detach(), net.bank.vectors)
    assert torch.allclose(net.bank.vectors.norm(dim=1), torch.ones(6), atol=1e-6)
    for p in range(6):  # by hand: normalize(m p + (1 - m) weighted mean of the samples assigned to p)
        mass = float(weights[:, p].sum())
        if mass == 0:
            assert torch.equal(net.bank.vectors[p], old[p])
            continue
        target = sum(float(weights[i, p]) * z[i] for i in range(10)) / mass
        expected = F.normalize(0.5 * old[p] + 0.5 * target, dim=0)
        assert torch.allclose(net.bank.vectors[p], expected, atol=1e-6)
        assert F.cosine_similarity(net.bank.vectors[p], target, dim=0) > F.cosine_similarity(
            old[p], target, dim=0
        )
    assert (weights.sum(dim=0) > 0).sum() >= 4  # Sinkhorn spreads the samples over most prototypes


def test_contrastive_loss_trains_the_embedding_through_the_ema_step() -> None:
    net = small_net()
    z = unit(10, 4, 12).requires_grad_(True)
    prototypes = net.update_prototypes(z, net.assign(z, torch.tensor([0, 1] * 5)))
    prototype_contrastive_loss(prototypes, net.bank.owners).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0


def test_module_outputs_follow_the_ood_contract() -> None:
    torch.manual_seed(0)
    module = PALMModule(PALMNet(3, in_channels=1, backbone="small_cnn", prototypes_per_class=2, topk=1))
    out = module.eval().extract(torch.randn(5, 1, 16, 16))
    assert out["features"].shape == (5, 64) and out["embedding"].shape == (5, 128)
    assert torch.allclose(out["embedding"].norm(dim=1), torch.ones(5), atol=1e-5)
    similarity = out["embedding"] @ module.prototype_bank.vectors.T
    assert torch.allclose(out["prototype_similarity"], similarity, atol=1e-6)
    expected = torch.stack(
        [torch.logsumexp(similarity[:, 2 * c : 2 * c + 2] / 0.1, dim=1) for c in range(3)], 1
    )
    assert torch.allclose(out["logits"], expected, atol=1e-4)
    assert module.last_layer is None and module.prototype_bank is module.net.bank
    assert not [k for k in module.state_dict() if k.startswith("prototype_bank.")]  # one copy of the bank


def test_module_rejects_bad_settings() -> None:
    with pytest.raises(ValueError, match="topk=7"):
        PALMNet(3, backbone="small_cnn", prototypes_per_class=6, topk=7)
    with pytest.raises(ValueError, match="loss_form"):
        PALMModule(PALMNet(3, backbone="small_cnn"), loss_form="code")


def test_warmup_cosine_schedule_matches_the_reference_formula() -> None:
    base_lr, total, warmup = 0.5, 200, 20
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base_lr)
    schedule = warmup_cosine(optimizer, total_steps=total, warmup_fraction=0.1, final_lr_factor=1e-3)
    for step in range(total):
        if step < warmup:
            expected = base_lr * step / warmup
        else:
            q = 0.5 * (1 + math.cos(math.pi * (step - warmup) / (total - warmup)))
            expected = base_lr * q + base_lr * 1e-3 * (1 - q)
        assert optimizer.param_groups[0]["lr"] == pytest.approx(expected, rel=1e-9, abs=1e-12)
        optimizer.step()
        schedule.step()
