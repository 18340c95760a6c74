"""Feature extraction for OOD scoring: run ``module.extract`` over a dataset once, keep and cache the tensors.

Extracted features are a dict of CPU tensors with a shared first dimension N: whatever the model's
``extract()`` returns ("logits" (N, C), "features" (N, F), optionally "embedding" (N, E) and
"prototype_similarity" (N, P)) plus "label" (N,). Postprocessors score these instead of images, so one
extraction per dataset serves every postprocessor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler
from tqdm.auto import tqdm

from protolib.bank.distributed import all_gather, world_size
from protolib.utils.io import atomic_torch_save
from protolib.utils.modes import evaluating

log = logging.getLogger(__name__)

Features = dict[str, torch.Tensor]


def module_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter or buffer (CPU for a parameterless module)."""
    for tensor in (*model.parameters(), *model.buffers()):
        return tensor.device
    return torch.device("cpu")


@torch.no_grad()
def extract_batch(model: nn.Module, images: torch.Tensor) -> Features:
    """``model.extract(images)`` on the model's device, returned as detached float32 CPU tensors."""
    outputs = model.extract(images.to(module_device(model), non_blocking=True))
    if "logits" not in outputs:
        raise ValueError(f"{type(model).__name__}.extract() returned {sorted(outputs)} without 'logits'")
    return {
        key: value.detach().float().cpu() for key, value in outputs.items() if isinstance(value, torch.Tensor)
    }


def iter_extracted(
    model: nn.Module, loader: Iterable[Mapping[str, Any]], desc: str | None = None
) -> Iterator[Features]:
    """Yield extracted features (with "label" when batches have one) batch by batch; bounded memory."""
    with evaluating(model):
        for batch in tqdm(loader, desc=desc, disable=desc is None, leave=False):
            if "image" not in batch:
                raise ValueError(f"batches must be dicts with an 'image' entry, got keys {sorted(batch)}")
            features = extract_batch(model, batch["image"])
            if "label" in batch:
                features["label"] = torch.as_tensor(batch["label"]).long().cpu()
            yield features


def concat_features(chunks: Iterable[Features]) -> Features:
    """Concatenate per-batch feature dicts along the first dimension."""
    parts: dict[str, list[torch.Tensor]] = {}
    for chunk in chunks:
        for key, value in chunk.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        raise ValueError("no batches to extract features from: the dataset is empty")
    return {key: torch.cat(values) for key, values in parts.items()}


def extract_features(
    model: nn.Module, loader: Iterable[Mapping[str, Any]], desc: str | None = None
) -> Features:
    """All extracted features of ``loader`` in memory (see the module docstring for the keys)."""
    return concat_features(iter_extracted(model, loader, desc))


def extract_split_across_ranks(model: nn.Module, dataset: Any, batch_size: int) -> Features:
    """Extracted features of every item of ``dataset`` in order, each rank extracting only its share.

    Under DDP a ``DistributedSampler(shuffle=False)`` gives rank r the items r, r + W, ... (padded to equal
    length); the shares are all-gathered and interleaved back into dataset order, so every rank returns the
    same features as one process would. Without DDP this is a plain ordered extraction.
    """

    return map_split_across_ranks(model, dataset, batch_size, lambda loader: extract_features(model, loader))


def map_split_across_ranks(
    model: nn.Module, dataset: Any, batch_size: int, compute: Callable[[Iterable[Any]], Features]
) -> Features:
    """``compute(loader)`` (a dict of (n, ...) tensors, one row per item) over ``dataset`` in order, each
    rank computing only its share under DDP; see :func:`extract_split_across_ranks`."""
    if world_size() == 1:
        return compute(DataLoader(dataset, batch_size=batch_size, shuffle=False))
    sampler = DistributedSampler(dataset, shuffle=False)
    local = compute(DataLoader(dataset, batch_size=batch_size, sampler=sampler))
    device = module_device(model)
    gathered = {}
    for key, value in local.items():
        stacked = all_gather(value.to(device)).cpu()  # (W, n, ...): rank r's j-th item is r + j W
        gathered[key] = stacked.transpose(0, 1).reshape(-1, *value.shape[1:])[: len(dataset)]
    return gathered


def num_rows(features: Mapping[str, torch.Tensor]) -> int:
    """The shared first dimension of a features dict."""
    sizes = {key: int(value.shape[0]) for key, value in features.items()}
    if len(set(sizes.values())) != 1:
        raise ValueError(f"features disagree on the number of samples: {sizes}")
    return next(iter(sizes.values()))


def iter_chunks(features: Mapping[str, torch.Tensor], chunk_size: int) -> Iterator[Features]:
    """Row slices of ``features`` (views, no copies) of at most ``chunk_size`` rows."""
    total = num_rows(features)
    for start in range(0, total, chunk_size):
        yield {key: value[start : start + chunk_size] for key, value in features.items()}


class FeatureSource:
    """Re-iterable chunks of extracted features, from tensors already in memory or from a dataloader.

    Multi-pass fits (ViM) iterate it twice; from a dataloader each pass extracts again, one batch at a time
    (streaming fits such as Mahalanobis then never hold more than a batch of features).
    """

    def __init__(
        self,
        data: Mapping[str, torch.Tensor] | Iterable[Mapping[str, Any]],
        model: nn.Module | None = None,
        chunk_size: int = 4096,
    ) -> None:
        self.data, self.model, self.chunk_size = data, model, chunk_size
        self.in_memory = isinstance(data, Mapping)
        if not self.in_memory and model is None:
            raise ValueError("fitting from a dataloader needs the model to extract features with")

    def __iter__(self) -> Iterator[Features]:
        if self.in_memory:
            return iter_chunks(self.data, self.chunk_size)
        return iter_extracted(self.model, self.data)


def checkpoint_fingerprint(path: str | os.PathLike) -> dict[str, Any]:
    """What identifies a checkpoint file's contents cheaply: resolved path, size and modification time."""
    path = Path(path).resolve()
    stat = path.stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


class FeatureCache:
    """On-disk cache of extracted features keyed by (checkpoint fingerprint, dataset description).

    Files are ``<root>/<name>-<hash>.pt``; any change to the checkpoint file (path, size or mtime) or to the
    dataset description (its config and length) gives a new key, so stale features are never reused.
    """

    def __init__(self, root: str | os.PathLike, checkpoint: str | os.PathLike) -> None:
        self.root = Path(root)
        self.checkpoint = checkpoint_fingerprint(checkpoint)

    def path(self, name: str, description: Mapping[str, Any]) -> Path:
        key = json.dumps({"checkpoint": self.checkpoint, "dataset": description}, sort_keys=True, default=str)
        digest = hashlib.sha256(key.encode()).hexdigest()[:20]
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)
        return self.root / f"{safe}-{digest}.pt"

    def load_or_extract(
        self, name: str, description: Mapping[str, Any], model: nn.Module, loader: Iterable[Mapping[str, Any]]
    ) -> Features:
        """Cached features of ``name`` when present, else extract them (progress bar) and store them."""
        path = self.path(name, description)
        if path.is_file():
            log.info("features of %s: cached at %s", name, path)
            return torch.load(path, map_location="cpu", weights_only=True)
        features = extract_features(model, loader, desc=f"extract {name}")
        atomic_torch_save(path, features)
        log.info("features of %s: extracted, cached at %s", name, path)
        return features
