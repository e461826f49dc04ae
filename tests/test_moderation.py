"""The moderation loop: identical bytes scored once per client, reviews, and a bank of known images.

PDQ hashes and the index are tested as pure functions; the cache and the
bank through the scorer on real PostgreSQL and a real S3 server; reviews
through the HTTP API; the CLI (scan, review, bank, eval) on SQLite; and the
whole loop through a real worker and a webhook receiver that verifies
signatures. Every image is made here (tests/corpus.py); the shared corpus is
a second layer where a test says so.
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import cut, encode, jpeg_copy, photo
from PIL import Image, ImageOps
from prometheus_client import REGISTRY
from sqlalchemy import select
from sqlalchemy.orm import Session, sessionmaker

from conftest import cli_env, wait_until
from worker.celery_app import BANK_CROPS_TASK, REALTIME_QUEUE
from worker.cli import main
from worker.clients import create_client, disable_client
from worker.cropbank import bank_crops, crop_boxes, crop_hashes
from worker.db import ensure_schema, get_sessionmaker, make_engine, make_sessionmaker
from worker.detector import Detector
from worker.hashbank import Banks, import_rows, read_csv
from worker.hashindex import BUILD_AT, HashIndex
from worker.intake import create_scan
from worker.models import DONE, ApiClient, HashBankEntry, ImageReview
from worker.models import Image as ImageRow
from worker.pdq import MATCH_DISTANCE, MIN_QUALITY, distance, hash_image, parse_hex
from worker.queueing import sweep_crops
from worker.scoring import Scorer
from worker.storage import ObjectRef

# ------------------------------------------------------------------ PDQ and the index


def test_a_hash_reads_from_hex_in_either_case_and_bad_text_is_refused() -> None:
    raw = bytes(range(32))
    assert parse_hex(f"  {raw.hex().upper()}\n") == raw
    for bad in ("abc", raw.hex() + "0", "g" * 64, ""):
        with pytest.raises(ValueError, match="64 hex digits"):
            parse_hex(bad)
    assert distance(raw, raw) == 0
    assert distance(raw, bytes([raw[0] ^ 0b1011]) + raw[1:]) == 3


def _flip(hash_: bytes, bits: int, rng: np.random.Generator) -> bytes:
    unpacked = np.unpackbits(np.frombuffer(hash_, dtype=np.uint8))
    unpacked[rng.choice(256, bits, replace=False)] ^= 1
    return np.packbits(unpacked).tobytes()


@pytest.mark.parametrize("size", [600, BUILD_AT + 5_000], ids=["scanned-whole", "slice-tables"])
def test_the_index_finds_exactly_what_a_full_scan_finds(size: int) -> None:
    rng = np.random.default_rng(size)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(size)]
    index = HashIndex()
    index.put_many(hashes[:-300])
    for late in hashes[-300:]:  # after the tables were built: found by the scan of the rest
        index.put(late)
    removed = set(hashes[::97])
    for gone in removed:
        index.put(gone, alive=False)
    live = np.frombuffer(b"".join(h for h in hashes if h not in removed), dtype=np.uint8).reshape(-1, 32)
    assert len(index) == len(live)

    queries: list[list[bytes]] = []
    for _ in range(120):
        near = _flip(hashes[int(rng.integers(size))], int(rng.integers(0, 45)), rng)
        forms = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(8)]
        forms[int(rng.integers(8))] = near  # a copy shows up in one of its eight forms
        queries.append(forms)
    queries.append([next(iter(removed))])  # a removed hash matches nothing (unless a live one is near)
    # With the late rows scanned after the tables, and again once the tables hold them too.
    for rebuilt in (False, True):
        if rebuilt:
            index.build()
            assert index.unbuilt == 0
        hits = 0
        for forms in queries:
            query = np.frombuffer(b"".join(forms), dtype=np.uint8).reshape(-1, 32)
            every = np.unpackbits(live[:, None, :] ^ query[None, :, :], axis=2).sum(axis=2).min(axis=1)
            best = int(every.min())
            found = index.nearest(forms, MATCH_DISTANCE)
            if best > MATCH_DISTANCE:
                assert found is None
            else:
                hits += 1
                assert found is not None and found.distance == best
                assert found.hash in {live[i].tobytes() for i in np.flatnonzero(every == best)}
        assert 30 < hits < len(queries)  # both sides of the radius were exercised


# What a re-upload does to an image, and what PDQ at distance 31 survives (bench/RESULTS.md,
# "Bank matching", measures larger crops, which it does not).
COPIES: dict[str, Callable[[Image.Image], Image.Image]] = {
    "jpeg-q70": lambda im: jpeg_copy(im, 70),
    "half-size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
    "mirrored": ImageOps.mirror,
    "flipped": ImageOps.flip,
    "rotated-90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
    "trimmed-half-pct": lambda im: cut(im, 0.005, 0.005, 0.005, 0.005),
    "all-at-once": lambda im: jpeg_copy(ImageOps.mirror(cut(im, 0.005, 0.005, 0.005, 0.005)).resize((im.width // 2, im.height // 2)), 70),
}


def _pictures(root: Path) -> list[Path]:
    """The photos and generated images of a fixture layer."""
    return sorted([*(root / "real").iterdir(), *(root / "generated").glob("*.png")])


@pytest.mark.parametrize("copy", sorted(COPIES))
def test_a_copy_of_an_image_is_within_the_match_distance(fixtures_dir: Path, copy: str) -> None:
    for path in _pictures(fixtures_dir):
        original = Image.open(path).convert("RGB")
        banked = hash_image(original).forms[0]
        copied = hash_image(COPIES[copy](original))
        assert copied.quality >= 50, path.name
        assert min(distance(banked, form) for form in copied.forms) <= MATCH_DISTANCE, path.name


# Copies cropped by up to 5% (SYNTHGUARD_BANK_CROP's default), which PDQ alone does not match:
# the bank holds the crops of the reviewed image (worker.cropbank) for them.
CROPPED: dict[str, Callable[[Image.Image], Image.Image]] = {
    "left-5pct": lambda im: cut(im, 0.05, 0, 0, 0),
    "bottom-5pct": lambda im: cut(im, 0, 0, 0, 0.05),
    "right-2.5pct": lambda im: cut(im, 0, 0, 0.025, 0),
    "top-right-corner-5pct": lambda im: cut(im, 0, 0.05, 0.05, 0),
    "centred-5pct": lambda im: cut(im, 0.025, 0.025, 0.025, 0.025),
    "mirrored-top-5pct-half-jpeg-q70": lambda im: jpeg_copy(
        ImageOps.mirror(cut(im, 0, 0.05, 0, 0)).resize((im.width // 2, im.height // 2)), 70
    ),
}


def _banked_for_review(picture: Image.Image) -> list[bytes]:
    """What a review `ai` banks for ``picture``: its own hash and those of its crops, as the worker filters them."""
    return [h.forms[0] for h in (hash_image(picture), *crop_hashes(picture, 0.05)) if h.quality >= MIN_QUALITY]


@pytest.mark.parametrize("copy", sorted(CROPPED))
def test_a_cropped_copy_is_within_the_match_distance_of_the_banked_crops(fixtures_dir: Path, copy: str) -> None:
    for path in _pictures(fixtures_dir):
        original = Image.open(path).convert("RGB")
        banked = _banked_for_review(original)
        copied = hash_image(jpeg_copy(CROPPED[copy](original), 85))
        assert min(distance(b, form) for b in banked for form in copied.forms) <= MATCH_DISTANCE, path.name


def test_the_crops_banked_are_the_thirteen_regions_named() -> None:
    boxes = crop_boxes(1000, 500, 0.05)
    assert len(boxes) == len(set(boxes)) == 13
    for left, top, right, bottom in boxes:
        assert 0 <= left < right <= 1000 and 0 <= top < bottom <= 500
        # Never more than the fraction from a side, and never the whole image.
        assert max(left, 1000 - right) <= 50 and max(top, 500 - bottom) <= 25
        assert (left, top, right, bottom) != (0, 0, 1000, 500)
    assert (50, 0, 1000, 500) in boxes and (0, 25, 950, 500) in boxes and (25, 12.5, 975, 487.5) in boxes


def test_unrelated_images_never_match(fixtures_dir: Path) -> None:
    """No two different pictures among the fixtures and two thousand made ones are within the distance;
    nor of the crops a review banks, for the first few hundred of them (13 more hashes each)."""
    # Only these folders: the others hold the same pictures again in other formats and containers.
    pictures = [Image.open(p) for p in _pictures(fixtures_dir)]
    pictures += [photo(96, 64, seed) for seed in range(1000, 3000)]
    index = HashIndex()
    checked = 0
    for number, picture in enumerate(pictures):
        hashed = hash_image(picture)
        if hashed.quality < MIN_QUALITY:
            continue  # neither matched nor banked
        hit = index.nearest(hashed.forms, MATCH_DISTANCE)
        assert hit is None, f"picture {number} is {hit.distance} bits from an earlier one"
        banked = _banked_for_review(picture) if number < 400 else [hashed.forms[0]]
        for one in banked:
            index.put(one)  # as a worker's refresh adds a review's hashes
        checked += 1
    assert checked > 2000 and len(index) > checked + 12 * 400


# ------------------------------------------------------------ the scorer: cache and bank


@pytest.fixture
def pg_sessions(pg_url: str) -> sessionmaker[Session]:
    engine = make_engine(pg_url)
    ensure_schema(engine)
    return make_sessionmaker(engine)


def _client(sessions: sessionmaker[Session], name: str) -> uuid.UUID:
    with sessions.begin() as session:
        return create_client(session, f"{name}-{uuid.uuid4().hex[:8]}", all_buckets=True).client.id


def _score(
    scorer: Scorer, sessions: sessionmaker[Session], client_id: uuid.UUID | None, refs: list[ObjectRef], threshold: float
) -> list[ImageRow]:
    with sessions.begin() as session:
        _, ids = create_scan(session, refs, origin="test", threshold=threshold, client_id=client_id)
    for image_id in ids:
        scorer.process_image(image_id)
    with sessions() as session:
        rows = {row.id: row for row in session.scalars(select(ImageRow).where(ImageRow.id.in_(ids)))}
    return [rows[image_id] for image_id in ids]


def _counted(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def test_identical_bytes_reuse_the_clients_own_result_and_never_another_clients(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    data = encode(photo(400, 300, 71), "JPEG", quality=90)
    for key in ("a/first.jpg", "a/again.jpg", "b/same.jpg"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    alice, bob = _client(pg_sessions, "alice"), _client(pg_sessions, "bob")
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint)
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        (first,) = _score(scorer, pg_sessions, alice, [ObjectRef(bucket, "a/first.jpg")], threshold=0.5)
        decoded = _counted("synthguard_stage_seconds_count", stage="decode")
        cached = _counted("synthguard_images_cached_total")
        # A threshold on the other side of the score: the verdict is the new image's own.
        other_side = first.score + 1e-6 if first.flagged else max(first.score - 1e-6, 0.0)
        (again,) = _score(scorer, pg_sessions, alice, [ObjectRef(bucket, "a/again.jpg")], threshold=other_side)
        assert _counted("synthguard_stage_seconds_count", stage="decode") == decoded  # not decoded again
        assert _counted("synthguard_images_cached_total") == cached + 1
        (bobs,) = _score(scorer, pg_sessions, bob, [ObjectRef(bucket, "b/same.jpg")], threshold=0.5)
        assert _counted("synthguard_stage_seconds_count", stage="decode") == decoded + 1
    assert first.state == again.state == bobs.state == DONE
    assert first.cached_from is None and first.pdq is not None
    assert again.cached_from == first.id
    assert (again.score, again.provenance, again.pdq, again.sha256) == (first.score, first.provenance, first.pdq, first.sha256)
    assert again.flagged is not first.flagged and again.threshold == other_side
    # Another client's identical bytes are scored afresh: nothing of alice's reaches bob.
    assert bobs.cached_from is None and bobs.score == pytest.approx(first.score, abs=1e-6)


def test_the_cache_can_be_turned_off(settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket) -> None:
    data = encode(photo(200, 150, 72), "JPEG")
    for key in ("once.jpg", "twice.jpg"):
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    client = _client(pg_sessions, "uncached")
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, result_cache=False)
    refs = [ObjectRef(bucket, "once.jpg"), ObjectRef(bucket, "twice.jpg")]
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        decoded = _counted("synthguard_stage_seconds_count", stage="decode")
        rows = _score(scorer, pg_sessions, client, refs, threshold=0.5)
        assert _counted("synthguard_stage_seconds_count", stage="decode") == decoded + 2
    assert [row.cached_from for row in rows] == [None, None] and rows[0].sha256 == rows[1].sha256


def test_without_hashing_an_image_is_scored_and_neither_hashed_nor_banked(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    s3_client.put_object(Bucket=bucket, Key="unhashed.jpg", Body=encode(photo(200, 150, 78), "JPEG"))
    client = _client(pg_sessions, "unhashed")
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, pdq_hash=False)
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        hashed = _counted("synthguard_stage_seconds_count", stage="hash")
        (row,) = _score(scorer, pg_sessions, client, [ObjectRef(bucket, "unhashed.jpg")], threshold=0.5)
        assert _counted("synthguard_stage_seconds_count", stage="hash") == hashed
    assert row.state == DONE and row.score is not None
    assert row.pdq is None and row.pdq_forms is None and row.known_match is None
    assert _review(pg_sessions, row.id, "ai") == "no_hash"


def _review(sessions: sessionmaker[Session], image_id: uuid.UUID, verdict: str) -> str:
    from worker.reviews import record

    with sessions.begin() as session:
        return record(session, session.get(ImageRow, image_id), verdict, reviewer="test").bank


def test_an_image_reviewed_ai_flags_its_copies_for_its_client_alone(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    original = photo(640, 480, 73)
    s3_client.put_object(Bucket=bucket, Key="orig.png", Body=encode(original, "PNG"))
    copies = {name: encode(make(original).convert("RGB"), "JPEG", quality=85) for name, make in COPIES.items()}
    for name, data in copies.items():
        s3_client.put_object(Bucket=bucket, Key=f"copy/{name}.jpg", Body=data)
    s3_client.put_object(Bucket=bucket, Key="unrelated.jpg", Body=encode(photo(640, 480, 74), "JPEG"))
    alice, bob = _client(pg_sessions, "alice"), _client(pg_sessions, "bob")
    # Threshold 1: no score can flag, so every flag below is the bank's.
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, bank_refresh_s=0)
    copy_refs = [ObjectRef(bucket, f"copy/{name}.jpg") for name in sorted(copies)]
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        (banked,) = _score(scorer, pg_sessions, alice, [ObjectRef(bucket, "orig.png")], threshold=1.0)
        before = _score(scorer, pg_sessions, alice, copy_refs[:1], threshold=1.0)
        assert before[0].known_match is None and before[0].flagged is False

        assert _review(pg_sessions, banked.id, "ai") == "added"
        assert _review(pg_sessions, banked.id, "ai") == "already_banked"
        matches = _score(scorer, pg_sessions, alice, copy_refs, threshold=1.0)
        # The copy scored before the review is reused now (same bytes), and matches all the same.
        assert matches[0].cached_from == before[0].id
        for ref, row in zip(copy_refs, matches, strict=True):
            assert row.known_match is not None, ref.key
            assert row.known_match["image_id"] == str(banked.id) and row.known_match["distance"] <= MATCH_DISTANCE
            assert row.flagged is True and row.flagged_by == ["known_match"], ref.key
        (unrelated,) = _score(scorer, pg_sessions, alice, [ObjectRef(bucket, "unrelated.jpg")], threshold=1.0)
        assert unrelated.known_match is None and unrelated.flagged is False
        # Bob's bank is his own: alice's review flags nothing of his.
        bobs = _score(scorer, pg_sessions, bob, copy_refs, threshold=1.0)
        assert all(row.known_match is None and row.flagged is False for row in bobs)

        assert _review(pg_sessions, banked.id, "human") == "removed"
        after = _score(scorer, pg_sessions, alice, copy_refs[:1], threshold=1.0)
        assert after[0].known_match is None and after[0].flagged is False


def _review_ai(sessions: sessionmaker[Session], image_id: uuid.UUID, crop_fraction: float = 0.05) -> uuid.UUID:
    """Review ``image_id`` `ai`, leaving its crops pending, as the API does; the review's id."""
    from worker.reviews import record

    with sessions.begin() as session:
        recorded = record(session, session.get(ImageRow, image_id), "ai", reviewer="test", crop_fraction=crop_fraction)
        assert recorded.bank == "added" and recorded.crops_pending
        return recorded.review.id


