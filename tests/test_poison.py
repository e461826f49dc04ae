"""Poison-proof: every image reaches a terminal state within its attempts, whatever its bytes.

The sanitising boundary is property-tested with Hypothesis (and against real
PostgreSQL, which refuses what it must remove); the scorer runs against real
PostgreSQL and the moto S3 server with files the tests build.
"""

from __future__ import annotations

import io
import json
import math
import uuid
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import select, text, update
from sqlalchemy.orm import Session, sessionmaker

from worker import errors
from worker.clients import create_client
from worker.db import get_sessionmaker
from worker.detector import Detector
from worker.intake import create_scan
from worker.models import DONE, FAILED, PROCESSING, Image, Scan, WebhookDelivery
from worker.sanitise import BIDI, CLIPPED, CONTROL, ELLIPSIS, INVALID_UTF8, SURROGATE, clean_json, clean_text
from worker.scoring import Scorer, ScoreResult
from worker.storage import ObjectRef

# Characters the boundary must never let through.
FORBIDDEN = {chr(c) for c in [*range(0x00, 0x09), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0xA0)]}
# Bidirectional embeddings, overrides and isolates: they make a reviewer's screen show other text.
BIDI_CONTROLS = {chr(c) for c in [*range(0x202A, 0x202F), *range(0x2066, 0x206A)]}

# Any Python string, lone surrogates included (Hypothesis's default text() leaves them out).
any_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF))
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=20,
)


def _safe(value: str) -> bool:
    value.encode("utf-8")  # raises on a lone surrogate
    return not (set(value) & (FORBIDDEN | BIDI_CONTROLS))


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in (k, *_strings(v))]
    if isinstance(value, list):
        return [s for item in value for s in _strings(item)]
    return []


# ------------------------------------------------------------ the boundary


@given(value=any_text | st.binary(), limit=st.integers(1, 400))
def test_clean_text_is_always_storable_and_within_its_limit(value: str | bytes, limit: int) -> None:
    changes: Counter[str] = Counter()
    cleaned = clean_text(value, limit, changes)
    assert _safe(cleaned) and len(cleaned) <= limit
    assert clean_text(cleaned, limit) == cleaned  # a second pass changes nothing
    try:
        as_text = value.decode("utf-8") if isinstance(value, bytes) else value
    except UnicodeDecodeError:
        as_text = None
    assert bool(changes) == (cleaned != as_text)  # every change is recorded, and only changes
    if changes[CLIPPED]:
        assert cleaned.endswith(ELLIPSIS)


@given(
    value=st.text(st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters=sorted(BIDI_CONTROLS))),
    limit=st.integers(1, 400),
)
def test_clean_text_keeps_clean_text_as_it_is(value: str, limit: int) -> None:
    changes: Counter[str] = Counter()
    cleaned = clean_text(value, limit, changes)
    if len(value) <= limit:
        assert cleaned == value and not changes
    else:
        assert cleaned == value[: limit - 1] + ELLIPSIS and changes == Counter({CLIPPED: 1})


def test_clean_text_names_what_it_changed() -> None:
    changes: Counter[str] = Counter()
    assert clean_text("a\ud800b\x00c\x1bd\te\nf", 100, changes) == "a\ufffdb\ufffdc\ufffdd\te\nf"
    assert changes == Counter({SURROGATE: 1, CONTROL: 2})
    changes.clear()
    assert clean_text(b"ok \xff\xfe", 100, changes) == "ok \ufffd\ufffd"
    assert changes == Counter({INVALID_UTF8: 1})
    changes.clear()
    # An override that would show "Adobe Firefly" reversed; the right-to-left mark Arabic text needs stays.
    assert clean_text("Adobe \u202eFirefly\u202c \u200f\u0645", 100, changes) == "Adobe \ufffdFirefly\ufffd \u200f\u0645"
    assert changes == Counter({BIDI: 2})


@given(value=json_like, limit=st.integers(1, 200))
def test_clean_json_makes_any_value_strict_json(value: Any, limit: int) -> None:
    cleaned = clean_json(value, limit)
    json.dumps(cleaned, allow_nan=False).encode("utf-8")
    assert all(_safe(s) and len(s) <= limit for s in _strings(cleaned))


