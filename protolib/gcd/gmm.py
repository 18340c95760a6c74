"""GPC's E-step: a semi-supervised Gaussian mixture with a normal-inverse-Wishart prior, split and merge.

Zhao, Wen, Han, "Learning Semi-supervised Gaussian Mixture Models for Generalized Category Discovery"
(ICCV 2023); the semantics are those of ``split_and_merge_op`` in github.com/DTennant/GPC
(``methods/contrastive_training/gmm_sm.py`` with ``Priors`` / ``NIW_prior`` of
``project_utils/cluster_utils.py`` and the Hastings ratios of ``project_utils/split_and_merge_ops.py``):

1. semi-supervised k-means (labelled rows fixed to their class's cluster ``0..k0-1``) gives hard assignments;
   the mixture's weights are the cluster shares, its means and covariances the NIW posterior (MAP) values;
2. every *unlabelled* cluster is cut in two by 2-means and **split** when the log Hastings ratio
   ``log a + lgamma(N1) + ll(X1) + lgamma(N2) + ll(X2) - lgamma(N) - ll(X)`` (``ll`` = NIW log marginal
   likelihood) is positive, or else with probability ``split_prob``; labelled clusters are never touched;
3. each unsplit unlabelled cluster is tested for a **merge** with its nearest unsplit neighbour by the
   reverse ratio, accepted the same way with ``merge_prob``;
4. the new centres give the assignments (nearest centre; labelled rows keep their class) and each cluster's
   concentration ``phi_k`` for the prototypical contrastive loss (`protolib.losses.gpc`).

Where the reference departs from its own intent this module follows the intent, and says so: a cluster
joins at most one merge (the reference can merge a pair twice and keeps the merged clusters' old centres as
well, so "merging" raised K; the DeepDPM ``merge_step`` of the same repository pops merged clusters), and the
number of clusters carries over from one E-step to the next through the prototype bank (the reference
restarts every E-step from ``--num_cluster``, so K never accumulates).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from protolib.bank import PrototypeBank
from protolib.gcd.clustering import check_features, semi_supervised_kmeans


@dataclass
class NIWPrior:
    """Normal-inverse-Wishart prior ``NIW(m, kappa, psi, nu)`` over a cluster's (mean, covariance).

    ``mean`` (D,), ``psi`` (D, D). :meth:`from_features` sets the reference's defaults: ``m`` = the data
    mean, ``psi = sigma_scale * I`` (0.005), ``kappa = 1e-4``, ``nu = D + 1`` (769 for 768-d features).
    """

    mean: torch.Tensor
    psi: torch.Tensor
    kappa: float = 1e-4
    nu: float = 0.0

    def __post_init__(self) -> None:
        d = self.mean.numel()
        if self.psi.shape != (d, d):
            raise ValueError(f"NIW psi must be ({d}, {d}) for a {d}-d mean, got {tuple(self.psi.shape)}.")
        if self.kappa <= 0 or self.nu <= d - 1:
            raise ValueError(
                f"NIW prior needs kappa > 0 and nu > D - 1 = {d - 1}, got kappa={self.kappa}, nu={self.nu}; "
                f"the reference uses kappa=1e-4 and nu=D+1."
            )

    @classmethod
    def from_features(
        cls,
        features: torch.Tensor,
        kappa: float = 1e-4,
        nu: float | None = None,
        sigma_scale: float = 0.005,
        sigma: str = "isotropic",
    ) -> NIWPrior:
        """The reference's prior for ``features`` (N, D): ``psi = sigma_scale * I`` or ``* diag(std)``."""
        x = features.double()
        d = x.shape[1]
        if sigma == "isotropic":
            psi = torch.eye(d, dtype=torch.float64) * sigma_scale
        elif sigma == "data_std":
            psi = torch.diag(x.std(dim=0)) * sigma_scale
        else:
            raise ValueError(f"NIW sigma must be 'isotropic' or 'data_std', got {sigma!r}.")
        return cls(x.mean(dim=0), psi, float(kappa), float(d + 1 if nu is None else nu))

    @property
    def dim(self) -> int:
        return self.mean.numel()

    def posterior(
        self, x: torch.Tensor, mu: torch.Tensor | None = None
    ) -> tuple[float, float, torch.Tensor, torch.Tensor]:
        """``(kappa_n, nu_n, m_n, psi_n)`` of the points ``x`` (N, D), scatter taken about ``mu``.

        With ``mu`` = the sample mean (the default) this is the conjugate NIW posterior; the reference
        passes the cluster's centre instead, which is what GPC's ratios use.
        """
        x = x.double()
        n = x.shape[0]
        mu = x.mean(dim=0) if mu is None else mu.double()
        kappa_n, nu_n = self.kappa + n, self.nu + n
        m_n = (self.kappa * self.mean + x.sum(dim=0)) / kappa_n
        centred = x - mu
        gap = (mu - self.mean)[:, None]  # (D, 1)
        psi_n = self.psi + centred.T @ centred + (self.kappa * n / kappa_n) * (gap @ gap.T)
        return kappa_n, nu_n, m_n, psi_n

    def log_marginal_likelihood(self, x: torch.Tensor, mu: torch.Tensor | None = None) -> float:
        """``log p(x | prior)`` with (mean, covariance) integrated out (N, D) -> float."""
        n, d = x.shape
        kappa_n, nu_n, _, psi_n = self.posterior(x, mu)
        return float(
            -(n * d / 2.0) * math.log(math.pi)
            + torch.special.multigammaln(torch.tensor(nu_n / 2.0, dtype=torch.float64), d)
            - torch.special.multigammaln(torch.tensor(self.nu / 2.0, dtype=torch.float64), d)
            + (self.nu / 2.0) * torch.logdet(self.psi)
            - (nu_n / 2.0) * torch.logdet(psi_n)
            + (d / 2.0) * (math.log(self.kappa) - math.log(kappa_n))
        )

    def map_means(self, counts: torch.Tensor, means: torch.Tensor) -> torch.Tensor:
        """Posterior means ``(N_k mean_k + kappa m) / (N_k + kappa)``: counts (K,), means (K, D) -> (K, D)."""
        counts = counts.double().reshape(-1, 1)
        return (counts * means.double() + self.kappa * self.mean) / (counts + self.kappa)

    def map_covariance(self, count: float, mean: torch.Tensor, data_cov: torch.Tensor) -> torch.Tensor:
        """The reference's posterior covariance of one cluster of ``count`` points: (D,), (D, D) -> (D, D)."""
        if count <= 0:
            return self.psi.clone()
        gap = (mean.double() - self.mean)[:, None]
        scatter = data_cov.double() * count + (self.kappa * count / (self.kappa + count)) * (gap @ gap.T)
        return (self.psi + scatter) / (self.nu + count + self.dim + 2)


