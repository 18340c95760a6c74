"""Mixture-of-experts MLP block with a prototype router (ProMoE) or a softmax router (Switch / GShard).

ProMoE (Wei et al., "Routing Matters in MoE", ICLR 2026; code ali-vilab/ProMoE) routes a token to the expert
whose learnable *routing prototype* it is most cosine-similar to, uses that similarity itself as the gate
(identity activation), keeps a shared expert every token passes, and trains the prototypes with a *routing
contrastive loss*. Here the routing prototypes live in a :class:`~protolib.bank.PrototypeBank`
(owner = expert) so they are searched and explained like every other prototype. The softmax router is
the usual baseline: a linear router, softmax top-k, a capacity limit, the Switch/GShard
load-balancing loss.

Dispatch is sorted, not masked: the (token, expert) assignments are grouped by expert with one stable sort,
each expert runs one matmul pair on its contiguous rows, and the gated outputs are scattered back with one
``index_add``; the only Python loop is over experts.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from torch import nn

from protolib.bank import PrototypeBank

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "gelu": nn.GELU,  # timm ViT's MLP activation
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),  # ProMoE's
}


@dataclass
class Routing:
    """One forward pass's routing decision over N tokens, k choices each, E experts."""

    experts: torch.Tensor  # (N, k) long, chosen experts, best first
    gates: torch.Tensor  # (N, k) the weight of each chosen expert's output
    scores: torch.Tensor  # (N, E) router scores: alpha * cos (prototype) or softmax probabilities
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # weighted auxiliary losses, 0-dim
    kept: torch.Tensor | None = None  # (N, k) bool: False where the capacity limit dropped the assignment
    inputs: torch.Tensor | None = None  # (N, D) the tokens routed (galleries search these)


# ---------------------------------------------------------------------------------------------- losses
def load_balancing_loss(probs: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """Switch/GShard auxiliary loss ``E * sum_e f_e * P_e``; 1 when balanced, E when collapsed.

    ``f_e`` is the share of the (token, choice) assignments ``experts`` (N, k) that go to expert e (before any
    capacity drop), ``P_e`` the mean router probability ``probs`` (N, E) of expert e.
    """
    num_experts = probs.shape[1]
    share = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype) / experts.numel()
    return num_experts * (share * probs.mean(0)).sum()


def routing_contrastive_loss(
    tokens: torch.Tensor, experts: torch.Tensor, prototypes: torch.Tensor, temperature: float
) -> torch.Tensor:
    """ProMoE's routing contrastive loss: each used expert's prototype against the means of routed tokens.

    For the experts that received at least one token in ``experts`` (N, k), the mean ``m_e`` of the tokens
    (N, D) routed to e is its positive and the other used experts' means its negatives:
    ``CE(cos(p_i, m_j) / temperature, target i)`` over the used experts; zero with fewer than two used
    experts. Gradients reach both the prototypes and the tokens, as in the reference code.
    """
    num_experts = prototypes.shape[0]
    k = experts.shape[1]
    flat = experts.reshape(-1)  # (N*k,) token i's choices are entries i*k .. i*k + k-1
    counts = torch.bincount(flat, minlength=num_experts)  # (E,)
    used = counts > 0
    if int(used.sum()) < 2:
        return prototypes.sum() * 0.0
    sums = tokens.new_zeros(num_experts, tokens.shape[1]).index_add(0, flat, tokens.repeat_interleave(k, 0))
    means = sums[used] / counts[used, None].to(tokens.dtype)  # (U, D)
    logits = F.normalize(prototypes[used], dim=1) @ F.normalize(means, dim=1).T / temperature  # (U, U)
    return F.cross_entropy(logits, torch.arange(logits.shape[0], device=logits.device))


def expert_share(experts: torch.Tensor, num_experts: int) -> torch.Tensor:
    """Share (E,) of the assignments in ``experts`` (any shape of expert ids) that each expert receives."""
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).float()
    return counts / counts.sum().clamp_min(1)


def normalized_entropy(share: torch.Tensor) -> torch.Tensor:
    """Entropy of a distribution ``share`` (E,) divided by log E: 1 = every expert equally used, 0 = one."""
    if share.numel() < 2:
        return share.new_ones(())
    p = share[share > 0]
    return -(p * p.log()).sum() / math.log(share.numel())


# ---------------------------------------------------------------------------------------------- routers
def _check_top_k(top_k: int, num_experts: int) -> None:
    if num_experts < 1:
        raise ValueError(f"an MoE block needs at least one expert, got num_experts={num_experts}")
    if not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k={top_k} must be between 1 and num_experts={num_experts}; lower top_k")


