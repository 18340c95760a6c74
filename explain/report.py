"""The HTML report of a checkpoint: one self-contained static site (``index.html`` + its pictures, relative
paths, inline CSS, no script, no network) that opens from disk in any browser.

Sections: the model card (family, network, data, experiment, the run's test metrics), the prototypes in the
family's own pictures, local explanations of correctly and wrongly classified test images (and the family's
own examples: OOD images for PALM), and the interpretability scores of :func:`explain.scores.score_model`.
The site is built in a temporary folder beside the target and renamed into place, so a reader never sees a
half-written report and an interrupted build leaves the previous one intact.
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from explain.families import Explained, Local, NotApplicable, Picture, explain_prototypes, load, predictions
from explain.routing import default_out_dir

MAX_PROTOTYPE_PICTURES = 60  # per-prototype pictures shown in the page (all are written beside it)
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 70em; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.5em 0; }
td, th { border: 1px solid #ccc; padding: 0.25em 0.6em; }
th { background: #f3f3f3; text-align: left; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { display: inline-block; margin: 0.5em; vertical-align: top; max-width: 100%; }
figure img { max-width: 100%; image-rendering: pixelated; border: 1px solid #ddd; }
figcaption { font-size: 0.85em; color: #555; max-width: 40em; }
pre { background: #f7f7f7; padding: 0.6em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; } .note { color: #666; font-style: italic; }
"""


def run_folder(checkpoint: str | Path) -> Path:
    """The run folder of ``<run>/checkpoints/<file>.ckpt`` (else the checkpoint's folder)."""
    return default_out_dir(checkpoint, "report").parent


def read_metrics(checkpoint: str | Path | None) -> tuple[dict[str, float], str]:
    """The run's ``metrics.json`` (what train.py's test wrote) and where it was looked for."""
    if checkpoint is None:
        return {}, "no checkpoint path"
    path = run_folder(checkpoint) / "metrics.json"
    if not path.is_file():
        return {}, str(path)
    return {key: float(value) for key, value in json.loads(path.read_text()).items()}, str(path)


def _e(text: Any) -> str:
    return html.escape(str(text))


def _number(value: float) -> str:
    return f"{value:.4g}" if isinstance(value, float) else _e(value)


def figure(picture: Picture, root: Path) -> str:
    """An ``<figure>`` of a picture written under ``root``, by its relative path."""
    src = picture.path.relative_to(root).as_posix()
    return (
        f'<figure><a href="{_e(src)}"><img src="{_e(src)}" alt="{_e(picture.caption)}" loading="lazy"></a>'
        f"<figcaption>{_e(picture.caption)}</figcaption></figure>"
    )


def table(rows: list[tuple[str, Any]], header: tuple[str, str] = ("", "")) -> str:
    """A two-column HTML table."""
    head = f"<tr><th>{_e(header[0])}</th><th>{_e(header[1])}</th></tr>" if any(header) else ""
    body = "".join(f'<tr><th>{_e(k)}</th><td class="num">{_number(v)}</td></tr>' for k, v in rows)
    return f"<table>{head}{body}</table>"


def model_card(explained: Explained) -> str:
    """Family, network, recipe, experiment, data and the run's test metrics (headline ones first)."""
    record = getattr(explained.module, "build_config", {}) or {}
    data = dict(record.get("data") or {})
    data_target = str(data.pop("_target_", type(explained.datamodule).__name__)).rsplit(".", 1)[-1]
    base = data.pop("base", None)
    if isinstance(base, dict):  # GCD: the images come from a base datamodule
        data_target += f" over {str(base.get('_target_', '?')).rsplit('.', 1)[-1]}"
        data.update({f"base.{k}": v for k, v in base.items() if k in ("classes", "image_size")})
    details = {k: v for k, v in data.items() if k in ("classes", "image_size", "known_classes", "root")}
    names = explained.class_names
    facts = [
        ("family", f"{explained.family.name}: {explained.family.models}"),
        ("network", type(explained.net).__name__),
        ("training recipe", type(explained.module).__name__),
        ("experiment", record.get("task_name") or "(not recorded)"),
        ("data", f"{data_target} {details}" if details else data_target),
        ("classes", f"{len(names)}: {', '.join(names[:12])}{' ...' if len(names) > 12 else ''}"),
        ("checkpoint", str(explained.checkpoint) if explained.checkpoint else "(in memory)"),
    ]
    bank = getattr(explained.net, "prototype_bank", None)
    if bank is not None:
        facts.append(("prototypes", f"{bank.num_prototypes} ({bank.metric} bank, {bank.dim}-d)"))
    parts = [table(facts)]
    metrics, where = read_metrics(explained.checkpoint)
    if not metrics:
        parts.append(
            f'<p class="note">No test metrics: {_e(where)} does not exist (the run did not test).</p>'
        )
        return "".join(parts)
    headline = [(k, metrics[k]) for k in explained.family.headline if k in metrics]
    parts.append("<h3>Test metrics</h3>" + table(headline or sorted(metrics.items()), ("metric", "value")))
    parts.append(
        f"<details><summary>all {len(metrics)} metrics of {_e(where)}</summary>"
        f"{table(sorted(metrics.items()), ('metric', 'value'))}</details>"
    )
    return "".join(parts)


