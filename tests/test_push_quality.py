"""Push-quality measures on constructed provenance with known answers, and the data's foreground masks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from explain.push_quality import push_quality
from protolib.data.digits import DigitsDataModule


def item(mask: np.ndarray, parts: np.ndarray) -> dict[str, torch.Tensor]:
    return {
        "image": torch.zeros(1, 4, 4),
        "foreground": torch.from_numpy(mask),
        "part_mask": torch.from_numpy(parts),
    }


def test_push_quality_counts_background_sources_duplicates_and_parts() -> None:
    object_left = np.zeros((4, 4), bool)
    object_left[:, :2] = True  # left half is the object
    parts = np.zeros((4, 4), np.int64)
    parts[:2, :2] = 1  # part 1 (defines class 0) top-left, part 2 (class 1) bottom-left
    parts[2:, :2] = 2
    dataset = [item(object_left, parts), item(object_left, parts)]
    provenance = {
        "owner": torch.tensor([0, 0, 0, 1]),
        "source_sample": torch.tensor([0, 0, 1, 1]),
        "location": torch.tensor([[0, 0], [0, 0], [1, 1], [1, 0]]),
        # boxes x0, y0, x1, y1: top-left 2x2 (all object, part 1); again (duplicate patch); right half
        # (background); bottom-left 2x2 (part 2 = class 1's part)
        "activation_box": torch.tensor([[0, 0, 2, 2], [0, 0, 2, 2], [2, 0, 4, 4], [0, 2, 2, 4]]),
    }
    quality = push_quality(provenance, dataset, lambda x: x["foreground"], 2, class_parts=[(1,), (2,)])
    torch.testing.assert_close(quality.foreground, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    torch.testing.assert_close(quality.part_score, torch.tensor([1.0, 1.0, 0.0, 1.0]))
    assert quality.distinct_sources.tolist() == [2, 1]  # class 0: images 0 and 1; class 1: image 1
    assert quality.duplicates.tolist() == [1, 0]
    summary = quality.summary()
    assert summary["background_share"] == pytest.approx(0.25)
    assert summary["zero_part_share"] == pytest.approx(0.25) and summary["part_score"] == pytest.approx(0.75)
    # a box exactly framing the nearest defining part: the 2x2 part itself for every prototype, also the
    # one on background (its nearest defining part is part 1, top-left)
    torch.testing.assert_close(quality.part_framing, torch.ones(4))
    assert summary["part_framing"] == pytest.approx(1.0)
    assert summary["distinct_sources_mean"] == 1.5 and summary["distinct_sources_min"] == 1
    assert summary["duplicates"] == 1


def test_push_quality_without_masks_skips_the_background_share() -> None:
    dataset = [{"image": torch.zeros(1, 4, 4)}]
    provenance = {
        "owner": torch.tensor([0, 1]),
        "source_sample": torch.tensor([0, 0]),
        "location": torch.tensor([[0, 0], [0, 1]]),
        "activation_box": torch.tensor([[0, 0, 1, 1], [1, 1, 2, 2]]),
    }
    summary = push_quality(provenance, dataset, lambda x: None, 2).summary()
    assert "background_share" not in summary and "part_score" not in summary
    provenance["source_sample"] = torch.tensor([-1, -1])  # never pushed (one -1 alone: left out, ProtoPool)
    with pytest.raises(ValueError, match="push them first"):
        push_quality(provenance, dataset, lambda x: None, 2)


def test_digits_foreground_is_the_pen_strokes() -> None:
    dm = DigitsDataModule(image_size=8, interpolation="nearest", seed=0)
    dm.setup("fit")
    sample = dm.push_dataloader().dataset[0]
    ink = sample["image"][0].numpy() * dm.std.numpy()[0] + dm.mean.numpy()[0]  # back to [0, 1] ink
    expected = np.clip(ink, 0, 1) >= 0.25
    assert np.array_equal(dm.foreground_mask(sample).numpy(), expected)
    assert 0 < expected.mean() < 1
