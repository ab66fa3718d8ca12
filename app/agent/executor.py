"""Execution of one leased task: build the prompt, call the role's model, store the result.

``TaskExecutor.execute`` builds the prompt from the context the claim read and calls the
model outside any transaction. ``TaskExecutor.store_many`` then writes the outputs, the
conversations, the LLM calls and the tasks' consequences (a plan's tasks, a report's
project completion) of one or many attempts in the caller's transaction, after checking
that each lease is still held.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime

from sqlalchemy.ext.asyncio import AsyncConnection

from app.agent import prompts
from app.agent.planning import PlannedTask, parse_plan
from app.agent.team import PROJECT_MANAGER, RoleSpec, load_team
from app.core.config import Settings
from app.db import projects as project_store
from app.db.engine import Database
from app.db.records import (
    LLMCallRecord,
    NewEvent,
    TaskRecords,
    add_task_sources,
    artifact_row,
    llm_call_rows,
    message_rows,
    utc_now,
)
from app.db.states import FINAL_PROJECT_STATUSES, TaskKind
from app.errors import LLMError, PlanValidationError
from app.knowledge.service import KnowledgeService
from app.knowledge.store import ScoredChunk, load_cited_chunks
from app.llm.base import ChatMessage, Completion, CompletionRequest
from app.llm.cache import ResponseCache
from app.llm.pricing import cost_usd
from app.llm.registry import ProviderRegistry
from app.worker.queue import DependencyOutput, FinishedTask, Lease, TaskContext, TaskQueue

logger = logging.getLogger(__name__)

# How long a worker uses a team it read before reading it again.
TEAM_REFRESH_SECONDS = 10.0
# The report covers every task, so it carries more passages than one task: this many times
# knowledge.task_top_k.
REPORT_PASSAGE_FACTOR = 2


class ProjectClosedError(Exception):
    """The task's project was cancelled or failed while the task waited; nothing to do."""


@dataclass
class Execution:
    """The product of one attempt; ``calls`` is filled even when the attempt fails."""

    lease: Lease
    role: str = ""
    conversation: list[ChatMessage] = field(default_factory=list)
    calls: list[LLMCallRecord] = field(default_factory=list)
    output: str = ""
    plan: list[PlannedTask] | None = None
    sources: list[ScoredChunk] = field(default_factory=list)


