"""Row locking shared by every transaction that writes several task rows."""

from __future__ import annotations

from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncConnection

from app.db.models import tasks


async def lock_tasks_in_id_order(connection: AsyncConnection, condition: Any) -> None:
    """Lock the task rows matching ``condition`` in id order, on PostgreSQL.

    An UPDATE of several rows locks them in the order it finds them. The transactions that
    write several task rows (a completion batch, a heartbeat, a cancel, a failed task that
    cancels the rest of its project) call this first, so two of them never wait for each
    other crosswise, which PostgreSQL would end as a deadlock. SQLite has no row locks: its
    write transaction is exclusive.
    """
    if connection.dialect.name == "postgresql":
        await connection.execute(select(tasks.c.id).where(condition).order_by(tasks.c.id).with_for_update())
