"""Scoring in this process: ``scan``, ``results`` and ``demo``."""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from sqlalchemy import select
from sqlalchemy.orm import Session

from ..errors import ConfigError, SynthguardError
from ..settings import Settings
from ._base import (
    UNTRAINED_NOTE,
    _fail,
    _load_detector,
    _require_model_stack,
    _safe_url,
    _settings,
    main,
    threshold_option,
)

if TYPE_CHECKING:
    from ..inprocess_scan import LocalScan
    from ..models import Image
    from ..storage import ObjectRef


def _collect_refs(sources: Sequence[str], settings: Settings, recursive: bool) -> list[ObjectRef]:
    from ..inprocess_scan import collect_refs

    try:
        return collect_refs(sources, settings, recursive=recursive)
    except (ValueError, SynthguardError) as exc:
        raise _fail(str(exc)) from exc


@contextmanager
def _progress_bar(total: int) -> Iterator[Callable[[], None]]:
    """A "scoring" bar on stderr, drawn only at a terminal; yields what advances it by one image."""
    console = Console(stderr=True)
    progress = Progress(
        TextColumn("scoring"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    with progress:
        task = progress.add_task("scan", total=total)
        yield lambda: progress.advance(task)


def _run_scan(
    settings: Settings,
    refs: Sequence[ObjectRef],
    *,
    origin: str,
    source: str,
    allow_untrained: bool = False,
) -> LocalScan:
    """Write the scan's rows, then score every image in-process, with a progress bar."""
    from ..inprocess_scan import score_scan, write_scan

    detector = _load_detector(settings, allow_untrained=allow_untrained)
    try:
        local = write_scan(settings, refs, origin=origin, source=source)
    except ConfigError as exc:
        raise _fail(exc.message) from exc
    score_scan(settings, detector, local, progress=_progress_bar)
    return local


def _image_dict(image: Image) -> dict[str, Any]:
    """The API's ``ImageOut`` of the image, and what a local run shows beyond it."""
    # The CLI composes the engine and the API; importing the API's schema here is no upward import.
    from api_stub.schemas import ImageOut

    from ..detector import UNTRAINED_VERSION

    out: dict[str, Any] = ImageOut.model_validate(image).model_dump(mode="json")
    out.update(
        uri=image.uri,
        sha256=image.sha256,
        format=image.format,
        width=image.width,
        height=image.height,
        # pydantic writes UTC as "Z"; the CLI has always printed isoformat()'s "+00:00".
        created_at=image.created_at.isoformat() if image.created_at else None,
        completed_at=image.completed_at.isoformat() if image.completed_at else None,
    )
    if image.model_version == UNTRAINED_VERSION:
        out["warning"] = UNTRAINED_NOTE
    return out


def _print_scan(
    session: Session, scan_id: uuid.UUID, *, as_json: bool, limit: int | None = None
) -> tuple[int, bool]:
    """Print one scan's images; returns how many did not end ``done``, and whether any is untrained."""
    from ..detector import UNTRAINED_VERSION
    from ..models import DONE, Image, Scan

    scan = session.get(Scan, scan_id)
    if scan is None:
        raise _fail(f"no scan {scan_id}")
    query = select(Image).where(Image.scan_id == scan_id).order_by(Image.created_at, Image.key)
    if limit:
        query = query.limit(limit)
    images = list(session.scalars(query))
    counts: dict[str, int] = {}
    for image in images:
        counts[image.state] = counts.get(image.state, 0) + 1
    untrained = any(i.model_version == UNTRAINED_VERSION for i in images)
    not_done = sum(1 for i in images if i.state != DONE)

    if as_json:
        doc: dict[str, Any] = {
            "scan_id": str(scan.id),
            "source": scan.source,
            "created_at": scan.created_at.isoformat(),
            "completed_at": scan.completed_at.isoformat() if scan.completed_at else None,
            "counts": counts,
            "images": [_image_dict(i) for i in images],
        }
        if untrained:
            doc["warning"] = UNTRAINED_NOTE
        click.echo(json.dumps(doc, indent=2))
        return not_done, untrained

    if untrained:
        # No table: every line must carry the warning, so none can be quoted without it.
        click.echo(f"[{UNTRAINED_NOTE}] scan {scan.id}: random weights, scores below mean nothing")
        for image in images:
            score = "" if image.score is None else f"untrained output {image.score:.4f}"
            error = f"{image.error_code}: {image.error_message}" if image.error_code else ""
            click.echo(f"[{UNTRAINED_NOTE}] {image.uri}  {image.state}  {score}{error}")
        click.echo(f"[{UNTRAINED_NOTE}] {len(images)} images: {_summary(counts)}")
        return not_done, untrained

    # Piped output keeps each row on one line, so it can be grepped; a terminal wraps to fit.
    console = Console(width=None if Console().is_terminal else 1000)
    table = Table(title=f"scan {scan.id}", title_justify="left")
    for column, justify in (
        ("image", "left"),
        ("state", "left"),
        ("p(synthetic)", "right"),
        ("flagged", "left"),
        ("provenance", "left"),
        ("generator", "left"),
        ("model", "left"),
        ("error", "left"),
    ):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for image in images:
        score = "" if image.score is None else f"{image.score:.4f}"
        if image.cached_from is not None:
            score += f" (same bytes as {image.cached_from})"
        if image.frames:
            score += f" (the most of {len(image.frames['scored'])} of {image.frames['count']} frames)"
        hints = (image.quality or {}).get("hints")
        if hints:
            score += f" (unsure: {', '.join(hints)})"
        flagged = _flag_cell(image)
        error = f"{image.error_code}: {image.error_message}" if image.error_code else ""
        model = f"{image.model_name}@{image.model_version}" if image.model_version else ""
        cells = (
            image.uri,
            image.state,
            score,
            flagged,
            _provenance_summary(image.provenance),
            _generator_cell(image.generator),
            model,
            error,
        )
        # Text from files and keys, not markup: "FLUX.1 [dev]" keeps its brackets.
        table.add_row(*(escape(cell) for cell in cells))
    console.print(table)
    console.print(f"{len(images)} images: {_summary(counts)}")
    return not_done, untrained


def _flag_cell(image: Image) -> str:
    """yes/no, and what flagged it; a bank match shows its distance."""
    if image.flagged is None:
        return ""
    if not image.flagged:
        return "no"
    reasons = list(image.flagged_by or [])
    if image.known_match and "known_match" in reasons:
        reasons[reasons.index("known_match")] = f"known match ({image.known_match.get('distance')} bits)"
    return "yes" + (f": {', '.join(reasons)}" if reasons else "")


def _generator_cell(generator: dict[str, Any] | None) -> str:
    """The generator's name, its tool when that says more, and the signal that named it."""
    if not generator:
        return ""
    name, tool = generator.get("name"), generator.get("tool")
    return f"{name}" + (f" ({tool})" if tool and tool != name else "") + f" [{generator.get('signal')}]"


def _provenance_summary(provenance: dict[str, Any] | None) -> str:
    """One cell: the AI evidence found (and by which tool), or the signals present that say otherwise."""
    if not provenance:
        return ""
    signals = provenance.get("signals", {})
    if provenance.get("ai"):
        strong = [n for n, sig in signals.items() if sig.get("ai") and sig.get("strength") == "strong"]
        tools = sorted({t for sig in signals.values() for t in sig.get("evidence", {}).get("tools", [])})
        return "AI: " + ", ".join(strong) + (f" ({', '.join(tools)})" if tools else "")
    found = [n for n, sig in signals.items() if sig.get("found")]
    return ", ".join(found) + " (no AI claim)" if found else ""


def _summary(counts: dict[str, int]) -> str:
    return ", ".join(f"{n} {state}" for state, n in sorted(counts.items())) or "no images"


@main.command()
@click.argument("sources", nargs=-1, required=True)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@threshold_option
@click.option("--recursive/--no-recursive", default=True, show_default=True, help="Walk local directories.")
@click.option("--concurrency", type=click.IntRange(1), help="Fetch/decode threads [SYNTHGUARD_CONCURRENCY].")
def scan(
    sources: tuple[str, ...], as_json: bool, threshold: float | None, recursive: bool, concurrency: int | None
) -> None:
    """Score images in-process and store the results (no broker needed).

    SOURCES are local files, local directories, or s3://bucket/prefix URIs
    (every object under the prefix). Exit code 0 when every image was scored,
    1 when any could not be (each gets an error code in the output).
    """
    _require_model_stack("scan")
    settings = _settings(threshold=threshold, concurrency=concurrency)
    refs = _collect_refs(sources, settings, recursive)
    if not refs:
        raise _fail(f"no images found in {' '.join(sources)}")
    local = _run_scan(settings, refs, origin="cli", source=" ".join(sources))
    with local.sessions() as session:
        not_done, _ = _print_scan(session, local.scan_id, as_json=as_json)
    sys.exit(1 if not_done else 0)


@main.command()
@click.argument("scan_id", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
@click.option("--limit", type=click.IntRange(1), help="Show at most this many images.")
def results(scan_id: str | None, as_json: bool, limit: int | None) -> None:
    """Print stored results of SCAN_ID (default: the latest scan)."""
    from ..db import ensure_schema, make_engine, make_sessionmaker
    from ..models import Scan

    settings = _settings()
    engine = make_engine(settings.database_url)
    try:
        ensure_schema(engine)
    except ConfigError as exc:
        raise _fail(exc.message) from exc
    with make_sessionmaker(engine)() as session:
        if scan_id is None:
            latest = session.scalar(select(Scan.id).order_by(Scan.created_at.desc()).limit(1))
            if latest is None:
                raise _fail("no scans stored yet")
            target = latest
        else:
            try:
                target = uuid.UUID(scan_id)
            except ValueError as exc:
                raise _fail(f"{scan_id!r} is not a scan id") from exc
        _print_scan(session, target, as_json=as_json, limit=limit)


@main.command()
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("synthguard-demo"),
    show_default=True,
    help="Where the sample images are written.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the results as JSON.")
def demo(directory: Path, as_json: bool) -> None:
    """Make a small sample set, scan it, and print the results.

    Uses the configured checkpoint, or the published weights from the hub.
    Offline and with nothing configured, it runs on random weights and says
    so on every line: such scores are not detections. Two samples are broken
    on purpose to show how errors are reported.
    """
    _require_model_stack("demo")
    from ..demo import make_samples

    settings = _settings()
    samples = make_samples(directory)
    refs = list(_collect_refs([str(directory)], settings, recursive=True))
    local = _run_scan(settings, refs, origin="demo", source=str(directory), allow_untrained=True)
    with local.sessions() as session:
        _, untrained = _print_scan(session, local.scan_id, as_json=as_json)
        unexpected = list(_unexpected_outcomes(session, local.scan_id, samples))
    for line in unexpected:
        click.secho(line, fg="red", err=True)
    if not as_json:
        prefix = f"[{UNTRAINED_NOTE}] " if untrained else ""
        click.echo(
            f"{prefix}stored in {_safe_url(settings.database_url)}; "
            f"`synthguard results {local.scan_id}` shows them again"
        )
    sys.exit(1 if unexpected else 0)


def _unexpected_outcomes(
    session: Session, scan_id: uuid.UUID, samples: dict[str, str | None]
) -> Iterator[str]:
    from ..models import DONE, Image

    for image in session.scalars(select(Image).where(Image.scan_id == scan_id)):
        expected = samples.get(Path(image.key).name)
        got = image.error_code if image.state != DONE else None
        if got != expected:
            yield f"{image.key}: expected {expected or 'a score'}, got {got or 'a score'}"
