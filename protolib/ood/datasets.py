"""Datasets for OOD benchmarks: seeded synthetic noise, OpenOOD image lists, and conversion to the ID format.

Every OOD set is shown to the model exactly as its in-distribution data is: same channels, size and
normalisation. :class:`InDistributionFormat` does that conversion for any dataset of contract items.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torchvision.transforms.functional as TF
from torch.utils.data import Dataset

from protolib.data.base import convert_channels
from protolib.data.sources import open_image, resize

NOISE_KINDS = ("uniform", "gaussian", "blobs")
OOD_LABEL = -1


class NoiseDataset(Dataset):
    """Seeded synthetic far-OOD images in [0, 1]: image i is the same for a given seed on every machine.

    ``kinds`` cycle over the samples: "uniform" (i.i.d. U[0, 1] pixels), "gaussian" (N(0.5, 0.25^2) pixels,
    clipped) and "blobs" (smooth low-frequency noise: a 4x4 uniform grid upsampled). Items are contract dicts
    with "label" -1; the evaluator passes ``in_channels`` and ``image_size`` of the ID data.
    """

    def __init__(
        self,
        num_images: int = 500,
        in_channels: int = 1,
        image_size: int = 32,
        kinds: Sequence[str] = NOISE_KINDS,
        seed: int = 0,
    ) -> None:
        if num_images < 1 or image_size < 1 or in_channels < 1:
            raise ValueError(
                f"noise dataset needs positive sizes, got {num_images=}, {image_size=}, {in_channels=}"
            )
        unknown = [k for k in kinds if k not in NOISE_KINDS]
        if unknown or not kinds:
            raise ValueError(f"unknown noise kinds {unknown or kinds}; choose from {list(NOISE_KINDS)}")
        self.num_images, self.in_channels, self.image_size = num_images, in_channels, image_size
        self.kinds, self.seed = list(kinds), seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, i: int) -> dict[str, Any]:
        if not 0 <= i < self.num_images:
            raise IndexError(f"noise image {i} out of range 0..{self.num_images - 1}")
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + i)
        shape = (self.in_channels, self.image_size, self.image_size)
        kind = self.kinds[i % len(self.kinds)]
        if kind == "uniform":
            image = torch.rand(shape, generator=generator)
        elif kind == "gaussian":
            image = (0.5 + 0.25 * torch.randn(shape, generator=generator)).clamp(0.0, 1.0)
        else:
            coarse = torch.rand((self.in_channels, 4, 4), generator=generator)
            image = resize(coarse, self.image_size, "bicubic")
        return {"image": image, "label": OOD_LABEL, "index": i}


class ImglistDataset(Dataset):
    """Images listed in an OpenOOD ``benchmark_imglist`` file: lines ``<path under data_dir> <label>``.

    Preprocessed as OpenOOD's test transform up to normalisation: RGB, resize the shorter side to ``pre_size``
    (bilinear), centre-crop ``image_size``; returned in [0, 1] (normalisation is the ID format's job).
    Missing list files or image folders raise FileNotFoundError at construction, naming the expected path.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        imglist: str,
        data_dir: str = "images_classic",
        image_size: int = 32,
        pre_size: int | None = None,
        in_channels: int = 3,
    ) -> None:
        self.root = Path(root).expanduser()
        missing = [str(p.absolute()) for p in self.expected_paths(root, imglist, data_dir) if not p.exists()]
        if missing:
            raise FileNotFoundError(f"missing {' and '.join(missing)} (OpenOOD v1.5 data layout)")
        self.data_dir = self.root / data_dir
        self.image_size, self.pre_size = image_size, pre_size or image_size
        self.in_channels = in_channels
        self.items: list[tuple[str, int]] = []
        for number, line in enumerate((self.root / imglist).read_text().splitlines(), start=1):
            if not line.strip():
                continue
            path, _, extra = line.strip().partition(" ")
            if path.startswith("/"):
                raise ValueError(f"{self.root / imglist}:{number}: image paths must be relative, got {path}")
            self.items.append((path, int(extra) if extra.strip().lstrip("-").isdigit() else OOD_LABEL))
        if not self.items:
            raise ValueError(f"{self.root / imglist} lists no images")

    @staticmethod
    def expected_paths(root: str | os.PathLike, imglist: str, data_dir: str = "images_classic") -> list[Path]:
        """The list file and the image folder this dataset reads."""
        root = Path(root).expanduser()
        return [root / imglist, root / data_dir]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, i: int) -> dict[str, Any]:
        path, label = self.items[i]
        pil = open_image(self.data_dir / path, 3)
        pil = TF.center_crop(TF.resize(pil, self.pre_size, TF.InterpolationMode.BILINEAR), self.image_size)
        image = TF.to_tensor(pil)  # (3, S, S) in [0, 1]
        return {"image": convert_channels(image, self.in_channels), "label": label, "index": i}


class InDistributionFormat(Dataset):
    """Show any dataset of contract items in the ID format: channels, square size and ID normalisation.

    ``source_mean``/``source_std`` undo the dataset's own normalisation first (None: its images are already in
    [0, 1]). Labels become -1 unless ``keep_labels``: OOD samples have no ID class.
    """

    def __init__(
        self,
        dataset: Dataset,
        in_channels: int,
        image_size: int,
        mean: torch.Tensor | Sequence[float],
        std: torch.Tensor | Sequence[float],
        source_mean: torch.Tensor | Sequence[float] | None = None,
        source_std: torch.Tensor | Sequence[float] | None = None,
        keep_labels: bool = False,
    ) -> None:
        self.dataset, self.in_channels, self.image_size = dataset, in_channels, image_size
        self.mean, self.std = _stats(mean, in_channels), _stats(std, in_channels)
        self.source_mean = None if source_mean is None else _stats(source_mean)
        self.source_std = None if source_std is None else _stats(source_std)
        self.keep_labels = keep_labels

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.dataset[i]
        image = item["image"].float()  # (C, H, W)
        if self.source_std is not None:
            image = (image * self.source_std + self.source_mean).clamp(0.0, 1.0)
        image = resize(convert_channels(image, self.in_channels), self.image_size)
        label = int(item.get("label", OOD_LABEL)) if self.keep_labels else OOD_LABEL
        return {"image": (image - self.mean) / self.std, "label": label, "index": i}


def _stats(values: torch.Tensor | Sequence[float], channels: int | None = None) -> torch.Tensor:
    """Per-channel statistics as a (C, 1, 1) float tensor (one value broadcast to ``channels``)."""
    tensor = torch.as_tensor(values, dtype=torch.float32).reshape(-1)
    if channels is not None and tensor.numel() == 1:
        tensor = tensor.repeat(channels)
    if channels is not None and tensor.numel() != channels:
        raise ValueError(f"normalisation has {tensor.numel()} values for {channels}-channel images")
    return tensor.view(-1, 1, 1)
