"""The moderation loop from the command line: ``review`` and ``bank`` (import, export, status)."""

from __future__ import annotations

import csv
import json
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import click
from sqlalchemy.orm import Session, sessionmaker

from ..settings import Settings
from ._base import _checked_sessions, _client_id, _fail, _producer_app, _settings, main

CLIENT_HELP = (
    "The API client (name or id) whose bank this is. Omitted: the operator's own bank, which serves "
    "`synthguard scan` (its images belong to no client)."
)


def _bank(client: str | None) -> tuple[sessionmaker[Session], uuid.UUID | None, Settings]:
    """The database, and the client id the bank belongs to (None: the operator's)."""
    settings = _settings()
    sessions = _checked_sessions(settings)
    return sessions, _client_id(sessions, client), settings


@contextmanager
def _bank_of(client: str | None) -> Iterator[tuple[Session, uuid.UUID | None, Settings]]:
    """A transaction, and the client id the bank belongs to (None: the operator's)."""
    sessions, client_id, settings = _bank(client)
    with sessions.begin() as session:
        yield session, client_id, settings


@main.command("review")
@click.argument("image_id")
@click.option("--verdict", type=click.Choice(["ai", "human"]), required=True, help="The decision.")
@click.option("--note", help="Free text kept with the decision.")
@click.option("--reviewer", default="operator", show_default=True, help="Who decided.")
@click.option("--json", "as_json", is_flag=True, help="Print the review as JSON.")
def review(image_id: str, verdict: str, note: str | None, reviewer: str, as_json: bool) -> None:
    """Record a person's decision on IMAGE_ID (as POST /v1/images/{id}/review does).

    `ai` puts the image's PDQ hash in its client's bank (the operator's bank for
    images of `synthguard scan`), so later copies of it are flagged, and then
    fetches the image again to bank the hashes of crops of it
    (SYNTHGUARD_BANK_CROP), so that cropped copies match too; `human` takes
    them out. `synthguard eval --from-reviews` measures the detector on these
    decisions.
    """
    from ..models import Image
    from ..reviews import NotScoredYet, record

    try:
        parsed = uuid.UUID(image_id)
    except ValueError:
        raise _fail(f"{image_id!r} is not an image id") from None
    settings = _settings()
    with _checked_sessions(settings).begin() as session:
        image = session.get(Image, parsed)
        if image is None:
            raise _fail(f"no image {image_id}")
        try:
            recorded = record(
                session,
                image,
                verdict,
                reviewer=reviewer,
                note=note,
                min_quality=settings.bank_min_quality,
                crop_fraction=settings.bank_crop,
            )
        except NotScoredYet as exc:
            raise _fail(str(exc)) from exc
        out: dict[str, str | None] = {
            "id": str(recorded.review.id),
            "image_id": image_id,
            "verdict": verdict,
            "reviewer": recorded.review.reviewer,
            "bank": recorded.bank,
            "crops": recorded.review.crops,
        }
    if recorded.crops_pending:
        out["crops"] = _bank_crops(settings, recorded.review.id)
    if as_json:
        click.echo(json.dumps(out, indent=2))
    else:
        crops = f"; crops: {out['crops'].replace('_', ' ')}" if out["crops"] else ""
        click.echo(f"image {image_id} reviewed {verdict}; bank: {recorded.bank.replace('_', ' ')}{crops}")


def _bank_crops(settings: Settings, review_id: uuid.UUID) -> str:
    """Bank the crops here and now (the operator's host reads local files too). Where this install
    has no hashing (the slim one), a worker does it; where storage is down, the sweeper asks one later."""
    from ..errors import TransientError

    try:
        import numpy  # noqa: F401  (what hashing needs: the model extra)
        import pdqhash  # noqa: F401

        from ..cropbank import bank_crops
        from ..storage import Storage
    except ImportError:
        from ..queueing import publish_crops

        with _producer_app(settings) as app:
            publish_crops(app, [review_id])
        return "pending"
    storage = Storage(settings)
    try:
        return bank_crops(_checked_sessions(settings), storage, review_id, settings, allow_local=True)
    except TransientError as exc:
        return f"pending ({exc.code}; the sweeper asks a worker again)"
    finally:
        storage.close()


