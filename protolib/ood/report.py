"""Write OOD results atomically: markdown and CSV tables, JSON, raw scores, score histograms, ROC curves."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.figure import Figure

from protolib.ood.evaluator import ID_SCORES, OODResults
from protolib.ood.metrics import FPR95_CONVENTION, FPR95_OOD_POSITIVE_CONVENTION, roc_curve
from protolib.utils.io import atomic_savefig, atomic_write, atomic_write_json, atomic_write_text

COLUMNS = {  # metric -> (markdown header, CSV header)
    "fpr95": ("FPR@95 ↓", "fpr95 [% OOD accepted at 95% ID TPR]"),
    "fpr95_ood_positive": (
        "FPR@95 OpenOOD ↓",
        "fpr95_ood_positive [OpenOOD v1.5: % ID rejected at 95% OOD TPR]",
    ),
    "auroc": ("AUROC ↑", "auroc"),
    "aupr_in": ("AUPR-In ↑", "aupr_in"),
    "aupr_out": ("AUPR-Out ↑", "aupr_out"),
}


def percent(value: float | None) -> str:
    return "" if value is None else f"{100.0 * value:.2f}"


def safe_name(name: str) -> str:
    """A file-name-safe version of a dataset name."""
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def markdown_table(results: OODResults, title: str) -> str:
    """The results as a markdown document: header naming both FPR@95 conventions, one table row per result."""
    lines = [
        f"# {title}",
        "",
        f"- ID accuracy (test): {percent(results.id_accuracy) or 'n/a'} %",
        f"- **FPR@95**: {FPR95_CONVENTION}.",
        f"- **FPR@95 OpenOOD**: {FPR95_OOD_POSITIVE_CONVENTION}.",
        "- Rows `nearood`/`farood` average the group's sets, as OpenOOD reports them. All values in %.",
        "",
    ]
    header = ["postprocessor", "group", "dataset", *(COLUMNS[m][0] for m in COLUMNS), "ID acc"]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join(["---"] * 3 + ["---:"] * (len(header) - 3)) + "|")
    for row in results.rows:
        dataset = f"**{row['dataset']}**" if row["summary"] else row["dataset"]
        cells = [
            row["postprocessor"],
            row["group"],
            dataset,
            *(percent(row[m]) for m in COLUMNS),
            percent(results.id_accuracy),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def csv_table(results: OODResults) -> str:
    """The results as CSV (values in %), headers naming the FPR@95 conventions."""
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(
        [
            "postprocessor",
            "group",
            "dataset",
            "summary",
            "num_id",
            "num_ood",
            *(COLUMNS[m][1] for m in COLUMNS),
            "id_accuracy",
        ]
    )
    for row in results.rows:
        writer.writerow(
            [
                row["postprocessor"],
                row["group"],
                row["dataset"],
                row["summary"],
                row["num_id"],
                row["num_ood"],
                *(percent(row[m]) for m in COLUMNS),
                percent(results.id_accuracy),
            ]
        )
    return buffer.getvalue()


def results_json(results: OODResults) -> dict[str, Any]:
    """The results as a JSON-ready dict (metrics as fractions in [0, 1])."""
    return {
        "benchmark": results.benchmark,
        "id_accuracy": results.id_accuracy,
        "units": "fractions in [0, 1]",
        "fpr95_convention": FPR95_CONVENTION,
        "fpr95_ood_positive_convention": FPR95_OOD_POSITIVE_CONVENTION,
        "group_rows": "dataset '<group>ood' is the mean over the group's sets (OpenOOD v1.5)",
        "groups": results.groups,
        "rows": results.rows,
        **results.meta,
    }


def plot_histograms(results: OODResults, dataset: str, path: Path) -> Path:
    """One panel per postprocessor: ID test vs ``dataset`` score histograms on shared bins."""
    names = list(results.scores)
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig = Figure(figsize=(4.2 * cols, 3.0 * rows + 0.6))
    for i, name in enumerate(names):
        ax = fig.add_subplot(rows, cols, i + 1)
        id_scores, ood_scores = results.scores[name][ID_SCORES], results.scores[name][dataset]
        low = float(min(id_scores.min(), ood_scores.min()))
        high = float(max(id_scores.max(), ood_scores.max()))
        bins = np.linspace(low, high if high > low else low + 1.0, 41)
        for values, label in ((id_scores, "ID test"), (ood_scores, dataset)):
            ax.stairs(np.histogram(values, bins, density=True)[0], bins, fill=True, alpha=0.55, label=label)
        ax.set_title(name, fontsize=9)
        ax.set_xlabel("score (higher = more ID)", fontsize=8)
        ax.tick_params(labelsize=7)
        if i == 0:
            ax.legend(fontsize=7)
    fig.suptitle(f"{results.benchmark}: ID vs {dataset}")
    fig.subplots_adjust(left=0.06, right=0.98, bottom=0.08, top=0.9, hspace=0.55, wspace=0.25)
    return atomic_savefig(path, fig, dpi=90)


def plot_roc(results: OODResults, dataset: str, path: Path) -> Path:
    """ROC curves of every postprocessor for ID test vs ``dataset`` (ID positive), AUROC in the legend."""
    fig = Figure(figsize=(5.0, 4.6))
    ax = fig.add_subplot(1, 1, 1)
    colours = colormaps["tab10"].colors
    for i, (name, scores) in enumerate(results.scores.items()):
        fpr, tpr = roc_curve(scores[ID_SCORES], scores[dataset])
        auroc = next(
            r["auroc"] for r in results.rows if r["postprocessor"] == name and r["dataset"] == dataset
        )
        style = ("-", "--", ":")[i // len(colours) % 3]  # distinct lines beyond ten postprocessors
        ax.plot(
            fpr,
            tpr,
            style,
            color=colours[i % len(colours)],
            label=f"{name} ({100 * auroc:.1f})",
            linewidth=1.2,
        )
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=0.8)
    ax.axhline(0.95, color="grey", linestyle="--", linewidth=0.6)
    ax.set_xlabel(f"fraction of {dataset} accepted (FPR)")
    ax.set_ylabel("fraction of ID accepted (TPR)")
    ax.set_title(f"{results.benchmark}: ID vs {dataset} (AUROC %)")
    ax.legend(fontsize=7, loc="lower right")
    fig.subplots_adjust(left=0.13, right=0.97, bottom=0.11, top=0.92)
    return atomic_savefig(path, fig, dpi=90)


def save_scores(results: OODResults, path: Path) -> Path:
    """Raw scores as ``.npz``, keys ``<postprocessor>/<dataset>`` (``id`` for the ID test split)."""
    arrays = {
        f"{name}/{dataset}": values for name, per in results.scores.items() for dataset, values in per.items()
    }

    def write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    return atomic_write(path, write)


def write_report(results: OODResults, output_dir: str | Path, title: str | None = None) -> dict[str, Path]:
    """Write ``ood_results.{md,csv,json}``, ``ood_scores.npz``, ``plots/{hist,roc}_<set>.png``."""
    out = Path(output_dir)
    title = title or f"OOD detection on {results.benchmark}"
    written = {
        "markdown": atomic_write_text(out / "ood_results.md", markdown_table(results, title)),
        "csv": atomic_write_text(out / "ood_results.csv", csv_table(results)),
        "json": atomic_write_json(out / "ood_results.json", results_json(results)),
        "scores": save_scores(results, out / "ood_scores.npz"),
    }
    for dataset in (name for names in results.groups.values() for name in names):
        written[f"hist_{dataset}"] = plot_histograms(
            results, dataset, out / "plots" / f"hist_{safe_name(dataset)}.png"
        )
        written[f"roc_{dataset}"] = plot_roc(
            results, dataset, out / "plots" / f"roc_{safe_name(dataset)}.png"
        )
    return written
