"""Build an OOD benchmark from its config: ID train/val/test datasets and near-/far-OOD sets in the ID format.

A benchmark config (``conf/ood/benchmark/<name>.yaml``) has

- ``id.datamodule``: the ID datamodule config; null = the data config stored in the checkpoint (what the model
  was trained on), ``id.overrides`` merged into it (e.g. ``classes``). It gives the ID format (channels, size,
  normalisation) and, unless ``id.datasets`` is set, the ID splits (train with the eval transform, val, test).
- ``id.datasets``: optional ``{train, val, test}`` dataset specs (e.g. OpenOOD image lists) replacing the
  datamodule's splits; the datamodule is then only asked for the format, never set up.
- ``near`` / ``far``: name -> OOD set spec, one of ``{held_out: <split>}`` (the ID datamodule's held-out
  classes; left out with a note when the model was trained on every class), ``{datamodule: <config>,
  split: <split>}`` (``split: test`` reads only the test files where the format can) or
  ``{dataset: <config>}``.

Every set is built before any feature is extracted; all missing files are reported together.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch.utils.data import Dataset, Subset

from protolib.ood.datasets import InDistributionFormat
from protolib.utils.config import instantiate_accepting

T = TypeVar("T")
GROUPS = ("near", "far")
ID_SPLITS = ("train", "val", "test")


@dataclass
class DataSet:
    """One dataset of a benchmark and the description its cached features are keyed by."""

    name: str
    dataset: Dataset
    description: dict[str, Any]
    group: str = "id"

    def __post_init__(self) -> None:
        # a size cap (max_samples) changes the data: it must change the cache key too
        self.description = {**self.description, "length": len(self.dataset)}  # type: ignore[arg-type]


@dataclass
class Benchmark:
    """ID splits, OOD sets by group, and the ID format every set is shown in."""

    name: str
    id_splits: dict[str, DataSet]
    ood: list[DataSet]
    in_channels: int
    image_size: int
    mean: torch.Tensor  # (C, 1, 1)
    std: torch.Tensor  # (C, 1, 1)
    num_classes: int | None = None  # of the ID datamodule, when it was set up
    notes: list[str] = field(default_factory=list)  # what was left out of the config and why

    def groups(self) -> dict[str, list[DataSet]]:
        """OOD sets per group, in config order."""
        return {group: [s for s in self.ood if s.group == group] for group in GROUPS}


def to_container(config: Any) -> Any:
    """Plain Python containers of a (possibly OmegaConf) config, interpolations resolved."""
    if isinstance(config, DictConfig) or OmegaConf.is_config(config):
        return OmegaConf.to_container(config, resolve=True)
    return config


def missing_file(error: BaseException) -> FileNotFoundError | None:
    """The FileNotFoundError behind ``error`` (Hydra wraps constructor errors), or None."""
    while error is not None:
        if isinstance(error, FileNotFoundError):
            return error
        error = error.__cause__
    return None


def limit(dataset: Dataset, max_samples: int | None) -> Dataset:
    """The first ``max_samples`` items of ``dataset`` (all when None)."""
    if max_samples is None or len(dataset) <= max_samples:  # type: ignore[arg-type]
        return dataset
    return Subset(dataset, range(max_samples))


def id_datamodule_config(
    id_config: Mapping[str, Any], checkpoint_data: Mapping[str, Any] | None
) -> dict[str, Any]:
    """The ID datamodule config: ``id.datamodule`` or the checkpoint's, with ``id.overrides`` merged in.

    A category-discovery checkpoint's data (`protolib.data.gcd.GCDDataModule`) becomes its base datamodule
    with one eval view: the model was trained on every class of it (the new ones unlabelled), so all are ID.
    """
    base = id_config.get("datamodule") or checkpoint_data
    if base is not None and str(base.get("_target_", "")).endswith("GCDDataModule") and "base" in base:
        base = {**base["base"], "num_views": 1, "train_transforms": None}
    if base is None:
        raise ValueError(
            "the benchmark takes its ID data from the checkpoint (benchmark.id.datamodule is null), but the "
            "checkpoint stores no data config; set benchmark.id.datamodule to the data config the model was "
            "trained with"
        )
    merged = OmegaConf.merge(
        OmegaConf.create(dict(base)), OmegaConf.create(dict(id_config.get("overrides") or {}))
    )
    return OmegaConf.to_container(merged, resolve=True)  # type: ignore[return-value]


class MissingData:
    """Collects missing-file errors so that one FileNotFoundError can list every missing dataset at once."""

    def __init__(self) -> None:
        self.messages: list[str] = []

    def attempt(self, label: str, build: Callable[[], T]) -> T | None:
        """``build()``, or None (and a note) when it fails for a missing file; other errors propagate."""
        try:
            return build()
        except (FileNotFoundError, InstantiationException) as err:
            cause = missing_file(err)
            if cause is None:
                raise
            self.messages.append(f"{label}: {cause}")
            return None

    def raise_if_any(self, benchmark: str, root: str | None = None) -> None:
        if self.messages:
            hint = (
                f"\nbenchmark.root is {root}: point it at the data (benchmark.root=<folder>)" if root else ""
            )
            raise FileNotFoundError(
                f"benchmark {benchmark}: {len(self.messages)} dataset(s) missing; expected:\n"
                "  - " + "\n  - ".join(self.messages) + hint
            )


def build_benchmark(
    config: Mapping[str, Any] | DictConfig,
    checkpoint_data: Mapping[str, Any] | None = None,
    max_samples: int | None = None,
) -> Benchmark:
    """Instantiate every dataset of the benchmark ``config``; FileNotFoundError lists every missing path."""
    config = to_container(config)
    name = config.get("name", "benchmark")
    id_config = config.get("id") or {}
    unknown = sorted(set(config) - {"name", "root", "id", "near", "far"}) or sorted(
        f"id.{key}" for key in set(id_config) - {"datamodule", "overrides", "datasets"}
    )
    if unknown:
        raise ValueError(
            f"benchmark {name} has unknown keys {unknown}; allowed: name, root, near, far and "
            "id.{datamodule, overrides, datasets}"
        )
    missing = MissingData()
    dm_config = id_datamodule_config(id_config, checkpoint_data)
    datamodule = missing.attempt("ID datamodule", lambda: instantiate(dm_config))
    missing.raise_if_any(name)  # without it there is no ID format to show anything in
    for attribute in ("mean", "std", "in_channels", "image_size"):
        if not hasattr(datamodule, attribute):
            raise ValueError(
                f"ID datamodule {type(datamodule).__name__} has no {attribute!r}: use a VisionDataModule"
            )
    fmt = {"in_channels": datamodule.in_channels, "image_size": datamodule.image_size}
    mean, std = datamodule.mean.float(), datamodule.std.float()

    def set_up() -> bool:
        datamodule.prepare_data()
        datamodule.setup("fit")
        return True

    id_datasets = id_config.get("datasets")
    ood_specs = [
        (group, set_name, spec)
        for group in GROUPS
        for set_name, spec in (config.get(group) or {}).items()
        if spec is not None
    ]  # null = switched off
    needs_setup = not id_datasets or any("held_out" in spec for _, _, spec in ood_specs)
    ready = needs_setup and missing.attempt(f"ID data ({type(datamodule).__name__})", set_up)

    id_splits: dict[str, DataSet] = {}
    if id_datasets:
        for split, spec in id_datasets.items():
            dataset = missing.attempt(
                f"ID {split}",
                lambda spec=spec: InDistributionFormat(
                    instantiate_accepting(spec, **fmt), **fmt, mean=mean, std=std, keep_labels=True
                ),
            )
            if dataset is not None:
                id_splits[split] = DataSet(
                    f"id_{split}",
                    limit(dataset, max_samples),
                    {"benchmark": name, "split": split, "spec": spec, "format": fmt},
                )
    elif ready:
        sources = {
            "train": datamodule.push_dataloader().dataset,
            "val": datamodule.val_dataset,
            "test": datamodule.test_dataset,
        }
        for split, dataset in sources.items():
            if dataset is not None and len(dataset) > 0:
                id_splits[split] = DataSet(
                    f"id_{split}",
                    limit(dataset, max_samples),
                    {"benchmark": name, "split": split, "datamodule": dm_config},
                )

    ood: list[DataSet] = []
    notes: list[str] = []
    for group, set_name, spec in ood_specs:
        if "held_out" in spec and not ready:
            continue  # the ID data is missing, and already reported
        if "held_out" in spec and not datamodule.held_out_class_names:
            notes.append(
                f"{group}-OOD {set_name} left out: the model was trained on every class of "
                f"{type(datamodule).__name__}, none is held out (train with data.classes=[...] to have some)"
            )
            continue
        dataset = missing.attempt(
            f"{group}-OOD {set_name}", lambda spec=spec: build_ood_set(spec, datamodule, fmt, mean, std)
        )
        if dataset is not None:
            description = {
                "benchmark": name,
                "group": group,
                "set": set_name,
                "spec": spec,
                "id_datamodule": dm_config,
                "format": fmt,
            }
            ood.append(DataSet(set_name, limit(dataset, max_samples), description, group))

    missing.raise_if_any(name, config.get("root"))
    unknown_splits = sorted(set(id_splits) - set(ID_SPLITS))
    if unknown_splits or "test" not in id_splits:
        raise ValueError(
            f"benchmark {name}: ID splits must include test and be among {list(ID_SPLITS)}, "
            f"got {sorted(id_splits)}"
        )
    if not ood:
        left = "".join(f"; {note}" for note in notes)
        raise ValueError(f"benchmark {name} has no OOD set{left}; add entries under near: or far:")
    num_classes = datamodule.num_classes if ready else None
    return Benchmark(
        name, id_splits, ood, fmt["in_channels"], fmt["image_size"], mean, std, num_classes, notes
    )


def build_ood_set(
    spec: Mapping[str, Any], id_datamodule: Any, fmt: Mapping[str, int], mean: torch.Tensor, std: torch.Tensor
) -> Dataset:
    """One OOD set in the ID format from its spec (see the module docstring)."""
    kinds = [key for key in ("held_out", "datamodule", "dataset") if key in spec]
    if len(kinds) != 1:
        raise ValueError(
            f"an OOD set needs exactly one of held_out, datamodule or dataset; got {sorted(spec)}"
        )
    if kinds[0] == "held_out":
        return id_datamodule.held_out_dataset(spec["held_out"])  # same datamodule: already in the ID format
    if kinds[0] == "datamodule":
        datamodule = instantiate_accepting(spec["datamodule"], **fmt)
        datamodule.prepare_data()
        split = spec.get("split", "test")
        if split not in ID_SPLITS:
            raise ValueError(
                f"{type(datamodule).__name__} has no {split!r} split; use one of {list(ID_SPLITS)}"
            )
        if split == "test" and hasattr(datamodule, "standalone_test_dataset"):
            dataset = datamodule.standalone_test_dataset()  # a test-only set needs only its test files
        else:
            datamodule.setup("fit")
            dataset = getattr(datamodule, f"{split}_dataset")
        return InDistributionFormat(
            dataset, **fmt, mean=mean, std=std, source_mean=datamodule.mean, source_std=datamodule.std
        )
    return InDistributionFormat(instantiate_accepting(spec["dataset"], **fmt), **fmt, mean=mean, std=std)