@main.group()
def bank() -> None:
    """Banks of known AI images: PDQ hashes that flag the images matching them.

    Each API client has its own bank; reviews fill it (`ai` adds, `human`
    removes), and import/export move it as CSV (hash,quality,label; 64 hex
    digits per hash, as Meta's PDQ tools write them).
    """


@bank.command("import")
@click.argument("source", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path))
@click.option("--client", help=CLIENT_HELP)
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON.")
def bank_import(source: Path, client: str | None, as_json: bool) -> None:
    """Add the hashes of SOURCE (a CSV file, or - for stdin) to a bank.

    Columns: hash[,quality[,label]], with or without a header row (a header
    names its columns, in any order; other columns are ignored). A file of bare
    hashes, one per line, works too. Hashes with a quality under
    SYNTHGUARD_BANK_MIN_QUALITY are left out. Malformed lines are reported and
    skipped, the rest imported, and the command then exits 1. Hashes go in
    500 at a time, each batch committed: an import stopped half-way keeps what
    it added, and running it again adds the rest.
    """
    from ..hashbank import import_rows, read_csv

    # A byte-order mark (some Windows tools write one) is not part of the first line, from a file or stdin.
    text = sys.stdin.read().removeprefix("\ufeff") if str(source) == "-" else source.read_text(encoding="utf-8-sig")
    sessions, client_id, settings = _bank(client)
    try:
        report = import_rows(sessions, client_id, read_csv(text), min_quality=settings.bank_min_quality)
    except ValueError as exc:
        raise _fail(f"{source}: {exc}") from exc
    counts = {
        "added": report.added,
        "already_present": report.present,
        "low_quality": report.low_quality,
        "invalid_count": report.invalid_count,
        "invalid": report.invalid or [],
    }
    if as_json:
        click.echo(json.dumps(counts, indent=2))
    else:
        click.echo(
            f"{report.added} added, {report.present} already in the bank, "
            f"{report.low_quality} left out for low quality, {report.invalid_count} invalid"
        )
        for line in report.invalid or []:
            click.echo(f"  {line}", err=True)
    if report.invalid_count:
        sys.exit(1)


@bank.command("export")
@click.option("--client", help=CLIENT_HELP)
@click.option(
    "--out", type=click.Path(dir_okay=False, allow_dash=True, path_type=Path), default="-", show_default=True,
    help="File to write; - for stdout.",
)
def bank_export(client: str | None, out: Path) -> None:
    """Write a bank's hashes as CSV: hash,quality,label,source,image_id,created_at.

    `bank import` reads it back (into this install or another).
    """
    from ..hashbank import CSV_FIELDS, export_rows

    with _bank_of(client) as (session, client_id, _):
        stream = sys.stdout if str(out) == "-" else out.open("w", newline="", encoding="utf-8")
        try:
            writer = csv.DictWriter(stream, fieldnames=CSV_FIELDS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(export_rows(session, client_id))
        finally:
            if stream is not sys.stdout:
                stream.close()


@bank.command("status")
@click.option("--client", help=CLIENT_HELP)
def bank_status(client: str | None) -> None:
    """How many hashes a bank holds, and how they came: reviews, crops of reviewed images, imports."""
    from ..hashbank import sizes

    with _bank_of(client) as (session, client_id, _):
        counts = sizes(session, client_id)
    count = sum(counts.values())
    how = ", ".join(f"{n} {source.replace('_', ' ')}" for source, n in sorted(counts.items()))
    owner = client or "the operator"
    click.echo(f"{count} hash{'es' if count != 1 else ''} in the bank of {owner}" + (f" ({how})" if how else ""))