def _crop_rows(sessions: sessionmaker[Session], image_id: uuid.UUID) -> list[HashBankEntry]:
    with sessions() as session:
        query = select(HashBankEntry).where(HashBankEntry.image_id == image_id, HashBankEntry.source == "review_crop")
        return list(session.scalars(query))


def _crops_state(sessions: sessionmaker[Session], review_id: uuid.UUID) -> str | None:
    with sessions() as session:
        return session.get(ImageReview, review_id).crops


def test_a_review_banks_the_crops_of_its_image_so_cropped_copies_match(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    original = photo(640, 480, 91)
    s3_client.put_object(Bucket=bucket, Key="orig.png", Body=encode(original, "PNG"))
    for name in ("left-5pct", "top-right-corner-5pct", "centred-5pct"):
        s3_client.put_object(Bucket=bucket, Key=f"cropped/{name}.jpg", Body=encode(CROPPED[name](original), "JPEG"))
    s3_client.put_object(Bucket=bucket, Key="later.jpg", Body=encode(cut(original, 0, 0, 0.05, 0), "JPEG"))
    client = _client(pg_sessions, "cropper")
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, bank_refresh_s=0)
    assert settings.bank_crop == 0.05  # the default
    refs = [ObjectRef(bucket, f"cropped/{name}.jpg") for name in ("left-5pct", "top-right-corner-5pct", "centred-5pct")]
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        (banked,) = _score(scorer, pg_sessions, client, [ObjectRef(bucket, "orig.png")], threshold=1.0)
        review_id = _review_ai(pg_sessions, banked.id)
        # Until a worker banks the crops, the image's own hash alone is in the bank: no crop matches it.
        (early,) = _score(scorer, pg_sessions, client, refs[:1], threshold=1.0)
        assert early.known_match is None and early.flagged is False

        assert bank_crops(pg_sessions, scorer.storage, review_id, settings) == "banked"
        crops = _crop_rows(pg_sessions, banked.id)
        assert 0 < len(crops) <= 13 and all(row.client_id == client and row.removed_at is None for row in crops)
        # A redelivered message finds the crops banked and adds nothing.
        assert bank_crops(pg_sessions, scorer.storage, review_id, settings) == "banked"
        assert len(_crop_rows(pg_sessions, banked.id)) == len(crops)
        from worker.reviews import record

        with pg_sessions.begin() as session:
            again = record(session, session.get(ImageRow, banked.id), "ai", reviewer="test", crop_fraction=0.05)
        # A second opinion finds the crops banked: no worker is asked to fetch the image again.
        assert (again.bank, again.review.crops, again.crops_pending) == ("already_banked", "banked", False)

        matches = _score(scorer, pg_sessions, client, refs, threshold=1.0)
        assert matches[0].cached_from == early.id  # the same bytes as before the crops: reused, matched now
        for ref, row in zip(refs, matches, strict=True):
            assert row.known_match is not None, ref.key
            assert row.known_match["image_id"] == str(banked.id) and row.known_match["source"] == "review_crop"
            assert row.flagged is True and row.flagged_by == ["known_match"], ref.key

        with pg_sessions.begin() as session:
            assert record(session, session.get(ImageRow, banked.id), "human", reviewer="test").bank == "removed"
        assert all(row.removed_at is not None for row in _crop_rows(pg_sessions, banked.id))
        (later,) = _score(scorer, pg_sessions, client, [ObjectRef(bucket, "later.jpg")], threshold=1.0)
        assert later.known_match is None and later.flagged is False


