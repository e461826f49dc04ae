"""Putting work on the queue: ``enqueue`` and ``backfill``."""

from __future__ import annotations

import json
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Self, TypeVar

import click
from rich.console import Console
from rich.progress import (
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from ..errors import ConfigError
from ..models import PRIORITIES
from ._base import _checked_sessions, _client_id, _fail, _producer_app, _settings, main, threshold_option

if TYPE_CHECKING:
    from ..backfill import BackfillResult
    from ..storage import ObjectRef

_Command = TypeVar("_Command", bound=Callable[..., object])


def _s3_objects(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> list[ObjectRef]:
    from ..intake import unique_refs
    from ..queueing import as_ref

    refs = []
    for value in values:
        try:
            refs.append(as_ref(value))
        except ValueError as exc:
            raise click.BadParameter(str(exc), ctx=ctx, param=param) from exc
    # Each object once: image ids are reported per object, in the order given.
    return unique_refs(refs)


def _client_option(command: _Command) -> _Command:
    return click.option(
        "--client",
        metavar="NAME",
        help="Queue as this API client (a name or an id): its API reads the results and its webhooks "
        "announce them; objects must lie inside its grants.  [default: no client, operator only]",
    )(command)


@main.command("enqueue")
@click.argument("objects", nargs=-1, required=True, callback=_s3_objects, metavar="S3_URI...")
@click.option(
    "--priority",
    type=click.Choice(PRIORITIES),
    default="realtime",
    show_default=True,
    help="Lane: realtime (uploads, KYC) or bulk (taken only when no realtime work is waiting).",
)
@threshold_option
@_client_option
@click.option("--json", "as_json", is_flag=True, help="Print the scan and image ids as JSON.")
def enqueue_command(
    objects: list[ObjectRef], priority: str, threshold: float | None, client: str | None, as_json: bool
) -> None:
    """Queue exactly these objects for the workers: one scan, one queued image each.

    Each S3_URI is s3://bucket/key, one object; nothing is listed (for every
    object under a prefix, use `synthguard backfill`). The rows are written
    first, then the messages go to the lane's queue: one per image on realtime,
    one per SYNTHGUARD_BULK_CHUNK images on bulk. If the broker
    cannot be reached the images stay queued and the sweeper publishes them
    after SYNTHGUARD_STALE_AFTER_S. With --client, every object must lie
    inside that client's grants and the lane be one of its lanes (its pending
    cap does not apply to an operator).
    Prints the scan id and one image id per object.
    """
    from ..errors import IntakeRefused
    from ..queueing import enqueue

    settings = _settings(threshold=threshold)
    sessions = _checked_sessions(settings)
    client_id = _client_id(sessions, client)
    with _producer_app(settings) as app:
        try:
            done = enqueue(
                objects,
                priority=priority,
                threshold=threshold,
                client_id=client_id,
                origin="cli-enqueue",
                enforce_caps=False,
                settings=settings,
                sessions=sessions,
                app=app,
            )
        except IntakeRefused as exc:
            raise _fail(exc.message) from exc
    images = [{"id": str(i), "uri": ref.uri} for i, ref in zip(done.image_ids, objects, strict=True)]
    if as_json:
        click.echo(
            json.dumps({"scan_id": str(done.scan_id), "priority": done.priority, "images": images}, indent=2)
        )
        return
    click.echo(f"scan {done.scan_id} ({done.priority}): {len(images)} image(s) queued")
    for image in images:
        click.echo(f"  {image['id']}  {image['uri']}")


class _StopRequest:
    """Turns the first Ctrl-C into a request to stop between pages; a second one aborts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Callable[[int, FrameType | None], object] | int | None = None
        self._installed = False

    def __call__(self) -> bool:
        return self.requested

    def __enter__(self) -> Self:
        # Signal handlers can only be set from the main thread.
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
            self._installed = True
        return self

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        # Only a flag: the handler may run in the middle of a write or a transaction.
        self.requested = True
        signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)

    def __exit__(self, *exc: object) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous or signal.default_int_handler)


def _print_backfill(result: BackfillResult, where: str, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(result.summary(), indent=2))
    else:
        click.echo(
            f"backfill of {where}: scan {result.scan_id}\n"
            f"listed {result.listed}, enqueued {result.enqueued}, skipped {result.skipped} "
            f"(current model {result.model_version})"
        )
    unpublished = result.enqueued - result.published
    if result.interrupted:
        click.echo(
            f"interrupted after {result.pages} page(s); run the same command again to resume", err=True
        )
    if unpublished:
        click.echo(
            f"{unpublished} queued image(s) were not published; the sweeper publishes them "
            "after SYNTHGUARD_STALE_AFTER_S",
            err=True,
        )


@main.command()
@click.argument("uri", metavar="S3_PREFIX")
@click.option(
    "--rate",
    type=click.FloatRange(0, min_open=True),
    help="Publish at most this many images per second (token bucket).  [default: no limit]",
)
@click.option(
    "--page-size",
    type=click.IntRange(1, 10_000),
    default=1000,
    show_default=True,
    help="Objects listed, checked and committed together.",
)
@click.option(
    "--priority",
    type=click.Choice(["bulk"]),
    default="bulk",
    show_default=True,
    help="Lane. Backfills always use bulk, so that they never delay realtime work.",
)
@threshold_option
@_client_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def backfill(
    uri: str,
    rate: float | None,
    page_size: int,
    priority: str,
    threshold: float | None,
    client: str | None,
    as_json: bool,
) -> None:
    """Queue every object under S3_PREFIX (s3://bucket/prefix) on the bulk lane, resumably.

    Lists the prefix page by page. Objects whose key already has an image
    that is queued, processing, or done by the current model (the version of
    SYNTHGUARD_MODEL_CHECKPOINT, which is read but not loaded) are skipped;
    the rest become queued images of one scan for this run, committed one page
    at a time, then published. Running it again after an interruption resumes
    without queueing anything twice; after a model change it re-queues what an
    older model scored. Failed images are queued again. Directory markers
    (keys ending in /) are ignored. Prints a summary: scan id, listed,
    enqueued, skipped, model version.

    Ctrl-C stops listing after the page being committed, prints the summary so
    far and exits with code 130; images committed but not yet published are
    re-published by the sweeper (synthguard beat) after SYNTHGUARD_STALE_AFTER_S.

    With --client, the images are that client's: the whole prefix must lie
    inside one of its grants, and only its own images count as already in hand.
    """
    from ..backfill import BackfillFailed, run_backfill
    from ..errors import IntakeRefused
    from ..storage import parse_s3_uri

    try:
        bucket, prefix = parse_s3_uri(uri)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="'S3_PREFIX'") from exc
    settings = _settings(threshold=threshold)
    sessions = _checked_sessions(settings)
    client_id = _client_id(sessions, client)
    where = f"s3://{bucket}/{prefix}"

    console = Console(stderr=True)
    progress = Progress(
        SpinnerColumn(),
        TextColumn(f"backfill {where}"),
        TextColumn(
            "listed {task.fields[listed]:,}  enqueued {task.fields[enqueued]:,}  skipped {task.fields[skipped]:,}"
        ),
        TimeElapsedColumn(),
        console=console,
        disable=not console.is_terminal,
    )
    task = progress.add_task("backfill", total=None, listed=0, enqueued=0, skipped=0)

    def show(now: BackfillResult) -> None:
        progress.update(task, listed=now.listed, enqueued=now.enqueued, skipped=now.skipped)

    with _producer_app(settings) as app, _StopRequest() as stop, progress:
        try:
            result = run_backfill(
                settings,
                sessions,
                app,
                bucket,
                prefix,
                rate=rate,
                page_size=page_size,
                threshold=threshold,
                client_id=client_id,
                on_progress=show,
                should_stop=stop,
            )
        except BackfillFailed as exc:
            failed = exc
        except IntakeRefused as exc:
            raise _fail(exc.message) from exc
        except ConfigError as exc:  # the checkpoint, needed for its version
            raise _fail(exc.message) from exc
        else:
            failed = None
    if failed is not None:
        _print_backfill(failed.result, where, as_json)
        raise _fail(failed.message)
    _print_backfill(result, where, as_json)
    if result.interrupted:
        sys.exit(130)
