"""Any folder of images sorted into one subfolder per class, optionally already split into train/val/test."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from protolib.data.base import SplitSources, VisionDataModule
from protolib.data.sources import ImageFileSource, require_file, verify_images
from protolib.data.splits import stratified_split

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm"})
LAYOUT = "expected root/<class>/<image> or root/{train,val,test}/<class>/<image>"


def scan_classes(folder: Path) -> dict[str, list[Path]]:
    """Class name -> sorted image files (any depth) in each subfolder of ``folder``, hidden ones skipped."""
    classes = {}
    for class_dir in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        files = sorted(
            p
            for p in class_dir.rglob("*")
            if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file() and not p.name.startswith(".")
        )
        if not files:
            raise ValueError(
                f"class folder {class_dir} holds no images "
                f"({', '.join(sorted(IMAGE_EXTENSIONS))}); add images or remove the folder"
            )
        classes[class_dir.name] = files
    if not classes:
        raise ValueError(f"{folder} has no class subfolders; {LAYOUT}")
    return classes


class ImageFolderDataModule(VisionDataModule):
    """Images in ``root/<class>/``; if ``root/train/`` has class folders, ``root/{train,val,test}/<class>/``.

    Class names are the training folder names, sorted. A missing test split is carved from the training
    images (``test_fraction`` of each class, seeded); a missing val split is carved by ``val_fraction``.

    Args:
        root: the dataset folder.
        image_size: side of the returned square images (each image is resized, aspect ratio not kept).
        in_channels: 3 (RGB) or 1 (grayscale); images are converted on decoding.
        test_fraction: fraction of each class held out for testing when there is no ``test/`` folder.
        verify: decode every image once in ``setup`` and report all bad files together: True, False, or
            "auto" (when there are at most ``sources.VERIFY_AUTO_LIMIT`` files).
        **kwargs: common options of `VisionDataModule` (batch_size, val_fraction, classes, ...).
    """

    default_mean = (0.485, 0.456, 0.406)  # ImageNet statistics, as pretrained backbones expect
    default_std = (0.229, 0.224, 0.225)

    def __init__(
        self,
        root: str | Path,
        image_size: int = 224,
        in_channels: int = 3,
        test_fraction: float = 0.2,
        verify: bool | str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__(image_size=image_size, in_channels=in_channels, **kwargs)
        if not 0.0 < test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
        self.root = Path(root)
        self.test_fraction = test_fraction
        self.verify = verify

    def _source(self, classes: dict[str, list[Path]], names: list[str], folder: Path) -> ImageFileSource:
        unknown = sorted(set(classes) - set(names))
        if unknown:
            raise ValueError(
                f"{folder} has class folders {unknown} that the training folder lacks; "
                f"training classes are {names}"
            )
        paths = [path for name in classes for path in classes[name]]
        label_of = {name: label for label, name in enumerate(names)}
        labels = [label_of[name] for name in classes for _ in classes[name]]
        return ImageFileSource(paths, labels, self.in_channels, self.image_size)

    def load_splits(self) -> SplitSources:
        require_file(self.root, f"Point root at a folder of images: {LAYOUT}.")
        train_dir = self.root / "train"
        split_layout = train_dir.is_dir() and any(p.is_dir() for p in train_dir.iterdir())
        train_dir = train_dir if split_layout else self.root
        train_classes = scan_classes(train_dir)
        names = list(train_classes)
        train = self._source(train_classes, names, train_dir)
        val = test = None
        if split_layout and (self.root / "val").is_dir():
            val = self._source(scan_classes(self.root / "val"), names, self.root / "val")
        if split_layout and (self.root / "test").is_dir():
            test = self._source(scan_classes(self.root / "test"), names, self.root / "test")
        if test is None:
            train_idx, test_idx = stratified_split(train.targets, self.test_fraction, self.seed)
            channels_size = (self.in_channels, self.image_size)
            train, test = (
                ImageFileSource([train.paths[i] for i in idx], train.targets[idx], *channels_size)
                for idx in (train_idx, test_idx)
            )
        paths = [path for source in (train, val, test) if source is not None for path in source.paths]
        verify_images(paths, self.in_channels, self.verify)
        return SplitSources(train, val, test, names)
