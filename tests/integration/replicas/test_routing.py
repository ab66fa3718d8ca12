"""The API in process, through PgBouncer, with reads routed between the primary and a replica.

The embedded worker runs projects with the offline provider, so no model API is called.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import asyncpg
import httpx
import pytest
from prometheus_client import REGISTRY
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError

from app.api.app import create_app
from app.api.consistency import POSITION_COOKIE, POSITION_HEADER
from app.core.config import load_settings
from app.db.engine import PRIMARY, Database
from app.db.replicas import Replica, WalPosition
from app.runtime import Runtime
from tests.integration.helpers import FAST_WORKER
from tests.integration.replicas.conftest import write_database_config
from tests.services.postgres_cluster import PostgresCluster

pytestmark = pytest.mark.postgres_cluster

BRIEF = "# Replicated demo\n\nBuild a small thing that works."
WAIT_SECONDS = 30.0


class ClusterApi:
    """An app on the cluster: its runtime, and clients that each keep their own cookies."""

    def __init__(self, app, runtime: Runtime) -> None:
        self.app = app
        self.runtime = runtime
        self.clients: list[httpx.AsyncClient] = []

    def client(self) -> httpx.AsyncClient:
        client = httpx.AsyncClient(transport=httpx.ASGITransport(app=self.app), base_url="http://test")
        self.clients.append(client)
        return client

    @property
    def replica(self) -> Replica:
        return self.runtime.database.replicas.replicas[0]


@pytest.fixture
async def cluster_api(
    postgres_cluster: PostgresCluster, cluster_database: str, tmp_path: Path
) -> AsyncIterator[ClusterApi]:
    config = write_database_config(tmp_path, postgres_cluster, cluster_database)
    settings = load_settings(config_dir=config, environ={"TORONTO_AI_ENV": "test", **FAST_WORKER})
    app = create_app(settings, embedded_worker=True)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    api = ClusterApi(app, app.state.runtime)
    try:
        yield api
    finally:
        for client in api.clients:
            await client.aclose()
        await lifespan.__aexit__(None, None, None)


def reads_on(server: str) -> float:
    return REGISTRY.get_sample_value("toronto_ai_database_reads_total", {"server": server}) or 0.0


def replica_lag(name: str) -> float | None:
    return REGISTRY.get_sample_value("toronto_ai_database_replica_lag_seconds", {"replica": name})


async def wait_for(condition: Callable[[], object], description: str, seconds: float = WAIT_SECONDS) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds} s waiting for {description}")
        await asyncio.sleep(0.05)


async def create_project(client: httpx.AsyncClient) -> str:
    response = await client.post("/api/v1/projects", json={"brief": BRIEF})
    assert response.status_code == 202, response.text
    return response.json()["id"]


async def wait_completed(client: httpx.AsyncClient, project_id: str) -> dict:
    deadline = time.monotonic() + WAIT_SECONDS
    while time.monotonic() < deadline:
        response = await client.get(f"/api/v1/projects/{project_id}")
        assert response.status_code == 200, response.text
        if response.json()["status"] == "completed":
            return response.json()
        await asyncio.sleep(0.1)
    raise AssertionError(f"project {project_id} did not complete within {WAIT_SECONDS} s")


async def wait_in_rotation(api: ClusterApi) -> None:
    """Wait until the replica is in rotation and has replayed every write made so far."""
    position = await api.runtime.database.write_position()
    await wait_for(
        lambda: api.replica.in_rotation and api.replica.has_replayed(position),
        f"replica {api.replica.name} in rotation past {position}",
    )


def project_scans(cluster: PostgresCluster, port: int, database: str) -> int:
    """Return the sequential and index scans of the projects table, as one server counts them."""
    return int(
        cluster.sql(
            port,
            "SELECT coalesce(seq_scan, 0) + coalesce(idx_scan, 0) FROM pg_stat_user_tables "
            "WHERE relname = 'projects'",
            database,
        )
    )


async def test_reads_on_replica_writes_on_primary(
    cluster_api: ClusterApi, postgres_cluster: PostgresCluster, cluster_database: str
) -> None:
    writer = cluster_api.client()
    project_id = await create_project(writer)
    project = await wait_completed(writer, project_id)
    assert len(project["tasks"]) == 7
    await wait_in_rotation(cluster_api)

    replica_scans_before = project_scans(postgres_cluster, postgres_cluster.ports.replica, cluster_database)
    replica_reads_before = reads_on(cluster_api.replica.name)
    primary_reads_before = reads_on(PRIMARY)
    reader = cluster_api.client()
    for _ in range(20):
        response = await reader.get("/api/v1/projects")
        assert response.status_code == 200
        assert [item["id"] for item in response.json()["items"]] == [project_id]

    assert reads_on(cluster_api.replica.name) - replica_reads_before == 20
    assert reads_on(PRIMARY) == primary_reads_before
    # The replica's own statistics count the scans, once its backends flush them (within seconds).
    await wait_for(
        lambda: (
            project_scans(postgres_cluster, postgres_cluster.ports.replica, cluster_database)
            >= replica_scans_before + 20
        ),
        "the replica's pg_stat_user_tables to count 20 scans of projects",
    )
    inserted = postgres_cluster.sql(
        postgres_cluster.ports.primary,
        "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'projects'",
        cluster_database,
    )
    await wait_for(
        lambda: (
            int(
                postgres_cluster.sql(
                    postgres_cluster.ports.primary,
                    "SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = 'projects'",
                    cluster_database,
                )
            )
            >= 1
        ),
        f"the primary to count the inserted project (now {inserted})",
    )
    finished = await reader.get(f"/api/v1/projects/{project_id}")
    assert finished.json()["report"]


async def test_write_response_carries_position(cluster_api: ClusterApi) -> None:
    client = cluster_api.client()
    response = await client.post("/api/v1/projects", json={"brief": BRIEF})

    position = WalPosition.parse(response.headers[POSITION_HEADER])
    assert client.cookies[POSITION_COOKIE] == str(position)
    assert position <= await cluster_api.runtime.database.write_position()


async def test_invalid_position_is_rejected(cluster_api: ClusterApi) -> None:
    client = cluster_api.client()

    by_header = await client.get("/api/v1/projects", headers={POSITION_HEADER: "yesterday"})
    client.cookies.set(POSITION_COOKIE, "0/zz")
    by_cookie = await client.get("/api/v1/projects")

    assert by_header.status_code == 422
    assert POSITION_HEADER in by_header.json()["detail"]
    assert by_cookie.status_code == 422
    assert "delete the cookie" in by_cookie.json()["detail"]


async def test_paused_replica_keeps_reads_fresh(
    cluster_api: ClusterApi, postgres_cluster: PostgresCluster
) -> None:
    await wait_in_rotation(cluster_api)
    postgres_cluster.pause_replay()
    try:
        writer = cluster_api.client()
        project_id = await create_project(writer)
        # Read-your-writes: the replica has not replayed the write, so the primary serves the read.
        own = await writer.get(f"/api/v1/projects/{project_id}")
        assert own.status_code == 200
        assert own.json()["id"] == project_id
        own_list = await writer.get("/api/v1/projects")
        assert project_id in [item["id"] for item in own_list.json()["items"]]

        other = cluster_api.client()
        early = await other.get("/api/v1/projects")
        assert early.status_code == 200
        await wait_for(lambda: not cluster_api.replica.in_rotation, "the lagging replica to leave rotation")
        assert replica_lag(cluster_api.replica.name) > 1.0
        assert "lags" in cluster_api.replica.reason

        late = await other.get("/api/v1/projects")
        assert late.status_code == 200
        assert project_id in [item["id"] for item in late.json()["items"]]
    finally:
        postgres_cluster.resume_replay()

    await wait_in_rotation(cluster_api)
    assert replica_lag(cluster_api.replica.name) <= 1.0


async def test_stopped_replica_fails_no_request(
    cluster_api: ClusterApi, postgres_cluster: PostgresCluster
) -> None:
    client = cluster_api.client()
    project_id = await create_project(client)
    await wait_completed(client, project_id)
    await wait_in_rotation(cluster_api)
    reader = cluster_api.client()
    paths = ["/api/v1/projects", f"/api/v1/projects/{project_id}", f"/api/v1/projects/{project_id}/events"]

    statuses = []
    stopping = None
    try:
        for index in range(60):
            if index == 10:
                # Stop the replica the way a crash would, while reads keep arriving.
                stopping = asyncio.create_task(asyncio.to_thread(postgres_cluster.stop_replica, "immediate"))
            response = await reader.get(paths[index % len(paths)])
            statuses.append(response.status_code)
            if index == 30:
                statuses.append((await client.post("/api/v1/projects", json={"brief": BRIEF})).status_code)
        await stopping
        assert statuses.count(200) + statuses.count(202) == len(statuses), statuses
        await wait_for(lambda: not cluster_api.replica.in_rotation, "the stopped replica to leave rotation")
        primary_before = reads_on(PRIMARY)
        assert (await reader.get("/api/v1/projects")).status_code == 200
        assert reads_on(PRIMARY) == primary_before + 1
    finally:
        await asyncio.to_thread(postgres_cluster.start_replica)

    await wait_in_rotation(cluster_api)
    replica_before = reads_on(cluster_api.replica.name)
    assert (await reader.get("/api/v1/projects")).status_code == 200
    assert reads_on(cluster_api.replica.name) == replica_before + 1


async def test_refused_replica_is_skipped(
    postgres_cluster: PostgresCluster, cluster_database: str, tmp_path: Path
) -> None:
    # Nothing listens on this port of the cluster's range, so every connection is refused.
    closed_port = postgres_cluster.ports.replica_bouncer + 5
    config = write_database_config(tmp_path, postgres_cluster, cluster_database, replica_port=closed_port)
    settings = load_settings(config_dir=config, environ={"TORONTO_AI_ENV": "test"})
    app = create_app(settings)
    lifespan = app.router.lifespan_context(app)
    await lifespan.__aenter__()
    api = ClusterApi(app, app.state.runtime)
    try:
        client = api.client()
        created = await client.post("/api/v1/projects", json={"brief": BRIEF})
        fresh = api.client()
        listed = await fresh.get("/api/v1/projects")

        assert created.status_code == 202
        assert listed.status_code == 200
        assert [item["id"] for item in listed.json()["items"]] == [created.json()["id"]]
        assert not api.replica.in_rotation
        assert "ConnectionRefusedError" in api.replica.reason
    finally:
        for client in api.clients:
            await client.aclose()
        await lifespan.__aexit__(None, None, None)


async def test_pgbouncer_session_stays_clean(
    postgres_cluster: PostgresCluster, cluster_database: str, tmp_path: Path
) -> None:
    config = write_database_config(
        tmp_path, postgres_cluster, cluster_database, replicas=False, statement_timeout_ms=300
    )
    database = Database(load_settings(config_dir=config, environ={"TORONTO_AI_ENV": "test"}).database)
    try:
        async with database.read() as connection:
            await connection.execute(text("SELECT 1"))
            named_statements = await connection.scalar(text("SELECT count(*) FROM pg_prepared_statements"))
            timeout_inside = await connection.scalar(text("SHOW statement_timeout"))
        with pytest.raises(DBAPIError, match="statement timeout"):
            async with database.read() as connection:
                await connection.execute(text("SELECT pg_sleep(2)"))
    finally:
        await database.dispose()

    # Another client of the same PgBouncer, which sets nothing, gets the server's default.
    other = await asyncpg.connect(
        host="127.0.0.1",
        port=postgres_cluster.ports.primary_bouncer,
        user="toronto",
        password=postgres_cluster.app_password(),
        database=cluster_database,
        statement_cache_size=0,
    )
    try:
        timeout_elsewhere = await other.fetchval("SHOW statement_timeout")
    finally:
        await other.close()

    assert named_statements == 0
    assert timeout_inside == "300ms"
    assert timeout_elsewhere == "0"
