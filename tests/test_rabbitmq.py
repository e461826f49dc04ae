"""The queue service on RabbitMQ (docs/operations.md, "Moving the broker to RabbitMQ or SQS"): real
``synthguard worker`` processes with ``SYNTHGUARD_BROKER_URL=amqp://...``, PostgreSQL and the moto
S3 server. What changes there is what these tests hold to: both lanes still score, and a worker
killed with messages unacknowledged has them redelivered by RabbitMQ itself, with no sweeper.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator

import pytest
from test_queue import _all_terminal, _upload_copies

from conftest import FlakyS3, image_rows, image_states, wait_until
from worker.celery_app import QUEUES
from worker.models import DONE, PROCESSING
from worker.queueing import enqueue

AMQP_URL = os.environ.get("SYNTHGUARD_TEST_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672//")


def _purge() -> None:
    import kombu

    with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
        for name in QUEUES:
            channel = connection.channel()
            try:
                channel.queue_purge(name)
            except connection.channel_errors:
                pass  # no such queue yet
            finally:
                channel.close()


@pytest.fixture
def amqp_url() -> Iterator[str]:
    """RabbitMQ, its synthguard queues empty at the start and the end of each test."""
    import kombu

    try:
        with kombu.Connection(AMQP_URL, connect_timeout=5) as connection:
            connection.connect()
    except OSError as exc:
        pytest.skip(f"RabbitMQ at {AMQP_URL} is not reachable ({exc}); .ci/run starts it")
    _purge()
    yield AMQP_URL
    _purge()


@pytest.fixture
def amqp_app(service_settings, amqp_url: str):  # type: ignore[no-untyped-def]
    from worker.celery_app import create_app

    settings = service_settings.model_copy(update={"broker_url": amqp_url})
    app = create_app(settings)
    yield settings, app
    app.close()


def test_both_lanes_score_through_rabbitmq(corpus_dir, s3_client, bucket, amqp_app, start_service, sessions) -> None:
    settings, app = amqp_app
    realtime = _upload_copies(s3_client, bucket, corpus_dir, 3, prefix="rt")
    bulk = _upload_copies(s3_client, bucket, corpus_dir, 40, prefix="bulk")
    start_service("worker", broker_url=settings.broker_url)
    queued = [
        enqueue([(bucket, key) for key in realtime], priority="realtime", settings=settings, app=app),
        enqueue([(bucket, key) for key in bulk], priority="bulk", settings=settings, app=app),
    ]
    ids = [image_id for q in queued for image_id in q.image_ids]
    wait_until(lambda: _all_terminal(sessions, ids), message="every image scored through RabbitMQ")
    assert {row.state for row in image_rows(sessions, ids).values()} == {DONE}


def test_a_killed_workers_messages_come_back_from_rabbitmq_without_the_sweeper(
    corpus_dir, s3_client, s3_endpoint, bucket, amqp_app, start_service, sessions
) -> None:
    settings, app = amqp_app
    keys = _upload_copies(s3_client, bucket, corpus_dir, 4)
    # Every claimed image is held at its fetch, so the kill lands with all four unacknowledged.
    proxy = FlakyS3(s3_endpoint, {}, holds=("img/",))
    try:
        doomed = start_service("worker", broker_url=settings.broker_url, concurrency=4, s3_endpoint_url=proxy.url)
        queued = enqueue([(bucket, key) for key in keys], priority="realtime", settings=settings, app=app)
        wait_until(lambda: image_states(sessions, queued.image_ids).get(PROCESSING) == 4, message="all claimed")
        doomed.signal(signal.SIGKILL)
        doomed.wait()
    finally:
        proxy.close()
    # No beat: only RabbitMQ's redelivery of the unacknowledged messages brings them back. The rows
    # are still claimed by the dead worker, so the new one waits out SYNTHGUARD_STALE_AFTER_S for them.
    start_service("worker", broker_url=settings.broker_url, stale_after_s=1)
    wait_until(lambda: _all_terminal(sessions, queued.image_ids), message="redelivered by RabbitMQ")
    rows = image_rows(sessions, queued.image_ids).values()
    assert {row.state for row in rows} == {DONE}
    assert all(row.attempts >= 2 for row in rows)
