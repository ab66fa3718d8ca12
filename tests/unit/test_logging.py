"""The log formatters: extras become fields, and uvicorn's coloured copy of a message is dropped."""

from __future__ import annotations

import json
import logging

from app.core.logging import JSONFormatter, TextFormatter


def make_record(**extra: object) -> logging.LogRecord:
    record = logging.LogRecord("uvicorn.error", logging.INFO, __file__, 1, "Started server", None, None)
    record.__dict__.update(extra)
    return record


def test_json_line_carries_extras_but_not_color_message() -> None:
    record = make_record(action="api.started", color_message="\x1b[36mStarted\x1b[0m server")

    entry = json.loads(JSONFormatter().format(record))

    assert entry["action"] == "api.started"
    assert entry["message"] == "Started server"
    assert "color_message" not in entry


def test_text_line_has_no_ansi_escape() -> None:
    record = make_record(port=8000, color_message="\x1b[36mStarted\x1b[0m server")

    line = TextFormatter().format(record)

    assert line.endswith("Started server port=8000")
    assert "\x1b" not in line
