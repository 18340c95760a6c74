"""CUB-200-2011 birds from the official folder, with optional bounding-box crops and part locations.

Items carry "part_locs" (P, 3): x (column), y (row) as pixel indices of the returned (cropped, resized)
image, fractional (pixel i spans [i - 0.5, i + 0.5), as for torchvision KeyPoints), and visible (0/1); parts
that are invisible or fall outside the crop are (0, 0, 0). Explanations can be scored against them.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import (
    ImageSource,
    open_image,
    pil_to_tensor,
    require_file,
    verify_images,
    visible_part_locs,
)

HINT = (
    "Download CUB_200_2011.tgz from https://data.caltech.edu/records/65de6-vp158, extract it and set "
    "root to the CUB_200_2011 folder."
)


def read_rows(path: Path, columns: int) -> list[list[str]]:
    """Whitespace-separated rows of a CUB text file; the last column keeps its spaces (names)."""
    rows = []
    for number, line in enumerate(require_file(path, HINT).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        row = line.split(maxsplit=columns - 1)
        if len(row) != columns:
            raise ValueError(f"{path}, line {number}: expected {columns} fields, got {line!r}")
        rows.append(row)
    return rows


def read_numbers(path: Path, columns: int) -> np.ndarray:
    """A numeric CUB table as a (rows, columns) float64 array, with a clear error on malformed lines."""
    rows = read_rows(path, columns)
    try:
        return np.asarray(rows, dtype=np.float64).reshape(-1, columns)
    except ValueError as err:
        raise ValueError(f"{path} has a non-numeric field ({err}); the file is corrupt") from err


def by_image(path: Path, table: np.ndarray, image_ids: list[int]) -> np.ndarray:
    """Rows of ``table`` (first column: image id) reordered to ``image_ids``; every image must have one."""
    index = {int(row[0]): i for i, row in enumerate(table)}
    missing = [i for i in image_ids if i not in index]
    if missing:
        raise ValueError(f"{path} has no row for image ids {missing[:5]} (of {len(missing)} missing)")
    return table[[index[i] for i in image_ids], 1:]


class CUBSource(ImageSource):
    """CUB images, cropped to their bounding box (x, y, w, h) when given, resized to a square."""

    channels = 3

    def __init__(
        self,
        paths: list[Path],
        targets: np.ndarray,
        image_size: int,
        boxes: torch.Tensor | None = None,
        part_locs: torch.Tensor | None = None,
    ) -> None:
        self.paths = paths
        self.targets = torch.as_tensor(targets, dtype=torch.long)
        self.image_size = image_size
        self.boxes = boxes  # (N, 4) x, y, w, h in original pixels
        self.part_locs = part_locs  # (N, P, 3) x, y, visible in original pixels

    def load(self, i: int) -> dict[str, torch.Tensor]:
        pil = open_image(self.paths[i], 3)
        width, height = pil.size
        x0, y0, x1, y1 = 0.0, 0.0, float(width), float(height)
        if self.boxes is not None:
            x, y, w, h = self.boxes[i].tolist()
            x0, y0, x1, y1 = max(x, 0.0), max(y, 0.0), min(x + w, width), min(y + h, height)
            if x1 <= x0 or y1 <= y0:
                raise ValueError(
                    f"bounding box {[x, y, w, h]} of {self.paths[i]} lies outside the "
                    f"{width}x{height} image; fix bounding_boxes.txt or set crop=False"
                )
        size = self.image_size
        item = {"image": pil_to_tensor(pil, size, box=(x0, y0, x1, y1))}  # (3, S, S)
        if self.part_locs is not None:
            locs = self.part_locs[i]  # (P, 3)
            scale = torch.tensor([size / (x1 - x0), size / (y1 - y0)])
            xy = (locs[:, :2] + 0.5 - torch.tensor([x0, y0])) * scale - 0.5  # pixel i's centre is at i + 0.5
            item["part_locs"] = visible_part_locs(xy.float(), locs[:, 2], (size, size))
        return item


class CUBDataModule(VisionDataModule):
    """CUB-200-2011 with its official train/test split (validation carved from train).

    Args:
        root: the ``CUB_200_2011`` folder (images/, images.txt, ..., parts/), or its parent.
        crop: crop each image to its bounding box (bounding_boxes.txt) before resizing.
        part_locs: return "part_locs" (P, 3) with each item (reads parts/parts.txt, parts/part_locs.txt).
        image_size: side of the returned square images.
        verify: decode every image once in ``setup`` and report all bad files together: True, False, or
            "auto" (when there are at most ``sources.VERIFY_AUTO_LIMIT`` files; all of CUB is 11,788).
        **kwargs: common options of `VisionDataModule` (batch_size, val_fraction, classes, ...).

    Class names drop the numeric prefix ("001.Black_footed_Albatross" -> "Black_footed_Albatross").
    After ``setup``, ``part_names`` lists the parts in "part_locs" order (empty if part_locs=False).
    """

    default_mean = (0.485, 0.456, 0.406)  # ImageNet statistics, as pretrained backbones expect
    default_std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str | Path,
        crop: bool = True,
        part_locs: bool = True,
        image_size: int = 224,
        in_channels: int = 3,
        verify: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, **kwargs)
        self.root = Path(root)
        self.verify = verify
        self.crop = crop
        self.with_part_locs = part_locs
        self.part_names: list[str] = []

    def _folder(self) -> Path:
        nested = self.root / "CUB_200_2011"
        return nested if not (self.root / "images.txt").exists() and nested.is_dir() else self.root

    def load_splits(self) -> SplitSources:
        folder = self._folder()
        images = read_rows(folder / "images.txt", 2)
        ids = [int(i) for i, _ in images]
        paths = [folder / "images" / name for _, name in images]
        classes = read_rows(folder / "classes.txt", 2)
        names = [re.sub(r"^\d+\.", "", name) for _, name in classes]
        labels_path, split_path = folder / "image_class_labels.txt", folder / "train_test_split.txt"
        labels = by_image(labels_path, read_numbers(labels_path, 2), ids)[:, 0].astype(np.int64) - 1
        is_train = by_image(split_path, read_numbers(split_path, 2), ids)[:, 0] > 0
        boxes = locs = None
        if self.crop:
            boxes_path = folder / "bounding_boxes.txt"
            boxes = torch.from_numpy(by_image(boxes_path, read_numbers(boxes_path, 5), ids))  # (N, 4)
        if self.with_part_locs:
            self.part_names = [name for _, name in read_rows(folder / "parts" / "parts.txt", 2)]
            locs = self._read_part_locs(folder / "parts" / "part_locs.txt", ids)

        def source(mask: np.ndarray) -> CUBSource:
            rows = np.flatnonzero(mask)
            return CUBSource(
                [paths[r] for r in rows],
                labels[rows],
                self.image_size,
                None if boxes is None else boxes[rows],
                None if locs is None else locs[rows],
            )

        verify_images(paths, 3, self.verify)
        return SplitSources(source(is_train), None, source(~is_train), names)

    def _read_part_locs(self, path: Path, ids: list[int]) -> torch.Tensor:
        """(N, P, 3) x, y, visible per image in ``ids`` order; parts without a row stay (0, 0, 0)."""
        table = read_numbers(path, 5)  # image id, part id, x, y, visible
        position = {image_id: i for i, image_id in enumerate(ids)}
        rows = np.asarray([position.get(int(i), -1) for i in table[:, 0]], dtype=np.int64)
        parts = table[:, 1].astype(np.int64) - 1
        bad = np.flatnonzero((rows < 0) | (parts < 0) | (parts >= len(self.part_names)))
        if len(bad):
            image_id, part_id = table[bad[0], :2].astype(np.int64)
            raise ValueError(
                f"{path} refers to image {image_id} / part {part_id}, which images.txt / "
                f"parts/parts.txt do not list"
            )
        locs = np.zeros((len(ids), len(self.part_names), 3))
        locs[rows, parts] = table[:, 2:]
        return torch.from_numpy(locs)
