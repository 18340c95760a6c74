"""``python evaluate_ood.py``: load a checkpoint, build the benchmark, run postprocessors, write a report."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from protolib.lit.checkpoint import load_module
from protolib.ood.benchmark import build_benchmark
from protolib.ood.evaluator import OODEvaluator, OODResults
from protolib.ood.features import FeatureCache
from protolib.ood.postprocessors import Postprocessor
from protolib.ood.report import markdown_table, write_report
from protolib.utils.threads import configure_threads

log = logging.getLogger(__name__)
# conf/ood is the primary config folder: its groups benchmark/ and postprocessors/ are selected as
# `benchmark=...` and `postprocessors=[...]`, and a user's hydra.searchpath adds to it without hiding them.
CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf" / "ood")
UNSUPPORTED_MODES = ("auto", "skip", "fail")


def user_cache_dir() -> str:
    """protolib's cache folder: $PROTOLIB_CACHE, else $XDG_CACHE_HOME/protolib, else ~/.cache/protolib."""
    if os.environ.get("PROTOLIB_CACHE"):
        return os.environ["PROTOLIB_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(base) / "protolib")


OmegaConf.register_new_resolver("protolib_cache_dir", user_cache_dir, replace=True)


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


def postprocessors_named(overrides: Sequence[str]) -> bool:
    """Whether the command-line ``overrides`` choose the postprocessor list (``postprocessors=[...]``)."""
    return any(o.lstrip("+~").split("=", 1)[0] == "postprocessors" for o in overrides)


def skip_unsupported(mode: str, overrides: Sequence[str] = ()) -> bool:
    """The ``unsupported`` setting as a decision: leave out (True) or fail on (False) what cannot run."""
    if mode not in UNSUPPORTED_MODES:
        raise ValueError(f"unsupported={mode!r}; choose one of {list(UNSUPPORTED_MODES)}")
    return mode == "skip" or (mode == "auto" and not postprocessors_named(overrides))


def available_postprocessors(search_dirs: Sequence[Path] = ()) -> list[str]:
    """Names of the postprocessor configs in conf/ood/postprocessors and ``<dir>/postprocessors`` folders."""
    folders = [Path(CONFIG_DIR) / "postprocessors", *(Path(d) / "postprocessors" for d in search_dirs)]
    return sorted({p.stem for folder in folders if folder.is_dir() for p in folder.glob("*.yaml")})


def check_postprocessor_names(args: Sequence[str]) -> None:
    """Fail with the valid names (and the nearest one) when ``postprocessors=[...]`` names an unknown one.

    Hydra reports a misspelt option of a list group without the options; this runs before it. Folders a
    ``hydra.searchpath`` override adds (``file://``) are looked in too; with a ``pkg://`` entry nothing is
    checked here (Hydra still fails on a name it cannot find).
    """
    try:
        overrides = OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")])
    except Exception:  # a malformed override: Hydra's own message explains it
        return
    search_dirs: list[Path] = []
    names: list[str] = []
    for override in overrides:
        key, value = override.get_key_element(), override.value()
        if key == "hydra.searchpath" and isinstance(value, list):
            if any(not str(entry).startswith("file://") for entry in value):
                return
            search_dirs += [Path(str(entry)[len("file://") :]) for entry in value]
        elif key.lstrip("+~") == "postprocessors":
            names += [str(v) for v in value] if isinstance(value, list) else [str(value)]
    valid = available_postprocessors(search_dirs)
    unknown = [name for name in names if name not in valid]
    if unknown:
        hints = [
            f"{name!r} (did you mean {close[0]!r}?)"
            if (close := difflib.get_close_matches(name, valid, 1))
            else repr(name)
            for name in unknown
        ]
        raise ValueError(
            f"unknown postprocessor {', '.join(hints)}; valid names: {', '.join(valid)} "
            "(conf/ood/postprocessors/)"
        )


def run(cfg: DictConfig, overrides: Sequence[str] = ()) -> OODResults:
    """Everything ``evaluate_ood.py`` does; returns the results after writing them to ``cfg.output_dir``.

    ``overrides`` are the command line's (they tell ``unsupported=auto`` whether the list was named).
    """
    if OmegaConf.is_missing(cfg, "checkpoint"):
        raise ValueError(
            "no checkpoint given: pass checkpoint=<run dir>/checkpoints/<name>.ckpt (written by train.py)"
        )
    checkpoint = Path(cfg.checkpoint).expanduser()
    device = resolve_device(str(cfg.device))
    configure_threads(cfg.get("threads"))
    skip = skip_unsupported(str(cfg.get("unsupported", "auto")), overrides)
    postprocessors = build_postprocessors(cfg.postprocessors)
    model = load_module(checkpoint, map_location="cpu")
    data_config = (getattr(model, "build_config", None) or {}).get("data")
    benchmark = build_benchmark(cfg.benchmark, data_config, cfg.get("max_samples"))  # fails before any work
    for note in benchmark.notes:
        print(f"note: {note}", flush=True)
    model.to(device)
    cache = FeatureCache(Path(cfg.cache_dir).expanduser(), checkpoint) if cfg.get("cache_dir") else None
    evaluator = OODEvaluator(
        model,
        benchmark,
        postprocessors,
        cache,
        int(cfg.batch_size),
        int(cfg.num_workers),
        int(cfg.chunk_size),
        skip_unsupported=skip,
    )
    left_out = evaluator.check()  # fails (or leaves out) before any extraction
    if left_out:
        lines = [f"  {name}: {why}" for name, why in left_out.items()]
        print(
            f"left out {len(left_out)} postprocessor(s) this {type(model).__name__} checkpoint does not "
            f"support (name them with postprocessors=[...] to make this an error):\n" + "\n".join(lines),
            flush=True,
        )
    results = evaluator.run()
    results.meta = {
        **results.meta,
        "checkpoint": str(checkpoint.resolve()),
        "postprocessors": {name: repr(p) for name, p in evaluator.postprocessors.items()},
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
def hydra_main(cfg: DictConfig) -> None:
    """The Hydra application: ``run`` with the command line's overrides."""
    run(cfg, list(HydraConfig.get().overrides.task))


def main() -> None:
    """Console entry point of ``evaluate_ood.py``: name checks Hydra does not make, then the application."""
    try:
        check_postprocessor_names(sys.argv[1:])
    except ValueError as err:
        sys.exit(f"evaluate_ood: {err}")
    hydra_main()
