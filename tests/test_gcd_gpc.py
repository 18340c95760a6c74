"""GPC: the NIW marginal likelihood, mixture, Hastings ratios and moves against independent computations
(scipy.stats, written-out formulas, brute force), the bank edits, the loss, bad input, a tiny EM run."""

from __future__ import annotations

import math

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.stats import invwishart, multivariate_normal

from protolib.bank import PrototypeBank
from protolib.data.gcd import GCDDataModule
from protolib.gcd.gmm import (
    GaussianMixture,
    GPCEStep,
    Moves,
    NIWPrior,
    accept_move,
    apply_moves,
    cluster_concentration,
    fit_mixture,
    log_hastings_merge,
    log_hastings_split,
    propose_moves,
)
from protolib.lit.callbacks.gpc import GPCSchedule
from protolib.lit.gpc import GPCModule
from protolib.losses.gpc import prototypical_contrastive_loss
from protolib.models.simgcd import SimGCDNet
from tests.test_gcd_simgcd import digits_base


def spd(d: int, seed: int) -> np.ndarray:
    a = np.random.default_rng(seed).normal(size=(d, d))
    return a @ a.T + d * np.eye(d)


def test_niw_log_marginal_likelihood_is_bayes_rule_with_scipy_densities() -> None:
    """log p(X) = log p(X | mu, S) + log NIW(mu, S) - log NIW(mu, S | X), at any (mu, S)."""
    rng = np.random.default_rng(0)
    d, n = 3, 12
    x = rng.normal(size=(n, d)) * 0.7 + 0.3
    m0, psi, kappa, nu = rng.normal(size=d), spd(d, 1) * 0.2, 0.5, 5.0
    prior = NIWPrior(torch.tensor(m0), torch.tensor(psi), kappa, nu)
    xbar = x.mean(0)
    scatter = (x - xbar).T @ (x - xbar)
    kappa_n, nu_n = kappa + n, nu + n
    m_n = (kappa * m0 + n * xbar) / kappa_n
    psi_n = psi + scatter + kappa * n / kappa_n * np.outer(xbar - m0, xbar - m0)
    mu, sigma = rng.normal(size=d) * 0.1, spd(d, 2) * 0.1  # any point works
    expected = (
        multivariate_normal(mu, sigma).logpdf(x).sum()
        + multivariate_normal(m0, sigma / kappa).logpdf(mu)
        + invwishart(df=nu, scale=psi).logpdf(sigma)
        - multivariate_normal(m_n, sigma / kappa_n).logpdf(mu)
        - invwishart(df=nu_n, scale=psi_n).logpdf(sigma)
    )
    assert prior.log_marginal_likelihood(torch.tensor(x)) == pytest.approx(expected, rel=1e-9)
    k_n, v_n, mean_n, p_n = prior.posterior(torch.tensor(x))
    assert (k_n, v_n) == (kappa_n, nu_n)
    np.testing.assert_allclose(mean_n.numpy(), m_n, rtol=1e-12)
    np.testing.assert_allclose(p_n.numpy(), psi_n, rtol=1e-12)


def test_niw_map_estimates_and_reference_defaults() -> None:
    x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    prior = NIWPrior.from_features(x)
    assert prior.kappa == 1e-4 and prior.nu == 5 and torch.allclose(prior.psi, 0.005 * torch.eye(4).double())
    counts, means = torch.tensor([3.0, 10.0]), x[:2]
    expected = (counts[:, None] * means + 1e-4 * x.mean(0)) / (counts[:, None] + 1e-4)
    torch.testing.assert_close(prior.map_means(counts, means), expected)
    cov = torch.eye(4).double() * 0.2
    gap = (means[0] - x.mean(0))[:, None]
    written = (prior.psi + 10 * cov + (1e-4 * 10 / (1e-4 + 10)) * gap @ gap.T) / (5 + 10 + 4 + 2)
    torch.testing.assert_close(prior.map_covariance(10.0, means[0], cov), written)
    torch.testing.assert_close(prior.map_covariance(0.0, means[0], cov), prior.psi)


