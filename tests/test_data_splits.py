"""Split helpers: partitions, fractions, stratification and seed determinism."""

import numpy as np
import pytest
import torch

from protolib.data.splits import labelled_unlabelled_split, split_classes, stratified_split


@pytest.fixture
def targets() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 6, size=500)


def test_stratified_split_partitions_and_keeps_class_fractions(targets):
    rest, held = stratified_split(targets, 0.3, seed=1)
    assert np.intersect1d(rest, held).size == 0
    assert np.array_equal(np.sort(np.concatenate([rest, held])), np.arange(len(targets)))
    for c in range(6):
        n = (targets == c).sum()
        assert abs((targets[held] == c).sum() - 0.3 * n) <= 0.5


def test_stratified_split_is_seeded_and_per_class_independent(targets):
    a = stratified_split(targets, 0.3, seed=1)[1]
    assert np.array_equal(a, stratified_split(torch.as_tensor(targets), 0.3, seed=1)[1])
    assert not np.array_equal(a, stratified_split(targets, 0.3, seed=2)[1])
    # dropping other classes does not change which samples of class 0 are held
    keep = np.flatnonzero(targets <= 1)
    sub_held = keep[stratified_split(targets[keep], 0.3, seed=1)[1]]
    assert np.array_equal(
        np.intersect1d(sub_held, np.flatnonzero(targets == 0)),
        np.intersect1d(a, np.flatnonzero(targets == 0)),
    )


def test_split_classes_random_and_explicit():
    id_classes, held = split_classes(10, 3, seed=0)
    assert len(held) == 3 and len(id_classes) == 7
    assert sorted(id_classes + held) == list(range(10))
    assert split_classes(10, 3, seed=0) == (id_classes, held)
    assert any(split_classes(10, 3, seed=s)[1] != held for s in range(1, 5))
    assert split_classes(5, held_out=[4, 1]) == ([0, 2, 3], [1, 4])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({}, "exactly one"),
        ({"num_held_out": 2, "held_out": [1]}, "exactly one"),
        ({"num_held_out": 5}, "num_held_out"),
        ({"held_out": [7]}, "do not exist"),
        ({"held_out": [1, 1]}, "twice"),
        ({"held_out": [0, 1, 2, 3, 4]}, "each side"),
    ],
)
def test_split_classes_rejects_bad_requests(kwargs, message):
    with pytest.raises(ValueError, match=message):
        split_classes(5, **kwargs)


def test_labelled_unlabelled_split_matches_gcd_protocol(targets):
    known = [0, 2, 4]
    labelled, unlabelled = labelled_unlabelled_split(targets, known, 0.5, seed=3)
    assert np.intersect1d(labelled, unlabelled).size == 0
    assert np.array_equal(np.sort(np.concatenate([labelled, unlabelled])), np.arange(len(targets)))
    assert set(targets[labelled]) <= set(known)
    for c in range(6):
        n = (targets == c).sum()
        expected = np.floor(0.5 * n + 0.5) if c in known else 0
        assert (targets[labelled] == c).sum() == expected
    assert np.array_equal(labelled, labelled_unlabelled_split(targets, known, 0.5, seed=3)[0])
    assert not np.array_equal(labelled, labelled_unlabelled_split(targets, known, 0.5, seed=4)[0])


def test_labelled_unlabelled_split_rejects_bad_input(targets):
    with pytest.raises(ValueError, match="labelled_fraction"):
        labelled_unlabelled_split(targets, [0], 0.0)
    with pytest.raises(ValueError, match=r"known classes \[9\]"):
        labelled_unlabelled_split(targets, [0, 9], 0.5)
    with pytest.raises(ValueError, match="non-negative"):
        stratified_split(targets, 0.5, seed=-1)
