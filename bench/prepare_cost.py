#!/usr/bin/env python
"""What a preparing process spends per image: `python bench/prepare_cost.py [--runs N]`.

CPU time of `worker.preparing.prepare_image` on one thread (median of N runs per image, 4 unique
images per set), with SYNTHGUARD_DEVICE_DECODE off (decode, provenance, hash, preprocess: the CPU
path) and on (a JPEG checked at reduced scale, its metadata read and its hash taken; the full decode,
watermark and resize left to the model's device), and each of the checked path's parts alone.
Prints a table of ms per image; asserts nothing.
"""

from __future__ import annotations

import os

for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from dataclasses import replace  # noqa: E402
from pathlib import Path  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.gpu import build_checkpoint, detector  # noqa: E402
from bench.run import make_set, table  # noqa: E402
from worker.imaging import check_jpeg, decode_image  # noqa: E402
from worker.pdq import hash_image  # noqa: E402
from worker.preparing import PREVIEW_SIDE, PrepareSpec, prepare_image  # noqa: E402
from worker.provenance import read_provenance  # noqa: E402

MAX_PIXELS = 100_000_000


def cpu_ms(fn: Callable[[], object], runs: int) -> float:
    fn()
    times = []
    for _ in range(runs):
        started = time.process_time()
        fn()
        times.append(time.process_time() - started)
    return 1e3 * statistics.median(times)


def stages(data: bytes, preview: object, cpu: PrepareSpec, device: PrepareSpec) -> dict[str, Callable[[], object]]:
    """Each column's work on one image."""
    return {
        "CPU path": lambda: prepare_image(data, cpu),
        "checked for the device": lambda: prepare_image(data, device),
        "full decode alone": lambda: decode_image(data, max_pixels=MAX_PIXELS),
        "check alone": lambda: check_jpeg(data, max_pixels=MAX_PIXELS, min_side=PREVIEW_SIDE),
        "metadata alone": lambda: read_provenance(data, "jpeg"),
        "hash of the preview": lambda: hash_image(preview),  # type: ignore[arg-type]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="runs per image (a fifth of that, at least 3, for 12 MP)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        det = detector(build_checkpoint(Path(tmp)), "cpu")
    cpu = PrepareSpec(max_pixels=MAX_PIXELS, decode_timeout_s=60.0, transform=det.image_transform)
    device = replace(cpu, device_decode=True)
    columns = ["CPU path", "checked for the device", "full decode alone", "check alone", "metadata alone",
               "hash of the preview"]
    rows = []
    for name in ("jpeg-1024", "jpeg-12mp"):
        runs = args.runs if name == "jpeg-1024" else max(3, args.runs // 5)
        results: dict[str, list[float]] = {c: [] for c in columns}
        for data in make_set(name, 4):
            checked = check_jpeg(data, max_pixels=MAX_PIXELS, min_side=PREVIEW_SIDE)
            assert checked is not None
            parts = stages(data, checked.preview, cpu, device)
            for column, fn in parts.items():
                results[column].append(cpu_ms(fn, runs))
        rows.append([name, *[f"{statistics.median(results[c]):.2f}" for c in columns]])
        print(f"{name}: done", file=sys.stderr)
    print("CPU ms per image, one thread (median over images of the median of runs)\n")
    print(table(["set", *columns], rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
