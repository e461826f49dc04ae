#!/usr/bin/env python
"""Where a busy worker's CPU goes: `python bench/profile_worker.py [--set jpeg-1024] [--images 500]`.

Runs the service path of bench/run.py (moto S3, the API, one `python -m worker.cli worker`,
PostgreSQL, Redis db 10) on one image set, samples the worker with py-spy while it scores the
set (`pip install py-spy`; it reads the process's memory, so it needs ptrace rights: root or
CAP_SYS_PTRACE), and prints each stage's share of the samples taken in running Python threads.

py-spy sees Python threads only: torch's intra-op threads (OpenMP) are not sampled, so
`forward` is the calling thread's share, not the model's whole cost. It samples the worker
process alone, so the worker runs its CPU stages in its own threads
(SYNTHGUARD_PREPARE_PROCESSES=0) unless --prepare says otherwise; with preparing processes those
stages happen in children that are not sampled. Sampling slows the
worker by a few percent (--nonblocking); the rate it prints is not a benchmark figure.
"""

from __future__ import annotations

import argparse
import collections
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.run import SETS, Api, Env, make_set, start_worker, table, upload

# First match wins, searched anywhere in a sampled stack (so "forward" beats "predict").
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("forward (calling thread)", ("Detector._forward",)),
    ("stack and normalise", ("Detector.predict",)),
    ("fetch (boto3)", ("Storage.fetch",)),
    ("decode", ("decode_image",)),
    ("provenance", ("read_provenance",)),
    ("preprocess", ("Detector.preprocess", "prepare_image")),
    ("database: claim", ("Scorer._claim",)),
    ("database: store results", ("Scorer._store", "Scorer._write_batch", "Scorer._fail", "Scorer._requeue")),
    ("celery and kombu", ("celery/", "kombu/")),
    ("metrics", ("prometheus_client/",)),
]


def stage_of(stack: str) -> str:
    for name, needles in STAGES:
        if any(n in stack for n in needles):
            return name
    return "other"


def shares(raw: Path) -> tuple[collections.Counter[str], int]:
    """Samples per stage from py-spy's raw (collapsed-stack) output."""
    counts: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        counts[stage_of(stack)] += int(count)
        total += int(count)
    return counts, total


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="jpeg-1024", choices=list(SETS), help="image set")
    parser.add_argument("--images", type=int, default=500, help="images scored while sampling")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    parser.add_argument("--concurrency", type=int, default=8, help="SYNTHGUARD_CONCURRENCY of the worker")
    parser.add_argument("--prepare", default="0",
                        help="SYNTHGUARD_PREPARE_PROCESSES of the worker (default 0: every stage in the sampled process)")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None:
        print("py-spy is not installed: pip install py-spy", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="synthguard-profile-"))
    env = Env(workdir)
    try:
        env.start()
        blobs = make_set(args.set, 8)
        ext = SETS[args.set][2].lower()
        keys = upload(env, "p", blobs, args.images, ext)
        warm = upload(env, "warm", blobs, 8, ext)
        api = Api(env)
        worker = start_worker(env, args.concurrency, 32,
                              prepare=None if args.prepare == "auto" else int(args.prepare))
        ids = api.scan(warm, "bulk").split(",")
        api.wait(ids, len(warm))
        raw = workdir / "profile.txt"
        sampler = subprocess.Popen(
            [spy, "record", "--nonblocking", "--rate", str(args.rate), "--format", "raw", "--threads",
             "--output", str(raw), "--pid", str(worker.pid)],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        started = time.monotonic()
        ids = api.scan(keys, "bulk").split(",")
        api.wait(ids, len(keys))
        elapsed = time.monotonic() - started
        sampler.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C, not on SIGTERM
        output, _ = sampler.communicate(timeout=60)
        if not raw.exists():
            print(f"py-spy wrote nothing:\n{output.decode(errors='replace')}", file=sys.stderr)
            return 1
        counts, total = shares(raw)
    finally:
        env.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"{args.images} {args.set} images in {elapsed:.1f}s ({args.images / elapsed:.1f} img/s while sampled), "
          f"{total} samples of running Python threads\n")
    print(table(["stage", "share of samples"], [[name, f"{100 * n / total:.1f}%"] for name, n in counts.most_common()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
