"""Hostile files through the real path: Hypothesis builds valid images in seven containers, adds
metadata chunks of any text (lone surrogates, NUL, control characters, malformed JSON and XMP,
long values) and mutates the bytes (flips, truncation, insertions, junk); a real ``synthguard
worker`` with its preparing processes scores them from the moto S3 server into PostgreSQL.

Every image must end terminal in one attempt with a specific code, the worker must live, and
clean images queued among them must be scored. Bounded: one generated set per run.
"""

from __future__ import annotations

import io
import json
import uuid
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image as PILImage
from PIL.PngImagePlugin import PngInfo
from sqlalchemy import select

from conftest import wait_until
from worker.db import get_sessionmaker
from worker.models import DONE, FAILED, Image
from worker.queueing import enqueue

HOSTILE = 48
CLEAN = 6
# What a bad file may end with; internal_error or too_many_attempts would be a bug found.
BAD_FILE_CODES = {"empty_object", "unsupported_format", "too_large", "corrupt_image", "decode_timeout"}

any_text = st.text(st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF), max_size=300)
json_like = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | any_text,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(any_text, children, max_size=4),
    max_leaves=12,
)
# Text values as generators and editors write them, and as an attacker would.
metadata_text = st.one_of(
    any_text,
    json_like.map(lambda v: json.dumps(v)),  # ASCII, with \\ud800-style escapes
    st.builds(
        lambda name, text: json.dumps(
            {"4": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": name}},
             "6": {"class_type": "CLIPTextEncode", "inputs": {"text": text}}}
        ),
        any_text,
        any_text,
    ),
    st.builds(lambda p, rest: f"{p}\nNegative prompt: x\nSteps: 20, Sampler: Euler, Model: {rest}", any_text, any_text),
    st.builds(lambda body: f'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF>{body}</rdf:RDF>', any_text),
    st.integers(1, 60_000).map(lambda n: "A" * n),
)
PNG_KEYS = ["parameters", "prompt", "workflow", "Comment", "Software", "XML:com.adobe.xmp", "invokeai_metadata"]
# HEIF through pillow_heif (libheif), AVIF through Pillow (libavif): the C decoders most recently added.
FORMATS = ["PNG", "JPEG", "WEBP", "GIF", "TIFF", "HEIF", "AVIF"]


def _latin1(text: str) -> str:
    # tEXt is Latin-1 by specification; what does not fit is still written, replaced.
    return text.encode("latin-1", errors="replace").decode("latin-1")


@st.composite
def valid_image(draw: st.DrawFn) -> bytes:
    fmt = draw(st.sampled_from(FORMATS))
    mode = draw(st.sampled_from(["RGB", "L", "RGBA", "P"] + (["I;16"] if fmt in ("PNG", "TIFF") else [])))
    width, height = draw(st.integers(1, 80)), draw(st.integers(1, 80))
    seed = draw(st.integers(0, 255))
    image = PILImage.new("RGB", (width, height), (seed, 255 - seed, (seed * 7) % 256))
    if mode == "I;16":
        image = image.convert("L").point(lambda v: v * 3).convert("I").convert("I;16")
    elif mode != "RGB":
        image = image.convert(mode)
    if fmt == "JPEG" and image.mode not in ("RGB", "L"):
        image = image.convert("RGB")
    out = io.BytesIO()
    kwargs: dict[str, Any] = {}
    if fmt == "PNG":
        info = PngInfo()
        for key, text, kind in draw(
            st.lists(st.tuples(st.sampled_from(PNG_KEYS), metadata_text, st.sampled_from(["t", "i", "z"])), max_size=4)
        ):
            if kind == "t":
                info.add_text(key, _latin1(text))
            else:
                info.add_itxt(key, text.encode("utf-8", "surrogatepass").decode("utf-8", "replace"), zip=kind == "z")
        kwargs["pnginfo"] = info
    if fmt in ("JPEG", "WEBP", "TIFF"):
        exif = PILImage.Exif()
        for tag, text in draw(st.lists(st.tuples(st.sampled_from([0x0131, 0x010E, 0x9286]), metadata_text), max_size=3)):
            exif[tag] = _latin1(text)[:2000]
        kwargs["exif"] = exif
    if fmt in ("JPEG", "WEBP", "PNG") and draw(st.booleans()):
        kwargs["xmp"] = draw(metadata_text).encode("utf-8", "surrogatepass")[:60_000]
    if fmt in ("JPEG", "GIF") and draw(st.booleans()):
        kwargs["comment"] = draw(metadata_text).encode("utf-8", "surrogatepass")[:60_000]
    image.save(out, fmt, **kwargs)
    return out.getvalue()


@st.composite
def hostile_file(draw: st.DrawFn) -> bytes:
    data = bytearray(draw(valid_image()))
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "append", "duplicate", "none"]))
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        if kind == "flip":
            data[at] = draw(st.integers(0, 255))
        elif kind == "truncate":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=64))
        elif kind == "append":
            data += draw(st.binary(min_size=1, max_size=256))
        elif kind == "duplicate":
            end = draw(st.integers(at, len(data)))
            data[at:at] = data[at:end][:4096]
    return bytes(data)


def _clean_png(seed: int) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", (40, 30), (seed * 40 % 256, 120, 200)).save(out, "PNG")
    return out.getvalue()


@settings(
    max_examples=1,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(files=st.lists(hostile_file(), min_size=HOSTILE, max_size=HOSTILE))
def test_hostile_files_end_terminal_in_one_attempt_beside_clean_ones(
    files: list[bytes], s3_client, bucket, service_settings, celery_app, start_service, pg_url
) -> None:
    sessions = get_sessionmaker(pg_url)
    run = uuid.uuid4().hex[:8]
    keys: list[str] = []
    clean_keys: list[str] = []
    for i, data in enumerate(files):
        keys.append(f"fuzz-{run}/{i:03d}.bin")
        s3_client.put_object(Bucket=bucket, Key=keys[-1], Body=data)
        if i % (HOSTILE // CLEAN) == 0:  # clean images spread among the hostile ones
            clean_keys.append(f"fuzz-{run}/clean-{i:03d}.png")
            s3_client.put_object(Bucket=bucket, Key=clean_keys[-1], Body=_clean_png(i))
    queued = enqueue(
        [(bucket, key) for key in [*keys, *clean_keys]], priority="bulk", settings=service_settings, app=celery_app
    )
    worker = start_service("worker", prepare_processes=2, concurrency=4)

    def rows() -> dict[str, Image] | None:
        with sessions() as session:
            found = list(session.scalars(select(Image).where(Image.id.in_(queued.image_ids))))
        if any(row.state not in (DONE, FAILED) for row in found):
            return None
        return {row.key: row for row in found}

    done = wait_until(rows, timeout=240, message="every fuzzed image terminal")
    assert worker.proc.poll() is None, "the worker died"
    for key in clean_keys:
        assert done[key].state == DONE, (done[key].error_code, done[key].error_message)
    for key in keys:
        row = done[key]
        assert row.attempts == 1, (key, row.attempts, row.error_message)
        if row.state == FAILED:
            assert row.error_code in BAD_FILE_CODES, (key, row.error_code, row.error_message)
    assert "Traceback" not in worker.log(), worker.log()[-4000:]
