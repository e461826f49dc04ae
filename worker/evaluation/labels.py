"""Labelled sets: which images are AI and which real, read from a folder layout, a CSV, or reviews.

A set is ``ai/`` and ``real/`` folders (a folder under either is a source of
its own, such as ``ai/midjourney``) in a local directory or under an S3
prefix, or a CSV of ``key,label[,source[,generator]]`` rows, or the images people
reviewed (``image_reviews``: ``ai`` or ``human``, the latest review of each).
"""

from __future__ import annotations

import csv
import os
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..storage import ObjectRef, parse_s3_uri

if TYPE_CHECKING:
    from ..settings import Settings

AI, REAL = 1, 0
CLASS_NAMES = {AI: "ai", REAL: "real"}
_LABEL_WORDS = {
    "ai": AI,
    "1": AI,
    "fake": AI,
    "synthetic": AI,
    "generated": AI,
    "real": REAL,
    "0": REAL,
    "human": REAL,
}


@dataclass(frozen=True)
class LabelledRef:
    """One object of the evaluation set, its true class and the source folder it came from."""

    ref: ObjectRef
    label: int
    group: str
    # The bytes' digest when already known (a reviewed image): the object need not be fetched to find it.
    sha256: str | None = None
    # Which generator made it, when the labels say (a CSV's generator column).
    generator: str | None = None


@dataclass(frozen=True)
class ScoredItem:
    """One evaluated image: its score (None when it could not be scored) and provenance verdict."""

    uri: str
    label: int
    group: str
    score: float | None
    provenance_ai: bool = False
    error: str | None = None
    cached: bool = False
    # Which generator made it: the label's, else the one its provenance names (worker.attribution).
    generator: str | None = None


def parse_label(word: str) -> int | None:
    """AI or REAL for a label word (ai/real, 1/0, fake/human...), None when it is none of them."""
    return _LABEL_WORDS.get(word.strip().lower())


def label_from_path(relative: str) -> tuple[int, str] | None:
    """(label, group) of a path relative to the set's root: ``ai/...`` or ``real/...``.

    The group is the label folder and, when the file sits deeper, the first
    folder under it (``ai/midjourney``): one generator or camera per folder.
    """
    parts = [p for p in relative.replace("\\", "/").split("/") if p]
    if len(parts) < 2 or parts[0].lower() not in ("ai", "real"):
        return None
    label = AI if parts[0].lower() == "ai" else REAL
    group = parts[0].lower() if len(parts) == 2 else f"{parts[0].lower()}/{parts[1]}"
    return label, group


def label_refs(refs: Iterable[ObjectRef], root: str) -> tuple[list[LabelledRef], int]:
    """Refs under ``root`` (a local directory or an S3 prefix) labelled by their folder; and how many had none."""
    prefix = root.rstrip("/") + "/" if root else ""
    labelled: list[LabelledRef] = []
    unlabelled = 0
    for ref in refs:
        relative = ref.key[len(prefix) :] if ref.key.startswith(prefix) else ref.key
        found = label_from_path(relative)
        if found is None:
            unlabelled += 1
        else:
            labelled.append(LabelledRef(ref, *found))
    return labelled, unlabelled


def read_label_csv(path: Path) -> list[LabelledRef]:
    """Rows ``key,label[,source[,generator]]``; a key is an s3:// URI or a path (relative to the CSV's folder).

    A first row whose label is not a label word is taken as a header; a header
    that names a ``generator`` column (any order after key and label) is read by name.
    """
    out: list[LabelledRef] = []
    source_at, generator_at = 2, 3
    with path.open(newline="", encoding="utf-8") as handle:
        for number, row in enumerate(csv.reader(handle), start=1):
            if not row or not row[0].strip() or row[0].lstrip().startswith("#"):
                continue
            if len(row) < 2:
                raise ValueError(f"{path}:{number}: expected key,label[,source[,generator]]")
            label = parse_label(row[1])
            if label is None:
                if number == 1:
                    names = [name.strip().lower() for name in row]
                    source_at = names.index("source") if "source" in names else source_at
                    generator_at = names.index("generator") if "generator" in names else generator_at
                    continue
                raise ValueError(f"{path}:{number}: unknown label {row[1]!r} (expected ai or real)")
            key = row[0].strip()
            if key.startswith("s3://"):
                bucket, object_key = parse_s3_uri(key)
                ref = ObjectRef(bucket, object_key)
            else:
                local = Path(key)
                ref = ObjectRef(None, str((local if local.is_absolute() else path.parent / local).resolve()))
            group = _column(row, source_at) or CLASS_NAMES[label]
            out.append(LabelledRef(ref, label, group, generator=_column(row, generator_at)))
    return out


def _column(row: list[str], at: int) -> str | None:
    return row[at].strip() or None if len(row) > at else None


def labelled_set(source: str, settings: Settings) -> tuple[list[LabelledRef], int]:
    """The labelled images of ``source`` (ai/ and real/ folders, or a CSV), and how many had no label.

    Raises ValueError when ``source`` is no labelled set (an unreadable CSV,
    a malformed s3:// URI, neither a directory nor a .csv file), and
    SynthguardError when its objects cannot be listed.
    """
    # Imported here: it loads the model's runtime (torch), which labels and metrics alone do not need.
    from ..inprocess_scan import collect_refs

    if not source.startswith("s3://") and source.lower().endswith(".csv"):
        try:
            return read_label_csv(Path(source)), 0
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read {source}: {exc}") from exc
    if source.startswith("s3://"):
        _, root = parse_s3_uri(source)
    else:
        # abspath, as iter_local names files: resolving links here would break the prefix match.
        root = os.path.abspath(source)
        if not os.path.isdir(root):
            raise ValueError(f"{source}: not a directory or a .csv file")
    target = source.rstrip("/") + "/" if source.startswith("s3://") else root
    return label_refs(collect_refs([target], settings, recursive=True), root)


def reviewed_set(
    settings: Settings,
    *,
    since: datetime | None = None,
    client_id: uuid.UUID | None = None,
    every_client: bool = True,
) -> list[LabelledRef]:
    """The images people reviewed (the latest review of each, at or after ``since``), labelled by that review.

    ``every_client``: every client's images and the operator's; otherwise only
    ``client_id``'s (None: the operator's). Each image's source group is its
    client's name.
    """
    from sqlalchemy import select

    from ..db import ensure_schema, get_sessionmaker
    from ..models import ApiClient
    from ..reviews import AI as REVIEWED_AI
    from ..reviews import reviewed

    sessions = get_sessionmaker(settings.database_url)
    ensure_schema(sessions.kw["bind"])
    with sessions() as session:
        rows = reviewed(session, since=since, client_id=client_id, every_client=every_client)
        names = {row.id: row.name for row in session.execute(select(ApiClient.id, ApiClient.name))}
        return [
            LabelledRef(
                ref=ObjectRef(bucket=image.bucket, key=image.key, version_id=image.version_id),
                label=AI if verdict == REVIEWED_AI else REAL,
                group=names.get(image.client_id, "operator"),
                sha256=image.sha256,
            )
            for image, verdict in rows
        ]
