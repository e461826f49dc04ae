"""A real ``synthguard worker`` serves Prometheus metrics that move with its work.

Synchronises on image rows in PostgreSQL and on the scraped series, never on sleeps.
"""

from __future__ import annotations

import urllib.request
import uuid
from pathlib import Path

from corpus import encode
from PIL import Image as PILImage
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy import func, select

from conftest import _free_port, wait_until
from worker.celery_app import QUEUES
from worker.metrics import STAGES, QueueDepthCollector, stamp_start
from worker.models import DONE, FAILED, Image
from worker.preparing import usable_cores
from worker.queueing import enqueue

GOOD = "real/earth_apollo17.jpg"
SVG = "bad/image.svg"
N_GOOD = 5

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    """Every sample on the worker's /metrics, keyed by name and labels."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        text = response.read().decode()
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def _terminal(sessions, ids: list[uuid.UUID]) -> bool:  # type: ignore[no-untyped-def]
    with sessions() as session:
        n = session.scalar(select(func.count()).where(Image.id.in_(ids), Image.state.in_((DONE, FAILED))))
    return n == len(ids)


def test_a_real_worker_exports_metrics_that_move(
    corpus_dir: Path, s3_client, bucket, service_settings, celery_app, start_service, sessions
) -> None:
    port = _free_port()
    start_service("worker", metrics_port=port)
    before = scrape(port)
    # Nothing was scored yet, but the model and the queues are already visible.
    assert value(before, "synthguard_images_scored_total", flagged="true") == 0.0
    versions = {dict(labels)["version"] for name, labels in before if name == "synthguard_model_info"}
    assert len(versions) == 1 and next(iter(versions)).startswith("sha256:")

    original = PILImage.open(corpus_dir / GOOD)
    keys = [f"good/{i}.jpg" for i in range(N_GOOD)]
    for quality, key in enumerate(keys, start=80):
        # Different bytes for each: identical ones would reuse the first result and skip every stage.
        s3_client.put_object(Bucket=bucket, Key=key, Body=encode(original, "JPEG", quality=quality))
    s3_client.put_object(Bucket=bucket, Key="bad/image.svg", Body=(corpus_dir / SVG).read_bytes())
    queued = enqueue(
        [(bucket, key) for key in [*keys, "bad/image.svg"]],
        priority="realtime",
        settings=service_settings,
        app=celery_app,
    )
    wait_until(lambda: _terminal(sessions, queued.image_ids), message="every image terminal")
    with sessions() as session:
        done = session.scalar(select(func.count()).where(Image.id.in_(queued.image_ids), Image.state == DONE))
        model_version = session.scalar(
            select(Image.model_version).where(Image.id.in_(queued.image_ids), Image.state == DONE).limit(1)
        )
    assert done == N_GOOD

    after = scrape(port)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    scored = sum(moved("synthguard_images_scored_total", flagged=f) for f in ("true", "false", "unknown"))
    assert scored == N_GOOD
    assert moved("synthguard_images_failed_total", code="unsupported_format") == 1
    assert moved("synthguard_batch_size_count") > 0
    assert moved("synthguard_batch_size_sum") == N_GOOD  # every decoded image went through one forward pass
    assert moved("synthguard_batch_fill_seconds_count") > 0
    for stage in STAGES:
        assert moved("synthguard_stage_seconds_count", stage=stage) > 0, stage
    # Only decodable images reach preprocessing; the SVG stops at decode.
    assert moved("synthguard_stage_seconds_count", stage="preprocess") == N_GOOD
    assert moved("synthguard_stage_seconds_count", stage="queue_wait") == N_GOOD
    assert moved("synthguard_stage_seconds_count", stage="store") == N_GOOD
    info = [dict(labels) for name, labels in after if name == "synthguard_model_info"]
    assert [i["version"] for i in info] == [model_version] and info[0]["device"] == "cpu"
    for queue in QUEUES:
        assert ("synthguard_queue_depth", frozenset({("queue", queue)})) in after, queue
    # The default: one preparing process per core, all idle again once every image is stored.
    assert value(after, "synthguard_prepare_processes", state="idle") == usable_cores()
    assert value(after, "synthguard_prepare_processes", state="busy") == 0


def test_queue_depth_skips_brokers_it_cannot_ask() -> None:
    """No series, and no error, for a non-Redis broker or a Redis that does not answer."""
    assert list(QueueDepthCollector("amqp://guest@localhost//", QUEUES).collect()) == []
    closed_port = _free_port()
    assert list(QueueDepthCollector(f"redis://127.0.0.1:{closed_port}/0", QUEUES).collect()) == []


def test_stamp_start_keeps_results_and_order() -> None:
    stamped = stamp_start(lambda items: [i * 2 for i in items])
    results = stamped([1, 2, 3])
    assert [r for r, _ in results] == [2, 4, 6]
    assert len({started for _, started in results}) == 1
