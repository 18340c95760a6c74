"""ProtoTree's pictures: the whole tree with every node's prototype patch (its global explanation), and the
path one image takes down it (its local explanation), as the reference's ``treevis`` and ``predvis``.

At every internal node the image goes right ("present") when the node's prototype is similar enough
(``exp(-distance) > 0.5`` on the deterministic greedy path), left ("absent") otherwise; each leaf holds a
class distribution. Pictures are composed with PIL from the push provenance (no graphviz needed).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

from explain.prototypes import ACTIVATION_COLOUR, crop_box, draw_box, resize_panel, save_png, to_rgb_uint8
from protolib.models.protopnet import fetch_images, high_activation_boxes, upsample_maps
from protolib.models.prototree import ProtoTree
from protolib.utils.modes import evaluating

if TYPE_CHECKING:
    from explain.families import Explained, Local, Picture

TILE = 56  # side of a node's patch in the tree picture
GAP = 10
ROW = TILE + 48  # vertical distance between tree levels
BAR = 36  # height of a leaf's distribution bars


def _names(net: ProtoTree, class_names: Sequence[str] | None) -> list[str]:
    return list(class_names) if class_names is not None else [str(c) for c in range(net.num_classes)]


def prototype_patches(net: ProtoTree, dataset: Dataset, denormalize: Callable) -> list[np.ndarray]:
    """(h, w, 3) uint8 high-activation patch of every prototype on its source image (push provenance)."""
    provenance = {name: tensor.cpu() for name, tensor in net.provenance().items()}
    if (provenance["source_sample"] < 0).any():
        raise ValueError("the tree's prototypes have no source image yet: push them first (ProtoTree.push)")
    images = to_rgb_uint8(denormalize(fetch_images(dataset, provenance["source_sample"].tolist())))
    return [
        crop_box(image, box) for image, box in zip(images, provenance["activation_box"].tolist(), strict=True)
    ]


def distribution_bars(distribution: np.ndarray, width: int) -> Image.Image:
    """A leaf's class distribution (C,) as bars, the largest in red."""
    panel = Image.new("RGB", (width, BAR), "white")
    draw = ImageDraw.Draw(panel)
    step = width / len(distribution)
    top = int(distribution.argmax())
    for c, p in enumerate(distribution):
        x0 = int(c * step)
        x1 = max(x0 + 1, int((c + 1) * step) - 1)
        draw.rectangle(
            [x0, BAR - 1 - int(p * (BAR - 2)), x1, BAR - 1], fill=(200, 40, 40) if c == top else "grey"
        )
    return panel


@torch.no_grad()
def render_tree(
    net: ProtoTree,
    dataset: Dataset,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    class_names: Sequence[str] | None = None,
) -> Image.Image:
    """The whole (pruned, pushed) tree: each internal node's prototype patch, edges marked absent (left) /
    present (right), each leaf's class distribution and its most probable class."""
    tree, names = net.tree, _names(net, class_names)
    patches = prototype_patches(net, dataset, denormalize)
    children = tree.node_children.cpu().tolist()
    distributions = tree.leaf_distributions().cpu().numpy()
    x: dict[int, float] = {}
    depth: dict[int, int] = {}
    leaves = 0

    def place(node: int, level: int) -> None:
        nonlocal leaves
        depth[node] = level
        left, right = children[node]
        if left < 0:
            x[node] = leaves * (TILE + GAP)
            leaves += 1
            return
        place(left, level + 1)
        place(right, level + 1)
        x[node] = (x[left] + x[right]) / 2

    place(0, 0)
    width = int(leaves * (TILE + GAP) + GAP)
    canvas = Image.new("RGB", (width, tree.depth * ROW + BAR + 40), "white")
    draw = ImageDraw.Draw(canvas)
    for node, (left, right) in enumerate(children):
        if left < 0:
            continue
        cx, y = x[node] + GAP + TILE / 2, depth[node] * ROW + TILE + 14
        for child, label in ((left, "absent"), (right, "present")):
            tx, ty = x[child] + GAP + TILE / 2, depth[child] * ROW + 12
            draw.line([cx, y, tx, ty], fill="grey" if label == "absent" else "black", width=1)
            draw.text(((cx + tx) / 2 - 16, (y + ty) / 2 - 6), label[0].upper(), fill="black")
    for node in range(tree.num_nodes):
        left0, top = int(x[node] + GAP), depth[node] * ROW + 12
        if children[node][0] >= 0:
            p = int(tree.node_prototype[node])
            canvas.paste(resize_panel(patches[p], TILE), (left0, top))
            draw.text((left0, top - 11), f"node {node}", fill="black")
        else:
            leaf = int(tree.node_leaf[node])
            canvas.paste(distribution_bars(distributions[leaf], TILE), (left0, top))
            top_class = int(distributions[leaf].argmax())
            draw.text((left0, top + BAR + 2), f"{names[top_class]}"[:9], fill="black")
            draw.text((left0, top + BAR + 13), f"{distributions[leaf][top_class]:.2f}", fill="black")
    return canvas


