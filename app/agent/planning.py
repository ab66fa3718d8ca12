"""Validation of the task graph that the project manager proposes.

A plan is accepted only if it parses, names enabled roles of the team, has unique ids,
depends only on tasks of the same plan, has no cycle and stays within the size limits.
Every rejection says which task and which rule, because the message is fed back to the
model for a corrected plan.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from app.agent.team import RoleSpec
from app.core.config import PlanningSettings
from app.errors import PlanValidationError

_FENCE = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


class PlannedTask(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(min_length=1, max_length=40)
    title: str = Field(min_length=1)
    role: str
    description: str = ""
    depends_on: list[str] = Field(default_factory=list)


class Plan(BaseModel):
    model_config = ConfigDict(extra="ignore")

    tasks: list[PlannedTask]


@dataclass(frozen=True, slots=True)
class ValidatedPlan:
    tasks: list[PlannedTask]  # in an order where every task comes after its dependencies


def parse_plan(text: str, team: Mapping[str, RoleSpec], limits: PlanningSettings) -> ValidatedPlan:
    """Parse and validate a plan, or raise PlanValidationError saying what to correct."""
    plan = _parse(text)
    tasks = plan.tasks

    if not tasks:
        raise PlanValidationError("the plan has no tasks; give at least one")
    if len(tasks) > limits.max_tasks:
        raise PlanValidationError(f"the plan has {len(tasks)} tasks; the limit is {limits.max_tasks}")

    roles = sorted(name for name, role in team.items() if role.enabled)
    seen: set[str] = set()
    for task in tasks:
        _check_task(task, roles, seen, limits)
        seen.add(task.id)

    for task in tasks:
        for dependency in task.depends_on:
            if dependency not in seen:
                raise PlanValidationError(
                    f"task {task.id} depends on {dependency!r}, which is not a task of this plan"
                )
            if dependency == task.id:
                raise PlanValidationError(f"task {task.id} depends on itself")

    return ValidatedPlan(tasks=_topological_order(tasks))


def _parse(text: str) -> Plan:
    stripped = text.strip()
    fenced = _FENCE.match(stripped)
    if fenced:
        stripped = fenced.group(1)

    try:
        document = json.loads(stripped)
    except json.JSONDecodeError as exc:
        raise PlanValidationError(
            f"the response is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno})"
        ) from exc
    try:
        return Plan.model_validate(document)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "the top level"
        raise PlanValidationError(f"{where}: {first['msg']}") from exc


def _check_task(task: PlannedTask, roles: list[str], seen: set[str], limits: PlanningSettings) -> None:
    if task.id in seen:
        raise PlanValidationError(f"task id {task.id!r} is used twice; ids must be unique")
    if task.role not in roles:
        raise PlanValidationError(
            f"task {task.id} has role {task.role!r}, which is not an enabled role of the team; "
            f"use one of: {', '.join(roles)}"
        )
    if len(task.title) > limits.max_title_chars:
        raise PlanValidationError(
            f"task {task.id} has a title of {len(task.title)} characters; the limit is {limits.max_title_chars}"
        )
    if len(task.description) > limits.max_description_chars:
        raise PlanValidationError(
            f"task {task.id} has a description of {len(task.description)} characters; "
            f"the limit is {limits.max_description_chars}"
        )


def _topological_order(tasks: list[PlannedTask]) -> list[PlannedTask]:
    """Order tasks so that dependencies come first (Kahn's algorithm), or report a cycle."""
    by_id = {task.id: task for task in tasks}
    waiting = {task.id: set(task.depends_on) for task in tasks}
    ordered: list[PlannedTask] = []

    ready = [task.id for task in tasks if not waiting[task.id]]
    while ready:
        current = ready.pop(0)
        ordered.append(by_id[current])
        for task in tasks:
            if current in waiting[task.id]:
                waiting[task.id].discard(current)
                if not waiting[task.id]:
                    ready.append(task.id)

    if len(ordered) < len(tasks):
        cyclic = sorted(task_id for task_id, pending in waiting.items() if pending)
        raise PlanValidationError(f"the dependencies form a cycle among tasks {', '.join(cyclic)}")
    return ordered
