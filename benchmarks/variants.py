"""ProtoPNet and its variants side by side: accuracy on digits and parts over seeds, training time, prototypes
kept, the explanation part score on parts, and the train-step time against ProtoPNet's.

    python -m benchmarks.variants                      # every variant, 3 seeds (from the repository root)
    python -m benchmarks.variants --variants tesnet --seeds 0 --datasets parts
    python -m benchmarks.variants --quick              # smoke size (its numbers mean nothing)
    python -m benchmarks.variants --variants tesnet --overrides model.net.distinct_push=true --runs /tmp/x

A variant ``<name>`` is measured through its shipped experiments ``<name>_digits`` and ``<name>_parts``
(train.py's ``run``, CPU, the best pushed checkpoint tested); each run keeps its folder (checkpoints, logs,
pictures) under ``--runs`` as ``<name>_<data>_s<seed>``. Add a variant by adding its name to VARIANTS.
The part score is ``explain.scores.prototype_part_score``: the mean fraction of each prototype's
high-activation box on its class's defining parts (image_mean: what boxes covering the whole image score).
The push-quality measures of ``explain.push_quality`` come from the same checkpoint, on both data sets:
``background_share`` (prototypes whose box holds < 10 % object pixels), ``duplicates`` (prototypes on a
patch another prototype of their class took) and ``distinct_sources_mean`` (source images per class).
The step time is one joint-phase training step (forward, loss, backward, Adam step) of the parts model
(small CNN, 3 x 32 x 32, batch 64) on random images. Prints a table and writes JSON atomically to
benchmarks/results/variants.json (variants_quick.json with --quick); the thread count is recorded.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from hydra import compose, initialize_config_dir

from benchmarks.protopnet import QUICK_SCHEDULE, images_per_second
from explain.prototypes import load_checkpoint
from explain.push_quality import datamodule_push_quality
from explain.scores import prototype_part_score
from protolib.cli.train import CONFIG_DIR, run
from protolib.lit.checkpoint import build_module
from protolib.utils.io import atomic_write_json

RESULTS = Path(__file__).resolve().parent / "results"
RUNS = Path(__file__).resolve().parent.parent / "outputs" / "variants"
QUALITY = ("background_share", "duplicates", "distinct_sources_mean", "zero_part_share")
# Variants measured, each with experiments <name>_digits and <name>_parts; ProtoPNet is the reference row.
VARIANTS = [
    "protopnet",
    "tesnet",
    "st_protopnet",
    "deformable_protopnet",
    "cbc",
    "prototree",
    "protopool",
    "pipnet",
]
# --quick overrides of variants whose schedule is not ProtoPNet's (the others use QUICK_SCHEDULE).
QUICK = {
    "prototree": ["model.schedule.epochs=1", "model.schedule.freeze_epochs=0", *QUICK_SCHEDULE[-3:]],
    "pipnet": [
        "model.schedule.pretrain_epochs=1",
        "model.schedule.epochs=2",
        "model.schedule.finetune_epochs=1",
        *QUICK_SCHEDULE[-3:],
    ],
}
DATASETS = ("digits", "parts")
STEP = {"in_chans": 3, "size": 32, "batch": 64}


def compose_experiment(name: str, overrides: list[str], output_dir: str | None = None) -> Any:
    """The composed train.py config of ``experiment=name`` (CPU, no progress bar)."""
    fixed = ["trainer.accelerator=cpu", "+trainer.enable_progress_bar=false"]
    if output_dir is not None:
        fixed.append(f"output_dir={output_dir}")
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=[f"experiment={name}", *fixed, *overrides])


def train_once(variant: str, dataset: str, seed: int, overrides: list[str], runs: Path) -> dict[str, Any]:
    """Train and test ``experiment=<variant>_<dataset>`` with ``seed`` in the folder
    ``runs/<variant>_<dataset>_s<seed>``: test accuracy, wall time, prototypes kept, the push-quality
    measures and on parts the part score of the best (pushed) checkpoint."""
    out = runs / f"{variant}_{dataset}_s{seed}"
    if out.exists():
        raise SystemExit(f"{out} exists: move it away or pass another --runs folder")
    cfg = compose_experiment(f"{variant}_{dataset}", [f"seed={seed}", *overrides], str(out))
    start = time.perf_counter()
    metrics = run(cfg)
    seconds = time.perf_counter() - start
    (checkpoint,) = Path(out, "checkpoints").glob("best-*.ckpt")
    module, datamodule = load_checkpoint(checkpoint)
    row = {
        "variant": variant,
        "dataset": dataset,
        "seed": seed,
        "test_acc": metrics["test/acc"],
        "seconds": seconds,
        "prototypes": prototypes_in_use(module.net),
        "run": str(out),
    }
    # ProtoTree: its deterministic routings beside the soft one
    row.update({k.removeprefix("test/"): v for k, v in metrics.items() if k.startswith("test/acc_")})
    quality = datamodule_push_quality(module.net, datamodule).summary()
    row.update({name: quality[name] for name in QUALITY if name in quality})
    if dataset == "parts":
        score = prototype_part_score(module.net, datamodule.push_dataloader().dataset, datamodule.class_parts)
        row.update(part_score=score.mean, part_image_mean=score.image_mean)
    print(row, flush=True)
    return row


def prototypes_in_use(net: Any) -> int:
    """Prototypes that reach a logit: the network's own count where it has one (PIP-Net: non-zero head
    columns, as its paper reports; ProtoPool: pool prototypes some slot chose), else the bank's size."""
    count = getattr(net, "prototypes_in_use", None)
    return int(count()) if count is not None else net.prototype_bank.num_prototypes


