"""A PostgreSQL primary, a streaming replica and their PgBouncers, shared by every test here.

The cluster starts once per test session on loopback ports from ``TAT_CLUSTER_PORT_BASE``
(default 55400) in a temporary folder, and stops when the session ends. Each test gets its
own database on it and a config folder whose ``config/database_config.json`` points the
application at the two PgBouncers, with the password in a file.
"""

from __future__ import annotations

import json
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.services.postgres_cluster import DEFAULT_PORT_BASE, PostgresCluster, port_open


@pytest.fixture(scope="session")
def postgres_cluster() -> Iterator[PostgresCluster]:
    folder = Path(tempfile.mkdtemp(prefix="tat-cluster-"))
    cluster = PostgresCluster(folder, DEFAULT_PORT_BASE)
    busy = [port for port in vars(cluster.ports).values() if port_open(port)]
    if busy:
        pytest.fail(
            f"ports {busy} of the test cluster are in use; stop the other cluster "
            "(python -m tests.services.postgres_cluster stop) or set TAT_CLUSTER_PORT_BASE"
        )
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def cluster_database(postgres_cluster: PostgresCluster) -> Iterator[str]:
    name = f"tat_cluster_{uuid.uuid4().hex[:12]}"
    postgres_cluster.create_database(name)
    try:
        yield name
    finally:
        # A test that paused replay must not leave the next test's database unreplicated.
        postgres_cluster.resume_replay()
        postgres_cluster.drop_database(name)


def write_database_config(
    folder: Path,
    cluster: PostgresCluster,
    database: str,
    *,
    replicas: bool = True,
    replica_password: dict[str, str] | None = None,
    replica_port: int | None = None,
    **settings: object,
) -> Path:
    """Write config/database_config.json under ``folder`` for the cluster and return ``folder``.

    Both endpoints read the password from the cluster's password file, unless
    ``replica_password`` gives the replica's password keys. The replica is the replica's
    PgBouncer unless ``replica_port`` names another port.
    """
    endpoint = {"host": "127.0.0.1", "username": "toronto", "database": database}
    password = {"password_file": str(cluster.password_file)}
    replica = {
        **endpoint,
        "port": replica_port or cluster.ports.replica_bouncer,
        **(replica_password or password),
    }
    document = {
        "database": {
            "master": {**endpoint, "port": cluster.ports.primary_bouncer, **password},
            "read_replicas": [replica] if replicas else [],
            "pgbouncer": True,
            "replica_check_interval_seconds": 0.2,
            "replica_max_lag_seconds": 1.0,
            "replica_read_timeout_seconds": 1.0,
            # Generous, so a check on a busy CI host does not take a healthy replica out.
            "connect_timeout_seconds": 5.0,
            **settings,
        }
    }
    (folder / "config").mkdir(parents=True, exist_ok=True)
    (folder / "config" / "database_config.json").write_text(json.dumps(document, indent=2), encoding="utf-8")
    return folder