def test_crops_are_banked_only_from_the_bytes_scored_and_only_while_the_review_stands(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    """Each way a review's crops end without being banked is recorded on the review, and banks nothing."""
    keys = ("overwritten.png", "deleted.png", "reconsidered.png", "withdrawn.png")
    for seed, key in enumerate(keys, start=92):
        s3_client.put_object(Bucket=bucket, Key=key, Body=encode(photo(320, 240, seed), "PNG"))
    client, other = _client(pg_sessions, "crop-owner"), _client(pg_sessions, "crop-withdrawn")
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint)
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        scored = _score(scorer, pg_sessions, client, [ObjectRef(bucket, key) for key in keys[:3]], threshold=1.0)
        (withdrawn,) = _score(scorer, pg_sessions, other, [ObjectRef(bucket, keys[3])], threshold=1.0)
        reviews = [_review_ai(pg_sessions, row.id) for row in [*scored, withdrawn]]

        s3_client.put_object(Bucket=bucket, Key=keys[0], Body=encode(photo(320, 240, 99), "PNG"))
        s3_client.delete_object(Bucket=bucket, Key=keys[1])
        from worker.reviews import record

        with pg_sessions.begin() as session:
            record(session, session.get(ImageRow, scored[2].id), "human", reviewer="second look")
            disable_client(session, session.get(ApiClient, other))
        # The later review decided before any worker came: the first one's crops are superseded.
        assert _crops_state(pg_sessions, reviews[2]) == "superseded"

        ended = [bank_crops(pg_sessions, scorer.storage, review_id, settings) for review_id in reviews]
    assert ended == ["object_changed", "object_not_found", "superseded", "access_denied"]
    assert [_crops_state(pg_sessions, review_id) for review_id in reviews] == ended
    assert all(_crop_rows(pg_sessions, row.id) == [] for row in [*scored, withdrawn])


