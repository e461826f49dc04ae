"""Provenance signals: the evidence generators leave in an image file.

Beside the neural score, an upload can say outright where it came from. Five
readers look at the bytes already downloaded (and, for the watermark, at the
decoded pixels):

* ``c2pa``: C2PA Content Credentials, every manifest in the store (not only the
  active one): claim generator, signer, validation state, and each action's
  ``digitalSourceType``.
* ``iptc_xmp``: IPTC ``DigitalSourceType`` in XMP (JPEG APP1, PNG iTXt, WebP).
* ``generation_params``: the text that AUTOMATIC1111, ComfyUI, NovelAI (and
  InvokeAI, Fooocus) write into PNG text chunks or EXIF, with the model name
  when it is stated.
* ``sd_watermark``: Stable Diffusion's invisible ``dwtDct`` watermark (SD 1.x,
  SD 2.x and SDXL payloads), decoded with numpy alone.
* ``exif_software``: the EXIF Software tag, a weak hint that never flags alone.

Only ``trainedAlgorithmicMedia`` and ``compositeWithTrainedAlgorithmicMedia``
count as generative AI; ``algorithmicMedia`` (procedural, not trained) does
not. A strong AI signal lets the pipeline flag an image whatever its score;
the absence of every signal proves nothing, since metadata is trivially
stripped.

Reading is bounded like decoding: containers are walked chunk by chunk with
caps on counts and sizes, compressed text is inflated with a size limit, and a
time budget is checked between steps. A malformed manifest or chunk becomes
the ``error`` of its signal, never an exception. Nothing here opens a network
connection: the c2pa context has remote manifest fetching and OCSP switched
off and an empty network allow-list.
"""

from __future__ import annotations

import functools
import io
import json
import logging
import math
import re
import struct
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any
from xml.parsers import expat

import numpy as np
from PIL import Image

from .sanitise import INVALID_UTF8, clean_json, clean_text

log = logging.getLogger(__name__)

SIGNAL_NAMES: tuple[str, ...] = ("c2pa", "iptc_xmp", "generation_params", "sd_watermark", "exif_software")

STRONG = "strong"
WEAK = "weak"
NONE = "none"

# IPTC digital source types that mean generative AI. "algorithmicMedia" is
# deliberately absent: it is procedural output (fractals, test gradients).
AI_SOURCE_TYPES: frozenset[str] = frozenset(
    {"trainedAlgorithmicMedia", "compositeWithTrainedAlgorithmicMedia"}
)
_AI_SOURCE_TYPES_LOWER = frozenset(t.lower() for t in AI_SOURCE_TYPES)

# --- bounds -----------------------------------------------------------------
MAX_SCAN_BYTES = 64 * 1024 * 1024  # container structure walked at most this far
MAX_CHUNKS = 20_000  # PNG chunks, JPEG segments, RIFF chunks
MAX_TEXT_BYTES = 8 * 1024 * 1024  # one text value, after decompression
MAX_TOTAL_TEXT_BYTES = 32 * 1024 * 1024  # all text values of one file together
MAX_XMP_BYTES = 4 * 1024 * 1024  # one XMP packet
MAX_C2PA_MANIFESTS = 64
MAX_C2PA_ACTIONS = 256
MAX_EVIDENCE_STR = 300
MAX_EVIDENCE_LIST = 32
# Any string of the stored findings (error messages included) is at most this long.
MAX_FINDINGS_STR = 2000

# --- C2PA reader settings ----------------------------------------------------
# remote_manifest_fetch and ocsp_fetch are the two switches that make the SDK
# reach out while reading; the empty allow-list refuses any host should a
# future SDK version find a third reason. Unknown keys are silently ignored by
# the SDK, so tests check the behaviour (no connection), not this dict.
C2PA_SETTINGS: dict[str, Any] = {
    "verify": {"remote_manifest_fetch": False, "ocsp_fetch": False},
    "core": {"allowed_network_hosts": [], "max_decompressed_manifest_size_in_mb": 16},
}
_C2PA_MIME = {
    "jpeg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "heif": "image/heif",
    "avif": "image/avif",
}

# --- Stable Diffusion watermark (invisible-watermark's dwtDct) ---------------
# The encoder works on the U plane of OpenCV's BGR->YUV, takes its Haar LL band,
# and in every 4x4 block of that band quantises the largest non-DC magnitude
# so that (value mod 36) lands at 9 (bit 0) or 27 (bit 1); bit i goes into
# blocks i, i+n, i+2n, ... in row-major order.
WM_SCALE = 36.0
WM_MIN_PIXELS = 256 * 256  # the encoder refuses smaller images
# The top rows only: more add votes, not information. Not less, though: marks weakened by
# 4:2:0 JPEG need the votes (on a marked 12 MP photo a 1 MP cap lost an SDXL mark this finds).
WM_MAX_SCAN_PIXELS = 4_000_000
# Pixels converted per step: about 4 MB of float32 buffers per image, reused step to step.
# Larger steps stop fitting the caches and cost page faults (fresh pages every step) that
# outweigh the arithmetic; smaller ones pay numpy's per-call overhead.
WM_STRIP_PIXELS = 131_072
WM_FALSE_POSITIVE = 1e-8  # per payload and channel order, for an unmarked image
_HAAR = 0.7071067811865476  # PyWavelets' Haar tap; same float ops give the same LL band bit for bit
# OpenCV's BGR->YUV multipliers (14-bit fixed point) as float32: each is an integer over 2**14.
_Y_RED, _Y_GREEN, _Y_BLUE, _U_BLUE_MINUS_Y = (np.float32(c / (1 << 14)) for c in (4899, 9617, 1868, 8061))


