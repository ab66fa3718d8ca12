"""Schema migrations: run them once under a lock, and check the version before serving.

Several processes may start at once against one database (an API instance and workers,
or several instances in a deployment). ``upgrade()`` serialises them: on PostgreSQL with a
transaction-scoped advisory lock, which PgBouncer's transaction pooling keeps intact; on
SQLite with the database's own write lock, taken by ``BEGIN IMMEDIATE``. The first process
migrates and the others find the schema current.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text
from sqlalchemy.engine import Connection
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.engine import Database
from app.errors import DatabaseUnavailableError, SchemaVersionError

logger = logging.getLogger(__name__)

MIGRATIONS_FOLDER = Path(__file__).parent / "migrations"
MIGRATION_LOCK_ID = 7_203_614_225  # any constant shared by every process of this service


def alembic_config() -> Config:
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_FOLDER))
    return config


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    if head is None:
        raise SchemaVersionError(f"no migration scripts found in {MIGRATIONS_FOLDER}")
    return head


async def lock_startup(database: Database, connection: AsyncConnection) -> None:
    """Serialise start-up work (migrations, storing the team) across processes until commit."""
    if not database.is_sqlite:
        await connection.execute(text("SELECT pg_advisory_xact_lock(:id)"), {"id": MIGRATION_LOCK_ID})


async def upgrade(database: Database) -> None:
    """Bring the schema to the newest revision this code ships."""
    async with reporting_unavailable(database), database.transaction() as connection:
        await lock_startup(database, connection)
        before = await connection.run_sync(_current_revision)
        await connection.run_sync(_upgrade_on)
        after = await connection.run_sync(_current_revision)

    if before != after:
        logger.info(
            "database schema migrated",
            extra={"action": "db.migrated", "from_revision": before, "to_revision": after},
        )


async def check_schema(database: Database) -> None:
    """Raise SchemaVersionError unless the schema is exactly the one this code expects."""
    async with reporting_unavailable(database), database.read() as connection:
        current = await connection.run_sync(_current_revision)

    expected = head_revision()
    if current == expected:
        return
    if current is None:
        raise SchemaVersionError(
            f"the database {database.describe()} has no schema yet; run `python -m app.cli migrate`"
        )
    known = {script.revision for script in ScriptDirectory.from_config(alembic_config()).walk_revisions()}
    if current not in known:
        raise SchemaVersionError(
            f"the database schema is at revision {current}, newer than this code knows (newest "
            f"{expected}); deploy the newer version of the service instead of this one"
        )
    raise SchemaVersionError(
        f"the database schema is at revision {current} but this code needs {expected}; "
        "run `python -m app.cli migrate`"
    )


@asynccontextmanager
async def reporting_unavailable(database: Database) -> AsyncIterator[None]:
    """Turn a failure to connect into one clear DatabaseUnavailableError."""
    try:
        yield
    except (OSError, DBAPIError) as exc:
        reason = str(getattr(exc, "orig", None) or exc).splitlines()[0]
        raise DatabaseUnavailableError(
            f"cannot use the database {database.describe()}: {reason}; check that the server runs and "
            "accepts this user, and that database.url or database.master point at it"
        ) from exc


def _current_revision(connection: Connection) -> str | None:
    return MigrationContext.configure(connection).get_current_revision()


def _upgrade_on(connection: Connection) -> None:
    config = alembic_config()
    config.attributes["connection"] = connection
    command.upgrade(config, "head")
