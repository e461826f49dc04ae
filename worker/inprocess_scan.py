"""Scans run in this process, no broker: ``synthguard scan``, ``demo`` and ``eval``.

The images are stored like any other scan's (a ``scans`` row, one ``images``
row each, written through :func:`worker.intake.create_scan`), then scored by
one :class:`~worker.scoring.Scorer` fed from a thread pool. The caller loads
the detector: the CLI decides whether random weights may stand in for it.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import AbstractContextManager, contextmanager
from typing import NamedTuple

from sqlalchemy.orm import Session, sessionmaker

from .db import ensure_schema, make_engine, make_sessionmaker
from .detector import Detector
from .errors import SynthguardError
from .intake import create_scan
from .scoring import Scorer, process_with_retries
from .settings import Settings
from .storage import ObjectRef, Storage, iter_local, parse_s3_uri

# Given how many images there are, a context held open while they are scored;
# what it yields is called once per finished image (the CLI's progress bar).
ProgressFactory = Callable[[int], AbstractContextManager[Callable[[], None]]]


class LocalScan(NamedTuple):
    """A scan written by this process: its id, its images' ids, and sessions on its database."""

    scan_id: uuid.UUID
    image_ids: list[uuid.UUID]
    sessions: sessionmaker[Session]


def collect_refs(sources: Sequence[str], settings: Settings, *, recursive: bool) -> list[ObjectRef]:
    """Every object of ``sources``: local files and directories, and s3://bucket/prefix URIs.

    Raises ValueError for a malformed s3:// URI, and SynthguardError (its
    message fit to show) when a prefix cannot be listed or a path is missing.
    """
    refs: list[ObjectRef] = []
    local: list[str] = []
    storage: Storage | None = None
    for source in sources:
        if source.startswith("s3://"):
            bucket, prefix = parse_s3_uri(source)
            storage = storage or Storage(settings)
            try:
                refs.extend(storage.list_prefix(bucket, prefix))
            except SynthguardError as exc:
                raise SynthguardError(f"cannot list {source}: {exc.message}", code=exc.code) from exc
        else:
            local.append(source)
    if local:
        refs.extend(iter_local(local, recursive=recursive))
    return refs


def write_scan(settings: Settings, refs: Sequence[ObjectRef], *, origin: str, source: str) -> LocalScan:
    """Check the schema, then write the scan and its queued images in one transaction.

    Raises ConfigError when the database's schema is not current.
    """
    engine = make_engine(settings.database_url, pool_size=settings.concurrency)
    ensure_schema(engine)
    sessions = make_sessionmaker(engine)
    with sessions.begin() as session:
        scan, image_ids = create_scan(
            session, refs, origin=origin, source=source, threshold=settings.threshold
        )
        scan_id = scan.id
    return LocalScan(scan_id, image_ids, sessions)


def score_scan(
    settings: Settings, detector: Detector, scan: LocalScan, *, progress: ProgressFactory | None = None
) -> None:
    """Score every image of ``scan`` in this process, retrying transient failures."""
    with (
        Scorer(settings, detector, sessions=scan.sessions, allow_local=True) as scorer,
        # Entered after the scorer has started, left before it stops: a progress bar shows scoring only.
        (progress or _no_progress)(len(scan.image_ids)) as on_done,
        ThreadPoolExecutor(scorer.concurrency, thread_name_prefix="synthguard-scan") as pool,
    ):
        futures = [pool.submit(process_with_retries, scorer, image_id) for image_id in scan.image_ids]
        for future in as_completed(futures):
            future.result()
            on_done()


def run_scan(
    settings: Settings,
    refs: Sequence[ObjectRef],
    detector: Detector,
    *,
    origin: str,
    source: str,
    progress: ProgressFactory | None = None,
) -> LocalScan:
    """Write the scan's rows, then score every image in-process (:func:`write_scan`, :func:`score_scan`)."""
    scan = write_scan(settings, refs, origin=origin, source=source)
    score_scan(settings, detector, scan, progress=progress)
    return scan


@contextmanager
def _no_progress(total: int) -> Iterator[Callable[[], None]]:
    yield lambda: None
