"""Read replicas: which ones are in rotation, and how far each one is behind the primary.

A ``ReplicaSet`` checks every replica each ``database.replica_check_interval_seconds``. A
replica is in rotation while its check succeeds, it is still a standby (``pg_is_in_recovery()``) and
lags at most ``database.replica_max_lag_seconds``. A read that fails on a replica takes it
out of rotation at once; the next successful check brings it back.

Lag is measured in time, not bytes. A replica that has replayed up to the primary's current
WAL position has no lag. Otherwise its lag is the smaller of two upper bounds: the time
since it last replayed a transaction (``pg_last_xact_replay_timestamp()``) and the time since
a check last found it caught up. The second bound keeps a replica of an idle primary in
rotation when one new write arrives just before a check.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from sqlalchemy import text
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from sqlalchemy.ext.asyncio import AsyncEngine

from app.monitoring.metrics import REPLICA_IN_ROTATION, REPLICA_LAG_SECONDS

logger = logging.getLogger(__name__)

# Errors after which a read is retried elsewhere: the server is down, refused the
# connection, cancelled the query for a recovery conflict, or timed out.
REPLICA_ERRORS = (OSError, DBAPIError, PoolTimeoutError, TimeoutError)

PRIMARY_POSITION_SQL = text("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn")
REPLICA_STATE_SQL = text(
    "SELECT pg_is_in_recovery(), pg_last_wal_replay_lsn() - '0/0'::pg_lsn, "
    "EXTRACT(EPOCH FROM clock_timestamp() - pg_last_xact_replay_timestamp())"
)


@dataclass(frozen=True, order=True, slots=True)
class WalPosition:
    """A PostgreSQL WAL position (``pg_lsn``), as a byte offset."""

    offset: int

    @classmethod
    def parse(cls, value: str) -> WalPosition:
        """Parse the ``pg_lsn`` text form, two hexadecimal numbers such as ``16/B374D848``."""
        match = re.fullmatch(r"([0-9A-Fa-f]{1,8})/([0-9A-Fa-f]{1,8})", value.strip())
        if match is None:
            raise ValueError(f"{value!r} is not a WAL position such as 16/B374D848")
        return cls((int(match[1], 16) << 32) | int(match[2], 16))

    def __str__(self) -> str:
        return f"{self.offset >> 32:X}/{self.offset & 0xFFFFFFFF:X}"


class Replica:
    """One read replica: its engine and the state its last check or read found."""

    def __init__(self, name: str, engine: AsyncEngine) -> None:
        self.name = name
        self.engine = engine
        self.in_rotation = False
        self.reason = "not checked yet"
        self.replay_position: WalPosition | None = None
        self.lag_seconds: float | None = None
        self.caught_up_at: float | None = None  # time.monotonic() of the check that found it caught up

    def has_replayed(self, position: WalPosition | None) -> bool:
        if position is None:
            return True
        return self.replay_position is not None and self.replay_position >= position

    def __repr__(self) -> str:
        return f"Replica({self.name!r}, in_rotation={self.in_rotation}, lag_seconds={self.lag_seconds})"


class ReplicaSet:
    """The replicas of one process, their health checks, and the choice of one for a read."""

    def __init__(
        self,
        replicas: list[Replica],
        *,
        max_lag_seconds: float,
        check_interval_seconds: float,
        check_timeout_seconds: float,
    ) -> None:
        self.replicas = replicas
        self.max_lag_seconds = max_lag_seconds
        self.check_interval_seconds = check_interval_seconds
        self.check_timeout_seconds = check_timeout_seconds
        self._turn = itertools.count()
        self._primary_failing = False
        for replica in replicas:
            REPLICA_IN_ROTATION.labels(replica.name).set(0)
            REPLICA_LAG_SECONDS.labels(replica.name).set(math.nan)

    def candidates(self, after: WalPosition | None = None) -> list[Replica]:
        """Return the replicas in rotation that have replayed ``after``, starting with the next in turn."""
        usable = [replica for replica in self.replicas if replica.in_rotation and replica.has_replayed(after)]
        if not usable:
            return []
        start = next(self._turn) % len(usable)
        return usable[start:] + usable[:start]

    def mark_failed(self, replica: Replica, error: BaseException) -> None:
        """Take a replica out of rotation after a failed read, until a check finds it healthy."""
        self._set_state(replica, False, f"a read failed: {describe_error(error)}")

    async def run_checks(self, read_primary_position: Callable[[], Awaitable[WalPosition]]) -> None:
        """Check every replica each interval until cancelled."""
        while True:
            try:
                await self.check(read_primary_position)
            except Exception:  # noqa: BLE001 - the checks must outlive one unexpected failure
                # Replicas keep their last state; a read that fails on one still hands over.
                logger.exception(
                    "checking the read replicas failed", extra={"action": "db.replica_check_failed"}
                )
            await asyncio.sleep(self.check_interval_seconds)

    async def check(self, read_primary_position: Callable[[], Awaitable[WalPosition]]) -> None:
        """Check every replica once, against the primary's current WAL position."""
        try:
            async with asyncio.timeout(self.check_timeout_seconds):
                primary_position = await read_primary_position()
        except REPLICA_ERRORS as exc:
            # Without the primary's position no lag can be measured, so replicas keep their state.
            if not self._primary_failing:
                logger.warning(
                    "cannot read the primary's WAL position to check replicas: %s",
                    describe_error(exc),
                    extra={"action": "db.replica_check_failed"},
                )
            self._primary_failing = True
            return
        self._primary_failing = False
        read_at = time.monotonic()
        await asyncio.gather(
            *(self._check_one(replica, primary_position, read_at) for replica in self.replicas)
        )

    async def _check_one(self, replica: Replica, primary_position: WalPosition, read_at: float) -> None:
        try:
            async with asyncio.timeout(self.check_timeout_seconds):
                async with replica.engine.connect() as connection:
                    in_recovery, replayed, seconds_since_replay = (
                        await connection.execute(REPLICA_STATE_SQL)
                    ).one()
        except REPLICA_ERRORS as exc:
            REPLICA_LAG_SECONDS.labels(replica.name).set(math.nan)
            self._set_state(replica, False, f"the check failed: {describe_error(exc)}")
            return

        if not in_recovery:
            REPLICA_LAG_SECONDS.labels(replica.name).set(math.nan)
            self._set_state(replica, False, "it is not a standby (pg_is_in_recovery() is false)")
            return

        replica.replay_position = WalPosition(int(replayed)) if replayed is not None else None
        if replica.has_replayed(primary_position):
            replica.caught_up_at = read_at
            lag = 0.0
        else:
            bounds = [float(seconds_since_replay)] if seconds_since_replay is not None else []
            if replica.caught_up_at is not None:
                bounds.append(time.monotonic() - replica.caught_up_at)
            lag = max(0.0, min(bounds)) if bounds else math.inf
        replica.lag_seconds = lag
        REPLICA_LAG_SECONDS.labels(replica.name).set(lag if math.isfinite(lag) else math.nan)

        if lag > self.max_lag_seconds:
            shown = f"{lag:.1f} s" if math.isfinite(lag) else "unknown"
            self._set_state(
                replica,
                False,
                f"it lags {shown} behind the primary, over the bound of {self.max_lag_seconds} s",
            )
        else:
            self._set_state(replica, True, "healthy")

    def _set_state(self, replica: Replica, in_rotation: bool, reason: str) -> None:
        changed = replica.in_rotation != in_rotation
        replica.in_rotation = in_rotation
        replica.reason = reason
        REPLICA_IN_ROTATION.labels(replica.name).set(1 if in_rotation else 0)
        if not changed:
            return
        if in_rotation:
            logger.info(
                "replica %s is in rotation",
                replica.name,
                extra={
                    "action": "db.replica_in_rotation",
                    "replica": replica.name,
                    "lag_seconds": replica.lag_seconds,
                },
            )
        else:
            logger.warning(
                "replica %s is out of rotation: %s",
                replica.name,
                reason,
                extra={"action": "db.replica_out_of_rotation", "replica": replica.name, "reason": reason},
            )


def describe_error(error: BaseException) -> str:
    """Return the first line of a driver error, without the SQL that SQLAlchemy appends."""
    original = getattr(error, "orig", None) or error
    message = str(original).splitlines()[0] if str(original) else ""
    return f"{type(original).__name__}: {message}" if message else type(original).__name__
