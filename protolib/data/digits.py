"""scikit-learn's bundled 8x8 handwritten digits, upsampled: the offline default dataset of ``train.py``."""

from __future__ import annotations

from typing import Any

import torch
from sklearn.datasets import load_digits

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import TensorSource, check_interpolation
from protolib.data.splits import stratified_split


class DigitsDataModule(VisionDataModule):
    """1,797 digit images (10 classes) held in memory; a seeded stratified split, by default 70/10/20.

    Args:
        image_size: side the 8x8 images are upsampled to.
        in_channels: 1 (grayscale) or 3 (the gray channel repeated).
        interpolation: "bilinear" (smooth strokes) or "nearest" (blocky, exact pixels) upsampling.
        test_fraction: fraction of each class used as the test set.
        val_fraction: fraction of the remaining (training) samples carved out as validation.
        **kwargs: common options of `VisionDataModule` (batch_size, seed, classes, train_transforms, ...).
    """

    default_mean = (0.305,)  # pixel statistics of the bilinear 32x32 images
    default_std = (0.33,)

    def __init__(
        self,
        image_size: int = 32,
        in_channels: int = 1,
        interpolation: str = "bilinear",
        test_fraction: float = 0.2,
        val_fraction: float = 0.125,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, val_fraction=val_fraction, **kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.interpolation = check_interpolation(interpolation)
        self.test_fraction = test_fraction

    stroke_threshold = 0.25  # a pixel at >= 25 % of full ink is stroke; below is the blank background

    def foreground_mask(self, item: dict[str, Any]) -> torch.Tensor:
        """(H, W) bool: the pen strokes of a digit (denormalised intensity >= ``stroke_threshold``)."""
        return self.denormalize(item["image"]).mean(dim=0) >= self.stroke_threshold

    def load_splits(self) -> SplitSources:
        digits = load_digits()
        images = torch.from_numpy(digits.images).float().div_(16.0)[:, None]  # (N, 1, 8, 8) in [0, 1]
        targets = torch.from_numpy(digits.target).long()
        train_idx, test_idx = stratified_split(targets, self.test_fraction, self.seed)

        def source(idx: torch.Tensor) -> TensorSource:
            idx = torch.as_tensor(idx)
            return TensorSource(images[idx], targets[idx], self.image_size, self.interpolation)

        return SplitSources(source(train_idx), None, source(test_idx), [str(d) for d in range(10)])
