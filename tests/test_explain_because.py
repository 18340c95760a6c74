"""The "This looks like that, because" importances: every modification against an independent computation
(colorsys, numpy formulas, the reference's np.roll loop, brute-force non-local means), local and global
importance on a hand-built network whose similarities are known functions of the pixels."""

from __future__ import annotations

import colorsys
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from scipy.stats import t as scipy_t
from torch import nn

from explain.scores import SCORES, score_model
from explain.scores.because import (
    Modifications,
    characteristics_for,
    generalisation,
    lab8_to_rgb,
    local_importance,
    modify,
    nl_means,
    prototype_importance,
    rgb_to_lab8,
    sample_indices,
    save_importance_figures,
)
from protolib.data.parts import PartsDataModule
from protolib.models.baseline import BaselineNet
from protolib.models.protopnet import ProtoPNet


def gray_of(x: np.ndarray) -> np.ndarray:
    """(..., H, W) ITU-R 601 luma of an RGB array (3, H, W), torchvision's weights."""
    return 0.2989 * x[0] + 0.587 * x[1] + 0.114 * x[2]


def hue_shifted(x: np.ndarray, shift: float) -> np.ndarray:
    """(3, H, W) with every pixel's hue moved by ``shift`` through colorsys."""
    out = np.empty_like(x)
    for i in range(x.shape[1]):
        for j in range(x.shape[2]):
            h, s, v = colorsys.rgb_to_hsv(*x[:, i, j])
            out[:, i, j] = colorsys.hsv_to_rgb((h + shift) % 1.0, s, v)
    return out


def reference_roll(img: np.ndarray, amplitude: float, frequency: float) -> np.ndarray:
    """The reference's modify_shape written out on (H, W, C): rows rolled, then columns rolled."""
    img = img.copy()
    for i in range(img.shape[0]):
        img[i] = np.roll(img[i], int(amplitude * np.sin(np.pi * i * frequency)), axis=0)
    for j in range(img.shape[1]):
        img[:, j] = np.roll(img[:, j], int(amplitude * np.sin(np.pi * j * frequency)), axis=0)
    return img


def brute_nl_means(x: np.ndarray, h: float, template: int, search: int) -> np.ndarray:
    """Non-local means by loops on (C, H, W): weight exp(-mean template sq. distance / (h^2 C)), dropped
    below 1e-3."""
    c, height, width = x.shape
    t, s = template // 2, search // 2
    p = np.pad(x, ((0, 0), (s + t, s + t), (s + t, s + t)), mode="reflect")  # reflect-101
    out = np.zeros_like(x)
    for i in range(height):
        for j in range(width):
            ci, cj = i + s + t, j + s + t
            mine = p[:, ci - t : ci + t + 1, cj - t : cj + t + 1]
            num, den = np.zeros(c), 0.0
            for di in range(-s, s + 1):
                for dj in range(-s, s + 1):
                    other = p[:, ci + di - t : ci + di + t + 1, cj + dj - t : cj + dj + t + 1]
                    w = np.exp(-((mine - other) ** 2).sum(0).mean() / (h * h * c))
                    w = 0.0 if w < 1e-3 else w
                    num += w * p[:, ci + di, cj + dj]
                    den += w
            out[:, i, j] = num / den
    return out


@pytest.fixture
def rgb() -> torch.Tensor:
    return torch.rand(2, 3, 6, 7, generator=torch.Generator().manual_seed(0))


def test_hue_saturation_contrast_match_colorsys_and_the_blend_formulas(rgb: torch.Tensor) -> None:
    x = rgb.numpy().astype(np.float64)
    for b in range(2):
        assert np.allclose(modify(rgb, "hue")[b].numpy(), hue_shifted(x[b], 0.1), atol=1e-5)
        gray = gray_of(x[b])
        expected = np.clip(0.7 * x[b] + 0.3 * gray, 0, 1)
        assert np.allclose(modify(rgb, "saturation")[b].numpy(), expected, atol=1e-6)
        expected = np.clip(0.45 * x[b] + 0.55 * gray.mean(), 0, 1)
        assert np.allclose(modify(rgb, "contrast")[b].numpy(), expected, atol=1e-6)
    assert np.allclose(modify(rgb, "brightness").numpy(), np.clip(0.8 * x, 0, 1), atol=1e-6)  # the code's 6th
    assert characteristics_for(1) == ("shape", "texture", "contrast")
    assert characteristics_for(3) == ("hue", "shape", "texture", "contrast", "saturation")
    with pytest.raises(ValueError, match="unknown characteristic 'colour'"):
        modify(rgb, "colour")


