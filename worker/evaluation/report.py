"""The evaluation report: ``report.md`` with its tables, and the plots beside it."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .labels import AI, CLASS_NAMES, REAL, ScoredItem
from .metrics import precision_recall_curve, roc_curve

PLOTS = {
    "roc.png": "ROC curve",
    "precision_recall.png": "Precision-recall curve",
    "score_histogram.png": "Score histograms per class",
    "reliability.png": "Reliability diagram",
}


def write_report(
    out_dir: Path,
    metrics: dict[str, Any],
    items: Sequence[ScoredItem],
    *,
    model: str,
    dataset: str,
    comparison: Sequence[dict[str, Any]] = (),
) -> Path:
    """Write ``report.md`` and the plots into ``out_dir``; returns the report's path."""
    out_dir.mkdir(parents=True, exist_ok=True)
    scored = [i for i in items if i.score is not None]
    y = np.array([i.label for i in scored], dtype=np.int64)
    s = np.array([i.score for i in scored], dtype=np.float64)
    plots = _write_plots(out_dir, y, s, metrics)
    path = out_dir / "report.md"
    path.write_text(
        _markdown(metrics, model=model, dataset=dataset, plots=plots, comparison=comparison), encoding="utf-8"
    )
    return path


def _write_plots(out_dir: Path, y: np.ndarray, s: np.ndarray, metrics: dict[str, Any]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers
    import matplotlib.pyplot as plt

    written: list[str] = []
    both = bool(np.any(y == AI) and np.any(y == REAL))

    def save(fig: Any, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        written.append(name)

    if both:
        fpr, tpr, _ = roc_curve(y, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(fpr, tpr, label=f"AUC {metrics['overall']['roc_auc']:.3f}")
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="chance")
        ax.set(
            xlabel="false-positive rate (real flagged)",
            ylabel="recall (AI flagged)",
            title="ROC",
            xlim=(0, 1),
            ylim=(0, 1.02),
        )
        ax.legend(loc="lower right")
        save(fig, "roc.png")
    if np.any(y == AI):
        precision, recall, _ = precision_recall_curve(y, s)
        fig, ax = plt.subplots(figsize=(5, 5))
        ax.plot(
            np.concatenate([[0.0], recall]),
            np.concatenate([[precision[0]], precision]),
            # The precision at each recall step holds over the step, as average precision counts it.
            drawstyle="steps-pre",
            label=f"AP {metrics['overall']['average_precision']:.3f}",
        )
        ax.axhline(
            float(np.mean(y == AI)), linestyle="--", color="grey", linewidth=1, label="share of AI images"
        )
        ax.set(xlabel="recall", ylabel="precision", title="Precision-recall", xlim=(0, 1), ylim=(0, 1.02))
        ax.legend(loc="lower left")
        save(fig, "precision_recall.png")
    if len(y):
        fig, ax = plt.subplots(figsize=(6, 4))
        edges = np.linspace(0, 1, 21)
        for label, colour in ((REAL, "tab:blue"), (AI, "tab:red")):
            ax.hist(
                s[y == label],
                bins=edges,
                alpha=0.6,
                color=colour,
                label=f"{CLASS_NAMES[label]} ({int(np.sum(y == label))})",
            )
        ax.axvline(metrics["threshold"], color="black", linestyle="--", linewidth=1, label="threshold")
        ax.set(xlabel="p(synthetic)", ylabel="images", title="Scores per class")
        ax.legend()
        save(fig, "score_histogram.png")

        fig, ax = plt.subplots(figsize=(5, 5))
        bins = [b for b in metrics["reliability"] if b["count"]]
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfectly calibrated")
        ax.bar(
            [(b["low"] + b["high"]) / 2 for b in bins],
            [b["share_ai"] for b in bins],
            width=0.09,
            alpha=0.6,
            color="tab:orange",
            label="share of AI images",
        )
        ax.plot(
            [b["mean_score"] for b in bins],
            [b["share_ai"] for b in bins],
            marker="o",
            color="tab:red",
            label="mean score",
        )
        ax.set(
            xlabel="p(synthetic)",
            ylabel="share of AI images",
            xlim=(0, 1),
            ylim=(0, 1.02),
            title=f"Reliability (ECE {metrics['overall']['ece']:.3f})",
        )
        ax.legend(loc="upper left")
        save(fig, "reliability.png")
    return written


def _fmt(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _ci(interval: Sequence[float] | None) -> str:
    return "" if interval is None else f" ({interval[0]:.3f} to {interval[1]:.3f})"


def _table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "| " + " | ".join("---" for _ in header) + " |"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return [*lines, ""]


def _markdown(
    m: dict[str, Any], *, model: str, dataset: str, plots: Sequence[str], comparison: Sequence[dict[str, Any]]
) -> str:
    o, counts, prov = m["overall"], m["counts"], m["provenance"]
    level = int(m["bootstrap"]["level"] * 100)
    lines = [f"# synthguard evaluation: {dataset}", ""]
    lines += [
        f"Model `{model}`, threshold {m['threshold']:g} on p(synthetic). "
        f"{counts['scored']} of {counts['images']} images scored ({counts['cached']} from the cache, "
        f"{counts['newly_scored']} newly), {counts['failed']} could not be.",
        "",
        "## Summary",
        "",
    ]
    summary = [(f"`{model}`", dataset, _fmt(o["accuracy"]))]
    summary += [(f"`{model}`", f"{dataset}: {g['source']}", _fmt(g["accuracy"])) for g in m["by_source"]]
    lines += _table(("model", "dataset", "accuracy"), summary)
    lines += [
        f"## Overall (bootstrap {level}% intervals, {m['bootstrap']['samples']} stratified resamples)",
        "",
    ]
    lines += _table(
        ("metric", "value"),
        [
            ("accuracy", _fmt(o["accuracy"]) + _ci(o["ci"]["accuracy"])),
            ("ROC-AUC", _fmt(o["roc_auc"]) + _ci(o["ci"]["roc_auc"])),
            ("average precision", _fmt(o["average_precision"]) + _ci(o["ci"]["average_precision"])),
            ("precision", _fmt(o["precision"])),
            ("recall (AI flagged)", _fmt(o["recall"])),
            ("false-positive rate (real flagged)", _fmt(o["fpr"])),
            ("expected calibration error", _fmt(o["ece"])),
            ("accuracy with provenance flags", _fmt(o["accuracy_with_provenance"])),
        ],
    )
    c = o["confusion"]
    lines += ["## Confusion matrix", ""]
    lines += _table(
        ("", "flagged AI", "passed as real"), [("AI", c["tp"], c["fn"]), ("real", c["fp"], c["tn"])]
    )
    lines += ["## Per class", ""]
    lines += _table(
        (
            "class",
            "images",
            "correct",
            "accuracy",
            "mean score",
            "provenance says AI",
            "caught by provenance alone",
        ),
        [
            (
                name,
                v["images"],
                v["correct"],
                _fmt(v["accuracy"]),
                _fmt(v["mean_score"]),
                v["provenance_ai"],
                v["caught_by_provenance_alone"] if name == "ai" else "-",
            )
            for name, v in m["per_class"].items()
        ],
    )
    if m["target_fpr"]:
        lines += ["## Thresholds for a target false-positive rate", ""]
        lines += _table(
            ("target FPR", "threshold", "FPR reached", "recall", "real images", "real images needed"),
            [
                (
                    f"{t['target_fpr']:g}",
                    "above every score" if t["above_all_scores"] else f"{t['threshold']:.6g}",
                    _fmt(t["fpr"], 4),
                    _fmt(t["recall"]),
                    t["negatives"],
                    t["negatives_needed"] or "-",
                )
                for t in m["target_fpr"]
            ],
        )
        lines += ["With fewer real images than needed, the rate reached rests on zero false positives.", ""]
    lines += ["## Provenance signals", ""]
    lines += _table(
        (
            "AI images",
            "with AI provenance",
            "caught by provenance alone",
            "real images",
            "false positives by provenance",
        ),
        [
            (
                prov["ai_images"],
                prov["ai_with_provenance"],
                prov["ai_caught_by_provenance_alone"],
                prov["real_images"],
                prov["real_false_positives_by_provenance"],
            )
        ],
    )
    lines += ["## By source folder", ""]
    lines += _table(
        (
            "source",
            "images",
            "AI",
            "real",
            "failed",
            "accuracy",
            "mean score",
            "ROC-AUC",
            "provenance says AI",
        ),
        [
            (
                g["source"],
                g["images"],
                g["ai"],
                g["real"],
                g["failed"],
                _fmt(g["accuracy"]),
                _fmt(g["mean_score"]),
                _fmt(g["roc_auc"]),
                g["provenance_ai"],
            )
            for g in m["by_source"]
        ],
    )
    if m.get("by_generator"):
        lines += ["## Recall by generator", ""]
        lines += [
            "AI images by the generator their label names or, failing that, their file's provenance "
            "(C2PA, generation parameters, IPTC/XMP, the SD watermark).",
            "",
        ]
        lines += _table(
            ("generator", "AI images", "recall", "recall with provenance flags", "mean score"),
            [
                (g["generator"], g["images"], _fmt(g["recall"]), _fmt(g["recall_with_provenance"]), _fmt(g["mean_score"]))
                for g in m["by_generator"]
            ],
        )
    if comparison:
        lines += ["## Model comparison", ""]
        lines += _table(
            ("model version", "checkpoint", "images scored", "accuracy", "ROC-AUC", "average precision"),
            [
                (
                    f"`{r['model_version']}`",
                    r["checkpoint"] or "-",
                    r["scored"],
                    _fmt(r["accuracy"]),
                    _fmt(r["roc_auc"]),
                    _fmt(r["average_precision"]),
                )
                for r in comparison
            ],
        )
    if plots:
        lines += ["## Plots", ""]
        lines += [f"![{PLOTS[name]}]({name})\n" for name in plots]
    if m["failed"]:
        lines += [f"## Not scored ({len(m['failed'])})", ""]
        lines += _table(
            ("image", "class", "error"), [(f["uri"], f["label"], f["error"] or "") for f in m["failed"]]
        )
    return "\n".join(lines)
