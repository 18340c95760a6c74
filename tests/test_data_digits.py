"""Digits datamodule and the shared VisionDataModule behaviour: splits, class subsets, views, push, errors."""

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from sklearn.neighbors import KNeighborsClassifier
from torchvision.transforms import v2

from protolib.data.digits import DigitsDataModule


def make(**kwargs) -> DigitsDataModule:
    dm = DigitsDataModule(**kwargs)
    dm.setup("fit")
    return dm


def raw_images(dataset) -> np.ndarray:
    """The 8x8 source images of a dataset's samples, (N, 64)."""
    return dataset.source.images[torch.as_tensor(dataset.indices)].reshape(len(dataset), -1).numpy()


def stack(dataset, key="image") -> torch.Tensor:
    return torch.stack([torch.as_tensor(dataset[i][key]) for i in range(len(dataset))])


def test_split_sizes_partition_and_stratification():
    dm = make()
    sizes = [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)]
    assert sum(sizes) == 1797
    assert np.allclose(np.array(sizes) / 1797, [0.7, 0.1, 0.2], atol=0.01)
    # the three splits partition sklearn's images (compared as a multiset of pixel rows)
    ours = np.concatenate([raw_images(d) for d in (dm.train_dataset, dm.val_dataset, dm.test_dataset)])
    theirs = load_digits().images.reshape(1797, -1) / 16
    assert np.array_equal(
        np.unique(np.round(ours, 6), axis=0, return_counts=True)[1],
        np.unique(np.round(theirs, 6), axis=0, return_counts=True)[1],
    )
    counts = np.bincount(load_digits().target)
    test_counts = np.bincount(dm.test_dataset.targets.numpy(), minlength=10)
    assert np.all(np.abs(test_counts - 0.2 * counts) <= 0.5)
    assert dm.num_classes == 10 and dm.class_names == [str(d) for d in range(10)]
    assert (dm.in_channels, dm.image_size) == (1, 32)


def test_split_is_deterministic_in_seed():
    a, b, c = make(seed=0), make(seed=0), make(seed=1)
    assert np.array_equal(raw_images(a.test_dataset), raw_images(b.test_dataset))
    assert not np.array_equal(raw_images(a.test_dataset), raw_images(c.test_dataset))


def test_items_follow_the_contract_and_labels_match_images():
    dm = make(image_size=16)
    item = dm.train_dataset[5]
    assert set(item) == {"image", "label", "index"}
    assert item["image"].shape == (1, 16, 16) and item["image"].dtype == torch.float32
    assert item["index"] == 5 and item["label"] == int(dm.train_dataset.targets[5])
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 1, 16, 16) and batch["label"].shape == (64,)
    # a nearest-neighbour classifier on our train images must be right on our test images
    train, test = stack(dm.train_dataset).flatten(1), stack(dm.test_dataset).flatten(1)
    clf = KNeighborsClassifier(n_neighbors=3).fit(train.numpy(), dm.train_dataset.targets.numpy())
    assert clf.score(test.numpy(), dm.test_dataset.targets.numpy()) > 0.95


def test_nearest_upsampling_and_normalisation_are_exact():
    dm = make(image_size=32, interpolation="nearest", mean=[0.2], std=[0.5])
    image = dm.test_dataset[0]["image"][0].numpy()
    raw = raw_images(dm.test_dataset)[0].reshape(8, 8)
    assert np.allclose(image, (np.kron(raw, np.ones((4, 4))) - 0.2) / 0.5, atol=1e-6)
    assert np.allclose(
        dm.denormalize(dm.test_dataset[0]["image"])[0].numpy(), np.kron(raw, np.ones((4, 4))), atol=1e-6
    )


def test_three_channels_repeat_gray():
    dm = make(in_channels=3, image_size=8)
    image = dm.train_dataset[0]["image"]
    assert image.shape == (3, 8, 8) and dm.mean.shape == (3, 1, 1)
    assert torch.equal(image[0], image[1]) and torch.equal(image[1], image[2])


