"""Local explanations ("this looks like that"), integrated gradients, part-based interpretability scores."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from explain.__main__ import main as explain_cli
from explain.attribution import integrated_gradients, save_attribution
from explain.local import explain_image, plot_explanation, save_explanation
from explain.prototypes import to_rgb_uint8
from explain.scores import box_fractions, box_part_score, framing_boxes, prototype_part_score
from protolib.data.parts import PartsDataModule
from protolib.lit.checkpoint import build_record
from protolib.lit.protopnet import ProtoPNetModule
from protolib.models.protopnet import ProtoPNet
from protolib.utils.io import atomic_torch_save

DATA = {
    "num_classes": 4,
    "train_per_class": 6,
    "val_per_class": 2,
    "test_per_class": 3,
    "image_size": 16,
    "batch_size": 16,
    "seed": 0,
}
MODEL = {
    "backbone": "small_cnn",
    "pretrained": False,
    "prototypes_per_class": 2,
    "prototype_dim": 8,
    "activation_boxes": "after_push",  # boxes of the pushed prototypes, which explanations recompute
}


@pytest.fixture(scope="module")
def datamodule() -> PartsDataModule:
    dm = PartsDataModule(**DATA)
    dm.setup("fit")
    return dm


@pytest.fixture(scope="module")
def module(datamodule: PartsDataModule) -> ProtoPNetModule:
    """A small pushed ProtoPNet (untrained: explanations must be exact whatever the weights)."""
    torch.manual_seed(0)
    module = ProtoPNetModule(ProtoPNet(num_classes=4, in_channels=3, image_size=16, **MODEL)).eval()
    with torch.no_grad():  # a last layer with varied weights, so contributions are not all +-1 x similarity
        module.net.last_layer.weight.normal_()
    module.net.push(datamodule.push_dataloader(), warn=False)
    return module


def explain(module: ProtoPNetModule, datamodule: PartsDataModule, image: torch.Tensor, **kwargs):
    return explain_image(
        module.net,
        image,
        datamodule.push_dataloader().dataset,
        datamodule.denormalize,
        class_names=datamodule.class_names,
        **kwargs,
    )


def numpy_box(activation: np.ndarray, percentile: float = 95.0) -> tuple[int, int, int, int]:
    """Independent high-activation box: bounding box of the pixels at or above the percentile."""
    rows, cols = np.nonzero(activation >= np.percentile(activation, percentile))
    return int(cols.min()), int(rows.min()), int(cols.max()) + 1, int(rows.max()) + 1


@pytest.mark.parametrize("target", [None, 2])
def test_contributions_are_similarity_times_weight_and_sum_to_the_logit(
    module: ProtoPNetModule, datamodule: PartsDataModule, target: int | None
) -> None:
    image = datamodule.test_dataset[1]["image"]
    explanation = explain(module, datamodule, image, target=target, k=3)
    with torch.no_grad():
        output = module.net(image[None])
    logits, similarities = output.logits[0], output.similarities[0]  # (C,), (P,)
    expected_target = int(logits.argmax()) if target is None else target
    assert explanation.target == expected_target and explanation.predicted == int(logits.argmax())
    np.testing.assert_allclose(explanation.logits, logits.numpy(), rtol=1e-6)
    logit = float(logits[expected_target])
    assert explanation.contributions.sum() == pytest.approx(logit, rel=1e-5, abs=1e-5)
    assert explanation.logit == pytest.approx(logit)
    weight = module.net.last_layer.weight[expected_target].detach()  # (P,)
    expected = (similarities * weight).numpy()
    np.testing.assert_allclose(explanation.contributions, expected, rtol=1e-5, atol=1e-6)
    top = np.argsort(-explanation.contributions)[:3]
    assert [e.prototype for e in explanation.evidence] == top.tolist()
    for e in explanation.evidence:
        assert e.similarity == pytest.approx(float(similarities[e.prototype]), rel=1e-6)
        assert e.weight == pytest.approx(float(weight[e.prototype]))
        assert e.contribution == pytest.approx(e.similarity * e.weight, rel=1e-5)
        assert e.owner == int(module.net.owners[e.prototype])
    assert "logit" in explanation.summary() and str(top[0]) in explanation.summary()


def test_boxes_follow_the_push_rule_and_sources_come_from_provenance(
    module: ProtoPNetModule, datamodule: PartsDataModule
) -> None:
    provenance = module.net.provenance()
    dataset = datamodule.push_dataloader().dataset
    p = 5
    source = int(provenance["source_sample"][p])
    # explaining the very training image a prototype was pushed onto gives back its recorded box
    explanation = explain(
        module,
        datamodule,
        dataset[source]["image"],
        target=int(provenance["owner"][p]),
        k=module.net.bank.num_prototypes,
    )
    (evidence,) = [e for e in explanation.evidence if e.prototype == p]
    assert evidence.box == tuple(provenance["activation_box"][p].tolist())
    assert evidence.source_index == source and evidence.source_box == evidence.box
    for e in explanation.evidence:
        assert e.similarity_map.shape == (16, 16)
        assert e.box == numpy_box(e.similarity_map)
        picture = to_rgb_uint8(datamodule.denormalize(dataset[e.source_index]["image"][None]))[0]
        np.testing.assert_array_equal(e.source_image, picture)
        x0, y0, x1, y1 = e.source_box
        np.testing.assert_array_equal(e.source_patch, picture[y0:y1, x0:x1])


def test_explanation_png_has_one_row_per_prototype(
    module: ProtoPNetModule, datamodule: PartsDataModule, tmp_path: Path
) -> None:
    image = datamodule.test_dataset[0]["image"]
    heights = []
    for k in (1, 3):
        path = save_explanation(explain(module, datamodule, image, k=k), tmp_path / f"k{k}.png")
        heights.append(Image.open(path).size[1])
    assert heights[1] > 2 * heights[0] * 0.9
    assert not list(tmp_path.glob(".*.tmp"))  # atomic write left no temporary file


def test_explain_image_rejects_bad_input(module: ProtoPNetModule, datamodule: PartsDataModule) -> None:
    image = datamodule.test_dataset[0]["image"]
    with pytest.raises(ValueError, match="one image"):
        explain(module, datamodule, image[None])
    with pytest.raises(ValueError, match="out of range"):
        explain(module, datamodule, image, target=4)
    unpushed = ProtoPNet(num_classes=4, in_channels=3, image_size=16, **MODEL)
    with pytest.raises(ValueError, match="push them first"):
        explain_image(unpushed, image, datamodule.train_dataset, datamodule.denormalize)


@pytest.mark.parametrize("prototype", [None, 3])
def test_integrated_gradients_are_complete(
    module: ProtoPNetModule, datamodule: PartsDataModule, prototype: int | None
) -> None:
    image = datamodule.test_dataset[2]["image"]
    attribution = integrated_gradients(module.net, image, prototype=prototype, steps=256)
    with torch.no_grad():
        output = module.net(torch.stack([image, torch.zeros_like(image)]))
    values = output.logits if prototype is None else output.similarities
    index = int(values[0].argmax()) if prototype is None else prototype
    assert attribution.target == index and attribution.attributions.shape == image.shape
    difference = float(values[0, index] - values[1, index])
    assert attribution.output - attribution.baseline_output == pytest.approx(difference, rel=1e-5)
    # completeness: attributions add up to f(x) - f(baseline), up to the integral's discretisation
    total = float(attribution.attributions.sum())
    assert total == pytest.approx(difference, rel=0.05, abs=0.05 * abs(difference) + 1e-3)
    assert attribution.delta == pytest.approx(total - difference, abs=1e-3 * (1 + abs(difference)))
    assert attribution.heatmap.shape == (16, 16)


def test_integrated_gradients_of_the_baseline_itself_are_zero(module: ProtoPNetModule) -> None:
    image = torch.randn(3, 16, 16)
    attribution = integrated_gradients(module.net, image, target=1, baseline=image.clone(), steps=8)
    assert attribution.output == attribution.baseline_output
    assert torch.count_nonzero(attribution.attributions) == 0
    with pytest.raises(ValueError, match="either target"):
        integrated_gradients(module.net, image, target=1, prototype=0)


def test_box_part_score_on_a_hand_made_mask() -> None:
    mask = torch.zeros(8, 8, dtype=torch.long)
    mask[:4, :4] = 1  # part 1: top-left quarter
    mask[4:, 4:] = 2  # part 2: bottom-right quarter
    mask[0, 7] = 3  # part 3: one pixel, top-right
    class_parts = [(1,), (2, 3)]
    boxes = torch.tensor([[0, 0, 4, 4], [0, 0, 8, 4], [2, 2, 6, 6], [6, 0, 8, 2], [4, 4, 8, 8]])
    owners = torch.tensor([0, 0, 1, 1, 0])
    fractions = box_part_score(boxes, mask.expand(5, 8, 8), owners, class_parts).per_prototype
    # all on part 1 | half of the top half | 2x2 of part 2 in 4x4 | part 3's pixel in a 2x2 box | part 2 is
    # not class 0's
    np.testing.assert_allclose(fractions.numpy(), [1.0, 0.5, 0.25, 0.25, 0.0])
    with pytest.raises(ValueError, match="empty box"):
        box_part_score(torch.tensor([[3, 0, 3, 4]]), mask[None], torch.tensor([0]), class_parts)


def flood_fill_box(mask: np.ndarray, y: int, x: int) -> list[int]:
    """x0, y0, x1, y1 of the 8-connected True region of ``mask`` holding (y, x), by breadth-first search."""
    seen, frontier = {(y, x)}, [(y, x)]
    while frontier:
        cy, cx = frontier.pop()
        for ny in range(cy - 1, cy + 2):
            for nx in range(cx - 1, cx + 2):
                inside = 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1]
                if inside and mask[ny, nx] and (ny, nx) not in seen:
                    seen.add((ny, nx))
                    frontier.append((ny, nx))
    ys, xs = zip(*seen, strict=True)
    return [min(xs), min(ys), max(xs) + 1, max(ys) + 1]


def test_framing_boxes_frame_the_defining_part_nearest_each_box() -> None:
    ys, xs = np.mgrid[0:16, 0:16] + 0.5
    mask = np.zeros((16, 16), bool)
    mask[(ys - 4) ** 2 + (xs - 4) ** 2 <= 3.5**2] = True  # a disc, top-left
    ring = ((ys - 11) ** 2 + (xs - 11) ** 2 <= 4**2) & ((ys - 11) ** 2 + (xs - 11) ** 2 >= 2**2)
    mask |= ring  # a ring, bottom-right
    boxes = torch.tensor([[0, 0, 3, 3], [12, 12, 16, 16], [6, 6, 10, 10], [0, 0, 16, 16]])
    masks = torch.from_numpy(mask).expand(4, 16, 16).clone()
    masks[3] = False  # no defining part: the whole image
    framing = framing_boxes(boxes, masks)
    disc_box, ring_box = flood_fill_box(mask, 4, 4), flood_fill_box(mask, 11, 7)
    # box 2's centre (8, 8) is about 2 px from the disc's edge and 0.5 px from the ring's
    assert framing.tolist() == [disc_box, ring_box, ring_box, [0, 0, 16, 16]]
    fractions = box_fractions(framing, masks).numpy()
    direct = [mask[y0:y1, x0:x1].mean() for x0, y0, x1, y1 in (disc_box, ring_box)]
    np.testing.assert_allclose(fractions[:2], direct, rtol=1e-6)
    assert fractions[0] > 0.75 > 0.65 > fractions[1] > 0.5 and fractions[3] == 0.0  # a ring is hollow


def test_prototype_part_score_matches_a_brute_force_count(
    module: ProtoPNetModule, datamodule: PartsDataModule
) -> None:
    dataset = datamodule.push_dataloader().dataset
    score = prototype_part_score(module.net, dataset, datamodule.class_parts)
    provenance = module.net.provenance()
    expected, whole, framing = [], [], []
    for p in range(module.net.bank.num_prototypes):
        mask = dataset[int(provenance["source_sample"][p])]["part_mask"].numpy()
        defining = np.isin(mask, datamodule.class_parts[int(provenance["owner"][p])])
        x0, y0, x1, y1 = provenance["activation_box"][p].tolist()
        expected.append(defining[y0:y1, x0:x1].mean())
        whole.append(defining.mean())
        py, px = np.nonzero(defining)  # the defining pixel nearest the box centre, and its part's box
        nearest = np.argmin((py + 0.5 - (y0 + y1) / 2) ** 2 + (px + 0.5 - (x0 + x1) / 2) ** 2)
        fx0, fy0, fx1, fy1 = flood_fill_box(defining, py[nearest], px[nearest])
        framing.append(defining[fy0:fy1, fx0:fx1].mean())
    np.testing.assert_allclose(score.per_prototype.numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(score.image_fraction.numpy(), whole, rtol=1e-6)
    np.testing.assert_allclose(score.framing_fraction.numpy(), framing, rtol=1e-6)
    assert score.framing_mean == pytest.approx(float(np.mean(framing)))
    assert score.mean == pytest.approx(float(np.mean(expected)))
    assert 0.0 < score.image_mean < 1.0
    no_masks = [
        {key: value for key, value in dataset[i].items() if key != "part_mask"} for i in range(len(dataset))
    ]
    with pytest.raises(ValueError, match="part_mask"):
        prototype_part_score(module.net, no_masks, datamodule.class_parts)


def test_local_command_explains_a_test_image_of_a_checkpoint(
    module: ProtoPNetModule, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    build = {"num_classes": 4, "in_channels": 3, "image_size": 16}
    config = build_record(
        {
            "_target_": "protolib.lit.protopnet.ProtoPNetModule",
            "net": {"_target_": "protolib.models.protopnet.ProtoPNet", **MODEL},
        },
        {"_target_": "protolib.data.parts.PartsDataModule", **DATA},
        build,
    )
    checkpoint = atomic_torch_save(
        tmp_path / "model.ckpt", {"state_dict": module.state_dict(), "protolib": config}
    )
    out, gradients = tmp_path / "why.png", tmp_path / "ig.png"
    explain_cli(
        [
            "local",
            "--checkpoint",
            str(checkpoint),
            "--index",
            "2",
            "--out",
            str(out),
            "-k",
            "2",
            "--integrated-gradients",
            str(gradients),
        ]
    )
    printed = capsys.readouterr().out
    assert "test image 2" in printed and "logit" in printed and printed.count("train image") == 2
    assert Image.open(out).size[1] > 0 and Image.open(gradients).size[0] > 0
    with pytest.raises(ValueError, match="out of range"):
        explain_cli(["local", "--checkpoint", str(checkpoint), "--index", "99", "--out", str(out)])
    # without --out everything goes under the run folder (<run>/checkpoints/<file>.ckpt), not the cwd
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    in_run = (tmp_path / "run" / "checkpoints" / "best.ckpt").resolve()
    checkpoint.rename(in_run)
    explain_cli(["local", "--checkpoint", str(in_run), "--index", "1", "-k", "1", "--integrated-gradients"])
    for name in ("local-1.png", "ig-1.png"):
        assert Image.open(tmp_path / "run" / "explain" / name).size[0] > 0


def test_attribution_png(module: ProtoPNetModule, datamodule: PartsDataModule, tmp_path: Path) -> None:
    image = datamodule.test_dataset[0]["image"]
    attribution = integrated_gradients(module.net, image, steps=8)
    picture = to_rgb_uint8(datamodule.denormalize(image[None]))[0]
    path = save_attribution(attribution, picture, tmp_path / "ig.png", title="t")
    assert np.asarray(Image.open(path)).std() > 0


def test_long_class_names_are_wrapped_not_cut(module: ProtoPNetModule, datamodule: PartsDataModule) -> None:
    long_names = [f"class number {c} with a really quite long descriptive name" for c in range(4)]
    explanation = explain_image(
        module.net,
        datamodule.test_dataset[0]["image"],
        datamodule.push_dataloader().dataset,
        datamodule.denormalize,
        class_names=long_names,
        k=1,
    )
    figure = plot_explanation(explanation)
    title = figure.axes[2].get_title()
    assert max(len(line) for line in title.splitlines()) <= 60  # wrapped to fit the panel
    assert " ".join(title.split()).count("with a really quite long descriptive name") == 1  # all of it
    assert "descriptive name" in figure._suptitle.get_text()
