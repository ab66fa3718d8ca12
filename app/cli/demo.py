"""The first-run demo: start the all-in-one server, submit a brief, follow it live, print the report.

It talks to the server over HTTP exactly as any client would: POST the project, follow
``/events`` as Server-Sent Events, then GET the finished project.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import sys
import time
from pathlib import Path

import httpx
import uvicorn
from tqdm import tqdm

from app.api.server import prepare_instance, server_config
from app.core.config import load_settings
from app.core.logging import configure_logging
from app.errors import DocumentError
from app.training.cli import collect_files, read_documents

EXAMPLES_FOLDER = Path(__file__).resolve().parents[2] / "examples" / "briefs"
DEFAULT_EXAMPLE = "python-modernisation"
# The default example draws on these public-domain PEPs, ingested into a knowledge base first.
DEFAULT_KNOWLEDGE = Path(__file__).resolve().parents[2] / "examples" / "knowledge" / "python-peps"
DEFAULT_KNOWLEDGE_BASE = "python-peps"
INGESTION_TIMEOUT = 900.0  # seconds; the shipped sample takes well under a minute on two cores
STARTUP_TIMEOUT = 60.0  # seconds for the server to migrate and listen
PROJECT_TIMEOUT = 600.0  # seconds for the whole project


def resolve_brief(choice: str | None) -> Path:
    """Return the brief file for a path or the name of a shipped example."""
    if choice and Path(choice).is_file():
        return Path(choice)
    name = choice or DEFAULT_EXAMPLE
    candidate = EXAMPLES_FOLDER / f"{name.removesuffix('.md')}.md"
    if candidate.is_file():
        return candidate
    examples = ", ".join(sorted(path.stem for path in EXAMPLES_FOLDER.glob("*.md")))
    raise SystemExit(
        f"error: no brief file {choice!r} and no shipped example of that name; examples: {examples}"
    )


async def run_demo(
    choice: str | None, port: int, knowledge: Path | None = None, use_knowledge: bool = True
) -> int:
    brief_path = resolve_brief(choice)
    if knowledge is None and use_knowledge and choice in (None, DEFAULT_EXAMPLE):
        knowledge = DEFAULT_KNOWLEDGE
    settings = load_settings()
    port = port or _free_port()
    settings = settings.model_copy(update={"port": port, "host": "127.0.0.1"})
    # Progress lines are the demo's output; logs would bury them unless asked for.
    configure_logging(os.environ.get("TORONTO_AI_LOG_LEVEL", "WARNING"), settings.log_format)

    await prepare_instance(settings, migrate=True)
    server = uvicorn.Server(server_config(settings, migrate=False, embedded_worker=True))
    serving = asyncio.create_task(server.serve(), name="demo-server")
    try:
        base_url = f"http://127.0.0.1:{port}"
        async with httpx.AsyncClient(base_url=base_url, timeout=30.0) as client:
            await _wait_until_ready(client, serving)
            knowledge_base = None
            if knowledge is not None:
                knowledge_base = knowledge.name if knowledge != DEFAULT_KNOWLEDGE else DEFAULT_KNOWLEDGE_BASE
                if not await _ingest(client, knowledge_base, knowledge):
                    return 1
            return await _run_project(client, brief_path, knowledge_base)
    finally:
        server.should_exit = True
        await serving


async def _wait_until_ready(client: httpx.AsyncClient, serving: asyncio.Task) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if serving.done():
            serving.result()  # re-raises the start-up error
            raise SystemExit("error: the server stopped during start-up; see the log above")
        try:
            if (await client.get("/ready")).status_code == 200:
                return
        except httpx.TransportError:
            pass
        await asyncio.sleep(0.1)
    raise SystemExit(f"error: the server was not ready within {STARTUP_TIMEOUT:.0f} seconds")


async def _ingest(client: httpx.AsyncClient, name: str, folder: Path) -> bool:
    """Create the knowledge base if needed, add the folder's documents and follow their ingestion."""
    # Listed before anything is created, so a mistyped folder leaves no empty knowledge base.
    try:
        files = collect_files([folder])
    except DocumentError as exc:
        print(f"error: --knowledge {exc}; give a folder of documents", file=sys.stderr)
        return False
    created = await client.post("/api/v1/knowledge-bases", json={"name": name})
    if created.status_code not in (201, 409):
        print(f"error: creating knowledge base {name!r} failed: {created.json()['detail']}", file=sys.stderr)
        return False

    documents, rejected = read_documents(files, max_bytes=2**31)
    for line in rejected:
        print(f"skipped {line}", file=sys.stderr)
    body = {"documents": [{"source": item.source, "text": item.text} for item in documents]}
    response = await client.post(f"/api/v1/knowledge-bases/{name}/documents", json=body)
    if response.status_code != 202:
        print(f"error: adding documents to {name!r} failed: {response.json()['detail']}", file=sys.stderr)
        return False
    queued = response.json()
    waiting = queued["added"] + queued["replaced"]
    print(f"Knowledge base {name}: {_count(len(documents), 'document')} from {folder}, {waiting} to ingest")
    if waiting:
        # The worker loads the embedding model with the first document, so the bar does not
        # move for the first few seconds.
        print("Loading the embedding model for the first document...")

    deadline = time.monotonic() + INGESTION_TIMEOUT
    with tqdm(total=waiting, unit="doc", desc="ingesting", disable=not waiting) as progress:
        while time.monotonic() < deadline:
            state = (await client.get(f"/api/v1/knowledge-bases/{name}")).json()
            progress.update(max(0, waiting - state["pending_documents"] - progress.n))
            if state["pending_documents"] == 0:
                break
            await asyncio.sleep(0.5)
        else:
            print(f"error: ingestion did not finish within {INGESTION_TIMEOUT:.0f} seconds", file=sys.stderr)
            return False
    print(
        f"Knowledge base {name}: {_count(state['documents'], 'document')}, {_count(state['chunks'], 'chunk')}"
    )
    if state["failed_documents"]:
        print(
            f"warning: {state['failed_documents']} documents failed; see GET /api/v1/knowledge-bases/{name}/documents?status=failed",
            file=sys.stderr,
        )
    return True


