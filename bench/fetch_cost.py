#!/usr/bin/env python
"""What one S3 GET costs the fetching process in CPU: `python bench/fetch_cost.py [--objects 2000] [--size 204800]`.

Starts a moto S3 server in a process of its own on 127.0.0.1, served by uvicorn so that pooled
connections are kept alive and reused as they are against S3 (`--no-keepalive`: moto's stock
werkzeug server, which closes the connection after every request, as tests/conftest.py's does),
uploads `--objects` objects of `--size` random bytes, then has each client fetch every object, the
whole body read into `bytes`, `--inflight` requests in flight over one shared connection pool:

- `botocore`: the service's own client (`worker.storage.Storage(...).client`: same config,
  retries, timeouts, path addressing) from a thread pool, the body read as `Storage._fetch_s3`
  reads it (declared size checked against the cap, bounded `read`s to EOF so that botocore
  checks Content-Length and the CRC32 the server returns, ETag and version id taken).
  The ratio column is against this row, run by run.
- `Storage.fetch`: the same through `Storage.fetch` itself, i.e. plus its SHA-256 and
  `FetchedObject`: what the service pays per fetch today.
- `obstore async` / `obstore sync`: one `obstore.store.S3Store` (Rust object_store, reqwest,
  tokio); `get_async` + `bytes_async` under asyncio with a semaphore, and `get` + `bytes` from
  a thread pool; declared size (`meta["size"]`) checked before the body is read.
- `aiobotocore`: one client from one session, `max_pool_connections` >= in-flight, the
  service's retry and timeout config, asyncio with a semaphore, the same bounded reads.

CPU is `time.process_time()` of this process (every thread: Python, tokio and aiohttp alike);
the moto server's CPU is not in it (its own column says what it spent, for reading the wall
times: on a 2-core machine the Python server is what limits GETs/s). Each client is warmed up
(`--warmup` GETs) once, then the clients take turns, `--runs` rounds, and the table gives the
median of the rounds. obstore and aiobotocore are not the service's dependencies: a client
whose package is missing is listed as skipped. aiobotocore pins botocore to a narrow range, so
install them into a venv made with `--system-site-packages`, choosing an aiobotocore whose range
holds the service's botocore (`pip install obstore "aiobotocore==X" "botocore==<installed>"`).
Asserts nothing beyond every body having the uploaded size.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bench.run import free_port, wait_for_port  # noqa: E402
from worker.storage import _READ_CHUNK  # noqa: E402  (the chunk the service reads in)

BUCKET = "fetch-cost-bench"
REGION = "us-east-1"
# Fake credentials for moto, set in the environment before any client is built: no
# credential chain may go looking further (an instance-metadata lookup leaves the machine).
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "fetch-cost-bench",
    "AWS_SECRET_ACCESS_KEY": "fetch-cost-bench",
    "AWS_DEFAULT_REGION": REGION,
    "AWS_REGION": REGION,
    "AWS_EC2_METADATA_DISABLED": "true",
}
_DROPPED_AWS_ENV = (
    "AWS_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT",
    "AWS_ENDPOINT_URL_S3",
)


# --------------------------------------------------------------------------- server


def serve(port: int, keepalive: bool) -> None:
    """The moto S3 server (run in the child process).

    werkzeug's server, which ``python -m moto.server`` runs, answers every request with
    ``Connection: close``; with keep-alive moto's app is served by uvicorn (a dependency of
    the API) through its WSGI adapter instead.
    """
    from moto.server import DomainDispatcherApplication, create_backend_app

    app = DomainDispatcherApplication(create_backend_app)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    if keepalive:
        import warnings

        import uvicorn

        warnings.simplefilter("ignore", DeprecationWarning)  # uvicorn's WSGI adapter is deprecated
        uvicorn.run(
            app,
            host="127.0.0.1",
            port=port,
            interface="wsgi",
            log_level="warning",
            access_log=False,
            timeout_keep_alive=120,
        )
    else:
        from werkzeug.serving import WSGIRequestHandler, make_server

        class Quiet(WSGIRequestHandler):
            def log_request(self, *args: Any, **kwargs: Any) -> None:
                pass

        make_server("127.0.0.1", port, app, threaded=True, request_handler=Quiet).serve_forever()


def start_server(keepalive: bool) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    command = [sys.executable, str(Path(__file__).resolve()), "--serve", str(port)]
    if not keepalive:
        command.append("--no-keepalive")
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port(port, "moto server", lambda: proc.poll() is not None)
    except RuntimeError:
        proc.kill()
        raise
    return proc, f"http://127.0.0.1:{port}"


def _process_cpu_s(pid: int) -> float:
    """utime + stime of another process, from /proc (0 where there is no /proc)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = raw[raw.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def upload(endpoint: str, keys: list[str], size: int) -> None:
    import boto3

    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=BUCKET)
    with ThreadPoolExecutor(8) as pool:
        # Uploaded as any current SDK uploads: with a CRC32 checksum, which S3 (and moto)
        # hands back on GET for botocore to verify.
        list(
            pool.map(
                lambda key: client.put_object(Bucket=BUCKET, Key=key, Body=secrets.token_bytes(size)), keys
            )
        )
    client.close()


