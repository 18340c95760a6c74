"""SVHN cropped digits from the official ``*_32x32.mat`` files (label 10 means digit 0)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import scipy.io
import torch

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import TensorSource, require_file

URL = "http://ufldl.stanford.edu/housenumbers/"


def read_svhn_mat(path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    """Images (N, 3, 32, 32) uint8 and labels (N,) 0..9 from an SVHN .mat (X (32, 32, 3, N), y (N, 1))."""
    try:
        mat = scipy.io.loadmat(path)
    except (ValueError, TypeError, OSError, EOFError, NotImplementedError) as err:
        raise ValueError(
            f"cannot read SVHN file {path}: {err}; the file is corrupt or truncated, "
            f"download it again from {URL}"
        ) from err
    for key in ("X", "y"):
        if key not in mat:
            raise ValueError(f"{path} has no {key!r} array; is it an SVHN *_32x32.mat file?")
    images, labels = np.asarray(mat["X"]), np.asarray(mat["y"]).reshape(-1)
    if images.ndim != 4 or images.shape[:3] != (32, 32, 3):
        raise ValueError(
            f"{path}: X must have shape (32, 32, 3, N), got {images.shape}; "
            "only the cropped-digits format (*_32x32.mat) is supported"
        )
    if len(labels) != images.shape[3]:
        raise ValueError(f"{path} has {images.shape[3]} images but {len(labels)} labels; the file is corrupt")
    if len(labels) and not (labels.min() >= 0 and labels.max() <= 10):
        raise ValueError(f"{path}: y must be in 1..10 (10 = digit 0), got {labels.min()}..{labels.max()}")
    images = np.ascontiguousarray(images.transpose(3, 2, 0, 1)).astype(np.uint8, copy=False)  # (N, 3, 32, 32)
    return torch.from_numpy(images), torch.from_numpy(labels.astype(np.int64) % 10)


class SVHNDataModule(VisionDataModule):
    """SVHN: ``train_32x32.mat``, ``test_32x32.mat`` (and ``extra_32x32.mat`` if ``use_extra``) in ``root``.

    Args:
        root: folder holding the .mat files.
        use_extra: add the 531k "extra" images to the training set.
        image_size: side the 32x32 images are resized to.
        **kwargs: common options of `VisionDataModule` (batch_size, val_fraction, classes, ...).
    """

    default_mean = (0.4377, 0.4438, 0.4728)
    default_std = (0.1980, 0.2010, 0.1970)

    def __init__(
        self,
        root: str | Path,
        use_extra: bool = False,
        image_size: int = 32,
        in_channels: int = 3,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, **kwargs)
        self.root = Path(root)
        self.use_extra = use_extra

    def _read(self, split: str) -> tuple[torch.Tensor, torch.Tensor]:
        name = f"{split}_32x32.mat"
        return read_svhn_mat(require_file(self.root / name, f"Download {URL}{name} into {self.root}."))

    def load_splits(self) -> SplitSources:
        train_images, train_labels = self._read("train")
        if self.use_extra:
            extra_images, extra_labels = self._read("extra")
            train_images = torch.cat([train_images, extra_images])
            train_labels = torch.cat([train_labels, extra_labels])
        test, names = self.load_test_split()
        return SplitSources(TensorSource(train_images, train_labels, self.image_size), None, test, names)

    def load_test_split(self) -> tuple[TensorSource, list[str]]:
        test_images, test_labels = self._read("test")
        return TensorSource(test_images, test_labels, self.image_size), [str(d) for d in range(10)]
