"""Safe image decoding: sniff the real format, cap pixels and time, end in RGB.

Every upload is hostile until proven otherwise. The bytes decide the format
(never a file name or a content type), only the decoder for that one format
may look at them, the pixel count is checked from the header before any pixel
is decoded, and a slow decode is cut off at a deadline. Whatever the input
mode, the result is an 8-bit RGB image with its EXIF orientation applied.
:func:`check_jpeg` makes the same checks of a JPEG that the model's device
will decode (``SYNTHGUARD_DEVICE_DECODE``).
"""

from __future__ import annotations

import io
import re
import struct
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import simplejpeg  # type: ignore[import-untyped]
from PIL import Image, ImageFile, features

from worker import errors
from worker.errors import ConfigError, PermanentError

FORMATS: frozenset[str] = frozenset({"jpeg", "png", "webp", "gif", "bmp", "tiff", "heif", "avif"})

# Pillow's format ids, so that Image.open tries exactly one decoder.
_PIL_FORMATS: dict[str, str] = {
    "jpeg": "JPEG",
    "png": "PNG",
    "gif": "GIF",
    "webp": "WEBP",
    "bmp": "BMP",
    "tiff": "TIFF",
    "heif": "HEIF",
    "avif": "AVIF",
}

_HEIF_BRANDS = frozenset({b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"hevm", b"hevs"})
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
# Structural brands: the file is HEIF-family, the compatible brands say which codec.
_MIAF_BRANDS = frozenset({b"mif1", b"msf1"})

# BITMAPCOREHEADER, BITMAPINFOHEADER and its successors: the sizes Pillow reads.
_BMP_DIB_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})

_TIFF_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+")  # classic and BigTIFF

# Formats people upload that are not on the allow-list, so the error can name them.
_KNOWN_UNSUPPORTED: tuple[tuple[bytes, str], ...] = (
    (b"%PDF-", "PDF"),
    (b"8BPS", "PSD (Photoshop)"),
    (b"\xc5\xd0\xd3\xc6", "EPS"),  # DOS EPS binary header
    (b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000"),
    (b"\xff\x4f\xff\x51", "JPEG 2000"),
    (b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (b"\xff\x0a", "JPEG XL"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"\x00\x00\x02\x00", "CUR"),
    (b"icns", "ICNS"),
    (b"qoif", "QOI"),
    (b"DDS ", "DDS"),
    (b"v/1\x01", "OpenEXR"),
    (b"#?RADIANCE", "Radiance HDR"),
    (b"PK\x03\x04", "ZIP archive"),
    (b"\x1f\x8b", "gzip-compressed data (SVGZ?)"),
)

# The transposes ImageOps.exif_transpose uses for each EXIF orientation.
_ORIENTATION_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
_EXIF_ORIENTATION = 0x0112
_SWAPS_SIDES = frozenset({Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90})

# The one libjpeg warning that real cameras trigger on intact images; every other
# warning (bad Huffman code, unknown marker, premature end) means damaged pixels.
_BENIGN_JPEG_WARNING = re.compile(r"extraneous bytes before marker")

_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})

# What decoders raise on broken input. Anything else is a bug, not a bad image.
_DECODER_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    ValueError,
    SyntaxError,
    struct.error,
    EOFError,
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
    OverflowError,
    RuntimeError,
)


def _register_decoders() -> None:
    """Load every plugin once, at import: Pillow's lazy plugin loading is not thread-safe."""
    import pillow_heif

    pillow_heif.register_heif_opener()
    if not features.check("avif"):
        # Older Pillow: pillow_heif < 1.0 still ships an AVIF opener.
        register_avif = getattr(pillow_heif, "register_avif_opener", None)
        if register_avif is not None:
            register_avif()
    Image.init()


_register_decoders()
# Our own pixel cap supersedes Pillow's heuristic warning; its hard error is still mapped.
warnings.filterwarnings("ignore", category=Image.DecompressionBombWarning)


