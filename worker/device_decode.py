"""JPEGs decoded on the model's device (``SYNTHGUARD_DEVICE_DECODE``): nvJPEG through torchvision on CUDA.

On the CPU path a preparing process decodes every image at full size, reads
the watermark from those pixels and resizes them for the model: about two thirds
of its CPU for a 1024x1024 JPEG, four fifths for a 12-megapixel one
(bench/RESULTS.md, "Decoding on the device"). With device decoding it
checks the JPEG instead (:func:`worker.imaging.check_jpeg`: the header, the
pixel cap, the entropy-coded data decoded strictly at a reduced scale, which
also gives the PDQ hash its pixels) and reads the metadata; the bytes then go
into the micro-batcher as an :class:`EncodedJpeg`. :class:`DeviceBatch`, the
batcher's function, decodes a batch's JPEGs on the device (one call per group of
at most :data:`GROUP_PIXELS`), applies
their EXIF orientation, reads each watermark's block bits with the same integer
arithmetic as :mod:`worker.provenance.watermark` (bit for bit, from the same
pixels), resizes and crops them by the detector's timm transform, and scores
them in one forward pass with the batch's CPU-prepared images.

A JPEG the device cannot decode comes back as :class:`Refused`, and its image
goes through the CPU path instead.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from .detector import Detector
from .errors import ConfigError
from .provenance import watermark

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EncodedJpeg:
    """A JPEG a preparing process has checked, to be decoded on the model's device."""

    data: bytes
    orientation: int  # EXIF orientation (1: as stored), applied after decoding
    pixels: int = 0  # width x height from its header: what decoding it holds on the device


@dataclass(frozen=True)
class DeviceScored:
    """The score of an :class:`EncodedJpeg`, and its watermark's block bits (None: image too small to read)."""

    score: float
    watermark_bits: np.ndarray | None


@dataclass(frozen=True)
class Refused:
    """The device could not decode this JPEG; ``reason`` is the decoder's message."""

    reason: str


# PIL's EXIF transposes (worker.imaging) as tensor operations on the last two (rows, columns) dimensions.
_ORIENT: dict[int, Callable[[torch.Tensor], torch.Tensor]] = {
    2: lambda t: t.flip(-1),  # mirrored left to right
    3: lambda t: t.flip(-2, -1),  # rotated 180
    4: lambda t: t.flip(-2),  # mirrored top to bottom
    5: lambda t: t.transpose(-2, -1),  # transposed
    6: lambda t: torch.rot90(t, -1, (-2, -1)),  # needs a quarter turn clockwise
    7: lambda t: t.transpose(-2, -1).flip(-2, -1),  # transversed
    8: lambda t: torch.rot90(t, 1, (-2, -1)),  # needs a quarter turn anticlockwise
}


def orient(pixels: torch.Tensor, orientation: int) -> torch.Tensor:
    """CxHxW ``pixels`` with EXIF ``orientation`` applied, as :mod:`worker.imaging` applies it with Pillow."""
    turn = _ORIENT.get(orientation)
    return pixels if turn is None else turn(pixels)


def watermark_bits(pixels: torch.Tensor) -> np.ndarray | None:
    """The watermark's block bits of RGB uint8 CxHxW ``pixels`` (both channel orders, row-major), as
    :func:`worker.provenance.watermark.block_bits` gives them from the same pixels; None when the image
    is too small to carry a mark.

    OpenCV's fixed-point BGR->YUV (the formula a test checks OpenCV against) in integer arithmetic, the
    2x2 sums of U, and the largest non-DC sum of each 4x4 block of them; ties go to the CPU reader's float
    replay.
    """
    size = watermark.scan_blocks(pixels.shape[2], pixels.shape[1])
    if size is None:
        return None
    rows, nbx = size
    red, green, blue = pixels[:, : 8 * rows, : 8 * nbx].to(torch.int32).unbind(0)
    # "bgr": the encoder's blue was our blue; "rgb": it was our red (watermark._ORDERS).
    planes = []
    for b, r in ((blue, red), (red, blue)):
        y = (4899 * r + 9617 * green + 1868 * b + (1 << 13)) >> 14
        planes.append(((b - y) * 8061 + (128 << 14) + (1 << 13)) >> 14)
    u = torch.stack(planes)  # (2, 8 rows, 8 nbx), every value in 0..255
    sums = u[:, 0::2] + u[:, 1::2]
    sums = sums[:, :, 0::2] + sums[:, :, 1::2]
    band = sums.reshape(2, rows, 4, nbx, 4).clone()
    band[:, :, 0, :, 0] = 0  # the DC; U is at least 3, so a zeroed DC never wins
    period = int(2 * watermark.SCALE)
    # One copy to the host, where bits and ties are read: each copy waits for the device.
    phase = (band.amax(dim=(2, 4)) % period).to(torch.uint8).reshape(2, rows * nbx).cpu().numpy()
    bits = (phase > period // 2).astype(np.uint8)
    ties = np.flatnonzero(phase == period // 2)
    if ties.size:
        at = torch.from_numpy(ties).to(u.device)
        plane, block = at // (rows * nbx), at % (rows * nbx)
        blocks = u.reshape(2, rows, 8, nbx, 8)[plane, block // nbx, :, block % nbx, :]
        bits.reshape(-1)[ties] = watermark.tie_bits(blocks.to(torch.uint8).cpu().numpy())
    return bits


def _tensor_steps(detector: Detector) -> Callable[[torch.Tensor], torch.Tensor]:
    """The detector's uint8 pixel transform (timm's resize and crop) without its last step, PIL to tensor."""
    steps = list(getattr(detector.pixel_transform, "transforms", ()))
    if not steps or type(steps[-1]).__name__ not in ("MaybePILToTensor", "PILToTensor"):
        raise ConfigError(
            "SYNTHGUARD_DEVICE_DECODE needs a model whose timm transform splits into resize and crop, then "
            "normalisation; this model's does not. Leave SYNTHGUARD_DEVICE_DECODE off."
        )
    head = steps[:-1]

    def transform(pixels: torch.Tensor) -> torch.Tensor:
        for step in head:
            pixels = step(pixels)
        return pixels

    return transform


def _probe_jpeg() -> bytes:
    from io import BytesIO

    from PIL import Image

    out = BytesIO()
    Image.new("RGB", (64, 48), (120, 60, 200)).save(out, "JPEG", quality=90)
    return out.getvalue()


def decode(blobs: Sequence[bytes], device: torch.device) -> list[torch.Tensor | Refused]:
    """RGB uint8 CxHxW pixels of each JPEG on ``device``, as stored (no orientation), or why not.

    One call for the whole batch; when it fails, one call per JPEG, so that one the decoder refuses
    costs only itself.
    """
    from torchvision.io import ImageReadMode, decode_jpeg

    data = [torch.frombuffer(bytearray(blob), dtype=torch.uint8) for blob in blobs]
    try:
        return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=device))
    except _REFUSALS as exc:
        log.debug("batched JPEG decode on %s failed (%s); decoding one by one", device, exc)
    out: list[torch.Tensor | Refused] = []
    for one in data:
        try:
            out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=device))
        except _REFUSALS as exc:
            out.append(Refused(f"{type(exc).__name__}: {exc}"))
    return out


