"""Engines, sessions and migrations for PostgreSQL (production) and SQLite (embedded)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any

from sqlalchemy import Engine, create_engine, event
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.pool import StaticPool

from .errors import ConfigError

MIGRATIONS_DIR = Path(__file__).resolve().parent.parent / "migrations"


def _normalise_url(url: str) -> str:
    # A bare postgresql:// URL would pick psycopg2, which is not installed.
    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed.render_as_string(hide_password=False)


def make_engine(url: str, *, pool_size: int = 10) -> Engine:
    """An engine suited to many threads: WAL and a busy timeout on SQLite, a pool on PostgreSQL."""
    url = _normalise_url(url)
    parsed = make_url(url)
    # A failing statement's parameters hold object keys and metadata; its error message and
    # log line must not (SYNTHGUARD_LOG_OBJECT_KEYS is the only switch that lets keys into logs).
    kwargs: dict[str, Any] = {"future": True, "hide_parameters": True}
    if parsed.get_backend_name() == "sqlite":
        kwargs["connect_args"] = {"check_same_thread": False, "timeout": 30}
        if parsed.database in (None, "", ":memory:"):
            # One shared connection, or every thread would see its own empty database.
            kwargs["poolclass"] = StaticPool
        else:
            Path(parsed.database).parent.mkdir(parents=True, exist_ok=True)
    else:
        kwargs.update(pool_size=pool_size, max_overflow=pool_size, pool_pre_ping=True)
    engine = create_engine(url, **kwargs)
    if parsed.get_backend_name() == "sqlite":
        event.listen(engine, "connect", _sqlite_pragmas)
    return engine


def database_unavailable(exc: BaseException) -> bool:
    """True for a database that is down, restarting or unreachable, or a pool with no connection
    to spare (retry later); False for a statement the database refused."""
    if isinstance(exc, PoolTimeoutError):
        return True
    if not isinstance(exc, DBAPIError):
        return False
    return isinstance(exc, OperationalError | InterfaceError) or exc.connection_invalidated


def loggable(exc: BaseException) -> str:
    """A database error for the logs: its class, SQLSTATE and statement, never the values.

    The database's own message quotes what it refused (an object key, metadata),
    and SYNTHGUARD_LOG_OBJECT_KEYS promises keys stay out of logs.
    """
    if not isinstance(exc, DBAPIError):
        return type(exc).__name__
    orig = exc.orig
    sqlstate = getattr(orig, "sqlstate", None) or getattr(getattr(orig, "diag", None), "sqlstate", None)
    statement = " ".join((exc.statement or "").split())[:200]
    return f"{type(orig).__name__} (SQLSTATE {sqlstate or 'unknown'}) in: {statement}"


def refusal(exc: BaseException) -> str:
    """What the database said it refused, without the statement: for the image's own error message."""
    orig = exc.orig if isinstance(exc, DBAPIError) else exc
    said = getattr(getattr(orig, "diag", None), "message_primary", None) or str(orig)
    first_line = said.splitlines()[0] if said else ""
    return f"{type(orig).__name__}: {first_line}" if first_line else type(orig).__name__


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # WAL lets readers (``synthguard results``) run beside a scan that is writing.
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@lru_cache(maxsize=8)
def get_sessionmaker(url: str) -> sessionmaker[Session]:
    """One engine (and pool) per database URL per process."""
    return make_sessionmaker(make_engine(url))


def alembic_config(url: str) -> Any:
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    # ConfigParser interpolation would choke on '%' in passwords.
    cfg.set_main_option("sqlalchemy.url", _normalise_url(url).replace("%", "%%"))
    return cfg


def upgrade(url: str, revision: str = "head") -> None:
    """Bring the schema at ``url`` to ``revision`` (``alembic upgrade head``)."""
    from alembic import command

    if not MIGRATIONS_DIR.is_dir():
        raise ConfigError(f"migrations not found at {MIGRATIONS_DIR}; install synthguard from its source tree")
    command.upgrade(alembic_config(url), revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def head_revision() -> str | None:
    from alembic.script import ScriptDirectory

    return ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()


def ensure_schema(engine: Engine) -> None:
    """Make sure the schema is current before work starts.

    The embedded SQLite database migrates itself; PostgreSQL is migrated only
    by the operator (``synthguard db upgrade``), so a stale schema is an error.
    """
    if engine.dialect.name == "sqlite":
        url = engine.url.render_as_string(hide_password=False)
        if engine.url.database in (None, "", ":memory:"):
            # Run on the engine's own (single, shared) connection.
            from alembic import command

            cfg = alembic_config(url)
            with engine.begin() as conn:
                cfg.attributes["connection"] = conn
                command.upgrade(cfg, "head")
            return
        upgrade(url)
        return
    current, head = current_revision(engine), head_revision()
    if current != head:
        raise ConfigError(
            f"database schema is at revision {current or 'none'}, code expects {head}; "
            "run `synthguard db upgrade`"
        )
