"""Evaluation on a labelled set: labels from a layout or a CSV, detection metrics, the report.

Everything here is pure: no database, no model. ``synthguard eval`` (worker/cli.py)
scores the images and hands the scores over. Metrics use numpy only; a
prediction is positive (AI) when ``score >= threshold``, as the scorer flags.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .storage import ObjectRef

AI, REAL = 1, 0
CLASS_NAMES = {AI: "ai", REAL: "real"}
_LABEL_WORDS = {
    "ai": AI,
    "1": AI,
    "fake": AI,
    "synthetic": AI,
    "generated": AI,
    "real": REAL,
    "0": REAL,
    "human": REAL,
}

Metric = Callable[[np.ndarray, np.ndarray], float | None]


# ----------------------------------------------------------------- labelled sets


@dataclass(frozen=True)
class LabelledRef:
    """One object of the evaluation set, its true class and the source folder it came from."""

    ref: ObjectRef
    label: int
    group: str


@dataclass(frozen=True)
class ScoredItem:
    """One evaluated image: its score (None when it could not be scored) and provenance verdict."""

    uri: str
    label: int
    group: str
    score: float | None
    provenance_ai: bool = False
    error: str | None = None
    cached: bool = False


def parse_label(word: str) -> int | None:
    """AI or REAL for a label word (ai/real, 1/0, fake/human...), None when it is none of them."""
    return _LABEL_WORDS.get(word.strip().lower())


def label_from_path(relative: str) -> tuple[int, str] | None:
    """(label, group) of a path relative to the set's root: ``ai/...`` or ``real/...``.

    The group is the label folder and, when the file sits deeper, the first
    folder under it (``ai/midjourney``): one generator or camera per folder.
    """
    parts = [p for p in relative.replace("\\", "/").split("/") if p]
    if len(parts) < 2 or parts[0].lower() not in ("ai", "real"):
        return None
    label = AI if parts[0].lower() == "ai" else REAL
    group = parts[0].lower() if len(parts) == 2 else f"{parts[0].lower()}/{parts[1]}"
    return label, group


def label_refs(refs: Iterable[ObjectRef], root: str) -> tuple[list[LabelledRef], int]:
    """Refs under ``root`` (a local directory or an S3 prefix) labelled by their folder; and how many had none."""
    prefix = root.rstrip("/") + "/" if root else ""
    labelled: list[LabelledRef] = []
    unlabelled = 0
    for ref in refs:
        relative = ref.key[len(prefix) :] if ref.key.startswith(prefix) else ref.key
        found = label_from_path(relative)
        if found is None:
            unlabelled += 1
        else:
            labelled.append(LabelledRef(ref, *found))
    return labelled, unlabelled


def read_label_csv(path: Path) -> list[LabelledRef]:
    """Rows ``key,label[,source]``; a key is an s3:// URI or a path (relative to the CSV's folder).

    A first row whose label is not a label word is taken as a header.
    """
    from .storage import parse_s3_uri

    out: list[LabelledRef] = []
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{number}: expected key,label[,source]")
            label = parse_label(row[1])
            if label is None:
                if number == 1:
                    continue
                raise ValueError(f"{path}:{number}: unknown label {row[1]!r} (expected ai or real)")
            key = row[0].strip()
            if key.startswith("s3://"):
                bucket, object_key = parse_s3_uri(key)
                ref = ObjectRef(bucket, object_key)
            else:
                local = Path(key)
                ref = ObjectRef(None, str((local if local.is_absolute() else path.parent / local).resolve()))
            group = row[2].strip() if len(row) > 2 and row[2].strip() else CLASS_NAMES[label]
            out.append(LabelledRef(ref, label, group))
    return out


# ----------------------------------------------------------------------- metrics


@dataclass(frozen=True)
class Confusion:
    """Counts at one threshold; rates are None where their denominator is zero."""

    tp: int
    fp: int
    tn: int
    fn: int

    @property
    def accuracy(self) -> float | None:
        total = self.tp + self.fp + self.tn + self.fn
        return _ratio(self.tp + self.tn, total)

    @property
    def precision(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fp)

    @property
    def recall(self) -> float | None:
        return _ratio(self.tp, self.tp + self.fn)

    @property
    def specificity(self) -> float | None:
        return _ratio(self.tn, self.tn + self.fp)

    @property
    def fpr(self) -> float | None:
        return _ratio(self.fp, self.fp + self.tn)

    def to_json(self) -> dict[str, int]:
        return {"tp": self.tp, "fp": self.fp, "tn": self.tn, "fn": self.fn}


def _ratio(num: int, den: int) -> float | None:
    return num / den if den else None


def _arrays(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(labels, dtype=np.int64)
    s = np.asarray(scores, dtype=np.float64)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError("labels and scores must be 1-d arrays of the same length")
    return y, s


def confusion(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, threshold: float
) -> Confusion:
    """Confusion matrix with AI as the positive class and ``score >= threshold`` as flagged."""
    y, s = _arrays(labels, scores)
    predicted = s >= threshold
    positive = y == AI
    return Confusion(
        tp=int(np.sum(predicted & positive)),
        fp=int(np.sum(predicted & ~positive)),
        tn=int(np.sum(~predicted & ~positive)),
        fn=int(np.sum(~predicted & positive)),
    )


def accuracy_at(threshold: float) -> Metric:
    """Accuracy at ``threshold`` as a metric function (for the bootstrap)."""
    return lambda y, s: confusion(y, s, threshold).accuracy


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float | None:
    """Area under the ROC curve (Mann-Whitney U; a tie counts one half). None with one class only."""
    y, s = _arrays(labels, scores)
    n_pos = int(np.sum(y == AI))
    n_neg = len(y) - n_pos
    if not n_pos or not n_neg:
        return None
    _, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
    # 1-based rank of each distinct score, averaged over its ties.
    mean_rank = np.cumsum(counts) - (counts - 1) / 2.0
    rank_sum = float(np.sum(mean_rank[inverse][y == AI]))
    return (rank_sum - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg)


def _counts_at_distinct(y: np.ndarray, s: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Distinct scores, highest first, and the true and false positives of ``score >= each``."""
    thresholds = np.unique(s)[::-1]
    pos = np.sort(s[y == AI])
    neg = np.sort(s[y != AI])
    tp = len(pos) - np.searchsorted(pos, thresholds, side="left")
    fp = len(neg) - np.searchsorted(neg, thresholds, side="left")
    return thresholds, tp, fp


