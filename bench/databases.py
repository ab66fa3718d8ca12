"""Throwaway databases for one benchmark run: a SQLite file or a new PostgreSQL database.

Every PostgreSQL database is created on the local server at 127.0.0.1 under a random
``bench_`` name and dropped when the run ends, so no run reads another run's rows.
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path

import asyncpg

POSTGRES_HOST = "127.0.0.1"
POSTGRES_USER = "postgres"
ADMIN_DATABASE = "postgres"


def postgres_dsn(database: str, port: int) -> str:
    """Return a libpq URL for ``database`` on the local server, usable by asyncpg and psycopg."""
    return f"postgresql://{POSTGRES_USER}@{POSTGRES_HOST}:{port}/{database}"


@asynccontextmanager
async def temporary_postgres_database(port: int) -> AsyncIterator[str]:
    """Create an empty database, yield its libpq URL and drop it, with its connections, at exit."""
    name = f"bench_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(postgres_dsn(ADMIN_DATABASE, port))
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield postgres_dsn(name, port)
    finally:
        admin = await asyncpg.connect(postgres_dsn(ADMIN_DATABASE, port))
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@contextmanager
def temporary_sqlite_url() -> Iterator[str]:
    """Yield a SQLAlchemy URL of a new SQLite file, deleted with its folder at exit."""
    with tempfile.TemporaryDirectory(prefix="bench_sqlite_") as folder:
        yield f"sqlite:///{Path(folder) / 'bench.db'}"
