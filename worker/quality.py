"""Quality hints: inputs the model cannot judge well, said beside the score (``images.quality``).

A detector learns from images of a certain size and quality. An upload smaller
than the model's input on its short side is enlarged before the forward pass,
and a heavily compressed JPEG has lost the high frequencies most detectors
read; the score of either means less. The hints say so, and never change the
score: they are stored, returned with the image, and left to the client's
threshold policy. The JPEG quality is estimated from the file's luminance
quantisation table, as libjpeg scales its standard table (other encoders'
tables land near the libjpeg quality of the same strength).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The JPEG standard's luminance quantisation table (ITU T.81, Annex K.1), row by row: libjpeg
# scales it by quality.
_STANDARD_LUMINANCE = (
    16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56, 14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip


def _zigzag() -> list[int]:
    """Row-major positions in the order DQT segments store a table (the zigzag scan)."""
    return sorted(range(64), key=lambda p: (p // 8 + p % 8, p // 8 if (p // 8 + p % 8) % 2 else p % 8))


# As a DQT segment stores it.
_STANDARD_ZIGZAG = tuple(_STANDARD_LUMINANCE[p] for p in _zigzag())

# Segments read before giving up on finding the tables: they come before the first scan.
_MAX_SEGMENTS = 256

SMALL = "below_input_size"
COMPRESSED = "low_jpeg_quality"


def jpeg_quality(data: bytes) -> int | None:
    """The quality (1-100) a JPEG's luminance table was made with, as libjpeg scales it; None when
    the data holds no readable table (not a JPEG, or malformed before its first scan)."""
    if data[:2] != b"\xff\xd8":
        return None
    at = 2
    for _ in range(_MAX_SEGMENTS):
        if at + 4 > len(data) or data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        length = int.from_bytes(data[at + 2 : at + 4], "big")
        if marker in (0xDA, 0xD9) or length < 2:  # start of scan, end of image: no table came first
            return None
        body = data[at + 4 : at + 2 + length]
        if marker == 0xDB:
            table = _luminance(body)
            if table is not None:
                return _quality_of(table)
        at += 2 + length
    return None


def _luminance(body: bytes) -> list[int] | None:
    """Table 0 (luminance) of a DQT segment, which may hold several tables."""
    at = 0
    while at < len(body):
        precision, ident = body[at] >> 4, body[at] & 0x0F
        size = 128 if precision else 64
        entries = body[at + 1 : at + 1 + size]
        if len(entries) < size:
            return None
        if ident == 0:
            if precision:
                return [int.from_bytes(entries[i : i + 2], "big") for i in range(0, 128, 2)]
            return list(entries)
        at += 1 + size
    return None


def _quality_of(table: list[int]) -> int:
    # libjpeg: entry = (standard * scale + 50) // 100, kept within 1..255 (baseline), with
    # scale = 5000 / q below quality 50 and 200 - 2q above. Entries held at either bound say
    # nothing of the scale; the median of the others is robust to tables libjpeg did not make.
    ratios = sorted(100.0 * q / std for q, std in zip(table, _STANDARD_ZIGZAG, strict=True) if 1 < q < 255)
    # With every entry at a bound, the table is all 1 (the finest) or all 255 (the coarsest).
    fallback = 0.0 if table[0] <= 1 else 5000.0
    scale = ratios[len(ratios) // 2] if ratios else fallback
    quality = 5000.0 / scale if scale > 100 else (200.0 - scale) / 2
    return max(1, min(100, round(quality)))


@dataclass(frozen=True)
class Assessment:
    """What the hints rest on, and the hints: ``below_input_size``, ``low_jpeg_quality``."""

    short_side: int
    input_side: int  # the model's input, short side (timm's data config)
    jpeg_quality: int | None
    min_jpeg_quality: int
    hints: tuple[str, ...]

    def to_json(self) -> dict[str, Any]:
        return {
            "hints": list(self.hints),
            "short_side": self.short_side,
            "input_side": self.input_side,
            "jpeg_quality": self.jpeg_quality,
            "min_jpeg_quality": self.min_jpeg_quality,
        }


def assess(width: int, height: int, jpeg_quality: int | None, *, input_side: int, min_jpeg_quality: int) -> Assessment:
    """The hints for an image of this size (and JPEG quality, for a JPEG)."""
    short_side = min(width, height)
    hints = []
    if short_side < input_side:
        hints.append(SMALL)
    if jpeg_quality is not None and jpeg_quality < min_jpeg_quality:
        hints.append(COMPRESSED)
    return Assessment(short_side, input_side, jpeg_quality, min_jpeg_quality, tuple(hints))
