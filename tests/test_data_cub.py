"""CUB-200-2011 loader on a tiny dataset written in the official layout: crops, part locations, errors."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from protolib.data.cub import CUBDataModule

CLASSES = ["001.Black_footed_Albatross", "002.Laysan_Albatross", "003.Sooty_Albatross"]
BOX = (8, 6, 20, 12)  # x, y, w, h inside a 40x30 image
MARK = (18, 12)  # part 1 (x, y): a green block inside the box
OUTSIDE = (2, 2)  # part 2: visible but outside the box


def write_cub(root: Path) -> Path:
    folder = root / "CUB_200_2011"
    (folder / "parts").mkdir(parents=True)
    images, labels, split, boxes, locs = [], [], [], [], []
    for k in range(9):
        image_id, label = k + 1, k // 3
        name = f"{CLASSES[label]}/bird_{k}.{'jpg' if k == 8 else 'png'}"
        pixels = np.zeros((30, 40, 3), np.uint8)
        pixels[..., 2] = 255  # blue background
        x, y, w, h = BOX
        pixels[y : y + h, x : x + w] = (255, 0, 0)  # red bird inside the box
        pixels[MARK[1] - 2 : MARK[1] + 2, MARK[0] - 2 : MARK[0] + 2] = (0, 255, 0)
        (folder / "images" / CLASSES[label]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / "images" / name)
        images.append(f"{image_id} {name}")
        labels.append(f"{image_id} {label + 1}")
        split.append(f"{image_id} {int(k % 3 != 2)}")
        boxes.append(f"{image_id} {x}.0 {y}.0 {w}.0 {h}.0")
        locs += [
            f"{image_id} 1 {MARK[0]}.0 {MARK[1]}.0 1",
            f"{image_id} 2 {OUTSIDE[0]}.0 {OUTSIDE[1]}.0 1",
            f"{image_id} 3 0.0 0.0 0",
        ]
    files = {
        "images.txt": images,
        "image_class_labels.txt": labels,
        "train_test_split.txt": split,
        "bounding_boxes.txt": boxes,
        "classes.txt": [f"{i + 1} {c}" for i, c in enumerate(CLASSES)],
        "parts/parts.txt": ["1 back", "2 left eye", "3 tail"],
        "parts/part_locs.txt": locs,
    }
    for name, lines in files.items():
        (folder / name).write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def cub(tmp_path: Path) -> Path:
    return write_cub(tmp_path)


def make(root: Path, **kwargs) -> CUBDataModule:
    dm = CUBDataModule(root, **{"image_size": 20, "val_fraction": 0.5, **kwargs})
    dm.setup()
    return dm


def test_splits_names_and_items(cub):
    dm = make(cub)
    assert dm.class_names == ["Black_footed_Albatross", "Laysan_Albatross", "Sooty_Albatross"]
    assert dm.part_names == ["back", "left eye", "tail"]
    assert len(dm.train_dataset) + len(dm.val_dataset) == 6 and len(dm.test_dataset) == 3
    assert dm.test_dataset.targets.tolist() == [0, 1, 2]
    item = dm.test_dataset[2]  # the JPEG
    assert set(item) == {"image", "label", "index", "part_locs"}
    assert item["image"].shape == (3, 20, 20) and item["part_locs"].shape == (3, 3)
    # the parent folder of CUB_200_2011 works as root too
    assert make(cub.parent).class_names == dm.class_names


def test_bounding_box_crop_and_part_locations(cub):
    dm = make(cub)
    item = dm.test_dataset[0]
    image = dm.denormalize(item["image"])
    x, y, w, h = BOX
    expected = torch.tensor([(MARK[0] + 0.5 - x) * 20 / w - 0.5, (MARK[1] + 0.5 - y) * 20 / h - 0.5, 1.0])
    assert torch.allclose(item["part_locs"][0], expected)
    assert torch.equal(item["part_locs"][1:], torch.zeros(2, 3))  # outside the crop, and invisible
    col, row = round(float(expected[0])), round(float(expected[1]))
    assert image[1, row, col] > 0.9 and image[0, row, col] < 0.1  # the green mark is where part 1 is
    assert image[2, 1:-1, 1:-1].max() < 0.1  # no blue background inside after cropping (edges interpolate)
    full = make(cub, crop=False).test_dataset[0]
    # 40x30 -> 20x20; pixel index i has its centre at i + 0.5
    scaled = [[(px + 0.5) / 2 - 0.5, (py + 0.5) * 2 / 3 - 0.5, 1.0] for px, py in (MARK, OUTSIDE)]
    assert torch.allclose(full["part_locs"][:2], torch.tensor(scaled))
    assert dm.denormalize(full["image"])[2].max() > 0.9


def test_flip_augmentation_moves_part_locations(cub):
    dm = make(cub, train_transforms=[v2.RandomHorizontalFlip(p=1.0)])
    item, clean = dm.train_dataset[0], dm.train_dataset.eval_view()[0]
    flipped = [19 - clean["part_locs"][0, 0], clean["part_locs"][0, 1], 1.0]  # column i -> 19 - i
    assert torch.allclose(item["part_locs"][0], torch.tensor(flipped))
    assert torch.equal(item["part_locs"][1:], torch.zeros(2, 3))
    assert torch.equal(item["image"], clean["image"].flip(-1))


def test_class_subset_and_no_part_locs(cub):
    dm = make(cub, classes=["Sooty_Albatross"], part_locs=False)
    assert dm.num_classes == 1 and len(dm.test_dataset) == 1 and "part_locs" not in dm.test_dataset[0]
    with pytest.raises(ValueError, match=r"unknown class '001\.Black_footed_Albatross'"):
        make(cub, classes=["001.Black_footed_Albatross"])


def test_missing_and_malformed_files(cub):
    with pytest.raises(FileNotFoundError, match=r"images.txt not found.*CUB_200_2011.tgz"):
        make(cub / "missing")
    (cub / "bounding_boxes.txt").unlink()
    with pytest.raises(FileNotFoundError, match=r"bounding_boxes\.txt"):
        make(cub)
    assert len(make(cub, crop=False).test_dataset) == 3  # boxes are only needed for cropping
    split = cub / "train_test_split.txt"
    split.write_text("\n".join(split.read_text().splitlines()[:-1]) + "\n")
    with pytest.raises(ValueError, match=r"train_test_split.txt has no row for image ids \[9\]"):
        make(cub, crop=False)
    (cub / "image_class_labels.txt").write_text("1 1\n2\n")
    with pytest.raises(ValueError, match=r"image_class_labels\.txt, line 2: expected 2 fields"):
        make(cub, crop=False)


def test_corrupt_image_and_bad_box(cub):
    dm = make(cub)
    bad = cub / "images" / CLASSES[0] / "bird_2.png"
    bad.write_bytes(bad.read_bytes()[:60])
    with pytest.raises(ValueError, match=r"cannot decode image .*bird_2.png"):
        dm.test_dataset[0]
    boxes = cub / "bounding_boxes.txt"
    boxes.write_text(boxes.read_text().replace("8.0 6.0 20.0 12.0", "100.0 100.0 5.0 5.0", 1))
    with pytest.raises(ValueError, match=r"bounding box .*/bird_0\.png lies outside"):
        make(cub, verify=False).train_dataset.source.load(0)