@dataclass(frozen=True)
class DecodedImage:
    """A decoded upload: RGB pixels, orientation applied, and the format its bytes are in.

    For an animation decoded with ``max_frames`` above 1: ``frames`` holds the
    frames chosen (``image`` is the first of them, frame 0), ``frame_indices``
    their positions, ``frame_count`` how many the file has.
    """

    image: Image.Image
    format: str
    width: int
    height: int
    frames: tuple[Image.Image, ...] = ()
    frame_indices: tuple[int, ...] = ()
    frame_count: int = 1


# Formats whose files may hold an animation this module scores frame by frame.
ANIMATED_FORMATS = frozenset({"gif", "webp", "png"})


def spread_frames(count: int, most: int) -> list[int]:
    """Up to ``most`` frame positions of ``count``, spread evenly, the first and the last included."""
    if count <= most:
        return list(range(count))
    if most <= 1:
        return [0]
    return sorted({round(i * (count - 1) / (most - 1)) for i in range(most)})


def _unsupported(what: str) -> PermanentError:
    return PermanentError(f"{what} is not a supported image format", code=errors.UNSUPPORTED_FORMAT)


def _sniff_iso_bmff(data: bytes) -> str:
    """HEIF or AVIF from the ``ftyp`` box's major and compatible brands."""
    major = data[8:12]
    box_size = int.from_bytes(data[0:4], "big")
    end = min(box_size, len(data)) if box_size >= 16 else 16
    compatible = {data[i : i + 4] for i in range(16, end - 3, 4)}
    if major in _AVIF_BRANDS:
        return "avif"
    if major in _MIAF_BRANDS:
        return "avif" if compatible & _AVIF_BRANDS else "heif"
    if major in _HEIF_BRANDS:
        return "heif"
    if major == b"crx ":
        raise _unsupported("Canon CR3 raw")
    brand = major.decode("latin-1")
    raise _unsupported(f"ISO media file with brand {brand!r} (video or another non-image type)")


def _sniff_text(data: bytes) -> str | None:
    """Name a text format (SVG, HTML, XML, PostScript) that looks like an image upload."""
    head = data[:1024]
    if head.startswith(b"\xef\xbb\xbf"):
        head = head[3:]
    head = head.lstrip().lower()
    if head.startswith(b"%!ps"):
        return "EPS" if b"epsf" in head.split(b"\n", 1)[0] else "PostScript"
    if not head.startswith(b"<"):
        return None
    if b"<svg" in head:
        return "SVG"
    if head.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head.startswith(b"<?xml"):
        return "XML"
    return None


def sniff_format(data: bytes) -> str:
    """The real format of ``data`` from its magic bytes, one of :data:`FORMATS`.

    Raises :class:`PermanentError` with ``empty_object`` for no bytes and with
    ``unsupported_format`` (naming what was found, where it is recognisable) for
    anything not on the allow-list.
    """
    if not data:
        raise PermanentError("the object is empty (0 bytes)", code=errors.EMPTY_OBJECT)
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith(b"RIFF") and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith(_TIFF_MAGIC):
        return "tiff"
    if data[4:8] == b"ftyp" and len(data) >= 12:
        return _sniff_iso_bmff(data)
    # "BM" alone is too weak (plenty of text starts with it): the DIB header size must be a real one.
    if data.startswith(b"BM") and len(data) >= 18 and int.from_bytes(data[14:18], "little") in _BMP_DIB_SIZES:
        return "bmp"
    for magic, name in _KNOWN_UNSUPPORTED:
        if data.startswith(magic):
            raise _unsupported(name)
    if data.startswith(b"RIFF") and len(data) >= 12:
        raise _unsupported(f"RIFF container of type {data[8:12].decode('latin-1')!r}")
    text_format = _sniff_text(data)
    if text_format is not None:
        raise _unsupported(text_format)
    raise PermanentError(f"unrecognised data (starts with {data[:9]!r})", code=errors.UNSUPPORTED_FORMAT)