class PrototypeRouter(nn.Module):
    """ProMoE's prototypical router: score ``alpha * cos(token, prototype_e)``, identity gate, top-k.

    The E prototypes are the rows of a cosine :class:`PrototypeBank` owned by their experts, initialised
    N(0, ``init_std``) as in the reference. ``alpha = 1`` is the reference code's value (its gate is the raw
    cosine). Losses: the routing contrastive loss (weight 1, temperature 0.07: the reference's ProMoE configs)
    and, off by default because the paper found it hurts, the load-balancing loss on softmax(scores).
    """

    capacity_factor = None  # no capacity limit: every token reaches its chosen experts

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        alpha: float = 1.0,
        init_std: float = 0.02,
        contrastive_weight: float = 1.0,
        temperature: float = 0.07,
        balance_weight: float = 0.0,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
    ) -> None:
        super().__init__()
        _check_top_k(top_k, num_experts)
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        self.num_experts, self.top_k, self.alpha = num_experts, top_k, alpha
        self.contrastive_weight, self.temperature, self.balance_weight = (
            contrastive_weight,
            temperature,
            balance_weight,
        )
        self.bank = bank(
            num_prototypes=num_experts, dim=dim, owners=torch.arange(num_experts), metric="cosine"
        )
        if not self.bank.learnable:
            raise ValueError(
                "the routing prototypes are learned by gradient: build the bank with learnable=True"
            )
        with torch.no_grad():
            self.bank.vectors.normal_(0.0, init_std)

    def forward(self, tokens: torch.Tensor) -> Routing:
        """Route ``tokens`` (N, D)."""
        cos = F.normalize(tokens, dim=1) @ F.normalize(self.bank.vectors, dim=1).T  # (N, E)
        scores = self.alpha * cos
        gates, experts = scores.topk(self.top_k, dim=1)  # (N, k) identity gating
        losses = {}
        if self.contrastive_weight > 0:
            rcl = routing_contrastive_loss(tokens, experts, self.bank.vectors, self.temperature)
            losses["routing_contrastive"] = self.contrastive_weight * rcl
        if self.balance_weight > 0:
            losses["load_balance"] = self.balance_weight * load_balancing_loss(scores.softmax(1), experts)
        return Routing(experts=experts, gates=gates, scores=scores, losses=losses)


class SoftmaxRouter(nn.Module):
    """Linear router with softmax top-k (Switch for k = 1, GShard's renormalised gates for k > 1).

    ``capacity_factor`` bounds every expert to ``ceil(capacity_factor * N * k / E)`` assignments (first
    choices before second ones, then token order); ``None`` disables the limit. The load-balancing loss
    (weight 0.01, Switch's) keeps the experts in use.
    """

    def __init__(
        self,
        dim: int,
        num_experts: int,
        top_k: int = 1,
        capacity_factor: float | None = 1.25,
        balance_weight: float = 0.01,
    ) -> None:
        super().__init__()
        _check_top_k(top_k, num_experts)
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be > 0 or null (no limit), got {capacity_factor}")
        self.num_experts, self.top_k = num_experts, top_k
        self.capacity_factor, self.balance_weight = capacity_factor, balance_weight
        self.linear = nn.Linear(dim, num_experts, bias=False)
        nn.init.trunc_normal_(self.linear.weight, std=0.02)

    def forward(self, tokens: torch.Tensor) -> Routing:
        """Route ``tokens`` (N, D)."""
        probs = self.linear(tokens).float().softmax(dim=1)  # (N, E)
        gates, experts = probs.topk(self.top_k, dim=1)  # (N, k)
        if self.top_k > 1:
            gates = gates / gates.sum(1, keepdim=True)
        losses = {}
        if self.balance_weight > 0:
            losses["load_balance"] = self.balance_weight * load_balancing_loss(probs, experts)
        return Routing(experts=experts, gates=gates.to(tokens.dtype), scores=probs, losses=losses)


