"""A PostgreSQL 15 primary, a streaming replica and one PgBouncer in front of each, on loopback.

Tests start it through a session-scoped fixture; people start it by hand with::

    python -m tests.services.postgres_cluster start [--dir run/postgres-cluster] [--port-base 55400]
    python -m tests.services.postgres_cluster status
    python -m tests.services.postgres_cluster stop

Ports, from ``--port-base`` (``TAT_CLUSTER_PORT_BASE``, default 55400): primary +1, replica
+2, PgBouncer of the primary +3, PgBouncer of the replica +4. The replica is made with
``pg_basebackup -R`` and streams from the primary. Both PgBouncers run the shipped
``config/pgbouncer.ini`` with only the target server, the port and the file paths replaced.
The servers accept the superuser ``postgres`` without a password on 127.0.0.1 (for tests
and administration) and the application role ``toronto`` with a SCRAM password, which is
written to ``secrets/app_password`` in the cluster folder.

Missing Debian packages (postgresql-15, pgbouncer) are installed with apt-get when running
as root. PostgreSQL and PgBouncer refuse to run as root, so as root every server runs as
the ``postgres`` OS user, and the cluster folder belongs to it.
"""

from __future__ import annotations

import argparse
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
SHIPPED_PGBOUNCER_INI = REPO_ROOT / "config" / "pgbouncer.ini"
POSTGRES_BIN = Path("/usr/lib/postgresql/15/bin")
DEBIAN_PACKAGES = ("postgresql-15", "postgresql-client-15", "pgbouncer")
DEFAULT_PORT_BASE = int(os.environ.get("TAT_CLUSTER_PORT_BASE", "55400"))
DEFAULT_FOLDER = REPO_ROOT / "run" / "postgres-cluster"
APP_ROLE = "toronto"
OS_USER = "postgres"
START_TIMEOUT_SECONDS = 60
STOP_TIMEOUT_SECONDS = 30


class ClusterError(RuntimeError):
    """A server of the cluster could not be installed, started or stopped."""


@dataclass(frozen=True)
class Ports:
    primary: int
    replica: int
    primary_bouncer: int
    replica_bouncer: int

    @classmethod
    def from_base(cls, base: int) -> Ports:
        return cls(base + 1, base + 2, base + 3, base + 4)