class TaskExecutor:
    def __init__(
        self,
        database: Database,
        queue: TaskQueue,
        providers: ProviderRegistry,
        cache: ResponseCache,
        settings: Settings,
        knowledge: KnowledgeService,
    ) -> None:
        self.database = database
        self.queue = queue
        self.providers = providers
        self.cache = cache
        self.settings = settings
        self.knowledge = knowledge
        self._teams: dict[str, tuple[float, dict[str, RoleSpec]]] = {}
        self._team_reads: dict[str, asyncio.Lock] = {}

    async def execute(self, execution: Execution) -> None:
        """Run the attempt, filling ``execution``; raise LLMError or PlanValidationError on failure.

        The prompt is built from the context the claim read, so no database read happens
        here except when a team is read again and when a report gathers its tasks' passages.
        """
        lease = execution.lease
        context = lease.context
        if context is None:
            raise ValueError(
                f"lease of task {lease.task_id} has no context; claim tasks with TaskQueue.claim"
            )
        if context.project_status in FINAL_PROJECT_STATUSES:
            raise ProjectClosedError(f"project {lease.project_id} is {context.project_status}")
        team = await self._team(context.team)
        role = team[lease.role]
        execution.role = role.name

        if lease.kind == TaskKind.PLAN:
            await self._plan(execution, context.brief, role, team)
            return
        passages = await self._retrieve(execution, context, lease)
        prior = _prior(context.dependencies, team)
        if lease.kind == TaskKind.REPORT:
            messages = prompts.report_messages(context.brief, role, prior, passages)
        else:
            messages = prompts.work_messages(
                context.brief, role, lease.title, lease.description, prior, passages
            )

        completion = await self._call(execution, role, messages)
        execution.conversation = [*messages, ChatMessage("assistant", completion.text)]
        execution.output = completion.text

    async def _team(self, name: str) -> dict[str, RoleSpec]:
        # Every process stores its configured team at start-up, so a restarted API instance
        # may change the stored roles while this worker runs. Reading the team once per
        # TEAM_REFRESH_SECONDS picks that up without a read per task.
        team = self._fresh_team(name)
        if team is not None:
            return team
        # Tasks claimed together all miss the cache together. One of them reads the team and
        # the others wait for it, instead of each taking a pooled connection for the same read.
        async with self._team_reads.setdefault(name, asyncio.Lock()):
            team = self._fresh_team(name)
            if team is None:
                async with self.database.read() as connection:
                    team = await load_team(connection, name)
                self._teams[name] = (time.monotonic(), team)
        return team

    def _fresh_team(self, name: str) -> dict[str, RoleSpec] | None:
        cached = self._teams.get(name)
        if cached is not None and time.monotonic() - cached[0] < TEAM_REFRESH_SECONDS:
            return cached[1]
        return None

    async def _retrieve(
        self, execution: Execution, context: TaskContext, lease: Lease
    ) -> list[prompts.Passage]:
        """Find the knowledge-base passages most relevant to this task."""
        top_k = self.settings.knowledge.task_top_k
        if not context.knowledge_base or top_k == 0:
            return []
        if lease.kind == TaskKind.REPORT:
            hits = await self._passages_of_tasks(lease.project_id, REPORT_PASSAGE_FACTOR * top_k)
            if not hits:
                found = await self.knowledge.query(context.knowledge_base, context.brief[:2000], top_k)
                hits = found.results
        else:
            # A plan's task description names its part of the brief. Adding the brief itself
            # would make every task's query match the brief's opening instead.
            question = f"{lease.title}. {lease.description}"
            hits = (await self.knowledge.query(context.knowledge_base, question, top_k)).results
        execution.sources = hits
        return [prompts.Passage(hit.source, hit.heading, hit.text, hit.score) for hit in hits]

    async def _passages_of_tasks(self, project_id: str, limit: int) -> list[ScoredChunk]:
        """Gather the passages the project's tasks cited, so the report cites what they used.

        A query with the whole brief would match only the brief's opening, and the report
        would cite none of the passages behind the tasks' results.
        """
        async with self.database.read() as connection:
            return await load_cited_chunks(connection, project_id, limit)

    async def store(self, connection: AsyncConnection, execution: Execution) -> bool:
        """Store a successful attempt; return False when the lease was lost meanwhile."""
        [stored] = await self.store_many(connection, [execution])
        return stored

    async def store_many(self, connection: AsyncConnection, executions: Sequence[Execution]) -> list[bool]:
        """Store successful attempts of several tasks in the caller's transaction.

        Returns, per execution, whether it was stored; an attempt whose lease was lost
        meanwhile stores nothing. The rows of all stored attempts go in one insert per table.
        """
        stored, _ = await self.store_and_claim(connection, executions, "", 0)
        return stored

    async def store_and_claim(
        self, connection: AsyncConnection, executions: Sequence[Execution], worker_id: str, limit: int
    ) -> tuple[list[bool], list[Lease]]:
        """Store attempts as ``store_many`` does and lease up to ``limit`` ready tasks for ``worker_id``.

        Returns what ``store_many`` returns and the new leases; see ``TaskQueue.complete_and_claim``.
        """
        now = utc_now()
        finished = [
            FinishedTask(
                execution.lease,
                execution.output,
                [
                    NewEvent(
                        "agent.message",
                        {"role": execution.role, "key": execution.lease.key, "content": execution.output},
                        execution.lease.task_id,
                    )
                ],
                _records(execution, now),
            )
            for execution in executions
        ]
        stored, leases = await self.queue.complete_and_claim(connection, finished, worker_id, limit)
        kept = [execution for execution, was_stored in zip(executions, stored, strict=True) if was_stored]
        if kept:
            await self._store_consequences(connection, kept)
        return stored, leases

    async def _store_consequences(self, connection: AsyncConnection, executions: Sequence[Execution]) -> None:
        """Store what a stored attempt changes besides its own rows: sources, a plan's tasks, a report."""
        for execution in executions:
            lease = execution.lease
            if execution.sources or lease.attempt > 1:
                await add_task_sources(connection, lease.task_id, execution.sources)
            if lease.kind == TaskKind.PLAN and execution.plan is not None:
                await project_store.insert_plan(
                    connection,
                    lease.project_id,
                    execution.plan,
                    lease.role,
                    self.settings.worker.max_attempts,
                )
            elif lease.kind == TaskKind.REPORT:
                await project_store.complete_project(connection, lease.project_id, execution.output)

    async def _plan(
        self, execution: Execution, brief: str, manager: RoleSpec, team: dict[str, RoleSpec]
    ) -> None:
        limits = self.settings.planning
        messages = prompts.plan_messages(brief, manager, team, limits)
        error: PlanValidationError | None = None

        for _ in range(limits.max_plan_attempts):
            completion = await self._call(execution, manager, messages)
            messages = [*messages, ChatMessage("assistant", completion.text)]
            try:
                plan = parse_plan(
                    completion.text,
                    {name: role for name, role in team.items() if name != PROJECT_MANAGER},
                    limits,
                )
            except PlanValidationError as exc:
                error = exc
                logger.warning(
                    "plan rejected: %s",
                    exc,
                    extra={
                        "action": "plan.rejected",
                        "project_id": execution.lease.project_id,
                        "task_id": execution.lease.task_id,
                    },
                )
                messages = [*messages, prompts.plan_correction(str(exc))]
                continue
            execution.conversation = messages
            execution.output = completion.text
            execution.plan = plan.tasks
            return

        execution.conversation = messages
        raise PlanValidationError(
            f"the project manager gave no valid plan in {limits.max_plan_attempts} attempts; last error: {error}"
        )

    async def _call(self, execution: Execution, role: RoleSpec, messages: list[ChatMessage]) -> Completion:
        request = CompletionRequest(
            messages=messages, model=role.model, temperature=role.temperature, max_tokens=role.max_tokens
        )
        cacheable = self.cache.cacheable(request, role.name)
        cached = await self.cache.get(role.provider, request) if cacheable else None
        if cached is not None:
            execution.calls.append(_record(role, cached, cache_hit=True, cost=0.0))
            return cached

        provider = self.providers.get(role.provider)
        try:
            completion = await provider.complete(request)
        except LLMError as exc:
            execution.calls.append(
                LLMCallRecord(role.name, role.provider, role.model, 0, 0, 0.0, 0.0, False, "error", str(exc))
            )
            raise

        if cacheable:
            await self.cache.put(role.provider, request, completion)
        cost = cost_usd(
            self.providers.settings_for(role.provider),
            completion.model,
            completion.prompt_tokens,
            completion.completion_tokens,
        )
        execution.calls.append(_record(role, completion, cache_hit=False, cost=cost))
        return completion


