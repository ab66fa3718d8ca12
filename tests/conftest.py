"""Fixtures shared by every test: a fresh database on each engine the service supports.

Tests that take ``database_url`` run twice: on a SQLite file and on a new database of the
PostgreSQL server at 127.0.0.1:5432 (override with ``TAT_TEST_POSTGRES_URL``), which is
created for the test and dropped after it.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import asyncpg
import pytest

from app.core.config import Settings, load_settings

pytest_plugins = ["tests.services.redis"]

POSTGRES_ADMIN_URL = os.environ.get("TAT_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


def postgres_url(database: str) -> str:
    base, _, _ = POSTGRES_ADMIN_URL.rpartition("/")
    return f"{base}/{database}"


async def _admin(statement: str) -> None:
    connection = await asyncpg.connect(POSTGRES_ADMIN_URL)
    try:
        await connection.execute(statement)
    finally:
        await connection.close()


def create_postgres_database() -> str:
    name = f"tat_test_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f'CREATE DATABASE "{name}"'))
    return name


def drop_postgres_database(name: str) -> None:
    asyncio.run(_admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


# trylast: after ``-m`` and ``-k`` have deselected their items.
@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Stop before the first test when PostgreSQL tests are selected but the server is down.

    Each of them would otherwise fail on its own connection error; tests that need no
    PostgreSQL (``tests/unit``, ``-m 'not postgres'``) run without the server.
    """
    if not any(item.get_closest_marker("postgres") for item in items):
        return
    try:
        asyncio.run(_admin("SELECT 1"))
    except (OSError, asyncpg.PostgresError) as exc:
        pytest.exit(
            f"PostgreSQL at {POSTGRES_ADMIN_URL} is not reachable ({exc}); start it, point "
            "TAT_TEST_POSTGRES_URL at a server where this user may create databases, or add "
            "-m 'not postgres' to test on SQLite only",
            returncode=2,
        )


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'toronto_ai.db'}"
        return
    name = create_postgres_database()
    try:
        yield postgres_url(name)
    finally:
        drop_postgres_database(name)


def make_settings(database_url: str, tmp_path: Path, **environment: str) -> Settings:
    """Settings for a test: only the given variables, no configuration files."""
    environ = {"TORONTO_AI_DATABASE__URL": database_url, "TORONTO_AI_ENV": "test", **environment}
    return load_settings(config_dir=tmp_path / "no-config", environ=environ)


CHROMA_PORTS = [int(port) for port in os.environ.get("TAT_TEST_CHROMA_PORTS", "58020,58021,58022").split(",")]


@pytest.fixture(scope="session")
def chroma_servers(tmp_path_factory: pytest.TempPathFactory):
    """Three Chroma servers on loopback ports, shared by every test of the session.

    A test that stops one must start it again before it ends.
    """
    from tests.services.chroma import start_servers

    servers = start_servers(CHROMA_PORTS, tmp_path_factory.mktemp("chroma"))
    try:
        yield servers
    finally:
        for server in servers:
            server.stop()
