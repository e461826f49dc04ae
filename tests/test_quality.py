"""Quality hints: inputs too small or too compressed for the model to judge well, said beside the score."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
import simplejpeg
from click.testing import CliRunner
from corpus import encode, photo

from conftest import cli_env
from worker.cli import main
from worker.clients import create_client
from worker.db import get_sessionmaker
from worker.detector import Detector
from worker.intake import create_scan
from worker.models import DONE
from worker.models import Image as ImageRow
from worker.quality import COMPRESSED, SMALL, assess, jpeg_quality
from worker.scoring import Scorer
from worker.storage import ObjectRef


@pytest.mark.parametrize("quality", [1, 5, 20, 50, 75, 95, 100])
def test_the_jpeg_quality_is_read_back_from_the_quantisation_table(quality: int) -> None:
    picture = photo(320, 240, quality)
    assert jpeg_quality(encode(picture, "JPEG", quality=quality)) == quality  # Pillow (libjpeg)
    assert jpeg_quality(simplejpeg.encode_jpeg(np.asarray(picture), quality=quality)) == quality  # libjpeg-turbo


def test_no_quality_where_there_is_no_table() -> None:
    jpeg = encode(photo(64, 64, 1), "JPEG", quality=20)
    assert jpeg_quality(encode(photo(64, 64, 1), "PNG")) is None
    assert jpeg_quality(b"") is None and jpeg_quality(b"\xff\xd8") is None
    assert jpeg_quality(jpeg[:20]) is None  # cut before its tables
    assert jpeg_quality(b"\xff\xd8\xff\xdb\x00\x43\x00" + bytes(10)) is None  # a table shorter than it says


def test_hints_say_small_and_compressed_and_nothing_else() -> None:
    assert assess(64, 64, None, input_side=224, min_jpeg_quality=30).hints == (SMALL,)
    assert assess(1024, 768, 20, input_side=224, min_jpeg_quality=30).hints == (COMPRESSED,)
    assert assess(100, 900, 10, input_side=224, min_jpeg_quality=30).hints == (SMALL, COMPRESSED)
    assert assess(224, 224, 30, input_side=224, min_jpeg_quality=30).hints == ()
    assert assess(1024, 768, 5, input_side=224, min_jpeg_quality=0).hints == ()  # 0: never


def test_hints_are_stored_shown_and_never_move_the_score(
    settings_factory, pg_url, s3_endpoint, s3_client, bucket, api, service_settings
) -> None:
    files = {
        "tiny.png": encode(photo(64, 64, 7), "PNG"),
        "crushed.jpg": encode(photo(1024, 768, 8), "JPEG", quality=20),
        "fine.jpg": encode(photo(512, 512, 9), "JPEG", quality=90),
    }
    for key, data in files.items():
        s3_client.put_object(Bucket=bucket, Key=key, Body=data)
    sessions = get_sessionmaker(pg_url)
    refs = [ObjectRef(bucket, key) for key in files]
    with sessions.begin() as session:
        client = create_client(session, f"quality-{uuid.uuid4().hex[:6]}", all_buckets=True)
        _, ids = create_scan(session, refs, origin="api", threshold=0.5, client_id=client.client.id)
        _, again = create_scan(session, refs, origin="api", threshold=0.5, client_id=client.client.id)
    settings = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, result_cache=False)
    lenient = settings_factory(database_url=pg_url, s3_endpoint_url=s3_endpoint, result_cache=False, min_jpeg_quality=0)
    for use, image_ids in ((settings, ids), (lenient, again)):
        with Scorer(use, Detector.from_settings(use), sessions=sessions) as scorer:
            for image_id in image_ids:
                assert scorer.process_image(image_id).state == DONE
    with sessions() as session:
        rows = [session.get(ImageRow, image_id) for image_id in [*ids, *again]]
    tiny, crushed, fine, *lenient_rows = rows
    assert tiny.quality["hints"] == ["below_input_size"] and tiny.quality["short_side"] == 64
    assert tiny.quality["input_side"] == 224 and tiny.quality["jpeg_quality"] is None
    assert crushed.quality["hints"] == ["low_jpeg_quality"] and crushed.quality["jpeg_quality"] == 20
    assert fine.quality["hints"] == [] and fine.quality["jpeg_quality"] == 90
    # Held to 0, the same crushed JPEG has no hint, and the very same score: hints never move it.
    assert lenient_rows[1].quality["hints"] == [] and lenient_rows[1].score == crushed.score

    headers = {"Authorization": f"Bearer {client.api_key}"}
    shown = api.get(f"/v1/images/{crushed.id}", headers=headers).json()
    assert shown["quality"] == {
        "hints": ["low_jpeg_quality"],
        "short_side": 768,
        "input_side": 224,
        "jpeg_quality": 20,
        "min_jpeg_quality": 30,
    }


def test_results_say_unsure(tmp_path: Path, checkpoint: Path) -> None:
    env = cli_env(tmp_path, checkpoint, "quality")
    tiny = tmp_path / "tiny.png"
    tiny.write_bytes(encode(photo(64, 64, 3), "PNG"))
    scanned = CliRunner().invoke(main, ["scan", str(tiny), "--json"], env=env)
    assert scanned.exit_code == 0, scanned.output
    assert json.loads(scanned.stdout)["images"][0]["quality"]["hints"] == ["below_input_size"]
    assert "(unsure: below_input_size)" in CliRunner().invoke(main, ["results"], env=env).output
