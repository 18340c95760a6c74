"""Deep CBC / RBF heads and losses on fixed small tensors, against the paper's formulas written out here.

The same tensors were run through the reference (si-cim/cbc-aaai-2025 ``SlimClassificationByComponents``,
``MarginLoss``, ``NonNegLinear(softmax_pool=True)`` + NLL of ``log_softmax(log1p(out ** 2))``) on CPU: equal.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from protolib.losses.cbc import margin_loss, rbf_cross_entropy
from protolib.nn.heads import CBCHead, RBFHead

K, C = 5, 3


def softmax(x: np.ndarray, axis: int) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def test_cbc_head_is_positive_and_negative_reasoning_over_detections():
    torch.manual_seed(0)
    head = CBCHead(K, C)
    d = torch.rand(4, K)
    r = softmax(head.reasoning.detach().numpy(), axis=0)  # one softmax over all 2K entries per class
    positive, negative = r[:K], r[K:]
    dn = d.numpy()
    expected = np.einsum("bk,kc->bc", dn, positive) + np.einsum("bk,kc->bc", 1 - dn, negative)
    np.testing.assert_allclose(head(d).detach().numpy(), expected, rtol=1e-5)
    assert ((head(d) >= 0) & (head(d) <= 1)).all()
    # All components detected: the positive reasoning mass; none: the negative one.
    np.testing.assert_allclose(head(torch.ones(1, K)).detach().numpy()[0], positive.sum(0), rtol=1e-5)
    np.testing.assert_allclose(head(torch.zeros(1, K)).detach().numpy()[0], negative.sum(0), rtol=1e-5)
    np.testing.assert_allclose(head.weight.detach().numpy(), (positive - negative).T, rtol=1e-5)


def test_rbf_head_is_a_convex_combination_and_its_loss_the_log1p_cross_entropy():
    torch.manual_seed(1)
    head = RBFHead(K, C)
    d = torch.rand(4, K)
    w = softmax(head.raw_weight.detach().numpy(), axis=1)  # (C, K), rows sum to 1
    scores = d.numpy() @ w.T
    np.testing.assert_allclose(head(d).detach().numpy(), scores, rtol=1e-5)
    labels = torch.tensor([0, 2, 1, 1])
    logits = np.log1p(scores**2)
    ce = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(4), labels.numpy()])
    assert rbf_cross_entropy(head(d), labels).item() == pytest.approx(ce, rel=1e-5)


def test_margin_loss():
    p = torch.tensor([[0.6, 0.3, 0.1], [0.2, 0.5, 0.49], [0.1, 0.8, 0.1]])
    labels = torch.tensor([0, 2, 2])
    # sample 0: 0.3 - 0.6 + m < 0 -> 0; sample 1: 0.5 - 0.49 + m; sample 2: 0.8 - 0.1 + m
    expected = (0.0 + (0.5 - 0.49 + 0.025) + (0.8 - 0.1 + 0.025)) / 3
    assert margin_loss(p, labels, 0.025).item() == pytest.approx(expected, rel=1e-6)
