"""API instances and a worker as processes, through PgBouncer, on a primary with a replica."""

from __future__ import annotations

import subprocess
from pathlib import Path

import httpx
import pytest

from app.api.consistency import POSITION_HEADER
from tests.e2e.processes import PYTHON, REPO_ROOT, Deployment, wait_until
from tests.integration.replicas.conftest import write_database_config
from tests.services.postgres_cluster import PostgresCluster

pytestmark = [pytest.mark.postgres_cluster, pytest.mark.slow]

BRIEF = "# Replicated deployment\n\nBuild a small thing that works."
PASSWORD_VARIABLE = "TAT_TEST_REPLICA_PASSWORD"


def test_instances_migrate_once_and_serve(
    postgres_cluster: PostgresCluster, cluster_database: str, tmp_path: Path
) -> None:
    # The replica's password comes from an environment variable, the master's from a file.
    config = write_database_config(
        tmp_path / "settings",
        postgres_cluster,
        cluster_database,
        replica_password={"password_env": PASSWORD_VARIABLE},
    )
    replica = f"127.0.0.1:{postgres_cluster.ports.replica_bouncer}/{cluster_database}"
    password = postgres_cluster.app_password()
    environment = {PASSWORD_VARIABLE: password}

    deployment = Deployment(None, tmp_path, config_dir=config)
    try:
        # Three instances start at once on an empty database and each migrates at start-up.
        apis = [deployment.launch_api(environment, migrate=True) for _ in range(3)]
        for api in apis:
            api.wait_ready()
        migrations = [record for api in apis for record in api.records("db.migrated")]
        assert len(migrations) == 1, migrations
        assert migrations[0]["to_revision"] is not None
        for api in apis:
            api.wait_for_record("db.replica_configured", 5, replica=replica, in_rotation=True)

        deployment.start_worker(environment)
        with httpx.Client(timeout=10, trust_env=False) as client:
            created = client.post(f"{apis[0].base_url}/api/v1/projects", json={"brief": BRIEF})
            assert created.status_code == 202
            assert POSITION_HEADER in created.headers
            project_id = created.json()["id"]

            # The cookie set by one instance sends this client's reads on any instance to a
            # server that has the write (cookies are per host, not per port).
            for api in apis:
                seen = client.get(f"{api.base_url}/api/v1/projects/{project_id}")
                assert seen.status_code == 200
                assert seen.json()["id"] == project_id

            def completed() -> dict | None:
                body = client.get(f"{apis[1].base_url}/api/v1/projects/{project_id}").json()
                return body if body["status"] == "completed" else None

            project = wait_until(completed, 60, f"project {project_id} to complete")
            assert project["report"]
            listed = client.get(f"{apis[2].base_url}/api/v1/projects").json()["items"]
            assert [item["id"] for item in listed] == [project_id]
            metrics = client.get(f"{apis[2].base_url}/metrics").text
            assert f'toronto_ai_database_replica_in_rotation{{replica="{replica}"}} 1.0' in metrics
            assert "toronto_ai_database_replica_lag_seconds" in metrics
    finally:
        deployment.stop_all()

    for process in deployment.processes:
        assert password not in process.log_path.read_text(errors="replace"), process.name


def test_instance_rejects_older_and_newer_schema(
    postgres_cluster: PostgresCluster, cluster_database: str, tmp_path: Path
) -> None:
    config = write_database_config(tmp_path, postgres_cluster, cluster_database)
    deployment = Deployment(None, tmp_path, config_dir=config)
    deployment.migrate()

    def start_without_migrating() -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PYTHON, "deploy.py", "--port", "1", "--no-migrate"],
            cwd=REPO_ROOT,
            env=deployment.environment(),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )

    def set_revision(revision: str) -> None:
        postgres_cluster.sql(
            postgres_cluster.ports.primary,
            f"UPDATE alembic_version SET version_num = '{revision}'",
            cluster_database,
        )

    set_revision("0001")
    older = start_without_migrating()
    set_revision("9999")
    newer = start_without_migrating()

    assert older.returncode == 2
    assert "at revision 0001 but this code needs" in older.stderr
    assert "run `python -m app.cli migrate`" in older.stderr
    assert newer.returncode == 2
    assert "newer than this code knows" in newer.stderr
    assert postgres_cluster.app_password() not in older.stderr + newer.stderr
