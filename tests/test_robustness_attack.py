"""The L2 PGD attack of benchmarks/robustness.py against a linear classifier's closed-form margins."""

from __future__ import annotations

import torch

from benchmarks.robustness import l2_pgd


def test_l2_pgd_stays_in_the_ball_and_flips_exactly_the_points_within_eps_of_the_boundary():
    torch.manual_seed(0)
    w = torch.tensor([[1.0, -2.0], [-1.0, 2.0]])  # two classes separated by the line x0 - 2 x1 = 0
    x = torch.randn(200, 2)
    labels = (x @ w[0] < 0).long()  # every point correctly classified by logits x @ w.T
    eps = 0.5
    adversarial = l2_pgd(lambda z: z @ w.T, x, labels, eps=eps, steps=20)
    assert ((adversarial - x).norm(dim=1) <= eps + 1e-5).all()
    flipped = (adversarial @ w.T).argmax(1) != labels
    distance = (x @ w[0]).abs() / w[0].norm()  # L2 distance to the boundary
    assert torch.equal(flipped, distance < eps - 1e-3) or torch.equal(flipped, distance <= eps)