@settings(max_examples=60, deadline=None)
@given(value=json_like)
def test_postgresql_stores_whatever_the_boundary_lets_through(value: Any, pg_url: str) -> None:
    cleaned = clean_json(value, 300)
    with get_sessionmaker(pg_url)() as session:
        stored = session.scalar(text("SELECT CAST(:doc AS jsonb)"), {"doc": json.dumps(cleaned)})
        assert session.scalar(text("SELECT CAST(:t AS text)"), {"t": clean_text(str(value), 300)}) is not None
    assert stored == cleaned or _floats_close(stored, cleaned)


def _floats_close(a: Any, b: Any) -> bool:
    """jsonb keeps numbers as numeric: a float can come back as an equal int, or re-rounded."""
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_floats_close(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_floats_close(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(a, b, rel_tol=1e-12)
    return bool(a == b)


# ---------------------------------------------------------------- the engine


def _png(**chunks: str) -> bytes:
    info = PngInfo()
    for key, value in chunks.items():
        info.add_text(key, value)
    out = io.BytesIO()
    PILImage.new("RGB", (64, 64), (120, 80, 200)).save(out, "PNG", pnginfo=info)
    return out.getvalue()


def _queue(sessions: sessionmaker[Session], bucket: str, keys: list[str], **scan: Any) -> list[uuid.UUID]:
    with sessions.begin() as session:
        _, ids = create_scan(
            session, [ObjectRef(bucket, key) for key in keys], origin="test", threshold=0.5, **scan
        )
    return ids


def _stored_pngs(s3_client: Any, sessions: sessionmaker[Session], bucket: str, keys: list[str]) -> list[uuid.UUID]:
    """A small PNG under each key, queued as one scan."""
    for key in keys:
        s3_client.put_object(Bucket=bucket, Key=key, Body=_png())
    return _queue(sessions, bucket, keys)


def _row(sessions: sessionmaker[Session], image_id: uuid.UUID) -> Image:
    with sessions() as session:
        row = session.get(Image, image_id)
        assert row is not None
        session.expunge(row)
        return row


@pytest.mark.parametrize("prepare_processes", [0, 2], ids=["prepared-in-threads", "prepared-in-processes"])
def test_a_comfyui_prompt_with_a_lone_surrogate_is_done_in_one_attempt_with_clean_evidence(
    settings_factory, pg_url, sessions, s3_client, bucket, s3_endpoint, prepare_processes
) -> None:
    # The reported file: a ComfyUI prompt whose checkpoint name holds the JSON escape \ud800,
    # plus NUL and escape characters elsewhere in its text.
    prompt = json.dumps(
        {
            "4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl\ud800base.safetensors"}},
            "6": {"class_type": "CLIPTextEncode", "inputs": {"text": "a cat\x00\x1b[31m"}},
        }
    )
    assert "\\ud800" in prompt  # ASCII in the file; the surrogate appears when the JSON is parsed
    s3_client.put_object(Bucket=bucket, Key="comfy.png", Body=_png(prompt=prompt, Comment="x\x00y"))
    (image_id,) = _queue(sessions, bucket, ["comfy.png"])
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, prepare_processes=prepare_processes)
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        outcome = scorer.process_image(image_id)
    assert outcome.state == DONE, outcome
    row = _row(sessions, image_id)
    assert row.attempts == 1 and row.state == DONE
    assert all(_safe(s) for s in _strings(row.provenance))
    params = row.provenance["signals"]["generation_params"]
    assert params["ai"] and "sd_xl\ufffdbase.safetensors" in json.dumps(params["evidence"], ensure_ascii=False)
    assert row.provenance["text_cleaned"][SURROGATE] >= 1


def _scorer_with(settings: Any, sessions: sessionmaker[Session], score: Any) -> Scorer:
    """A Scorer whose score() is ``score(scorer, ref, original)``: to put one bad result or bug in a batch."""

    class Poisoned(Scorer):
        def score(self, ref: ObjectRef, *, realtime: bool = False, reuse: Any = None) -> ScoreResult:
            return score(ref, lambda: Scorer.score(self, ref, realtime=realtime, reuse=reuse))

    return Poisoned(settings, Detector.from_settings(settings), sessions=sessions)