class _DecodeDeadline(Exception):
    """The time cap passed while a decoder was still reading its input."""


_DECODE_FAILURES: tuple[type[BaseException], ...] = (_DecodeDeadline, *_DECODER_ERRORS)


class _DeadlineReader(io.BytesIO):
    """In-memory input that refuses to be read once the deadline has passed.

    Pillow pulls its input in blocks while it decodes, so every block is a
    point where a slow decode can be stopped. ``expired`` stays set even if a
    decoder swallows the exception and raises its own, so that the failure is
    still reported as a timeout.
    """

    def __init__(self, data: bytes, deadline: float) -> None:
        super().__init__(data)
        self._deadline = deadline
        self.expired = False

    def check(self) -> None:
        if time.monotonic() >= self._deadline:
            self.expired = True
            raise _DecodeDeadline("decode deadline passed")

    def read(self, size: int | None = -1, /) -> bytes:
        self.check()
        return super().read(size)

    def read1(self, size: int | None = -1, /) -> bytes:
        self.check()
        return super().read1(size)

    def readinto(self, buffer: bytearray | memoryview, /) -> int:  # type: ignore[override]
        self.check()
        return super().readinto(buffer)

    def readinto1(self, buffer: bytearray | memoryview, /) -> int:  # type: ignore[override]
        self.check()
        return super().readinto1(buffer)


def _orientation(im: Image.Image) -> int:
    """EXIF orientation (1 when absent); a mangled EXIF block must not cost the pixels."""
    try:
        value = im.getexif().get(_EXIF_ORIENTATION, 1)
    except (ValueError, SyntaxError, struct.error, OSError, TypeError, KeyError, IndexError):
        return 1
    return value if isinstance(value, int) else 1


def _apply_orientation(im: Image.Image, orientation: int) -> Image.Image:
    method = _ORIENTATION_TRANSPOSE.get(orientation)
    return im if method is None else im.transpose(method)


def _to_rgb(im: Image.Image) -> Image.Image:
    """Convert any decoded mode to 8-bit RGB."""
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES:
        # Pillow's own conversion clips at 255, which turns most 16-bit images white.
        values = np.asarray(im)
        grey = np.empty(values.shape, dtype=np.uint8)
        for rows in _strips(values):
            grey[rows] = np.clip(values[rows], 0, 0xFFFF) >> 8
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        floats = np.asarray(im)
        lowest, highest = np.inf, -np.inf
        for rows in _strips(floats):
            strip = _finite(floats[rows])
            if strip.size:
                lowest, highest = min(lowest, float(strip.min())), max(highest, float(strip.max()))
        # Float images are usually normalised to [0, 1]; anything else is taken as 0..255.
        scale = 255.0 if lowest >= 0.0 and highest <= 1.0 else 1.0
        grey = np.empty(floats.shape, dtype=np.uint8)
        for rows in _strips(floats):
            grey[rows] = np.rint(np.clip(_finite(floats[rows]) * scale, 0.0, 255.0))
        return Image.fromarray(grey).convert("RGB")
    if mode in ("P", "PA") and ("transparency" in im.info or mode == "PA"):
        # Same RGB values as convert("RGB"), without Pillow's warning about byte transparency.
        return im.convert("RGBA").convert("RGB")
    try:
        return im.convert("RGB")
    except ValueError as exc:
        raise PermanentError(
            f"images in mode {mode!r} cannot be converted to RGB", code=errors.UNSUPPORTED_FORMAT
        ) from exc


# Pixels converted per step by _to_rgb: a wide type's copy of the whole image at the pixel cap
# would take gigabytes (8 bytes a pixel); a strip's is a few megabytes.
_STRIP_PIXELS = 1 << 18


