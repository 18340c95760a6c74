"""ProtoPNet ("This looks like that", Chen et al., NeurIPS 2019): backbone -> add-on -> prototypes -> linear.

The model also carries the two operations that change its prototypes outside gradient descent: ``push``
(project every prototype onto its nearest training patch of its own class, through the bank's batched
reverse search, recording where each came from) and ``prune`` (drop prototypes whose nearest training
patches mostly belong to other classes). Schedules that call them live in ``protolib.lit.callbacks``.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, SequentialSampler

from protolib.bank import PrototypeBank
from protolib.bank.distributed import RankShardSampler, all_gather, all_reduce_sum_, world_size
from protolib.nn.backbones import build_backbone
from protolib.nn.prototype_layer import PrototypeActivations, PrototypeLayer
from protolib.nn.receptive_field import ReceptiveField, receptive_field
from protolib.nn.similarity import L2Similarity, Similarity, prototype_blocks
from protolib.utils.modes import evaluating


@dataclass
class ProtoPNetOutput:
    """Everything one forward pass computes; explanations and OOD scores read these, never recompute them."""

    logits: torch.Tensor  # (B, C)
    embeddings: torch.Tensor  # (B, D, H, W) add-on output, the space prototypes live in
    activations: PrototypeActivations  # distances (B, P, H, W), min_distances (B, P), similarities on demand

    @property
    def similarities(self) -> torch.Tensor:
        """(B, P) max-pooled similarity of every prototype: the last layer's input."""
        return self.activations.similarities

    @property
    def similarity_maps(self) -> torch.Tensor:
        """(B, P, H, W) similarity of every patch to every prototype."""
        return self.activations.similarity_maps

    @property
    def min_distances(self) -> torch.Tensor:
        """(B, P) distance of each prototype's nearest patch."""
        return self.activations.min_distances


@dataclass
class PushReport:
    """Outcome of one push: how far prototypes moved to their patches, and whether a class collapsed."""

    distances: torch.Tensor  # (P,) prototype -> chosen patch distance before projection
    duplicates: torch.Tensor  # (C,) prototypes per class pushed onto a patch another prototype already took
    images_per_class: torch.Tensor  # (C,) images of each class in the push data
    seconds: float