def pick_examples(explained: Explained, count: int) -> tuple[list[int], list[int]]:
    """Up to ``count`` correctly and ``count`` wrongly classified test indices (spread over the split)."""
    preds, labels = predictions(explained, "test")
    if explained.family.to_classes is not None:
        preds = explained.family.to_classes(explained, preds)
    right, wrong = np.flatnonzero(preds == labels), np.flatnonzero(preds != labels)

    def spread(ids: np.ndarray) -> list[int]:
        if len(ids) <= count:
            return ids.tolist()
        return ids[np.linspace(0, len(ids) - 1, count).round().astype(int)].tolist()

    return spread(right), spread(wrong)


def local_block(explained: Explained, index: int, split: str, root: Path) -> str:
    """One local explanation written under ``root/local`` and shown with its summary."""
    item = explained.item(index, split)
    local: Local = explained.family.local(explained, item, root / "local" / f"{split}-{index}.png")
    names = explained.class_names + list(getattr(explained.datamodule, "held_out_class_names", []))
    true = names[local.label] if 0 <= local.label < len(names) else str(local.label)
    if explained.family.to_classes is None:
        decision = f"predicted {names[local.predicted]}"
    else:  # category discovery: the prediction is a cluster, matched to a class
        matched = int(explained.family.to_classes(explained, np.array([local.predicted]))[0])
        decision = (
            f"joined cluster {local.predicted} (matched to {names[matched] if matched >= 0 else 'none'})"
        )
    caption = f"{split} image {index}: true class {true}, {decision}"
    return f"<div>{figure(Picture(local.picture, caption), root)}<pre>{_e(local.summary)}</pre></div>"


def scores_section(explained: Explained, max_images: int, progress: bool) -> str:
    """The scores table of :func:`explain.scores.score_model`, and the scores that do not apply, with why."""
    from explain.scores import SCORES, score_model

    results = score_model(explained.net, explained.datamodule, max_images=max_images, progress=progress)
    skipped = []
    for name, spec in sorted(SCORES.items()):
        reason = spec.unavailable(explained.net, explained.datamodule)
        if reason is not None:
            skipped.append(f"<li><b>{_e(name)}</b>: {_e(reason)}</li>")
    parts = []
    for name in sorted({key.split("/", 1)[0] for key in results}):
        spec = SCORES.get(name)
        measures = [
            (key.split("/", 1)[1], value)
            for key, value in sorted(results.items())
            if key.startswith(f"{name}/")
        ]
        direction = {True: "higher is better", False: "lower is better", None: "descriptive"}
        about = "" if spec is None else f"{spec.description} ({direction[spec.higher_is_better]})"
        parts.append(f"<h3>{_e(name)}</h3><p>{_e(about)}</p>{table(measures, ('measure', 'value'))}")
    if results:
        parts.append(f'<p class="note">each computed on at most {max_images} images.</p>')
    else:
        parts.append('<p class="note">No interpretability score applies to this model and data.</p>')
    if skipped:
        parts.append(f"<p>Scores that do not apply here:</p><ul>{''.join(skipped)}</ul>")
    return "".join(parts)