def test_class_subset_is_remapped_in_given_order_and_rest_is_held_out():
    full = make()
    dm = make(classes=[7, "2", 5])
    assert dm.num_classes == 3 and dm.class_names == ["7", "2", "5"] and dm.class_ids == [7, 2, 5]
    pairs = ((dm.train_dataset, full.train_dataset), (dm.test_dataset, full.test_dataset))
    for dataset, full_dataset in pairs:
        original = torch.tensor([7, 2, 5])[dataset.targets]
        assert torch.equal(original, full_dataset.source.targets[torch.as_tensor(dataset.indices)])
        assert len(dataset) == sum(int((full_dataset.targets == c).sum()) for c in (7, 2, 5))
    held = dm.held_out_dataset("test")
    assert dm.held_out_class_names == ["0", "1", "3", "4", "6", "8", "9"]
    assert set(held.targets.tolist()) == set(range(3, 10))
    assert len(held) + len(dm.test_dataset) == len(full.test_dataset)
    original = torch.tensor([7, 2, 5, 0, 1, 3, 4, 6, 8, 9])[held.targets]
    assert torch.equal(original, held.source.targets[torch.as_tensor(held.indices)])
    assert next(iter(dm.held_out_dataloader()))["image"].shape[1:] == (1, 32, 32)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        (["cat"], "unknown class 'cat'.*valid names"),
        ([10], "out of range"),
        ([1, 1], "twice"),
        ([], "empty"),
        ("3", "list"),
    ],
)
def test_bad_class_lists_are_rejected(classes, message):
    with pytest.raises(ValueError, match=message):
        make(classes=classes)


def test_empty_split_is_an_error():
    with pytest.raises(ValueError, match="test split has no samples"):
        make(test_fraction=0.001)
    with pytest.raises(ValueError, match="no classes are held out"):
        make().held_out_dataset()


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"image_size": 0}, "image_size"),
        ({"in_channels": 2}, "in_channels"),
        ({"val_fraction": 1.0}, "val_fraction"),
        ({"num_views": 2}, "needs train_transforms"),
        ({"mean": [0.1, 0.2]}, "mean has 2 values"),
        ({"std": [0.0]}, "positive"),
        ({"interpolation": "cubic"}, "interpolation"),
        ({"seed": -1}, "seed"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        DigitsDataModule(**kwargs)


def test_push_loader_is_ordered_and_unaugmented():
    flip = [v2.RandomHorizontalFlip(p=1.0)]
    dm = make(train_transforms=flip, image_size=16)
    eval_images = stack(dm.train_dataset.eval_view())
    push = list(dm.push_dataloader())
    assert torch.equal(torch.cat([b["index"] for b in push]), torch.arange(len(dm.train_dataset)))
    assert torch.equal(torch.cat([b["image"] for b in push]), eval_images)
    assert torch.equal(torch.cat([b["label"] for b in push]), dm.train_dataset.targets)
    # the training set itself is augmented (flipped) and shuffled
    assert torch.equal(dm.train_dataset[3]["image"], eval_images[3].flip(-1))
    assert not torch.equal(next(iter(dm.train_dataloader()))["index"], torch.arange(64))
    # validation and test are never augmented
    assert torch.equal(dm.val_dataset[0]["image"], dm.val_dataset.eval_view()[0]["image"])


def test_num_views_stack_independent_views():
    noise = [v2.GaussianNoise(sigma=0.2, clip=False)]
    dm = make(train_transforms=noise, num_views=2, image_size=16)
    item = dm.train_dataset[0]
    assert item["image"].shape == (2, 1, 16, 16) and isinstance(item["label"], int)
    assert not torch.allclose(item["image"][0], item["image"][1])
    clean = dm.train_dataset.eval_view()[0]["image"]
    for view in item["image"]:  # each view = clean image + noise of std 0.2 (in [0, 1] units)
        assert 0.1 < float((view - clean).std() * dm.std.flatten()[0]) < 0.3
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (64, 2, 1, 16, 16)
    assert next(iter(dm.push_dataloader()))["image"].shape == (64, 1, 16, 16)


def test_transforms_that_change_the_size_are_rejected():
    dm = make(train_transforms=[v2.Resize(8)], image_size=16)
    with pytest.raises(ValueError, match="changed the image shape"):
        dm.train_dataset[0]


def test_loader_options():
    dm = DigitsDataModule(num_workers=2, batch_size=7)
    with pytest.raises(RuntimeError, match="setup"):
        dm.train_dataloader()
    dm.setup()
    loader = dm.val_dataloader()
    assert loader.batch_size == 7 and loader.num_workers == 2 and loader.persistent_workers
    assert loader.pin_memory == torch.cuda.is_available()
