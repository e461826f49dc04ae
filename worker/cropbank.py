"""Crops of a reviewed image in its client's bank, so that a copy cropped by a few percent still matches.

PDQ matches a copy trimmed by about 1% at each edge, but a copy with 5% cut
from one side lands 60 bits or more from its original (``python
bench/bank_cost.py``). So a review ``ai`` banks, beside the image's own hash,
the hashes of crops of it (:func:`crop_boxes`, ``SYNTHGUARD_BANK_CROP``): a
cropped copy is then near one of them. The API holds no pixels, so a worker
does this after the review (task ``synthguard.bank_crops``, :func:`bank_crops`):
it fetches the image again, checks that the bytes are the ones scored, and
banks the crops as ``review_crop`` rows under the image's id, which a review
``human`` removes with the image's own hash (worker.reviews).
"""

from __future__ import annotations

import logging
import uuid
from typing import TYPE_CHECKING

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from . import errors, hashbank, metrics
from .errors import PermanentError, TransientError
from .imaging import decode_image
from .models import Image, ImageReview, utcnow
from .pdq import PdqHash, hash_image
from .reviews import AI, CROPS_BANKED, CROPS_PENDING, CROPS_SUPERSEDED, latest
from .storage import ObjectRef, Storage
from .tenancy import access_of

if TYPE_CHECKING:
    from PIL import Image as PILImage

    from .settings import Settings

log = logging.getLogger(__name__)

# The bytes fetched again are not the bytes that were scored (the object was overwritten).
CHANGED = "object_changed"
# SYNTHGUARD_BANK_CROP was set to 0 while the review waited.
OFF = "off"


def crop_boxes(width: int, height: int, fraction: float) -> list[tuple[float, float, float, float]]:
    """The regions of a ``width`` x ``height`` image whose hashes are banked, as (left, upper, right, lower).

    ``fraction`` and half of it cut from each side alone, ``fraction`` from the
    two sides of each corner, and half of it from every side at once: 13 crops.
    Each banked hash also matches copies about 1% of a side from it, so these
    cover one-sided crops up to ``fraction``, corner crops, and centred ones.
    """
    half = fraction / 2
    cuts: list[tuple[float, float, float, float]] = []  # fractions cut from the left, top, right, bottom
    for cut in (half, fraction):
        cuts += [(cut, 0, 0, 0), (0, cut, 0, 0), (0, 0, cut, 0), (0, 0, 0, cut)]
    f = fraction
    cuts += [(f, f, 0, 0), (0, f, f, 0), (0, 0, f, f), (f, 0, 0, f)]
    cuts.append((half, half, half, half))
    return [
        (left * width, top * height, width * (1 - right), height * (1 - bottom)) for left, top, right, bottom in cuts
    ]


def crop_hashes(image: PILImage.Image, fraction: float) -> list[PdqHash]:
    """The PDQ hashes of the crops of ``image`` that :func:`crop_boxes` names."""
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    return [hash_image(rgb, box=box) for box in crop_boxes(rgb.width, rgb.height, fraction)]