def test_a_result_the_database_refuses_fails_only_its_image_at_once(
    settings_factory, pg_url, sessions, s3_client, bucket, s3_endpoint
) -> None:
    ids = _stored_pngs(s3_client, sessions, bucket, [f"img{i}.png" for i in range(6)])

    def score(ref: ObjectRef, original: Any) -> ScoreResult:
        result = original()
        if ref.key == "img3.png":
            # Past the boundary on purpose: jsonb refuses \u0000, as it refused the reported surrogate.
            return replace(result, provenance={"ai": False, "signals": {}, "bad": "nul\x00here"})
        return result

    settings = settings_factory(
        database_url=pg_url, s3_endpoint_url=s3_endpoint, prepare_processes=0, batch_size=8, batch_wait_ms=200
    )
    with _scorer_with(settings, sessions, score) as scorer, ThreadPoolExecutor(6) as pool:
        outcomes = dict(zip(ids, pool.map(scorer.process_image, ids), strict=True))
    poisoned = ids[3]
    assert outcomes[poisoned].state == FAILED and outcomes[poisoned].error_code == errors.INTERNAL_ERROR
    row = _row(sessions, poisoned)
    assert row.attempts == 1 and "storing the result failed" in (row.error_message or "")
    assert {outcomes[i].state for i in ids if i != poisoned} == {DONE}


def test_a_bug_met_by_one_image_fails_it_at_once_and_never_its_batch_mates(
    settings_factory, pg_url, sessions, s3_client, bucket, s3_endpoint
) -> None:
    ids = _stored_pngs(s3_client, sessions, bucket, [f"b{i}.png" for i in range(4)])

    def score(ref: ObjectRef, original: Any) -> ScoreResult:
        if ref.key == "b1.png":
            raise ValueError("a reader's bug\x00 quoting the file")
        return original()

    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, prepare_processes=0)
    with _scorer_with(settings, sessions, score) as scorer, ThreadPoolExecutor(4) as pool:
        outcomes = list(pool.map(scorer.process_image, ids))
    assert [o.state for o in outcomes] == [DONE, FAILED, DONE, DONE]
    row = _row(sessions, ids[1])
    assert row.error_code == errors.INTERNAL_ERROR and row.attempts == 1
    assert row.error_message == "ValueError: a reader's bug\ufffd quoting the file"


def test_an_image_whose_attempts_all_ended_in_a_crash_ends_too_many_attempts(
    settings_factory, pg_url, sessions, s3_client, bucket, s3_endpoint
) -> None:
    s3_client.put_object(Bucket=bucket, Key="killer.png", Body=_png())
    with sessions.begin() as session:
        client_id = create_client(session, f"poison-{uuid.uuid4().hex[:8]}", all_buckets=True).client.id
    (image_id,) = _queue(
        sessions,
        bucket,
        ["killer.png"],
        client_id=client_id,
        callback_url="https://receiver.example/hook",
        webhook_events=["scan.completed"],
    )
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, prepare_processes=0, max_attempts=3)
    # Three claims, each followed by the worker's death (SIGKILL, an OOM kill): the row stayed
    # processing with its attempts spent and the last retry's message.
    with sessions.begin() as session:
        session.execute(
            update(Image)
            .where(Image.id == image_id)
            .values(state=PROCESSING, attempts=3, error_message="retrying after storage_unavailable: 503")
        )
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        outcome = scorer.process_image(image_id)
    assert outcome.state == FAILED and outcome.error_code == errors.TOO_MANY_ATTEMPTS
    row = _row(sessions, image_id)
    assert row.attempts == 4 and row.score is None  # not scored: the claim ended it
    assert "gave up after 3 attempts" in (row.error_message or "")
    assert "storage_unavailable: 503" in (row.error_message or "")
    with sessions() as session:
        scan = session.get(Scan, row.scan_id)
        assert scan is not None and scan.completed_at is not None and scan.pending_count == 0
        events = session.scalars(select(WebhookDelivery.event_type).where(WebhookDelivery.scan_id == row.scan_id))
        assert list(events) == ["scan.completed"]


