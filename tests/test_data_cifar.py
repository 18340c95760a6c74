"""CIFAR-10/100 loaders on tiny pickles written in the official (Python 2 style, bytes keys) format."""

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from protolib.data.cifar import CIFAR10DataModule, CIFAR100DataModule

NAMES10 = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def dump(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as f:
        pickle.dump(obj, f, protocol=2)


def batch(rng: np.random.Generator, n: int, num_classes: int, label_key: bytes) -> dict:
    labels = [i % num_classes for i in range(n)]
    return {
        b"data": rng.integers(0, 256, size=(n, 3072), dtype=np.uint8),
        label_key: labels,
        b"batch_label": b"tiny",
    }


@pytest.fixture
def cifar10(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        dump(folder / f"data_batch_{i}", batch(rng, 10, 10, b"labels"))
    dump(folder / "test_batch", batch(rng, 20, 10, b"labels"))
    dump(folder / "batches.meta", {b"label_names": [n.encode() for n in NAMES10], b"num_vis": 3072})
    return tmp_path


@pytest.fixture
def cifar100(tmp_path: Path) -> Path:
    rng = np.random.default_rng(1)
    folder = tmp_path / "cifar-100-python"
    for name, n in (("train", 300), ("test", 100)):
        data = batch(rng, n, 100, b"fine_labels")
        data[b"coarse_labels"] = [label // 5 for label in data[b"fine_labels"]]
        dump(folder / name, data)
    dump(
        folder / "meta",
        {
            b"fine_label_names": [f"fine{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse{i}".encode() for i in range(20)],
        },
    )
    return tmp_path


def read(path: Path) -> dict:
    with path.open("rb") as f:
        return pickle.load(f, encoding="bytes")


def test_cifar10_images_labels_and_names(cifar10):
    dm = CIFAR10DataModule(cifar10, val_fraction=0.2)
    dm.setup()
    assert dm.class_names == NAMES10 and dm.num_classes == 10 and dm.in_channels == 3
    assert len(dm.train_dataset) + len(dm.val_dataset) == 50 and len(dm.test_dataset) == 20
    raw = read(cifar10 / "cifar-10-batches-py" / "test_batch")
    for i in (0, 7):
        item = dm.test_dataset[i]
        assert item["image"].shape == (3, 32, 32) and item["label"] == raw[b"labels"][i]
        pixels = torch.round(dm.denormalize(item["image"]) * 255).to(torch.uint8)
        assert torch.equal(pixels, torch.from_numpy(raw[b"data"][i].reshape(3, 32, 32)))
    # root may also be the extracted folder itself
    direct = CIFAR10DataModule(cifar10 / "cifar-10-batches-py")
    direct.setup()
    assert len(direct.test_dataset) == 20


def test_cifar10_class_subset_by_name(cifar10):
    dm = CIFAR10DataModule(cifar10, classes=["dog", "cat"], image_size=16)
    dm.setup()
    assert dm.class_names == ["dog", "cat"]
    raw = torch.tensor(read(cifar10 / "cifar-10-batches-py" / "test_batch")[b"labels"])
    expected = raw[torch.as_tensor(dm.test_dataset.indices)]
    assert torch.equal(torch.tensor([5, 3])[dm.test_dataset.targets], expected)
    assert len(dm.test_dataset) == int(((raw == 5) | (raw == 3)).sum())
    assert dm.test_dataset[0]["image"].shape == (3, 16, 16)


def test_cifar100_uses_fine_labels(cifar100):
    dm = CIFAR100DataModule(cifar100, val_fraction=0.4)
    dm.setup()
    raw = read(cifar100 / "cifar-100-python" / "test")
    assert dm.num_classes == 100 and dm.class_names[7] == "fine7"
    assert dm.test_dataset.targets.tolist() == raw[b"fine_labels"]


def test_missing_file_names_the_path_and_the_download(cifar10):
    (cifar10 / "cifar-10-batches-py" / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError, match=r"data_batch_3 not found.*cifar-10-python.tar.gz"):
        CIFAR10DataModule(cifar10).setup()
    with pytest.raises(FileNotFoundError) as error:
        CIFAR10DataModule(cifar10 / "nowhere").setup()
    for place in (cifar10 / "nowhere" / "cifar-10-batches-py", cifar10 / "nowhere"):  # both levels looked at
        assert f"  - {place}\n" in str(error.value)


def test_a_test_only_set_needs_only_the_test_batch(cifar10):
    for i in range(1, 6):
        (cifar10 / "cifar-10-batches-py" / f"data_batch_{i}").unlink()
    test = CIFAR10DataModule(cifar10, image_size=16).standalone_test_dataset()
    raw = read(cifar10 / "cifar-10-batches-py" / "test_batch")
    assert len(test) == 20 and test.targets.tolist() == raw[b"labels"]


def test_truncated_pickle_is_a_clear_error(cifar10):
    path = cifar10 / "cifar-10-batches-py" / "data_batch_2"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"data_batch_2.*corrupt or truncated"):
        CIFAR10DataModule(cifar10).setup()


def test_wrong_image_size_is_a_clear_error(cifar10):
    path = cifar10 / "cifar-10-batches-py" / "test_batch"
    dump(path, {b"data": np.zeros((4, 28 * 28), dtype=np.uint8), b"labels": [0, 1, 2, 3]})
    with pytest.raises(ValueError, match=r"test_batch.*3072"):
        CIFAR10DataModule(cifar10).setup()


def test_labels_beyond_the_class_names_are_an_error(cifar10):
    dump(cifar10 / "cifar-10-batches-py" / "batches.meta", {b"label_names": [b"a", b"b"]})
    with pytest.raises(ValueError, match=r"labels span 0\.\.9 but there are 2 classes"):
        CIFAR10DataModule(cifar10).setup()