def roc_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(fpr, tpr, thresholds) from (0, 0) at threshold +inf down to (1, 1); needs both classes."""
    y, s = _arrays(labels, scores)
    thresholds, tp, fp = _counts_at_distinct(y, s)
    n_pos, n_neg = int(np.sum(y == AI)), int(np.sum(y != AI))
    if not n_pos or not n_neg:
        raise ValueError("a ROC curve needs both classes")
    return (
        np.concatenate([[0.0], fp / n_neg]),
        np.concatenate([[0.0], tp / n_pos]),
        np.concatenate([[np.inf], thresholds]),
    )


def precision_recall_curve(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) at each distinct score, highest threshold first."""
    y, s = _arrays(labels, scores)
    thresholds, tp, fp = _counts_at_distinct(y, s)
    n_pos = int(np.sum(y == AI))
    if not n_pos:
        raise ValueError("a precision-recall curve needs AI images")
    return tp / (tp + fp), tp / n_pos, thresholds


def average_precision(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray
) -> float | None:
    """Sum over distinct thresholds of (recall gained) x precision there; None without AI images."""
    y, _ = _arrays(labels, scores)
    if not np.any(y == AI):
        return None
    precision, recall, _ = precision_recall_curve(labels, scores)
    gained = np.diff(np.concatenate([[0.0], recall]))
    return float(np.sum(gained * precision))


