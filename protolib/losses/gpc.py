"""GPC's M-step loss term (Zhao, Wen, Han, ICCV 2023; github.com/DTennant/GPC ``prototypical_logits``).

Prototypical contrastive learning (Li et al., PCL) with the E-step's clusters: each view's normalised
feature is pulled to its cluster's prototype and pushed from the others, the logit of prototype ``k``
divided by that cluster's concentration ``phi_k`` (loose clusters get a higher temperature). The SimCLR /
SupCon terms GPC adds are `protolib.losses.gcd.contrastive_loss`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def prototypical_contrastive_loss(
    views: list[torch.Tensor], prototypes: torch.Tensor, concentration: torch.Tensor, targets: torch.Tensor
) -> torch.Tensor:
    """Mean over ``views`` of ``CE(normalize(f) @ normalize(P).T / phi, target)``.

    ``views``: V tensors (B, D) (the reference uses two, weighted 0.5 each); ``prototypes`` (K, D);
    ``concentration`` (K,) positive; ``targets`` (B,) cluster of each image.
    """
    if concentration.shape != (prototypes.shape[0],) or not bool((concentration > 0).all()):
        raise ValueError(
            f"concentration must be {prototypes.shape[0]} positive numbers (one per prototype), got "
            f"shape {tuple(concentration.shape)}"
        )
    protos = F.normalize(prototypes.float(), dim=1)
    terms = [
        F.cross_entropy(F.normalize(v.float(), dim=1) @ protos.T / concentration.float(), targets)
        for v in views
    ]
    return torch.stack(terms).mean()