def test_shape_is_the_references_sine_roll_and_is_done_at_the_reference_size_on_small_images(
    rgb: torch.Tensor,
) -> None:
    image = torch.rand(1, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    mods = Modifications(shape_amplitude=3.0, shape_frequency=0.2, shape_reference_size=12)  # k = 1
    expected = reference_roll(image[0].permute(1, 2, 0).numpy(), 3.0, 0.2)
    assert np.array_equal(modify(image, "shape", mods)[0].permute(1, 2, 0).numpy(), expected)
    mods = Modifications(shape_amplitude=3.0, shape_frequency=0.2, shape_reference_size=24)  # k = 2
    big = image[0].permute(1, 2, 0).numpy().repeat(2, axis=0).repeat(2, axis=1)  # (24, 20, 3)
    warped = reference_roll(big, 3.0, 0.2)
    expected = warped.reshape(12, 2, 10, 2, 3).mean(axis=(1, 3))
    assert np.allclose(modify(image, "shape", mods)[0].permute(1, 2, 0).numpy(), expected, atol=1e-6)


def test_non_local_means_matches_a_brute_force_loop() -> None:
    gen = np.random.default_rng(2)
    x = gen.uniform(0, 60, size=(2, 7, 6))  # two channels, like OpenCV's (a, b) pass
    got = nl_means(torch.from_numpy(x)[None], h=12.0, template=3, search=5)[0].numpy()
    assert np.allclose(got, brute_nl_means(x, 12.0, 3, 5), atol=1e-9)
    with pytest.raises(ValueError, match="must be odd"):
        nl_means(torch.from_numpy(x)[None], h=4.0, template=4, search=5)


def test_lab_conversion_is_opencvs_8_bit_lab_of_linear_rgb() -> None:
    red = torch.tensor([1.0, 0.0, 0.0])[None, :, None, None]
    # CIE Lab of linear-RGB red with the D65 matrix: L 53.24, a 80.09, b 67.20; OpenCV 8-bit: L x 2.55, +128
    expected = np.array([53.24 * 2.55, 80.09 + 128, 67.20 + 128])
    assert np.allclose(rgb_to_lab8(red).flatten().numpy(), expected, atol=0.05)
    image = torch.rand(1, 3, 5, 5, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(lab8_to_rgb(rgb_to_lab8(image)).float(), image, atol=1e-5)
    flat = torch.full((1, 3, 8, 8), 0.4)
    assert torch.allclose(modify(flat, "texture"), flat, atol=1 / 255)  # nothing to denoise but 8-bit Lab


class PixelNet(nn.Module):
    """Two prototypes with known similarity maps at pixel resolution: 0 = red value, 1 = channel mean."""

    def __init__(self) -> None:
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, images: torch.Tensor) -> SimpleNamespace:
        return SimpleNamespace(similarity_maps=torch.stack([images[:, 0], images.mean(1)], dim=1))

    def paired_similarity_maps(self, images: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self(images).similarity_maps[torch.arange(len(ids)), ids]


def parts_data() -> PartsDataModule:
    """Six raw (mean 0, std 1) parts images at 16 px."""
    dm = PartsDataModule(
        num_classes=2, train_per_class=3, val_per_class=1, test_per_class=1, image_size=16, grid=2,
        parts_per_class=1, mean=(0.0,), std=(1.0,), batch_size=4,
    )  # fmt: skip
    dm.setup("fit")
    return dm


def test_local_and_global_importance_on_a_network_with_known_similarities() -> None:
    dm = parts_data()
    names = ("hue", "contrast", "saturation")
    result = prototype_importance(PixelNet(), dm, max_images=None, characteristics=names, progress=False)
    images = np.stack([dm.train_dataset.eval_view()[i]["image"].numpy() for i in range(6)]).astype(np.float64)
    expected_local = np.zeros((6, 2, 3))
    expected_sim = np.zeros((6, 2))
    for n, x in enumerate(images):
        modified = {
            "hue": hue_shifted(x, 0.1),
            "contrast": np.clip(0.45 * x + 0.55 * gray_of(x).mean(), 0, 1),
            "saturation": np.clip(0.7 * x + 0.3 * gray_of(x), 0, 1),
        }
        for p, readout in enumerate([lambda im: im[0], lambda im: im.mean(0)]):
            where = np.unravel_index(np.argmax(readout(x)), x.shape[1:])  # the best patch, unmodified
            expected_sim[n, p] = readout(x)[where]
            for m, name in enumerate(names):
                expected_local[n, p, m] = readout(x)[where] - readout(modified[name])[where]
    assert np.allclose(result.similarity.numpy(), expected_sim, atol=1e-6)
    assert np.allclose(result.local.numpy(), expected_local, atol=1e-5)
    weights = expected_sim[:, :, None]
    expected_global = (weights * expected_local).sum(0) / weights.sum(0)  # the reference's weighted_mean
    assert np.allclose(result.global_importance.numpy(), expected_global, atol=1e-5)
    assert result.table()[1]["contrast"] == pytest.approx(expected_global[1, 1], abs=1e-5)
    # the reference's train/test check: Welch's t statistic written out, its two-sided p from Student's t
    test = prototype_importance(PixelNet(), dm, None, names, split="test", progress=False)
    a, b = result.global_importance[:, 1].double().numpy(), test.global_importance[:, 1].double().numpy()
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    t = (a.mean() - b.mean()) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))
    assert generalisation(result, test)["contrast"] == pytest.approx(2 * scipy_t.sf(abs(t), dof), rel=1e-4)
    assert result.table()[0] == pytest.approx(dict(zip(names, expected_global[0], strict=True)), abs=1e-5)
    summary = result.summary()
    assert summary["hue"] == pytest.approx(expected_global[:, 0].mean(), abs=1e-5)
    assert summary["change_contrast"] > 0


