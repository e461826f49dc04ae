#!/usr/bin/env python
"""What provenance reading costs per image: `python bench/provenance_cost.py [--runs N] [--dump FILE]`.

Times `worker.provenance.read_provenance` and each signal's reader alone, single
thread, median of several runs, on synthetic photo-like images (1024 JPEG q90,
1024 PNG, 4000x3000 JPEG q90) and on every file in the shared fixtures
(real, generated, c2pa, formats) when they are there. Decoding is timed too,
as the yardstick. Prints a table of ms per image; asserts nothing.

`--gil` measures instead how much of each stage's run time holds the GIL, which is
what limits a worker's threads (see `gil_held`), and 1- vs 2-thread throughput of
`read_provenance`; by default on the synthetic images only.

`--threads` measures how `read_provenance` and the watermark alone scale with
threads in one process: calls/s at 1, 2, the core count, 8 and 16 threads, and at
each count with at most one call per core inside at once (a semaphore), the
remedy to try where threads scale badly; by default on the synthetic images only.

`--dump FILE` writes each image's `read_provenance(...).to_json()`; `--compare
FILE` reads such a dump back and lists every image whose findings differ, so a
change to the readers can be checked for unchanged verdicts.
"""

from __future__ import annotations

import os

# One thread, like one worker thread: nothing here may fan out over the cores.
for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMEXPR_NUM_THREADS"):
    os.environ.setdefault(_var, "1")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from worker import provenance  # noqa: E402
from worker.errors import PermanentError  # noqa: E402
from worker.imaging import decode_image, sniff_format  # noqa: E402
from worker.provenance import _containers, c2pa, exif, generation_params, watermark, xmp  # noqa: E402
from worker.provenance._base import Budget  # noqa: E402

FIXTURES = Path(os.environ.get("SYNTHGUARD_TEST_FIXTURES", REPO.parent / "shared" / "fixtures"))
FIXTURE_FOLDERS = ("real", "generated", "c2pa", "formats")
MAX_PIXELS = 100_000_000
BUDGET_S = 60.0  # the per-reader timings must not be cut short by the budget

# name -> (width, height, format, save options)
SYNTHETIC: dict[str, tuple[int, int, str, dict[str, Any]]] = {
    "synthetic jpeg-1024 q90": (1024, 1024, "JPEG", {"quality": 90}),
    "synthetic png-1024": (1024, 1024, "PNG", {"compress_level": 6}),
    "synthetic jpeg-4000x3000 q90": (4000, 3000, "JPEG", {"quality": 90}),
}
COLUMNS = (
    "decode",
    "read_provenance",
    "container",
    "c2pa",
    "iptc_xmp",
    "generation_params",
    "exif_software",
    "sd_watermark",
)