# What torchvision's decoder raises for a JPEG it cannot decode (nvJPEG's status, an unsupported stream,
# the device's memory running out: torch.OutOfMemoryError is a RuntimeError).
_REFUSALS = (RuntimeError, ValueError)

# Decoded pixels a batch holds on the device at once: its JPEGs are decoded in groups of at most this
# many (any JPEG alone, whatever its size). 64 megapixels are 192 MB of RGB, and resizing the largest
# image takes four times its own size in float; a batch of 32 images at the 100-megapixel cap would
# otherwise hold 9.6 GB.
GROUP_PIXELS = 64_000_000


def groups(items: Sequence[tuple[int, int]], budget: int = GROUP_PIXELS) -> list[list[int]]:
    """``(index, pixels)`` pairs in order, cut into runs of indices whose pixels sum to at most ``budget``
    (a run of one where a single item is over it)."""
    out: list[list[int]] = []
    total = budget + 1
    for index, pixels in items:
        if total + pixels > budget:
            out.append([])
            total = 0
        out[-1].append(index)
        total += pixels
    return out


class DeviceBatch:
    """The micro-batcher's function with device decoding: :meth:`Detector.predict` for prepared tensors,
    and for an :class:`EncodedJpeg` decode, orientation, watermark bits, resize and crop on the device first.
    Each item's result: a float for a tensor, a :class:`DeviceScored` or :class:`Refused` for a JPEG."""

    def __init__(self, detector: Detector) -> None:
        self.detector = detector
        self.transform = _tensor_steps(detector)
        self.group_pixels = GROUP_PIXELS
        try:
            import torchvision.io  # noqa: F401
        except ImportError as exc:
            raise ConfigError(f"SYNTHGUARD_DEVICE_DECODE needs torchvision (the model extra): {exc}") from None
        # One JPEG now: a decoder the device lacks fails the worker's start, not its images, and the
        # first batch does not pay the decoder's own start-up.
        probe = decode([_probe_jpeg()], detector.device)[0]
        if isinstance(probe, Refused):
            raise ConfigError(
                f"SYNTHGUARD_DEVICE_DECODE is on, but torchvision cannot decode JPEGs on {detector.device}: "
                f"{probe.reason}. Leave SYNTHGUARD_DEVICE_DECODE off, or install a torchvision built for it."
            )
        if detector.device.type == "cpu":
            log.warning(
                "SYNTHGUARD_DEVICE_DECODE on a CPU device only moves JPEG decoding from the preparing "
                "processes into this process's batching thread: slower (bench/RESULTS.md); leave it off here"
            )
        log.info("JPEGs are decoded, watermark-read and resized on %s", detector.device)

    def __call__(self, items: Sequence[Any]) -> list[Any]:
        at = [i for i, item in enumerate(items) if isinstance(item, EncodedJpeg)]
        if not at:
            return self.detector.predict(items)
        results: list[Any] = [None] * len(items)
        batch = list(items)
        with torch.inference_mode():
            for group in groups([(i, items[i].pixels) for i in at], self.group_pixels):
                decoded = decode([items[i].data for i in group], self.detector.device)
                for i in group:
                    # Taken out of the list, so that each image's pixels are freed once it is prepared.
                    results[i], batch[i] = self._prepare(decoded.pop(0), items[i].orientation)
        scored = [i for i, result in enumerate(results) if not isinstance(result, Refused)]
        scores = self.detector.predict([batch[i] for i in scored])
        jpegs = set(at)
        for i, score in zip(scored, scores, strict=True):
            results[i] = DeviceScored(score, results[i]) if i in jpegs else score
        return results

    def _prepare(self, pixels: torch.Tensor | Refused, orientation: int) -> tuple[Any, Any]:
        """(watermark bits, the model's uint8 input) of one decoded JPEG, or (Refused, None)."""
        if isinstance(pixels, Refused):
            return pixels, None
        try:
            pixels = orient(pixels, orientation)
            return watermark_bits(pixels), self.transform(pixels)
        except torch.OutOfMemoryError as exc:
            # This image alone goes back to the CPU path; the rest of the batch is scored here.
            return Refused(f"out of device memory for a {pixels.shape[2]}x{pixels.shape[1]} image: {exc}"), None
