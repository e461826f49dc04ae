"""A client's bank of known AI images: PDQ hashes in ``hash_bank``, and matching new images against it.

A review ``ai`` puts the image's hash in its client's bank and ``human`` takes
it out (worker.reviews); ``synthguard bank import``/``export`` move banks as
CSV. Rows are never deleted: a removed hash keeps its row with ``removed_at``,
so that workers, which hold each bank in memory (:class:`Banks`, over a
worker.hashindex.HashIndex), learn of removals by reading the rows changed
since they last looked. Which rows changed since is told by the bank's version
(``bank_versions``): every transaction that changes a bank increments it and
stamps the rows it changes. Client ``None`` is the operator's bank: it serves
the images of ``synthguard scan``, which have no API client.

The table functions need SQL alone (the API calls them); :class:`Banks`
needs numpy (the worker has it).
"""

from __future__ import annotations

import csv
import io
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import ColumnElement, and_, func, insert, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session, sessionmaker

from .models import BankVersion, HashBankEntry, utcnow
from .pdq import MIN_QUALITY, parse_hex
from .sanitise import clean_text

if TYPE_CHECKING:
    from .hashindex import HashIndex

log = logging.getLogger(__name__)

SOURCE_REVIEW = "review"
SOURCE_REVIEW_CROP = "review_crop"  # a crop of a reviewed image (worker.cropbank)
SOURCE_IMPORT = "import"

# A refresh that brings more changes than this reloads the whole bank instead (an import).
RELOAD_AT = 5_000
# bank_versions' key for the operator's bank (client NULL in hash_bank).
OPERATOR_BANK = uuid.UUID(int=0)
MAX_LABEL = 200
CSV_FIELDS = ("hash", "quality", "label", "source", "image_id", "created_at")
# Hashes an import looks up and inserts at once; within every backend's limit on bound parameters.
IMPORT_BATCH = 500


def _of_client(client_id: uuid.UUID | None) -> ColumnElement[bool]:
    column = HashBankEntry.client_id
    return column.is_(None) if client_id is None else column == client_id


def _next_version(session: Session, client_id: uuid.UUID | None) -> int:
    """Increment the bank's version, for this transaction's changes to carry.

    The row stays locked until the transaction ends, so a transaction that
    changes the same bank later gets a higher version only once this one has
    committed: versions follow commit order, which is what lets workers read
    changes by version alone (:class:`Banks`).
    """
    bank = client_id or OPERATOR_BANK
    bump = update(BankVersion).where(BankVersion.bank == bank).values(version=BankVersion.version + 1)
    version = session.scalar(bump.returning(BankVersion.version))
    if version is not None:
        return int(version)
    try:
        with session.begin_nested():
            session.execute(insert(BankVersion).values(bank=bank, version=1))
        return 1
    except IntegrityError:
        # The bank's first change, made by another transaction meanwhile: now there is a row.
        return int(session.scalar(bump.returning(BankVersion.version)))


def version(session: Session, client_id: uuid.UUID | None) -> int:
    """The bank's version now (0 before its first change)."""
    return session.scalar(select(BankVersion.version).where(BankVersion.bank == (client_id or OPERATOR_BANK))) or 0


def add(
    session: Session,
    client_id: uuid.UUID | None,
    hash_hex: str,
    *,
    quality: int | None,
    source: str,
    image_id: uuid.UUID | None = None,
    label: str | None = None,
) -> bool:
    """Put a hash in the bank, or bring a removed one back; False when it was there and live already."""
    now = utcnow()
    entry = session.scalar(select(HashBankEntry).where(_of_client(client_id), HashBankEntry.hash == hash_hex))
    if entry is None:
        stamp = _next_version(session, client_id)
        try:
            with session.begin_nested():
                session.add(
                    HashBankEntry(
                        client_id=client_id,
                        hash=hash_hex,
                        quality=quality,
                        source=source,
                        image_id=image_id,
                        label=label,
                        created_at=now,
                        updated_at=now,
                        version=stamp,
                    )
                )
            return True
        except IntegrityError:
            # Added by someone else meanwhile: theirs stands.
            return False
    if entry.removed_at is None:
        return False
    entry.removed_at = None
    entry.updated_at = now
    entry.version = _next_version(session, client_id)
    entry.source, entry.image_id, entry.quality = source, image_id, quality
    entry.label = label or entry.label
    return True


