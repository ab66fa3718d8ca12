"""``python -m app.training.cli vector_db`` run as a user runs it, against real Chroma servers.

One workspace (a SQLite file and a config folder) goes through the whole story: configure
two servers, ingest the PEP fixtures into one partition, repartition to 4 with a run that is
killed with SIGKILL midway and then rerun, repartition to 2, and roll back a second killed
run. Query output must not change at any step, and every vector must be in its partition on
every replica, once.
"""

from __future__ import annotations

import json
import os
import pty
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import chromadb
import pytest

from app.knowledge.layouts import collection_name, partition_of
from tests.e2e.test_knowledge_cli import CLI_TIMEOUT_SECONDS, REPO_ROOT

PEPS = REPO_ROOT / "tests" / "fixtures" / "peps"
# Enough text for a few hundred chunks; embedding all the fixtures would double the test's time.
PEP_FILES = ("pep-0007.rst", "pep-0008.rst", "pep-0020.rst", "pep-0257.rst", "pep-0263.rst", "pep-0328.rst")
QUESTION = "How should a docstring of a function be written?"
KILL_AFTER_VECTORS = 60
COPY_BATCH = "10"  # small batches leave many points at which the run can be killed

pytestmark = pytest.mark.slow


def cli_arguments(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "app.training.cli", *arguments]


@pytest.fixture(scope="module")
def workspace(tmp_path_factory, chroma_servers):
    root = tmp_path_factory.mktemp("vector-db-cli")
    (root / "config").mkdir()
    (root / "peps").mkdir()
    for name in PEP_FILES:
        (root / "peps" / name).write_bytes((PEPS / name).read_bytes())
    inherited = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment = {
        **inherited,
        "TORONTO_AI_CONFIG_DIR": str(root),
        "TORONTO_AI_DATABASE__URL": f"sqlite:///{root / 'knowledge.db'}",
    }
    return root, environment, chroma_servers[:2]


def run(environment: dict[str, str], *arguments: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        cli_arguments(*arguments),
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_SECONDS,
    )


def layouts(database: Path) -> list[tuple[int, str, int, int]]:
    """Return (version, status, partitions, copied) of every layout, oldest first."""
    with sqlite3.connect(database) as connection:
        return list(
            connection.execute(
                "SELECT version, status, partitions, copied FROM vector_layouts ORDER BY version"
            )
        )


def kill_midway(environment: dict[str, str], database: Path, partitions: int) -> None:
    """Start a repartitioning run and SIGKILL it once it has recorded some copied vectors."""
    process = subprocess.Popen(
        cli_arguments(
            "vector_db", "--partition-indices", "--partitions", str(partitions), "--batch-size", COPY_BATCH
        ),
        cwd=REPO_ROOT,
        env=environment,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    deadline = time.monotonic() + CLI_TIMEOUT_SECONDS
    building = []
    try:
        while time.monotonic() < deadline and process.poll() is None:
            building = [
                row for row in layouts(database) if row[1] == "building" and row[3] >= KILL_AFTER_VECTORS
            ]
            if building:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.01)
    finally:
        if process.poll() is None and not building:
            process.kill()
        process.wait()
    assert process.returncode == -signal.SIGKILL, process.stderr.read().decode()


def stored_ids(servers, knowledge_base_id: str, version: int, partitions: int, replicas: int) -> dict:
    """Return the ids held by each replica of each partition, read with Chroma's own client."""
    held = {}
    for partition in range(partitions):
        for copy in range(replicas + 1):
            server = servers[(partition + copy) % len(servers)]
            client = chromadb.HttpClient(
                host=server.host, port=server.port, settings=chromadb.Settings(anonymized_telemetry=False)
            )
            collection = client.get_collection(collection_name(knowledge_base_id, version, partition))
            held[(partition, server.port)] = collection.get(include=[])["ids"]
    return held