def test_hastings_ratios_and_acceptance() -> None:
    lg = math.lgamma
    assert log_hastings_split(7, 9, -3.0, -4.5, -10.0, alpha=2.0) == pytest.approx(
        math.log(2.0) + lg(7) - 3.0 + lg(9) - 4.5 - lg(16) + 10.0
    )
    assert log_hastings_merge(7, 9, -3.0, -4.5, -10.0, alpha=2.0) == pytest.approx(
        lg(16) - math.log(2.0) - lg(7) - lg(9) - 10.0 + 7.5
    )
    assert log_hastings_merge(0, 4, 0.0, -1.0, -1.0) == pytest.approx(lg(4) - lg(4))  # empty: lgamma 0
    g = torch.Generator().manual_seed(3)
    assert accept_move(0.5, 0.0, g) and torch.equal(
        g.get_state(), torch.Generator().manual_seed(3).get_state()
    )
    draws = torch.rand(20, generator=torch.Generator().manual_seed(5)).tolist()
    g = torch.Generator().manual_seed(5)
    assert [accept_move(-50.0, 0.3, g) for _ in range(20)] == [u < 0.3 for u in draws]
    g = torch.Generator().manual_seed(5)
    assert [accept_move(math.log(0.6), None, g) for _ in range(20)] == [u < 0.6 for u in draws]


def test_mixture_log_prob_and_responsibilities_match_scipy() -> None:
    rng = np.random.default_rng(4)
    means = rng.normal(size=(3, 2))
    covs = np.stack([spd(2, s) * 0.1 for s in range(3)])
    weights = np.array([0.2, 0.5, 0.3])
    x = rng.normal(size=(10, 2))
    mix = GaussianMixture(torch.tensor(weights), torch.tensor(means), torch.tensor(covs))
    expected = np.stack(
        [
            np.log(w) + multivariate_normal(m, c).logpdf(x)
            for w, m, c in zip(weights, means, covs, strict=True)
        ],
        axis=1,
    )
    np.testing.assert_allclose(mix.log_prob(torch.tensor(x)).numpy(), expected, rtol=1e-10)
    labels = torch.tensor([-1, 2, -1, -1, 0, -1, -1, -1, -1, -1])
    resp = mix.responsibilities(torch.tensor(x), labels).numpy()
    soft = np.exp(expected - expected.max(1, keepdims=True))
    soft /= soft.sum(1, keepdims=True)
    np.testing.assert_allclose(resp[labels.numpy() < 0], soft[labels.numpy() < 0], rtol=1e-10)
    np.testing.assert_array_equal(resp[[1, 4]], np.eye(3)[[2, 0]])
    per_row = np.logaddexp.reduce(expected, axis=1)
    per_row[[1, 4]] = expected[1, 2], expected[4, 0]
    assert mix.log_likelihood(torch.tensor(x), labels) == pytest.approx(per_row.mean(), rel=1e-10)


def blobs(sizes: list[int], centres: list[list[float]], seed: int = 0, scale: float = 0.05) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    parts = [
        torch.tensor(c).double() + scale * torch.randn(n, len(c), generator=g).double()
        for n, c in zip(sizes, centres, strict=True)
    ]
    return torch.cat(parts)


