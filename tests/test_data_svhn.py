"""SVHN loader on tiny .mat files written with scipy.io.savemat in the official layout."""

from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from protolib.data.svhn import SVHNDataModule


def write(path: Path, n: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    mat = {
        "X": rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8),
        "y": (np.arange(n) % 10 + 1).reshape(n, 1).astype(np.uint8),
    }  # 1..10, 10 = digit 0
    scipy.io.savemat(path, mat)
    return mat


@pytest.fixture
def svhn(tmp_path: Path) -> Path:
    write(tmp_path / "train_32x32.mat", 60, 0)
    write(tmp_path / "test_32x32.mat", 20, 1)
    return tmp_path


def test_images_and_labels_match_the_mat_layout(svhn):
    dm = SVHNDataModule(svhn, val_fraction=0.2)
    dm.setup()
    raw = scipy.io.loadmat(svhn / "test_32x32.mat")
    assert dm.class_names == [str(d) for d in range(10)]
    assert dm.test_dataset.targets.tolist() == (raw["y"].ravel() % 10).tolist()
    assert dm.test_dataset.targets[9] == 0  # label 10 is digit 0
    item = dm.test_dataset[3]
    pixels = torch.round(dm.denormalize(item["image"]) * 255).to(torch.uint8)  # (3, 32, 32)
    assert torch.equal(pixels, torch.from_numpy(raw["X"][:, :, :, 3]).permute(2, 0, 1))
    assert len(dm.train_dataset) == 50 and len(dm.val_dataset) == 10  # 1 of 6 per class


def test_extra_split_is_added_to_training(svhn):
    write(svhn / "extra_32x32.mat", 30, 2)
    dm = SVHNDataModule(svhn, use_extra=True, val_fraction=0.2)
    dm.setup()
    assert len(dm.train_dataset) + len(dm.val_dataset) == 90


def test_missing_corrupt_and_misshaped_files(svhn):
    with pytest.raises(FileNotFoundError, match=r"extra_32x32.mat not found.*housenumbers"):
        SVHNDataModule(svhn, use_extra=True).setup()
    path = svhn / "test_32x32.mat"
    good = path.read_bytes()
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=r"test_32x32.mat.*corrupt or truncated"):
        SVHNDataModule(svhn).setup()
    scipy.io.savemat(path, {"X": np.zeros((28, 28, 3, 4), np.uint8), "y": np.ones((4, 1), np.uint8)})
    with pytest.raises(ValueError, match=r"\(32, 32, 3, N\)"):
        SVHNDataModule(svhn).setup()
    scipy.io.savemat(path, {"X": np.zeros((32, 32, 3, 4), np.uint8), "y": np.ones((3, 1), np.uint8)})
    with pytest.raises(ValueError, match="4 images but 3 labels"):
        SVHNDataModule(svhn).setup()
