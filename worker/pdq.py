"""PDQ perceptual hashes (Meta's PDQ, through ``pdqhash``): of one image, as text, and their distance.

A hash is 256 bits, kept as 32 bytes and written as 64 hex digits, most
significant bit first: the form ThreatExchange and Meta's tools exchange, so a
bank a platform already has loads as it is (``synthguard bank import``).
Hashing needs numpy, Pillow and pdqhash (the ``model`` extra); the text form
and the distance do not, so the API and the bank commands use them alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from PIL import Image

HASH_BYTES = 32
HEX_DIGITS = 2 * HASH_BYTES

# PDQ's published operating point: at most 31 of 256 bits apart, from hashes of quality 50 or more.
MATCH_DISTANCE = 31
MIN_QUALITY = 50

# Side of the square every image is resized to before hashing. PDQ reduces any image to 64x64
# with a box filter whose width grows with the image; at even widths that filter is not
# symmetric, so a mirrored copy's hash was up to 46 bits from the original's mirrored form
# (measured on the shared corpus). At 320 the width is odd (3), the mirrored and flipped forms
# from compute_dihedral are exact, and hashes stay within 2-18 bits of PDQ on the full image.
# Smaller input is also what keeps hashing cheap: the resize is most of its cost.
HASH_SIDE = 320

_HEX = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class PdqHash:
    """An image's hash in its eight dihedral forms (``forms[0]`` is the image as it is), and its quality."""

    forms: tuple[bytes, ...]
    quality: int

    @property
    def hex(self) -> str:
        return self.forms[0].hex()

    @classmethod
    def from_bytes(cls, forms: bytes, quality: int) -> PdqHash:
        """The hash stored as its forms end to end (``images.pdq_forms``)."""
        return cls(tuple(forms[i : i + HASH_BYTES] for i in range(0, len(forms), HASH_BYTES)), quality)


def hash_image(image: Image.Image, box: tuple[float, float, float, float] | None = None) -> PdqHash:
    """The PDQ hash of ``image`` (any mode), with its rotated and mirrored forms.

    ``box``: of that region alone (left, upper, right, lower), as if cropped first.
    """
    import numpy as np
    import pdqhash
    from PIL import Image as PILImage

    rgb = image if image.mode == "RGB" else image.convert("RGB")
    # reducing_gap: a box reduction by a whole factor first, then bilinear. PDQ low-passes far below
    # this size anyway: hashes move by 2 bits at most against bilinear alone, at half the time.
    small = rgb.resize((HASH_SIDE, HASH_SIDE), PILImage.Resampling.BILINEAR, box=box, reducing_gap=1.0)
    vectors, quality = pdqhash.compute_dihedral(np.asarray(small))
    forms = tuple(np.packbits(np.asarray(vector, dtype=np.uint8)).tobytes() for vector in vectors)
    return PdqHash(forms=forms, quality=int(quality))


def parse_hex(text: str) -> bytes:
    """32 bytes from 64 hex digits (either case, surrounding space ignored); ValueError otherwise."""
    cleaned = text.strip().lower()
    if not _HEX.fullmatch(cleaned):
        raise ValueError(f"a PDQ hash is {HEX_DIGITS} hex digits, not {text.strip()[:80]!r}")
    return bytes.fromhex(cleaned)


def distance(a: bytes, b: bytes) -> int:
    """Hamming distance: how many of the 256 bits differ."""
    return (int.from_bytes(a, "big") ^ int.from_bytes(b, "big")).bit_count()
