"""Alembic environment: migrates the connection handed over by ``app.db.migrate``, or the
configured database when Alembic is run by hand."""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection

from app.db.models import Base

target_metadata = Base.metadata


def run_on_connection(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


async def run_from_settings() -> None:
    from app.core.config import load_settings
    from app.db.engine import Database

    database = Database(load_settings().database)
    try:
        async with database.transaction() as connection:
            await connection.run_sync(run_on_connection)
    finally:
        await database.dispose()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_on_connection(connection)
else:
    asyncio.run(run_from_settings())
