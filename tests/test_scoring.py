"""The engine end to end, minus the broker: parity with a plain reference, idempotent
results, bounded retries. Real PostgreSQL, real S3 server, real checkpoints."""

from __future__ import annotations

import io
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageOps
from sqlalchemy import select
from timm.data import create_transform, resolve_data_config

import worker.imaging  # noqa: F401  (registers the HEIF opener for the reference too)
from conftest import good_fixture_files
from worker.db import ensure_schema, make_engine, make_sessionmaker
from worker.detector import Detector
from worker.imaging import spread_frames
from worker.intake import create_scan
from worker.models import DONE, FAILED, Scan
from worker.models import Image as ImageRow
from worker.scoring import Scorer, process_with_retries
from worker.storage import ObjectRef


def reference_score(model: torch.nn.Module, path: Path, max_frames: int = 8) -> float:
    """The plain way: PIL image -> timm eval transform -> model -> softmax, one image at a time; for an
    animated GIF, WebP or PNG, the highest of its frames spread as SYNTHGUARD_MAX_FRAMES spreads them."""
    opened = Image.open(path)
    transform = create_transform(**resolve_data_config(model=model), is_training=False)
    animated = getattr(opened, "is_animated", False) and opened.format in ("GIF", "WEBP", "PNG")
    scores = []
    for index in spread_frames(opened.n_frames, max_frames) if animated else [0]:
        opened.seek(index)
        image = ImageOps.exif_transpose(opened).convert("RGB")
        with torch.inference_mode():
            scores.append(float(model(transform(image).unsqueeze(0)).softmax(-1)[0, 0]))
    return max(scores)


@pytest.mark.parametrize("prepare_processes", [0, 2], ids=["prepared-in-threads", "prepared-in-processes"])
def test_batched_scores_equal_the_one_at_a_time_reference(
    fixtures_dir, settings_factory, test_model, prepare_processes
) -> None:
    files = good_fixture_files(fixtures_dir)
    assert len(files) >= 20
    settings = settings_factory(batch_size=8, batch_wait_ms=20.0, prepare_processes=prepare_processes)
    with Scorer(settings, Detector.from_settings(settings), allow_local=True) as scorer, ThreadPoolExecutor(8) as pool:
        batched = list(pool.map(lambda p: scorer.score(ObjectRef(None, str(p))).score, files))
    reference = [reference_score(test_model, path) for path in files]
    for path, got, want in zip(files, batched, reference, strict=True):
        assert got == pytest.approx(want, abs=1e-5), path.name
    # The scores must differ between images by far more than the tolerance, or the comparison above
    # proves little.
    assert max(reference) - min(reference) > 1e-2


def _db(url: str):  # type: ignore[no-untyped-def]
    engine = make_engine(url)
    ensure_schema(engine)
    return make_sessionmaker(engine)


def _queue(sessions, refs: list[ObjectRef], threshold: float = 0.5) -> tuple[uuid.UUID, list[uuid.UUID]]:  # type: ignore[no-untyped-def]
    with sessions.begin() as session:
        scan, ids = create_scan(session, refs, origin="test", threshold=threshold)
        return scan.id, ids


@pytest.fixture(params=["sqlite", "postgresql"])
def database_url(request, tmp_path: Path) -> str:  # type: ignore[no-untyped-def]
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'engine.db'}"
    return request.getfixturevalue("pg_url")


def test_scoring_the_same_image_twice_leaves_one_result(corpus_dir, settings_factory, database_url) -> None:
    settings = settings_factory(database_url=database_url)
    sessions = _db(database_url)
    path = corpus_dir / "real" / "IMG_0003.jpg"
    scan_id, (image_id,) = _queue(sessions, [ObjectRef(None, str(path))])
    detector = Detector.from_settings(settings)
    with Scorer(settings, detector, sessions=sessions, allow_local=True) as scorer:
        first = scorer.process_image(image_id)
        again = scorer.process_image(image_id)
    assert first.state == DONE and first.changed
    assert not again.changed and again.score == first.score
    with sessions() as session:
        rows = session.scalars(select(ImageRow).where(ImageRow.scan_id == scan_id)).all()
        scan = session.get(Scan, scan_id)
    assert len(rows) == 1
    row = rows[0]
    assert row.attempts == 1
    assert row.model_name == "tf_mobilenetv3_large_100" and row.model_version == detector.version
    assert row.format == "jpeg" and (row.width, row.height) == Image.open(path).size
    assert row.flagged == (row.score >= 0.5)
    assert scan.pending_count == 0 and scan.completed_at is not None


