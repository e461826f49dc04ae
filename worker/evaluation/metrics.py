"""Detection metrics with numpy only: confusion, ROC and precision-recall, thresholds, intervals.

A prediction is positive (AI) when ``score >= threshold``, as the scorer
flags. :func:`evaluate` gathers every metric of the report.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .labels import AI, CLASS_NAMES, REAL, ScoredItem

Metric = Callable[[np.ndarray, np.ndarray], float | None]


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
        "by_generator": _by_generator(scored, threshold),
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


UNKNOWN_GENERATOR = "(not named)"


def _by_generator(scored: list[ScoredItem], threshold: float) -> list[dict[str, Any]]:
    """Recall per generator among the AI images, when any image's label or provenance names one.

    Generators come from the labels (a CSV's generator column) or, failing that,
    from the provenance the file carries; AI images that name none are one row
    of their own. Empty when nothing names a generator.
    """
    ai = [i for i in scored if i.label == AI]
    if not any(i.generator for i in ai):
        return []
    rows = []
    for name in sorted({i.generator or UNKNOWN_GENERATOR for i in ai}, key=lambda n: (n == UNKNOWN_GENERATOR, n)):
        group = [i for i in ai if (i.generator or UNKNOWN_GENERATOR) == name]
        flagged = sum(1 for i in group if i.score >= threshold)  # type: ignore[operator]
        with_provenance = sum(1 for i in group if i.score >= threshold or i.provenance_ai)  # type: ignore[operator]
        rows.append(
            {
                "generator": name,
                "images": len(group),
                "recall": _ratio(flagged, len(group)),
                "recall_with_provenance": _ratio(with_provenance, len(group)),
                "mean_score": float(np.mean([i.score for i in group])),
            }
        )
    return rows
