"""PALM's explanations: each class prototype shown by its nearest training images, and an image's decision
(its class, and in- or out-of-distribution) explained by its nearest in-distribution prototypes.

The OOD score is PALM's mixture-of-prototypes score
(:class:`~protolib.ood.postprocessors.prototype.PALMScore`, ``max_c log mean_{k in c} exp(z . p_k / t)``):
it is made of the very similarities shown, so the picture explains the number. The decision threshold is the
score that 95% of the in-distribution validation images reach (the operating point of FPR@95): below it the
image is called out-of-distribution.
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
from protolib.ood.postprocessors.prototype import PALMScore
from protolib.utils.modes import evaluating

if TYPE_CHECKING:
    from explain.families import Explained, Local, Picture

ID_RECALL = 0.95  # share of in-distribution validation images the threshold accepts
PER_PROTOTYPE = 6  # nearest training images shown per prototype


def all_class_names(explained: Explained) -> list[str]:
    """In-distribution class names, then the held-out ones (the labels of held-out images continue there)."""
    return explained.class_names + list(getattr(explained.datamodule, "held_out_class_names", []))


def neighbours(explained: Explained) -> tuple[torch.Tensor, torch.Tensor]:
    """Each prototype's nearest training images (eval transform): distances (P, m), positions (P, m)."""
    if "neighbours" not in explained.cache:
        dataset = explained.datamodule.push_dataloader().dataset
        explained.cache["neighbours"] = prototype_neighbours(explained.net, dataset, PER_PROTOTYPE)
    return explained.cache["neighbours"]


@torch.no_grad()
def palm_scores(explained: Explained, dataset: Any, progress: bool = True) -> np.ndarray:
    """PALM's OOD score (N,) of every image of ``dataset``: higher = more in-distribution."""
    score, module = PALMScore(), explained.module
    device = device_of(explained.net)
    parts = []
    with evaluating(explained.net):
        for batch in tqdm(
            DataLoader(dataset, batch_size=128), desc="PALM scores", disable=not progress, leave=False
        ):
            parts.append(score.score(module, explained.net.extract(batch["image"].to(device))).float().cpu())
    return torch.cat(parts).numpy()


def threshold(explained: Explained) -> float:
    """The score that :data:`ID_RECALL` of the in-distribution validation images reach or exceed."""
    if "ood_threshold" not in explained.cache:
        scores = palm_scores(explained, explained.datamodule.val_dataset)
        explained.cache["ood_threshold"] = float(np.quantile(scores, 1 - ID_RECALL))
    return explained.cache["ood_threshold"]


def prototype_title(explained: Explained, p: int) -> str:
    """``prototype p, class c (name)``."""
    owner = int(explained.net.prototype_bank.owners[p])
    return f"prototype {p}, class {owner} ({explained.class_names[owner]})"


def palm_prototypes(explained: Explained, out_dir: Path, ids: Sequence[int] | None = None) -> list[Picture]:
    """PALM's ``prototypes``: one row per prototype (class by class) with its nearest training images."""
    from explain.families import Picture

    dist, positions = neighbours(explained)
    dataset, names = explained.datamodule.push_dataloader().dataset, explained.class_names
    chosen = range(len(positions)) if ids is None else ids
    rows = []
    for p in chosen:
        tiles = neighbour_tiles(
            dataset, positions[p].tolist(), explained.datamodule.denormalize, lambda d: names[int(d["label"])]
        )
        rows.append((f"{prototype_title(explained, p)}: cosine distance {float(dist[p, 0]):.3f}", tiles))
    pictures = []
    for number, page in enumerate(paginate(rows), start=1):
        path = save_png(Path(out_dir) / f"prototypes-{number:02d}.png", rows_picture(page))
        caption = (
            f"each prototype's {PER_PROTOTYPE} nearest training images, captioned by class (page {number})"
        )
        pictures.append(Picture(path, caption))
    return pictures


def explain_ood_decision(explained: Explained, item: dict[str, Any], out: Path) -> Local:
    """PALM's ``local``: the predicted class, the OOD score against the threshold and the decision, and the
    image's nearest in-distribution prototypes, how far they are, beside their typical training images."""
    from explain.families import Local

    net, datamodule = explained.net, explained.datamodule
    k = explained.options.get("k", 3)
    outputs, distances, ids = nearest_prototypes(net, item["image"], k)
    score = float(PALMScore().score(explained.module, outputs)[0])
    limit = threshold(explained)
    decision = "in-distribution" if score >= limit else "OUT-OF-DISTRIBUTION"
    predicted, label = int(outputs["logits"][0].argmax()), int(item["label"])
    names, all_names = explained.class_names, all_class_names(explained)
    _, positions = neighbours(explained)
    dataset = datamodule.push_dataloader().dataset
    rows = [
        (
            f"{prototype_title(explained, p)}: cosine similarity {1 - d:.3f} (distance {d:.3f})",
            neighbour_tiles(
                dataset, positions[p].tolist(), datamodule.denormalize, lambda x: names[int(x["label"])]
            ),
        )
        for p, d in zip(ids.tolist(), distances.tolist(), strict=True)
    ]
    true_name = all_names[label] if label < len(all_names) else str(label)
    heading = [
        f"true class {true_name}{'' if label < len(names) else ' (held out of training)'}; predicted "
        f"{names[predicted]}",
        f"PALM score {score:.3f}, threshold {limit:.3f} ({100 * ID_RECALL:.0f}% of ID validation images "
        f"score above): {decision}",
        f"its {len(rows)} nearest in-distribution prototypes and their typical training images:",
    ]
    query = to_rgb_uint8(datamodule.denormalize(item["image"][None].cpu()))[0]
    path = save_png(Path(out), rows_picture(rows, query, heading))
    summary = "\n".join([*heading[:2], *(title for title, _ in rows)])
    evidence = [(p, 1 - d) for p, d in zip(ids.tolist(), distances.tolist(), strict=True)]
    return Local(path, summary, label, predicted, evidence, score)
