"""Scores of a labelled set: results already stored for the same bytes, the rest scored in-process."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, NamedTuple

from ..errors import SynthguardError
from .labels import LabelledRef, ScoredItem

if TYPE_CHECKING:
    from ..detector import Detector
    from ..models import Image
    from ..settings import Settings

# Rows looked up per query: bounded, so the IN list stays within every backend's parameter limit.
_LOOKUP_BATCH = 500


class ScoredSet(NamedTuple):
    """A labelled set's scores, and the model that gave them: its name(s) and version."""

    items: list[ScoredItem]
    model_name: str
    version: str


def score_labelled(
    settings: Settings,
    labelled: Sequence[LabelledRef],
    source: str,
    *,
    load_detector: Callable[[Settings], Detector],
) -> ScoredSet:
    """Score the labelled set with the configured checkpoint.

    An image whose bytes (sha256) this model version already scored is taken
    from the database, not scored again: re-running an evaluation, or
    evaluating a second model, pays only for what is new. The rest is scored
    as one in-process scan, with the detector ``load_detector`` gives; it is
    called only when something is left to score. Raises ConfigError when the
    checkpoint cannot be had or the database's schema is not current.
    """
    # Imported here: they load the database layer and the model's runtime (torch), which the
    # metrics alone do not need.
    from sqlalchemy import select

    from ..attribution import attribute
    from ..db import ensure_schema, get_sessionmaker
    from ..detector import checkpoint_version
    from ..inprocess_scan import run_scan
    from ..models import DONE, Image
    from ..storage import Storage

    version = checkpoint_version(settings)
    storage = Storage(settings)

    def digest(item: LabelledRef) -> str | None:
        if item.sha256 is not None:
            return item.sha256
        try:
            return storage.fetch(item.ref).sha256
        except SynthguardError:
            return None  # scored below, where the failure is recorded like any other

    with ThreadPoolExecutor(settings.concurrency, thread_name_prefix="synthguard-eval") as pool:
        digests = list(pool.map(digest, labelled))
    cached: dict[str, Image] = {}
    wanted = sorted({d for d in digests if d})
    sessions = get_sessionmaker(settings.database_url)
    ensure_schema(sessions.kw["bind"])
    with sessions() as session:
        for start in range(0, len(wanted), _LOOKUP_BATCH):
            rows = session.scalars(
                select(Image)
                .where(
                    Image.sha256.in_(wanted[start : start + _LOOKUP_BATCH]),
                    Image.model_version == version,
                    Image.state == DONE,
                )
                .order_by(Image.completed_at)
            )
            cached.update((row.sha256, row) for row in rows)  # the latest result wins
    todo = [item.ref for item, d in zip(labelled, digests, strict=True) if d not in cached]
    fresh: dict[tuple[str | None, str], Image] = {}
    if todo:
        scan = run_scan(settings, todo, load_detector(settings), origin="eval", source=source)
        with scan.sessions() as session:
            fresh = {
                (i.bucket, i.key): i
                for i in session.scalars(select(Image).where(Image.scan_id == scan.scan_id))
            }
    names = {row.model_name for row in [*cached.values(), *fresh.values()] if row.model_name}
    items = []
    for item, d in zip(labelled, digests, strict=True):
        row = cached.get(d) if d else None
        from_cache = row is not None
        row = row or fresh[(item.ref.bucket, item.ref.key)]
        done = row.state == DONE and row.score is not None
        named = attribute(row.provenance)  # from the evidence: also for rows stored before images.generator
        items.append(
            ScoredItem(
                uri=item.ref.uri,
                label=item.label,
                group=item.group,
                score=row.score if done else None,
                provenance_ai=bool((row.provenance or {}).get("ai")),
                error=None if done else f"{row.error_code}: {row.error_message}",
                cached=from_cache,
                generator=item.generator or (named.name if named is not None else None),
            )
        )
    return ScoredSet(items, ", ".join(sorted(names)) or settings.model_arch, version)