def log_hastings_split(n1: int, n2: int, ll1: float, ll2: float, ll: float, alpha: float = 1.0) -> float:
    """Log Hastings ratio of splitting a cluster of ``n1 + n2`` points into two (``ll*``: log marginals)."""
    return math.log(alpha) + math.lgamma(n1) + ll1 + math.lgamma(n2) + ll2 - (math.lgamma(n1 + n2) + ll)


def log_hastings_merge(n1: int, n2: int, ll1: float, ll2: float, ll: float, alpha: float = 1.0) -> float:
    """Log Hastings ratio of merging two clusters (empty ones count ``lgamma = 0``, as the reference)."""
    g1 = math.lgamma(n1) if n1 > 0 else 0.0
    g2 = math.lgamma(n2) if n2 > 0 else 0.0
    return math.lgamma(n1 + n2) - (math.log(alpha) + g1 + g2) + ll - (ll1 + ll2)


def accept_move(log_ratio: float, prob: float | None, generator: torch.Generator | None = None) -> bool:
    """The reference's rule: accept when the ratio exceeds 1, else when a uniform draw falls below ``prob``.

    ``prob=None`` uses the ratio itself (``exp(H)``: Metropolis-Hastings); the draw is made only when
    needed, as the reference's short-circuit ``H > 0 or prob > torch.rand(1)``.
    """
    if log_ratio > 0:
        return True
    threshold = math.exp(log_ratio) if prob is None else prob
    return threshold > float(torch.rand(1, generator=generator))


