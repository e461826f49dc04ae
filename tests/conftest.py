"""Test session: real PostgreSQL, a moto S3 server over HTTP, test checkpoints.

Nothing here downloads weights: the hub is switched off for the whole session
and every checkpoint is built with timm (``pretrained=False``).
"""

from __future__ import annotations

import http.client
import os
import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import urlsplit

# Set before boto3 or huggingface_hub are imported anywhere: both read them once.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
for _name in list(os.environ):
    # The developer's own configuration must not leak into tests.
    if _name.startswith("SYNTHGUARD_") and not _name.startswith("SYNTHGUARD_TEST_"):
        del os.environ[_name]

import pytest  # noqa: E402
from hypothesis import settings as hypothesis_settings  # noqa: E402

# CI runs the same generated examples every time (a landing must not depend on luck);
# a developer's runs draw new ones. .ci/run sets SYNTHGUARD_TEST_HYPOTHESIS_PROFILE=ci.
hypothesis_settings.register_profile("ci", derandomize=True, database=None)
hypothesis_settings.load_profile(os.environ.get("SYNTHGUARD_TEST_HYPOTHESIS_PROFILE", "default"))

import corpus  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The corpus the tests make themselves (tests/corpus.py): the shared fixtures' layout and names,
# and what the tests read from each of them. Every test runs on it.
CORPUS = corpus.corpus_dir()
# The real-world corpus (../shared/fixtures, see its README): a second layer, read where present,
# by the tests whose point is files from elsewhere; they skip, saying so, where it is absent.
SHARED_FIXTURES = Path(os.environ.get("SYNTHGUARD_TEST_FIXTURES", REPO.parent / "shared" / "fixtures"))
SHARED_ABSENT = f"the shared real-world fixtures are not at {SHARED_FIXTURES} (set SYNTHGUARD_TEST_FIXTURES)"
LAYERS = {"made": CORPUS, **({"shared": SHARED_FIXTURES} if SHARED_FIXTURES.is_dir() else {})}
PG_ADMIN_URL = os.environ.get(
    "SYNTHGUARD_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)
ARCH = "tf_mobilenetv3_large_100"
# Encrypts webhook secrets at rest in the service under test (a Fernet key: 32 bytes, url-safe base64).
TEST_SECRET_KEY = "dGVzdC1zZWNyZXQta2V5LWZvci1zeW50aGd1YXJkLTE="

# Fixture files and the error code each bad one must end with.
BAD_FIXTURES = {
    "empty.jpg": "empty_object",
    "truncated.jpg": "corrupt_image",
    "corrupt_scan.jpg": "corrupt_image",
    "not_an_image.jpg": "unsupported_format",
    "image.svg": "unsupported_format",
    "bomb_40000x40000.png": "too_large",
}
GOOD_FOLDERS = ("real", "generated", "formats", "c2pa")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def good_fixture_files(root: Path | None = None) -> list[Path]:
    """Every fixture that must decode and get a score: under ``root``, or in every layer present."""
    files: list[Path] = []
    for base in [root] if root is not None else LAYERS.values():
        for folder in GOOD_FOLDERS:
            files += sorted(p for p in (base / folder).glob("*") if p.suffix.lower() not in (".md", ""))
    return [p for p in files if not p.name.startswith("LICENSE")]


def fixture_id(path: Path) -> str:
    """``made/real/IMG_0003.jpg``: the layer, the folder and the name, for test ids."""
    layer = next((name for name, base in LAYERS.items() if path.is_relative_to(base)), "?")
    return f"{layer}/{path.parent.name}/{path.name}"


@pytest.fixture(autouse=True)
def _keep_torch_threads() -> Iterator[None]:
    """A CPU scorer with preparing processes lowers torch's intra-op threads for its process; not for the next test."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def corpus_dir() -> Path:
    """The corpus the tests make: for tests that need some image, not every layer's."""
    return CORPUS


@pytest.fixture(scope="session", params=["made", "shared"])
def fixtures_dir(request: pytest.FixtureRequest) -> Path:
    """Each layer of fixture files in turn: the made corpus, then the shared one where present."""
    if request.param not in LAYERS:
        pytest.skip(SHARED_ABSENT)
    return LAYERS[request.param]


# --------------------------------------------------------------------- S3 (moto)


@pytest.fixture(scope="session")
def s3_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A moto S3 server in its own process, spoken to over HTTP like any S3 store.

    Its request recorder (``/moto-api/recorder/...``), which tests use to see
    what was fetched, writes to a file of this session's, not the checkout.
    """
    port = _free_port()
    recording = tmp_path_factory.mktemp("moto") / "recording"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env={**os.environ, "MOTO_RECORDER_FILEPATH": str(recording)},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError("moto server did not start") from None
            time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="session")
def s3_client(s3_endpoint: str):  # type: ignore[no-untyped-def]
    import boto3

    return boto3.client("s3", endpoint_url=s3_endpoint)


@pytest.fixture
def bucket(s3_client) -> str:  # type: ignore[no-untyped-def]
    """A new, empty bucket for one test."""
    name = f"test-{secrets.token_hex(6)}"
    s3_client.create_bucket(Bucket=name)
    return name


# ------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    """A database of its own for this session, schema built by ``alembic upgrade head``."""
    from sqlalchemy import create_engine
    from sqlalchemy.engine import make_url

    from worker.db import upgrade

    name = f"synthguard_test_{os.getpid()}_{secrets.token_hex(3)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except Exception as exc:  # pragma: no cover - a broken environment, said plainly
        pytest.fail(f"PostgreSQL at {PG_ADMIN_URL} is not usable ({exc}); start it, see DEVELOPERS.md")
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    upgrade(url)
    yield url
    with admin.connect() as conn:
        conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.dispose()


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path / 'synthguard.db'}"


# ------------------------------------------------------------------ checkpoints


def make_test_model(seed: int = 1234):  # type: ignore[no-untyped-def]
    """A two-class ``tf_mobilenetv3_large_100`` with random weights.

    The classifier is scaled up so that scores spread over (0, 1) instead of
    all sitting near 0.5: comparisons between images then mean something.
    """
    import timm
    import torch

    torch.manual_seed(seed)
    model = timm.create_model(ARCH, num_classes=2, pretrained=False)
    with torch.no_grad():
        model.classifier.weight.mul_(60.0)
    return model.eval()


@pytest.fixture(scope="session")
def test_model():  # type: ignore[no-untyped-def]
    return make_test_model()


@pytest.fixture(scope="session")
def checkpoint(test_model, tmp_path_factory) -> Path:  # type: ignore[no-untyped-def]
    """The test model's state dict as ``.safetensors``, the form the hub serves."""
    from safetensors.torch import save_file

    path = tmp_path_factory.mktemp("ckpt") / "model.safetensors"
    save_file({k: v.contiguous() for k, v in test_model.state_dict().items()}, str(path))
    return path


@pytest.fixture
def settings_factory(checkpoint: Path):  # type: ignore[no-untyped-def]
    """Build :class:`Settings` explicitly: the test's values on top of safe test defaults."""
    from worker.settings import Settings

    def build(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "database_url": "sqlite://",
            "model_checkpoint": str(checkpoint),
            "device": "cpu",
            "batch_size": 8,
            "batch_wait_ms": 5.0,
            "concurrency": 4,
            "retry_backoff_s": 0.05,
            "retry_backoff_max_s": 0.2,
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return build


# ------------------------------------------------------- Redis and real workers

REDIS_URL = os.environ.get("SYNTHGUARD_TEST_REDIS_URL", "redis://127.0.0.1:6379/15")


@pytest.fixture
def redis_url() -> Iterator[str]:
    """The broker, empty at the start and the end of each test."""
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    try:
        client.ping()
    except redis.RedisError as exc:  # pragma: no cover
        pytest.fail(f"Redis at {REDIS_URL} is not usable ({exc}); start it, see DEVELOPERS.md")
    client.flushdb()
    yield REDIS_URL
    client.flushdb()
    client.close()


@pytest.fixture
def service_env(pg_url: str, redis_url: str, s3_endpoint: str, checkpoint: Path) -> dict[str, str]:
    """SYNTHGUARD_* for processes of the service under test (workers, beat, CLI)."""
    return {
        "SYNTHGUARD_DATABASE_URL": pg_url,
        "SYNTHGUARD_BROKER_URL": redis_url,
        "SYNTHGUARD_S3_ENDPOINT_URL": s3_endpoint,
        "SYNTHGUARD_MODEL_CHECKPOINT": str(checkpoint),
        "SYNTHGUARD_DEVICE": "cpu",
        "SYNTHGUARD_BATCH_SIZE": "8",
        "SYNTHGUARD_BATCH_WAIT_MS": "20",
        "SYNTHGUARD_CONCURRENCY": "8",
        "SYNTHGUARD_RETRY_BACKOFF_S": "0.2",
        "SYNTHGUARD_RETRY_BACKOFF_MAX_S": "1",
        "SYNTHGUARD_SECRET_KEY": TEST_SECRET_KEY,
    }


@pytest.fixture
def service_settings(service_env: dict[str, str]):  # type: ignore[no-untyped-def]
    """The same configuration as a Settings object, for code under test in this process."""
    from worker.settings import Settings

    return Settings(**{k.removeprefix("SYNTHGUARD_").lower(): v for k, v in service_env.items()})  # type: ignore[arg-type]


@pytest.fixture
def celery_app(service_settings):  # type: ignore[no-untyped-def]
    """A Celery app bound to the test broker, for publishing from the test process."""
    from worker.celery_app import create_app

    app = create_app(service_settings)
    yield app
    app.close()


def synthguard_command() -> list[str]:
    exe = Path(sys.executable).with_name("synthguard")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "worker.cli"]


class ServiceProcess:
    """A real ``synthguard worker`` or ``beat`` process, its output in a log file."""

    def __init__(self, args: list[str], env: dict[str, str], log_path: Path, ready_marker: str) -> None:
        self.log_path = log_path
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [*synthguard_command(), *args],
            env={**os.environ, **env},
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self._wait_for(ready_marker)

    def _wait_for(self, marker: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while marker not in self.log_path.read_text(errors="replace"):
            if self.proc.poll() is not None:
                raise RuntimeError(f"process exited early:\n{self.log()[-5000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"process not ready after {timeout}s:\n{self.log()[-5000:]}")
            time.sleep(0.1)

    def log(self) -> str:
        """Everything the process has written so far."""
        return self.log_path.read_text(errors="replace")

    def signal(self, signum: int) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        import signal as signals

        if self.proc.poll() is None:
            self.signal(signals.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.signal(signals.SIGKILL)
                self.proc.wait(10)
        self._log.close()


@pytest.fixture
def start_service(service_env: dict[str, str], tmp_path: Path):  # type: ignore[no-untyped-def]
    """Start ``synthguard worker`` (default) or ``beat`` with the service env plus overrides."""
    started: list[ServiceProcess] = []

    def start(
        kind: str = "worker", env: dict[str, str] | None = None, args: tuple[str, ...] = (), **overrides: object
    ) -> ServiceProcess:
        env = {
            **service_env,
            **(env or {}),
            **{f"SYNTHGUARD_{k.upper()}": str(v) for k, v in overrides.items()},
        }
        log_path = tmp_path / f"{kind}-{len(started)}.log"
        marker = " ready." if kind == "worker" else "beat: Starting..."
        proc = ServiceProcess([kind, "--loglevel=INFO", *args], env, log_path, marker)
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def cli_env(tmp_path: Path, checkpoint: Path, name: str, **settings: str) -> dict[str, str]:
    """SYNTHGUARD_* for CLI runs in this process: a SQLite file of their own, the test checkpoint on
    the CPU, and ``settings`` (``max_frames="4"`` is SYNTHGUARD_MAX_FRAMES)."""
    env = {
        "SYNTHGUARD_DATABASE_URL": f"sqlite:///{tmp_path / f'{name}.db'}",
        "SYNTHGUARD_MODEL_CHECKPOINT": str(checkpoint),
        "SYNTHGUARD_DEVICE": "cpu",
    }
    return env | {f"SYNTHGUARD_{key.upper()}": value for key, value in settings.items()}


def wait_until(predicate, timeout: float = 120.0, interval: float = 0.1, message: str = "condition"):  # type: ignore[no-untyped-def]
    """Poll ``predicate`` until it returns something truthy; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {message}")
        time.sleep(interval)


# ------------------------------------------------- shared by the service tests


def image_states(sessions, ids: list) -> dict[str, int]:  # type: ignore[no-untyped-def]
    """How many of the images ``ids`` are in each state."""
    from sqlalchemy import func, select

    from worker.models import Image

    with sessions() as session:
        rows = session.execute(
            select(Image.state, func.count()).where(Image.id.in_(ids)).group_by(Image.state)
        ).all()
    return {state: n for state, n in rows}


def image_rows(sessions, ids: list) -> dict:  # type: ignore[no-untyped-def]
    """The images ``ids`` by id, as the database holds them now."""
    from sqlalchemy import select

    from worker.models import Image

    with sessions() as session:
        return {row.id: row for row in session.scalars(select(Image).where(Image.id.in_(ids)))}


class FlakyS3:
    """An HTTP proxy in front of the S3 server that answers 503 SlowDown to chosen objects, and
    holds GETs of others until the test lets them go."""

    def __init__(self, upstream: str, failures: dict[str, int], holds: tuple[str, ...] = ()) -> None:
        self.failures = dict(failures)  # key substring -> GETs to refuse (-1: always)
        self.holds = holds  # key substrings whose GETs wait for release()
        self.held = threading.Event()  # set when a GET is being held
        self._released = threading.Event()
        target = urlsplit(upstream)
        lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def _refuse(self) -> bool:
                with lock:
                    for marker, left in outer.failures.items():
                        if marker in self.path and self.command == "GET" and left != 0:
                            outer.failures[marker] = left - 1
                            return True
                return False

            def _handle(self) -> None:
                if self.command == "GET" and any(marker in self.path for marker in outer.holds):
                    outer.held.set()
                    outer._released.wait()
                if self._refuse():
                    body = b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
                    self.send_response(503)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                length = int(self.headers.get("Content-Length") or 0)
                conn = http.client.HTTPConnection(target.hostname, target.port, timeout=30)
                conn.request(self.command, self.path, self.rfile.read(length) if length else None, dict(self.headers))
                reply = conn.getresponse()
                data = reply.read()
                self.send_response(reply.status)
                for name, value in reply.getheaders():
                    if name.lower() not in ("transfer-encoding", "connection", "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                conn.close()

            do_GET = do_HEAD = do_PUT = _handle

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def release(self) -> None:
        """Let held GETs (and later ones) through."""
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()




@pytest.fixture
def sessions(pg_url: str):  # type: ignore[no-untyped-def]
    """Sessions on the test database."""
    from worker.db import get_sessionmaker

    return get_sessionmaker(pg_url)


@pytest.fixture
def broker(redis_url: str) -> Iterator[object]:
    """The test broker's Redis, to look at the queues."""
    import redis

    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def api(service_settings, celery_app):  # type: ignore[no-untyped-def]
    """The HTTP API in this process, bound to the test database and broker."""
    from fastapi.testclient import TestClient

    from api_stub.app import create_app

    with TestClient(create_app(service_settings, celery=celery_app)) as client:
        yield client
