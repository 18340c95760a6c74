"""Evaluate OOD detection of a model on a benchmark: extract once per dataset, fit and run postprocessors.

Metrics follow OpenOOD v1.5: one row per (postprocessor, OOD set), and per group (near, far) the mean of its
sets' metrics; ID accuracy on the ID test split.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from protolib.ood.benchmark import Benchmark, DataSet
from protolib.ood.features import FeatureCache, Features, extract_batch, extract_features, iter_chunks
from protolib.ood.metrics import METRIC_NAMES, ood_metrics
from protolib.ood.postprocessors import Postprocessor

log = logging.getLogger(__name__)
ID_SCORES = "id"  # key of the ID test scores in OODResults.scores


@dataclass
class OODResults:
    """Everything a report needs: metric rows, ID accuracy and the raw scores."""

    benchmark: str
    id_accuracy: float | None
    # postprocessor, group, dataset, summary (True: group mean), num_id, num_ood, METRIC_NAMES (fractions)
    rows: list[dict[str, Any]]
    scores: dict[str, dict[str, np.ndarray]]  # postprocessor -> {"id": (N,), <ood set>: (M,)}
    groups: dict[str, list[str]]  # group -> OOD set names
    meta: dict[str, Any] = field(default_factory=dict)


def group_mean(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Mean of each metric over ``rows`` (OpenOOD's near-/far-OOD summary)."""
    return {name: float(np.mean([row[name] for row in rows])) for name in METRIC_NAMES}