# ------------------------------------------------------------------- the API


@pytest.fixture
def api(api, sessions):  # type: ignore[no-untyped-def]
    """conftest's API, authenticated as a new client with every bucket."""
    with sessions.begin() as session:
        created = create_client(session, f"texts-{uuid.uuid4().hex[:8]}", all_buckets=True)
    api.headers["Authorization"] = f"Bearer {created.api_key}"
    return api


def _raw(body: str) -> dict[str, Any]:
    """A request body sent as written: JSON escapes such as \\ud800 reach the server untouched."""
    return {"content": body.encode("ascii"), "headers": {"Content-Type": "application/json"}}


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "metadata": {"note": "a\\u0000b"}}', "metadata.note"),
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "metadata": {"note": "\\ud800"}}', "lone surrogate"),
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "metadata": {"n\\u001bx": 1}}', "a key of metadata"),
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "metadata": {"l": ["ok", "\\u0007"]}}', "metadata.l[1]"),
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "metadata": ' + '{"a": ' * 40 + "1" + "}" * 40 + "}",
         "nested deeper"),
        ('{"objects": [{"bucket": "uploads", "key": "a\\udc80.jpg"}]}', "key"),
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "idempotency_key": "k\\u0000"}', "idempotency_key"),
        ('{"objects": [{"bucket": "uploads", "key": "a.jpg"}], "callback_url": "https://h.example/\\u0000"}',
         "callback_url"),
    ],
    ids=["nul", "surrogate", "key-control", "list-control", "too-deep", "object-key", "idempotency", "callback"],
)
def test_bad_text_in_a_scan_request_is_422_naming_where(api, body: str, named: str) -> None:
    response = api.post("/v1/scans", **_raw(body))
    assert response.status_code == 422, response.text
    (error,) = response.json()["errors"]  # that field alone: the rest of the request is valid
    assert named in json.dumps(error), error


def test_bad_text_in_s3_event_fields_is_422_never_500(api) -> None:
    def record(key: str, etag: str = "abc") -> dict[str, Any]:
        return {"eventName": "ObjectCreated:Put", "s3": {"bucket": {"name": "uploads"}, "object": {"key": key, "eTag": etag}}}

    nul_key = api.post("/v1/s3-events", json={"Records": [record("a%00.jpg")]})
    assert nul_key.status_code == 422 and "s3.object.key" in nul_key.text
    bad_etag = api.post("/v1/s3-events", json={"Records": [record("a.jpg", "e\x01")]})
    assert bad_etag.status_code == 422 and "s3.object.eTag" in bad_etag.text
    surrogate = api.post("/v1/s3-events", **_raw('{"Records": [{"eventName": "ObjectCreated:Put", '
                                                 '"s3": {"bucket": {"name": "uploads"}, "object": {"key": "\\ud800"}}}]}'))
    assert surrogate.status_code == 422 and "s3.object.key" in surrogate.text


def test_a_database_error_is_logged_without_the_values_it_quotes(pg_url: str) -> None:
    from sqlalchemy.exc import DataError

    from worker.db import loggable, make_engine, refusal

    engine = make_engine(pg_url)
    with pytest.raises(DataError) as failed, engine.connect() as conn:
        conn.execute(text("SELECT CAST(:key AS integer)"), {"key": "kyc/passport-of-jane-doe.jpg"})
    engine.dispose()
    # PostgreSQL quotes the value in its own message; the engine hides the parameters.
    assert "jane-doe" in str(failed.value) and "parameters hidden" in str(failed.value)
    line = loggable(failed.value)
    assert "jane-doe" not in line and "22P02" in line and "CAST" in line
    assert refusal(failed.value).startswith("InvalidTextRepresentation: invalid input syntax for type integer")


# ------------------------------------------------------ preparing processes


