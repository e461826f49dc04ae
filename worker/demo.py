"""The demo's sample set, generated here so the demo needs no downloads."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from . import errors


def _photo_like(rng: np.random.Generator, size: int = 640) -> Image.Image:
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([0.6 * x + 0.2, 0.5 * y + 0.3, 0.4 * (1 - x) + 0.3], axis=-1)
    noisy = np.clip(base * 255 + rng.normal(0, 12, base.shape), 0, 255)
    return Image.fromarray(noisy.astype(np.uint8), "RGB")


def _render(size: int = 512) -> Image.Image:
    image = Image.new("RGB", (size, size), (240, 238, 230))
    draw = ImageDraw.Draw(image)
    draw.ellipse((60, 60, 300, 300), fill=(200, 60, 60))
    draw.rectangle((220, 240, 470, 460), fill=(40, 90, 180))
    draw.polygon([(80, 460), (200, 330), (320, 460)], fill=(250, 200, 40))
    return image


def make_samples(directory: Path) -> dict[str, str | None]:
    """Write the samples into ``directory``; returns file name -> expected error code (None: a score)."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(7)
    expected: dict[str, str | None] = {}

    photo = _photo_like(rng)
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways, shown upright: orientation is applied
    photo.save(directory / "photo_rotated.jpg", quality=90, exif=exif)
    expected["photo_rotated.jpg"] = None

    _render().save(directory / "render.png")
    expected["render.png"] = None

    _render(300).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(directory / "palette.gif")
    expected["palette.gif"] = None

    _photo_like(rng, 400).save(directory / "texture.webp", quality=85)
    expected["texture.webp"] = None

    ramp = (np.linspace(0, 65535, 256 * 256).reshape(256, 256)).astype(np.uint16)
    Image.fromarray(ramp).save(directory / "greyscale_16bit.png")
    expected["greyscale_16bit.png"] = None

    # Two broken on purpose: the demo shows how failures are reported.
    buf = io.BytesIO()
    _photo_like(rng, 320).save(buf, "JPEG", quality=90)
    (directory / "truncated.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 3])
    expected["truncated.jpg"] = errors.CORRUPT_IMAGE

    (directory / "drawing.png").write_bytes(
        b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'
    )
    expected["drawing.png"] = errors.UNSUPPORTED_FORMAT
    return expected