def test_the_sweeper_asks_again_for_crops_whose_message_was_lost(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket, celery_app, broker
) -> None:
    s3_client.put_object(Bucket=bucket, Key="lost.png", Body=encode(photo(320, 240, 97), "PNG"))
    client = _client(pg_sessions, "lost-message")
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint)
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        (row,) = _score(scorer, pg_sessions, client, [ObjectRef(bucket, "lost.png")], threshold=1.0)
    review_id = _review_ai(pg_sessions, row.id)  # and no message: the broker lost it
    assert sweep_crops(pg_sessions, celery_app, stale_after_s=3600) == 0  # not stale yet
    assert sweep_crops(pg_sessions, celery_app, stale_after_s=0) >= 1
    assert _asked_for(broker, review_id) == 1
    # Sent again: it waits another interval before the next ask.
    assert review_id not in _pending_older_than(pg_sessions, 60)


def _asked_for(broker: Any, review_id: uuid.UUID) -> int:
    """How many messages in the realtime queue ask a worker for this review's crops."""
    asked = 0
    for raw in broker.lrange(REALTIME_QUEUE, 0, -1):
        message = json.loads(raw)
        args = json.loads(base64.b64decode(message["body"]))[0]
        asked += message["headers"]["task"] == BANK_CROPS_TASK and args == [str(review_id)]
    return asked