def remove(session: Session, client_id: uuid.UUID | None, hash_hex: str) -> bool:
    """Take a hash out of the bank; False when it was not in it."""
    now = utcnow()
    result = session.execute(
        update(HashBankEntry)
        .where(_of_client(client_id), HashBankEntry.hash == hash_hex, HashBankEntry.removed_at.is_(None))
        .values(removed_at=now, updated_at=now, version=_next_version(session, client_id))
    )
    return bool(result.rowcount)


def _live_crops(client_id: uuid.UUID | None, image_id: uuid.UUID) -> ColumnElement[bool]:
    return and_(
        _of_client(client_id),
        HashBankEntry.image_id == image_id,
        HashBankEntry.source == SOURCE_REVIEW_CROP,
        HashBankEntry.removed_at.is_(None),
    )


def remove_crops(session: Session, client_id: uuid.UUID | None, image_id: uuid.UUID) -> int:
    """Take the hashes of an image's crops out of the bank; how many were in it."""
    now = utcnow()
    stamp = _next_version(session, client_id)
    result = session.execute(
        update(HashBankEntry).where(_live_crops(client_id, image_id)).values(removed_at=now, updated_at=now, version=stamp)
    )
    return int(result.rowcount or 0)


def has_crops(session: Session, client_id: uuid.UUID | None, image_id: uuid.UUID) -> bool:
    """Whether hashes of the image's crops are in the bank now."""
    query = select(HashBankEntry.id).where(_live_crops(client_id, image_id)).limit(1)
    return session.scalar(query) is not None


def entry_for(session: Session, client_id: uuid.UUID | None, hash_hex: str) -> HashBankEntry | None:
    return session.scalar(select(HashBankEntry).where(_of_client(client_id), HashBankEntry.hash == hash_hex))


def size(session: Session, client_id: uuid.UUID | None) -> int:
    return sum(sizes(session, client_id).values())


def sizes(session: Session, client_id: uuid.UUID | None) -> dict[str, int]:
    """The live hashes of a bank, counted by how they entered it (``review``, ``review_crop``, ``import``)."""
    rows = session.execute(
        select(HashBankEntry.source, func.count())
        .where(_of_client(client_id), HashBankEntry.removed_at.is_(None))
        .group_by(HashBankEntry.source)
    )
    return {source: int(count) for source, count in rows}


# ------------------------------------------------------------------ CSV


@dataclass
class ImportReport:
    added: int = 0
    present: int = 0  # already in the bank
    low_quality: int = 0  # quality given and under the minimum: not banked
    invalid_count: int = 0  # malformed lines, skipped
    invalid: list[str] | None = None  # "line N: why", for the first few of them

    def bad(self, line: int, why: str) -> None:
        self.invalid_count += 1
        self.invalid = self.invalid or []
        if len(self.invalid) < 20:
            self.invalid.append(f"line {line}: {why}")


