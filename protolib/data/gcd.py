"""Generalized category discovery data over any protolib datamodule: known / new classes, labelled subset.

The base datamodule (``classes: null``, two augmented views) supplies the images; this module relabels the
classes known first (``0..k-1`` in the order given) and the new ones after, labels a seeded fraction of each
known class's training images (`protolib.data.splits.labelled_unlabelled_split`), and serves:

- ``train_dataloader``: every training image, two views, ``"labelled"`` True/False and ``"label"`` = its
  class where labelled, -1 elsewhere; drawn by SimGCD's sampler, which gives the labelled and the unlabelled
  subsets equal total weight;
- ``test_dataloader``: ``[unlabelled training images, test images]`` (eval view, true labels) for the
  transductive and the inductive scores; ``val_dataloader``: the base validation images (all classes).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, WeightedRandomSampler

from protolib.data.base import VisionDataModule, VisionDataset, resolve_classes
from protolib.data.splits import labelled_unlabelled_split


class Relabelled(Dataset):
    """A base dataset's items, labels mapped through ``mapping`` (old -> new label), masked if asked."""

    def __init__(self, base: Dataset, mapping: np.ndarray, labelled: np.ndarray | None = None) -> None:
        self.base, self.mapping, self.labelled = base, mapping, labelled

    def __len__(self) -> int:
        return len(self.base)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item = dict(self.base[i])
        label = int(self.mapping[item["label"]])
        if self.labelled is not None:
            item["labelled"] = bool(self.labelled[i])
            label = label if self.labelled[i] else -1  # the training loop never sees unlabelled classes
        item["label"] = label
        return item


class Subset(Dataset):
    """Items ``positions`` of a dataset, with ``"index"`` kept as the position in the full dataset."""

    def __init__(self, base: Dataset, positions: np.ndarray) -> None:
        self.base, self.positions = base, positions

    def __len__(self) -> int:
        return len(self.positions)

    def __getitem__(self, i: int) -> dict[str, Any]:
        return self.base[int(self.positions[i])]


def balanced_sampler(labelled: np.ndarray, seed: int) -> WeightedRandomSampler:
    """SimGCD's sampler: weight 1 per labelled item and L/U per unlabelled one, N draws with replacement."""
    n_lab, n_unl = int(labelled.sum()), int((~labelled).sum())
    weights = torch.where(torch.as_tensor(labelled), 1.0, n_lab / n_unl).double()
    return WeightedRandomSampler(
        weights, num_samples=len(labelled), generator=torch.Generator().manual_seed(seed)
    )