def threshold_for_fpr(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, target: float
) -> dict[str, Any]:
    """The lowest threshold whose false-positive rate is at most ``target``, and the recall it gives.

    Lowest, because recall only falls as the threshold rises. When even the
    highest score lets a real image through, the threshold is just above it
    (nothing is flagged). ``negatives_needed`` says how many real images it
    takes before one false positive is within the target at all.
    """
    y, s = _arrays(labels, scores)
    n_pos, n_neg = int(np.sum(y == AI)), int(np.sum(y != AI))
    if not n_neg:
        raise ValueError("a false-positive rate needs real images")
    thresholds, tp, fp = _counts_at_distinct(y, s)
    feasible = np.nonzero(fp / n_neg <= target)[0]
    if len(feasible):
        i = int(feasible[-1])  # thresholds descend: the last feasible one is the lowest
        threshold, hits, false, above_all = float(thresholds[i]), int(tp[i]), int(fp[i]), False
    else:
        threshold, hits, false, above_all = float(np.nextafter(s.max(), np.inf)), 0, 0, True
    return {
        "target_fpr": target,
        "threshold": threshold,
        "fpr": false / n_neg,
        "recall": hits / n_pos if n_pos else None,
        "false_positives": false,
        "negatives": n_neg,
        "negatives_needed": math.ceil(1 / target) if target > 0 else None,
        "above_all_scores": above_all,
    }


def bootstrap_ci(
    labels: Sequence[int] | np.ndarray,
    scores: Sequence[float] | np.ndarray,
    metric: Metric,
    *,
    samples: int = 1000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float] | None:
    """Percentile interval of ``metric`` over resamples drawn within each class.

    Stratified, so that every resample holds both classes and AUC is always
    defined; the same seed gives the same interval.
    """
    y, s = _arrays(labels, scores)
    if samples < 1 or not len(y):
        return None
    rng = np.random.default_rng(seed)
    groups = [np.nonzero(y == c)[0] for c in (AI, REAL)]
    groups = [g for g in groups if len(g)]
    values: list[float] = []
    for _ in range(samples):
        index = np.concatenate([rng.choice(g, size=len(g), replace=True) for g in groups])
        value = metric(y[index], s[index])
        if value is not None:
            values.append(value)
    if not values:
        return None
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(values, [tail, 100 - tail])
    return float(low), float(high)


def reliability(
    labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray, bins: int = 10
) -> tuple[list[dict[str, Any]], float | None]:
    """Equal-width score bins (mean score vs share of AI images) and the expected calibration error."""
    y, s = _arrays(labels, scores)
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(s, edges[1:-1], right=False), 0, bins - 1)
    rows: list[dict[str, Any]] = []
    ece = 0.0
    for b in range(bins):
        inside = which == b
        count = int(np.sum(inside))
        mean_score = float(np.mean(s[inside])) if count else None
        share_ai = float(np.mean(y[inside] == AI)) if count else None
        if count:
            ece += count / len(y) * abs(mean_score - share_ai)  # type: ignore[operator]
        rows.append(
            {
                "low": float(edges[b]),
                "high": float(edges[b + 1]),
                "count": count,
                "mean_score": mean_score,
                "share_ai": share_ai,
            }
        )
    return rows, (ece if len(y) else None)


# -------------------------------------------------------------------- evaluation


