"""``eval``: score a labelled set and report how well the model separates it."""

from __future__ import annotations

import json
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
from sqlalchemy import select

from ..errors import ConfigError, SynthguardError
from ..settings import Settings
from ._base import _checked_sessions, _fail, _settings, main
from .scan import _collect_refs, _run_scan


def _eval_set(source: str, settings: Settings) -> tuple[list[Any], int]:
    """The labelled images of SOURCE (ai/ and real/ folders, or a CSV), and how many had no label."""
    import os

    from ..evaluation import label_refs, read_label_csv
    from ..storage import parse_s3_uri

    if not source.startswith("s3://") and source.lower().endswith(".csv"):
        try:
            return read_label_csv(Path(source)), 0
        except (OSError, ValueError) as exc:
            raise _fail(f"cannot read {source}: {exc}") from exc
    if source.startswith("s3://"):
        try:
            _, root = parse_s3_uri(source)
        except ValueError as exc:
            raise _fail(str(exc)) from exc
    else:
        # abspath, as iter_local names files: resolving links here would break the prefix match.
        root = os.path.abspath(source)
        if not os.path.isdir(root):
            raise _fail(f"{source}: not a directory or a .csv file")
    target = source.rstrip("/") + "/" if source.startswith("s3://") else root
    return label_refs(_collect_refs([target], settings, recursive=True), root)


def _eval_scores(settings: Settings, labelled: Sequence[Any], source: str) -> tuple[list[Any], str, str]:
    """Score the labelled set with the configured checkpoint; returns (items, model name, version).

    An image whose bytes (sha256) this model version already scored is taken
    from the database, not scored again: re-running an evaluation, or
    evaluating a second model, pays only for what is new.
    """
    from ..detector import checkpoint_version
    from ..evaluation import ScoredItem
    from ..models import DONE, Image
    from ..storage import Storage

    try:
        version = checkpoint_version(settings)
    except ConfigError as exc:
        raise _fail(exc.message) from exc
    storage = Storage(settings)

    def digest(item: Any) -> str | None:
        try:
            return storage.fetch(item.ref).sha256
        except SynthguardError:
            return None  # scored below, where the failure is recorded like any other

    with ThreadPoolExecutor(settings.concurrency, thread_name_prefix="synthguard-eval") as pool:
        digests = list(pool.map(digest, labelled))
    cached: dict[str, Any] = {}
    wanted = sorted({d for d in digests if d})
    with _checked_sessions(settings)() as session:
        for start in range(0, len(wanted), 500):
            rows = session.scalars(
                select(Image)
                .where(
                    Image.sha256.in_(wanted[start : start + 500]),
                    Image.model_version == version,
                    Image.state == DONE,
                )
                .order_by(Image.completed_at)
            )
            cached.update((row.sha256, row) for row in rows)  # the latest result wins
    todo = [item.ref for item, d in zip(labelled, digests, strict=True) if d not in cached]
    fresh: dict[tuple[str | None, str], Any] = {}
    if todo:
        scan_id, sessions = _run_scan(settings, todo, origin="eval", source=source)
        with sessions() as session:
            fresh = {
                (i.bucket, i.key): i for i in session.scalars(select(Image).where(Image.scan_id == scan_id))
            }
    names = {row.model_name for row in [*cached.values(), *fresh.values()] if row.model_name}
    items = []
    for item, d in zip(labelled, digests, strict=True):
        row = cached.get(d) if d else None
        from_cache = row is not None
        row = row or fresh[(item.ref.bucket, item.ref.key)]
        done = row.state == DONE and row.score is not None
        items.append(
            ScoredItem(
                uri=item.ref.uri,
                label=item.label,
                group=item.group,
                score=row.score if done else None,
                provenance_ai=bool((row.provenance or {}).get("ai")),
                error=None if done else f"{row.error_code}: {row.error_message}",
                cached=from_cache,
            )
        )
    return items, ", ".join(sorted(names)) or settings.model_arch, version


@main.command("eval")
@click.argument("source")
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
@click.option(
    "--threshold", type=click.FloatRange(0, 1), help="Flag threshold on p(synthetic) [SYNTHGUARD_THRESHOLD]."
)
@click.option(
    "--compare",
    "compare_checkpoints",
    multiple=True,
    metavar="CHECKPOINT",
    help="Also evaluate this checkpoint on the same images, side by side; repeatable.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the metrics as JSON.")
def eval_command(
    source: str,
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
    as its own source), or a CSV file of key,label[,source] rows (key: a path
    or an s3:// URI; label: ai or real). Images are scored in-process and
    stored like `synthguard scan`; images this model version already scored
    (same bytes) come from the database. Writes OUT/report.md with ROC,
    precision-recall, score histogram and reliability plots.
    """
    from ..evaluation import evaluate, write_report

    settings = _settings(threshold=threshold)
    targets = target_fprs or (0.01, 0.001)
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