# --------------------------------------------------------------------------- clients


class TooLarge(Exception):
    pass


@dataclass
class Client:
    """One way to fetch: ``fetch_all(keys)`` fetches them all, ``inflight`` at a time."""

    name: str
    fetch_all: Callable[[list[str]], list[int]]
    close: Callable[[], None] = lambda: None


@dataclass
class Measurement:
    cpu_s: float
    wall_s: float
    server_cpu_s: float
    gets: int


@dataclass
class Row:
    client: Client
    runs: list[Measurement] = field(default_factory=list)


def _thread_pool_fetcher(
    fetch_one: Callable[[str], int], inflight: int
) -> tuple[Callable[[list[str]], list[int]], Callable[[], None]]:
    pool = ThreadPoolExecutor(inflight, thread_name_prefix="fetch")
    return (lambda keys: list(pool.map(fetch_one, keys))), pool.shutdown


def _async_fetcher(
    loop: asyncio.AbstractEventLoop, fetch_one: Callable[[str], Any], inflight: int
) -> Callable[[list[str]], list[int]]:
    async def fetch_all(keys: list[str]) -> list[int]:
        gate = asyncio.Semaphore(inflight)

        async def one(key: str) -> int:
            async with gate:
                return int(await fetch_one(key))

        return list(await asyncio.gather(*(one(key) for key in keys)))

    return lambda keys: loop.run_until_complete(fetch_all(keys))


def botocore_clients(endpoint: str, inflight: int) -> list[Client]:
    from worker.settings import Settings
    from worker.storage import ObjectRef, Storage, _read_capped

    settings = Settings(s3_endpoint_url=endpoint, concurrency=inflight)
    storage = Storage(settings, max_pool_connections=max(inflight, 10))
    s3 = storage.client
    cap = settings.max_image_bytes

    def get_object(key: str) -> int:
        # As Storage._fetch_s3 does it, less the SHA-256 and the FetchedObject.
        response = s3.get_object(Bucket=BUCKET, Key=key)
        body = response["Body"]
        try:
            declared = response.get("ContentLength")
            if declared is not None and declared > cap:
                raise TooLarge(key)
            data = _read_capped(body, ObjectRef(BUCKET, key), cap)
        finally:
            body.close()
        _identity = (response.get("ETag"), response.get("VersionId"))
        return len(data)

    def storage_fetch(key: str) -> int:
        return storage.fetch(ObjectRef(BUCKET, key)).size

    raw, raw_close = _thread_pool_fetcher(get_object, inflight)
    full, full_close = _thread_pool_fetcher(storage_fetch, inflight)
    return [
        Client("botocore", raw, raw_close),
        Client("Storage.fetch", full, lambda: (full_close(), storage.close())),
    ]