@pytest.fixture
def spec(settings_factory):  # type: ignore[no-untyped-def]
    from worker.preparing import PrepareSpec

    settings = settings_factory(model_freeze_cpu=False)
    return PrepareSpec.from_settings(settings, Detector.from_settings(settings))


def test_a_preparing_process_holds_no_credentials_database_url_or_secrets(spec, monkeypatch) -> None:
    from worker.preparing import ProcessPreparer

    monkeypatch.setenv("SYNTHGUARD_DATABASE_URL", "postgresql+psycopg://svc:db-password@db/synthguard")
    monkeypatch.setenv("SYNTHGUARD_SECRET_KEY", "fernet-key-material")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "session-token")
    preparer = ProcessPreparer(1, spec, hard_timeout_s=60)
    try:
        (child,) = preparer._idle
        assert child is not None
        raw = Path(f"/proc/{child.process.pid}/environ").read_bytes()
        assert preparer.prepare(_png()).width == 64  # the fenced child still prepares images
    finally:
        preparer.close()
    names = {entry.split(b"=", 1)[0].decode() for entry in raw.split(b"\0") if entry}
    assert "PATH" in names
    leaked = {n for n in names if n.startswith(("AWS_", "SYNTHGUARD_"))}
    assert not leaked, leaked
    for secret in (b"db-password", b"fernet-key-material", b"session-token", b"testing"):
        assert secret not in raw  # conftest's AWS keys ("testing") were set before any child started


def _big_blank_png(width: int, height: int) -> bytes:
    out = io.BytesIO()
    PILImage.new("L", (width, height), 0).save(out, "PNG", optimize=False, compress_level=9)
    return out.getvalue()


def _big_blank(fmt: str, width: int = 6000, height: int = 6000) -> bytes:
    """A small file of a large blank image (36 megapixels by default)."""
    if fmt == "PNG":
        return _big_blank_png(width, height)
    out = io.BytesIO()
    PILImage.new("RGB", (width, height), (0, 0, 0)).save(out, fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    return out.getvalue()


# libwebp, libheif and libavif say a failed allocation is a failed decode; PNG's is a MemoryError.
@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "HEIF", "AVIF"])
def test_an_image_past_the_memory_cap_fails_too_large_in_one_attempt(
    settings_factory, pg_url, sessions, s3_client, bucket, s3_endpoint, fmt
) -> None:
    # 36 megapixels, within the pixel cap, but a 64 MiB address-space cap cannot hold its RGB copy.
    bomb = _big_blank(fmt)
    assert len(bomb) < 200_000
    s3_client.put_object(Bucket=bucket, Key="expands", Body=bomb)
    s3_client.put_object(Bucket=bucket, Key="small.png", Body=_png())
    big, small = _queue(sessions, bucket, ["expands", "small.png"])
    settings = settings_factory(
        database_url=pg_url, s3_endpoint_url=s3_endpoint, prepare_processes=1, prepare_memory_mb=64
    )
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        outcome = scorer.process_image(big)
        after = scorer.process_image(small)  # the same child goes on with the next image
    assert outcome.state == FAILED and outcome.error_code == errors.TOO_LARGE, outcome
    assert "SYNTHGUARD_PREPARE_MEMORY_MB" in (outcome.error_message or "")
    assert _row(sessions, big).attempts == 1
    assert after.state == DONE


def test_bytes_over_the_memory_cap_fail_too_large_and_the_next_image_is_prepared(spec) -> None:
    from worker.errors import PermanentError
    from worker.preparing import ProcessPreparer

    # The child cannot even take 48 MB of bytes under a 16 MiB cap: it exits, and is replaced.
    preparer = ProcessPreparer(1, replace(spec, memory_bytes=16 << 20), hard_timeout_s=60)
    try:
        with pytest.raises(PermanentError) as failed:
            preparer.prepare(b"BM" + bytes(48 << 20))
        assert preparer.prepare(_png()).width == 64
    finally:
        preparer.close()
    assert failed.value.code == errors.TOO_LARGE
    assert "SYNTHGUARD_PREPARE_MEMORY_MB" in failed.value.message