# ---------------------------------------------------------------------------------------------- dispatch
def sort_by_expert(
    experts: torch.Tensor, num_experts: int, capacity: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Group the (token, choice) assignments ``experts`` (N, k) by expert, optionally capped per expert.

    Returns ``order`` (M,): indices into the choice-major flattening ``experts.T.reshape(-1)`` (entry
    ``j * N + i`` is token i's j-th choice), sorted by expert, first choices and earlier tokens first within
    an expert; ``counts`` (E,): rows per expert in that order; ``kept`` (N, k) bool.
    """
    n, k = experts.shape
    flat = experts.T.reshape(-1)  # (k*N,)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    kept = torch.ones(k * n, dtype=torch.bool, device=experts.device)
    if capacity is not None:
        starts = counts.cumsum(0) - counts
        rank = torch.arange(k * n, device=experts.device) - starts[flat[order]]  # position within its expert
        kept[order[rank >= capacity]] = False
        order = order[rank < capacity]
        counts = counts.clamp(max=capacity)
    return order, counts, kept.view(k, n).T


class MoEMLP(nn.Module):
    """Drop-in MoE replacement of a transformer MLP: E routed experts, optional shared experts, a router.

    Input (..., D) -> output (..., D). Every expert is a two-layer MLP of width ``expert_hidden`` (default
    ``2 * dim``: half the usual 4x MLP, as in ProMoE, so one routed plus one shared expert has the dense
    MLP's active parameters). ``num_shared`` shared experts of width ``shared_hidden`` (default
    ``expert_hidden``) see every token; they are stored as one MLP of width ``num_shared * shared_hidden``,
    which computes exactly the sum of the separate experts. ``router(dim=..., num_experts=...)`` builds the
    router (:class:`PrototypeRouter` by default). The last forward's :class:`Routing` is kept in
    ``self.routing`` (its auxiliary losses too: the training recipe adds them to the objective).
    """

    routing: Routing | None

    def __init__(
        self,
        dim: int,
        num_experts: int = 8,
        expert_hidden: int | None = None,
        num_shared: int = 1,
        shared_hidden: int | None = None,
        router: Callable[..., nn.Module] = PrototypeRouter,
        activation: str = "gelu",
    ) -> None:
        super().__init__()
        if num_experts < 1:
            raise ValueError(f"an MoE block needs at least one expert, got num_experts={num_experts}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation {activation!r} is unknown; choose one of {sorted(ACTIVATIONS)}")
        if num_shared < 0:
            raise ValueError(f"num_shared must be >= 0, got {num_shared}")
        hidden = 2 * dim if expert_hidden is None else expert_hidden
        self.dim, self.num_experts, self.expert_hidden = dim, num_experts, hidden
        self.router = router(dim=dim, num_experts=num_experts)
        self.top_k = self.router.top_k
        self.act = ACTIVATIONS[activation]()
        # Expert weights stacked (E, in, out) so a token group is one matmul (and upcycling one copy).
        self.w1 = nn.Parameter(torch.empty(num_experts, dim, hidden))
        self.b1 = nn.Parameter(torch.zeros(num_experts, hidden))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden, dim))
        self.b2 = nn.Parameter(torch.zeros(num_experts, dim))
        nn.init.trunc_normal_(self.w1, std=0.02)  # timm's ViT init of nn.Linear
        nn.init.trunc_normal_(self.w2, std=0.02)
        self.shared_hidden = 0 if num_shared == 0 else num_shared * (shared_hidden or hidden)
        self.shared = (
            Mlp(dim, self.shared_hidden, act_layer=ACTIVATIONS[activation]) if self.shared_hidden else None
        )
        if self.shared is not None:
            for layer in (self.shared.fc1, self.shared.fc2):
                nn.init.trunc_normal_(layer.weight, std=0.02)
                nn.init.zeros_(layer.bias)
        self.routing = None

    @property
    def active_hidden(self) -> int:
        """Hidden units one token passes: ``top_k * expert_hidden + shared width`` (for fair baselines)."""
        return self.top_k * self.expert_hidden + self.shared_hidden

    def capacity(self, num_tokens: int) -> int | None:
        """Most assignments one expert takes for ``num_tokens`` tokens (None: unlimited)."""
        factor = getattr(self.router, "capacity_factor", None)
        if factor is None:
            return None
        return max(1, math.ceil(factor * num_tokens * self.top_k / self.num_experts))

    def experts_forward(self, rows: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """Run expert e on its block of ``counts[e]`` consecutive ``rows`` (M, D) -> (M, D)."""
        outputs = []
        for e, chunk in enumerate(rows.split(counts.tolist())):
            if chunk.shape[0]:
                hidden = self.act(torch.addmm(self.b1[e], chunk, self.w1[e]))  # (m_e, H)
                outputs.append(torch.addmm(self.b2[e], hidden, self.w2[e]))  # (m_e, D)
        return torch.cat(outputs) if outputs else rows.new_zeros(0, self.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., D) -> (..., D); records ``self.routing``."""
        if x.shape[-1] != self.dim:
            raise ValueError(
                f"MoEMLP was built for tokens of dimension {self.dim}, got input of shape {tuple(x.shape)}; "
                "build it with dim equal to the transformer's embed_dim"
            )
        tokens = x.reshape(-1, self.dim)  # (N, D)
        n = tokens.shape[0]
        routing = self.router(tokens)
        order, counts, kept = sort_by_expert(routing.experts, self.num_experts, self.capacity(n))
        token_of = order % n  # (M,) which token each sorted assignment belongs to
        gate = routing.gates.T.reshape(-1)[order]  # (M,)
        expert_out = self.experts_forward(tokens[token_of], counts)  # (M, D)
        out = torch.zeros_like(tokens).index_add_(0, token_of, expert_out * gate[:, None].to(tokens.dtype))
        if self.shared is not None:
            out = out + self.shared(tokens)
        routing.kept, routing.inputs = kept, tokens
        self.routing = routing
        return out.view(x.shape)

    def extra_repr(self) -> str:
        return (
            f"dim={self.dim}, experts={self.num_experts}x{self.expert_hidden}, top_k={self.top_k}, "
            f"shared={self.shared_hidden}"
        )