def obstore_clients(endpoint: str, inflight: int, loop: asyncio.AbstractEventLoop) -> list[Client]:
    import obstore
    from obstore.store import S3Store

    from worker.settings import Settings

    settings = Settings(s3_endpoint_url=endpoint)
    cap = settings.max_image_bytes
    store = S3Store(
        BUCKET,
        endpoint=endpoint,
        region=REGION,
        access_key_id=_FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        secret_access_key=_FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        client_options={
            "allow_http": True,
            "connect_timeout": f"{settings.s3_connect_timeout_s}s",
            "read_timeout": f"{settings.s3_read_timeout_s}s",
            "timeout": "5min",
        },
        retry_config={"max_retries": 2},  # 3 attempts in all, as the service's botocore makes
    )

    async def get_async(key: str) -> int:
        result = await obstore.get_async(store, key)
        meta = result.meta
        if meta["size"] > cap:
            raise TooLarge(key)
        data = bytes(await result.bytes_async())
        _identity = (meta["e_tag"], meta["version"])
        return len(data)

    def get_sync(key: str) -> int:
        result = obstore.get(store, key)
        meta = result.meta
        if meta["size"] > cap:
            raise TooLarge(key)
        data = bytes(result.bytes())
        _identity = (meta["e_tag"], meta["version"])
        return len(data)

    sync_all, sync_close = _thread_pool_fetcher(get_sync, inflight)
    return [
        Client("obstore async", _async_fetcher(loop, get_async, inflight)),
        Client("obstore sync", sync_all, sync_close),
    ]


def aiobotocore_clients(endpoint: str, inflight: int, loop: asyncio.AbstractEventLoop) -> list[Client]:
    from aiobotocore.config import AioConfig
    from aiobotocore.session import get_session

    from worker.settings import Settings
    from worker.storage import DEFAULT_S3_MAX_ATTEMPTS

    settings = Settings(s3_endpoint_url=endpoint)
    cap = settings.max_image_bytes
    config = AioConfig(
        max_pool_connections=max(inflight, 10),
        connect_timeout=settings.s3_connect_timeout_s,
        read_timeout=settings.s3_read_timeout_s,
        retries={"mode": "standard", "total_max_attempts": DEFAULT_S3_MAX_ATTEMPTS},
        s3={"addressing_style": "path"},
    )
    stack = AsyncExitStack()
    s3 = loop.run_until_complete(
        stack.enter_async_context(get_session().create_client("s3", endpoint_url=endpoint, config=config))
    )

    async def get_object(key: str) -> int:
        response = await s3.get_object(Bucket=BUCKET, Key=key)
        async with response["Body"] as body:
            declared = response.get("ContentLength")
            if declared is not None and declared > cap:
                raise TooLarge(key)
            chunks: list[bytes] = []
            received = 0
            while True:
                chunk = await body.read(min(_READ_CHUNK, cap + 1 - received))
                if not chunk:
                    break
                chunks.append(chunk)
                received += len(chunk)
                if received > cap:
                    raise TooLarge(key)
            data = b"".join(chunks)
        _identity = (response.get("ETag"), response.get("VersionId"))
        return len(data)

    return [
        Client(
            "aiobotocore",
            _async_fetcher(loop, get_object, inflight),
            lambda: loop.run_until_complete(stack.aclose()),
        )
    ]


# --------------------------------------------------------------------------- measuring


def measure(client: Client, keys: list[str], size: int, server_pid: int) -> Measurement:
    server_before = _process_cpu_s(server_pid)
    cpu_before = time.process_time()
    wall_before = time.perf_counter()
    sizes = client.fetch_all(keys)
    wall = time.perf_counter() - wall_before
    cpu = time.process_time() - cpu_before
    server = _process_cpu_s(server_pid) - server_before
    wrong = sum(1 for got in sizes if got != size)
    if wrong:
        raise SystemExit(f"{client.name}: {wrong} of {len(keys)} bodies did not have {size} bytes")
    return Measurement(cpu, wall, server, len(keys))


def _median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def print_table(rows: list[Row], skipped: list[tuple[str, str]], args: argparse.Namespace) -> None:
    baseline = next((row for row in rows if row.client.name == "botocore"), None)
    print()
    print(
        f"{args.objects} objects of {args.size} bytes, {args.inflight} in flight, median of {args.runs} runs, "
        f"moto {'on uvicorn, connections kept alive' if args.keepalive else 'on werkzeug, a connection per GET'}"
    )
    print(
        "CPU is this process's (all its threads); the moto server runs in another process, its CPU is not in it."
    )
    print()
    header = f"{'client':<15} {'CPU ms/GET':>10} {'min..max':>13} {'GETs/s':>8} {'vs botocore':>11} {'server ms/GET':>13}"
    print(header)
    print("-" * len(header))
    for row in rows:
        per_get = [m.cpu_s * 1000 / m.gets for m in row.runs]
        rate = _median(m.gets / m.wall_s for m in row.runs)
        server = _median(m.server_cpu_s * 1000 / m.gets for m in row.runs)
        if baseline is not None:
            ratio = _median(
                (m.cpu_s / m.gets) / (b.cpu_s / b.gets) for m, b in zip(row.runs, baseline.runs, strict=True)
            )
            ratio_text = f"{ratio:.2f}x"
        else:
            ratio_text = "-"
        spread = f"{min(per_get):.3f}..{max(per_get):.3f}"
        print(
            f"{row.client.name:<15} {_median(per_get):>10.3f} {spread:>13} {rate:>8.0f} {ratio_text:>11} {server:>13.3f}"
        )
    for name, why in skipped:
        print(f"{name:<15} skipped: {why}")


