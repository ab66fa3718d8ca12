"""Session fixtures that start a standalone Redis and a three-master Redis Cluster.

Both are started by ``scripts/services/redis.sh`` on 127.0.0.1, from port
``TAT_TEST_REDIS_PORT`` (46300 by default): the standalone server on that port and the
cluster's masters on the next three, whose cluster bus uses the ports 10000 higher. They
are shared by every test of a session and stopped at its end. Tests keep apart by giving
each run its own ``caching.key_prefix``; a test that stops a server starts it again.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "services" / "redis.sh"
PORT_BASE = int(os.environ.get("TAT_TEST_REDIS_PORT", "46300"))
SCRIPT_TIMEOUT_SECONDS = 120
# The default ports lie in Linux's ephemeral range (32768-60999), so a client connection of
# any process may hold one for a moment; a start that finds its port taken is tried again.
START_ATTEMPTS = 5
START_RETRY_SECONDS = 2.0


def run_script(*arguments: str) -> None:
    for attempt in range(1, START_ATTEMPTS + 1):
        completed = subprocess.run(
            [str(SCRIPT), *arguments],
            capture_output=True,
            text=True,
            timeout=SCRIPT_TIMEOUT_SECONDS,
            check=False,
        )
        if completed.returncode == 0:
            return
        output = completed.stdout + completed.stderr
        if "Address already in use" not in output or attempt == START_ATTEMPTS:
            raise AssertionError(
                f"{SCRIPT.name} {' '.join(arguments)} exited with {completed.returncode}:\n{output}"
            )
        time.sleep(START_RETRY_SECONDS)


@dataclass
class RedisServers:
    """Servers started under ``directory``, one folder per port."""

    directory: Path
    ports: list[int]
    host: str = "127.0.0.1"

    def stop_node(self, port: int) -> None:
        """Kill one server with SIGKILL."""
        run_script("stop-node", str(self.directory), str(port))

    def start_node(self, port: int) -> None:
        """Start a stopped server again; a cluster node waits until its cluster is whole."""
        run_script("start-node", str(self.directory), str(port))

    @property
    def port(self) -> int:
        return self.ports[0]

    def standalone_settings(self, key_prefix: str) -> dict[str, str]:
        return {
            "TORONTO_AI_CACHING__PROVIDER": "redis",
            "TORONTO_AI_CACHING__REDIS_HOST": self.host,
            "TORONTO_AI_CACHING__REDIS_PORT": str(self.port),
            "TORONTO_AI_CACHING__KEY_PREFIX": key_prefix,
        }

    def cluster_settings(self, key_prefix: str) -> dict[str, str]:
        return {
            "TORONTO_AI_DISTRIBUTED_CACHE__ENABLED": "true",
            "TORONTO_AI_DISTRIBUTED_CACHE__NODES": json.dumps(
                [{"host": self.host, "port": port} for port in self.ports]
            ),
            "TORONTO_AI_CACHING__KEY_PREFIX": key_prefix,
        }

    def cache_config(self) -> dict:
        """Return the ``config/cache_config.json`` document that points at this cluster."""
        return {
            "distributed_cache": {
                "enabled": True,
                "provider": "redis_cluster",
                "nodes": [{"host": self.host, "port": port} for port in self.ports],
                "default_ttl": 3600,
                "max_connections": 20,
            }
        }


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    directory = tmp_path_factory.mktemp("redis-standalone")
    run_script("start-standalone", str(directory), str(PORT_BASE))
    try:
        yield RedisServers(directory, [PORT_BASE])
    finally:
        run_script("stop", str(directory))


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServers]:
    directory = tmp_path_factory.mktemp("redis-cluster")
    ports = [PORT_BASE + 1, PORT_BASE + 2, PORT_BASE + 3]
    run_script("start-cluster", str(directory), *(str(port) for port in ports))
    try:
        yield RedisServers(directory, ports)
    finally:
        run_script("stop", str(directory))


@pytest.fixture
def key_prefix() -> str:
    """A key and channel prefix of this test alone, so tests sharing a server never meet."""
    return f"t{uuid.uuid4().hex[:12]}"