def _pending_older_than(sessions: sessionmaker[Session], seconds: float) -> set[uuid.UUID]:
    from datetime import timedelta

    from worker.models import utcnow

    with sessions() as session:
        query = select(ImageReview.id).where(
            ImageReview.crops == "pending", ImageReview.crops_at < utcnow() - timedelta(seconds=seconds)
        )
        return set(session.scalars(query))


def test_a_match_is_recorded_but_flags_nothing_when_bank_flags_are_off(
    settings_factory, pg_sessions, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    picture = photo(320, 240, 75)
    s3_client.put_object(Bucket=bucket, Key="known.jpg", Body=encode(ImageOps.mirror(picture), "JPEG"))
    client = _client(pg_sessions, "observer")
    report = import_rows(pg_sessions, client, [(1, {"hash": hash_image(picture).hex, "label": "known template"})])
    assert report.added == 1
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, bank_flags=False, bank_refresh_s=0)
    with Scorer(settings, Detector.from_settings(settings), sessions=pg_sessions) as scorer:
        (row,) = _score(scorer, pg_sessions, client, [ObjectRef(bucket, "known.jpg")], threshold=1.0)
    assert row.known_match is not None and row.known_match["image_id"] is None  # an imported hash
    assert row.known_match["label"] == "known template" and row.known_match["source"] == "import"
    assert row.flagged is False and row.flagged_by is None


def test_a_worker_sees_a_review_after_its_refresh_interval(pg_sessions) -> None:
    """Banks in a worker's memory learn of additions and removals by reading the rows changed since."""
    client = _client(pg_sessions, "refreshing")
    banks = Banks(pg_sessions, refresh_s=0)
    first, second = hash_image(photo(200, 200, 76)), hash_image(photo(200, 200, 77))
    assert banks.nearest(client, first.forms, MATCH_DISTANCE) is None
    import_rows(pg_sessions, client, [(1, {"hash": first.hex}), (2, {"hash": second.hex})])
    assert banks.nearest(client, first.forms, MATCH_DISTANCE).distance == 0
    from worker.hashbank import remove

    with pg_sessions.begin() as session:
        remove(session, client, first.hex)
    assert banks.nearest(client, first.forms, MATCH_DISTANCE) is None
    assert banks.nearest(client, second.forms, MATCH_DISTANCE) is not None
    slow = Banks(pg_sessions, refresh_s=3600)
    assert slow.nearest(client, second.forms, MATCH_DISTANCE) is not None  # loaded on first use
    with pg_sessions.begin() as session:
        remove(session, client, second.hex)
    assert slow.nearest(client, second.forms, MATCH_DISTANCE) is not None  # not read again yet


def test_a_refresh_holds_up_no_other_threads_search(pg_sessions) -> None:
    """While one thread reads a bank's changes, the others match against the bank held, without waiting."""
    client = _client(pg_sessions, "busy-bank")
    first, second = hash_image(photo(200, 200, 78)), hash_image(photo(200, 200, 79))
    import_rows(pg_sessions, client, [(1, {"hash": first.hex})])
    reading, go_on = threading.Event(), threading.Event()
    hold = threading.Event()  # set: the next read of the database waits for go_on

    def sessions() -> Session:
        if hold.is_set():
            reading.set()
            assert go_on.wait(60)
        return pg_sessions()

    banks = Banks(sessions, refresh_s=0)  # every search finds a refresh due
    assert banks.nearest(client, first.forms, MATCH_DISTANCE).distance == 0  # loaded
    import_rows(pg_sessions, client, [(1, {"hash": second.hex})])
    hold.set()
    seen: list[object] = []
    refresher = threading.Thread(target=lambda: seen.append(banks.nearest(client, second.forms, MATCH_DISTANCE)))
    refresher.start()
    assert reading.wait(60)  # the refresher is inside its read
    # This thread neither reads nor waits (a read would wait for go_on, which nothing sets yet):
    # it matches against the bank as loaded.
    assert banks.nearest(client, first.forms, MATCH_DISTANCE).distance == 0
    assert banks.nearest(client, second.forms, MATCH_DISTANCE) is None
    hold.clear()
    go_on.set()
    refresher.join(60)
    assert seen[0] is not None and seen[0].distance == 0  # the refresh brought the second hash
    assert banks.nearest(client, second.forms, MATCH_DISTANCE).distance == 0


