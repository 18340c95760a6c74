"""Each postprocessor on a tiny model whose features are its input, against an independent computation."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from torch import nn

from protolib.bank import PrototypeBank
from protolib.ood.cli import CONFIG_DIR
from protolib.ood.features import extract_features
from protolib.ood.postprocessors import (
    ASH,
    GEN,
    KNN,
    MSP,
    ODIN,
    RMDS,
    Energy,
    Mahalanobis,
    MaxLogit,
    PALMScore,
    PrototypeScore,
    ReAct,
    ViM,
)

FEATURES, CLASSES = 6, 4


class TinyModel(nn.Module):
    """features = the flattened image (so tests choose them), logits = last_layer(features)."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.last_layer = nn.Linear(FEATURES, CLASSES)
        self.prototype_bank = None

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        features = images.flatten(1)
        return {"features": features, "logits": self.last_layer(features)}


def make_data(n: int, seed: int, shift: float = 0.0) -> dict[str, torch.Tensor]:
    """Class-clustered features (n, F) as images (n, F, 1, 1) with labels."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, CLASSES, n)
    centres = np.random.default_rng(99).normal(0, 3, (CLASSES, FEATURES))
    x = centres[labels] + rng.normal(0, 1, (n, FEATURES)) + shift
    return {"image": torch.tensor(x, dtype=torch.float32)[:, :, None, None], "label": torch.tensor(labels)}


@pytest.fixture(scope="module")
def model() -> TinyModel:
    return TinyModel().eval()


@pytest.fixture(scope="module")
def train() -> dict[str, torch.Tensor]:
    return make_data(300, seed=1)


@pytest.fixture(scope="module")
def test_batch() -> dict[str, torch.Tensor]:
    return make_data(40, seed=2, shift=0.5)


def loader(data: dict[str, torch.Tensor], batch_size: int = 64) -> list[dict[str, torch.Tensor]]:
    n = len(data["label"])
    return [{key: value[i : i + batch_size] for key, value in data.items()} for i in range(0, n, batch_size)]


def numpy_parts(model: TinyModel, data: dict[str, torch.Tensor]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x = data["image"].flatten(1).double().numpy()
    w = model.last_layer.weight.detach().double().numpy()
    b = model.last_layer.bias.detach().double().numpy()
    return x, w, b


def test_msp_maxlogit_energy_gen_from_logits(model: TinyModel, test_batch: dict[str, torch.Tensor]) -> None:
    x, w, b = numpy_parts(model, test_batch)
    logits = x @ w.T + b
    probs = softmax(logits, axis=1)
    np.testing.assert_allclose(MSP().score(model, test_batch), probs.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(MaxLogit().score(model, test_batch), logits.max(axis=1), rtol=1e-5)
    np.testing.assert_allclose(Energy().score(model, test_batch), logsumexp(logits, axis=1), rtol=1e-5)
    np.testing.assert_allclose(
        Energy(temperature=2.0).score(model, test_batch), 2.0 * logsumexp(logits / 2.0, axis=1), rtol=1e-5
    )
    for m in (2, 100):  # top-2 of 4 classes, and M larger than the number of classes (all of them)
        top = np.sort(probs, axis=1)[:, -m:]
        expected = -(top**0.1 * (1 - top) ** 0.1).sum(axis=1)
        np.testing.assert_allclose(GEN(gamma=0.1, M=m).score(model, test_batch), expected, rtol=1e-5)


def test_scores_from_images_equal_scores_from_extracted_features(model: TinyModel, test_batch: dict) -> None:
    features = extract_features(model, loader(test_batch, 16))
    torch.testing.assert_close(Energy().score(model, features), Energy().score(model, test_batch))


def test_odin_matches_analytic_gradient_of_a_linear_model(model: TinyModel, test_batch: dict) -> None:
    x, w, b = numpy_parts(model, test_batch)
    temperature, noise, std = 1000.0, 0.0014, 0.5
    logits = x @ w.T + b
    onehot = np.eye(CLASSES)[logits.argmax(axis=1)]
    # d CE(logits / T, y) / d x for logits = W x + b (mean over the batch does not change signs)
    grad = (softmax(logits / temperature, axis=1) - onehot) @ w / temperature
    moved = x - noise * np.where(grad >= 0, 1.0, -1.0) / std
    expected = softmax((moved @ w.T + b) / temperature, axis=1).max(axis=1)
    scores = ODIN(temperature, noise, input_std=[std]).score(model, test_batch)
    np.testing.assert_allclose(scores, expected, rtol=1e-6)
    # the perturbation raises the confidence of every sample (the point of ODIN)
    assert (scores.numpy() >= softmax(logits / temperature, axis=1).max(axis=1) - 1e-9).all()
    with pytest.raises(ValueError, match="image"):
        ODIN().score(model, extract_features(model, loader(test_batch)))


def test_mahalanobis_matches_numpy_and_sklearn(model: TinyModel, train: dict, test_batch: dict) -> None:
    x_train, _, _ = numpy_parts(model, train)
    labels = train["label"].numpy()
    means = np.stack([x_train[labels == c].mean(axis=0) for c in range(CLASSES)])
    centred = x_train - means[labels]
    precision = np.linalg.pinv(centred.T @ centred / len(x_train))
    np.testing.assert_allclose(precision, EmpiricalCovariance().fit(centred).precision_, rtol=1e-6)
    x, _, _ = numpy_parts(model, test_batch)
    diffs = x[:, None, :] - means[None]  # (B, C, F)
    expected = -np.einsum("bcf,fg,bcg->bc", diffs, precision, diffs).min(axis=1)

    from_features = Mahalanobis().fit(model, extract_features(model, loader(train)))
    np.testing.assert_allclose(from_features.score(model, test_batch), expected, rtol=1e-4)
    # streaming over a dataloader in small batches gives the same statistics
    streamed = Mahalanobis().fit(model, loader(train, batch_size=7))
    np.testing.assert_allclose(streamed.score(model, test_batch), expected, rtol=1e-4)


@pytest.mark.parametrize("center", ["standardized", "raw"])
def test_mahalanobis_palm_mode_matches_numpy(
    model: TinyModel, train: dict, test_batch: dict, center: str
) -> None:
    # PALM's reference eval_maha, written out: standardise the unit features with the training mean and
    # std, then (raw) subtract the unstandardised mean once more, or (standardized) centre at zero
    x_train, _, _ = numpy_parts(model, train)
    unit = x_train / (np.linalg.norm(x_train, axis=1, keepdims=True) + 1e-10)
    mean, std = unit.mean(axis=0), unit.std(axis=0) + 1e-10
    standardised = (unit - mean) / std
    precision = np.linalg.pinv(np.cov(standardised.T, bias=True))
    x, _, _ = numpy_parts(model, test_batch)
    z = (x / (np.linalg.norm(x, axis=1, keepdims=True) + 1e-10) - mean) / std
    if center == "raw":
        z = z - mean
    expected = -np.einsum("bf,fg,bg->b", z, precision, z)
    postprocessor = Mahalanobis(normalize=True, standardize=True, class_conditional=False, center=center)
    postprocessor.fit(model, loader(train, batch_size=50))
    np.testing.assert_allclose(postprocessor.score(model, test_batch), expected, rtol=1e-4)


def test_palm_ssd_config_is_the_reference_centring() -> None:
    config = OmegaConf.load(Path(CONFIG_DIR) / "postprocessors" / "palm_ssd.yaml")
    assert instantiate(config.palm_ssd).center == "raw"
    with pytest.raises(ValueError, match="choose one of"):
        Mahalanobis(center="zero")


def test_rmds_matches_numpy(model: TinyModel, train: dict, test_batch: dict) -> None:
    x_train, _, _ = numpy_parts(model, train)
    labels = train["label"].numpy()
    means = np.stack([x_train[labels == c].mean(axis=0) for c in range(CLASSES)])
    precision = np.linalg.pinv(np.cov((x_train - means[labels]).T, bias=True))
    background_mean = x_train.mean(axis=0)
    background_precision = np.linalg.pinv(np.cov(x_train.T, bias=True))
    x, _, _ = numpy_parts(model, test_batch)
    diffs = x[:, None, :] - means[None]
    class_md = np.einsum("bcf,fg,bcg->bc", diffs, precision, diffs)
    d0 = x - background_mean
    background_md = np.einsum("bf,fg,bg->b", d0, background_precision, d0)
    expected = (background_md[:, None] - class_md).max(axis=1)
    scores = RMDS().fit(model, loader(train)).score(model, test_batch)
    np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-6)


def test_knn_is_minus_the_brute_force_kth_neighbour_distance(
    model: TinyModel, train: dict, test_batch: dict
) -> None:
    x_train, _, _ = numpy_parts(model, train)
    x, _, _ = numpy_parts(model, test_batch)
    unit_train = x_train / np.linalg.norm(x_train, axis=1, keepdims=True)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    distances = np.sqrt(((unit[:, None, :] - unit_train[None]) ** 2).sum(-1))  # (B, N)
    for k in (1, 5, 50):
        expected = -np.sort(distances, axis=1)[:, k - 1]
        scores = KNN(k=k).fit(model, loader(train)).score(model, test_batch)
        np.testing.assert_allclose(scores, expected, rtol=1e-4, atol=1e-5)
    # approximate indexes from the bank's factory agree on this small set
    hnsw = KNN(k=5, index="hnsw").fit(model, loader(train)).score(model, test_batch)
    np.testing.assert_allclose(hnsw, -np.sort(distances, axis=1)[:, 4], rtol=1e-3, atol=1e-4)


def test_knn_clips_k_to_the_training_size_with_a_warning(
    model: TinyModel, train: dict, test_batch: dict
) -> None:
    few = {key: value[:10] for key, value in train.items()}
    with pytest.warns(UserWarning, match="only 10 training features; using k=10"):
        postprocessor = KNN(k=50).fit(model, few)
    x_few, _, _ = numpy_parts(model, few)
    x, _, _ = numpy_parts(model, test_batch)
    unit_few = x_few / np.linalg.norm(x_few, axis=1, keepdims=True)
    unit = x / np.linalg.norm(x, axis=1, keepdims=True)
    farthest = np.sqrt(((unit[:, None] - unit_few[None]) ** 2).sum(-1)).max(axis=1)
    np.testing.assert_allclose(postprocessor.score(model, test_batch), -farthest, rtol=1e-4, atol=1e-5)


def test_vim_matches_openood_computation(model: TinyModel, train: dict, test_batch: dict) -> None:
    x_train, w, b = numpy_parts(model, train)
    dim = 3
    u = -np.linalg.pinv(w) @ b
    covariance = EmpiricalCovariance(assume_centered=True).fit(x_train - u).covariance_
    eigenvalues, eigenvectors = np.linalg.eigh(covariance)
    null_space = eigenvectors[:, np.argsort(-eigenvalues)[dim:]]
    alpha = (x_train @ w.T + b).max(axis=1).mean() / np.linalg.norm((x_train - u) @ null_space, axis=1).mean()
    x, _, _ = numpy_parts(model, test_batch)
    expected = logsumexp(x @ w.T + b, axis=1) - alpha * np.linalg.norm((x - u) @ null_space, axis=1)
    postprocessor = ViM(dim=dim).fit(model, loader(train))
    assert postprocessor.alpha == pytest.approx(alpha, rel=1e-6)
    np.testing.assert_allclose(postprocessor.score(model, test_batch), expected, rtol=1e-5)
    with pytest.warns(UserWarning, match="using dim=3"):
        ViM(dim=256).fit(model, loader(train))  # 256 >= 6 features: falls back to 6 // 2


def test_react_clips_at_the_id_percentile_then_energy(
    model: TinyModel, train: dict, test_batch: dict
) -> None:
    x_val, w, b = numpy_parts(model, train)
    threshold = np.percentile(x_val.ravel(), 90)
    x, _, _ = numpy_parts(model, test_batch)
    expected = logsumexp(np.minimum(x, threshold) @ w.T + b, axis=1)
    postprocessor = ReAct(percentile=90).fit(model, extract_features(model, loader(train)))
    assert postprocessor.threshold == pytest.approx(threshold, rel=1e-6)
    np.testing.assert_allclose(postprocessor.score(model, test_batch), expected, rtol=1e-5)


def direct_ash(x: np.ndarray, percentile: float, variant: str) -> np.ndarray:
    out = np.zeros_like(x)
    keep = x.shape[1] - int(np.round(x.shape[1] * percentile / 100))
    for i, row in enumerate(x):
        top = np.argsort(-row)[:keep]
        if variant == "b":
            out[i, top] = row.sum() / keep
        else:
            out[i, top] = row[top]
            if variant == "s":
                out[i] *= np.exp(row.sum() / row[top].sum())
    return out


@pytest.mark.parametrize("variant", ["b", "p", "s"])
def test_ash_matches_direct_computation(model: TinyModel, test_batch: dict, variant: str) -> None:
    x, w, b = numpy_parts(model, test_batch)
    x = np.abs(x)  # post-ReLU-like activations
    batch = {"image": torch.tensor(x, dtype=torch.float32)[:, :, None, None]}
    expected = logsumexp(direct_ash(x, 65, variant) @ w.T + b, axis=1)
    np.testing.assert_allclose(ASH(percentile=65, variant=variant).score(model, batch), expected, rtol=1e-4)


def test_prototype_and_palm_scores() -> None:
    torch.manual_seed(0)
    owners = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    bank = PrototypeBank(len(owners), 5, owners=owners, metric="cosine", learnable=False)

    class ProtoModel(nn.Module):
        last_layer = None

        def __init__(self) -> None:
            super().__init__()
            self.prototype_bank = bank

        def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            embedding = nn.functional.normalize(images.flatten(1), dim=1)
            similarity = embedding @ self.prototype_bank.vectors.T
            return {
                "logits": similarity[:, :3],
                "features": images.flatten(1),
                "embedding": embedding,
                "prototype_similarity": similarity,
            }

    model = ProtoModel()
    batch = {"image": torch.randn(12, 5, 1, 1)}
    out = model.extract(batch["image"])
    z, p = out["embedding"].double().numpy(), bank.vectors.double().numpy()
    np.testing.assert_allclose(PrototypeScore().score(model, batch), (z @ p.T).max(axis=1), rtol=1e-6)
    per_class = np.stack(
        [np.log(np.mean(np.exp(z @ p[owners.numpy() == c].T / 0.1), axis=1)) for c in range(3)], 1
    )
    palm = PALMScore(temperature=0.1).score(model, batch)
    np.testing.assert_allclose(palm, per_class.max(axis=1), rtol=1e-5)
    # equal prototypes per class: the same ranking as max_c logsumexp (a constant log K apart)
    lse = np.stack([logsumexp(z @ p[owners.numpy() == c].T / 0.1, axis=1) for c in range(3)], 1).max(axis=1)
    np.testing.assert_allclose(palm.numpy() + np.log(3), lse, rtol=1e-5)
    with pytest.raises(ValueError, match="prototype_temperature"):
        PALMScore().score(model, batch)
    model.prototype_temperature = 0.1  # the model's own temperature is the default
    np.testing.assert_allclose(PALMScore().score(model, batch), palm, rtol=1e-6)
    with pytest.raises(ValueError, match="prototype_bank"):
        PALMScore().check(TinyModel(), ["embedding"])


def test_clear_errors(model: TinyModel, train: dict, test_batch: dict) -> None:
    with pytest.raises(RuntimeError, match="not fitted"):
        KNN().score(model, test_batch)
    with pytest.raises(ValueError, match="needs \\['embedding'\\]"):
        PALMScore().score(model, test_batch)

    class NoLastLayer(TinyModel):
        def __init__(self) -> None:
            super().__init__()
            self.last_layer = None

    headless = NoLastLayer()
    for postprocessor in (ReAct(), ASH(), ViM()):
        with pytest.raises(ValueError, match="last_layer"):
            postprocessor.check(headless, ["features", "logits"])
    with pytest.raises(ValueError, match="label"):
        Mahalanobis().fit(model, [{"image": train["image"]}])
    bad = {"image": torch.full((4, FEATURES, 1, 1), float("nan")), "label": torch.zeros(4, dtype=torch.long)}
    with pytest.raises(ValueError, match="NaN"):
        Mahalanobis().fit(model, bad)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Energy().fit(model, loader(train))  # no fit needed: a silent no-op