def step_seconds(variant: str, steps: int) -> float:
    """Seconds per joint-phase training step of the variant's parts model on random images."""
    torch.manual_seed(0)
    cfg = compose_experiment(f"{variant}_parts", [])
    build = {"num_classes": 10, "in_channels": STEP["in_chans"], "image_size": STEP["size"]}
    module = build_module(cfg.model, build)
    return STEP["batch"] / images_per_second(module, STEP["in_chans"], STEP["size"], STEP["batch"], steps)


def summarise(rows: list[dict[str, Any]], variant: str, dataset: str, key: str) -> tuple[float, float]:
    """Mean and standard deviation (0 for one seed) of ``key`` over the seeds of a variant / dataset."""
    values = [r[key] for r in rows if r["variant"] == variant and r["dataset"] == dataset and key in r]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--variants", nargs="+", default=VARIANTS, help=f"subset of {VARIANTS}")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--output", default=None, help="JSON file name under benchmarks/results/")
    parser.add_argument("--runs", type=Path, default=RUNS, help="where the run folders are kept")
    parser.add_argument("--quick", action="store_true", help="smoke size: a few batches, one seed")
    parser.add_argument("--overrides", nargs="*", default=[], help="train.py overrides for every run")
    parser.add_argument(
        "--step-steps", type=int, default=None, help="steps timed per variant (0: skip the step time)"
    )
    args = parser.parse_args()
    unknown = sorted(set(args.variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variants {unknown}: choose from {VARIANTS} (or add yours to VARIANTS)")
    seeds = args.seeds[:1] if args.quick else args.seeds
    report: dict[str, Any] = {
        "quick": args.quick,
        "torch": torch.__version__,
        "platform": platform.platform(),
        "threads": torch.get_num_threads(),
        "seeds": seeds,
        "overrides": args.overrides,
    }
    rows = [
        train_once(
            variant,
            dataset,
            seed,
            [*(QUICK.get(variant, QUICK_SCHEDULE) if args.quick else []), *args.overrides],
            args.runs,
        )
        for variant in args.variants
        for dataset in args.datasets
        for seed in seeds
    ]
    report["runs"] = rows
    steps = args.step_steps if args.step_steps is not None else 3 if args.quick else 20
    reference = step_seconds("protopnet", steps) if steps else float("nan")
    report["step"] = {**STEP, "protopnet_s": reference}
    table = []
    for variant in args.variants:
        seconds = reference if variant == "protopnet" or not steps else step_seconds(variant, steps)
        entry: dict[str, Any] = {"variant": variant, "step_s": seconds}
        entry["step_vs_protopnet"] = seconds / reference
        for dataset in DATASETS:
            accuracy = summarise(rows, variant, dataset, "test_acc")
            entry[f"{dataset}_acc"], entry[f"{dataset}_acc_std"] = accuracy
            entry[f"{dataset}_seconds"], _ = summarise(rows, variant, dataset, "seconds")
        entry["prototypes"] = max(r["prototypes"] for r in rows if r["variant"] == variant)
        entry["part_score"], entry["part_score_std"] = summarise(rows, variant, "parts", "part_score")
        entry["part_image_mean"], _ = summarise(rows, variant, "parts", "part_image_mean")
        for dataset in DATASETS:
            for name in QUALITY:
                entry[f"{dataset}_{name}"], _ = summarise(rows, variant, dataset, name)
        table.append(entry)
    report["table"] = table

    print(f"\n{len(seeds)} seed(s), {report['threads']} thread(s)")
    print(
        "variant        digits acc      parts acc       train s (d/p)   protos  part score (image)  "
        "step ms  vs ProtoPNet  background (d/p)  dups (d/p)"
    )
    for e in table:
        print(
            f"{e['variant']:<14} {e['digits_acc']:.3f} ± {e['digits_acc_std']:.3f}  "
            f"{e['parts_acc']:.3f} ± {e['parts_acc_std']:.3f}  "
            f"{e['digits_seconds']:>6.0f} / {e['parts_seconds']:<6.0f} {e['prototypes']:>6}  "
            f"{e['part_score']:.3f} ({e['part_image_mean']:.3f})       "
            f"{1000 * e['step_s']:>7.1f}  {e['step_vs_protopnet']:>6.2f}x      "
            f"{e['digits_background_share']:.2f} / {e['parts_background_share']:.2f}      "
            f"{e['digits_duplicates']:.1f} / {e['parts_duplicates']:.1f}"
        )
    path = RESULTS / (args.output or ("variants_quick.json" if args.quick else "variants.json"))
    atomic_write_json(path, report)
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
