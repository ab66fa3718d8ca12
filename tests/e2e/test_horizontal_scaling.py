"""Stateless API instances behind the load balancer or nginx: one is killed with SIGKILL
under read load, no idempotent request fails, every project completes, and the restarted
instance receives requests again."""

from __future__ import annotations

import signal
import threading
import time
import uuid

import httpx
import pytest

from tests.e2e.balancers import BalancerProcess, FrontProcess, NginxProcess
from tests.e2e.processes import Deployment, port_in_test_range, wait_until
from tests.e2e.projects_api import BRIEF, FINAL_STATUSES, SECOND_BRIEF, submit_project, wait_for_status

pytestmark = pytest.mark.slow

# Each model call takes 300 ms, so projects are still running when the instance dies.
SETTINGS = {"TORONTO_AI_OFFLINE_LATENCY_MS": "300"}
BALANCER_SETTINGS = {
    "TORONTO_AI_LOAD_BALANCER__HEALTH_CHECK_INTERVAL_SECONDS": "0.5",
    "TORONTO_AI_LOAD_BALANCER__SLOW_START_SECONDS": "3",
}
READERS = 4
# Pause of each reader between requests, which bounds the load so that the workers keep
# enough of the test machine's cores to finish the projects.
READ_PAUSE_SECONDS = 0.02
MAX_READ_SECONDS = 180
READS_BEFORE_KILL = 50
READS_AFTER_KILL = 150


class ReadLoad:
    """Reader threads that GET projects through the front until stopped, recording every outcome."""

    def __init__(self, base_url: str, project_ids: list[str]) -> None:
        self.base_url = base_url
        self.paths = [f"/api/v1/projects/{project_id}" for project_id in project_ids] + [
            "/api/v1/projects?limit=5"
        ]
        self.outcomes: list[tuple[str, int | str]] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads = [
            threading.Thread(target=self._read, args=(index,), daemon=True) for index in range(READERS)
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def stop(self) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def count(self) -> int:
        with self._lock:
            return len(self.outcomes)

    def failures(self) -> list[tuple[str, int | str]]:
        with self._lock:
            return [outcome for outcome in self.outcomes if outcome[1] != 200]

    def _read(self, index: int) -> None:
        deadline = time.monotonic() + MAX_READ_SECONDS
        with httpx.Client(base_url=self.base_url, timeout=10.0, trust_env=False) as client:
            step = index
            while not self._stop.is_set() and time.monotonic() < deadline:
                path = self.paths[step % len(self.paths)]
                step += 1
                try:
                    outcome: int | str = client.get(path).status_code
                except httpx.HTTPError as exc:
                    outcome = f"{type(exc).__name__}: {exc}"
                with self._lock:
                    self.outcomes.append((path, outcome))
                self._stop.wait(READ_PAUSE_SECONDS)


def start_front(kind: str, deployment: Deployment, addresses: list[str]) -> FrontProcess:
    port = port_in_test_range()
    name = f"{kind}-{len(deployment.processes)}"
    if kind == "load_balancer":
        front: FrontProcess = BalancerProcess(
            name,
            addresses,
            port,
            deployment.environment(BALANCER_SETTINGS),
            deployment.directory / f"{name}.log",
        )
    else:
        front = NginxProcess(name, addresses, port, deployment.environment(), deployment.directory)
    deployment.processes.append(front)
    front.wait_serving(timeout=120)  # run_nginx.sh may install nginx first
    if isinstance(front, BalancerProcess):
        front.wait_admitted(addresses)
    return front


def api_requests(api_log_records: list[dict]) -> list[dict]:
    return [record for record in api_log_records if " /api/v1/" in record["message"]]


@pytest.mark.timeout(300)
@pytest.mark.parametrize("kind", ["load_balancer", "nginx"])
def test_instance_killed_under_read_load(kind: str, deployment: Deployment) -> None:
    deployment.migrate()
    apis = [deployment.launch_api(SETTINGS, port=port_in_test_range()) for _ in range(3)]
    workers = [deployment.launch_worker(SETTINGS) for _ in range(2)]
    for api in apis:
        api.wait_ready()
    for worker in workers:
        worker.wait_started()
    addresses = [f"127.0.0.1:{api.port}" for api in apis]
    front = start_front(kind, deployment, addresses)

    with front.client() as client:
        request_id = f"scaling-{uuid.uuid4().hex}"
        response = client.get("/api/v1/projects", headers={"X-Request-ID": request_id})
        assert response.status_code == 200, response.text
        assert response.headers["x-request-id"] == request_id
        # The instance logs a request just after sending its response.
        wait_until(
            lambda: any(api.records("http.request", request_id=request_id) for api in apis),
            10,
            f"an instance to log request id {request_id}",
        )

        project_ids = [
            submit_project(client, brief) for brief in (BRIEF, SECOND_BRIEF, BRIEF + "\n- Export to CSV\n")
        ]
        load = ReadLoad(front.base_url, project_ids)
        load.start()
        try:
            wait_until(
                lambda: load.count() >= READS_BEFORE_KILL, 60, f"{READS_BEFORE_KILL} reads before the kill"
            )
            victim = apis[1]
            assert victim.kill() == -signal.SIGKILL
            reads_at_kill = load.count()
            wait_until(
                lambda: load.count() >= reads_at_kill + READS_AFTER_KILL,
                90,
                f"{READS_AFTER_KILL} reads after the kill",
            )

            for project_id in project_ids:
                project = wait_for_status(client, project_id, FINAL_STATUSES, timeout=120)
                assert project["status"] == "completed", project["error"]

            restarted = deployment.launch_api(SETTINGS, port=victim.port)
            restarted.wait_ready()
            if isinstance(front, BalancerProcess):
                front.wait_admitted([f"127.0.0.1:{victim.port}"])
                assert front.backends()[f"127.0.0.1:{victim.port}"]["ejections"] >= 1
            # nginx tries a failed server again after its fail_timeout (10 s).
            wait_until(
                lambda: len(api_requests(restarted.records("http.request"))) >= 5,
                60,
                "the restarted instance to serve 5 API requests",
                restarted.log_tail,
            )
        finally:
            load.stop()

    assert load.count() >= READS_BEFORE_KILL + READS_AFTER_KILL
    assert load.failures() == [], f"{len(load.failures())} of {load.count()} reads failed"
    survivors = [apis[0], apis[2]]
    assert all(api_requests(api.records("http.request")) for api in survivors)
