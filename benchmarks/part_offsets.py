"""Where a ProtoPNet-family model on ``parts`` loses its part score: offset, fragmented or oversized boxes?

    python -m benchmarks.part_offsets outputs/<run>/checkpoints/best-*.ckpt [more checkpoints]

For every pushed prototype, from its provenance, the part mask of its source image and its similarity map:

- ``part_score`` (the recorded boxes, :func:`explain.prototype_part_score`) and ``after_push_score``, the
  same for boxes of the pushed prototype's own map (the maps below; push records the map of the prototype
  before it became the patch, so the two differ a little);
- ``one_piece``: the share of prototypes whose 95th-percentile region is one 8-connected piece, and
  ``largest_piece_score``: the part score of boxes around the largest piece only (fragmentation's cost);
- ``box_area`` / ``frame_area``: mean box and framing-box sizes in pixels, ``outside_frame``: the mean share
  of a box outside the framing box of its part (an offset box);
- ``peak_on_part``: the share of pushed patches (receptive-field centres) on a defining part, and
  ``peak_depth_quartiles``: their signed distance in pixels to the part's edge (+ inside, - outside).

Prints one row per checkpoint and writes JSON atomically to benchmarks/results/part_offsets.json.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage
from torchvision.ops import box_area

from explain.families import load
from explain.prototypes import pushed_provenance
from explain.scores.parts import box_fractions, defining_masks, framing_boxes
from protolib.models.protopnet import high_activation_boxes, high_activation_masks, upsample_maps
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
EIGHT_CONNECTED = np.ones((3, 3))


def largest_piece_boxes(maps: torch.Tensor, percentile: float = 95.0) -> tuple[torch.Tensor, torch.Tensor]:
    """For upsampled maps (N, H, W): boxes (N, 4) ``x0, y0, x1, y1`` (exclusive ends) around the largest
    8-connected piece of the pixels at or above each map's ``percentile``-th percentile (ties: the first
    piece), and the number of pieces (N,)."""
    boxes, pieces = [], []
    for above in high_activation_masks(maps, percentile).numpy():
        labels, count = ndimage.label(above, structure=EIGHT_CONNECTED)
        sizes = np.bincount(labels.ravel(), minlength=count + 1)[1:]
        ys, xs = np.nonzero(labels == np.argmax(sizes) + 1)
        boxes.append([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1])
        pieces.append(count)
    return torch.tensor(boxes), torch.tensor(pieces)


def signed_depths(masks: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """(N,) signed Euclidean distance in pixels from pixel ``points[i]`` (N, 2) (row, col) to the edge of
    the boolean mask ``masks[i]`` (N, H, W): inside, the distance to the nearest False pixel; outside, minus
    the distance to the nearest True one (-inf where a mask is empty)."""
    depths = []
    for mask, (row, col) in zip(masks.numpy(), points.tolist(), strict=True):
        if not mask.any():
            depths.append(-np.inf)
        elif mask[row, col]:
            depths.append(ndimage.distance_transform_edt(mask)[row, col])
        else:
            depths.append(-ndimage.distance_transform_edt(~mask)[row, col])
    return torch.tensor(depths, dtype=torch.float64)


def overlap_area(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(N,) pixels shared by boxes a[i] and b[i] (N, 4)."""
    width = (torch.minimum(a[:, 2], b[:, 2]) - torch.maximum(a[:, 0], b[:, 0])).clamp(min=0)
    height = (torch.minimum(a[:, 3], b[:, 3]) - torch.maximum(a[:, 1], b[:, 1])).clamp(min=0)
    return (width * height).double()


@torch.no_grad()
def part_offsets(net: Any, datamodule: Any, percentile: float = 95.0, chunk: int = 64) -> dict[str, Any]:
    """The measures of the module docstring for a pushed ProtoPNet-family network (eval mode) and its set-up
    parts data."""
    if not hasattr(datamodule, "class_parts"):
        raise ValueError(f"part offsets need the parts data (part masks), got {type(datamodule).__name__}")
    dataset = datamodule.push_dataloader().dataset
    provenance, known = pushed_provenance(net)
    items = [dataset[i] for i in provenance["source_sample"][known].tolist()]  # each source image, once
    masks = torch.stack([item["part_mask"] for item in items])  # (P, H, W)
    defining = defining_masks(masks, provenance["owner"][known], datamodule.class_parts)
    images = torch.stack([item["image"] for item in items])  # (P, C, H, W)
    maps = []
    for rows in torch.arange(len(known)).split(chunk):
        small = net.paired_similarity_maps(images[rows], known[rows]).cpu()  # (n, h, w)
        maps.append(upsample_maps(small, tuple(images.shape[-2:])))
    maps = torch.cat(maps)  # (P, H, W)
    boxes = provenance["activation_box"][known]
    frames = framing_boxes(boxes, defining)
    largest, pieces = largest_piece_boxes(maps, percentile)
    # the pixel holding each pushed patch's receptive-field centre, (P, 2) row, col
    centres = net.receptive_field.centres(provenance["location"][known]).floor().long()
    centres = torch.minimum(centres.clamp(min=0), torch.tensor(masks.shape[1:]) - 1)
    depths = signed_depths(defining, centres)
    return {
        "prototypes": len(known),
        "part_score": float(box_fractions(boxes, defining).mean()),
        "after_push_score": float(box_fractions(high_activation_boxes(maps, percentile), defining).mean()),
        "one_piece": float((pieces == 1).double().mean()),
        "largest_piece_score": float(box_fractions(largest, defining).mean()),
        "box_area": float(box_area(boxes.double()).mean()),
        "frame_area": float(box_area(frames.double()).mean()),
        "outside_frame": float((1 - overlap_area(boxes, frames) / box_area(boxes.double())).mean()),
        "peak_on_part": float((depths > 0).double().mean()),
        "peak_depth_quartiles": np.percentile(depths.numpy(), [25, 50, 75]).round(2).tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="+", type=Path)
    parser.add_argument("--out", default="part_offsets.json", help="file name under benchmarks/results/")
    args = parser.parse_args()
    rows = []
    for checkpoint in args.checkpoints:
        explained = load(checkpoint)
        measures = part_offsets(explained.net.eval(), explained.datamodule)
        rows.append({"checkpoint": str(checkpoint), **measures})
    atomic_write_json(RESULTS / args.out, {"rows": rows})
    columns = [key for key in rows[0] if key != "checkpoint"]
    print("| checkpoint | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for row in rows:
        cells = [f"{row[c]:.3f}" if isinstance(row[c], float) else str(row[c]) for c in columns]
        print(f"| {row['checkpoint']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
