"""Animations: up to SYNTHGUARD_MAX_FRAMES frames of an animated GIF, WebP or PNG scored; the score is their maximum."""

from __future__ import annotations

import io
import json
import uuid
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner
from corpus import encode, photo
from PIL import Image

from conftest import cli_env
from worker import errors, imaging
from worker.cli import main
from worker.clients import create_client
from worker.db import get_sessionmaker
from worker.detector import Detector
from worker.errors import PermanentError
from worker.imaging import decode_image, spread_frames
from worker.intake import create_scan
from worker.models import DONE
from worker.models import Image as ImageRow
from worker.scoring import Scorer
from worker.storage import ObjectRef


def _frames(count: int, size: tuple[int, int] = (256, 192)) -> list[Image.Image]:
    """Frames that differ from each other: a different photo-like picture each, every third one flat grey."""
    return [
        Image.new("RGB", size, (128, 128, 128)) if n % 3 == 2 else photo(*size, seed=300 + n)
        for n in range(count)
    ]


def _animation(fmt: str, frames: list[Image.Image]) -> bytes:
    buffer = io.BytesIO()
    first, rest = (
        (frames[0].quantize(256), [f.quantize(256) for f in frames[1:]])
        if fmt == "GIF"
        else (frames[0], frames[1:])
    )
    first.save(
        buffer,
        fmt,
        save_all=True,
        append_images=rest,
        duration=80,
        loop=0,
        **({"lossless": True} if fmt == "WEBP" else {}),
    )
    return buffer.getvalue()


def test_frames_are_spread_evenly_first_and_last_included() -> None:
    assert spread_frames(10, 4) == [0, 3, 6, 9]
    assert spread_frames(5, 8) == [0, 1, 2, 3, 4]
    assert spread_frames(100, 1) == [0]
    spread = spread_frames(48, 8)
    assert len(spread) == 8 and spread[0] == 0 and spread[-1] == 47 and spread == sorted(set(spread))


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_an_animation_decodes_to_the_frames_chosen(fmt: str) -> None:
    frames = _frames(10)
    data = _animation(fmt, frames)
    decoded = decode_image(data, max_pixels=10**8, max_frames=4)
    assert decoded.frame_count == 10 and decoded.frame_indices == (0, 3, 6, 9)
    assert len(decoded.frames) == 4 and decoded.frames[0] is decoded.image
    # Each chosen frame is that frame of the file: closest to its own source picture of all ten.
    for index, frame in zip(decoded.frame_indices, decoded.frames, strict=True):
        pixels = np.asarray(frame, dtype=np.int16)
        errors = [np.abs(pixels - np.asarray(source, dtype=np.int16)).mean() for source in frames]
        assert int(np.argmin(errors)) == index, (fmt, index)
    # Without max_frames: the first frame alone, as before.
    assert decode_image(data, max_pixels=10**8).frames == ()


