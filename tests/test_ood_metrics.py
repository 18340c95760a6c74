"""OOD metrics against scikit-learn (as OpenOOD v1.5 calls it) and against direct threshold computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from protolib.ood.metrics import METRIC_NAMES, ood_metrics, roc_curve


def openood_reference(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict[str, float]:
    """What openood/evaluators/metrics.py computes, written against scikit-learn directly."""
    conf = np.concatenate([id_scores, ood_scores])
    is_ood = np.concatenate([np.zeros(len(id_scores)), np.ones(len(ood_scores))])
    fpr, tpr, _ = skm.roc_curve(is_ood, -conf)
    precision_in, recall_in, _ = skm.precision_recall_curve(1 - is_ood, conf)
    precision_out, recall_out, _ = skm.precision_recall_curve(is_ood, -conf)
    id_fpr, id_tpr, _ = skm.roc_curve(1 - is_ood, conf, drop_intermediate=False)
    return {
        "auroc": skm.roc_auc_score(1 - is_ood, conf),
        "aupr_in": skm.auc(recall_in, precision_in),
        "aupr_out": skm.auc(recall_out, precision_out),
        "fpr95": id_fpr[np.argmax(id_tpr >= 0.95)],
        "fpr95_ood_positive": fpr[np.argmax(tpr >= 0.95)],
    }


def direct_fpr95(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Fraction of OOD accepted at the highest threshold accepting >= 95% of ID (accept = score >= t)."""
    candidates = [t for t in np.unique(id_scores) if np.mean(id_scores >= t) >= 0.95]
    return float(np.mean(ood_scores >= max(candidates)))


def direct_fpr95_ood_positive(id_scores: np.ndarray, ood_scores: np.ndarray) -> float:
    """Fraction of ID rejected at the lowest threshold rejecting >= 95% of OOD (reject = score <= t)."""
    candidates = [t for t in np.unique(ood_scores) if np.mean(ood_scores <= t) >= 0.95]
    return float(np.mean(id_scores <= min(candidates)))


CASES = [
    (np.random.default_rng(0).normal(1.0, 1.0, 200), np.random.default_rng(1).normal(0.0, 1.0, 150)),
    (np.random.default_rng(2).normal(0.5, 1.0, 37), np.random.default_rng(3).normal(0.0, 2.0, 91)),
    # heavy ties: scores rounded to one decimal, and a block of saturated scores shared by ID and OOD
    (
        np.round(np.random.default_rng(4).normal(1, 1, 120), 1),
        np.round(np.random.default_rng(5).normal(0, 1, 80), 1),
    ),
    (np.r_[np.ones(60), np.linspace(0, 0.9, 40)], np.r_[np.ones(10), np.linspace(0, 0.5, 90)]),
]


@pytest.mark.parametrize(("id_scores", "ood_scores"), CASES)
def test_every_metric_matches_scikit_learn_as_openood_uses_it(
    id_scores: np.ndarray, ood_scores: np.ndarray
) -> None:
    ours = ood_metrics(id_scores, ood_scores)
    reference = openood_reference(id_scores, ood_scores)
    assert set(ours) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert ours[name] == pytest.approx(reference[name], abs=1e-12), name


@pytest.mark.parametrize(("id_scores", "ood_scores"), CASES)
def test_fpr95_matches_a_direct_threshold_computation(id_scores: np.ndarray, ood_scores: np.ndarray) -> None:
    assert ood_metrics(id_scores, ood_scores)["fpr95"] == pytest.approx(direct_fpr95(id_scores, ood_scores))


def test_fpr95_ood_positive_matches_direct_threshold_without_ties() -> None:
    id_scores, ood_scores = CASES[0]
    expected = direct_fpr95_ood_positive(id_scores, ood_scores)
    assert ood_metrics(id_scores, ood_scores)["fpr95_ood_positive"] == pytest.approx(expected)


def test_hand_computed_example() -> None:
    # 20 ID scores 1..20, OOD scores 0.5, 2.5, ..., 9.5 (10 values)
    id_scores = np.arange(1, 21, dtype=float)
    ood_scores = np.arange(10, dtype=float) + 0.5
    result = ood_metrics(id_scores, ood_scores)
    # 95% of 20 ID = 19 accepted -> threshold 2 -> OOD >= 2: 2.5..9.5 = 8 of 10
    assert result["fpr95"] == pytest.approx(0.8)
    # catching 95% of 10 OOD needs all 10 -> reject <= 9.5 -> ID 1..9 rejected = 9 of 20
    assert result["fpr95_ood_positive"] == pytest.approx(0.45)
    # AUROC = P(id > ood): for OOD k + 0.5 (k = 0..9), 20 - k ID scores are larger
    assert result["auroc"] == pytest.approx(sum(20 - k for k in range(10)) / 200)


def test_conventions_differ_and_swap_under_role_reversal() -> None:
    id_scores, ood_scores = CASES[1]
    forward = ood_metrics(id_scores, ood_scores)
    reverse = ood_metrics(-ood_scores, -id_scores)  # OOD treated as ID with negated scores
    assert forward["fpr95"] == pytest.approx(reverse["fpr95_ood_positive"])
    assert forward["aupr_in"] == pytest.approx(reverse["aupr_out"])
    assert forward["auroc"] == pytest.approx(reverse["auroc"])


def test_constant_scores_are_uninformative() -> None:
    result = ood_metrics(np.full(30, 0.7), np.full(10, 0.7))
    assert result["auroc"] == 0.5
    assert result["fpr95"] == 1.0 and result["fpr95_ood_positive"] == 1.0
    # one tie group: precision = 30/40 at recall 1, joined to (recall 0, precision 1)
    assert result["aupr_in"] == pytest.approx((1.0 + 0.75) / 2)
    assert result["aupr_out"] == pytest.approx((1.0 + 0.25) / 2)


def test_perfect_separation() -> None:
    result = ood_metrics([3.0, 4.0, 5.0], torch.tensor([0.0, 1.0]))
    assert result == {"auroc": 1.0, "aupr_in": 1.0, "aupr_out": 1.0, "fpr95": 0.0, "fpr95_ood_positive": 0.0}


@pytest.mark.parametrize(
    ("id_scores", "ood_scores", "message"),
    [
        ([1.0, float("nan")], [0.0], "id_scores has 1 NaN"),
        ([1.0], [0.0, float("inf")], "ood_scores has 0 NaN and 1 infinite"),
        ([], [0.0], "id_scores is empty"),
        ([1.0], np.zeros(0), "ood_scores is empty"),
        (np.ones((2, 3)), [0.0], "1-D"),
    ],
)
def test_bad_input_raises_clear_errors(id_scores: object, ood_scores: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        ood_metrics(id_scores, ood_scores)


def test_roc_curve_matches_scikit_learn() -> None:
    id_scores, ood_scores = CASES[2]
    fpr, tpr = roc_curve(id_scores, ood_scores)
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    ref_fpr, ref_tpr, _ = skm.roc_curve(labels, np.r_[id_scores, ood_scores], drop_intermediate=False)
    np.testing.assert_allclose(fpr, ref_fpr)
    np.testing.assert_allclose(tpr, ref_tpr)
