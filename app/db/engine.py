"""Database engines and the transaction scopes every caller uses.

``Database.transaction()`` opens a write transaction and ``Database.read()`` a read-only
one, both on the primary; the caller owns the unit of work and the repositories below only
run statements on the connection they are given. ``Database.read_stale()`` runs a read that
tolerates staleness on a read replica when one is in rotation, and is the one place that
decides between replicas and the primary.

Read-your-writes: a caller that has written passes the primary's WAL position after its
write (``write_position()``) as ``after``; only replicas whose last check found them past it
serve that read, and otherwise the primary does.

Through PgBouncer in transaction pooling mode (``database.pgbouncer``), every statement runs
in a transaction, prepared statements are unnamed and never cached, and the statement
timeout is set with ``SET LOCAL`` at the start of each transaction instead of once per
connection.

SQLite runs in WAL mode so that one writer and many readers from several local processes
work at once. Write transactions start with ``BEGIN IMMEDIATE``: they take the write lock
up front, so two processes never both read and then fail to upgrade to a write (which
SQLite reports as "database is locked" without waiting for the busy timeout).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager, suppress
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy import event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from app.core.config import DatabaseEndpoint, DatabaseSettings
from app.db.replicas import (
    PRIMARY_POSITION_SQL,
    REPLICA_ERRORS,
    Replica,
    ReplicaSet,
    WalPosition,
    describe_error,
)
from app.errors import ConfigError, DatabaseUnavailableError, NotFoundError
from app.monitoring.metrics import DATABASE_READS

logger = logging.getLogger(__name__)

T = TypeVar("T")
PRIMARY = "primary"


class Database:
    """The engines of one process: a write engine, on SQLite a separate read engine, and
    with ``use_replicas`` one engine per configured read replica."""

    def __init__(self, settings: DatabaseSettings, *, use_replicas: bool = False) -> None:
        self.settings = settings
        self.url = async_url(settings.sqlalchemy_url())
        self.dialect = self.url.get_backend_name()
        self.replicas: ReplicaSet | None = None
        self._replica_checks: asyncio.Task[None] | None = None

        if self.dialect == "sqlite":
            _ensure_parent_folder(self.url.database)
            self.write_engine = self._sqlite_engine(begin="BEGIN IMMEDIATE", pool_size=1)
            self.read_engine = self._sqlite_engine(begin="BEGIN", pool_size=settings.pool_size)
            return

        self.write_engine = self._server_engine(self.url)
        self.read_engine = self.write_engine
        if use_replicas and settings.read_replicas:
            self.replicas = ReplicaSet(
                [
                    Replica(endpoint.address, self._server_engine(replica_url(endpoint)))
                    for endpoint in settings.read_replicas
                ],
                max_lag_seconds=settings.replica_max_lag_seconds,
                check_interval_seconds=settings.replica_check_interval_seconds,
                check_timeout_seconds=settings.connect_timeout_seconds,
            )

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

    async def read_stale(
        self,
        work: Callable[[AsyncConnection], Awaitable[T]],
        *,
        after: WalPosition | None = None,
        accept: Callable[[T], bool] | None = None,
    ) -> T:
        """Run ``work`` in a read-only transaction on a replica in rotation, or on the primary.

        ``after`` restricts the replicas to those known to have replayed that WAL position.
        A replica that fails or times out after ``replica_read_timeout_seconds`` hands the
        read to the next replica. A replica that raises NotFoundError (it may not have
        replayed the row yet), or whose result ``accept`` rejects (a row that is still
        changing), hands it straight to the primary, which decides.
        """
        for replica in self.replicas.candidates(after) if self.replicas else []:
            try:
                async with asyncio.timeout(self.settings.replica_read_timeout_seconds):
                    async with replica.engine.connect() as connection:
                        result = await work(connection)
            except NotFoundError:
                break
            except REPLICA_ERRORS as exc:
                logger.warning(
                    "read on replica %s failed, trying the next server: %s",
                    replica.name,
                    describe_error(exc),
                    extra={"action": "db.replica_read_failed", "replica": replica.name},
                )
                self.replicas.mark_failed(replica, exc)
                continue
            DATABASE_READS.labels(replica.name).inc()
            if accept is None or accept(result):
                return result
            break

        async with self.read() as connection:
            result = await work(connection)
        DATABASE_READS.labels(PRIMARY).inc()
        return result

    async def write_position(self) -> WalPosition | None:
        """Return the primary's current WAL position, which covers every committed write;
        None when there are no replicas to compare it with."""
        if self.replicas is None:
            return None
        async with self.write_engine.connect() as connection:
            return WalPosition(int(await connection.scalar(PRIMARY_POSITION_SQL)))

    async def start_replica_checks(self) -> None:
        """Check the replicas once, then keep checking them in the background until dispose()."""
        if self.replicas is None or self._replica_checks is not None:
            return
        await self.replicas.check(self.write_position)
        self._replica_checks = asyncio.create_task(
            self.replicas.run_checks(self.write_position), name="replica-checks"
        )
        for replica in self.replicas.replicas:
            logger.info(
                "read replica %s: %s",
                replica.name,
                "in rotation" if replica.in_rotation else f"out of rotation, {replica.reason}",
                extra={
                    "action": "db.replica_configured",
                    "replica": replica.name,
                    "in_rotation": replica.in_rotation,
                },
            )

    async def dispose(self) -> None:
        if self._replica_checks is not None:
            self._replica_checks.cancel()
            with suppress(asyncio.CancelledError):
                await self._replica_checks
            self._replica_checks = None
        await self.write_engine.dispose()
        if self.read_engine is not self.write_engine:
            await self.read_engine.dispose()
        for replica in self.replicas.replicas if self.replicas else []:
            await replica.engine.dispose()

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

    def _server_engine(self, url: URL) -> AsyncEngine:
        settings = self.settings
        server_settings = {"application_name": "toronto-ai"}
        connect_args: dict[str, Any] = {"timeout": settings.connect_timeout_seconds}
        if settings.pgbouncer:
            # PgBouncer hands each transaction to any server connection, so a statement
            # prepared under a name on one may be missing, or taken, on the next. Disabling
            # both caches makes asyncpg prepare every statement unnamed, inside its transaction.
            connect_args["statement_cache_size"] = 0
            connect_args["prepared_statement_cache_size"] = 0
            connect_args["prepared_statement_name_func"] = _unnamed_statement
        elif settings.statement_timeout_ms:
            server_settings["statement_timeout"] = str(settings.statement_timeout_ms)
        connect_args["server_settings"] = server_settings

        engine = create_async_engine(
            url,
            echo=settings.echo,
            pool_size=settings.pool_size,
            max_overflow=settings.max_overflow,
            pool_timeout=settings.pool_timeout_seconds,
            pool_recycle=settings.pool_recycle_seconds,
            pool_pre_ping=True,
            connect_args=connect_args,
        )
        if settings.pgbouncer and settings.statement_timeout_ms:
            # PgBouncer rejects statement_timeout as a start-up parameter, and a session-level
            # SET would leak to other clients of the server connection.
            set_timeout = f"SET LOCAL statement_timeout = {int(settings.statement_timeout_ms)}"

            @event.listens_for(engine.sync_engine, "begin")
            def limit_statement_time(connection: Any) -> None:
                connection.exec_driver_sql(set_timeout)

        return engine


def _unnamed_statement() -> str:
    return ""


def replica_url(endpoint: DatabaseEndpoint) -> URL:
    """Return the asyncpg URL of a replica; URL.create quotes the password."""
    return URL.create(
        "postgresql+asyncpg",
        username=endpoint.username,
        password=endpoint.resolved_password(),
        host=endpoint.host,
        port=endpoint.port,
        database=endpoint.database,
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
    # Read from the URL's text: get_driver_name() would load the dialect, and SQLAlchemy
    # no longer has one named "postgres", the scheme many hosting providers hand out.
    backend, _, driver = url.drivername.partition("+")
    if backend not in drivers:
        raise ConfigError(
            f"database.url: unsupported database {backend!r} in {url.render_as_string(hide_password=True)}; "
            "use a sqlite:/// file or a postgresql:// server"
        )
    if backend == "postgres" or driver in ("", "pysqlite", "psycopg2", "psycopg"):
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