def test_duplicate_deliveries_racing_store_exactly_one_result(corpus_dir, settings_factory, pg_url) -> None:
    settings = settings_factory(database_url=pg_url)
    sessions = _db(pg_url)
    refs = [ObjectRef(None, str(p)) for p in sorted((corpus_dir / "real").iterdir())]
    scan_id, ids = _queue(sessions, refs)
    start = threading.Barrier(4 * len(ids))
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions, allow_local=True) as scorer:

        def run(image_id: uuid.UUID):  # type: ignore[no-untyped-def]
            start.wait()
            return scorer.process_image(image_id)

        with ThreadPoolExecutor(4 * len(ids)) as pool:
            outcomes = list(pool.map(run, [i for i in ids for _ in range(4)]))
    for image_id in ids:
        mine = [o for o in outcomes if o.image_id == image_id]
        assert sum(o.changed for o in mine) == 1
        assert {o.state for o in mine} == {DONE}
    with sessions() as session:
        scan = session.get(Scan, scan_id)
        assert scan.pending_count == 0 and scan.completed_at is not None


def test_missing_object_fails_at_once_with_its_code(settings_factory, s3_endpoint, bucket, pg_url) -> None:
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint)
    sessions = _db(pg_url)
    _, (image_id,) = _queue(sessions, [ObjectRef(bucket, "no/such/key.jpg")])
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        outcome = process_with_retries(scorer, image_id)
    assert outcome.state == FAILED and outcome.error_code == "object_not_found"
    with sessions() as session:
        row = session.get(ImageRow, image_id)
        assert row.attempts == 1 and "no/such/key.jpg" in row.error_message


def test_an_image_fetched_through_obstore_is_stored_as_through_botocore(
    settings_factory, s3_endpoint, s3_client, bucket, pg_url
) -> None:
    body = io.BytesIO()
    ImageOps.expand(Image.new("RGB", (96, 64), (200, 40, 90)), border=8, fill=(10, 220, 30)).save(body, "PNG")
    put = s3_client.put_object(Bucket=bucket, Key="pic.png", Body=body.getvalue())
    sessions = _db(pg_url)
    stored = {}
    for kind in ("botocore", "obstore"):
        settings = settings_factory(
            database_url=pg_url, s3_endpoint_url=s3_endpoint, s3_client=kind, prepare_processes=0
        )
        _, (image_id,) = _queue(sessions, [ObjectRef(bucket, "pic.png")])
        with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
            assert process_with_retries(scorer, image_id).state == DONE
        with sessions() as session:
            row = session.get(ImageRow, image_id)
            stored[kind] = (row.score, row.sha256, row.etag, row.width, row.height, row.provenance)
    assert stored["obstore"] == stored["botocore"]
    assert stored["obstore"][2] == put["ETag"].strip('"')


def test_unreachable_storage_is_retried_then_fails_after_max_attempts(settings_factory, tmp_path) -> None:
    import socket

    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"
    url = f"sqlite:///{tmp_path / 'retry.db'}"
    settings = settings_factory(
        database_url=url, s3_endpoint_url=closed, max_attempts=3, s3_connect_timeout_s=0.5
    )
    sessions = _db(url)
    _, (image_id,) = _queue(sessions, [ObjectRef("bucket", "a.jpg")])
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions) as scorer:
        outcome = process_with_retries(scorer, image_id)
    assert outcome.state == FAILED and outcome.error_code == "storage_unavailable"
    with sessions() as session:
        row = session.get(ImageRow, image_id)
        assert row.attempts == 3 and "gave up after 3 attempts" in row.error_message


def test_an_unreachable_database_is_a_transient_error(settings_factory) -> None:
    import socket

    from worker.errors import TransientError

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"postgresql+psycopg://postgres@127.0.0.1:{port}/nothing"
    settings = settings_factory(database_url=url)
    with (
        Scorer(settings, Detector.from_settings(settings)) as scorer,
        pytest.raises(TransientError) as info,
    ):
        scorer.process_image(uuid.uuid4())
    assert info.value.code == "database_unavailable"


@pytest.mark.parametrize("provenance_flags", [True, False])
def test_generator_metadata_flags_an_image_whatever_its_score(
    fixtures_dir, settings_factory, tmp_path, provenance_flags
) -> None:
    url = f"sqlite:///{tmp_path / 'prov.db'}"
    settings = settings_factory(database_url=url, provenance_flags=provenance_flags)
    sessions = _db(url)
    generated = fixtures_dir / "generated" / "sdxlturbo_example.png"
    stripped = tmp_path / "stripped.png"  # the same pixels, without ComfyUI's text chunks
    Image.open(generated).convert("RGB").save(stripped)
    # A threshold no score reaches: only provenance can flag.
    _, ids = _queue(sessions, [ObjectRef(None, str(generated)), ObjectRef(None, str(stripped))], threshold=1.01)
    with Scorer(settings, Detector.from_settings(settings), sessions=sessions, allow_local=True) as scorer:
        with_metadata, without = (scorer.process_image(i) for i in ids)
    rows = {row.id: row for row in sessions().scalars(select(ImageRow))}
    evidence = rows[ids[0]].provenance["signals"]["generation_params"]
    assert evidence["ai"] and evidence["evidence"]["tool"] == "ComfyUI"
    assert with_metadata.flagged is provenance_flags
    assert rows[ids[1]].provenance["ai"] is False and without.flagged is False
