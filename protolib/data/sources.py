"""Image sources: the raw samples of one split, decoded and resized, before augmentation and normalisation.

A source knows how to turn sample ``i`` of some on-disk or in-memory format into a float image in [0, 1]
at the requested size (plus extras such as part masks). `protolib.data.base.VisionDataset` adds class
selection, augmentation and normalisation on top, so every format only has to implement ``load``.
"""

from __future__ import annotations

import logging
import os
import time
from abc import ABC, abstractmethod
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

INTERPOLATIONS = ("bilinear", "nearest", "bicubic")
VERIFY_AUTO_LIMIT = 5000  # verify="auto" decodes the files when there are at most this many (seconds of work)
log = logging.getLogger(__name__)


class ImageSource(Dataset, ABC):
    """Samples of one split: ``load(i)`` -> {"image": (C, S, S) float in [0, 1], extras...}.

    Subclasses set ``targets`` ((N,) long, original class ids) and ``channels`` (of the decoded images).
    Indexing a source directly gives the raw sample with "label" and "index" added (no normalisation).
    """

    targets: torch.Tensor  # (N,) long
    channels: int

    def __len__(self) -> int:
        return len(self.targets)

    @abstractmethod
    def load(self, i: int) -> dict[str, torch.Tensor]:
        """Decode sample ``i``: "image" (C, S, S) float in [0, 1] and any extras (e.g. "part_mask")."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor | int]:
        return {**self.load(i), "label": int(self.targets[i]), "index": i}


def as_targets(labels: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
    """Class ids as a (N,) long tensor."""
    return torch.as_tensor(np.asarray(labels), dtype=torch.long).reshape(-1)


def check_interpolation(mode: str) -> str:
    """Validate a resize mode name."""
    if mode not in INTERPOLATIONS:
        raise ValueError(f"interpolation={mode!r} is not supported; use one of {list(INTERPOLATIONS)}")
    return mode


def resize(image: torch.Tensor, size: int, mode: str = "bilinear") -> torch.Tensor:
    """Resize a (C, H, W) float image to (C, size, size); anti-aliased when shrinking."""
    if image.shape[-2:] == (size, size):
        return image
    shrinking = image.shape[-1] > size or image.shape[-2] > size
    kwargs = {"align_corners": False, "antialias": shrinking} if mode != "nearest" else {}
    out = F.interpolate(image[None], size=(size, size), mode=mode, **kwargs)[0]
    return out.clamp_(0.0, 1.0)


class TensorSource(ImageSource):
    """Images held in memory as a (N, C, H, W) uint8 (0..255) or float ([0, 1]) tensor, resized on access."""

    def __init__(
        self,
        images: torch.Tensor,
        targets: Sequence[int] | np.ndarray | torch.Tensor,
        image_size: int,
        interpolation: str = "bilinear",
    ) -> None:
        self.targets = as_targets(targets)
        if images.ndim != 4 or images.shape[0] != len(self.targets):
            raise ValueError(
                f"images must be (N, C, H, W) with N = {len(self.targets)} labels, got {tuple(images.shape)}"
            )
        self.images = images  # (N, C, H, W)
        self.channels = images.shape[1]
        self.image_size = image_size
        self.interpolation = check_interpolation(interpolation)

    def load(self, i: int) -> dict[str, torch.Tensor]:
        image = self.images[i].to(torch.float32, copy=True)  # never hand out a view of the stored data
        if self.images.dtype == torch.uint8:
            image.div_(255.0)
        return {"image": resize(image, self.image_size, self.interpolation)}


def visible_part_locs(xy: torch.Tensor, visible: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(P, 3) x, y, visible for pixel-index points ``xy`` (P, 2) in an (H, W) image; hidden/outside -> 0."""
    h, w = size
    x, y = xy[:, 0] + 0.5, xy[:, 1] + 0.5  # pixel i covers [i - 0.5, i + 0.5)
    inside = (x >= 0) & (x < w) & (y >= 0) & (y < h)
    keep = (visible > 0) & inside
    return torch.cat([xy, torch.ones_like(xy[:, :1])], dim=1) * keep[:, None]


