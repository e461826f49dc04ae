#!/usr/bin/env python
"""synthguard benchmark: `python bench/run.py [--quick]`. Prints tables; asserts nothing.

Same machine, same images, same run:
  1. ceilings: the model alone (ready tensors, best batch size; frozen, the CPU default, and
     eager) and decoding alone; S3 fetches
     with the service's shared client against a new client per object;
  2. naive baseline: one Celery task per image (bench/naive.py, prefork, one process per core);
  3. synthguard: images in a moto S3 server, enqueued through a real `python -m worker.cli api`,
     scored by a real `python -m worker.cli worker`, stored in PostgreSQL;
  4. levers: SYNTHGUARD_CONCURRENCY, SYNTHGUARD_BATCH_SIZE, torch's thread count, worker
     processes, the eager model (SYNTHGUARD_MODEL_FREEZE_CPU=false) and preparing processes
     (SYNTHGUARD_PREPARE_PROCESSES);
  5. latency: realtime enqueue-to-stored p50/p95 idle and under a bulk backfill, with one
     worker for all lanes and with a realtime worker beside a bulk one (LATENCY_LAYOUTS);
  6. fairness: one client's realtime latency idle and while another client floods the realtime
     lane, with overflow (SYNTHGUARD_REALTIME_BURST) and without (FAIRNESS_LAYOUTS);
  7. JPEG DCT-scaled decode (Pillow draft): speed and score drift (not a service default);
  8. bank: one worker against a client with an empty bank and one with a million hashes
     (20,000 with --quick), alternated: throughput, worker CPU and the `match` stage.

Services it needs: Redis (db 10), PostgreSQL (database synthguard_bench, created and
dropped here). Nothing is downloaded: the checkpoint is built with timm, pretrained=False.
On a GPU host, `--device cuda --scale N` runs the workers there with N times the images
(bench/gpu_session.sh's `service` step does, with PostgreSQL and Redis from wheels).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import NamedTuple

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _name in list(os.environ):
    if _name.startswith("SYNTHGUARD_"):
        del os.environ[_name]

from bench import procstat  # noqa: E402

PG_ADMIN = os.environ.get("BENCH_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")
PG_DB = "synthguard_bench"
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/10")
# SYNTHGUARD_DEVICE of every worker the bench starts (--device); the ceilings stay on the CPU.
DEVICE = "cpu"
# Fernet key for the services' webhook secrets (32 random bytes, url-safe base64), new each run.
BENCH_SECRET_KEY = base64.urlsafe_b64encode(secrets.token_bytes(32)).decode()
ARCH = "tf_mobilenetv3_large_100"
FIXTURES = Path(os.environ.get("SYNTHGUARD_TEST_FIXTURES", REPO.parent / "shared" / "fixtures"))


class Lever(NamedTuple):
    """One worker configuration of the levers stage; the defaults are the service's."""

    concurrency: int = 8  # SYNTHGUARD_CONCURRENCY
    batch_size: int = 32  # SYNTHGUARD_BATCH_SIZE
    # torch intra-op threads (OMP_NUM_THREADS); None: the worker's choice (the cores its preparing
    # processes leave, at least 1; one per core without them)
    threads: int | None = None
    processes: int = 1  # worker processes
    frozen: bool = True  # SYNTHGUARD_MODEL_FREEZE_CPU
    prepare: int | None = None  # SYNTHGUARD_PREPARE_PROCESSES; None: auto (one per core)
    obstore: bool = False  # SYNTHGUARD_S3_CLIENT=obstore
    chunk: int | None = None  # SYNTHGUARD_BULK_CHUNK of the API that publishes; None: the service's default
    devdecode: bool = False  # SYNTHGUARD_DEVICE_DECODE: JPEGs decoded on the model's device

    @property
    def key(self) -> str:
        prepare = "auto" if self.prepare is None else self.prepare
        return (f"{self.concurrency},{self.batch_size},{self.threads or 'default'},{self.processes},"
                f"{'frozen' if self.frozen else 'eager'},{prepare}" + (",obstore" if self.obstore else "")
                + (f",chunk={self.chunk}" if self.chunk is not None else "")
                + (",devdecode" if self.devdecode else ""))


def parse_lever(text: str) -> Lever:
    """'prepare=2,threads=1' as a Lever; fields not named keep the service's defaults."""
    fields: dict[str, object] = {}
    for part in filter(None, text.split(",")):
        name, _, value = part.partition("=")
        if name not in Lever._fields:
            raise SystemExit(f"--levers: unknown field {name!r}; fields: {', '.join(Lever._fields)}")
        flag = isinstance(Lever._field_defaults[name], bool)
        if flag:
            fields[name] = value.lower() in ("1", "true", "yes")
        else:
            fields[name] = None if value in ("auto", "default") else int(value)
    return Lever(**fields)  # type: ignore[arg-type]


# name -> (width, height, format)
SETS = {
    "jpeg-1024": (1024, 1024, "JPEG"),
    "png-1024": (1024, 1024, "PNG"),
    "jpeg-12mp": (4000, 3000, "JPEG"),
}
SIZES = {
    # images per set, unique images per set, backfill size, one client's realtime flood, realtime probes,
    # probe interval (s), levers, hashes in the bank stage's full bank
    "quick": {"n": {"jpeg-1024": 60, "png-1024": 40, "jpeg-12mp": 16}, "unique": 4, "backfill": 200, "flood": 200,
              "probes": 8, "interval": 0.3, "ceiling_s": 1.5, "bank": 20_000,
              "levers": [Lever(frozen=False), Lever(prepare=0), Lever(4, threads=1, processes=2, prepare=0)]},
    "full": {"n": {"jpeg-1024": 500, "png-1024": 240, "jpeg-12mp": 90}, "unique": 8, "backfill": 1000, "flood": 1000,
             "probes": 20, "interval": 0.3, "ceiling_s": 3.0, "bank": 1_000_000,
             "levers": [Lever(frozen=False), Lever(16), Lever(batch_size=8), Lever(prepare=1),
                        Lever(threads=2), Lever(prepare=0), Lever(4, prepare=0), Lever(threads=1, prepare=0),
                        Lever(4, processes=2, prepare=0), Lever(4, threads=1, processes=2, prepare=0)]},
}

# Worker processes per layout of the latency stage: (SYNTHGUARD_CONCURRENCY, --queues, nice), and
# SYNTHGUARD_REALTIME_STANDBY where not the default. The second is docker/compose.yaml's: a realtime
# worker beside one for every lane.
LATENCY_LAYOUTS = {
    "one worker, all lanes": [(8, None, 0)],
    "realtime worker + all-lanes worker": [(4, "realtime,webhooks", 0), (8, None, 0)],
    "realtime worker + bulk worker at nice 10": [(4, "realtime,webhooks", 0), (8, "overflow,bulk", 10)],
    "one worker, all lanes, no thread standing by": [(8, None, 0, 0)],
}

# The fairness stage's configurations: SYNTHGUARD_REALTIME_BURST of the API process (0: one FIFO
# realtime queue, as before overflow existed), and the worker processes as in LATENCY_LAYOUTS.
FAIRNESS_LAYOUTS = {
    "one worker, burst 32 (default)": (32, [(8, None, 0)]),
    "one worker, burst 0 (one FIFO queue)": (0, [(8, None, 0)]),
    "realtime worker + all-lanes worker, burst 32": (32, [(4, "realtime,webhooks", 0), (8, None, 0)]),
}