def test_local_importance_on_whole_image_prototypes_and_sampling() -> None:
    class VectorNet(nn.Module):  # prototype similarity of the whole image, no maps (PALM-like)
        def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
            return {"prototype_similarity": images.mean(dim=(2, 3))}  # (B, 3): mean of each channel

    image = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(4))
    out = local_importance(VectorNet(), image, torch.zeros(3, 1, 1), torch.ones(3, 1, 1), ("contrast",))
    expected = image.mean(dim=(2, 3)) - modify(image, "contrast").mean(dim=(2, 3))
    assert torch.allclose(out.delta[..., 0], expected, atol=1e-6)
    assert out.table(0, 2) == pytest.approx({"contrast": float(expected[0, 2])})
    assert sample_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert sample_indices(3, 200).tolist() == [0, 1, 2]


def test_registered_score_runs_on_protopnet_and_explains_why_not_for_a_baseline(tmp_path) -> None:
    dm = parts_data()
    torch.manual_seed(0)
    net = ProtoPNet(
        num_classes=2, in_channels=3, image_size=16, backbone="small_cnn", prototypes_per_class=2,
        prototype_dim=8,
    )  # fmt: skip
    assert "because" in SCORES
    scores = score_model(net, dm, names=["because"], max_images=4, progress=False)
    for name in ("hue", "shape", "texture", "contrast", "saturation"):
        assert np.isfinite(scores[f"because/{name}"])
        assert scores[f"because/change_{name}"] >= 0
    result = prototype_importance(net, dm, max_images=4, progress=False)
    paths = save_importance_figures(result, tmp_path, prototypes=[0, 3])
    assert all(path.stat().st_size > 0 for path in paths.values())
    with pytest.raises(ValueError, match="prototype ids \\[7\\] do not exist"):
        save_importance_figures(result, tmp_path, prototypes=[7])
    reason = SCORES["because"].unavailable(BaselineNet(num_classes=2), dm)
    assert reason is not None and "no prototype similarities" in reason
    wrapped = SimpleNamespace(base=dm)  # category discovery's datamodule holds the images as .base
    test_result = prototype_importance(net, wrapped, max_images=2, split="test", progress=False)
    assert test_result.local.shape == (2, 4, 5)
    assert "not set up" in SCORES["because"].unavailable(net, PartsDataModule(num_classes=2))
    assert "not a protolib VisionDataModule" in SCORES["because"].unavailable(net, SimpleNamespace())