class GCDDataModule(L.LightningDataModule):
    """GCD split of ``base`` (a `VisionDataModule` with all classes and ``num_views`` >= 2).

    Args:
        base: the datamodule whose images are used (e.g. digits with two SimCLR-style views).
        known_classes: names or indices of the classes some images are labelled of (an integer n: the first
            n classes, as the papers' splits of CIFAR); the others are new.
        labelled_fraction: share of each known class's training images that is labelled, in (0, 1).
        seed: seeds the labelled subset and the sampler.
        balance: draw with SimGCD's labelled/unlabelled-balancing sampler (else plain shuffling).
    """

    def __init__(
        self,
        base: VisionDataModule,
        known_classes: Sequence[int | str] | int,
        labelled_fraction: float = 0.5,
        seed: int = 0,
        balance: bool = True,
    ) -> None:
        super().__init__()
        if not 0.0 < float(labelled_fraction) < 1.0:
            raise ValueError(
                f"data.labelled_fraction={labelled_fraction} must be strictly between 0 and 1: with 0 "
                "nothing is labelled, with 1 no known-class image is left to discover; the papers use 0.5"
            )
        if base.classes is not None:
            raise ValueError(
                "data.base.classes must be null: GCD needs every class in the data (the new ones "
                "unlabelled); "
                "name the labelled ones in data.known_classes"
            )
        if base.num_views < 2:
            raise ValueError(
                "data.base.num_views must be 2 (with data.base.train_transforms): SimGCD's losses contrast "
                "two "
                "augmented views of each image"
            )
        if isinstance(known_classes, int) and not isinstance(known_classes, bool):
            known_classes = list(range(known_classes))
        if isinstance(known_classes, str) or not known_classes:
            raise ValueError(
                f"data.known_classes must be a non-empty list of names or ids, got {known_classes!r}"
            )
        self.base = base
        self.known_classes = list(known_classes)
        self.labelled_fraction = float(labelled_fraction)
        self.seed = seed
        self.balance = balance
        self.num_classes: int | None = None
        self.num_known_classes: int | None = None
        self.class_names: list[str] | None = None

    @property
    def in_channels(self) -> int:
        return self.base.in_channels

    @property
    def image_size(self) -> int:
        return self.base.image_size

    def prepare_data(self) -> None:
        self.base.prepare_data()

    def setup(self, stage: str | None = None) -> None:
        """Set up the base, relabel known-first, draw the labelled subset (once)."""
        if self.num_classes is not None:
            return
        self.base.setup(stage)
        names = list(self.base.class_names)
        try:
            known = resolve_classes(self.known_classes, names)
        except ValueError as error:
            raise ValueError(f"data.known_classes: {error}") from error
        new = [c for c in range(len(names)) if c not in known]
        if not new:
            raise ValueError(
                f"data.known_classes names every class ({len(names)}): GCD needs new classes to discover; "
                "leave some out of known_classes"
            )
        order = known + new  # new label -> base label
        mapping = np.empty(len(names), dtype=np.int64)
        mapping[order] = np.arange(len(names))  # base label -> new label
        self.mapping = mapping
        self.num_classes, self.num_known_classes = len(names), len(known)
        self.class_names = [names[c] for c in order]
        train: VisionDataset = self.base.train_dataset
        targets = mapping[train.targets.numpy()]  # (N,) new labels
        lab, unl = labelled_unlabelled_split(targets, range(len(known)), self.labelled_fraction, self.seed)
        if any(np.sum(targets[lab] == c) == 0 for c in range(len(known))):
            raise ValueError(
                f"data.labelled_fraction={self.labelled_fraction} labels no image of some known class; "
                "raise it (or use more images per class)"
            )
        self.labelled_mask = np.zeros(len(train), dtype=bool)
        self.labelled_mask[lab] = True
        self.train_dataset = Relabelled(train, mapping, self.labelled_mask)
        eval_train = Relabelled(train.eval_view(), mapping)
        self.labelled_dataset = Subset(eval_train, lab)  # eval view of the labelled images (K estimation)
        self.unlabelled_dataset = Subset(eval_train, unl)  # the transductive evaluation set
        self.val_dataset = Relabelled(self.base.val_dataset, mapping)
        self.test_dataset = Relabelled(self.base.test_dataset, mapping)

    def _loader(self, dataset: Dataset, **kwargs: Any) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.base.batch_size,
            num_workers=self.base.num_workers,
            persistent_workers=self.base.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
            **kwargs,
        )

    def train_dataloader(self) -> DataLoader:
        """Two-view batches of all training images; SimGCD's balancing sampler, last partial batch dropped."""
        if self.balance:
            sampler = balanced_sampler(self.labelled_mask, self.seed)
            return self._loader(self.train_dataset, sampler=sampler, drop_last=True)
        return self._loader(self.train_dataset, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)

    def test_dataloader(self) -> list[DataLoader]:
        """[unlabelled training images (transductive), test images (inductive)], eval view, true labels."""
        return [self._loader(self.unlabelled_dataset), self._loader(self.test_dataset)]

    def features_dataloader(self) -> DataLoader:
        """Every training image in order (eval view, true labels): for clustering and K estimation."""
        return self._loader(Relabelled(self.base.train_dataset.eval_view(), self.mapping))

    def denormalize(self, images: torch.Tensor) -> torch.Tensor:
        return self.base.denormalize(images)
