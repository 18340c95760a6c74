"""A procedural dataset whose classes are defined by which coloured parts appear where, with part masks.

Part types are (shape, colour) pairs, e.g. "red disc" or "blue ring"; mask value k marks part type k
(``part_names[k - 1]``), 0 is background. The image is a grid of cells; a class places ``parts_per_class``
distinct part types in fixed cells. Classes come in pairs with the same parts in different cells, so neither
which parts appear nor where something appears alone tells classes apart. ``distractors`` extra parts of
non-defining types fill random free cells (never completing another class's layout), so an explanation can be
scored by whether it looks at a defining part. Every sample is rendered on demand from (seed, split, index):
any size, any resolution, and any sample can be regenerated exactly.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import ImageSource

SHAPES = ("disc", "square", "triangle", "ring")
COLOURS = {"red": (0.9, 0.15, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95)}
PART_TYPES = tuple(itertools.product(SHAPES, COLOURS))  # mask id k <-> PART_TYPES[k - 1]
PART_NAMES = [f"{colour} {shape}" for shape, colour in PART_TYPES]
SPLIT_STREAMS = {"train": 0, "val": 1, "test": 2}
CLASS_STREAM = 3  # generator stream for the class definitions
Layout = tuple[tuple[int, int], ...]  # ((part id, cell), ...) sorted by cell; cell = row * grid + col


def make_layouts(num_classes: int, parts_per_class: int, grid: int, seed: int) -> list[Layout]:
    """Seeded class definitions, in pairs sharing the same part types placed in different cells."""
    cells = grid * grid
    if not 1 <= parts_per_class <= min(cells, len(PART_TYPES)):
        raise ValueError(f"parts_per_class must be in 1..{min(cells, len(PART_TYPES))} for grid={grid}")
    capacity = math.comb(len(PART_TYPES), parts_per_class) * math.perm(cells, parts_per_class)
    if not 2 <= num_classes <= capacity:
        raise ValueError(f"num_classes must be in 2..{capacity} for these parts_per_class and grid")
    rng = np.random.default_rng([seed, CLASS_STREAM])
    layouts: dict[Layout, None] = {}  # ordered set
    while len(layouts) < num_classes:
        parts = rng.choice(len(PART_TYPES), size=parts_per_class, replace=False) + 1
        for _ in range(2):  # the same parts in two arrangements
            places = rng.choice(cells, size=parts_per_class, replace=False)
            layout = tuple(sorted(zip(parts.tolist(), places.tolist(), strict=True), key=lambda pc: pc[1]))
            if len(layouts) < num_classes:
                layouts.setdefault(layout)
    return list(layouts)


def sample_distractors(
    layout: Layout, layouts: list[Layout], count: int, grid: int, rng: np.random.Generator
) -> Layout:
    """``count`` (part id, cell) pairs of non-defining part types in free cells that complete no other class.

    Returns no distractors when 100 draws all complete another class (only possible with crowded grids).
    """
    free = [cell for cell in range(grid * grid) if cell not in {c for _, c in layout}]
    others = [p for p in range(1, len(PART_TYPES) + 1) if p not in {p for p, _ in layout}]
    rivals = [set(other) for other in layouts if other != layout]
    for _ in range(100):
        cells = rng.choice(free, size=count, replace=False).tolist()
        parts = rng.choice(others, size=count).tolist()
        extra = tuple(zip(parts, cells, strict=True))
        if not any(rival <= set(layout) | set(extra) for rival in rivals):
            return extra
    return ()


def shape_mask(shape: str, ys: np.ndarray, xs: np.ndarray, cy: float, cx: float, size: float) -> np.ndarray:
    """Boolean (H, W) mask of ``shape`` of side ``size`` centred at (cy, cx), sampled at pixel centres."""
    dy, dx = ys - cy, xs - cx
    half = size / 2
    if shape == "disc":
        return dx**2 + dy**2 <= half**2
    if shape == "ring":
        radius2 = dx**2 + dy**2
        return (radius2 <= half**2) & (radius2 >= (0.5 * half) ** 2)
    if shape == "square":
        return (np.abs(dx) <= 0.85 * half) & (np.abs(dy) <= 0.85 * half)
    if shape == "triangle":  # apex up, base at the bottom
        return (dy <= half) & (np.abs(dx) <= (dy + half) / 2)
    raise ValueError(f"unknown shape {shape!r}; known: {list(SHAPES)}")


def render(
    parts: Layout, image_size: int, grid: int, noise: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    """Draw (part id, cell) ``parts``: (image (3, S, S) float32 in [0, 1], part_mask (S, S) int64).

    Background: a random gray plus, scaled by ``noise``, a smooth colour texture; parts get random size and
    position inside their cell; then pixel noise of std ``noise / 2``. With noise=0 part pixels have exactly
    their colour and background pixels are gray.
    """
    s = image_size
    gray = rng.uniform(0.35, 0.65)
    texture = torch.from_numpy(rng.normal(size=(1, 3, 4, 4)).astype(np.float32))
    texture = F.interpolate(texture, size=(s, s), mode="bilinear", align_corners=False)[0].numpy()
    image = gray + noise * texture  # (3, S, S)
    mask = np.zeros((s, s), dtype=np.int64)
    ys, xs = np.mgrid[0:s, 0:s] + 0.5
    cell = s / grid
    for part_id, place in parts:
        shape, colour = PART_TYPES[part_id - 1]
        size = rng.uniform(0.55, 0.85) * cell
        slack = (cell - size) / 2
        row, col = divmod(place, grid)
        cy = (row + 0.5) * cell + rng.uniform(-slack, slack)
        cx = (col + 0.5) * cell + rng.uniform(-slack, slack)
        inside = shape_mask(shape, ys, xs, cy, cx, size)
        mask[inside] = part_id
        image[:, inside] = np.asarray(COLOURS[colour], dtype=np.float64)[:, None]
    image = image + (noise / 2) * rng.normal(size=image.shape)
    return np.clip(image, 0.0, 1.0).astype(np.float32), mask


class PartsDataset(ImageSource):
    """One split of the parts dataset: ``per_class`` samples of each class, rendered on access.

    Sample i has class ``i % num_classes``; items are {"image" (3, S, S) in [0, 1], "part_mask" (S, S) long}.
    """

    channels = 3

    def __init__(
        self,
        layouts: list[Layout],
        per_class: int,
        split: str = "train",
        image_size: int = 32,
        grid: int = 2,
        distractors: int = 1,
        noise: float = 0.1,
        seed: int = 0,
    ) -> None:
        if split not in SPLIT_STREAMS:
            raise ValueError(f"split must be one of {list(SPLIT_STREAMS)}, got {split!r}")
        if per_class < 1:
            raise ValueError(f"samples per class must be >= 1 in split {split!r}, got {per_class}")
        if image_size < 4 * grid:
            raise ValueError(f"image_size={image_size} is too small for grid={grid}; use >= {4 * grid}")
        self.layouts = layouts
        self.targets = torch.arange(per_class * len(layouts)) % len(layouts)
        self.stream = SPLIT_STREAMS[split]
        self.image_size, self.grid, self.noise, self.seed = image_size, grid, noise, seed
        self.distractors = distractors

    def load(self, i: int) -> dict[str, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, i])
        layout = self.layouts[int(self.targets[i])]
        extra = sample_distractors(layout, self.layouts, self.distractors, self.grid, rng)
        image, mask = render(layout + extra, self.image_size, self.grid, self.noise, rng)
        return {"image": torch.from_numpy(image), "part_mask": torch.from_numpy(mask)}


class PartsDataModule(VisionDataModule):
    """Train/val/test splits of the procedural parts dataset (3 channels, built-in, no files).

    Args:
        num_classes: number of classes (pairs share part types in different cells).
        train_per_class, val_per_class, test_per_class: samples per class in each split.
        grid: the image is a grid x grid layout of cells, each holding at most one part.
        parts_per_class: distinct part types that define a class.
        distractors: extra parts of other types in free cells (at most grid * grid - parts_per_class).
        noise: background texture amplitude and (half of it) pixel noise std; 0 gives clean images.
        seed: fixes the class definitions and every sample.
        **kwargs: common options of `VisionDataModule` (batch_size, classes, train_transforms, ...).

    After ``setup``: ``part_names`` (mask id k -> ``part_names[k - 1]``), ``class_parts`` (defining part ids
    of each kept class) and ``class_layout`` (((part id, cell), ...) per kept class, cell = row * grid + col).
    """

    default_mean = (0.49, 0.49, 0.47)  # pixel statistics at the default noise
    default_std = (0.2, 0.17, 0.19)
    part_names = PART_NAMES

    def __init__(
        self,
        num_classes: int = 10,
        train_per_class: int = 200,
        val_per_class: int = 40,
        test_per_class: int = 100,
        image_size: int = 32,
        grid: int = 2,
        parts_per_class: int = 2,
        distractors: int = 1,
        noise: float = 0.1,
        in_channels: int = 3,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, seed=seed, **kwargs)
        if noise < 0:
            raise ValueError(f"noise must be >= 0, got {noise}")
        if not isinstance(grid, int) or grid < 1:
            raise ValueError(f"grid must be an integer >= 1, got {grid!r}")
        self.layouts = make_layouts(num_classes, parts_per_class, grid, seed)
        if not 0 <= distractors <= grid * grid - parts_per_class:
            raise ValueError(f"distractors must be in 0..{grid * grid - parts_per_class}, got {distractors}")
        self.per_class = {"train": train_per_class, "val": val_per_class, "test": test_per_class}
        self.grid, self.noise, self.distractors = grid, noise, distractors

    def load_splits(self) -> SplitSources:
        sources = {
            split: PartsDataset(
                self.layouts, n, split, self.image_size, self.grid, self.distractors, self.noise, self.seed
            )
            for split, n in self.per_class.items()
        }
        names = ["+".join(f"{PART_NAMES[p - 1]}@{cell}" for p, cell in layout) for layout in self.layouts]
        return SplitSources(sources["train"], sources["val"], sources["test"], names)

    def foreground_mask(self, item: dict[str, Any]) -> torch.Tensor:
        """(H, W) bool: the pixels of any part (defining or distractor); the rest is background texture."""
        return item["part_mask"] > 0

    @property
    def class_layout(self) -> list[Layout]:
        """((part id, cell), ...) defining each kept class, in label order."""
        self._require_setup()
        return [self.layouts[c] for c in self.class_ids]

    @property
    def class_parts(self) -> list[tuple[int, ...]]:
        """Part ids (mask values) defining each kept class, in label order."""
        return [tuple(p for p, _ in layout) for layout in self.class_layout]
