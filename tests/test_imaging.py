"""Safe decoding: real fixture files plus images made here in memory."""

from __future__ import annotations

import io
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from corpus import encode
from PIL import Image, ImageFile, ImageOps

from conftest import BAD_FIXTURES, fixture_id, good_fixture_files
from worker import errors
from worker.errors import ConfigError, PermanentError
from worker.imaging import FORMATS, DecodedImage, _to_rgb, check_jpeg, decode_image, sniff_format

MAX_PIXELS = 100_000_000  # the service default
# Pillow's name for each format, as the sniffer should name it. MPO is a JPEG with extra pictures.
PIL_TO_FORMAT = {
    "JPEG": "jpeg",
    "MPO": "jpeg",
    "PNG": "png",
    "GIF": "gif",
    "WEBP": "webp",
    "BMP": "bmp",
    "TIFF": "tiff",
    "HEIF": "heif",
    "AVIF": "avif",
}
# Above this, skip the second (reference) decode: it only doubles the time for the same decoder.
PARITY_MAX_PIXELS = 20_000_000


def pixels(im: Image.Image) -> np.ndarray:
    return np.asarray(im.convert("RGB"), dtype=np.int16)


def reference_rgb(data: bytes) -> Image.Image:
    """The reference pipeline the model was evaluated with."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return Image.open(io.BytesIO(data)).convert("RGB")


def decode_error(data: bytes, **kwargs: object) -> PermanentError:
    params: dict[str, object] = {"max_pixels": MAX_PIXELS, **kwargs}
    with pytest.raises(PermanentError) as info:
        decode_image(data, **params)  # type: ignore[arg-type]
    return info.value


# ------------------------------------------------------------------ fixtures


@pytest.mark.parametrize("name", sorted(BAD_FIXTURES))
def test_bad_fixture_fails_with_its_code(fixtures_dir: Path, name: str) -> None:
    data = (fixtures_dir / "bad" / name).read_bytes()
    err = decode_error(data)
    assert err.code == BAD_FIXTURES[name], err.message
    assert err.message


def test_bomb_message_names_the_cap(fixtures_dir: Path) -> None:
    err = decode_error((fixtures_dir / "bad" / "bomb_40000x40000.png").read_bytes())
    assert "1600000000" in err.message and str(MAX_PIXELS) in err.message


def test_corrupt_scan_is_caught_although_pillow_decodes_it(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "bad" / "corrupt_scan.jpg").read_bytes()
    reference_rgb(data)  # Pillow returns garbage without complaint: that is why simplejpeg is used
    assert decode_error(data).code == errors.CORRUPT_IMAGE


def test_junk_between_jpeg_segments_still_decodes(fixtures_dir: Path) -> None:
    data = (fixtures_dir / "real" / "P1000827.jpg").read_bytes()
    # Some cameras leave stray bytes before a marker; the pixels are intact.
    with_junk = data[:-2] + b"\x00\x11\x22" + data[-2:]
    assert np.array_equal(
        np.asarray(decode_image(with_junk, max_pixels=MAX_PIXELS).image),
        np.asarray(decode_image(data, max_pixels=MAX_PIXELS).image),
    )


@pytest.mark.parametrize("path", good_fixture_files(), ids=fixture_id)
def test_good_fixture_decodes_to_rgb(path: Path) -> None:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as header:
        header_size, header_mode, header_format = header.size, header.mode, header.format
        orientation = header.getexif().get(0x0112, 1)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert isinstance(decoded, DecodedImage)
    assert decoded.image.mode == "RGB"
    assert decoded.format == PIL_TO_FORMAT[str(header_format)]
    expected = header_size[::-1] if orientation in (5, 6, 7, 8) else header_size
    assert (decoded.width, decoded.height) == expected == decoded.image.size
    if header_mode == "RGB" and orientation == 1 and header_size[0] * header_size[1] <= PARITY_MAX_PIXELS:
        assert np.array_equal(np.asarray(decoded.image), np.asarray(reference_rgb(data)))


def test_decoding_from_many_threads_gives_the_same_pixels(fixtures_dir: Path) -> None:
    files = [
        fixtures_dir / "real" / "P1000827.jpg",
        fixtures_dir / "formats" / "sample1.png",
        fixtures_dir / "formats" / "sample1.webp",
        fixtures_dir / "formats" / "sample1.gif",
    ]
    blobs = [p.read_bytes() for p in files] * 4
    expected = [np.asarray(decode_image(b, max_pixels=MAX_PIXELS).image) for b in blobs[: len(files)]]
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda b: decode_image(b, max_pixels=MAX_PIXELS), blobs))
    for i, result in enumerate(results):
        assert np.array_equal(np.asarray(result.image), expected[i % len(files)])


# ------------------------------------------------------------------ sniffing


def test_format_comes_from_bytes_not_name(fixtures_dir: Path) -> None:
    # No name reaches the decoder at all: PNG bytes are PNG whatever the key says,
    # and "not_an_image.jpg" is text although it is named .jpg.
    png = (fixtures_dir / "formats" / "sample1.png").read_bytes()
    assert decode_image(png, max_pixels=MAX_PIXELS).format == "png"
    svg = (fixtures_dir / "bad" / "image.svg").read_bytes()
    err = decode_error(svg)
    assert err.code == errors.UNSUPPORTED_FORMAT and "SVG" in err.message


def test_empty_bytes_are_empty_object() -> None:
    with pytest.raises(PermanentError) as info:
        sniff_format(b"")
    assert info.value.code == errors.EMPTY_OBJECT


@pytest.mark.parametrize(
    ("data", "name"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "PDF"),
        (b"8BPS\x00\x01\x00\x00\x00\x00\x00\x00\x00\x03", "PSD"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
        (b"\xc5\xd0\xd3\xc6\x1e\x00\x00\x00", "EPS"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg"/>', "SVG"),
        (b"\xef\xbb\xbf  <svg width='1'/>", "SVG"),
        (b"<!DOCTYPE html><html><body>hi</body></html>", "HTML"),
        (b"\x00\x00\x00\x1cftypmp42\x00\x00\x00\x00mp42isom", "mp42"),
        (b"RIFF\x24\x00\x00\x00WAVEfmt ", "WAVE"),
        (b"BMW is a car, not a bitmap", "unrecognised"),
        (b"Hello, this is plain text", "unrecognised"),
    ],
)
def test_formats_off_the_allow_list_are_unsupported(data: bytes, name: str) -> None:
    with pytest.raises(PermanentError) as info:
        sniff_format(data)
    assert info.value.code == errors.UNSUPPORTED_FORMAT
    assert name in info.value.message
    assert decode_error(data).code == errors.UNSUPPORTED_FORMAT


def ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x08meta"


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (ftyp(b"heic", b"mif1", b"heic"), "heif"),
        (ftyp(b"heix", b"mif1"), "heif"),
        (ftyp(b"mif1", b"mif1", b"heic"), "heif"),
        (ftyp(b"avif", b"mif1", b"miaf"), "avif"),
        (ftyp(b"avis", b"msf1"), "avif"),
        (ftyp(b"mif1", b"mif1", b"avif", b"miaf"), "avif"),
        (ftyp(b"msf1", b"avis"), "avif"),
    ],
)
def test_iso_bmff_brands(data: bytes, expected: str) -> None:
    assert sniff_format(data) == expected


def test_every_sniffed_format_is_on_the_allow_list() -> None:
    samples = [encode(Image.new("RGB", (2, 2)), fmt) for fmt in ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF")]
    assert {sniff_format(s) for s in samples} == FORMATS - {"heif", "avif"}


# ------------------------------------------------------------- modes to RGB


def test_sixteen_bit_grey_is_scaled_not_clipped() -> None:
    values = np.array([[0x0000, 0x00FF, 0x8000, 0xFFFF]], dtype=np.uint16)
    for im, fmt in [
        (Image.fromarray(values), "PNG"),  # mode I;16
        (Image.fromarray(values.astype(">u2")), "TIFF"),  # mode I;16B
        (Image.frombytes("I;16L", (4, 1), values.astype("<u2").tobytes()), "TIFF"),
    ]:
        decoded = decode_image(encode(im, fmt), max_pixels=MAX_PIXELS)
        assert decoded.image.mode == "RGB"
        grey = pixels(decoded.image)[0, :, 0].tolist()
        assert grey == [0, 0, 128, 255], (im.mode, grey)


def test_32_bit_integer_is_treated_as_sixteen_bit() -> None:
    im = Image.fromarray(np.array([[-1, 0x8000, 0xFFFF, 70_000]], dtype=np.int32))
    assert im.mode == "I"
    decoded = decode_image(encode(im, "TIFF"), max_pixels=MAX_PIXELS)
    assert pixels(decoded.image)[0, :, 0].tolist() == [0, 128, 255, 255]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0.0, 0.25, 0.5, 1.0], [0, 64, 128, 255]),  # normalised floats
        ([-5.0, 100.4, 254.6, 300.0], [0, 100, 255, 255]),  # 0..255 floats, clipped
        ([float("nan"), 0.0, 1.0, 1.0], [0, 0, 255, 255]),
    ],
)
def test_float_images_are_scaled_or_clipped(values: list[float], expected: list[int]) -> None:
    im = Image.fromarray(np.array([values], dtype=np.float32))
    assert im.mode == "F"
    decoded = decode_image(encode(im, "TIFF"), max_pixels=MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    assert pixels(decoded.image)[0, :, 0].tolist() == expected


def colours(im: Image.Image) -> set[tuple[int, ...]]:
    return {tuple(int(v) for v in c) for c in np.unique(np.asarray(im).reshape(-1, 3), axis=0)}


def sample_rgb(size: tuple[int, int] = (16, 8)) -> Image.Image:
    """Flat blocks of colour: they survive lossy codecs and mode round trips."""
    im = Image.new("RGB", size, (200, 40, 90))
    im.paste((20, 180, 60), (0, 0, size[0] // 2, size[1]))
    return im


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("L", "PNG"),
        ("L", "JPEG"),
        ("1", "PNG"),
        ("1", "TIFF"),
        ("LA", "PNG"),
        ("RGBA", "PNG"),
        ("P", "PNG"),
        ("P", "GIF"),
        ("PA", "TIFF"),
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("YCbCr", "TIFF"),
        ("LAB", "TIFF"),
        ("RGB", "BMP"),
        ("P", "BMP"),
    ],
)
def test_every_mode_ends_rgb_like_the_reference_pipeline(mode: str, fmt: str) -> None:
    if mode in ("P", "PA"):
        # An adaptive palette holds both colours exactly; the default web palette would dither.
        source = sample_rgb().convert("P", palette=Image.Palette.ADAPTIVE, colors=4).convert(mode)
    else:
        source = sample_rgb().convert(mode)
    data = encode(source, fmt)
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.image.mode == "RGB"
    assert decoded.format == fmt.lower()
    assert decoded.image.size == source.size
    assert np.array_equal(np.asarray(decoded.image), np.asarray(reference_rgb(data)))
    if mode in ("RGB", "RGBA", "P", "PA", "CMYK", "YCbCr"):
        # Colour survives: each half is still roughly its own colour.
        tolerance = 40 if fmt == "JPEG" else 12
        assert np.abs(pixels(decoded.image) - pixels(sample_rgb())).max() <= tolerance


def test_alpha_is_dropped_not_composited() -> None:
    im = Image.new("RGBA", (4, 4), (10, 20, 30, 0))
    decoded = decode_image(encode(im, "PNG"), max_pixels=MAX_PIXELS)
    assert decoded.image.getpixel((0, 0)) == (10, 20, 30)


@pytest.mark.parametrize("transparency", [0, b"\x00\x80\xff"])
def test_palette_with_transparency_leaks_no_warning(transparency: int | bytes) -> None:
    im = Image.new("P", (6, 2))
    im.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255])
    im.putdata([0, 1, 2, 0, 1, 2] * 2)
    data = encode(im, "PNG", transparency=transparency)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.image.getpixel((0, 0)) == (255, 0, 0)
    assert decoded.image.getpixel((2, 0)) == (0, 0, 255)
    assert np.array_equal(np.asarray(decoded.image), np.asarray(reference_rgb(data)))


def test_mode_that_cannot_become_rgb_is_unsupported() -> None:
    with pytest.raises(PermanentError) as info:
        _to_rgb(Image.new("La", (2, 2)))
    assert info.value.code == errors.UNSUPPORTED_FORMAT
    assert "'La'" in info.value.message


# ---------------------------------------------------------- orientation, frames


def test_jpeg_exif_orientation_6_rotates_clockwise() -> None:
    stored = Image.new("RGB", (64, 32), (0, 0, 255))
    stored.paste((255, 0, 0), (0, 0, 32, 32))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6
    data = encode(stored, "JPEG", exif=exif, quality=95)

    decoded = decode_image(data, max_pixels=MAX_PIXELS)

    assert (decoded.width, decoded.height) == (32, 64) == decoded.image.size
    # Turned 90 degrees clockwise for display: the stored left half is now on top.
    rgb = np.asarray(decoded.image)
    top, bottom = rgb[8, 16], rgb[56, 16]
    assert top[0] > 200 and top[2] < 50, top
    assert bottom[2] > 200 and bottom[0] < 50, bottom
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(expected))


def test_png_exif_orientation_is_applied_too() -> None:
    exif = Image.Exif()
    exif[0x0112] = 8
    data = encode(sample_rgb((16, 8)), "PNG", exif=exif)
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.image.size == (8, 16)
    expected = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    assert np.array_equal(np.asarray(decoded.image), np.asarray(expected))


def test_animated_gif_yields_its_first_frame() -> None:
    frames = [Image.new("RGB", (10, 10), colour) for colour in ((255, 0, 0), (0, 255, 0), (0, 0, 255))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.format == "gif"
    assert colours(decoded.image) == {(255, 0, 0)}


def test_multi_page_tiff_yields_its_first_page() -> None:
    first = Image.new("RGB", (12, 6), (0, 255, 0))
    rest = [Image.new("RGB", (40, 40), (255, 0, 0)), Image.new("L", (5, 5), 0)]
    data = encode(first, "TIFF", save_all=True, append_images=rest)
    decoded = decode_image(data, max_pixels=MAX_PIXELS)
    assert decoded.image.size == (12, 6)
    assert colours(decoded.image) == {(0, 255, 0)}


# -------------------------------------------------------------------- limits


def test_pixel_cap_is_checked_before_decoding() -> None:
    data = encode(Image.new("RGB", (100, 100)), "PNG")
    err = decode_error(data, max_pixels=9_999)
    assert err.code == errors.TOO_LARGE
    assert "100x100" in err.message and "9999" in err.message
    assert decode_image(data, max_pixels=10_000).image.size == (100, 100)


def test_pixel_cap_applies_to_jpeg_and_heif_headers(fixtures_dir: Path) -> None:
    heic = (fixtures_dir / "formats" / "sample1.heic").read_bytes()
    with Image.open(io.BytesIO(heic)) as header:
        width, height = header.size
    # The cap is read from the HEIF header: one pixel under the image's size refuses it.
    err = decode_error(heic, max_pixels=width * height - 1)
    assert err.code == errors.TOO_LARGE and f"{width}x{height}" in err.message
    jpeg = encode(Image.new("RGB", (50, 40)), "JPEG")
    assert decode_error(jpeg, max_pixels=1_999).code == errors.TOO_LARGE


@pytest.fixture(scope="module")
def large_png() -> bytes:
    noise = np.random.default_rng(7).integers(0, 256, size=(1200, 1200, 3), dtype=np.uint8)
    return encode(Image.fromarray(noise), "PNG", compress_level=1)


def test_tiny_timeout_on_a_large_png_is_decode_timeout(large_png: bytes) -> None:
    err = decode_error(large_png, timeout_s=1e-6)
    assert err.code == errors.DECODE_TIMEOUT
    assert decode_error(large_png, timeout_s=0).code == errors.DECODE_TIMEOUT


def test_default_timeout_lets_the_same_png_through(large_png: bytes) -> None:
    assert decode_image(large_png, max_pixels=MAX_PIXELS).image.size == (1200, 1200)


# ------------------------------------------------------------ broken input


def test_truncated_png_is_corrupt(large_png: bytes) -> None:
    err = decode_error(large_png[: len(large_png) // 2])
    assert err.code == errors.CORRUPT_IMAGE
    assert "PNG" in err.message


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # Pillow's TIFF reader says so, then fails
@pytest.mark.parametrize("fmt", ["PNG", "GIF", "JPEG", "WEBP", "BMP", "TIFF"])
def test_header_only_remnant_is_corrupt(fmt: str) -> None:
    data = encode(sample_rgb((64, 64)), fmt)
    err = decode_error(data[:40])
    assert err.code == errors.CORRUPT_IMAGE, err.message


def test_jpeg_signature_alone_is_corrupt() -> None:
    assert decode_error(b"\xff\xd8\xff\xe0").code == errors.CORRUPT_IMAGE


def test_nothing_decodes_while_pillow_would_accept_truncated_files(monkeypatch: pytest.MonkeyPatch) -> None:
    jpeg = encode(Image.new("RGB", (64, 48), (10, 200, 30)), "JPEG")
    assert decode_image(jpeg, max_pixels=10_000).image.size == (64, 48)
    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    for decode in (decode_image, check_jpeg):
        with pytest.raises(ConfigError, match="LOAD_TRUNCATED_IMAGES"):
            decode(jpeg, max_pixels=10_000)
