"""Signals sent after a write transaction commits, derived from the rows it inserted.

Every state change of a project appends events in the same transaction (``append_events``).
``CommitRelay`` watches inserts into ``events`` and ``llm_calls`` on the write engine,
keeps them with the connection until its transaction ends, and once the connection returns
to the pool after a commit it publishes:

- the events themselves, for event streams on every instance;
- ``task-ready`` when an event means a task can be claimed now;
- ``cancel`` for a project that was cancelled;
- and it drops the cached response of a project that got model calls but no events, which
  happens only when a worker records the calls of an attempt that lost its lease.

A rolled-back transaction publishes nothing. The pool hands a connection back only after
``COMMIT`` has returned, so a receiver that reads the database finds the new rows.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.sql.dml import Insert

from app.cache.base import CacheKind
from app.cache.service import Cache
from app.db.models import events, llm_calls
from app.signals.bus import SignalBus

logger = logging.getLogger(__name__)

# Events after which some task can be claimed at once. A retried task waits for its backoff
# first, so its wake-up only starts a claim that may come too early; the poll catches it.
READY_EVENT_TYPES = frozenset(
    {"project.created", "task.ready", "task.released", "task.lease_expired", "task.retrying"}
)
PENDING = "toronto_ai.pending_signals"
COMMITTED = "toronto_ai.committed_signals"


@dataclass
class _Changes:
    events: list[dict[str, Any]] = field(default_factory=list)
    called_projects: set[str] = field(default_factory=set)


class CommitRelay:
    def __init__(self, signals: SignalBus, cache: Cache) -> None:
        self.signals = signals
        self.cache = cache
        self._tasks: set[asyncio.Task[None]] = set()

    def install(self, engine: AsyncEngine) -> None:
        sync_engine = engine.sync_engine
        event.listen(sync_engine, "before_execute", self._capture)
        event.listen(sync_engine, "commit", self._committing)
        event.listen(sync_engine, "rollback", self._rolled_back)
        event.listen(sync_engine, "checkin", self._checked_in)

    def _capture(self, connection, statement, multiparams, params, execution_options) -> None:
        if not isinstance(statement, Insert):
            return
        table = statement.table
        if table is not events and table is not llm_calls:
            return
        # Rows given as parameters; an INSERT with inline VALUES has none and is not relayed,
        # which only delays its readers until they poll.
        rows = [row for row in (multiparams or [params]) if isinstance(row, dict) and "project_id" in row]
        if statement.select is not None:
            # INSERT ... SELECT unnest(...) of ``insert_rows`` on PostgreSQL: one list per column.
            rows = [row for columns in rows for row in _rows_of_columns(columns)]
        if not rows:
            return
        changes = connection.info.get(PENDING)
        if changes is None:
            changes = connection.info[PENDING] = _Changes()
        if table is events:
            changes.events.extend(rows)
        else:
            changes.called_projects.update(row["project_id"] for row in rows)

    def _committing(self, connection) -> None:
        # Runs before COMMIT is sent; the changes wait in the pool record's info until the
        # connection is checked in, which happens after COMMIT returned.
        if connection.invalidated:
            return
        changes = connection.info.pop(PENDING, None)
        if changes is not None:
            connection.info[COMMITTED] = changes

    def _rolled_back(self, connection) -> None:
        # An invalidated connection (its driver call was cancelled or failed) raises on any
        # access to ``info``, and that error would replace the one being handled. Its changes
        # are dropped at check-in instead.
        if connection.invalidated:
            return
        connection.info.pop(PENDING, None)
        connection.info.pop(COMMITTED, None)

    def _checked_in(self, dbapi_connection, connection_record) -> None:
        changes = connection_record.info.pop(COMMITTED, None)
        connection_record.info.pop(PENDING, None)
        if changes is None:
            return
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return  # a connection collected outside the event loop; readers poll instead
        self.publish(changes)

    def publish(self, changes: _Changes) -> None:
        by_project: dict[str, list[dict[str, Any]]] = {}
        for row in changes.events:
            by_project.setdefault(row["project_id"], []).append(_public_event(row))

        for project_id, project_events in by_project.items():
            self.signals.publish_events(project_id, project_events)
            if any(item["type"] == "project.cancelled" for item in project_events):
                self.signals.publish_cancel(project_id)
        if any(row["type"] in READY_EVENT_TYPES for row in changes.events):
            self.signals.publish_task_ready()

        for project_id in changes.called_projects - by_project.keys():
            task = asyncio.get_running_loop().create_task(self.cache.delete(CacheKind.PROJECT, project_id))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)


def _rows_of_columns(columns: dict[str, list[Any]]) -> list[dict[str, Any]]:
    keys = list(columns)
    return [dict(zip(keys, values, strict=True)) for values in zip(*columns.values(), strict=True)]


def _public_event(row: dict[str, Any]) -> dict[str, Any]:
    created_at = row["created_at"]
    return {
        "seq": row["seq"],
        "type": row["type"],
        "task_id": row.get("task_id"),
        "data": row.get("data") or {},
        "created_at": created_at.isoformat() if isinstance(created_at, datetime) else created_at,
    }