LOG = print


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(port: int, what: str, exited: Callable[[], bool] = lambda: False) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; raise if ``exited()`` or after 30 s."""
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            if exited() or time.monotonic() > deadline:
                raise RuntimeError(f"{what} did not start") from None
            time.sleep(0.05)


# ---------------------------------------------------------------------- images


def photo_like(width: int, height: int, seed: int):  # type: ignore[no-untyped-def]
    """A synthetic photo-like RGB image: smooth colour fields, shapes, sensor-like noise."""
    import numpy as np
    from PIL import Image, ImageDraw, ImageFilter

    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    base = Image.fromarray(low).resize((width, height), Image.BICUBIC)
    draw = ImageDraw.Draw(base)
    for _ in range(12):
        x0, y0 = int(rng.integers(0, width)), int(rng.integers(0, height))
        r = int(rng.integers(width // 30, width // 5))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        if rng.random() < 0.5:
            draw.ellipse((x0 - r, y0 - r, x0 + r, y0 + r), fill=colour)
        else:
            draw.rectangle((x0 - r, y0 - r // 2, x0 + r, y0 + r // 2), fill=colour)
    base = base.filter(ImageFilter.GaussianBlur(radius=max(1, width // 800)))
    arr = np.asarray(base, dtype=np.int16)
    # texture: mid-frequency noise plus per-pixel sensor noise
    tex = rng.normal(0, 10, size=(height // 4, width // 4, 1)).astype(np.float32)
    tex_img = Image.fromarray(np.clip(tex[:, :, 0] + 128, 0, 255).astype(np.uint8)).resize((width, height), Image.BILINEAR)
    arr = arr + (np.asarray(tex_img, dtype=np.int16)[:, :, None] - 128)
    arr = arr + rng.normal(0, 4, size=arr.shape).astype(np.int16)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def make_set(name: str, unique: int) -> list[bytes]:
    width, height, fmt = SETS[name]
    out = []
    for i in range(unique):
        img = photo_like(width, height, seed=zlib.crc32(f"{name}/{i}".encode()))
        buf = io.BytesIO()
        if fmt == "JPEG":
            img.save(buf, "JPEG", quality=92 if width > 2000 else 90)
        else:
            img.save(buf, "PNG", compress_level=6)
        out.append(buf.getvalue())
    return out


# --------------------------------------------------------------------- services


class Proc:
    """A subprocess in its own session, its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], logdir: Path, ready: str | None = None,
                 timeout: float = 180.0) -> None:
        self.name = name
        self.log_path = logdir / f"{name}-{secrets.token_hex(2)}.log"
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(args, env=env, cwd=str(REPO), stdout=self._log, stderr=subprocess.STDOUT,
                                     start_new_session=True)
        if ready:
            deadline = time.monotonic() + timeout
            while ready not in self.log_path.read_text(errors="replace"):
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"{name} did not start:\n{self.log_path.read_text(errors='replace')[-3000:]}")
                time.sleep(0.1)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(40)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
            except ProcessLookupError:
                pass
        self._log.close()


class Env:
    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.procs: list[Proc] = []
        self.pg_url = ""
        self.s3_url = ""
        self.checkpoint = workdir / "model.safetensors"

    def start(self) -> None:
        import boto3
        from sqlalchemy.engine import make_url

        from worker.db import upgrade

        self._reset(create=True)
        self.pg_url = make_url(PG_ADMIN).set(database=PG_DB).render_as_string(hide_password=False)
        upgrade(self.pg_url)

        port = free_port()
        self.s3_url = f"http://127.0.0.1:{port}"
        moto = Proc("moto", [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                    dict(os.environ), self.workdir)
        self.procs.append(moto)
        self.moto = moto
        wait_for_port(port, "moto")
        self.s3 = boto3.client("s3", endpoint_url=self.s3_url)
        self.s3.create_bucket(Bucket="bench")
        self._build_checkpoint()

    def _build_checkpoint(self) -> None:
        import timm
        import torch
        from safetensors.torch import save_file

        torch.manual_seed(1234)
        model = timm.create_model(ARCH, num_classes=2, pretrained=False)
        with torch.no_grad():
            model.classifier.weight.mul_(60.0)  # scores spread over (0, 1), as in tests/conftest.py
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(self.checkpoint))

    def service_env(self, **overrides: object) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            # The checkout first; packages carried onto a machine (bench/gpu_session.sh) stay reachable.
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
            "SYNTHGUARD_DATABASE_URL": self.pg_url,
            "SYNTHGUARD_BROKER_URL": REDIS_URL,
            "SYNTHGUARD_S3_ENDPOINT_URL": self.s3_url,
            "SYNTHGUARD_MODEL_CHECKPOINT": str(self.checkpoint),
            "SYNTHGUARD_DEVICE": DEVICE,
            "SYNTHGUARD_METRICS_PORT": "0",
            "SYNTHGUARD_LOG_FORMAT": "text",
            # The bench measures the pipeline, not the limits in front of it: every limit off.
            "SYNTHGUARD_API_RATE_LIMIT_PER_MINUTE": "0",
            "SYNTHGUARD_API_IMAGE_RATE_LIMIT_PER_MINUTE": "0",
            "SYNTHGUARD_API_ADDRESS_RATE_LIMIT_PER_MINUTE": "0",
            "SYNTHGUARD_CLIENT_MAX_PENDING_REALTIME": "0",
            "SYNTHGUARD_CLIENT_MAX_PENDING_BULK": "0",
            # Each set repeats a few unique images under many keys: the result cache would reuse their
            # results and measure itself, not scoring (bench/bank_cost.py measures the moderation loop).
            "SYNTHGUARD_RESULT_CACHE": "false",
            # A throwaway key: the API and worker refuse PostgreSQL with secrets in plain text.
            "SYNTHGUARD_SECRET_KEY": BENCH_SECRET_KEY,
            "SYNTHGUARD_STALE_AFTER_S": "3600",
        })
        env.update({f"SYNTHGUARD_{k.upper()}": str(v) for k, v in overrides.items()})
        return env

    def stop_all(self) -> None:
        for proc in reversed(self.procs):
            try:
                proc.stop()
            except Exception as exc:  # noqa: BLE001
                LOG(f"  (could not stop {proc.name}: {exc})")
        self.procs.clear()
        try:
            self._reset(create=False)
        except Exception as exc:  # noqa: BLE001
            LOG(f"  (cleanup: {exc})")

    @staticmethod
    def _reset(create: bool) -> None:
        """Empty the bench's Redis db and drop its database (then create it afresh if ``create``)."""
        import redis
        from sqlalchemy import create_engine

        r = redis.Redis.from_url(REDIS_URL)
        r.flushdb()
        r.close()
        admin = create_engine(PG_ADMIN, isolation_level="AUTOCOMMIT")
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{PG_DB}" WITH (FORCE)')
            if create:
                conn.exec_driver_sql(f'CREATE DATABASE "{PG_DB}"')
        admin.dispose()


# --------------------------------------------------------------------- ceilings


