"""Walking image containers: PNG chunks, JPEG segments and RIFF (WebP) chunks, one bounded walk.

Each format says where its next chunk is; :func:`_walk` applies the bounds
every format shares (how many chunks, how far into the file, the time budget,
a chunk that runs past the end) and hands the chunks on. What they hold (text,
XMP packets, EXIF blocks, whether a C2PA box is present) is gathered into
:class:`Metadata` for the readers, with whether the walk reached the container's
own end (``complete``): then what it did not see is not there, and the C2PA
SDK, the one costly reader of metadata, is asked only where a manifest may be.
Formats without a walker here are searched for XMP packets and, for TIFF, HEIF
and AVIF, their EXIF block.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field

from PIL import Image

from ..sanitise import INVALID_UTF8
from ._base import (
    CLEANED,
    MAX_CHUNKS,
    MAX_SCAN_BYTES,
    MAX_TEXT_BYTES,
    MAX_TOTAL_TEXT_BYTES,
    MAX_XMP_BYTES,
    Budget,
    BudgetExceeded,
    clip,
)


@dataclass
class Metadata:
    """What the container walk collected: text values, XMP packets, EXIF blocks."""

    texts: list[tuple[str, str, str]] = field(default_factory=list)  # (source, key, text)
    xmp: list[tuple[str, bytes]] = field(default_factory=list)  # (source, packet)
    # (source, TIFF bytes, possibly behind an "Exif\0\0" prefix)
    exif: list[tuple[str, bytes]] = field(default_factory=list)
    c2pa_box: bool = False  # a JUMBF/C2PA container was seen
    app11: bool = False  # a JPEG APP11 segment, JUMBF-marked or not
    # The walk reached the container's own end (PNG's IEND, JPEG's first scan, the RIFF size)
    # without a broken chunk: what it did not see is not in the file's metadata.
    complete: bool = False
    # Errors routed to the signal that would have read the data; "*" goes to all metadata signals.
    errors: dict[str, list[str]] = field(default_factory=dict)
    text_bytes: int = 0

    def error(self, signal: str, message: str) -> None:
        self.errors.setdefault(signal, []).append(message)

    def errors_for(self, signal: str) -> list[str]:
        return [*self.errors.get("*", []), *self.errors.get(signal, [])]

    def add_text(self, source: str, key: str, raw: bytes, encoding: str) -> None:
        if self.text_bytes + len(raw) > MAX_TOTAL_TEXT_BYTES:
            self.error(
                _text_signal(key),
                f"{source} {key!r} skipped: text of this file over {MAX_TOTAL_TEXT_BYTES} bytes",
            )
            return
        self.text_bytes += len(raw)
        try:
            text = raw.decode(encoding)
        except UnicodeDecodeError:
            text = raw.decode(encoding, errors="replace")
            if (cleaned := CLEANED.get()) is not None:
                cleaned[INVALID_UTF8] += 1
        self.texts.append((source, key, text))


_XMP_KEYWORD = "XML:com.adobe.xmp"


def _text_signal(key: str) -> str:
    return "iptc_xmp" if key == _XMP_KEYWORD else "generation_params"


def _inflate(data: bytes, limit: int) -> bytes:
    """zlib-decompress at most ``limit`` bytes; raise ValueError past it (bombs) or on corrupt data."""
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, limit + 1)
    except zlib.error as exc:
        raise ValueError(f"corrupt compressed data ({exc})") from exc
    if len(out) > limit or inflater.unconsumed_tail:
        raise ValueError(f"decompresses to more than {limit} bytes")
    return out


@dataclass(frozen=True, slots=True)
class _Chunk:
    """One length-prefixed piece of a container: a PNG chunk, a JPEG segment, a RIFF chunk."""

    kind: bytes  # PNG chunk type, RIFF FourCC, or the JPEG marker byte
    label: str  # how errors name it
    offset: int  # where its header starts
    start: int  # its body: data[start:end]
    end: int
    fits: bool  # the body (and any trailer) lies inside the file


@dataclass
class _Cursor:
    """Whether a chunk iterator stopped where its container ends, not where the data ran out."""

    at_end: bool = False


def _walk(
    container: str, unit: str, chunks: Iterator[_Chunk], meta: Metadata, budget: Budget
) -> Iterator[_Chunk]:
    """The chunks of one container under the shared bounds; where one is broken, an error and the end."""
    for count, chunk in enumerate(chunks, 1):
        if count > MAX_CHUNKS:
            meta.error("*", f"{container} has more than {MAX_CHUNKS} {unit}s; the rest was not read")
            return
        if count % 256 == 0:
            budget.check()
        if not chunk.fits:
            meta.error(
                "*",
                f"{container} {unit} {chunk.label} at offset {chunk.offset} runs past the end of the file",
            )
            return
        yield chunk


def _png_chunks(data: bytes) -> Iterator[_Chunk]:
    pos, end = 8, min(len(data), MAX_SCAN_BYTES)
    while pos + 8 <= end:
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        body_end = pos + 8 + length
        yield _Chunk(
            ctype, repr(ctype), pos, pos + 8, body_end, length <= 0x7FFFFFFF and body_end + 4 <= len(data)
        )
        pos = body_end + 4  # CRC


def _jpeg_segments(data: bytes, cursor: _Cursor) -> Iterator[_Chunk]:
    pos, end = 2, min(len(data), MAX_SCAN_BYTES)
    strays = False
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            # Stray bytes between segments (some cameras write them): resync on the next marker.
            # Past them the walk is a guess, not a reading of the whole container.
            strays = True
            nxt = data.find(b"\xff", pos, end)
            if nxt < 0:
                return
            pos = nxt
            continue
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte
            pos += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # no length field
            pos += 2
            continue
        if marker in (0xDA, 0xD9):  # start of scan / end of image: metadata lives before
            cursor.at_end = not strays
            return
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        seg_end = pos + 2 + length
        yield _Chunk(
            bytes([marker]), f"0x{marker:02X}", pos, pos + 4, seg_end, length >= 2 and seg_end <= len(data)
        )
        pos = seg_end


def _riff_chunks(data: bytes, cursor: _Cursor) -> Iterator[_Chunk]:
    declared_end = 8 + int.from_bytes(data[4:8], "little")
    riff_end = min(len(data), declared_end, MAX_SCAN_BYTES)
    pos = 12
    while pos + 8 <= riff_end:
        fourcc = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body_end = pos + 8 + size
        yield _Chunk(fourcc, repr(fourcc), pos, pos + 8, body_end, body_end <= riff_end)
        pos = body_end + (size & 1)  # bodies are padded to even sizes
    cursor.at_end = pos == declared_end == riff_end


def _read_png(data: bytes, meta: Metadata, budget: Budget) -> None:
    well_named = True
    for chunk in _walk("PNG", "chunk", _png_chunks(data), meta, budget):
        if chunk.kind in (b"tEXt", b"zTXt", b"iTXt"):
            _png_text(chunk.kind, data, chunk.start, chunk.end, meta)
        elif chunk.kind == b"eXIf":
            meta.exif.append(("png:eXIf", data[chunk.start : chunk.end]))
        elif chunk.kind == b"caBX":
            meta.c2pa_box = True
        elif chunk.kind == b"IEND":
            meta.complete = well_named
            return
        # A chunk type is four ASCII letters; anything else is a damaged file, not a reading of it.
        well_named = well_named and chunk.kind.isascii() and chunk.kind.isalpha()


def _png_text(ctype: bytes, data: bytes, start: int, end: int, meta: Metadata) -> None:
    kind = ctype.decode("ascii")
    # The keyword is at most 79 bytes: look for its terminator only there.
    sep = data.find(b"\x00", start, min(end, start + 80))
    if sep < 0:
        meta.error("*", f"PNG {kind} chunk at offset {start - 8} has no keyword terminator")
        return
    key = data[start:sep].decode("latin-1")
    source = f"png:{kind}"
    if end - sep > MAX_TEXT_BYTES:
        meta.error(
            _text_signal(key),
            f"{source} {key!r} skipped: {end - sep} bytes, over the cap of {MAX_TEXT_BYTES}",
        )
        return
    try:
        if ctype == b"tEXt":
            text, encoding = data[sep + 1 : end], "latin-1"
        elif ctype == b"zTXt":
            text, encoding = _inflate(data[sep + 2 : end], MAX_TEXT_BYTES), "latin-1"
        else:
            # compression flag, method, language tag \0, translated keyword \0, text
            body = data[sep + 1 : end]
            parts = body[2:].split(b"\x00", 2)
            if len(body) < 2 or len(parts) < 3:
                raise ValueError("truncated iTXt header")
            text, encoding = parts[2], "utf-8"
            if body[:1] == b"\x01":
                text = _inflate(text, MAX_TEXT_BYTES)
    except ValueError as exc:
        meta.error(_text_signal(key), f"{source} {key!r}: {exc}")
        return
    if key == _XMP_KEYWORD:
        meta.xmp.append((source, text))
    else:
        meta.add_text(source, key, text, encoding)


_JPEG_XMP = b"http://ns.adobe.com/xap/1.0/\x00"
_JPEG_XMP_EXT = b"http://ns.adobe.com/xmp/extension/\x00"


def _read_jpeg(data: bytes, meta: Metadata, budget: Budget) -> None:
    extended: dict[bytes, bytearray] = {}
    cursor = _Cursor()
    for segment in _walk("JPEG", "segment", _jpeg_segments(data, cursor), meta, budget):
        marker, start, end = segment.kind[0], segment.start, segment.end
        if marker == 0xE1:
            _jpeg_app1(data, start, end, meta, extended)
        elif marker == 0xEB:
            # JUMBF (ISO 19566-5) in APP11: where C2PA lives in JPEG. The SDK reads APP11
            # segments whatever their first bytes, so any of them may hold a manifest.
            meta.c2pa_box = meta.c2pa_box or data[start : start + 2] == b"JP"
            meta.app11 = True
        elif marker == 0xFE and end - start <= MAX_TEXT_BYTES:
            meta.add_text("jpeg:COM", "Comment", data[start:end], "utf-8")
    for guid, packet in extended.items():
        meta.xmp.append((f"jpeg:APP1 extended XMP {guid.decode('latin-1')}", bytes(packet)))
    meta.complete = cursor.at_end


def _jpeg_app1(data: bytes, start: int, end: int, meta: Metadata, extended: dict[bytes, bytearray]) -> None:
    head = data[start : start + len(_JPEG_XMP_EXT)]
    if head.startswith(b"Exif\x00"):
        meta.exif.append(("jpeg:APP1", data[start:end]))
    elif head.startswith(_JPEG_XMP):
        meta.xmp.append(("jpeg:APP1", data[start + len(_JPEG_XMP) : end]))
    elif head == _JPEG_XMP_EXT:
        # GUID (32 hex digits), full length, offset of this part, data.
        body = start + len(_JPEG_XMP_EXT)
        if end - body < 40:
            meta.error("iptc_xmp", "extended XMP segment too short")
            return
        guid = data[body : body + 32]
        full, offset = struct.unpack(">II", data[body + 32 : body + 40])
        part = data[body + 40 : end]
        if full > MAX_XMP_BYTES or offset + len(part) > full:
            meta.error(
                "iptc_xmp", f"extended XMP of {full} bytes skipped (over {MAX_XMP_BYTES} or inconsistent)"
            )
            return
        if guid not in extended and len(extended) >= 4:
            return
        buf = extended.setdefault(guid, bytearray(full))
        if len(buf) == full:
            buf[offset : offset + len(part)] = part


def _read_webp(data: bytes, meta: Metadata, budget: Budget) -> None:
    cursor = _Cursor()
    for chunk in _walk("WebP", "chunk", _riff_chunks(data, cursor), meta, budget):
        if chunk.kind == b"EXIF":
            meta.exif.append(("webp:EXIF", data[chunk.start : chunk.end]))
        elif chunk.kind == b"XMP ":
            meta.xmp.append(("webp:XMP", data[chunk.start : chunk.end]))
        elif chunk.kind == b"C2PA":
            meta.c2pa_box = True
    meta.complete = cursor.at_end


def _scan_xmp_packets(data: bytes, meta: Metadata) -> None:
    """Formats without a walker here (TIFF, HEIF, AVIF, GIF): XMP is stored as plain text, find it."""
    end = min(len(data), MAX_SCAN_BYTES)
    pos = 0
    for _ in range(8):
        start = data.find(b"<x:xmpmeta", pos, end)
        if start < 0:
            return
        stop = data.find(b"</x:xmpmeta>", start, min(end, start + MAX_XMP_BYTES))
        if stop < 0:
            meta.error("iptc_xmp", f"XMP packet at offset {start} has no end within {MAX_XMP_BYTES} bytes")
            return
        stop += len(b"</x:xmpmeta>")
        meta.xmp.append(("xmp packet", data[start:stop]))
        pos = stop


# What Pillow raises on a mangled EXIF block or image container.
EXIF_ERRORS: tuple[type[BaseException], ...] = (
    ValueError,
    SyntaxError,
    struct.error,
    OSError,
    TypeError,
    KeyError,
    IndexError,
    EOFError,
    UnicodeDecodeError,
    RecursionError,
    RuntimeError,  # pillow's AVIF and HEIF openers report broken containers this way
)


def _other_exif(data: bytes, fmt: str, meta: Metadata) -> None:
    if fmt == "tiff":
        meta.exif.append(("tiff", data[:MAX_SCAN_BYTES]))
    elif fmt in ("heif", "avif"):
        # Opening reads the container's item list only, not the pixels.
        try:
            with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
                exif = im.info.get("exif")
        except EXIF_ERRORS as exc:
            meta.error("exif_software", f"{fmt} metadata unreadable: {type(exc).__name__}: {clip(exc, 120)}")
            return
        if isinstance(exif, bytes) and exif:
            meta.exif.append((fmt, exif))


def collect(data: bytes, fmt: str, budget: Budget) -> Metadata:
    """Everything the readers need from the file's container; a budget run out becomes an error."""
    meta = Metadata()
    try:
        if fmt == "png" and data.startswith(b"\x89PNG\r\n\x1a\n"):
            _read_png(data, meta, budget)
        elif fmt == "jpeg" and data.startswith(b"\xff\xd8"):
            _read_jpeg(data, meta, budget)
        elif fmt == "webp" and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            _read_webp(data, meta, budget)
        else:
            _scan_xmp_packets(data, meta)
            _other_exif(data, fmt, meta)
    except BudgetExceeded as exc:
        meta.error("*", f"{exc} while reading the {fmt} metadata; the rest was not read")
    return meta