def test_repartitioning_story(workspace):
    root, environment, servers = workspace
    database = root / "knowledge.db"
    instances = ",".join(server.address for server in servers)

    configured = run(
        environment,
        "vector_db",
        "--configure-scaling",
        "--instances",
        instances,
        "--partitions",
        "1",
        "--replicas",
        "1",
    )
    assert configured.returncode == 0, configured.stderr
    written = json.loads((root / "config" / "vector_db_config.json").read_text())
    assert written["vector_db"]["provider"] == "chroma"
    assert written["vector_db"]["instances"] == [{"host": s.host, "port": s.port} for s in servers]
    assert (written["vector_db"]["partitions"], written["vector_db"]["replicas"]) == (1, 1)

    ingested = run(environment, "ingest", "peps", str(root / "peps"), "--create")
    assert ingested.returncode == 0, ingested.stderr
    baseline = run(environment, "query", "peps", QUESTION, "--top-k", "8")
    assert baseline.returncode == 0, baseline.stderr
    assert "pep-0257.rst" in baseline.stdout
    with sqlite3.connect(database) as connection:
        (base_id,) = connection.execute("SELECT id FROM knowledge_bases WHERE name = 'peps'").fetchone()
        chunk_ids = {row[0] for row in connection.execute("SELECT id FROM chunks")}

    # A run killed midway leaves the old layout serving queries, and a rerun resumes it.
    kill_midway(environment, database, 4)
    assert [row[:3] for row in layouts(database)] == [(1, "active", 1), (2, "building", 4)]
    during = run(environment, "query", "peps", QUESTION, "--top-k", "8")
    assert during.stdout == baseline.stdout

    resumed = run(
        environment, "vector_db", "--partition-indices", "--partitions", "4", "--batch-size", COPY_BATCH
    )
    assert resumed.returncode == 0, resumed.stderr
    assert f"peps: {len(chunk_ids)} vectors moved from 1 partition to 4 (resumed after" in resumed.stdout
    assert [row[:3] for row in layouts(database)] == [(1, "deleted", 1), (2, "active", 4)]
    held = stored_ids(servers, base_id, 2, 4, 1)
    for (partition, port), ids in held.items():
        assert len(ids) == len(set(ids)), port
        assert set(ids) == {chunk for chunk in chunk_ids if partition_of(chunk, 4) == partition}, port
    after_four = run(environment, "query", "peps", QUESTION, "--top-k", "8")
    assert after_four.stdout == baseline.stdout

    shrunk = run(environment, "vector_db", "--partition-indices", "--partitions", "2")
    assert shrunk.returncode == 0, shrunk.stderr
    assert f"peps: {len(chunk_ids)} vectors moved from 4 partitions to 2" in shrunk.stdout
    held = stored_ids(servers, base_id, 3, 2, 1)
    assert sum(len(ids) for (partition, port), ids in held.items() if port == servers[0].port) == len(
        chunk_ids
    )
    assert set().union(*map(set, held.values())) == chunk_ids

    # A killed run rolled back leaves the active layout as it was.
    kill_midway(environment, database, 3)
    rolled_back = run(environment, "vector_db", "--partition-indices", "--rollback")
    assert rolled_back.returncode == 0, rolled_back.stderr
    assert "peps: rolled back" in rolled_back.stdout
    assert [row[:3] for row in layouts(database)][-2:] == [(3, "active", 2), (4, "deleted", 3)]
    with pytest.raises(chromadb.errors.NotFoundError):
        chromadb.HttpClient(host=servers[0].host, port=servers[0].port).get_collection(
            collection_name(base_id, 4, 0)
        )

    status = run(environment, "vector_db", "--status")
    assert status.returncode == 0, status.stderr
    assert "peps: v3 active 2p" in status.stdout
    after_two = run(environment, "query", "peps", QUESTION, "--top-k", "8")
    assert after_two.stdout == baseline.stdout


def test_configure_scaling_rejects_unreachable_instance(tmp_path, chroma_servers):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment["TORONTO_AI_CONFIG_DIR"] = str(tmp_path)
    unreachable = "127.0.0.1:58099"  # in this project's port range, and no test starts a server there

    result = run(
        environment,
        "vector_db",
        "--configure-scaling",
        "--instances",
        f"{chroma_servers[0].address},{unreachable}",
        "--partitions",
        "2",
    )

    assert result.returncode == 2
    assert f"Chroma server {unreachable} is unreachable" in result.stderr
    assert "chroma run --host 127.0.0.1 --port 58099" in result.stderr
    assert not (tmp_path / "config" / "vector_db_config.json").exists()


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        (["--instances", "127.0.0.1"], "--instances: '127.0.0.1' is not host:port"),
        (["--instances", "127.0.0.1:58020", "--replicas", "1"], "vector_db.replicas (1) needs 2 instances"),
        ([], "give --instances host:port,... --partitions N --replicas R, or run it in a terminal"),
    ],
)
def test_configure_scaling_rejects_bad_flags(tmp_path, arguments, message):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment["TORONTO_AI_CONFIG_DIR"] = str(tmp_path)

    result = subprocess.run(
        cli_arguments("vector_db", "--configure-scaling", *arguments),
        cwd=REPO_ROOT,
        env=environment,
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=CLI_TIMEOUT_SECONDS,
    )

    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_configure_scaling_asks_in_a_terminal(tmp_path, chroma_servers):
    environment = {key: value for key, value in os.environ.items() if not key.startswith("TORONTO_AI_")}
    environment["TORONTO_AI_CONFIG_DIR"] = str(tmp_path)
    controller, terminal = pty.openpty()
    process = subprocess.Popen(
        cli_arguments("vector_db", "--configure-scaling"),
        cwd=REPO_ROOT,
        env=environment,
        stdin=terminal,
        stdout=terminal,
        stderr=subprocess.PIPE,
    )
    os.close(terminal)
    instances = f"{chroma_servers[0].address},{chroma_servers[1].address}"
    # An invalid count is asked again; the empty answer keeps the offered default of 0 replicas.
    os.write(controller, f"{instances}\nfour\n4\n\n".encode())
    screen = b""
    while True:
        try:
            chunk = os.read(controller, 4096)
        except OSError:  # the terminal closes when the process exits
            break
        if not chunk:
            break
        screen += chunk
    process.wait(CLI_TIMEOUT_SECONDS)
    os.close(controller)

    errors = process.stderr.read().decode()
    assert process.returncode == 0, errors
    # input() writes its prompt to stderr unless the readline module is loaded.
    assert "Chroma servers (host:port,host:port) [127.0.0.1:8000]: " in errors
    assert "Partitions per knowledge base [1]: " in errors
    assert "'four' is not a whole number; try again" in screen.decode()
    written = json.loads((tmp_path / "config" / "vector_db_config.json").read_text())["vector_db"]
    assert (written["partitions"], written["replicas"]) == (4, 0)
    assert [instance["port"] for instance in written["instances"]] == [
        chroma_servers[0].port,
        chroma_servers[1].port,
    ]