def timed_rate(fn, count_per_call: int, min_s: float) -> float:  # type: ignore[no-untyped-def]
    fn()  # warm-up
    calls, t0 = 0, time.perf_counter()
    while True:
        fn()
        calls += 1
        elapsed = time.perf_counter() - t0
        if elapsed >= min_s and calls >= 2:
            return calls * count_per_call / elapsed


def ceilings(env: Env, images: dict[str, list[bytes]], min_s: float) -> dict:
    import torch

    from worker.detector import Detector
    from worker.imaging import decode_image
    from worker.settings import Settings

    settings = Settings(model_checkpoint=str(env.checkpoint), device="cpu", database_url="sqlite://")
    det = Detector.from_settings(settings)
    eager = Detector.from_settings(settings.model_copy(update={"model_freeze_cpu": False}))
    out: dict = {"model": {}, "model_eager": {}, "decode": {}, "decode_pre": {},
                 "torch_threads": torch.get_num_threads()}
    x = torch.randn(3, 224, 224)
    for bs in (1, 4, 8, 32, 64):
        batch = [x] * bs
        # Alternated per batch size, so a slow spell of a shared VM hits both forms alike.
        out["model"][bs] = timed_rate(lambda b=batch: det.predict(b), bs, min_s)
        out["model_eager"][bs] = timed_rate(lambda b=batch: eager.predict(b), bs, min_s)
        LOG(f"  model batch {bs}: {out['model'][bs]:.1f} img/s frozen, {out['model_eager'][bs]:.1f} eager")
    out["frozen_drift"] = frozen_drift(det, eager, images)
    LOG(f"  frozen vs eager p(synthetic): max drift {out['frozen_drift']['max']:.2g} "
        f"over {out['frozen_drift']['images']} images")
    cores = os.cpu_count() or 1
    for name, blobs in images.items():
        def dec(b: bytes) -> None:
            decode_image(b, max_pixels=100_000_000)

        def dec_pre(b: bytes) -> None:
            det.preprocess(decode_image(b, max_pixels=100_000_000).image)

        for key, f in (("decode", dec), ("decode_pre", dec_pre)):
            per_call = len(blobs) * 2
            with ThreadPoolExecutor(cores) as pool:
                rate = timed_rate(lambda f=f, blobs=blobs: list(pool.map(f, blobs * 2)), per_call, min_s)
            out[key][name] = rate
        LOG(f"  {name}: decode {out['decode'][name]:.1f} img/s, decode+preprocess {out['decode_pre'][name]:.1f} img/s")
    out["model_best"] = max(out["model"].values())
    out["model_best_batch"] = max(out["model"], key=out["model"].get)
    return out


def fixture_files(fixtures: Path) -> list[Path]:
    """The shared fixtures that are images meant to score (not the broken ones, READMEs or licences)."""
    return [path for folder in ("real", "generated", "c2pa", "formats") for path in sorted((fixtures / folder).glob("*"))
            if path.suffix.lower() not in ("", ".md") and not path.name.startswith("LICENSE")]


def frozen_drift(det, eager, images: dict[str, list[bytes]]) -> dict:  # type: ignore[no-untyped-def]
    """How far the frozen CPU model's scores are from the eager model's: the fixtures that decode and the sets."""
    from worker.errors import PermanentError
    from worker.imaging import decode_image

    blobs = [p.read_bytes() for p in fixture_files(FIXTURES)]
    blobs += [b for bs in images.values() for b in bs]
    pixels = []
    for blob in blobs:
        try:
            pixels.append(det.preprocess(decode_image(blob, max_pixels=100_000_000).image))
        except PermanentError:
            continue  # a format this build cannot decode
    drift = [abs(a - b) for a, b in zip(det.predict(pixels), eager.predict(pixels), strict=True)]
    return {"images": len(drift), "max": max(drift), "mean": statistics.mean(drift)}


# ------------------------------------------------------------------ S3 lever


def s3_lever(env: Env, keys: dict[str, list[str]], min_s: float) -> dict:
    """Fetch rate from the S3 server: the service's one shared client vs a new client per object."""
    import threading

    import boto3

    from worker.settings import Settings
    from worker.storage import ObjectRef, Storage

    settings = Settings(s3_endpoint_url=env.s3_url, database_url="sqlite://")
    shared = Storage(settings)
    # A session per thread (sessions are not thread-safe), its service models loaded once:
    # what is left per object is the client and its connection.
    local = threading.local()

    def new_client_per_object(ref: ObjectRef) -> bytes:
        if not hasattr(local, "session"):
            local.session = boto3.session.Session()
        client = local.session.client("s3", endpoint_url=env.s3_url)
        try:
            return client.get_object(Bucket=ref.bucket, Key=ref.key)["Body"].read()
        finally:
            client.close()

    ways = {
        "one shared client, pooled connections (the service)": shared.fetch,
        "a new client and connection per object": new_client_per_object,
    }
    out: dict = {"threads": 8, "rates": {}}
    for name in ("jpeg-1024", "jpeg-12mp"):
        refs = [ObjectRef("bench", key) for key in keys[name][:64]]
        rates = out["rates"][name] = {}
        for way, fetch in ways.items():
            with ThreadPoolExecutor(out["threads"]) as pool:
                list(pool.map(fetch, refs[:8]))
                rates[way] = timed_rate(lambda f=fetch, r=refs: list(pool.map(f, r)), len(refs), min_s)
            LOG(f"  {name}, {way}: {rates[way]:.1f} objects/s")
    shared.close()
    return out


# ------------------------------------------------------------------ DCT lever