def _strips(values: np.ndarray) -> list[slice]:
    """Row ranges of ``values`` of about :data:`_STRIP_PIXELS` pixels each."""
    height = values.shape[0] if values.ndim else 0
    width = max(1, values.size // max(1, height))
    step = max(1, _STRIP_PIXELS // width)
    return [slice(top, top + step) for top in range(0, height, step)]


def _finite(strip: np.ndarray) -> np.ndarray:
    """A float strip in float64 with NaN as 0, +inf as 255 and -inf as 0 (as a float image is read)."""
    return np.nan_to_num(strip.astype(np.float64), nan=0.0, posinf=255.0, neginf=0.0)


def _check_pixels(im: Image.Image, fmt: str, max_pixels: int) -> None:
    _check_size(*im.size, fmt, max_pixels)


def _check_size(width: int, height: int, fmt: str, max_pixels: int) -> None:
    if width <= 0 or height <= 0:
        raise PermanentError(
            f"{fmt} header declares an empty image ({width}x{height})", code=errors.CORRUPT_IMAGE
        )
    if width * height > max_pixels:
        raise PermanentError(
            f"image is {width}x{height} = {width * height} pixels, over the cap of {max_pixels} pixels",
            code=errors.TOO_LARGE,
        )


def _open_header(reader: _DeadlineReader, fmt: str, max_pixels: int, data: bytes) -> Image.Image:
    """The format's decoder opened on the header alone (no pixels yet), the pixel cap checked."""
    pil_format = _PIL_FORMATS[fmt]
    if pil_format not in Image.OPEN:
        raise _unsupported(f"{fmt.upper()} (no decoder in this build)")
    if fmt == "webp" and (canvas := _webp_size(data)) is not None:
        # Pillow's WebP reader allocates the whole canvas (twice, RGBA) when it opens the file.
        _check_size(*canvas, fmt, max_pixels)
    try:
        im = Image.open(reader, formats=[pil_format])
    except Image.UnidentifiedImageError as exc:
        raise PermanentError(
            f"{fmt.upper()} signature but the {pil_format} decoder cannot read the header",
            code=errors.CORRUPT_IMAGE,
        ) from exc
    _check_pixels(im, fmt, max_pixels)
    return im


def _strict_jpeg(data: bytes, min_side: tuple[int, int] | None = None) -> np.ndarray:
    """RGB pixels of a (non-CMYK) JPEG by libjpeg-turbo, at full size or at the smallest DCT scale
    (1/8 to 1) that keeps ``min_side`` (width, height)."""
    scale = {} if min_side is None else {"min_width": min_side[0], "min_height": min_side[1]}
    # strict=True turns libjpeg's "recoverable" errors (corrupt entropy-coded
    # data) into exceptions; Pillow would return garbage pixels silently.
    try:
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=True, **scale)  # type: ignore[no-any-return]
    except ValueError as exc:
        if not _BENIGN_JPEG_WARNING.search(str(exc)):
            raise
        # Junk between segments (some cameras write it) leaves the pixels intact.
        return simplejpeg.decode_jpeg(data, colorspace="RGB", strict=False, **scale)  # type: ignore[no-any-return]


_Animation = tuple[tuple[Image.Image, ...], tuple[int, ...], int]


def _decode(
    reader: _DeadlineReader, data: bytes, fmt: str, max_pixels: int, max_frames: int = 1
) -> tuple[Image.Image, _Animation | None]:
    im = _open_header(reader, fmt, max_pixels, data)
    if fmt == "jpeg" and im.mode != "CMYK":
        orientation = _orientation(im)  # JPEG EXIF is in the header Pillow has already read
        reader.check()
        rgb = Image.fromarray(_strict_jpeg(data))
    else:
        # Load before reading EXIF: PNG's getexif() would otherwise load the
        # pixels itself, inside a handler meant only for a mangled EXIF block.
        # Only the current (first) frame or page is loaded.
        im.load()
        reader.check()
        orientation = _orientation(im)
        rgb = _to_rgb(im)
        if max_frames > 1 and fmt in ANIMATED_FORMATS and getattr(im, "is_animated", False):
            first = _own(_apply_orientation(rgb, orientation), im)
            try:
                return first, _frames(im, reader, first, orientation, max_pixels, max_frames)
            except _DECODER_ERRORS:
                if reader.expired:
                    raise  # the time cap counts every frame: a timeout, not a broken frame
                # The first frame decoded and a later one is broken (a truncated GIF, say): scored
                # from the first frame alone, as a still and as before animations were scored.
                return first, None
    return _apply_orientation(rgb, orientation), None


def _frames(
    im: Image.Image,
    reader: _DeadlineReader,
    first: Image.Image,
    orientation: int,
    max_pixels: int,
    max_frames: int,
) -> _Animation:
    """The frames :func:`spread_frames` picks, within the pixel cap counted over every frame decoded."""
    count = int(getattr(im, "n_frames", 1))
    width, height = im.size
    # Reaching frame k decodes frames 0..k (each composes onto the one before): the cap bounds k.
    reachable = max(1, min(count, max_pixels // max(1, width * height)))
    indices = spread_frames(reachable, max_frames)
    frames = [first]
    for index in indices[1:]:
        im.seek(index)
        im.load()
        reader.check()
        frames.append(_own(_apply_orientation(_to_rgb(im), orientation), im))
    return tuple(frames), tuple(indices), count


def _own(frame: Image.Image, im: Image.Image) -> Image.Image:
    """``frame`` as an image of its own: an RGB frame may be the open file's image, which the next seek overwrites."""
    return frame.copy() if frame is im else frame


def _timeout(fmt: str, timeout_s: float) -> PermanentError:
    return PermanentError(
        f"decoding the {fmt.upper()} image took longer than {timeout_s:g}s", code=errors.DECODE_TIMEOUT
    )


@contextmanager
def _decode_errors(reader: _DeadlineReader, fmt: str, timeout_s: float, max_pixels: int) -> Iterator[None]:
    """What a decoder raises inside, as the PermanentError with the code that names it."""
    try:
        yield
    except PermanentError as exc:
        if reader.expired and exc.code == errors.CORRUPT_IMAGE:
            # A decoder swallowed the deadline and reported its own failure instead.
            raise _timeout(fmt, timeout_s) from exc
        raise
    except Image.DecompressionBombError as exc:
        raise PermanentError(
            f"image is over Pillow's decompression-bomb limit ({exc}); the cap is {max_pixels} pixels",
            code=errors.TOO_LARGE,
        ) from exc
    except _DECODE_FAILURES as exc:
        if reader.expired:
            raise _timeout(fmt, timeout_s) from exc
        raise PermanentError(
            f"{fmt.upper()} data is corrupt or truncated: {exc}", code=errors.CORRUPT_IMAGE
        ) from exc


def _reader(data: bytes, timeout_s: float) -> _DeadlineReader:
    """The input for a decode that must end within ``timeout_s``; refused while Pillow would accept truncated data."""
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        # Someone in this process switched it on; truncated uploads would decode silently.
        raise ConfigError("PIL.ImageFile.LOAD_TRUNCATED_IMAGES is True; refusing to decode")
    return _DeadlineReader(data, time.monotonic() + timeout_s)


def decode_image(data: bytes, *, max_pixels: int, timeout_s: float = 15.0, max_frames: int = 1) -> DecodedImage:
    """Decode untrusted bytes into an RGB image, safely.

    The format is sniffed from the bytes and only that format's decoder is
    used. The header's pixel count is checked against ``max_pixels`` before
    decoding. JPEG is decoded by libjpeg-turbo through simplejpeg in strict
    mode (CMYK/YCCK JPEG through Pillow), everything else by Pillow (HEIF via
    pillow_heif). Animated and multi-page files yield their first frame; with
    ``max_frames`` above 1, an animated GIF, WebP or PNG yields up to that many
    frames spread over it (:attr:`DecodedImage.frames`). The pixel cap then
    counts every frame decoded on the way, those skipped over included: frames
    past what it allows are not reached, and the time cap covers them all.

    The time cap works by refusing input reads once ``timeout_s`` has passed
    since the call began, so it stops decoders that pull data in blocks
    (PNG, GIF, BMP, uncompressed TIFF, Pillow's JPEG path). A single C decode
    call (simplejpeg, libheif, libavif, libwebp, libtiff on a compressed strip
    set) cannot be interrupted; the pixel cap is what bounds those.

    Thread-safe: no global state is touched per call.

    Raises :class:`PermanentError` with code ``empty_object``,
    ``unsupported_format``, ``too_large``, ``corrupt_image`` or
    ``decode_timeout``.
    """
    fmt = sniff_format(data)
    reader = _reader(data, timeout_s)
    with _decode_errors(reader, fmt, timeout_s, max_pixels):
        image, animation = _decode(reader, data, fmt, max_pixels, max_frames)
    width, height = image.size
    if animation is None:
        return DecodedImage(image=image, format=fmt, width=width, height=height)
    frames, indices, count = animation
    return DecodedImage(image, fmt, width, height, frames=frames, frame_indices=indices, frame_count=count)


@dataclass(frozen=True)
class CheckedJpeg:
    """A JPEG checked on the CPU, to be decoded at full size elsewhere (the model's device).

    ``width`` and ``height`` are the full image's, and ``preview`` the whole image
    at a reduced DCT scale; both with the EXIF ``orientation`` applied, which the
    full decode must apply too.
    """

    width: int
    height: int
    orientation: int
    preview: Image.Image


def check_jpeg(data: bytes, *, max_pixels: int, timeout_s: float = 15.0, min_side: int = 1) -> CheckedJpeg | None:
    """Every check :func:`decode_image` makes of a JPEG, without its full-size decode; None for any other
    format and for CMYK/YCCK JPEGs, which only :func:`decode_image` decodes.

    Sniffing and the pixel cap come first, from the header. The entropy-coded
    data is then decoded strictly, as by :func:`decode_image`, but at the
    smallest DCT scale whose sides are at least ``min_side`` (or the image's
    own): corrupt or truncated data fails here with ``corrupt_image``, for a
    fraction of a full decode's CPU. Raises what :func:`decode_image` raises.
    """
    fmt = sniff_format(data)
    if fmt != "jpeg":
        return None
    reader = _reader(data, timeout_s)
    with _decode_errors(reader, fmt, timeout_s, max_pixels):
        im = _open_header(reader, fmt, max_pixels, data)
        if im.mode == "CMYK":
            return None
        orientation = _orientation(im)
        reader.check()
        width, height = im.size
        pixels = _strict_jpeg(data, (min(width, min_side), min(height, min_side)))
    preview = _apply_orientation(Image.fromarray(pixels), orientation)
    if _ORIENTATION_TRANSPOSE.get(orientation) in _SWAPS_SIDES:
        width, height = height, width
    return CheckedJpeg(width=width, height=height, orientation=orientation, preview=preview)


def declared_size(data: bytes) -> tuple[int, int] | None:
    """(width, height) as the header of ``data`` declares it, read by its sniffed format's decoder alone;
    None when there is no readable header."""
    try:
        fmt = sniff_format(data)
        if fmt == "webp":
            # Pillow's WebP reader allocates the whole canvas on opening: read the header here.
            return _webp_size(data)
        with Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[fmt]]) as im:
            return im.size
    except Exception:  # noqa: BLE001 - a header that cannot be read declares nothing
        return None


def _webp_size(data: bytes) -> tuple[int, int] | None:
    """The canvas of a WebP file from its first chunk: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    chunk = data[12:16]
    if chunk == b"VP8X" and len(data) >= 30:
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if chunk == b"VP8L" and len(data) >= 25 and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return 1 + (bits & 0x3FFF), 1 + ((bits >> 14) & 0x3FFF)
    if chunk == b"VP8 " and len(data) >= 30 and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    return None
