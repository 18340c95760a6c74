"""ViM, virtual-logit matching (Wang et al., 2022): energy minus the scaled norm of the feature's residual."""

from __future__ import annotations

import warnings
from collections.abc import Collection, Mapping

import torch
from torch import nn

from protolib.ood.features import FeatureSource
from protolib.ood.postprocessors.base import Postprocessor, linear_layer
from protolib.ood.postprocessors.logit import energy


def linear_weights(model: nn.Module, postprocessor: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(W (C, F), b (C,)) of ``model.last_layer`` in float64; ValueError when it is not a linear layer."""
    layer = linear_layer(model, postprocessor)
    if not isinstance(layer, nn.Linear):
        raise ValueError(
            f"{postprocessor} needs a linear last layer (logits = W features + b), but "
            f"{type(model).__name__} "
            f"has {type(layer).__name__}; use another postprocessor for this model"
        )
    weight = layer.weight.detach().to("cpu", torch.float64)
    bias = torch.zeros(weight.shape[0], dtype=torch.float64) if layer.bias is None else layer.bias.detach()
    return weight, bias.to("cpu", torch.float64)


class ViM(Postprocessor):
    """Score = energy(logits) - alpha * ||P_residual (x - u)||, as OpenOOD's ``vim`` (dim = 256 by default).

    ``u = -pinv(W) b`` is the origin of the logit space in feature space; the residual space is spanned by the
    eigenvectors of the training features' (uncentred around u) covariance beyond the ``dim`` largest; alpha
    matches the mean virtual logit to the mean maximum logit on the training data. Needs a linear last layer.
    When ``dim`` is not below the feature dimension D, D // 2 is used (the ViM paper's rule for small D).
    """

    name = "vim"
    requires = ("features",)
    fit_split = "train"

    def __init__(self, dim: int = 256) -> None:
        if dim < 1:
            raise ValueError(f"vim dim must be >= 1, got {dim}")
        self.dim = int(dim)
        self.origin: torch.Tensor | None = None  # (F,) u
        self.residual_basis: torch.Tensor | None = None  # (F, F - dim)
        self.alpha: float | None = None

    def check(self, model: nn.Module, keys: Collection[str]) -> None:
        super().check(model, keys)
        linear_weights(model, self.name)

    def _fit(self, model: nn.Module, source: FeatureSource) -> None:
        weight, bias = linear_weights(model, self.name)
        origin = -(torch.linalg.pinv(weight) @ bias)  # (F,)
        second_moment, max_logit_sum, count = None, 0.0, 0
        for chunk in source:
            x = chunk["features"].to("cpu", torch.float64) - origin  # (B, F)
            second_moment = x.T @ x if second_moment is None else second_moment + x.T @ x
            max_logit_sum += float(((x + origin) @ weight.T + bias).amax(dim=1).sum())
            count += len(x)
        if second_moment is None:
            raise ValueError("vim fit data is empty: it needs in-distribution training features")
        features = second_moment.shape[0]
        dim = self.dim
        if dim >= features:
            dim = features // 2
            warnings.warn(
                f"vim: dim={self.dim} >= feature dimension {features}; using dim={dim}", stacklevel=2
            )
        _, eigenvectors = torch.linalg.eigh(second_moment / count)  # ascending eigenvalues
        basis = eigenvectors[:, : features - dim].contiguous()  # (F, F - dim): all but the dim largest
        virtual_sum = sum(
            float(((chunk["features"].double() - origin) @ basis).norm(dim=1).sum()) for chunk in source
        )
        if virtual_sum <= 0:
            raise ValueError("vim: the training features have no residual component; lower dim")
        self.origin, self.residual_basis = origin, basis
        self.alpha = (max_logit_sum / count) / (virtual_sum / count)
        self._weight, self._bias = weight, bias

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        basis = self._require_fitted("residual_basis")
        x = outputs["features"].to("cpu", torch.float64)  # (B, F)
        logits = x @ self._weight.T + self._bias  # (B, C)
        virtual = ((x - self.origin) @ basis).norm(dim=1)  # (B,)
        return (energy(logits) - self.alpha * virtual).float()
