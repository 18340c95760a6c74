"""``python evaluate_ood.py``: load a checkpoint, build the benchmark, run postprocessors, write a report."""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from protolib.lit.checkpoint import load_module
from protolib.ood.benchmark import build_benchmark
from protolib.ood.evaluator import OODEvaluator, OODResults
from protolib.ood.features import FeatureCache
from protolib.ood.postprocessors import Postprocessor
from protolib.ood.report import markdown_table, write_report

log = logging.getLogger(__name__)
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")
# conf/evaluate_ood.yaml adds conf/ood to Hydra's search path through this resolver, so that the groups
# conf/ood/benchmark and conf/ood/postprocessors are selected as `benchmark=...` and `postprocessors=[...]`.
OmegaConf.register_new_resolver("protolib_conf_dir", lambda: CONFIG_DIR, replace=True)


def resolve_device(name: str) -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else is checked against this machine."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} but CUDA is not available here; use device=auto or device=cpu")
    return device


def build_postprocessors(config: DictConfig) -> dict[str, Postprocessor]:
    """Instantiate every selected postprocessor config (name -> instance), in config order."""
    postprocessors = {}
    for name, spec in (config or {}).items():
        instance = instantiate(spec)
        if not isinstance(instance, Postprocessor):
            raise ValueError(f"postprocessors.{name} builds a {type(instance).__name__}, not a Postprocessor")
        postprocessors[str(name)] = instance
    if not postprocessors:
        raise ValueError("no postprocessors selected; pass e.g. postprocessors=[msp,energy,knn]")
    return postprocessors


def run(cfg: DictConfig) -> OODResults:
    """Everything ``evaluate_ood.py`` does; returns the results after writing them to ``cfg.output_dir``."""
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError(
            "no checkpoint given: pass checkpoint=<run dir>/checkpoints/<name>.ckpt (written by train.py)"
        )
    checkpoint = Path(cfg.checkpoint).expanduser()
    device = resolve_device(str(cfg.device))
    postprocessors = build_postprocessors(cfg.postprocessors)
    model = load_module(checkpoint, map_location="cpu")
    data_config = (getattr(model, "build_config", None) or {}).get("data")
    benchmark = build_benchmark(cfg.benchmark, data_config, cfg.get("max_samples"))  # fails before any work
    model.to(device)
    cache = FeatureCache(cfg.cache_dir, checkpoint) if cfg.get("cache_dir") else None
    evaluator = OODEvaluator(
        model,
        benchmark,
        postprocessors,
        cache,
        int(cfg.batch_size),
        int(cfg.num_workers),
        int(cfg.chunk_size),
    )
    results = evaluator.run()
    results.meta = {
        "checkpoint": str(checkpoint.resolve()),
        "postprocessors": {name: repr(p) for name, p in postprocessors.items()},
        "config": OmegaConf.to_container(cfg, resolve=True),
    }
    title = f"OOD detection on {benchmark.name}: {checkpoint.name}"
    written = write_report(results, cfg.output_dir, title)
    print(markdown_table(results, title))
    print(
        f"report: {written['markdown'].parent} (ood_results.md/.csv/.json, ood_scores.npz, plots/)",
        flush=True,
    )
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="evaluate_ood")
def main(cfg: DictConfig) -> None:
    """Console entry point of ``evaluate_ood.py``."""
    run(cfg)
