"""Routing explanations of MoE ViTs: which expert takes which patch, and what each expert's tokens look like.

For the explained MoE layer of a :class:`~protolib.models.moe_vit.MoEViT`: routing maps (every patch of an
image tinted by its top-1 expert), each expert's gallery (the training patches nearest to its routing
prototype, found through the prototype bank; for a softmax router the patches it gives the highest
probability), the experts x classes usage matrix, the normalised entropy of expert usage and, where the data
has ground-truth part masks (``parts``), the routing purity. Pictures are composed with numpy and PIL.
"""

from __future__ import annotations

import io
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset

from explain.prototypes import save_png, to_rgb_uint8
from protolib.models.moe_vit import MoEViT
from protolib.models.protopnet import fetch_images
from protolib.nn.moe import expert_share, normalized_entropy
from protolib.utils.io import atomic_write_json
from protolib.utils.modes import evaluating

if TYPE_CHECKING:
    from explain.families import Explained, Local, Picture

MAP_SIDE = 128  # side of one routing-map panel in pixels
TILE = 64  # side of one gallery tile in pixels
LABEL_WIDTH = 120  # gallery: width of the expert-name column


def expert_colours(num_experts: int) -> np.ndarray:
    """(E, 3) uint8 colours, distinct for up to 20 experts (matplotlib's tab20, then repeated)."""
    from matplotlib import colormaps

    table = colormaps["tab20"](np.arange(20))[:, :3]
    order = np.r_[0:20:2, 1:20:2]  # the ten saturated colours first
    return (table[order][np.arange(num_experts) % 20] * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- scores
def patch_labels(part_mask: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """The majority pixel label of every patch: masks (B, H, W) -> (B, rows * cols), row-major patches.

    Background (0) votes like any part; ties go to the smaller label.
    """
    b, h, w = part_mask.shape
    rows, cols = grid
    if h % rows or w % cols:
        raise ValueError(f"part masks of {h}x{w} px do not split into a {rows}x{cols} patch grid")
    patches = part_mask.view(b, rows, h // rows, cols, w // cols).permute(0, 1, 3, 2, 4)
    patches = patches.reshape(b, rows * cols, -1).long()  # (B, Np, pixels per patch)
    votes = F.one_hot(patches, int(patches.max()) + 1).sum(2)  # (B, Np, labels)
    return votes.argmax(-1)


def routing_purity(experts: torch.Tensor, parts: torch.Tensor, background: int = 0) -> float:
    """How consistently each expert takes one kind of part: ``sum_e max_k n(e, k) / n``.

    ``experts`` and ``parts`` hold, for the same patches (any shape), the top-1 expert and the part type
    (:func:`patch_labels`); patches labelled ``background`` are left out, so ``n(e, k)`` counts the patches of
    part type k routed to expert e and ``n`` all part patches. 1 means every expert receives a single part
    type; routing independent of the parts scores the share of the commonest part type.
    """
    keep = parts != background
    if not keep.any():
        raise ValueError("routing_purity: no patch is labelled with a part (all background)")
    e, k = experts[keep].long(), parts[keep].long()
    kinds = int(k.max()) + 1
    table = torch.bincount(e * kinds + k, minlength=(int(e.max()) + 1) * kinds).view(-1, kinds)
    return float(table.max(dim=1).values.sum() / keep.sum())


def usage_matrix(
    experts: torch.Tensor, labels: torch.Tensor, num_experts: int, num_classes: int
) -> torch.Tensor:
    """(E, C): of the patches of class-c images, the share routed to each expert (columns sum to 1).

    ``experts`` (B, Np) top-1 expert per patch, ``labels`` (B,) image classes.
    """
    pairs = experts.long() * num_classes + labels.long()[:, None]
    counts = torch.bincount(pairs.reshape(-1), minlength=num_experts * num_classes)
    counts = counts.view(num_experts, num_classes).float()
    return counts / counts.sum(0, keepdim=True).clamp_min(1)


# ---------------------------------------------------------------------------------------------- collection
@dataclass
class RoutingSummary:
    """The explained layer's routing over a dataset, and each expert's gallery (nearest patches)."""

    experts: torch.Tensor  # (N, Np) top-1 expert per patch
    labels: torch.Tensor  # (N,)
    sample_ids: torch.Tensor  # (N,) dataset "index"
    parts: torch.Tensor | None  # (N, Np) majority part label per patch, where the data has part masks
    gallery_ids: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E, m) sample ids, -1 empty
    gallery_patches: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E, m) patch index
    gallery_scores: torch.Tensor = field(default_factory=lambda: torch.empty(0))  # (E, m) smaller = nearer

    def share(self, num_experts: int) -> torch.Tensor:
        """(E,) share of the patches each expert takes."""
        return expert_share(self.experts, num_experts)


def _loader(dataset: Dataset, batch_size: int) -> DataLoader:
    return DataLoader(dataset, batch_size=batch_size, shuffle=False)


@torch.no_grad()
def collect_routing(
    net: MoEViT, dataset: Dataset, per_expert: int = 0, batch_size: int = 64
) -> RoutingSummary:
    """Route every image of ``dataset`` (items with "image", "label", "index", optional "part_mask").

    With ``per_expert`` > 0 also keeps each expert's ``per_expert`` nearest patches among those routed to it:
    nearest to its routing prototype by a search of the bank (cosine distance), or, without a bank, highest
    router probability. Memory is bounded by one batch plus the galleries.
    """
    layer = net.explained
    if layer is None:
        raise ValueError("this network has no MoE layer to explain (moe=null or moe_blocks=[])")
    bank, e_count = net.prototype_bank, layer.num_experts
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    experts, labels, ids, parts = [], [], [], []
    best_s = torch.full((e_count, per_expert), math.inf)
    best_id = torch.full((e_count, per_expert), -1, dtype=torch.long)
    best_patch = torch.full((e_count, per_expert), -1, dtype=torch.long)
    for batch in _loader(dataset, batch_size):
        out = net.extract(batch["image"].to(device))
        top1 = out["expert_index"][:, net.explain_layer].cpu()  # (B, Np)
        experts.append(top1)
        labels.append(batch["label"])
        ids.append(batch["index"])
        if "part_mask" in batch:
            parts.append(patch_labels(batch["part_mask"], net.grid_size))
        if per_expert:
            b, n = top1.shape
            if bank is not None:
                dist, nearest = bank.search(out["patch_tokens"].reshape(b * n, -1), 1)
                owner, score = bank.owners[nearest[:, 0]].cpu(), dist[:, 0].cpu()
            else:
                prob, owner = out["routing_scores"].reshape(b * n, -1).max(1)
                owner, score = owner.cpu(), -prob.cpu()
            sample = batch["index"].repeat_interleave(n)
            patch = torch.arange(n).repeat(b)
            for e in range(e_count):
                hit = owner == e
                s = torch.cat([best_s[e], score[hit]])
                order = s.argsort()[:per_expert]
                best_s[e] = s[order]
                best_id[e] = torch.cat([best_id[e], sample[hit]])[order]
                best_patch[e] = torch.cat([best_patch[e], patch[hit]])[order]
    net.train(was_training)
    return RoutingSummary(
        experts=torch.cat(experts),
        labels=torch.cat(labels),
        sample_ids=torch.cat(ids),
        parts=torch.cat(parts) if parts else None,
        gallery_ids=best_id,
        gallery_patches=best_patch,
        gallery_scores=best_s,
    )


# ---------------------------------------------------------------------------------------------- pictures
def routing_map(
    image: np.ndarray, experts: np.ndarray, colours: np.ndarray, side: int = MAP_SIDE
) -> np.ndarray:
    """Image (H, W, 3) uint8, each patch tinted by its expert (``experts`` (rows, cols)): (side, side, 3)."""
    rows, cols = experts.shape
    big = np.asarray(Image.fromarray(image).resize((side, side), Image.NEAREST), dtype=np.float64)
    tint = colours[experts].repeat(math.ceil(side / rows), 0).repeat(math.ceil(side / cols), 1)[:side, :side]
    blended = 0.5 * big + 0.5 * tint
    ys = (np.arange(1, rows) * side / rows).astype(int)
    xs = (np.arange(1, cols) * side / cols).astype(int)
    blended[ys, :] = blended[:, xs] = 255.0  # patch grid lines
    return blended.round().astype(np.uint8)


def _caption(panel: Image.Image, text: str, height: int = 14) -> Image.Image:
    framed = Image.new("RGB", (panel.width, panel.height + height), "white")
    framed.paste(panel, (0, height))
    ImageDraw.Draw(framed).text((2, 1), text, fill="black")
    return framed


def legend(colours: np.ndarray, share: np.ndarray, width: int) -> Image.Image:
    """A strip naming every expert's colour and its share of the patches."""
    per_row = max(1, width // 90)
    rows = math.ceil(len(colours) / per_row)
    strip = Image.new("RGB", (width, 16 * rows + 4), "white")
    draw = ImageDraw.Draw(strip)
    for e, colour in enumerate(colours):
        x, y = (e % per_row) * 90 + 4, (e // per_row) * 16 + 2
        draw.rectangle([x, y, x + 12, y + 12], fill=tuple(int(c) for c in colour))
        draw.text((x + 16, y), f"e{e} {100 * share[e]:.0f}%", fill="black")
    return strip


def routing_maps_page(
    images: np.ndarray, experts: np.ndarray, captions: Sequence[str], colours: np.ndarray, share: np.ndarray
) -> Image.Image:
    """A page of routing maps: ``images`` (N, H, W, 3) uint8, ``experts`` (N, rows, cols), with a legend."""
    per_row = min(8, len(images))
    panels = [
        _caption(Image.fromarray(routing_map(im, ex, colours)), c)
        for im, ex, c in zip(images, experts, captions, strict=True)
    ]
    w, h = panels[0].size
    key = legend(colours, share, per_row * (w + 4))
    page = Image.new(
        "RGB", (per_row * (w + 4), math.ceil(len(panels) / per_row) * (h + 4) + key.height), "white"
    )
    for i, panel in enumerate(panels):
        page.paste(panel, ((i % per_row) * (w + 4), (i // per_row) * (h + 4)))
    page.paste(key, (0, page.height - key.height))
    return page


def patch_tile(image: np.ndarray, patch: int, grid: tuple[int, int], colour: np.ndarray) -> Image.Image:
    """The patch with one patch of context on each side, outlined in its expert's colour, TILE px square."""
    rows, cols = grid
    h, w = image.shape[:2]
    ph, pw = h // rows, w // cols
    r, c = divmod(int(patch), cols)
    y0, x0 = max(0, (r - 1) * ph), max(0, (c - 1) * pw)
    y1, x1 = min(h, (r + 2) * ph), min(w, (c + 2) * pw)
    crop = Image.fromarray(image[y0:y1, x0:x1]).resize((TILE, TILE), Image.NEAREST)
    sy, sx = TILE / (y1 - y0), TILE / (x1 - x0)
    box = [(c * pw - x0) * sx, (r * ph - y0) * sy, ((c + 1) * pw - x0) * sx - 1, ((r + 1) * ph - y0) * sy - 1]
    ImageDraw.Draw(crop).rectangle(box, outline=tuple(int(v) for v in colour), width=2)
    return crop


def gallery_page(
    summary: RoutingSummary,
    dataset: Dataset,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    grid: tuple[int, int],
    colours: np.ndarray,
) -> Image.Image:
    """One row per expert: its name and share, then its nearest training patches (with context)."""
    num_experts, per_expert = summary.gallery_ids.shape
    share = summary.share(num_experts)
    page = Image.new("RGB", (LABEL_WIDTH + per_expert * (TILE + 4), num_experts * (TILE + 4)), "white")
    draw = ImageDraw.Draw(page)
    for e in range(num_experts):
        y = e * (TILE + 4)
        draw.rectangle([2, y + 4, 14, y + 16], fill=tuple(int(v) for v in colours[e]))
        draw.text((18, y + 4), f"expert {e}\n{100 * share[e]:.1f}% of patches", fill="black")
        for j in range(per_expert):
            sample = int(summary.gallery_ids[e, j])
            if sample < 0:
                continue
            image = to_rgb_uint8(denormalize(fetch_images(dataset, [sample])))[0]
            tile = patch_tile(image, int(summary.gallery_patches[e, j]), grid, colours[e])
            page.paste(tile, (LABEL_WIDTH + j * (TILE + 4), y))
    return page


def usage_figure(matrix: np.ndarray, class_names: Sequence[str], path: Path) -> Path:
    """Heat map of the experts x classes usage matrix, written as PNG."""
    import matplotlib.pyplot as plt

    e, c = matrix.shape
    label_height = 0.08 * max(len(str(n)) for n in class_names)  # rotated class names below the axis
    fig, ax = plt.subplots(figsize=(2.5 + 0.5 * c, 1.5 + 0.4 * e + label_height), layout="constrained")
    shown = ax.imshow(matrix, cmap="viridis", vmin=0, vmax=max(float(matrix.max()), 1e-6), aspect="auto")
    ax.set_xticks(range(c), [str(n) for n in class_names], rotation=90, fontsize=7)
    ax.set_yticks(range(e), [f"expert {i}" for i in range(e)], fontsize=7)
    ax.set_xlabel("class")
    ax.set_title("share of each class's patches per expert", fontsize=9)
    fig.colorbar(shown, ax=ax, fraction=0.05)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    return save_png(path, Image.open(buffer))


def render_routing(
    net: MoEViT,
    train_dataset: Dataset,
    test_dataset: Dataset,
    out_dir: str | Path,
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    class_names: Sequence[str] | None = None,
    num_maps: int = 16,
    per_expert: int = 8,
) -> list[Path]:
    """Write routing_maps.png, galleries.png, usage.png and routing.json for the explained MoE layer.

    Maps and the usage matrix come from ``test_dataset``, galleries from ``train_dataset``; routing.json holds
    the expert shares, their normalised entropy, the usage matrix and, with part masks, the routing purity.
    """
    out = Path(out_dir)
    layer = net.explained
    if layer is None:
        raise ValueError("this network has no MoE layer to explain (moe=null or moe_blocks=[])")
    num_experts, colours = layer.num_experts, expert_colours(layer.num_experts)
    test = collect_routing(net, test_dataset)
    train = collect_routing(net, train_dataset, per_expert=per_expert)
    share = test.share(num_experts)
    names = list(class_names) if class_names is not None else [str(c) for c in range(net.num_classes)]
    written = []
    count = min(num_maps, len(test_dataset))
    images = to_rgb_uint8(denormalize(fetch_images(test_dataset, range(count))))
    experts = test.experts[:count].view(count, *net.grid_size).numpy()
    captions = [f"#{i} {names[int(test.labels[i])]}"[:20] for i in range(count)]
    written.append(
        save_png(
            out / "routing_maps.png", routing_maps_page(images, experts, captions, colours, share.numpy())
        )
    )
    written.append(
        save_png(
            out / "galleries.png", gallery_page(train, train_dataset, denormalize, net.grid_size, colours)
        )
    )
    matrix = usage_matrix(test.experts, test.labels, num_experts, net.num_classes)
    written.append(usage_figure(matrix.numpy(), names, out / "usage.png"))
    report: dict[str, Any] = {
        "moe_block": net.moe_blocks[net.explain_layer],
        "router": type(layer.router).__name__,
        "expert_share": share.tolist(),
        "usage_entropy": float(normalized_entropy(share)),
        "usage_matrix": matrix.tolist(),
        "classes": names,
        "gallery": {
            f"expert_{e}": [
                {"index": int(i), "patch": int(p), "score": float(s)}
                for i, p, s in zip(
                    train.gallery_ids[e], train.gallery_patches[e], train.gallery_scores[e], strict=True
                )
                if i >= 0
            ]
            for e in range(num_experts)
        },
    }
    if test.parts is not None:
        report["routing_purity"] = routing_purity(test.experts, test.parts)
    written.append(atomic_write_json(out / "routing.json", report))
    return written


def default_out_dir(checkpoint: str | Path, name: str = "routing") -> Path:
    """``<run>/<name>`` for ``<run>/checkpoints/<file>.ckpt`` (else a ``name`` folder beside the file): where
    the explain commands write by default, inside the run folder rather than the current directory."""
    path = Path(checkpoint).resolve()
    run = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return run / name


def render_routing_checkpoint(
    checkpoint: str | Path, out_dir: str | Path | None = None, num_maps: int = 16, per_expert: int = 8
) -> list[Path]:
    """Routing explanations of an MoE checkpoint written by train.py, with the data it was trained on."""
    from explain.families import load

    explained = load(checkpoint)
    net, datamodule = explained.net, explained.datamodule
    if not isinstance(net, MoEViT) or not net.moe_blocks:
        raise ValueError(
            f"checkpoint {checkpoint} holds a {type(net).__name__} without MoE layers; routing explanations "
            "need an MoE ViT (e.g. experiment=promoe_vit_digits)"
        )
    return render_routing(
        net,
        datamodule.push_dataloader().dataset,
        datamodule.test_dataset,
        out_dir or default_out_dir(checkpoint),
        datamodule.denormalize,
        class_names=explained.class_names,
        num_maps=num_maps,
        per_expert=per_expert,
    )


def routing_prototypes(
    explained: Explained, out_dir: Path, ids: Sequence[int] | None = None
) -> list[Picture]:
    """The MoE ``prototypes``: each expert's gallery (the training patches nearest its routing prototype),
    routing maps of test images and the experts x classes usage; every expert is shown."""
    from explain.families import NotApplicable, Picture

    net, datamodule = explained.net, explained.datamodule
    if net.explained is None:
        raise NotApplicable("a dense ViT has no experts and no prototypes: nothing routes its patches")
    if ids is not None:
        raise ValueError("routing galleries show every expert at once: leave out the prototype ids")
    render_routing(
        net,
        datamodule.push_dataloader().dataset,
        datamodule.test_dataset,
        out_dir,
        datamodule.denormalize,
        class_names=explained.class_names,
    )
    router = type(net.explained.router).__name__
    return [
        Picture(out_dir / "galleries.png", f"each expert's nearest training patches ({router})"),
        Picture(
            out_dir / "routing_maps.png", "test images, every patch tinted by the expert it is routed to"
        ),
        Picture(out_dir / "usage.png", "share of each class's patches per expert"),
    ]


@torch.no_grad()
def routing_local(explained: Explained, item: dict[str, Any], out: Path) -> Local:
    """The MoE ``local``: which expert took each patch of the image (its routing map), the prediction, and
    the image's share of patches per expert; a dense ViT (no experts) is explained by integrated
    gradients of the predicted logit."""
    from explain.families import Local

    net, datamodule, names = explained.net, explained.datamodule, explained.class_names
    device = next(net.parameters()).device
    with evaluating(net):
        out_dict = net.extract(item["image"][None].to(device))
    predicted, label = int(out_dict["logits"][0].argmax()), int(item["label"])
    image = to_rgb_uint8(datamodule.denormalize(item["image"][None].cpu()))
    head = f"predicted {predicted} ({names[predicted]}), true {label}"
    if net.explained is None:
        from explain.attribution import integrated_gradients, save_attribution

        attribution = integrated_gradients(net, item["image"], target=predicted)
        path = save_attribution(attribution, image[0], out, f"dense ViT: {head}")
        return Local(path, f"{head}; integrated gradients of the predicted logit", label, predicted)
    num_experts = net.explained.num_experts
    experts = out_dict["expert_index"][0, net.explain_layer].cpu()  # (Np,)
    share = expert_share(experts, num_experts)
    page = routing_maps_page(
        image,
        experts.view(1, *net.grid_size).numpy(),
        [head[:20]],
        expert_colours(num_experts),
        share.numpy(),
    )
    summary = f"{head}; patches per expert: " + ", ".join(
        f"e{e} {100 * float(v):.0f}%" for e, v in enumerate(share)
    )
    return Local(save_png(Path(out), page), summary, label, predicted)