def _payload_bits(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


@dataclass(frozen=True)
class _Payload:
    name: str
    tool: str
    bits: np.ndarray


WM_PAYLOADS: tuple[_Payload, ...] = (
    # SDXL (sgm and diffusers): a fixed 48-bit message.
    _Payload(
        "SDXL",
        "Stable Diffusion XL",
        np.array(
            [int(c) for c in format(0b101100111110110010010000011110111011000110011110, "048b")], np.uint8
        ),
    ),
    # The Stability reference scripts: the bytes of a string.
    _Payload("SDV2", "Stable Diffusion 2", _payload_bits(b"SDV2")),
    _Payload("StableDiffusionV1", "Stable Diffusion 1", _payload_bits(b"StableDiffusionV1")),
)


@functools.lru_cache(maxsize=16)
def min_matching_bits(n_bits: int, p_false: float = WM_FALSE_POSITIVE) -> int:
    """Fewest matching bits whose chance on an unmarked image is at most ``p_false``.

    On an unmarked image the decoded bits behave like fair coins (measured on
    thousands of crops of real photos and generated images, re-encoded at
    random JPEG qualities), so the chance of ``k`` or more matches is a binomial
    tail.
    """
    total = 2**n_bits
    tail = 0
    for k in range(n_bits, -1, -1):
        tail += math.comb(n_bits, k)
        if tail / total > p_false:
            return k + 1
    return 0


# ============================================================================ results


@dataclass(frozen=True)
class Signal:
    """One kind of provenance evidence, found in the file or not."""

    name: str
    found: bool  # the file carries this kind of evidence at all
    ai: bool  # the evidence says generative AI
    strength: str  # "strong" | "weak" | "none"
    evidence: dict[str, Any] = field(default_factory=dict)  # JSON-serialisable
    error: str | None = None  # malformed data, time budget exceeded...

    def to_json(self) -> dict[str, Any]:
        return {
            "found": self.found,
            "ai": self.ai,
            "strength": self.strength,
            "evidence": self.evidence,
            "error": self.error,
        }


@dataclass(frozen=True)
class Findings:
    """Every signal read from one image."""

    signals: tuple[Signal, ...]

    @property
    def ai_strong(self) -> bool:
        """True when any signal says generative AI with strong evidence: enough to flag."""
        return any(s.ai and s.strength == STRONG for s in self.signals)

    @property
    def tools(self) -> list[str]:
        """Generator tools named by the signals that say AI, for display."""
        names: list[str] = []
        for signal in self.signals:
            if not signal.ai:
                continue
            for tool in (signal.evidence.get("tool"), *signal.evidence.get("tools", ())):
                if isinstance(tool, str) and tool and tool not in names:
                    names.append(tool)
        return names

    def get(self, name: str) -> Signal | None:
        return next((s for s in self.signals if s.name == name), None)

    # What the sanitising boundary changed in the file's text (worker.sanitise), by kind.
    text_cleaned: dict[str, int] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """What ``images.provenance`` stores: every string through worker.sanitise, changes counted."""
        changes = Counter(self.text_cleaned)
        signals = clean_json({s.name: s.to_json() for s in self.signals}, MAX_FINDINGS_STR, changes)
        out: dict[str, Any] = {"ai": self.ai_strong, "signals": signals}
        if changes:
            out["text_cleaned"] = dict(sorted(changes.items()))
        return out


# ============================================================================ plumbing


class _BudgetExceeded(Exception):
    """The time budget ran out in the middle of a reader."""


class _Budget:
    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def check(self) -> None:
        if self.expired:
            raise _BudgetExceeded(f"time budget of {self.seconds:g}s exceeded")


# Changes the sanitising boundary made during the current read_provenance call.
_CLEANED: ContextVar[Counter[str] | None] = ContextVar("provenance_text_cleaned", default=None)


def _clip(value: Any, limit: int = MAX_EVIDENCE_STR) -> str:
    """A value from the file as evidence text: through worker.sanitise, clipped to ``limit``."""
    text = value if isinstance(value, str | bytes) else str(value)
    return clean_text(text.strip(), limit, _CLEANED.get())


def _unique(items: Iterable[str], limit: int = MAX_EVIDENCE_LIST) -> list[str]:
    out: list[str] = []
    for item in items:
        if item and item not in out:
            out.append(item)
            if len(out) >= limit:
                break
    return out


def _join_errors(errors: list[str]) -> str | None:
    return "; ".join(_unique(errors, 8)) or None


def _missing(name: str, error: str | None = None, **evidence: Any) -> Signal:
    return Signal(name, False, False, NONE, evidence, error)


# ============================================================================ containers


@dataclass
class _Metadata:
    """What the container walk collected: text values, XMP packets, EXIF blocks."""

    texts: list[tuple[str, str, str]] = field(default_factory=list)  # (source, key, text)
    xmp: list[tuple[str, bytes]] = field(default_factory=list)  # (source, packet)
    # (source, TIFF bytes, possibly behind an "Exif\0\0" prefix)
    exif: list[tuple[str, bytes]] = field(default_factory=list)
    c2pa_box: bool = False  # a JUMBF/C2PA container was seen
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
            if (cleaned := _CLEANED.get()) is not None:
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


def _walk_png(data: bytes, meta: _Metadata, budget: _Budget) -> None:
    pos, count = 8, 0
    end = min(len(data), MAX_SCAN_BYTES)
    while pos + 8 <= end:
        count += 1
        if count > MAX_CHUNKS:
            meta.error("*", f"PNG has more than {MAX_CHUNKS} chunks; the rest was not read")
            return
        if count % 256 == 0:
            budget.check()
        length = int.from_bytes(data[pos : pos + 4], "big")
        ctype = data[pos + 4 : pos + 8]
        body_start, body_end = pos + 8, pos + 8 + length
        if length > 0x7FFFFFFF or body_end + 4 > len(data):
            meta.error("*", f"PNG chunk {ctype!r} at offset {pos} runs past the end of the file")
            return
        if ctype in (b"tEXt", b"zTXt", b"iTXt"):
            _png_text(ctype, data, body_start, body_end, meta)
        elif ctype == b"eXIf":
            meta.exif.append(("png:eXIf", data[body_start:body_end]))
        elif ctype == b"caBX":
            meta.c2pa_box = True
        elif ctype == b"IEND":
            return
        pos = body_end + 4  # CRC


def _png_text(ctype: bytes, data: bytes, start: int, end: int, meta: _Metadata) -> None:
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


def _walk_jpeg(data: bytes, meta: _Metadata, budget: _Budget) -> None:
    pos, count = 2, 0
    end = min(len(data), MAX_SCAN_BYTES)
    extended: dict[bytes, bytearray] = {}
    while pos + 4 <= end:
        if data[pos] != 0xFF:
            # Stray bytes between segments (some cameras write them): resync on the next marker.
            nxt = data.find(b"\xff", pos, end)
            if nxt < 0:
                break
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
            break
        count += 1
        if count > MAX_CHUNKS:
            meta.error("*", f"JPEG has more than {MAX_CHUNKS} segments; the rest was not read")
            break
        if count % 256 == 0:
            budget.check()
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        seg_start, seg_end = pos + 4, pos + 2 + length
        if length < 2 or seg_end > len(data):
            meta.error("*", f"JPEG segment 0x{marker:02X} at offset {pos} runs past the end of the file")
            break
        if marker == 0xE1:
            _jpeg_app1(data, seg_start, seg_end, meta, extended)
        elif marker == 0xEB and data[seg_start : seg_start + 2] == b"JP":
            meta.c2pa_box = True  # JUMBF (ISO 19566-5) in APP11: where C2PA lives in JPEG
        elif marker == 0xFE and seg_end - seg_start <= MAX_TEXT_BYTES:
            meta.add_text("jpeg:COM", "Comment", data[seg_start:seg_end], "utf-8")
        pos = seg_end
    for guid, packet in extended.items():
        meta.xmp.append((f"jpeg:APP1 extended XMP {guid.decode('latin-1')}", bytes(packet)))


def _jpeg_app1(data: bytes, start: int, end: int, meta: _Metadata, extended: dict[bytes, bytearray]) -> None:
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


def _walk_webp(data: bytes, meta: _Metadata, budget: _Budget) -> None:
    riff_end = min(len(data), 8 + int.from_bytes(data[4:8], "little"), MAX_SCAN_BYTES)
    pos, count = 12, 0
    while pos + 8 <= riff_end:
        count += 1
        if count > MAX_CHUNKS:
            meta.error("*", f"WebP has more than {MAX_CHUNKS} chunks; the rest was not read")
            return
        if count % 256 == 0:
            budget.check()
        fourcc = data[pos : pos + 4]
        size = int.from_bytes(data[pos + 4 : pos + 8], "little")
        body_start, body_end = pos + 8, pos + 8 + size
        if body_end > riff_end:
            meta.error("*", f"WebP chunk {fourcc!r} at offset {pos} runs past the end of the file")
            return
        if fourcc == b"EXIF":
            meta.exif.append(("webp:EXIF", data[body_start:body_end]))
        elif fourcc == b"XMP ":
            meta.xmp.append(("webp:XMP", data[body_start:body_end]))
        elif fourcc == b"C2PA":
            meta.c2pa_box = True
        pos = body_end + (size & 1)


def _scan_xmp_packets(data: bytes, meta: _Metadata) -> None:
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
_EXIF_ERRORS: tuple[type[BaseException], ...] = (
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


def _other_exif(data: bytes, fmt: str, meta: _Metadata) -> None:
    if fmt == "tiff":
        meta.exif.append(("tiff", data[:MAX_SCAN_BYTES]))
    elif fmt in ("heif", "avif"):
        # Opening reads the container's item list only, not the pixels.
        try:
            with Image.open(io.BytesIO(data), formats=[fmt.upper()]) as im:
                exif = im.info.get("exif")
        except _EXIF_ERRORS as exc:
            meta.error("exif_software", f"{fmt} metadata unreadable: {type(exc).__name__}: {_clip(exc, 120)}")
            return
        if isinstance(exif, bytes) and exif:
            meta.exif.append((fmt, exif))


def _collect(data: bytes, fmt: str, budget: _Budget) -> _Metadata:
    meta = _Metadata()
    try:
        if fmt == "png" and data.startswith(b"\x89PNG\r\n\x1a\n"):
            _walk_png(data, meta, budget)
        elif fmt == "jpeg" and data.startswith(b"\xff\xd8"):
            _walk_jpeg(data, meta, budget)
        elif fmt == "webp" and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            _walk_webp(data, meta, budget)
        else:
            _scan_xmp_packets(data, meta)
            _other_exif(data, fmt, meta)
    except _BudgetExceeded as exc:
        meta.error("*", f"{exc} while reading the {fmt} metadata; the rest was not read")
    return meta


# ============================================================================ EXIF


_EXIF_IFD = 0x8769
_TAG_SOFTWARE = 0x0131
_TAG_USER_COMMENT = 0x9286
_TAG_IMAGE_DESCRIPTION = 0x010E
_TAG_MAKE = 0x010F
_TAG_MODEL = 0x0110


def _decode_user_comment(value: Any) -> str:
    """EXIF UserComment: an 8-byte charset prefix, then the text."""
    if isinstance(value, str):
        return value.strip("\x00 ")
    if not isinstance(value, bytes | bytearray):
        return ""
    prefix, body = bytes(value[:8]), bytes(value[8:])
    if prefix == b"UNICODE\x00":
        # UTF-16 in whichever byte order the writer chose (piexif: big-endian):
        # for mostly-ASCII text the zero bytes give it away.
        even_zeros = body[0::2].count(0)
        odd_zeros = body[1::2].count(0)
        text = body.decode("utf-16-be" if even_zeros >= odd_zeros else "utf-16-le", errors="replace")
    elif prefix.startswith(b"ASCII"):
        text = body.decode("latin-1")
    elif prefix == b"JIS\x00\x00\x00\x00\x00":
        text = body.decode("shift_jis", errors="replace")
    elif prefix == b"\x00" * 8:
        text = body.decode("utf-8", errors="replace")
    else:
        text = bytes(value).decode("utf-8", errors="replace")
    return text.strip("\x00 ")


def _exif_text(value: Any) -> str:
    if isinstance(value, bytes | bytearray):
        return bytes(value).decode("utf-8", errors="replace").strip("\x00 ")
    return value.strip("\x00 ") if isinstance(value, str) else ""


def _check_tiff_header(raw: bytes) -> None:
    """Raise ValueError unless IFD0 lies inside the block: Pillow only warns, and reads nothing."""
    tiff = raw[6:] if raw.startswith(b"Exif\x00") else raw
    if tiff[:4] not in (b"II*\x00", b"MM\x00*"):
        raise ValueError("no TIFF header")
    order = "<" if tiff[:2] == b"II" else ">"
    (offset,) = struct.unpack(order + "I", tiff[4:8])
    if offset < 8 or offset + 2 > len(tiff):
        raise ValueError(f"IFD0 offset {offset} outside the {len(tiff)}-byte block")
    (entries,) = struct.unpack(order + "H", tiff[offset : offset + 2])
    if offset + 2 + 12 * entries > len(tiff):
        raise ValueError(f"IFD0 declares {entries} entries, more than the block holds")


def _parse_exif(raw: bytes) -> dict[str, str]:
    """The few EXIF fields provenance needs. Raises one of ``_EXIF_ERRORS`` on a mangled block."""
    _check_tiff_header(raw)
    exif = Image.Exif()
    exif.load(raw)
    fields = {
        "Software": _exif_text(exif.get(_TAG_SOFTWARE)),
        "ImageDescription": _exif_text(exif.get(_TAG_IMAGE_DESCRIPTION)),
        "Make": _exif_text(exif.get(_TAG_MAKE)),
        "Model": _exif_text(exif.get(_TAG_MODEL)),
        "UserComment": _decode_user_comment(exif.get_ifd(_EXIF_IFD).get(_TAG_USER_COMMENT)),
    }
    return {k: v[:MAX_TEXT_BYTES] for k, v in fields.items() if v}


def _exif_fields(meta: _Metadata) -> tuple[list[tuple[str, dict[str, str]]], list[str]]:
    parsed: list[tuple[str, dict[str, str]]] = []
    errors: list[str] = []
    for source, raw in meta.exif[:4]:
        try:
            parsed.append((source, _parse_exif(raw)))
        except _EXIF_ERRORS as exc:
            errors.append(f"{source} EXIF unreadable: {type(exc).__name__}: {_clip(exc, 120)}")
    return parsed, errors


# ============================================================================ C2PA


def _source_type_name(value: Any) -> str:
    """The term of a digital source type, from a full IPTC URI or a bare value."""
    if not isinstance(value, str):
        return ""
    match = re.search(r"([A-Za-z]+)\s*$", value.strip())
    return match.group(1) if match else ""


def _is_ai_source_type(value: Any) -> bool:
    return _source_type_name(value).lower() in _AI_SOURCE_TYPES_LOWER


def _agent_name(agent: Any) -> str | None:
    if isinstance(agent, str):
        return _clip(agent)
    if isinstance(agent, dict) and isinstance(agent.get("name"), str):
        version = agent.get("version")
        return _clip(f"{agent['name']} {version}" if isinstance(version, str) else agent["name"])
    return None


def _claim_generator(manifest: dict[str, Any]) -> str | None:
    generator = manifest.get("claim_generator")
    if isinstance(generator, str) and generator:
        return _clip(generator)
    info = manifest.get("claim_generator_info")
    if isinstance(info, list):
        names = [n for n in (_agent_name(i) for i in info) if n]
        if names:
            return _clip(" / ".join(names))
    return None


def _find_source_types(node: Any, out: list[str], depth: int = 0) -> None:
    """Every digitalSourceType anywhere in an assertion (actions v1/v2, templates, custom ones)."""
    if depth > 12 or len(out) >= MAX_EVIDENCE_LIST:
        return
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "digitalSourceType" and isinstance(value, str):
                out.append(value.strip())
            else:
                _find_source_types(value, out, depth + 1)
    elif isinstance(node, list):
        for item in node[:MAX_C2PA_ACTIONS]:
            _find_source_types(item, out, depth + 1)


def _summarise_manifest(label: str, manifest: dict[str, Any], active: bool) -> dict[str, Any]:
    signature = manifest.get("signature_info") if isinstance(manifest.get("signature_info"), dict) else {}
    actions: list[dict[str, Any]] = []
    source_types: list[str] = []
    assertions = manifest.get("assertions") if isinstance(manifest.get("assertions"), list) else []
    for assertion in assertions[:MAX_C2PA_ACTIONS]:
        if not isinstance(assertion, dict):
            continue
        data = assertion.get("data")
        label_ = assertion.get("label")
        if isinstance(label_, str) and label_.startswith("c2pa.actions") and isinstance(data, dict):
            for action in (data.get("actions") or [])[:MAX_C2PA_ACTIONS]:
                if not isinstance(action, dict):
                    continue
                entry: dict[str, Any] = {"action": _clip(action.get("action", ""))}
                if isinstance(action.get("digitalSourceType"), str):
                    entry["digitalSourceType"] = action["digitalSourceType"].strip()
                agent = _agent_name(action.get("softwareAgent"))
                if agent:
                    entry["softwareAgent"] = agent
                if len(actions) < MAX_EVIDENCE_LIST:
                    actions.append(entry)
        _find_source_types(data, source_types)
    ai_agents = [
        a["softwareAgent"]
        for a in actions
        if "softwareAgent" in a and _is_ai_source_type(a.get("digitalSourceType"))
    ]
    return {
        "label": _clip(label),
        "active": active,
        "claim_generator": _claim_generator(manifest),
        "title": _clip(manifest["title"]) if isinstance(manifest.get("title"), str) else None,
        "signer": {
            k: _clip(signature[k])
            for k in ("issuer", "common_name", "time", "alg")
            if isinstance(signature.get(k), str)
        },
        "actions": actions,
        "digital_source_types": _unique(source_types),
        "ai": any(_is_ai_source_type(t) for t in source_types),
        "ai_agents": _unique(ai_agents),
    }


def _validation_codes(store: dict[str, Any]) -> list[str]:
    codes: list[str] = []
    status = store.get("validation_status")
    if isinstance(status, list):
        codes += [s["code"] for s in status if isinstance(s, dict) and isinstance(s.get("code"), str)]
    results = store.get("validation_results")
    if isinstance(results, dict):
        # Failures only: successes are many and say nothing a reviewer needs.
        active = results.get("activeManifest")
        if isinstance(active, dict) and isinstance(active.get("failure"), list):
            codes += [
                s["code"] for s in active["failure"] if isinstance(s, dict) and isinstance(s.get("code"), str)
            ]
        for delta in results.get("ingredientDeltas") or []:
            failures = (
                (delta.get("validationDeltas") or {}).get("failure") if isinstance(delta, dict) else None
            )
            if isinstance(failures, list):
                codes += [
                    s["code"] for s in failures if isinstance(s, dict) and isinstance(s.get("code"), str)
                ]
    return _unique(codes)


def _c2pa_signal(store: dict[str, Any], remote_url: str | None) -> Signal:
    manifests = store.get("manifests") if isinstance(store.get("manifests"), dict) else {}
    active = store.get("active_manifest")
    summaries = [
        _summarise_manifest(label, manifest, label == active)
        for label, manifest in list(manifests.items())[:MAX_C2PA_MANIFESTS]
        if isinstance(manifest, dict)
    ]
    ai_manifests = [m for m in summaries if m["ai"]]
    source_types = _unique(t for m in summaries for t in m["digital_source_types"])
    tools = _unique(
        [*(a for m in ai_manifests for a in m["ai_agents"]), *(m["claim_generator"] for m in ai_manifests)]
    )
    active_summary = next((m for m in summaries if m["active"]), None)
    evidence: dict[str, Any] = {
        "active_manifest": _clip(active) if isinstance(active, str) else None,
        "claim_generator": active_summary["claim_generator"] if active_summary else None,
        "signer": active_summary["signer"] if active_summary else {},
        "validation_state": store.get("validation_state")
        if isinstance(store.get("validation_state"), str)
        else None,
        "validation_codes": _validation_codes(store),
        "digital_source_types": source_types,
        "ai_source_types": _unique(t for t in source_types if _is_ai_source_type(t)),
        "manifest_count": len(manifests),
        "manifests": summaries,
    }
    if remote_url:
        evidence["remote_manifest_url"] = _clip(remote_url)
    if tools:
        evidence["tool"] = tools[0]
        evidence["tools"] = tools
    ai = bool(ai_manifests)
    return Signal("c2pa", True, ai, STRONG if ai else NONE, evidence)


def _read_c2pa(data: bytes, fmt: str, meta: _Metadata, budget: _Budget) -> Signal:
    mime = _C2PA_MIME.get(fmt)
    if mime is None:
        return _missing("c2pa", supported=False)
    try:
        import c2pa  # the native library loads on first use, not at worker import
    except ImportError as exc:
        return _missing("c2pa", f"c2pa-python is not installed ({exc})")
    budget.check()
    try:
        context = c2pa.Context.from_dict(C2PA_SETTINGS)
    except c2pa.C2paError as exc:
        return _missing("c2pa", f"C2PA reader could not be configured: {_clip(exc, 200)}")
    try:
        try:
            with c2pa.Reader(mime, io.BytesIO(data), context=context) as reader:
                store = json.loads(reader.json())
                remote_url = reader.get_remote_url()
        except c2pa.C2paError as exc:
            return _c2pa_failure(exc, c2pa, meta)
        except (ValueError, RecursionError) as exc:  # the SDK's JSON did not parse
            return Signal("c2pa", True, False, NONE, {}, f"C2PA manifest store unreadable: {_clip(exc, 200)}")
    finally:
        context.close()
    if not isinstance(store, dict):
        return Signal("c2pa", True, False, NONE, {}, "C2PA manifest store is not a JSON object")
    return _c2pa_signal(store, remote_url)


def _c2pa_failure(exc: Exception, c2pa: Any, meta: _Metadata) -> Signal:
    message = _clip(str(exc), 300)
    if isinstance(exc, c2pa.C2paError.ManifestNotFound):
        return _missing("c2pa")
    if isinstance(exc, c2pa.C2paError.RemoteManifest) or message.startswith("Remote"):
        # The file points at a manifest on a server; fetching it is switched off on purpose.
        url = re.search(r"https?://\S+", message)
        evidence = {"remote_manifest_url": url.group(0) if url else None, "remote_manifest_fetched": False}
        return Signal("c2pa", True, False, NONE, evidence)
    if isinstance(exc, c2pa.C2paError.NotSupported):
        return _missing("c2pa", supported=False)
    # Malformed JUMBF, bad CBOR, a broken signature structure...: found when a
    # C2PA container is in the file (or the SDK got far enough to complain about one).
    found = meta.c2pa_box or not isinstance(exc, c2pa.C2paError.Other | c2pa.C2paError.Io)
    return Signal("c2pa", found, False, NONE, {}, f"C2PA data unreadable: {message}")


# ============================================================================ XMP


class _XmpRejected(Exception):
    """A DOCTYPE or entity declaration: not XMP, and the way to an entity bomb."""


def _refuse_dtd(*_args: Any) -> None:
    raise _XmpRejected("XMP packet declares a DOCTYPE or entities")


def _parse_xmp(packet: bytes) -> tuple[list[str], str | None]:
    """DigitalSourceType values and xmp:CreatorTool from one packet. Raises on malformed XML."""
    try:
        return _parse_xml(packet, namespaces=True)
    except expat.ExpatError as exc:
        if exc.code != expat.errors.codes[expat.errors.XML_ERROR_UNBOUND_PREFIX]:
            raise
    # Well-formed XML with a prefix its writer forgot to declare: match on names as written.
    return _parse_xml(packet, namespaces=False)


def _local_name(name: str) -> str:
    """``"ns-uri local"`` (namespace-aware parse) or ``"prefix:local"`` (plain) -> ``"local"``, lowercased."""
    return re.split(r"[ :]", name)[-1].lower()


def _parse_xml(packet: bytes, *, namespaces: bool) -> tuple[list[str], str | None]:
    parser = expat.ParserCreate(namespace_separator=" ") if namespaces else expat.ParserCreate()
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _refuse_dtd
    parser.EntityDeclHandler = _refuse_dtd
    values: list[str] = []
    creator: list[str] = []
    capture: list[tuple[int, str, list[str]]] = []  # (depth, property, text parts)
    depth = 0

    def prop(name: str) -> str | None:
        local = _local_name(name)
        return local if local in ("digitalsourcetype", "creatortool") else None

    def start(name: str, attrs: dict[str, str]) -> None:
        nonlocal depth
        depth += 1
        for key, value in attrs.items():
            which = prop(key)
            if which == "digitalsourcetype":
                values.append(value.strip())
            elif which == "creatortool":
                creator.append(value.strip())
        which = prop(name)
        if which:
            resource = next((v for k, v in attrs.items() if _local_name(k) == "resource"), None)
            if resource and which == "digitalsourcetype":
                values.append(resource.strip())
            else:
                capture.append((depth, which, []))

    def end(_name: str) -> None:
        nonlocal depth
        if capture and capture[-1][0] == depth:
            _, which, parts = capture.pop()
            text = "".join(parts).strip()
            if text:
                (values if which == "digitalsourcetype" else creator).append(text)
        depth -= 1

    def chars(text: str) -> None:
        if capture and sum(len(p) for p in capture[-1][2]) < 4096:
            capture[-1][2].append(text)

    parser.StartElementHandler = start
    parser.EndElementHandler = end
    parser.CharacterDataHandler = chars
    parser.Parse(packet.strip(b"\x00 \t\r\n"), True)
    return values, (creator[0] if creator else None)


_XMP_DST_FALLBACK = re.compile(
    rb"DigitalSourceType\s*=\s*[\"']([^\"'<>]{1,200})[\"']|DigitalSourceType>([^<]{1,200})<"
)


def _read_xmp(meta: _Metadata, budget: _Budget) -> Signal:
    errors = meta.errors_for("iptc_xmp")
    values: list[tuple[str, str, bool]] = []  # (value, source, well-formed)
    creator_tools: list[str] = []
    for source, packet in meta.xmp[:8]:
        budget.check()
        if len(packet) > MAX_XMP_BYTES:
            errors.append(f"{source} XMP packet of {len(packet)} bytes over the cap of {MAX_XMP_BYTES}")
            continue
        try:
            found, creator = _parse_xmp(packet)
        except (expat.ExpatError, _XmpRejected, ValueError, RecursionError) as exc:
            errors.append(f"{source} XMP malformed: {_clip(exc, 160)}")
            # A generator's marker in a broken packet is still worth recording, as a weak hint.
            for match in _XMP_DST_FALLBACK.finditer(packet[:MAX_XMP_BYTES]):
                raw = match.group(1) or match.group(2)
                values.append((raw.decode("utf-8", errors="replace").strip(), source, False))
            continue
        values += [(v, source, True) for v in found if v]
        if creator:
            creator_tools.append(_clip(creator))
    evidence: dict[str, Any] = {
        "digital_source_types": _unique(v for v, _, _ in values),
        "ai_source_types": _unique(v for v, _, _ in values if _is_ai_source_type(v)),
        "sources": _unique(s for _, s, _ in values),
        "xmp_packets": len(meta.xmp),
    }
    if creator_tools:
        evidence["creator_tool"] = creator_tools[0]
    ai_values = [(v, ok) for v, _, ok in values if _is_ai_source_type(v)]
    ai = bool(ai_values)
    strength = (STRONG if any(ok for _, ok in ai_values) else WEAK) if ai else NONE
    if ai and creator_tools:
        evidence["tool"] = creator_tools[0]
    return Signal("iptc_xmp", bool(values), ai, strength, evidence, _join_errors(errors))


# ============================================================================ generation parameters


# One "Key: value" item of A1111's settings line; values may be quoted JSON strings.
_A1111_ITEM = re.compile(r'\s*([A-Za-z][\w /\-]*?)\s*:\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)')
_A1111_KEEP = (
    "Steps",
    "Sampler",
    "Schedule type",
    "CFG scale",
    "Seed",
    "Size",
    "Model hash",
    "Model",
    "VAE",
    "Version",
)
_MODEL_FILE = re.compile(r"\.(safetensors|ckpt|pt|pth|bin|gguf|sft)$", re.IGNORECASE)
_NOVELAI_FIELDS = ("steps", "sampler", "seed", "scale", "uc", "prompt", "n_samples")


@dataclass
class _Detection:
    tool: str
    source: str
    models: list[str] = field(default_factory=list)
    loras: list[str] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)


def _parse_a1111(text: str) -> dict[str, str] | None:
    """The settings line of AUTOMATIC1111-style parameters, or None if the text is not that."""
    lines = text.strip().splitlines()
    for line in reversed(lines[-8:]):
        if "Steps:" not in line:
            continue
        items = {k.strip(): v.strip() for k, v in _A1111_ITEM.findall(line) if k.strip()}
        if items.get("Steps", "").isdigit() and any(
            k in items for k in ("Sampler", "Seed", "CFG scale", "Size")
        ):
            return items
    return None


def _a1111_detection(text: str, source: str) -> _Detection | None:
    items = _parse_a1111(text)
    if items is None:
        return None
    settings = {k: _clip(items[k].strip('"'), 120) for k in _A1111_KEEP if k in items}
    model = settings.get("Model")
    # Forge and SD.Next write the same text; their Version says so ("f2.0.1...", "app=...").
    return _Detection("AUTOMATIC1111", source, [model] if model else [], settings=settings)


def _json_object(text: str) -> dict[str, Any]:
    """Parse a JSON object; ValueError (with a short reason) for anything else."""
    try:
        value = json.loads(text)
    except RecursionError as exc:
        raise ValueError("JSON nested too deeply") from exc
    if not isinstance(value, dict):
        raise ValueError(f"JSON is a {type(value).__name__}, not an object")
    return value


def _node_order(key: str) -> tuple[int, str]:
    return (int(key), key) if key.isdigit() else (1 << 30, key)


def _comfy_prompt(text: str, source: str) -> _Detection:
    graph = _json_object(text)
    nodes = [graph[k] for k in sorted(graph, key=_node_order) if isinstance(graph[k], dict)]
    if not any("class_type" in n for n in nodes):
        raise ValueError("no ComfyUI nodes (class_type) in it")
    detection = _Detection("ComfyUI", source)
    for node in nodes:
        inputs = node.get("inputs") if isinstance(node.get("inputs"), dict) else {}
        # Any loader, stock or custom, names its weights in these inputs.
        for key in ("ckpt_name", "unet_name"):
            if isinstance(inputs.get(key), str):
                detection.models.append(_clip(inputs[key], 200))
        if isinstance(inputs.get("lora_name"), str):
            detection.loras.append(_clip(inputs["lora_name"], 200))
    return detection


def _comfy_workflow(text: str, source: str) -> _Detection:
    graph = _json_object(text)
    nodes = graph.get("nodes")
    if not isinstance(nodes, list):
        raise ValueError("no ComfyUI node list in it")
    detection = _Detection("ComfyUI", source)
    for node in nodes[:5000]:
        if not isinstance(node, dict):
            continue
        kind = str(node.get("type", ""))
        widgets = node.get("widgets_values") if isinstance(node.get("widgets_values"), list) else []
        files = [w for w in widgets[:8] if isinstance(w, str) and _MODEL_FILE.search(w)]
        if not files:
            continue
        lowered = kind.lower()
        if "checkpointloader" in lowered or "unetloader" in lowered:
            detection.models.append(_clip(files[0], 200))
        elif "lora" in lowered:
            detection.loras.append(_clip(files[0], 200))
    return detection


def _novelai(comment: str, source_text: str | None, source: str) -> _Detection:
    fields = _json_object(comment)
    if not any(k in fields for k in _NOVELAI_FIELDS):
        raise ValueError("no generation fields in it")
    settings = {k: _clip(fields[k], 120) for k in ("steps", "sampler", "seed", "scale") if k in fields}
    model = _clip(source_text, 120) if source_text else None
    return _Detection("NovelAI", source, [model] if model else [], settings=settings)


def _invokeai(key: str, text: str, source: str) -> _Detection:
    if key == "Dream":
        return _Detection("InvokeAI", source)
    fields = _json_object(text)
    model = fields.get("model")
    name = (
        model.get("model_name") or model.get("name")
        if isinstance(model, dict)
        else fields.get("model_weights")
    )
    return _Detection("InvokeAI", source, [_clip(name, 200)] if isinstance(name, str) else [])


def _fooocus(text: str, source: str) -> _Detection | None:
    try:
        fields = _json_object(text)
    except ValueError:
        return None
    model = fields.get("base_model") or fields.get("Base Model")
    if not isinstance(model, str) and "full_prompt" not in fields:
        return None
    return _Detection("Fooocus", source, [_clip(model, 200)] if isinstance(model, str) else [])


def _comfy_from_exif(value: str) -> tuple[str, str] | None:
    """ComfyUI's WebP/animated savers put "prompt:{...}" and "workflow:{...}" into EXIF text tags."""
    head = value[:12].lower()
    for key in ("prompt", "workflow"):
        if head.startswith(key + ":"):
            return key, value[len(key) + 1 :]
    return None


def _read_generation_params(
    meta: _Metadata, exif: list[tuple[str, dict[str, str]]], budget: _Budget
) -> Signal:
    errors = meta.errors_for("generation_params")
    texts: dict[str, tuple[str, str]] = {}
    for source, key, text in meta.texts:
        texts.setdefault(key, (source, text))
    # EXIF carries the same texts in JPEG and WebP.
    exif_candidates: list[tuple[str, str, str]] = []
    for source, fields in exif:
        for tag in ("UserComment", "ImageDescription", "Make", "Model"):
            value = fields.get(tag)
            if not value:
                continue
            comfy = _comfy_from_exif(value)
            if comfy:
                texts.setdefault(comfy[0], (f"{source} {tag}", comfy[1]))
            elif tag in ("UserComment", "ImageDescription"):
                exif_candidates.append((f"{source} {tag}", tag, value))

    detections: list[_Detection] = []
    present: list[str] = []

    def attempt(source: str, key: str, parse: Callable[[], _Detection | None]) -> None:
        budget.check()
        present.append(f"{source} {key}")
        try:
            detection = parse()
        except ValueError as exc:
            errors.append(f"{source} {key!r} unreadable: {_clip(exc, 160)}")
            return
        if detection is None:
            errors.append(f"{source} {key!r} is not in a known generator format")
        else:
            detections.append(detection)

    if "parameters" in texts:
        src, text = texts["parameters"]
        attempt(src, "parameters", lambda: _a1111_detection(text, src) or _fooocus(text, src))
    if "prompt" in texts:
        src, text = texts["prompt"]
        attempt(src, "prompt", lambda: _comfy_prompt(text, src))
    if "workflow" in texts:
        src, text = texts["workflow"]
        attempt(src, "workflow", lambda: _comfy_workflow(text, src))
    software = texts.get("Software", ("", ""))[1]
    if "Comment" in texts and software.strip().lower().startswith("novelai"):
        src, text = texts["Comment"]
        source_text = texts.get("Source", ("", ""))[1] or None
        attempt(src, "Comment", lambda: _novelai(text, source_text, src))
    for key in ("invokeai_metadata", "sd-metadata", "Dream"):
        if key in texts:
            src, text = texts[key]
            attempt(src, key, lambda key=key, src=src, text=text: _invokeai(key, text, src))
    # EXIF text and JPEG comments hold all sorts of things: only A1111's shape counts.
    for source, tag, text in [*exif_candidates, *((s, k, t) for s, k, t in meta.texts if s == "jpeg:COM")]:
        detection = _a1111_detection(text, source)
        if detection is not None:
            present.append(f"{source}")
            detections.append(detection)
        elif tag == "UserComment" and "Steps:" in text:
            errors.append(f"{source} looks like generation parameters but does not parse")

    evidence: dict[str, Any] = {"sources": _unique(present)}
    if detections:
        tools = _unique(d.tool for d in detections)
        models = _unique(m for d in detections for m in d.models)
        evidence.update(
            tool=tools[0],
            tools=tools,
            model=models[0] if models else None,
            models=models,
            loras=_unique(lora for d in detections for lora in d.loras),
        )
        settings = next((d.settings for d in detections if d.settings), None)
        if settings:
            evidence["settings"] = settings
    ai = bool(detections)
    return Signal(
        "generation_params", bool(present), ai, STRONG if ai else NONE, evidence, _join_errors(errors)
    )


# ============================================================================ EXIF Software


# Names of generators that some tools write into Software; still only a hint.
_AI_SOFTWARE = re.compile(
    r"\b(novelai|midjourney|niji ?journey|dall[-\u00b7 ]?e|stable ?diffusion|comfyui|automatic1111|invokeai|fooocus|"
    r"firefly|imagen|leonardo\.ai|flux\.1)\b",
    re.IGNORECASE,
)


def _read_exif_software(
    meta: _Metadata, exif: list[tuple[str, dict[str, str]]], exif_errors: list[str]
) -> Signal:
    errors = [*meta.errors_for("exif_software"), *exif_errors]
    found: tuple[str, str] | None = None
    for source, fields in exif:
        if fields.get("Software"):
            found = (source, fields["Software"])
            break
    if found is None:
        # PNG has no EXIF by default; its Software text chunk means the same.
        found = next(((s, t) for s, k, t in meta.texts if k == "Software" and t.strip()), None)
    if found is None:
        return _missing("exif_software", _join_errors(errors))
    source, software = found
    known = bool(_AI_SOFTWARE.search(software))
    evidence: dict[str, Any] = {"software": _clip(software, 200), "source": source, "known_generator": known}
    if known:
        evidence["tool"] = _clip(software, 120)
    return Signal("exif_software", True, known, WEAK, evidence, _join_errors(errors))


# ============================================================================ SD watermark


def _u_planes(blue_red: np.ndarray, green: np.ndarray, out: np.ndarray, tmp: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR->YUV U channel for both channel orders, bit-exact, into ``out``.

    ``blue_red`` holds our blue and red planes (float32, integer values),
    ``green`` our green plane, which is scaled in place. ``out[0]`` is the U
    plane of an encoder handed BGR ("bgr"); ``out[1]`` of one handed RGB as if
    it were BGR ("rgb", diffusers), whose "blue" was our red.

    OpenCV computes Y = (4899 R + 9617 G + 1868 B + 2**13) >> 14 and
    U = ((B - Y) * 8061 + (128 << 14) + 2**13) >> 14. Here every product and
    partial sum is a multiple of 2**-14 below 2**8 in magnitude, i.e. needs at
    most 22 significant bits, which float32 holds exactly, so floor() gives the
    shifts bit for bit. U never leaves [3, 253] (B - Y is within +-255), so OpenCV's
    saturation never applies.
    """
    green *= _Y_GREEN
    green += 0.5  # OpenCV's rounding term, 2**13 / 2**14
    np.multiply(blue_red[::-1], _Y_RED, out=out)
    out += green
    np.multiply(blue_red, _Y_BLUE, out=tmp)
    out += tmp
    np.floor(out, out=out)  # Y
    np.subtract(blue_red, out, out=out)
    out *= _U_BLUE_MINUS_Y
    out += 128.5
    np.floor(out, out=out)
    return out


def _u_plane(rgb: np.ndarray, *, swapped: bool) -> np.ndarray:
    """OpenCV's 8-bit BGR->YUV U channel of RGB pixels, bit-exact (float32 holding integers).

    ``swapped``: the encoder was handed RGB as if it were BGR (diffusers does
    this), so its "blue" was our red.
    """
    blue_red = np.stack([rgb[..., 2], rgb[..., 0]]).astype(np.float32)
    out = np.empty_like(blue_red)
    _u_planes(blue_red, rgb[..., 1].astype(np.float32), out, np.empty_like(out))
    return out[1 if swapped else 0]


# The bit of a block is "(LL mod 36) > 18" for its largest non-DC LL coefficient. Exactly,
# LL is half the sum of a 2x2 pixel block of U; PyWavelets' float ops (a tap whose square is a
# hair above 1/2) give that half-sum or at most 1.2e-13 above it, never below (checked over
# every 8-bit input; a test does). Sums are integers, so the bit is "(sum mod 72) > 36", and
# the largest float LL is the one of the largest sum, except at ties where LL is exactly
# 18 mod 36 (sum mod 72 == 36): there the rounding decides, so the float ops are replayed.
_SUM_PERIOD = int(2 * WM_SCALE)


def _tie_bits(blocks: np.ndarray) -> np.ndarray:
    """The bit of whole 8x8 U blocks through PyWavelets' float Haar LL, as the reference decoder gets it."""
    u = blocks.astype(np.float64)
    rows = u[:, 1::2, :] * _HAAR + u[:, 0::2, :] * _HAAR
    ll = rows[:, :, 1::2] * _HAAR + rows[:, :, 0::2] * _HAAR
    # U is never negative, so the largest magnitude is the largest value.
    return (ll.reshape(len(ll), 16)[:, 1:].max(axis=1) % WM_SCALE) > WM_SCALE / 2


def _block_bits(u: np.ndarray) -> np.ndarray:
    """The bit every 4x4 block of each U plane's Haar LL band carries, row-major: (planes, blocks).

    ``u``: U planes of shape (planes, rows, cols), rows and cols multiples of 8.
    """
    planes, rows, cols = u.shape
    nby, nbx = rows // 8, cols // 8
    pairs = u[:, 0::2] + u[:, 1::2]
    sums = pairs[:, :, 0::2] + pairs[:, :, 1::2]  # twice the LL band, exact in float32
    # Largest non-DC sum per 4x4 block: columns 1-3 of every row, then the rows.
    quads = sums.reshape(planes, rows // 2, nbx, 4)
    right = np.maximum(quads[..., 2], quads[..., 3])
    np.maximum(right, quads[..., 1], out=right)
    whole = np.maximum(right, quads[..., 0]).reshape(planes, nby, 4, nbx)
    right = right.reshape(planes, nby, 4, nbx)
    largest = np.maximum(whole[:, :, 1], whole[:, :, 2])
    np.maximum(largest, whole[:, :, 3], out=largest)
    np.maximum(largest, right[:, :, 0], out=largest)
    phase = largest.astype(np.int16) % _SUM_PERIOD  # float remainder is several times slower
    bits = phase > _SUM_PERIOD // 2
    ties = np.flatnonzero(phase == _SUM_PERIOD // 2)
    if ties.size:
        plane, by, bx = np.unravel_index(ties, phase.shape)
        bits.ravel()[ties] = _tie_bits(u.reshape(planes, nby, 8, nbx, 8)[plane, by, :, bx, :])
    return bits.reshape(planes, nby * nbx)


def _vote(
    bits: np.ndarray,
) -> tuple[dict[str, dict[str, Any]], tuple[float, _Payload, dict[str, Any]] | None]:
    """Each payload's best match over both channel orders, and the best payload found, if any.

    ``bits``: (2, blocks), the block bits of the "bgr" and "rgb" channel orders.
    """
    blocks = bits.shape[1]
    candidates: dict[str, dict[str, Any]] = {}
    best: tuple[float, _Payload, dict[str, Any]] | None = None
    for payload in WM_PAYLOADS:
        n = len(payload.bits)
        if blocks < n:  # some bit has no block
            continue
        needed = min_matching_bits(n)
        # Bit i sits in blocks i, i+n, i+2n, ...: the columns of the blocks laid out n a row.
        # Sums over whole rows (numpy lets go of the GIL there, not in bincount), then the rest.
        full, rest = divmod(blocks, n)
        sums = bits[:, : full * n].reshape(2, full, n).sum(axis=1, dtype=np.int64)
        sums[:, :rest] += bits[:, full * n :]
        counts = np.full(n, float(full))
        counts[:rest] += 1
        for index, order in enumerate(("bgr", "rgb")):
            votes = sums[index] / counts
            # Threshold at the mean vote, not at 0.5: flat areas push every bit
            # the same way (the quantised value stops being the block's largest),
            # and that common bias cancels out here.
            decoded = votes > votes.mean()
            matched = int(np.count_nonzero(decoded == payload.bits.astype(bool)))
            current = candidates.get(payload.name)
            if current is None or matched > current["bits_matched"]:
                candidates[payload.name] = {
                    "bits_matched": matched,
                    "bits_total": n,
                    "bits_needed": needed,
                    "channel_order": order,
                }
        entry = candidates.get(payload.name)
        if entry and entry["bits_matched"] >= needed:
            score = entry["bits_matched"] / n
            if best is None or score > best[0]:
                best = (score, payload, entry)
    return candidates, best


def _read_watermark(image: Image.Image | None, budget: _Budget) -> Signal:
    if image is None:
        return _missing("sd_watermark", checked=False, reason="no decoded image given")
    width, height = image.size
    if width * height < WM_MIN_PIXELS:
        return _missing("sd_watermark", checked=False, reason="image smaller than 256x256 pixels")
    if image.mode != "RGB":
        image = image.convert("RGB")
    # Blocks are 8x8 pixels (4x4 in the half-size LL band) over the top-left
    # multiple-of-4 crop that the encoder worked on.
    nbx, nby = (width // 4 * 2) // 4, (height // 4 * 2) // 4
    rows_total = min(nby, max(1, WM_MAX_SCAN_PIXELS // (64 * nbx)))
    strip = max(1, WM_STRIP_PIXELS // (64 * nbx))
    # "bgr": the encoder was handed BGR, as the Stability reference scripts and sgm do;
    # "rgb": it was handed RGB as if it were BGR, as diffusers does. Both come from the
    # same pixel loads, as index 0 and 1 of the arrays below.
    cols, window_rows = 8 * nbx, 8 * min(strip, rows_total)
    # Pillow writes the pixels straight into this array (RGB and a pad byte, its own layout):
    # its paste copies with the GIL released, where crop() and tobytes() hold it.
    rgbx = np.empty((window_rows, cols, 4), np.uint8)
    window = Image.frombuffer("RGBX", (cols, window_rows), rgbx, "raw", "RGBX", 0, 1)
    image.load()
    # Blue, green, red: one widening copy fills all three (per-band copies cost more), and
    # planes 0 and 2 are the blue and red that _u_planes wants together.
    bgr = np.empty((3, window_rows, cols), np.float32)
    u, tmp = (np.empty((2, window_rows, cols), np.float32) for _ in range(2))
    bits = np.empty((2, rows_total * nbx), np.uint8)
    error = None
    rows_done = 0
    for top in range(0, rows_total, strip):
        if budget.expired:
            error = f"time budget exceeded after {rows_done} of {rows_total} block rows"
            break
        bottom = min(rows_total, top + strip)
        n = 8 * (bottom - top)
        # The whole image placed 8*top rows up: Pillow clips it to the window, which gets
        # rows 8*top onwards of the image's left columns, with no intermediate image.
        window.im.paste(image.im, (0, -8 * top, width, height - 8 * top))
        np.copyto(bgr[:, :n], rgbx[:n, :, 2::-1].transpose(2, 0, 1))
        _u_planes(bgr[::2, :n], bgr[1, :n], u[:, :n], tmp[:, :n])
        bits[:, top * nbx : bottom * nbx] = _block_bits(u[:, :n])
        rows_done = bottom
    if rows_done == 0:
        return _missing("sd_watermark", error, checked=False)
    blocks = rows_done * nbx
    candidates, best = _vote(bits[:, :blocks])
    evidence: dict[str, Any] = {
        "method": "dwtDct",
        "checked": True,
        "blocks": int(blocks),
        "candidates": candidates,
    }
    if best is None:
        return Signal("sd_watermark", False, False, NONE, evidence, error)
    _, payload, entry = best
    evidence.update(payload=payload.name, tool=payload.tool, **entry)
    return Signal("sd_watermark", True, True, STRONG, evidence, error)


# ============================================================================ entry point


def _guarded(name: str, budget: _Budget, reader: Callable[[], Signal]) -> Signal:
    """Run one reader; a bug or a spent budget costs that signal, never the image."""
    if budget.expired:
        return _missing(name, f"time budget of {budget.seconds:g}s exceeded before this signal was read")
    try:
        return reader()
    except _BudgetExceeded as exc:
        return _missing(name, str(exc))
    except Exception as exc:  # best-effort evidence must never fail the image
        log.exception("provenance reader %s failed", name)
        return _missing(name, f"internal error: {type(exc).__name__}: {_clip(exc, 200)}")


def _collect_guarded(
    data: bytes, fmt: str, budget: _Budget
) -> tuple[_Metadata, list[tuple[str, dict[str, str]]], list[str]]:
    try:
        meta = _collect(data, fmt, budget)
        exif, exif_errors = _exif_fields(meta)
    except Exception as exc:  # best-effort evidence must never fail the image
        log.exception("provenance: reading the %s container failed", fmt)
        meta = _Metadata()
        meta.error("*", f"internal error reading the metadata: {type(exc).__name__}: {_clip(exc, 200)}")
        exif, exif_errors = [], []
    return meta, exif, exif_errors


def read_provenance(
    data: bytes, fmt: str, image: Image.Image | None = None, *, budget_s: float = 2.0
) -> Findings:
    """Read every provenance signal from an image's bytes (and decoded pixels, for the watermark).

    ``fmt`` is the format :func:`worker.imaging.sniff_format` found; ``image``
    the decoded RGB image, or None to skip the watermark. Never raises for
    anything in the data: malformed parts are the ``error`` of their signal.
    ``budget_s`` bounds the whole read; the C2PA SDK's single call cannot be
    interrupted and is bounded by the file size instead.
    """
    budget = _Budget(budget_s)
    cleaned: Counter[str] = Counter()
    token = _CLEANED.set(cleaned)
    try:
        return _read_all(data, fmt, image, budget, cleaned)
    finally:
        _CLEANED.reset(token)


def _read_all(data: bytes, fmt: str, image: Image.Image | None, budget: _Budget, cleaned: Counter[str]) -> Findings:
    meta, exif, exif_errors = _collect_guarded(data, fmt, budget)
    # Cheap readers first, so that the watermark (the costly one) is what a tight budget cuts.
    read = {
        "c2pa": _guarded("c2pa", budget, lambda: _read_c2pa(data, fmt, meta, budget)),
        "iptc_xmp": _guarded("iptc_xmp", budget, lambda: _read_xmp(meta, budget)),
        "generation_params": _guarded(
            "generation_params", budget, lambda: _read_generation_params(meta, exif, budget)
        ),
        "exif_software": _guarded(
            "exif_software", budget, lambda: _read_exif_software(meta, exif, exif_errors)
        ),
        "sd_watermark": _guarded("sd_watermark", budget, lambda: _read_watermark(image, budget)),
    }
    return Findings(tuple(read[name] for name in SIGNAL_NAMES), dict(cleaned))