def require_file(path: Path, hint: str) -> Path:
    """Return ``path`` if it exists, else raise FileNotFoundError naming it and how to obtain it."""
    if not path.exists():
        missing_root = next((p for p in reversed(path.parents) if not p.exists()), None)
        where = f" (the folder {missing_root} does not exist)" if missing_root is not None else ""
        raise FileNotFoundError(f"{path} not found{where}. {hint}")
    return path


def find_folder(candidates: Sequence[Path], names: Sequence[str], hint: str) -> Path:
    """The first folder of ``candidates`` holding any of the files ``names``, else a FileNotFoundError that
    lists every place looked (the layouts users already have: a download tool's nesting, or the files)."""
    for folder in candidates:
        if any((folder / name).exists() for name in names):
            return folder
    looked = "\n".join(f"  - {folder}" for folder in dict.fromkeys(candidates))
    raise FileNotFoundError(f"none of {', '.join(names[:4])} found; looked in:\n{looked}\n{hint}")


def open_image(path: str | os.PathLike, channels: int) -> Image.Image:
    """Decode an image file with PIL into mode "L" (channels=1) or "RGB" (channels=3).

    A missing file raises FileNotFoundError, an undecodable or truncated one ValueError, both naming the file.
    """
    path = Path(path)
    try:
        with Image.open(path) as pil:
            return pil.convert("L" if channels == 1 else "RGB")  # convert() forces the full decode
    except FileNotFoundError as err:
        raise FileNotFoundError(f"image file {path} not found; restore it or drop it from the list") from err
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise ValueError(f"cannot decode image {path}: {err}; the file is corrupt, replace it") from err


def pil_to_tensor(
    pil: Image.Image, size: int, box: tuple[float, float, float, float] | None = None
) -> torch.Tensor:
    """Crop ``box`` (x0, y0, x1, y1; default: whole image) and resize -> (C, size, size) in [0, 1]."""
    pil = pil.resize((size, size), Image.Resampling.BILINEAR, box=box)
    array = np.asarray(pil, dtype=np.uint8)  # (S, S) or (S, S, 3)
    array = array[None] if array.ndim == 2 else array.transpose(2, 0, 1)
    return torch.from_numpy(array.copy()).float().div_(255.0)


class ImageFileSource(ImageSource):
    """Image files decoded lazily with PIL, converted to ``channels`` (1 or 3) and resized to a square."""

    def __init__(
        self,
        paths: Sequence[str | os.PathLike],
        targets: Sequence[int] | np.ndarray,
        channels: int,
        image_size: int,
    ) -> None:
        self.paths = [Path(p) for p in paths]
        self.targets = as_targets(targets)
        if len(self.paths) != len(self.targets):
            raise ValueError(f"{len(self.paths)} image paths but {len(self.targets)} labels")
        self.channels = channels
        self.image_size = image_size

    def load(self, i: int) -> dict[str, torch.Tensor]:
        return {"image": pil_to_tensor(open_image(self.paths[i], self.channels), self.image_size)}


def verify_images(paths: Sequence[Path], channels: int, verify: bool | str = "auto") -> None:
    """Decode every file once and raise one ValueError listing all that fail, so corrupt images surface before
    training rather than one per crash mid-epoch. ``verify``: True, False, or "auto" (only when there are at
    most ``VERIFY_AUTO_LIMIT`` files)."""
    if verify not in (True, False, "auto"):
        raise ValueError(f"verify must be true, false or auto, got {verify!r}")
    if verify is False or (verify == "auto" and len(paths) > VERIFY_AUTO_LIMIT):
        return
    start, bad = time.perf_counter(), []
    for path in paths:
        try:
            open_image(path, channels)
        except (FileNotFoundError, ValueError) as error:
            bad.append(f"{path} ({error.__cause__ or error})")
    log.info("verified %d image files in %.1f s", len(paths), time.perf_counter() - start)
    if bad:
        shown = "\n  ".join(bad[:50]) + (f"\n  ... and {len(bad) - 50} more" if len(bad) > 50 else "")
        raise ValueError(
            f"{len(bad)} of {len(paths)} image files cannot be decoded (data.verify):\n  {shown}\n"
            "replace or remove them (or set data.verify=false to find them one batch at a time)"
        )
