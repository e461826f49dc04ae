"""People's decisions on images: ``image_reviews``, and what each does to its client's bank.

``POST /v1/images/{id}/review`` and ``synthguard review`` call :func:`record`;
``GET /v1/images/{id}`` shows :func:`latest`; ``synthguard eval --from-reviews``
reads :func:`reviewed` as its labelled set. A review ``ai`` puts the image's
PDQ hash in its client's bank, ``human`` takes it out (worker.hashbank); the
latest review of an image is the one that counts. A review ``ai`` also leaves
the hashes of the image's crops ``pending``: a worker banks them
(worker.cropbank), and ``human`` removes them with the image's own hash.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from . import hashbank
from .models import PROCESSING, QUEUED, Image, ImageReview, utcnow
from .pdq import MIN_QUALITY
from .sanitise import clean_text

AI = "ai"
HUMAN = "human"
VERDICTS = (AI, HUMAN)
MAX_NOTE = 2000
MAX_REVIEWER = 200

# ImageReview.crops: what became of the hashes of the image's crops (worker.cropbank).
CROPS_PENDING = "pending"  # a worker is to bank them
CROPS_BANKED = "banked"
CROPS_SUPERSEDED = "superseded"  # a later review of the image decided first

# What a review did to the bank.
BankAction = Literal["added", "already_banked", "removed", "not_banked", "no_hash", "low_quality"]


class NotScoredYet(Exception):
    """The image is still queued or processing: there is nothing to review yet."""


@dataclass(frozen=True)
class Recorded:
    review: ImageReview
    bank: BankAction

    @property
    def crops_pending(self) -> bool:
        """A worker is to bank the hashes of the image's crops (publish ``synthguard.bank_crops``)."""
        return self.review.crops == CROPS_PENDING


def record(
    session: Session,
    image: Image,
    verdict: str,
    *,
    reviewer: str,
    note: str | None = None,
    min_quality: int = MIN_QUALITY,
    crop_fraction: float = 0.0,
) -> Recorded:
    """Store a person's decision on ``image`` and update its client's bank; in the caller's transaction.

    ``crop_fraction`` (SYNTHGUARD_BANK_CROP): when the image's hash is banked,
    the review's crops are left ``pending`` for a worker (:data:`Recorded.crops_pending`).
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {', '.join(VERDICTS)}, not {verdict!r}")
    if image.state in (QUEUED, PROCESSING):
        raise NotScoredYet(f"image {image.id} is {image.state}: review it once it is done or failed")
    # The image's row orders this review with any other of the image, and with a worker banking
    # crops of it (worker.cropbank takes the same lock).
    session.execute(select(Image.id).where(Image.id == image.id).with_for_update())
    # Whatever earlier review still waited for its crops, this one decides now.
    session.execute(
        update(ImageReview)
        .where(ImageReview.image_id == image.id, ImageReview.crops == CROPS_PENDING)
        .values(crops=CROPS_SUPERSEDED, crops_at=utcnow())
    )
    review = ImageReview(
        image_id=image.id,
        client_id=image.client_id,
        verdict=verdict,
        note=clean_text(note, MAX_NOTE) if note else None,
        reviewer=clean_text(reviewer, MAX_REVIEWER) or "unknown",
        created_at=utcnow(),
    )
    session.add(review)
    session.flush()
    bank = _bank(session, image, verdict, min_quality)
    if verdict == AI and bank in ("added", "already_banked") and crop_fraction > 0:
        # A second `ai` finds the crops of the first still banked: no worker needs to fetch the image.
        banked = bank == "already_banked" and hashbank.has_crops(session, image.client_id, image.id)
        review.crops, review.crops_at = (CROPS_BANKED if banked else CROPS_PENDING), review.created_at
    return Recorded(review, bank)


def _bank(session: Session, image: Image, verdict: str, min_quality: int) -> BankAction:
    if image.pdq is None:
        return "no_hash"  # failed before it was decoded, or scored before hashing existed
    if verdict == HUMAN:
        removed = hashbank.remove(session, image.client_id, image.pdq)
        removed_crops = hashbank.remove_crops(session, image.client_id, image.id)
        return "removed" if removed or removed_crops else "not_banked"
    if image.pdq_quality is not None and image.pdq_quality < min_quality:
        # A featureless image: its hash would match every other featureless image.
        return "low_quality"
    added = hashbank.add(
        session,
        image.client_id,
        image.pdq,
        quality=image.pdq_quality,
        source=hashbank.SOURCE_REVIEW,
        image_id=image.id,
    )
    return "added" if added else "already_banked"


def latest(session: Session, image_ids: Sequence[uuid.UUID]) -> dict[uuid.UUID, ImageReview]:
    """The latest review of each image that has one."""
    if not image_ids:
        return {}
    newest = (
        select(ImageReview.image_id, func.max(ImageReview.created_at).label("at"))
        .where(ImageReview.image_id.in_(image_ids))
        .group_by(ImageReview.image_id)
        .subquery()
    )
    rows = session.scalars(
        select(ImageReview)
        .join(newest, (ImageReview.image_id == newest.c.image_id) & (ImageReview.created_at == newest.c.at))
        .order_by(ImageReview.id)
    )
    return {review.image_id: review for review in rows}


def reviewed(
    session: Session, *, since: datetime | None = None, client_id: uuid.UUID | None = None, every_client: bool = True
) -> list[tuple[Image, str]]:
    """Images whose latest review is at or after ``since``, with that review's verdict; oldest review first.

    ``every_client``: reviews of every client's images (the operator's view);
    otherwise only those of ``client_id`` (None: the operator's own images).
    """
    newest = select(ImageReview.image_id, func.max(ImageReview.created_at).label("at")).group_by(ImageReview.image_id)
    if not every_client:
        owner = ImageReview.client_id.is_(None) if client_id is None else ImageReview.client_id == client_id
        newest = newest.where(owner)
    if since is not None:
        newest = newest.having(func.max(ImageReview.created_at) >= since)
    latest_at = newest.subquery()
    rows = session.execute(
        select(Image, ImageReview.verdict)
        .join(ImageReview, ImageReview.image_id == Image.id)
        .join(latest_at, (ImageReview.image_id == latest_at.c.image_id) & (ImageReview.created_at == latest_at.c.at))
        .order_by(ImageReview.created_at, Image.id)
    ).all()
    # Two reviews of one image at the same instant: one image, the later row.
    return list({image.id: (image, verdict) for image, verdict in rows}.values())