@dataclass
class GaussianMixture:
    """Mixture weights (K,), means (K, D) and full covariances (K, D, D), float64."""

    weights: torch.Tensor
    means: torch.Tensor
    covariances: torch.Tensor

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """``log pi_k + log N(x_n | mu_k, Sigma_k)`` for every row and component: (N, D) -> (N, K)."""
        x = x.double()
        d = x.shape[1]
        columns = []
        for weight, mean, cov in zip(self.weights, self.means, self.covariances, strict=True):
            chol = torch.linalg.cholesky(cov)  # (D, D), one component at a time: memory O(N D)
            z = torch.linalg.solve_triangular(chol, (x - mean).T, upper=False)  # (D, N)
            log_det = 2 * torch.log(torch.diagonal(chol)).sum()
            columns.append(torch.log(weight) - 0.5 * (d * math.log(2 * math.pi) + log_det + (z**2).sum(0)))
        return torch.stack(columns, dim=1)

    def responsibilities(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Posterior ``p(k | x_n)`` (N, K); rows with ``labels >= 0`` are one-hot at their class's cluster."""
        resp = torch.softmax(self.log_prob(x), dim=1)
        if labels is not None:
            lab = labels >= 0
            resp[lab] = F.one_hot(labels[lab].long(), self.num_components).double()
        return resp

    def log_likelihood(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> float:
        """Mean semi-supervised log-likelihood per row: ``log sum_k`` for unlabelled, the class term else."""
        log_p = self.log_prob(x)
        per_row = torch.logsumexp(log_p, dim=1)
        if labels is not None:
            lab = labels >= 0
            per_row[lab] = log_p[lab, labels[lab].long()]
        return float(per_row.mean())


def hard_covariances(x: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Each cluster's scatter about its centre over its count (K, D, D); empty: ``0.0005 I`` (reference)."""
    x, centres = x.double(), centres.double()
    k, d = centres.shape
    covs = torch.eye(d, dtype=torch.float64).repeat(k, 1, 1) * 0.0005
    for c in range(k):
        members = x[assign == c]
        if len(members):
            centred = members - centres[c]
            covs[c] = centred.T @ centred / len(members)
    return covs


def fit_mixture(
    x: torch.Tensor, assign: torch.Tensor, centres: torch.Tensor, prior: NIWPrior
) -> GaussianMixture:
    """The MAP mixture of hard assignments (N,) with k-means ``centres`` (K, D), as the reference."""
    k = centres.shape[0]
    counts = torch.bincount(assign, minlength=k).double()
    covs = hard_covariances(x, assign, centres)
    x = x.double()
    post_covs = torch.stack(
        [
            prior.map_covariance(
                float(counts[c]), x[assign == c].mean(0) if counts[c] else prior.mean, covs[c]
            )
            for c in range(k)
        ]
    )
    return GaussianMixture(counts / len(x), prior.map_means(counts, centres), post_covs)


@dataclass
class Moves:
    """The accepted structure edits of one E-step, in ids of the clusters before it.

    ``splits`` maps a split cluster to its two children's centres (2, D); ``merges`` lists merged pairs;
    ``empty`` the unlabelled clusters no row chose (dropped, as the reference); ``log_ratios`` holds every
    Hastings ratio computed, accepted or not (``("split", k)`` / ``("merge", a, b)`` keys).
    """

    splits: dict[int, torch.Tensor] = field(default_factory=dict)
    merges: list[tuple[int, int]] = field(default_factory=list)
    empty: list[int] = field(default_factory=list)
    log_ratios: dict[tuple, float] = field(default_factory=dict)


def propose_moves(
    x: torch.Tensor,
    assign: torch.Tensor,
    centres: torch.Tensor,
    mixture: GaussianMixture,
    prior: NIWPrior,
    num_known: int,
    alpha: float = 1.0,
    split_prob: float | None = 0.1,
    merge_prob: float | None = 0.1,
    min_size: int = 5,
    seed: int = 0,
    generator: torch.Generator | None = None,
) -> Moves:
    """Split and merge decisions for the unlabelled clusters (ids >= ``num_known``) of one E-step.

    ``x`` (N, D) features, ``assign`` (N,) clusters, ``centres`` (K, D) the k-means centres, ``mixture``
    the MAP mixture (its means enter the split ratios, the k-means centres the merge ratios, as the
    reference). A cluster of ``<= min_size`` points, or whose 2-means halves have ``<= min_size``, is never
    split. ``generator`` drives the acceptance draws; ``seed`` the 2-means.
    """
    x = x.double()
    moves = Moves()
    present = set(torch.unique(assign).tolist())
    candidates = [c for c in range(num_known, centres.shape[0])]
    moves.empty = [c for c in candidates if c not in present]
    unsplit = []
    for c in (c for c in candidates if c in present):
        members = x[assign == c]
        halves = _two_means(members, seed) if len(members) > min_size else None
        if halves is None or min(int((halves == h).sum()) for h in (0, 1)) <= min_size:
            unsplit.append(c)
            continue
        parts = [members[halves == h] for h in (0, 1)]
        counts = torch.tensor([len(p) for p in parts], dtype=torch.float64)
        child_means = prior.map_means(counts, torch.stack([p.mean(0) for p in parts]))  # (2, D)
        ratio = log_hastings_split(
            len(parts[0]),
            len(parts[1]),
            prior.log_marginal_likelihood(parts[0], child_means[0]),
            prior.log_marginal_likelihood(parts[1], child_means[1]),
            prior.log_marginal_likelihood(members, mixture.means[c]),
            alpha,
        )
        moves.log_ratios[("split", c)] = ratio
        if accept_move(ratio, split_prob, generator):
            moves.splits[c] = child_means
        else:
            unsplit.append(c)
    if len(unsplit) < 2:
        return moves
    pool = centres.double()[unsplit]  # (R, D)
    dist = torch.cdist(pool, pool).fill_diagonal_(float("inf"))
    merged: set[int] = set()
    for i, a in enumerate(unsplit):
        b = unsplit[int(dist[i].argmin())]
        if a in merged or b in merged:
            continue
        xa, xb = x[assign == a], x[assign == b]
        na, nb = len(xa), len(xb)
        mean = (na * centres[a].double() + nb * centres[b].double()) / (na + nb)
        ratio = log_hastings_merge(
            na,
            nb,
            prior.log_marginal_likelihood(xa, centres[a]),
            prior.log_marginal_likelihood(xb, centres[b]),
            prior.log_marginal_likelihood(torch.cat([xa, xb]), mean),
            alpha,
        )
        moves.log_ratios[("merge", a, b)] = ratio
        if accept_move(ratio, merge_prob, generator):
            moves.merges.append((a, b))
            merged.update((a, b))
    return moves


def _two_means(members: torch.Tensor, seed: int) -> torch.Tensor:
    """2-means halves (0 / 1) of one cluster's rows (M, D), k-means++ seeded (the reference's K_Means)."""
    return torch.from_numpy(semi_supervised_kmeans(members.float(), 2, seed=seed).labels)


def apply_moves(
    bank: PrototypeBank,
    centres: torch.Tensor,
    moves: Moves,
    step: int | None = None,
    embed: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Carry ``moves`` out on ``bank`` (one prototype per cluster, row = cluster id) with its split, merge
    and remove; returns the new centres (K', D) in the bank's new row order (labelled clusters stay first).

    Split children take the 2-means halves' posterior means; a merge the plain mean of the two centres (the
    reference's ``(c1 + c2) / 2``). Each prototype ends as its own cluster (owners ``0..K'-1``), its
    vector the normalised ``embed(centre)`` (``embed`` maps the fitting space to the bank's; identity).
    """
    embed = embed or (lambda rows: rows)
    if bank.num_prototypes != centres.shape[0]:
        raise ValueError(
            f"the bank holds {bank.num_prototypes} prototypes but the E-step fitted {centres.shape[0]} "
            "clusters; the bank must hold one prototype per cluster"
        )
    rows = [c.double() for c in centres]
    for c, children in moves.splits.items():
        bank.split(c, direction=(embed(children[:1]) - embed(children[1:])).float() / 2, step=step)
        rows[c] = children[0]
        rows.append(children[1])
    position = list(range(bank.num_prototypes))  # cluster id before the moves -> current bank row

    def keep_rows(kept: torch.Tensor) -> None:
        nonlocal rows, position
        kept_list = kept.tolist()
        rows = [rows[i] for i in kept_list]
        where = {old: new for new, old in enumerate(kept_list)}
        position = [where.get(p, -1) for p in position]

    for a, b in moves.merges:
        rows[position[a]] = (centres[a].double() + centres[b].double()) / 2
        keep_rows(bank.merge([position[a], position[b]], step=step))
    if moves.empty:
        keep_rows(bank.remove([position[c] for c in moves.empty], allow_empty_owners=True))
    new = torch.stack(rows)  # (K', D)
    with torch.no_grad():
        bank.vectors.copy_(F.normalize(embed(new).float(), dim=1).to(bank.vectors))
        bank.owners.copy_(torch.arange(bank.num_prototypes, device=bank.owners.device))
    return new


def assign_to_centres(x: torch.Tensor, centres: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Nearest centre (squared L2) of every row (N,); labelled rows keep their class (``labels >= 0``)."""
    assign = torch.cdist(x.double(), centres.double()).argmin(dim=1)
    lab = labels >= 0
    assign[lab] = labels[lab].long()
    return assign


def cluster_concentration(
    x: torch.Tensor, centres: torch.Tensor, assign: torch.Tensor, temperature: float = 1.0
) -> torch.Tensor:
    """Per-cluster concentration ``phi_k`` (K,) of prototypical contrastive learning (PCL, Li et al.):

    ``mean ||x - c_k|| / log(N_k + 10)`` over the cluster's rows; clusters of <= 1 row get the largest value;
    clipped to the 10th-90th percentiles and scaled to mean ``temperature`` (reference ``density``).
    """
    k = centres.shape[0]
    dist = (x.double() - centres.double()[assign]).norm(dim=1)  # (N,)
    counts = torch.bincount(assign, minlength=k)
    sums = torch.zeros(k, dtype=torch.float64).index_add_(0, assign, dist)
    phi = torch.zeros(k, dtype=torch.float64)
    big = counts > 1
    phi[big] = sums[big] / counts[big] / torch.log(counts[big].double() + 10)
    phi[~big] = phi[big].max() if big.any() else 1.0
    low, high = np.percentile(phi.numpy(), [10, 90])
    phi = phi.clamp(float(low), float(high))
    return temperature * phi / phi.mean()


@dataclass
class EStepResult:
    """One E-step's outcome: the new centres (K', D) in bank order, each row's cluster (N,), the clusters'
    concentration (K',), the moves, and K and the mixture's mean log-likelihood before the moves."""

    centres: torch.Tensor
    assignments: torch.Tensor
    concentration: torch.Tensor
    moves: Moves
    k_before: int
    log_likelihood: float

    @property
    def k(self) -> int:
        return self.centres.shape[0]


@dataclass
class GPCEStep:
    """GPC's E-step with its hyper-parameters (defaults: the reference code's ``argparse`` values).

    ``alpha`` the Dirichlet-process concentration of the Hastings ratios (1.0); ``split_prob`` /
    ``merge_prob`` the probability of accepting a move whose ratio is below 1 (0.1; ``None``: accept with
    the ratio, Metropolis-Hastings); NIW ``kappa`` 1e-4, ``nu`` D + 1 (null), ``sigma_scale`` 0.005;
    ``n_init`` k-means restarts (10); ``temperature`` the mean concentration (``--temperature`` 1.0);
    ``pca_dim``: fit the mixture on the features' top principal components, as the paper describes (the
    code fits on the full features: null); the prototypes are then the centres mapped back.
    """

    alpha: float = 1.0
    split_prob: float | None = 0.1
    merge_prob: float | None = 0.1
    kappa: float = 1e-4
    nu: float | None = None
    sigma_scale: float = 0.005
    min_size: int = 5
    n_init: int = 10
    max_iter: int = 100
    temperature: float = 1.0
    pca_dim: int | None = None
    seed: int = 0

    def __call__(
        self,
        features: torch.Tensor,
        labels: torch.Tensor | Sequence[int],
        bank: PrototypeBank,
        num_known: int,
        step: int | None = None,
        generator: torch.Generator | None = None,
        moves: bool = True,
    ) -> EStepResult:
        """Fit the mixture on L2-normalised ``features`` (N, D) with ``labels`` (N,; -1: unlabelled, known
        classes ``0..num_known-1``), split / merge (unless ``moves=False``: K stays), and write the new
        clusters into ``bank`` (K: its size)."""
        x = torch.from_numpy(check_features(features, "GPC E-step features"))
        x, embed = principal_components(F.normalize(x, dim=1).double(), self.pca_dim)
        y = torch.as_tensor(labels).long().reshape(-1)
        k = bank.num_prototypes
        if k < num_known:
            raise ValueError(
                f"the bank holds {k} clusters, below the {num_known} known classes; start GPC with "
                f"model.net.num_classes >= {num_known}"
            )
        fit = semi_supervised_kmeans(x, k, y, n_init=self.n_init, max_iter=self.max_iter, seed=self.seed)
        assign, centres = torch.from_numpy(fit.labels), torch.from_numpy(fit.centers).double()
        prior = NIWPrior.from_features(x, self.kappa, self.nu, self.sigma_scale)
        mixture = fit_mixture(x, assign, centres, prior)
        log_lik = mixture.log_likelihood(x, y)
        edits = Moves()  # moves=False: refit only, K stays
        if moves:
            edits = propose_moves(
                x, assign, centres, mixture, prior, num_known, self.alpha, self.split_prob, self.merge_prob,
                self.min_size, self.seed, generator,
            )  # fmt: skip
        new = apply_moves(bank, centres, edits, step, embed)
        assign = assign_to_centres(x, new, y)
        phi = cluster_concentration(x, new, assign, self.temperature)
        return EStepResult(embed(new).float(), assign, phi.float(), edits, k, log_lik)


def principal_components(
    x: torch.Tensor, dim: int | None
) -> tuple[torch.Tensor, Callable[[torch.Tensor], torch.Tensor]]:
    """``x`` (N, D) on its top ``dim`` principal axes (N, dim) and the map of such rows back to (., D)
    (mean + rows @ axes.T); ``dim=None`` (or >= D): ``x`` itself and the identity."""
    if dim is None or dim >= x.shape[1]:
        return x, lambda rows: rows
    if dim < 1:
        raise ValueError(f"pca_dim must be >= 1 (or null for the full features), got {dim}")
    mean = x.mean(dim=0)
    _, vecs = torch.linalg.eigh((x - mean).T @ (x - mean))  # ascending eigenvalues
    axes = vecs[:, -dim:].flip(1)  # (D, dim), largest first
    return (x - mean) @ axes, lambda rows: mean + rows.double() @ axes.T