class PostgresCluster:
    """The servers of one cluster folder; every method is synchronous and idempotent where it can be."""

    def __init__(self, folder: Path, port_base: int = DEFAULT_PORT_BASE) -> None:
        self.folder = folder.resolve()
        self.ports = Ports.from_base(port_base)
        self.primary_data = self.folder / "primary"
        self.replica_data = self.folder / "replica"
        self.socket_folder = self.folder / "sockets"
        self.log_folder = self.folder / "logs"
        self.password_file = self.folder / "secrets" / "app_password"

    # -- lifecycle ------------------------------------------------------------------------

    def start(self) -> None:
        """Install what is missing, create the servers on first use, and start every one."""
        ensure_packages()
        self._prepare_folder()
        if not (self.primary_data / "PG_VERSION").exists():
            self._init_primary()
        self.start_primary()
        self._ensure_app_role()
        if not (self.replica_data / "PG_VERSION").exists():
            self._base_backup()
        self.start_replica()
        self.start_bouncer("primary", self.ports.primary, self.ports.primary_bouncer)
        self.start_bouncer("replica", self.ports.replica, self.ports.replica_bouncer)

    def stop(self) -> None:
        """Stop both PgBouncers and both servers; what is not running is skipped."""
        for name in ("replica", "primary"):
            self.stop_bouncer(name)
        self.stop_replica()
        self._pg_ctl(self.primary_data, "stop", "-m", "fast", check=False)

    def status(self) -> dict[str, bool]:
        return {
            "primary": port_open(self.ports.primary),
            "replica": port_open(self.ports.replica),
            "pgbouncer-primary": port_open(self.ports.primary_bouncer),
            "pgbouncer-replica": port_open(self.ports.replica_bouncer),
        }

    def start_primary(self) -> None:
        self._start_server(self.primary_data, self.ports.primary, "primary")

    def start_replica(self) -> None:
        self._start_server(self.replica_data, self.ports.replica, "replica")

    def stop_replica(self, mode: str = "fast") -> None:
        """Stop the replica; ``mode`` ``immediate`` stops it the way a crash would."""
        self._pg_ctl(self.replica_data, "stop", "-m", mode, check=False)

    def pause_replay(self) -> None:
        self.sql(self.ports.replica, "SELECT pg_wal_replay_pause()")

    def resume_replay(self) -> None:
        self.sql(self.ports.replica, "SELECT pg_wal_replay_resume()")

    # -- databases ------------------------------------------------------------------------

    def app_password(self) -> str:
        return self.password_file.read_text(encoding="utf-8").strip()

    def create_database(self, name: str) -> None:
        """Create a database owned by the application role, and wait until the replica has it."""
        if not re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name):
            raise ValueError(f"database name {name!r}: use lower-case letters, digits and _")
        self.sql(self.ports.primary, f'CREATE DATABASE "{name}" OWNER {APP_ROLE}')
        self.wait_for_replay()

    def drop_database(self, name: str) -> None:
        self.sql(self.ports.primary, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

    def wait_for_replay(self, timeout: float = 30.0) -> None:
        """Wait until the replica has replayed everything the primary has written so far."""
        target = self.sql(self.ports.primary, "SELECT pg_current_wal_lsn()")
        deadline = time.monotonic() + timeout
        query = f"SELECT pg_last_wal_replay_lsn() >= '{target}'::pg_lsn"
        while self.sql(self.ports.replica, query) != "t":
            if time.monotonic() > deadline:
                raise ClusterError(f"the replica has not replayed up to {target} after {timeout} s")
            time.sleep(0.05)

    def sql(self, port: int, statement: str, database: str = "postgres") -> str:
        """Run one statement as the superuser and return its output, unaligned."""
        completed = self._run(
            [str(POSTGRES_BIN / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1"]
            + ["-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", database, "-c", statement],
            check=False,
        )
        if completed.returncode != 0:
            raise ClusterError(f"psql on port {port} failed for {statement!r}: {completed.stderr.strip()}")
        return completed.stdout.strip()

    # -- servers --------------------------------------------------------------------------

    def _prepare_folder(self) -> None:
        for folder in (self.folder, self.socket_folder, self.log_folder, self.password_file.parent):
            folder.mkdir(parents=True, exist_ok=True)
        # Ancestors must be traversable by the postgres OS user (pytest's own folders are 0700).
        self.folder.chmod(0o755)
        if not self.password_file.exists():
            self.password_file.write_text(secrets.token_urlsafe(24) + "\n", encoding="utf-8")
        self.password_file.chmod(0o600)
        if os.geteuid() == 0:
            for path in (self.folder, self.socket_folder, self.log_folder):
                shutil.chown(path, OS_USER, OS_USER)

    def _init_primary(self) -> None:
        self._run(
            [str(POSTGRES_BIN / "initdb"), "-D", str(self.primary_data), "-U", "postgres"]
            + ["--auth-local=trust", "--auth-host=scram-sha-256", "--encoding=UTF8", "--no-instructions"]
        )
        # The superuser may log in from loopback without a password, to administer and to
        # stream WAL to the replica; every other role needs its password.
        hba = self.primary_data / "pg_hba.conf"
        rules = (
            "host all postgres 127.0.0.1/32 trust\n"
            "host replication postgres 127.0.0.1/32 trust\n"
            "host all all 127.0.0.1/32 scram-sha-256\n"
        )
        self._write_as_owner(hba, "local all all trust\n" + rules)

    def _ensure_app_role(self) -> None:
        password = self.app_password().replace("'", "''")
        exists = self.sql(self.ports.primary, f"SELECT 1 FROM pg_roles WHERE rolname = '{APP_ROLE}'")
        verb = "ALTER" if exists == "1" else "CREATE"
        self.sql(self.ports.primary, f"{verb} ROLE {APP_ROLE} LOGIN PASSWORD '{password}'")

    def _base_backup(self) -> None:
        self._run(
            [str(POSTGRES_BIN / "pg_basebackup"), "-h", "127.0.0.1", "-p", str(self.ports.primary)]
            + ["-U", "postgres", "-D", str(self.replica_data), "-R", "-X", "stream", "-c", "fast"]
        )

    def _start_server(self, data: Path, port: int, name: str) -> None:
        if port_open(port):
            return
        options = (
            f"-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={self.socket_folder} "
            "-c max_connections=200 -c shared_buffers=64MB -c hot_standby_feedback=on "
            "-c wal_receiver_status_interval=1s"
        )
        log = self.log_folder / f"{name}.log"
        self._pg_ctl(data, "start", "-w", "-t", str(START_TIMEOUT_SECONDS), "-l", str(log), "-o", options)
        wait_for_port(port, name, log)

    def _pg_ctl(self, data: Path, *arguments: str, check: bool = True) -> None:
        if not (data / "PG_VERSION").exists():
            return
        completed = self._run([str(POSTGRES_BIN / "pg_ctl"), "-D", str(data), *arguments], check=False)
        if check and completed.returncode != 0:
            raise ClusterError(f"pg_ctl {' '.join(arguments)} on {data} failed: {completed.stderr.strip()}")

    # -- PgBouncer ------------------------------------------------------------------------

    def bouncer_folder(self, name: str) -> Path:
        return self.folder / f"pgbouncer-{name}"

    def start_bouncer(self, name: str, server_port: int, listen_port: int) -> None:
        if port_open(listen_port):
            return
        folder = self.bouncer_folder(name)
        folder.mkdir(exist_ok=True)
        secret = self.sql(
            self.ports.primary, f"SELECT rolpassword FROM pg_authid WHERE rolname = '{APP_ROLE}'"
        )
        userlist = folder / "userlist.txt"
        userlist.write_text(f'"{APP_ROLE}" "{secret}"\n', encoding="utf-8")
        userlist.chmod(0o600)
        ini = folder / "pgbouncer.ini"
        ini.write_text(
            bouncer_ini(
                SHIPPED_PGBOUNCER_INI.read_text(encoding="utf-8"),
                server_port=server_port,
                listen_port=listen_port,
                folder=folder,
            ),
            encoding="utf-8",
        )
        if os.geteuid() == 0:
            for path in (folder, userlist, ini):
                shutil.chown(path, OS_USER, OS_USER)
        self._run(["pgbouncer", "-d", str(ini)])
        wait_for_port(listen_port, f"pgbouncer-{name}", folder / "pgbouncer.log")

    def stop_bouncer(self, name: str) -> None:
        pid_file = self.bouncer_folder(name) / "pgbouncer.pid"
        try:
            pid = int(pid_file.read_text().strip())
        except (OSError, ValueError):
            return
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + STOP_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.05)
        raise ClusterError(f"pgbouncer-{name} (pid {pid}) still runs {STOP_TIMEOUT_SECONDS} s after SIGTERM")

    # -- helpers --------------------------------------------------------------------------

    def _run(self, command: list[str], check: bool = True) -> subprocess.CompletedProcess[str]:
        if os.geteuid() == 0:
            command = ["runuser", "-u", OS_USER, "--", *command]
        completed = subprocess.run(
            command, capture_output=True, text=True, stdin=subprocess.DEVNULL, cwd="/", check=False
        )
        if check and completed.returncode != 0:
            raise ClusterError(
                f"{' '.join(command)} exited with {completed.returncode}: "
                f"{(completed.stderr or completed.stdout).strip()}"
            )
        return completed

    def _write_as_owner(self, path: Path, text: str) -> None:
        path.write_text(text, encoding="utf-8")
        if os.geteuid() == 0:
            shutil.chown(path, OS_USER, OS_USER)


def bouncer_ini(shipped: str, *, server_port: int, listen_port: int, folder: Path) -> str:
    """Return the shipped pgbouncer.ini with the target server, port and file paths replaced."""
    replacements = {
        "listen_port": str(listen_port),
        "auth_file": str(folder / "userlist.txt"),
        "logfile": str(folder / "pgbouncer.log"),
        "pidfile": str(folder / "pgbouncer.pid"),
    }
    lines = []
    for line in shipped.splitlines():
        key = line.split("=", 1)[0].strip()
        if key == "*":
            line = f"* = host=127.0.0.1 port={server_port}"
        elif key in replacements:
            line = f"{key} = {replacements.pop(key)}"
        lines.append(line)
    if replacements:
        raise ClusterError(f"{SHIPPED_PGBOUNCER_INI} has no line for {', '.join(replacements)}")
    return "\n".join(lines) + "\n"


def ensure_packages() -> None:
    """Install PostgreSQL 15 and PgBouncer from Debian's packages if they are missing."""
    if (POSTGRES_BIN / "initdb").exists() and shutil.which("pgbouncer"):
        return
    command = ["apt-get", "install", "-y", "--no-install-recommends", *DEBIAN_PACKAGES]
    if os.geteuid() != 0:
        raise ClusterError(
            f"PostgreSQL 15 or PgBouncer is missing; install them with `sudo {' '.join(command)}`"
        )
    environment = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for step in (["apt-get", "update"], command):
        completed = subprocess.run(step, capture_output=True, text=True, env=environment, check=False)
        if completed.returncode != 0:
            raise ClusterError(f"{' '.join(step)} failed: {completed.stderr.strip()[-2000:]}")


def port_open(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.settimeout(0.5)
        return probe.connect_ex(("127.0.0.1", port)) == 0


def wait_for_port(port: int, name: str, log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_SECONDS
    while not port_open(port):
        if time.monotonic() > deadline:
            tail = log.read_text(errors="replace")[-2000:] if log.exists() else "(no log)"
            raise ClusterError(
                f"{name} does not listen on 127.0.0.1:{port} after {START_TIMEOUT_SECONDS} s\n{tail}"
            )
        time.sleep(0.05)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.services.postgres_cluster",
        description="Start, stop or show a local PostgreSQL primary, replica and their PgBouncers.",
    )
    parser.add_argument("command", choices=("start", "stop", "status"))
    parser.add_argument(
        "--dir", type=Path, default=DEFAULT_FOLDER, help="cluster folder (default: run/postgres-cluster)"
    )
    parser.add_argument(
        "--port-base", type=int, default=DEFAULT_PORT_BASE, help="ports are base+1 to base+4 (default: 55400)"
    )
    arguments = parser.parse_args(argv)
    cluster = PostgresCluster(arguments.dir, arguments.port_base)
    try:
        if arguments.command == "start":
            cluster.start()
        elif arguments.command == "stop":
            cluster.stop()
    except ClusterError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, running in cluster.status().items():
        port = {
            "primary": cluster.ports.primary,
            "replica": cluster.ports.replica,
            "pgbouncer-primary": cluster.ports.primary_bouncer,
            "pgbouncer-replica": cluster.ports.replica_bouncer,
        }[name]
        print(f"{name:18} 127.0.0.1:{port}  {'running' if running else 'stopped'}")
    if cluster.password_file.exists():
        print(f"password of role {APP_ROLE!r} in {cluster.password_file}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
