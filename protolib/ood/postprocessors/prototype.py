"""Prototype scores: nearest-prototype similarity, and PALM's mixture-of-prototypes likelihood."""

from __future__ import annotations

from collections.abc import Collection, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from protolib.ood.postprocessors.base import Postprocessor


class PrototypeScore(Postprocessor):
    """Maximum similarity to any prototype: ``max_p extract()["prototype_similarity"][:, p]``."""

    name = "prototype"
    requires = ("prototype_similarity",)

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return outputs["prototype_similarity"].float().amax(dim=1)


def palm_log_likelihood(
    embeddings: torch.Tensor, prototypes: torch.Tensor, owners: torch.Tensor, temperature: float
) -> torch.Tensor:
    """log (1/K_c) sum_{k of class c} exp(z . p_k / t) of unit embeddings (B, D), prototypes (P, D): (B, C).

    The log of class c's von Mises-Fisher mixture density with equal weights, up to the normaliser every
    component shares. Classes without prototypes get -inf.
    """
    logits = embeddings @ prototypes.T / temperature  # (B, P)
    peak = logits.amax(dim=1, keepdim=True)  # (B, 1) for a stable exp
    members = F.one_hot(owners, int(owners.max()) + 1).to(logits.dtype)  # (P, C)
    sums = torch.exp(logits - peak) @ members  # (B, C)
    counts = members.sum(dim=0)  # (C,)
    return torch.log(sums) - torch.log(counts) + peak  # log(0) = -inf for empty classes


class PALMScore(Postprocessor):
    """PALM's mixture score: max over classes of the class's mixture log-likelihood of the embedding.

    Uses the unit "embedding" of ``extract()`` and the model's cosine ``prototype_bank`` (several prototypes
    per class, ``owners`` = class): ``max_c log mean_{k in c} exp(z . p_k / t)``, t = the model's training
    temperature unless set. With the same number of prototypes per class this ranks samples exactly as
    ``max_c logsumexp_k`` does. PALM's published numbers use a Mahalanobis score instead
    (configs ``palm_ssd`` and ``palm_mds``).
    """

    name = "palm"
    requires = ("embedding",)

    def __init__(self, temperature: float | None = None) -> None:
        if temperature is not None and temperature <= 0:
            raise ValueError(f"palm temperature must be positive, got {temperature}")
        self.temperature = temperature  # None: the model's own ``prototype_temperature`` (PALM: 0.1)

    def _temperature(self, model: nn.Module) -> float:
        temperature = self.temperature or getattr(model, "prototype_temperature", None)
        if temperature is None:
            raise ValueError(
                f"{type(model).__name__} has no prototype_temperature; set postprocessors.palm.temperature"
            )
        return float(temperature)

    def check(self, model: nn.Module, keys: Collection[str]) -> None:
        super().check(model, keys)
        if getattr(model, "prototype_bank", None) is None:
            raise ValueError(
                f"palm scores need model.prototype_bank (PALM's class prototypes), but "
                f"{type(model).__name__} "
                "has none; use msp/energy/knn/mahalanobis for this model"
            )

    def _score(self, model: nn.Module, outputs: Mapping[str, torch.Tensor]) -> torch.Tensor:
        bank = model.prototype_bank
        z = F.normalize(outputs["embedding"].float(), dim=1)  # (B, D)
        prototypes = F.normalize(bank.vectors.detach().float().to(z.device), dim=1)  # (P, D)
        owners = bank.owners.detach().long().to(z.device)  # (P,)
        if prototypes.shape[1] != z.shape[1]:
            raise ValueError(
                f"embedding dimension {z.shape[1]} differs from the prototype dimension {prototypes.shape[1]}"
            )
        return palm_log_likelihood(z, prototypes, owners, self._temperature(model)).amax(dim=1)
