"""The postprocessor interface: ``fit`` on ID data where needed, ``score`` -> (B,), higher = more ID."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, ClassVar

import torch
from torch import nn

from protolib.ood.features import Features, FeatureSource, extract_batch


class Postprocessor:
    """Turns a model's outputs into one OOD score per sample (higher = more in-distribution).

    Attributes say what a postprocessor needs, so an evaluator can extract features once per dataset:
    ``requires`` (keys of ``model.extract()``), ``fit_split`` (the ID split ``fit`` wants, as in OpenOOD:
    "train", "val", or None when there is nothing to fit) and ``needs_images`` (scores need the images, e.g.
    ODIN's input perturbation, so extracted features are not enough).
    """

    name: ClassVar[str] = "base"
    requires: tuple[str, ...] = ("logits",)
    fit_split: ClassVar[str | None] = None
    needs_images: ClassVar[bool] = False

    def fit(
        self,
        model: nn.Module,
        data: Mapping[str, torch.Tensor] | Iterable[Mapping[str, Any]],
        chunk_size: int = 4096,
    ) -> Postprocessor:
        """Estimate what the score needs from ID data: extracted features (dict of tensors with "label"),
        a dataloader of image batches, or one image batch. A no-op for postprocessors without a fit.

        In-memory features are fitted ``chunk_size`` rows at a time (the evaluator's ``chunk_size``)."""
        if isinstance(data, Mapping) and "image" in data:
            data = [data]  # one batch of images
        if self.fit_split is not None:
            self._fit(model, FeatureSource(data, model, chunk_size))
        return self

    def check(self, model: nn.Module, keys: Collection[str]) -> None:
        """Raise ValueError now if ``model`` (whose ``extract()`` returns ``keys``) cannot be scored."""
        missing = [key for key in self.requires if key not in keys]
        if missing:
            raise ValueError(
                f"{self.name} needs {missing} from the model, but {type(model).__name__}.extract() returns "
                f"{sorted(keys)}; choose a postprocessor this model supports"
            )

    def score(self, model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Scores (B,) of a batch: extracted features (the ``requires`` keys) or a batch with "image"."""
        if all(key in inputs for key in self.requires):
            outputs = inputs
        elif "image" in inputs:
            outputs = extract_batch(model, inputs["image"])
        else:
            raise ValueError(
                f"{self.name} needs {list(self.requires)} (or an 'image' batch to extract them from); "
                f"got {sorted(inputs)}"
            )
        self.check(model, outputs.keys())
        return self._score(model, outputs)

    def _fit(self, model: nn.Module, source: FeatureSource) -> None:
        raise NotImplementedError

    def _score(self, model: nn.Module, outputs: Features | Mapping[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def _require_fitted(self, attribute: str) -> Any:
        value = getattr(self, attribute, None)
        if value is None:
            raise RuntimeError(f"{self.name} is not fitted: call fit(model, id_{self.fit_split}_data) first")
        return value

    def __repr__(self) -> str:
        params = {
            k: v
            for k, v in vars(self).items()
            if not k.startswith("_") and k != "requires" and not isinstance(v, torch.Tensor)
        }
        return f"{type(self).__name__}({', '.join(f'{k}={v!r}' for k, v in params.items())})"


def linear_layer(model: nn.Module, postprocessor: str) -> nn.Module:
    """``model.last_layer`` (features -> logits), or a ValueError naming what the postprocessor needs."""
    layer = getattr(model, "last_layer", None)
    if layer is None:
        raise ValueError(
            f"{postprocessor} needs model.last_layer (the layer mapping features to logits), but "
            f"{type(model).__name__} has none; use a feature-based postprocessor (knn, mahalanobis) instead"
        )
    return layer


def labels_of(chunk: Mapping[str, torch.Tensor], postprocessor: str) -> torch.Tensor:
    """The "label" entry of a fit chunk, or a ValueError saying the fit data needs labels."""
    if "label" not in chunk:
        raise ValueError(f"{postprocessor} fits class statistics: its fit data needs a 'label' entry")
    return chunk["label"].long()
