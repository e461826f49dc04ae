#!/usr/bin/env python
"""What the bank of known images costs: `python bench/bank_cost.py [--sizes 10000,100000,1000000] [--photos N] [--sections matching]`.

Three tables, measured in one run, asserting nothing:

1. Hashing: ms per image of `worker.pdq.hash_image` (PDQ with its eight
   dihedral forms) on photo-like images of several sizes, beside the decode of
   the same image as the yardstick; one thread.
2. Matching: ms per image (all eight forms of a query) against banks of each
   size, for the index the worker uses (`worker.hashindex.HashIndex`,
   multi-index hashing), a numpy scan of every hash, and faiss's binary flat
   and multi-hash indexes when `faiss-cpu` is installed; plus the index's
   build time and memory. Bank hashes are uniformly random, the worst case
   for the scan and the typical one for the index; queries are random too,
   half of them with a form within 31 bits of a banked hash.
3. Robustness: the distance from an image's hash to its copy's nearest form,
   over N photo-like images, per kind of copy; with the share within 31 bits,
   against the image's own hash alone and with the hashes of its crops that a
   review `ai` banks (`worker.cropbank`, SYNTHGUARD_BANK_CROP=0.05).
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from corpus import cut, encode, jpeg_copy, photo  # noqa: E402  (tests/corpus.py: the photo-like images of the test suite)

from worker.cropbank import crop_hashes  # noqa: E402
from worker.hashindex import HashIndex  # noqa: E402
from worker.imaging import decode_image  # noqa: E402
from worker.pdq import MATCH_DISTANCE, distance, hash_image  # noqa: E402


def _median_ms(run: Callable[[], object], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return 1000 * statistics.median(times)


def hashing(repeat: int) -> None:
    print("## Hashing: ms per image, one thread (median)\n")
    print("| image | decode | hash (PDQ, 8 forms) | hash / decode | 13 crops (a review `ai`) |")
    print("|---|---:|---:|---:|---:|")
    for label, size, fmt in (
        ("640x480 JPEG", (640, 480), "JPEG"),
        ("1024x768 JPEG", (1024, 768), "JPEG"),
        ("1024x1024 PNG", (1024, 1024), "PNG"),
        ("4000x3000 JPEG", (4000, 3000), "JPEG"),
    ):
        data = encode(photo(*size, seed=size[0]), fmt, **({"quality": 90} if fmt == "JPEG" else {}))
        decoded = decode_image(data, max_pixels=10**8).image
        decode_ms = _median_ms(lambda data=data: decode_image(data, max_pixels=10**8).image.load(), repeat)
        hash_ms = _median_ms(lambda decoded=decoded: hash_image(decoded), repeat)
        crops_ms = _median_ms(lambda decoded=decoded: crop_hashes(decoded, 0.05), max(1, repeat // 2))
        print(f"| {label} | {decode_ms:.1f} | {hash_ms:.1f} | {hash_ms / decode_ms:.2f} | {crops_ms:.0f} |")
    print()


def _queries(bank: np.ndarray, count: int, rng: np.random.Generator) -> list[list[bytes]]:
    queries = []
    for number in range(count):
        forms = [rng.integers(0, 256, 32, dtype=np.uint8).tobytes() for _ in range(8)]
        if number % 2 == 0:  # a copy: one form near a banked hash
            bits = np.unpackbits(bank[int(rng.integers(len(bank)))])
            bits[rng.choice(256, int(rng.integers(0, MATCH_DISTANCE + 1)), replace=False)] ^= 1
            forms[int(rng.integers(8))] = np.packbits(bits).tobytes()
        queries.append(forms)
    return queries


def _bank_row(size: int, count: int, rng: np.random.Generator, faiss: Any) -> str:
    """One bank size: build the index, time it, the scan and faiss on the same queries."""
    bank = rng.integers(0, 256, (size, 32), dtype=np.uint8)
    queries = _queries(bank, count, rng)
    index = HashIndex()
    started = time.perf_counter()
    index.put_many([row.tobytes() for row in bank])
    build_s = time.perf_counter() - started
    found = [index.nearest(q, MATCH_DISTANCE) for q in queries]
    index_ms = _median_ms(lambda: [index.nearest(q, MATCH_DISTANCE) for q in queries], 3) / count
    words = bank.view(np.uint64)

    def scan(q: list[bytes]) -> int:
        forms = np.frombuffer(b"".join(q), dtype=np.uint8).reshape(-1, 32).view(np.uint64)
        return int(np.bitwise_count(words[:, None, :] ^ forms[None]).sum(axis=2, dtype=np.int32).min())

    scanned = [scan(q) for q in queries[:5]]
    scan_ms = _median_ms(lambda: [scan(q) for q in queries[:5]], 1) / 5
    for q, hit, best in zip(queries[:5], found[:5], scanned, strict=True):
        assert (hit is None) == (best > MATCH_DISTANCE), (q, hit, best)  # the index finds what the scan finds
    row = f"| {size:,} | {build_s:.2f} | {index.nbytes / 2**20:.0f} | {index_ms:.2f} | {scan_ms:.1f} |"
    if faiss is not None:
        batches = [np.frombuffer(b"".join(q), dtype=np.uint8).reshape(-1, 32) for q in queries]
        flat = faiss.IndexBinaryFlat(256)
        flat.add(bank)
        flat_ms = _median_ms(lambda: [flat.search(b, 1) for b in batches], 1) / count
        multi = faiss.IndexBinaryMultiHash(256, 16, 16)
        multi.nflip = 1
        multi.add(bank)
        multi_ms = _median_ms(lambda: [multi.range_search(b, MATCH_DISTANCE + 1) for b in batches], 1) / count
        row += f" {flat_ms:.2f} | {multi_ms:.2f} |"
    return row


def matching(sizes: list[int], count: int) -> None:
    try:
        import faiss
    except ImportError:
        faiss = None
    print("## Matching: ms per image (8 forms), one thread\n")
    header = "| bank | index build s | index MB | index | numpy scan |"
    header += " faiss flat | faiss multi-hash |" if faiss else ""
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    if faiss is not None:
        faiss.omp_set_num_threads(1)
    rng = np.random.default_rng(0)
    for size in sizes:
        print(_bank_row(size, count, rng, faiss))
    print()


def robustness(photos: int) -> None:
    copies: dict[str, Callable[[Image.Image], Image.Image]] = {
        "JPEG q70": lambda im: jpeg_copy(im, 70),
        "half size": lambda im: im.resize((im.width // 2, im.height // 2), Image.Resampling.LANCZOS),
        "mirrored": ImageOps.mirror,
        "rotated 90": lambda im: im.transpose(Image.Transpose.ROTATE_90),
        "trimmed 0.5% each edge": lambda im: cut(im, 0.005, 0.005, 0.005, 0.005),
        "trimmed 1% each edge": lambda im: cut(im, 0.01, 0.01, 0.01, 0.01),
        "trimmed 1.27% each edge (5% of the area)": lambda im: cut(im, 0.0127, 0.0127, 0.0127, 0.0127),
        "trimmed 2.5% each edge (5% of each side)": lambda im: cut(im, 0.025, 0.025, 0.025, 0.025),
        "2.5% cut off the left": lambda im: cut(im, 0.025),
        "3.5% cut off the left": lambda im: cut(im, 0.035),
        "5% cut off the left": lambda im: cut(im, 0.05),
        "5% off the top and the right (a corner)": lambda im: cut(im, 0, 0.05, 0.05),
        "2.5% off the left and the top": lambda im: cut(im, 0.025, 0.025),
        "3% left, 2% right, 1% top, 4% bottom": lambda im: cut(im, 0.03, 0.01, 0.02, 0.04),
        "7% cut off the left": lambda im: cut(im, 0.07),
        "10% cut off the left": lambda im: cut(im, 0.10),
    }
    originals = [photo(640, 480, seed) for seed in range(500, 500 + photos)]
    own = [hash_image(im).forms[0] for im in originals]
    crops = [[c.forms[0] for c in crop_hashes(im, 0.05)] for im in originals]
    print(f"## Robustness: bits from the original to the copy's nearest form, over {photos} photo-like images\n")
    print("| copy | median | max | within 31 | with the crops banked: median | within 31 |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, make in copies.items():
        alone, cropped = [], []
        for im, banked, more in zip(originals, own, crops, strict=True):
            forms = hash_image(make(im)).forms
            alone.append(min(distance(banked, f) for f in forms))
            cropped.append(min(distance(b, f) for b in (banked, *more) for f in forms))
        print(
            f"| {name} | {statistics.median(alone):.0f} | {max(alone)} | {_within(alone):.0%} "
            f"| {statistics.median(cropped):.0f} | {_within(cropped):.0%} |"
        )
    print()


def _within(distances: list[int]) -> float:
    return sum(d <= MATCH_DISTANCE for d in distances) / len(distances)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10000,100000,1000000", help="bank sizes, comma-separated")
    parser.add_argument("--queries", type=int, default=200, help="images matched per bank size")
    parser.add_argument("--photos", type=int, default=100, help="images per kind of copy")
    parser.add_argument("--repeat", type=int, default=5, help="runs per hashing timing")
    parser.add_argument(
        "--sections", default="hashing,matching,robustness", help="which tables, comma-separated (default: all three)"
    )
    args = parser.parse_args()
    sections = set(args.sections.split(","))
    if "hashing" in sections:
        hashing(args.repeat)
    if "matching" in sections:
        matching([int(s) for s in args.sizes.split(",")], args.queries)
    if "robustness" in sections:
        robustness(args.photos)


if __name__ == "__main__":
    main()
