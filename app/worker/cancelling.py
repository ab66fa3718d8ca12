"""Telling a cancelled task from a failed call in loops that survive errors."""

from __future__ import annotations

import asyncio


def raise_if_cancelling(error: BaseException) -> None:
    """Raise CancelledError when the current task is being cancelled.

    A loop that logs an ``Exception`` and goes on must still end when its task is cancelled.
    When a cancellation lands inside a database call, the driver or SQLAlchemy may clean up,
    fail doing so, and raise that error in place of the CancelledError. Such a loop would then
    log it and run on, and the shutdown that cancelled it would wait forever.
    """
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError from error
