"""Structured logging: one line per record, with a stable ``action`` and the ids involved.

Call sites pass ids through ``extra``::

    logger.info("task claimed", extra={"action": "task.claimed", "task_id": ..., "worker_id": ...})

The JSON format is for machines (one object per line); the text format appends the same
fields as ``key=value`` for people reading a terminal.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime

# Attributes every LogRecord has; anything else on a record came from ``extra``.
_STANDARD_ATTRIBUTES = frozenset(
    vars(logging.LogRecord("", 0, "", 0, "", None, None)).keys() | {"message", "asctime", "taskName"}
)


# uvicorn attaches a copy of some messages with ANSI colour codes for its own formatter.
_IGNORED_EXTRAS = frozenset({"color_message"})


def record_fields(record: logging.LogRecord) -> dict[str, object]:
    return {
        key: value
        for key, value in vars(record).items()
        if key not in _STANDARD_ATTRIBUTES and key not in _IGNORED_EXTRAS
    }


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        entry.update(record_fields(record))
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        fields = record_fields(record)
        if fields:
            line += " " + " ".join(f"{key}={value}" for key, value in fields.items())
        return line


def configure_logging(level: str = "INFO", log_format: str = "text") -> None:
    """Install one handler on the root logger; called once by each process entry point."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JSONFormatter() if log_format == "json" else TextFormatter())

    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)

    # uvicorn's access log duplicates the request log line written by the API middleware.
    logging.getLogger("uvicorn.access").setLevel(logging.WARNING)
    # Alembic reports its dialect on every start; the service logs its own db.migrated line.
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # httpx logs every request at INFO, so the balancer's health probes would add a line per
    # instance every few seconds. The balancer logs failed probes itself.
    logging.getLogger("httpx").setLevel(logging.WARNING)
