"""Evaluation on a labelled set: labels, scores, detection metrics, the report.

``labels`` reads which images are AI and which real (a folder layout, a
CSV, or people's reviews); ``scores`` scores them, reusing stored results for the same bytes;
``metrics`` measures the scores with numpy only; ``report`` writes
``report.md`` and its plots. ``synthguard eval`` (worker/cli/evaluate.py)
runs them in that order. Importing this package loads neither the database
layer nor the model: ``scores`` imports them when it runs.
"""

from __future__ import annotations

from .labels import (
    AI,
    CLASS_NAMES,
    REAL,
    LabelledRef,
    ScoredItem,
    label_from_path,
    label_refs,
    labelled_set,
    parse_label,
    read_label_csv,
    reviewed_set,
)
from .metrics import (
    Confusion,
    Metric,
    accuracy_at,
    average_precision,
    bootstrap_ci,
    confusion,
    evaluate,
    precision_recall_curve,
    reliability,
    roc_auc,
    roc_curve,
    threshold_for_fpr,
)
from .report import PLOTS, write_report
from .scores import ScoredSet, score_labelled

__all__ = [
    "AI",
    "CLASS_NAMES",
    "PLOTS",
    "REAL",
    "Confusion",
    "LabelledRef",
    "Metric",
    "ScoredItem",
    "ScoredSet",
    "accuracy_at",
    "average_precision",
    "bootstrap_ci",
    "confusion",
    "evaluate",
    "label_from_path",
    "label_refs",
    "labelled_set",
    "parse_label",
    "precision_recall_curve",
    "read_label_csv",
    "reliability",
    "reviewed_set",
    "roc_auc",
    "roc_curve",
    "score_labelled",
    "threshold_for_fpr",
    "write_report",
]
