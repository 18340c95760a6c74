"""evaluate_ood end to end: digits report, feature cache, OpenOOD layout, MNIST-format sets, missing data."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from PIL import Image

import protolib.ood.features as features_module
from protolib.lit.checkpoint import build_module, build_record
from protolib.ood.cli import CONFIG_DIR, run
from protolib.ood.metrics import METRIC_NAMES, ood_metrics

DIGITS_DATA = {
    "_target_": "protolib.data.digits.DigitsDataModule",
    "image_size": 16,
    "classes": [0, 1, 2, 3, 4, 5],
    "batch_size": 64,
    "seed": 0,
}
MODEL = {
    "_target_": "protolib.lit.classifier.ClassifierModule",
    "net": {"_target_": "protolib.models.baseline.BaselineNet", "backbone": "small_cnn", "head": "linear"},
}
QUICK = ["batch_size=128"]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small CNN trained for a few epochs on digits 0-5, saved the way train.py saves checkpoints."""
    torch.manual_seed(0)
    datamodule = instantiate(DIGITS_DATA)
    datamodule.setup("fit")
    build = {"num_classes": 6, "in_channels": 1, "image_size": 16}
    module = build_module(MODEL, build)
    optimizer = torch.optim.Adam(module.parameters(), lr=3e-3)
    for _ in range(3):
        for batch in datamodule.train_dataloader():
            loss = torch.nn.functional.cross_entropy(module.extract(batch["image"])["logits"], batch["label"])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    path = tmp_path_factory.mktemp("ckpt") / "digits.ckpt"
    torch.save(
        {
            "state_dict": module.state_dict(),
            "protolib": build_record(MODEL, DIGITS_DATA, build),
        },
        path,
    )
    return path


def config(tmp_path: Path, checkpoint: Path, *overrides: str) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "evaluate_ood",
            overrides=[
                f"checkpoint={checkpoint}",
                f"output_dir={tmp_path / 'out'}",
                f"cache_dir={tmp_path / 'cache'}",
                *overrides,
            ],
        )


