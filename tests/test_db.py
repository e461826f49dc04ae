"""Schema: migrations build it on PostgreSQL and SQLite, and agree with the models."""

from __future__ import annotations

import secrets
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import CheckConstraint, create_engine, inspect
from sqlalchemy.engine import make_url

from conftest import PG_ADMIN_URL
from worker.db import ensure_schema, head_revision, make_engine, upgrade
from worker.errors import ConfigError
from worker.models import Base

TABLES = {"api_clients", "client_grants", "scans", "images", "webhook_deliveries", "webhook_endpoints"}


def _diff(url: str) -> list[object]:
    engine = make_engine(url)
    with engine.connect() as conn:
        diff: list[object] = compare_metadata(
            MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata
        )
    # Alembic does not compare check constraints; their names, at least, must agree, or a later
    # migration that drops one by the models' name fails on a database built by the migrations.
    built = inspect(engine)
    for table in Base.metadata.sorted_tables:
        declared = {c.name for c in table.constraints if isinstance(c, CheckConstraint)}
        found = {c["name"] for c in built.get_check_constraints(table.name)}
        if declared != found:
            diff.append(("check constraints", table.name, sorted(map(str, declared)), sorted(map(str, found))))
    engine.dispose()
    return diff


def test_postgres_schema_from_migrations_matches_the_models(pg_url: str) -> None:
    assert _diff(pg_url) == []
    assert set(inspect(make_engine(pg_url)).get_table_names()) >= TABLES


def test_sqlite_schema_from_migrations_matches_the_models(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'a.db'}"
    upgrade(url)
    assert _diff(url) == []


def test_migrations_go_down_and_up_again_on_sqlite(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'b.db'}"
    upgrade(url)
    from alembic import command

    from worker.db import alembic_config

    command.downgrade(alembic_config(url), "base")
    assert not TABLES & set(inspect(create_engine(url)).get_table_names())
    upgrade(url)
    assert _diff(url) == []


def test_embedded_sqlite_migrates_itself(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'nested' / 'c.db'}")
    ensure_schema(engine)
    assert set(inspect(engine).get_table_names()) >= TABLES


def test_postgres_behind_the_code_is_refused_with_the_fix() -> None:
    name = f"synthguard_stale_{secrets.token_hex(4)}"
    admin = create_engine(PG_ADMIN_URL, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    url = make_url(PG_ADMIN_URL).set(database=name).render_as_string(hide_password=False)
    engine = make_engine(url)
    try:
        with pytest.raises(ConfigError, match="synthguard db upgrade") as info:
            ensure_schema(engine)
        assert head_revision() in str(info.value)
        upgrade(url)
        ensure_schema(engine)  # current now: no error
    finally:
        engine.dispose()
        with admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE "{name}" WITH (FORCE)')
        admin.dispose()
