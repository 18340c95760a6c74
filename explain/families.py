"""One explanation API for every family: which family a checkpoint holds, and its two explanations.

The vocabulary is the same for all: ``prototypes`` (what each prototype is: the training patch it was pushed
onto, or the training images nearest it, found through the bank) and ``local`` (why this prediction: which
prototypes, where, how much). Each family implements both in its own module (:mod:`explain.local` and
:mod:`explain.prototypes` for ProtoPNet and its variants, :mod:`explain.tree`, :mod:`explain.ood` for PALM,
:mod:`explain.clusters` for category discovery, :mod:`explain.routing` for MoE ViTs); this module finds the
family from the network (or, for category discovery, the data it was trained on) and dispatches.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

SPLITS = (
    "test",
    "held_out",
)  # where an explained image comes from: the test split, or held-out classes (OOD)


class NotApplicable(ValueError):
    """An explanation that does not exist for this model (e.g. expert galleries of a dense ViT); the report
    shows the reason instead of the section."""


@dataclass(frozen=True)
class Picture:
    """One written picture and what it shows."""

    path: Path
    caption: str


@dataclass
class Local:
    """A written local explanation: the picture, its text, and the decision it explains."""

    picture: Path
    summary: str
    label: int  # the image's true label (for held-out images: past the in-distribution classes)
    predicted: int  # the predicted class (GCD: the cluster)
    # (prototype, value) shown, in order: ProtoPNet contributions, PALM / GCD similarities (cosine)
    evidence: list[tuple[int, float]] = field(default_factory=list)
    score: float | None = None  # the OOD score of the decision (PALM), higher = more in-distribution


@dataclass(frozen=True)
class Family:
    """A family's explanations.

    ``prototypes(explained, out_dir, ids)`` writes what every prototype (or the ``ids`` ones) is and returns
    the pictures; ``local(explained, item, out_path)`` explains one dataset item (dict with "image",
    "label"). ``examples`` names extra report sections of local explanations: (title, split, count).
    """

    name: str
    models: str  # the models it covers, in words
    matches: Callable[[torch.nn.Module, Any], bool]
    prototypes: Callable[..., list[Picture]]
    local: Callable[..., Local]
    prototypes_title: str = "Prototypes"
    examples: tuple[tuple[str, str, int], ...] = ()
    to_classes: Callable[..., Any] | None = None  # (explained, predictions) -> classes (GCD: matched)
    headline: tuple[str, ...] = ("test/acc",)  # the metrics.json entries the model card leads with


@dataclass
class Explained:
    """A checkpoint's module, its (set-up) training data and its family: what every explanation reads."""

    module: L.LightningModule
    datamodule: Any
    family: Family
    checkpoint: Path | None = None
    options: dict[str, Any] = field(default_factory=dict)  # display options: k, target, classes_per_page
    cache: dict[str, Any] = field(default_factory=dict)  # results shared by several explanations

    @property
    def net(self) -> torch.nn.Module:
        """The network (the extract contract)."""
        return self.module.net

    @property
    def class_names(self) -> list[str]:
        """Class names of the data, in label order."""
        names = getattr(self.datamodule, "class_names", None)
        return list(names) if names is not None else [str(c) for c in range(self.net.num_classes)]

    def dataset(self, split: str = "test") -> Dataset:
        """The images explained: ``test`` (the test split) or ``held_out`` (test images of classes left out
        of training, the OOD data of PALM's runs)."""
        if split not in SPLITS:
            raise ValueError(f"split {split!r} is unknown: use one of {SPLITS}")
        if split == "test":
            return self.datamodule.test_dataset
        if not getattr(self.datamodule, "held_out_class_names", None):
            raise ValueError(
                "split 'held_out' needs classes held out of training (data.classes a subset, as in "
                "experiment=palm_digits); this checkpoint's data keeps every class: use split 'test'"
            )
        return self.cache.setdefault("held_out", self.datamodule.held_out_dataset("test"))

    def item(self, index: int, split: str = "test") -> dict[str, Any]:
        """Item ``index`` of ``split`` (see :meth:`dataset`), or an error naming the valid range."""
        dataset = self.dataset(split)
        if not 0 <= index < len(dataset):
            raise ValueError(
                f"index {index} is out of range: the {split} split has {len(dataset)} images "
                f"(indices 0..{len(dataset) - 1})"
            )
        return dataset[index]

    def check_prototype_ids(self, ids: Sequence[int] | None) -> list[int] | None:
        """``ids`` as a list if every one names a prototype of the network, else an error with the range."""
        if ids is None:
            return None
        bank = getattr(self.net, "prototype_bank", None)
        count = 0 if bank is None else bank.num_prototypes
        wrong = [int(i) for i in ids if not 0 <= int(i) < count]
        if wrong:
            raise ValueError(
                f"prototype {wrong[0]} does not exist: this {type(self.net).__name__} has {count} prototypes "
                f"(ids 0..{count - 1}); pass ids in that range"
            )
        return [int(i) for i in ids]


def _is_gcd(net: torch.nn.Module, datamodule: Any) -> bool:
    return hasattr(datamodule, "num_known_classes") and getattr(net, "prototype_bank", None) is not None