def test_a_bank_that_grows_in_a_worker_gets_its_tables_rebuilt(pg_sessions) -> None:
    """Hashes a refresh reads are found; when more came than the tables held, the tables are rebuilt over them all."""
    client = _client(pg_sessions, "growing-bank")
    rng = np.random.default_rng(7)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(2 * BUILD_AT + 10)]
    import_rows(pg_sessions, client, [(i, {"hash": h.hex()}) for i, h in enumerate(hashes[:BUILD_AT])])
    banks = Banks(pg_sessions, refresh_s=0)
    assert banks.nearest(client, (hashes[0],), MATCH_DISTANCE).distance == 0
    index = banks._banks[client].index
    assert index.unbuilt == 0  # the load built tables over the whole bank
    import_rows(pg_sessions, client, [(i, {"hash": h.hex()}) for i, h in enumerate(hashes[BUILD_AT:])])
    near = _flip(hashes[-1], 20, rng)
    assert banks.nearest(client, (near,), MATCH_DISTANCE).distance == 20
    index = banks._banks[client].index
    assert len(index) == len(hashes) and index.unbuilt == 0  # more came than the tables held: rebuilt
    assert all(banks.nearest(client, (h,), MATCH_DISTANCE).distance == 0 for h in hashes[:: BUILD_AT // 8])


def test_a_bank_that_gains_many_hashes_at_once_is_loaded_again_once(pg_sessions) -> None:
    """More changes than a refresh applies one by one (an import) reload the bank, once: later refreshes read nothing."""
    from worker.hashbank import RELOAD_AT

    client = _client(pg_sessions, "imported")
    rng = np.random.default_rng(8)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(RELOAD_AT + 10)]
    banks = Banks(pg_sessions, refresh_s=0)
    assert banks.nearest(client, (hashes[0],), MATCH_DISTANCE) is None  # the empty bank, loaded
    import_rows(pg_sessions, client, [(i, {"hash": h.hex()}) for i, h in enumerate(hashes)])
    assert banks.nearest(client, (hashes[0],), MATCH_DISTANCE).distance == 0
    reloaded = banks._banks[client].index
    assert len(reloaded) == len(hashes)
    for probe in hashes[:: RELOAD_AT // 4]:
        assert banks.nearest(client, (probe,), MATCH_DISTANCE).distance == 0
        assert banks._banks[client].index is reloaded  # refreshed, and nothing more to read


# ---------------------------------------------------------------------- the HTTP API


def test_reviews_through_the_api(api, sessions, service_settings, broker) -> None:
    with sessions.begin() as session:
        mine = create_client(session, f"reviewer-{uuid.uuid4().hex[:6]}", all_buckets=True)
        theirs = create_client(session, f"other-{uuid.uuid4().hex[:6]}", all_buckets=True)
        refs = [ObjectRef("bkt", "done.jpg"), ObjectRef("bkt", "waiting.jpg")]
        _, (done_id, waiting_id) = create_scan(session, refs, origin="api", threshold=0.5, client_id=mine.client.id)
        session.get(ImageRow, done_id).state = DONE
        session.get(ImageRow, done_id).pdq = "ab" * 32
        session.get(ImageRow, done_id).pdq_quality = 90
    headers = {"Authorization": f"Bearer {mine.api_key}"}
    url = f"/v1/images/{done_id}/review"

    first = api.post(url, json={"verdict": "ai", "note": "same template as case 7"}, headers=headers)
    assert first.status_code == 201, first.text
    assert first.json()["bank"] == "added" and first.json()["reviewer"] == mine.client.name
    # A worker is asked for the crops (the real-worker test below sees them banked).
    assert first.json()["crops"] == "pending" and _asked_for(broker, uuid.UUID(first.json()["id"])) == 1
    second = api.post(url, json={"verdict": "human", "reviewer": "moderator-17"}, headers=headers)
    assert second.json()["bank"] == "removed" and second.json()["crops"] is None
    shown = api.get(f"/v1/images/{done_id}", headers=headers).json()
    assert shown["review"]["verdict"] == "human" and shown["review"]["reviewer"] == "moderator-17"
    assert _crops_state(sessions, uuid.UUID(first.json()["id"])) == "superseded"
    assert shown["pdq"] == "ab" * 32

    assert api.post(f"/v1/images/{waiting_id}/review", json={"verdict": "ai"}, headers=headers).status_code == 409
    assert api.post(url, json={"verdict": "maybe"}, headers=headers).status_code == 422
    other = {"Authorization": f"Bearer {theirs.api_key}"}
    assert api.post(url, json={"verdict": "ai"}, headers=other).status_code == 404
    with sessions() as session:
        reviews = session.scalars(select(ImageReview).where(ImageReview.image_id == done_id)).all()
        entry = session.scalar(select(HashBankEntry).where(HashBankEntry.client_id == mine.client.id))
    assert sorted(r.verdict for r in reviews) == ["ai", "human"]  # the other client's attempt left nothing
    assert entry.removed_at is not None and entry.image_id == done_id


# ------------------------------------------------------------------ the CLI, on SQLite


def _cli(env: dict[str, str], *args: str) -> Any:
    return CliRunner().invoke(main, list(args), env=env)


def test_scan_review_bank_and_eval_from_the_command_line(tmp_path: Path, checkpoint: Path) -> None:
    env = cli_env(tmp_path, checkpoint, "loop", bank_refresh_s="0", threshold="1.0")
    first, later = tmp_path / "first", tmp_path / "later"
    first.mkdir()
    later.mkdir()
    pictures = {f"p{seed}.png": photo(480, 360, seed) for seed in (80, 81, 82)}
    for name, picture in pictures.items():
        (first / name).write_bytes(encode(picture, "PNG"))
    (later / "p80-copy.jpg").write_bytes(encode(ImageOps.mirror(pictures["p80.png"]), "JPEG", quality=70))
    (later / "p81-same.png").write_bytes((first / "p81.png").read_bytes())
    (later / "p80-cropped.jpg").write_bytes(encode(cut(pictures["p80.png"], 0.05, 0, 0, 0), "JPEG"))

    scanned = _cli(env, "scan", str(first), "--json")
    assert scanned.exit_code == 0, scanned.output
    ids = {Path(i["uri"]).name: i["id"] for i in json.loads(scanned.stdout)["images"]}
    reviewed = _cli(env, "review", ids["p80.png"], "--verdict", "ai", "--note", "known fake")
    # The operator's command banks the crops itself, from the local file.
    assert reviewed.exit_code == 0 and "bank: added; crops: banked" in reviewed.output, reviewed.output
    assert _cli(env, "review", ids["p82.png"], "--verdict", "human").exit_code == 0
    status = _cli(env, "bank", "status").output
    crops = len(_banked_for_review(pictures["p80.png"])) - 1
    assert f"{1 + crops} hashes in the bank of the operator (1 review, {crops} review crop)" in status, status

    rescanned = _cli(env, "scan", str(later), "--json")
    assert rescanned.exit_code == 0, rescanned.output
    got = {Path(i["uri"]).name: i for i in json.loads(rescanned.stdout)["images"]}
    assert got["p80-copy.jpg"]["known_match"]["image_id"] == ids["p80.png"]
    assert got["p80-copy.jpg"]["flagged"] is True and got["p80-copy.jpg"]["flagged_by"] == ["known_match"]
    assert got["p81-same.png"]["cached_from"] == ids["p81.png"] and got["p81-same.png"]["known_match"] is None
    assert got["p80-cropped.jpg"]["known_match"]["source"] == "review_crop" and got["p80-cropped.jpg"]["flagged"]
    table = _cli(env, "results")
    assert "known match" in table.output and f"same bytes as {ids['p81.png']}" in table.output

    # The reviews are a labelled set: one ai, one human.
    evaluated = _cli(env, "eval", "--from-reviews", "--json", "--bootstrap", "0", "--out", str(tmp_path / "report"))
    assert evaluated.exit_code == 0, evaluated.output
    counts = json.loads(evaluated.stdout)["counts"]
    assert (counts["images"], counts["scored"], counts["cached"]) == (2, 2, 2)  # both from stored results
    assert _cli(env, "eval", "--from-reviews", "--since", "2999-01-01").exit_code != 0
    assert _cli(env, "eval").exit_code != 0  # neither SOURCE nor --from-reviews

    # Export, then import into a client's bank of another install.
    exported = _cli(env, "bank", "export")
    assert exported.exit_code == 0
    rows = [fields for _, fields in read_csv(exported.stdout)]
    assert [row["source"] for row in rows].count("review") == 1 and len(rows) == 1 + crops
    assert got["p80-copy.jpg"]["known_match"]["hash"] in {row["hash"] for row in rows}
    other = dict(env, SYNTHGUARD_DATABASE_URL=f"sqlite:///{tmp_path / 'other.db'}")
    sessions = get_sessionmaker(other["SYNTHGUARD_DATABASE_URL"])
    ensure_schema(sessions.kw["bind"])
    with sessions.begin() as session:
        create_client(session, "platform", all_buckets=True)
    (tmp_path / "bank.csv").write_text(exported.stdout + "not-a-hash,90\n" + "ff" * 32 + ",10\n")
    imported = _cli(other, "bank", "import", str(tmp_path / "bank.csv"), "--client", "platform", "--json")
    assert imported.exit_code == 1  # a malformed line is reported, and the rest is imported
    report = json.loads(imported.stdout)
    assert (report["added"], report["low_quality"], len(report["invalid"])) == (len(rows), 1, 1)
    assert f"line {len(rows) + 2}" in report["invalid"][0]  # after the header and the exported rows
    again = _cli(other, "bank", "import", str(tmp_path / "bank.csv"), "--client", "platform", "--json")
    assert json.loads(again.stdout)["already_present"] == len(rows)
    platform = _cli(other, "bank", "status", "--client", "platform").output
    assert f"{len(rows)} hashes in the bank of platform ({len(rows)} import)" in platform
    assert "0 hashes" in _cli(other, "bank", "status").output  # the operator's bank there is empty
    # From stdin too, behind a byte-order mark as some Windows tools write one.
    piped = CliRunner().invoke(main, ["bank", "import", "-", "--json"], env=other, input="\ufeff" + exported.stdout)
    assert piped.exit_code == 0, piped.output
    assert json.loads(piped.stdout)["added"] == len(rows)


def test_a_bank_csv_reads_with_or_without_a_header() -> None:
    one, two = "ab" * 32, "CD" * 32
    assert list(read_csv(f"# from a partner\nlabel,hash,quality\nfake ID,{one},90\n\n")) == [
        (3, {"label": "fake ID", "hash": one, "quality": "90"})
    ]
    assert [fields["hash"] for _, fields in read_csv(f"{one}\n{two}\n")] == [one, two]
    with pytest.raises(ValueError, match="no 'hash' column"):
        list(read_csv("name,value\n"))


def test_a_large_import_goes_in_batches_and_accounts_for_every_line(tmp_path: Path) -> None:
    from worker.hashbank import IMPORT_BATCH, add, export_rows, remove, size

    sessions = get_sessionmaker(f"sqlite:///{tmp_path / 'bank.db'}")
    ensure_schema(sessions.kw["bind"])
    rng = np.random.default_rng(5)
    hashes = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes().hex() for _ in range(2 * IMPORT_BATCH + 37)]
    with sessions.begin() as session:
        add(session, None, hashes[3], quality=None, source="review")  # live already
        add(session, None, hashes[4], quality=None, source="review")
        remove(session, None, hashes[4])  # removed: the import brings it back
    lines = [f"{h},90,list A" for h in hashes] + [f"{hashes[7]},90", "zz,90", f"{hashes[8]},lots"]
    report = import_rows(sessions, None, read_csv("\n".join(lines)))
    assert (report.added, report.present, report.invalid_count) == (len(hashes) - 1, 2, 2)
    with sessions() as session:
        assert size(session, None) == len(hashes)
        exported = {row["hash"]: row for row in export_rows(session, None)}
    assert set(exported) == set(hashes) and exported[hashes[4]]["source"] == "import"
    assert exported[hashes[0]]["label"] == "list A" and exported[hashes[3]]["source"] == "review"


# --------------------------------------------------------- the whole loop, real worker


def test_the_loop_through_a_real_worker_and_a_verified_webhook(
    api, sessions, s3_client, bucket, start_service, service_settings
) -> None:
    from test_webhook_delivery import WEBHOOK_ENV, running_receiver

    picture = photo(512, 384, 90)
    s3_client.put_object(Bucket=bucket, Key="upload/1.png", Body=encode(picture, "PNG"))
    s3_client.put_object(Bucket=bucket, Key="upload/2.jpg", Body=encode(picture.resize((256, 192)), "JPEG", quality=70))
    s3_client.put_object(Bucket=bucket, Key="upload/3.png", Body=encode(picture, "PNG"))
    s3_client.put_object(Bucket=bucket, Key="upload/4.jpg", Body=encode(cut(picture, 0, 0, 0.05, 0.05), "JPEG"))
    with running_receiver() as receiver:
        with sessions.begin() as session:
            client = create_client(session, f"loop-{uuid.uuid4().hex[:6]}", all_buckets=True, webhook_url=receiver.url)
        receiver.secrets = [client.webhook_secret]
        headers = {"Authorization": f"Bearer {client.api_key}"}
        start_service("worker", **{**WEBHOOK_ENV, "bank_refresh_s": "0"})

        def scored(key: str) -> dict[str, Any]:
            body = {"objects": [{"bucket": bucket, "key": key}], "threshold": 1.0}
            (image,) = api.post("/v1/scans", json=body, headers=headers).json()["images"]
            url = f"/v1/images/{image['id']}"
            wait_until(lambda: api.get(url, headers=headers).json()["state"] == DONE, message=f"{key} scored")
            return api.get(url, headers=headers).json()

        first = scored("upload/1.png")
        assert first["flagged"] is False and first["pdq"]
        review = api.post(f"/v1/images/{first['id']}/review", json={"verdict": "ai"}, headers=headers)
        assert review.json()["bank"] == "added" and review.json()["crops"] == "pending"
        image_url = f"/v1/images/{first['id']}"
        # The worker fetches the image again and banks its crops.
        wait_until(lambda: api.get(image_url, headers=headers).json()["review"]["crops"] == "banked", message="crops")
        copy = scored("upload/2.jpg")
        assert copy["known_match"]["image_id"] == first["id"] and copy["flagged_by"] == ["known_match"]
        same = scored("upload/3.png")
        assert same["cached_from"] == first["id"] and same["known_match"]["distance"] == 0
        cropped = scored("upload/4.jpg")
        assert cropped["known_match"]["image_id"] == first["id"] and cropped["known_match"]["source"] == "review_crop"

        def flagged_events() -> list[dict[str, Any]]:
            return [json.loads(r.body)["data"] for r in receiver.verified() if json.loads(r.body)["type"] == "image.flagged"]

        wait_until(lambda: len(flagged_events()) == 3, message="the copies' webhooks")
    by_image = {event["image_id"]: event for event in flagged_events()}
    assert by_image[copy["id"]]["known_match"]["image_id"] == first["id"]
    assert by_image[copy["id"]]["flagged_by"] == ["known_match"] and by_image[copy["id"]]["cached_from"] is None
    assert by_image[same["id"]]["cached_from"] == first["id"]
    assert by_image[cropped["id"]]["known_match"]["source"] == "review_crop"
