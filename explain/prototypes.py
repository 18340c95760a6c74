"""Pictures of what every ProtoPNet prototype is, rendered from the provenance its push recorded.

For each prototype one PNG with three panels: the source training image with the receptive-field box
(yellow) and the high-activation box (cyan), the high-activation patch itself, and the prototype's
similarity heat-map over the source image. A class-by-class gallery shows every class's prototype patches in
one row, and ``prototypes.json`` lists the provenance. Images are composed with numpy and PIL (no figure per
prototype), so rendering a 2,000-prototype CUB model takes seconds, not minutes.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from protolib.models.protopnet import ProtoPNet, fetch_images, upsample_maps
from protolib.utils.io import atomic_write, atomic_write_json

if TYPE_CHECKING:
    import lightning as L

    from explain.families import Explained, Picture
    from protolib.data.base import VisionDataModule

RF_COLOUR = (255, 215, 0)  # receptive field: yellow
ACTIVATION_COLOUR = (0, 220, 255)  # high-activation region: cyan
# Deformable prototypes' parts, one colour each (the reference's palette: red, green, yellow, blue...).
PART_COLOURS = ((230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (240, 50, 230))
# What a network needs for prototype pictures and local explanations: ProtoPNet and its variants have it.
PATCH_PROTOTYPE_API = ("provenance", "paired_similarity_maps", "prototype_bank")
PANEL = 160  # side of one picture panel in pixels
TILE = 64  # side of one gallery tile in pixels
LABEL_WIDTH = 110  # gallery: least width of the class-name column (wider for longer names)
LEGEND = (("receptive field", RF_COLOUR), ("high activation", ACTIVATION_COLOUR))  # the source panel's boxes


def prototype_weights(model: torch.nn.Module) -> torch.Tensor:
    """(C, P) weight of every prototype to every class: the network's ``prototype_weights()`` where the
    last layer does not read prototypes directly (ProtoPool: slots; PIP-Net: relu), else its weight."""
    if hasattr(model, "prototype_weights"):
        return model.prototype_weights()
    return model.last_layer.weight


def pushed_provenance(model: torch.nn.Module) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """The network's provenance on the CPU and the ids (N,) of the prototypes that have a source patch (all
    after a ProtoPNet push; ProtoPool leaves prototypes no class chose without one)."""
    provenance = {name: tensor.cpu() for name, tensor in model.provenance().items()}
    known = (provenance["source_sample"] >= 0).nonzero().flatten()
    if len(known) == 0:
        raise ValueError("prototypes have no source patches yet: push them first (e.g. ProtoPNet.push)")
    return provenance, known


def to_rgb_uint8(images: torch.Tensor) -> np.ndarray:
    """Images in [0, 1] (N, C, H, W) with C = 1 or 3 -> (N, H, W, 3) uint8."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (images.clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def heatmap_overlay(image: np.ndarray, activation: np.ndarray) -> np.ndarray:
    """The reference code's overlay ``0.5 * image + 0.3 * jet(normalised activation)``, uint8 (H, W, 3)."""
    from matplotlib import colormaps

    span = activation.max() - activation.min()
    scaled = (activation - activation.min()) / (span if span > 0 else 1.0)
    heat = colormaps["jet"](scaled)[..., :3]  # (H, W, 3) in [0, 1]
    blended = 0.5 * image.astype(np.float64) / 255 + 0.3 * heat
    return (np.clip(blended, 0, 1) * 255).round().astype(np.uint8)


def resize_panel(image: np.ndarray, side: int) -> Image.Image:
    """Square panel of ``side`` pixels; nearest-neighbour keeps tiny images' pixels visible."""
    return Image.fromarray(image).resize((side, side), Image.NEAREST)


def draw_box(panel: Image.Image, box: Sequence[int], image_side: int, colour: tuple[int, int, int]) -> None:
    """Draw an ``x0, y0, x1, y1`` box (image pixels, exclusive ends) on a panel scaled from the image."""
    scale = panel.width / image_side
    x0, y0, x1, y1 = (float(v) * scale for v in box)
    ImageDraw.Draw(panel).rectangle([x0, y0, x1 - 1, y1 - 1], outline=colour, width=2)


def crop_box(image: np.ndarray, box: Sequence[int]) -> np.ndarray:
    """The pixels (h, w, ...) of ``image`` (H, W, ...) inside an ``x0, y0, x1, y1`` box (exclusive ends)."""
    x0, y0, x1, y1 = (int(v) for v in box)
    return image[y0:y1, x0:x1]


