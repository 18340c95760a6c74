"""One explanation API for every family, and the static HTML report built on it (checked by parsing it)."""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from explain.__main__ import main as explain_cli
from explain.families import explain_local, explain_prototypes, family_of, load
from explain.report import build_report
from protolib.lit.checkpoint import build_module, build_record
from protolib.utils.io import atomic_torch_save

DIGITS = {"_target_": "protolib.data.digits.DigitsDataModule", "image_size": 16, "batch_size": 64, "seed": 0}
PARTS = {
    "_target_": "protolib.data.parts.PartsDataModule",
    "num_classes": 3,
    "train_per_class": 6,
    "val_per_class": 2,
    "test_per_class": 3,
    "image_size": 16,
    "batch_size": 16,
    "seed": 0,
}
FLIP = {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip"}  # two views must differ
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], dict[str, float]]] = {
    "protopnet": (
        {
            "_target_": "protolib.lit.protopnet.ProtoPNetModule",
            "net": {
                "_target_": "protolib.models.protopnet.ProtoPNet",
                "backbone": "small_cnn",
                "prototypes_per_class": 2,
                "prototype_dim": 8,
                "activation_boxes": "after_push",
            },
        },
        PARTS,
        {"test/acc": 0.5},
    ),
    "palm": (
        {
            "_target_": "protolib.lit.palm.PALMModule",
            "net": {
                "_target_": "protolib.models.palm.PALMNet",
                "backbone": "small_cnn",
                "embedding_dim": 16,
                "prototypes_per_class": 2,
                "topk": None,
            },
        },
        {**DIGITS, "classes": [0, 1, 2]},
        {"test/acc": 0.9, "test/ood_auroc": 0.8, "test/ood_fpr95": 0.4},
    ),
    "gcd": (
        {
            "_target_": "protolib.lit.gcd.SimGCDModule",
            "net": {
                "_target_": "protolib.models.simgcd.SimGCDNet",
                "backbone": "small_cnn",
                "backbone_options": {"width": 8},
                "head_hidden_dim": 16,
                "head_bottleneck_dim": 8,
            },
        },
        {
            "_target_": "protolib.data.gcd.GCDDataModule",
            "known_classes": 5,
            "base": {**DIGITS, "num_views": 2, "batch_size": 128, "train_transforms": [FLIP]},
        },
        {"test/all_acc": 0.4, "test/old_acc": 0.5, "test/new_acc": 0.3, "test/k": 10.0},
    ),
    "routing": (
        {
            "_target_": "protolib.lit.moe.MoEClassifierModule",
            "net": {
                "_target_": "protolib.models.moe_vit.MoEViT",
                "backbone_options": {"patch_size": 4, "embed_dim": 16, "depth": 2, "num_heads": 2},
                "moe": {"_target_": "protolib.nn.moe.MoEMLP", "_partial_": True, "num_experts": 3},
            },
        },
        PARTS,
        {"test/acc": 0.6},
    ),
}


def write_checkpoint(run: Path, family: str) -> Path:
    """A train.py-style run folder (checkpoints/last.ckpt, metrics.json) of an untrained model of ``family``
    (pushed, for ProtoPNet): explanations must be complete whatever the weights."""
    model, data, metrics = CASES[family]
    datamodule = instantiate(data)
    datamodule.setup("fit")
    build = {"num_classes": datamodule.num_classes, "in_channels": datamodule.in_channels, "image_size": 16}
    torch.manual_seed(0)
    module = build_module(model, build).eval()
    if family == "protopnet":
        module.net.push(datamodule.push_dataloader(), warn=False)
    record = build_record(model, data, build, task_name=f"{family}_tiny")
    (run / "checkpoints").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    return atomic_torch_save(
        run / "checkpoints" / "last.ckpt", {"state_dict": module.state_dict(), "protolib": record}
    )


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], Path]:
    """``runs(family)``: the checkpoint of a run folder of that family, written once per module."""
    written: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in written:
            written[family] = write_checkpoint(tmp_path_factory.mktemp(family) / "run", family)
        return written[family]

    return get


