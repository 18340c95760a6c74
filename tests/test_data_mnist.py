"""MNIST / Fashion-MNIST loaders on tiny idx files, raw and gzipped, and their bad-input errors."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from protolib.data.mnist import FashionMNISTDataModule, MNISTDataModule

FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_mnist(root: Path, gz: bool, n_train: int = 40, n_test: int = 20) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    arrays = {
        FILES[0]: rng.integers(0, 256, size=(n_train, 28, 28)),
        FILES[1]: np.arange(n_train) % 10,
        FILES[2]: rng.integers(0, 256, size=(n_test, 28, 28)),
        FILES[3]: (np.arange(n_test) * 3) % 10,
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        data = idx_bytes(array)
        if gz:
            (root / f"{name}.gz").write_bytes(gzip.compress(data))
        else:
            (root / name).write_bytes(data)
    return arrays


@pytest.mark.parametrize("gz", [False, True])
def test_reads_raw_and_gzipped_idx_files(tmp_path, gz):
    arrays = write_mnist(tmp_path, gz)
    dm = MNISTDataModule(tmp_path, val_fraction=0.25)
    dm.setup()
    assert (dm.in_channels, dm.image_size, dm.num_classes) == (1, 28, 10)
    assert len(dm.train_dataset) == 30 and len(dm.val_dataset) == 10
    assert dm.test_dataset.targets.tolist() == arrays[FILES[3]].tolist()
    item = dm.test_dataset[4]
    pixels = torch.round(dm.denormalize(item["image"]) * 255)
    assert item["image"].shape == (1, 28, 28)
    assert torch.equal(pixels[0], torch.from_numpy(arrays[FILES[2]][4]).float())


def test_fashion_names_resize_and_rgb(tmp_path):
    write_mnist(tmp_path, gz=True)
    dm = FashionMNISTDataModule(
        tmp_path, image_size=32, in_channels=3, classes=["Bag", "Trouser"], val_fraction=0.25
    )
    dm.setup()
    assert dm.class_names == ["Bag", "Trouser"]
    assert dm.test_dataset[0]["image"].shape == (3, 32, 32)
    assert set(dm.test_dataset.targets.tolist()) == {0, 1}


def test_missing_file_names_both_spellings(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / FILES[3]).unlink()
    with pytest.raises(FileNotFoundError, match=r"t10k-labels-idx1-ubyte\[\.gz\] not found"):
        MNISTDataModule(tmp_path).setup()


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-100], "is truncated: header"),
        (lambda data: data + b"\0", "is longer than its header"),
        (lambda data: data[:10], "is truncated inside its header"),
        (lambda data: bytes([0, 0, 0x0D, 3]) + data[4:], "starts with bytes 00000d03"),
    ],
)
def test_damaged_raw_files_are_clear_errors(tmp_path, damage, message):
    write_mnist(tmp_path, gz=False)
    path = tmp_path / FILES[0]
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(ValueError, match=rf"{FILES[0]} {message}"):
        MNISTDataModule(tmp_path).setup()


def test_swapped_or_truncated_gz_files_are_clear_errors(tmp_path):
    write_mnist(tmp_path, gz=True)
    images, labels = tmp_path / f"{FILES[2]}.gz", tmp_path / f"{FILES[3]}.gz"
    good_images = images.read_bytes()
    images.write_bytes(labels.read_bytes())
    with pytest.raises(ValueError, match="images vs labels"):
        MNISTDataModule(tmp_path).setup()
    images.write_bytes(good_images[: len(good_images) // 2])
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.gz.*corrupt or truncated"):
        MNISTDataModule(tmp_path).setup()


def test_image_and_label_counts_must_agree(tmp_path):
    write_mnist(tmp_path, gz=False)
    (tmp_path / FILES[1]).write_bytes(idx_bytes(np.arange(39) % 10))
    with pytest.raises(ValueError, match=r"40 images but .* has 39"):
        MNISTDataModule(tmp_path).setup()


@pytest.mark.parametrize(
    ("module", "nesting"),
    [
        (MNISTDataModule, "MNIST/raw"),
        (FashionMNISTDataModule, "FashionMNIST/raw"),
        (MNISTDataModule, "raw"),
    ],
)
def test_torchvision_and_raw_layouts_are_found(tmp_path, module, nesting):
    arrays = write_mnist(tmp_path / nesting, gz=True)
    dm = module(tmp_path, val_fraction=0.25)
    dm.setup()
    assert len(dm.test_dataset) == 20
    assert dm.test_dataset.targets.tolist() == arrays[FILES[3]].tolist()


def test_nothing_found_lists_every_place_looked(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        FashionMNISTDataModule(tmp_path).setup()
    message = str(error.value)
    for place in (tmp_path, tmp_path / "raw", tmp_path / "FashionMNIST" / "raw"):
        assert f"  - {place}\n" in message
    assert "fashion-mnist" in message


def test_a_test_only_set_needs_only_its_test_files(tmp_path):
    arrays = write_mnist(tmp_path, gz=False)
    for name in FILES[:2]:
        (tmp_path / name).unlink()  # e.g. notMNIST converted to idx: no training files
    test = MNISTDataModule(tmp_path, image_size=16).standalone_test_dataset()
    assert len(test) == 20 and test[0]["image"].shape == (1, 16, 16)
    assert test.targets.tolist() == arrays[FILES[3]].tolist()
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte\[\.gz\] not found"):
        MNISTDataModule(tmp_path).setup()  # training still needs them