def _records(execution: Execution, now: datetime) -> TaskRecords:
    """Build the conversation messages, LLM call records and artifact of a finished attempt."""
    lease = execution.lease
    conversation = [(message.role, message.content) for message in execution.conversation]
    return TaskRecords(
        message_rows(lease.project_id, lease.task_id, execution.role, conversation, now),
        llm_call_rows(lease.project_id, lease.task_id, lease.attempt, execution.calls, now),
        [artifact_row(lease.project_id, lease.task_id, f"{lease.key}.md", execution.output, now)],
    )


def _record(role: RoleSpec, completion: Completion, *, cache_hit: bool, cost: float) -> LLMCallRecord:
    return LLMCallRecord(
        agent_role=role.name,
        provider=role.provider,
        model=completion.model,
        prompt_tokens=completion.prompt_tokens,
        completion_tokens=completion.completion_tokens,
        latency_ms=0.0 if cache_hit else completion.latency_ms,
        cost_usd=cost,
        cache_hit=cache_hit,
        status="ok",
    )


def _prior(rows: Sequence[DependencyOutput], team: dict[str, RoleSpec]) -> list[prompts.PriorOutput]:
    return [
        prompts.PriorOutput(
            row.key, row.title, team[row.role].title if row.role in team else row.role, row.output or ""
        )
        for row in rows
    ]