def test_an_animation_broken_after_its_first_frame_is_scored_from_that_frame() -> None:
    data = _animation("GIF", _frames(10))
    truncated = data[: len(data) // 2]
    decoded = decode_image(truncated, max_pixels=10**8, max_frames=8)
    assert decoded.frames == () and decoded.frame_count == 1
    assert decoded.image.tobytes() == decode_image(truncated, max_pixels=10**8).image.tobytes()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_the_time_cap_covers_the_later_frames(fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    data = _animation(fmt, _frames(10))
    # A clock that passes the deadline once the first frame is in: the later frames are what is slow.
    now = [1_000.0]
    monkeypatch.setattr(imaging, "time", SimpleNamespace(monotonic=lambda: now[0]))
    first_only = imaging._frames

    def slow_frames(*args: Any, **kwargs: Any) -> Any:
        now[0] += 60.0
        return first_only(*args, **kwargs)

    monkeypatch.setattr(imaging, "_frames", slow_frames)
    with pytest.raises(PermanentError) as caught:
        decode_image(data, max_pixels=10**8, timeout_s=15.0, max_frames=4)
    # A timeout, not "a later frame is broken", which would be scored from the first frame alone.
    assert caught.value.code == errors.DECODE_TIMEOUT
    assert "took longer than 15s" in caught.value.message
    now[0] = 1_000.0
    monkeypatch.setattr(imaging, "_frames", first_only)
    assert len(decode_image(data, max_pixels=10**8, timeout_s=15.0, max_frames=4).frames) == 4


def test_the_pixel_cap_counts_every_frame_decoded_on_the_way() -> None:
    data = _animation("GIF", _frames(40, (50, 40)))
    decoded = decode_image(data, max_pixels=50 * 40 * 10, max_frames=8)
    # Reaching frame k decodes frames 0..k: ten frames' worth of pixels reach frame 9, no further.
    assert decoded.frame_count == 40 and max(decoded.frame_indices) == 9 and len(decoded.frames) == 8


def test_an_animation_is_scored_frame_by_frame_and_stills_are_unchanged(
    settings_factory, pg_url, s3_endpoint, s3_client, bucket
) -> None:
    frames = _frames(12)
    s3_client.put_object(Bucket=bucket, Key="anim.gif", Body=_animation("GIF", frames))
    s3_client.put_object(Bucket=bucket, Key="still.png", Body=encode(frames[0], "PNG"))
    sessions = get_sessionmaker(pg_url)
    with sessions.begin() as session:
        client = create_client(session, f"anim-{uuid.uuid4().hex[:6]}", all_buckets=True)
        refs = [ObjectRef(bucket, "anim.gif"), ObjectRef(bucket, "still.png")]
        _, ids = create_scan(session, refs, origin="api", threshold=0.5, client_id=client.client.id)
        _, once = create_scan(session, refs[:1], origin="api", threshold=0.5, client_id=client.client.id)
    settings = settings_factory(
        database_url=pg_url, s3_endpoint_url=s3_endpoint, max_frames=6, result_cache=False
    )
    first_only = settings_factory(
        database_url=pg_url, s3_endpoint_url=s3_endpoint, max_frames=1, result_cache=False
    )
    for use, image_ids in ((settings, ids), (first_only, once)):
        with Scorer(use, Detector.from_settings(use), sessions=sessions) as scorer:
            for image_id in image_ids:
                assert scorer.process_image(image_id).state == DONE
    with sessions() as session:
        animated, still, single = (session.get(ImageRow, i) for i in [*ids, *once])

    scored = animated.frames["scored"]
    assert animated.frames["count"] == 12 and [f["index"] for f in scored] == spread_frames(12, 6)
    # Each frame's score is the model's on that frame alone, and the image's score is the highest.
    detector = Detector.from_settings(settings)
    decoded = decode_image(_animation("GIF", frames), max_pixels=10**8, max_frames=6)
    alone = detector.predict([detector.preprocess(frame) for frame in decoded.frames])
    assert [f["score"] for f in scored] == pytest.approx(alone, abs=1e-5)
    assert len({round(f["score"], 6) for f in scored}) > 1  # the frames differ, and so do their scores
    assert animated.score == max(f["score"] for f in scored)
    # A still image, and an animation held to its first frame: no frames, the first frame's score.
    assert still.frames is None and single.frames is None
    assert single.score == pytest.approx(scored[0]["score"], abs=1e-5)


def test_results_show_the_frames(tmp_path: Path, checkpoint: Path) -> None:
    env = cli_env(tmp_path, checkpoint, "anim", max_frames="4")
    source = tmp_path / "anim.webp"
    source.write_bytes(_animation("WEBP", _frames(9)))
    scanned = CliRunner().invoke(main, ["scan", str(source), "--json"], env=env)
    assert scanned.exit_code == 0, scanned.output
    (image,) = json.loads(scanned.stdout)["images"]
    assert image["frames"]["count"] == 9 and len(image["frames"]["scored"]) == 4
    assert image["score"] == max(f["score"] for f in image["frames"]["scored"])
    assert "(the most of 4 of 9 frames)" in CliRunner().invoke(main, ["results"], env=env).output
