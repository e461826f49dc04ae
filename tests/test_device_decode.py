"""JPEGs decoded on the model's device (SYNTHGUARD_DEVICE_DECODE), here on the CPU device through
torchvision's libjpeg-turbo: the same code that runs nvJPEG on CUDA (tests/test_cuda.py runs it there).
What a user would notice: the same verdicts, provenance and hashes as the CPU path, and bad JPEGs
failing before any decode, with the CPU path's error codes."""

from __future__ import annotations

import io
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from corpus import corrupt_scan, encode
from PIL import Image
from prometheus_client import REGISTRY
from test_provenance import SDXL_BITS, embed

import worker.device_decode as device_decode
from conftest import CORPUS, good_fixture_files
from worker import errors
from worker.detector import Detector
from worker.device_decode import orient, watermark_bits
from worker.errors import ConfigError, PermanentError
from worker.imaging import _ORIENTATION_TRANSPOSE, check_jpeg, decode_image
from worker.pdq import MIN_QUALITY, distance, hash_image
from worker.preparing import PREVIEW_SIDE, STAGES, PrepareSpec, make_preparer, prepare_image
from worker.provenance import watermark
from worker.provenance._base import Budget
from worker.scoring import Scorer
from worker.storage import ObjectRef

MAX_PIXELS = 100_000_000


def _stage_count(stage: str) -> float:
    return REGISTRY.get_sample_value("synthguard_stage_seconds_count", {"stage": stage}) or 0.0


def _cpu_bits(rgb: np.ndarray) -> np.ndarray:
    rows, nbx = watermark.scan_blocks(rgb.shape[1], rgb.shape[0]) or (0, 0)
    crop = np.ascontiguousarray(rgb[: 8 * rows, : 8 * nbx])
    return watermark.block_bits(watermark.convert(crop, np.empty((2, *crop.shape), np.uint8)))


def _ties(rgb: np.ndarray) -> int:
    """Blocks of either order whose largest non-DC 2x2 sum of U is 36 mod 72."""
    rows, nbx = watermark.scan_blocks(rgb.shape[1], rgb.shape[0]) or (0, 0)
    crop = np.ascontiguousarray(rgb[: 8 * rows, : 8 * nbx])
    u = watermark.convert(crop, np.empty((2, *crop.shape), np.uint8))[..., 1].astype(np.int32)
    sums = u[:, 0::2, 0::2] + u[:, 1::2, 0::2] + u[:, 0::2, 1::2] + u[:, 1::2, 1::2]
    band = sums.reshape(2, rows, 4, nbx, 4).copy()
    band[:, :, 0, :, 0] = 0
    return int(np.count_nonzero(band.max(axis=(2, 4)) % 72 == 36))


@pytest.mark.parametrize(("height", "width"), [(512, 512), (600, 1000), (257, 300), (3000, 1400)])
def test_watermark_bits_on_the_device_are_the_cpu_readers(height: int, width: int) -> None:
    rng = np.random.default_rng(height * width)
    rgb = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    got = watermark_bits(torch.from_numpy(rgb).permute(2, 0, 1))
    assert got is not None
    assert np.array_equal(got, _cpu_bits(rgb))
    # Random pixels give ties (a largest sum of exactly 36 mod 72), which only the float replay decides.
    assert _ties(rgb) > 0
    image = Image.fromarray(rgb)
    assert watermark.signal(got) == watermark.read(image, Budget(30.0))


def test_a_marked_image_reads_the_same_on_the_device() -> None:
    carrier = np.asarray(decode_image((CORPUS / "real" / "P1000827.jpg").read_bytes(), max_pixels=MAX_PIXELS).image)
    marked = embed(carrier[:768, :1024], SDXL_BITS, as_bgr=False)
    data = encode(Image.fromarray(marked), "JPEG", quality=90, subsampling=0)
    (pixels,) = device_decode.decode([data], torch.device("cpu"))
    assert isinstance(pixels, torch.Tensor)
    bits = watermark_bits(pixels)
    assert bits is not None
    found = watermark.signal(bits)
    assert (found.found, found.ai, found.evidence["payload"], found.evidence["channel_order"]) == (
        True, True, "SDXL", "rgb"
    )
    assert np.array_equal(bits, _cpu_bits(pixels.permute(1, 2, 0).numpy()))