class OODEvaluator:
    """Runs ``postprocessors`` (name -> instance) for ``model`` on ``benchmark``.

    ``cache`` (a :class:`FeatureCache`) keeps extracted features on disk between runs; ``chunk_size`` rows are
    fitted and scored at a time so memory stays bounded for large datasets. With ``skip_unsupported`` a
    postprocessor this model cannot run is left out (``left_out``: name -> why) instead of failing the run.
    """

    def __init__(
        self,
        model: nn.Module,
        benchmark: Benchmark,
        postprocessors: Mapping[str, Postprocessor],
        cache: FeatureCache | None = None,
        batch_size: int = 256,
        num_workers: int = 0,
        chunk_size: int = 4096,
        skip_unsupported: bool = False,
    ) -> None:
        if not postprocessors:
            raise ValueError("no postprocessors to run; pass e.g. postprocessors=[msp,energy,knn]")
        self.model, self.benchmark = model.eval(), benchmark
        self.postprocessors = dict(postprocessors)
        self.cache = cache
        self.batch_size, self.num_workers, self.chunk_size = batch_size, num_workers, chunk_size
        self.skip_unsupported = skip_unsupported
        self.left_out: dict[str, str] = {}  # postprocessor -> why it cannot score this model
        self._checked = False
        self._features: dict[str, Features] = {}

    def loader(self, data: DataSet) -> DataLoader:
        return DataLoader(
            data.dataset,
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),
        )

    def features(self, data: DataSet) -> Features:
        """Extracted features of ``data``, extracted at most once (and cached on disk when a cache is set)."""
        if data.name not in self._features:
            if self.cache is None:
                self._features[data.name] = extract_features(
                    self.model, self.loader(data), desc=f"extract {data.name}"
                )
            else:
                self._features[data.name] = self.cache.load_or_extract(
                    data.name, data.description, self.model, self.loader(data)
                )
        return self._features[data.name]

    def check(self) -> dict[str, str]:
        """Probe one ID batch; fail now if a postprocessor cannot score this model or lacks its fit split.

        With ``skip_unsupported`` those postprocessors are dropped instead; returns name -> reason for them.
        """
        batch = next(iter(self.loader(self.benchmark.id_splits["test"])))
        outputs = extract_batch(self.model, batch["image"])
        expected = self.benchmark.num_classes
        if expected is not None and outputs["logits"].shape[1] != expected:
            raise ValueError(
                f"the model predicts {outputs['logits'].shape[1]} classes but the ID data of benchmark "
                f"{self.benchmark.name} has {expected}: evaluate a model trained on that data, or make "
                "benchmark.id (datamodule, overrides.classes) match what the model was trained on"
            )
        keys = outputs.keys()
        for name, postprocessor in self.postprocessors.items():
            try:
                postprocessor.check(self.model, keys)
                split = postprocessor.fit_split
                if split is not None and split not in self.benchmark.id_splits:
                    raise ValueError(
                        f"it fits on the ID {split} split, which benchmark {self.benchmark.name} does not "
                        "have; add it to the benchmark's id config"
                    )
            except ValueError as err:
                if not self.skip_unsupported:
                    raise ValueError(f"postprocessor {name}: {err}") from err
                self.left_out[name] = str(err)
        for name in self.left_out:
            del self.postprocessors[name]
        if not self.postprocessors:
            reasons = "; ".join(f"{name}: {why}" for name, why in self.left_out.items())
            raise ValueError(f"none of the selected postprocessors can score this model ({reasons})")
        self._checked = True
        return self.left_out

    def scores(self, postprocessor: Postprocessor, data: DataSet) -> np.ndarray:
        """Scores (N,) of every sample of ``data``: from its extracted features, or its images when needed."""
        if postprocessor.needs_images:
            batches = tqdm(self.loader(data), desc=f"{postprocessor.name} {data.name}", leave=False)
            parts = [postprocessor.score(self.model, batch).detach().cpu() for batch in batches]
        else:
            chunks = iter_chunks(self.features(data), self.chunk_size)
            parts = [postprocessor.score(self.model, chunk).detach().cpu() for chunk in chunks]
        return torch.cat(parts).double().numpy()

    def id_accuracy(self) -> float | None:
        """Top-1 accuracy of the logits on the ID test split (None when it has no labels)."""
        features = self.features(self.benchmark.id_splits["test"])
        labels = features.get("label")
        if labels is None or bool((labels < 0).any()):
            return None
        return float((features["logits"].argmax(dim=1) == labels).double().mean())

    def run(self) -> OODResults:
        """Fit every postprocessor, score ID test and every OOD set, compute metrics."""
        if not self._checked:
            self.check()
        benchmark = self.benchmark
        for postprocessor in self.postprocessors.values():
            if getattr(postprocessor, "input_std", ()) is None:  # ODIN: a step in pixel units of this data
                postprocessor.input_std = benchmark.std.flatten().tolist()
        id_test = benchmark.id_splits["test"]
        accuracy = self.id_accuracy()
        if not all(p.needs_images for p in self.postprocessors.values()):
            for data in benchmark.ood:
                self.features(data)  # extract everything up front: one progress bar per dataset
        rows: list[dict[str, Any]] = []
        all_scores: dict[str, dict[str, np.ndarray]] = {}
        groups = {group: [s.name for s in sets] for group, sets in benchmark.groups().items() if sets}
        for name, postprocessor in self.postprocessors.items():
            if postprocessor.fit_split is not None:
                log.info("fitting %s on the ID %s split", name, postprocessor.fit_split)
                postprocessor.fit(
                    self.model, self.features(benchmark.id_splits[postprocessor.fit_split]), self.chunk_size
                )
            id_scores = self.scores(postprocessor, id_test)
            all_scores[name] = {ID_SCORES: id_scores}
            for group, sets in benchmark.groups().items():
                group_rows = []
                for data in sets:
                    ood_scores = self.scores(postprocessor, data)
                    all_scores[name][data.name] = ood_scores
                    try:
                        metrics = ood_metrics(id_scores, ood_scores)
                    except ValueError as err:
                        raise ValueError(f"postprocessor {name} on {data.name}: {err}") from err
                    group_rows.append(
                        {
                            "postprocessor": name,
                            "group": group,
                            "dataset": data.name,
                            "summary": False,
                            "num_id": len(id_scores),
                            "num_ood": len(ood_scores),
                            **metrics,
                        }
                    )
                rows.extend(group_rows)
                if group_rows:
                    rows.append(
                        {
                            "postprocessor": name,
                            "group": group,
                            "dataset": f"{group}ood",
                            "summary": True,
                            "num_id": len(id_scores),
                            "num_ood": sum(r["num_ood"] for r in group_rows),
                            **group_mean(group_rows),
                        }
                    )
            log.info("%s done", name)
        meta = {"left_out": dict(self.left_out)} if self.left_out else {}
        if benchmark.notes:
            meta["benchmark_notes"] = list(benchmark.notes)
        return OODResults(benchmark.name, accuracy, rows, all_scores, groups, meta)