def photo_like(width: int, height: int, seed: int) -> Image.Image:
    """Smooth colour gradients, a soft texture and per-pixel sensor noise, like a photo's statistics."""
    rng = np.random.default_rng(seed)
    corners = rng.integers(0, 256, size=(2, 2, 3)).astype(np.float32)
    fy = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None, None]
    fx = np.linspace(0.0, 1.0, width, dtype=np.float32)[None, :, None]
    top = corners[0, 0] * (1 - fx) + corners[0, 1] * fx
    bottom = corners[1, 0] * (1 - fx) + corners[1, 1] * fx
    arr = top * (1 - fy) + bottom * fy
    # A coarse random field, upsampled: mid-frequency texture.
    coarse = rng.normal(0.0, 18.0, size=(height // 32 + 1, width // 32 + 1)).astype(np.float32)
    texture = Image.fromarray(coarse, mode="F").resize((width, height), Image.BICUBIC)
    arr += np.asarray(texture)[..., None]
    arr += rng.normal(0.0, 4.0, size=arr.shape).astype(np.float32)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def images() -> list[tuple[str, bytes]]:
    out: list[tuple[str, bytes]] = []
    for seed, (name, (width, height, fmt, options)) in enumerate(SYNTHETIC.items()):
        buf = io.BytesIO()
        photo_like(width, height, seed).save(buf, fmt, **options)
        out.append((name, buf.getvalue()))
    if FIXTURES.is_dir():
        for folder in FIXTURE_FOLDERS:
            for path in sorted((FIXTURES / folder).glob("*")):
                if path.is_file() and path.suffix.lower() != ".md" and not path.name.startswith("LICENSE"):
                    out.append((f"{folder}/{path.name}", path.read_bytes()))
    return out


def median_ms(fn: Callable[[], object], runs: int) -> float:
    fn()  # warm: lazy imports (c2pa's native library), caches
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1000


def measure(data: bytes, runs: int) -> tuple[dict[str, float], dict[str, Any], str]:
    """ms per reader (median of ``runs``), the findings, and the image's size."""
    fmt = sniff_format(data)
    image = decode_image(data, max_pixels=MAX_PIXELS).image
    budget = Budget(BUDGET_S)
    meta = _containers.collect(data, fmt, budget)
    fields, field_errors = exif.read_fields(meta)

    def container() -> None:
        exif.read_fields(_containers.collect(data, fmt, Budget(BUDGET_S)))

    readers: dict[str, Callable[[], object]] = {
        "decode": lambda: decode_image(data, max_pixels=MAX_PIXELS),
        "read_provenance": lambda: provenance.read_provenance(data, fmt, image),
        "container": container,
        "c2pa": lambda: c2pa.read(data, fmt, meta, Budget(BUDGET_S)),
        "iptc_xmp": lambda: xmp.read(meta, Budget(BUDGET_S)),
        "generation_params": lambda: generation_params.read(meta, fields, Budget(BUDGET_S)),
        "exif_software": lambda: exif.read_software(meta, fields, field_errors),
        "sd_watermark": lambda: watermark.read(image, Budget(BUDGET_S)),
    }
    ms = {name: median_ms(fn, runs) for name, fn in readers.items()}
    findings = provenance.read_provenance(data, fmt, image, budget_s=BUDGET_S).to_json()
    return ms, findings, f"{image.width}x{image.height}"


# ---------------------------------------------------------------------------- GIL


def _probe_rate(work: Callable[[float], int], seconds: float) -> tuple[float, int, float]:
    """Run ``work(seconds)`` here while a pure-Python loop counts in a second thread.

    Returns the loop's iterations per second, the calls ``work`` made, and the seconds it took.
    """
    stop = [False]
    count = [0]

    def spin() -> None:
        n = 0
        while not stop[0]:
            n += 1
        count[0] = n

    probe = threading.Thread(target=spin)
    started = time.perf_counter()
    probe.start()
    calls = work(seconds)
    stop[0] = True
    probe.join()
    elapsed = time.perf_counter() - started
    return count[0] / elapsed, calls, elapsed


def _repeat(fn: Callable[[], object]) -> Callable[[float], int]:
    def work(seconds: float) -> int:
        deadline, calls = time.perf_counter() + seconds, 0
        while calls == 0 or time.perf_counter() < deadline:
            fn()
            calls += 1
        return calls

    return work


_CONTROL = np.random.default_rng(0).bytes(1 << 20)


def _control() -> None:
    hashlib.sha256(_CONTROL).digest()  # hashlib lets go of the GIL on large inputs


def gil_held(
    fn: Callable[[], object], single_ms: float, seconds: float = 0.4, rounds: int = 3
) -> tuple[float, float]:
    """The fraction of ``fn``'s single-thread run time during which it holds the GIL.

    The probe loop only advances while it holds the GIL, so the iterations it loses while
    ``fn`` runs beside it, times its iteration time, is the time ``fn`` held the GIL. The
    reference rate is taken beside a C call that releases the GIL (not beside sleep), so that
    two busy cores sharing caches and clocks do not count as GIL. Median of ``rounds``.

    Also returns how often per call ``fn`` waited to get the GIL back: the probe never lets go
    of it on its own, so each wait lasts a switch interval, and the extra time per call over
    the interval counts them. Each is a hand-over that a worker's other threads make slow.
    """
    fractions, waits = [], []
    for _ in range(rounds):
        reference, _, _ = _probe_rate(_repeat(_control), seconds / 2)
        rate, calls, elapsed = _probe_rate(_repeat(fn), seconds)
        held_s = max(0.0, 1.0 - rate / reference) * elapsed / calls
        fractions.append(held_s / (single_ms / 1000))
        waits.append(max(0.0, elapsed / calls - single_ms / 1000) / sys.getswitchinterval())
    return statistics.median(fractions), statistics.median(waits)


def thread_rate(fn: Callable[[], object], threads: int, seconds: float = 1.0) -> float:
    """Calls per second of ``fn`` run in a loop by ``threads`` threads at once."""
    counts = [0] * threads
    deadline = time.perf_counter() + seconds

    def loop(index: int) -> None:
        while time.perf_counter() < deadline:
            fn()
            counts[index] += 1

    workers = [threading.Thread(target=loop, args=(i,)) for i in range(threads)]
    started = time.perf_counter()
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return sum(counts) / (time.perf_counter() - started)


def watermark_stages(image: Image.Image) -> dict[str, Callable[[], object]]:
    """The watermark's steps one at a time, each over all of the image's strips, as the reader runs them."""
    width, height = image.size
    nbx, nby = (width // 4 * 2) // 4, (height // 4 * 2) // 4
    rows_total = min(nby, max(1, watermark.MAX_SCAN_PIXELS // (64 * nbx)))
    strip = max(1, watermark.STRIP_PIXELS // (64 * nbx))
    tops = range(0, rows_total, strip)
    n = 8 * min(strip, rows_total)
    rgbx = np.empty((n, 8 * nbx, 4), np.uint8)
    window = Image.frombuffer("RGBX", (8 * nbx, n), rgbx, "raw", "RGBX", 0, 1)
    yuv = np.empty((2, n, 8 * nbx, 3), np.uint8)
    bits = np.zeros((2, rows_total * nbx), np.uint8)

    def paste() -> None:
        for top in tops:
            window.im.paste(image.im, (0, -8 * top, width, height - 8 * top))

    def convert() -> None:
        for _ in tops:
            watermark.convert(rgbx, yuv)

    return {
        "paste into numpy": paste,
        "convert (OpenCV, both orders)": convert,
        "block_bits": lambda: [watermark.block_bits(yuv) for _ in tops],
        "vote": lambda: watermark.vote(bits),
    }


def gil_report(data: bytes, runs: int) -> list[list[str]]:
    fmt = sniff_format(data)
    image = decode_image(data, max_pixels=MAX_PIXELS).image
    meta = _containers.collect(data, fmt, Budget(BUDGET_S))
    fields, _ = exif.read_fields(meta)
    stages: dict[str, Callable[[], object]] = {
        "read_provenance": lambda: provenance.read_provenance(data, fmt, image),
        "container (collect)": lambda: _containers.collect(data, fmt, Budget(BUDGET_S)),
        "exif fields": lambda: exif.read_fields(meta),
        "c2pa": lambda: c2pa.read(data, fmt, meta, Budget(BUDGET_S)),
        "iptc_xmp": lambda: xmp.read(meta, Budget(BUDGET_S)),
        "generation_params": lambda: generation_params.read(meta, fields, Budget(BUDGET_S)),
        "sd_watermark": lambda: watermark.read(image, Budget(BUDGET_S)),
    }
    stages.update({f"  wm: {k}": v for k, v in watermark_stages(image).items()})
    rows = []
    for name, fn in stages.items():
        single = median_ms(fn, runs)
        held, waits = gil_held(fn, single)
        rows.append([name, f"{single:.3f}", f"{held:.2f}", f"{held * single:.3f}", f"{waits:.1f}"])

    def read() -> None:
        provenance.read_provenance(data, fmt, image)

    # The GIL-free control shows what two threads can gain on this machine right now.
    for label, fn in (("read_provenance", read), ("control (no GIL)", _control)):
        one, two = thread_rate(fn, 1), thread_rate(fn, 2)
        rows.append(
            [f"{label} calls/s", f"1 thread {one:.0f}", f"2 threads {two:.0f}", f"x{two / one:.2f}", ""]
        )
    return rows


def thread_scaling(data: bytes, seconds: float) -> list[list[str]]:
    """Calls/s of read_provenance and the watermark at several thread counts, free and limited to the cores."""
    fmt = sniff_format(data)
    image = decode_image(data, max_pixels=MAX_PIXELS).image
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, 2, cores, 8, 16})
    stages: dict[str, Callable[[], object]] = {
        "read_provenance": lambda: provenance.read_provenance(data, fmt, image),
        "sd_watermark": lambda: watermark.read(image, Budget(BUDGET_S)),
    }
    rows = []
    slots = threading.BoundedSemaphore(cores)
    for name, fn in stages.items():

        def limited(fn: Callable[[], object] = fn) -> None:
            with slots:
                fn()

        for label, call in ((name, fn), (f"{name}, <= {cores} at once", limited)):
            rates = [thread_rate(call, threads, seconds) for threads in counts]
            rows.append([label, *(f"{rate:.0f}" for rate in rates)])
    return [["threads", *map(str, counts)], *rows]


def table(rows: list[list[str]], headers: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = [" | ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines.append("-+-".join("-" * w for w in widths))
    for row in rows:
        cells = [row[0].ljust(widths[0]), *(c.rjust(w) for c, w in zip(row[1:], widths[1:], strict=True))]
        lines.append(" | ".join(cells))
    return "\n".join(lines)


def compare(before: dict[str, Any], after: dict[str, Any]) -> list[str]:
    diffs = []
    for name in sorted(after):  # with --only, the images measured this time
        if before.get(name) != after[name]:
            old = json.dumps(before.get(name), sort_keys=True)
            new = json.dumps(after.get(name), sort_keys=True)
            diffs.append(f"{name}:\n  before {old}\n  after  {new}")
    return diffs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=7, help="timed runs per reader and image (median)")
    parser.add_argument("--only", default="", help="only images whose name contains this")
    parser.add_argument("--dump", type=Path, help="write every image's findings (to_json) here")
    parser.add_argument("--compare", type=Path, help="a --dump file to compare the findings with")
    parser.add_argument("--gil", action="store_true", help="GIL-held fraction per stage, 1 vs 2 threads")
    parser.add_argument("--threads", action="store_true", help="calls/s at several thread counts, free and limited")
    args = parser.parse_args()

    if args.threads:
        print(f"calls/s with N threads in one process, {len(os.sched_getaffinity(0))} cores; numpy {np.__version__}")
        for name, data in images():
            if args.only not in name if args.only else not name.startswith("synthetic"):
                continue
            header, *rows = thread_scaling(data, 2.0)
            print(f"\n{name}")
            print(table(rows, ["stage", *header[1:]]))
        return

    if args.gil:
        print(f"GIL held while each stage runs (2-thread probe); numpy {np.__version__}, 1 core per thread")
        for name, data in images():
            if args.only not in name if args.only else not name.startswith("synthetic"):
                continue
            print(f"\n{name}")
            print(
                table(gil_report(data, args.runs), ["stage", "ms alone", "GIL held", "held ms", "GIL waits"])
            )
        return

    rows: list[list[str]] = []
    dump: dict[str, Any] = {}
    for name, data in images():
        if args.only not in name:
            continue
        try:
            ms, findings, size = measure(data, args.runs)
        except PermanentError as exc:  # an undecodable fixture is reported, not fatal
            rows.append([name, "-", exc.code, *[""] * len(COLUMNS)])
            continue
        dump[name] = findings
        flagged = ",".join(n for n, s in findings["signals"].items() if s["ai"]) or "-"
        rows.append([name, size, *(f"{ms[c]:.2f}" for c in COLUMNS), flagged])
    print(f"ms per image, median of {args.runs} runs, single thread; numpy {np.__version__}")
    print(table(rows, ["image", "size", *COLUMNS, "ai signals"]))
    if args.dump:
        args.dump.write_text(json.dumps(dump, indent=1, sort_keys=True))
        print(f"findings written to {args.dump}")
    if args.compare:
        diffs = compare(json.loads(args.compare.read_text()), dump)
        print("\n".join(diffs) if diffs else f"findings identical to {args.compare} on {len(dump)} images")


if __name__ == "__main__":
    main()
