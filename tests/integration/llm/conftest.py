"""Fixtures of the provider tests: one scripted server per session, reset for each test."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.routing import Route

from tests.integration.llm.scripted_server import SERVER_START_TIMEOUT_SECONDS, Reply, ScriptedServer


@pytest.fixture(scope="session")
def running_server() -> Iterator[ScriptedServer]:
    """Start uvicorn on a free loopback port in a background thread for the whole session."""
    scripted = ScriptedServer()
    app = Starlette(routes=[Route("/{path:path}", scripted.handle, methods=["POST"])])
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="off", log_level="critical", timeout_graceful_shutdown=2
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="scripted-llm-server", daemon=True)
    thread.start()

    deadline = time.monotonic() + SERVER_START_TIMEOUT_SECONDS
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(
                "the scripted LLM server did not start on 127.0.0.1; see the uvicorn output above"
            )
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    scripted.url = f"http://127.0.0.1:{port}"

    yield scripted

    server.should_exit = True
    thread.join(timeout=10)


@pytest.fixture
def server(running_server: ScriptedServer) -> ScriptedServer:
    """The session's server with an empty script and no recorded requests."""
    running_server.script(Reply(status=500, body={"error": {"message": "no reply scripted for this test"}}))
    return running_server
