"""Prototypes shown by the training images nearest them, for families whose prototypes live in the space of
pooled embeddings (PALM's class prototypes, category discovery's cluster prototypes): the reverse search
(each prototype's nearest images) and the forward search (an image's nearest prototypes) both go through the
network's prototype bank, and one picture layout serves galleries and local explanations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from explain.prototypes import resize_panel, to_rgb_uint8
from protolib.utils.modes import evaluating

EMBEDDING_KEYS = ("embedding", "features")  # extract() outputs a bank may be searched with, in this order
TILE = 64  # side of one neighbour tile in pixels
QUERY = 128  # side of the explained image's panel
CAPTION = 14  # height of a caption line
ROWS_PER_PAGE = 24


def embedding_of(net: torch.nn.Module, outputs: dict[str, torch.Tensor]) -> torch.Tensor:
    """(B, D) the ``extract()`` output in the bank's space: the first of :data:`EMBEDDING_KEYS` whose width is
    the bank's dimension, or an error naming what the network returns."""
    dim = net.prototype_bank.dim
    for key in EMBEDDING_KEYS:
        value = outputs.get(key)
        if value is not None and value.ndim == 2 and value.shape[1] == dim:
            return value
    shapes = {key: tuple(value.shape) for key, value in outputs.items() if isinstance(value, torch.Tensor)}
    raise ValueError(
        f"{type(net).__name__}.extract() returns no (B, {dim}) embedding to search its {dim}-d bank with "
        f"(looked for {EMBEDDING_KEYS}; it returns {shapes})"
    )


def device_of(net: torch.nn.Module) -> torch.device:
    """The device of the network's parameters."""
    return next(net.parameters()).device


@torch.no_grad()
def prototype_neighbours(
    net: torch.nn.Module, dataset: Dataset, k: int, batch_size: int = 128, progress: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Every prototype's ``k`` nearest images of ``dataset`` (the bank's reverse search): distances (P, k) in
    the bank's metric and positions in ``dataset`` (P, k), -1 where the dataset has fewer than ``k``."""
    device = device_of(net)

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        start = 0
        loader = DataLoader(dataset, batch_size=batch_size, shuffle=False)
        for batch in tqdm(
            loader, desc="searching each prototype's nearest images", disable=not progress, leave=False
        ):
            embedding = embedding_of(net, net.extract(batch["image"].to(device))).float()
            positions = torch.arange(start, start + len(embedding))
            start += len(embedding)
            yield embedding, batch["label"], positions

    with evaluating(net):
        return net.prototype_bank.nearest_samples(batches(), k)


@torch.no_grad()
def nearest_prototypes(
    net: torch.nn.Module, image: torch.Tensor, k: int
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """The outputs of ``extract`` for one image (C, H, W) and its ``k`` nearest prototypes through the bank:
    distances (k,) in the bank's metric, nearest first, and prototype ids (k,)."""
    k = max(1, min(k, net.prototype_bank.num_prototypes))
    with evaluating(net):
        outputs = net.extract(image[None].to(device_of(net)))
    distances, ids = net.prototype_bank.search(embedding_of(net, outputs).float(), k)
    return outputs, distances[0].cpu(), ids[0].cpu()


def neighbour_tiles(
    dataset: Dataset,
    positions: Sequence[int],
    denormalize: Callable[[torch.Tensor], torch.Tensor],
    caption: Callable[[dict[str, Any]], str],
) -> list[tuple[np.ndarray, str]]:
    """(image (H, W, 3) uint8, caption) of the dataset items at ``positions`` (negative ones skipped)."""
    items = [dataset[int(p)] for p in positions if int(p) >= 0]  # positions, not "index" (subsets)
    if not items:
        return []
    images = to_rgb_uint8(denormalize(torch.stack([item["image"] for item in items])))
    return [(image, caption(item)) for image, item in zip(images, items, strict=True)]


def rows_picture(
    rows: Sequence[tuple[str, Sequence[tuple[np.ndarray, str]]]],
    query: np.ndarray | None = None,
    heading: Sequence[str] = (),
) -> Image.Image:
    """A titled row of captioned tiles per prototype (its nearest images), under an optional ``query`` image
    (H, W, 3) and ``heading`` lines: the layout of both galleries and local explanations."""
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    columns = max([len(tiles) for _, tiles in rows] + [1])
    texts = [*heading, *(title for title, _ in rows)]
    width = max([columns * (TILE + 4) + 8, QUERY + 8] + [int(measure.textlength(t)) + 12 for t in texts])
    top = (QUERY + 8 if query is not None else 0) + CAPTION * len(heading) + (4 if heading else 0)
    row_height = CAPTION + TILE + CAPTION + 6
    canvas = Image.new("RGB", (width, top + row_height * len(rows) + 4), "white")
    draw = ImageDraw.Draw(canvas)
    y = 4
    if query is not None:
        canvas.paste(resize_panel(query, QUERY), (4, y))
        y += QUERY + 4
    for line in heading:
        draw.text((4, y), line, fill="black")
        y += CAPTION
    y = top
    for title, tiles in rows:
        draw.text((4, y), title, fill="black")
        for column, (image, caption) in enumerate(tiles):
            x = 4 + column * (TILE + 4)
            canvas.paste(resize_panel(image, TILE), (x, y + CAPTION))
            draw.text((x, y + CAPTION + TILE + 1), caption[:10], fill="dimgray")
        y += row_height
    return canvas


def paginate(rows: list[Any], per_page: int = ROWS_PER_PAGE) -> list[list[Any]]:
    """``rows`` in pages of at most ``per_page``."""
    return [rows[start : start + per_page] for start in range(0, len(rows), per_page)] or [[]]
