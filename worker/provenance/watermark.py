"""The ``sd_watermark`` signal: Stable Diffusion's invisible ``dwtDct`` watermark.

SD 1.x, SD 2.x and SDXL payloads, in both channel orders their encoders used.
The bits are the ones invisible-watermark's decoder (OpenCV, PyWavelets) would
read: OpenCV's own colour conversion gives the U plane, and integer sums of it
stand in for the Haar band; every payload is voted on from the same bits.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
from PIL import Image

from ._base import NONE, STRONG, Budget, Signal, missing

# The worker spreads images over its own threads and preparing processes; OpenCV's pool
# would add threads that spin on those same cores (up to 1.7x the CPU per conversion here).
cv2.setNumThreads(1)

# The encoder works on the U plane of OpenCV's BGR->YUV, takes its Haar LL band,
# and in every 4x4 block of that band quantises the largest non-DC magnitude
# so that (value mod 36) lands at 9 (bit 0) or 27 (bit 1); bit i goes into
# blocks i, i+n, i+2n, ... in row-major order.
SCALE = 36.0
MIN_PIXELS = 256 * 256  # the encoder refuses smaller images
# The top rows only: more add votes, not information. Not less, though: marks weakened by
# 4:2:0 JPEG need the votes (on a marked 12 MP photo a 1 MP cap lost an SDXL mark this finds).
MAX_SCAN_PIXELS = 4_000_000
# Pixels converted per step: about 4.5 MB of buffers per image (17 bytes a pixel), reused step
# to step, so that a 12 MP image costs no more memory than a 1 MP one. Half this took 5-8% more
# time (numpy's per-call overhead, paid per step); twice this gained nothing measurable.
STRIP_PIXELS = 262_144
FALSE_POSITIVE = 1e-8  # per payload and channel order, for an unmarked image
_HAAR = 0.7071067811865476  # PyWavelets' Haar tap; same float ops give the same LL band bit for bit
# OpenCV's conversion codes for the two channel orders: an encoder handed BGR ("bgr") saw our
# pixels as OpenCV reads RGB; one handed RGB as if it were BGR ("rgb", diffusers) as it reads BGR.
_ORDERS = (("bgr", cv2.COLOR_RGB2YUV), ("rgb", cv2.COLOR_BGR2YUV))


def _payload_bits(data: bytes) -> np.ndarray:
    return np.unpackbits(np.frombuffer(data, dtype=np.uint8))


@dataclass(frozen=True)
class Payload:
    name: str
    tool: str
    bits: np.ndarray


PAYLOADS: tuple[Payload, ...] = (
    # SDXL (sgm and diffusers): a fixed 48-bit message.
    Payload(
        "SDXL",
        "Stable Diffusion XL",
        np.array(
            [int(c) for c in format(0b101100111110110010010000011110111011000110011110, "048b")], np.uint8
        ),
    ),
    # The Stability reference scripts: the bytes of a string.
    Payload("SDV2", "Stable Diffusion 2", _payload_bits(b"SDV2")),
    Payload("StableDiffusionV1", "Stable Diffusion 1", _payload_bits(b"StableDiffusionV1")),
)


@functools.lru_cache(maxsize=16)
def min_matching_bits(n_bits: int, p_false: float = FALSE_POSITIVE) -> int:
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


def convert(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
    """OpenCV's 8-bit BGR->YUV of RGB pixels for both channel orders, into ``out`` (2, rows, cols, 3).

    ``pixels``: (rows, cols, 3 or 4) uint8 in RGB order, a fourth channel
    ignored. ``out[0]`` is what an encoder handed BGR saw ("bgr"), ``out[1]``
    what one handed RGB as if it were BGR saw ("rgb"); U is channel 1. The
    encoder called the same function, so the planes are its own bit for bit
    (a test checks OpenCV's 14-bit fixed-point formula over every colour).
    """
    for plane, (_, code) in enumerate(_ORDERS):
        cv2.cvtColor(pixels, code, dst=out[plane])
    return out


# The bit of a block is "(LL mod 36) > 18" for its largest non-DC LL coefficient. Exactly,
# LL is half the sum of a 2x2 pixel block of U; PyWavelets' float ops (a tap whose square is a
# hair above 1/2) give that half-sum or at most 1.2e-13 above it, never below (checked over
# every 8-bit input; a test does). Sums are integers, so the bit is "(sum mod 72) > 36", and
# the largest float LL is the one of the largest sum, except at ties where LL is exactly
# 18 mod 36 (sum mod 72 == 36): there the rounding decides, so the float ops are replayed.
_SUM_PERIOD = int(2 * SCALE)


def tie_bits(blocks: np.ndarray) -> np.ndarray:
    """The bit of whole 8x8 U blocks through PyWavelets' float Haar LL, as the reference decoder gets it."""
    u = blocks.astype(np.float64)
    rows = u[:, 1::2, :] * _HAAR + u[:, 0::2, :] * _HAAR
    ll = rows[:, :, 1::2] * _HAAR + rows[:, :, 0::2] * _HAAR
    # U is never negative, so the largest magnitude is the largest value.
    return (ll.reshape(len(ll), 16)[:, 1:].max(axis=1) % SCALE) > SCALE / 2


def block_bits(yuv: np.ndarray) -> np.ndarray:
    """The bit every 4x4 block of each U plane's Haar LL band carries, row-major: (planes, blocks).

    ``yuv``: uint8 YUV images of shape (planes, rows, cols, 3), U in channel 1,
    rows and cols multiples of 8.
    """
    planes, rows, cols, _ = yuv.shape
    nby, nbx = rows // 8, cols // 8
    # Row pairs over all three channels, then U's column pairs: contiguous rows add faster
    # than U's strided bytes, and cheaper than copying U out first. Twice the LL band.
    pairs = np.add(yuv[:, 0::2], yuv[:, 1::2], dtype=np.uint16)
    sums = pairs[:, :, 0::2, 1] + pairs[:, :, 1::2, 1]
    # Largest non-DC sum per 4x4 block. U is at least 3, so a zeroed DC never wins.
    band = sums.reshape(planes, nby, 4, cols // 2)
    band[:, :, 0, 0::4] = 0
    largest = np.maximum(band[:, :, 0], band[:, :, 1])
    np.maximum(largest, band[:, :, 2], out=largest)
    np.maximum(largest, band[:, :, 3], out=largest)
    largest = np.maximum(largest[..., 0::2], largest[..., 1::2])
    largest = np.maximum(largest[..., 0::2], largest[..., 1::2])
    phase = largest % _SUM_PERIOD
    bits = phase > _SUM_PERIOD // 2
    ties = np.flatnonzero(phase == _SUM_PERIOD // 2)
    if ties.size:
        plane, by, bx = np.unravel_index(ties, phase.shape)
        bits.ravel()[ties] = tie_bits(yuv[..., 1].reshape(planes, nby, 8, nbx, 8)[plane, by, :, bx, :])
    return bits.reshape(planes, nby * nbx)


def vote(
    bits: np.ndarray,
) -> tuple[dict[str, dict[str, Any]], tuple[float, Payload, dict[str, Any]] | None]:
    """Each payload's best match over both channel orders, and the best payload found, if any.

    ``bits``: (2, blocks), the block bits of the "bgr" and "rgb" channel orders.
    """
    blocks = bits.shape[1]
    candidates: dict[str, dict[str, Any]] = {}
    best: tuple[float, Payload, dict[str, Any]] | None = None
    for payload in PAYLOADS:
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
        for index, (order, _) in enumerate(_ORDERS):
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


def scan_blocks(width: int, height: int) -> tuple[int, int] | None:
    """The rows of 8x8 pixel blocks read, and the blocks in each row, of a ``width`` x ``height`` image;
    None when the image is smaller than any encoder would mark."""
    if width * height < MIN_PIXELS:
        return None
    # Blocks are 8x8 pixels (4x4 in the half-size LL band) over the top-left
    # multiple-of-4 crop that the encoder worked on.
    nbx, nby = (width // 4 * 2) // 4, (height // 4 * 2) // 4
    return min(nby, max(1, MAX_SCAN_PIXELS // (64 * nbx))), nbx


def read(image: Image.Image | None, budget: Budget) -> Signal:
    """The ``sd_watermark`` signal from the decoded pixels (None: not checked)."""
    if image is None:
        return missing("sd_watermark", checked=False, reason="no decoded image given")
    width, height = image.size
    size = scan_blocks(width, height)
    if size is None:
        return signal(None)
    rows_total, nbx = size
    if image.mode != "RGB":
        image = image.convert("RGB")
    strip = max(1, STRIP_PIXELS // (64 * nbx))
    # "bgr": the encoder was handed BGR, as the Stability reference scripts and sgm do;
    # "rgb": it was handed RGB as if it were BGR, as diffusers does. Both come from the
    # same pixel loads, as index 0 and 1 of the arrays below.
    cols, window_rows = 8 * nbx, 8 * min(strip, rows_total)
    # Pillow writes the pixels straight into this array (RGB and a pad byte, its own layout):
    # its paste copies with the GIL released, where crop() and tobytes() hold it.
    rgbx = np.empty((window_rows, cols, 4), np.uint8)
    window = Image.frombuffer("RGBX", (cols, window_rows), rgbx, "raw", "RGBX", 0, 1)
    image.load()
    yuv = np.empty((2, window_rows, cols, 3), np.uint8)
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
        convert(rgbx[:n], yuv[:, :n])
        bits[:, top * nbx : bottom * nbx] = block_bits(yuv[:, :n])
        rows_done = bottom
    if rows_done == 0:
        return missing("sd_watermark", error, checked=False)
    return signal(bits[:, : rows_done * nbx], error)


def signal(bits: np.ndarray | None, error: str | None = None) -> Signal:
    """The ``sd_watermark`` signal of an image's block bits (:func:`block_bits` of both orders, row-major);
    None: the image is too small to carry a mark (:func:`scan_blocks`)."""
    if bits is None:
        return missing("sd_watermark", checked=False, reason="image smaller than 256x256 pixels")
    blocks = bits.shape[1]
    candidates, best = vote(bits)
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