def upsample_maps(maps: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Similarity maps (N, h, w) -> (N, H, W) at image resolution, bicubic as in the reference code."""
    return F.interpolate(maps[:, None].float(), size=size, mode="bicubic", align_corners=False)[:, 0]


ACTIVATION_BOXES = ("before_push", "after_push")  # which prototype a push draws its high-activation box from


def high_activation_masks(maps: torch.Tensor, percentile: float = 95.0) -> torch.Tensor:
    """(N, H, W) bool: the pixels of each upsampled map (N, H, W) at or above its ``percentile``-th
    percentile, the paper's "high-activation region" of a prototype (never empty: the maximum passes)."""
    if not 0.0 <= percentile <= 100.0:
        raise ValueError(f"high-activation percentile must be in [0, 100], got {percentile}")
    threshold = torch.quantile(maps.flatten(1), percentile / 100.0, dim=1)  # (N,) linear, like numpy
    return maps >= threshold[:, None, None]


def high_activation_boxes(maps: torch.Tensor, percentile: float = 95.0) -> torch.Tensor:
    """Bounding boxes (N, 4) ``x0, y0, x1, y1`` (exclusive ends) of each map's high-activation region
    (:func:`high_activation_masks`)."""
    mask = high_activation_masks(maps, percentile)  # (N, H, W)
    x0, x1 = _span(mask.any(dim=1))  # columns hit (N, W)
    y0, y1 = _span(mask.any(dim=2))  # rows hit (N, H)
    return torch.stack([x0, y0, x1, y1], dim=1).long()


def _span(hit: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """First and one-past-last True position of every row of ``hit`` (N, L)."""
    positions = torch.arange(hit.shape[1], device=hit.device)
    low = torch.where(hit, positions, hit.shape[1]).min(dim=1).values
    high = torch.where(hit, positions, -1).max(dim=1).values + 1
    return low, high


def _k_smallest(values: torch.Tensor, payload: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` smallest of each row of ``values`` (P, M) and their ``payload`` (P, M), ties to the earlier
    column."""
    values, order = values.sort(dim=1, stable=True)
    return values[:, :k], payload.gather(1, order[:, :k])


def fetch_images(dataset: Dataset, indices: Iterable[int]) -> torch.Tensor:
    """Images (N, C, H, W) of the samples whose "index" is each of ``indices`` (position = index)."""
    images = []
    for index in indices:
        item = dataset[int(index)]
        if int(item["index"]) != int(index):
            raise ValueError(
                f"push dataset item at position {index} has index {item['index']}: its 'index' must be its "
                "position in the training set; use datamodule.push_dataloader()"
            )
        images.append(item["image"])
    return torch.stack(images)


def check_push_loader(loader: DataLoader, probes: int = 4) -> None:
    """Reject a push loader that shuffles or augments: provenance must point at reproducible patches. In
    order means sequential, or this rank's ordered share under DDP (`RankShardSampler`)."""
    if not isinstance(loader, DataLoader):
        raise ValueError(f"push needs a DataLoader (push_dataloader()), got {type(loader).__name__}")
    if not isinstance(loader.sampler, (SequentialSampler, RankShardSampler)):
        raise ValueError(
            f"push dataloader samples with {type(loader.sampler).__name__}: it must not shuffle (prototype "
            "provenance refers to dataset positions); use datamodule.push_dataloader() (under DDP it gives "
            "each rank its ordered share)"
        )
    dataset = loader.dataset
    for position in range(min(probes, len(dataset))):
        first, second = dataset[position]["image"], dataset[position]["image"]
        if first.shape != second.shape or not torch.equal(first, second):
            raise ValueError(
                f"push dataloader returned different images for sample {position} on two reads: it augments. "
                "Push must see the evaluation transform; use datamodule.push_dataloader()"
            )


ADD_ON_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "identity": nn.Identity,
}


def build_add_on(in_channels: int, dim: int, activations: Sequence[str]) -> nn.Sequential:
    """ProtoPNet's add-on: 1x1 conv, first activation, 1x1 conv, second activation, to ``dim`` channels
    (Kaiming-normal weights, zero biases, as the reference code)."""
    if len(activations) != 2 or any(name not in ADD_ON_ACTIVATIONS for name in activations):
        raise ValueError(
            f"add_on_activations must be two of {sorted(ADD_ON_ACTIVATIONS)}, got {list(activations)}"
        )
    first, second = (ADD_ON_ACTIVATIONS[name]() for name in activations)
    add_on = nn.Sequential(
        nn.Conv2d(in_channels, dim, kernel_size=1), first, nn.Conv2d(dim, dim, kernel_size=1), second
    )
    for conv in add_on.modules():
        if isinstance(conv, nn.Conv2d):
            nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
            nn.init.zeros_(conv.bias)
    return add_on


class ParallelAddOn(nn.Module):
    """Several add-ons on the same backbone features, concatenated along channels (B, S x D, H, W): one
    embedding space per prototype set (ST-ProtoPNet's trivial and support branches)."""

    def __init__(self, branches: Sequence[nn.Module]) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return torch.cat([branch(features) for branch in self.branches], dim=1)


class ProtoPNet(nn.Module):
    """Backbone, add-on layers (1x1 conv, ReLU, 1x1 conv, sigmoid) to D channels, P = K x C prototypes of
    shape D x 1 x 1 in a :class:`PrototypeBank` (owners = classes), max-pooled similarity, linear last layer.

    The variants that keep this skeleton are configurations of it (``conf/model``): TesNet swaps the
    similarity (projection onto unit prototypes, ``unit_prototypes``); ST-ProtoPNet adds a second prototype
    set (``prototype_sets``) with its own add-on branch, whose similarities feed the same last layer (two
    heads summed are one linear layer over both sets).

    Args:
        num_classes: C.
        in_channels, image_size: input images; the receptive field of feature locations depends on both.
        backbone, pretrained: ``build_backbone`` name and whether to load its (timm) weights.
        prototypes_per_class: K per set (paper: 10).
        prototype_dim: D, the add-on output channels per set (paper: 128).
        similarity: distance -> similarity (default: squared L2 with ``log((d + 1) / (d + 1e-4))``); its
            ``metric`` is the bank's, so push searches with the distance the model scores with.
        incorrect_class_connection: initial last-layer weight to other classes (paper: -0.5; own class +1).
        bank: builds the prototype bank (a ``PrototypeBank`` partial from ``conf/bank`` picks the FAISS
            index); it is called with ``metric=similarity.metric, learnable=True``.
        add_on_activations: the add-on's two activations (ProtoPNet: relu, sigmoid).
        unit_prototypes: keep every prototype at unit L2 norm: after every optimiser step
            (:meth:`constrain_prototypes_`) and every push (TesNet, ST-ProtoPNet).
        prototype_sets: names of S prototype sets (default one, unnamed); each has K prototypes per class,
            its own add-on branch and its own block of D channels of the embedding (S x D channels in all),
            prototypes zero outside their block; the similarity must split into S blocks.
        activation_boxes: which prototype's similarity map a push draws the high-activation box from, on
            the source image: "before_push" (the prototype as trained, before it is replaced by the patch:
            the reference code's push.py) or "after_push" (the pushed prototype, i.e. the patch itself).
            The receptive-field box is the same either way.
        backbone_options: extra ``build_backbone`` arguments (``small_cnn``: ``width``, ``padding_mode``,
            ``blocks_per_stage``).
        distinct_push: push gives no two prototypes of a class the same patch (not in the paper, whose push
            lets them collapse onto one; the later ones take their nearest free patch).
    """

    def __init__(
        self,
        num_classes: int,
        in_channels: int = 3,
        image_size: int = 224,
        backbone: str = "resnet34",
        pretrained: bool = False,
        prototypes_per_class: int = 10,
        prototype_dim: int = 128,
        similarity: Similarity | None = None,
        incorrect_class_connection: float = -0.5,
        bank: Callable[..., PrototypeBank] = PrototypeBank,
        add_on_activations: Sequence[str] = ("relu", "sigmoid"),
        unit_prototypes: bool = False,
        prototype_sets: Sequence[str] | None = None,
        activation_boxes: str = "before_push",
        backbone_options: Mapping[str, Any] | None = None,
        distinct_push: bool = False,
    ) -> None:
        super().__init__()
        if activation_boxes not in ACTIVATION_BOXES:
            raise ValueError(f"activation_boxes={activation_boxes!r}; choose one of {list(ACTIVATION_BOXES)}")
        self.activation_boxes = activation_boxes
        if prototypes_per_class < 1 or prototype_dim < 1:
            raise ValueError(
                f"prototypes_per_class and prototype_dim must be >= 1, got {prototypes_per_class} and "
                f"{prototype_dim}"
            )
        similarity = similarity or L2Similarity()
        self.set_names = list(prototype_sets or ["prototypes"])
        sets = len(self.set_names)
        if getattr(similarity, "blocks", 1) != sets:
            raise ValueError(
                f"{sets} prototype sets {self.set_names} need a similarity over {sets} channel blocks, got "
                f"{similarity}; use protolib.nn.similarity.ProjectionSimilarity with blocks: {sets}"
            )
        self.num_classes = num_classes
        self.prototype_dim = prototype_dim * sets
        self.image_size = image_size
        self.unit_prototypes = unit_prototypes
        self.distinct_push = distinct_push
        self.backbone = build_backbone(
            backbone, pretrained=pretrained, in_chans=in_channels, **dict(backbone_options or {})
        )
        self.receptive_field: ReceptiveField = receptive_field(self.backbone, image_size, in_channels)
        branches = [build_add_on(self.backbone.out_channels, prototype_dim, add_on_activations)]
        branches += [
            build_add_on(self.backbone.out_channels, prototype_dim, add_on_activations)
            for _ in range(sets - 1)
        ]
        self.add_on = branches[0] if sets == 1 else ParallelAddOn(branches)
        owners = torch.arange(num_classes).repeat_interleave(prototypes_per_class).repeat(sets)  # (P,)
        prototypes = bank(
            num_prototypes=len(owners),
            dim=self.prototype_dim,
            owners=owners,
            metric=similarity.metric,
            learnable=True,
        )
        with torch.no_grad():
            prototypes.vectors.uniform_(0.0, 1.0)  # the reference's torch.rand: inside the sigmoid's range
            block = torch.arange(len(owners)) // (len(owners) // sets)  # (P,) set s = prototypes s*C*K...
            outside = torch.arange(sets)[None, :] != block[:, None]  # (P, S)
            prototypes.vectors.view(len(owners), sets, prototype_dim)[outside] = 0.0
        self.prototype_layer = PrototypeLayer(prototypes, similarity)
        self.last_layer = nn.Linear(len(owners), num_classes, bias=False)
        self.set_class_connections(incorrect_class_connection)
        # High-activation box of each prototype on its source image (x0, y0, x1, y1); -1 before any push.
        self.register_buffer("activation_box", torch.full((len(owners), 4), -1, dtype=torch.long))
        # Bumped by every push and prune, so that pictures can be re-rendered when the prototypes change.
        self.register_buffer("revision", torch.zeros((), dtype=torch.long))
        self.register_load_state_dict_pre_hook(self._resize_for_state)
        self.constrain_prototypes_()

    # ------------------------------------------------------------------ structure
    @property
    def bank(self) -> PrototypeBank:
        return self.prototype_layer.bank

    def prototype_set_ids(self) -> torch.Tensor:
        """(P,) the set of every prototype: the channel block it is non-zero in (always 0 for one set)."""
        return prototype_blocks(self.bank.vectors, len(self.set_names))

    def prototype_sets(self) -> dict[str, torch.Tensor]:
        """Prototype ids (into the bank and the last layer's columns) of every named set."""
        ids = self.prototype_set_ids()
        return {name: (ids == s).nonzero().flatten() for s, name in enumerate(self.set_names)}

    @torch.no_grad()
    def constrain_prototypes_(self, set_ids: torch.Tensor | None = None) -> None:
        """Zero every prototype outside its set's channel block and, with ``unit_prototypes``, rescale it to
        unit norm (the reference TesNet / ST-ProtoPNet renormalise after every optimiser step); called by
        the training recipe after each step and by push (which passes the sets ``set_ids`` (P,) read before
        it copied whole patches into the bank). A no-op for ProtoPNet."""
        sets = len(self.set_names)
        if sets == 1 and not self.unit_prototypes:
            return
        vectors = self.bank.vectors
        if sets > 1:
            blocks = vectors.view(len(vectors), sets, -1)  # (P, S, D)
            set_ids = self.prototype_set_ids() if set_ids is None else set_ids
            outside = torch.arange(sets, device=vectors.device)[None, :] != set_ids[:, None]
            blocks[outside] = 0.0
        if self.unit_prototypes:
            self.bank.normalize_()

    @property
    def prototype_bank(self) -> PrototypeBank:
        """The bank, under the name the explanation / OOD contract reads."""
        return self.prototype_layer.bank

    def parameter_groups(self) -> dict[str, list[nn.Parameter]]:
        """The named parts the training schedule trains, freezes and sets learning rates for."""
        return {
            "backbone": list(self.backbone.parameters()),
            "add_on": list(self.add_on.parameters()),
            "prototypes": [self.bank.vectors],
            "last_layer": list(self.last_layer.parameters()),
        }

    @property
    def owners(self) -> torch.Tensor:
        """(P,) class of every prototype: prototype identity comes from here, never from the order."""
        return self.bank.owners

    @property
    def max_distance(self) -> float:
        """D: the largest squared distance between a sigmoid feature and a prototype in [0, 1]^D."""
        return float(self.prototype_dim)

    def class_identity(self) -> torch.Tensor:
        """(P, C) one-hot prototype -> class."""
        return F.one_hot(self.owners, self.num_classes).to(self.last_layer.weight.dtype)

    @torch.no_grad()
    def set_class_connections(self, incorrect: float = -0.5) -> None:
        """Last layer: +1 from each prototype to its own class, ``incorrect`` to every other class."""
        own = self.class_identity().T  # (C, P)
        self.last_layer.weight.copy_(own + incorrect * (1 - own))

    def _resize_for_state(
        self, module: nn.Module, state_dict: dict[str, Any], prefix: str, *args: Any
    ) -> None:
        """Checkpoints written after pruning hold fewer prototypes: resize the per-prototype tensors to match
        before loading (the bank resizes itself)."""
        weight = state_dict.get(prefix + "last_layer.weight")
        if weight is not None and weight.shape != self.last_layer.weight.shape:
            self.last_layer.weight.data = torch.empty_like(weight, device=self.last_layer.weight.device)
            self.last_layer.in_features = weight.shape[1]
        boxes = state_dict.get(prefix + "activation_box")
        if boxes is not None and boxes.shape != self.activation_box.shape:
            self.activation_box = torch.empty_like(boxes, device=self.activation_box.device)

    # ------------------------------------------------------------------ forward
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> prototype-space feature map (B, D, h, w)."""
        return self.add_on(self.backbone(images))

    def forward(self, images: torch.Tensor) -> ProtoPNetOutput:
        embeddings = self.embed(images)  # (B, D, h, w)
        activations = self.prototype_layer(embeddings)
        logits = self.last_layer(activations.similarities)  # (B, C)
        return ProtoPNetOutput(logits, embeddings, activations)

    def extract(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """The contract ``explain`` and the OOD suite read: ``logits`` (B, C), ``features`` =
        ``prototype_similarity`` (B, P) (the last layer's input: ``last_layer(features) == logits``) and
        ``min_distances`` (B, P) for the losses (the similarity's cost distances: TesNet's cosine)."""
        return self.contract(self(images))

    @staticmethod
    def contract(output: ProtoPNetOutput) -> dict[str, torch.Tensor]:
        """The :meth:`extract` dictionary of a forward ``output`` (variants add their own entries to it)."""
        similarities = output.similarities  # (B, P)
        return {
            "logits": output.logits,
            "features": similarities,
            "prototype_similarity": similarities,
            "min_distances": output.activations.cost_min_distances,
        }

    def contributions(self, similarities: torch.Tensor) -> torch.Tensor:
        """Per-prototype contribution to every class logit (B, P, C); summed over P it gives the logits."""
        return similarities[:, :, None] * self.last_layer.weight.T[None]

    def provenance(self) -> dict[str, torch.Tensor]:
        """Where every prototype comes from: owner (P,), source_sample (P,) training-set index, location
        (P, 2) (row, col) in the feature map, rf_box and activation_box (P, 4) x0, y0, x1, y1 in pixels,
        score (P,) distance at push time, step (P,) global step of the push; -1 / NaN before any push."""
        metadata = self.bank.metadata
        return {"owner": self.owners, **metadata, "activation_box": self.activation_box}

    # ------------------------------------------------------------------ push
    def _embed_batches(self, loader: DataLoader, counts: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        """(embeddings, labels, indices) of every push batch; counts images per class into ``counts``."""
        device = self.last_layer.weight.device
        for batch in loader:
            labels = batch["label"]
            counts += torch.bincount(labels, minlength=self.num_classes)[: self.num_classes].cpu()
            patches = self.prototype_layer.push_patches(self.embed(batch["image"].to(device)))
            yield patches, labels.to(device), batch["index"].to(device)

    def paired_similarity_maps(
        self, images: torch.Tensor, ids: torch.Tensor, vectors: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Similarity map (N, h, w) of prototype ``ids[i]`` on ``images[i]`` (N, C, H, W); keep N small
        (distances of all N x N pairs are computed, through the model's own similarity function).
        ``vectors`` (P, D) replace the bank's current prototype vectors (e.g. those before a push)."""
        distances = self.prototype_layer.distance_maps(self.embed(images), ids, vectors)  # (N, N, h, w)
        own = torch.arange(len(ids), device=distances.device)
        return self.prototype_layer.similarity.similarity(distances[own, own])  # (N, h, w)

    @torch.no_grad()
    def push(
        self, loader: DataLoader, step: int | None = None, percentile: float = 95.0, warn: bool = True
    ) -> PushReport:
        """Replace every prototype by its nearest training patch among images of its own class.

        One batched, class-restricted reverse search through the bank streams the ``loader`` (eval
        transform, no shuffling: checked); provenance (source sample, location, receptive-field box,
        high-activation box above the ``percentile``-th percentile of the upsampled similarity map) is
        recorded. Warns when a class has fewer images than prototypes and when prototypes of a class
        collapse onto the same patch.
        """
        check_push_loader(loader)
        with evaluating(self):
            start = time.perf_counter()
            counts = torch.zeros(self.num_classes, dtype=torch.long)
            batches = self._embed_batches(loader, counts)
            queries = self.prototype_layer.push_queries()  # the prototypes as push compares them
            result = self.bank.nearest_per_prototype(
                batches, restrict_to_owner=True, distinct=self.distinct_push, queries=queries
            )
            counts = all_reduce_sum_(counts.to(queries.device)).cpu()  # every rank's share, under DDP
            per_class = torch.bincount(self.owners.cpu(), minlength=self.num_classes)
            short = ((counts < per_class) & (per_class > 0)).nonzero().flatten().tolist()
            if warn and short:
                warnings.warn(
                    f"push: classes {short[:20]} have fewer images ({counts[short][:20].tolist()}) than "
                    f"prototypes ({per_class[short][:20].tolist()}): their prototypes must share images; add "
                    "images or use fewer prototypes_per_class",
                    stacklevel=3,
                )
            rf_boxes = self.receptive_field.boxes(result.locations.cpu())
            set_ids = self.prototype_set_ids()  # before the patches (non-zero in every block) replace them
            trained = self.bank.vectors.detach().clone()  # (P, D) before the push
            self.bank.project(result, rf_boxes=rf_boxes, step=step)
            self.constrain_prototypes_(set_ids)
            box_vectors = trained if self.activation_boxes == "before_push" else None
            self.activation_box.copy_(self._activation_boxes(loader.dataset, percentile, box_vectors))
            self.revision += 1
        duplicates = self.duplicate_counts()
        if warn and duplicates.any():
            collapsed = {c: int(n) for c, n in enumerate(duplicates.tolist()) if n}
            warnings.warn(
                f"push: prototype collapse, {int(duplicates.sum())} prototypes sit on a patch another "
                f"prototype of their class already took (class: duplicates {collapsed}); consider a larger "
                "separation weight or fewer prototypes per class",
                stacklevel=3,
            )
        return PushReport(result.distances.cpu(), duplicates, counts, time.perf_counter() - start)

    def _activation_boxes(
        self, dataset: Dataset, percentile: float, vectors: torch.Tensor | None = None, chunk: int = 64
    ) -> torch.Tensor:
        """(P, 4) high-activation box of every prototype (``vectors``, default the bank's) on its (just
        recorded) source image."""
        device = self.last_layer.weight.device
        sources = self.bank.source_sample.cpu()
        boxes = []
        for ids in torch.arange(len(sources)).split(chunk):
            images = fetch_images(dataset, sources[ids].tolist()).to(device)
            maps = upsample_maps(self.paired_similarity_maps(images, ids, vectors), tuple(images.shape[-2:]))
            boxes.append(high_activation_boxes(maps, percentile).to(self.activation_box.device))
        return torch.cat(boxes)

    def duplicate_counts(self) -> torch.Tensor:
        """(C,) per class, the number of prototypes whose source patch (image, location) repeats another's."""
        location = self.bank.location
        sample, sets = self.bank.source_sample, self.prototype_set_ids()  # sets: different spaces
        keys = torch.stack([self.owners, sample, location[:, 0], location[:, 1], sets], dim=1)
        unique_keys = torch.unique(keys, dim=0)  # (U, 5)
        per_class = torch.bincount(self.owners, minlength=self.num_classes)
        distinct = torch.bincount(unique_keys[:, 0], minlength=self.num_classes)
        return (per_class - distinct).cpu()

    # ------------------------------------------------------------------ prune
    @torch.no_grad()
    def nearest_image_labels(self, loader: DataLoader, k: int) -> torch.Tensor:
        """(P, k) labels of the ``k`` training images whose nearest patch is closest to each prototype
        (nearest first, ties to the earlier image, under DDP to the lower rank). Under DDP every rank streams
        its share and the ranks' k best are gathered, so all ranks return the same labels."""
        check_push_loader(loader)
        with evaluating(self):
            device = self.last_layer.weight.device
            p = self.bank.num_prototypes
            best = torch.full((p, k), float("inf"), device=device)  # (P, k) distances, ascending
            labels = torch.full((p, k), -1, dtype=torch.long, device=device)
            for batch in loader:
                distances = self(batch["image"].to(device)).min_distances.T  # (P, B)
                best, labels = _k_smallest(
                    torch.cat([best, distances], dim=1),
                    torch.cat([labels, batch["label"].to(device).expand(p, -1)], dim=1),
                    k,
                )
            if world_size() > 1:  # (W, P, k) -> (P, W k), lower ranks first
                gathered = [all_gather(t).permute(1, 0, 2).reshape(p, -1) for t in (best, labels)]
                best, labels = _k_smallest(*gathered, k)
        seen = int(torch.isfinite(best[0]).sum()) if p else k
        if seen < k:
            raise ValueError(f"pruning with k={k} needs at least {k} push images, got {seen}")
        return labels

    @torch.no_grad()
    def prune(self, loader: DataLoader, k: int = 6, threshold: int = 3) -> torch.Tensor:
        """Remove prototypes with fewer than ``threshold`` of their ``k`` nearest training images (by nearest
        patch) in their own class (the paper's pruning); returns the removed prototypes' former ids."""
        if not 1 <= threshold <= k:
            raise ValueError(f"prune threshold must be in [1, k={k}], got {threshold}")
        labels = self.nearest_image_labels(loader, k)  # (P, k)
        own = (labels == self.owners[:, None]).sum(dim=1)  # (P,)
        removed = (own < threshold).nonzero().flatten()
        if len(removed) == self.bank.num_prototypes:
            raise ValueError(
                f"pruning (k={k}, threshold={threshold}) would remove every prototype; train longer or lower "
                "the threshold"
            )
        if len(removed) == 0:
            return removed
        emptied = sorted(set(self.owners.tolist()) - set(self.owners[own >= threshold].tolist()))
        if emptied:
            warnings.warn(f"pruning removes every prototype of classes {emptied[:20]}", stacklevel=3)
        kept = self.bank.remove(removed, allow_empty_owners=True)  # (P',) former ids of the survivors
        self.last_layer.weight.data = self.last_layer.weight.data[:, kept].contiguous()
        self.last_layer.in_features = len(kept)
        self.activation_box = self.activation_box[kept]
        self.revision += 1
        return removed