def bank_crops(
    sessions: sessionmaker[Session],
    storage: Storage,
    review_id: uuid.UUID,
    settings: Settings,
    *,
    allow_local: bool = False,
) -> str:
    """Bank the crops of a review's image; the review's ``crops`` afterwards.

    Idempotent: a review whose crops are no longer pending is left as it is, so a
    redelivered message does nothing. Raises :class:`TransientError` (storage or
    database down) for the caller to retry; every other outcome is recorded on
    the review: ``banked``, ``superseded`` (a later review of the image came
    first), or the error code that stopped it (the object gone or changed, the
    client's grant withdrawn), or ``off`` when SYNTHGUARD_BANK_CROP is now 0.
    """
    with sessions() as session:
        review = session.get(ImageReview, review_id)
        if review is None:
            return "missing"
        if review.crops != CROPS_PENDING:
            return review.crops or "none"
        image = session.get(Image, review.image_id)
        if image is None or _superseded(session, review):
            return _finish(sessions, review_id, CROPS_SUPERSEDED)
        if settings.bank_crop <= 0:
            return _finish(sessions, review_id, OFF)
        ref = ObjectRef(image.bucket, image.key, image.version_id)
        scored_sha256, client_id, image_id = image.sha256, image.client_id, image.id
        if ref.is_local and not allow_local:
            return _finish(sessions, review_id, errors.ACCESS_DENIED, "a worker reads no local files")
        granted = client_id is None or ref.bucket is None or access_of(session, client_id).allows(ref.bucket, ref.key)
        if not granted:
            # As for scoring: the worker's credentials never touch an object the client lost.
            return _finish(sessions, review_id, errors.ACCESS_DENIED, "the client no longer has a grant for it")
    try:
        fetched = storage.fetch(ref)
        if fetched.sha256 != scored_sha256:
            return _finish(sessions, review_id, CHANGED, "the object's bytes are not the ones scored")
        # In this thread, not a fenced preparing process: these bytes (same sha256) were decoded
        # there already, within the same caps, when the image was scored.
        decoded = decode_image(fetched.data, max_pixels=settings.max_pixels, timeout_s=settings.decode_timeout_s)
        hashes = crop_hashes(decoded.image, settings.bank_crop)
    except PermanentError as exc:
        return _finish(sessions, review_id, exc.code, exc.message)
    except TransientError:
        raise
    except Exception as exc:
        # A bug met by these bytes: asking again would meet it again.
        log.exception("review %s: unexpected error hashing the crops of image %s", review_id, image_id)
        return _finish(sessions, review_id, errors.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
    with sessions.begin() as session:
        # The image's row is the lock a review takes too: a review `human` either comes after
        # these rows are in (and removes them) or before (and this finds the review superseded).
        session.execute(select(Image.id).where(Image.id == image_id).with_for_update())
        review = session.get(ImageReview, review_id)
        if review is None or review.crops != CROPS_PENDING:
            return "missing" if review is None else review.crops or "none"
        if _superseded(session, review):
            review.crops, review.crops_at = CROPS_SUPERSEDED, utcnow()
            return CROPS_SUPERSEDED
        added = 0
        for crop in hashes:
            # A featureless crop (a flat border) would match other featureless images.
            if crop.quality >= settings.bank_min_quality:
                added += hashbank.add(
                    session,
                    client_id,
                    crop.hex,
                    quality=crop.quality,
                    source=hashbank.SOURCE_REVIEW_CROP,
                    image_id=image_id,
                )
        review.crops, review.crops_at = CROPS_BANKED, utcnow()
    metrics.BANK_CROPS.labels(CROPS_BANKED).inc()
    log.info("review %s: %d of %d crop hashes of image %s banked", review_id, added, len(hashes), image_id)
    return CROPS_BANKED


def give_up(sessions: sessionmaker[Session], review_id: uuid.UUID, code: str, message: str) -> str:
    """Record that a review's crops could not be banked after every attempt (an outage that lasted)."""
    return _finish(sessions, review_id, code, message)


def _superseded(session: Session, review: ImageReview) -> bool:
    """A later review of the image is the one that counts now, or this one is not ``ai``."""
    newest = latest(session, [review.image_id]).get(review.image_id)
    return review.verdict != AI or (newest is not None and newest.id != review.id)


def _finish(sessions: sessionmaker[Session], review_id: uuid.UUID, state: str, why: str | None = None) -> str:
    with sessions.begin() as session:
        session.execute(
            update(ImageReview)
            .where(ImageReview.id == review_id, ImageReview.crops == CROPS_PENDING)
            .values(crops=state, crops_at=utcnow())
        )
    metrics.BANK_CROPS.labels(state).inc()
    if why is not None:
        log.warning("review %s: the crops of its image were not banked: %s (%s)", review_id, why, state)
    return state
