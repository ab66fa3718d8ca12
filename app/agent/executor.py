"""Execution of one leased task: build the prompt, call the role's model, store the result.

``TaskExecutor.execute`` reads what the task needs and calls the model outside any
transaction. ``TaskExecutor.store`` then writes the output, the conversation, the LLM
calls and the task's consequences (a plan's tasks, a report's project completion) in one
transaction that first checks the lease is still held.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

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
    add_artifact,
    add_llm_calls,
    add_messages,
    add_task_sources,
)
from app.db.states import FINAL_PROJECT_STATUSES, TaskKind
from app.errors import LLMError, PlanValidationError
from app.knowledge.service import KnowledgeService
from app.knowledge.store import ScoredChunk
from app.llm.base import ChatMessage, Completion, CompletionRequest
from app.llm.cache import ResponseCache
from app.llm.pricing import cost_usd
from app.llm.registry import ProviderRegistry
from app.worker.queue import Lease, TaskQueue

logger = logging.getLogger(__name__)


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
        self._teams: dict[str, dict[str, RoleSpec]] = {}

    async def execute(self, execution: Execution) -> None:
        """Run the attempt, filling ``execution``; raise LLMError or PlanValidationError on failure."""
        lease = execution.lease
        async with self.database.read() as connection:
            project = await project_store.get_project(connection, lease.project_id)
            if project.status in FINAL_PROJECT_STATUSES:
                raise ProjectClosedError(f"project {project.id} is {project.status}")
            team = self._teams.get(project.team)
            if team is None:
                # Teams are stored at start-up from the configuration and do not change
                # while the process runs, so one read per team is enough.
                team = self._teams[project.team] = await load_team(connection, project.team)
            role = team[lease.role]
            execution.role = role.name
            if lease.kind == TaskKind.REPORT:
                outputs = await project_store.read_work_outputs(connection, lease.project_id)
            elif lease.kind == TaskKind.WORK:
                task = await project_store.get_task(connection, lease.project_id, lease.task_id)
                outputs = await project_store.read_outputs(connection, task.depends_on)

        # Model calls happen after the read transaction ends, so that no pooled database
        # connection is held while a model thinks.
        if lease.kind == TaskKind.PLAN:
            await self._plan(execution, project.brief, role, team)
            return
        passages = await self._retrieve(execution, project, lease)
        if lease.kind == TaskKind.REPORT:
            messages = prompts.report_messages(project.brief, role, _prior(outputs, team), passages)
        else:
            messages = prompts.work_messages(
                project.brief, role, lease.title, lease.description, _prior(outputs, team), passages
            )

        completion = await self._call(execution, role, messages)
        execution.conversation = [*messages, ChatMessage("assistant", completion.text)]
        execution.output = completion.text

    async def _retrieve(self, execution: Execution, project, lease: Lease) -> list[prompts.Passage]:
        """Find the knowledge-base passages most relevant to this task and the brief."""
        top_k = self.settings.knowledge.task_top_k
        if not project.knowledge_base or top_k == 0:
            return []
        question = f"{lease.title}\n{lease.description}\n\n{project.brief[:1000]}"
        if lease.kind == TaskKind.REPORT:
            question = project.brief[:2000]
        found = await self.knowledge.query(project.knowledge_base, question, top_k)
        execution.sources = found.results
        return [prompts.Passage(hit.source, hit.heading, hit.text, hit.score) for hit in found.results]

    async def store(self, connection: AsyncConnection, execution: Execution) -> bool:
        """Store a successful attempt; return False when the lease was lost meanwhile."""
        lease = execution.lease
        message = NewEvent(
            "agent.message",
            {"role": execution.role, "key": lease.key, "content": execution.output},
            lease.task_id,
        )
        if not await self.queue.complete(connection, lease, execution.output, [message]):
            return False

        await add_messages(
            connection,
            lease.project_id,
            lease.task_id,
            execution.role,
            [(message.role, message.content) for message in execution.conversation],
        )
        await add_llm_calls(connection, lease.project_id, lease.task_id, lease.attempt, execution.calls)
        await add_artifact(connection, lease.project_id, lease.task_id, f"{lease.key}.md", execution.output)
        if execution.sources or lease.attempt > 1:
            await add_task_sources(connection, lease.task_id, execution.sources)

        if lease.kind == TaskKind.PLAN and execution.plan is not None:
            await project_store.insert_plan(
                connection, lease.project_id, execution.plan, lease.role, self.settings.worker.max_attempts
            )
        elif lease.kind == TaskKind.REPORT:
            await project_store.complete_project(connection, lease.project_id, execution.output)
        return True

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


def _prior(rows, team: dict[str, RoleSpec]) -> list[prompts.PriorOutput]:
    return [
        prompts.PriorOutput(
            row.key, row.title, team[row.role].title if row.role in team else row.role, row.output or ""
        )
        for row in rows
    ]
