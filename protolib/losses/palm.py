"""PALM losses (Lu et al., ICLR 2024): mixture MLE on samples and contrastive loss on prototypes.

Two forms of each loss are offered (``form``):

* ``"paper"``: the equations of the paper. The MLE loss is the negative log posterior of the sample's
  class under a mixture of von Mises-Fisher components with concentration ``1 / temperature``:
  ``-log( sum_k w_k exp(z.p_k / t) / sum_{all prototypes j} exp(z.p_j / t) )``, the weighted sum *inside*
  the log; the prototype contrastive loss likewise sums its positives inside the log.
* ``"reference"``: what the authors' code (github.com/jeff024/PALM, ``util/loss_functions.py``) computes,
  ``sum_k w_k (z.p_k / t) - log sum_j exp(z.p_j / t)`` and the mean of positive logits (SupCon's "L_out"
  form): by Jensen's inequality a lower bound of the paper's log-likelihood, so an upper bound of its loss.
"""

from __future__ import annotations

import torch

LOSS_FORMS = ("paper", "reference")


def _check_form(form: str) -> None:
    if form not in LOSS_FORMS:
        raise ValueError(f"PALM loss form {form!r} is unknown: use one of {LOSS_FORMS}")


def palm_mle_loss(
    embeddings: torch.Tensor,
    prototypes: torch.Tensor,
    weights: torch.Tensor,
    temperature: float = 0.1,
    form: str = "paper",
) -> torch.Tensor:
    """Mixture MLE loss of unit embeddings (N, D) against every prototype (P, D), mean over samples.

    ``weights`` (N, P) are the assignment weights (rows sum to one over the sample's class prototypes,
    zero elsewhere); the normaliser runs over all P prototypes of all classes.
    """
    _check_form(form)
    if weights.shape != (embeddings.shape[0], prototypes.shape[0]):
        raise ValueError(
            f"weights must be (N, P) = {(embeddings.shape[0], prototypes.shape[0])}, "
            f"got {tuple(weights.shape)}"
        )
    logits = embeddings @ prototypes.transpose(0, 1) / temperature  # (N, P)
    log_normaliser = torch.logsumexp(logits, dim=1)  # (N,)
    weights = weights.detach().to(logits.dtype)
    if form == "paper":
        log_mixture = torch.logsumexp(logits + torch.log(weights), dim=1)  # log sum_k w_k exp(l_k)
    else:
        log_mixture = (weights * logits).sum(dim=1)
    return (log_normaliser - log_mixture).mean()


def prototype_contrastive_loss(
    prototypes: torch.Tensor, owners: torch.Tensor, temperature: float = 0.5, form: str = "paper"
) -> torch.Tensor:
    """Contrastive loss among prototypes (P, D): same-class prototypes attract, other classes repel.

    For each prototype the positives are the other prototypes of its class and the normaliser runs over
    every other prototype. A class with a single prototype has no positive: its term is the normaliser
    alone (pure dispersion, as the reference code computes it), in both forms.
    """
    _check_form(form)
    if owners.shape != (prototypes.shape[0],):
        raise ValueError(f"owners must be (P,) = ({prototypes.shape[0]},), got {tuple(owners.shape)}")
    logits = prototypes @ prototypes.transpose(0, 1) / temperature  # (P, P)
    itself = torch.eye(len(owners), dtype=torch.bool, device=logits.device)
    positive = (owners[:, None] == owners[None, :]) & ~itself  # (P, P)
    log_normaliser = torch.logsumexp(logits.masked_fill(itself, float("-inf")), dim=1)  # (P,)
    has_positive = positive.any(dim=1)
    if form == "paper":
        # Rows without positives get finite placeholders (replaced below) so no NaN reaches the gradient.
        positive_logits = torch.where(
            has_positive[:, None], logits.masked_fill(~positive, float("-inf")), 0.0
        )
        log_positive = torch.logsumexp(positive_logits, dim=1)
    else:
        log_positive = (logits * positive).sum(dim=1) / positive.sum(dim=1).clamp_min(1)
    log_positive = torch.where(has_positive, log_positive, torch.zeros_like(log_positive))
    return (log_normaliser - log_positive).mean()
