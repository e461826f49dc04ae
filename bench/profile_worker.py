#!/usr/bin/env python
"""Where a busy worker's CPU goes: `python bench/profile_worker.py [--set jpeg-1024] [--images 500]`.

Runs the service path of bench/run.py (moto S3, the API, one `python -m worker.cli worker`,
PostgreSQL, Redis db 10) on one image set and, while the worker scores it, prints two tables:

- *CPU per image by process*, read from /proc: the worker process, its preparing processes (and
  their fork server), the API, the moto S3 server, PostgreSQL, Redis, and whatever else ran, as
  milliseconds of CPU time per stored image. Exact, and sampling-free.
- *Stage shares*: py-spy samples the worker and its preparing processes (`--subprocesses`;
  `pip install py-spy`; it reads process memory, so it needs ptrace rights: root or
  CAP_SYS_PTRACE), and each sample of a running Python thread counts for the stage its stack is
  in. py-spy sees Python threads only: torch's intra-op threads (OpenMP) are not sampled, so
  `forward` is the calling thread's share, not the model's whole cost.

The worker runs with the service's default of preparing processes (`--prepare auto`); `--prepare 0`
puts every stage in the worker's own threads. Sampling the worker and its children costs CPU
on the same cores (at 100 Hz on 2 cores it cut the rate by about 40%), so read the CPU table
from a run with `--rate 0`, which skips py-spy, and the stage shares from a sampled one.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import procstat
from bench.run import SETS, Api, Env, Proc, make_set, start_worker, table, upload

# First match wins, searched anywhere in a sampled stack (so "forward" beats "predict").
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("forward (calling thread)", ("Detector._forward",)),
    ("stack and normalise", ("Detector.predict",)),
    ("fetch (boto3)", ("Storage.fetch",)),
    ("decode", ("decode_image",)),
    ("provenance", ("read_provenance",)),
    ("preprocess", ("Detector.preprocess", "prepare_image")),
    ("hand-off to a preparing process", ("ProcessPreparer.", "_Child.run")),
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


def role_of(stack: str) -> str:
    """The worker itself, or one of its descendants (the fork server and preparing processes)."""
    # With --subprocesses each stack starts with its chain of processes, the sampled root first.
    chain = [frame for frame in stack.split(";") if frame.startswith("process ")]
    return "worker" if len(chain) <= 1 else "preparing"


def shares(raw: Path) -> tuple[collections.Counter[tuple[str, str]], int]:
    """Samples per (process role, stage) from py-spy's raw (collapsed-stack) output."""
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            continue
        counts[(role_of(stack), stage_of(stack))] += int(count)
        total += int(count)
    return counts, total


def ledger(env: Env, api: Api, worker: Proc) -> procstat.Ledger:
    """CPU of each process group of the service path."""
    worker_pid = worker.pid
    return procstat.Ledger({
        "worker process": lambda: [worker_pid],
        "its preparing processes": lambda: procstat.tree(worker_pid)[1:],
        "API": lambda: [api.proc.pid],
        "moto S3 server": lambda: [env.moto.pid],
        "PostgreSQL": lambda: procstat.pids_named("postgres"),
        "Redis": lambda: procstat.pids_named("redis-server"),
        "bench driver (this process)": lambda: [os.getpid()],
    })


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--set", default="jpeg-1024", choices=list(SETS), help="image set")
    parser.add_argument("--images", type=int, default=500, help="images scored while measured")
    parser.add_argument("--rate", type=int, default=100, help="py-spy samples per second (0: no sampling)")
    parser.add_argument("--concurrency", type=int, default=8, help="SYNTHGUARD_CONCURRENCY of the worker")
    parser.add_argument("--prepare", default="auto",
                        help="SYNTHGUARD_PREPARE_PROCESSES of the worker (default auto, the service default)")
    parser.add_argument("--gil", action="store_true",
                        help="count only samples of the thread holding the GIL: Python's own CPU use, without "
                             "native code that released it (the forward pass, most of decoding)")
    parser.add_argument("--raw", type=Path, default=None, help="keep py-spy's collapsed stacks in this file")
    args = parser.parse_args()
    spy = shutil.which("py-spy")
    if spy is None and args.rate:
        print("py-spy is not installed: pip install py-spy (or --rate 0 for the CPU table alone)", file=sys.stderr)
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="synthguard-profile-"))
    env = Env(workdir)
    counts: collections.Counter[tuple[str, str]] = collections.Counter()
    total = 0
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
        sampler = None
        if args.rate:
            sampler = subprocess.Popen(
                [spy, "record", "--nonblocking", "--subprocesses", "--rate", str(args.rate), "--format", "raw",
                 "--threads", *(["--gil"] if args.gil else []), "--output", str(raw), "--pid", str(worker.pid)],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            )
        meter = ledger(env, api, worker)
        ids = api.scan(keys, "bulk").split(",")
        api.wait(ids, len(keys))
        wall, busy, used = meter.stop()
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)  # py-spy writes its output on Ctrl-C, not on SIGTERM
            output, _ = sampler.communicate(timeout=60)
            if not raw.exists():
                print(f"py-spy wrote nothing:\n{output.decode(errors='replace')}", file=sys.stderr)
                return 1
            counts, total = shares(raw)
            if args.raw:
                shutil.copyfile(raw, args.raw)
    finally:
        env.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    n = args.images
    print(f"{n} {args.set} images in {wall:.1f}s ({n / wall:.1f} img/s{' while sampled' if args.rate else ''}); "
          f"the machine was busy {100 * busy / wall:.0f}% of one core ({os.cpu_count()} cores)\n")
    rows = [[name, f"{1000 * cpu / n:.1f}", f"{100 * cpu / busy:.0f}%"] for name, cpu in used.items()]
    rows.append(["anything else", f"{1000 * (busy - sum(used.values())) / n:.1f}",
                 f"{100 * (busy - sum(used.values())) / busy:.0f}%"])
    rows.append(["the machine (all processes)", f"{1000 * busy / n:.1f}", "100%"])
    print(table(["process", "CPU ms per image", "share of the machine's busy time"], rows))
    if total:
        print(f"\n{total} py-spy samples of running Python threads (worker and preparing processes)\n")
        print(table(["process", "stage", "share of samples"],
                    [[role, stage, f"{100 * c / total:.1f}%"] for (role, stage), c in counts.most_common()]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