def _is_palm(net: torch.nn.Module, datamodule: Any) -> bool:
    from protolib.models.palm import PALMNet

    return isinstance(net, PALMNet)


def _is_prototree(net: torch.nn.Module, datamodule: Any) -> bool:
    from protolib.models.prototree import ProtoTree

    return isinstance(net, ProtoTree)


def _is_moe(net: torch.nn.Module, datamodule: Any) -> bool:
    from protolib.models.moe_vit import MoEViT

    return isinstance(net, MoEViT)


def _is_patch_prototypes(net: torch.nn.Module, datamodule: Any) -> bool:
    from explain.prototypes import PATCH_PROTOTYPE_API

    return all(hasattr(net, name) for name in (*PATCH_PROTOTYPE_API, "contributions"))


def _families() -> list[Family]:
    """The families, in the order they are tried (category discovery first: it is told by its data)."""
    from explain import clusters, local, ood, prototypes, routing, tree

    return [
        Family(
            "gcd",
            "category discovery (SimGCD, GPC, ProtoGCD: GCD recipes whose clusters are bank prototypes)",
            _is_gcd,
            clusters.cluster_prototypes,
            clusters.explain_cluster_choice,
            prototypes_title="Discovered clusters",
            to_classes=clusters.to_classes,
            headline=("test/all_acc", "test/old_acc", "test/new_acc", "test/k", "test/estimated_k"),
        ),
        Family(
            "palm",
            "PALM (mixture of prototypes, OOD detection)",
            _is_palm,
            ood.palm_prototypes,
            ood.explain_ood_decision,
            examples=(("Out-of-distribution examples (held-out classes)", "held_out", 3),),
            headline=("test/acc", "test/ood_auroc", "test/ood_fpr95"),
        ),
        Family("prototree", "ProtoTree", _is_prototree, tree.tree_prototypes, tree.tree_local),
        Family(
            "routing",
            "MoE ViTs (prototype or softmax routers; the dense ViT)",
            _is_moe,
            routing.routing_prototypes,
            routing.routing_local,
            prototypes_title="Experts and routing",
        ),
        Family(
            "protopnet",
            "ProtoPNet and its variants (TesNet, ST-ProtoPNet, Deformable ProtoPNet, CBC/RBF, ProtoPool, "
            "PIP-Net)",
            _is_patch_prototypes,
            prototypes.patch_prototypes,
            local.patch_local,
        ),
    ]


def supported() -> str:
    """The families ``explain`` knows, in words."""
    return "; ".join(f"{family.name}: {family.models}" for family in _families())


def family_of(module: L.LightningModule, datamodule: Any = None) -> Family:
    """The family of ``module`` (its ``net``, and the data for category discovery), or an error naming the
    network and listing the families that are supported."""
    net = getattr(module, "net", None)
    for family in _families():
        if net is not None and family.matches(net, datamodule):
            return family
    recipe, network = type(module).__name__, type(net).__name__
    raise ValueError(
        f"explain does not know the family of a {recipe} with a {network} network: it has no prototypes "
        f"explain can show. Supported families: {supported()}. Train one of those (conf/experiment/)."
    )


def load(checkpoint: str | Path) -> Explained:
    """A train.py checkpoint's module, its training data (set up) and its family."""
    from hydra.utils import instantiate

    from protolib.lit.checkpoint import load_module

    module = load_module(checkpoint)
    datamodule = instantiate(module.build_config["data"])
    datamodule.setup("fit")
    return Explained(module, datamodule, family_of(module, datamodule), Path(checkpoint))


def explain_prototypes(
    explained: Explained, out_dir: str | Path, ids: Sequence[int] | None = None
) -> list[Picture]:
    """What the prototypes (all, or ``ids``) are, in the family's own pictures, written into ``out_dir``."""
    ids = explained.check_prototype_ids(ids)
    return explained.family.prototypes(explained, Path(out_dir), ids)


def explain_local(explained: Explained, index: int, out: str | Path, split: str = "test") -> Local:
    """Why the model decided as it did on image ``index`` of ``split``; the picture is written to ``out``."""
    item = explained.item(index, split)
    return explained.family.local(explained, item, Path(out))


def predictions(explained: Explained, split: str = "test", progress: bool = True) -> tuple[Any, Any]:
    """(predicted, labels) numpy arrays over ``split``, one pass of ``extract`` (cached)."""
    key = f"predictions/{split}"
    if key not in explained.cache:
        from tqdm.auto import tqdm

        from protolib.utils.modes import evaluating

        dataset = explained.dataset(split)
        loader = torch.utils.data.DataLoader(dataset, batch_size=64)
        device = next(explained.net.parameters()).device
        preds, labels = [], []
        with evaluating(explained.net), torch.no_grad():
            for batch in tqdm(
                loader, desc=f"predicting the {split} split", disable=not progress, leave=False
            ):
                preds.append(explained.net.extract(batch["image"].to(device))["logits"].argmax(1).cpu())
                labels.append(batch["label"])
        explained.cache[key] = (torch.cat(preds).numpy(), torch.cat(labels).numpy())
    return explained.cache[key]
