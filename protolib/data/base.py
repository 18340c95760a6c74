"""The datamodule all datasets share: class subsets, validation carving, augmentation, normalisation, loaders.

A format subclass only implements ``load_splits()`` (its train/val/test `ImageSource`s and class names);
`VisionDataModule.setup` turns those into `VisionDataset`s whose items are the contract's dicts
{"image" (C, H, W) normalised, "label", "index", extras such as "part_mask" or "part_locs"}.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision import tv_tensors
from torchvision.transforms import v2

from protolib.bank.distributed import RankShardSampler, world_size
from protolib.data.sources import ImageSource, visible_part_locs
from protolib.data.splits import stratified_split

SPLITS = ("train", "val", "test")
LUMA = (0.299, 0.587, 0.114)  # ITU-R 601 weights for RGB -> grayscale


def convert_channels(image: torch.Tensor, channels: int) -> torch.Tensor:
    """(C, H, W) -> (channels, H, W): grayscale repeated to RGB, RGB reduced to luminance."""
    if image.shape[0] == channels:
        return image
    if image.shape[0] == 1 and channels == 3:
        return image.repeat(3, 1, 1)
    if image.shape[0] == 3 and channels == 1:
        return torch.tensordot(image.new_tensor(LUMA), image, dims=1)[None]
    raise ValueError(f"cannot convert a {image.shape[0]}-channel image to {channels} channels")


@dataclass(frozen=True)
class Pipeline:
    """Per-item processing after decoding: channel conversion, optional augmentation (V views), normalisation.

    ``transform`` sees the float image in [0, 1] as a ``tv_tensors.Image`` together with "part_mask" as a
    ``Mask`` and "part_locs" as ``KeyPoints``, so geometric augmentations move masks and part locations too.
    """

    in_channels: int
    mean: torch.Tensor  # (C, 1, 1)
    std: torch.Tensor  # (C, 1, 1)
    transform: Callable[[Any], Any] | None = None
    num_views: int = 1

    def eval(self) -> Pipeline:
        """The same pipeline without augmentation and with a single view."""
        return replace(self, transform=None, num_views=1)

    def __call__(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        sample = {**sample, "image": convert_channels(sample["image"], self.in_channels)}
        augment = self._augment if self.transform is not None else dict
        views = [augment(sample) for _ in range(self.num_views)]
        views = [{**view, "image": (view["image"] - self.mean) / self.std} for view in views]
        if self.num_views == 1:
            return views[0]
        return {key: torch.stack([view[key] for view in views]) for key in views[0]}  # (V, ...) per key

    def _augment(self, sample: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        image = sample["image"]  # (C, H, W)
        size = tuple(image.shape[-2:])
        wrapped: dict[str, Any] = {**sample, "image": tv_tensors.Image(image)}
        if "part_mask" in sample:
            wrapped["part_mask"] = tv_tensors.Mask(sample["part_mask"])
        if "part_locs" in sample:
            wrapped["part_locs"] = tv_tensors.KeyPoints(sample["part_locs"][:, :2], canvas_size=size)
        out = self.transform(wrapped)
        if not isinstance(out, dict) or "image" not in out:
            raise ValueError(f"train_transforms must return the dict they are given, got {type(out)}")
        result = {
            key: value.as_subclass(torch.Tensor) if isinstance(value, torch.Tensor) else value
            for key, value in out.items()
        }
        if result["image"].shape != image.shape:
            raise ValueError(
                f"train_transforms changed the image shape from {tuple(image.shape)} to "
                f"{tuple(result['image'].shape)}; use transforms that keep image_size "
                f"(e.g. RandomResizedCrop(size={size[0]}) rather than a different size)"
            )
        if "part_locs" in sample:
            result["part_locs"] = visible_part_locs(result["part_locs"], sample["part_locs"][:, 2], size)
        return result


class VisionDataset(Dataset):
    """Selected samples of a source with labels remapped to 0..K-1; items are contract dicts.

    ``targets`` (N,) long holds the remapped label of every item; ``index`` in an item is its position here.
    """

    def __init__(
        self,
        source: ImageSource,
        indices: np.ndarray,
        targets: torch.Tensor,
        class_names: list[str],
        pipeline: Pipeline,
    ) -> None:
        self.source = source
        self.indices = indices  # (N,) positions in source
        self.targets = targets  # (N,) long
        self.class_names = class_names
        self.pipeline = pipeline

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = self.pipeline(self.source.load(int(self.indices[i])))
        return {**item, "label": int(self.targets[i]), "index": i}

    def eval_view(self) -> VisionDataset:
        """The same samples in the same order with the evaluation pipeline: no augmentation, one view."""
        return VisionDataset(self.source, self.indices, self.targets, self.class_names, self.pipeline.eval())


class SplitSources(NamedTuple):
    """What a format loads: one source per split (val None when the format has none) and the class names."""

    train: ImageSource
    val: ImageSource | None
    test: ImageSource
    class_names: list[str]


def resolve_classes(classes: Sequence[int | str] | None, names: Sequence[str]) -> list[int]:
    """Class ids selected by ``classes`` (names or indices, in the given order); all classes when None."""
    if classes is None:
        return list(range(len(names)))
    valid = f"valid names are {list(names)} (or indices 0..{len(names) - 1})"
    by_name = {name: i for i, name in enumerate(names)}
    ids = []
    for c in classes:
        if isinstance(c, str):
            if c not in by_name:
                raise ValueError(f"unknown class {c!r} in classes; {valid}")
            ids.append(by_name[c])
        elif isinstance(c, (int, np.integer)) and not isinstance(c, bool):
            if not 0 <= c < len(names):
                raise ValueError(f"class index {c} in classes is out of range; {valid}")
            ids.append(int(c))
        else:
            raise ValueError(f"classes entries must be names or integer indices, got {c!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"classes names a class twice: {list(classes)}")
    if not ids:
        raise ValueError(f"classes is empty; name at least one class: {valid}")
    return ids


def resolve_stats(
    values: Sequence[float] | None, default: Sequence[float], channels: int, name: str
) -> torch.Tensor:
    """Normalisation ``mean``/``std`` as a (C, 1, 1) tensor; one value is broadcast, a default adapts to C."""
    if values is None:
        values = [sum(default) / len(default)] if channels == 1 and len(default) == 3 else list(default)
    values = [float(v) for v in values]
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"{name} has {len(values)} values for {channels} channels; give 1 or {channels}")
    if name == "std" and min(values) <= 0:
        raise ValueError(f"std must be positive, got {values}")
    return torch.tensor(values).view(channels, 1, 1)


class VisionDataModule(L.LightningDataModule):
    """Train/val/test datasets of one image format, with the options every format shares.

    Args:
        image_size: side of the square images the datasets return.
        batch_size: batch size of every dataloader.
        num_workers: dataloader worker processes (persistent when > 0).
        seed: seeds every split this module makes (validation carving, format-specific splits).
        val_fraction: fraction of each training class carved out as validation if the format has no val split.
        classes: class names or indices to keep as in-distribution, relabelled 0..K-1 in the given order;
            the others are reachable with `held_out_dataset`. None keeps all classes.
        train_transforms: torchvision.transforms.v2 transforms (a list, composed in order) applied to the
            float training image in [0, 1] before normalisation; they must keep the image size.
        num_views: >1 makes a training item's "image" a (V, C, H, W) stack of independently augmented views.
        mean, std: normalisation per channel (one value is broadcast); None uses the format's statistics.
        in_channels: 1 or 3; images of the other kind are converted (gray repeated / RGB to luminance).
    """

    default_mean: tuple[float, ...] = (0.5,)
    default_std: tuple[float, ...] = (0.5,)

    def __init__(
        self,
        image_size: int,
        in_channels: int,
        batch_size: int = 64,
        num_workers: int = 0,
        seed: int = 0,
        val_fraction: float = 0.1,
        classes: Sequence[int | str] | None = None,
        train_transforms: Sequence[Callable[[Any], Any]] | Callable[[Any], Any] | None = None,
        num_views: int = 1,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        super().__init__()
        integers = {
            "image_size": (image_size, 1),
            "batch_size": (batch_size, 1),
            "num_workers": (num_workers, 0),
            "seed": (seed, 0),
            "num_views": (num_views, 1),
        }
        for name, (value, low) in integers.items():
            if not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
        if in_channels not in (1, 3):
            raise ValueError(f"in_channels must be 1 or 3, got {in_channels!r}")
        if not 0.0 < val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
        if num_views > 1 and train_transforms is None:
            raise ValueError(f"num_views={num_views} needs train_transforms, or every view is identical")
        self.image_size = image_size
        self.in_channels = in_channels
        self.batch_size = batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.val_fraction = val_fraction
        if isinstance(classes, (str, int)):
            raise ValueError(f"classes must be a list of class names or indices, got {classes!r}")
        self.classes = None if classes is None else list(classes)
        self.num_views = num_views
        self.mean = resolve_stats(mean, self.default_mean, in_channels, "mean")
        self.std = resolve_stats(std, self.default_std, in_channels, "std")
        if train_transforms is None or callable(train_transforms):
            self.train_transform = train_transforms
        else:
            self.train_transform = v2.Compose(list(train_transforms))
        self.train_dataset: VisionDataset | None = None
        self.val_dataset: VisionDataset | None = None
        self.test_dataset: VisionDataset | None = None
        self.num_classes: int | None = None
        self.class_names: list[str] | None = None
        self.class_ids: list[int] | None = None  # original ids of the kept classes, in label order
        self.held_out_class_names: list[str] = []

    def load_splits(self) -> SplitSources:
        """Load the format's sources; implemented by each format."""
        raise NotImplementedError

    def load_test_split(self) -> tuple[ImageSource, list[str]]:
        """The test source and the class names alone; formats that can read them without the training files
        override this, so that a set used only for testing (an OOD set) needs only its test files."""
        splits = self.load_splits()
        return splits.test, splits.class_names

    def standalone_test_dataset(self) -> VisionDataset:
        """The test split of the selected classes (eval pipeline) without `setup`: `load_test_split` only."""
        if self.test_dataset is not None:
            return self.test_dataset
        source, names = self.load_test_split()
        ids = resolve_classes(self.classes, names)
        self._samples = {"test": (source, np.arange(len(source)))}
        self._pipeline = Pipeline(self.in_channels, self.mean, self.std)
        return self._select("test", ids, [names[c] for c in ids])

    def setup(self, stage: str | None = None) -> None:
        """Load the data once (later calls do nothing), select classes, carve validation, build datasets."""
        if self.train_dataset is not None:
            return
        splits = self.load_splits()
        for split, source in zip(SPLITS, splits[:3], strict=True):
            labels = source.targets if source is not None else torch.zeros(0)
            if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(splits.class_names):
                raise ValueError(
                    f"{type(self).__name__}: {split} labels span {int(labels.min())}..{int(labels.max())} "
                    f"but there are {len(splits.class_names)} classes; the label and class files do not match"
                )
        self.class_ids = resolve_classes(self.classes, splits.class_names)
        self.class_names = [splits.class_names[c] for c in self.class_ids]
        self.num_classes = len(self.class_ids)
        held_ids = [c for c in range(len(splits.class_names)) if c not in self.class_ids]
        self.held_out_class_names = [splits.class_names[c] for c in held_ids]
        # (source, positions in it) per split; validation is carved from train when the format has none
        if splits.val is None:
            train_idx, val_idx = stratified_split(splits.train.targets, self.val_fraction, self.seed)
            self._samples = {"train": (splits.train, train_idx), "val": (splits.train, val_idx)}
        else:
            self._samples = {
                "train": (splits.train, np.arange(len(splits.train))),
                "val": (splits.val, np.arange(len(splits.val))),
            }
        self._samples["test"] = (splits.test, np.arange(len(splits.test)))
        self._held_ids = held_ids
        self._pipeline = Pipeline(self.in_channels, self.mean, self.std)
        self.train_dataset = self._select("train", self.class_ids, self.class_names, augment=True)
        self.val_dataset = self._select("val", self.class_ids, self.class_names)
        self.test_dataset = self._select("test", self.class_ids, self.class_names)
        counts = torch.bincount(self.train_dataset.targets, minlength=self.num_classes)
        empty = [self.class_names[k] for k in torch.nonzero(counts == 0).flatten().tolist()]
        if empty:
            raise ValueError(f"classes {empty} have no training samples; drop them from classes or add data")

    def _select(
        self, split: str, class_ids: list[int], names: list[str], offset: int = 0, augment: bool = False
    ) -> VisionDataset:
        """Samples of ``split`` whose class is in ``class_ids``, labelled ``offset`` + position there.

        ``names`` are the class names of the dataset's labels (indexed by label).
        """
        source, idx = self._samples[split]
        original = source.targets[torch.as_tensor(idx, dtype=torch.long)]  # (N,)
        match = original[:, None] == torch.as_tensor(class_ids)[None, :]  # (N, K)
        keep = match.any(dim=1)
        if not bool(keep.any()):
            selected = names[offset : offset + len(class_ids)]
            shown = f"{selected[:10]}{f' (and {len(selected) - 10} more)' if len(selected) > 10 else ''}"
            raise ValueError(
                f"the {split} split has no samples of classes {shown}; choose other classes, "
                f"a larger dataset or a different val_fraction"
            )
        labels = offset + match[keep].int().argmax(dim=1).long()
        pipeline = self._pipeline
        if augment and self.train_transform is not None:
            pipeline = replace(pipeline, transform=self.train_transform, num_views=self.num_views)
        return VisionDataset(source, idx[keep.numpy()], labels, names, pipeline)

    def held_out_dataset(self, split: str = "test") -> VisionDataset:
        """Samples of ``split`` from the classes left out of ``classes`` (eval pipeline), e.g. as OOD data.

        Their labels continue after the in-distribution ones: num_classes + position in held_out_class_names,
        and the dataset's ``class_names`` are ``class_names + held_out_class_names``.
        """
        self._require_setup()
        if split not in SPLITS:
            raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
        if not self._held_ids:
            raise ValueError("no classes are held out; set classes to a subset to hold the others out")
        names = self.class_names + self.held_out_class_names
        return self._select(split, self._held_ids, names, offset=self.num_classes)

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError(f"{type(self).__name__}.setup() must be called before using its datasets")

    def _loader(self, dataset: Dataset, shuffle: bool, sampler: Sampler | None = None) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.batch_size,
            shuffle=shuffle,
            sampler=sampler,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
            persistent_workers=self.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled, augmented training batches."""
        self._require_setup()
        return self._loader(self.train_dataset, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_dataset, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.test_dataset, shuffle=False)

    def push_dataloader(self) -> DataLoader:
        """Training images in order with the eval transform; "index" is the index into ``train_dataset``.

        Under DDP each rank gets its share (items r, r + W, ...: `RankShardSampler`), so a push or prune costs
        every rank 1/W of the data; the bank's reverse search gathers the ranks' best candidates. Its
        ``dataset`` is always the whole push set (provenance indexes it).
        """
        self._require_setup()
        dataset = self.train_dataset.eval_view()
        sampler = RankShardSampler(dataset) if world_size() > 1 else None
        return self._loader(dataset, shuffle=False, sampler=sampler)

    def held_out_dataloader(self, split: str = "test") -> DataLoader:
        """Batches of `held_out_dataset`, in order."""
        return self._loader(self.held_out_dataset(split), shuffle=False)

    def foreground_mask(self, item: dict[str, Any]) -> torch.Tensor | None:
        """(H, W) bool: the pixels of a dataset item that show the object, or None when the format does not
        know (then push-quality measures skip the background share)."""
        return None

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        """Undo normalisation of (..., C, H, W) images -> values in [0, 1] for pictures."""
        mean = self.mean.to(images.device, images.dtype)
        std = self.std.to(images.device, images.dtype)
        return (images * std + mean).clamp(0.0, 1.0)
