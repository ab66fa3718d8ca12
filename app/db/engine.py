"""Database engines and the transaction scopes every caller uses.

``Database.transaction()`` opens a write transaction and ``Database.read()`` a read-only
one; the caller owns the unit of work and the repositories below only run statements on the
connection they are given.

SQLite runs in WAL mode so that one writer and many readers from several local processes
work at once. Write transactions start with ``BEGIN IMMEDIATE``: they take the write lock
up front, so two processes never both read and then fail to upgrade to a write (which
SQLite reports as "database is locked" without waiting for the busy timeout).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.core.config import DatabaseSettings
from app.errors import ConfigError, DatabaseUnavailableError

logger = logging.getLogger(__name__)


class Database:
    """The engines of one process: a write engine and, on SQLite, a separate read engine."""

    def __init__(self, settings: DatabaseSettings) -> None:
        self.settings = settings
        self.url = async_url(settings.sqlalchemy_url())
        self.dialect = self.url.get_backend_name()

        if self.dialect == "sqlite":
            _ensure_parent_folder(self.url.database)
            self.write_engine = self._sqlite_engine(begin="BEGIN IMMEDIATE", pool_size=1)
            self.read_engine = self._sqlite_engine(begin="BEGIN", pool_size=settings.pool_size)
        else:
            self.write_engine = self._server_engine()
            self.read_engine = self.write_engine

    @property
    def is_sqlite(self) -> bool:
        return self.dialect == "sqlite"

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncConnection]:
        """Run a write transaction: committed when the block exits, rolled back on an error."""
        async with self.write_engine.begin() as connection:
            yield connection

    @asynccontextmanager
    async def read(self) -> AsyncIterator[AsyncConnection]:
        """Run a read-only transaction."""
        async with self.read_engine.connect() as connection:
            yield connection

    async def dispose(self) -> None:
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()

    def describe(self) -> str:
        """Return the URL with the password hidden, for logs and error messages."""
        return self.url.render_as_string(hide_password=True)

    def _sqlite_engine(self, *, begin: str, pool_size: int) -> AsyncEngine:
        busy_timeout_ms = self.settings.sqlite_busy_timeout_ms
        engine = create_async_engine(
            self.url,
            echo=self.settings.echo,
            pool_size=pool_size,
            max_overflow=0 if pool_size == 1 else self.settings.max_overflow,
            # Waiting for the single write connection is how writers queue inside one
            # process, so the wait may be as long as SQLite's own busy timeout.
            pool_timeout=max(self.settings.pool_timeout_seconds, busy_timeout_ms / 1000),
            connect_args={"timeout": busy_timeout_ms / 1000},
        )

        @event.listens_for(engine.sync_engine, "connect")
        def configure_connection(dbapi_connection: Any, _record: Any) -> None:
            # Autocommit at the driver level, so that the "begin" hook below decides how each
            # transaction starts instead of the sqlite3 module's implicit BEGIN.
            dbapi_connection.isolation_level = None
            cursor = dbapi_connection.cursor()
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.close()

        @event.listens_for(engine.sync_engine, "begin")
        def begin_transaction(connection: Any) -> None:
            connection.exec_driver_sql(begin)

        return engine

    def _server_engine(self) -> AsyncEngine:
        settings = self.settings
        server_settings = {"application_name": "toronto-ai"}
        if settings.statement_timeout_ms:
            server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        return create_async_engine(
            self.url,
            echo=settings.echo,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout_seconds,
            pool_recycle=settings.pool_recycle_seconds,
            pool_pre_ping=True,
            connect_args={"timeout": settings.connect_timeout_seconds, "server_settings": server_settings},
        )


def async_url(raw: str) -> URL:
    """Parse a database URL and select the asyncio driver of its engine."""
    try:
        url = make_url(raw)
    except ArgumentError as exc:
        raise ConfigError(
            f"database.url: {raw!r} is not a database URL; use sqlite:///path/to/file.db or "
            "postgresql://user@host:5432/database"
        ) from exc
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(
            "database.url: an in-memory SQLite database cannot be shared by the API and its workers; "
            "give a file path such as sqlite:///data/toronto_ai.db"
        )
    drivers = {
        "sqlite": "sqlite+aiosqlite",
        "postgresql": "postgresql+asyncpg",
        "postgres": "postgresql+asyncpg",
    }
    backend = url.get_backend_name()
    if backend not in drivers:
        raise ConfigError(
            f"database.url: unsupported database {backend!r} in {url.render_as_string(hide_password=True)}; "
            "use a sqlite:/// file or a postgresql:// server"
        )
    if url.get_driver_name() in ("", "pysqlite", "psycopg2", "psycopg"):
        url = url.set(drivername=drivers[backend])
    return url


def _ensure_parent_folder(database: str | None) -> None:
    if not database or database == ":memory:":
        return
    folder = Path(database).expanduser().resolve().parent
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseUnavailableError(
            f"cannot create the folder {folder} of the SQLite database: {exc.strerror}; "
            "choose a writable path with database.url"
        ) from exc
