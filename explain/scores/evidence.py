"""What the scores read from a network, through the extract contract, the same way for every family.

A prototype network's forward output carries ``similarity_maps`` (B, P, h, w) (ProtoPNet and its variants,
CBC, ProtoPool, PIP-Net, ProtoTree). A decision's prototype *relevance* (B, P) is each prototype's share of
the predicted class's logit: ``net.contributions`` (similarity x weight) where the head is linear in the
similarities, and for ProtoTree the similarities of the nodes on the image's greedy path (the prototypes its
decision used), 0 elsewhere. The saliency maps that deletion / insertion and the pointing game score come
from here too, so every score explains the same decision the same way.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter
from torch import nn
from tqdm.auto import tqdm

from explain.attribution import logit_attributions
from protolib.models.protopnet import upsample_maps
from protolib.nn.heads import CBCHead
from protolib.utils.modes import evaluating

SALIENCIES = ("prototype", "integrated_gradients")  # the explanations deletion / pointing score


def device_of(net: nn.Module) -> torch.device:
    """The device of the network's parameters."""
    return next(net.parameters()).device


def spatial_unavailable(net: nn.Module) -> str | None:
    """None when ``net`` has prototype similarity maps, else the reason (for ``ScoreSpec.unavailable``)."""
    if getattr(net, "prototype_bank", None) is None or not hasattr(net, "paired_similarity_maps"):
        return f"{type(net).__name__} has no spatial prototype similarity maps (a ProtoPNet-style family)"
    return None


def is_tree(net: nn.Module) -> bool:
    """ProtoTree-style networks: a decision is a path of prototype nodes, not a weighted sum."""
    return hasattr(getattr(net, "tree", None), "greedy_leaves")


