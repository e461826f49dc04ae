"""``eval``: score a labelled set and report how well the model separates it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

import click

from ..errors import ConfigError, SynthguardError
from ..settings import Settings
from ._base import (
    _checked_sessions,
    _client_id,
    _fail,
    _load_detector,
    _require_model_stack,
    _settings,
    main,
    threshold_option,
)

if TYPE_CHECKING:
    from ..evaluation import LabelledRef, ScoredSet


def _eval_set(source: str, settings: Settings) -> tuple[list[LabelledRef], int]:
    """The labelled images of SOURCE (ai/ and real/ folders, or a CSV), and how many had no label."""
    from ..evaluation import labelled_set

    try:
        return labelled_set(source, settings)
    except (ValueError, SynthguardError) as exc:
        raise _fail(str(exc)) from exc


def _reviewed_set(settings: Settings, since: datetime | None, client: str | None) -> list[LabelledRef]:
    """The reviewed images (of CLIENT alone, when given), labelled by their latest review."""
    from ..evaluation import reviewed_set

    client_id = _client_id(_checked_sessions(settings), client)
    moment = None if since is None else since.replace(tzinfo=UTC)
    return reviewed_set(settings, since=moment, client_id=client_id, every_client=client is None)


def _eval_scores(settings: Settings, labelled: list[LabelledRef], source: str) -> ScoredSet:
    """Score the labelled set with the configured checkpoint (stored results of the same bytes reused)."""
    from ..evaluation import score_labelled

    try:
        return score_labelled(
            settings, labelled, source, load_detector=partial(_load_detector, allow_untrained=False)
        )
    except ConfigError as exc:
        raise _fail(exc.message) from exc


@main.command("eval")
@click.argument("source", required=False)
@click.option(
    "--from-reviews",
    is_flag=True,
    help="Use the images people reviewed (POST /v1/images/{id}/review, `synthguard review`) as the labelled "
    "set, each labelled by its latest review, instead of SOURCE.",
)
@click.option(
    "--since",
    type=click.DateTime(formats=["%Y-%m-%d", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%d %H:%M:%S"]),
    help="With --from-reviews: only images whose latest review is at or after this time (UTC).",
)
@click.option("--client", help="With --from-reviews: only this API client's images (name or id).")
@click.option(
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("synthguard-eval"),
    show_default=True,
    help="Report directory: report.md and the plots.",
)
@click.option(
    "--target-fpr",
    "target_fprs",
    type=click.FloatRange(0, 1, min_open=True),
    multiple=True,
    help="False-positive rate to find a threshold for; repeatable.  [default: 0.01 and 0.001]",
)
@click.option(
    "--bootstrap", type=click.IntRange(0), default=1000, show_default=True, help="Bootstrap resamples."
)
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the bootstrap.")
@threshold_option
@click.option(
    "--compare",
    "compare_checkpoints",
    multiple=True,
    metavar="CHECKPOINT",
    help="Also evaluate this checkpoint on the same images, side by side; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(
    source: str | None,
    from_reviews: bool,
    since: datetime | None,
    client: str | None,
    out_dir: Path,
    target_fprs: tuple[float, ...],
    bootstrap: int,
    seed: int,
    threshold: float | None,
    compare_checkpoints: tuple[str, ...],
    as_json: bool,
) -> None:
    """Measure the detector on a labelled set and write a report.

    SOURCE is a local directory or an s3://bucket/prefix holding ai/ and
    real/ folders (a folder under either, such as ai/midjourney/, is reported
    as its own source), or a CSV file of key,label[,source[,generator]] rows
    (key: a path or an s3:// URI; label: ai or real). Recall is also reported
    per generator, as the CSV or the files' provenance names it. With
    --from-reviews, the set is the
    images people reviewed on your own traffic (ai or human; each client is
    reported as its own source): the report's thresholds for a target
    false-positive rate are then picked on that traffic. Images are scored in-process and
    stored like `synthguard scan`; images this model version already scored
    (same bytes) come from the database. Writes OUT/report.md with ROC,
    precision-recall, score histogram and reliability plots.
    """
    _require_model_stack("eval")
    from ..evaluation import evaluate, write_report

    settings = _settings(threshold=threshold)
    targets = target_fprs or (0.01, 0.001)
    if from_reviews == (source is not None):
        raise _fail("give either SOURCE or --from-reviews")
    if not from_reviews and (since is not None or client is not None):
        raise _fail("--since and --client go with --from-reviews")
    if source is None:
        labelled, unlabelled = _reviewed_set(settings, since, client), 0
        source = "reviews" + (f" of {client}" if client else "") + (f" since {since:%Y-%m-%d %H:%M}" if since else "")
        if not labelled:
            raise _fail(f"no reviewed images ({source})")
    else:
        labelled, unlabelled = _eval_set(source, settings)
        if not labelled:
            raise _fail(f"no labelled images in {source} (expected ai/ and real/ folders, or a CSV of key,label)")
    items, model_name, version = _eval_scores(settings, labelled, source)
    metrics = evaluate(
        items, threshold=settings.threshold, target_fprs=targets, bootstrap=bootstrap, seed=seed
    )
    metrics["counts"]["unlabelled"] = unlabelled
    metrics["model"] = {"name": model_name, "version": version, "checkpoint": settings.model_checkpoint}
    metrics["dataset"] = source

    comparison = []
    if compare_checkpoints:
        for checkpoint in (settings.model_checkpoint, *compare_checkpoints):
            other = (
                settings
                if checkpoint == settings.model_checkpoint
                else _settings(threshold=threshold, model_checkpoint=checkpoint)
            )
            other_items, _, other_version = (
                (items, model_name, version) if other is settings else _eval_scores(other, labelled, source)
            )
            # No bootstrap: the table compares point estimates.
            other_metrics = (
                metrics
                if other is settings
                else evaluate(other_items, threshold=settings.threshold, target_fprs=(), bootstrap=0)
            )
            comparison.append(
                {
                    "model_version": other_version,
                    "checkpoint": checkpoint,
                    "scored": other_metrics["counts"]["scored"],
                    "accuracy": other_metrics["overall"]["accuracy"],
                    "roc_auc": other_metrics["overall"]["roc_auc"],
                    "average_precision": other_metrics["overall"]["average_precision"],
                }
            )
        metrics["comparison"] = comparison

    report = write_report(
        out_dir, metrics, items, model=f"{model_name}@{version}", dataset=source, comparison=comparison
    )
    metrics["report"] = str(report)
    if as_json:
        click.echo(json.dumps(metrics, indent=2))
        return
    o, counts = metrics["overall"], metrics["counts"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    click.echo(
        f"{model_name}@{version} on {source}: accuracy {fmt(o['accuracy'])}, ROC-AUC {fmt(o['roc_auc'])}, "
        f"AP {fmt(o['average_precision'])} at threshold {settings.threshold:g}"
    )
    click.echo(
        f"{counts['scored']} of {counts['images']} images scored ({counts['cached']} from the cache), "
        f"{counts['failed']} failed, {unlabelled} without a label"
    )
    for row in comparison[1:]:
        click.echo(
            f"  compared: {row['model_version']}: accuracy {fmt(row['accuracy'])}, "
            f"ROC-AUC {fmt(row['roc_auc'])}, AP {fmt(row['average_precision'])}"
        )
    click.echo(f"report: {report}")