def test_digits_benchmark_writes_table_json_scores_and_plots(tmp_path: Path, checkpoint: Path) -> None:
    cfg = config(
        tmp_path,
        checkpoint,
        "benchmark=digits",
        "postprocessors=[msp,energy,odin,mahalanobis,knn,react,ash,vim]",
        *QUICK,
    )
    results = run(cfg)
    out = tmp_path / "out"

    report = json.loads((out / "ood_results.json").read_text())
    assert report["groups"] == {"near": ["held_out_digits"], "far": ["noise", "parts"]}
    assert "95% of ID" in report["fpr95_convention"] and "OpenOOD" in report["fpr95_ood_positive_convention"]
    assert report["id_accuracy"] > 0.8  # the fixture's model has learnt digits 0-5
    scores = np.load(out / "ood_scores.npz")
    rows = [row for row in report["rows"] if not row["summary"]]
    assert len(rows) == 8 * 3
    for row in rows:  # every reported number is the metric of the saved scores
        expected = ood_metrics(
            scores[f"{row['postprocessor']}/id"], scores[f"{row['postprocessor']}/{row['dataset']}"]
        )
        assert {name: row[name] for name in METRIC_NAMES} == pytest.approx(expected)
    far = [
        r
        for r in report["rows"]
        if r["summary"] and r["group"] == "far" and r["postprocessor"] == "mahalanobis"
    ]
    far_sets = [r for r in rows if r["group"] == "far" and r["postprocessor"] == "mahalanobis"]
    assert far[0]["auroc"] == pytest.approx(np.mean([r["auroc"] for r in far_sets]))  # OpenOOD's group mean
    assert far[0]["auroc"] > 0.9  # noise and parts are far from digits in feature space
    assert len(scores["msp/id"]) == rows[0]["num_id"] == 216  # the ID test split of digits 0-5

    markdown = (out / "ood_results.md").read_text()
    assert "% of OOD accepted when 95% of ID is accepted" in markdown
    assert "% of ID rejected when 95% of OOD is caught" in markdown
    assert "| knn | far | **farood** |" in markdown
    with open(out / "ood_results.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 8 * 5
    assert "fpr95_ood_positive [OpenOOD v1.5: % ID rejected at 95% OOD TPR]" in table[0]
    for name in ("held_out_digits", "noise", "parts"):
        for kind in ("hist", "roc"):
            assert (out / "plots" / f"{kind}_{name}.png").stat().st_size > 1000
    assert results.id_accuracy == pytest.approx(report["id_accuracy"])


def test_features_are_cached_per_checkpoint_and_dataset(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = config(tmp_path, checkpoint, "postprocessors=[msp,knn]", "max_samples=50", *QUICK)
    first = run(cfg)
    cached = {p.name.rsplit("-", 1)[0] for p in (tmp_path / "cache").iterdir()}
    assert cached == {"id_train", "id_test", "held_out_digits", "noise", "parts"}  # id_train: knn's fit

    def no_extraction(*args: object, **kwargs: object) -> None:
        raise AssertionError("features should come from the cache")

    monkeypatch.setattr(features_module, "extract_features", no_extraction)
    second = run(cfg)
    np.testing.assert_array_equal(first.scores["knn"]["noise"], second.scores["knn"]["noise"])
    smaller = config(tmp_path, checkpoint, "postprocessors=[msp,knn]", "max_samples=40", *QUICK)
    with pytest.raises(AssertionError, match="from the cache"):  # other data, other key
        run(smaller)
    checkpoint.touch()  # a changed checkpoint must not reuse the old features
    try:
        with pytest.raises(AssertionError, match="from the cache"):
            run(cfg)
    finally:
        monkeypatch.undo()


def test_missing_openood_sets_are_all_listed_before_any_work(tmp_path: Path, checkpoint: Path) -> None:
    cfg = config(tmp_path, checkpoint, "benchmark=cifar10", f"benchmark.root={tmp_path / 'openood'}")
    with pytest.raises(FileNotFoundError) as error:
        run(cfg)
    message = str(error.value)
    for expected in (
        "train_cifar10.txt",
        "val_cifar10.txt",
        "test_cifar10.txt",
        "test_cifar100.txt",
        "test_tin.txt",
        "test_mnist.txt",
        "test_svhn.txt",
        "test_texture.txt",
        "test_places365.txt",
    ):
        assert str(tmp_path / "openood" / "benchmark_imglist" / "cifar10" / expected) in message
    assert "9 dataset(s) missing" in message
    assert not (tmp_path / "cache").exists()  # nothing was extracted


def test_openood_mnist_protocol_lists_its_sets(tmp_path: Path, checkpoint: Path) -> None:
    cfg = config(tmp_path, checkpoint, "benchmark=mnist_openood", f"benchmark.root={tmp_path / 'openood'}")
    with pytest.raises(FileNotFoundError) as error:
        run(cfg)
    lists = tmp_path / "openood" / "benchmark_imglist" / "mnist"
    for split in ("train_mnist", "val_mnist", "test_mnist"):  # ID, then OpenOOD's near and far sets
        assert str(lists / f"{split}.txt") in str(error.value)
    for name in ("notmnist", "fashionmnist", "texture", "cifar10", "tin", "places365"):
        assert str(lists / f"test_{name}.txt") in str(error.value)
    assert "9 dataset(s) missing" in str(error.value)
    assert OmegaConf.to_container(cfg.benchmark.near).keys() == {"notmnist", "fashionmnist"}


def test_id_classes_that_differ_from_the_model_fail_clearly(tmp_path: Path, checkpoint: Path) -> None:
    cfg = config(tmp_path, checkpoint, "+benchmark.id.overrides.classes=[0,1,2,3]", "postprocessors=[msp]")
    with pytest.raises(
        ValueError, match="the model predicts 6 classes but the ID data of benchmark digits has 4"
    ):
        run(cfg)


def write_openood_layout(root: Path) -> None:
    """A miniature OpenOOD v1.5 data folder: RGB images of various sizes and the CIFAR-10 image lists."""
    rng = np.random.default_rng(0)
    lists = root / "benchmark_imglist" / "cifar10"
    lists.mkdir(parents=True)
    names = [
        "train_cifar10",
        "val_cifar10",
        "test_cifar10",
        "test_cifar100",
        "test_tin",
        "test_mnist",
        "test_svhn",
        "test_texture",
        "test_places365",
    ]
    for name in names:
        folder = root / "images_classic" / name
        folder.mkdir(parents=True)
        lines = []
        for i in range(12):
            size = int(rng.integers(20, 40))
            Image.fromarray(rng.integers(0, 255, (size, size + 3, 3), dtype=np.uint8)).save(
                folder / f"{i}.png"
            )
            label = i % 6 if "cifar10" in name and not name.endswith("cifar100") else -1
            lines.append(f"{name}/{i}.png {label}")
        (lists / f"{name}.txt").write_text("\n".join(lines) + "\n")


def test_openood_cifar10_protocol_from_image_lists(tmp_path: Path, checkpoint: Path) -> None:
    write_openood_layout(tmp_path / "openood")
    cfg = config(
        tmp_path,
        checkpoint,
        "benchmark=cifar10",
        f"benchmark.root={tmp_path / 'openood'}",
        "postprocessors=[msp,knn]",
        "postprocessors.knn.k=5",
    )
    results = run(cfg)
    assert results.groups == {"near": ["cifar100", "tin"], "far": ["mnist", "svhn", "texture", "places365"]}
    assert {row["num_ood"] for row in results.rows if not row["summary"]} == {12}
    assert len(results.scores["knn"]["id"]) == 12


def write_idx(path: Path, array: np.ndarray) -> None:
    """An unsigned-byte idx file (the MNIST format)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


def test_mnist_format_id_against_another_mnist_format_set(tmp_path: Path, checkpoint: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * 255 / 16).astype(np.uint8)  # (N, 8, 8)
    for folder, keep in (("id", digits.target < 6), ("other", digits.target >= 6)):
        (tmp_path / folder).mkdir()
        selected = images[keep]
        labels = (
            digits.target[keep] if folder == "id" else np.arange(len(selected)) % 10
        )  # every class present
        for prefix, part in (("train", slice(0, 200)), ("t10k", slice(200, 260))):
            write_idx(tmp_path / folder / f"{prefix}-images-idx3-ubyte", selected[part])
            write_idx(tmp_path / folder / f"{prefix}-labels-idx1-ubyte", labels[part])
    for kind in ("images-idx3", "labels-idx1"):  # a test-only OOD set needs only its test files
        (tmp_path / "other" / f"train-{kind}-ubyte").unlink()
    cfg = config(
        tmp_path,
        checkpoint,
        "benchmark=mnist",
        f"benchmark.root={tmp_path / 'other'}",
        "benchmark.id.datamodule={_target_:protolib.data.mnist.MNISTDataModule,"
        f"root:'{tmp_path / 'id'}',image_size:16,classes:[0,1,2,3,4,5]}}",
        "postprocessors=[energy]",
    )
    results = run(cfg)
    rows = {row["dataset"]: row for row in results.rows}
    assert rows["fashion_mnist"]["num_ood"] == 60 and rows["fashion_mnist"]["num_id"] == 60
    assert rows["noise"]["group"] == "far"


def test_chunk_size_reaches_postprocessor_fitting(
    tmp_path: Path, checkpoint: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``chunk_size`` bounds the rows a fit reads at once, as it bounds scoring (issue 18, point 7)."""
    import protolib.ood.postprocessors.base as base

    seen: list[int] = []
    source = base.FeatureSource

    def recording(data, model=None, chunk_size=4096):
        seen.append(chunk_size)
        return source(data, model, chunk_size)

    monkeypatch.setattr(base, "FeatureSource", recording)
    cfg = config(tmp_path, checkpoint, "postprocessors=[mahalanobis,knn]", "chunk_size=37", "cache_dir=null")
    run(cfg, overrides=["postprocessors=[mahalanobis,knn]"])
    assert seen and set(seen) == {37}
