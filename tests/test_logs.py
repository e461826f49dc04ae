"""Structured logs: the JSON formatter, redaction, and what a real worker and the API write.

The worker tests read the log file of a real ``synthguard worker`` process: a
line is trusted only once it is on disk in the format operators collect.
"""

from __future__ import annotations

import io
import json
import logging
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from conftest import wait_until
from worker import logs
from worker.db import get_sessionmaker
from worker.models import DONE, FAILED, Image
from worker.queueing import enqueue

SMALL_IMAGE = "real/earth_apollo17.jpg"
API_KEY = "sg_" + "A1b2C3d4E5f6G7h8I9j0" * 2
WEBHOOK_SECRET = "whsec_" + "c2VjcmV0LXNlY3JldC1zZWNyZXQ="


@pytest.fixture
def captured() -> Iterator[tuple[logging.Logger, io.StringIO]]:
    """A logger writing through a JSON handler into a buffer; the log context starts empty."""
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    logger = logging.getLogger(f"synthguard.test.{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    logs.clear()
    yield logger, buffer
    logs.clear()
    logs.configure_logging("text", logging.WARNING)  # back to the defaults: keys off
    logging.getLogger().removeHandler(next(h for h in logging.getLogger().handlers if h.get_name() == "synthguard"))


def _lines(buffer: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in buffer.getvalue().splitlines()]


# ------------------------------------------------------------------ formatter


def test_one_json_object_per_line_with_the_bound_ids(captured) -> None:  # type: ignore[no-untyped-def]
    logger, buffer = captured
    with logs.bound(task_id="t-1", image_id="i-1", scan_id="s-1"):
        logger.info("scored %s", "i-1")
        try:
            raise ValueError("line one\nline two")
        except ValueError:
            logger.exception("failed")
    logger.warning("outside any request")

    assert len(buffer.getvalue().splitlines()) == 3  # the traceback stays inside its line
    first, second, third = _lines(buffer)
    assert {k: first[k] for k in ("level", "logger", "message")} == {
        "level": "INFO",
        "logger": logger.name,
        "message": "scored i-1",
    }
    assert first["time"].endswith("Z")
    assert (first["task_id"], first["image_id"], first["scan_id"]) == ("t-1", "i-1", "s-1")
    assert second["level"] == "ERROR" and "line two" in second["exception"]
    assert "task_id" not in third and "image_id" not in third


def test_celery_lines_outside_the_task_carry_its_ids(captured) -> None:  # type: ignore[no-untyped-def]
    logger, buffer = captured
    image_id, task_id = str(uuid.uuid4()), str(uuid.uuid4())
    data = {"id": task_id, "name": "synthguard.score_image", "args": f"('{image_id}',)", "kwargs": "{}"}
    logger.info("Task %(name)s[%(id)s] received", data, extra={"data": data})
    (line,) = _lines(buffer)
    assert (line["task_id"], line["image_id"]) == (task_id, image_id)


@pytest.mark.parametrize(
    ("text", "secret"),
    [
        (f"client key {API_KEY} refused", API_KEY),
        (f"signing with {WEBHOOK_SECRET}", WEBHOOK_SECRET),
        ("cannot connect to postgresql+psycopg://synthguard:hunter2@db:5432/sg", "hunter2"),
        ("redis://:s3cr3tpass@redis:6379/0 is down", "s3cr3tpass"),
        (f"headers {{'Authorization': 'Bearer {API_KEY}'}}", API_KEY),
        ("Authorization: Basic dXNlcjpwYXNz", "dXNlcjpwYXNz"),
    ],
)
def test_secrets_are_redacted(captured, text: str, secret: str) -> None:  # type: ignore[no-untyped-def]
    logger, buffer = captured
    logger.warning(text)
    try:
        raise RuntimeError(text)
    except RuntimeError:
        logger.exception("again")
    assert secret not in buffer.getvalue()
    assert "[REDACTED]" in _lines(buffer)[0]["message"]
    assert secret not in logs.redact(text)


def test_redaction_keeps_what_is_not_secret() -> None:
    text = "postgresql+psycopg://synthguard@db/sg s3://bucket/sg_x.jpg whsec_ alone"
    assert logs.redact(text) == text


def test_object_keys_are_logged_only_when_allowed(captured) -> None:  # type: ignore[no-untyped-def]
    logger, buffer = captured
    key = "kyc/Jane Doe passport.jpg"
    with logs.bound(image_id="i-1", bucket="uploads", object_key=key):
        logger.warning("s3://uploads/%s?versionId=v1: access denied", key)
        logs.configure_logging("json", logging.WARNING, log_object_keys=True)
        logger.warning("s3://uploads/%s: access denied", key)
    hidden, shown = _lines(buffer)
    assert key not in json.dumps(hidden) and "uploads" not in hidden["message"]
    assert hidden["message"] == f"{logs.KEY_PLACEHOLDER}: access denied"
    assert "object_key" not in hidden and "bucket" not in hidden
    assert (shown["object_key"], shown["bucket"]) == (key, "uploads")


# ---------------------------------------------------------------- real worker


def _run_worker(start_service, s3_client, bucket, corpus_dir, service_settings, celery_app, sessions, **env):  # type: ignore[no-untyped-def]
    """Score one JPEG and one SVG through a real JSON-logging worker; the ids, the keys, the log lines."""
    keys = ["kyc/Jane Doe/selfie.jpg", "kyc/Jane Doe/drawing.svg"]
    s3_client.put_object(Bucket=bucket, Key=keys[0], Body=(corpus_dir / SMALL_IMAGE).read_bytes())
    s3_client.put_object(Bucket=bucket, Key=keys[1], Body=(corpus_dir / "bad" / "image.svg").read_bytes())
    worker = start_service("worker", log_format="json", **env)
    queued = enqueue([(bucket, key) for key in keys], settings=service_settings, app=celery_app)

    def terminal() -> bool:
        with sessions() as session:
            rows = session.query(Image.state).filter(Image.id.in_(queued.image_ids)).all()
        return sorted(r.state for r in rows) == [DONE, FAILED]

    wait_until(terminal, message="both images terminal")
    ids = {str(i) for i in queued.image_ids}
    # The task's last line ("succeeded") is written just after the row is terminal.
    wait_until(
        lambda: worker.log_path.read_text().count("succeeded in") >= 2, message="both task runs logged"
    )
    text = worker.log_path.read_text(errors="replace")
    after_start = text[text.index(" ready.") :].split("\n", 1)[1]
    return ids, str(queued.scan_id), keys, after_start.splitlines()


def test_worker_task_lines_carry_their_ids_and_no_keys(
    start_service, s3_client, bucket, corpus_dir, service_settings, celery_app, sessions
) -> None:
    ids, scan_id, keys, lines = _run_worker(
        start_service, s3_client, bucket, corpus_dir, service_settings, celery_app, sessions
    )
    docs = []
    for line in lines:
        assert line.startswith("{"), f"not a JSON line after start-up: {line!r}"
        docs.append(json.loads(line))
    task_lines = [d for d in docs if "task_id" in d or any(i in d["message"] for i in ids)]
    image_lines = [d for d in task_lines if d.get("image_id") in ids or any(i in d["message"] for i in ids)]
    assert image_lines
    for doc in image_lines:
        assert doc.get("task_id") and doc.get("image_id") in ids, doc
    for image_id in ids:
        # Each run claimed its image, so its later lines (at least "succeeded") name the scan.
        mine = [d for d in image_lines if d["image_id"] == image_id]
        assert any(d.get("scan_id") == scan_id for d in mine), mine
        assert any("received" in d["message"] for d in mine) and any("succeeded" in d["message"] for d in mine)
    text = "\n".join(lines)
    assert not any(key in text for key in keys) and "Jane Doe" not in text
    assert "object_key" not in text


def test_worker_logs_keys_as_fields_when_allowed(
    start_service, s3_client, bucket, corpus_dir, service_settings, celery_app, sessions
) -> None:
    ids, _, keys, lines = _run_worker(
        start_service, s3_client, bucket, corpus_dir, service_settings, celery_app, sessions, log_object_keys="true"
    )
    docs = [json.loads(line) for line in lines]
    assert {d["object_key"] for d in docs if "object_key" in d} == set(keys)
    assert all(d["bucket"] == bucket and d["image_id"] in ids for d in docs if "object_key" in d)


# ----------------------------------------------------------------------- API


def test_api_access_line_has_the_request_and_no_key(service_settings, celery_app, pg_url, caplog) -> None:  # type: ignore[no-untyped-def]
    from fastapi.testclient import TestClient

    from api_stub.app import create_app
    from worker.clients import create_client

    with get_sessionmaker(pg_url).begin() as session:
        api_key = create_client(session, "log-test", all_buckets=True).api_key
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logs.JsonFormatter())
    access = logging.getLogger("synthguard.access")
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    missing = uuid.uuid4()
    try:
        with TestClient(create_app(service_settings, celery=celery_app)) as http:
            answer = http.get(
                f"/v1/images/{missing}", headers={"Authorization": f"Bearer {api_key}", "X-Request-ID": "req-42"}
            )
            fresh = http.get("/healthz")
    finally:
        access.removeHandler(handler)
    assert answer.status_code == 404 and answer.headers["x-request-id"] == "req-42"
    assert fresh.headers["x-request-id"]
    first, second = _lines(buffer)
    assert {k: first[k] for k in ("method", "route", "status", "request_id", "image_id")} == {
        "method": "GET",
        "route": "/v1/images/{image_id}",
        "status": 404,
        "request_id": "req-42",
        "image_id": str(missing),
    }
    assert first["duration_ms"] >= 0 and first["logger"] == "synthguard.access"
    assert second["request_id"] == fresh.headers["x-request-id"]
    assert api_key not in buffer.getvalue() and "Bearer" not in buffer.getvalue()
