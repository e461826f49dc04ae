#!/usr/bin/env python
"""How recompression and shrinking move a detector's input and score: `python bench/quality_drift.py [--checkpoint PATH] [--images DIR]`.

The numbers behind the quality hints (`worker/quality.py`). For every image
(the fixtures' photos and generated images, both layers where present, or the
images under --images), copies re-encoded as JPEG at falling qualities and
shrunk to falling short sides (enlarged again by the model's own transform, as
the service does), in two tables:

1. The model's input: the mean absolute change of the preprocessed pixels
   (0-255, after timm's resize and crop) against the original's. This needs
   only the model's data config, so it holds for any weights of that
   architecture; the default of SYNTHGUARD_MIN_JPEG_QUALITY is argued from it.
2. The score: its mean and largest move, and the share of verdicts flipped at
   --threshold. With no --checkpoint (and no SYNTHGUARD_MODEL_CHECKPOINT) the
   weights are random and this table shows only that the script runs; run it
   with your weights to see where your detector's scores move.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corpus import corpus_dir  # noqa: E402  (tests/corpus.py: the fixtures the suite makes)

from worker.detector import Detector  # noqa: E402
from worker.quality import jpeg_quality  # noqa: E402
from worker.settings import Settings  # noqa: E402

SHARED = ROOT.parent / "shared" / "fixtures"
QUALITIES = (95, 90, 75, 60, 50, 40, 30, 20, 10)
SHORT_SIDES = (448, 224, 160, 112, 64)


def _images(folder: Path | None) -> list[tuple[str, Image.Image]]:
    roots = [folder] if folder is not None else [corpus_dir(), *([SHARED] if SHARED.is_dir() else [])]
    out = []
    for root in roots:
        subfolders = [root] if folder is not None else [root / "real", root / "generated"]
        for sub in subfolders:
            for path in sorted(sub.rglob("*")):
                if path.suffix.lower() in (".jpg", ".jpeg", ".png", ".webp"):
                    out.append((f"{root.name}/{path.relative_to(root)}", Image.open(path).convert("RGB")))
    return out


def _jpeg(quality: int) -> Callable[[Image.Image], Image.Image]:
    def make(image: Image.Image) -> Image.Image:
        buffer = io.BytesIO()
        image.save(buffer, "JPEG", quality=quality)
        assert jpeg_quality(buffer.getvalue()) == quality  # the hint would read this quality back
        return Image.open(io.BytesIO(buffer.getvalue())).convert("RGB")

    return make


def _shrunk(side: int) -> Callable[[Image.Image], Image.Image]:
    def make(image: Image.Image) -> Image.Image:
        scale = side / min(image.size)
        if scale >= 1:
            return image
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return image.resize(size, Image.Resampling.LANCZOS)

    return make


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=os.environ.get("SYNTHGUARD_MODEL_CHECKPOINT"))
    parser.add_argument("--images", type=Path, help="a folder of images instead of the fixtures")
    parser.add_argument("--threshold", type=float, default=0.5)
    args = parser.parse_args()
    if args.checkpoint:
        detector = Detector.from_settings(Settings(model_checkpoint=args.checkpoint, device="cpu"))
        which = f"`{detector.name}` {detector.version}"
    else:
        detector = Detector.untrained_model(Settings(device="cpu"))
        which = f"`{detector.name}` with RANDOM weights (the mechanism only: no detector's behaviour)"
    images = _images(args.images)

    def scores(make: Callable[[Image.Image], Image.Image]) -> list[float]:
        return [detector.predict([detector.preprocess(make(image))])[0] for _, image in images]

    def inputs(make: Callable[[Image.Image], Image.Image]) -> list[np.ndarray]:
        return [np.asarray(detector.preprocess(make(image)), dtype=np.float32) for _, image in images]

    input_side = min(detector.data_config["input_size"][1:])
    copies = [(f"JPEG q{q}", _jpeg(q)) for q in QUALITIES]
    copies += [(f"short side {s}{' (the model input)' if s == input_side else ''}", _shrunk(s)) for s in SHORT_SIDES]

    original = inputs(lambda image: image)
    print(f"## The model's input: `{detector.name}`'s transform, {len(images)} images\n")
    print("| copy | mean absolute change, median over images (0-255) | largest |")
    print("|---|---:|---:|")
    for name, make in copies:
        moved = [float(np.abs(a - b).mean()) for a, b in zip(inputs(make), original, strict=True)]
        print(f"| {name} | {statistics.median(moved):.2f} | {max(moved):.2f} |")
    print()

    base = scores(lambda image: image)
    print(f"## The score: {which}, threshold {args.threshold:g}\n")
    print("| copy | mean score move | largest | verdicts flipped |")
    print("|---|---:|---:|---:|")
    for name, make in copies:
        moved_scores = scores(make)
        deltas = [abs(a - b) for a, b in zip(base, moved_scores, strict=True)]
        flips = sum((a >= args.threshold) != (b >= args.threshold) for a, b in zip(base, moved_scores, strict=True))
        print(f"| {name} | {statistics.mean(deltas):.4f} | {max(deltas):.4f} | {flips / len(images):.0%} |")
    print()


if __name__ == "__main__":
    main()