def evaluate(
    items: Sequence[ScoredItem],
    *,
    threshold: float,
    target_fprs: Sequence[float] = (0.01, 0.001),
    bootstrap: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Every metric of the report, as JSON-ready values, from the scored items."""
    scored = [i for i in items if i.score is not None]
    y = np.array([i.label for i in scored], dtype=np.int64)
    s = np.array([i.score for i in scored], dtype=np.float64)
    both = bool(np.any(y == AI) and np.any(y == REAL))
    matrix = confusion(y, s, threshold)
    with_provenance = Confusion(
        tp=sum(1 for i in scored if i.label == AI and (i.score >= threshold or i.provenance_ai)),  # type: ignore[operator]
        fp=sum(1 for i in scored if i.label == REAL and (i.score >= threshold or i.provenance_ai)),  # type: ignore[operator]
        tn=sum(1 for i in scored if i.label == REAL and not (i.score >= threshold or i.provenance_ai)),  # type: ignore[operator]
        fn=sum(1 for i in scored if i.label == AI and not (i.score >= threshold or i.provenance_ai)),  # type: ignore[operator]
    )
    bins, ece = reliability(y, s)
    ci_args = {"samples": bootstrap, "seed": seed}
    overall = {
        "images": len(scored),
        "accuracy": matrix.accuracy,
        "precision": matrix.precision,
        "recall": matrix.recall,
        "specificity": matrix.specificity,
        "fpr": matrix.fpr,
        "roc_auc": roc_auc(y, s),
        "average_precision": average_precision(y, s),
        "ece": ece,
        "confusion": matrix.to_json(),
        "accuracy_with_provenance": with_provenance.accuracy,
        "ci": {
            "accuracy": bootstrap_ci(y, s, accuracy_at(threshold), **ci_args) if len(y) else None,
            "roc_auc": bootstrap_ci(y, s, roc_auc, **ci_args) if both else None,
            "average_precision": bootstrap_ci(y, s, average_precision, **ci_args)
            if np.any(y == AI)
            else None,
        },
    }
    per_class = {
        CLASS_NAMES[c]: _class_summary([i for i in scored if i.label == c], c, threshold) for c in (AI, REAL)
    }
    groups = sorted({i.group for i in items})
    return {
        "threshold": threshold,
        "counts": {
            "images": len(items),
            "scored": len(scored),
            "failed": len(items) - len(scored),
            "cached": sum(1 for i in scored if i.cached),
            "newly_scored": sum(1 for i in scored if not i.cached),
        },
        "overall": overall,
        "per_class": per_class,
        "target_fpr": [threshold_for_fpr(y, s, t) for t in target_fprs] if np.any(y == REAL) else [],
        "provenance": {
            "ai_images": per_class["ai"]["images"],
            "ai_with_provenance": per_class["ai"]["provenance_ai"],
            "ai_caught_by_provenance_alone": per_class["ai"]["caught_by_provenance_alone"],
            "real_images": per_class["real"]["images"],
            "real_false_positives_by_provenance": per_class["real"]["provenance_ai"],
        },
        "by_source": [_group_summary(g, [i for i in items if i.group == g], threshold) for g in groups],
        "reliability": bins,
        "bootstrap": {"samples": bootstrap, "seed": seed, "level": 0.95, "stratified": True},
        "failed": [
            {"uri": i.uri, "label": CLASS_NAMES[i.label], "error": i.error} for i in items if i.score is None
        ],
    }


def _class_summary(items: list[ScoredItem], label: int, threshold: float) -> dict[str, Any]:
    scores = np.array([i.score for i in items], dtype=np.float64)
    flagged = int(np.sum(scores >= threshold))
    correct = flagged if label == AI else len(items) - flagged
    return {
        "images": len(items),
        "correct": correct,
        "accuracy": _ratio(correct, len(items)),
        "mean_score": float(scores.mean()) if len(items) else None,
        "provenance_ai": sum(1 for i in items if i.provenance_ai),
        # For AI images: caught by provenance although the model missed them.
        "caught_by_provenance_alone": sum(1 for i in items if i.provenance_ai and i.score < threshold)  # type: ignore[operator]
        if label == AI
        else 0,
    }


def _group_summary(group: str, items: list[ScoredItem], threshold: float) -> dict[str, Any]:
    scored = [i for i in items if i.score is not None]
    y = np.array([i.label for i in scored], dtype=np.int64)
    s = np.array([i.score for i in scored], dtype=np.float64)
    return {
        "source": group,
        "images": len(items),
        "ai": int(np.sum(y == AI)),
        "real": int(np.sum(y == REAL)),
        "failed": len(items) - len(scored),
        "accuracy": confusion(y, s, threshold).accuracy,
        "mean_score": float(s.mean()) if len(s) else None,
        "roc_auc": roc_auc(y, s),
        "provenance_ai": sum(1 for i in scored if i.provenance_ai),
    }


# ------------------------------------------------------------------------ report

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
