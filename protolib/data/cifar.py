"""CIFAR-10 and CIFAR-100 from the official "python version" pickles (fine labels for CIFAR-100)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import TensorSource, find_folder, require_file


def _load_pickle(path: Path) -> dict[str, Any]:
    """Unpickle a CIFAR batch (written by Python 2: bytes keys) into a dict with str keys."""
    try:
        with path.open("rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError) as err:
        raise ValueError(
            f"cannot read CIFAR file {path}: {err}; the file is corrupt or truncated, "
            "download and extract the archive again"
        ) from err
    if not isinstance(batch, dict):
        raise ValueError(f"{path} holds a {type(batch).__name__}, not a CIFAR batch dict")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}


def _field(batch: dict[str, Any], key: str, path: Path) -> Any:
    if key not in batch:
        raise ValueError(f"{path} has no {key!r} entry (keys: {sorted(batch)}); is it the right CIFAR file?")
    return batch[key]


class CIFARDataModule(VisionDataModule):
    """Shared loader of the CIFAR pickles; `CIFAR10DataModule` and `CIFAR100DataModule` name the files.

    Args:
        root: folder containing the extracted archive folder (e.g. ``cifar-10-batches-py``), or that folder.
        image_size: side the 32x32 images are resized to.
        **kwargs: common options of `VisionDataModule` (batch_size, val_fraction, classes, ...).
    """

    folder: str
    archive_url: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    names_key: str
    labels_key: str

    def __init__(self, root: str | Path, image_size: int = 32, in_channels: int = 3, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, **kwargs)
        self.root = Path(root)

    def _hint(self) -> str:
        return f"Download {self.archive_url} and extract it into {self.root}."

    def _folder(self) -> Path:
        """``root`` itself when it holds the batches, else ``root/<archive folder>``."""
        return find_folder([self.root / self.folder, self.root], [self.meta_file], self._hint())

    def _require(self, name: str) -> Path:
        return require_file(self._folder() / name, self._hint())

    def _read(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        path = self._require(name)
        batch = _load_pickle(path)
        data = np.asarray(_field(batch, "data", path))
        labels = np.asarray(_field(batch, self.labels_key, path), dtype=np.int64)
        if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or data.dtype != np.uint8:
            raise ValueError(
                f"{path}: 'data' must be uint8 rows of 3072 values (32x32 RGB), "
                f"got {data.dtype} {data.shape}; the file is not a CIFAR batch"
            )
        if len(labels) != len(data):
            raise ValueError(f"{path} has {len(data)} images but {len(labels)} labels; the file is corrupt")
        return torch.from_numpy(data.reshape(-1, 3, 32, 32).copy()), torch.from_numpy(labels)

    def _class_names(self) -> list[str]:
        meta_path = self._require(self.meta_file)
        return [
            n.decode() if isinstance(n, bytes) else str(n)
            for n in _field(_load_pickle(meta_path), self.names_key, meta_path)
        ]

    def load_splits(self) -> SplitSources:
        names = self._class_names()
        parts = [self._read(name) for name in self.train_files]
        train_images = torch.cat([images for images, _ in parts])
        train_labels = torch.cat([labels for _, labels in parts])
        test, _ = self.load_test_split()
        return SplitSources(TensorSource(train_images, train_labels, self.image_size), None, test, names)

    def load_test_split(self) -> tuple[TensorSource, list[str]]:
        test_images, test_labels = self._read(self.test_file)
        return TensorSource(test_images, test_labels, self.image_size), self._class_names()


class CIFAR10DataModule(CIFARDataModule):
    """CIFAR-10: ``cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}``."""

    folder = "cifar-10-batches-py"
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
    train_files = tuple(f"data_batch_{i}" for i in range(1, 6))
    test_file = "test_batch"
    meta_file = "batches.meta"
    names_key = "label_names"
    labels_key = "labels"
    default_mean = (0.4914, 0.4822, 0.4465)
    default_std = (0.2470, 0.2435, 0.2616)


class CIFAR100DataModule(CIFARDataModule):
    """CIFAR-100 with its 100 fine labels: ``cifar-100-python/{train, test, meta}``."""

    folder = "cifar-100-python"
    archive_url = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
    train_files = ("train",)
    test_file = "test"
    meta_file = "meta"
    names_key = "fine_label_names"
    labels_key = "fine_labels"
    default_mean = (0.5071, 0.4865, 0.4409)
    default_std = (0.2673, 0.2564, 0.2762)
