"""Procedural parts dataset: determinism, masks agree with pixels, labels agree with the drawn parts."""

import pytest
import torch
from torchvision.transforms import v2

from protolib.data.parts import COLOURS, PART_NAMES, PART_TYPES, PartsDataModule, PartsDataset, make_layouts

SMALL = {"num_classes": 6, "train_per_class": 4, "val_per_class": 2, "test_per_class": 3, "image_size": 24}


def make(**kwargs) -> PartsDataModule:
    dm = PartsDataModule(**{**SMALL, **kwargs})
    dm.setup()
    return dm


def drawn_parts(mask: torch.Tensor, grid: int) -> set[tuple[int, int]]:
    """(part id, cell of the part's centroid) for every part id present in a mask."""
    size = mask.shape[0]
    found = set()
    for part_id in mask.unique().tolist():
        if part_id == 0:
            continue
        ys, xs = torch.nonzero(mask == part_id, as_tuple=True)
        row, col = int(ys.float().mean() // (size / grid)), int(xs.float().mean() // (size / grid))
        found.add((part_id, row * grid + col))
    return found


def test_samples_are_deterministic_in_seed_split_and_index():
    a, b, c = make(), make(), make(seed=1)
    for split in ("train_dataset", "val_dataset", "test_dataset"):
        x, y = getattr(a, split)[1], getattr(b, split)[1]
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["part_mask"], y["part_mask"])
    assert not torch.equal(a.train_dataset[0]["image"], c.train_dataset[0]["image"])
    assert not torch.equal(a.train_dataset[0]["image"], a.test_dataset[0]["image"])
    # any single sample can be regenerated on its own
    source = PartsDataset(a.layouts, per_class=4, split="train", image_size=24, seed=0)
    assert torch.equal(source[7]["image"], a.train_dataset.source.load(7)["image"])


def test_sizes_labels_and_item_format():
    dm = make(image_size=40)
    assert [len(dm.train_dataset), len(dm.val_dataset), len(dm.test_dataset)] == [24, 12, 18]
    assert torch.equal(torch.bincount(dm.train_dataset.targets), torch.full((6,), 4))
    item = dm.train_dataset[0]
    assert set(item) == {"image", "label", "index", "part_mask"}
    assert item["image"].shape == (3, 40, 40) and item["part_mask"].shape == (40, 40)
    assert item["part_mask"].dtype == torch.long and int(item["part_mask"].max()) <= len(PART_NAMES)
    assert dm.part_names == PART_NAMES and dm.in_channels == 3


def test_mask_pixels_are_exactly_where_the_part_colours_are():
    dm = make(noise=0.0)
    for i in range(len(dm.train_dataset)):
        sample = dm.train_dataset.source.load(i)
        image, mask = sample["image"], sample["part_mask"]
        for part_id in mask.unique().tolist():
            pixels = image[:, mask == part_id]  # (3, n)
            if part_id == 0:  # background is gray: equal channels
                assert torch.allclose(pixels[0], pixels[1]) and torch.allclose(pixels[1], pixels[2])
            else:
                colour = torch.tensor(COLOURS[PART_TYPES[part_id - 1][1]], dtype=torch.float32)
                assert torch.allclose(pixels, colour[:, None])


def test_drawn_parts_define_the_label_unambiguously():
    dm = make(distractors=1)
    for dataset in (dm.train_dataset, dm.test_dataset):
        for i in range(len(dataset)):
            item = dataset[i]
            drawn = drawn_parts(item["part_mask"], grid=2)
            matching = [k for k, layout in enumerate(dm.class_layout) if set(layout) <= drawn]
            assert matching == [item["label"]]
            distractors = {p for p, _ in drawn} - set(dm.class_parts[item["label"]])
            assert len(drawn) == 3 and len(distractors) == 1


def test_classes_come_in_pairs_sharing_parts_in_different_cells():
    layouts = make_layouts(10, 2, 2, seed=0)
    assert len(set(layouts)) == 10
    part_sets = [frozenset(p for p, _ in layout) for layout in layouts]
    assert all(part_sets.count(s) >= 2 for s in part_sets)


def test_class_subset_remaps_class_parts():
    full, dm = make(), make(classes=[4, 1])
    assert dm.class_parts == [full.class_parts[4], full.class_parts[1]]
    assert dm.class_layout == [full.class_layout[4], full.class_layout[1]]
    assert {item["label"] for item in (dm.test_dataset[i] for i in range(len(dm.test_dataset)))} == {0, 1}


def test_geometric_augmentation_moves_the_mask_with_the_image():
    dm = make(train_transforms=[v2.RandomHorizontalFlip(p=1.0)], num_views=2)
    item, clean = dm.train_dataset[2], dm.train_dataset.eval_view()[2]
    assert item["image"].shape == (2, 3, 24, 24) and item["part_mask"].shape == (2, 24, 24)
    assert torch.equal(item["part_mask"][0], clean["part_mask"].flip(-1))
    assert torch.equal(item["image"][1], clean["image"].flip(-1))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_classes": 10_000}, "num_classes"),
        ({"distractors": 3}, "distractors"),
        ({"noise": -1}, "noise"),
        ({"parts_per_class": 5}, "parts_per_class"),
        ({"image_size": 4}, "too small"),
        ({"test_per_class": 0}, "per class"),
        ({"grid": 0}, "grid"),
    ],
)
def test_bad_options_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        make(**kwargs)
