"""MNIST and Fashion-MNIST from the original idx files, gzipped or not."""

from __future__ import annotations

import gzip
import math
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import TensorSource, find_folder, require_file

IDX_KINDS = ("images-idx3", "labels-idx1")
UBYTE = 0x08  # idx data-type code of unsigned bytes, the only type MNIST files use


def read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an unsigned-byte idx file with ``ndim`` dimensions (3: images, 1: labels), checking its header."""
    try:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise ValueError(f"cannot read {path}: {err}; the file is corrupt or truncated") from err
    magic = bytes([0, 0, UBYTE, ndim])
    if data[:4] != magic:
        raise ValueError(
            f"{path} starts with bytes {data[:4].hex()} but an idx file of {ndim}-d unsigned "
            f"bytes starts with {magic.hex()}; is it the right idx file (images vs labels)?"
        )
    header = 4 + 4 * ndim
    if len(data) < header:
        raise ValueError(f"{path} is truncated inside its header; download it again")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    expected = math.prod(dims)
    if len(data) - header != expected:
        state = "truncated" if len(data) - header < expected else "longer than its header says"
        raise ValueError(
            f"{path} is {state}: header {dims} needs {expected} bytes of data, found "
            f"{len(data) - header}; download it again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


class MNISTDataModule(VisionDataModule):
    """MNIST-format data: ``{train,t10k}-{images-idx3,labels-idx1}-ubyte``, each maybe ``.gz``.

    The files are looked for in ``root``, ``<root>/raw`` and torchvision's ``<root>/MNIST/raw``
    (``FashionMNIST/raw`` for Fashion-MNIST), in that order. A set used only for testing (an OOD set) needs
    only the two ``t10k`` files.

    Args:
        root: the folder of the idx files, or one above it (see above).
        image_size: side the 28x28 images are resized to.
        in_channels: 1 (grayscale) or 3 (repeated).
        **kwargs: common options of `VisionDataModule` (batch_size, val_fraction, classes, ...).
    """

    label_names: tuple[str, ...] = tuple(str(d) for d in range(10))
    torchvision_folder = "MNIST"  # <root>/<this>/raw is where torchvision.datasets.MNIST downloads to
    source_hint = "Put the idx files there (MNIST: https://yann.lecun.com/exdb/mnist/ or a mirror):"
    default_mean = (0.1307,)
    default_std = (0.3081,)

    def __init__(self, root: str | Path, image_size: int = 28, in_channels: int = 1, **kwargs: Any) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, **kwargs)
        self.root = Path(root)

    def _folder(self) -> Path:
        """The first of root, root/raw, root/<torchvision folder>/raw that holds any of the idx files."""
        names = [f"{p}-{k}-ubyte{gz}" for p in ("train", "t10k") for k in IDX_KINDS for gz in ("", ".gz")]
        candidates = [self.root, self.root / "raw", self.root / self.torchvision_folder / "raw"]
        return find_folder(candidates, names, f"{self.source_hint} {self.root}.")

    def _file(self, name: str) -> Path:
        """``name`` or ``name.gz`` in the data folder (the uncompressed one when both exist)."""
        folder = self._folder()
        for candidate in (folder / name, folder / f"{name}.gz"):
            if candidate.exists():
                return candidate
        return require_file(folder / f"{name}[.gz]", f"{self.source_hint} {folder}.")

    def _read(self, prefix: str) -> TensorSource:
        images_path = self._file(f"{prefix}-images-idx3-ubyte")
        labels_path = self._file(f"{prefix}-labels-idx1-ubyte")
        images, labels = read_idx(images_path, 3), read_idx(labels_path, 1)  # (N, H, W), (N,)
        if len(images) != len(labels):
            raise ValueError(f"{images_path} has {len(images)} images but {labels_path} has {len(labels)}")
        images = torch.from_numpy(images.copy())[:, None]  # (N, 1, H, W)
        return TensorSource(images, labels.astype(np.int64), self.image_size)

    def load_splits(self) -> SplitSources:
        return SplitSources(self._read("train"), None, self._read("t10k"), list(self.label_names))

    def load_test_split(self) -> tuple[TensorSource, list[str]]:
        return self._read("t10k"), list(self.label_names)


class FashionMNISTDataModule(MNISTDataModule):
    """Fashion-MNIST: the same idx files and layout as MNIST, with clothing classes."""

    label_names = (
        "T-shirt/top",
        "Trouser",
        "Pullover",
        "Dress",
        "Coat",
        "Sandal",
        "Shirt",
        "Sneaker",
        "Bag",
        "Ankle boot",
    )
    torchvision_folder = "FashionMNIST"
    source_hint = "Download the four files from https://github.com/zalandoresearch/fashion-mnist into"
    default_mean = (0.2860,)
    default_std = (0.3530,)