@pytest.fixture(params=list(CASES))
def checkpoint(request: pytest.FixtureRequest, runs: Callable[[str], Path]) -> Path:
    return runs(request.param)


class Page(HTMLParser):
    """Collects the section ids, image sources and link targets of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: list[str] = []
        self.images: list[str] = []
        self.links: list[str] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        attributes = dict(attrs)
        if tag == "section":
            self.sections.append(str(attributes["id"]))
        elif tag == "img":
            self.images.append(str(attributes["src"]))
        elif tag in ("a", "link", "script"):
            self.links.append(str(attributes.get("href") or attributes.get("src")))

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def test_report_is_a_self_contained_site_with_every_section(checkpoint: Path) -> None:
    explained = load(checkpoint)
    index = build_report(explained, checkpoint.parent.parent / "report", 1, max_images=8, progress=False)
    assert index == checkpoint.parent.parent / "report" / "index.html"
    page = Page()
    page.feed(index.read_text(encoding="utf-8"))
    family = explained.family.name
    expected = ["model-card", "prototypes", "local", *(["examples-0"] if family == "palm" else []), "scores"]
    assert page.sections == expected
    assert page.images, "the report shows pictures"
    for source in page.images + [link for link in page.links if not link.startswith("#")]:
        assert not source.startswith(("/", "http:", "https:", "file:")), source  # relative: opens from disk
        target = index.parent / source
        assert target.is_file(), source
        assert Image.open(target).size[0] > 0
    text = " ".join(page.text)
    _, _, metrics = CASES[family]
    for name in metrics:  # the model card leads with the family's headline metrics
        assert name in text
    assert "Correctly classified" in text and "Misclassified" in text
    assert not list(index.parent.parent.glob(".report.*")), "the temporary build folder is gone"


def test_family_detection_and_the_one_vocabulary(checkpoint: Path, tmp_path: Path) -> None:
    explained = load(checkpoint)
    family = checkpoint.parent.parent.parent.name.rstrip("0123456789")
    assert explained.family.name == family
    pictures = explain_prototypes(explained, tmp_path / "prototypes")
    assert pictures and all(p.path.is_file() and p.caption for p in pictures)
    local = explain_local(explained, 1, tmp_path / "local.png")
    assert local.picture.is_file() and local.summary
    assert local.label == int(explained.datamodule.test_dataset[1]["label"])
    with pytest.raises(ValueError, match=r"index 100000 is out of range: the test split has \d+ images"):
        explain_local(explained, 100000, tmp_path / "x.png")
    with pytest.raises(ValueError, match=r"prototype 9999 does not exist: .* has \d+ prototypes"):
        explain_prototypes(explained, tmp_path / "p", ids=[9999])


def test_report_command_writes_under_the_run_folder_and_replaces_a_previous_report(
    runs: Callable[[str], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = runs("protopnet")
    run = checkpoint.parent.parent
    stale = run / "report" / "stale.txt"
    stale.parent.mkdir(exist_ok=True)
    stale.write_text("old")
    explain_cli(["report", "--checkpoint", str(checkpoint), "--examples", "1", "--max-images", "8"])
    assert (run / "report" / "index.html").is_file() and not stale.exists()
    assert "index.html" in capsys.readouterr().out


def test_unknown_family_names_the_network_and_the_supported_families() -> None:
    from protolib.lit.classifier import ClassifierModule
    from protolib.models.baseline import BaselineNet

    module = ClassifierModule(BaselineNet(num_classes=3, in_channels=1, backbone="small_cnn"))
    with pytest.raises(ValueError, match=r"BaselineNet network.*Supported families: gcd.*palm.*protopnet"):
        family_of(module)


def test_held_out_split_needs_held_out_classes(runs: Callable[[str], Path], tmp_path: Path) -> None:
    explained = load(runs("routing"))
    with pytest.raises(ValueError, match="split 'held_out' needs classes held out"):
        explain_local(explained, 0, tmp_path / "x.png", split="held_out")


def test_bank_nearest_samples_is_the_brute_force_reverse_search() -> None:
    from protolib.bank import PrototypeBank

    torch.manual_seed(0)
    bank = PrototypeBank(num_prototypes=4, dim=5, metric="cosine")
    embeddings = torch.randn(23, 5)
    batches = [
        (chunk, torch.zeros(len(chunk)), ids)
        for chunk, ids in zip(embeddings.split(7), torch.arange(23).split(7), strict=True)
    ]
    distances, ids = bank.nearest_samples(batches, k=3)
    cosine = (
        torch.nn.functional.normalize(embeddings, dim=1)
        @ torch.nn.functional.normalize(bank.vectors.detach(), dim=1).T
    )
    want = (1 - cosine).T.topk(3, dim=1, largest=False)  # (P, 3) nearest samples of each prototype
    assert torch.equal(ids, want.indices)
    torch.testing.assert_close(distances, want.values)
    _, few = bank.nearest_samples([(embeddings[:2], torch.zeros(2), torch.arange(2))], k=3)
    assert (few[:, 2] == -1).all()  # fewer samples than k: the rest is -1


VARIANTS = {  # experiment -> family: every network on main that explain covers, from its own config
    "tesnet_parts": "protopnet",
    "st_protopnet_parts": "protopnet",
    "deformable_protopnet_parts": "protopnet",
    "cbc_parts": "protopnet",
    "protopool_parts": "protopnet",
    "pipnet_parts": "protopnet",
    "prototree_parts": "prototree",
    "softmax_moe_vit_parts": "routing",
    "dense_vit_parts": "routing",
    "cbc_pipnet_digits": "protopnet",
    "gpc_digits": "gcd",
    "protogcd_digits": "gcd",
}


@pytest.mark.parametrize("experiment", list(VARIANTS))
def test_every_variant_has_prototypes_and_local_explanations(experiment: str, tmp_path: Path) -> None:
    from config_helpers import compose_config

    from explain.families import Explained, NotApplicable

    tiny = ["data.num_classes=3", "data.train_per_class=4", "data.val_per_class=1", "data.test_per_class=2"]
    if experiment.endswith("_digits"):  # digits are small already; GCD data sizes its base
        tiny = [] if "gcd" in experiment or "gpc" in experiment else ["data.image_size=16"]
    else:
        tiny += ["data.image_size=16"]
    cfg = compose_config(tmp_path, f"experiment={experiment}", *tiny)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    build = {
        "num_classes": datamodule.num_classes,
        "in_channels": datamodule.in_channels,
        "image_size": datamodule.image_size,
    }
    torch.manual_seed(0)
    module = build_module(cfg.model, build).eval()
    if hasattr(module.net, "push"):
        with warnings.catch_warnings():  # more prototypes than images: some pushes warn, rightly
            warnings.simplefilter("ignore", UserWarning)
            module.net.push(datamodule.push_dataloader())
    explained = Explained(module, datamodule, family_of(module, datamodule))
    assert explained.family.name == VARIANTS[experiment]
    if experiment == "dense_vit_parts":
        with pytest.raises(NotApplicable, match="dense ViT has no experts"):
            explain_prototypes(explained, tmp_path / "prototypes")
    else:
        pictures = explain_prototypes(explained, tmp_path / "prototypes")
        assert pictures and all(Image.open(p.path).size[0] > 0 for p in pictures)
    local = explain_local(explained, 0, tmp_path / "local.png")
    assert Image.open(local.picture).size[0] > 0 and local.summary


def unit(x: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.normalize(x.detach().double(), dim=-1).numpy()


def test_palm_decision_numbers_are_the_brute_force_ones(runs: Callable[[str], Path], tmp_path: Path) -> None:
    explained = load(runs("palm"))
    net = explained.net
    prototypes, owners = unit(net.bank.vectors), net.bank.owners.numpy()

    def scores(images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:  # cosines (N, P), PALM score (N,)
        with torch.no_grad():
            cosine = unit(net.extract(images)["embedding"]) @ prototypes.T
        per_class = [np.log(np.exp(cosine[:, owners == c] / net.temperature).mean(1)) for c in range(3)]
        return cosine, np.max(per_class, axis=0)

    val = torch.stack([item["image"] for item in explained.datamodule.val_dataset])
    threshold = np.quantile(scores(val)[1], 0.05)  # 95% of the ID validation images score above it
    for split, index in (("test", 4), ("held_out", 7)):
        explained.options["k"] = 3
        local = explain_local(explained, index, tmp_path / f"{split}.png", split)
        cosine, score = scores(explained.item(index, split)["image"][None])
        nearest = np.argsort(-cosine[0])[:3]
        assert [p for p, _ in local.evidence] == nearest.tolist()
        np.testing.assert_allclose([v for _, v in local.evidence], cosine[0, nearest], atol=1e-5)
        assert local.score == pytest.approx(float(score[0]), abs=1e-4)
        assert f"threshold {threshold:.3f}" in local.summary
        decision = "in-distribution" if local.score >= threshold else "OUT-OF-DISTRIBUTION"
        assert decision in local.summary


def test_gcd_cluster_choice_is_the_most_similar_prototype(
    runs: Callable[[str], Path], tmp_path: Path
) -> None:
    explained = load(runs("gcd"))
    net = explained.net
    local = explain_local(explained, 5, tmp_path / "why.png")
    with torch.no_grad():
        features = net.extract(explained.item(5)["image"][None])["features"]
    cosine = (unit(features) @ unit(net.bank.vectors).T)[0]  # (K,)
    nearest = np.argsort(-cosine)[:3]
    assert local.predicted == nearest[0] and [p for p, _ in local.evidence] == nearest.tolist()
    probability = np.exp(cosine / net.temperature) / np.exp(cosine / net.temperature).sum()
    for k in nearest:
        assert f"cluster {k} -> " in local.summary and f"probability {probability[k]:.3f}" in local.summary
    unlabelled = torch.stack([item["image"] for item in explained.datamodule.unlabelled_dataset])
    with torch.no_grad():
        clusters = (unit(net.extract(unlabelled)["features"]) @ unit(net.bank.vectors).T).argmax(1)
    pictures = explain_prototypes(explained, tmp_path / "clusters")
    assert pictures[0].path.name == "clusters-01.png"
    sizes = np.bincount(clusters, minlength=net.num_classes)
    from explain.clusters import cluster_assignment

    np.testing.assert_array_equal(cluster_assignment(explained)["sizes"], sizes)


def test_a_failed_build_leaves_the_previous_report_and_no_temporary_folder(
    runs: Callable[[str], Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    import dataclasses

    explained = load(runs("routing"))
    out = runs("routing").parent.parent / "kept"
    build_report(explained, out, 1, max_images=4, progress=False)
    before = (out / "index.html").read_text()

    def broken(*args: Any) -> None:
        raise RuntimeError("local explanation failed")

    explained.family = dataclasses.replace(explained.family, local=broken)
    with pytest.raises(RuntimeError, match="local explanation failed"):
        build_report(explained, out, 1, max_images=4, progress=False)
    assert (out / "index.html").read_text() == before
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".kept")) == []


def test_prototypes_command_renders_only_the_ids_asked_for(
    runs: Callable[[str], Path], tmp_path: Path
) -> None:
    explain_cli(
        ["prototypes", "--checkpoint", str(runs("protopnet")), "--out", str(tmp_path), "--ids", "1", "4"]
    )
    assert sorted(p.name for p in tmp_path.glob("prototype-*.png")) == [
        "prototype-0001.png",
        "prototype-0004.png",
    ]
    with pytest.raises(ValueError, match="prototype 6 does not exist: this ProtoPNet has 6 prototypes"):
        explain_cli(
            ["prototypes", "--checkpoint", str(runs("protopnet")), "--out", str(tmp_path), "--ids", "6"]
        )