def test_a_webp_canvas_over_the_pixel_cap_is_refused_before_it_is_allocated(spec) -> None:
    from worker.errors import PermanentError
    from worker.imaging import decode_image
    from worker.preparing import ProcessPreparer

    # A 16 x 16 WebP whose VP8X header declares a 16383 x 16383 canvas: opening it, Pillow's reader
    # would allocate 2 GB, which the child's 64 MiB cap refuses. The header check comes first.
    out = io.BytesIO()
    PILImage.new("RGB", (16, 16)).save(out, "WEBP", exif=PILImage.Exif())
    data = bytearray(out.getvalue())
    assert data[12:16] == b"VP8X"
    data[24:30] = (16382).to_bytes(3, "little") * 2
    preparer = ProcessPreparer(1, replace(spec, memory_bytes=64 << 20), hard_timeout_s=60)
    try:
        with pytest.raises(PermanentError) as in_child:
            preparer.prepare(bytes(data))
    finally:
        preparer.close()
    with pytest.raises(PermanentError) as in_thread:
        decode_image(bytes(data), max_pixels=spec.max_pixels)
    for failed in (in_child.value, in_thread.value):
        assert failed.code == errors.TOO_LARGE
        assert "16383x16383" in failed.message and "over the cap" in failed.message


def _whole_image_grey(values: Any, mode: str) -> Any:
    """The conversion as it was, on whole-image int64/float64 copies: the values strips must match."""
    import numpy as np

    if mode.startswith("I"):
        return (np.clip(values.astype(np.int64), 0, 0xFFFF) >> 8).astype(np.uint8)
    floats = np.nan_to_num(values.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)
    if floats.min() >= 0.0 and floats.max() <= 1.0:
        floats = floats * 255.0
    return np.rint(np.clip(floats, 0.0, 255.0)).astype(np.uint8)


@pytest.mark.parametrize("case", ["I;16", "I", "F-normalised", "F-0-to-255"])
def test_wide_pixel_modes_convert_in_strips_with_the_same_values(case: str) -> None:
    import tracemalloc

    import numpy as np

    from worker.imaging import _to_rgb

    rng = np.random.default_rng(7)
    shape = (1500, 1400)
    mode = case.split("-")[0]
    if mode == "F":
        values = rng.random(shape, dtype=np.float32) * (1.0 if case == "F-normalised" else 300.0)
        values[0, :2] = [np.nan, -np.inf]
    else:
        low, high = (0, 65536) if mode == "I;16" else (-70000, 70000)
        values = rng.integers(low, high, shape).astype(np.uint16 if mode == "I;16" else np.int32)
    image = PILImage.fromarray(values)
    assert image.mode == mode
    tracemalloc.start()
    try:
        converted = _to_rgb(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert np.array_equal(np.asarray(converted)[..., 0], _whole_image_grey(values, mode))
    # np.asarray itself peaks at twice the image (Pillow's bytes, then numpy's copy); beyond that,
    # the 8-bit result and one strip's temporaries. A whole-image int64 or float64 copy alone
    # would add 8 bytes a pixel.
    assert peak < 2 * values.nbytes + 3 * values.size, (peak, values.nbytes)


def test_a_refused_statement_in_the_api_is_500_and_logged_without_its_values(
    service_settings, celery_app, pg_url, caplog
) -> None:
    import logging

    from fastapi.testclient import TestClient

    from api_stub.app import create_app

    app = create_app(service_settings, celery=celery_app)

    def refused() -> None:  # a route whose statement the database refuses, quoting the value
        with get_sessionmaker(pg_url)() as session:
            session.execute(text("SELECT CAST(:key AS integer)"), {"key": "kyc/passport-of-jane-doe.jpg"})

    app.add_api_route("/refused", refused)
    with caplog.at_level(logging.ERROR), TestClient(app, raise_server_exceptions=False) as client:
        response = client.get("/refused")
    assert response.status_code == 500 and response.headers["content-type"].startswith("application/problem+json")
    assert "jane-doe" not in response.text
    logged = "\n".join(r.getMessage() + (str(r.exc_info) if r.exc_info else "") for r in caplog.records)
    assert "22P02" in logged and "jane-doe" not in logged