def save_png(path: Path, image: Image.Image) -> Path:
    """Write a PIL image as PNG atomically."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return atomic_write(path, lambda tmp: tmp.write_bytes(buffer.getvalue()))


def prototype_picture(
    image: np.ndarray,
    activation: np.ndarray,
    rf_box: Sequence[int],
    activation_box: Sequence[int],
    title: str,
    part_boxes: Sequence[Sequence[int]] = (),
) -> Image.Image:
    """One prototype's picture: source with boxes | high-activation patch | heat-map overlay, titled.

    ``image`` (H, W, 3) uint8, ``activation`` (H, W) the similarity map upsampled to the image;
    ``part_boxes`` (deformable prototypes) are drawn on the source where each part landed, one colour each.
    """
    side = image.shape[0]
    source = resize_panel(image, PANEL)
    draw_box(source, rf_box, side, RF_COLOUR)
    draw_box(source, activation_box, side, ACTIVATION_COLOUR)
    for number, box in enumerate(part_boxes):
        draw_box(source, box, side, PART_COLOURS[number % len(PART_COLOURS)])
    patch = Image.fromarray(crop_box(image, activation_box)).resize((PANEL, PANEL), Image.NEAREST)
    overlay = resize_panel(heatmap_overlay(image, activation), PANEL)
    header, legend = 18, 16
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    width = max(3 * PANEL + 4 * 4, int(measure.textlength(title)) + 8)  # long class names are not cut off
    canvas = Image.new("RGB", (width, PANEL + header + legend + 4), "white")
    for column, panel in enumerate((source, patch, overlay)):
        canvas.paste(panel, (4 + column * (PANEL + 4), header))
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 3), title, fill="black")
    x, y = 4, header + PANEL + 3  # legend of the source panel's two boxes, in their colours
    for label, colour in LEGEND:
        draw.rectangle([x, y + 1, x + 14, y + 9], outline=colour, width=2)
        draw.text((x + 19, y), label, fill="black")
        x += 19 + int(measure.textlength(label)) + 14
    return canvas


def gallery_pages(
    patches: list[np.ndarray], owners: list[int], class_names: list[str], classes_per_page: int = 25
) -> list[Image.Image]:
    """Class-by-class gallery: one row per class (its name, then its prototypes' patches), paginated."""
    by_class: dict[int, list[np.ndarray]] = {}
    for patch, owner in zip(patches, owners, strict=True):
        by_class.setdefault(owner, []).append(patch)
    classes = sorted(by_class)
    columns = max(len(row) for row in by_class.values())
    labels = {c: f"{c}: {class_names[c] if c < len(class_names) else c}" for c in classes}
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    label_width = max(LABEL_WIDTH, *(int(measure.textlength(text)) + 10 for text in labels.values()))
    pages = []
    for start in range(0, len(classes), classes_per_page):
        rows = classes[start : start + classes_per_page]
        page = Image.new("RGB", (label_width + columns * (TILE + 2), len(rows) * (TILE + 2)), "white")
        draw = ImageDraw.Draw(page)
        for r, owner in enumerate(rows):
            top = r * (TILE + 2)
            draw.text((4, top + TILE // 2 - 6), labels[owner], fill="black")
            for c, patch in enumerate(by_class[owner]):
                page.paste(resize_panel(patch, TILE), (label_width + c * (TILE + 2), top))
        pages.append(page)
    return pages


@torch.no_grad()
def render_prototypes(
    model: ProtoPNet,
    dataset: Dataset,
    out_dir: str | Path,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    class_names: Sequence[str] | None = None,
    classes_per_page: int = 25,
    ids: Sequence[int] | None = None,
) -> list[Path]:
    """Write one picture per prototype (or per prototype of ``ids``), the class-by-class gallery and
    ``prototypes.json`` into ``out_dir``.

    ``dataset`` is the push dataset (training images, eval transform; item "index" = position) that the
    provenance refers to; ``denormalize`` maps its images back to [0, 1]. Returns the written paths.
    """
    out_dir = Path(out_dir)
    provenance, known = pushed_provenance(model)
    if ids is not None:
        unpushed = sorted(set(ids) - set(known.tolist()))
        if unpushed:
            raise ValueError(
                f"prototypes {unpushed[:10]} have no source patch (never pushed): leave them out"
            )
        known = torch.as_tensor(sorted(set(ids)), dtype=torch.long)
    device = model.prototype_bank.vectors.device
    weights = None if model.last_layer is None else prototype_weights(model).detach().cpu()  # (C, P)
    names = list(class_names) if class_names is not None else [str(c) for c in range(model.num_classes)]
    set_names = getattr(model, "set_names", ["prototypes"])  # ST-ProtoPNet: trivial / support
    set_ids = model.prototype_set_ids().tolist() if len(set_names) > 1 else [0] * len(provenance["owner"])
    sets = [set_names[s] for s in set_ids]
    written, patches, records = [], [], []
    for ids in known.split(64):
        images = fetch_images(dataset, provenance["source_sample"][ids].tolist()).to(device)  # (n, C, H, W)
        maps = upsample_maps(model.paired_similarity_maps(images, ids), tuple(images.shape[-2:]))
        pictures = to_rgb_uint8(denormalize(images))  # (n, H, W, 3)
        for p, picture, activation in zip(ids.tolist(), pictures, maps.cpu().numpy(), strict=True):
            owner = int(provenance["owner"][p])
            rf_box = provenance["rf_box"][p].tolist()
            activation_box = provenance["activation_box"][p].tolist()
            sample = int(provenance["source_sample"][p])
            title = f"prototype {p} | class {owner} ({names[owner]}) | image {sample}"
            if len(set_names) > 1:
                title += f" | {sets[p]}"
            parts = provenance["part_box"][p].tolist() if "part_box" in provenance else []
            written.append(
                save_png(
                    out_dir / f"prototype-{p:04d}.png",
                    prototype_picture(picture, activation, rf_box, activation_box, title, parts),
                )
            )
            patches.append(crop_box(picture, activation_box))
            records.append(
                {
                    "prototype": p,
                    "set": sets[p],
                    "class": owner,
                    "class_name": names[owner],
                    "source_index": sample,
                    "location": provenance["location"][p].tolist(),
                    "rf_box": rf_box,
                    "activation_box": activation_box,
                    "push_distance": float(provenance["score"][p]),
                    "push_step": int(provenance["step"][p]),
                    **(
                        {"part_location": provenance["part_location"][p].tolist(), "part_box": parts}
                        if parts
                        else {}
                    ),
                }
            )
            if weights is not None:  # ProtoTree has no last layer: its node is in the tree picture
                records[-1]["weight_to_own_class"] = float(weights[owner, p])
    owners = provenance["owner"][known].tolist()
    for number, page in enumerate(gallery_pages(patches, owners, names, classes_per_page), start=1):
        written.append(save_png(out_dir / f"gallery-{number:02d}.png", page))
    written.append(atomic_write_json(out_dir / "prototypes.json", records))
    return written


def load_checkpoint(checkpoint: str | Path) -> tuple[L.LightningModule, VisionDataModule]:
    """A ProtoPNet-family or ProtoTree module from a train.py checkpoint and its training data (set up)."""
    from explain.families import load

    explained = load(checkpoint)
    if explained.family.name not in ("protopnet", "prototree"):
        raise ValueError(
            f"checkpoint {checkpoint} holds a {type(explained.net).__name__} whose network has no patch "
            f"prototypes ({', '.join(PATCH_PROTOTYPE_API)}): ProtoPNet, its variants and ProtoTree do"
        )
    return explained.module, explained.datamodule


def patch_prototypes(explained: Explained, out_dir: Path, ids: Sequence[int] | None = None) -> list[Picture]:
    """The ``prototypes`` explanation of ProtoPNet and its variants: the class gallery of pushed patches,
    then one picture per prototype (source image with boxes | patch | similarity map)."""
    from explain.families import Picture

    written = render_prototypes(
        explained.net,
        explained.datamodule.push_dataloader().dataset,
        out_dir,
        explained.datamodule.denormalize,
        class_names=explained.class_names,
        classes_per_page=explained.options.get("classes_per_page", 25),
        ids=ids,
    )
    galleries = [
        Picture(path, f"every class's prototypes as the training patches they were pushed onto (page {n})")
        for n, path in enumerate((p for p in written if p.name.startswith("gallery-")), start=1)
    ]
    pictures = [
        Picture(
            path,
            f"prototype {int(path.stem.split('-')[1])}: source image, receptive field (yellow), "
            "high activation (cyan) | the patch | similarity map",
        )
        for path in written
        if path.name.startswith("prototype-")
    ]
    return galleries + pictures


def render_checkpoint(checkpoint: str | Path, out_dir: str | Path, classes_per_page: int = 25) -> list[Path]:
    """Render the prototypes of any family's checkpoint written by train.py into ``out_dir`` (ProtoPNet:
    pictures, gallery, prototypes.json; ProtoTree: also ``tree.png``; PALM, GCD, MoE: their galleries)."""
    from explain.families import explain_prototypes, load

    explained = load(checkpoint)
    explained.options["classes_per_page"] = classes_per_page
    return [picture.path for picture in explain_prototypes(explained, out_dir)]