async def _run_project(client: httpx.AsyncClient, brief_path: Path, knowledge_base: str | None) -> int:
    brief = brief_path.read_text(encoding="utf-8")
    body = {"brief": brief} | ({"knowledge_base": knowledge_base} if knowledge_base else {})
    response = await client.post("/api/v1/projects", json=body)
    if response.status_code != 202:
        print(f"error: the API rejected {brief_path}: {response.json()['detail']}", file=sys.stderr)
        return 1
    project_id = response.json()["id"]
    print(f"Project {project_id} submitted from {brief_path}")

    started = time.monotonic()
    await asyncio.wait_for(_follow(client, project_id, started), timeout=PROJECT_TIMEOUT)

    project = (await client.get(f"/api/v1/projects/{project_id}")).json()
    print()
    if project["status"] != "completed":
        print(f"Project {project['status']}: {project.get('error')}", file=sys.stderr)
        return 1
    print(project["report"])
    usage = project["usage"]
    print()
    work_tasks = [task for task in project["tasks"] if task["kind"] == "work"]
    print(
        f"{len(work_tasks)} tasks and a report, {usage['llm_calls']} LLM calls, "
        f"{usage['prompt_tokens'] + usage['completion_tokens']} tokens, ${usage['cost_usd']:.4f}, "
        f"{time.monotonic() - started:.1f} s"
    )
    if project.get("notice"):
        print(f"Note: {project['notice']}")
    print(
        f"The project is stored in {_database_hint()}; run `{_python_command()} -m app.cli serve` and "
        f"GET /api/v1/projects/{project_id} to read every task."
    )
    return 0


async def _follow(client: httpx.AsyncClient, project_id: str, started: float) -> None:
    titles: dict[str, str] = {}
    planned: set[str] = set()  # the tasks of the plan, which the [finished/total] counter counts
    finished = 0
    headers = {"Accept": "text/event-stream"}
    async with client.stream(
        "GET", f"/api/v1/projects/{project_id}/events", headers=headers, timeout=None
    ) as stream:
        async for line in stream.aiter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            kind, data, task_id = event["type"], event["data"], event["task_id"]
            elapsed = f"[{time.monotonic() - started:6.1f}s]"

            if kind == "plan.accepted":
                titles.update(
                    {task["id"]: f"{task['key']} {task['title']} ({task['role']})" for task in data["tasks"]}
                )
                planned.update(task["id"] for task in data["tasks"])
                print(f"{elapsed} plan accepted: {len(planned)} tasks")
            elif kind == "task.started" and task_id in titles:
                print(f"{elapsed} started   {titles[task_id]}")
            elif kind == "task.started":
                # The planning task starts before the plan names the other tasks.
                titles[task_id] = f"{data['key']} ({data['role']})"
            elif kind == "task.completed" and task_id in planned:
                finished += 1
                print(f"{elapsed} finished  {titles[task_id]}  [{finished}/{len(planned)}]")
            elif kind == "task.completed" and task_id in titles:
                print(f"{elapsed} finished  {titles[task_id]}")
            elif kind == "task.retrying":
                print(f"{elapsed} retrying  {titles.get(task_id, task_id)}: {data['error']}")
            elif kind.startswith("project."):
                print(f"{elapsed} project {kind.removeprefix('project.')}")


def _database_hint() -> str:
    return load_settings().database.sqlalchemy_url().split("///")[-1]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" if number == 1 else f"{number} {noun}s"


def _python_command() -> str:
    """Return how to call this Python from the current folder: ``.venv/bin/python`` after
    ``scripts/demo.sh``, whose environment the user never activated."""
    executable = Path(sys.executable)
    try:
        return str(executable.relative_to(Path.cwd()))
    except ValueError:
        return "python"


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
