"""Prototype pictures and galleries rendered from a pushed ProtoPNet's provenance."""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import numpy as np
import pytest
from PIL import Image, ImageDraw
from protopnet_helpers import PER_CLASS, make_module, tiny_digits

from explain.callbacks import PrototypePictures
from explain.prototypes import (
    ACTIVATION_COLOUR,
    PANEL,
    RF_COLOUR,
    TILE,
    gallery_pages,
    heatmap_overlay,
    prototype_picture,
    render_prototypes,
)
from protolib.data.digits import DigitsDataModule


@pytest.fixture(scope="module")
def datamodule() -> DigitsDataModule:
    return tiny_digits()


def test_render_writes_one_picture_per_prototype_gallery_and_provenance(
    datamodule: DigitsDataModule, tmp_path: Path
) -> None:
    model = make_module().net
    dataset = datamodule.push_dataloader().dataset
    with pytest.raises(ValueError, match="push them first"):
        render_prototypes(model, dataset, tmp_path, datamodule.denormalize)
    model.push(datamodule.push_dataloader())
    written = render_prototypes(
        model,
        dataset,
        tmp_path / "out",
        datamodule.denormalize,
        class_names=["zero", "one", "two"],
        classes_per_page=2,
    )
    pictures = sorted((tmp_path / "out").glob("prototype-*.png"))
    galleries = sorted((tmp_path / "out").glob("gallery-*.png"))
    assert len(pictures) == 3 * PER_CLASS and len(galleries) == 2  # 3 classes, 2 per page
    assert set(written) == {*pictures, *galleries, tmp_path / "out" / "prototypes.json"}
    provenance = model.provenance()
    for p, path in enumerate(pictures):
        assert path.stat().st_size > 0
        picture = np.asarray(Image.open(path).convert("RGB"))
        assert picture.shape == (PANEL + 22 + 16, 3 * PANEL + 16, 3)  # title, panels, legend
        source_panel = picture[18 : 18 + PANEL, 4 : 4 + PANEL]
        for colour in (RF_COLOUR, ACTIVATION_COLOUR):  # both boxes are drawn on the source image
            assert (source_panel == colour).all(axis=-1).any(), (p, colour)
    records = json.loads((tmp_path / "out" / "prototypes.json").read_text())
    assert [r["prototype"] for r in records] == list(range(3 * PER_CLASS))
    assert [r["class"] for r in records] == provenance["owner"].tolist()
    assert [r["source_index"] for r in records] == provenance["source_sample"].tolist()
    assert [r["rf_box"] for r in records] == provenance["rf_box"].tolist()
    assert [r["activation_box"] for r in records] == provenance["activation_box"].tolist()
    assert records[0]["class_name"] == "zero" and records[0]["weight_to_own_class"] == 1.0
    first_page = Image.open(galleries[0])
    assert first_page.size[1] == 2 * (TILE + 2)  # two class rows


def test_heatmap_overlay_is_the_reference_blend() -> None:
    image = np.full((4, 4, 3), 200, dtype=np.uint8)
    activation = np.arange(16, dtype=np.float64).reshape(4, 4)
    overlay = heatmap_overlay(image, activation)
    from matplotlib import colormaps

    hottest = np.asarray(colormaps["jet"](1.0)[:3])
    expected = np.round(np.clip(0.5 * 200 / 255 + 0.3 * hottest, 0, 1) * 255)
    assert overlay.dtype == np.uint8 and overlay.shape == (4, 4, 3)
    np.testing.assert_array_equal(overlay[3, 3], expected)


def test_gallery_rows_hold_each_class_prototypes() -> None:
    patches = [np.full((3, 3, 3), value, dtype=np.uint8) for value in (10, 20, 30)]
    (page,) = gallery_pages(patches, owners=[1, 0, 1], class_names=["a", "b"])
    assert page.size == (110 + 2 * (TILE + 2), 2 * (TILE + 2))
    pixels = np.asarray(page)
    assert (pixels[5, 115] == 20).all()  # class 0's only prototype (value 20) opens row 0
    assert (pixels[TILE + 2 + 5, 115] == 10).all() and (pixels[TILE + 2 + 5, 115 + TILE + 2] == 30).all()


def test_long_class_names_widen_the_gallery_instead_of_being_cut() -> None:
    long_name = "Black-footed Albatross of the northern Pacific"
    patches = [np.full((3, 3, 3), 7, dtype=np.uint8)]
    (page,) = gallery_pages(patches, owners=[0], class_names=[long_name])
    needed = ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(f"0: {long_name}")
    label_width = page.size[0] - (TILE + 2)
    assert label_width >= needed + 4  # the whole label fits left of the tiles
    assert (np.asarray(page)[5, label_width + 5] == 7).all()


def test_prototype_picture_has_a_legend_for_its_two_boxes() -> None:
    image = np.full((16, 16, 3), 128, dtype=np.uint8)
    title = "prototype 3 | class 1 (" + "a very long class name " * 3 + ") | image 9"
    picture = prototype_picture(image, np.zeros((16, 16)), [0, 0, 8, 8], [4, 4, 12, 12], title)
    pixels = np.asarray(picture)
    legend = pixels[18 + PANEL :]  # the strip under the panels
    for colour in (RF_COLOUR, ACTIVATION_COLOUR):
        assert (legend == colour).all(axis=-1).any(), colour
    assert picture.size[0] >= ImageDraw.Draw(Image.new("RGB", (1, 1))).textlength(title)  # title not cut


def test_callback_renders_after_each_push_into_the_run_directory(
    datamodule: DigitsDataModule, tmp_path: Path
) -> None:
    callback = PrototypePictures(dirname="pictures")
    trainer = L.Trainer(
        accelerator="cpu",
        limit_train_batches=2,
        limit_val_batches=1,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        default_root_dir=tmp_path,
        callbacks=[callback],
        max_epochs=1,
    )
    trainer.fit(make_module(), datamodule=datamodule)
    folders = sorted((tmp_path / "pictures").iterdir())
    assert [f.name for f in folders] == ["epoch-002"]  # the single push happens before epoch 2
    assert len(list(folders[0].glob("prototype-*.png"))) == 3 * PER_CLASS
    assert (folders[0] / "gallery-01.png").stat().st_size > 0
    assert callback.state_dict() == {"rendered_revision": 1}