def versions() -> str:
    from importlib import metadata

    found = []
    for package in ("boto3", "botocore", "urllib3", "obstore", "aiobotocore", "aiohttp", "moto"):
        try:
            found.append(f"{package} {metadata.version(package)}")
        except metadata.PackageNotFoundError:
            found.append(f"{package} -")
    return f"Python {sys.version.split()[0]}, {os.cpu_count()} CPUs; " + ", ".join(found)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--objects", type=int, default=2000, help="objects uploaded; each run fetches them all"
    )
    parser.add_argument("--size", type=int, default=200 * 1024, help="bytes per object")
    parser.add_argument("--inflight", type=int, default=16, help="requests in flight per client")
    parser.add_argument(
        "--runs", type=int, default=3, help="rounds over all clients; the table gives medians"
    )
    parser.add_argument("--warmup", type=int, default=100, help="GETs per client before the first timed run")
    parser.add_argument(
        "--clients",
        default="botocore,obstore,aiobotocore",
        help="comma-separated: botocore (also gives Storage.fetch), obstore (async and sync), aiobotocore",
    )
    parser.add_argument(
        "--no-keepalive", dest="keepalive", action="store_false", help="moto's stock HTTP/1.0 server"
    )
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.serve is not None:
        serve(args.serve, args.keepalive)
        return 0
    if args.objects < 1 or args.size < 1 or args.inflight < 1 or args.runs < 1:
        parser.error("--objects, --size, --inflight and --runs must be at least 1")

    for name in _DROPPED_AWS_ENV:
        os.environ.pop(name, None)
    os.environ.update(_FAKE_AWS_ENV)
    os.environ.pop("SYNTHGUARD_S3_ENDPOINT_URL", None)

    wanted = [name.strip() for name in args.clients.split(",") if name.strip()]
    print(versions())
    proc, endpoint = start_server(args.keepalive)
    loop = asyncio.new_event_loop()
    rows: list[Row] = []
    skipped: list[tuple[str, str]] = []
    try:
        keys = [f"images/{i:06d}.bin" for i in range(args.objects)]
        started = time.perf_counter()
        upload(endpoint, keys, args.size)
        print(
            f"uploaded {args.objects} x {args.size} bytes to {endpoint} in {time.perf_counter() - started:.1f} s"
        )

        makers: dict[str, Callable[[], list[Client]]] = {
            "botocore": lambda: botocore_clients(endpoint, args.inflight),
            "obstore": lambda: obstore_clients(endpoint, args.inflight, loop),
            "aiobotocore": lambda: aiobotocore_clients(endpoint, args.inflight, loop),
        }
        for name in wanted:
            if name not in makers:
                parser.error(f"unknown client {name!r}; choose from {', '.join(makers)}")
            try:
                clients = makers[name]()
            except ImportError as exc:
                skipped.append((name, f"not installed ({exc.name})"))
                continue
            rows += [Row(client) for client in clients]

        warm = [keys[i % len(keys)] for i in range(args.warmup)]
        for row in rows:
            if warm:
                row.client.fetch_all(warm)
        for run in range(args.runs):
            for row in rows:
                row.runs.append(measure(row.client, keys, args.size, proc.pid))
            done = ", ".join(f"{row.client.name} {row.runs[-1].cpu_s * 1000 / len(keys):.3f}" for row in rows)
            print(f"run {run + 1}: CPU ms/GET {done}", flush=True)
        print_table(rows, skipped, args)
    finally:
        for row in rows:
            row.client.close()
        loop.close()
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
