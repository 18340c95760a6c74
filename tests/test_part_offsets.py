"""The part-offset diagnostic: its pieces and depths against brute force, and its measures on a pushed
network agree with the part score and the provenance."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import torch
from config_helpers import compose_config
from hydra.utils import instantiate

from benchmarks.part_offsets import largest_piece_boxes, part_offsets, signed_depths
from explain.scores.parts import defining_masks, prototype_part_score
from protolib.cli.train import build_module


def test_largest_piece_box_bounds_the_bigger_of_two_blobs() -> None:
    maps = torch.zeros(1, 10, 10)
    maps[0, 1:3, 1:3] = 1.0  # a 2 x 2 blob: 4 pixels
    maps[0, 5:8, 4:9] = 1.0  # a 3 x 5 blob: 15 pixels, far from the first
    maps[0, 9, 0] = 1.0  # a single pixel
    boxes, pieces = largest_piece_boxes(maps, percentile=50.0)  # threshold 0 -> every pixel: one piece
    assert pieces.tolist() == [1] and boxes.tolist() == [[0, 0, 10, 10]]
    boxes, pieces = largest_piece_boxes(maps, percentile=90.0)  # 20 of 100 pixels are 1: the three blobs
    assert pieces.tolist() == [3] and boxes.tolist() == [[4, 5, 9, 8]]
    maps[0, 3, 3] = 1.0  # touches the first blob diagonally: 8-connected, still three pieces
    _, pieces = largest_piece_boxes(maps, percentile=90.0)
    assert pieces.tolist() == [3]


def test_signed_depths_are_the_distances_to_the_edge() -> None:
    masks = torch.zeros(3, 9, 9, dtype=torch.bool)
    masks[0, 2:7, 1:8] = True
    masks[1, 0:2, 0:3] = True
    points = torch.tensor([[4, 4], [6, 5], [8, 8]])  # inside mask 0, outside mask 1, mask 2 empty
    depths = signed_depths(masks, points)
    rows, cols = torch.meshgrid(torch.arange(9), torch.arange(9), indexing="ij")
    for n in range(2):  # brute force: distance to the nearest pixel of the other kind
        row, col = points[n].tolist()
        inside = bool(masks[n, row, col])
        other = masks[n] != inside
        nearest = torch.sqrt(((rows - row) ** 2 + (cols - col) ** 2).double())[other].min()
        assert math.isclose(float(depths[n]), float(nearest) if inside else -float(nearest))
    assert depths[0] == 3.0 and depths[1] == -math.sqrt(5**2 + 3**2) and depths[2] == -math.inf


def test_part_offsets_of_a_pushed_network_agree_with_its_provenance(tmp_path: Path) -> None:
    tiny = ["data.num_classes=4", "data.train_per_class=6", "data.val_per_class=1", "data.test_per_class=1"]
    cfg = compose_config(tmp_path, "experiment=protopnet_parts", *tiny, "model.net.prototypes_per_class=3")
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    build = {"num_classes": 4, "in_channels": 3, "image_size": datamodule.image_size}
    torch.manual_seed(0)
    net = build_module(cfg.model, build).net.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        net.push(datamodule.push_dataloader())
    measures = part_offsets(net, datamodule)
    dataset = datamodule.push_dataloader().dataset
    assert measures["prototypes"] == 12
    assert measures["part_score"] == prototype_part_score(net, dataset, datamodule.class_parts).mean
    assert 0.0 <= measures["one_piece"] <= 1.0 and 0.0 <= measures["outside_frame"] <= 1.0
    # peak_on_part counted directly: the pixel under each pushed patch's receptive-field centre
    provenance = net.provenance()
    field = net.receptive_field
    on_part = []
    for n in range(12):
        mask = dataset[int(provenance["source_sample"][n])]["part_mask"]
        defining = defining_masks(mask[None], provenance["owner"][n : n + 1], datamodule.class_parts)[0]
        row, col = (int(field.start[a] + int(provenance["location"][n, a]) * field.stride[a]) for a in (0, 1))
        on_part.append(bool(defining[row, col]))
    assert measures["peak_on_part"] == sum(on_part) / 12
    low, median, high = measures["peak_depth_quartiles"]
    assert low <= median <= high