def similarity_maps(net: nn.Module, images: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Similarity maps (B, P, h, w) of every prototype on ``images`` and the network's extract dict."""
    output = net(images)
    maps = getattr(output, "similarity_maps", None)
    if maps is None:
        raise ValueError(f"{type(net).__name__}'s forward output has no similarity_maps")
    return maps, net.extract(images)


def class_probabilities(net: nn.Module, logits: torch.Tensor) -> torch.Tensor:
    """(B, C) class probabilities from the contract's ``logits``: their softmax, except for the CBC head,
    whose outputs are already class probabilities (its margin loss reads them so)."""
    if isinstance(getattr(net, "last_layer", None), CBCHead):
        return logits
    return logits.softmax(dim=1)


def prototype_weights(net: nn.Module) -> torch.Tensor | None:
    """(P, C) weight of every prototype to every class where the head is linear in the similarities
    (``contributions`` of unit similarities), None for a tree."""
    if is_tree(net) or not hasattr(net, "contributions"):
        return None
    p = net.prototype_bank.num_prototypes
    with torch.no_grad():
        return net.contributions(torch.ones(1, p, device=device_of(net)))[0]


def prototype_classes(net: nn.Module) -> torch.Tensor:
    """(P,) the class each prototype speaks for, -1 for none: the class of its largest positive weight
    (ProtoPNet: its owner; shared prototypes of PIP-Net, CBC, ProtoPool: their strongest class), and for a
    tree the class of the training image its node prototype was pushed onto."""
    weights = prototype_weights(net)
    if weights is None:
        owners = net.provenance()["owner"]
        return torch.where(owners >= 0, owners, -1).cpu()
    best, cls = weights.max(dim=1)
    return torch.where(best > 0, cls, -1).cpu()


def relevance(net: nn.Module, extract: dict[str, torch.Tensor], classes: torch.Tensor) -> torch.Tensor:
    """(B, P) each prototype's evidence for class ``classes`` (B,) of each image: similarity x weight, or for
    a tree the similarity of the nodes on the greedy path (0 off the path)."""
    similarities = extract["prototype_similarity"]  # (B, P)
    if not is_tree(net):
        contributions = net.contributions(similarities)  # (B, P, C)
        return contributions[torch.arange(len(classes)), :, classes]
    tree = net.tree
    leaves = tree.greedy_leaves(similarities)  # (B,)
    steps = tree.leaf_paths[leaves]  # (B, T) factor-table index: prototype + K * direction, 2K = padding
    k = similarities.shape[1]
    on_path = torch.zeros_like(similarities, dtype=torch.bool)
    rows = torch.arange(len(leaves), device=steps.device)[:, None].expand_as(steps)
    real = steps < 2 * k
    on_path[rows[real], steps[real] % k] = True
    return torch.where(on_path, similarities, torch.zeros_like(similarities))


def saliency_maps(
    net: nn.Module, images: torch.Tensor, kind: str, classes: torch.Tensor | None = None, ig_steps: int = 32
) -> tuple[torch.Tensor, torch.Tensor]:
    """Saliency maps (B, H, W) at image resolution explaining class ``classes`` (B,) (default: the predicted
    ones) of ``images`` (B, C, H, W), and those classes.

    ``prototype``: the bicubically upsampled similarity map of the prototype most relevant to the class
    (ProtoPNet's "this looks like that": its top prototype); ``integrated_gradients``: integrated gradients
    of the class logit from a zero baseline (the mean image in normalised space), summed over channels.
    """
    if kind not in SALIENCIES:
        raise ValueError(f"unknown saliency {kind!r}; choose one of {list(SALIENCIES)}")
    with evaluating(net), torch.no_grad():
        maps, extract = similarity_maps(net, images)
        predicted = extract["logits"].argmax(dim=1) if classes is None else classes.to(images.device)
        if kind == "prototype":
            top = relevance(net, extract, predicted).argmax(dim=1)  # (B,)
            chosen = maps[torch.arange(len(top)), top]  # (B, h, w)
            return upsample_maps(chosen, tuple(images.shape[-2:])), predicted
    with evaluating(net):
        attributions = logit_attributions(net, images, predicted, steps=ig_steps)  # (B, C, H, W)
    return attributions.sum(dim=1), predicted


def test_batches(
    datamodule: L.LightningDataModule, max_images: int, progress: bool, desc: str
) -> Iterator[dict[str, Any]]:
    """Batches of the first ``max_images`` test images (the eval transform), with a progress bar."""
    loader = datamodule.test_dataloader()
    total = min(max_images, len(loader.dataset))
    seen = 0
    with tqdm(total=total, desc=desc, unit="img", disable=not progress) as bar:
        for batch in loader:
            if seen >= total:
                break
            take = min(total - seen, len(batch["label"]))
            yield {k: v[:take] if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            seen += take
            bar.update(take)


def blur_kernel(size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion kernel (size, size): scipy's ``gaussian_filter`` (std ``sigma``, reflecting edges) of
    a delta at the centre of a ``size`` x ``size`` array, as the reference's ``gkern``."""
    delta = np.zeros((size, size))
    delta[size // 2, size // 2] = 1.0
    return torch.from_numpy(gaussian_filter(delta, sigma)).float()


def blur(images: torch.Tensor, size: int = 11, sigma: float = 5.0) -> torch.Tensor:
    """RISE's insertion substrate: every channel of ``images`` (B, C, H, W) convolved with
    :func:`blur_kernel`, zero padding (the reference's ``conv2d(x, kern, padding=klen // 2)``)."""
    kernel = blur_kernel(size, sigma).to(images)
    kernel = kernel.expand(images.shape[1], 1, size, size)
    return F.conv2d(images, kernel, padding=size // 2, groups=images.shape[1])


def first_test_item(datamodule: L.LightningDataModule) -> dict[str, Any]:
    """The first test item (the datamodule is set up if it was not): what the data offers the scores."""
    datamodule.setup("test")
    return datamodule.test_dataloader().dataset[0]


def data_unavailable(datamodule: L.LightningDataModule, keys: tuple[str, ...]) -> str | None:
    """None when test items carry one of ``keys`` ("part_mask", "part_locs"), else the reason."""
    item = first_test_item(datamodule)
    if any(key in item for key in keys):
        return None
    return f"the test items of {type(datamodule).__name__} have no {' or '.join(keys)}"


def require(batch: dict[str, Any], keys: tuple[str, ...], score: str) -> None:
    """A clear error when a batch lacks all of ``keys`` (part masks / part locations) that ``score`` needs."""
    if not any(key in batch for key in keys):
        raise ValueError(
            f"{score} needs test items with {' or '.join(repr(k) for k in keys)}, which this data does not "
            "give: use the parts data (data=parts: part masks) or CUB with part_locs=true (part locations)"
        )