def test_moves_split_a_mixed_cluster_merge_a_cut_one_and_never_touch_labelled() -> None:
    # blob A (known class 0, half labelled), blobs B and C new; clusters: 0 = A, 1 = B and C, 2 / 3 = B cut
    x = blobs([40, 40, 40], [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = torch.full((120,), -1)
    labels[:20] = 0
    assign = torch.tensor([0] * 40 + [1] * 80)
    centres = torch.stack([x[assign == k].mean(0) for k in range(2)])
    prior = NIWPrior.from_features(x)
    mixture = fit_mixture(x, assign, centres, prior)
    moves = propose_moves(x, assign, centres, mixture, prior, num_known=1, split_prob=0.0, merge_prob=0.0)
    assert list(moves.splits) == [1] and not moves.merges
    assert all(key[1] != 0 for key in moves.log_ratios)  # the labelled cluster is never proposed
    children = moves.splits[1].float()
    assert sorted(children.argmax(1).tolist()) == [1, 2]  # the halves are B and C
    # brute force: the ratio of cutting cluster 1 into B | C, from the formulas
    parts = [x[40:80], x[80:]]
    child_means = prior.map_means(torch.tensor([40.0, 40.0]), torch.stack([p.mean(0) for p in parts]))
    ratio = log_hastings_split(
        40, 40, prior.log_marginal_likelihood(parts[0], child_means[0]),
        prior.log_marginal_likelihood(parts[1], child_means[1]),
        prior.log_marginal_likelihood(x[40:], mixture.means[1]),
    )  # fmt: skip
    assert moves.log_ratios[("split", 1)] == pytest.approx(ratio)

    cut = torch.tensor([0] * 40 + [1] * 20 + [2] * 20 + [3] * 40)  # B cut in two, and an empty cluster 4
    centres = torch.stack([x[cut == k].mean(0) for k in range(4)] + [torch.ones(3).double()])
    mixture = fit_mixture(x, cut, centres, prior)
    moves = propose_moves(x, cut, centres, mixture, prior, num_known=1, split_prob=0.0, merge_prob=0.0)
    assert moves.merges == [(1, 2)] and not moves.splits and moves.empty == [4]


def test_apply_moves_edits_the_bank_and_keeps_labelled_rows_first() -> None:
    centres = F.normalize(torch.randn(5, 4, generator=torch.Generator().manual_seed(1)), dim=1).double()
    bank = PrototypeBank(5, 4, metric="cosine", learnable=False)
    with torch.no_grad():
        bank.vectors.copy_(centres.float())
    children = F.normalize(torch.randn(2, 4, generator=torch.Generator().manual_seed(2)), dim=1).double()
    moves = Moves(splits={2: children}, merges=[(3, 4)], empty=[])
    new = apply_moves(bank, centres, moves)
    expected = [centres[0], centres[1], children[0], (centres[3] + centres[4]) / 2, children[1]]
    torch.testing.assert_close(new, torch.stack(expected))
    assert bank.num_prototypes == 5 and bank.owners.tolist() == [0, 1, 2, 3, 4]
    torch.testing.assert_close(bank.vectors, F.normalize(new.float(), dim=1))
    bank2 = PrototypeBank(5, 4, metric="cosine", learnable=False)
    out = apply_moves(bank2, centres, Moves(empty=[1, 3]))
    torch.testing.assert_close(out, centres[[0, 2, 4]])
    assert bank2.num_prototypes == 3


def test_cluster_concentration_is_the_reference_density() -> None:
    x = blobs([6, 9, 1, 14, 5], [[0, 1.0], [1.0, 0], [0.5, 0.5], [-1.0, 0], [0, -1.0]], scale=0.2)
    assign = torch.tensor([0] * 6 + [1] * 9 + [2] + [3] * 14 + [4] * 5)
    centres = torch.stack([x[assign == k].mean(0) for k in range(5)])
    density = []
    for k in range(5):  # written out: mean distance / log(n + 10); singletons get the largest
        d = [float((x[i] - centres[k]).norm()) for i in range(len(x)) if assign[i] == k]
        density.append(sum(d) / len(d) / math.log(len(d) + 10) if len(d) > 1 else None)
    top = max(v for v in density if v is not None)
    density = np.array([top if v is None else v for v in density])
    density = density.clip(np.percentile(density, 10), np.percentile(density, 90))
    expected = 0.2 * density / density.mean()
    np.testing.assert_allclose(cluster_concentration(x, centres, assign, 0.2).numpy(), expected, rtol=1e-12)


def test_prototypical_contrastive_loss_written_out() -> None:
    g = torch.Generator().manual_seed(0)
    q, k, protos = (
        torch.randn(4, 3, generator=g),
        torch.randn(4, 3, generator=g),
        torch.randn(5, 3, generator=g),
    )
    phi = torch.tensor([0.5, 1.0, 0.8, 1.2, 0.3])
    targets = torch.tensor([0, 4, 2, 2])
    total = 0.0
    for view in (q, k):
        for i in range(4):
            logits = [
                float(F.normalize(view[i], dim=0) @ F.normalize(protos[j], dim=0)) / float(phi[j])
                for j in range(5)
            ]
            total += -(logits[int(targets[i])] - math.log(sum(math.exp(v) for v in logits))) / 4
    got = prototypical_contrastive_loss([q, k], protos, phi, targets)
    assert float(got) == pytest.approx(total / 2, rel=1e-5)
    with pytest.raises(ValueError, match="positive"):
        prototypical_contrastive_loss([q], protos, torch.zeros(5), targets)


def test_bad_input_fails_with_the_fix() -> None:
    x = blobs([20, 20], [[1.0, 0], [0, 1.0]])
    labels = torch.tensor([0] * 10 + [-1] * 10 + [1] * 10 + [-1] * 10)
    with pytest.raises(ValueError, match="below the 2 known classes"):
        GPCEStep()(x, labels, PrototypeBank(1, 2, metric="cosine", learnable=False), num_known=2)
    x[3, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        GPCEStep()(x, labels, PrototypeBank(3, 2, metric="cosine", learnable=False), num_known=2)
    with pytest.raises(ValueError, match="learnable_prototypes: false"):
        GPCModule(SimGCDNet(10, in_channels=1, head_hidden_dim=8, head_bottleneck_dim=4))
    with pytest.raises(ValueError, match="nu > D - 1"):
        NIWPrior(torch.zeros(3), torch.eye(3), 1e-4, 1.0)


def tiny_gpc(clusters: int) -> GPCModule:
    net = SimGCDNet(
        clusters, in_channels=1, head_hidden_dim=32, head_bottleneck_dim=16,
        learnable_prototypes=False, backbone_options={"width": 8},
    )  # fmt: skip
    return GPCModule(net, GPCEStep(n_init=2), optimizer=lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9))


def test_gpc_needs_at_least_the_known_classes_as_clusters() -> None:
    dm = GCDDataModule(digits_base(), known_classes=[0, 1, 2, 3, 4], seed=0)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    with pytest.raises(ValueError, match=r"num_classes=3 \(K clusters\) is below the 5 known classes"):
        trainer.fit(tiny_gpc(3), datamodule=dm)


def test_gpc_em_run_changes_k_through_the_bank_and_reports_it(tmp_path) -> None:
    dm = GCDDataModule(digits_base(), known_classes=[0, 1, 2, 3, 4], seed=0)
    module = tiny_gpc(16)
    trainer = L.Trainer(
        max_epochs=2, limit_train_batches=2, limit_val_batches=1, limit_test_batches=2, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, default_root_dir=tmp_path,
        callbacks=[GPCSchedule(warmup_epochs=0)],
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    assert [e for e, _ in module.k_history] == [0, 1]
    assert module.assignments is not None and len(module.assignments) == len(dm.train_dataset)
    bank = module.prototype_bank
    assert module.concentration.shape == (bank.num_prototypes,) and bank.owners.tolist() == list(
        range(bank.num_prototypes)
    )
    # labelled images keep their class's cluster (0..4)
    lab = torch.from_numpy(dm.labelled_mask)
    true = torch.from_numpy(dm.mapping[dm.base.train_dataset.targets.numpy()])
    assert torch.equal(module.assignments.cpu()[lab], true[lab])
    assert "train/k" in trainer.callback_metrics and "train/pcl" in trainer.callback_metrics
    metrics = trainer.test(module, datamodule=dm, verbose=False)[0]
    assert metrics["test/estimated_k"] == bank.num_prototypes == module.k_history[-1][1]
    assert 0.0 <= metrics["test/all_acc"] <= 1.0
    assert (tmp_path / "k_over_epochs.png").stat().st_size > 0


def test_principal_components_match_sklearn_and_map_back() -> None:
    from sklearn.decomposition import PCA

    from protolib.gcd.gmm import principal_components

    x = torch.randn(50, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    x = x * torch.tensor([3.0, 2.0, 1.0, 0.5, 0.2, 0.1]).double()
    z, embed = principal_components(x, 3)
    expected = PCA(3).fit_transform(x.numpy())
    np.testing.assert_allclose(np.abs(z.numpy()), np.abs(expected), atol=1e-8)  # axes up to sign
    back = PCA(3).fit(x.numpy())
    np.testing.assert_allclose(embed(z).numpy(), back.inverse_transform(back.transform(x.numpy())), atol=1e-8)
    same, identity = principal_components(x, None)
    assert same is x and identity(x) is x


@pytest.mark.parametrize("name", ["gpc_digits", "gpc_digits_unknown_k", "gpc_cifar100"])
def test_gpc_experiments_compose(tmp_path, name: str) -> None:
    from tests.config_helpers import compose_config

    cfg = compose_config(tmp_path, f"experiment={name}")
    assert cfg.model._target_ == "protolib.lit.gpc.GPCModule" and cfg.model.sup_weight == 0.35
    assert cfg.model.net.learnable_prototypes is False and cfg.callbacks.gpc_schedule is not None
    assert cfg.data._target_ == "protolib.data.gcd.GCDDataModule" and cfg.data.labelled_fraction == 0.5
    if name == "gpc_cifar100":
        assert cfg.model.net.trainable_blocks == 1 and cfg.model.net.pretrained
        assert cfg.data.known_classes == 80 and cfg.data.base.batch_size == 256
    else:
        assert cfg.model.net.num_classes == (20 if name.endswith("unknown_k") else 10)


def test_train_py_runs_gpc_from_a_wrong_k_and_writes_k(tmp_path) -> None:
    import json

    from protolib.cli.train import run
    from tests.config_helpers import compose_config

    cfg = compose_config(
        tmp_path, "experiment=gpc_digits_unknown_k", "trainer.max_epochs=2", "trainer.limit_train_batches=2",
        "trainer.limit_val_batches=1", "trainer.limit_test_batches=2", "model.net.head_hidden_dim=32",
        "model.net.head_bottleneck_dim=16", "model.e_step.n_init=2", "callbacks.cluster_gallery=null",
        "callbacks.gpc_schedule.warmup_epochs=1",
    )  # fmt: skip
    run(cfg)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    for key in ("test/all_acc", "test/old_acc", "test/new_acc", "test/estimated_k"):
        assert key in saved
    assert 5 <= saved["test/estimated_k"] <= 40  # K after the E-steps (after epoch 0 and the last)
    assert (tmp_path / "k_over_epochs.png").stat().st_size > 0


def test_e_step_without_moves_refits_at_fixed_k() -> None:
    x = blobs([80, 80, 80], [[1.0, 0, 0], [0, 1.0, 0], [0, 0, 1.0]])
    labels = torch.full((240,), -1)
    labels[:40] = 0
    bank = PrototypeBank(2, 3, metric="cosine", learnable=False)
    result = GPCEStep(n_init=2, split_prob=0.0, merge_prob=0.0)(x, labels, bank, num_known=1, moves=False)
    assert result.k == bank.num_prototypes == 2 and not result.moves.splits
    result = GPCEStep(n_init=2, split_prob=0.0, merge_prob=0.0)(x, labels, bank, num_known=1)
    assert result.k == bank.num_prototypes == 3 and list(result.moves.splits) == [1]  # B | C split
    assert sorted(F.normalize(result.centres, dim=1).argmax(1).tolist()) == [0, 1, 2]