def build_report(
    explained: Explained, out_dir: str | Path, examples: int = 3, max_images: int = 200, progress: bool = True
) -> Path:
    """Write the report site of ``explained`` into ``out_dir`` (replacing a previous one atomically); returns
    the path of its ``index.html``."""
    out_dir = Path(out_dir).resolve()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    family = explained.family
    steps = ["model card", "prototypes", "local explanations", *(t for t, _, _ in family.examples), "scores"]
    sections: list[tuple[str, str, str]] = []  # (id, title, html)
    try:
        with tqdm(total=len(steps), desc="report", unit="section", disable=not progress) as bar:
            bar.set_postfix_str("model card")
            sections.append(("model-card", "Model card", model_card(explained)))
            bar.update()
            bar.set_postfix_str("prototypes")
            try:
                pictures = explain_prototypes(explained, root / "prototypes")
                shown, rest = _limit(pictures)
                body = "".join(figure(p, root) for p in shown) + rest
            except NotApplicable as reason:
                body = f'<p class="note">{_e(reason)}</p>'
            sections.append(("prototypes", family.prototypes_title, body))
            bar.update()
            bar.set_postfix_str("local explanations")
            right, wrong = pick_examples(explained, examples)
            body = "<h3>Correctly classified</h3>" + _blocks(explained, right, "test", root)
            body += "<h3>Misclassified</h3>" + (
                _blocks(explained, wrong, "test", root) or '<p class="note">every test image is right.</p>'
            )
            sections.append(("local", "Local explanations: why this prediction", body))
            bar.update()
            for number, (title, split, count) in enumerate(family.examples):
                bar.set_postfix_str(title)
                size = len(explained.dataset(split))
                ids = np.linspace(0, size - 1, min(count, size)).round().astype(int).tolist() if size else []
                sections.append((f"examples-{number}", title, _blocks(explained, ids, split, root)))
                bar.update()
            bar.set_postfix_str("scores")
            sections.append(
                ("scores", "Interpretability scores", scores_section(explained, max_images, progress))
            )
            bar.update()
        (root / "index.html").write_text(page(explained, sections), encoding="utf-8")
        _replace(root, out_dir)
    except BaseException:
        shutil.rmtree(root, ignore_errors=True)
        raise
    return out_dir / "index.html"


def _blocks(explained: Explained, ids: list[int], split: str, root: Path) -> str:
    return "".join(local_block(explained, i, split, root) for i in ids)


def _limit(pictures: list[Picture]) -> tuple[list[Picture], str]:
    """The pictures the page shows (all galleries, the first per-prototype ones) and a note on the rest."""
    per_prototype = [p for p in pictures if p.path.name.startswith("prototype-")]
    if len(per_prototype) <= MAX_PROTOTYPE_PICTURES:
        return pictures, ""
    hidden = set(per_prototype[MAX_PROTOTYPE_PICTURES:])
    note = (
        f'<p class="note">{len(hidden)} more prototype pictures are in the prototypes/ folder beside this '
        "page.</p>"
    )
    return [p for p in pictures if p not in hidden], note


def page(explained: Explained, sections: list[tuple[str, str, str]]) -> str:
    """The whole ``index.html``."""
    title = f"{explained.family.name} report: {type(explained.net).__name__}"
    experiment = (getattr(explained.module, "build_config", {}) or {}).get("task_name")
    if experiment:
        title += f" ({experiment})"
    nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
    body = "".join(
        f'<section id="{sid}"><h2>{_e(name)}</h2>{content}</section>' for sid, name, content in sections
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{_e(title)}</title>'
        f"<style>{CSS}</style></head><body><h1>{_e(title)}</h1><nav>{nav}</nav>{body}</body></html>\n"
    )


def _replace(built: Path, target: Path) -> None:
    """Move the built site to ``target``: the old one aside, the new one in (renames), the old one removed."""
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old-{built.name}")
        target.rename(old)
    built.rename(target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def report_checkpoint(
    checkpoint: str | Path,
    out_dir: str | Path | None = None,
    examples: int = 3,
    max_images: int = 200,
    progress: bool = True,
) -> Path:
    """The report of a train.py checkpoint (default folder: ``<run>/report``); returns its ``index.html``."""
    explained = load(checkpoint)
    return build_report(
        explained, out_dir or default_out_dir(checkpoint, "report"), examples, max_images, progress
    )