@torch.no_grad()
def explain_path(
    net: ProtoTree,
    image: torch.Tensor,
    dataset: Dataset,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    class_names: Sequence[str] | None = None,
    percentile: float = 95.0,
) -> tuple[Image.Image, str]:
    """ProtoTree's local explanation of one image (C, H, W): the greedy path it takes, one row per decision
    (the node's prototype patch | where on the image its nearest patch is, when present | the similarity
    and the decision), then the leaf reached and its prediction. Returns the picture and a text summary."""
    names = _names(net, class_names)
    steps = net.explain_path(image, strategy="greedy")
    patches = prototype_patches(net, dataset, denormalize)
    device = net.bank.vectors.device
    picture = to_rgb_uint8(denormalize(image[None].cpu()))[0]
    side, panel = picture.shape[0], 2 * TILE
    *decisions, leaf = steps
    canvas = Image.new("RGB", (3 * panel + 260, (len(decisions) + 1) * (panel + 8) + 8), "white")
    draw = ImageDraw.Draw(canvas)
    lines = []
    for row, step in enumerate(decisions):
        top = 8 + row * (panel + 8)
        canvas.paste(resize_panel(patches[step["prototype"]], panel), (8, top))
        shown = resize_panel(picture, panel)
        if step["present"]:
            ids = torch.tensor([step["prototype"]], device=device)
            maps = net.paired_similarity_maps(image[None].to(device), ids)
            box = high_activation_boxes(upsample_maps(maps, (side, side)), percentile)[0].tolist()
            draw_box(shown, box, side, ACTIVATION_COLOUR)
        canvas.paste(shown, (16 + panel, top))
        decision = "present -> right" if step["present"] else "absent -> left"
        text = f"node {step['node']}: similarity {step['similarity']:.3f}, {decision}"
        draw.text((24 + 2 * panel, top + panel // 2 - 6), text, fill="black")
        lines.append(text)
    distribution = leaf["distribution"].cpu().numpy()
    predicted = int(distribution.argmax())
    top = 8 + len(decisions) * (panel + 8)
    canvas.paste(distribution_bars(distribution, panel).resize((panel, panel // 2)), (8, top))
    verdict = (
        f"leaf {leaf['leaf']} (node {leaf['node']}): class {predicted} ({names[predicted]}), "
        f"p={distribution[predicted]:.3f}"
    )
    draw.text((24 + panel, top + 4), verdict, fill="black")
    lines.append(verdict)
    return canvas, "\n".join(lines)


def save_tree(
    net: ProtoTree,
    dataset: Dataset,
    denormalize: Callable,
    path: str | Path,
    class_names: Sequence[str] | None = None,
) -> Path:
    """Write :func:`render_tree` as a PNG."""
    return save_png(Path(path), render_tree(net, dataset, denormalize, class_names))


def tree_prototypes(explained: Explained, out_dir: Path, ids: Sequence[int] | None = None) -> list[Picture]:
    """ProtoTree's ``prototypes``: the whole tree (``tree.png``), then its prototypes as ProtoPNet's."""
    from explain.families import Picture
    from explain.prototypes import patch_prototypes

    datamodule = explained.datamodule
    tree = save_tree(
        explained.net,
        datamodule.push_dataloader().dataset,
        datamodule.denormalize,
        Path(out_dir) / "tree.png",
        explained.class_names,
    )
    caption = "the tree: each node's prototype patch, edges absent (left) / present (right), leaf classes"
    return [Picture(tree, caption), *patch_prototypes(explained, out_dir, ids)]


@torch.no_grad()
def tree_local(explained: Explained, item: dict[str, Any], out: Path) -> Local:
    """ProtoTree's ``local``: the greedy path of the image down the tree and the leaf it reaches."""
    from explain.families import Local

    net, datamodule = explained.net, explained.datamodule
    picture, summary = explain_path(
        net,
        item["image"],
        datamodule.push_dataloader().dataset,
        datamodule.denormalize,
        explained.class_names,
    )
    with evaluating(net):
        logits = net.extract(item["image"][None].to(net.bank.vectors.device))["logits"]
    return Local(save_png(Path(out), picture), summary, int(item["label"]), int(logits.argmax()))