def read_csv(text: str) -> Iterator[tuple[int, dict[str, str]]]:
    """Rows of a bank CSV: (line number, fields). A header row is optional; without one the
    columns are hash[,quality[,label]]. A file of bare hashes, one per line, is such a CSV.
    Blank lines and lines starting with # are skipped."""
    rows = csv.reader(io.StringIO(text))
    header: list[str] | None = None
    first = True
    for number, row in enumerate(rows, start=1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if first:
            first = False
            try:
                parse_hex(row[0])
            except ValueError:
                header = [name.strip().lower() for name in row]
                if "hash" not in header:
                    raise ValueError("the header row names no 'hash' column") from None
                continue
        names = header or ["hash", "quality", "label"]
        yield number, {name: value.strip() for name, value in zip(names, row, strict=False)}


def import_rows(
    sessions: sessionmaker[Session],
    client_id: uuid.UUID | None,
    rows: Iterable[tuple[int, dict[str, str]]],
    *,
    min_quality: int = MIN_QUALITY,
) -> ImportReport:
    """Add each row's hash to the bank (as ``import``); count what happened to each.

    Rows go in batches, each its own transaction: one query finds which of a
    batch's hashes the bank has, one statement inserts the rest, so a list of
    a million hashes is a few thousand statements, not two million, and the
    bank's version (:func:`_next_version`) is held for one batch at a time,
    not for the whole import, while reviews go on. An import stopped half-way
    keeps the batches it committed; running it again adds the rest.
    """
    report = ImportReport()
    batch: dict[str, tuple[int | None, str | None]] = {}
    for number, row in rows:
        try:
            hash_hex = parse_hex(row.get("hash", "")).hex()
        except ValueError as exc:
            report.bad(number, str(exc))
            continue
        quality: int | None = None
        if row.get("quality"):
            try:
                quality = int(row["quality"])
            except ValueError:
                report.bad(number, f"quality {row['quality'][:20]!r} is not a whole number")
                continue
            if not 0 <= quality <= 100:
                report.bad(number, f"quality {quality} is not between 0 and 100")
                continue
            if quality < min_quality:
                report.low_quality += 1
                continue
        if hash_hex in batch:
            report.present += 1  # the same hash earlier in the file
            continue
        batch[hash_hex] = (quality, clean_text(row["label"], MAX_LABEL) if row.get("label") else None)
        if len(batch) >= IMPORT_BATCH:
            with sessions.begin() as session:
                _import_batch(session, client_id, batch, report)
            batch = {}
    if batch:
        with sessions.begin() as session:
            _import_batch(session, client_id, batch, report)
    return report


def _import_batch(
    session: Session,
    client_id: uuid.UUID | None,
    batch: dict[str, tuple[int | None, str | None]],
    report: ImportReport,
) -> None:
    banked = {
        entry.hash: entry
        for entry in session.scalars(
            select(HashBankEntry).where(_of_client(client_id), HashBankEntry.hash.in_(list(batch)))
        )
    }
    now = utcnow()
    stamp = _next_version(session, client_id)
    new: list[dict[str, Any]] = []
    for hash_hex, (quality, label) in batch.items():
        entry = banked.get(hash_hex)
        if entry is None:
            new.append(
                {
                    "id": uuid.uuid4(),
                    "client_id": client_id,
                    "hash": hash_hex,
                    "quality": quality,
                    "source": SOURCE_IMPORT,
                    "label": label,
                    "created_at": now,
                    "updated_at": now,
                    "version": stamp,
                }
            )
        elif add(session, client_id, hash_hex, quality=quality, source=SOURCE_IMPORT, label=label):
            report.added += 1  # removed before: back in the bank
        else:
            report.present += 1
    if not new:
        return
    try:
        with session.begin_nested():
            session.execute(insert(HashBankEntry), new)
        report.added += len(new)
    except IntegrityError:
        # Some were added meanwhile (a review, another import): one by one, theirs stand.
        for values in new:
            added = add(
                session, client_id, values["hash"], quality=values["quality"], source=SOURCE_IMPORT, label=values["label"]
            )
            if added:
                report.added += 1
            else:
                report.present += 1


def export_rows(session: Session, client_id: uuid.UUID | None) -> Iterator[dict[str, Any]]:
    """The live hashes of a bank, oldest first, as :data:`CSV_FIELDS` rows."""
    query = (
        select(HashBankEntry)
        .where(_of_client(client_id), HashBankEntry.removed_at.is_(None))
        .order_by(HashBankEntry.created_at, HashBankEntry.hash)
        .execution_options(yield_per=5000)
    )
    for entry in session.scalars(query):
        yield {
            "hash": entry.hash,
            "quality": "" if entry.quality is None else entry.quality,
            "label": entry.label or "",
            "source": entry.source,
            "image_id": "" if entry.image_id is None else str(entry.image_id),
            "created_at": entry.created_at.isoformat(),
        }


# ------------------------------------------------------------- matching


@dataclass(frozen=True)
class Match:
    """A banked hash within the match distance of an image: what ``images.known_match`` records."""

    hash_hex: str
    distance: int

    def to_json(self, session: Session, client_id: uuid.UUID | None) -> dict[str, Any]:
        """``{"image_id", "distance"}``, with the bank entry's label, source and hash (read once, on a match)."""
        entry = entry_for(session, client_id, self.hash_hex)
        return {
            "image_id": None if entry is None or entry.image_id is None else str(entry.image_id),
            "distance": self.distance,
            "hash": self.hash_hex,
            "source": None if entry is None else entry.source,
            "label": None if entry is None else entry.label,
        }


class _Bank:
    """One client's bank in memory, and how far its changes have been read."""

    def __init__(self, index: HashIndex) -> None:
        self.index = index
        self.lock = threading.Lock()  # searches and changes to ``index`` take turns on it
        self.refreshing = threading.Lock()  # one thread at a time reads changes and builds
        self.seen: int | None = None  # the bank's version read up to; None until loaded
        self.checked = -float("inf")  # monotonic time of the last refresh: never, so the first match loads it


class Banks:
    """Every client's bank, held in this process and refreshed from ``hash_bank`` every ``refresh_s``.

    Thread-safe: the worker's threads match concurrently. One thread at a time
    refreshes a bank, reading the database and (re)building slice tables
    outside the search lock, so the other threads go on matching against what
    is held meanwhile; only a bank's first load makes them wait, since
    without it they would miss its matches.
    """

    def __init__(self, sessions: sessionmaker[Session], *, refresh_s: float) -> None:
        self.sessions = sessions
        self.refresh_s = refresh_s
        self._banks: dict[uuid.UUID | None, _Bank] = {}
        self._lock = threading.Lock()

    def nearest(self, client_id: uuid.UUID | None, forms: tuple[bytes, ...], radius: int) -> Match | None:
        """The banked hash nearest any of ``forms``, when within ``radius`` bits."""
        bank = self._bank(client_id)
        # The first load is waited for; a later refresh is skipped while another thread runs one.
        if time.monotonic() - bank.checked >= self.refresh_s and bank.refreshing.acquire(blocking=bank.seen is None):
            try:
                if time.monotonic() - bank.checked >= self.refresh_s:
                    self._refresh(client_id, bank)
            finally:
                bank.refreshing.release()
        with bank.lock:
            hit = bank.index.nearest(forms, radius)
        return None if hit is None else Match(hash_hex=hit.hash.hex(), distance=hit.distance)

    def _bank(self, client_id: uuid.UUID | None) -> _Bank:
        with self._lock:
            bank = self._banks.get(client_id)
            if bank is None:
                from .hashindex import HashIndex

                bank = self._banks[client_id] = _Bank(HashIndex())
            return bank

    def _refresh(self, client_id: uuid.UUID | None, bank: _Bank) -> None:
        """Apply the rows changed since the version seen, or load the bank whole.

        Called holding ``bank.refreshing``: nothing else changes the index meanwhile.
        """
        if bank.seen is None:
            self._load(client_id, bank)
            return
        query = (
            select(HashBankEntry.hash, HashBankEntry.removed_at, HashBankEntry.version)
            .where(_of_client(client_id), HashBankEntry.version > bank.seen)
            .order_by(HashBankEntry.version)
            .limit(RELOAD_AT + 1)
        )
        with self.sessions() as session:
            rows = session.execute(query).all()
        if len(rows) > RELOAD_AT:
            # Many changes at once (an import): a fresh load costs less than applying them one by one.
            self._load(client_id, bank)
            return
        with bank.lock:
            for row in rows:
                bank.index.put(bytes.fromhex(row.hash), alive=row.removed_at is None)
        if bank.index.wants_build:
            # Searches go on meanwhile, against the tables held and a scan of the rows after them.
            tables = bank.index.tables()
            with bank.lock:
                bank.index.install(tables)
        if rows:
            bank.seen = int(rows[-1].version)
        bank.checked = time.monotonic()

    def _load(self, client_id: uuid.UUID | None, bank: _Bank) -> None:
        """Read every live row into a new index; the one held serves until it is ready."""
        from .hashindex import HashIndex

        live = select(HashBankEntry.hash).where(_of_client(client_id), HashBankEntry.removed_at.is_(None))
        with self.sessions() as session:
            # The version first: changes committed between the two reads are read again by the
            # next refresh, which is harmless; the other way round they could be missed.
            seen = version(session, client_id)
            hashes = [bytes.fromhex(hash_hex) for hash_hex in session.scalars(live)]
        index = HashIndex()
        index.put_many(hashes)  # builds its tables
        with bank.lock:
            bank.index, bank.seen = index, seen
        bank.checked = time.monotonic()
        log.info("hash bank of client %s loaded: %d hashes", client_id or "(operator)", len(hashes))