def dct_lever(env: Env, images: dict[str, list[bytes]], min_s: float) -> dict:
    """Pillow draft (libjpeg DCT scaling to >= the resize size) vs the service decode: speed and drift."""
    from PIL import Image, ImageOps

    from worker.detector import Detector
    from worker.imaging import decode_image
    from worker.settings import Settings

    det = Detector.from_settings(Settings(model_checkpoint=str(env.checkpoint), device="cpu", database_url="sqlite://"))
    short = round(det.data_config["input_size"][-1] / det.data_config.get("crop_pct", 1.0))

    def draft(b: bytes):  # type: ignore[no-untyped-def]
        im = Image.open(io.BytesIO(b))
        im.draft("RGB", (short, short))
        return ImageOps.exif_transpose(im.convert("RGB"))

    def ref(b: bytes):  # type: ignore[no-untyped-def]
        return decode_image(b, max_pixels=100_000_000).image

    out: dict = {"speed": {}, "drift": {}, "short_side": short}
    cores = os.cpu_count() or 1
    for name, blobs in images.items():
        if SETS[name][2] != "JPEG":
            continue
        rates = {}
        for label, f in (("reference", ref), ("draft", draft)):
            with ThreadPoolExecutor(cores) as pool:
                rates[label] = timed_rate(
                    lambda f=f, blobs=blobs: list(pool.map(lambda b: det.preprocess(f(b)), blobs * 2)),
                    len(blobs) * 2,
                    min_s,
                )
        out["speed"][name] = rates
        LOG(f"  {name}: decode+preprocess reference {rates['reference']:.1f} img/s, draft {rates['draft']:.1f} img/s")
    fixture_jpegs = sorted(p for p in FIXTURES.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg") and p.parent.name != "bad")
    samples = [(p.parent.name + "/" + p.name, p.read_bytes()) for p in fixture_jpegs]
    for name, blobs in images.items():
        if SETS[name][2] == "JPEG":
            samples += [(f"synthetic {name} #{i}", b) for i, b in enumerate(blobs)]
    import torch

    def margin(x):  # type: ignore[no-untyped-def]
        with torch.inference_mode():
            logits = det.model(det.normalise(x.unsqueeze(0)))[0]
        return float(logits[det.ai_index] - logits[1 - det.ai_index])

    for label, blob in samples:
        try:
            xa, xb = det.preprocess(ref(blob)), det.preprocess(draft(blob))
            a, b = det.predict([xa])[0], det.predict([xb])[0]
            out["drift"][label] = (a, b, margin(xa), margin(xb))
        except Exception as exc:  # noqa: BLE001
            out["drift"][label] = (None, f"{type(exc).__name__}")
    return out


# ------------------------------------------------------------------- pipelines


def upload(env: Env, prefix: str, blobs: list[bytes], n: int, ext: str) -> list[str]:
    keys = [f"{prefix}/{i:05d}.{ext}" for i in range(n)]

    def put(i: int) -> None:
        env.s3.put_object(Bucket="bench", Key=keys[i], Body=blobs[i % len(blobs)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(n)))
    return keys


class Api:
    """A real `synthguard api` process (settings overrides as Env.service_env's) and a client of it."""

    def __init__(self, env: Env, name: str = "bench", **overrides: object) -> None:
        import httpx

        from worker.db import get_sessionmaker

        self.sessions = get_sessionmaker(env.pg_url)
        self.env = env
        port = free_port()
        self.proc = Proc("api", [sys.executable, "-m", "worker.cli", "api", "--port", str(port)],
                         env.service_env(**overrides), env.workdir)
        env.procs.append(self.proc)
        self.base = f"http://127.0.0.1:{port}"
        self.http = self.add_client(name)
        deadline = time.monotonic() + 60
        while True:
            try:
                if self.http.get("/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline or self.proc.proc.poll() is not None:
                raise RuntimeError(f"api did not start:\n{self.proc.log_path.read_text(errors='replace')[-3000:]}")
            time.sleep(0.1)

    def close(self) -> None:
        self.http.close()
        self.proc.stop()
        self.env.procs.remove(self.proc)

    def add_client(self, name: str):  # type: ignore[no-untyped-def]
        """A new API client (every bucket, the default lanes and limits) and an HTTP client with its key."""
        import httpx

        from worker.clients import create_client

        with self.sessions.begin() as session:
            key = create_client(session, name, all_buckets=True).api_key
        return httpx.Client(base_url=self.base, timeout=120, headers={"Authorization": f"Bearer {key}"})

    def scan(self, keys: list[str], priority: str, http=None) -> str:  # type: ignore[no-untyped-def]
        ids = []
        for i in range(0, len(keys), 1000):
            resp = (http or self.http).post(
                "/v1/scans", json={"objects": [{"bucket": "bench", "key": k} for k in keys[i:i + 1000]],
                                   "priority": priority})
            resp.raise_for_status()
            ids.append(resp.json()["id"])
        return ",".join(ids)

    def progress(self, scan_ids: list[str]) -> tuple[int, int, datetime | None]:
        from sqlalchemy import text

        with self.sessions() as session:
            row = session.execute(text(
                "SELECT count(*) FILTER (WHERE state IN ('done','failed')), count(*) FILTER (WHERE state='failed'), "
                "max(completed_at) FROM images WHERE scan_id = ANY(CAST(:ids AS uuid[]))"),
                {"ids": scan_ids}).one()
        return int(row[0]), int(row[1]), row[2]

    def wait(self, scan_ids: list[str], n: int, timeout: float = 1800) -> tuple[int, datetime | None]:
        deadline = time.monotonic() + timeout
        while True:
            done, failed, last = self.progress(scan_ids)
            if done >= n:
                return failed, last
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out: {done}/{n} done")
            time.sleep(0.1)

    def latencies(self, scan_ids: list[str]) -> list[float]:
        from sqlalchemy import text

        with self.sessions() as session:
            rows = session.execute(text(
                "SELECT extract(epoch FROM completed_at - created_at) FROM images "
                "WHERE scan_id = ANY(CAST(:ids AS uuid[])) AND completed_at IS NOT NULL"), {"ids": scan_ids}).all()
        return [float(r[0]) for r in rows]


def start_worker(env: Env, concurrency: int, batch_size: int, torch_threads: int | None = None,
                 node: int = 0, queues: str | None = None, nice: int = 0, frozen: bool = True,
                 prepare: int | None = None, s3_client: str = "botocore", standby: int | None = None,
                 device_decode: bool = False) -> Proc:
    port = free_port()
    proc_env = env.service_env(concurrency=concurrency, batch_size=batch_size, metrics_port=port,
                               model_freeze_cpu=str(frozen).lower(),
                               prepare_processes="auto" if prepare is None else prepare, s3_client=s3_client,
                               device_decode=str(device_decode).lower())
    if standby is not None:
        proc_env["SYNTHGUARD_REALTIME_STANDBY"] = str(standby)
    if torch_threads:
        # torch sizes its intra-op pool from OMP_NUM_THREADS at start (default: one per core).
        proc_env["OMP_NUM_THREADS"] = str(torch_threads)
    args = [sys.executable, "-m", "worker.cli", "worker", "--loglevel=INFO", f"--hostname=bench{node}@%h"]
    if queues:
        args.append(f"--queues={queues}")
    if nice:
        args = ["nice", "-n", str(nice), *args]
    proc = Proc(f"worker{node}-c{concurrency}-b{batch_size}", args, proc_env, env.workdir, ready=" ready.")
    proc.metrics_url = f"http://127.0.0.1:{port}/metrics"  # type: ignore[attr-defined]
    env.procs.append(proc)
    return proc


def scrape(worker: Proc) -> dict[str, float]:
    """Sums and counts of the worker's stage and batch histograms (its Prometheus /metrics)."""
    import httpx

    out: dict[str, float] = {}
    try:
        text_ = httpx.get(worker.metrics_url, timeout=10).text  # type: ignore[attr-defined]
    except Exception:  # noqa: BLE001
        return out
    for line in text_.splitlines():
        if line.startswith("synthguard_stage_seconds_sum") or line.startswith("synthguard_stage_seconds_count"):
            name, value = line.rsplit(" ", 1)
            stage_ = name.split('stage="')[1].split('"')[0]
            out[("sum:" if "_sum" in name else "count:") + stage_] = float(value)
        elif line.startswith("synthguard_batch_size_sum ") or line.startswith("synthguard_batch_size_count "):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def scrape_all(workers: list[Proc]) -> dict[str, float]:
    out: dict[str, float] = {}
    for worker in workers:
        for key, value in scrape(worker).items():
            out[key] = out.get(key, 0.0) + value
    return out


def run_synthguard(env: Env, api: Api, worker: Proc | list[Proc], keys: list[str], warm_keys: list[str],
                   http=None) -> dict:  # type: ignore[no-untyped-def]
    """The images of ``keys`` through the service, as the API client of ``http`` (the API's own by default)."""
    workers = worker if isinstance(worker, list) else [worker]
    ids = api.scan(warm_keys, "bulk", http).split(",")
    api.wait(ids, len(warm_keys))
    before = scrape_all(workers)
    meter = procstat.Meter([w.pid for w in workers])
    t0 = datetime.now(UTC)
    scan_ids = api.scan(keys, "bulk", http).split(",")
    failed, last = api.wait(scan_ids, len(keys))
    stats = meter.stop()
    after = scrape_all(workers)
    elapsed = (last - t0).total_seconds() if last else float("nan")
    stages = {k: after[k] - before.get(k, 0.0) for k in after}
    return {"n": len(keys), "failed": failed, "seconds": elapsed, "rate": len(keys) / elapsed, "stages": stages, **stats}


def fill_bank(api: Api, name: str, hashes: int) -> None:
    """Give client ``name`` a bank of ``hashes`` uniformly random hashes (as an import would), in SQL."""
    from sqlalchemy import text

    with api.sessions.begin() as session:
        # One change of the bank (worker.hashbank's versions), which every row carries.
        session.execute(text("INSERT INTO bank_versions (bank, version) SELECT id, 1 FROM api_clients WHERE name = :name"),
                        {"name": name})
        session.execute(text(
            "INSERT INTO hash_bank (id, client_id, hash, quality, source, created_at, updated_at, version) "
            "SELECT gen_random_uuid(), c.id, md5(random()::text) || md5(random()::text), 100, 'import', now(), now(), 1 "
            "FROM api_clients c, generate_series(1, :n) WHERE c.name = :name"), {"n": hashes, "name": name})


def bank_stage(env: Env, api: Api, keys: list[str], warm: list[str], hashes: int) -> dict:
    """One worker, the same images as a client with an empty bank and as one with ``hashes``, alternated."""
    clients = {"empty": api.add_client("bank-empty"), "full": api.add_client("bank-full")}
    started = time.monotonic()
    fill_bank(api, "bank-full", hashes)
    out: dict = {"hashes": hashes, "fill_s": time.monotonic() - started, "runs": []}
    worker = start_worker(env, 8, 32)
    try:
        for bank in ("empty", "full", "empty", "full"):
            # The warm-up images load the client's bank into the worker first.
            r = run_synthguard(env, api, worker, keys, warm, http=clients[bank])
            out["runs"].append({"bank": bank, **r})
            LOG(f"  bank {bank}: {r['rate']:.2f} img/s, worker CPU {worker_cpu_ms(r):.1f} ms per image")
    finally:
        worker.stop()
        env.procs.remove(worker)
    return out


def run_naive(env: Env, sets: dict[str, list[str]], warm_keys: list[str]) -> dict:
    import psycopg

    os.environ["BENCH_DATABASE_URL"] = env.pg_url
    os.environ["BENCH_BROKER_URL"] = REDIS_URL
    from bench import naive

    naive.app.conf.broker_url = REDIS_URL
    naive.ensure_table()
    cores = os.cpu_count() or 1
    nenv = env.service_env()
    nenv.update({"BENCH_BROKER_URL": REDIS_URL, "BENCH_DATABASE_URL": env.pg_url, "BENCH_S3_ENDPOINT_URL": env.s3_url,
                 "BENCH_CHECKPOINT": str(env.checkpoint), "BENCH_TORCH_THREADS": "1"})
    worker = Proc("naive", [sys.executable, "-m", "celery", "-A", "bench.naive", "worker", "-P", "prefork",
                            "-c", str(cores), "-Q", naive.QUEUE, "--loglevel=INFO", "--without-gossip",
                            "--without-mingle"], nenv, env.workdir, ready=" ready.")
    env.procs.append(worker)
    dsn = env.pg_url.replace("postgresql+psycopg://", "postgresql://")

    def count(run: str) -> tuple[int, int, datetime | None]:
        with psycopg.connect(dsn) as conn:
            row = conn.execute("SELECT count(*), count(error), max(completed_at) FROM bench_naive_results WHERE run=%s",
                               (run,)).fetchone()
        return int(row[0]), int(row[1]), row[2]

    def go(run: str, keys: list[str]) -> tuple[int, datetime | None]:
        for k in keys:
            naive.app.send_task("bench.naive.score", args=[run, "bench", k], queue=naive.QUEUE)
        while True:
            n, errors, last = count(run)
            if n >= len(keys):
                return errors, last
            time.sleep(0.1)

    out = {}
    try:
        go("warmup", warm_keys * cores)
        for name, keys in sets.items():
            meter = procstat.Meter([worker.pid])
            t0 = datetime.now(UTC)
            errors, last = go(name, keys)
            stats = meter.stop()
            elapsed = (last - t0).total_seconds()
            out[name] = {"n": len(keys), "failed": errors, "seconds": elapsed, "rate": len(keys) / elapsed, **stats}
            LOG(f"  naive {name}: {out[name]['rate']:.2f} img/s ({len(keys)} images, {elapsed:.1f}s)")
    finally:
        worker.stop()
        env.procs.remove(worker)
    return out


def probe_under_load(api: Api, probe_keys: list[str], load_keys: list[str], load_priority: str, load: str,
                     probes: int, interval: float, prober=None) -> dict:  # type: ignore[no-untyped-def]
    """Realtime probes one at a time (as ``prober``, default the Api's own client), idle and then while
    ``load_keys`` are queued on ``load_priority``; the load is named ``load`` in the result's keys."""
    def probe(keys: list[str]) -> list[str]:
        ids = []
        for k in keys:
            ids.append(api.scan([k], "realtime", prober))
            time.sleep(interval)
        return ids

    idle_ids = probe(probe_keys[:probes])
    api.wait(idle_ids, probes)
    t0 = datetime.now(UTC)
    load_ids = api.scan(load_keys, load_priority).split(",")
    time.sleep(1.0)
    busy_ids = probe(probe_keys[probes:2 * probes])
    done_at_last_probe, _, _ = api.progress(load_ids)
    api.wait(busy_ids, probes)
    _, last = api.wait(load_ids, len(load_keys))
    return {"idle": api.latencies(idle_ids), "busy": api.latencies(busy_ids), f"{load}_n": len(load_keys),
            f"{load}_done_at_last_probe": done_at_last_probe, f"{load}_s": (last - t0).total_seconds()}


def fairness(env: Env, burst: int, specs: list[tuple[int, str | None, int]], warm: list[str],
             probe_keys: list[str], flood_keys: list[str], probes: int, interval: float) -> dict:
    """Client beta's realtime latency idle and while client alpha floods the realtime lane."""
    api = Api(env, name=f"alpha-{secrets.token_hex(3)}", realtime_burst=burst)
    beta = api.add_client(f"beta-{secrets.token_hex(3)}")
    workers = [start_worker(env, conc, 32, node=i, queues=queues, nice=nice)
               for i, (conc, queues, nice) in enumerate(specs)]
    try:
        api.wait(api.scan(warm, "bulk").split(","), len(warm))
        api.wait([api.scan([key], "realtime", beta) for key in warm[:4]], 4)
        return probe_under_load(api, probe_keys, flood_keys, "realtime", "flood", probes, interval, beta)
    finally:
        for proc in [*workers, api.proc]:
            proc.stop()
            env.procs.remove(proc)


# --------------------------------------------------------------------- report


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    k = (len(s) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def table(headers: list[str], rows: list[list[object]]) -> str:
    def fmt(v: object) -> str:
        if isinstance(v, float):
            return f"{v:.2f}" if abs(v) < 100 else f"{v:.0f}"
        return str(v)

    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(fmt(v) for v in r) + " |" for r in rows]
    return "\n".join(lines)


def machine() -> str:
    import timm
    import torch

    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    mem = 0
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            mem = int(line.split()[1]) // 1024
    return (f"{os.cpu_count()} CPU cores ({model}), {mem / 1024:.1f} GiB memory, Linux {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"timm {timm.__version__}; no GPU")


def main() -> int:
    global DEVICE, SETS
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="few images: a smoke run of every stage")
    parser.add_argument("--output", default=str(REPO / "bench" / "last_run.md"), help="markdown tables written here")
    parser.add_argument("--skip", default="", help="comma-separated stages to skip: ceilings,s3,naive,synthguard,levers,latency,fairness,dct,bank")
    parser.add_argument("--backfill", type=int, default=0,
                        help="images in the latency stage's bulk backfill (default 1000; the issue's 10000 takes "
                             "about 5 minutes per layout on 2 cores)")
    parser.add_argument("--levers", default=None,
                        help="the levers stage's worker configurations instead of the size's own: ';'-separated, "
                             "each ','-separated Lever fields, e.g. 'prepare=0;prepare=2,threads=1' (repeat one to "
                             "alternate runs)")
    parser.add_argument("--layouts", default=None,
                        help="the latency stage's layouts by number, comma-separated (0: one worker for every lane, "
                             "1: the compose layout, 2: a bulk worker at nice 10, 3: one worker for every "
                             "lane with no thread standing by); default all")
    parser.add_argument("--probes", type=int, default=0,
                        help="realtime probes per layout and condition in the latency and fairness stages "
                             "(default 20; more narrow the p95)")
    parser.add_argument("--bulk-chunk", type=int, default=0,
                        help="SYNTHGUARD_BULK_CHUNK of the API that publishes every stage's images (default: "
                             "the service's)")
    parser.add_argument("--device", default="cpu",
                        help="SYNTHGUARD_DEVICE of the workers it starts (cuda on a GPU host); the naive "
                             "baseline and the ceilings stay on the CPU")
    parser.add_argument("--scale", type=int, default=1,
                        help="images per set in the throughput stages times this (a GPU host scores the "
                             "default 500 1024 JPEGs in about a second)")
    parser.add_argument("--sets", default=",".join(SETS),
                        help="comma-separated image sets (jpeg-1024 always: the warm-up and the levers use it)")
    args = parser.parse_args()
    DEVICE = args.device
    wanted = {"jpeg-1024", *filter(None, args.sets.split(","))}
    if wanted - set(SETS):
        parser.error(f"--sets: unknown {', '.join(sorted(wanted - set(SETS)))}; sets: {', '.join(SETS)}")
    SETS = {name: shape for name, shape in SETS.items() if name in wanted}
    size = dict(SIZES["quick" if args.quick else "full"])
    size["n"] = {name: n * max(1, args.scale) for name, n in size["n"].items()}
    if args.backfill:
        size["backfill"] = args.backfill
    if args.probes:
        size["probes"] = args.probes
    if args.levers:
        size["levers"] = [parse_lever(text) for text in args.levers.split(";")]
    skip = set(filter(None, args.skip.split(",")))
    names = list(LATENCY_LAYOUTS)
    layouts = ({names[int(i)]: LATENCY_LAYOUTS[names[int(i)]] for i in args.layouts.split(",")}
               if args.layouts else LATENCY_LAYOUTS)
    started = time.monotonic()
    res: dict = {"size": "quick" if args.quick else "full", "date": datetime.now(UTC).isoformat(timespec="seconds"),
                 "machine": machine(), "cores": os.cpu_count(), "errors": {}, "device": DEVICE,
                 "images": size["n"]}
    LOG(f"synthguard bench ({res['size']}) on {res['machine']}")
    workdir = Path(tempfile.mkdtemp(prefix="synthguard-bench-"))
    env = Env(workdir)

    def stage(name: str, fn):  # type: ignore[no-untyped-def]
        if name in skip:
            res["errors"][name] = "skipped (--skip)"
            return None
        LOG(f"\n== {name} ({time.monotonic() - started:.0f}s in)")
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - the rest of the bench still runs
            import traceback

            traceback.print_exc()
            res["errors"][name] = f"{type(exc).__name__}: {exc}"
            return None

    try:
        LOG("setting up: redis db 10, postgres db synthguard_bench, moto S3, checkpoint")
        env.start()
        LOG("generating images")
        images = {name: make_set(name, size["unique"]) for name in SETS}
        for name, blobs in images.items():
            LOG(f"  {name}: {len(blobs)} unique, mean {statistics.mean(len(b) for b in blobs) / 1e6:.2f} MB")
        res["image_bytes"] = {n: statistics.mean(len(b) for b in blobs) for n, blobs in images.items()}
        keys = {name: upload(env, name, images[name], size["n"][name], SETS[name][2].lower()) for name in SETS}
        warm = upload(env, "warm", images["jpeg-1024"], 8, "jpeg")
        res["ceilings"] = stage("ceilings", lambda: ceilings(env, images, size["ceiling_s"]))
        res["s3"] = stage("s3", lambda: s3_lever(env, keys, size["ceiling_s"]))
        res["dct"] = stage("dct", lambda: dct_lever(env, images, size["ceiling_s"]))
        res["naive"] = stage("naive", lambda: run_naive(env, keys, warm[:2]))
        api_overrides = {"bulk_chunk": args.bulk_chunk} if args.bulk_chunk else {}
        api = stage("api", lambda: Api(env, **api_overrides))
        if api is not None:
            def sg() -> dict:
                out = {}
                worker = start_worker(env, 8, 32)
                try:
                    for name in SETS:
                        out[name] = run_synthguard(env, api, worker, keys[name], warm)
                        LOG(f"  synthguard {name}: {out[name]['rate']:.2f} img/s ({out[name]['n']} images, "
                            f"{out[name]['seconds']:.1f}s, {out[name]['failed']} failed)")
                finally:
                    worker.stop()
                    env.procs.remove(worker)
                return out

            res["synthguard"] = stage("synthguard", sg)

            def levers() -> dict:
                out = {}
                lever_keys = keys["jpeg-1024"]
                for lever in size["levers"]:
                    workers = [start_worker(env, lever.concurrency, lever.batch_size, lever.threads, node=i,
                                            frozen=lever.frozen, prepare=lever.prepare,
                                            s3_client="obstore" if lever.obstore else "botocore",
                                            device_decode=lever.devdecode)
                               for i in range(lever.processes)]
                    # The chunk is the publisher's setting: its own API process publishes this lever's images.
                    lever_api = api if lever.chunk is None else Api(env, f"chunk-{len(out)}", bulk_chunk=lever.chunk)
                    try:
                        r = run_synthguard(env, lever_api, workers, lever_keys, warm)
                    finally:
                        for worker in workers:
                            worker.stop()
                            env.procs.remove(worker)
                        if lever_api is not api:
                            lever_api.close()
                    # A configuration listed again (alternating runs) keeps every run.
                    key, run = lever.key, 1
                    while key in out:
                        run += 1
                        key = f"{lever.key} (run {run})"
                    out[key] = r
                    LOG(f"  {lever}: {r['rate']:.2f} img/s")
                return out

            res["levers"] = stage("levers", levers)

            def lat() -> dict:
                rt = upload(env, "rt", images["jpeg-1024"], 2 * size["probes"], "jpeg")
                backfill = upload(env, "backfill", images["jpeg-1024"], size["backfill"], "jpeg")
                out = {}
                for layout, specs in layouts.items():
                    workers = [start_worker(env, spec[0], 32, node=i, queues=spec[1], nice=spec[2],
                                            standby=spec[3] if len(spec) > 3 else None)
                               for i, spec in enumerate(specs)]
                    try:
                        ids = api.scan(warm, "bulk").split(",")
                        api.wait(ids, len(warm))
                        ids = [api.scan([key], "realtime") for key in warm[:4]]
                        api.wait(ids, len(ids))
                        r = probe_under_load(api, rt, backfill, "bulk", "backfill", size["probes"], size["interval"])
                    finally:
                        for worker in workers:
                            worker.stop()
                            env.procs.remove(worker)
                    out[layout] = r
                    LOG(f"  {layout}: idle p50 {pct(r['idle'], .5):.3f}s p95 {pct(r['idle'], .95):.3f}s; "
                        f"under backfill p50 {pct(r['busy'], .5):.3f}s p95 {pct(r['busy'], .95):.3f}s; "
                        f"backfill {r['backfill_s']:.1f}s")
                return out

            res["latency"] = stage("latency", lat)

            def fair() -> dict:
                probe_keys = upload(env, "fair", images["jpeg-1024"], 2 * size["probes"], "jpeg")
                flood_keys = upload(env, "flood", images["jpeg-1024"], size["flood"], "jpeg")
                out = {}
                for name, (burst, specs) in FAIRNESS_LAYOUTS.items():
                    r = fairness(env, burst, specs, warm, probe_keys, flood_keys, size["probes"], size["interval"])
                    out[name] = r
                    LOG(f"  {name}: beta idle p95 {pct(r['idle'], .95):.3f}s, under alpha's flood p95 "
                        f"{pct(r['busy'], .95):.3f}s; flood {r['flood_s']:.1f}s")
                return out

            res["fairness"] = stage("fairness", fair)
            res["bank"] = stage("bank", lambda: bank_stage(env, api, keys["jpeg-1024"], warm, size["bank"]))
    finally:
        env.stop_all()
        shutil.rmtree(workdir, ignore_errors=True)
    res["total_s"] = time.monotonic() - started
    Path(args.output).with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    report = render(res)
    print("\n" + report)
    Path(args.output).write_text(report + "\n")
    print(f"\nwritten: {args.output} (and .json)")
    return 0


def worker_cpu_ms(r: dict) -> float:
    """CPU milliseconds the worker's process tree spent per image scored."""
    return 10.0 * r["proc_cpu_pct"] / r["rate"]


def render(res: dict) -> str:
    out = [f"Run: `{res['size']}`, {res['date']}, {res['total_s']:.0f}s. Machine: {res['machine']}. "
           f"Workers on `{res.get('device', 'cpu')}`.", ""]
    c = res.get("ceilings")
    if c:
        eager = c.get("model_eager", {})
        out += ["### Ceilings (bench process alone, all cores)", "",
                table(["model forward (Detector.predict, ready 224x224 tensors)", "frozen img/s (the CPU default)",
                       "eager img/s (SYNTHGUARD_MODEL_FREEZE_CPU=false)", "frozen/eager"],
                      [[f"batch {bs}", r, eager.get(bs, "-"), r / eager[bs] if bs in eager else "-"]
                       for bs, r in c["model"].items()]), ""]
        if c.get("frozen_drift"):
            fd = c["frozen_drift"]
            out += [f"Frozen against eager p(synthetic), {fd['images']} images (fixtures that decode, and the sets): "
                    f"max drift {fd['max']:.2g}, mean {fd['mean']:.2g}.", ""]
        out += [table(["set", "decode img/s", "decode+preprocess img/s", "bound = 1/(1/model+1/(decode+pre)) img/s"],
                      [[n, c["decode"][n], c["decode_pre"][n], bound(c, n)] for n in c["decode"]]), ""]
    s3 = res.get("s3")
    if s3:
        ways = list(next(iter(s3["rates"].values())))
        out += [f"### S3 fetch from the moto server (bench process, {s3['threads']} threads), objects/s", "",
                table(["set", *ways], [[n, *(r[w] for w in ways)] for n, r in s3["rates"].items()]), ""]
    sg, nv = res.get("synthguard") or {}, res.get("naive") or {}
    if sg or nv:
        rows = []
        for n in SETS:
            s, v = sg.get(n), nv.get(n)
            b = bound(c, n) if c else float("nan")
            rows.append([n, (s or v)["n"] if s or v else "-", v["rate"] if v else "-", s["rate"] if s else "-",
                         (s["rate"] / v["rate"]) if s and v else "-", (s["rate"] / b) if s and c else "-",
                         f"{s['proc_cpu_pct']:.0f}% / {s['machine_busy_pct']:.0f}%" if s else "-",
                         f"{v['proc_cpu_pct']:.0f}% / {v['machine_busy_pct']:.0f}%" if v else "-",
                         f"{s['peak_rss_mib']:.0f}" if s else "-", f"{v['peak_rss_mib']:.0f}" if v else "-"])
        out += ["### Throughput (first enqueue to last stored row)", "",
                table(["set", "images", "naive img/s", "synthguard img/s", "synthguard/naive", "synthguard/bound",
                       "synthguard CPU (worker / machine)", "naive CPU (workers / machine)",
                       "synthguard peak RSS MiB", "naive peak RSS MiB (sum of processes)"], rows), ""]
        fails = {f"{k} {n}": r["failed"] for k, d in (("synthguard", sg), ("naive", nv)) for n, r in d.items() if r["failed"]}
        if fails:
            out += [f"Failed images: {fails}", ""]
    if sg:
        cores = res.get("cores") or os.cpu_count() or 1
        rows = []
        for n, r in sg.items():
            if not c:  # no ceilings (skipped, as on a GPU host): the worker's CPU per image alone
                rows.append([n, f"{worker_cpu_ms(r):.1f}", "-", "-"])
                continue
            # The ceilings ran with every core busy: the bound's CPU per image is cores / its rate.
            bound_ms = 1000.0 * cores / bound(c, n)
            rows.append([n, f"{worker_cpu_ms(r):.1f}", f"{bound_ms:.1f}", f"{worker_cpu_ms(r) / bound_ms:.2f}"])
        out += ["### Worker CPU per image against the bound's (decode + preprocess + forward)", "",
                table(["set", "worker CPU ms per image (process tree)", "decode + preprocess + forward CPU ms",
                       "ratio"], rows), ""]
    if sg:
        names = ["fetch", "decode", "provenance", "hash", "preprocess", "queue_wait", "forward", "match", "store"]
        rows = []
        for n, r in sg.items():
            st = r.get("stages") or {}
            cnt = st.get("count:decode") or r["n"]
            row = [n]
            for stg in names:
                if stg == "forward":
                    row.append(f"{1000 * st.get('sum:forward', float('nan')) / max(1.0, r['n']):.1f}")
                else:
                    row.append(f"{1000 * st.get('sum:' + stg, float('nan')) / cnt:.1f}")
            bc = st.get("synthguard_batch_size_count", 0)
            row.append(f"{st.get('synthguard_batch_size_sum', 0) / bc:.1f}" if bc else "-")
            row.append(f"{r['seconds'] * 1000 / r['n']:.1f}")
            rows.append(row)
        out += ["### synthguard worker stages (its /metrics; ms per image, wall time inside each stage, threads overlap)", "",
                table(["set", *names, "mean batch", "wall ms per image (1/throughput)"], rows), "",
                "forward = forward-pass seconds per image (per batch time / images). Stage times are wall-clock and "
                "concurrent threads overlap, so they add up to more than 1/throughput.", ""]
    lv = res.get("levers")
    if lv:
        rows = [[*k.split(" (run")[0].split(",")[:6], ",".join(k.split(" (run")[0].split(",")[6:]) or "-",
                 r["rate"], f"{r['proc_cpu_pct']:.0f}%", f"{worker_cpu_ms(r):.1f}", f"{r['peak_rss_mib']:.0f}"]
                for k, r in lv.items()]
        if sg.get("jpeg-1024"):
            r = sg["jpeg-1024"]
            rows.insert(0, ["8 (default)", "32 (default)", "default (the worker's choice)", "1", "frozen (default)",
                            "auto (default: one per core)", "-", r["rate"], f"{r['proc_cpu_pct']:.0f}%",
                            f"{worker_cpu_ms(r):.1f}", f"{r['peak_rss_mib']:.0f}"])
        out += ["### Levers (jpeg-1024 set)", "", table(["SYNTHGUARD_CONCURRENCY", "SYNTHGUARD_BATCH_SIZE",
                                                         "torch threads (OMP_NUM_THREADS)", "worker processes",
                                                         "CPU model (SYNTHGUARD_MODEL_FREEZE_CPU)",
                                                         "SYNTHGUARD_PREPARE_PROCESSES",
                                                         "other (S3 client, SYNTHGUARD_BULK_CHUNK, SYNTHGUARD_DEVICE_DECODE)", "img/s",
                                                         "worker CPU (process tree)", "worker CPU ms per image",
                                                         "worker peak RSS MiB (sum of processes)"], rows), ""]
    la = res.get("latency")
    if la:
        rows = probe_rows(la, "backfill")
        out += ["### Realtime latency, enqueue (row created) to stored (jpeg-1024)", "",
                "Each layout: probes while idle, then the same number while a bulk backfill runs "
                f"({next(iter(la.values()))['backfill_n']} images).", "",
                table(["workers", "probes", "idle p50 s", "idle p95 s", "busy p50 s", "busy p95 s", "busy max s",
                       "p95 busy/idle", "backfill s", "backfill done at last probe"], rows), ""]
    fa = res.get("fairness")
    if fa:
        rows = probe_rows(fa, "flood")
        out += ["### One client's realtime flood: another client's realtime latency (jpeg-1024)", "",
                "Client beta sends one realtime image at a time, idle and then while client alpha has "
                f"{next(iter(fa.values()))['flood_n']} realtime images queued (one request per 1000). "
                "Burst: SYNTHGUARD_REALTIME_BURST of the API.", "",
                table(["configuration", "probes", "idle p50 s", "idle p95 s", "flood p50 s", "flood p95 s",
                       "flood max s", "p95 flood/idle", "flood s", "flood done at last probe"], rows), ""]
    bk = res.get("bank")
    if bk:
        rows = []
        for r in bk["runs"]:
            st = r.get("stages") or {}
            match_ms = 1000 * st.get("sum:match", float("nan")) / max(1.0, st.get("count:match", 0.0))
            rows.append([r["bank"] if r["bank"] == "empty" else f"{bk['hashes']:,} hashes", r["rate"],
                         f"{worker_cpu_ms(r):.1f}", f"{match_ms:.2f}", f"{r['peak_rss_mib']:.0f}"])
        out += [f"### A worker against an empty bank and one of {bk['hashes']:,} hashes, alternated (jpeg-1024)", "",
                f"Hashes uniformly random, put in the bank in SQL ({bk['fill_s']:.0f}s); the warm-up images of "
                "each run load the client's bank into the worker.", "",
                table(["bank", "img/s", "worker CPU ms per image", "match ms per image (its stage)",
                       "worker peak RSS MiB"], rows), ""]
    d = res.get("dct")
    if d:
        out += [f"### JPEG DCT-scaled decode (Pillow draft to >= {d['short_side']}px short side), not a service default", "",
                table(["set", "reference decode+preprocess img/s", "draft decode+preprocess img/s", "speed-up"],
                      [[n, r["reference"], r["draft"], r["draft"] / r["reference"]] for n, r in d["speed"].items()]), ""]
        vals = [(k, v) for k, v in d["drift"].items() if len(v) == 4]
        rows = [[k, f"{a:.4f}", f"{b:.4f}", f"{abs(a - b):.4f}", f"{ma:.2f}", f"{mb:.2f}", f"{abs(ma - mb):.3f}"]
                for k, (a, b, ma, mb) in vals]
        out += [table(["image", "score (reference)", "score (draft)", "abs score drift", "logit margin (ref)",
                       "logit margin (draft)", "abs margin drift"], rows), ""]
        if rows:
            drifts = [abs(v[0] - v[1]) for _, v in vals]
            mdrifts = [abs(v[2] - v[3]) for _, v in vals]
            flips = sum((v[0] >= 0.5) != (v[1] >= 0.5) for _, v in vals)
            out += [f"Drift over {len(rows)} images: score mean {statistics.mean(drifts):.4f}, max {max(drifts):.4f}; "
                    f"logit margin mean {statistics.mean(mdrifts):.3f}, max {max(mdrifts):.3f}; "
                    f"{flips} verdicts flip at 0.5 "
                    "(test checkpoint with random weights, scaled classifier; the published weights may drift differently).", ""]
    if res["errors"]:
        out += ["### Not measured", ""] + [f"- {k}: {v}" for k, v in res["errors"].items()] + [""]
    if res.get("device", "cpu") == "cpu":
        out += ["GPU: these workers ran on the CPU; on a GPU machine run bench/gpu.py, and this script with "
                "`--device cuda` (bench/gpu_session.sh, its `service` step)."]
    return "\n".join(out)


def probe_rows(results: dict, load: str) -> list[list[object]]:
    """One row per configuration: probe latencies idle and under ``load`` ("backfill", "flood")."""
    rows: list[list[object]] = []
    for name, r in results.items():
        idle95, busy95 = pct(r["idle"], .95), pct(r["busy"], .95)
        rows.append([name, len(r["idle"]), pct(r["idle"], .5), idle95, pct(r["busy"], .5), busy95,
                     max(r["busy"]), f"{busy95 / idle95:.2f}x", f"{r[load + '_s']:.1f}",
                     f"{r[load + '_done_at_last_probe']}/{r[load + '_n']}"])
    return rows


def bound(c: dict, name: str) -> float:
    return 1.0 / (1.0 / c["model_best"] + 1.0 / c["decode_pre"][name])


if __name__ == "__main__":
    sys.exit(main())