def test_small_images_have_no_watermark_to_read() -> None:
    assert watermark_bits(torch.zeros((3, 255, 256), dtype=torch.uint8)) is None


@pytest.mark.parametrize("orientation", sorted(_ORIENTATION_TRANSPOSE))
def test_orientation_on_the_device_is_pillows(orientation: int) -> None:
    rgb = np.random.default_rng(orientation).integers(0, 256, (5, 7, 3), dtype=np.uint8)
    want = np.asarray(Image.fromarray(rgb).transpose(_ORIENTATION_TRANSPOSE[orientation]))
    got = orient(torch.from_numpy(rgb).permute(2, 0, 1), orientation).permute(1, 2, 0).numpy()
    assert np.array_equal(got, want)


def _rotated_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (300, 400, 3), dtype=np.uint8))
    return encode(image, "JPEG", quality=90, exif=exif)


@pytest.mark.parametrize("orientation", [1, 6, 8])
def test_a_checked_jpeg_has_the_decoded_images_size_and_a_small_preview(orientation: int) -> None:
    data = _rotated_jpeg(orientation)
    checked = check_jpeg(data, max_pixels=MAX_PIXELS, min_side=64)
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert checked is not None and checked.orientation == orientation
    assert (checked.width, checked.height) == (decoded.width, decoded.height)
    # The smallest DCT scale with both sides at least 64: 1/4 of 300x400.
    assert sorted(checked.preview.size) == [75, 100]
    assert (checked.preview.width > checked.preview.height) == (decoded.width > decoded.height)


def test_only_jpegs_the_device_can_take_are_checked_for_it() -> None:
    image = Image.new("RGB", (64, 48), (200, 30, 90))
    assert check_jpeg(encode(image, "PNG"), max_pixels=MAX_PIXELS) is None
    assert check_jpeg(encode(image.convert("CMYK"), "JPEG"), max_pixels=MAX_PIXELS) is None


def _jpeg_declaring(width: int, height: int) -> bytes:
    """A small JPEG whose frame header declares ``width`` x ``height`` pixels."""
    data = bytearray(encode(Image.new("RGB", (64, 48), (90, 90, 200)), "JPEG", quality=90))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = height.to_bytes(2, "big") + width.to_bytes(2, "big")
    return bytes(data)


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (corrupt_scan(encode(Image.new("RGB", (640, 480), (10, 200, 30)), "JPEG", quality=90)), errors.CORRUPT_IMAGE),
        (encode(Image.new("RGB", (640, 480), (10, 200, 30)), "JPEG", quality=90)[:3000], errors.CORRUPT_IMAGE),
        (_jpeg_declaring(60000, 60000), errors.TOO_LARGE),
    ],
    ids=["corrupt-scan", "truncated", "pixel-bomb"],
)
def test_bad_jpegs_fail_in_the_checks_with_the_cpu_paths_codes(data: bytes, code: str) -> None:
    with pytest.raises(PermanentError) as cpu:
        decode_image(data, max_pixels=50_000_000)
    with pytest.raises(PermanentError) as checked:
        check_jpeg(data, max_pixels=50_000_000)
    assert cpu.value.code == checked.value.code == code


