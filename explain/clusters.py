"""Category discovery's explanations: each discovered cluster shown by its prototype's nearest unlabelled
images and the class the Hungarian matching gave it, and why an image joined its cluster (its similarity to
the nearest cluster prototypes, beside their typical images).

Clusters are the prototypes of the network's bank (owner = cluster id; an image's cluster is its most
similar prototype). The matching is the evaluation's: one Hungarian assignment of clusters to classes over
the unlabelled training images (transductive), so "matched class" means what ``test/all_acc`` counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from explain.neighbours import (
    device_of,
    nearest_prototypes,
    neighbour_tiles,
    paginate,
    prototype_neighbours,
    rows_picture,
)
from explain.prototypes import save_png, to_rgb_uint8
from protolib.gcd.metrics import hungarian_match
from protolib.utils.modes import evaluating

if TYPE_CHECKING:
    from explain.families import Explained, Local, Picture

PER_CLUSTER = 8  # typical images shown per cluster


@torch.no_grad()
def cluster_assignment(explained: Explained, progress: bool = True) -> dict[str, Any]:
    """Over the unlabelled training images: each image's cluster and true class, the Hungarian
    ``{cluster: class}`` matching, the cluster sizes, and each prototype's nearest images (cached)."""
    if "clusters" in explained.cache:
        return explained.cache["clusters"]
    net, dataset = explained.net, explained.datamodule.unlabelled_dataset
    device = device_of(net)
    preds, labels = [], []
    with evaluating(net):
        for batch in tqdm(
            DataLoader(dataset, batch_size=128), desc="clustering", disable=not progress, leave=False
        ):
            preds.append(net.extract(batch["image"].to(device))["logits"].argmax(1).cpu())
            labels.append(batch["label"])
    pred, y = torch.cat(preds).numpy(), torch.cat(labels).numpy()
    distances, positions = prototype_neighbours(net, dataset, PER_CLUSTER, progress=progress)
    explained.cache["clusters"] = {
        "pred": pred,
        "label": y,
        "to_class": {cluster: cls for cls, cluster in hungarian_match(y, pred).items()},
        "sizes": np.bincount(pred, minlength=net.prototype_bank.num_prototypes),
        "distances": distances,
        "positions": positions,
    }
    return explained.cache["clusters"]


def matched_name(explained: Explained, cluster: int) -> str:
    """The class a cluster was matched to, with known / new, or "unmatched"."""
    to_class = cluster_assignment(explained)["to_class"]
    names, known = explained.class_names, explained.datamodule.num_known_classes
    c = to_class.get(int(cluster))
    if c is None or c >= len(names):
        return "unmatched"
    return f"{names[c]} ({'known' if c < known else 'new'})"


def to_classes(explained: Explained, clusters: np.ndarray) -> np.ndarray:
    """Clusters (N,) -> their matched classes (N,), -1 where unmatched."""
    to_class = cluster_assignment(explained)["to_class"]
    return np.array([to_class.get(int(k), -1) for k in clusters], dtype=np.int64)


def cluster_owner(explained: Explained, p: int) -> int:
    """The cluster prototype ``p`` stands for (its owner in the bank)."""
    return int(explained.net.prototype_bank.owners[p])


def cluster_prototypes(
    explained: Explained, out_dir: Path, ids: Sequence[int] | None = None
) -> list[Picture]:
    """Category discovery's ``prototypes``: a row per cluster in use (or per prototype of ``ids``): its size,
    the class it was matched to, and its prototype's nearest unlabelled images captioned by true class."""
    from explain.families import Picture

    info = cluster_assignment(explained)
    dataset, names = explained.datamodule.unlabelled_dataset, explained.class_names
    chosen = [p for p in range(len(info["positions"])) if info["sizes"][cluster_owner(explained, p)] > 0]
    rows = []
    for p in chosen if ids is None else ids:
        k = cluster_owner(explained, p)
        tiles = neighbour_tiles(
            dataset,
            info["positions"][p].tolist(),
            explained.datamodule.denormalize,
            lambda d: names[int(d["label"])],
        )
        title = f"cluster {k}: {int(info['sizes'][k])} unlabelled images -> {matched_name(explained, k)}"
        rows.append((title, tiles))
    pictures = []
    for number, page in enumerate(paginate(rows), start=1):
        path = save_png(Path(out_dir) / f"clusters-{number:02d}.png", rows_picture(page))
        caption = (
            f"each discovered cluster: its size, the class it was matched to, the {PER_CLUSTER} unlabelled "
            f"training images nearest its prototype, captioned by their true class (page {number})"
        )
        pictures.append(Picture(path, caption))
    return pictures


def explain_cluster_choice(explained: Explained, item: dict[str, Any], out: Path) -> Local:
    """Category discovery's ``local``: the cluster an image joined and why, its similarity to the nearest
    cluster prototypes (and the resulting probability), beside each cluster's typical images."""
    from explain.families import Local

    net, datamodule = explained.net, explained.datamodule
    outputs, distances, ids = nearest_prototypes(net, item["image"], explained.options.get("k", 3))
    probabilities = outputs["logits"][0].float().softmax(0).cpu()  # (K,) cluster posterior
    cluster, label = int(outputs["logits"][0].argmax()), int(item["label"])
    info, names = cluster_assignment(explained), explained.class_names
    rows = []
    for p, d in zip(ids.tolist(), distances.tolist(), strict=True):
        k = cluster_owner(explained, p)
        tiles = neighbour_tiles(
            datamodule.unlabelled_dataset,
            info["positions"][p].tolist(),
            datamodule.denormalize,
            lambda x: names[int(x["label"])],
        )
        title = (
            f"cluster {k} -> {matched_name(explained, k)}: similarity {1 - d:.3f}, probability "
            f"{float(probabilities[k]):.3f}"
        )
        rows.append((title, tiles))
    known = label < datamodule.num_known_classes
    heading = [
        f"true class {names[label]} ({'known' if known else 'new'}); joined cluster {cluster} -> "
        f"{matched_name(explained, cluster)}",
        f"its {len(rows)} most similar cluster prototypes and their typical unlabelled images:",
    ]
    query = to_rgb_uint8(datamodule.denormalize(item["image"][None].cpu()))[0]
    path = save_png(Path(out), rows_picture(rows, query, heading))
    evidence = [(p, 1 - d) for p, d in zip(ids.tolist(), distances.tolist(), strict=True)]
    return Local(path, "\n".join([heading[0], *(title for title, _ in rows)]), label, cluster, evidence)