def test_the_hash_from_the_preview_matches_the_full_images(fixtures_dir: Path) -> None:
    files = [p for p in good_fixture_files(fixtures_dir) if p.suffix.lower() in (".jpg", ".jpeg")]
    assert files
    compared: list[str] = []
    for path in files:
        data = path.read_bytes()
        checked = check_jpeg(data, max_pixels=MAX_PIXELS, min_side=PREVIEW_SIDE)
        if checked is None:
            continue
        full = hash_image(decode_image(data, max_pixels=MAX_PIXELS).image)
        preview = hash_image(checked.preview)
        # PDQ's match distance is 31 bits: a copy hashed by either path still matches the other's bank.
        # Hashes under PDQ's quality floor (flat images: the shared C.jpg moves by 48 bits) match nothing.
        if full.quality >= MIN_QUALITY:
            compared.append(path.name)
            assert distance(full.forms[0], preview.forms[0]) <= 16, path.name
    assert compared


@pytest.mark.parametrize("prepare_processes", [0, 2], ids=["prepared-in-threads", "prepared-in-processes"])
def test_device_decoded_images_score_like_the_cpu_path(
    fixtures_dir, settings_factory, prepare_processes, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = good_fixture_files(fixtures_dir)
    jpegs = [p for p in files if p.read_bytes()[:3] == b"\xff\xd8\xff"]
    assert len(jpegs) >= 3 and len(files) > len(jpegs)
    decoded_on_device: list[int] = []
    decode = device_decode.decode
    jpeg_bytes = {p.read_bytes() for p in jpegs}

    def counted(blobs: list[bytes], device: torch.device) -> list:  # type: ignore[type-arg]
        decoded_on_device.append(sum(blob in jpeg_bytes for blob in blobs))  # not the start-up probe
        return decode(blobs, device)

    monkeypatch.setattr(device_decode, "decode", counted)

    def score_all(device_decode: bool) -> list:  # type: ignore[type-arg]
        settings = settings_factory(
            batch_size=8, batch_wait_ms=20.0, prepare_processes=prepare_processes, device_decode=device_decode
        )
        with Scorer(settings, Detector.from_settings(settings), allow_local=True) as scorer:
            return [scorer.score(ObjectRef(None, str(path))) for path in files]

    cpu, device = score_all(False), score_all(True)
    # Every JPEG but the CMYK ones went to the device.
    cmyk = sum(Image.open(p).mode == "CMYK" for p in jpegs)
    assert sum(decoded_on_device) == len(jpegs) - cmyk
    for path, want, got in zip(files, cpu, device, strict=True):
        assert (got.format, got.width, got.height, got.jpeg_quality) == (
            want.format, want.width, want.height, want.jpeg_quality
        ), path.name
        # Every signal the same, the watermark included (read from the device's pixels).
        assert got.provenance == want.provenance and got.provenance_ai == want.provenance_ai, path.name
        assert got.score == pytest.approx(want.score, abs=1e-3), path.name
        if path in jpegs:
            assert got.pdq.quality >= MIN_QUALITY or want.pdq.quality < MIN_QUALITY, path.name
            if want.pdq.quality >= MIN_QUALITY:
                assert distance(got.pdq.forms[0], want.pdq.forms[0]) <= 16, path.name
        else:  # not decoded on the device: the CPU path's own result
            assert got.score == want.score and got.pdq == want.pdq, path.name


def test_a_jpeg_the_device_refuses_goes_through_the_cpu_path(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # nvJPEG refuses JPEGs libjpeg-turbo takes (12-bit, arithmetic-coded, lossless); torchvision's CPU
    # decoder takes those too, so the refusal is stood in for here.
    path = CORPUS / "real" / "P1000827.jpg"
    data = path.read_bytes()
    refused: list[int] = []
    decode = device_decode.decode

    def refusing(blobs: list[bytes], device: torch.device) -> list:  # type: ignore[type-arg]
        refused.append(sum(blob == data for blob in blobs))
        return [device_decode.Refused("RuntimeError: nvjpegDecode failed") if blob == data else pixels
                for blob, pixels in zip(blobs, decode(blobs, device), strict=True)]

    monkeypatch.setattr(device_decode, "decode", refusing)
    settings = settings_factory(prepare_processes=0, device_decode=True)
    observed = {stage: _stage_count(stage) for stage in STAGES}
    with Scorer(settings, Detector.from_settings(settings), allow_local=True) as scorer:
        got = scorer.score(ObjectRef(None, str(path)))
    # Checked, refused, then prepared on the CPU: still one image in each stage's histogram.
    assert {stage: _stage_count(stage) - observed[stage] for stage in STAGES} == dict.fromkeys(STAGES, 1)
    cpu = settings_factory(prepare_processes=0)
    with Scorer(cpu, Detector.from_settings(cpu), allow_local=True) as scorer:
        want = scorer.score(ObjectRef(None, str(path)))
    assert refused == [0, 1]  # the worker's start-up probe, then the image
    assert (got.score, got.provenance, got.pdq) == (want.score, want.provenance, want.pdq)


def test_a_preparing_process_decodes_on_the_cpu_when_asked(settings_factory) -> None:
    data = (CORPUS / "real" / "P1000827.jpg").read_bytes()
    settings = settings_factory(prepare_processes=1, device_decode=True)
    spec = PrepareSpec.from_settings(settings, Detector.from_settings(settings))
    preparer = make_preparer(settings, spec)
    try:
        left = preparer.prepare(data)
        here = preparer.prepare(data, on_device=False)
    finally:
        preparer.close()
    assert left.on_device and left.pixels.size == 0
    assert not here.on_device
    assert np.array_equal(here.pixels, prepare_image(data, replace(spec, device_decode=False)).pixels)
    assert (here.width, here.height) == (left.width, left.height)
    assert Image.open(io.BytesIO(data)).size == (left.width, left.height)


def test_a_worker_without_a_decoder_for_its_device_does_not_start(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    def lacking(blobs: list[bytes], device: torch.device) -> list[device_decode.Refused]:
        return [device_decode.Refused("RuntimeError: torchvision was not compiled with nvJPEG") for _ in blobs]

    monkeypatch.setattr(device_decode, "decode", lacking)
    settings = settings_factory(prepare_processes=0, device_decode=True)
    with pytest.raises(ConfigError, match="SYNTHGUARD_DEVICE_DECODE is on, but torchvision cannot decode JPEGs"):
        Scorer(settings, Detector.from_settings(settings), allow_local=True)


def test_groups_hold_at_most_their_pixels_and_every_jpeg_once() -> None:
    sizes = [(0, 10), (1, 50), (2, 5), (3, 70), (4, 1), (5, 63)]
    cut = device_decode.groups(sizes, 64)
    assert [i for group in cut for i in group] == [0, 1, 2, 3, 4, 5]
    assert cut == [[0, 1], [2], [3], [4, 5]]
    for group in cut:
        assert len(group) == 1 or sum(dict(sizes)[i] for i in group) <= 64


def test_a_batch_over_the_device_budget_is_decoded_in_groups_with_the_same_results(
    settings_factory, monkeypatch: pytest.MonkeyPatch
) -> None:
    settings = settings_factory(prepare_processes=0, device_decode=True)
    batch_fn = device_decode.DeviceBatch(Detector.from_settings(settings))
    items = [device_decode.EncodedJpeg(_rotated_jpeg(orientation), orientation, 300 * 400) for orientation in (1, 6, 3)]
    whole = batch_fn(items)
    calls: list[int] = []
    decode = device_decode.decode

    def counted(blobs: list[bytes], device: torch.device) -> list:  # type: ignore[type-arg]
        calls.append(len(blobs))
        return decode(blobs, device)

    monkeypatch.setattr(device_decode, "decode", counted)
    batch_fn.group_pixels = 2 * 300 * 400
    grouped = batch_fn(items)
    assert calls == [2, 1]
    for a, b in zip(whole, grouped, strict=True):
        assert a.score == b.score and np.array_equal(a.watermark_bits, b.watermark_bits)
